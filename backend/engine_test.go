package backend

import (
	"errors"
	"sync"
	"testing"
	"time"
)

// nullStore does nothing, so that a benchmark measures the engine alone.
type nullStore struct{}

func (nullStore) ReadAt(bufs [][]byte, off int64) error  { return nil }
func (nullStore) WriteAt(bufs [][]byte, off int64) error { return nil }
func (nullStore) Sync() error                            { return nil }
func (nullStore) Size() int64                            { return 1 << 40 }
func (nullStore) Close() error                           { return nil }

// gatedStore holds every write until gate is closed and sleeps syncDelay in
// every Sync.
type gatedStore struct {
	nullStore
	gate      chan struct{}
	syncDelay time.Duration
	readErr   error
}

func (s *gatedStore) WriteAt(bufs [][]byte, off int64) error { <-s.gate; return nil }
func (s *gatedStore) ReadAt(bufs [][]byte, off int64) error  { return s.readErr }
func (s *gatedStore) Sync() error                            { time.Sleep(s.syncDelay); return nil }

// chanDone completes a request by sending it back.
type chanDone chan *Request

func (c chanDone) Complete(r *Request) { c <- r }

type observedRequest struct {
	op  Op
	d   time.Duration
	err error
}

type observedFlush struct {
	wait, sync time.Duration
	err        error
}

// recordingObserver keeps what it is told.
type recordingObserver struct {
	mu       sync.Mutex
	requests []observedRequest
	flushes  []observedFlush
}

func (o *recordingObserver) ObserveRequest(op Op, d time.Duration, err error) {
	o.mu.Lock()
	o.requests = append(o.requests, observedRequest{op, d, err})
	o.mu.Unlock()
}

func (o *recordingObserver) ObserveFlush(wait, sync time.Duration, err error) {
	o.mu.Lock()
	o.flushes = append(o.flushes, observedFlush{wait, sync, err})
	o.mu.Unlock()
}

func TestEngineObserver(t *testing.T) {
	const hold, syncDelay = 30 * time.Millisecond, 20 * time.Millisecond
	readErr := errors.New("read failed")
	s := &gatedStore{gate: make(chan struct{}), syncDelay: syncDelay, readErr: readErr}
	e := NewEngine(s, 2)
	defer e.Close()
	done := make(chanDone, 4)

	// Without an observer nothing is timed.
	r := &Request{Op: OpRead, Done: done}
	e.Submit(r)
	<-done
	if r.start != 0 {
		t.Fatalf("request timed without an observer: start %v", r.start)
	}

	o := &recordingObserver{}
	e.SetObserver(o)
	e.Submit(&Request{Op: OpRead, Done: done})
	<-done
	e.Submit(&Request{Op: OpWrite, Bufs: [][]byte{make([]byte, 512)}, Done: done})
	flushed := make(chan error)
	go func() { flushed <- e.Flush() }()
	for e.barrier.epochOpen() {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(hold) // the flush waits for the held write
	close(s.gate)
	<-done
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}

	o.mu.Lock()
	if len(o.requests) != 2 || len(o.flushes) != 1 {
		t.Fatalf("observed %d requests and %d flushes, want 2 and 1", len(o.requests), len(o.flushes))
	}
	rd, wr, fl := o.requests[0], o.requests[1], o.flushes[0]
	o.mu.Unlock()
	if rd.op != OpRead || !errors.Is(rd.err, readErr) || rd.d <= 0 {
		t.Errorf("read observed as %+v, want op read, err %v, a duration", rd, readErr)
	}
	if wr.op != OpWrite || wr.err != nil || wr.d < hold {
		t.Errorf("write observed as %+v, want op write, no error, at least %v", wr, hold)
	}
	if fl.wait < hold || fl.sync < syncDelay || fl.err != nil {
		t.Errorf("flush observed as %+v, want a wait of at least %v (the held write) and a sync of at least %v", fl, hold, syncDelay)
	}

	// Removing the observer stops the calls.
	e.SetObserver(nil)
	e.Submit(&Request{Op: OpRead, Done: done})
	<-done
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.requests) != 2 || len(o.flushes) != 1 {
		t.Errorf("observed %d requests and %d flushes after SetObserver(nil), want 2 and 1", len(o.requests), len(o.flushes))
	}
}

func TestEngineJoinedFlushIsObserved(t *testing.T) {
	const hold, syncDelay = 10 * time.Millisecond, 10 * time.Millisecond
	s := &gatedStore{gate: make(chan struct{}), syncDelay: syncDelay}
	e := NewEngine(s, 1)
	defer e.Close()
	o := &recordingObserver{}
	e.SetObserver(o)
	done := make(chanDone, 1)
	e.Submit(&Request{Op: OpWrite, Done: done})
	flushed := make(chan error, 2)
	go func() { flushed <- e.Flush() }()
	for e.barrier.epochOpen() {
		time.Sleep(time.Millisecond)
	}
	go func() { flushed <- e.Flush() }() // joins the first
	time.Sleep(hold)
	close(s.gate)
	<-done
	for range 2 {
		if err := <-flushed; err != nil {
			t.Fatal(err)
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.flushes) != 2 {
		t.Fatalf("observed %d flushes, want 2", len(o.flushes))
	}
	// The joiner's sync is the rest of the first flush, which includes the
	// whole sync: it joined before the drain ended (unless it ran so late
	// that it made a flush of its own, which syncs too).
	for _, f := range o.flushes {
		if f.sync < syncDelay {
			t.Errorf("flush observed as %+v, want a sync of at least %v", f, syncDelay)
		}
	}
	if w := max(o.flushes[0].wait, o.flushes[1].wait); w < hold {
		t.Errorf("flushes observed as %+v, want the first to wait at least %v for the held write", o.flushes, hold)
	}
	if got := e.Stats.Flushes.Load(); got != 2 {
		t.Errorf("Stats.Flushes = %d, want 2", got)
	}
}

func TestEngineLaneInflight(t *testing.T) {
	const lanes, n = 3, 10
	s := &gatedStore{gate: make(chan struct{})}
	e := NewEngine(s, lanes)
	defer e.Close()
	done := make(chanDone, n)
	reqs := make([]Request, n)
	for i := range reqs {
		reqs[i] = Request{Op: OpWrite, Done: done}
		e.Submit(&reqs[i])
	}
	sum := func() (total int, per []int) {
		for i := range e.Lanes() {
			per = append(per, e.LaneInflight(i))
			total += per[i]
		}
		return total, per
	}
	// Round robin: every lane has some, and all n are counted while held
	// (once each worker has taken its first request from its queue).
	total, per := sum()
	for deadline := time.Now().Add(time.Minute); total != n && time.Now().Before(deadline); total, per = sum() {
		time.Sleep(time.Millisecond)
	}
	if total != n {
		t.Errorf("lanes hold %v requests, want %d in all", per, n)
	}
	for i, c := range per {
		if c < n/lanes || c > n/lanes+1 {
			t.Errorf("lane %d holds %d requests, want %d or %d", i, c, n/lanes, n/lanes+1)
		}
	}
	close(s.gate)
	for range n {
		<-done
	}
	// Counted down before completion: nothing is left.
	if total, per := sum(); total != 0 {
		t.Errorf("lanes hold %v requests after every completion, want none", per)
	}
}

// benchmarkEngine keeps window requests in flight from each of the
// benchmark's goroutines: the cost of Submit, the lane hand-off and the
// completion, with a store that does nothing.
func benchmarkEngine(b *testing.B, o Observer) {
	const window = 32
	e := NewEngine(nullStore{}, 4)
	defer e.Close()
	if o != nil {
		e.SetObserver(o)
	}
	buf := [][]byte{make([]byte, 4096)}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		done := make(chanDone, window)
		reqs := make([]Request, window)
		for i := range reqs {
			reqs[i] = Request{Op: OpWrite, Offset: int64(i) * 4096, Bufs: buf, Done: done}
			e.Submit(&reqs[i])
		}
		for pb.Next() {
			r := <-done
			e.Submit(r)
		}
		for range window {
			<-done
		}
	})
}

// nopObserver is the cheapest observer: what remains is the engine's cost
// of timing requests.
type nopObserver struct{}

func (nopObserver) ObserveRequest(Op, time.Duration, error)          {}
func (nopObserver) ObserveFlush(wait, sync time.Duration, err error) {}

func BenchmarkEngineSubmit(b *testing.B) { benchmarkEngine(b, nil) }

func BenchmarkEngineSubmitObserved(b *testing.B) { benchmarkEngine(b, nopObserver{}) }

func BenchmarkMonotime(b *testing.B) {
	var d time.Duration
	for b.Loop() {
		d += monotime()
	}
	_ = d
}
