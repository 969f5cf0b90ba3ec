package backend

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func openTemp(t *testing.T, size int64) (*FileStore, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	s, err := OpenFile(path, FileOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

// split cuts data into n buffers of random sizes (some empty).
func split(data []byte, n int, rng *rand.Rand) [][]byte {
	var bufs [][]byte
	for i := 0; i < n-1 && len(data) > 0; i++ {
		c := rng.IntN(min(len(data), 64) + 1)
		bufs = append(bufs, data[:c])
		data = data[c:]
	}
	return append(bufs, data)
}

func TestFileStoreCreateSparse(t *testing.T) {
	s, path := openTemp(t, 64<<20)
	if s.Size() != 64<<20 {
		t.Fatalf("size %d", s.Size())
	}
	fi, _ := os.Stat(path)
	if fi.Size() != 64<<20 {
		t.Fatalf("file size %d", fi.Size())
	}
	// An existing file keeps its size unless Resize.
	s2, err := OpenFile(path, FileOptions{CreateSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if s2.Size() != 64<<20 {
		t.Fatalf("existing file resized to %d without Resize", s2.Size())
	}
	s2.Close()
	s3, err := OpenFile(path, FileOptions{CreateSize: 1 << 20, Resize: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if s3.Size() != 1<<20 {
		t.Fatalf("Resize: size %d", s3.Size())
	}
}

func TestFileStoreOpenErrors(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name string
		path string
		opt  FileOptions
	}{
		{"missing without size", filepath.Join(dir, "none"), FileOptions{}},
		{"missing read-only with size", filepath.Join(dir, "none"), FileOptions{ReadOnly: true, CreateSize: 4096}},
		{"a directory", dir, FileOptions{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if s, err := OpenFile(c.path, c.opt); err == nil {
				s.Close()
				t.Fatal("no error")
			}
		})
	}
}

func TestFileStoreVectoredRoundTrip(t *testing.T) {
	s, _ := openTemp(t, 8<<20)
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		name string
		off  int64
		n    int
		segs int
	}{
		{"one buffer", 0, 4096, 1},
		{"many buffers", 512, 64 << 10, 100},
		{"more than IOV_MAX buffers", 1 << 20, 1500 * 8, 1500},
		{"at the end", 8<<20 - 4096, 4096, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := make([]byte, tc.n)
			for i := range data {
				data[i] = byte(rng.Uint32())
			}
			if err := s.WriteAt(split(data, tc.segs, rng), tc.off); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, tc.n)
			if err := s.ReadAt(split(got, tc.segs, rng), tc.off); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("read back differs")
			}
		})
	}
}

func TestFileStoreRangeAndReadOnly(t *testing.T) {
	s, path := openTemp(t, 1<<20)
	for _, off := range []int64{-1, 1 << 20, 1<<20 - 1} {
		if err := s.WriteAt([][]byte{make([]byte, 2)}, off); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("write at %d: %v, want ErrOutOfRange", off, err)
		}
	}
	if err := s.WriteZeroes(1<<20-512, 1024, false); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("zeroes past the end: %v", err)
	}
	ro, err := OpenFile(path, FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.WriteAt([][]byte{{1}}, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("write on read-only: %v", err)
	}
	if err := ro.Discard(0, 4096); !errors.Is(err, ErrReadOnly) {
		t.Errorf("discard on read-only: %v", err)
	}
	if err := ro.ReadAt([][]byte{make([]byte, 512)}, 0); err != nil {
		t.Errorf("read on read-only: %v", err)
	}
}

func TestFileStoreTruncatedUnderneath(t *testing.T) {
	s, path := openTemp(t, 1<<20)
	if err := os.Truncate(path, 4096); err != nil {
		t.Fatal(err)
	}
	err := s.ReadAt([][]byte{make([]byte, 8192)}, 0)
	if !errors.Is(err, ErrShortIO) {
		t.Fatalf("read past the new end: %v, want ErrShortIO", err)
	}
}

func TestFileStoreZeroesAndDiscard(t *testing.T) {
	for _, tc := range []struct {
		name string
		op   func(s *FileStore, off, n int64) error
	}{
		{"discard", func(s *FileStore, off, n int64) error { return s.Discard(off, n) }},
		{"write zeroes", func(s *FileStore, off, n int64) error { return s.WriteZeroes(off, n, false) }},
		{"write zeroes with unmap", func(s *FileStore, off, n int64) error { return s.WriteZeroes(off, n, true) }},
		{"zeros written by hand", func(s *FileStore, off, n int64) error { return writeZeroes(s, off, n) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openTemp(t, 4<<20)
			data := bytes.Repeat([]byte{0xab}, 3<<20)
			if err := s.WriteAt([][]byte{data}, 0); err != nil {
				t.Fatal(err)
			}
			// An unaligned range inside the written data.
			if err := tc.op(s, 4096+512, 2<<20); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 3<<20)
			if err := s.ReadAt([][]byte{got}, 0); err != nil {
				t.Fatal(err)
			}
			for i, b := range got {
				want := byte(0xab)
				if i >= 4096+512 && i < 4096+512+2<<20 {
					want = 0
				}
				if b != want {
					t.Fatalf("byte %d = %#x, want %#x", i, b, want)
				}
			}
		})
	}
}

func TestFileStoreSync(t *testing.T) {
	s, _ := openTemp(t, 1<<20)
	if err := s.WriteAtDurable([][]byte{{1, 2, 3}}, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
}

func TestAdvance(t *testing.T) {
	bufs := [][]byte{{1, 2}, {}, {3, 4, 5}, {6}}
	got := advance(append([][]byte(nil), bufs...), 3)
	if len(got) != 2 || !bytes.Equal(got[0], []byte{4, 5}) || !bytes.Equal(got[1], []byte{6}) {
		t.Fatalf("advance 3: %v", got)
	}
	if got := advance(append([][]byte(nil), bufs...), 6); len(got) != 0 {
		t.Fatalf("advance all: %v", got)
	}
}

func TestFileResize(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	s, err := OpenFile(path, FileOptions{CreateSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	buf := []byte("beyond the old end")
	if err := s.WriteAt([][]byte{buf}, 2<<20); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("write beyond the end: %v, want ErrOutOfRange", err)
	}
	if err := s.Resize(4 << 20); err != nil {
		t.Fatal(err)
	}
	if s.Size() != 4<<20 {
		t.Fatalf("size %d after growing", s.Size())
	}
	if fi, _ := os.Stat(path); fi.Size() != 4<<20 {
		t.Fatalf("file size %d after growing", fi.Size())
	}
	if err := s.WriteAt([][]byte{buf}, 2<<20); err != nil {
		t.Fatalf("write in the grown part: %v", err)
	}
	if err := s.Resize(1 << 20); err != nil {
		t.Fatal(err)
	}
	if err := s.ReadAt([][]byte{make([]byte, 512)}, 2<<20); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("read beyond the shrunk end: %v", err)
	}
	if err := s.Resize(0); err == nil {
		t.Fatal("resize to 0 accepted")
	}

	ro, err := OpenFile(path, FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if err := ro.Resize(8 << 20); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("growing a read-only file past its end: %v", err)
	}
	if err := ro.Resize(512 << 10); err != nil || ro.Size() != 512<<10 {
		t.Fatalf("shrinking the read-only view: %v, size %d", err, ro.Size())
	}
}

// TestFileStoreNoATime: the store's reads leave the file's access time alone
// (O_NOATIME), where a plain read of the same file, on the same file system,
// moves it.
func TestFileStoreNoATime(t *testing.T) {
	for _, tc := range []struct {
		name     string
		readOnly bool
	}{{"read-write", false}, {"read-only", true}} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.img")
			if err := os.WriteFile(path, make([]byte, 1<<16), 0o644); err != nil {
				t.Fatal(err)
			}
			old := time.Now().Add(-72 * time.Hour).Truncate(time.Second)
			mtime := old.Add(-time.Hour)
			// A plain read first: if it leaves the access time too (noatime
			// mount), the check below would prove nothing.
			if err := os.Chtimes(path, old, mtime); err != nil {
				t.Fatal(err)
			}
			if _, err := os.ReadFile(path); err != nil {
				t.Fatal(err)
			}
			if atime(t, path).Equal(old) {
				t.Skip("this file system does not update access times on reads")
			}
			if err := os.Chtimes(path, old, mtime); err != nil {
				t.Fatal(err)
			}
			s, err := OpenFile(path, FileOptions{ReadOnly: tc.readOnly})
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			flags, err := unix.FcntlInt(uintptr(s.fd), unix.F_GETFL, 0)
			if err != nil {
				t.Fatal(err)
			}
			if flags&unix.O_NOATIME == 0 {
				t.Errorf("descriptor flags %#x lack O_NOATIME", flags)
			}
			buf := make([]byte, 4096)
			if err := s.ReadAt([][]byte{buf}, 8192); err != nil {
				t.Fatal(err)
			}
			if got := atime(t, path); !got.Equal(old) {
				t.Errorf("access time after the store's read: %v, want it left at %v", got, old)
			}
		})
	}
}

func atime(t *testing.T, path string) time.Time {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return time.Unix(st.Atim.Unix())
}
