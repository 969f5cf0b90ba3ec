package backend

import (
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Op is what a Request asks of the store.
type Op uint8

// The operations a lane executes. FLUSH is not one of them: it is the
// Engine's Flush, which goes through the Barrier.
const (
	OpRead Op = iota
	OpWrite
	OpDiscard
	OpWriteZeroes
)

func (o Op) String() string {
	switch o {
	case OpRead:
		return "read"
	case OpWrite:
		return "write"
	case OpDiscard:
		return "discard"
	case OpWriteZeroes:
		return "write-zeroes"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Completer receives a request back once a lane has executed it.
type Completer interface {
	Complete(r *Request)
}

// Request is one store operation. The caller owns it and must not touch it
// between Submit and Complete.
type Request struct {
	Op     Op
	Offset int64
	Bufs   [][]byte // OpRead, OpWrite
	Length int64    // OpDiscard, OpWriteZeroes
	Unmap  bool     // OpWriteZeroes: the range may be deallocated
	Done   Completer

	// Err is set by the lane before Done.Complete is called.
	Err error

	// start is when Submit was called (monotime), or 0 when no Observer
	// was set then.
	start time.Duration
}

// Observer is told how long each request and each guest flush took, for
// metrics. Its methods are called from the lanes and from flushing
// goroutines concurrently, on the request path: they must be cheap and must
// not block or call back into the Engine.
type Observer interface {
	// ObserveRequest is called once a lane has executed a request, before
	// the request is completed. d runs from Submit (so it includes waiting
	// at the barrier during a flush and in the lane's queue) to the end of
	// the store operation; err is the request's Err.
	ObserveRequest(op Op, d time.Duration, err error)
	// ObserveFlush is called when Flush returns. wait runs from the start of
	// Flush until every request admitted before it had finished (the
	// drain); sync from then until the flush was done (the store's sync, or
	// for a flush that joined a running one, the rest of that flush).
	ObserveFlush(wait, sync time.Duration, err error)
}

// observerRef boxes an Observer for atomic.Pointer.
type observerRef struct{ o Observer }

// Engine runs requests from every queue of one export on N parallel lanes
// and orders flushes with a Barrier.
type Engine struct {
	store        Store
	barrier      *Barrier
	lanes        []lane
	next         atomic.Uint32
	observer     atomic.Pointer[observerRef]
	writeThrough atomic.Bool
	uring        *uringEngine // IOEngineURing with a RawIO store, else nil
	async        AsyncIO      // the store, when it issues its own reads and writes
	asyncDone    func(r *Request, err error)
	inline       inlineGate // whether SubmitIdle runs requests inline
	wg           sync.WaitGroup
	closeOnce    sync.Once
	Stats        Stats

	throttle      atomic.Pointer[Throttle] // nil: no limits (throttle.go)
	throttleStats ThrottleStats
}

// lane is one worker's queue, and whether the worker is executing a request
// (for LaneInflight). busy is written by the worker alone, so counting costs
// the submitters nothing; the padding gives each lane's flag a cache line of
// its own.
type lane struct {
	ch   chan *Request
	busy atomic.Bool
	_    [64 - 9]byte
}

// laneDepth is how many requests may wait on one lane before Submit blocks.
const laneDepth = 256

// IOEngine names how an Engine issues reads and writes to its store.
type IOEngine string

const (
	// IOEngineLanes runs every request on a lane: a goroutine that calls
	// the store's preadv/pwritev and blocks in it.
	IOEngineLanes IOEngine = "lanes"
	// IOEngineURing issues the reads and writes of stores that implement
	// RawIO through io_uring; everything else still runs on the lanes.
	IOEngineURing IOEngine = "uring"
)

// EngineOptions configure NewEngineWith.
type EngineOptions struct {
	// Lanes is the number of lane workers (at least one).
	Lanes int
	// IOEngine is IOEngineLanes (the default when empty) or IOEngineURing.
	IOEngine IOEngine
}

// NewEngineWith starts an engine over store as opt says. It fails when the
// chosen I/O engine cannot run (io_uring missing or refused by the kernel:
// the error wraps the kernel's, e.g. ENOSYS, or EPERM from the sysctl
// kernel.io_uring_disabled). With IOEngineURing and a store that does not
// implement RawIO, every request runs on the lanes and no ring is set up.
func NewEngineWith(store Store, opt EngineOptions) (*Engine, error) {
	switch opt.IOEngine {
	case "", IOEngineLanes:
		return NewEngine(store, opt.Lanes), nil
	case IOEngineURing:
		raw, ok := store.(RawIO)
		if !ok {
			return NewEngine(store, opt.Lanes), nil
		}
		ring, efd, err := openURing()
		if err != nil {
			return nil, fmt.Errorf("io engine %q: %w", opt.IOEngine, err)
		}
		e := NewEngine(store, opt.Lanes)
		e.uring = newURingEngine(e, raw, ring, efd)
		return e, nil
	}
	return nil, fmt.Errorf("unknown io engine %q (want %q or %q)", opt.IOEngine, IOEngineLanes, IOEngineURing)
}

// NewEngine starts lanes workers (at least one) over store.
func NewEngine(store Store, lanes int) *Engine {
	lanes = max(lanes, 1)
	e := &Engine{store: store, lanes: make([]lane, lanes)}
	e.inline.init(DefaultInlineLimit)
	e.barrier = NewBarrier(e.syncStore)
	if a, ok := store.(AsyncIO); ok {
		e.async, e.asyncDone = a, e.finishAsync
	}
	for i := range e.lanes {
		l := &e.lanes[i]
		l.ch = make(chan *Request, laneDepth)
		e.wg.Add(1)
		go e.run(l)
	}
	return e
}

// monoEpoch is the origin of monotime.
var monoEpoch = time.Now()

// monotime is a reading of the monotonic clock, never 0. It costs one clock
// read, without the wall clock that time.Now also reads.
func monotime() time.Duration { return time.Since(monoEpoch) + 1 }

// Store returns the engine's store.
func (e *Engine) Store() Store { return e.store }

// Barrier returns the engine's flush barrier.
func (e *Engine) Barrier() *Barrier { return e.barrier }

// Lanes is the number of lanes.
func (e *Engine) Lanes() int { return len(e.lanes) }

// LaneInflight is how many requests have been handed to lane i and have not
// finished: waiting in its queue or executing. i is in [0, Lanes()). It is a
// snapshot for metrics: a request moving from the queue to the worker may
// be missed for that moment.
func (e *Engine) LaneInflight(i int) int {
	l := &e.lanes[i]
	n := len(l.ch)
	if l.busy.Load() {
		n++
	}
	return n
}

// SetObserver makes o (nil: none) the observer of requests and flushes that
// start from now on. It may be called at any time; without an observer a
// request costs no clock reads.
func (e *Engine) SetObserver(o Observer) {
	if o == nil {
		e.observer.Store(nil)
		return
	}
	e.observer.Store(&observerRef{o})
}

// loadObserver returns the observer, or nil.
func (e *Engine) loadObserver() Observer {
	if ref := e.observer.Load(); ref != nil {
		return ref.o
	}
	return nil
}

// SetWriteThrough switches write-through mode: every write is durable before
// it completes (the guest cleared the virtio-blk writeback flag).
func (e *Engine) SetWriteThrough(on bool) { e.writeThrough.Store(on) }

// WriteThrough reports whether write-through mode is on.
func (e *Engine) WriteThrough() bool { return e.writeThrough.Load() }

// Submit admits r through the barrier (a write, discard or write-zeroes
// waits while a flush runs; a read does not) and hands
// it to a lane, or with IOEngineURing issues a read or write on the ring.
// r.Done.Complete is called from the lane when it is finished; a request on
// the ring is completed by whichever goroutine reaps it, which may be this
// one, before Submit returns. Submit must not be called after Close.
func (e *Engine) Submit(r *Request) {
	r.start = 0
	if e.observer.Load() != nil {
		r.start = monotime()
	}
	e.barrier.Enter(r.Op)
	if t := e.throttle.Load(); t != nil {
		t.submit(e, r) // waits there, admitted, if over the limit
		return
	}
	e.dispatch(r)
}

// dispatch hands an admitted request to the ring or a lane.
func (e *Engine) dispatch(r *Request) {
	// Write-through writes stay on the lanes, which make them durable.
	if u := e.uring; u != nil && (r.Op == OpRead || r.Op == OpWrite && !e.writeThrough.Load()) && u.submit(r) {
		return
	}
	if e.async != nil && (r.Op == OpRead || r.Op == OpWrite && !e.writeThrough.Load()) && e.startAsync(r) {
		return
	}
	e.lanes[e.next.Add(1)%uint32(len(e.lanes))].ch <- r
}

// startAsync hands r to an AsyncIO store, counting it first: r is not ours once started.
func (e *Engine) startAsync(r *Request) bool {
	ctr := &e.Stats.Reads
	if r.Op == OpWrite {
		ctr = &e.Stats.Writes
	}
	ctr.Add(1)
	if e.async.StartIO(r, e.asyncDone) {
		return true
	}
	ctr.Add(^uint64(0))
	return false
}

// finishAsync completes a request an AsyncIO store has finished, as a lane would.
func (e *Engine) finishAsync(r *Request, err error) {
	r.Err = err
	if err == nil {
		n := uint64(totalLen(r.Bufs))
		if r.Op == OpWrite {
			e.Stats.BytesWritten.Add(n)
		} else {
			e.Stats.BytesRead.Add(n)
		}
	}
	e.finish(r)
}

// URingInflight is how many requests are on the io_uring now (0 without
// one), a snapshot for metrics like LaneInflight.
func (e *Engine) URingInflight() int {
	if e.uring == nil {
		return 0
	}
	return e.uring.inflight()
}

// Flush is the drain-then-sync barrier (see Barrier), for a guest FLUSH.
func (e *Engine) Flush() error {
	e.Stats.Flushes.Add(1)
	wait, syncTime, err := e.barrier.flush()
	if err != nil {
		e.Stats.FlushErrors.Add(1)
	}
	if o := e.loadObserver(); o != nil {
		o.ObserveFlush(wait, syncTime, err)
	}
	return err
}

// Sync is the same drain-then-sync barrier as Flush, for the device's own
// needs (a migration's handover) rather than a guest FLUSH: it is not
// counted as one.
func (e *Engine) Sync() error { return e.barrier.Flush() }

func (e *Engine) syncStore() error {
	if err := e.store.Sync(); err != nil {
		return fmt.Errorf("sync store: %w", err)
	}
	return nil
}

// Close drains and syncs (a final flush), then stops the lanes and closes
// the io_uring. Every submitter must have stopped before Close is called. It
// returns the final flush's error (joined with a failure to release the ring).
func (e *Engine) Close() error {
	var err error
	e.closeOnce.Do(func() {
		if t := e.throttle.Load(); t != nil {
			t.release(e) // the final drain does not wait for the limits
		}
		err = e.barrier.Flush() // not a guest flush: not counted
		e.barrier.WaitReads()   // a flush does not wait for reads; the ring must
		for i := range e.lanes {
			close(e.lanes[i].ch)
		}
		e.wg.Wait()
		if e.uring != nil {
			err = errors.Join(err, e.uring.close())
		}
	})
	return err
}

// run is the worker of lane l.
func (e *Engine) run(l *lane) {
	defer e.wg.Done()
	// A fault on a request's buffers becomes that request's error
	// (executeSafe), not the end of the process.
	debug.SetPanicOnFault(true)
	// Every inlineSampleEvery-th read or write is timed for the inline gate:
	// enough to follow the store's speed, without every lane writing the
	// shared average on every request. While the gate is closed every one
	// is: a fast store whose gate one slow request closed (a thread
	// preempted on a busy host) gets its requests back inline after a few
	// requests instead of a few dozen, and a slow store's requests take
	// long enough that one more shared write each costs nothing.
	n := 0
	for r := range l.ch {
		l.busy.Store(true)
		if n++; (n%inlineSampleEvery == 0 || !e.inline.open()) && (r.Op == OpRead || r.Op == OpWrite) {
			t0 := monotime()
			r.Err = e.executeSafe(r)
			e.inline.observe(monotime() - t0)
		} else {
			r.Err = e.executeSafe(r)
		}
		e.account(r)
		l.busy.Store(false)
		e.complete(r)
	}
}

// finish ends a request whose store operation has finished (r.Err is set)
// off the lanes: as a lane does, it counts and observes r, lets it out of the
// barrier and completes it.
func (e *Engine) finish(r *Request) {
	e.account(r)
	e.complete(r)
}

// account counts r's error and tells the observer about r.
func (e *Engine) account(r *Request) {
	if r.Err != nil {
		e.Stats.Errors.Add(1)
	}
	if r.start != 0 {
		// Observed before Complete: r is the caller's again after it.
		if o := e.loadObserver(); o != nil {
			o.ObserveRequest(r.Op, monotime()-r.start, r.Err)
		}
	}
}

// complete lets r out of the barrier, then hands it back to its owner: the
// barrier must count it until its data transfer has finished (a write's
// exit is what the write generation counts).
func (e *Engine) complete(r *Request) {
	done, op := r.Done, r.Op
	e.barrier.Exit(op)
	done.Complete(r)
}

// executeSafe is execute on a goroutine that runs with
// debug.SetPanicOnFault: a fault on guest memory while the store copies a
// request's buffers (past the end of a memfd the front-end truncated) is
// returned as ErrMemoryFault. Other panics go on.
func (e *Engine) executeSafe(r *Request) (err error) {
	defer func() {
		if p := recover(); p != nil {
			if _, fault := p.(interface{ Addr() uintptr }); fault {
				err = fmt.Errorf("%v at offset %d: %w: %v", r.Op, r.Offset, ErrMemoryFault, p)
				return
			}
			panic(p)
		}
	}()
	return e.execute(r)
}

func (e *Engine) execute(r *Request) error {
	switch r.Op {
	case OpRead:
		e.Stats.Reads.Add(1)
		err := e.store.ReadAt(r.Bufs, r.Offset)
		if err == nil {
			e.Stats.BytesRead.Add(uint64(totalLen(r.Bufs)))
		}
		return err
	case OpWrite:
		e.Stats.Writes.Add(1)
		var err error
		if e.writeThrough.Load() {
			err = e.writeDurably(r)
		} else {
			err = e.store.WriteAt(r.Bufs, r.Offset)
		}
		if err == nil {
			e.Stats.BytesWritten.Add(uint64(totalLen(r.Bufs)))
		}
		return err
	case OpDiscard:
		e.Stats.Discards.Add(1)
		return e.maybeDurably(func() error {
			if d, ok := e.store.(Discarder); ok {
				return d.Discard(r.Offset, r.Length)
			}
			return nil // discard is a hint: doing nothing is correct
		})
	case OpWriteZeroes:
		e.Stats.WriteZeroes.Add(1)
		return e.maybeDurably(func() error {
			if z, ok := e.store.(ZeroWriter); ok {
				return z.WriteZeroes(r.Offset, r.Length, r.Unmap)
			}
			return writeZeroes(e.store, r.Offset, r.Length)
		})
	}
	return fmt.Errorf("%w: %v", ErrNotSupported, r.Op)
}

// maybeDurably runs op, followed by a sync in write-through mode.
func (e *Engine) maybeDurably(op func() error) error {
	if err := op(); err != nil || !e.writeThrough.Load() {
		return err
	}
	return e.syncLatched()
}

// writeDurably is a write-through write: the data, then its sync. Only a
// failed sync is latched in the barrier, as a failed fsync must be (the
// kernel may have dropped dirty pages of earlier writes too); a write that
// failed before its data reached the file (no space, a fault on the guest's
// buffer, a bad range) fails alone, and later flushes are not affected.
func (e *Engine) writeDurably(r *Request) error {
	dw, ok := e.store.(DurableWriter)
	if !ok {
		if err := e.store.WriteAt(r.Bufs, r.Offset); err != nil {
			return err
		}
		return e.syncLatched()
	}
	// One call writes and syncs (pwritev2 with RWF_DSYNC): its error may
	// come from either part. The errors that only the write part returns
	// are not latched; any other is taken as a failed sync.
	err := dw.WriteAtDurable(r.Bufs, r.Offset)
	var syncErr *SyncError
	if err != nil && (errors.As(err, &syncErr) || !writeOnlyError(err)) {
		e.barrier.Latch(err)
	}
	return err
}

// syncLatched syncs the store; a failure is latched in the barrier.
func (e *Engine) syncLatched() error {
	err := e.store.Sync()
	if err != nil {
		e.barrier.Latch(err)
	}
	return err
}

// writeOnlyError reports whether err, from a write that also syncs, is one
// the write returns before any data reaches the file, so not a failed
// sync: a rejected request, a fault on its buffers, no space or quota left
// for new blocks (a DurableWriter returns a sync that failed for space as a
// *SyncError, see FileStore.WriteAtDurable).
func writeOnlyError(err error) bool {
	for _, e := range []error{ErrOutOfRange, ErrReadOnly, ErrMemoryFault, ErrMisaligned, ErrNotSupported, ErrShortIO,
		unix.EFAULT, unix.EINVAL, unix.ENOSPC, unix.EDQUOT, unix.EFBIG, unix.EBADF} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

func writeZeroes(s Store, off, n int64) error {
	for n > 0 {
		c := min(n, int64(len(zeroChunk)))
		if err := s.WriteAt([][]byte{zeroChunk[:c]}, off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}
