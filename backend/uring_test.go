package backend

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// ioEngines are the engines every test here runs over: results, stats and
// the barrier must be the same on both.
var ioEngines = []IOEngine{IOEngineLanes, IOEngineURing}

// newTestEngine starts an engine of kind over s and closes it at the end of
// the test. It skips the test where the kernel has no io_uring or refuses it.
func newTestEngine(t testing.TB, s Store, kind IOEngine, lanes int) *Engine {
	t.Helper()
	e, err := NewEngineWith(s, EngineOptions{Lanes: lanes, IOEngine: kind})
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		t.Skipf("io_uring unavailable: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if kind == IOEngineURing && e.uring == nil {
		t.Fatalf("%T is not served through io_uring", s)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("close engine: %v", err)
		}
	})
	return e
}

// openPatternFile opens a store of size bytes in dir, filled with a pattern.
func openPatternFile(t testing.TB, dir string, size int64, opt FileOptions) (*FileStore, []byte) {
	t.Helper()
	path := filepath.Join(dir, "disk.img")
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i*7 + i>>9)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := OpenFile(path, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, data
}

// runRequest submits one request and waits for it.
func runRequest(e *Engine, r *Request) error {
	done := make(chanDone, 1)
	r.Done = done
	e.Submit(r)
	return (<-done).Err
}

// cutBufs cuts b into buffers of the given sizes (the rest in a last one).
func cutBufs(b []byte, sizes ...int) [][]byte {
	var bufs [][]byte
	for _, n := range sizes {
		bufs = append(bufs, b[:n:n])
		b = b[n:]
	}
	return append(bufs, b)
}

func TestURingReadWrite(t *testing.T) {
	const size = 1 << 20
	for _, kind := range ioEngines {
		t.Run(string(kind), func(t *testing.T) {
			s, data := openPatternFile(t, t.TempDir(), size, FileOptions{})
			e := newTestEngine(t, s, kind, 2)
			tests := []struct {
				name   string
				op     Op
				off    int64
				bufs   [][]byte
				want   error
				nbytes int64 // counted in BytesRead/BytesWritten
			}{
				{"read 4k", OpRead, 8192, cutBufs(make([]byte, 4096)), nil, 4096},
				{"read vectored", OpRead, 512, cutBufs(make([]byte, 12288), 512, 0, 3584, 4096), nil, 12288},
				{"read unaligned", OpRead, 77, cutBufs(make([]byte, 1000), 3), nil, 1000},
				{"read to the end", OpRead, size - 4096, cutBufs(make([]byte, 4096)), nil, 4096},
				{"read nothing", OpRead, 0, nil, nil, 0},
				{"read empty buffers", OpRead, 0, cutBufs(nil, 0, 0), nil, 0},
				{"read past the end", OpRead, size - 512, cutBufs(make([]byte, 1024)), ErrOutOfRange, 0},
				{"read at a negative offset", OpRead, -512, cutBufs(make([]byte, 512)), ErrOutOfRange, 0},
				{"write 4k", OpWrite, 4096, cutBufs(bytes.Repeat([]byte{0xa5}, 4096)), nil, 4096},
				{"write vectored", OpWrite, 65536, cutBufs(bytes.Repeat([]byte{0x5a}, 9000), 1, 4095, 0, 100), nil, 9000},
				{"write past the end", OpWrite, size, cutBufs(make([]byte, 1)), ErrOutOfRange, 0},
			}
			var want Snapshot
			for _, tc := range tests {
				t.Run(tc.name, func(t *testing.T) {
					err := runRequest(e, &Request{Op: tc.op, Offset: tc.off, Bufs: tc.bufs})
					if !errors.Is(err, tc.want) || (err == nil) != (tc.want == nil) {
						t.Fatalf("err = %v, want %v", err, tc.want)
					}
					switch tc.op {
					case OpRead:
						want.Reads++
						want.BytesRead += uint64(tc.nbytes)
					case OpWrite:
						want.Writes++
						want.BytesWritten += uint64(tc.nbytes)
					}
					if err != nil {
						want.Errors++
						return
					}
					got := bytes.Join(tc.bufs, nil)
					if tc.op == OpWrite {
						copy(data[tc.off:], got)
						got = make([]byte, len(got))
						if _, err := s.f.ReadAt(got, tc.off); err != nil && len(got) > 0 {
							t.Fatal(err)
						}
					}
					if !bytes.Equal(got, data[tc.off:tc.off+int64(len(got))]) {
						t.Fatalf("%v at %d: the data differs from the file's", tc.op, tc.off)
					}
				})
			}
			if got := e.Stats.Snapshot(); got != want {
				t.Errorf("stats %+v, want %+v", got, want)
			}
		})
	}
}

func TestURingReadOnly(t *testing.T) {
	for _, kind := range ioEngines {
		t.Run(string(kind), func(t *testing.T) {
			s, _ := openPatternFile(t, t.TempDir(), 1<<16, FileOptions{ReadOnly: true})
			e := newTestEngine(t, s, kind, 1)
			if err := runRequest(e, &Request{Op: OpWrite, Bufs: [][]byte{make([]byte, 512)}}); !errors.Is(err, ErrReadOnly) {
				t.Errorf("write to a read-only store: %v, want ErrReadOnly", err)
			}
			if err := runRequest(e, &Request{Op: OpRead, Bufs: [][]byte{make([]byte, 512)}}); err != nil {
				t.Errorf("read from a read-only store: %v", err)
			}
			if got := e.Stats.Snapshot(); got.Writes != 1 || got.Reads != 1 || got.Errors != 1 || got.BytesRead != 512 {
				t.Errorf("stats %+v, want one write failed and one read of 512 bytes", got)
			}
		})
	}
}

// TestURingFileShrank reads across the end of a file that was truncated
// underneath the store: a short read, resumed, then a zero-byte read, which
// is ErrShortIO; the bytes before the end are read.
func TestURingFileShrank(t *testing.T) {
	for _, kind := range ioEngines {
		t.Run(string(kind), func(t *testing.T) {
			s, data := openPatternFile(t, t.TempDir(), 1<<16, FileOptions{})
			e := newTestEngine(t, s, kind, 1)
			if err := s.f.Truncate(1<<15 + 100); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4096)
			err := runRequest(e, &Request{Op: OpRead, Offset: 1<<15 - 1000, Bufs: cutBufs(buf, 700, 1000)})
			if !errors.Is(err, ErrShortIO) {
				t.Fatalf("read across the new end: %v, want ErrShortIO", err)
			}
			if !bytes.Equal(buf[:1100], data[1<<15-1000:1<<15+100]) {
				t.Error("the bytes before the end were not read")
			}
			if got := e.Stats.Snapshot(); got.Reads != 1 || got.Errors != 1 || got.BytesRead != 0 {
				t.Errorf("stats %+v, want one failed read", got)
			}
		})
	}
}

// pipeStore reads from and writes to pipes, so that a test controls when a
// transfer progresses: a write blocks while the pipe is full, a read returns
// what is in the pipe (a short read) and blocks while it is empty. Offsets
// are ignored. Through RawFD the engine issues its requests to io_uring.
type pipeStore struct {
	nullStore
	rd, wr [2]int // rd: the engine reads rd[0], the test writes rd[1]; wr likewise

	mu    sync.Mutex
	syncs int
	// syncing, if set, is called at the start of every Sync.
	syncing func()
}

func newPipeStore(t *testing.T) *pipeStore {
	t.Helper()
	s := &pipeStore{}
	for _, p := range []*[2]int{&s.rd, &s.wr} {
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
	}
	return s
}

// fill makes the write pipe full, so that the engine's next write blocks.
func (s *pipeStore) fill(t *testing.T) int {
	t.Helper()
	n, err := unix.FcntlInt(uintptr(s.wr[1]), unix.F_SETPIPE_SZ, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(s.wr[1], make([]byte, n)); err != nil {
		t.Fatal(err)
	}
	return n
}

func (s *pipeStore) RawFD(write bool, bufs [][]byte, off int64) (int, bool, error) {
	if write {
		return s.wr[1], true, nil
	}
	return s.rd[0], true, nil
}

func (s *pipeStore) ReadAt(bufs [][]byte, off int64) error {
	return vectored(bufs, off, func(iov [][]byte, _ int64) (int, error) { return unix.Readv(s.rd[0], iov) })
}

func (s *pipeStore) WriteAt(bufs [][]byte, off int64) error {
	return vectored(bufs, off, func(iov [][]byte, _ int64) (int, error) { return unix.Writev(s.wr[1], iov) })
}

func (s *pipeStore) Sync() error {
	s.mu.Lock()
	s.syncs++
	f := s.syncing
	s.mu.Unlock()
	if f != nil {
		f()
	}
	return nil
}

func (s *pipeStore) syncCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.syncs
}

// TestURingShortReadResumes feeds a vectored read in pieces: each short read
// is resumed in the right buffer at the right place.
func TestURingShortReadResumes(t *testing.T) {
	for _, kind := range ioEngines {
		t.Run(string(kind), func(t *testing.T) {
			s := newPipeStore(t)
			e := newTestEngine(t, s, kind, 1)
			want := make([]byte, 300)
			for i := range want {
				want[i] = byte(i)
			}
			buf := make([]byte, 300)
			done := make(chanDone, 1)
			e.Submit(&Request{Op: OpRead, Bufs: cutBufs(buf, 60, 80, 0), Done: done})
			for _, piece := range [][]byte{want[:100], want[100:130], want[130:]} {
				time.Sleep(10 * time.Millisecond)
				select {
				case r := <-done:
					t.Fatalf("read completed (err %v) before all its data was there", r.Err)
				default:
				}
				if _, err := unix.Write(s.rd[1], piece); err != nil {
					t.Fatal(err)
				}
			}
			if r := <-done; r.Err != nil {
				t.Fatal(r.Err)
			}
			if !bytes.Equal(buf, want) {
				t.Fatalf("read %v, want %v", buf, want)
			}
			if got := e.Stats.Snapshot(); got.Reads != 1 || got.BytesRead != 300 || got.Errors != 0 {
				t.Errorf("stats %+v, want one read of 300 bytes", got)
			}
		})
	}
}

// TestURingErrno: a failed transfer is an error wrapping the errno, with the
// offset, like the lanes' (here EPIPE: the pipe has no reader).
func TestURingErrno(t *testing.T) {
	for _, kind := range ioEngines {
		t.Run(string(kind), func(t *testing.T) {
			s := newPipeStore(t)
			e := newTestEngine(t, s, kind, 1)
			unix.Close(s.wr[0])
			err := runRequest(e, &Request{Op: OpWrite, Offset: 4096, Bufs: [][]byte{make([]byte, 512)}})
			if !errors.Is(err, unix.EPIPE) {
				t.Fatalf("write to a pipe without reader: %v, want EPIPE", err)
			}
			if want := "at offset 4096: "; err != nil && !bytes.HasPrefix([]byte(err.Error()), []byte(want)) {
				t.Errorf("error %q does not start with %q", err, want)
			}
			if got := e.Stats.Snapshot(); got.Writes != 1 || got.Errors != 1 || got.BytesWritten != 0 {
				t.Errorf("stats %+v, want one failed write", got)
			}
		})
	}
}

// TestURingFlushWaitsForWrite holds a write in the kernel (the pipe is full)
// and checks the barrier around it: a flush does not sync while the write
// runs, a later request is not admitted until the flush has finished, and
// the write's data has been transferred when the sync starts. The broken
// barrier (sync before drain) must fail the same check.
func TestURingFlushWaitsForWrite(t *testing.T) {
	for _, kind := range ioEngines {
		for _, broken := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/broken=%v", kind, broken), func(t *testing.T) {
				s := newPipeStore(t)
				capacity := s.fill(t)
				e := newTestEngine(t, s, kind, 2)
				e.Barrier().SetUnsafeSyncBeforeDrain(broken)
				o := &recordingObserver{}
				e.SetObserver(o)

				// What the pipe holds when the sync starts: capacity while the
				// write is held, its 512 bytes once the test drained the pipe
				// and the write went through.
				var inPipe atomic.Int64
				inPipe.Store(-1)
				s.syncing = func() {
					n, err := unix.IoctlGetInt(s.wr[0], unix.TIOCINQ) // FIONREAD
					if err != nil {
						t.Error(err)
					}
					inPipe.Store(int64(n))
				}
				held := make(chanDone, 1)
				e.Submit(&Request{Op: OpWrite, Bufs: [][]byte{make([]byte, 512)}, Done: held})
				flushed := make(chan error, 1)
				go func() { flushed <- e.Flush() }()
				for e.Barrier().epochOpen() {
					time.Sleep(time.Millisecond)
				}
				later := make(chan struct{})
				go func() {
					// A write: a flush holds no read (TestBarrierFlushDoesNotWaitForReads).
					runRequest(e, &Request{Op: OpWrite, Bufs: [][]byte{make([]byte, 1)}})
					close(later)
				}()
				time.Sleep(30 * time.Millisecond)
				if broken {
					if s.syncCount() == 0 {
						t.Fatal("the broken barrier did not sync before the drain")
					}
				} else if n := s.syncCount(); n != 0 {
					t.Fatalf("the flush synced %d times while an earlier write was still in the kernel", n)
				}
				select {
				case <-later:
					t.Fatal("a request was admitted during the flush")
				case r := <-held:
					t.Fatalf("the held write completed (err %v) while the pipe was full", r.Err)
				default:
				}

				// Drain the pipe: the write finishes, then the flush.
				if n, err := unix.Read(s.wr[0], make([]byte, capacity)); err != nil || n != capacity {
					t.Fatalf("drain the pipe: %d bytes, %v", n, err)
				}
				r := <-held
				if r.Err != nil {
					t.Fatal(r.Err)
				}
				if err := <-flushed; err != nil {
					t.Fatal(err)
				}
				<-later
				want := int64(512)
				if broken {
					want = int64(capacity)
				}
				if got := inPipe.Load(); got != want {
					t.Errorf("the pipe held %d bytes when the sync started, want %d", got, want)
				}
				if got := e.Stats.Snapshot(); got.Writes != 2 || got.BytesWritten != 513 || got.Reads != 0 || got.Flushes != 1 {
					t.Errorf("stats %+v", got)
				}
				o.mu.Lock()
				defer o.mu.Unlock()
				if len(o.requests) != 2 || o.requests[0].op != OpWrite || o.requests[0].d < 30*time.Millisecond {
					t.Errorf("observed %+v, want the held write first, lasting at least 30ms", o.requests)
				}
			})
		}
	}
}

// syncSnapshotStore is a FileStore whose Sync copies the file's contents
// first, on the logical clock of the workload: what a crash right after the
// sync would keep.
type syncSnapshotStore struct {
	*FileStore
	clock *atomic.Int64

	mu    sync.Mutex
	syncs []snapshotSync
}

type snapshotSync struct {
	start, end int64
	data       []byte
}

func (s *syncSnapshotStore) Sync() error {
	start := s.clock.Add(1)
	data := make([]byte, s.Size())
	if _, err := s.f.ReadAt(data, 0); err != nil {
		return err
	}
	err := s.FileStore.Sync()
	end := s.clock.Add(1)
	s.mu.Lock()
	s.syncs = append(s.syncs, snapshotSync{start, end, data})
	s.mu.Unlock()
	return err
}

// TestURingBarrierWorkload: queues submit tagged writes and flushes
// concurrently; every write submitted before a flush started must be in the
// file when the sync of that flush starts.
func TestURingBarrierWorkload(t *testing.T) {
	const queues, opsPerQueue, tag = 4, 300, 8
	for _, kind := range ioEngines {
		t.Run(string(kind), func(t *testing.T) {
			fs, _ := openPatternFile(t, t.TempDir(), tag*queues*opsPerQueue+tag, FileOptions{})
			s := &syncSnapshotStore{FileStore: fs, clock: new(atomic.Int64)}
			e := newTestEngine(t, s, kind, 4)
			type flushRec struct {
				before   []int64
				returned int64
			}
			var (
				mu        sync.Mutex
				submitted []int64
				flushes   []flushRec
				nextID    atomic.Int64
				wg        sync.WaitGroup
				pending   sync.WaitGroup
			)
			for q := range queues {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(q), 1))
					for range opsPerQueue {
						if rng.IntN(8) == 0 {
							mu.Lock()
							before := append([]int64(nil), submitted...)
							mu.Unlock()
							if err := e.Flush(); err != nil {
								t.Errorf("flush: %v", err)
							}
							rec := flushRec{before, s.clock.Add(1)}
							mu.Lock()
							flushes = append(flushes, rec)
							mu.Unlock()
							continue
						}
						id := nextID.Add(1)
						buf := make([]byte, tag)
						buf[0], buf[1], buf[2] = 0xee, byte(id), byte(id>>8)
						pending.Add(1)
						e.Submit(&Request{Op: OpWrite, Offset: id * tag, Bufs: [][]byte{buf}, Done: doneCounter{&pending}})
						mu.Lock()
						submitted = append(submitted, id)
						mu.Unlock()
					}
				}()
			}
			wg.Wait()
			pending.Wait()
			if len(flushes) == 0 {
				t.Fatal("no flushes")
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			bad := 0
			for _, f := range flushes {
				var sy *snapshotSync
				for i := range s.syncs {
					if s.syncs[i].end < f.returned && (sy == nil || s.syncs[i].start > sy.start) {
						sy = &s.syncs[i]
					}
				}
				if sy == nil {
					t.Fatal("a flush returned without a sync")
				}
				for _, id := range f.before {
					if b := sy.data[id*tag:]; b[0] != 0xee || b[1] != byte(id) || b[2] != byte(id>>8) {
						if bad++; bad == 1 {
							t.Errorf("write %d, submitted before a flush, was not in the file when its sync started", id)
						}
					}
				}
			}
			if bad > 0 {
				t.Errorf("%d violations", bad)
			}
			if got := e.Stats.Writes.Load(); got != uint64(nextID.Load()) {
				t.Errorf("Stats.Writes = %d, want %d", got, nextID.Load())
			}
		})
	}
}

// countingStore counts the calls that reach the FileStore's own methods, as
// opposed to those the engine issues on its fd through io_uring.
type countingStore struct {
	*FileStore
	reads, writes, durable atomic.Int32
}

func (s *countingStore) ReadAt(bufs [][]byte, off int64) error {
	s.reads.Add(1)
	return s.FileStore.ReadAt(bufs, off)
}

func (s *countingStore) WriteAt(bufs [][]byte, off int64) error {
	s.writes.Add(1)
	return s.FileStore.WriteAt(bufs, off)
}

func (s *countingStore) WriteAtDurable(bufs [][]byte, off int64) error {
	s.durable.Add(1)
	return s.FileStore.WriteAtDurable(bufs, off)
}

// TestURingWriteThroughUsesLanes: reads and writes go through the ring, but
// write-through writes must be durable when they complete, which the lanes
// do (RWF_DSYNC).
func TestURingWriteThroughUsesLanes(t *testing.T) {
	fs, _ := openPatternFile(t, t.TempDir(), 1<<16, FileOptions{})
	s := &countingStore{FileStore: fs}
	e := newTestEngine(t, s, IOEngineURing, 1)
	buf := [][]byte{make([]byte, 512)}
	for _, step := range []struct {
		name                   string
		writeThrough           bool
		op                     Op
		reads, writes, durable int32
	}{
		{"read", false, OpRead, 0, 0, 0},
		{"write", false, OpWrite, 0, 0, 0},
		{"write-through write", true, OpWrite, 0, 0, 1},
		{"write-through read", true, OpRead, 0, 0, 1},
		{"write again", false, OpWrite, 0, 0, 1},
	} {
		e.SetWriteThrough(step.writeThrough)
		if err := runRequest(e, &Request{Op: step.op, Bufs: buf}); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		if r, w, d := s.reads.Load(), s.writes.Load(), s.durable.Load(); r != step.reads || w != step.writes || d != step.durable {
			t.Fatalf("after %s: store saw %d reads, %d writes, %d durable writes; want %d, %d, %d",
				step.name, r, w, d, step.reads, step.writes, step.durable)
		}
	}
}

// TestURingCloseLeaksNothing opens and closes engines and counts the
// process's file descriptors.
func TestURingCloseLeaksNothing(t *testing.T) {
	s, _ := openPatternFile(t, t.TempDir(), 1<<16, FileOptions{})
	countFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	// One engine first, so that lazily opened runtime fds (the netpoller's
	// epoll) are there before counting.
	e, err := NewEngineWith(s, EngineOptions{Lanes: 1, IOEngine: IOEngineURing})
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		t.Skipf("io_uring unavailable: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	e.Close()
	before := countFDs()
	for range 20 {
		e, err := NewEngineWith(s, EngineOptions{Lanes: 2, IOEngine: IOEngineURing})
		if err != nil {
			t.Fatal(err)
		}
		if n := countFDs(); n != before+2 {
			t.Errorf("an open engine holds %d fds, want 2 (ring and eventfd)", n-before)
		}
		var wg sync.WaitGroup
		for i := range 64 {
			wg.Add(1)
			op := OpRead
			if i%2 == 0 {
				op = OpWrite
			}
			e.Submit(&Request{Op: op, Offset: int64(i) * 512, Bufs: [][]byte{make([]byte, 512)}, Done: doneCounter{&wg}})
		}
		if err := e.Close(); err != nil { // drains the 64 first
			t.Fatal(err)
		}
		wg.Wait()
	}
	if after := countFDs(); after != before {
		t.Errorf("%d fds after closing the engines, %d before", after, before)
	}
}

// TestURingSetupFailure: without io_uring, NewEngineWith says so.
func TestURingSetupFailure(t *testing.T) {
	defer func(f func(uint32, *uringParams) (int, error)) { uringSetup = f }(uringSetup)
	uringSetup = func(uint32, *uringParams) (int, error) { return -1, unix.ENOSYS }
	s, _ := openPatternFile(t, t.TempDir(), 4096, FileOptions{})
	e, err := NewEngineWith(s, EngineOptions{Lanes: 1, IOEngine: IOEngineURing})
	if e != nil || !errors.Is(err, unix.ENOSYS) {
		t.Fatalf("NewEngineWith = %v, %v; want an error wrapping ENOSYS", e, err)
	}
	t.Log(err)
}

// directStore is a file opened with O_DIRECT, offered whole to the engine as
// RawIO: its completions come from the block layer (task work), not from an
// io-wq worker, which is what the ring's eventfd must report too.
type directStore struct {
	nullStore
	fd   int
	size int64
}

func (s *directStore) RawFD(write bool, bufs [][]byte, off int64) (int, bool, error) {
	return s.fd, true, nil
}

func (s *directStore) Size() int64 { return s.size }

func (s *directStore) ReadAt(bufs [][]byte, off int64) error {
	return vectored(bufs, off, func(iov [][]byte, off int64) (int, error) { return unix.Preadv(s.fd, iov, off) })
}

func (s *directStore) WriteAt(bufs [][]byte, off int64) error {
	return vectored(bufs, off, func(iov [][]byte, off int64) (int, error) { return unix.Pwritev(s.fd, iov, off) })
}

func TestURingDirectIO(t *testing.T) {
	const size, bs = 1 << 22, 4096
	path := filepath.Join(t.TempDir(), "direct.img")
	if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("O_DIRECT: %v", err)
	}
	defer unix.Close(fd)
	e := newTestEngine(t, &directStore{fd: fd, size: size}, IOEngineURing, 1)
	mem, err := unix.Mmap(-1, 0, 2*64*bs, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	wbufs, rbufs := mem[:64*bs], mem[64*bs:]
	for i := range wbufs {
		wbufs[i] = byte(i * 13)
	}
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Add(1)
		e.Submit(&Request{Op: OpWrite, Offset: int64(i) * 2 * bs, Bufs: [][]byte{wbufs[i*bs : (i+1)*bs]}, Done: doneCounter{&wg}})
	}
	wg.Wait()
	reqs := make([]Request, 64)
	for i := range reqs {
		wg.Add(1)
		reqs[i] = Request{Op: OpRead, Offset: int64(i) * 2 * bs, Bufs: [][]byte{rbufs[i*bs : (i+1)*bs]}, Done: doneCounter{&wg}}
		e.Submit(&reqs[i])
	}
	wg.Wait()
	for i := range reqs {
		if reqs[i].Err != nil {
			t.Fatal(reqs[i].Err)
		}
	}
	if !bytes.Equal(rbufs, wbufs) {
		t.Fatal("read back other data than was written")
	}
	if got := e.Stats.Snapshot(); got.Errors != 0 || got.BytesWritten != 64*bs || got.BytesRead != 64*bs {
		t.Errorf("stats %+v", got)
	}
}

// benchFile is a file of size bytes on tmpfs (/dev/shm) where there is one,
// or in VUBLK_BENCH_DIR, written whole so that reads find data (in the page
// cache on a disk file system, as long as it fits).
func benchFile(b *testing.B, size int64) *FileStore {
	dir := os.Getenv("VUBLK_BENCH_DIR")
	if dir == "" {
		dir = "/dev/shm"
	}
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		dir = b.TempDir()
	}
	f, err := os.CreateTemp(dir, "vublk-bench-*.img")
	if err != nil {
		b.Fatal(err)
	}
	path := f.Name()
	b.Cleanup(func() { os.Remove(path) })
	chunk := bytes.Repeat([]byte{0x5a}, 1<<20)
	for off := int64(0); off < size; off += int64(len(chunk)) {
		if _, err := f.WriteAt(chunk, off); err != nil {
			b.Fatal(err)
		}
	}
	f.Close()
	s, err := OpenFile(path, FileOptions{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// cpuTime is the CPU time the process has used (user and system, every
// thread, io_uring's workers included).
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkFileEngine compares the engines on 4 KiB random reads and writes
// to a tmpfs file (VUBLK_BENCH_DIR to put it elsewhere): queues goroutines
// (virtqueues) keep depth requests each in flight. ns/op is the inverse of
// the throughput; cpu-ns/op is the CPU the whole process spent per request.
func BenchmarkFileEngine(b *testing.B) {
	const size = 256 << 20
	for _, rw := range []string{"randread", "randwrite"} {
		for _, c := range []struct{ queues, depth int }{{1, 1}, {1, 8}, {1, 32}, {2, 32}, {4, 32}} {
			for _, kind := range ioEngines {
				b.Run(fmt.Sprintf("%s/q=%d/qd=%d/%s", rw, c.queues, c.depth, kind), func(b *testing.B) {
					e := newTestEngine(b, benchFile(b, size), kind, runtime.NumCPU())
					runEngineBench(b, e, rw == "randwrite", size, c.queues, c.depth, nil)
				})
			}
		}
	}
}

// BenchmarkDirectEngine is BenchmarkFileEngine with O_DIRECT on a file in
// VUBLK_BENCH_DIR (default: the test's temporary directory, so a real disk,
// not tmpfs): there requests wait for the device and io_uring keeps many in
// flight where each lane keeps one.
func BenchmarkDirectEngine(b *testing.B) {
	const size = 256 << 20
	dir := os.Getenv("VUBLK_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	}
	path := filepath.Join(dir, "vublk-direct-bench.img")
	b.Cleanup(func() { os.Remove(path) })
	if err := os.WriteFile(path, bytes.Repeat([]byte{0x5a}, size), 0o644); err != nil {
		b.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Skipf("O_DIRECT: %v", err)
	}
	b.Cleanup(func() { unix.Close(fd) })
	s := &directStore{fd: fd, size: size}
	for _, rw := range []string{"randread", "randwrite"} {
		for _, c := range []struct{ queues, depth int }{{1, 1}, {1, 32}, {2, 32}} {
			for _, k := range []struct {
				kind  IOEngine
				lanes int
			}{{IOEngineLanes, runtime.NumCPU()}, {IOEngineLanes, 32}, {IOEngineURing, runtime.NumCPU()}} {
				b.Run(fmt.Sprintf("%s/q=%d/qd=%d/%s-%d", rw, c.queues, c.depth, k.kind, k.lanes), func(b *testing.B) {
					e := newTestEngine(b, s, k.kind, k.lanes)
					runEngineBench(b, e, rw == "randwrite", size, c.queues, c.depth, func() []byte {
						m, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
						if err != nil {
							b.Fatal(err)
						}
						b.Cleanup(func() { unix.Munmap(m) })
						return m
					})
				})
			}
		}
	}
}

// runEngineBench runs b.N random 4 KiB requests on e from queues goroutines
// with depth requests each in flight. alloc makes a buffer (nil: the Go heap).
func runEngineBench(b *testing.B, e *Engine, write bool, size int64, queues, depth int, alloc func() []byte) {
	const bs = 4096
	op := OpRead
	if write {
		op = OpWrite
	}
	if alloc == nil {
		alloc = func() []byte { return make([]byte, bs) }
	}
	bufs := make([][]byte, queues*depth)
	for i := range bufs {
		bufs[i] = alloc()
	}
	var left atomic.Int64
	left.Store(int64(b.N))
	b.SetBytes(bs)
	b.ReportAllocs()
	cpu0 := cpuTime(b)
	b.ResetTimer()
	var wg sync.WaitGroup
	for q := range queues {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(q), 3))
			done := make(chanDone, depth)
			reqs := make([]Request, depth)
			inflight := 0
			for i := range reqs {
				if left.Add(-1) < 0 {
					break
				}
				reqs[i] = Request{Op: op, Offset: rng.Int64N(size/bs) * bs, Bufs: bufs[q*depth+i : q*depth+i+1], Done: done}
				e.Submit(&reqs[i])
				inflight++
			}
			for inflight > 0 {
				r := <-done
				inflight--
				if r.Err != nil {
					b.Error(r.Err)
					return
				}
				if left.Add(-1) >= 0 {
					r.Offset = rng.Int64N(size/bs) * bs
					e.Submit(r)
					inflight++
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/op")
}
