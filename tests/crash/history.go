// Package crash checks crash consistency of vublk end to end: a test
// front-end drives the whole stack through the vhost-user socket, the store is
// crashed at random moments, and every crash image is checked against the
// history of what the front-end saw.
package crash

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// SectorSize is the granularity of the history and of torn writes.
const SectorSize = 512

// Never is the completion time of a request that has not completed.
const Never = math.MaxInt64

// WriteRec is one write as the front-end saw it.
type WriteRec struct {
	ID       uint64 // > 0; sector contents are derived from it
	Queue    int
	QSeq     int    // position among the requests submitted on Queue
	Sector   uint64 // first sector
	Sectors  uint64
	Submit   int64 // clock when submitted
	Complete int64 // clock when its completion was seen (Never if not)
}

// FlushRec is one flush as the front-end saw it.
type FlushRec struct {
	Queue    int
	QSeq     int
	Submit   int64
	Complete int64
	OK       bool
}

// History records requests on one logical clock. It is safe for concurrent
// use.
type History struct {
	clock   atomic.Int64
	mu      sync.Mutex
	writes  []*WriteRec
	flushes []*FlushRec
	nextID  uint64
	qseq    map[int]int
	// flushDone has a token after a flush completed (see WaitFlushDone).
	flushDone chan struct{}
}

// NewHistory returns an empty history.
func NewHistory() *History { return &History{qseq: map[int]int{}, flushDone: make(chan struct{}, 1)} }

// Now ticks the clock.
func (h *History) Now() int64 { return h.clock.Add(1) }

// StartWrite records a write about to be submitted on queue and returns its
// record; the caller fills the data with SectorData and sets Complete via
// Done. Calls for one queue must come in submission order.
func (h *History) StartWrite(queue int, sector, sectors uint64) *WriteRec {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.nextID++
	w := &WriteRec{ID: h.nextID, Queue: queue, QSeq: h.qseq[queue], Sector: sector, Sectors: sectors,
		Submit: h.clock.Add(1), Complete: Never}
	h.qseq[queue]++
	h.writes = append(h.writes, w)
	return w
}

// StartFlush records a flush about to be submitted on queue.
func (h *History) StartFlush(queue int) *FlushRec {
	h.mu.Lock()
	defer h.mu.Unlock()
	f := &FlushRec{Queue: queue, QSeq: h.qseq[queue], Submit: h.clock.Add(1), Complete: Never}
	h.qseq[queue]++
	h.flushes = append(h.flushes, f)
	return f
}

// SkipQueueSlot records a request on queue that is neither a write nor a
// flush (a read), so that QSeq stays the submission order.
func (h *History) SkipQueueSlot(queue int) {
	h.mu.Lock()
	h.qseq[queue]++
	h.mu.Unlock()
}

// WriteDone records the completion of w.
func (h *History) WriteDone(w *WriteRec) {
	t := h.clock.Add(1)
	h.mu.Lock()
	w.Complete = t
	h.mu.Unlock()
}

// FlushDone records the completion of f with its status.
func (h *History) FlushDone(f *FlushRec, ok bool) {
	t := h.clock.Add(1)
	h.mu.Lock()
	f.Complete, f.OK = t, ok
	h.mu.Unlock()
	select {
	case h.flushDone <- struct{}{}:
	default:
	}
}

// WaitFlushDone waits until a flush completes after the call, or until timeout.
func (h *History) WaitFlushDone(timeout time.Duration) {
	select {
	case <-h.flushDone: // drop a completion from before the call
	default:
	}
	select {
	case <-h.flushDone:
	case <-time.After(timeout):
	}
}

// Snapshot copies the records, for checking against a crash image taken
// between the clock values before and after.
func (h *History) Snapshot() ([]WriteRec, []FlushRec) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ws := make([]WriteRec, len(h.writes))
	for i, w := range h.writes {
		ws[i] = *w
	}
	fs := make([]FlushRec, len(h.flushes))
	for i, f := range h.flushes {
		fs[i] = *f
	}
	return ws, fs
}

// SectorData fills buf (a multiple of SectorSize) with the contents write id
// puts at the sectors starting at sector: each sector begins with the write
// id and the sector number, then bytes derived from both, so that a sector
// in an image names the write it came from and proves it is whole.
func SectorData(buf []byte, id, sector uint64) {
	for off := 0; off+SectorSize <= len(buf); off += SectorSize {
		s := buf[off : off+SectorSize]
		sec := sector + uint64(off/SectorSize)
		binary.LittleEndian.PutUint64(s[0:], id)
		binary.LittleEndian.PutUint64(s[8:], sec)
		x := id*0x9e3779b97f4a7c15 ^ sec
		for i := 16; i < SectorSize; i += 8 {
			// splitmix64: cheap, and different for every (id, sector, word).
			x += 0x9e3779b97f4a7c15
			z := (x ^ x>>30) * 0xbf58476d1ce4e5b9
			z = (z ^ z>>27) * 0x94d049bb133111eb
			binary.LittleEndian.PutUint64(s[i:], z^z>>31)
		}
	}
}

// Violation is one sector of a crash image that no legal crash could leave.
type Violation struct {
	Sector uint64
	Msg    string
}

func (v Violation) String() string { return fmt.Sprintf("sector %d: %s", v.Sector, v.Msg) }

// Check verifies a crash image taken while the clock went from before to
// after. The rules:
//
//   - A write is durable if a flush completed (OK) before the crash and the
//     write either completed before that flush was submitted (the virtio
//     minimum), or was submitted before the flush on the same queue: vublk
//     accepted it before the flush, so the drain-then-sync barrier covers it
//     even if it was still running when the flush was submitted. In
//     write-through mode every write that completed before the crash is
//     durable.
//   - A sector covered by durable writes must hold the data of a write that
//     is not older than all of them: write W is excluded if some durable
//     write to the sector was submitted after W completed.
//   - A sector with no durable write holds its initial zeros or the data of
//     any write submitted before the crash.
//
// Every sector must be whole: the data of exactly one write (or zeros).
func Check(img []byte, writes []WriteRec, flushes []FlushRec, before, after int64, writeThrough bool) []Violation {
	// The latest submit of a completed flush, overall and per queue
	// (as the queue sequence number).
	maxFlushSubmit := int64(-1)
	maxFlushQSeq := map[int]int{}
	for _, f := range flushes {
		if f.Complete < before && f.OK {
			maxFlushSubmit = max(maxFlushSubmit, f.Submit)
			if q, ok := maxFlushQSeq[f.Queue]; !ok || f.QSeq > q {
				maxFlushQSeq[f.Queue] = f.QSeq
			}
		}
	}
	durable := func(w *WriteRec) bool {
		if writeThrough && w.Complete < before {
			return true
		}
		if w.Complete < maxFlushSubmit {
			return true
		}
		q, ok := maxFlushQSeq[w.Queue]
		return ok && w.QSeq < q
	}
	nSectors := uint64(len(img) / SectorSize)
	byID := map[uint64]*WriteRec{}
	// maxDurSubmit[s]: latest submit of a durable write covering s (-1: none).
	maxDurSubmit := make([]int64, nSectors)
	for i := range maxDurSubmit {
		maxDurSubmit[i] = -1
	}
	for i := range writes {
		w := &writes[i]
		byID[w.ID] = w
		if !durable(w) {
			continue
		}
		for s := w.Sector; s < w.Sector+w.Sectors && s < nSectors; s++ {
			maxDurSubmit[s] = max(maxDurSubmit[s], w.Submit)
		}
	}
	var bad []Violation
	want := make([]byte, SectorSize)
	for s := range nSectors {
		sec := img[s*SectorSize : (s+1)*SectorSize]
		id := binary.LittleEndian.Uint64(sec)
		if id == 0 {
			if !allZero(sec) {
				bad = append(bad, Violation{s, "neither zeros nor the data of a write (torn or corrupt)"})
			} else if maxDurSubmit[s] >= 0 {
				bad = append(bad, Violation{s, "zeros, but a durable write covers it"})
			}
			continue
		}
		w, ok := byID[id]
		if !ok || s < w.Sector || s >= w.Sector+w.Sectors {
			bad = append(bad, Violation{s, fmt.Sprintf("holds data of write %d, which never covered it", id)})
			continue
		}
		SectorData(want, id, s)
		switch {
		case string(want) != string(sec):
			bad = append(bad, Violation{s, fmt.Sprintf("data of write %d is corrupt", id)})
		case w.Submit >= after:
			bad = append(bad, Violation{s, fmt.Sprintf("holds write %d, submitted after the crash", id)})
		case w.Complete < maxDurSubmit[s]:
			bad = append(bad, Violation{s, fmt.Sprintf("holds write %d, but a later durable write (submitted at %d, after it completed at %d) was lost", id, maxDurSubmit[s], w.Complete)})
		}
	}
	return bad
}

var zeroSector [SectorSize]byte

func allZero(b []byte) bool { return bytes.Equal(b, zeroSector[:]) }
