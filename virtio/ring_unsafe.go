package virtio

// Ring indices and flags are 16-bit fields that the guest reads and writes
// concurrently with us, in memory shared with another process. Go's
// sync/atomic has no 16-bit operations, so each access goes through the
// naturally aligned 32-bit word that contains the field: loads are 32-bit
// atomic loads, stores are compare-and-swap loops that leave the other half of
// the word as it is. On amd64 and arm64 the CAS is also the full memory
// barrier that virtio's notification-suppression protocol needs between
// publishing an index and re-reading the other side's.
//
// The word may extend two bytes beyond b (a field at the end of a slice), but
// never beyond the mapping: guest regions are mapped whole pages, and Go heap
// slices used by tests start 8-byte aligned.

import (
	"sync/atomic"
	"unsafe"
)

// word returns the aligned 32-bit word containing b[off:off+2] and the bit
// shift of the field in it. The caller has checked off+2 <= len(b) and
// off%2 == 0.
func word(b []byte, off int) (*uint32, uint) {
	p := unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), off)
	mis := uintptr(p) & 3
	shift := uint(mis) * 8 // little-endian: the low address holds the low half
	return (*uint32)(unsafe.Add(p, -int(mis))), shift
}

// load16 atomically reads the little-endian uint16 at b[off:].
func load16(b []byte, off int) uint16 {
	_ = b[off : off+2 : len(b)] // bounds check without a plain read, which would race with the CAS
	w, shift := word(b, off)
	return uint16(atomic.LoadUint32(w) >> shift)
}

// store16 atomically writes v as the little-endian uint16 at b[off:].
func store16(b []byte, off int, v uint16) {
	_ = b[off : off+2 : len(b)] // bounds check without a plain read, which would race with the CAS
	w, shift := word(b, off)
	mask := uint32(0xffff) << shift
	for {
		old := atomic.LoadUint32(w)
		if atomic.CompareAndSwapUint32(w, old, old&^mask|uint32(v)<<shift) {
			return
		}
	}
}

// fence is a full memory barrier.
func fence() {
	var x atomic.Uint32
	x.Add(1)
}

// load32 atomically reads the little-endian uint32 at b[off:]; off is a multiple of 4 from a
// 4-aligned start (a packed descriptor's id and flags, an event suppression structure).
func load32(b []byte, off int) uint32 {
	_ = b[off : off+4 : len(b)]
	return atomic.LoadUint32((*uint32)(unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), off)))
}

// store32 atomically writes v as the little-endian uint32 at b[off:], with the alignment of
// load32: a packed used descriptor's id and flags become visible together.
func store32(b []byte, off int, v uint32) {
	_ = b[off : off+4 : len(b)]
	atomic.StoreUint32((*uint32)(unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), off)), v)
}
