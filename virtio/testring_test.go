package virtio

// Test helpers: fake guest memory made of plain []byte regions and a tiny
// virtio "driver" that lays out a split ring in it (virtio 1.2 section 2.7),
// writes descriptors and available entries, and reads the used ring back.
// Everything here writes guest memory the way a guest would, so the code
// under test cannot tell it from the real thing.

import (
	"encoding/binary"
	"reflect"
	"testing"
)

const testPage = 4096

// testRegionSpec describes one region of a fake guest memory.
type testRegionSpec struct {
	gpa, user, size uint64
}

// newTestMemory allocates the regions (page-rounded backing arrays, so the
// 32-bit ring index accesses of ring_unsafe.go stay inside the allocation)
// and builds the GuestMemory.
func newTestMemory(t testing.TB, specs ...testRegionSpec) *GuestMemory {
	t.Helper()
	rs := make([]Region, len(specs))
	for i, s := range specs {
		backing := make([]byte, (s.size+testPage-1)/testPage*testPage+testPage)
		rs[i] = Region{GPA: s.gpa, UserAddr: s.user, Data: backing[:s.size:s.size]}
	}
	mem, err := NewGuestMemory(rs)
	if err != nil {
		t.Fatalf("NewGuestMemory: %v", err)
	}
	return mem
}

// sliceAddr is the address of s's first element (of its backing array when
// s is empty), without package unsafe.
func sliceAddr(s []byte) uintptr { return reflect.ValueOf(s).Pointer() }

// locate reports where s lies in mem: the index of the region that holds all
// of s, and the offset of s[0] in it. ok is false when s is not entirely
// inside one region.
func locate(mem *GuestMemory, s []byte) (region int, off uint64, ok bool) {
	p := sliceAddr(s)
	for i, r := range mem.Regions() {
		base := sliceAddr(r.Data[:cap(r.Data)])
		if p < base {
			continue
		}
		o := uint64(p - base)
		if o > r.size() || uint64(len(s)) > r.size()-o {
			continue
		}
		if len(s) > 0 && o == r.size() {
			continue
		}
		return i, o, true
	}
	return 0, 0, false
}

// gpaOf returns the guest physical address of s[0], failing the test when s
// is not inside guest memory.
func gpaOf(t testing.TB, mem *GuestMemory, s []byte) uint64 {
	t.Helper()
	i, off, ok := locate(mem, s)
	if !ok {
		t.Fatalf("slice of %d bytes is not inside guest memory", len(s))
	}
	return mem.Regions()[i].GPA + off
}

// Fake guest layout used by testRing: one main region of guest RAM holding
// the rings and a data area, and a second region adjacent in guest physical
// space but far away in the frontend's address space, so buffers can cross
// a region boundary.
const (
	ringMainGPA   = 0x10_0000
	ringMainUser  = 0x7f00_0000_0000
	ringMainSize  = 0x10_0000 // 1 MiB
	ringDescOff   = 0x0000
	ringAvailOff  = 0x4000 // tables of up to 1024 entries fit below
	ringUsedOff   = 0x8000
	ringDataOff   = 0x10000
	ringSecondGPA = ringMainGPA + ringMainSize
	ringSecondUsr = 0x5500_0000_0000
	ringSecondSz  = 0x4_0000
	ringGapGPA    = ringSecondGPA + ringSecondSz // nothing is mapped here
)

// testRing is the driver side of one split virtqueue in fake guest memory,
// plus the device-side SplitQueue over it.
type testRing struct {
	t        testing.TB
	mem      *GuestMemory
	q        *SplitQueue
	size     int
	desc     []byte // descriptor table
	avail    []byte // available ring
	used     []byte // used ring
	availIdx uint16
	nextDesc int    // next free descriptor (round robin)
	dataNext uint64 // bump allocator in the data area
	lastUsed uint16 // driver's copy of how far it read the used ring
}

func newTestRing(t testing.TB, size int, eventIdx bool) *testRing {
	t.Helper()
	mem := newTestMemory(t,
		testRegionSpec{gpa: ringMainGPA, user: ringMainUser, size: ringMainSize},
		testRegionSpec{gpa: ringSecondGPA, user: ringSecondUsr, size: ringSecondSz},
	)
	r := &testRing{t: t, mem: mem, size: size, dataNext: ringMainGPA + ringDataOff}
	r.desc = r.bytes(ringMainGPA+ringDescOff, uint64(16*size))
	r.avail = r.bytes(ringMainGPA+ringAvailOff, uint64(6+2*size))
	r.used = r.bytes(ringMainGPA+ringUsedOff, uint64(6+8*size))
	q, err := NewSplitQueue(mem, size, r.addrs(), eventIdx, 0)
	if err != nil {
		t.Fatalf("NewSplitQueue: %v", err)
	}
	r.q = q
	return r
}

// addrs are the ring addresses in the frontend's address space.
func (r *testRing) addrs() RingAddrs {
	return RingAddrs{
		Desc:  ringMainUser + ringDescOff,
		Avail: ringMainUser + ringAvailOff,
		Used:  ringMainUser + ringUsedOff,
	}
}

// bytes returns guest memory at gpa (which must be mapped, in one region).
func (r *testRing) bytes(gpa, n uint64) []byte {
	r.t.Helper()
	b, err := r.mem.Slice(gpa, n)
	if err != nil {
		r.t.Fatalf("test layout: %v", err)
	}
	return b
}

// alloc returns the gpa of n fresh bytes in the data area, 16-byte aligned.
func (r *testRing) alloc(n int) uint64 {
	r.t.Helper()
	gpa := r.dataNext
	r.dataNext = (gpa + uint64(n) + 15) &^ 15
	if r.dataNext > ringMainGPA+ringMainSize {
		r.t.Fatalf("test data area exhausted")
	}
	return gpa
}

// put allocates len(b) bytes, copies b there and returns the gpa.
func (r *testRing) put(b []byte) uint64 {
	gpa := r.alloc(len(b))
	copy(r.bytes(gpa, uint64(len(b))), b)
	return gpa
}

// putDesc writes one descriptor into a table (the ring's or an indirect one).
func putDesc(table []byte, i int, addr uint64, length uint32, flags, next uint16) {
	d := table[16*i : 16*i+16]
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], flags)
	binary.LittleEndian.PutUint16(d[14:], next)
}

// setDesc writes descriptor i of the ring's table.
func (r *testRing) setDesc(i int, addr uint64, length uint32, flags, next uint16) {
	putDesc(r.desc, i, addr, length, flags, next)
}

// buf is one buffer of a chain as the driver describes it.
type buf struct {
	addr  uint64
	len   uint32
	write bool
}

// rbuf and wbuf are a device-readable and a device-writable buffer.
func rbuf(addr uint64, n int) buf { return buf{addr: addr, len: uint32(n)} }
func wbuf(addr uint64, n int) buf { return buf{addr: addr, len: uint32(n), write: true} }

// addChain writes bufs as a chain of direct descriptors, taking free
// descriptors round robin (so chains are not always 0, 1, 2...), and
// returns the head. It does not publish the chain.
func (r *testRing) addChain(bufs ...buf) uint16 {
	r.t.Helper()
	if len(bufs) == 0 || len(bufs) > r.size {
		r.t.Fatalf("addChain: %d buffers for a ring of %d", len(bufs), r.size)
	}
	idx := make([]int, len(bufs))
	for i := range bufs {
		idx[i] = r.nextDesc
		r.nextDesc = (r.nextDesc + 1) % r.size
	}
	for i, b := range bufs {
		var flags, next uint16
		if b.write {
			flags |= DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= DescFNext
			next = uint16(idx[i+1])
		}
		r.setDesc(idx[i], b.addr, b.len, flags, next)
	}
	return uint16(idx[0])
}

// addIndirect writes bufs into a new indirect table in the data area and
// one ring descriptor pointing at it, and returns that descriptor's index.
func (r *testRing) addIndirect(bufs ...buf) uint16 {
	gpa := r.alloc(16 * len(bufs))
	table := r.bytes(gpa, uint64(16*len(bufs)))
	for i, b := range bufs {
		var flags, next uint16
		if b.write {
			flags |= DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= DescFNext
			next = uint16(i + 1)
		}
		putDesc(table, i, b.addr, b.len, flags, next)
	}
	head := r.nextDesc
	r.nextDesc = (r.nextDesc + 1) % r.size
	r.setDesc(head, gpa, uint32(16*len(bufs)), DescFIndirect, 0)
	return uint16(head)
}

// publish makes heads available, in order, and advances avail.idx.
func (r *testRing) publish(heads ...uint16) {
	for _, h := range heads {
		binary.LittleEndian.PutUint16(r.avail[4+2*(int(r.availIdx)%r.size):], h)
		r.availIdx++
	}
	binary.LittleEndian.PutUint16(r.avail[2:], r.availIdx)
}

// setAvailIdx writes avail.idx directly (a broken or rewound driver).
func (r *testRing) setAvailIdx(v uint16) {
	r.availIdx = v
	binary.LittleEndian.PutUint16(r.avail[2:], v)
}

// setAvailFlags writes avail.flags (VIRTQ_AVAIL_F_NO_INTERRUPT).
func (r *testRing) setAvailFlags(v uint16) { binary.LittleEndian.PutUint16(r.avail[0:], v) }

// setUsedEvent writes used_event, the last field of the available ring.
func (r *testRing) setUsedEvent(v uint16) {
	binary.LittleEndian.PutUint16(r.avail[4+2*r.size:], v)
}

// usedFlags, usedIdx and availEvent read the device-written fields.
func (r *testRing) usedFlags() uint16 { return binary.LittleEndian.Uint16(r.used[0:]) }
func (r *testRing) usedIdx() uint16   { return binary.LittleEndian.Uint16(r.used[2:]) }
func (r *testRing) availEvent() uint16 {
	return binary.LittleEndian.Uint16(r.used[4+8*r.size:])
}

// usedElem reads used ring slot i (mod size).
func (r *testRing) usedElem(i uint16) (id, length uint32) {
	s := r.used[4+8*(int(i)%r.size):]
	return binary.LittleEndian.Uint32(s[0:]), binary.LittleEndian.Uint32(s[4:])
}

// usedEntry is one element of the used ring.
type usedEntry struct{ id, len uint32 }

// takeUsed returns the used elements published since the last call.
func (r *testRing) takeUsed() []usedEntry {
	var out []usedEntry
	for idx := r.usedIdx(); r.lastUsed != idx; r.lastUsed++ {
		id, n := r.usedElem(r.lastUsed)
		out = append(out, usedEntry{id, n})
	}
	return out
}
