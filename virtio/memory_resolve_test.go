package virtio

import (
	"errors"
	"testing"
)

// fakeResolver hands out regions from a list, counting lookups.
type fakeResolver struct {
	regions []Region
	calls   int
}

func (f *fakeResolver) Resolve(addr uint64) *Region {
	f.calls++
	for i := range f.regions {
		r := &f.regions[i]
		if addr >= r.GPA && addr-r.GPA < r.size() {
			return r
		}
	}
	return nil
}

// lyingResolver returns a region that does not hold the address asked for.
type lyingResolver struct{ r Region }

func (l *lyingResolver) Resolve(uint64) *Region { return &l.r }

func TestResolvedGuestMemory(t *testing.T) {
	a := make([]byte, 4096)
	b := make([]byte, 8192)
	f := &fakeResolver{regions: []Region{{GPA: 0x1000, UserAddr: 0x1000, Data: a}, {GPA: 0x2000, UserAddr: 0x2000, Data: b}}}
	m := NewResolvedGuestMemory(f)
	for _, tc := range []struct {
		name    string
		addr, n uint64
		slices  int // from AppendSlices; 0: error
	}{
		{"inside one", 0x1100, 16, 1},
		{"across two", 0x1ff0, 32, 2},
		{"end of last", 0x3ff0, 16, 1},
		{"past the end", 0x3ff0, 32, 0},
		{"unmapped", 0x9000, 1, 0},
		{"below", 0x0, 1, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := m.AppendSlices(nil, tc.addr, tc.n)
			if tc.slices == 0 {
				if !errors.Is(err, ErrBadAddress) {
					t.Fatalf("err %v, want ErrBadAddress", err)
				}
				return
			}
			if err != nil || len(got) != tc.slices {
				t.Fatalf("slices %d err %v, want %d", len(got), err, tc.slices)
			}
			total := 0
			for _, s := range got {
				total += len(s)
			}
			if uint64(total) != tc.n {
				t.Fatalf("%d bytes, want %d", total, tc.n)
			}
		})
	}
	// Ring addresses are IOVAs too: UserSlice resolves them.
	if s, err := m.UserSlice(0x2010, 64); err != nil || &s[0] != &b[0x10] {
		t.Fatalf("UserSlice: %v", err)
	}
	if _, err := m.UserSlice(0x1ff0, 32); err == nil {
		t.Fatal("UserSlice across two regions succeeded")
	}
	// A resolver that answers with a region not holding the address is not believed.
	bad := NewResolvedGuestMemory(&lyingResolver{Region{GPA: 0x5000, UserAddr: 0x5000, Data: a}})
	if _, err := bad.Slice(0x1000, 1); err == nil {
		t.Fatal("a region that does not hold the address was used")
	}
	if _, err := bad.UserSlice(0x1000, 1); err == nil {
		t.Fatal("UserSlice used a region that does not hold the address")
	}
}
