package backend

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCrashStoreKeepsSyncedData(t *testing.T) {
	s := NewCrashStore(64 << 10)
	a := bytes.Repeat([]byte{0xaa}, 8192)
	b := bytes.Repeat([]byte{0xbb}, 8192)
	if err := s.WriteAt([][]byte{a}, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteAt([][]byte{b[:4096], b[4096:]}, 4096); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	sawNone, sawAll, sawTorn := false, false, false
	for range 200 {
		img := s.Crash(rng)
		// The synced part must be there: the first 4096 bytes were
		// never rewritten.
		if !bytes.Equal(img[:4096], a[:4096]) {
			t.Fatal("synced data lost in a crash")
		}
		// Each sector of the unsynced write is old or new, never other.
		newSectors := 0
		for off := 4096; off < 12288; off += CrashSector {
			sec := img[off : off+CrashSector]
			old := byte(0)
			if off < 8192 {
				old = 0xaa
			}
			switch {
			case sec[0] == 0xbb && bytes.Equal(sec, b[:CrashSector]):
				newSectors++
			case bytes.Equal(sec, bytes.Repeat([]byte{old}, CrashSector)):
			default:
				t.Fatalf("sector at %d is neither old nor new", off)
			}
		}
		switch newSectors {
		case 0:
			sawNone = true
		case 16:
			sawAll = true
		default:
			sawTorn = true
		}
	}
	if !sawNone || !sawAll || !sawTorn {
		t.Fatalf("crash states not varied: none=%v all=%v torn=%v", sawNone, sawAll, sawTorn)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if img := s.Crash(rng); !bytes.Equal(img, s.Image()) {
		t.Fatal("after a sync a crash must keep everything")
	}
}

func TestCrashStoreFailedSyncKeepsNothing(t *testing.T) {
	s := NewCrashStore(4096)
	s.WriteAt([][]byte{{1}}, 0)
	s.SetSyncError(errors.New("EIO"))
	if err := s.Sync(); err == nil {
		t.Fatal("sync did not fail")
	}
	s.SetSyncError(nil)
	// The write is still pending: some crash drops it.
	rng := rand.New(rand.NewPCG(2, 2))
	dropped := false
	for range 50 {
		if s.Crash(rng)[0] == 0 {
			dropped = true
		}
	}
	if !dropped {
		t.Fatal("a write made before a failed sync was always durable")
	}
}

// logged runs a scripted workload on a LoggingStore over a CrashStore and
// returns the log's path and the synced image after each sync (index = mark).
func logged(t *testing.T) (string, [][]byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "write.log")
	inner := NewCrashStore(1 << 20)
	s, err := NewLoggingStore(inner, path)
	if err != nil {
		t.Fatal(err)
	}
	marks := [][]byte{inner.Image()}
	rng := rand.New(rand.NewPCG(3, 3))
	for i := range 60 {
		switch i % 10 {
		case 9:
			if err := s.Sync(); err != nil {
				t.Fatal(err)
			}
			marks = append(marks, inner.Image())
		case 7:
			off := int64(rng.IntN(255)) * 4096
			if err := s.Discard(off, 8192); err != nil {
				t.Fatal(err)
			}
		case 8:
			off := int64(rng.IntN(255)) * 4096
			if err := s.WriteZeroes(off, 4096, false); err != nil {
				t.Fatal(err)
			}
		default:
			data := make([]byte, 512*(1+rng.IntN(16)))
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			off := int64(rng.IntN(2000)) * 512
			if err := s.WriteAt([][]byte{data[:100], data[100:]}, off); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return path, marks
}

func TestWriteLogReplayToEveryMark(t *testing.T) {
	path, marks := logged(t)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l, err := ReadWriteLog(f)
	if err != nil {
		t.Fatal(err)
	}
	if l.Marks != len(marks)-1 || l.DiskSize != 1<<20 {
		t.Fatalf("log has %d marks and size %d, want %d and %d", l.Marks, l.DiskSize, len(marks)-1, 1<<20)
	}
	for m := range marks {
		img := make([]byte, l.DiskSize)
		if err := l.ReplayToMark(img, m); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(img, marks[m]) {
			t.Fatalf("replay to mark %d differs from the image synced then", m)
		}
	}
	if err := l.ReplayToMark(make([]byte, l.DiskSize), len(marks)); err == nil {
		t.Fatal("replay to a mark beyond the log did not fail")
	}
	// A crash replay after mark m keeps all of mark m.
	rng := rand.New(rand.NewPCG(4, 4))
	for m := range marks[:len(marks)-1] {
		img := make([]byte, l.DiskSize)
		if err := l.ReplayCrash(img, m, rng); err != nil {
			t.Fatal(err)
		}
		// Every sector is either as at mark m or as at mark m+1 or
		// as some write between them left it; at least check that the
		// sectors untouched between the two marks equal mark m.
		for off := 0; off < len(img); off += CrashSector {
			a, b := marks[m][off:off+CrashSector], marks[m+1][off:off+CrashSector]
			if bytes.Equal(a, b) && !touched(l, m, int64(off)) && !bytes.Equal(img[off:off+CrashSector], a) {
				t.Fatalf("crash replay after mark %d changed untouched sector %d", m, off)
			}
		}
	}
}

// touched reports whether a record after mark m and before the next touches
// the sector at off.
func touched(l *WriteLog, m int, off int64) bool {
	for i := l.markIndex(m) + 1; i < len(l.Records) && l.Records[i].Type != LogFlush; i++ {
		r := l.Records[i]
		if r.Offset < off+CrashSector && off < r.Offset+r.Length {
			return true
		}
	}
	return false
}

func TestWriteLogCorruptionIsReported(t *testing.T) {
	path, _ := logged(t)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		mutate func([]byte) []byte
	}{
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return b }},
		{"bad version", func(b []byte) []byte { b[8] = 9; return b }},
		{"truncated header", func(b []byte) []byte { return b[:10] }},
		{"truncated record header", func(b []byte) []byte { return b[:logHeaderSize+5] }},
		{"truncated data", func(b []byte) []byte { return b[:logHeaderSize+recHeaderSize+10] }},
		{"truncated at the end", func(b []byte) []byte { return b[:len(b)-1] }},
		{"flipped data byte", func(b []byte) []byte { b[logHeaderSize+recHeaderSize+3] ^= 1; return b }},
		{"unknown type", func(b []byte) []byte { b[logHeaderSize] = 9; return b }},
		{"bad sequence", func(b []byte) []byte { b[logHeaderSize+8] = 5; return b }},
		{"huge length", func(b []byte) []byte { b[logHeaderSize+24+7] = 0x40; return b }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := c.mutate(append([]byte(nil), good...))
			_, err := ReadWriteLog(bytes.NewReader(b))
			if !errors.Is(err, ErrBadLog) || !strings.Contains(err.Error(), "at offset ") {
				t.Fatalf("err = %v, want ErrBadLog naming the offset", err)
			}
		})
	}
	if _, err := ReadWriteLog(bytes.NewReader(good)); err != nil {
		t.Fatalf("the unmodified log: %v", err)
	}
}

// TestWriteLogTruncatedAnywhere cuts the log at many places (every byte of the first records,
// every byte around each record boundary, the end): the result is an error naming the
// offset, or, cut exactly between two records, a shorter log whose records are the first ones.
func TestWriteLogTruncatedAnywhere(t *testing.T) {
	path, _ := logged(t)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	full, err := ReadWriteLog(bytes.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	boundaries := map[int64]int{logHeaderSize: 0}
	for i, r := range full.Records {
		boundaries[r.End] = i + 1
	}
	// Every byte of the first records, and around every record boundary and the end.
	cuts := map[int]bool{}
	for n := 0; n < min(len(good), 4096); n++ {
		cuts[n] = true
	}
	for b := range boundaries {
		for d := -41; d <= 41; d++ {
			if n := int(b) + d; n >= 0 && n < len(good) {
				cuts[n] = true
			}
		}
	}
	for n := max(0, len(good)-64); n < len(good); n++ {
		cuts[n] = true
	}
	for n := range cuts {
		l, err := ReadWriteLog(bytes.NewReader(good[:n]))
		records, atBoundary := boundaries[int64(n)]
		switch {
		case atBoundary && err != nil:
			t.Fatalf("cut at record boundary %d: %v", n, err)
		case atBoundary && len(l.Records) != records:
			t.Fatalf("cut at %d: %d records, want %d", n, len(l.Records), records)
		case !atBoundary && (!errors.Is(err, ErrBadLog) || !strings.Contains(err.Error(), "at offset ")):
			t.Fatalf("cut at %d: err = %v, want ErrBadLog naming the offset", n, err)
		}
	}
}
