package backend

import (
	"fmt"
	"math/rand/v2"
	"sync"
)

// CrashStore is an in-memory Store for crash-consistency tests. Like a disk
// behind a page cache it keeps two images: the data as written (what reads
// return) and the data as synced (what survives a crash). Crash returns the
// synced image plus a random subset of the writes made since the last sync,
// applied in order and torn at sector granularity, the way a real page cache
// writes dirty pages back in any order.
type CrashStore struct {
	mu      sync.Mutex
	data    []byte
	synced  []byte
	pending []pendingWrite // unsynced writes, oldest first
	syncs   int
	failErr error // returned by every Sync once set (SetSyncError)
}

// CrashSector is the granularity at which Crash tears unsynced writes.
const CrashSector = 512

type pendingWrite struct {
	off  int64
	data []byte // nil for zeroing writes of length n
	n    int64
}

var (
	_ Store      = (*CrashStore)(nil)
	_ Discarder  = (*CrashStore)(nil)
	_ ZeroWriter = (*CrashStore)(nil)
)

// NewCrashStore returns a zero-filled store of size bytes.
func NewCrashStore(size int64) *CrashStore {
	return &CrashStore{data: make([]byte, size), synced: make([]byte, size)}
}

// NewCrashStoreFrom returns a store whose written and synced images are base.
func NewCrashStoreFrom(base []byte) *CrashStore {
	return &CrashStore{data: append([]byte(nil), base...), synced: append([]byte(nil), base...)}
}

func (s *CrashStore) check(off, n int64) error {
	size := int64(len(s.data))
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: offset %d length %d size %d", ErrOutOfRange, off, n, size)
	}
	return nil
}

// ReadAt implements Store.
func (s *CrashStore) ReadAt(bufs [][]byte, off int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(off, totalLen(bufs)); err != nil {
		return err
	}
	for _, b := range bufs {
		off += int64(copy(b, s.data[off:]))
	}
	return nil
}

// WriteAt implements Store.
func (s *CrashStore) WriteAt(bufs [][]byte, off int64) error {
	n := totalLen(bufs)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(off, n); err != nil {
		return err
	}
	w := pendingWrite{off: off, n: n, data: make([]byte, 0, n)}
	for _, b := range bufs {
		w.data = append(w.data, b...)
	}
	copy(s.data[off:], w.data)
	s.pending = append(s.pending, w)
	return nil
}

// WriteZeroes implements ZeroWriter.
func (s *CrashStore) WriteZeroes(off, n int64, unmap bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.check(off, n); err != nil {
		return err
	}
	clear(s.data[off : off+n])
	s.pending = append(s.pending, pendingWrite{off: off, n: n})
	return nil
}

// Discard implements Discarder; the range reads as zeros afterwards.
func (s *CrashStore) Discard(off, n int64) error { return s.WriteZeroes(off, n, true) }

// Sync implements Store: every write made so far becomes durable.
func (s *CrashStore) Sync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failErr != nil {
		return s.failErr
	}
	copy(s.synced, s.data)
	s.pending = s.pending[:0]
	s.syncs++
	return nil
}

// SetSyncError makes every later Sync fail with err (nil: succeed again)
// without making anything durable, as a failed fsync may.
func (s *CrashStore) SetSyncError(err error) {
	s.mu.Lock()
	s.failErr = err
	s.mu.Unlock()
}

// Syncs counts successful syncs.
func (s *CrashStore) Syncs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.syncs
}

// Size implements Store.
func (s *CrashStore) Size() int64 { return int64(len(s.data)) }

// Close implements Store.
func (s *CrashStore) Close() error { return nil }

// Image returns a copy of the data as written.
func (s *CrashStore) Image() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.data...)
}

// Crash returns the image a host crash could leave now: the synced data plus,
// for each unsynced write in order, either all of it, none of it, or a
// random subset of its sectors. The store itself is not changed.
func (s *CrashStore) Crash(rng *rand.Rand) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	img := append([]byte(nil), s.synced...)
	for _, w := range s.pending {
		switch rng.IntN(3) {
		case 0: // not written back
		case 1: // written back whole
			w.applyRange(img, w.off, w.off+w.n)
		case 2: // torn: some sectors written back
			for start := w.off; start < w.off+w.n; {
				end := min((start/CrashSector+1)*CrashSector, w.off+w.n)
				if rng.IntN(2) == 0 {
					w.applyRange(img, start, end)
				}
				start = end
			}
		}
	}
	return img
}

// applyRange copies the part [from, to) of the write into img.
func (w *pendingWrite) applyRange(img []byte, from, to int64) {
	if w.data == nil {
		clear(img[from:to])
		return
	}
	copy(img[from:to], w.data[from-w.off:to-w.off])
}
