package vduse

import (
	"math"
	"testing"

	"github.com/vublk/vublk/virtio"
)

// fakeSource stands in for VDUSE_IOTLB_GET_FD and mmap: entries in the kernel's IOTLB, each
// "mapped" as fresh memory; it counts maps and unmaps.
type fakeSource struct {
	entries  [][2]uint64 // [start, last]
	maps     int
	unmapped int
}

func (f *fakeSource) mapIOVA(iova uint64) (mapping, bool, error) {
	for _, e := range f.entries {
		if e[0] <= iova && iova <= e[1] {
			f.maps++
			data := make([]byte, e[1]-e[0]+1)
			return mapping{region: virtio.Region{GPA: e[0], UserAddr: e[0], Data: data}, last: e[1], mmap: data}, true, nil
		}
	}
	return mapping{}, false, nil
}

func (f *fakeSource) unmap(mapping) { f.unmapped++ }

func TestIOTLB(t *testing.T) {
	src := &fakeSource{entries: [][2]uint64{{0, 0xffff}, {0x100000, 0x100fff}, {0x200000, 0x201fff}}}
	tlb := newIOTLB(src)
	mem := virtio.NewResolvedGuestMemory(tlb)
	// First use maps the entry, later uses find it without asking the kernel again.
	for range 3 {
		if _, err := mem.Slice(0x100010, 16); err != nil {
			t.Fatal(err)
		}
	}
	if src.maps != 1 || tlb.len() != 1 {
		t.Fatalf("maps %d held %d, want 1 and 1", src.maps, tlb.len())
	}
	if _, err := mem.AppendSlices(nil, 0xff00, 0x100); err != nil {
		t.Fatal(err)
	}
	if _, err := mem.Slice(0x201000, 0x1000); err != nil {
		t.Fatal(err)
	}
	if _, err := mem.Slice(0x300000, 1); err == nil {
		t.Fatal("an address with no IOTLB entry resolved")
	}
	if src.maps != 3 || tlb.len() != 3 {
		t.Fatalf("maps %d held %d, want 3 and 3", src.maps, tlb.len())
	}
	// An update of one range unmaps only what overlaps it; the next use maps it again.
	if n := tlb.invalidate(0x100800, 0x100800); n != 1 || src.unmapped != 1 || tlb.len() != 2 {
		t.Fatalf("invalidate: %d unmapped %d held %d", n, src.unmapped, tlb.len())
	}
	if _, err := mem.Slice(0x100000, 8); err != nil || src.maps != 4 {
		t.Fatalf("remap: %v maps %d", err, src.maps)
	}
	// The kernel moved an entry without telling: the stale view is not extended with an overlap.
	src.entries = append(src.entries, [2]uint64{0x200800, 0x2fffff})
	if _, err := mem.Slice(0x250000, 1); err == nil {
		t.Fatal("an entry overlapping a held one was used")
	}
	if n := tlb.invalidate(0, math.MaxUint64); n != 3 || tlb.len() != 0 {
		t.Fatalf("reset: %d unmapped, %d held", n, tlb.len())
	}
}
