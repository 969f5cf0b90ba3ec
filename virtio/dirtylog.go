package virtio

import (
	"sync"
	"sync/atomic"
)

// LogPageSize is the page size of the dirty log (VHOST_LOG_PAGE): one bit per 4 KiB of guest
// physical memory.
const LogPageSize = 0x1000

// DirtyLog is the front-end's dirty page bitmap during live migration (vhost-user.rst,
// "Migration"): bit page%8 of byte page/8 is set for every 4 KiB guest page (by guest physical
// address) the device wrote, so that the front-end sends that page again. The bitmap is memory
// the front-end shares and reads concurrently, so bits are set with atomic ORs, after the write
// they record (a bit set before the write could be cleared by a sync that then sends the old
// page).
//
// Close waits for the marks in progress and makes later ones do nothing, so that the memory can
// be unmapped, and the front-end told, only once nothing writes to it any more.
type DirtyLog struct {
	mu     sync.RWMutex
	bitmap []byte // nil once closed
	// dropped counts pages that lie beyond the bitmap: a front-end whose log does not cover
	// every guest address it gave us.
	dropped atomic.Uint64
	// skipped counts the pages of read data a test hook left out of the log (testhook_on.go);
	// always 0 in a normal build.
	skipped atomic.Uint64
}

// NewDirtyLog returns a log over bitmap (the mapped log region).
func NewDirtyLog(bitmap []byte) *DirtyLog { return &DirtyLog{bitmap: bitmap} }

// Mark sets the bits of every page that [gpa, gpa+n) touches. Pages beyond the bitmap are counted
// in Dropped. A fault on the bitmap (a front-end that shrank it) panics as a fault does on guest
// memory: callers run under catchFault.
func (l *DirtyLog) Mark(gpa, n uint64) {
	if n == 0 {
		return
	}
	first := gpa / LogPageSize
	last := first
	if n-1 <= ^uint64(0)-gpa { // the range does not wrap
		last = (gpa + n - 1) / LogPageSize
	} else {
		last = ^uint64(0) / LogPageSize
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	if l.bitmap == nil {
		return
	}
	size := uint64(len(l.bitmap))
	for page := first; ; {
		b := page / 8
		if b >= size {
			l.dropped.Add(last - page + 1)
			return
		}
		// the bits of this byte from page to min(last, end of byte)
		lo := page % 8
		hi := uint64(7)
		if last/8 == b {
			hi = last % 8
		}
		orByte(l.bitmap, int(b), byte((0xff>>(7-hi))&(0xff<<lo)))
		if last/8 == b {
			return
		}
		page = (b + 1) * 8
	}
}

// Dropped is how many page marks fell beyond the bitmap.
func (l *DirtyLog) Dropped() uint64 { return l.dropped.Load() }

// Skipped is how many pages of read data the test hook VUBLK_TESTHOOK_NO_DATA_LOG left out of
// the log; always 0 in a normal build.
func (l *DirtyLog) Skipped() uint64 { return l.skipped.Load() }

// Close waits for the marks in progress; later marks do nothing. It returns the bitmap, which
// nothing in this package touches any more.
func (l *DirtyLog) Close() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.bitmap
	l.bitmap = nil
	return b
}

// DirtyLogger is the logging switch of one device, shared by its queues: nil while the front-end
// does not log (VHOST_F_LOG_ALL off, or no log given yet). While it is nil the data path pays one
// atomic load per completion.
type DirtyLogger struct {
	p atomic.Pointer[DirtyLog]
}

// Load returns the active log, or nil. A nil *DirtyLogger has none.
func (s *DirtyLogger) Load() *DirtyLog {
	if s == nil {
		return nil
	}
	return s.p.Load()
}

// Swap makes l (nil: none) the active log and returns the previous one, which the caller closes
// (Close) before it unmaps or releases it.
func (s *DirtyLogger) Swap(l *DirtyLog) *DirtyLog { return s.p.Swap(l) }
