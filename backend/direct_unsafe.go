package backend

import "unsafe"

// bufferAddress is the address of b's first byte, for checking it against
// the memory alignment O_DIRECT needs. It is only compared, never turned back
// into a pointer: Go's heap does not move objects and guest memory is an
// mmap, so while b is in use the address is that of the bytes the kernel
// would be handed.
func bufferAddress(b []byte) uintptr {
	return uintptr(unsafe.Pointer(unsafe.SliceData(b)))
}
