package backend

import (
	"fmt"
	"sync"
	"time"
)

// Barrier makes FLUSH a drain-then-sync barrier across every lane and every
// queue of an export.
//
// Contract:
//   - Every request other than a flush calls Enter when it is accepted (before
//     it is handed to a lane) and Exit once its store operation has finished.
//   - Flush closes the gate, waits until every request that entered before it
//     has exited (the drain), then calls sync, then reopens the gate and
//     returns sync's error. So when Flush returns nil, every request accepted
//     before the flush is on stable storage. This is stronger than the virtio
//     minimum (which covers only already-completed writes): a write accepted
//     before the flush but still running on another lane is covered too.
//   - Enter blocks while the gate is closed: no request accepted after a flush
//     starts before that flush has completed.
//   - A flush called while the gate is already closed joins the running one
//     (group commit). That is sound because nothing was admitted in between,
//     so the same drain and sync cover both.
//   - The first failed sync is latched: it and every later Flush return an
//     error wrapping ErrSyncFailed, because after lost writeback no later
//     fsync can prove the earlier writes durable.
type Barrier struct {
	sync func() error

	mu       sync.Mutex
	inflight int         // requests entered and not yet exited
	epoch    *flushEpoch // non-nil while the gate is closed
	failed   error       // first sync failure, latched

	// syncBeforeDrain reproduces the bug this type exists to prevent: it
	// syncs first and drains after. Test hook only (see SetUnsafeSyncBeforeDrain).
	syncBeforeDrain bool
}

type flushEpoch struct {
	drained chan struct{} // closed when inflight reached zero
	done    chan struct{} // closed when the flush has finished
	err     error
}

// NewBarrier returns a barrier that calls sync to make drained writes durable.
func NewBarrier(sync func() error) *Barrier {
	return &Barrier{sync: sync}
}

// Enter admits one request, waiting while a flush is in progress.
func (b *Barrier) Enter() {
	b.mu.Lock()
	for b.epoch != nil {
		done := b.epoch.done
		b.mu.Unlock()
		<-done
		b.mu.Lock()
	}
	b.inflight++
	b.mu.Unlock()
}

// Exit marks one admitted request as finished.
func (b *Barrier) Exit() {
	b.mu.Lock()
	b.inflight--
	if b.inflight < 0 {
		b.mu.Unlock()
		panic("backend: Barrier.Exit without Enter")
	}
	if b.inflight == 0 && b.epoch != nil {
		close(b.epoch.drained)
	}
	b.mu.Unlock()
}

// Flush drains every admitted request, syncs, and returns the sync's result
// (or the latched failure of an earlier sync).
func (b *Barrier) Flush() error {
	_, _, err := b.flush()
	return err
}

// flush is Flush, also returning how long the drain took (from the call
// until every request admitted before it had exited) and the time from then
// until the flush was done. A flush that joins a running one reports that
// flush's drain and sync as far as it waited for them.
func (b *Barrier) flush() (wait, syncTime time.Duration, err error) {
	start := monotime()
	b.mu.Lock()
	if ep := b.epoch; ep != nil {
		b.mu.Unlock()
		<-ep.drained
		drained := monotime()
		<-ep.done
		return drained - start, monotime() - drained, ep.err
	}
	ep := &flushEpoch{drained: make(chan struct{}), done: make(chan struct{})}
	b.epoch = ep
	if b.inflight == 0 {
		close(ep.drained)
	}
	broken := b.syncBeforeDrain
	b.mu.Unlock()

	var drained time.Duration
	if broken {
		err = b.sync()
		<-ep.drained
		drained = monotime()
	} else {
		<-ep.drained
		drained = monotime()
		err = b.sync()
	}

	b.mu.Lock()
	if err != nil && b.failed == nil {
		b.failed = err
	}
	if b.failed != nil {
		err = fmt.Errorf("%w: %w", ErrSyncFailed, b.failed)
	}
	ep.err = err
	b.epoch = nil
	close(ep.done)
	b.mu.Unlock()
	return drained - start, monotime() - drained, err
}

// Latch records a durability failure found outside Flush (a write-through
// write whose data sync failed), so that every later Flush reports it.
func (b *Barrier) Latch(err error) {
	b.mu.Lock()
	if b.failed == nil {
		b.failed = err
	}
	b.mu.Unlock()
}

// Failed returns the latched sync failure, or nil.
func (b *Barrier) Failed() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failed
}

// SetUnsafeSyncBeforeDrain makes Flush sync before draining: the classic
// loop-driver bug. It exists only so crash tests can prove they detect it.
// Never use it outside tests.
func (b *Barrier) SetUnsafeSyncBeforeDrain(on bool) {
	b.mu.Lock()
	b.syncBeforeDrain = on
	b.mu.Unlock()
}
