package backend

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFaultRuleMatches(t *testing.T) {
	const off, n = 4096, 8192 // the rule's range: [4096, 12288)
	ranged := FaultRule{Ops: Ops(FaultRead, FaultWrite), Offset: off, Length: n, Err: unix.EIO}
	for _, tc := range []struct {
		name string
		rule FaultRule
		op   Operation
		want bool
	}{
		{"every op: read", FaultRule{Err: unix.EIO}, Operation{FaultRead, 0, 512}, true},
		{"every op: sync", FaultRule{Err: unix.EIO}, Operation{Op: FaultSync}, true},
		{"kind matches", FaultRule{Ops: Ops(FaultSync), Err: unix.EIO}, Operation{Op: FaultSync}, true},
		{"kind does not match", FaultRule{Ops: Ops(FaultSync), Err: unix.EIO}, Operation{FaultWrite, 0, 512}, false},
		{"inside", ranged, Operation{FaultRead, off + 512, 512}, true},
		{"whole range", ranged, Operation{FaultWrite, off, n}, true},
		{"covers it", ranged, Operation{FaultWrite, 0, 1 << 20}, true},
		{"overlaps the start", ranged, Operation{FaultRead, off - 512, 1024}, true},
		{"overlaps the end", ranged, Operation{FaultRead, off + n - 512, 1024}, true},
		{"ends at the start", ranged, Operation{FaultRead, off - 512, 512}, false},
		{"starts at the end", ranged, Operation{FaultRead, off + n, 512}, false},
		{"far beyond", ranged, Operation{FaultRead, 1 << 62, 1 << 20}, false},
		{"ranged kind does not match", ranged, Operation{FaultDiscard, off, 512}, false},
		{"a range never matches a sync", FaultRule{Offset: off, Length: n, Err: unix.EIO}, Operation{Op: FaultSync}, false},
		{"empty op", ranged, Operation{FaultRead, off, 0}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.rule.MaybeError(tc.op)
			if got := err != nil; got != tc.want {
				t.Fatalf("MaybeError(%v) = %v, want failure %v", tc.op, err, tc.want)
			}
		})
	}
}

// TestFaultStoreFailsWithoutTouchingTheStore fails each kind of call in turn:
// the call returns the injected error, and the wrapped store is unchanged.
func TestFaultStoreFailsWithoutTouchingTheStore(t *testing.T) {
	const size = 1 << 20
	data := bytes.Repeat([]byte{0xa5}, 4096)
	for _, tc := range []struct {
		op   FaultOp
		err  error
		call func(s *FaultStore) error
	}{
		{FaultRead, unix.EIO, func(s *FaultStore) error { return s.ReadAt([][]byte{make([]byte, 4096)}, 8192) }},
		{FaultWrite, unix.ENOSPC, func(s *FaultStore) error { return s.WriteAt([][]byte{data}, 8192) }},
		{FaultWriteDurable, unix.EIO, func(s *FaultStore) error { return s.WriteAtDurable([][]byte{data}, 8192) }},
		{FaultSync, unix.EIO, func(s *FaultStore) error { return s.Sync() }},
		{FaultDiscard, unix.EOPNOTSUPP, func(s *FaultStore) error { return s.Discard(0, 4096) }},
		{FaultWriteZeroes, unix.ENOSPC, func(s *FaultStore) error { return s.WriteZeroes(0, 4096, false) }},
	} {
		t.Run(tc.op.String(), func(t *testing.T) {
			inner := NewCrashStore(size)
			inner.WriteAt([][]byte{bytes.Repeat([]byte{1}, size)}, 0)
			inner.Sync()
			before, syncs := inner.Image(), inner.Syncs()
			s := NewFaultStore(inner, FaultRule{Ops: Ops(tc.op), Err: tc.err})

			err := tc.call(s)
			var inj *InjectedError
			switch {
			case err == nil:
				t.Fatalf("%v succeeded with a fault injected", tc.op)
			case !errors.Is(err, tc.err) || !errors.As(err, &inj) || inj.Op.Op != tc.op:
				t.Fatalf("%v: error %v, want an injected %v", tc.op, err, tc.err)
			case s.Injected() != 1:
				t.Fatalf("Injected() = %d, want 1", s.Injected())
			case !bytes.Equal(inner.Image(), before) || inner.Syncs() != syncs:
				t.Fatalf("a failed %v reached the store", tc.op)
			}
			// The other kinds pass.
			if tc.op != FaultRead {
				if err := s.ReadAt([][]byte{make([]byte, 512)}, 0); err != nil {
					t.Fatalf("read with only %v failing: %v", tc.op, err)
				}
			}
			// Without an injector the store recovers.
			s.SetInjector(nil)
			if err := tc.call(s); err != nil {
				t.Fatalf("%v after the fault was removed: %v", tc.op, err)
			}
			if s.Injected() != 1 {
				t.Fatalf("Injected() = %d after recovery, want 1", s.Injected())
			}
		})
	}
}

// plainStore has none of the optional operations.
type plainStore struct {
	s *CrashStore
}

func (p plainStore) ReadAt(bufs [][]byte, off int64) error  { return p.s.ReadAt(bufs, off) }
func (p plainStore) WriteAt(bufs [][]byte, off int64) error { return p.s.WriteAt(bufs, off) }
func (p plainStore) Sync() error                            { return p.s.Sync() }
func (p plainStore) Size() int64                            { return p.s.Size() }
func (p plainStore) Close() error                           { return nil }

// TestFaultStoreFallbacks: over a store without the optional operations, the
// fault store does what the engine would do without them.
func TestFaultStoreFallbacks(t *testing.T) {
	inner := NewCrashStore(64 << 10)
	var store Store = plainStore{inner}
	if _, ok := store.(ZeroWriter); ok {
		t.Fatal("plainStore must not be a ZeroWriter")
	}
	s := NewFaultStore(store, nil)
	ones := bytes.Repeat([]byte{1}, 8192)
	if err := s.WriteAtDurable([][]byte{ones}, 0); err != nil {
		t.Fatal(err)
	}
	if inner.Syncs() != 1 {
		t.Fatalf("a durable write without DurableWriter made %d syncs, want 1", inner.Syncs())
	}
	if err := s.WriteZeroes(4096, 2048, true); err != nil {
		t.Fatal(err)
	}
	if err := s.Discard(0, 1024); err != nil { // a hint: nothing happens
		t.Fatal(err)
	}
	want := append(append(bytes.Repeat([]byte{1}, 4096), make([]byte, 2048)...), bytes.Repeat([]byte{1}, 2048)...)
	if got := inner.Image()[:8192]; !bytes.Equal(got, want) {
		t.Fatal("write-zeroes fallback wrote the wrong bytes")
	}
}

// TestEngineLatchesInjectedSyncFailure: once a sync has failed, every later
// flush fails even after the store recovered, until a new engine is started
// on the store (the export restarts).
func TestEngineLatchesInjectedSyncFailure(t *testing.T) {
	inner := NewCrashStore(1 << 20)
	s := NewFaultStore(inner, nil)
	e := NewEngine(s, 2)
	done := make(chanDone, 1)
	write := func(e *Engine) error {
		r := &Request{Op: OpWrite, Offset: 4096, Bufs: [][]byte{make([]byte, 4096)}, Done: done}
		e.Submit(r)
		return (<-done).Err
	}
	if err := write(e); err != nil {
		t.Fatal(err)
	}
	if err := e.Flush(); err != nil {
		t.Fatal(err)
	}
	s.SetInjector(FaultRule{Ops: Ops(FaultSync), Err: unix.EIO})
	if err := write(e); err != nil {
		t.Fatalf("a write with only syncs failing: %v", err)
	}
	if err := e.Flush(); !errors.Is(err, ErrSyncFailed) || !errors.Is(err, unix.EIO) {
		t.Fatalf("flush with a failing sync: %v, want ErrSyncFailed wrapping EIO", err)
	}
	s.SetInjector(nil)
	for i := range 3 {
		if err := e.Flush(); !errors.Is(err, ErrSyncFailed) {
			t.Fatalf("flush %d after the store recovered: %v, want the latched failure", i, err)
		}
	}
	if err := write(e); err != nil {
		t.Fatalf("a write after the latched sync failure: %v", err)
	}
	if err := e.Close(); !errors.Is(err, ErrSyncFailed) {
		t.Fatalf("the final flush of Close: %v, want the latched failure", err)
	}
	// A restarted export (a new engine on the same store) starts clean.
	e2 := NewEngine(s, 2)
	defer e2.Close()
	if err := e2.Flush(); err != nil {
		t.Fatalf("flush on a restarted engine: %v", err)
	}
}

// TestEngineENOSPC: a write that fails with ENOSPC fails alone, in
// write-back and in write-through mode: it wrote nothing, so later flushes
// succeed. Only a sync that failed (a *SyncError from a DurableWriter, even
// one for ENOSPC) is latched.
func TestEngineENOSPC(t *testing.T) {
	for _, tc := range []struct {
		name      string
		wt        bool
		err       error
		wantLatch bool
	}{
		{"writeback", false, unix.ENOSPC, false},
		{"writethrough", true, unix.ENOSPC, false},
		{"writethrough quota", true, unix.EDQUOT, false},
		{"writethrough memory fault", true, fmt.Errorf("copy: %w", ErrMemoryFault), false},
		{"writethrough sync out of space", true, &SyncError{unix.ENOSPC}, true},
		{"writethrough EIO", true, unix.EIO, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewFaultStore(NewCrashStore(1<<20), FaultRule{Ops: Ops(FaultWrite, FaultWriteDurable), Err: tc.err})
			e := NewEngine(s, 1)
			defer e.Close()
			e.SetWriteThrough(tc.wt)
			done := make(chanDone, 1)
			e.Submit(&Request{Op: OpWrite, Bufs: [][]byte{make([]byte, 512)}, Done: done})
			if err := (<-done).Err; !errors.Is(err, tc.err) {
				t.Fatalf("write: %v, want %v", err, tc.err)
			}
			s.SetInjector(nil)
			err := e.Flush()
			if tc.wantLatch && !errors.Is(err, ErrSyncFailed) {
				t.Fatalf("flush after a failed sync: %v, want the latched failure", err)
			}
			if !tc.wantLatch && err != nil {
				t.Fatalf("flush after a write that failed alone: %v", err)
			}
		})
	}
}
