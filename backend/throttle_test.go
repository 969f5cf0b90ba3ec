package backend

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// stream is a greedy client of a limiter on a fake clock: it sends a request
// of op and n bytes whenever the limiter lets it.
type stream struct {
	op    Op
	n     int64
	next  time.Duration // when it tries again
	count int           // admitted
	bytes int64
	times []time.Duration // when each request was admitted
}

// simulate runs the streams against lim from start until end (fake time),
// each trying again exactly when the limiter said.
func simulate(lim *limiter, start, end time.Duration, streams ...*stream) {
	for _, s := range streams {
		s.next = max(s.next, start)
	}
	for {
		var s *stream
		for _, c := range streams {
			if s == nil || c.next < s.next {
				s = c
			}
		}
		if s.next >= end {
			return
		}
		if w := lim.admit(s.op, s.n, s.next); w > 0 {
			s.next += w
			continue
		}
		s.count++
		s.bytes += s.n
		s.times = append(s.times, s.next)
	}
}

// countIn is how many of s's requests were admitted in [from, to).
func (s *stream) countIn(from, to time.Duration) int {
	n := 0
	for _, t := range s.times {
		if t >= from && t < to {
			n++
		}
	}
	return n
}

func within(got, want, tol float64) bool { return math.Abs(got-want) <= tol }

const sec = time.Second

func TestLimiterRates(t *testing.T) {
	for _, tc := range []struct {
		name    string
		limits  Limits
		streams []*stream
		dur     time.Duration
		want    []float64 // requests admitted, per stream
		tol     float64
	}{
		{"iops steady", Limits{IOPS: Rate{Avg: 100}}, []*stream{{op: OpRead, n: 4096}}, 10 * sec, []float64{1000 + 10}, 2},
		{"iops write", Limits{IOPSWrite: Rate{Avg: 250}}, []*stream{{op: OpWrite, n: 512}}, 4 * sec, []float64{1000 + 25}, 2},
		{"read limit leaves writes alone", Limits{IOPSRead: Rate{Avg: 10}}, []*stream{{op: OpRead, n: 512}, {op: OpWrite, n: 512}}, sec, []float64{10 + 1, math.Inf(1)}, 2},
		// 1 MiB/s in 64 KiB requests: 16 a second (plus 100 ms of credit).
		{"bps", Limits{BPS: Rate{Avg: 1 << 20}}, []*stream{{op: OpWrite, n: 64 << 10}}, 10 * sec, []float64{160 + 1.6}, 1.5},
		// iops_size 4 KiB: a 64 KiB read is 16 I/Os.
		{"iops_size", Limits{IOPS: Rate{Avg: 160}, IOPSSize: 4096}, []*stream{{op: OpRead, n: 64 << 10}}, 10 * sec, []float64{100 + 1}, 1.5},
		{"iops_size small requests count once", Limits{IOPS: Rate{Avg: 100}, IOPSSize: 4096}, []*stream{{op: OpRead, n: 512}}, 10 * sec, []float64{1010}, 2},
		// Total 100: reads capped at 30, writes take the rest.
		{"total and read", Limits{IOPS: Rate{Avg: 100}, IOPSRead: Rate{Avg: 30}}, []*stream{{op: OpRead, n: 512}, {op: OpWrite, n: 512}}, 10 * sec, []float64{300, 700}, 10},
		// Bytes and IOPS together: whichever is tighter.
		{"bps tighter than iops", Limits{IOPS: Rate{Avg: 1000}, BPS: Rate{Avg: 100 << 10}}, []*stream{{op: OpWrite, n: 4096}}, 10 * sec, []float64{250 + 2.5}, 1.5},
		// A discard is one write I/O of no bytes: a bytes limit does not hold it.
		{"discard counts as one I/O", Limits{IOPS: Rate{Avg: 50}, BPS: Rate{Avg: 1}}, []*stream{{op: OpDiscard, n: 1 << 30}}, 10 * sec, []float64{505}, 2},
		{"write-zeroes counts its bytes", Limits{BPSWrite: Rate{Avg: 1 << 20}}, []*stream{{op: OpWriteZeroes, n: 1 << 20}}, 10 * sec, []float64{11}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lim := newLimiter(tc.limits, 0)
			// Bound the unlimited streams: they would never yield.
			for _, s := range tc.streams {
				s.next = 0
			}
			if math.IsInf(tc.want[len(tc.want)-1], 1) {
				// An unlimited stream: check it is never told to wait.
				s := tc.streams[len(tc.streams)-1]
				for i := range 10000 {
					if w := lim.admit(s.op, s.n, time.Duration(i)); w != 0 {
						t.Fatalf("unlimited %v told to wait %v", s.op, w)
					}
				}
				tc.streams, tc.want = tc.streams[:len(tc.streams)-1], tc.want[:len(tc.want)-1]
			}
			simulate(lim, 0, tc.dur, tc.streams...)
			for i, s := range tc.streams {
				if !within(float64(s.count), tc.want[i], tc.tol) {
					t.Errorf("stream %d (%v): %d admitted in %v, want %v±%v", i, s.op, s.count, tc.dur, tc.want[i], tc.tol)
				}
			}
		})
	}
}

// TestLimiterBurst: a burst runs at max for its length, then the rate falls
// back to the average; after a rest the burst is allowed again.
func TestLimiterBurst(t *testing.T) {
	lim := newLimiter(Limits{IOPS: Rate{Avg: 100, Max: 1000, MaxLength: 2 * sec}}, 0)
	s := &stream{op: OpWrite, n: 4096}
	simulate(lim, 0, 6*sec, s)
	for _, c := range []struct {
		from, to time.Duration
		want     float64
	}{
		{0, sec, 1000},       // at max
		{sec, 2 * sec, 1000}, // still at max: 2 s long
		{2100 * time.Millisecond, 3100 * time.Millisecond, 100}, // no longer
		{4 * sec, 6 * sec, 200},
	} {
		if got := s.countIn(c.from, c.to); !within(float64(got), c.want, c.want*0.06+1) {
			t.Errorf("[%v, %v): %d requests, want %v", c.from, c.to, got, c.want)
		}
	}
	// The credit (1800 I/Os) builds up at 100/s: after 18 s of rest the
	// whole burst is there again.
	s2 := &stream{op: OpWrite, n: 4096}
	simulate(lim, 24*sec, 26*sec, s2)
	if got := s2.countIn(24*sec, 26*sec); !within(float64(got), 2000, 100) {
		t.Errorf("second burst: %d requests in 2 s, want about 2000", got)
	}
	// After only 5 s of rest a quarter of the burst is back: 500 extra.
	lim3 := newLimiter(Limits{IOPS: Rate{Avg: 100, Max: 1000, MaxLength: 2 * sec}}, 0)
	s3 := &stream{op: OpWrite, n: 4096}
	simulate(lim3, 0, 4*sec, s3)
	s4 := &stream{op: OpWrite, n: 4096}
	simulate(lim3, 9*sec, 12*sec, s4)
	// 3 s: 300 at avg plus the credit of 5 s (500) plus the 100 ms base.
	if got := s4.count; !within(float64(got), 810, 30) {
		t.Errorf("after 5 s of rest: %d requests in 3 s, want about 810", got)
	}
}

// TestLimiterLiveChange: new limits apply from the moment they are set, and
// a bucket that stays limited keeps its debt.
func TestLimiterLiveChange(t *testing.T) {
	lim := newLimiter(Limits{IOPS: Rate{Avg: 100}}, 0)
	s := &stream{op: OpRead, n: 4096}
	simulate(lim, 0, 5*sec, s)
	next := &limiter{last: 5 * sec}
	lim.refill(5 * sec)
	next.set(Limits{IOPS: Rate{Avg: 1000}}, lim)
	s2 := &stream{op: OpRead, n: 4096}
	simulate(next, 5*sec, 7*sec, s2)
	if got := s2.count; !within(float64(got), 2000, 5) {
		t.Errorf("after raising the limit to 1000: %d in 2 s, want 2000", got)
	}
	// Lifting every limit: nothing waits.
	free := &limiter{}
	free.set(Limits{}, next)
	for i := range 1000 {
		if w := free.admit(OpWrite, 1<<20, 7*sec+time.Duration(i)); w != 0 {
			t.Fatalf("no limits, yet told to wait %v", w)
		}
	}
}

func TestLimitsValidate(t *testing.T) {
	for _, tc := range []struct {
		l  Limits
		ok bool
	}{
		{Limits{}, true},
		{Limits{IOPS: Rate{Avg: 10, Max: 20, MaxLength: sec}}, true},
		{Limits{IOPS: Rate{Max: 20}}, false},
		{Limits{BPSRead: Rate{Avg: 10, Max: 5}}, false},
		{Limits{IOPSWrite: Rate{Avg: -1}}, false},
		{Limits{IOPSSize: -1}, false},
	} {
		if err := tc.l.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v", tc.l, err)
		}
	}
	if !(Limits{IOPSSize: 4096}).Unlimited() || (Limits{BPSWrite: Rate{Avg: 1}}).Unlimited() {
		t.Error("Unlimited is wrong")
	}
}

// seqStore records the offsets of writes in the order the store sees them.
type seqStore struct {
	nullStore
	mu   sync.Mutex
	offs []int64
}

func (s *seqStore) WriteAt(bufs [][]byte, off int64) error {
	s.mu.Lock()
	s.offs = append(s.offs, off)
	s.mu.Unlock()
	return nil
}

func (s *seqStore) order() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int64(nil), s.offs...)
}

// TestThrottleQueues: requests over the limit wait without blocking the
// submitter and without a lane, go in FIFO order at the limit's pace, and a
// flush drains them (they were admitted through the barrier).
func TestThrottleQueues(t *testing.T) {
	s := &seqStore{}
	e := NewEngine(s, 1)
	defer e.Close()
	// The inline gate is open: without the throttle SubmitIdle would run these on the caller.
	e.SetInlineLimit(time.Hour)
	e.inline.avg.Store(0)
	th := NewThrottle(Limits{IOPS: Rate{Avg: 50}})
	e.SetThrottle(th)
	var wg sync.WaitGroup
	const n = 20
	start := time.Now()
	for i := range n {
		wg.Add(1)
		e.SubmitIdle(&Request{Op: OpWrite, Offset: int64(i), Bufs: [][]byte{{1}}, Done: doneCounter{&wg}})
	}
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Fatalf("submitting %d throttled requests blocked for %v", n, d)
	}
	if w := th.Waiting(); w < n-7 {
		t.Fatalf("%d requests wait, want at least %d", w, n-7)
	}
	if got, w := e.LaneInflight(0), th.Waiting(); got > n-w {
		t.Fatalf("waiting requests hold the lane: %d on it", got)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	// The flush returned: every request accepted before it has run.
	if got := len(s.order()); got != n {
		t.Fatalf("flush returned with %d of %d earlier writes done", got, n)
	}
	took := time.Since(start)
	// 20 at 50/s with a 5-request credit: about 300 ms.
	if took < 250*time.Millisecond || took > 2*time.Second {
		t.Errorf("20 requests at 50 IOPS took %v, want about 300ms", took)
	}
	wg.Wait()
	for i, off := range s.order() {
		if off != int64(i) {
			t.Fatalf("store saw the writes in the order %v", s.order())
		}
	}
	if got := e.ThrottleStats().Throttled.Load(); got < n-7 {
		t.Errorf("%d requests counted as throttled", got)
	}
	if th.Stats.WaitNanos.Load() == 0 {
		t.Error("no wait time counted")
	}
	if got := e.Stats.Inline.Load(); got != 0 {
		t.Errorf("%d throttled requests ran inline", got)
	}
}

// TestThrottleGroupShares: two engines sharing a throttle get the limit
// between them; an engine without one is not slowed.
func TestThrottleGroupShares(t *testing.T) {
	th := NewThrottle(Limits{IOPS: Rate{Avg: 100}})
	var engines [3]*Engine
	for i := range engines {
		engines[i] = NewEngine(nullStore{}, 2)
		defer engines[i].Close()
	}
	engines[0].SetThrottle(th)
	engines[1].SetThrottle(th)
	var counts [3]atomic.Int64
	stop := time.Now().Add(time.Second)
	var wg sync.WaitGroup
	for i, e := range engines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			done := make(chanDone, 4)
			for range 4 {
				e.Submit(&Request{Op: OpWrite, Bufs: [][]byte{{1}}, Done: done})
			}
			for r := range done {
				counts[i].Add(1)
				if time.Now().After(stop) {
					for range 3 {
						<-done
					}
					return
				}
				e.Submit(r)
			}
		}()
	}
	wg.Wait()
	shared := counts[0].Load() + counts[1].Load()
	if shared < 90 || shared > 125 {
		t.Errorf("two exports in a 100 IOPS group did %d + %d requests in 1 s", counts[0].Load(), counts[1].Load())
	}
	if counts[0].Load() < 30 || counts[1].Load() < 30 {
		t.Errorf("the group's share is unfair: %d and %d", counts[0].Load(), counts[1].Load())
	}
	if free := counts[2].Load(); free < 2000 {
		t.Errorf("the unlimited export did only %d requests in 1 s", free)
	}
}

// TestThrottleSetLimits: raising the limit live lets the waiting requests
// go at once; Close releases what waits without waiting for the limit.
func TestThrottleSetLimits(t *testing.T) {
	for _, how := range []string{"raise", "lift", "close"} {
		t.Run(how, func(t *testing.T) {
			e := NewEngine(nullStore{}, 2)
			th := NewThrottle(Limits{IOPS: Rate{Avg: 2}})
			e.SetThrottle(th)
			var wg sync.WaitGroup
			for range 50 {
				wg.Add(1)
				e.Submit(&Request{Op: OpRead, Bufs: [][]byte{{1}}, Done: doneCounter{&wg}})
			}
			start := time.Now()
			switch how {
			case "raise":
				th.SetLimits(Limits{IOPS: Rate{Avg: 10000}})
			case "lift":
				th.SetLimits(Limits{})
			case "close":
				e.Close()
			}
			wg.Wait()
			if d := time.Since(start); d > 500*time.Millisecond {
				t.Errorf("the waiting requests took %v after the %s", d, how)
			}
			if how == "raise" && th.Limits().IOPS.Avg != 10000 {
				t.Errorf("Limits() = %+v", th.Limits())
			}
			e.Close()
		})
	}
}

// TestBarrierOrdersWritesAndSyncsThrottled is the barrier's property with a
// throttle on: writes that wait for the limit are covered by the flushes
// after them, and the broken barrier is still caught.
func TestBarrierOrdersWritesAndSyncsThrottled(t *testing.T) {
	for _, broken := range []bool{false, true} {
		t.Run(fmt.Sprintf("syncBeforeDrain=%v", broken), func(t *testing.T) {
			caught := 0
			for seed := range uint64(3) {
				s := newRecordingStore(300 * time.Microsecond)
				e := NewEngine(s, 4)
				e.SetThrottle(NewThrottle(Limits{IOPSWrite: Rate{Avg: 2000}}))
				e.Barrier().SetUnsafeSyncBeforeDrain(broken)
				flushes := runBarrierWorkload(t, e, s, 4, 150, seed)
				e.Close()
				bad := checkBarrier(s, flushes)
				if !broken && len(bad) > 0 {
					t.Fatalf("%d violations, first: %s", len(bad), bad[0])
				}
				if len(bad) > 0 {
					caught++
				}
			}
			if broken && caught == 0 {
				t.Fatal("the broken barrier was not detected with a throttle on")
			}
		})
	}
}

// fakeClock is a clock the test moves by hand.
type fakeClock struct{ t atomic.Int64 }

func (c *fakeClock) now() time.Duration  { return time.Duration(c.t.Load()) }
func (c *fakeClock) set(d time.Duration) { c.t.Store(int64(d)) }

// TestThrottleLateDispatch: a dispatcher that wakes late on a busy host,
// while requests wait, loses none of their credit: the rate over seconds is
// the limit whatever the lateness (up to what the queue holds), at the
// average and during a burst. A client keeps 64 requests in flight, as a
// guest's queue does; the throttle's clock is fake and the test wakes the
// dispatcher, late by a fixed time, at every deadline the throttle sets.
func TestThrottleLateDispatch(t *testing.T) {
	for _, tc := range []struct {
		name   string
		limits Limits
		late   time.Duration
		dur    time.Duration
		want   float64 // requests completed in dur
	}{
		{"on time", Limits{IOPS: Rate{Avg: 400}}, 0, sec, 400 + 40},
		{"late 30ms", Limits{IOPS: Rate{Avg: 400}}, 30 * time.Millisecond, 2 * sec, 400*2 + 40},
		// Later than the 100 ms of credit a bucket may save.
		{"late 140ms", Limits{IOPS: Rate{Avg: 400}}, 140 * time.Millisecond, 5 * sec, 400*5 + 40},
		// Later than the 50 ms the burst's bucket at max may save.
		{"burst late 60ms", Limits{IOPS: Rate{Avg: 100, Max: 400, MaxLength: 2 * sec}}, 60 * time.Millisecond, 1500 * time.Millisecond, 400 * 1.5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fakeClock{}
			th := newThrottle(tc.limits, clk.now)
			e := NewEngine(nullStore{}, 2)
			defer e.Close()
			e.SetThrottle(th)
			const depth = 64
			done := make(chanDone, depth)
			for range depth {
				e.Submit(&Request{Op: OpWrite, Bufs: [][]byte{{1}}, Done: done})
			}
			completed := 0
			for {
				// Every request not waiting in the throttle completes; the
				// client sends each again at once.
				deadline := time.Now().Add(5 * time.Second)
				for len(done) < depth-th.Waiting() {
					if time.Now().After(deadline) {
						t.Fatalf("%d requests done, %d waiting, of %d", len(done), th.Waiting(), depth)
					}
					time.Sleep(100 * time.Microsecond)
				}
				if clk.now() >= tc.dur {
					break
				}
				for n := len(done); n > 0; n-- {
					completed++
					e.Submit(<-done)
				}
				th.mu.Lock()
				wake := th.deadline + tc.late
				th.mu.Unlock()
				if wake > tc.dur {
					break
				}
				clk.set(wake)
				th.dispatch()
			}
			if got := float64(completed); got < tc.want*0.97 || got > tc.want*1.03+1 {
				t.Errorf("%d requests in %v with the dispatcher %v late, want %.0f", completed, tc.dur, tc.late, tc.want)
			}
		})
	}
}
