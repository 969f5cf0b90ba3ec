package backend

import (
	"sync/atomic"
	"testing"
	"time"
)

// delayStore is a nullStore whose reads and writes take delay.
type delayStore struct {
	nullStore
	delay time.Duration
}

func (s delayStore) ReadAt(bufs [][]byte, off int64) error  { time.Sleep(s.delay); return nil }
func (s delayStore) WriteAt(bufs [][]byte, off int64) error { time.Sleep(s.delay); return nil }

// doneFlag records that Complete was called.
type doneFlag struct{ n atomic.Int32 }

func (d *doneFlag) Complete(r *Request) { d.n.Add(1) }

func TestSubmitIdle(t *testing.T) {
	for _, tc := range []struct {
		name       string
		store      Store
		limit      time.Duration // 0: the default
		op         Op
		wantInline bool
	}{
		{"fast store reads inline", nullStore{}, 0, OpRead, true},
		{"fast store writes inline", nullStore{}, 0, OpWrite, true},
		{"discards go to a lane", nullStore{}, 0, OpDiscard, false},
		{"write zeroes go to a lane", nullStore{}, 0, OpWriteZeroes, false},
		{"slow store goes to the lanes", delayStore{delay: 200 * time.Microsecond}, 0, OpRead, false},
		{"inline switched off", nullStore{}, -1, OpRead, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEngine(tc.store, 2)
			defer e.Close()
			if tc.limit < 0 {
				e.SetInlineLimit(0)
			}
			// Warm up: the gate starts closed, and the lanes' times open it
			// for a fast store.
			done := make(chanDone, 1)
			warm := 0
			for ; warm < 40 || (tc.wantInline && !e.inline.open() && warm < 10000); warm++ {
				e.Submit(&Request{Op: OpRead, Bufs: [][]byte{make([]byte, 512)}, Done: done})
				<-done
			}
			inline := 0
			for range 100 {
				var d doneFlag
				r := &Request{Op: tc.op, Bufs: [][]byte{make([]byte, 512)}, Length: 512, Done: &d}
				if e.SubmitIdle(r) {
					inline++
					if d.n.Load() != 1 {
						t.Fatal("SubmitIdle ran a request inline but did not complete it before returning")
					}
				}
				for d.n.Load() == 0 {
					time.Sleep(10 * time.Microsecond)
				}
				if r.Err != nil {
					t.Fatal(r.Err)
				}
			}
			switch {
			// A stray slow sample (a preempted goroutine) closes the gate for
			// a dozen requests or so.
			case tc.wantInline && inline < 50:
				t.Errorf("%d of 100 requests ran inline, want most", inline)
			case !tc.wantInline && inline > 0:
				t.Errorf("%d of 100 requests ran inline, want none", inline)
			}
			if n := e.Stats.Reads.Load() + e.Stats.Writes.Load() + e.Stats.Discards.Load() + e.Stats.WriteZeroes.Load(); n != uint64(warm+100) {
				t.Errorf("stats count %d requests, want %d", n, warm+100)
			}
		})
	}
}

// orderStore is a gatedStore that records when its last sync ended and when
// its last read and write ran.
type orderStore struct {
	*gatedStore
	syncEnd, readAt, writeAt atomic.Int64 // monotime
}

func (s *orderStore) Sync() error {
	err := s.gatedStore.Sync()
	s.syncEnd.Store(int64(monotime()))
	return err
}

func (s *orderStore) ReadAt(bufs [][]byte, off int64) error {
	s.readAt.Store(int64(monotime()))
	return s.gatedStore.ReadAt(bufs, off)
}

func (s *orderStore) WriteAt(bufs [][]byte, off int64) error {
	err := s.gatedStore.WriteAt(bufs, off)
	s.writeAt.Store(int64(monotime()))
	return err
}

// TestSubmitIdleWaitsForFlush: a write run inline is admitted through the
// barrier like any other: it waits while a flush drains and syncs. A read
// does not: a flush neither drains nor holds reads.
func TestSubmitIdleWaitsForFlush(t *testing.T) {
	for _, tc := range []struct {
		op       Op
		wantHeld bool
	}{{OpWrite, true}, {OpRead, false}} {
		t.Run(tc.op.String(), func(t *testing.T) {
			s := &orderStore{gatedStore: &gatedStore{gate: make(chan struct{}), syncDelay: 20 * time.Millisecond}}
			e := NewEngine(s, 2)
			defer e.Close()
			e.inline.avg.Store(0) // the gate is open
			held := make(chanDone, 1)
			e.Submit(&Request{Op: OpWrite, Bufs: [][]byte{make([]byte, 512)}, Done: held}) // held in the store
			flushed := make(chan error, 1)
			go func() { flushed <- e.Flush() }()
			// Wait until the flush has closed the barrier (it is waiting for the write).
			for e.Barrier().epochOpen() {
				time.Sleep(time.Millisecond)
			}
			var d doneFlag
			ran := make(chan bool, 1)
			go func() { ran <- e.SubmitIdle(&Request{Op: tc.op, Bufs: [][]byte{make([]byte, 512)}, Done: &d}) }()
			if tc.wantHeld {
				time.Sleep(10 * time.Millisecond)
				if d.n.Load() != 0 {
					t.Fatal("an inline write ran while a flush was draining")
				}
			} else if !<-ran || d.n.Load() != 1 {
				t.Fatal("an inline read did not run at once while a flush was draining")
			}
			close(s.gate)
			<-held
			if err := <-flushed; err != nil {
				t.Fatal(err)
			}
			if tc.wantHeld && !<-ran {
				t.Fatal("the write did not run inline")
			}
			at := s.writeAt.Load()
			if tc.op == OpRead {
				at = s.readAt.Load()
			}
			if synced := s.syncEnd.Load(); tc.wantHeld && at < synced {
				t.Errorf("the inline write ran %v before the flush's sync ended", time.Duration(synced-at))
			} else if !tc.wantHeld && at > synced {
				t.Errorf("the inline read ran %v after the flush's sync ended", time.Duration(at-synced))
			}
		})
	}
}

func BenchmarkSubmitIdle(b *testing.B) {
	e := NewEngine(nullStore{}, 2)
	defer e.Close()
	e.inline.avg.Store(0)
	var d doneFlag
	r := &Request{Op: OpRead, Bufs: [][]byte{make([]byte, 4096)}, Done: &d}
	b.ReportAllocs()
	for b.Loop() {
		e.SubmitIdle(r)
	}
}

// TestInlineGateOutliers feeds the inline gate sequences of store times: a fast store with one
// request that took milliseconds (its thread preempted on a busy host) must open the gate again
// within a few samples, while a store that is slow all the time, or for one request in four,
// must keep it closed.
func TestInlineGateOutliers(t *testing.T) {
	const limit = 30 * time.Microsecond
	fast, slow := 10*time.Microsecond, 5*time.Millisecond
	for _, tt := range []struct {
		name   string
		sample func(i int) time.Duration
		n      int
		open   bool
	}{
		// 100 fast samples open the gate, one preempted one closes it, 4 fast ones reopen it
		// (unbounded, that one sample kept it closed for 26).
		{"one preempted request", func(i int) time.Duration {
			if i == 100 {
				return slow
			}
			return fast
		}, 105, true},
		{"slow store", func(int) time.Duration { return 100 * time.Microsecond }, 200, false},
		{"one in four slow", func(i int) time.Duration {
			if i%4 == 0 {
				return slow
			}
			return fast
		}, 200, false},
		{"fast store", func(int) time.Duration { return fast }, 200, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var g inlineGate
			g.init(limit)
			for i := range tt.n {
				g.observe(tt.sample(i))
			}
			if got := g.open(); got != tt.open {
				t.Errorf("after %d samples: open %v (average %v), want %v", tt.n, got, time.Duration(g.avg.Load()), tt.open)
			}
		})
	}
}
