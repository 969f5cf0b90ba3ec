package vhostuser

import (
	"fmt"
	"math"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// mappedRegion is one guest memory region mapped into this process.
type mappedRegion struct {
	MemRegion
	mapping []byte // the whole mmap, for munmap
}

// mapRegion maps region r from fd. It always closes fd: the mapping keeps the
// memory alive. The region must lie inside the file, or touching it would
// raise SIGBUS instead of an error.
func mapRegion(r MemRegion, fd int) (*mappedRegion, error) {
	defer unix.Close(fd)
	end := r.MmapOffset + r.MemorySize
	switch {
	case r.MemorySize == 0:
		return nil, fmt.Errorf("%w: empty memory region at gpa %#x", ErrRejected, r.GuestPhysAddr)
	case end < r.MmapOffset || end > math.MaxInt:
		return nil, fmt.Errorf("%w: memory region offset %#x size %#x overflows", ErrRejected, r.MmapOffset, r.MemorySize)
	case r.GuestPhysAddr+r.MemorySize-1 < r.GuestPhysAddr || r.UserspaceAddr+r.MemorySize-1 < r.UserspaceAddr:
		return nil, fmt.Errorf("%w: memory region at gpa %#x wraps the address space", ErrRejected, r.GuestPhysAddr)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat guest memory fd: %w", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < end {
		return nil, fmt.Errorf("%w: memory region ends at %#x beyond its file of %#x bytes", ErrRejected, end, st.Size)
	}
	// Map from offset 0, as libvhost-user does: hugetlbfs wants offsets
	// aligned to its page size, which mmap_offset need not be.
	m, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mmap guest memory region at gpa %#x size %#x: %w", r.GuestPhysAddr, r.MemorySize, err)
	}
	return &mappedRegion{MemRegion: r, mapping: m}, nil
}

func (m *mappedRegion) unmap() {
	if m.mapping != nil {
		unix.Munmap(m.mapping)
		m.mapping = nil
	}
}

func (m *mappedRegion) region() virtio.Region {
	return virtio.Region{
		GPA:      m.GuestPhysAddr,
		UserAddr: m.UserspaceAddr,
		Data:     m.mapping[m.MmapOffset : m.MmapOffset+m.MemorySize : m.MmapOffset+m.MemorySize],
	}
}

// buildMemory checks a set of mapped regions and makes the GuestMemory view.
func buildMemory(regions []*mappedRegion) (*virtio.GuestMemory, error) {
	rs := make([]virtio.Region, len(regions))
	for i, r := range regions {
		rs[i] = r.region()
	}
	mem, err := virtio.NewGuestMemory(rs)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRejected, err)
	}
	return mem, nil
}

func unmapAll(regions []*mappedRegion) {
	for _, r := range regions {
		r.unmap()
	}
}
