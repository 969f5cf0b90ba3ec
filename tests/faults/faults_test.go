// Package faults drives the whole stack (the test front-end through the
// vhost-user socket, rings, lanes, barrier) over stores that fail: injected
// I/O errors, a failed fsync, a file truncated underneath, a full disk. A
// failing store must cost the guest exactly the affected requests, each
// completed with VIRTIO_BLK_S_IOERR and logged with its reason; nothing
// panics, and other requests and other exports keep working.
package faults

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

const (
	diskSize   = 16 << 20
	sectorSize = virtio.SectorSize
	numQueues  = 2
	// guard bounds waits that only a deadlock could make long.
	guard = time.Minute
)

// export is one served disk, wired as cmd/vublk wires it: a store, an
// engine with lanes, a virtio-blk device and a vhost-user server on a unix
// socket. Its log goes to a hook the test reads.
type export struct {
	t         *testing.T
	name      string
	store     backend.Store
	sock      string
	writeback bool
	logger    *logrus.Logger
	logs      *logtest.Hook

	engine *backend.Engine
	dev    *virtio.BlkDevice
	srv    *vhostuser.Server
	served chan error
}

func startExport(t *testing.T, name string, store backend.Store, writeback bool) *export {
	t.Helper()
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "vublk-faults")
	if err != nil {
		t.Fatal(err)
	}
	logger, hook := logtest.NewNullLogger()
	e := &export{t: t, name: name, store: store, sock: filepath.Join(dir, "sock"), writeback: writeback, logger: logger, logs: hook}
	e.serve()
	t.Cleanup(func() {
		e.stop()
		store.Close()
		os.RemoveAll(dir)
	})
	return e
}

// serve starts a new engine, device and server over the export's store.
func (e *export) serve() {
	e.t.Helper()
	log := e.logger.WithField("export", e.name)
	e.engine = backend.NewEngine(e.store, 4)
	e.dev = virtio.NewBlkDevice(e.engine, virtio.BlkConfig{
		Capacity: uint64(e.store.Size()), BlockSize: sectorSize, NumQueues: numQueues,
		Serial: e.name, Writeback: e.writeback, Discard: true,
	}, log)
	ln, err := vhostuser.Listen(e.sock)
	if err != nil {
		e.t.Fatal(err)
	}
	e.srv = vhostuser.NewServer(e.dev, numQueues, log)
	e.served = make(chan error, 1)
	go func() { e.served <- e.srv.Serve(ln) }()
}

// stop stops the server and the engine; the engine's final flush may fail
// (a latched sync failure), which is what a restart clears.
func (e *export) stop() {
	if e.srv == nil {
		return
	}
	e.srv.Close()
	if err := <-e.served; err != nil {
		e.t.Errorf("Serve: %v", err)
	}
	e.engine.Close()
	e.srv = nil
}

// restart stops the export and starts it again on the same store and
// socket, as `vublk serve` restarted (or a SIGHUP restart of one export).
func (e *export) restart() {
	e.stop()
	e.serve()
}

func (e *export) connect(t *testing.T) *frontend.Device {
	t.Helper()
	d, err := frontend.Connect(e.sock, frontend.Options{NumQueues: numQueues, QueueSize: 64, EventIdx: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// entries returns the export's log entries at level or more severe with
// message msg.
func (e *export) entries(level logrus.Level, msg string) []*logrus.Entry {
	var out []*logrus.Entry
	for _, en := range e.logs.AllEntries() {
		if en.Level <= level && (msg == "" || en.Message == msg) {
			out = append(out, en)
		}
	}
	return out
}

// errorText is the error an entry logged (WithError), as text.
func errorText(en *logrus.Entry) string {
	if err, ok := en.Data[logrus.ErrorKey].(error); ok {
		return err.Error()
	}
	return fmt.Sprint(en.Data[logrus.ErrorKey])
}

func pattern(seed byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// wait waits for p; the guard only turns a deadlock into a failure.
func wait(t *testing.T, p *frontend.Pending) frontend.Result {
	t.Helper()
	select {
	case <-p.Done():
		return p.Wait()
	case <-time.After(guard):
		t.Fatal("request did not complete")
		return frontend.Result{}
	}
}

// TestStoreErrorsFailOnlyTheAffectedRequests: one export's store fails
// reads and writes that touch one MiB-aligned 64 KiB range with EIO. Exactly
// the requests touching it complete with IOERR, each logged with its reason;
// all others, a flush, and a second export keep working.
func TestStoreErrorsFailOnlyTheAffectedRequests(t *testing.T) {
	const badOff, badLen = 1 << 20, 64 << 10
	inner := backend.NewCrashStore(diskSize)
	fs := backend.NewFaultStore(inner, backend.FaultRule{
		Ops: backend.Ops(backend.FaultRead, backend.FaultWrite), Offset: badOff, Length: badLen, Err: unix.EIO,
	})
	a := startExport(t, "a", fs, true)
	b := startExport(t, "b", backend.NewCrashStore(diskSize), true)
	da, db := a.connect(t), b.connect(t)

	sec := func(off int) uint64 { return uint64(off / sectorSize) }
	type req struct {
		name string
		r    frontend.Request
		fail bool
	}
	reqs := []req{
		{"write inside", frontend.WriteRequest(sec(badOff+4096), pattern(1, 4096)), true},
		{"read inside", frontend.ReadRequest(sec(badOff+badLen-512), 512), true},
		{"write over the start", frontend.WriteRequest(sec(badOff-2048), pattern(2, 4096)), true},
		{"read over the end", frontend.ReadRequest(sec(badOff+badLen-4096), 8192), true},
		{"write just before", frontend.WriteRequest(sec(badOff-4096), pattern(3, 4096)), false},
		{"write just after", frontend.WriteRequest(sec(badOff+badLen), pattern(4, 4096)), false},
		{"write elsewhere", frontend.WriteRequest(0, pattern(5, 64<<10)), false},
		{"read elsewhere", frontend.ReadRequest(sec(4<<20), 128<<10), false},
		{"discard inside", frontend.DiscardRequest(sec(badOff), 8), false}, // only reads and writes fail
		{"flush", frontend.FlushRequest(), false},
		{"get id", frontend.GetIDRequest(), false},
	}
	// Everything at once, over both queues of a and the queue of b.
	pa := make([]*frontend.Pending, len(reqs))
	var pb []*frontend.Pending
	for i, r := range reqs {
		p, err := da.Queue(i % numQueues).Submit(r.r)
		if err != nil {
			t.Fatal(err)
		}
		pa[i] = p
		p, err = db.Queue(i % numQueues).Submit(frontend.WriteRequest(sec(badOff)+uint64(i*8), pattern(byte(i), 4096)))
		if err != nil {
			t.Fatal(err)
		}
		pb = append(pb, p)
	}
	failed := 0
	for i, r := range reqs {
		res := wait(t, pa[i])
		switch {
		case r.fail && !errors.Is(res.Err, frontend.ErrIOError):
			t.Errorf("%s: %v, want IOERR", r.name, res.Err)
		case !r.fail && res.Err != nil:
			t.Errorf("%s: %v, want OK", r.name, res.Err)
		}
		if r.fail {
			failed++
		}
	}
	for i, p := range pb {
		if res := wait(t, p); res.Err != nil {
			t.Errorf("export b, write %d: %v", i, res.Err)
		}
	}

	// The failed writes never reached the store; the others did.
	img := inner.Image()
	if !bytes.Equal(img[badOff:badOff+badLen], make([]byte, badLen)) {
		t.Error("a failed write reached the store")
	}
	if !bytes.Equal(img[badOff+badLen:badOff+badLen+4096], pattern(4, 4096)) || !bytes.Equal(img[:64<<10], pattern(5, 64<<10)) {
		t.Error("a successful write is missing from the store")
	}
	// And the queues still work.
	for q := range numQueues {
		if got, err := da.Queue(q).Read(0, 64<<10); err != nil || !bytes.Equal(got, pattern(5, 64<<10)) {
			t.Errorf("queue %d: read after the failures: %v", q, err)
		}
	}

	// Each failure is counted and logged once, with the export, the
	// operation and the store's error.
	if n := a.dev.Errors(virtio.BlkSIOErr); n != uint64(failed) {
		t.Errorf("export a counted %d IOERR completions, want %d", n, failed)
	}
	if n := b.dev.Errors(virtio.BlkSIOErr); n != 0 {
		t.Errorf("export b counted %d IOERR completions, want 0", n)
	}
	logged := a.entries(logrus.ErrorLevel, "store operation failed")
	if len(logged) != failed {
		t.Errorf("export a logged %d store failures, want %d", len(logged), failed)
	}
	for _, en := range logged {
		if en.Data["export"] != "a" || en.Data["op"] == nil || en.Data["offset"] == nil || en.Data["queue"] == nil ||
			!strings.Contains(errorText(en), "input/output error") {
			t.Errorf("store failure logged without its reason: %v %v", en.Message, en.Data)
		}
	}
	if n := len(b.entries(logrus.WarnLevel, "")); n != 0 {
		t.Errorf("export b logged %d warnings or errors", n)
	}
}

// TestFailedFlushIsLatchedUntilRestart: a flush whose fsync fails completes
// with IOERR, and so does every later flush, on every queue, even once the
// store works again: after lost writeback no later sync can prove the
// earlier writes durable. Reads and writes go on. Restarting the export (a
// new engine on the same store) clears it. Another export is not affected.
func TestFailedFlushIsLatchedUntilRestart(t *testing.T) {
	inner := backend.NewCrashStore(diskSize)
	fs := backend.NewFaultStore(inner, nil)
	a := startExport(t, "a", fs, true)
	b := startExport(t, "b", backend.NewCrashStore(diskSize), true)
	da, db := a.connect(t), b.connect(t)
	q0, q1 := da.Queue(0), da.Queue(1)

	if err := q0.Write(0, pattern(1, 4096)); err != nil {
		t.Fatal(err)
	}
	if err := q0.Flush(); err != nil {
		t.Fatal(err)
	}
	fs.SetInjector(backend.FaultRule{Ops: backend.Ops(backend.FaultSync), Err: unix.EIO})
	if err := q1.Write(8, pattern(2, 4096)); err != nil {
		t.Fatalf("write while syncs fail: %v", err)
	}
	if err := q1.Flush(); !errors.Is(err, frontend.ErrIOError) {
		t.Fatalf("flush with a failing fsync: %v, want IOERR", err)
	}
	fs.SetInjector(nil) // the store recovers
	for i := range 4 {
		if err := da.Queue(i % numQueues).Flush(); !errors.Is(err, frontend.ErrIOError) {
			t.Fatalf("flush %d after the store recovered: %v, want the latched IOERR", i, err)
		}
	}
	if err := q0.Write(16, pattern(3, 4096)); err != nil {
		t.Errorf("write after the latched failure: %v", err)
	}
	if got, err := q1.Read(8, 4096); err != nil || !bytes.Equal(got, pattern(2, 4096)) {
		t.Errorf("read after the latched failure: %v", err)
	}
	if err := db.Queue(0).Write(0, pattern(4, 4096)); err != nil {
		t.Errorf("export b write: %v", err)
	}
	if err := db.Queue(1).Flush(); err != nil {
		t.Errorf("export b flush while a's flushes fail: %v", err)
	}

	// The first failure names the fsync error; the latched ones say so.
	logged := a.entries(logrus.ErrorLevel, "flush failed")
	if len(logged) != 5 {
		t.Errorf("logged %d failed flushes, want 5", len(logged))
	}
	for _, en := range logged {
		if msg := errorText(en); !strings.Contains(msg, backend.ErrSyncFailed.Error()) || !strings.Contains(msg, "input/output error") {
			t.Errorf("failed flush logged as %q", msg)
		}
	}
	if n := a.dev.Errors(virtio.BlkSIOErr); n != 5 {
		t.Errorf("export a counted %d IOERR completions, want 5", n)
	}

	// Restart the export: the front-end reconnects to a new engine.
	da.Close()
	a.restart()
	da = a.connect(t)
	if err := da.Queue(1).Flush(); err != nil {
		t.Fatalf("flush after the export restarted: %v", err)
	}
	for i, want := range [][]byte{pattern(1, 4096), pattern(2, 4096), pattern(3, 4096)} {
		if got, err := da.Queue(0).Read(uint64(8*i), 4096); err != nil || !bytes.Equal(got, want) {
			t.Errorf("block %d after the restart: %v", i, err)
		}
	}
}

// TestFailedWriteThroughSyncIsLatched: in write-through mode every write
// includes a data sync, so a write that fails there is latched like a failed
// flush.
func TestFailedWriteThroughSyncIsLatched(t *testing.T) {
	fs := backend.NewFaultStore(backend.NewCrashStore(diskSize), nil)
	a := startExport(t, "a", fs, false)
	d := a.connect(t)
	if err := d.Queue(0).Write(0, pattern(1, 4096)); err != nil {
		t.Fatal(err)
	}
	fs.SetInjector(backend.FaultRule{Ops: backend.Ops(backend.FaultWriteDurable), Err: unix.EIO})
	if err := d.Queue(0).Write(8, pattern(2, 4096)); !errors.Is(err, frontend.ErrIOError) {
		t.Fatalf("write-through write whose sync fails: %v, want IOERR", err)
	}
	fs.SetInjector(nil)
	if err := d.Queue(1).Write(8, pattern(2, 4096)); err != nil {
		t.Fatalf("write after the store recovered: %v", err)
	}
	if err := d.Queue(1).Flush(); !errors.Is(err, frontend.ErrIOError) {
		t.Fatalf("flush after a failed write-through sync: %v, want the latched IOERR", err)
	}
}

// TestTruncatedFile: the backing file is truncated underneath a running
// export. Reads beyond the new end complete with IOERR (a short read, logged),
// reads before it return the data, and nothing crashes.
func TestTruncatedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	store, err := backend.OpenFile(path, backend.FileOptions{CreateSize: diskSize})
	if err != nil {
		t.Fatal(err)
	}
	a := startExport(t, "a", store, true)
	d := a.connect(t)
	q := d.Queue(0)
	const early, late, newEnd = 1 << 20, 12 << 20, 8 << 20
	for _, off := range []int{early, late} {
		if err := q.Write(uint64(off/sectorSize), pattern(byte(off>>20), 64<<10)); err != nil {
			t.Fatal(err)
		}
	}
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}

	if err := os.Truncate(path, newEnd); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		off, n    int
		wantError bool
	}{
		{"beyond the new end", late, 64 << 10, true},
		{"across the new end", newEnd - 4096, 8192, true},
		{"the last block", diskSize - 4096, 4096, true},
		{"before the new end", early, 64 << 10, false},
		{"up to the new end", newEnd - 4096, 4096, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := d.Queue(1).Read(uint64(tc.off/sectorSize), tc.n)
			switch {
			case tc.wantError && !errors.Is(err, frontend.ErrIOError):
				t.Errorf("read: %v, want IOERR", err)
			case !tc.wantError && err != nil:
				t.Errorf("read: %v", err)
			case tc.off == early && !bytes.Equal(got, pattern(1, 64<<10)):
				t.Error("data before the new end changed")
			}
		})
	}
	logged := a.entries(logrus.ErrorLevel, "store operation failed")
	if len(logged) != 3 {
		t.Errorf("logged %d failed reads, want 3", len(logged))
	}
	for _, en := range logged {
		if !strings.Contains(errorText(en), backend.ErrShortIO.Error()) {
			t.Errorf("failed read logged as %q, want a short read", errorText(en))
		}
	}

	// Truncated to nothing: every read fails, the device still answers.
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Read(0, 4096); !errors.Is(err, frontend.ErrIOError) {
		t.Errorf("read of an empty file: %v, want IOERR", err)
	}
	if id, err := q.GetID(); err != nil || id != "a" {
		t.Errorf("GET_ID after the truncation: %q, %v", id, err)
	}
	if err := q.Flush(); err != nil {
		t.Errorf("flush after the truncation: %v", err)
	}
	// A write beyond the end may extend the file again or fail; either way
	// the queue keeps serving.
	res := q.Do(frontend.WriteRequest(uint64(late/sectorSize), pattern(9, 4096)))
	if res.Err != nil && !errors.Is(res.Err, frontend.ErrIOError) {
		t.Errorf("write beyond the end: %v", res.Err)
	}
	if err := q.Err(); err != nil {
		t.Errorf("queue failed: %v", err)
	}
}

// TestENOSPC: a full disk fails writes and write-zeroes with IOERR, logged
// as such; reads, discards and flushes go on (a write that failed dirtied
// nothing, so the flush is not latched); once there is space, writes work.
func TestENOSPC(t *testing.T) {
	path := filepath.Join(t.TempDir(), "disk.img")
	file, err := backend.OpenFile(path, backend.FileOptions{CreateSize: diskSize})
	if err != nil {
		t.Fatal(err)
	}
	fs := backend.NewFaultStore(file, nil)
	a := startExport(t, "a", fs, true)
	d := a.connect(t)
	q := d.Queue(0)
	if err := q.Write(0, pattern(1, 4096)); err != nil {
		t.Fatal(err)
	}
	fs.SetInjector(backend.FaultRule{
		Ops: backend.Ops(backend.FaultWrite, backend.FaultWriteDurable, backend.FaultWriteZeroes), Err: unix.ENOSPC,
	})
	if err := q.Write(8, pattern(2, 4096)); !errors.Is(err, frontend.ErrIOError) {
		t.Errorf("write on a full disk: %v, want IOERR", err)
	}
	if err := q.WriteZeroes(0, 8, false); !errors.Is(err, frontend.ErrIOError) {
		t.Errorf("write-zeroes on a full disk: %v, want IOERR", err)
	}
	if got, err := q.Read(0, 4096); err != nil || !bytes.Equal(got, pattern(1, 4096)) {
		t.Errorf("read on a full disk: %v", err)
	}
	if err := q.Discard(64, 8); err != nil {
		t.Errorf("discard on a full disk: %v", err)
	}
	if err := q.Flush(); err != nil {
		t.Errorf("flush after failed write-back writes: %v", err)
	}
	logged := a.entries(logrus.ErrorLevel, "store operation failed")
	if len(logged) != 2 {
		t.Errorf("logged %d failures, want 2", len(logged))
	}
	for _, en := range logged {
		if !strings.Contains(errorText(en), "no space left on device") {
			t.Errorf("failure logged as %q", errorText(en))
		}
	}
	// Write through (the guest switched the cache mode): IOERR as well.
	if err := d.SetWriteback(false); err != nil {
		t.Fatal(err)
	}
	if err := d.Queue(1).Write(8, pattern(2, 4096)); !errors.Is(err, frontend.ErrIOError) {
		t.Errorf("write-through write on a full disk: %v, want IOERR", err)
	}
	if err := d.SetWriteback(true); err != nil {
		t.Fatal(err)
	}

	fs.SetInjector(nil) // space again
	if err := q.Write(8, pattern(3, 4096)); err != nil {
		t.Fatalf("write once there is space: %v", err)
	}
	if got, err := d.Queue(1).Read(8, 4096); err != nil || !bytes.Equal(got, pattern(3, 4096)) {
		t.Errorf("read back: %v", err)
	}
}

// TestStorageErrorLogIsRateLimited: a disk that fails every request, and a
// latched fsync failure that fails every flush, must not flood the host's
// log: the first ten failures of a burst are logged at error level with
// their reason, the rest at debug level, and every request still gets its
// IOERR.
func TestStorageErrorLogIsRateLimited(t *testing.T) {
	const requests = 60
	inner := backend.NewCrashStore(diskSize)
	fs := backend.NewFaultStore(inner, backend.FaultRule{Ops: backend.Ops(backend.FaultRead), Err: unix.EIO})
	inner.SetSyncError(unix.EIO)
	a := startExport(t, "a", fs, true)
	a.logger.SetLevel(logrus.DebugLevel)
	d := a.connect(t)
	for i := range requests {
		q := d.Queue(i % numQueues)
		if _, err := q.Read(uint64(i*8), 4096); !errors.Is(err, frontend.ErrIOError) {
			t.Fatalf("read %d: %v, want IOERR", i, err)
		}
		if err := q.Flush(); !errors.Is(err, frontend.ErrIOError) {
			t.Fatalf("flush %d: %v, want IOERR", i, err)
		}
	}
	if n := a.dev.Errors(virtio.BlkSIOErr); n != 2*requests {
		t.Errorf("counted %d IOERR completions, want %d", n, 2*requests)
	}
	// One limit for all storage errors of the export: 10 lines at error level.
	reads, flushes := a.entries(logrus.ErrorLevel, "store operation failed"), a.entries(logrus.ErrorLevel, "flush failed")
	if n := len(reads) + len(flushes); n != 10 {
		t.Errorf("%d failed reads and %d failed flushes logged at error level, want 10 in all", len(reads), len(flushes))
	}
	for _, en := range append(reads, flushes...) {
		if !strings.Contains(errorText(en), "input/output error") {
			t.Errorf("%s logged without its reason: %v", en.Message, en.Data)
		}
	}
	debug := 0
	for _, en := range a.logs.AllEntries() {
		if en.Level == logrus.DebugLevel && (en.Message == "store operation failed" || en.Message == "flush failed") {
			debug++
		}
	}
	if debug != 2*requests-10 {
		t.Errorf("%d failures logged at debug level, want %d", debug, 2*requests-10)
	}
}
