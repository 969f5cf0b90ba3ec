package backend

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Rate is one limit: an average rate per second, and optionally a burst.
// Zero Avg is no limit.
type Rate struct {
	Avg int64 // units (I/Os or bytes) per second; 0: unlimited
	// Max is the rate allowed during a burst (0: no burst above Avg). A
	// burst runs at most at Max for MaxLength, then the rate falls back to
	// Avg until the burst credit has built up again (at Avg minus what is
	// used).
	Max       int64
	MaxLength time.Duration // default 1 s when Max is set
}

// Limits are the I/O limits of one export or one I/O group, as QEMU's
// throttle groups have them. The zero value limits nothing.
//
// What counts: a read counts against the total and read limits, a write or
// write-zeroes against total and write, by its byte length; a discard counts
// as one write I/O of no bytes (it moves no data). With IOPSSize set, a
// request of more than IOPSSize bytes counts as ceil(len/IOPSSize) I/Os, so
// large requests cannot get around an IOPS limit. Flushes are never
// throttled.
type Limits struct {
	IOPS, IOPSRead, IOPSWrite Rate
	BPS, BPSRead, BPSWrite    Rate
	IOPSSize                  int64
}

// Unlimited reports whether l limits nothing.
func (l Limits) Unlimited() bool {
	for _, r := range l.rates() {
		if r.Avg > 0 {
			return false
		}
	}
	return true
}

// rates lists l's rates in bucket order: IOPS total, read, write, then BPS.
func (l Limits) rates() [numBuckets]Rate {
	return [numBuckets]Rate{l.IOPS, l.IOPSRead, l.IOPSWrite, l.BPS, l.BPSRead, l.BPSWrite}
}

// Validate checks that every burst is above its average and has a length.
func (l Limits) Validate() error {
	names := [numBuckets]string{"iops_total", "iops_read", "iops_write", "bps_total", "bps_read", "bps_write"}
	for i, r := range l.rates() {
		switch {
		case r.Avg < 0 || r.Max < 0 || r.MaxLength < 0:
			return fmt.Errorf("%s: negative limit", names[i])
		case r.Max > 0 && r.Avg == 0:
			return fmt.Errorf("%s_max needs %s", names[i], names[i])
		case r.Max > 0 && r.Max < r.Avg:
			return fmt.Errorf("%s_max (%d) is below %s (%d)", names[i], r.Max, names[i], r.Avg)
		}
	}
	if l.IOPSSize < 0 {
		return fmt.Errorf("iops_size: negative")
	}
	return nil
}

const (
	numBuckets = 6
	// baseCredit is how much of its average rate a bucket may save up
	// beyond any burst (QEMU's throttle allows a tenth of a second too): a
	// dispatcher that runs late, on a busy host, catches up on that much
	// instead of losing it; small against a measurement over seconds.
	baseCredit = 100 * time.Millisecond
	// peakCredit is the same for the bucket that holds a burst at its max.
	peakCredit = 50 * time.Millisecond
	// minWait is the shortest the dispatcher sleeps: it then admits what
	// has accumulated, in one batch.
	minWait = 500 * time.Microsecond
)

// bucket is one token bucket: tokens grow at rate per second up to capacity;
// a request is admitted when the bucket is not negative and then takes its
// cost, which may leave the bucket in debt (a request bigger than the
// capacity still passes, and the debt delays the next).
type bucket struct {
	rate     float64 // per second; 0: this bucket is off
	capacity float64
	tokens   float64
}

// refill adds dt's tokens, keeping at most capacity plus late's worth: see
// limiter.catchUp.
func (b *bucket) refill(dt, late time.Duration) {
	b.tokens = math.Min(b.capacity+b.rate*late.Seconds(), b.tokens+b.rate*dt.Seconds())
}

// wait is how long until the bucket is not negative.
func (b *bucket) wait() time.Duration {
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(math.Ceil(-b.tokens / b.rate * float64(time.Second)))
}

// limiter is the arithmetic of a Throttle: for each limited rate a bucket
// filled at Avg whose capacity is the burst credit, and one filled at Max
// that keeps a burst at Max. It knows nothing of time but what it is told.
type limiter struct {
	limits Limits
	last   time.Duration
	avg    [numBuckets]bucket
	peak   [numBuckets]bucket
}

func newLimiter(l Limits, now time.Duration) *limiter {
	lim := &limiter{last: now}
	lim.set(l, nil)
	return lim
}

// set installs new limits. Buckets that stay limited keep their tokens (no
// more than the new capacity); new ones start full.
func (lim *limiter) set(l Limits, old *limiter) {
	lim.limits = l
	for i, r := range l.rates() {
		a, p := bucket{}, bucket{}
		if r.Avg > 0 {
			a.rate = float64(r.Avg)
			a.capacity = a.rate * baseCredit.Seconds()
			if r.Max > r.Avg {
				length := r.MaxLength
				if length <= 0 {
					length = time.Second
				}
				a.capacity += float64(r.Max-r.Avg) * length.Seconds()
				p.rate = float64(r.Max)
				p.capacity = p.rate * peakCredit.Seconds()
				p.tokens = p.capacity
			}
			a.tokens = a.capacity
		}
		if old != nil {
			if old.avg[i].rate > 0 && a.rate > 0 {
				a.tokens = math.Min(a.capacity, old.avg[i].tokens)
			}
			if old.peak[i].rate > 0 && p.rate > 0 {
				p.tokens = math.Min(p.capacity, old.peak[i].tokens)
			}
		}
		lim.avg[i], lim.peak[i] = a, p
	}
}

// cost is what a request of op and n bytes takes from the IOPS and the
// bytes buckets.
func (lim *limiter) cost(op Op, n int64) (ios, bytes float64) {
	ios = 1
	if op == OpDiscard {
		return 1, 0
	}
	if s := lim.limits.IOPSSize; s > 0 && n > s {
		ios = float64((n + s - 1) / s)
	}
	return ios, float64(n)
}

// refill brings every bucket up to now.
func (lim *limiter) refill(now time.Duration) { lim.catchUp(now, 0) }

// catchUp brings every bucket up to now for a dispatcher that woke late
// (late past the deadline it was given) while requests waited. An on-time
// dispatcher would have issued them as the tokens came: the tokens of that
// time are theirs, and a bucket may hold them beyond its capacity until
// the next refill, which caps it again. Without it, a timer that fires
// later than a bucket's saved credit (100 ms, 50 ms at a burst's max; often
// so on a busy host) throws tokens away and the rate falls short of the
// limit while the guest had the requests queued.
func (lim *limiter) catchUp(now, late time.Duration) {
	dt := now - lim.last
	if dt <= 0 {
		return
	}
	late = min(max(late, 0), dt)
	for i := range lim.avg {
		if lim.avg[i].rate > 0 {
			lim.avg[i].refill(dt, late)
		}
		if lim.peak[i].rate > 0 {
			lim.peak[i].refill(dt, late)
		}
	}
	lim.last = now
}

// bucketsOf are the buckets a request of op counts in: IOPS total and its
// direction, then bytes total and its direction.
func bucketsOf(op Op) [4]int {
	if op == OpRead {
		return [4]int{0, 1, 3, 4}
	}
	return [4]int{0, 2, 3, 5}
}

// admit refills the buckets up to now, and then either takes the cost of a
// request of op and n bytes and returns 0, or returns how long to wait
// before it can be admitted (nothing taken).
func (lim *limiter) admit(op Op, n int64, now time.Duration) time.Duration {
	lim.refill(now)
	var wait time.Duration
	for _, i := range bucketsOf(op) {
		if lim.avg[i].rate > 0 {
			wait = max(wait, lim.avg[i].wait())
		}
		if lim.peak[i].rate > 0 {
			wait = max(wait, lim.peak[i].wait())
		}
	}
	if wait > 0 {
		return wait
	}
	lim.take(op, n)
	return 0
}

// take subtracts the cost of a request of op and n bytes.
func (lim *limiter) take(op Op, n int64) {
	ios, bytes := lim.cost(op, n)
	for k, i := range bucketsOf(op) {
		c := ios
		if k >= 2 {
			c = bytes
		}
		lim.avg[i].tokens -= c
		lim.peak[i].tokens -= c
	}
}

// ThrottleStats count what a throttle made wait.
type ThrottleStats struct {
	Throttled atomic.Uint64 // requests that waited
	WaitNanos atomic.Uint64 // their total wait
}

// Throttle enforces Limits over the requests of one export, or of every
// export of an I/O group that shares it (Engine.SetThrottle).
//
// A request that may go now goes straight on to a lane or the ring. One over
// the limit waits in the throttle's queue, already admitted through its
// engine's barrier (so a flush's drain covers it), holding no lane and no
// goroutine: a timer issues it when the buckets allow. The queue is FIFO
// across every engine that shares the throttle: once one request waits,
// later ones wait behind it, so nothing overtakes.
type Throttle struct {
	now func() time.Duration

	mu      sync.Mutex
	lim     *limiter
	queue   []queued // queue[head:] waits
	head    int
	timer   *time.Timer
	armed   bool
	pending int // len(queue) - head, readable with mu
	// deadline is when the timer was armed to fire (on t.now's clock).
	deadline time.Duration

	Stats ThrottleStats
}

type queued struct {
	e     *Engine
	r     *Request
	bytes int64
	since time.Duration
}

// NewThrottle returns a throttle enforcing l.
func NewThrottle(l Limits) *Throttle {
	return newThrottle(l, monotime)
}

func newThrottle(l Limits, now func() time.Duration) *Throttle {
	t := &Throttle{now: now, lim: newLimiter(l, now())}
	t.timer = time.AfterFunc(time.Hour, t.dispatch)
	t.timer.Stop()
	return t
}

// Limits returns the limits in force.
func (t *Throttle) Limits() Limits {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lim.limits
}

// SetLimits changes the limits live. Requests waiting are re-examined at
// once against the new limits.
func (t *Throttle) SetLimits(l Limits) {
	t.mu.Lock()
	lim := &limiter{last: t.now()}
	t.lim.refill(lim.last)
	lim.set(l, t.lim)
	t.lim = lim
	if t.pending > 0 {
		t.arm(0)
	}
	t.mu.Unlock()
}

// Waiting is how many requests wait now.
func (t *Throttle) Waiting() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.pending
}

// submit issues r (admitted through e's barrier) now if the limits allow
// and nothing waits, else queues it.
func (t *Throttle) submit(e *Engine, r *Request) {
	n := requestBytes(r)
	t.mu.Lock()
	now := t.now()
	if t.pending == 0 {
		wait := t.lim.admit(r.Op, n, now)
		if wait == 0 {
			t.mu.Unlock()
			e.dispatch(r)
			return
		}
		t.arm(wait)
	}
	t.queue = append(t.queue, queued{e: e, r: r, bytes: n, since: now})
	t.pending++
	t.mu.Unlock()
}

// arm starts the timer for d from now (t.mu held).
func (t *Throttle) arm(d time.Duration) {
	if t.armed {
		t.timer.Stop()
	}
	t.armed = true
	d = max(d, minWait)
	t.deadline = t.now() + d
	t.timer.Reset(d)
}

// dispatch is the timer: it issues every waiting request the buckets now
// allow, in order, and sleeps again until the next one may go.
func (t *Throttle) dispatch() {
	t.mu.Lock()
	t.armed = false
	var batch []queued
	now := t.now()
	if t.pending > 0 {
		t.lim.catchUp(now, now-t.deadline)
	}
	for t.pending > 0 {
		q := t.queue[t.head]
		if wait := t.lim.admit(q.r.Op, q.bytes, now); wait > 0 {
			t.arm(wait)
			break
		}
		batch = append(batch, q)
		t.pop()
	}
	t.mu.Unlock()
	t.issue(batch, now)
}

// pop removes the head of the queue (t.mu held).
func (t *Throttle) pop() {
	t.queue[t.head] = queued{}
	t.head++
	t.pending--
	if t.pending == 0 {
		t.queue, t.head = t.queue[:0], 0
	} else if t.head >= 1024 && t.head*2 >= len(t.queue) {
		t.queue = append(t.queue[:0], t.queue[t.head:]...)
		t.head = 0
	}
}

// issue hands waited-for requests on to their engines' lanes or rings.
func (t *Throttle) issue(batch []queued, now time.Duration) {
	for _, q := range batch {
		w := uint64(max(now-q.since, 0))
		t.Stats.Throttled.Add(1)
		t.Stats.WaitNanos.Add(w)
		q.e.throttleStats.Throttled.Add(1)
		q.e.throttleStats.WaitNanos.Add(w)
		q.e.dispatch(q.r)
	}
}

// release issues every request of e that waits, whatever the limits: e is
// closing, and its final drain must not wait for the limit. The requests
// still take their cost, so the other exports of a group do not gain.
func (t *Throttle) release(e *Engine) {
	t.mu.Lock()
	now := t.now()
	var batch []queued
	kept := t.queue[:0]
	for _, q := range t.queue[t.head:] {
		if q.e == e {
			t.lim.refill(now)
			t.lim.take(q.r.Op, q.bytes)
			batch = append(batch, q)
			continue
		}
		kept = append(kept, q)
	}
	clear(t.queue[len(kept):])
	t.queue, t.head, t.pending = kept, 0, len(kept)
	t.mu.Unlock()
	t.issue(batch, now)
}

// requestBytes is the length a request moves (or, for discard and
// write-zeroes, covers).
func requestBytes(r *Request) int64 {
	if r.Op == OpRead || r.Op == OpWrite {
		return int64(totalLen(r.Bufs))
	}
	return r.Length
}

// SetThrottle makes t (nil: none) the throttle of the requests e accepts from
// now on; several engines may share one (an I/O group). Without a throttle a
// request costs one atomic load more than before. Requests already waiting
// in an earlier throttle still go from there.
func (e *Engine) SetThrottle(t *Throttle) { e.throttle.Store(t) }

// Throttle returns the engine's throttle, or nil.
func (e *Engine) Throttle() *Throttle { return e.throttle.Load() }

// ThrottleStats are the counts of this engine's requests that waited in a
// throttle.
func (e *Engine) ThrottleStats() *ThrottleStats { return &e.throttleStats }
