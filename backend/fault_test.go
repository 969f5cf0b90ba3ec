package backend

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// truncatedMapping returns memory shared from a memfd that was then truncated
// to nothing, as a hostile front-end does to its guest memory: touching it
// raises SIGBUS.
func truncatedMapping(t *testing.T) []byte {
	t.Helper()
	fd, err := unix.MemfdCreate("vublk-fault-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Skipf("memfd_create: %v", err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 8192); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(fd, 0, 8192, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(mem) })
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	return mem
}

// TestMemoryFaultFailsOnlyTheRequest: a store that copies a request's buffers
// in user space (here the in-memory CrashStore; in production the O_DIRECT
// bounce buffer and the write log) faults on guest memory the front-end
// truncated. The request fails with ErrMemoryFault, on a lane and inline
// alike, and the engine goes on: later requests and flushes work.
func TestMemoryFaultFailsOnlyTheRequest(t *testing.T) {
	mem := truncatedMapping(t)
	for _, tc := range []struct {
		name   string
		submit func(e *Engine, r *Request)
	}{
		{"lane", func(e *Engine, r *Request) { e.Submit(r) }},
		{"inline", func(e *Engine, r *Request) {
			e.inline.avg.Store(0) // the gate is open
			if !e.SubmitIdle(r) {
				t.Fatal("the request did not run inline")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := NewEngine(NewCrashStore(1<<20), 2)
			defer e.Close()
			done := make(chanDone, 1)
			for _, op := range []Op{OpWrite, OpRead} {
				tc.submit(e, &Request{Op: op, Offset: 4096, Bufs: [][]byte{mem[:4096]}, Done: done})
				if r := <-done; !errors.Is(r.Err, ErrMemoryFault) {
					t.Errorf("%v on truncated memory: %v, want ErrMemoryFault", op, r.Err)
				}
			}
			tc.submit(e, &Request{Op: OpWrite, Offset: 0, Bufs: [][]byte{make([]byte, 4096)}, Done: done})
			if r := <-done; r.Err != nil {
				t.Errorf("write after the faults: %v", r.Err)
			}
			if err := e.Flush(); err != nil {
				t.Errorf("flush after the faults: %v", err)
			}
			if n := e.Stats.Errors.Load(); n != 2 {
				t.Errorf("counted %d errors, want 2", n)
			}
		})
	}
}
