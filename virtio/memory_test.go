package virtio

import (
	"errors"
	"math"
	"testing"
)

// place is where a returned slice is expected: region index (in GPA order),
// offset in it and length.
type place struct {
	region int
	off    uint64
	len    int
}

func checkPlaces(t *testing.T, mem *GuestMemory, got [][]byte, want []place) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d slices, want %d", len(got), len(want))
	}
	for i, w := range want {
		r := mem.Regions()[w.region]
		if len(got[i]) != w.len || cap(got[i]) != w.len {
			t.Errorf("slice %d: len %d cap %d, want len and cap %d (a full slice expression keeps appends out of the neighbour)", i, len(got[i]), cap(got[i]), w.len)
			continue
		}
		if w.len > 0 && &got[i][0] != &r.Data[w.off] {
			ri, off, ok := locate(mem, got[i])
			t.Errorf("slice %d is at region %d offset %#x (inside memory: %v), want region %d offset %#x", i, ri, off, ok, w.region, w.off)
		}
	}
}

// memoryLayout is three regions: A and B adjacent in guest physical space
// (but not in the frontend's), a gap, then C.
//
//	A: gpa 0x1000-0x1fff   user 0x7000_0000
//	B: gpa 0x2000-0x3fff   user 0x9000_0000
//	   gap 0x4000-0xffff
//	C: gpa 0x10000-0x10fff user 0x7000_1000 (adjacent to A in user space)
func memoryLayout(t *testing.T) *GuestMemory {
	return newTestMemory(t,
		testRegionSpec{gpa: 0x10000, user: 0x7000_1000, size: 0x1000}, // C, given out of order
		testRegionSpec{gpa: 0x1000, user: 0x7000_0000, size: 0x1000},  // A
		testRegionSpec{gpa: 0x2000, user: 0x9000_0000, size: 0x2000},  // B
	)
}

func TestGuestMemorySlice(t *testing.T) {
	mem := memoryLayout(t)
	const A, B, C = 0, 1, 2
	tests := []struct {
		name   string
		gpa, n uint64
		want   *place // nil: ErrBadAddress
	}{
		{"first byte of A", 0x1000, 1, &place{A, 0, 1}},
		{"all of A", 0x1000, 0x1000, &place{A, 0, 0x1000}},
		{"last byte of A", 0x1fff, 1, &place{A, 0xfff, 1}},
		{"middle of B", 0x2100, 0x200, &place{B, 0x100, 0x200}},
		{"up to the end of B", 0x3f00, 0x100, &place{B, 0x1f00, 0x100}},
		{"one past the end of B", 0x3f00, 0x101, nil},
		{"crosses A into B", 0x1ff0, 0x20, nil}, // Slice is one region only
		{"below all regions", 0x0fff, 1, nil},
		{"starts below A, ends in it", 0x0ff0, 0x20, nil},
		{"in the gap", 0x8000, 1, nil},
		{"first gap byte", 0x4000, 1, nil},
		{"last gap byte", 0xffff, 1, nil},
		{"in C", 0x10800, 0x800, &place{C, 0x800, 0x800}},
		{"beyond C", 0x11000, 1, nil},
		{"zero length in A", 0x1800, 0, &place{A, 0x800, 0}},
		{"zero length at the end of A", 0x1fff, 0, &place{A, 0xfff, 0}},
		{"zero length unmapped", 0x8000, 0, nil},
		{"n is 2^64-1", 0x1000, math.MaxUint64, nil},
		{"n would wrap off+n", 0x1fff, math.MaxUint64, nil},
		{"gpa 2^64-1", math.MaxUint64, 1, nil},
		{"gpa 2^64-1 huge n", math.MaxUint64, math.MaxUint64, nil},
		{"gpa 2^64-0x1000 wraps onto A", math.MaxUint64 - 0xfff, 0x2000, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mem.Slice(tt.gpa, tt.n)
			if tt.want == nil {
				if !errors.Is(err, ErrBadAddress) {
					t.Fatalf("Slice(%#x, %d) = %d bytes, %v; want ErrBadAddress", tt.gpa, tt.n, len(got), err)
				}
				if got != nil {
					t.Fatalf("Slice returned %d bytes with an error", len(got))
				}
				return
			}
			if err != nil {
				t.Fatalf("Slice(%#x, %d): %v", tt.gpa, tt.n, err)
			}
			checkPlaces(t, mem, [][]byte{got}, []place{*tt.want})
		})
	}
}

func TestGuestMemoryAppendSlices(t *testing.T) {
	mem := memoryLayout(t)
	const A, B, C = 0, 1, 2
	tests := []struct {
		name   string
		gpa, n uint64
		want   []place
		err    bool
	}{
		{"inside A", 0x1100, 0x10, []place{{A, 0x100, 0x10}}, false},
		{"crosses A into B: two slices", 0x1ff0, 0x20, []place{{A, 0xff0, 0x10}, {B, 0, 0x10}}, false},
		{"all of A and B", 0x1000, 0x3000, []place{{A, 0, 0x1000}, {B, 0, 0x2000}}, false},
		{"from A to the end of B", 0x1fff, 0x2001, []place{{A, 0xfff, 1}, {B, 0, 0x2000}}, false},
		{"one byte past B into the gap", 0x1fff, 0x2002, nil, true},
		{"starts in the gap", 0x4000, 0x10, nil, true},
		{"starts below A", 0xfff, 2, nil, true},
		{"C alone", 0x10000, 0x1000, []place{{C, 0, 0x1000}}, false},
		{"past C", 0x10fff, 2, nil, true},
		{"zero length", 0x1000, 0, nil, false},
		{"zero length unmapped", 0x8000, 0, nil, false},
		{"n is 2^64-1", 0x1000, math.MaxUint64, nil, true},
		{"gpa 2^64-1", math.MaxUint64, 1, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := [][]byte{make([]byte, 3)}
			got, err := mem.AppendSlices(prefix, tt.gpa, tt.n)
			if tt.err {
				if !errors.Is(err, ErrBadAddress) {
					t.Fatalf("AppendSlices(%#x, %d): err %v, want ErrBadAddress", tt.gpa, tt.n, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("AppendSlices(%#x, %d): %v", tt.gpa, tt.n, err)
			}
			if len(got) < 1 || len(got[0]) != 3 {
				t.Fatalf("AppendSlices lost what was in dst")
			}
			checkPlaces(t, mem, got[1:], tt.want)
			total := uint64(0)
			for _, s := range got[1:] {
				total += uint64(len(s))
			}
			if total != tt.n {
				t.Fatalf("slices hold %d bytes, want %d", total, tt.n)
			}
		})
	}
}

// A region that ends exactly at the top of the address space is valid, but
// a range that runs off its end must not wrap around to gpa 0.
func TestGuestMemoryTopOfAddressSpace(t *testing.T) {
	const top = math.MaxUint64 - 0xfff // region covers [top, 2^64)
	mem := newTestMemory(t,
		testRegionSpec{gpa: 0, user: 0x1000_0000, size: 0x1000},
		testRegionSpec{gpa: top, user: 0x2000_0000, size: 0x1000},
	)
	if b, err := mem.Slice(math.MaxUint64, 1); err != nil || &b[0] != &mem.Regions()[1].Data[0xfff] {
		t.Fatalf("last byte of the address space: %v", err)
	}
	if _, err := mem.Slice(math.MaxUint64, 2); !errors.Is(err, ErrBadAddress) {
		t.Fatalf("Slice past 2^64: err %v, want ErrBadAddress", err)
	}
	got, err := mem.AppendSlices(nil, top, 0x1000)
	if err != nil || len(got) != 1 || len(got[0]) != 0x1000 {
		t.Fatalf("AppendSlices of the whole top region: %d slices, %v", len(got), err)
	}
	for _, n := range []uint64{0x1001, 0x2000, math.MaxUint64} {
		if got, err := mem.AppendSlices(nil, top, n); !errors.Is(err, ErrBadAddress) {
			t.Errorf("AppendSlices(%#x, %#x) wrapped past 2^64: %d slices, err %v; want ErrBadAddress", uint64(top), n, len(got), err)
		}
	}
	if got, err := mem.AppendSlices(nil, math.MaxUint64, 2); !errors.Is(err, ErrBadAddress) {
		t.Errorf("AppendSlices(2^64-1, 2) wrapped: %d slices, err %v; want ErrBadAddress", len(got), err)
	}
}

func TestGuestMemoryUserSlice(t *testing.T) {
	mem := memoryLayout(t)
	const A, B, C = 0, 1, 2
	tests := []struct {
		name  string
		va, n uint64
		want  *place
	}{
		{"start of A", 0x7000_0000, 16, &place{A, 0, 16}},
		{"end of A", 0x7000_0ff0, 16, &place{A, 0xff0, 16}},
		{"start of C (adjacent to A in user space)", 0x7000_1000, 16, &place{C, 0, 16}},
		{"crosses A into C", 0x7000_0ff0, 32, nil}, // one region only
		{"B", 0x9000_1000, 0x1000, &place{B, 0x1000, 0x1000}},
		{"past B", 0x9000_1000, 0x1001, nil},
		{"a gpa is not a user address", 0x1000, 16, nil},
		{"below A", 0x6fff_ffff, 1, nil},
		{"zero length", 0x9000_0000, 0, &place{B, 0, 0}},
		{"huge n", 0x7000_0000, math.MaxUint64, nil},
		{"va 2^64-1", math.MaxUint64, 1, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mem.UserSlice(tt.va, tt.n)
			if tt.want == nil {
				if !errors.Is(err, ErrBadAddress) {
					t.Fatalf("UserSlice(%#x, %d) = %d bytes, %v; want ErrBadAddress", tt.va, tt.n, len(got), err)
				}
				return
			}
			if err != nil {
				t.Fatalf("UserSlice(%#x, %d): %v", tt.va, tt.n, err)
			}
			checkPlaces(t, mem, [][]byte{got}, []place{*tt.want})
		})
	}
	// The same bytes through both address spaces.
	u, _ := mem.UserSlice(0x9000_0010, 4)
	g, _ := mem.Slice(0x2010, 4)
	if &u[0] != &g[0] {
		t.Fatal("UserSlice and Slice disagree about the same byte")
	}
}

func TestNewGuestMemoryRejects(t *testing.T) {
	tests := []struct {
		name    string
		regions []testRegionSpec
		ok      bool
	}{
		{"one region", []testRegionSpec{{0, 0, 0x1000}}, true},
		{"adjacent in both spaces", []testRegionSpec{{0, 0x10000, 0x1000}, {0x1000, 0x11000, 0x1000}}, true},
		{"ends exactly at 2^64", []testRegionSpec{{math.MaxUint64 - 0xfff, 0, 0x1000}}, true},
		{"user space ends exactly at 2^64", []testRegionSpec{{0, math.MaxUint64 - 0xfff, 0x1000}}, true},
		{"empty", []testRegionSpec{{0x1000, 0, 0}}, false},
		{"gpa wraps", []testRegionSpec{{math.MaxUint64 - 0x7ff, 0, 0x1000}}, false},
		{"user address wraps", []testRegionSpec{{0, math.MaxUint64 - 0x7ff, 0x1000}}, false},
		{"same gpa", []testRegionSpec{{0x1000, 0x10000, 0x1000}, {0x1000, 0x20000, 0x1000}}, false},
		{"gpa overlap by one byte", []testRegionSpec{{0x1000, 0x10000, 0x1000}, {0x1fff, 0x20000, 0x1000}}, false},
		{"gpa contained", []testRegionSpec{{0x1000, 0x10000, 0x4000}, {0x2000, 0x20000, 0x1000}}, false},
		{"gpa overlap, given in reverse order", []testRegionSpec{{0x1800, 0x20000, 0x1000}, {0x1000, 0x10000, 0x1000}}, false},
		{"user overlap", []testRegionSpec{{0x1000, 0x10000, 0x1000}, {0x8000, 0x10800, 0x1000}}, false},
		{"user overlap, second below", []testRegionSpec{{0x1000, 0x10800, 0x1000}, {0x8000, 0x10000, 0x1000}}, false},
		{"user contained", []testRegionSpec{{0x1000, 0x10000, 0x4000}, {0x8000, 0x11000, 0x1000}}, false},
		{"same user address", []testRegionSpec{{0x1000, 0x10000, 0x1000}, {0x8000, 0x10000, 0x1000}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs := make([]Region, len(tt.regions))
			for i, s := range tt.regions {
				rs[i] = Region{GPA: s.gpa, UserAddr: s.user, Data: make([]byte, s.size)}
			}
			mem, err := NewGuestMemory(rs)
			if tt.ok {
				if err != nil {
					t.Fatalf("NewGuestMemory: %v", err)
				}
				if len(mem.Regions()) != len(rs) {
					t.Fatalf("%d regions, want %d", len(mem.Regions()), len(rs))
				}
				return
			}
			if !errors.Is(err, ErrBadRegion) || mem != nil {
				t.Fatalf("NewGuestMemory = %v, %v; want ErrBadRegion", mem, err)
			}
		})
	}
}

// The caller's slice is copied: sorting and later changes to it do not
// affect the memory.
func TestNewGuestMemoryCopiesRegions(t *testing.T) {
	rs := []Region{
		{GPA: 0x2000, UserAddr: 0x20000, Data: make([]byte, 0x1000)},
		{GPA: 0x1000, UserAddr: 0x10000, Data: make([]byte, 0x1000)},
	}
	mem, err := NewGuestMemory(rs)
	if err != nil {
		t.Fatal(err)
	}
	if rs[0].GPA != 0x2000 {
		t.Fatal("NewGuestMemory sorted the caller's slice")
	}
	rs[0].GPA = 0x9000
	if _, err := mem.Slice(0x2000, 1); err != nil {
		t.Fatalf("memory changed with the caller's slice: %v", err)
	}
	if got := mem.Regions(); got[0].GPA != 0x1000 || got[1].GPA != 0x2000 {
		t.Fatalf("Regions not sorted by GPA: %#x, %#x", got[0].GPA, got[1].GPA)
	}
}

// A nil *GuestMemory (no memory table yet) translates nothing and does not
// panic.
func TestNilGuestMemory(t *testing.T) {
	var mem *GuestMemory
	if _, err := mem.Slice(0, 1); !errors.Is(err, ErrBadAddress) {
		t.Errorf("Slice: %v", err)
	}
	if _, err := mem.AppendSlices(nil, 0, 1); !errors.Is(err, ErrBadAddress) {
		t.Errorf("AppendSlices: %v", err)
	}
	if _, err := mem.UserSlice(0, 1); !errors.Is(err, ErrBadAddress) {
		t.Errorf("UserSlice: %v", err)
	}
}
