package frontend

import (
	"errors"
	"math/rand/v2"
	"testing"
	"time"
)

func newTestMemory(t *testing.T, size int64, regions int) *Memory {
	t.Helper()
	m, err := NewMemory(size, regions)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestMemoryRegions(t *testing.T) {
	m := newTestMemory(t, 1<<20, 2)
	rs := m.Regions()
	if len(rs) != 2 {
		t.Fatalf("%d regions", len(rs))
	}
	for i, r := range rs {
		gpa := uint64(i) << 19
		if r.GuestPhysAddr != gpa || r.MemorySize != 1<<19 || r.MmapOffset != gpa || r.UserspaceAddr != m.UserAddr(gpa) {
			t.Fatalf("region %d: %+v", i, r)
		}
	}
	if _, err := NewMemory(1<<20+1, 1); err == nil {
		t.Fatal("memory of an odd size accepted")
	}
}

func TestMemoryAlloc(t *testing.T) {
	m := newTestMemory(t, 1<<20, 1)
	a, err := m.Alloc(10, 4096)
	if err != nil || a.GPA%4096 != 0 || len(a.Data) != 10 {
		t.Fatalf("Alloc(10, 4096): %+v, %v", a, err)
	}
	b, err := m.Alloc(100, 0)
	if err != nil || b.GPA%minAlign != 0 || b.GPA < a.GPA+minAlign {
		t.Fatalf("Alloc(100, 0): %+v, %v", b, err)
	}
	b.Data[0] = 42
	if raw, err := m.Bytes(b.GPA, 1); err != nil || raw[0] != 42 {
		t.Fatal("Bytes does not see the buffer's memory")
	}
	if _, err := m.Bytes(m.Size()-1, 2); err == nil {
		t.Fatal("Bytes beyond memory accepted")
	}

	c, err := m.AllocAt(8192, 8192)
	if err != nil || c.GPA != 8192 {
		t.Fatalf("AllocAt: %+v, %v", c, err)
	}
	for _, bad := range []struct{ gpa, n uint64 }{{8192 + 4096, 64}, {100, 64}, {m.Size() - 64, 128}} {
		if _, err := m.AllocAt(bad.gpa, bad.n); err == nil {
			t.Errorf("AllocAt(%#x, %d) accepted", bad.gpa, bad.n)
		}
	}
	if _, err := m.Alloc(m.Size()+1, 0); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Alloc larger than memory: %v", err)
	}

	m.Free(b)
	m.Free(a)
	m.Free(c)
	if len(m.free) != 1 || m.free[0] != (extent{0, m.Size()}) {
		t.Fatalf("free list after freeing everything: %v", m.free)
	}
	defer func() {
		if recover() == nil {
			t.Fatal("double Free did not panic")
		}
	}()
	m.Free(a)
}

// TestMemoryAllocRandom allocates and frees at random: buffers never
// overlap, and freeing everything leaves one free range.
func TestMemoryAllocRandom(t *testing.T) {
	m := newTestMemory(t, 1<<20, 1)
	rng := rand.New(rand.NewPCG(1, 2))
	var live []Buffer
	owner := make([]int, m.Size()/minAlign) // 1 + index into live, per 64-byte block
	for i := range 5000 {
		if len(live) > 0 && (rng.IntN(2) == 0 || len(live) > 100) {
			j := rng.IntN(len(live))
			b := live[j]
			for k := b.GPA / minAlign; k < (b.GPA+b.size)/minAlign; k++ {
				owner[k] = 0
			}
			m.Free(b)
			live = append(live[:j], live[j+1:]...)
			continue
		}
		n := uint64(rng.IntN(8192) + 1)
		b, err := m.Alloc(n, uint64(1)<<rng.IntN(13))
		if err != nil {
			t.Fatal(err)
		}
		for k := b.GPA / minAlign; k < (b.GPA+b.size)/minAlign; k++ {
			if owner[k] != 0 {
				t.Fatalf("step %d: buffer at %#x overlaps a live one", i, b.GPA)
			}
			owner[k] = 1
		}
		live = append(live, b)
	}
	for _, b := range live {
		m.Free(b)
	}
	if len(m.free) != 1 || m.free[0] != (extent{0, m.Size()}) {
		t.Fatalf("free list after freeing everything: %v", m.free)
	}
}

func TestMemoryAllocWaitsForFree(t *testing.T) {
	m := newTestMemory(t, 64<<10, 1)
	all, err := m.Alloc(m.Size(), 0)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		b, err := m.Alloc(4096, 0)
		if err == nil {
			m.Free(b)
		}
		got <- err
	}()
	m.Free(all)
	if err := waitErr(t, got); err != nil {
		t.Fatalf("Alloc after Free: %v", err)
	}

	if _, err := m.Alloc(m.Size(), 0); err != nil {
		t.Fatal(err)
	}
	go func() {
		_, err := m.Alloc(4096, 0)
		got <- err
	}()
	m.Close()
	if err := waitErr(t, got); !errors.Is(err, ErrClosed) {
		t.Fatalf("Alloc waiting across Close: %v", err)
	}
}

// waitErr receives from ch; the guard only turns a deadlock into a failure.
func waitErr(t *testing.T, ch chan error) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(time.Minute):
		t.Fatal("Alloc never returned")
		return nil
	}
}
