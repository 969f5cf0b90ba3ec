package virtio

// The dirty log is a byte array the front-end reads and clears concurrently, and Go has no 8-bit
// atomic OR: each byte is ORed through the naturally aligned 32-bit word that contains it (the
// other bytes are ORed with zero, which changes nothing). The word never leaves the page the byte
// lives in, so it stays inside the mapping even at the end of the bitmap.
//
// gpaOf turns a slice of a mapped region back into its guest physical address: request buffers
// are kept as slices, and only a completion under logging needs their addresses. The address is
// computed and used at once, never stored.

import (
	"sync/atomic"
	"unsafe"
)

// orByte atomically sets the bits of mask in b[i].
func orByte(b []byte, i int, mask byte) {
	_ = b[i : i+1] // bounds check without a plain read, which would race with the ORs
	p := unsafe.Add(unsafe.Pointer(unsafe.SliceData(b)), i)
	mis := uintptr(p) & 3
	w := (*uint32)(unsafe.Add(p, -int(mis)))
	bits := uint32(mask) << (8 * mis) // little-endian: the low address is the low byte
	if atomic.LoadUint32(w)&bits == bits {
		return // already set: no write to a line the front-end is reading
	}
	atomic.OrUint32(w, bits)
}

// gpaOf returns the guest physical address of b[0] if b lies inside one of m's regions.
func (m *GuestMemory) gpaOf(b []byte) (uint64, bool) {
	if m == nil || len(b) == 0 {
		return 0, false
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	for i := range m.regions {
		r := &m.regions[i]
		base := uintptr(unsafe.Pointer(unsafe.SliceData(r.Data)))
		if p >= base {
			if off := uint64(p - base); off < r.size() && uint64(len(b)) <= r.size()-off {
				return r.GPA + off, true
			}
		}
	}
	return 0, false
}
