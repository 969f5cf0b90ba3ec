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
//   - Every request other than a flush calls Enter(op) when it is accepted
//     (before it is handed to a lane) and Exit(op) once its store operation
//     has finished. Writes, discards and write-zeroes are the requests that
//     change the store ("mutating"); reads are not.
//   - Flush closes the gate, waits until every mutating request that entered
//     before it has exited (the drain), then calls sync, then reopens the gate
//     and returns sync's error. So when Flush returns nil, every mutating
//     request accepted before the flush is on stable storage. This is
//     stronger than the virtio minimum (which covers only already-completed
//     writes): a write accepted before the flush but still running on another
//     lane is covered too. Reads are neither drained nor held: they change
//     nothing a sync could make durable, and the store may run them
//     concurrently with a sync.
//   - Enter of a mutating request blocks while the gate is closed: no write
//     accepted after a flush starts runs before that flush has completed.
//   - A flush called while the gate is already closed joins the running one
//     (group commit). That is sound because no mutating request was admitted
//     in between, so the same drain and sync cover both.
//   - The write generation: the barrier counts mutating requests as they
//     exit (completion, not submission). A sync that succeeds records the
//     count it covered, read after its drain and before it started: with the
//     gate closed and nothing in flight, that count is every mutating request
//     ever admitted. A flush whose drain finds the count unchanged since the
//     last successful sync returns without syncing: every write it must cover
//     completed before that sync started. The count starts one ahead of the
//     synced one, so that the first flush always syncs (it covers writes made
//     before this barrier existed: a restarted daemon's predecessor's).
//   - The first failed sync is latched: it and every later Flush return an
//     error wrapping ErrSyncFailed, because after lost writeback no later
//     fsync can prove the earlier writes durable. A failed sync does not
//     advance the synced count, and a latched barrier never skips a sync.
type Barrier struct {
	sync func() error

	mu       sync.Mutex
	writes   int           // mutating requests entered and not yet exited
	reads    int           // reads entered and not yet exited
	epoch    *flushEpoch   // non-nil while the gate is closed
	failed   error         // first sync failure, latched
	written  uint64        // mutating requests exited, plus one (the generation)
	synced   uint64        // written as covered by the last successful sync
	readIdle chan struct{} // closed when reads reaches zero (WaitReads)
	skipped  uint64        // flushes that skipped the sync (nothing written)

	// unsafe reproduces a bug this type exists to prevent. Test hook only
	// (see SetUnsafe).
	unsafe UnsafeMode
}

// UnsafeMode names a deliberately broken barrier, for tests that must show
// they catch it.
type UnsafeMode uint8

const (
	// Safe is the correct barrier.
	Safe UnsafeMode = iota
	// UnsafeSyncBeforeDrain syncs first and drains after: the classic
	// loop-driver bug.
	UnsafeSyncBeforeDrain
	// UnsafeSkipInflight decides to skip the sync from the generation as it
	// is when the flush arrives, before the drain: a flush that finds no
	// write completed since the last sync returns at once, although writes
	// it must cover may still be in flight.
	UnsafeSkipInflight
)

func (m UnsafeMode) String() string {
	switch m {
	case Safe:
		return "safe"
	case UnsafeSyncBeforeDrain:
		return "sync-before-drain"
	case UnsafeSkipInflight:
		return "skip-inflight"
	}
	return fmt.Sprintf("unsafe(%d)", uint8(m))
}

type flushEpoch struct {
	drained chan struct{} // closed when writes reached zero
	done    chan struct{} // closed when the flush has finished
	err     error
}

// NewBarrier returns a barrier that calls sync to make drained writes durable.
func NewBarrier(sync func() error) *Barrier {
	return &Barrier{sync: sync, written: 1}
}

// mutating reports whether op changes the store, so that a flush must drain
// and cover it.
func mutating(op Op) bool { return op != OpRead }

// Enter admits one request doing op; a mutating one waits while a flush is
// in progress.
func (b *Barrier) Enter(op Op) {
	b.mu.Lock()
	if !mutating(op) {
		b.reads++
		b.mu.Unlock()
		return
	}
	for b.epoch != nil {
		done := b.epoch.done
		b.mu.Unlock()
		<-done
		b.mu.Lock()
	}
	b.writes++
	b.mu.Unlock()
}

// Exit marks one admitted request doing op as finished.
func (b *Barrier) Exit(op Op) {
	b.mu.Lock()
	if !mutating(op) {
		b.reads--
		if b.reads < 0 {
			b.mu.Unlock()
			panic("backend: Barrier.Exit without Enter")
		}
		if b.reads == 0 && b.readIdle != nil {
			close(b.readIdle)
			b.readIdle = nil
		}
		b.mu.Unlock()
		return
	}
	b.writes--
	if b.writes < 0 {
		b.mu.Unlock()
		panic("backend: Barrier.Exit without Enter")
	}
	b.written++
	if b.writes == 0 && b.epoch != nil {
		close(b.epoch.drained)
	}
	b.mu.Unlock()
}

// WaitReads waits until no read is in flight. Reads that enter meanwhile
// are waited for too; the caller makes sure none do (Engine.Close).
func (b *Barrier) WaitReads() {
	b.mu.Lock()
	for b.reads > 0 {
		if b.readIdle == nil {
			b.readIdle = make(chan struct{})
		}
		idle := b.readIdle
		b.mu.Unlock()
		<-idle
		b.mu.Lock()
	}
	b.mu.Unlock()
}

// Flush drains every admitted mutating request, syncs unless nothing was
// written since the last successful sync, and returns the sync's result (or
// the latched failure of an earlier sync).
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
	mode := b.unsafe
	if mode == UnsafeSkipInflight && b.covered() {
		b.skipped++
		b.mu.Unlock()
		return 0, 0, nil
	}
	ep := &flushEpoch{drained: make(chan struct{}), done: make(chan struct{})}
	b.epoch = ep
	if b.writes == 0 {
		close(ep.drained)
	}
	b.mu.Unlock()

	var drained time.Duration
	if mode == UnsafeSyncBeforeDrain {
		b.mu.Lock()
		gen := b.written // what has exited so far: the writes still in flight are not covered
		b.mu.Unlock()
		err = b.syncCovering(gen)
		<-ep.drained
		drained = monotime()
	} else {
		<-ep.drained
		drained = monotime()
		// The gate is closed and no mutating request is in flight: gen is
		// every one ever admitted, and stays so until the gate reopens.
		b.mu.Lock()
		gen, skip := b.written, b.covered()
		if skip {
			b.skipped++
		}
		b.mu.Unlock()
		if !skip {
			err = b.syncCovering(gen)
		}
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

// covered reports, with b.mu held, whether the last successful sync covered
// every mutating request that has exited, so that a flush need not sync
// (never once a sync has failed).
func (b *Barrier) covered() bool { return b.failed == nil && b.written == b.synced }

// syncCovering syncs and, if the sync succeeded and none has failed before,
// records that it covered the write generation gen.
func (b *Barrier) syncCovering(gen uint64) error {
	err := b.sync()
	b.mu.Lock()
	if err == nil && b.failed == nil {
		b.synced = gen
	}
	b.mu.Unlock()
	return err
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

// SkippedSyncs is how many flushes returned without syncing because nothing
// had been written since the last successful sync (joined flushes not
// counted).
func (b *Barrier) SkippedSyncs() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.skipped
}

// Failed returns the latched sync failure, or nil.
func (b *Barrier) Failed() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.failed
}

// SetUnsafeSyncBeforeDrain makes Flush sync before draining (on) or not
// (off): SetUnsafe(UnsafeSyncBeforeDrain) or SetUnsafe(Safe).
func (b *Barrier) SetUnsafeSyncBeforeDrain(on bool) {
	m := Safe
	if on {
		m = UnsafeSyncBeforeDrain
	}
	b.SetUnsafe(m)
}

// SetUnsafe makes the barrier broken as m says (Safe: correct). It exists
// only so that tests can prove they detect the bug. Never use it outside
// tests.
func (b *Barrier) SetUnsafe(m UnsafeMode) {
	b.mu.Lock()
	b.unsafe = m
	b.mu.Unlock()
}
