package virtio

import (
	"fmt"
	"sync"
	"testing"
)

// setBits lists the pages whose bits are set in bitmap.
func setBits(bitmap []byte) []uint64 {
	var pages []uint64
	for i, b := range bitmap {
		for bit := range 8 {
			if b&(1<<bit) != 0 {
				pages = append(pages, uint64(i*8+bit))
			}
		}
	}
	return pages
}

func TestDirtyLogMark(t *testing.T) {
	for _, c := range []struct {
		gpa, n  uint64
		want    []uint64
		dropped uint64
	}{
		{0, 1, []uint64{0}, 0},
		{0, 0, nil, 0},
		{4095, 2, []uint64{0, 1}, 0},
		{7 * 4096, 4096, []uint64{7}, 0},
		{7*4096 + 1, 4096, []uint64{7, 8}, 0},
		{5 * 4096, 20 * 4096, []uint64{5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24}, 0},
		{30 * 4096, 3 * 4096, []uint64{30, 31}, 1},                         // the last page is beyond a 4-byte log
		{1 << 40, 4096, nil, 1},                                            // far beyond the log
		{^uint64(0) - 10, 100, nil, 1},                                     // wraps: ends at the top page
		{31*4096 + 4095, 1, []uint64{31}, 0},                               // the last bit of the log
		{16 * 4096, 8 * 4096, []uint64{16, 17, 18, 19, 20, 21, 22, 23}, 0}, // one whole byte
	} {
		t.Run(fmt.Sprintf("%#x+%d", c.gpa, c.n), func(t *testing.T) {
			// An odd offset into a bigger buffer: ORs go through words that straddle the log's ends.
			buf := make([]byte, 16)
			bitmap := buf[3:7]
			l := NewDirtyLog(bitmap)
			l.Mark(c.gpa, c.n)
			if got := setBits(bitmap); fmt.Sprint(got) != fmt.Sprint(c.want) {
				t.Errorf("pages %v, want %v", got, c.want)
			}
			if l.Dropped() != c.dropped {
				t.Errorf("dropped %d, want %d", l.Dropped(), c.dropped)
			}
			if buf[0]|buf[1]|buf[2]|buf[7]|buf[8] != 0 {
				t.Errorf("bytes around the log changed: % x", buf)
			}
		})
	}
}

// TestDirtyLogConcurrentAndClose: marks from many goroutines all land (atomic ORs on shared
// words), and after Close nothing touches the bitmap.
func TestDirtyLogConcurrentAndClose(t *testing.T) {
	bitmap := make([]byte, 64)
	l := NewDirtyLog(bitmap)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := g; p < 512; p += 8 {
				l.Mark(uint64(p)*LogPageSize, 1)
			}
		}()
	}
	wg.Wait()
	if got := len(setBits(bitmap)); got != 512 {
		t.Fatalf("%d bits set, want 512", got)
	}
	clear(bitmap)
	if b := l.Close(); len(b) != 64 {
		t.Fatalf("Close returned %d bytes", len(b))
	}
	l.Mark(0, 1<<20)
	if len(setBits(bitmap)) != 0 {
		t.Error("a closed log was written")
	}
}

func TestGuestMemoryGPAOf(t *testing.T) {
	a, b := make([]byte, 8192), make([]byte, 4096)
	m, err := NewGuestMemory([]Region{{GPA: 0x10000, UserAddr: 0x1000000, Data: a}, {GPA: 0x40000, UserAddr: 0x2000000, Data: b}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		s    []byte
		gpa  uint64
		isIn bool
	}{
		{a[100:200], 0x10064, true},
		{a[8191:], 0x11fff, true},
		{b[:4096], 0x40000, true},
		{make([]byte, 10), 0, false},
		{nil, 0, false},
	} {
		gpa, ok := m.gpaOf(c.s)
		if ok != c.isIn || gpa != c.gpa {
			t.Errorf("gpaOf: %#x %v, want %#x %v", gpa, ok, c.gpa, c.isIn)
		}
	}
}
