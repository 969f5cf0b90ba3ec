package vhostuser

import (
	"encoding/binary"
	"slices"
	"testing"

	"github.com/vublk/vublk/virtio"
)

const pkSize = 8

func newPackedInflight(n int) *packedInflight {
	p := &packedInflight{b: make([]byte, InflightPackedRegionSize(n)), n: n, headOf: make([]uint16, n)}
	p.init(0, true)
	return p
}

// ringDesc is one 16-byte packed ring descriptor.
func ringDesc(addr uint64, length uint32, id, flags uint16) []byte {
	d := make([]byte, 16)
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], id)
	binary.LittleEndian.PutUint16(d[14:], flags)
	return d
}

// markUsed writes a used descriptor for id at pos of ring, in the lap of wrap.
func markUsed(ring []byte, pos int, id uint16, wrap bool) {
	var f uint16
	if wrap {
		f = 1<<7 | 1<<15
	}
	binary.LittleEndian.PutUint16(ring[16*pos+12:], id)
	binary.LittleEndian.PutUint16(ring[16*pos+14:], f)
}

// TestPackedInflightResume: a region left by a back-end killed at each point of popping and
// completing resumes to the chains that really were in flight, from their saved descriptors,
// with popping going on after them.
func TestPackedInflightResume(t *testing.T) {
	chain := func(id uint16, n int) [][]byte {
		var ds [][]byte
		for j := range n {
			f := uint16(1 << 7)
			if j+1 < n {
				f |= virtio.DescFNext
			}
			ds = append(ds, ringDesc(uint64(0x1000*int(id)+16*j), uint32(16+j), id, f))
		}
		return ds
	}
	tests := []struct {
		name string
		// run pops and completes on p and ring; it returns the ids that must be resubmitted
		run       func(p *packedInflight, ring []byte) []uint16
		lastAvail uint16
		availWrap bool
	}{
		{"nothing popped", func(p *packedInflight, ring []byte) []uint16 { return nil }, 0, true},
		{"popped, none completed", func(p *packedInflight, ring []byte) []uint16 {
			p.Popped(3, chain(3, 2))
			p.Popped(5, chain(5, 3))
			return []uint16{3, 5}
		}, 5, true},
		{"out of order: the second completed", func(p *packedInflight, ring []byte) []uint16 {
			p.Popped(3, chain(3, 2))
			p.Popped(5, chain(5, 3))
			p.Publishing(5, 3, true)
			markUsed(ring, 0, 5, true) // over chain 3's head: the region's copy is what counts
			p.Published(5)
			return []uint16{3}
		}, 5, true},
		{"killed before the used descriptor was written", func(p *packedInflight, ring []byte) []uint16 {
			p.Popped(3, chain(3, 2))
			p.Popped(5, chain(5, 3))
			p.Publishing(5, 3, true)
			return []uint16{3, 5} // rolled back: 5 is done again
		}, 5, true},
		{"killed after the used descriptor was written", func(p *packedInflight, ring []byte) []uint16 {
			p.Popped(3, chain(3, 2))
			p.Popped(5, chain(5, 3))
			p.Publishing(3, 2, true)
			markUsed(ring, 0, 3, true)
			return []uint16{5} // committed
		}, 5, true},
		{"across the end of the ring", func(p *packedInflight, ring []byte) []uint16 {
			for id := range uint16(3) {
				p.Popped(id, chain(id, 2))
			}
			pos, wrap := uint16(0), true
			for id := range uint16(3) {
				p.Publishing(id, pos+2, wrap)
				markUsed(ring, int(pos), id, wrap)
				pos += 2
				p.Published(id)
			}
			p.Popped(6, chain(6, 3)) // positions 6, 7, 0
			p.Popped(7, chain(7, 1)) // position 1 of the next lap
			return []uint16{6, 7}
		}, 2, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := newPackedInflight(pkSize)
			ring := make([]byte, 16*pkSize)
			want := tc.run(p, ring)
			q := &packedInflight{b: slices.Clone(p.b), n: pkSize, headOf: make([]uint16, pkSize)}
			r, fresh, err := q.resume(pkSize, ring)
			if err != nil || fresh {
				t.Fatalf("resume: %v, fresh %v", err, fresh)
			}
			var got []uint16
			for _, c := range r.resubmit {
				got = append(got, c.ID)
				if !slices.Equal(c.Descs, slices.Concat(chain(c.ID, len(c.Descs)/16)...)) {
					t.Errorf("buffer %d: descriptors not the ones popped", c.ID)
				}
			}
			if !slices.Equal(got, want) {
				t.Errorf("resubmitted %v, want %v", got, want)
			}
			if r.lastAvail != tc.lastAvail || r.availWrap != tc.availWrap {
				t.Errorf("popping goes on at %d wrap %v, want %d wrap %v", r.lastAvail, r.availWrap, tc.lastAvail, tc.availWrap)
			}
			// resuming again finds the same: the repair is idempotent
			r2, _, err := q.resume(pkSize, ring)
			if err != nil || len(r2.resubmit) != len(r.resubmit) || r2.lastAvail != r.lastAvail {
				t.Errorf("second resume: %v, %+v", err, r2)
			}
		})
	}
}

// FuzzPackedInflightResume: whatever region the front-end hands over, and whatever the ring
// holds, resume does not panic, and what it resubmits fits the ring: distinct ids, at most a
// ring of descriptors, popping going on inside the ring.
func FuzzPackedInflightResume(f *testing.F) {
	p := newPackedInflight(pkSize)
	ring := make([]byte, 16*pkSize)
	p.Popped(3, [][]byte{ringDesc(0x1000, 16, 3, 1<<7|virtio.DescFNext), ringDesc(0x2000, 1, 3, 1<<7|virtio.DescFWrite)})
	p.Popped(5, [][]byte{ringDesc(0x3000, 16, 5, 1<<7)})
	p.Publishing(5, 1, true)
	markUsed(ring, 0, 5, true)
	f.Add(slices.Clone(p.b), ring, uint8(pkSize))
	f.Add(make([]byte, InflightPackedRegionSize(pkSize)), ring, uint8(4))
	f.Fuzz(func(t *testing.T, region, ringBytes []byte, size uint8) {
		b := make([]byte, InflightPackedRegionSize(pkSize))
		copy(b, region)
		ringSize := 1 + int(size)%pkSize
		desc := make([]byte, 16*ringSize)
		copy(desc, ringBytes)
		q := &packedInflight{b: b, n: pkSize, headOf: make([]uint16, ringSize)}
		r, fresh, err := q.resume(ringSize, desc)
		if err != nil || fresh {
			return
		}
		total := 0
		seen := map[uint16]bool{}
		for _, c := range r.resubmit {
			if int(c.ID) >= ringSize || seen[c.ID] || len(c.Descs) == 0 || len(c.Descs)%16 != 0 {
				t.Fatalf("resubmit id %d (%d bytes) in a ring of %d", c.ID, len(c.Descs), ringSize)
			}
			seen[c.ID] = true
			total += len(c.Descs) / 16
		}
		if total > ringSize || int(r.lastAvail) >= ringSize || int(r.usedIdx) >= ringSize {
			t.Fatalf("%d descriptors resubmitted, last avail %d, used %d, ring of %d", total, r.lastAvail, r.usedIdx, ringSize)
		}
		// the ring takes it as it is
		mem, err := virtio.NewGuestMemory([]virtio.Region{{GPA: 0, UserAddr: 0x10000, Data: make([]byte, 4096)}})
		if err != nil {
			t.Fatal(err)
		}
		pq, err := virtio.NewPackedQueue(mem, ringSize, virtio.RingAddrs{Desc: 0x10000, Avail: 0x10800, Used: 0x10900}, false, virtio.InitialPackedBase)
		if err != nil {
			t.Fatal(err)
		}
		pq.Resume(r.lastAvail, r.availWrap, r.usedIdx, r.usedWrap, r.resubmit)
		for range r.resubmit {
			if _, ok, err := pq.Next(); !ok || err != nil {
				t.Fatalf("a resubmitted chain was not popped: %v", err)
			}
		}
	})
}
