package frontend

// The ring indices and flags are 16-bit fields that the back-end reads and
// writes concurrently, in memory shared with it. sync/atomic has no 16-bit
// operations, so each access goes through the aligned 32-bit word holding
// the field (the idiom of virtio/ring_unsafe.go): loads are atomic 32-bit
// loads, stores are compare-and-swap loops that keep the other half. The CAS
// is also the full barrier the notification protocol needs between
// publishing an index and reading the other side's event index or flags.
//
// The word may reach two bytes past the slice, never past the allocation:
// rings are allocated in multiples of 64 bytes.

import (
	"sync/atomic"
	"unsafe"
)

// word returns the aligned 32-bit word holding b[off:off+2] and the bit
// shift of the field in it. The caller has checked off+2 <= len(b), and off
// is even.
func word(b []byte, off int) (*uint32, uint) {
	p := unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), off)
	mis := uintptr(p) & 3
	return (*uint32)(unsafe.Add(p, -int(mis))), uint(mis) * 8
}

// load16 atomically reads the little-endian uint16 at b[off:].
func load16(b []byte, off int) uint16 {
	_ = b[off+1]
	w, shift := word(b, off)
	return uint16(atomic.LoadUint32(w) >> shift)
}

// store16 atomically writes v as the little-endian uint16 at b[off:].
func store16(b []byte, off int, v uint16) {
	_ = b[off+1]
	w, shift := word(b, off)
	mask := uint32(0xffff) << shift
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^mask|uint32(v)<<shift) {
			return
		}
	}
}

// addrOf is the virtual address of b's memory in this process: the
// userspace address the back-end is told for guest memory.
func addrOf(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) }

// load32 and store32 atomically read and write the aligned little-endian uint32 at b[off:]: a
// packed descriptor's id and flags, which must change together.
func load32(b []byte, off int) uint32 {
	_ = b[off+3]
	return atomic.LoadUint32((*uint32)(unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), off)))
}

func store32(b []byte, off int, v uint32) {
	_ = b[off+3]
	atomic.StoreUint32((*uint32)(unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), off)), v)
}
