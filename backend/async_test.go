package backend

import (
	"bytes"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// asyncStore is a CrashStore that starts reads and writes as AsyncIO: each completes later, on
// a goroutine of its own, after hold is closed. With refuse set, StartIO refuses every request
// (it must then run on a lane).
type asyncStore struct {
	*CrashStore
	hold    chan struct{}
	refuse  bool
	started atomic.Int32
}

func (s *asyncStore) StartIO(r *Request, done func(*Request, error)) bool {
	if s.refuse {
		return false
	}
	s.started.Add(1)
	go func() {
		<-s.hold
		var err error
		if r.Op == OpWrite {
			err = s.WriteAt(r.Bufs, r.Offset)
		} else {
			err = s.ReadAt(r.Bufs, r.Offset)
		}
		done(r, err)
	}()
	return true
}

// TestAsyncIO: reads and writes of an AsyncIO store bypass the lanes and complete from the
// store's goroutines; a flush waits for those in flight (the barrier counts them until done)
// before it syncs; counters are kept; a request StartIO refuses runs on a lane.
func TestAsyncIO(t *testing.T) {
	s := &asyncStore{CrashStore: NewCrashStore(1 << 20), hold: make(chan struct{})}
	e := NewEngine(s, 1)
	defer e.Close()
	done := make(chanDone, 16)
	data := bytes.Repeat([]byte{0x5a}, 4096)
	w := &Request{Op: OpWrite, Offset: 8192, Bufs: [][]byte{data[:512], data[512:]}, Done: done}
	e.Submit(w)
	if s.started.Load() != 1 {
		t.Fatal("the write did not go to StartIO")
	}
	flushed := make(chan error, 1)
	go func() { flushed <- e.Flush() }()
	select {
	case <-flushed:
		t.Fatal("the flush finished while a write was in flight in the store")
	case <-time.After(50 * time.Millisecond):
	}
	if s.Syncs() != 0 {
		t.Fatal("synced before the write in flight finished")
	}
	close(s.hold)
	if r := <-done; r != w || r.Err != nil {
		t.Fatalf("write: %v", r.Err)
	}
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if s.Syncs() != 1 {
		t.Fatalf("%d syncs, want 1", s.Syncs())
	}
	got := make([]byte, 4096)
	e.Submit(&Request{Op: OpRead, Offset: 8192, Bufs: [][]byte{got}, Done: done})
	if r := <-done; r.Err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", r.Err)
	}
	// Out of range: the store's error comes back.
	e.Submit(&Request{Op: OpRead, Offset: 1 << 20, Bufs: [][]byte{got}, Done: done})
	if r := <-done; r.Err == nil {
		t.Fatal("a read past the end succeeded")
	}
	st := e.Stats.Snapshot()
	if st.Writes != 1 || st.Reads != 2 || st.BytesWritten != 4096 || st.BytesRead != 4096 || st.Errors != 1 {
		t.Errorf("stats %+v", st)
	}
	// Discards never go to StartIO; refused reads and writes run on the lanes.
	s.refuse = true
	before := s.started.Load()
	var wg sync.WaitGroup
	for _, r := range []*Request{
		{Op: OpDiscard, Offset: 8192, Length: 4096, Done: done},
		{Op: OpWrite, Offset: 0, Bufs: [][]byte{data}, Done: done},
	} {
		wg.Add(1)
		go func() { defer wg.Done(); e.Submit(r) }()
		if r := <-done; r.Err != nil {
			t.Fatalf("%v: %v", r.Op, r.Err)
		}
	}
	wg.Wait()
	if s.started.Load() != before {
		t.Error("StartIO started a request it refused, or a discard")
	}
	if st := e.Stats.Snapshot(); st.Writes != 2 || st.Discards != 1 {
		t.Errorf("stats after the lane requests %+v", st)
	}
}
