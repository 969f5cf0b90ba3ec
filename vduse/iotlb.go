package vduse

import (
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// iotlb is the device's view of the driver's I/O virtual address space: the mappings the
// kernel's IOTLB holds, each mmapped from the file VDUSE_IOTLB_GET_FD returns. With
// virtio_vdpa the kernel adds mappings while the driver runs (a coherent mapping per ring
// when the queues are set up, the bounce buffer on the first DMA mapping) and tells nobody,
// so a mapping is looked up on first use (Resolve). With vhost_vdpa, VDUSE_UPDATE_IOTLB says
// which ranges changed; those, and everything at a device reset, are invalidated after the
// queues are stopped and drained.
//
// Resolve runs on the queue goroutines and the lanes: it reads an immutable snapshot through
// an atomic pointer, and takes the mutex only to map something new.
type iotlb struct {
	src mappingSource

	mu   sync.Mutex
	maps atomic.Pointer[[]mapping] // sorted by start, non-overlapping; copied on change
}

// mapping is one IOTLB entry mapped into this process.
type mapping struct {
	region virtio.Region // GPA == UserAddr == the IOVA of Data[0]
	last   uint64        // last IOVA
	mmap   []byte        // for munmap
}

// mappingSource maps the IOTLB entry holding an IOVA (VDUSE_IOTLB_GET_FD and mmap; a fake in
// tests). ok is false when the kernel has no entry there.
type mappingSource interface {
	mapIOVA(iova uint64) (m mapping, ok bool, err error)
	unmap(m mapping)
}

func newIOTLB(src mappingSource) *iotlb {
	t := &iotlb{src: src}
	t.maps.Store(&[]mapping{})
	return t
}

// lookup finds the mapping holding iova in the snapshot ms.
func lookup(ms []mapping, iova uint64) *mapping {
	i, _ := slices.BinarySearchFunc(ms, iova, func(m mapping, a uint64) int {
		switch {
		case m.last < a:
			return -1
		case m.region.GPA > a:
			return 1
		}
		return 0
	})
	if i < len(ms) && ms[i].region.GPA <= iova && iova <= ms[i].last {
		return &ms[i]
	}
	return nil
}

// Resolve implements virtio.Resolver.
func (t *iotlb) Resolve(iova uint64) *virtio.Region {
	if m := lookup(*t.maps.Load(), iova); m != nil {
		return &m.region
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	ms := *t.maps.Load()
	if m := lookup(ms, iova); m != nil {
		return &m.region
	}
	m, ok, err := t.src.mapIOVA(iova)
	if err != nil || !ok {
		return nil
	}
	// The kernel's entries do not overlap; one that overlaps what we hold means ours is stale
	// (the kernel changed it without telling): refuse it rather than keep two views.
	for i := range ms {
		if ms[i].region.GPA <= m.last && m.region.GPA <= ms[i].last {
			t.src.unmap(m)
			return nil
		}
	}
	next := append(slices.Clone(ms), m)
	slices.SortFunc(next, func(a, b mapping) int {
		if a.region.GPA < b.region.GPA {
			return -1
		}
		return 1
	})
	t.maps.Store(&next)
	return &lookup(next, iova).region
}

// invalidate unmaps every mapping that overlaps [start, last]. The caller has stopped and
// drained every queue: nothing uses the memory any more.
func (t *iotlb) invalidate(start, last uint64) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	ms := *t.maps.Load()
	var keep []mapping
	n := 0
	for _, m := range ms {
		if m.region.GPA <= last && start <= m.last {
			t.src.unmap(m)
			n++
			continue
		}
		keep = append(keep, m)
	}
	t.maps.Store(&keep)
	return n
}

// len is the number of mappings held.
func (t *iotlb) len() int { return len(*t.maps.Load()) }

// deviceMappings maps IOTLB entries of a VDUSE device.
type deviceMappings struct{ fd int }

func (d deviceMappings) mapIOVA(iova uint64) (mapping, bool, error) {
	e := iotlbEntry{start: iova, last: iova}
	b := e.marshal()
	fd, err := ioctl(d.fd, ioctlIOTLBGetFD, b)
	if err == unix.EINVAL {
		return mapping{}, false, nil // no entry there
	}
	if err != nil {
		return mapping{}, false, fmt.Errorf("VDUSE_IOTLB_GET_FD %#x: %w", iova, err)
	}
	defer unix.Close(fd)
	e.unmarshal(b)
	size := e.last - e.start + 1
	switch {
	case e.last < e.start || size == 0 || size > math.MaxInt || e.offset > math.MaxInt64-size:
		return mapping{}, false, fmt.Errorf("VDUSE_IOTLB_GET_FD %#x: entry [%#x, %#x] at offset %#x cannot be mapped", iova, e.start, e.last, e.offset)
	case iova < e.start || iova > e.last:
		return mapping{}, false, fmt.Errorf("VDUSE_IOTLB_GET_FD %#x: returned [%#x, %#x]", iova, e.start, e.last)
	}
	prot := unix.PROT_READ | unix.PROT_WRITE
	if e.perm == accessRO {
		prot = unix.PROT_READ
	}
	data, err := unix.Mmap(fd, int64(e.offset), int(size), prot, unix.MAP_SHARED)
	if err != nil {
		return mapping{}, false, fmt.Errorf("mmap IOTLB entry [%#x, %#x]: %w", e.start, e.last, err)
	}
	return mapping{region: virtio.Region{GPA: e.start, UserAddr: e.start, Data: data}, last: e.last, mmap: data}, true, nil
}

func (d deviceMappings) unmap(m mapping) { unix.Munmap(m.mmap) }
