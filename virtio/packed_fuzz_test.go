package virtio

import (
	"encoding/binary"
	"errors"
	"slices"
	"testing"
)

// packedSeed builds FuzzPackedChain inputs: a packed ring of size descriptors, the driver
// area, a completion order, and the data the descriptors point at (at gpa rcData), in the
// layout of FuzzReadChain's memory.
type packedSeed struct {
	size, flags byte
	base        uint32
	order       byte // completion order selector
	desc        []byte
	driver      [4]byte
	data        []byte
}

func newPackedSeed(size int, eventIdx bool) *packedSeed {
	s := &packedSeed{size: byte(size - 1), base: InitialPackedBase, desc: make([]byte, 16*size)}
	if eventIdx {
		s.flags = 1
	}
	return s
}

func (s *packedSeed) put(b []byte) uint64 {
	gpa := uint64(rcData + len(s.data))
	s.data = append(s.data, b...)
	for len(s.data)%16 != 0 {
		s.data = append(s.data, 0)
	}
	return gpa
}

// chain writes a chain for buffer id at ring position pos, available in the lap of wrap.
func (s *packedSeed) chain(pos int, wrap bool, id uint16, extra uint16, bufs ...buf) {
	size := len(s.desc) / 16
	for i, b := range bufs {
		flags := availFlags(wrap) | extra
		if b.write {
			flags |= DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= DescFNext
		}
		putPacked(s.desc, pos, b.addr, b.len, id, flags)
		if pos++; pos == size {
			pos, wrap = 0, !wrap
		}
	}
}

func (s *packedSeed) bytes() []byte {
	b := []byte{s.size, s.flags, s.order}
	b = binary.LittleEndian.AppendUint32(b, s.base)
	b = append(b, s.desc...)
	b = append(b, s.driver[:]...)
	return append(b, s.data...)
}

// FuzzPackedChain turns fuzz bytes into a packed descriptor ring, its driver area, a starting
// position and the buffers the descriptors point at, then pops, walks and parses every chain and
// completes them in an order the input chooses, as the device does. Whatever the guest wrote,
// nothing panics, no buffer id is in flight twice, no more descriptors are in flight than the
// ring holds, a chain beyond the limits keeps only its last descriptor, and every used
// descriptor lands where the driver looks for it.
func FuzzPackedChain(f *testing.F) {
	{ // IN, OUT and FLUSH chains, completed out of order
		s := newPackedSeed(8, false)
		h := s.put(blkHeader(BlkTIn, 1))
		d, st := s.put(make([]byte, 512)), s.put([]byte{0xff})
		s.chain(0, true, 2, 0, rbuf(h, 16), wbuf(d, 512), wbuf(st, 1))
		ho := s.put(concat(blkHeader(BlkTOut, 2), pattern(512, 3)))
		s.chain(3, true, 0, 0, rbuf(ho, 16+512), wbuf(st, 1))
		hf := s.put(blkHeader(BlkTFlush, 0))
		s.chain(5, true, 7, 0, rbuf(hf, 16), wbuf(st, 1))
		s.order = 0x5a
		f.Add(s.bytes())
	}
	{ // indirect GET_ID and discard, with EVENT_IDX and the driver's event at 1
		s := newPackedSeed(4, true)
		s.data = make([]byte, 0x500)
		putPacked(s.data[0x00:], 0, rcData+0x100, 16, 0, 0)
		putPacked(s.data[0x00:], 1, rcData+0x200, 20, 0, DescFWrite)
		putPacked(s.data[0x00:], 2, rcData+0x300, 1, 0, DescFWrite)
		putPacked(s.data[0x40:], 0, rcData+0x400, 32, 0, 0)
		putPacked(s.data[0x40:], 1, rcData+0x300, 1, 0, DescFWrite)
		copy(s.data[0x100:], blkHeader(BlkTGetID, 0))
		copy(s.data[0x400:], concat(blkHeader(BlkTDiscard, 0), discardSeg(8, 8, 0)))
		s.chain(0, true, 3, DescFIndirect, buf{addr: rcData, len: 48})
		s.chain(1, true, 1, DescFIndirect, buf{addr: rcData + 0x40, len: 32})
		binary.LittleEndian.PutUint16(s.driver[0:], withWrap(1, true))
		binary.LittleEndian.PutUint16(s.driver[2:], eventFlagsDesc)
		f.Add(s.bytes())
	}
	{ // a chain across the end of the ring, resumed at position 5 of the second lap
		s := newPackedSeed(6, false)
		s.base = PackedBase(5, false, 5, false)
		s.chain(5, false, 4, 0, rbuf(rcMainSize-8, 16), wbuf(rcMainSize+8, 9))
		f.Add(s.bytes())
	}
	{ // hostile: the same id twice, an id out of range, a chain running into the next lap
		s := newPackedSeed(8, false)
		s.chain(0, true, 1, 0, wbuf(rcData, 1))
		s.chain(1, true, 1, 0, wbuf(rcData, 1))
		s.chain(2, true, 9, 0, wbuf(rcData, 1))
		f.Add(s.bytes())
		s = newPackedSeed(4, false)
		s.chain(2, true, 0, 0, rbuf(rcData, 16), rbuf(rcData, 16), wbuf(rcData, 1)) // wraps: 3rd not avail
		s.chain(0, true, 0, DescFNext, rbuf(rcData, 16), rbuf(rcData, 16))          // every one NEXT
		f.Add(s.bytes())
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := &fuzzReader{data}
		size := 1 + int(fr.u8()) // 1..256, any size
		eventIdx := fr.u8()&1 != 0
		order := fr.u8()
		base := uint32(fr.u16()) | uint32(fr.u16())<<16
		mem := newTestMemory(t,
			testRegionSpec{gpa: 0, user: rcMainUser, size: rcMainSize},
			testRegionSpec{gpa: rcMainSize, user: rcSecondUser, size: rcSecondSize},
		)
		main := mem.Regions()[0].Data
		rest := fr.b
		rest = rest[copy(main[:16*size], rest):]
		rest = rest[copy(main[rcAvail:rcAvail+4], rest):]
		copy(main[rcData:], rest)

		q, err := NewPackedQueue(mem, size, RingAddrs{Desc: rcMainUser, Avail: rcMainUser + rcAvail, Used: rcMainUser + rcUsed}, eventIdx, base)
		if err != nil {
			if !errors.Is(err, ErrBrokenRing) {
				t.Fatalf("NewPackedQueue: %v", err)
			}
			return
		}
		var c, lc DescChain
		var req BlkRequest
		var inflight []uint16
		held := map[uint16]uint16{}        // id -> ring descriptors, for the driver's view of the used ring
		start := int(q.outstanding.Load()) // left by a back-end before us
		descs := start
		q.DisableNotify()
		complete := func(i int) {
			id := inflight[i]
			inflight = slices.Delete(inflight, i, i+1)
			pos, wrap := q.UsedIdx()
			q.PushUsed(id, 1)
			gotID, flags := q.idFlags(pos)
			if gotID != id || !isUsedIn(flags, wrap) {
				t.Fatalf("used descriptor at %d: id %d flags %#x, want id %d in lap %v", pos, gotID, flags, id, wrap)
			}
			descs -= int(held[id])
			delete(held, id)
			q.NeedInterrupt()
		}
		for pops := 0; pops < 4*size; pops++ {
			id, ok, err := q.Next()
			if err != nil {
				if !errors.Is(err, ErrBrokenRing) {
					t.Fatalf("Next: %v", err)
				}
				break
			}
			if !ok {
				break
			}
			if int(id) >= size {
				t.Fatalf("id %d beyond the ring", id)
			}
			if _, dup := held[id]; dup {
				t.Fatalf("id %d popped while in flight", id)
			}
			held[id] = q.bufs[id].n
			descs += int(q.bufs[id].n)
			if descs > size {
				t.Fatalf("%d descriptors in flight in a ring of %d", descs, size)
			}
			inflight = append(inflight, id)
			errLim := q.ReadChainLimited(id, &lc, ChainLimits{MaxSegs: 1 + int(id)%4, MaxSegLen: 16 << (id % 8)})
			limited := slices.Clone(lc.Segs)
			if err := q.ReadChainLimited(id, &c, ChainLimits{}); err != nil {
				if !errors.Is(err, ErrBadChain) {
					t.Fatalf("ReadChain: %v", err)
				}
				if !errors.Is(errLim, ErrBadChain) {
					t.Fatalf("ReadChainLimited on a bad chain: %v", errLim)
				}
			} else {
				checkLimited(t, c.Segs, limited, errLim, 1+int(id)%4, 16<<(id%8))
				for i := 1; i < len(c.Segs); i++ {
					if c.Segs[i-1].Write && !c.Segs[i].Write {
						t.Fatal("readable segment after a writable one")
					}
				}
				err = ParseBlkRequest(mem, c.Segs, &req)
				checkParsed(t, mem, c.Segs, &req, err)
				if req.Status != nil {
					req.Status[0] = BlkSOK
				}
			}
			// complete one now and then, from the front or the back of what is in flight
			if order&(1<<(pops%8)) != 0 {
				if pops%2 == 0 {
					complete(0)
				} else {
					complete(len(inflight) - 1)
				}
			}
		}
		for len(inflight) > 0 {
			complete(len(inflight) / 2)
		}
		q.EnableNotify()
		if int(q.outstanding.Load()) != start {
			t.Fatalf("%d descriptors outstanding after every chain completed", q.outstanding.Load())
		}
	})
}

// isUsedIn says whether flags mark a descriptor used in the lap of wrap.
func isUsedIn(flags uint16, wrap bool) bool {
	return (flags&packedDescFAvail != 0) == wrap && (flags&packedDescFUsed != 0) == wrap
}
