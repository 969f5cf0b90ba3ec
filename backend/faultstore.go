package backend

import (
	"fmt"
	"sync/atomic"
)

// FaultOp is the kind of store call an Injector is asked about.
type FaultOp uint8

// The store calls a FaultStore can fail.
const (
	FaultRead         FaultOp = iota // ReadAt
	FaultWrite                       // WriteAt
	FaultWriteDurable                // WriteAtDurable (write-through writes)
	FaultSync                        // Sync
	FaultDiscard                     // Discard
	FaultWriteZeroes                 // WriteZeroes
)

func (o FaultOp) String() string {
	switch o {
	case FaultRead:
		return "read"
	case FaultWrite:
		return "write"
	case FaultWriteDurable:
		return "durable-write"
	case FaultSync:
		return "sync"
	case FaultDiscard:
		return "discard"
	case FaultWriteZeroes:
		return "write-zeroes"
	}
	return fmt.Sprintf("fault-op(%d)", uint8(o))
}

// FaultOps is a set of FaultOp.
type FaultOps uint32

// Ops returns the set of the given kinds.
func Ops(kinds ...FaultOp) FaultOps {
	var s FaultOps
	for _, k := range kinds {
		s |= 1 << k
	}
	return s
}

// Has reports whether op is in the set.
func (s FaultOps) Has(op FaultOp) bool { return s&(1<<op) != 0 }

// Operation is one store call as an Injector sees it.
type Operation struct {
	Op     FaultOp
	Offset int64 // 0 for a sync
	Length int64 // bytes; 0 for a sync
}

func (o Operation) String() string {
	if o.Op == FaultSync {
		return "sync"
	}
	return fmt.Sprintf("%v at offset %d length %d", o.Op, o.Offset, o.Length)
}

// Injector decides, for each call a FaultStore gets, whether it fails (as
// Pebble's vfs/errorfs does for files). MaybeError is called from several
// lanes at once and must be safe for concurrent use; it may also block, to
// slow a store down.
type Injector interface {
	// MaybeError returns nil to pass the call on to the wrapped store, or
	// the error (unix.EIO, unix.ENOSPC, ...) the call fails with instead,
	// without reaching the wrapped store.
	MaybeError(op Operation) error
}

// InjectorFunc is an Injector written as a function.
type InjectorFunc func(op Operation) error

// MaybeError implements Injector.
func (f InjectorFunc) MaybeError(op Operation) error { return f(op) }

// FaultRule is an Injector that fails every call it matches with Err.
type FaultRule struct {
	// Ops are the kinds of call it fails; the empty set matches every kind.
	Ops FaultOps
	// Offset and Length, when Length > 0, restrict it to calls that touch
	// a byte of [Offset, Offset+Length); a sync touches no range, so a
	// rule with a range never fails one.
	Offset, Length int64
	// Err is the error matching calls fail with.
	Err error
}

// MaybeError implements Injector.
func (r FaultRule) MaybeError(op Operation) error {
	if r.Ops != 0 && !r.Ops.Has(op.Op) {
		return nil
	}
	if r.Length > 0 {
		// Overlap of [op.Offset, +op.Length) with [r.Offset, +r.Length),
		// compared by subtraction so that no end overflows.
		if op.Op == FaultSync || op.Length <= 0 {
			return nil
		}
		if op.Offset >= r.Offset && op.Offset-r.Offset >= r.Length {
			return nil
		}
		if op.Offset < r.Offset && r.Offset-op.Offset >= op.Length {
			return nil
		}
	}
	return r.Err
}

// InjectedError is the error of a call that a FaultStore failed on its
// Injector's decision. It wraps the injector's error, so errors.Is(err,
// unix.ENOSPC) holds when the injector chose ENOSPC.
type InjectedError struct {
	Op  Operation
	Err error
}

func (e *InjectedError) Error() string {
	return fmt.Sprintf("%v: %v (injected fault)", e.Op, e.Err)
}

// Unwrap returns the injected error.
func (e *InjectedError) Unwrap() error { return e.Err }

// FaultStore is a Store that asks an Injector before every call whether to
// fail it, for testing how the stack above survives a failing disk. A call
// that fails does nothing to the wrapped store: a failed write writes
// nothing, a failed sync syncs nothing (a real failed fsync may also have
// dropped writeback; the Barrier latches it either way).
//
// It offers every optional operation (Discarder, ZeroWriter, DurableWriter)
// so that each can be failed; where the wrapped store lacks one, it does what
// the Engine would do without it: a discard does nothing, write-zeroes writes
// zeros, a durable write is a write and a sync.
type FaultStore struct {
	inner    Store
	inj      atomic.Pointer[injectorRef]
	injected atomic.Uint64
}

type injectorRef struct{ inj Injector }

var (
	_ Store         = (*FaultStore)(nil)
	_ Discarder     = (*FaultStore)(nil)
	_ ZeroWriter    = (*FaultStore)(nil)
	_ DurableWriter = (*FaultStore)(nil)
)

// NewFaultStore wraps inner; inj (nil: none) decides which calls fail.
func NewFaultStore(inner Store, inj Injector) *FaultStore {
	s := &FaultStore{inner: inner}
	s.SetInjector(inj)
	return s
}

// SetInjector replaces the injector (nil: no faults from now on, the store
// "recovers"). Calls already asking the old one may still fail.
func (s *FaultStore) SetInjector(inj Injector) {
	if inj == nil {
		s.inj.Store(nil)
		return
	}
	s.inj.Store(&injectorRef{inj})
}

// Injected counts the calls that have failed on the injector's decision.
func (s *FaultStore) Injected() uint64 { return s.injected.Load() }

// Inner returns the wrapped store.
func (s *FaultStore) Inner() Store { return s.inner }

// fault asks the injector about op and returns the error the call must fail
// with, or nil.
func (s *FaultStore) fault(op Operation) error {
	ref := s.inj.Load()
	if ref == nil {
		return nil
	}
	err := ref.inj.MaybeError(op)
	if err == nil {
		return nil
	}
	s.injected.Add(1)
	return &InjectedError{Op: op, Err: err}
}

// ReadAt implements Store.
func (s *FaultStore) ReadAt(bufs [][]byte, off int64) error {
	if err := s.fault(Operation{FaultRead, off, totalLen(bufs)}); err != nil {
		return err
	}
	return s.inner.ReadAt(bufs, off)
}

// WriteAt implements Store.
func (s *FaultStore) WriteAt(bufs [][]byte, off int64) error {
	if err := s.fault(Operation{FaultWrite, off, totalLen(bufs)}); err != nil {
		return err
	}
	return s.inner.WriteAt(bufs, off)
}

// WriteAtDurable implements DurableWriter.
func (s *FaultStore) WriteAtDurable(bufs [][]byte, off int64) error {
	if err := s.fault(Operation{FaultWriteDurable, off, totalLen(bufs)}); err != nil {
		return err
	}
	if dw, ok := s.inner.(DurableWriter); ok {
		return dw.WriteAtDurable(bufs, off)
	}
	if err := s.inner.WriteAt(bufs, off); err != nil {
		return err
	}
	return s.inner.Sync()
}

// Sync implements Store.
func (s *FaultStore) Sync() error {
	if err := s.fault(Operation{Op: FaultSync}); err != nil {
		return err
	}
	return s.inner.Sync()
}

// Discard implements Discarder.
func (s *FaultStore) Discard(off, n int64) error {
	if err := s.fault(Operation{FaultDiscard, off, n}); err != nil {
		return err
	}
	if d, ok := s.inner.(Discarder); ok {
		return d.Discard(off, n)
	}
	return nil
}

// WriteZeroes implements ZeroWriter.
func (s *FaultStore) WriteZeroes(off, n int64, unmap bool) error {
	if err := s.fault(Operation{FaultWriteZeroes, off, n}); err != nil {
		return err
	}
	if z, ok := s.inner.(ZeroWriter); ok {
		return z.WriteZeroes(off, n, unmap)
	}
	return writeZeroes(s.inner, off, n)
}

// Size implements Store.
func (s *FaultStore) Size() int64 { return s.inner.Size() }

// Close implements Store; it closes the wrapped store and is never failed.
func (s *FaultStore) Close() error { return s.inner.Close() }
