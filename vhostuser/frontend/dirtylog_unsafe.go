package frontend

import "unsafe"

// u64At returns the 8-byte aligned word at b[off:] for atomic access (the log is an mmap, page
// aligned; off is a multiple of 8).
func u64At(b []byte, off int) *uint64 {
	_ = b[off : off+8]
	return (*uint64)(unsafe.Pointer(&b[off]))
}
