package backend

import (
	"runtime/debug"
	"sync/atomic"
	"time"
)

// DefaultInlineLimit is the average store time of reads and writes under
// which SubmitIdle runs requests on the caller's goroutine: page cache and
// tmpfs speed, where handing a request to a lane costs more than doing it.
const DefaultInlineLimit = 30 * time.Microsecond

// inlineSampleEvery: a lane times one read or write in this many for the
// inline gate (a request run inline is always timed).
const inlineSampleEvery = 8

// inlineGate decides whether SubmitIdle may run a request inline. It keeps a
// moving average of how long the store took for reads and writes, on the
// lanes and inline alike.
type inlineGate struct {
	limit atomic.Int64 // ns; 0: never inline
	avg   atomic.Int64 // ns, exponentially weighted (1/8 per sample)
}

func (g *inlineGate) init(limit time.Duration) {
	g.limit.Store(int64(limit))
	// Start out slow: the lanes run the first requests, and their times
	// decide.
	g.avg.Store(4 * int64(limit))
}

func (g *inlineGate) open() bool {
	limit := g.limit.Load()
	return limit > 0 && g.avg.Load() < limit
}

// outlierFactor bounds what one sample adds to the gate's average: at most
// this many times the limit. The times are wall-clock times, and on a busy
// host the thread running a request is now and then preempted in the middle
// of it: a page-cache read of 10 µs then shows as milliseconds. Unbounded,
// one such sample closed the gate for the next 20 samples or so, and the
// lanes timed one request in inlineSampleEvery: about 160 requests handed
// to lanes, each a futex wake-up of a lane's thread (at 4k QD1 under a slow
// driver on the loaded test machine, one request in ten went to a lane).
// Bounded, it closes the gate for 3 samples. A store that is slow for more
// than about one request in outlierFactor still keeps it closed: its
// average tends to at least that share of outlierFactor times the limit.
const outlierFactor = 8

// observe adds one store time. Concurrent updates may lose a sample, which
// an average can afford.
func (g *inlineGate) observe(d time.Duration) {
	if limit := g.limit.Load(); limit > 0 {
		d = min(d, time.Duration(outlierFactor*limit))
	}
	avg := g.avg.Load()
	g.avg.Store(avg + (int64(d)-avg)/8)
}

// SetInlineLimit sets the average store time under which SubmitIdle runs
// requests inline; 0 never does (every request goes to a lane).
func (e *Engine) SetInlineLimit(d time.Duration) { e.inline.limit.Store(int64(max(d, 0))) }

// SubmitIdle is Submit for a caller that has nothing else to do until r
// completes (its queue has no other request in flight, and none waiting):
// RunInline if it can, else Submit. It reports whether r ran inline.
func (e *Engine) SubmitIdle(r *Request) (inline bool) {
	if e.RunInline(r) {
		return true
	}
	e.Submit(r)
	return false
}

// RunInline runs r on the calling goroutine, as a lane would run it, and
// completes it before returning true, if the store has recently been fast
// (the inline gate: page cache and tmpfs speed, where handing a request to a
// lane costs a goroutine wake-up and the Go scheduler's spinning, more than
// the request itself). Otherwise, and for anything but a read or a write,
// with io_uring, an AsyncIO store (RBD) or I/O limits, it returns false and
// r is untouched: the caller submits it. A slow store (a disk, a network
// file system) closes the gate, so that requests go to the lanes again and
// the caller can go on popping; only the request that turned the store slow
// may have held the caller.
func (e *Engine) RunInline(r *Request) bool {
	if e.uring != nil || e.async != nil || (r.Op != OpRead && r.Op != OpWrite) || !e.inline.open() || e.throttle.Load() != nil {
		return false
	}
	r.start = 0
	if e.observer.Load() != nil {
		r.start = monotime()
	}
	e.barrier.Enter(r.Op)
	e.Stats.Inline.Add(1)
	t0 := monotime()
	r.Err = e.executeInline(r)
	e.inline.observe(monotime() - t0)
	e.finish(r)
	return true
}

// executeInline is executeSafe on the caller's goroutine, with faults caught
// for the time of the request only.
func (e *Engine) executeInline(r *Request) error {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	return e.executeSafe(r)
}
