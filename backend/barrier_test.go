package backend

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// recordingStore is a Store that records when every write and sync starts
// and ends, on one logical clock, and sleeps a little to widen the windows in
// which a broken barrier would let them overlap.
type recordingStore struct {
	clock    atomic.Int64
	maxDelay time.Duration

	mu     sync.Mutex
	writes map[int64]span // by write id (the offset, unique per write)
	syncs  []span
	// syncGate, if set, is received from at the start of every Sync.
	syncGate chan struct{}
	syncErr  []error // errors to return from successive syncs
}

type span struct{ start, end int64 }

func newRecordingStore(maxDelay time.Duration) *recordingStore {
	return &recordingStore{maxDelay: maxDelay, writes: map[int64]span{}}
}

func (s *recordingStore) pause() {
	if s.maxDelay > 0 {
		time.Sleep(time.Duration(rand.Int64N(int64(s.maxDelay))))
	}
}

func (s *recordingStore) ReadAt(bufs [][]byte, off int64) error { return nil }
func (s *recordingStore) WriteAt(bufs [][]byte, off int64) error {
	start := s.clock.Add(1)
	s.pause()
	end := s.clock.Add(1)
	s.mu.Lock()
	s.writes[off] = span{start, end}
	s.mu.Unlock()
	return nil
}

func (s *recordingStore) Sync() error {
	if s.syncGate != nil {
		<-s.syncGate
	}
	start := s.clock.Add(1)
	s.pause()
	end := s.clock.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.syncs = append(s.syncs, span{start, end})
	if len(s.syncErr) > 0 {
		err := s.syncErr[0]
		s.syncErr = s.syncErr[1:]
		return err
	}
	return nil
}
func (s *recordingStore) Size() int64  { return 1 << 40 }
func (s *recordingStore) Close() error { return nil }

// doneCounter completes requests by counting them.
type doneCounter struct {
	wg *sync.WaitGroup
}

func (d doneCounter) Complete(r *Request) { d.wg.Done() }

// flushRecord is what a test client saw of one flush: the writes whose
// Submit had returned before it called Flush, and the clock when Flush
// returned.
type flushRecord struct {
	before   []int64
	returned int64
	syncIdx  int
}

// runBarrierWorkload drives an engine from several goroutines ("queues")
// with writes and flushes and returns what each flush covered.
func runBarrierWorkload(t *testing.T, e *Engine, s *recordingStore, queues, opsPerQueue int, seed uint64) []flushRecord {
	t.Helper()
	var (
		mu        sync.Mutex
		flushes   []flushRecord
		submitted []int64 // every write whose Submit has returned
		nextID    atomic.Int64
		wg        sync.WaitGroup
		pending   sync.WaitGroup
	)
	for q := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(q)))
			for range opsPerQueue {
				if rng.IntN(8) == 0 {
					// Everything any queue submitted before this point
					// must be covered; collect the global view first.
					mu.Lock()
					before := append([]int64(nil), submitted...)
					mu.Unlock()
					if err := e.Flush(); err != nil {
						t.Errorf("flush: %v", err)
					}
					s.mu.Lock()
					rec := flushRecord{before: before, returned: s.clock.Add(1), syncIdx: len(s.syncs) - 1}
					s.mu.Unlock()
					mu.Lock()
					flushes = append(flushes, rec)
					mu.Unlock()
					continue
				}
				id := nextID.Add(1)
				pending.Add(1)
				e.Submit(&Request{Op: OpWrite, Offset: id, Bufs: [][]byte{{1}}, Done: doneCounter{&pending}})
				mu.Lock()
				submitted = append(submitted, id)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	pending.Wait()
	return flushes
}

// checkBarrier returns the violations of the flush contract found in the
// records: a sync that overlaps a write, and a write submitted before a
// flush that had not finished when that flush's sync started.
func checkBarrier(s *recordingStore, flushes []flushRecord) []string {
	var bad []string
	for _, sy := range s.syncs {
		for id, w := range s.writes {
			if w.start < sy.end && sy.start < w.end {
				bad = append(bad, fmt.Sprintf("write %d [%d,%d] overlaps sync [%d,%d]", id, w.start, w.end, sy.start, sy.end))
			}
		}
	}
	for _, f := range flushes {
		// The sync that made this flush durable is the last one that
		// started before the flush returned.
		var sy *span
		for i := range s.syncs {
			if s.syncs[i].end < f.returned && (sy == nil || s.syncs[i].start > sy.start) {
				sy = &s.syncs[i]
			}
		}
		if sy == nil {
			bad = append(bad, "a flush returned without any sync")
			continue
		}
		for _, id := range f.before {
			if w := s.writes[id]; w.end > sy.start {
				bad = append(bad, fmt.Sprintf("write %d submitted before a flush ended at %d, after its sync started at %d", id, w.end, sy.start))
			}
		}
	}
	return bad
}

func TestBarrierOrdersWritesAndSyncs(t *testing.T) {
	for _, lanes := range []int{1, 2, 8} {
		for _, queues := range []int{1, 2, 4} {
			t.Run(fmt.Sprintf("lanes=%d/queues=%d", lanes, queues), func(t *testing.T) {
				s := newRecordingStore(200 * time.Microsecond)
				e := NewEngine(s, lanes)
				defer e.Close()
				flushes := runBarrierWorkload(t, e, s, queues, 200, uint64(lanes*10+queues))
				if len(flushes) == 0 {
					t.Fatal("workload made no flushes")
				}
				if bad := checkBarrier(s, flushes); len(bad) > 0 {
					t.Fatalf("%d violations, first: %s", len(bad), bad[0])
				}
			})
		}
	}
}

// TestBarrierCheckCatchesSyncBeforeDrain proves the check above can fail: the
// loop-driver bug (sync, then drain) must be detected.
func TestBarrierCheckCatchesSyncBeforeDrain(t *testing.T) {
	caught := 0
	for seed := range uint64(5) {
		s := newRecordingStore(500 * time.Microsecond)
		e := NewEngine(s, 4)
		e.Barrier().SetUnsafeSyncBeforeDrain(true)
		flushes := runBarrierWorkload(t, e, s, 4, 200, seed)
		e.Close()
		if len(checkBarrier(s, flushes)) > 0 {
			caught++
		}
	}
	if caught == 0 {
		t.Fatal("the broken barrier (sync before drain) was not detected in any run")
	}
	t.Logf("broken barrier detected in %d of 5 runs", caught)
}

// TestBarrierHoldsLaterWrites checks deterministically that a write submitted
// while a flush is syncing does not start before the flush has returned.
func TestBarrierHoldsLaterWrites(t *testing.T) {
	s := newRecordingStore(0)
	s.syncGate = make(chan struct{})
	e := NewEngine(s, 2)
	defer func() {
		s.syncGate = nil
		e.Close()
	}()

	flushed := make(chan struct{})
	go func() {
		if err := e.Flush(); err != nil {
			t.Errorf("flush: %v", err)
		}
		close(flushed)
	}()
	// Wait until the flush has closed the gate.
	for e.Barrier().epochOpen() {
		time.Sleep(time.Millisecond)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	submitted := make(chan struct{})
	go func() {
		e.Submit(&Request{Op: OpWrite, Offset: 7, Bufs: [][]byte{{1}}, Done: doneCounter{&wg}})
		close(submitted)
	}()
	select {
	case <-submitted:
		t.Fatal("Submit returned while a flush was in progress")
	case <-time.After(50 * time.Millisecond):
	}
	s.syncGate <- struct{}{} // let the sync run
	<-flushed
	wg.Wait()
	// The write may start as soon as the flush reopens the gate, which can be before the
	// flushing goroutine runs again: compare with the end of the flush's sync.
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.syncs) != 1 {
		t.Fatalf("%d syncs, want 1", len(s.syncs))
	}
	if w, synced := s.writes[7], s.syncs[0].end; w.start < synced {
		t.Fatalf("write started at %d, before the flush's sync ended at %d", w.start, synced)
	}
}

// epochOpen reports whether no flush is in progress (test helper).
func (b *Barrier) epochOpen() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.epoch == nil
}

func TestBarrierFlushWaitsForInflight(t *testing.T) {
	var synced atomic.Bool
	b := NewBarrier(func() error { synced.Store(true); return nil })
	b.Enter(OpWrite)
	done := make(chan error)
	go func() { done <- b.Flush() }()
	time.Sleep(20 * time.Millisecond)
	if synced.Load() {
		t.Fatal("sync ran while a request was in flight")
	}
	b.Exit(OpWrite)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !synced.Load() {
		t.Fatal("flush returned without syncing")
	}
}

func TestBarrierJoinsConcurrentFlush(t *testing.T) {
	release := make(chan struct{})
	var syncs atomic.Int32
	b := NewBarrier(func() error { syncs.Add(1); <-release; return nil })
	first := make(chan error)
	go func() { first <- b.Flush() }()
	for b.epochOpen() {
		time.Sleep(time.Millisecond)
	}
	second := make(chan error)
	go func() { second <- b.Flush() }()
	time.Sleep(10 * time.Millisecond)
	close(release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	if n := syncs.Load(); n != 1 {
		t.Fatalf("%d syncs for two overlapping flushes, want 1 (group commit)", n)
	}
}

func TestBarrierLatchesSyncFailure(t *testing.T) {
	errEIO := errors.New("EIO")
	calls := 0
	b := NewBarrier(func() error {
		calls++
		if calls == 2 {
			return errEIO
		}
		return nil
	})
	steps := []struct {
		name    string
		wantErr bool
	}{
		{"first sync succeeds", false},
		{"second sync fails", true},
		{"third sync succeeds but the failure stays latched", true},
		{"and stays latched", true},
	}
	for _, st := range steps {
		// A write before each flush, so that none may skip its sync.
		b.Enter(OpWrite)
		b.Exit(OpWrite)
		err := b.Flush()
		if (err != nil) != st.wantErr {
			t.Fatalf("%s: err = %v", st.name, err)
		}
		if err != nil && (!errors.Is(err, ErrSyncFailed) || !errors.Is(err, errEIO)) {
			t.Fatalf("%s: err = %v, want ErrSyncFailed wrapping the cause", st.name, err)
		}
	}
}

func TestEngineWriteThroughFailureIsLatched(t *testing.T) {
	s := &failingDurable{err: errors.New("EIO on dsync")}
	e := NewEngine(s, 1)
	defer e.Close()
	e.SetWriteThrough(true)
	var wg sync.WaitGroup
	wg.Add(1)
	r := &Request{Op: OpWrite, Bufs: [][]byte{{1}}, Done: doneCounter{&wg}}
	e.Submit(r)
	wg.Wait()
	if r.Err == nil {
		t.Fatal("write-through write with a failing data sync reported success")
	}
	if err := e.Flush(); !errors.Is(err, ErrSyncFailed) {
		t.Fatalf("flush after a failed durable write: %v, want ErrSyncFailed", err)
	}
}

type failingDurable struct {
	recordingStore
	err error
}

func (f *failingDurable) WriteAtDurable(bufs [][]byte, off int64) error { return f.err }

// countingSync is a sync function that counts its calls and fails while
// fail is set.
type countingSync struct {
	calls atomic.Int32
	fail  atomic.Bool
}

var errSyncEIO = errors.New("EIO")

func (c *countingSync) sync() error {
	c.calls.Add(1)
	if c.fail.Load() {
		return errSyncEIO
	}
	return nil
}

// TestBarrierWriteGeneration runs scripts of completed requests and flushes
// on one barrier and checks, for every flush, whether it reached the store's
// sync and whether it failed. Steps: w write, d discard, z write-zeroes, r
// read (each entered and exited), x the syncs fail from now on, o they
// succeed again, F a flush that must sync, S one that must skip the sync, E
// a flush that must sync and fail, L one that must fail (latched) without
// a check of whether it synced.
func TestBarrierWriteGeneration(t *testing.T) {
	for _, tc := range []struct{ name, script string }{
		{"the first flush syncs with nothing written", "F"},
		{"a second flush with nothing written skips", "FS"},
		{"a write makes the next flush sync", "FSwFS"},
		{"many writes, one sync", "wwwwFSS"},
		{"reads are not written data", "FrrSrS"},
		{"discard and write-zeroes count as writes", "FdFzFS"},
		{"a failed sync does not count as synced", "wxELLoL"},
		{"a failed first sync with nothing written", "xELoLL"},
		{"a latched barrier never skips", "wxEoLwLrL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c countingSync
			b := NewBarrier(c.sync)
			for i, step := range tc.script {
				before := c.calls.Load()
				var err error
				switch step {
				case 'w', 'd', 'z', 'r':
					op := map[rune]Op{'w': OpWrite, 'd': OpDiscard, 'z': OpWriteZeroes, 'r': OpRead}[step]
					b.Enter(op)
					b.Exit(op)
					continue
				case 'x':
					c.fail.Store(true)
					continue
				case 'o':
					c.fail.Store(false)
					continue
				}
				err = b.Flush()
				synced := c.calls.Load() > before
				wantSync, wantErr := step == 'F' || step == 'E', step == 'E' || step == 'L'
				if step != 'L' && synced != wantSync {
					t.Fatalf("step %d (%c) of %q: synced = %v, want %v", i, step, tc.script, synced, wantSync)
				}
				if (err != nil) != wantErr || err != nil && !errors.Is(err, ErrSyncFailed) {
					t.Fatalf("step %d (%c) of %q: err = %v, want error %v", i, step, tc.script, err, wantErr)
				}
			}
		})
	}
}

// inflightWriteCovered starts a write on b (in flight, not completed) after a
// sync that left nothing to write, then flushes, and reports whether that
// flush waited for the write and synced after it exited.
func inflightWriteCovered(t *testing.T, mode UnsafeMode) bool {
	t.Helper()
	var c countingSync
	b := NewBarrier(c.sync)
	b.SetUnsafe(mode)
	if err := b.Flush(); err != nil { // the generation is now synced
		t.Fatal(err)
	}
	b.Enter(OpWrite)
	done := make(chan error, 1)
	go func() { done <- b.Flush() }()
	var returnedEarly bool
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		returnedEarly = true
	case <-time.After(20 * time.Millisecond):
	}
	syncsBeforeExit := c.calls.Load()
	b.Exit(OpWrite)
	if !returnedEarly {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	return !returnedEarly && syncsBeforeExit == 1 && c.calls.Load() == 2
}

// TestBarrierCoversInflightWrite: a flush that arrives while a write runs
// covers it, although no write completed since the last sync; a barrier
// that skips from the generation it finds on arrival fails the same check.
func TestBarrierCoversInflightWrite(t *testing.T) {
	for _, tc := range []struct {
		mode UnsafeMode
		want bool
	}{{Safe, true}, {UnsafeSkipInflight, false}} {
		t.Run(tc.mode.String(), func(t *testing.T) {
			if got := inflightWriteCovered(t, tc.mode); got != tc.want {
				t.Fatalf("in-flight write covered = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestBarrierFlushDoesNotWaitForReads: a read in flight does not hold a
// flush, and a read entering during a flush's sync is not held either; a
// write entering then is, and makes the next flush sync again.
func TestBarrierFlushDoesNotWaitForReads(t *testing.T) {
	release := make(chan struct{})
	var calls atomic.Int32
	b := NewBarrier(func() error {
		if calls.Add(1) == 2 {
			<-release
		}
		return nil
	})
	b.Enter(OpRead) // in flight throughout
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	b.Enter(OpWrite)
	b.Exit(OpWrite)
	flushed := make(chan error, 1)
	go func() { flushed <- b.Flush() }() // its sync waits for release
	for calls.Load() < 2 {
		time.Sleep(time.Millisecond)
	}
	readIn := make(chan struct{})
	go func() { b.Enter(OpRead); close(readIn) }()
	select {
	case <-readIn:
	case <-time.After(5 * time.Second):
		t.Fatal("a read was held by a flush's sync")
	}
	writeIn := make(chan struct{})
	go func() { b.Enter(OpWrite); close(writeIn) }()
	select {
	case <-writeIn:
		t.Fatal("a write entered during a flush's sync")
	case <-time.After(20 * time.Millisecond):
	}
	close(release)
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	<-writeIn
	b.Exit(OpWrite) // completed after the sync it waited for: not covered by it
	if err := b.Flush(); err != nil || calls.Load() != 3 {
		t.Fatalf("flush after a write admitted during a sync: err %v, %d syncs, want 3", err, calls.Load())
	}
	// The reads are still in flight: WaitReads waits for them.
	waited := make(chan struct{})
	go func() { b.WaitReads(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("WaitReads returned with reads in flight")
	case <-time.After(20 * time.Millisecond):
	}
	b.Exit(OpRead)
	b.Exit(OpRead)
	<-waited
}
