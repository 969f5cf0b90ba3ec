package frontend

import (
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser"
)

// minAlign is the alignment and size granularity of every allocation: a
// cache line, so that requests of different queues never share one.
const minAlign = 64

// Memory is guest memory shared with the back-end: one memfd, mapped once
// into this process and described to the back-end as one or more regions.
// Guest physical addresses run from 0 to Size; the regions' userspace
// addresses are where the memory is mapped here, as with QEMU.
//
// Alloc and Free hand out buffers for rings and requests. They are safe for
// concurrent use.
type Memory struct {
	fd      int
	data    []byte
	regions []vhostuser.MemRegion

	mu     sync.Mutex
	freed  *sync.Cond // broadcast when memory is freed or Memory closes
	free   []extent   // free ranges, sorted, never adjacent
	closed bool
}

type extent struct{ off, n uint64 }

func (e extent) end() uint64 { return e.off + e.n }

// Buffer is an allocation in guest memory.
type Buffer struct {
	// GPA is the guest physical address of Data[0].
	GPA uint64
	// Data is the memory itself.
	Data []byte

	size uint64 // allocated bytes, a multiple of minAlign
}

// NewMemory creates size bytes of guest memory, presented to the back-end as
// the given number of regions of equal size. size must be a multiple of
// regions pages.
func NewMemory(size int64, regions int) (*Memory, error) {
	page := int64(os.Getpagesize())
	if regions < 1 || size <= 0 || size%(int64(regions)*page) != 0 {
		return nil, fmt.Errorf("guest memory of %d bytes in %d regions: want a positive multiple of %d pages", size, regions, regions)
	}
	fd, err := unix.MemfdCreate("vublk-guest-memory", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("size guest memory: %w", err)
	}
	data, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("map guest memory: %w", err)
	}
	m := &Memory{fd: fd, data: data, free: []extent{{0, uint64(size)}}}
	m.freed = sync.NewCond(&m.mu)
	base := addrOf(data)
	per := uint64(size) / uint64(regions)
	for i := range uint64(regions) {
		gpa := i * per
		m.regions = append(m.regions, vhostuser.MemRegion{
			GuestPhysAddr: gpa, MemorySize: per, UserspaceAddr: base + gpa, MmapOffset: gpa,
		})
	}
	return m, nil
}

// Size is the size of guest memory in bytes.
func (m *Memory) Size() uint64 { return uint64(len(m.data)) }

// Fd is the memfd backing guest memory; every region is mapped from it.
func (m *Memory) Fd() int { return m.fd }

// Regions describes the memory as the SET_MEM_TABLE regions.
func (m *Memory) Regions() []vhostuser.MemRegion {
	return append([]vhostuser.MemRegion(nil), m.regions...)
}

// UserAddr is the front-end virtual address of guest physical address gpa,
// which must lie in guest memory. Ring addresses are given in this space.
func (m *Memory) UserAddr(gpa uint64) uint64 { return m.regions[0].UserspaceAddr + gpa }

// Bytes returns the n bytes of guest memory at gpa, for raw access.
func (m *Memory) Bytes(gpa, n uint64) ([]byte, error) {
	if gpa > m.Size() || n > m.Size()-gpa {
		return nil, fmt.Errorf("guest range %#x+%d is outside guest memory of %d bytes", gpa, n, m.Size())
	}
	return m.data[gpa : gpa+n : gpa+n], nil
}

func roundUp(v, align uint64) uint64 { return (v + align - 1) &^ (align - 1) }

// Alloc returns a buffer of n bytes aligned to align (a power of two). It
// waits while no free range is large enough, until something is freed, and
// fails with ErrTooLarge only when n exceeds guest memory.
func (m *Memory) Alloc(n, align uint64) (Buffer, error) {
	align = max(align, minAlign)
	size := roundUp(max(n, 1), minAlign)
	if n > m.Size() || size > m.Size() {
		return Buffer{}, fmt.Errorf("%w: %d bytes in %d bytes of guest memory", ErrTooLarge, n, m.Size())
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for {
		if m.closed {
			return Buffer{}, ErrClosed
		}
		for i, e := range m.free {
			start := roundUp(e.off, align)
			if start < e.end() && size <= e.end()-start {
				m.take(i, start, size)
				return m.buffer(start, n, size), nil
			}
		}
		m.freed.Wait()
	}
}

// AllocAt allocates the n bytes at gpa, which must be free. gpa must be a
// multiple of 64; it does not wait.
func (m *Memory) AllocAt(gpa, n uint64) (Buffer, error) {
	size := roundUp(max(n, 1), minAlign)
	if gpa%minAlign != 0 || gpa > m.Size() || size > m.Size()-gpa {
		return Buffer{}, fmt.Errorf("guest range %#x+%d: misaligned or outside guest memory", gpa, n)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return Buffer{}, ErrClosed
	}
	for i, e := range m.free {
		if e.off <= gpa && gpa+size <= e.end() {
			m.take(i, gpa, size)
			return m.buffer(gpa, n, size), nil
		}
	}
	return Buffer{}, fmt.Errorf("guest range %#x+%d is not free", gpa, n)
}

func (m *Memory) buffer(gpa, n, size uint64) Buffer {
	return Buffer{GPA: gpa, Data: m.data[gpa : gpa+n : gpa+n], size: size}
}

// take removes [start, start+size) from free extent i, which holds it.
func (m *Memory) take(i int, start, size uint64) {
	e := m.free[i]
	var rest []extent
	if start > e.off {
		rest = append(rest, extent{e.off, start - e.off})
	}
	if end := start + size; end < e.end() {
		rest = append(rest, extent{end, e.end() - end})
	}
	m.free = append(m.free[:i], append(rest, m.free[i+1:]...)...)
}

// Free returns b to the allocator. Freeing a buffer twice panics.
func (m *Memory) Free(b Buffer) {
	if b.size == 0 {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e := extent{b.GPA, b.size}
	i := 0
	for i < len(m.free) && m.free[i].off < e.off {
		i++
	}
	if (i > 0 && m.free[i-1].end() > e.off) || (i < len(m.free) && e.end() > m.free[i].off) {
		panic(fmt.Sprintf("frontend: Free of guest range %#x+%d, which is not allocated", e.off, e.n))
	}
	// Merge with the neighbours so that free ranges are never adjacent.
	if i < len(m.free) && e.end() == m.free[i].off {
		e.n += m.free[i].n
		m.free = append(m.free[:i], m.free[i+1:]...)
	}
	if i > 0 && m.free[i-1].end() == e.off {
		m.free[i-1].n += e.n
	} else {
		m.free = append(m.free[:i], append([]extent{e}, m.free[i:]...)...)
	}
	m.freed.Broadcast()
}

// Close unmaps guest memory and closes the memfd; waiting and later
// allocations fail with ErrClosed. Nothing may touch a Buffer afterwards.
// The back-end keeps its own mapping until it drops the connection.
func (m *Memory) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	m.freed.Broadcast()
	err := unix.Munmap(m.data)
	if cerr := unix.Close(m.fd); err == nil {
		err = cerr
	}
	return err
}
