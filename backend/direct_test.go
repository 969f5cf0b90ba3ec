package backend

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// directDir is a directory on a file system that takes O_DIRECT: the first of
// os.TempDir(), the package directory and /var/tmp that does. The test is
// skipped when none does.
func directDir(t *testing.T) string {
	t.Helper()
	for _, base := range []string{os.TempDir(), ".", "/var/tmp"} {
		dir, err := os.MkdirTemp(base, "vublk-direct-")
		if err != nil {
			continue
		}
		s, err := OpenFile(filepath.Join(dir, "probe.img"), FileOptions{CreateSize: 1 << 20, Direct: true})
		if err == nil {
			s.Close()
			abs, _ := filepath.Abs(dir)
			t.Cleanup(func() { os.RemoveAll(abs) })
			return abs
		}
		os.RemoveAll(dir)
		t.Logf("%s: %v", base, err)
	}
	t.Skip("no directory here (os.TempDir(), the package directory, /var/tmp) is on a file system that supports O_DIRECT")
	return ""
}

func openDirectTemp(t *testing.T, size int64) (*FileStore, string) {
	t.Helper()
	path := filepath.Join(directDir(t), "disk.img")
	s, err := OpenFile(path, FileOptions{CreateSize: size, Direct: true, LogicalBlockSize: 512})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

// misaligned returns n bytes at an address that is 1 past an alignment of align.
func misaligned(n, align int) []byte {
	return alignedBytes(n+1, align)[1:]
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// layout makes buffers for n bytes, each made by alloc, their sizes taken
// from sizes over and over (nil: one buffer), the last one cut to fit.
func layout(n int, sizes []int, alloc func(int) []byte) [][]byte {
	if sizes == nil {
		sizes = []int{n}
	}
	var bufs [][]byte
	for i := 0; n > 0; i++ {
		c := min(n, sizes[i%len(sizes)])
		bufs = append(bufs, alloc(c))
		n -= c
	}
	return bufs
}

func fill(bufs [][]byte, data []byte) {
	for _, b := range bufs {
		data = data[copy(b, data):]
	}
}

func join(bufs [][]byte) []byte { return bytes.Join(bufs, nil) }

func TestDirectOpen(t *testing.T) {
	s, path := openDirectTemp(t, 4<<20)
	direct, offAlign, memAlign := s.Direct()
	if !direct || offAlign < 512 || memAlign < 1 {
		t.Fatalf("Direct() = %v, %d, %d", direct, offAlign, memAlign)
	}
	t.Logf("%s: offset alignment %d, memory alignment %d", path, offAlign, memAlign)
	flags, err := unix.FcntlInt(uintptr(s.fd), unix.F_GETFL, 0)
	if err != nil || flags&unix.O_DIRECT == 0 {
		t.Fatalf("descriptor flags %#x (%v): no O_DIRECT", flags, err)
	}
	plain, err := OpenFile(path, FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if direct, _, _ := plain.Direct(); direct {
		t.Fatal("a store opened without Direct reports direct I/O")
	}
}

func TestDirectRoundTrip(t *testing.T) {
	s, path := openDirectTemp(t, 8<<20)
	_, offAlign, memAlign := s.Direct()
	aligned := func(n int) []byte { return alignedBytes(n, max(memAlign, offAlign)) }
	odd := func(n int) []byte { return misaligned(n, max(memAlign, offAlign)) }
	rng := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct {
		name     string
		off      int64
		n        int
		sizes    []int // buffer sizes; nil: one buffer
		alloc    func(int) []byte
		zeroCopy bool
	}{
		{"one aligned buffer", 0, 4096, nil, aligned, true},
		{"aligned buffers", 4096, 64 << 10, []int{offAlign}, aligned, true},
		{"more than IOV_MAX aligned buffers", 1 << 20, 1500 * offAlign, []int{offAlign}, aligned, true},
		{"one misaligned buffer", 512, 4096, nil, odd, false},
		{"misaligned buffers", 8192, 64 << 10, []int{offAlign}, odd, false},
		{"aligned addresses, lengths cut mid-block", 0, 16 << 10, []int{100, 412, offAlign + 7}, aligned, false},
		{"odd lengths and addresses, more than IOV_MAX", 2 << 20, 1500 * offAlign, []int{1, offAlign - 1, 3 * offAlign}, odd, false},
		{"misaligned, larger than the bounce buffer", 3 << 20, 3*bounceSize + 2*offAlign, []int{1<<20 + 3, 5000}, odd, false},
		{"at the end", 8<<20 - 2*int64(offAlign), 2 * offAlign, []int{7}, odd, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := randomBytes(rng, tc.n)
			w := layout(tc.n, tc.sizes, tc.alloc)
			fill(w, data)
			if _, ok, err := s.RawFD(true, w, tc.off); err != nil || ok != tc.zeroCopy {
				t.Fatalf("RawFD(write) ok=%v err=%v, want ok=%v", ok, err, tc.zeroCopy)
			}
			if err := s.WriteAt(w, tc.off); err != nil {
				t.Fatal(err)
			}
			r := layout(tc.n, tc.sizes, tc.alloc)
			if fd, ok, err := s.RawFD(false, r, tc.off); err != nil || ok != tc.zeroCopy || ok && fd != s.fd {
				t.Fatalf("RawFD(read) fd=%d ok=%v err=%v, want ok=%v", fd, ok, err, tc.zeroCopy)
			}
			if err := s.ReadAt(r, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(join(r), data) {
				t.Fatal("read back through O_DIRECT differs")
			}
			// The bytes are in the file, as a reader through the page cache sees them.
			got := make([]byte, tc.n)
			f, err := os.Open(path)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.ReadAt(got, tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("the file differs from what was written")
			}
		})
	}
}

func TestDirectDurableWrite(t *testing.T) {
	s, _ := openDirectTemp(t, 1<<20)
	_, offAlign, memAlign := s.Direct()
	for _, buf := range [][]byte{alignedBytes(offAlign, max(offAlign, memAlign)), misaligned(offAlign, max(offAlign, memAlign))} {
		copy(buf, "durable")
		if err := s.WriteAtDurable([][]byte{buf}, int64(offAlign)); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, offAlign)
		if err := s.ReadAt([][]byte{got}, int64(offAlign)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, buf) {
			t.Fatal("read back differs")
		}
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
}

func TestDirectErrors(t *testing.T) {
	s, path := openDirectTemp(t, 1<<20)
	_, offAlign, _ := s.Direct()
	block := make([]byte, offAlign)
	for _, tc := range []struct {
		name string
		op   func() error
		want error
	}{
		{"write past the end", func() error { return s.WriteAt([][]byte{block}, 1<<20) }, ErrOutOfRange},
		{"read at a negative offset", func() error { return s.ReadAt([][]byte{block}, -int64(offAlign)) }, ErrOutOfRange},
		{"write at a misaligned offset", func() error { return s.WriteAt([][]byte{block}, 1) }, ErrMisaligned},
		{"read of a misaligned length", func() error { return s.ReadAt([][]byte{block[:offAlign-1]}, 0) }, ErrMisaligned},
		{"zeros written by hand at a misaligned offset", func() error { return writeZeroes(s, 100, int64(offAlign)) }, ErrMisaligned},
		{"raw at a misaligned offset", func() error { _, _, err := s.RawFD(false, [][]byte{block}, 7); return err }, ErrMisaligned},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.op(); !errors.Is(err, tc.want) {
				t.Fatalf("%v, want %v", err, tc.want)
			}
		})
	}

	ro, err := OpenFile(path, FileOptions{ReadOnly: true, Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.WriteAt([][]byte{block}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write on read-only: %v", err)
	}
	if _, _, err := ro.RawFD(true, [][]byte{block}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("raw write on read-only: %v", err)
	}
	if err := ro.ReadAt([][]byte{misaligned(offAlign, 4096)}, 0); err != nil {
		t.Errorf("read on read-only: %v", err)
	}

	// A logical block size that is not a multiple of the offset alignment
	// would need read-modify-write: refused at open.
	if s, err := OpenFile(path, FileOptions{Direct: true, LogicalBlockSize: offAlign / 2}); !errors.Is(err, ErrMisaligned) {
		if err == nil {
			s.Close()
		}
		t.Errorf("logical block size %d with alignment %d: %v, want ErrMisaligned", offAlign/2, offAlign, err)
	}
}

// TestDirectRefused opens files on file systems without O_DIRECT: the error
// says so, and a file OpenFile created is removed again.
func TestDirectRefused(t *testing.T) {
	t.Run("procfs", func(t *testing.T) {
		// procfs never takes O_DIRECT.
		_, err := OpenFile("/proc/version", FileOptions{ReadOnly: true, Direct: true})
		if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "direct I/O is not supported on this file system") {
			t.Fatalf("%v, want ErrNotSupported saying direct I/O is not supported", err)
		}
	})
	t.Run("tmpfs", func(t *testing.T) {
		dir, err := os.MkdirTemp("/dev/shm", "vublk-direct-")
		if err != nil {
			t.Skipf("no tmpfs at /dev/shm: %v", err)
		}
		defer os.RemoveAll(dir)
		path := filepath.Join(dir, "disk.img")
		s, err := OpenFile(path, FileOptions{CreateSize: 1 << 20, Direct: true})
		if err == nil {
			s.Close()
			t.Skip("tmpfs here supports O_DIRECT (Linux 6.6 or later)")
		}
		if !errors.Is(err, ErrNotSupported) || !strings.Contains(err.Error(), "direct I/O is not supported on this file system") {
			t.Fatalf("%v, want ErrNotSupported saying direct I/O is not supported", err)
		}
		if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the refused open left %s behind (%v)", path, err)
		}
	})
}

func TestDirectZeroes(t *testing.T) {
	for _, tc := range []struct {
		name string
		op   func(s *FileStore, off, n int64) error
	}{
		{"discard", func(s *FileStore, off, n int64) error { return s.Discard(off, n) }},
		{"write zeroes", func(s *FileStore, off, n int64) error { return s.WriteZeroes(off, n, false) }},
		{"zeros written by hand", func(s *FileStore, off, n int64) error { return writeZeroes(s, off, n) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openDirectTemp(t, 4<<20)
			_, offAlign, _ := s.Direct()
			data := alignedBytes(3<<20, 4096)
			for i := range data {
				data[i] = 0xab
			}
			if err := s.WriteAt([][]byte{data}, 0); err != nil {
				t.Fatal(err)
			}
			zoff, zn := int64(4096+offAlign), int64(2<<20+offAlign)
			if err := tc.op(s, zoff, zn); err != nil {
				t.Fatal(err)
			}
			got := misaligned(3<<20, 4096)
			if err := s.ReadAt([][]byte{got}, 0); err != nil {
				t.Fatal(err)
			}
			for i, b := range got {
				want := byte(0xab)
				if int64(i) >= zoff && int64(i) < zoff+zn {
					want = 0
				}
				if b != want {
					t.Fatalf("byte %d = %#x, want %#x", i, b, want)
				}
			}
		})
	}
}

// TestDirectConcurrentBounce runs misaligned reads and writes on disjoint
// ranges from several goroutines, sharing the bounce buffer pool.
func TestDirectConcurrentBounce(t *testing.T) {
	s, _ := openDirectTemp(t, 8<<20)
	_, offAlign, _ := s.Direct()
	const workers, rounds = 8, 20
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			off := int64(w) << 20
			for range rounds {
				n := (1 + rng.IntN(64)) * offAlign
				data := randomBytes(rng, n)
				buf := misaligned(n, 4096)
				copy(buf, data)
				if err := s.WriteAt(split(buf, 5, rng), off); err != nil {
					errs <- err
					return
				}
				got := misaligned(n, 4096)
				if err := s.ReadAt(split(got, 5, rng), off); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got, data) {
					errs <- errors.New("read back differs")
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestDirectBounceAllocates(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop buffers at random")
	}
	s, _ := openDirectTemp(t, 1<<20)
	_, offAlign, _ := s.Direct()
	bufs := [][]byte{misaligned(offAlign, 4096), misaligned(3*offAlign, 4096)}
	s.ReadAt(bufs, 0) // warm the pool
	allocs := testing.AllocsPerRun(100, func() {
		if err := s.WriteAt(bufs, 0); err != nil {
			t.Fatal(err)
		}
		if err := s.ReadAt(bufs, 0); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per bounced write and read, want 0", allocs)
	}
}

func TestProbeDirectAlignment(t *testing.T) {
	s, _ := openDirectTemp(t, 1<<20)
	_, offAlign, _ := s.Direct()
	got := probeDirectAlignment(s.fd, 4096)
	if offAlign == 512 && got != 512 {
		t.Errorf("probe says %d where statx says 512", got)
	}
	if got != 512 && got != 4096 {
		t.Errorf("probe says %d, want 512 or the file system block", got)
	}
	// A descriptor that cannot read at all falls back to the file system block.
	if got := probeDirectAlignment(-1, 8192); got != 8192 {
		t.Errorf("probe of a bad descriptor: %d, want 8192", got)
	}
	if got := probeDirectAlignment(-1, 1000); got != 4096 {
		t.Errorf("probe with a block size of 1000: %d, want 4096", got)
	}
}

func TestBufCursor(t *testing.T) {
	bufs := [][]byte{make([]byte, 2), nil, make([]byte, 3), {}, make([]byte, 1)}
	c := bufCursor{bufs: bufs}
	c.scatter([]byte{1, 2, 3})
	c.scatter([]byte{4, 5, 6})
	if got := join(bufs); !bytes.Equal(got, []byte{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("scatter: %v", got)
	}
	c = bufCursor{bufs: bufs}
	out := make([]byte, 6)
	c.gather(out[:1])
	c.gather(out[1:])
	if !bytes.Equal(out, []byte{1, 2, 3, 4, 5, 6}) {
		t.Fatalf("gather: %v", out)
	}
}

func TestAlignedBytes(t *testing.T) {
	for _, align := range []int{512, 4096, 65536} {
		b := alignedBytes(1000, align)
		if len(b) != 1000 || cap(b) != 1000 || bufferAddress(b)%uintptr(align) != 0 {
			t.Errorf("alignedBytes(1000, %d): len %d cap %d address %#x", align, len(b), cap(b), bufferAddress(b))
		}
	}
	if bufferAddress(zeroChunk)%4096 != 0 {
		t.Error("zeroChunk is not page aligned")
	}
}
