package virtio

import (
	"fmt"
	"math"
	"sort"
)

// Region is one mapped range of guest memory.
type Region struct {
	// GPA is the guest physical address of Data[0].
	GPA uint64
	// UserAddr is the frontend's (QEMU's) virtual address of Data[0]; ring
	// addresses in VHOST_USER_SET_VRING_ADDR are given in this space.
	UserAddr uint64
	// Data is the region's memory, mapped into this process.
	Data []byte
}

func (r *Region) size() uint64 { return uint64(len(r.Data)) }

// GuestMemory is an immutable set of regions. Translating never panics: every
// range is checked by subtraction, so no addition can overflow.
type GuestMemory struct {
	regions []Region // sorted by GPA, non-overlapping in GPA space

	// resolver, when set, supplies the regions that regions does not hold
	// (NewResolvedGuestMemory).
	resolver Resolver
}

// Resolver supplies regions that are known only when they are used: VDUSE's
// IOTLB, which the kernel fills while the driver maps buffers, so that the
// device learns an address space one mapping at a time.
type Resolver interface {
	// Resolve returns the region that holds addr, mapping it first if
	// needed, or nil. The region must not change, and its Data must stay
	// mapped, until the transport has stopped and drained every queue that
	// uses this memory (then it may unmap and resolve again). In resolved
	// memory a region's GPA and UserAddr are the same address (an IOVA).
	Resolve(addr uint64) *Region
}

// NewResolvedGuestMemory returns memory whose regions all come from r, looked
// up on every access.
func NewResolvedGuestMemory(r Resolver) *GuestMemory {
	return &GuestMemory{resolver: r}
}

// NewGuestMemory checks the regions (non-empty, no address overflow, no
// overlap in either address space) and returns the memory they make up.
func NewGuestMemory(regions []Region) (*GuestMemory, error) {
	rs := append([]Region(nil), regions...)
	for i := range rs {
		r := &rs[i]
		if len(r.Data) == 0 {
			return nil, fmt.Errorf("%w: region %d is empty", ErrBadRegion, i)
		}
		if r.GPA+r.size()-1 < r.GPA || r.UserAddr+r.size()-1 < r.UserAddr {
			return nil, fmt.Errorf("%w: region %d wraps the address space", ErrBadRegion, i)
		}
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i].GPA < rs[j].GPA })
	for i := 1; i < len(rs); i++ {
		if rs[i].GPA-rs[i-1].GPA < rs[i-1].size() {
			return nil, fmt.Errorf("%w: regions at %#x and %#x overlap", ErrBadRegion, rs[i-1].GPA, rs[i].GPA)
		}
	}
	for i := range rs {
		for j := i + 1; j < len(rs); j++ {
			a, b := &rs[i], &rs[j]
			if (a.UserAddr <= b.UserAddr && b.UserAddr-a.UserAddr < a.size()) ||
				(b.UserAddr < a.UserAddr && a.UserAddr-b.UserAddr < b.size()) {
				return nil, fmt.Errorf("%w: frontend addresses of regions at %#x and %#x overlap", ErrBadRegion, a.GPA, b.GPA)
			}
		}
	}
	return &GuestMemory{regions: rs}, nil
}

// Regions returns the regions (callers must not modify them).
func (m *GuestMemory) Regions() []Region { return m.regions }

// find returns the region holding gpa and the offset of gpa in it.
func (m *GuestMemory) find(gpa uint64) (*Region, uint64, bool) {
	if m == nil {
		return nil, 0, false
	}
	for i := range m.regions {
		r := &m.regions[i]
		if gpa >= r.GPA {
			if off := gpa - r.GPA; off < r.size() {
				return r, off, true
			}
		}
	}
	return m.resolve(gpa)
}

// resolve asks the resolver, if any, for the region holding addr, and checks
// what it returned.
func (m *GuestMemory) resolve(addr uint64) (*Region, uint64, bool) {
	if m.resolver == nil {
		return nil, 0, false
	}
	r := m.resolver.Resolve(addr)
	if r == nil || addr < r.GPA || addr-r.GPA >= r.size() {
		return nil, 0, false
	}
	return r, addr - r.GPA, true
}

// Slice returns the n bytes at guest physical address gpa, which must lie in
// one region.
func (m *GuestMemory) Slice(gpa, n uint64) ([]byte, error) {
	r, off, ok := m.find(gpa)
	if !ok || n > r.size()-off {
		return nil, fmt.Errorf("%w: gpa %#x length %d", ErrBadAddress, gpa, n)
	}
	return r.Data[off : off+n : off+n], nil
}

// AppendSlices appends to dst the slices that make up the n bytes at gpa; a
// range that crosses regions becomes several slices.
func (m *GuestMemory) AppendSlices(dst [][]byte, gpa, n uint64) ([][]byte, error) {
	// A range may not run past 2^64 onto a region at gpa 0 (checked by
	// subtraction: the last byte gpa+n-1 must not overflow).
	if n > 0 && n-1 > math.MaxUint64-gpa {
		return dst, fmt.Errorf("%w: gpa %#x length %d wraps the address space", ErrBadAddress, gpa, n)
	}
	for n > 0 {
		r, off, ok := m.find(gpa)
		if !ok {
			return dst, fmt.Errorf("%w: gpa %#x length %d", ErrBadAddress, gpa, n)
		}
		c := min(n, r.size()-off)
		dst = append(dst, r.Data[off:off+c:off+c])
		n -= c
		gpa += c // wraps only to 0 at the top region's end, and then n is 0
	}
	return dst, nil
}

// UserSlice returns the n bytes at the frontend virtual address va, which
// must lie in one region. Ring addresses are given in this address space.
func (m *GuestMemory) UserSlice(va, n uint64) ([]byte, error) {
	if m != nil {
		for i := range m.regions {
			r := &m.regions[i]
			if va >= r.UserAddr {
				off := va - r.UserAddr
				if off < r.size() && n <= r.size()-off {
					return r.Data[off : off+n : off+n], nil
				}
			}
		}
		// Resolved regions have UserAddr == GPA.
		if r, off, ok := m.resolve(va); ok && r.UserAddr == r.GPA && n <= r.size()-off {
			return r.Data[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("%w: frontend address %#x length %d", ErrBadAddress, va, n)
}

// markDirty logs the pages of b, a slice of m, in l.
func (m *GuestMemory) markDirty(l *DirtyLog, b []byte) {
	if gpa, ok := m.gpaOf(b); ok {
		l.Mark(gpa, uint64(len(b)))
	}
}
