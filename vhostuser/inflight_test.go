package vhostuser_test

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// The helper back-end: this test binary run again with VUBLK_HELPER_SOCKET
// set serves the image VUBLK_HELPER_IMAGE on that socket, like `vublk
// serve`, until it is killed. VUBLK_HELPER_LANES sets the lanes,
// VUBLK_HELPER_HANG makes every write at or beyond that byte offset hang
// forever (so it stays in flight), VUBLK_HELPER_DELAY_US delays every write
// by up to that many microseconds.
const helperQueues = 2

func TestInflightHelperBackend(t *testing.T) {
	sock := os.Getenv("VUBLK_HELPER_SOCKET")
	if sock == "" {
		t.Skip("the back-end process of the inflight tests, not a test")
	}
	envInt := func(name string) int64 {
		v, _ := strconv.ParseInt(os.Getenv(name), 10, 64)
		return v
	}
	lanes, hang, delay := int(envInt("VUBLK_HELPER_LANES")), envInt("VUBLK_HELPER_HANG"), envInt("VUBLK_HELPER_DELAY_US")
	file, err := backend.OpenFile(os.Getenv("VUBLK_HELPER_IMAGE"), backend.FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	store := backend.NewFaultStore(file, backend.InjectorFunc(func(op backend.Operation) error {
		if op.Op != backend.FaultWrite {
			return nil
		}
		if hang > 0 && op.Offset >= hang {
			select {} // in flight until the process dies
		}
		if delay > 0 {
			time.Sleep(time.Duration(rand.Int64N(delay)) * time.Microsecond)
		}
		return nil
	}))
	logger := logrus.New()
	logger.SetOutput(os.Stderr)
	logger.SetLevel(logrus.DebugLevel)
	log := logger.WithField("export", "helper")
	engine := backend.NewEngine(store, lanes)
	// Every request on a lane: a hanging write must not hold the queue's
	// goroutine, which must go on popping.
	engine.SetInlineLimit(0)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{
		Capacity: uint64(file.Size()), BlockSize: 512, NumQueues: helperQueues, Serial: "helper", Writeback: true, Discard: true,
		Packed: os.Getenv("VUBLK_HELPER_PACKED") == "1",
	}, log)
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println("HELPER READY")
	vhostuser.NewServer(dev, helperQueues, log).Serve(ln)
}

// helperBackend is a running helper process.
type helperBackend struct {
	cmd  *exec.Cmd
	mu   sync.Mutex
	log  bytes.Buffer // its stderr
	done chan struct{}
}

type helperOptions struct {
	lanes   int
	hang    int64 // writes at or beyond this offset never finish; 0: none
	delayUs int
	packed  bool // offer packed rings
}

func startHelper(t *testing.T, sock, image string, o helperOptions) *helperBackend {
	t.Helper()
	h := &helperBackend{cmd: exec.Command(os.Args[0], "-test.run=^TestInflightHelperBackend$"), done: make(chan struct{})}
	h.cmd.Env = append(os.Environ(), "VUBLK_HELPER_SOCKET="+sock, "VUBLK_HELPER_IMAGE="+image,
		fmt.Sprintf("VUBLK_HELPER_LANES=%d", o.lanes), fmt.Sprintf("VUBLK_HELPER_HANG=%d", o.hang),
		fmt.Sprintf("VUBLK_HELPER_DELAY_US=%d", o.delayUs), fmt.Sprintf("VUBLK_HELPER_PACKED=%d", map[bool]int{false: 0, true: 1}[o.packed]))
	stdout, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	h.cmd.Stderr = lockedWriter{&h.mu, &h.log}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			if sc.Text() == "HELPER READY" {
				ready <- true
			}
		}
		h.cmd.Wait()
		close(h.done)
	}()
	t.Cleanup(func() { h.kill() })
	select {
	case <-ready:
	case <-h.done:
		t.Fatalf("the helper back-end exited:\n%s", h.logs())
	case <-time.After(guard):
		t.Fatal("the helper back-end did not start")
	}
	return h
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func (h *helperBackend) logs() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.log.String()
}

// kill SIGKILLs the back-end: no cleanup, no draining, requests in flight
// stay in flight.
func (h *helperBackend) kill() {
	h.cmd.Process.Signal(syscall.SIGKILL)
	<-h.done
}

func newImage(t *testing.T, size int64) (dir, image string) {
	t.Helper()
	dir, err := os.MkdirTemp("", "vublk-inflight")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	image = filepath.Join(dir, "disk.img")
	f, err := backend.OpenFile(image, backend.FileOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	return dir, image
}

// waitFor polls cond until it holds; the guard only turns a hang into a
// failure.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(guard)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// failFast closes d as soon as one of its queues fails (the back-end
// signalled an error, or completed a request twice): waits and submissions
// then end with ErrClosed instead of blocking, and the test reports why.
func failFast(t *testing.T, d *frontend.Device) {
	done := make(chan struct{})
	t.Cleanup(func() { close(done) })
	for i := range d.NumQueues() {
		q := d.Queue(i)
		go func() {
			select {
			case <-q.Failed():
				t.Errorf("queue %d: %v", i, q.Err())
				d.Close()
			case <-done:
			}
		}()
	}
}

// checkExactlyOnce checks that every request the front-end made available
// has been completed exactly once: the used index caught up with the
// available index and never overtook it (a second used element for a
// request fails the queue, or pushes the used index past the available one).
func checkExactlyOnce(t *testing.T, d *frontend.Device) {
	t.Helper()
	for i := range d.NumQueues() {
		q := d.Queue(i)
		if err := q.Err(); err != nil {
			t.Errorf("queue %d: %v", i, err)
		}
		if avail, used := q.Indices(); avail != used {
			t.Errorf("queue %d: available index %d, used index %d", i, avail, used)
		}
		if n := d.InflightPending(i); n > 0 {
			t.Errorf("queue %d: %d descriptors still marked in flight", i, n)
		}
	}
}

// TestInflightResubmitsInOrderAfterKill kills the back-end with requests in
// flight on both queues and restarts it on the same socket and image. The
// front-end reconnects as QEMU does with reconnect=1; the new back-end
// resubmits the requests in the order the dead one had popped them, then
// goes on with what it had not popped, and the front-end sees each request
// complete once, with the right data.
func TestInflightResubmitsInOrderAfterKill(t *testing.T) { testInflightInOrder(t, false) }

// TestInflightPackedResubmitsInOrderAfterKill is TestInflightResubmitsInOrderAfterKill on packed
// rings.
func TestInflightPackedResubmitsInOrderAfterKill(t *testing.T) { testInflightInOrder(t, true) }

func testInflightInOrder(t *testing.T, packed bool) {
	const size, hang = 16 << 20, 1 << 20
	dir, image := newImage(t, size)
	sock := filepath.Join(dir, "sock")
	// One lane: requests run in the order they are submitted, so the
	// image shows the resubmission order.
	a := startHelper(t, sock, image, helperOptions{lanes: 1, hang: hang, packed: packed})
	d, err := frontend.Connect(sock, frontend.Options{NumQueues: helperQueues, QueueSize: 64, EventIdx: true, Inflight: true, Packed: packed})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	failFast(t, d)
	if d.ProtocolFeatures()&(1<<vhostuser.ProtocolFInflightShmfd) == 0 || d.InflightPending(0) != 0 {
		t.Fatalf("no inflight buffer: protocol features %#x", d.ProtocolFeatures())
	}
	q0, q1 := d.Queue(0), d.Queue(1)
	if err := q0.Write(0, pattern(1, 4096)); err != nil {
		t.Fatal(err)
	}
	sec := func(off int) uint64 { return uint64(off / 512) }
	submit := func(q *frontend.Queue, r frontend.Request) *frontend.Pending {
		p, err := q.Submit(r)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Queue 0: two writes to the same block (the second must win), a
	// third write, a flush (which waits for them, holding the queue), and
	// a write the back-end has not popped when it dies.
	w2 := submit(q0, frontend.WriteRequest(sec(hang), pattern(2, 4096)))
	w3 := submit(q0, frontend.WriteRequest(sec(hang), pattern(3, 4096)))
	w4 := submit(q0, frontend.WriteRequest(sec(2*hang), pattern(4, 4096)))
	fl := submit(q0, frontend.FlushRequest())
	w5 := submit(q0, frontend.WriteRequest(sec(3*hang), pattern(5, 4096)))
	waitFor(t, "the back-end to pop the requests of queue 0", func() bool { return d.InflightPending(0) == 4 })
	// Queue 1: a read, popped once the flush has closed the barrier, and
	// held there.
	rd := submit(q1, frontend.ReadRequest(0, 4096))
	waitFor(t, "the back-end to pop the read", func() bool { return d.InflightPending(1) == 1 })
	time.Sleep(20 * time.Millisecond) // anything else it would do, it does now
	for _, p := range []*frontend.Pending{w2, w3, w4, fl, w5, rd} {
		select {
		case <-p.Done():
			t.Fatalf("a request completed while the writes hang: %v", p.Wait())
		default:
		}
	}

	a.kill()
	if d.InflightPending(0) != 4 || d.InflightPending(1) != 1 {
		t.Fatalf("after the kill the buffer shows %d and %d in flight", d.InflightPending(0), d.InflightPending(1))
	}
	b := startHelper(t, sock, image, helperOptions{lanes: 1, packed: packed})
	if err := d.Reconnect(sock); err != nil {
		t.Fatalf("reconnect: %v\n%s", err, b.logs())
	}
	for i, p := range []*frontend.Pending{w2, w3, w4, fl, w5} {
		if res := wait(t, p); res.Err != nil {
			t.Errorf("queue 0 request %d after the restart: %v", i, res.Err)
		}
	}
	if res := wait(t, rd); res.Err != nil || !bytes.Equal(res.In, pattern(1, 4096)) {
		t.Errorf("read after the restart: %v", res.Err)
	}
	for off, want := range map[int][]byte{hang: pattern(3, 4096), 2 * hang: pattern(4, 4096), 3 * hang: pattern(5, 4096)} {
		if got, err := q1.Read(sec(off), 4096); err != nil || !bytes.Equal(got, want) {
			t.Errorf("block at %d after the restart: %v (writes resubmitted out of order?)", off, err)
		}
	}
	checkExactlyOnce(t, d)
	if !strings.Contains(b.logs(), "resuming the queue from the inflight buffer") && !strings.Contains(b.logs(), "resuming the packed queue from the inflight buffer") {
		t.Errorf("the new back-end did not log the resume:\n%s", b.logs())
	}
	if t.Failed() {
		t.Logf("first back-end:\n%s\nsecond back-end:\n%s", a.logs(), b.logs())
	}
}

// TestInflightSurvivesRepeatedKills kills the back-end at random moments
// under a load of slow, concurrent writes on both queues, five times. Every
// write completes exactly once and is on the disk; none is lost, none runs
// twice from the guest's view.
func TestInflightSurvivesRepeatedKills(t *testing.T) { testInflightRepeatedKills(t, false) }

// TestInflightPackedSurvivesRepeatedKills is TestInflightSurvivesRepeatedKills on packed rings,
// whose region keeps copies of the descriptors in flight (used descriptors overwrite them in the
// ring).
func TestInflightPackedSurvivesRepeatedKills(t *testing.T) { testInflightRepeatedKills(t, true) }

func testInflightRepeatedKills(t *testing.T, packed bool) {
	const size, block = 16 << 20, 4096
	rounds := 5
	if testing.Short() {
		rounds = 2
	}
	dir, image := newImage(t, size)
	sock := filepath.Join(dir, "sock")
	opts := helperOptions{lanes: 4, delayUs: 20000, packed: packed}
	h := startHelper(t, sock, image, opts)
	d, err := frontend.Connect(sock, frontend.Options{NumQueues: helperQueues, QueueSize: 32, EventIdx: true, Inflight: true, Packed: packed})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	failFast(t, d)
	if packed != (d.Features()&(1<<virtio.FRingPacked) != 0) {
		t.Fatalf("features %#x: packed rings %v not negotiated", d.Features(), packed)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	type write struct {
		p      *frontend.Pending
		sector uint64
		data   []byte
	}
	var writes []write
	var others []*frontend.Pending
	next, killedInFlight := 0, 0
	for round := range rounds {
		for range 40 + rng.IntN(40) {
			q := d.Queue(rng.IntN(helperQueues))
			if rng.IntN(10) == 0 {
				p, err := q.Submit(frontend.FlushRequest())
				if err != nil {
					t.Fatal(err)
				}
				others = append(others, p)
				continue
			}
			w := write{sector: uint64(next * block / 512), data: pattern(uint64(next), block)}
			next++
			if w.p, err = q.Submit(frontend.WriteRequest(w.sector, w.data)); err != nil {
				t.Fatal(err)
			}
			writes = append(writes, w)
		}
		time.Sleep(time.Duration(5+rng.IntN(30)) * time.Millisecond)
		h.kill()
		inflight := d.InflightPending(0) + d.InflightPending(1)
		killedInFlight += inflight
		h = startHelper(t, sock, image, opts)
		if err := d.Reconnect(sock); err != nil {
			t.Fatalf("round %d: reconnect: %v\n%s", round, err, h.logs())
		}
		t.Logf("round %d: killed with %d requests in flight", round, inflight)
	}
	for i, w := range writes {
		if res := wait(t, w.p); res.Err != nil {
			t.Fatalf("write %d: %v", i, res.Err)
		}
	}
	for i, p := range others {
		if res := wait(t, p); res.Err != nil {
			t.Fatalf("flush %d: %v", i, res.Err)
		}
	}
	checkExactlyOnce(t, d)
	if killedInFlight == 0 {
		t.Error("no kill found a request in flight: the test proves nothing")
	}
	for i, w := range writes {
		if got, err := d.Queue(i%helperQueues).Read(w.sector, block); err != nil || !bytes.Equal(got, w.data) {
			t.Fatalf("write %d is not on the disk: %v", i, err)
		}
	}
}

// TestInflightAcrossRingRestarts: with an inflight buffer, stopping and
// restarting queues (GET_VRING_BASE), replacing the memory table while
// requests run and resetting the device all keep working: each ring start
// resumes from the buffer, which must agree with the ring.
func TestInflightAcrossRingRestarts(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{NumQueues: 2, QueueSize: 64, EventIdx: true, Inflight: true})
	if d.InflightPending(0) != 0 {
		t.Fatal("no inflight buffer")
	}
	io := func(step string) {
		t.Helper()
		var ps []*frontend.Pending
		for i := range 40 {
			p, err := d.Queue(i % 2).Submit(frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096)))
			if err != nil {
				t.Fatal(err)
			}
			ps = append(ps, p)
		}
		for i, p := range ps {
			if res := wait(t, p); res.Err != nil {
				t.Fatalf("%s: write %d: %v", step, i, res.Err)
			}
		}
		checkExactlyOnce(t, d)
	}
	io("start")
	for q := range 2 {
		base, err := d.StopQueue(q)
		if err != nil {
			t.Fatal(err)
		}
		if avail, _ := d.Queue(q).Indices(); base != avail {
			t.Fatalf("queue %d stopped at %d, %d made available", q, base, avail)
		}
		if err := d.StartQueue(q); err != nil {
			t.Fatal(err)
		}
	}
	io("queues restarted")
	var ps []*frontend.Pending
	for i := range 20 {
		p, err := d.Queue(i % 2).Submit(frontend.WriteRequest(uint64(1024+i*8), pattern(uint64(i), 4096)))
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	fd := d.Memory().Fd()
	if err := d.Conn().SetMemTable(d.Memory().Regions(), []int{fd}); err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if res := wait(t, p); res.Err != nil {
			t.Fatal(res.Err)
		}
	}
	io("memory table replaced")
	// RESET_DEVICE drops the buffer (QEMU gets a new one for the reset
	// device); the queues restart untracked and work.
	for q := range 2 {
		if _, err := d.StopQueue(q); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Conn().Send(vhostuser.ResetDevice, frontend.FlagVersion|frontend.FlagNeedReply, nil, nil); err != nil {
		t.Fatal(err)
	}
	if r, err := d.Conn().ReadReply(); err != nil || binary.LittleEndian.Uint64(r.Payload) != 0 {
		t.Fatalf("RESET_DEVICE: %v %x", err, r.Payload)
	}
	if err := d.Conn().SetFeatures(d.Features()); err != nil {
		t.Fatal(err)
	}
	for q := range 2 {
		if err := d.StartQueue(q); err != nil {
			t.Fatal(err)
		}
	}
	io("after RESET_DEVICE")
}

// TestInflightMessages: GET_INFLIGHT_FD and SET_INFLIGHT_FD are checked
// like every other message: the feature must be negotiated, sizes match,
// the buffer must fit its file, descriptors come exactly where they belong;
// what fails leaves the rings untracked and the connection up.
func TestInflightMessages(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	inflightPayload := func(size, offset uint64, queues, qsize uint16) []byte {
		p := make([]byte, 24)
		binary.LittleEndian.PutUint64(p[0:], size)
		binary.LittleEndian.PutUint64(p[8:], offset)
		binary.LittleEndian.PutUint16(p[16:], queues)
		binary.LittleEndian.PutUint16(p[18:], qsize)
		return p
	}
	// memfdSealed is a buffer as GET_INFLIGHT_FD makes them, sealed
	// against shrinking if sealed.
	memfdSealed := func(size int64, sealed bool) int {
		fd, err := unix.MemfdCreate("test-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Ftruncate(fd, size); err != nil {
			t.Fatal(err)
		}
		if sealed {
			if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK); err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	memfd := func(size int64) int { return memfdSealed(size, true) }
	negotiate := func(c *frontend.Conn, inflight bool) {
		pf := uint64(1 << vhostuser.ProtocolFReplyAck)
		if inflight {
			pf |= 1 << vhostuser.ProtocolFInflightShmfd
		}
		if err := c.SetProtocolFeatures(pf); err != nil {
			t.Fatal(err)
		}
	}
	dial := func() *frontend.Conn {
		c, err := frontend.Dial(e.sock)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	per := uint64(vhostuser.InflightQueueRegionSize(128))

	t.Run("get", func(t *testing.T) {
		c := dial()
		negotiate(c, true)
		inf, fd, err := c.GetInflightFd(2, 128)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
		// Regions have room for rings of 1024 entries, whatever the
		// queue size asked for (QEMU 10 runs rings larger than it).
		if inf.MmapSize != 2*uint64(vhostuser.InflightQueueRegionSize(1024)) || inf.MmapOffset != 0 || inf.NumQueues != 2 || inf.QueueSize != 128 {
			t.Fatalf("GET_INFLIGHT_FD answered %+v", inf)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || uint64(st.Size) != inf.MmapSize {
			t.Fatalf("inflight fd of %d bytes: %v", st.Size, err)
		}
		// Sealed: nobody can shrink it under the back-end's mapping.
		if err := unix.Ftruncate(fd, 0); err == nil {
			t.Fatal("the inflight buffer could be truncated")
		}
		// The buffer is accepted back.
		if err := c.SetInflightFd(inf, fd); err != nil {
			t.Fatal(err)
		}
		c.Close()
		waitIdle(t, e)
	})

	// A GET_INFLIGHT_FD we cannot make a buffer for is answered with an
	// empty one (no descriptor: no inflight tracking), a bad SET_INFLIGHT_FD
	// is NACKed; the connection goes on. Only a request we cannot answer at
	// all (a GET_INFLIGHT_FD whose payload is no inflight description)
	// closes it.
	type outcome int
	const (
		emptyBuffer outcome = iota
		nack
		closes
	)
	for _, tc := range []struct {
		name    string
		inflght bool // negotiate the feature
		req     vhostuser.Request
		payload []byte
		fds     func() []int
		want    outcome
	}{
		{"get without the feature", false, vhostuser.GetInflightFd, inflightPayload(0, 0, 1, 128), nil, emptyBuffer},
		{"get with a short payload", true, vhostuser.GetInflightFd, make([]byte, 20), nil, closes},
		{"get for too many queues", true, vhostuser.GetInflightFd, inflightPayload(0, 0, diskQueues+1, 128), nil, emptyBuffer},
		{"get for queues of 100 entries", true, vhostuser.GetInflightFd, inflightPayload(0, 0, 1, 100), nil, emptyBuffer},
		{"get with a descriptor", true, vhostuser.GetInflightFd, inflightPayload(0, 0, 1, 128), func() []int { return []int{memfd(4096)} }, closes},
		{"set without the feature", false, vhostuser.SetInflightFd, inflightPayload(per, 0, 1, 128), func() []int { return []int{memfd(int64(per))} }, nack},
		{"set without a descriptor", true, vhostuser.SetInflightFd, inflightPayload(per, 0, 1, 128), nil, nack},
		{"set beyond its file", true, vhostuser.SetInflightFd, inflightPayload(per, 4096, 1, 128), func() []int { return []int{memfd(int64(per))} }, nack},
		{"set too small", true, vhostuser.SetInflightFd, inflightPayload(per-64, 0, 1, 128), func() []int { return []int{memfd(int64(per))} }, nack},
		{"set overflowing", true, vhostuser.SetInflightFd, inflightPayload(per, ^uint64(0)-100, 1, 128), func() []int { return []int{memfd(int64(per))} }, nack},
		// A front-end could truncate an unsealed buffer once it is checked,
		// and the back-end would die of SIGBUS reading it: refused.
		{"set unsealed", true, vhostuser.SetInflightFd, inflightPayload(per, 0, 1, 128), func() []int { return []int{memfdSealed(int64(per), false)} }, nack},
		{"set on a pipe", true, vhostuser.SetInflightFd, inflightPayload(per, 0, 1, 128), func() []int {
			var p [2]int
			unix.Pipe2(p[:], unix.O_CLOEXEC)
			t.Cleanup(func() { unix.Close(p[0]); unix.Close(p[1]) })
			return p[:1]
		}, nack},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial()
			negotiate(c, tc.inflght)
			var fds []int
			if tc.fds != nil {
				fds = tc.fds()
			}
			if err := c.Send(tc.req, frontend.FlagVersion|frontend.FlagNeedReply, tc.payload, fds); err != nil {
				t.Fatal(err)
			}
			switch tc.want {
			case closes:
				expectDisconnect(t, c)
			case emptyBuffer:
				r, err := c.ReadReply()
				if err != nil || r.Request != vhostuser.GetInflightFd || len(r.Payload) != 24 || binary.LittleEndian.Uint64(r.Payload) != 0 {
					t.Fatalf("reply %+v, %v; want an empty inflight buffer", r, err)
				}
			case nack:
				r, err := c.ReadReply()
				if err != nil || len(r.Payload) != 8 || binary.LittleEndian.Uint64(r.Payload) == 0 {
					t.Fatalf("reply %+v, %v; want a NACK", r, err)
				}
			}
			if tc.want != closes {
				if _, err := c.GetFeatures(); err != nil {
					t.Fatalf("the connection did not go on: %v", err)
				}
			}
			c.Close()
			waitIdle(t, e)
		})
	}

	t.Run("set while a queue runs", func(t *testing.T) {
		d := connect(t, e, frontend.Options{NumQueues: 1, Inflight: true})
		err := d.Conn().SetInflightFd(frontend.Inflight{MmapSize: per, NumQueues: 1, QueueSize: 128}, memfd(int64(per)))
		if !errors.Is(err, frontend.ErrNack) {
			t.Fatalf("SET_INFLIGHT_FD while the queue runs: %v, want a NACK", err)
		}
		if err := d.Queue(0).Write(0, pattern(1, 512)); err != nil {
			t.Fatalf("the connection broke: %v", err)
		}
		d.Close()
		waitIdle(t, e)
	})
}

// waitIdle waits until the export's server has cleaned up its last
// connection, so that the next one is served.
func waitIdle(t *testing.T, e *export) {
	t.Helper()
	c, err := frontend.Dial(e.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.GetFeatures(); err != nil {
		t.Fatalf("the server does not answer after the last connection: %v", err)
	}
}

// TestRingLargerThanQueueSize: QEMU 10 asks GET_INFLIGHT_FD for its
// queue-size (128) and then runs rings of 256 and 1024 entries. The spec does
// not forbid it: the buffer has room for rings of 1024, so those are tracked
// (a kill loses nothing); a ring larger than the buffer's regions is served
// untracked.
func TestRingLargerThanQueueSize(t *testing.T) {
	for _, tc := range []struct {
		ring    int
		tracked bool
	}{{256, true}, {1024, true}, {2048, false}} {
		t.Run(fmt.Sprintf("ring_%d", tc.ring), func(t *testing.T) {
			fs, err := backend.OpenFile(filepath.Join(t.TempDir(), "disk.img"), backend.FileOptions{CreateSize: diskSize})
			if err != nil {
				t.Fatal(err)
			}
			// Writes wait at the gate until all are in flight, so that the
			// ring's heads go beyond the queue size given for the buffer.
			gate := make(chan struct{})
			store := backend.NewFaultStore(fs, backend.InjectorFunc(func(backend.Operation) error { <-gate; return nil }))
			e := newExport(t, exportOptions{writeback: true, store: store})
			d := connect(t, e, frontend.Options{NumQueues: 2, QueueSize: tc.ring, InflightQueueSize: 128, EventIdx: true, Inflight: true})
			// Per queue: 3 descriptors each, heads beyond 128.
			n := min(160, tc.ring/4)
			var ps []*frontend.Pending
			for i := range 2 * n {
				p, err := d.Queue(i % 2).Submit(frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096)))
				if err != nil {
					t.Fatal(err)
				}
				ps = append(ps, p)
			}
			// What the back-end marked in flight: every request when tracked.
			deadline := time.Now().Add(10 * time.Second)
			want := 0
			if tc.tracked {
				want = n
			}
			for q := range 2 {
				for d.InflightPending(q) != want && time.Now().Before(deadline) {
					time.Sleep(time.Millisecond)
				}
				if got := d.InflightPending(q); got != want {
					t.Fatalf("queue %d: %d requests marked in flight, want %d", q, got, want)
				}
			}
			close(gate)
			for i, p := range ps {
				if res := wait(t, p); res.Err != nil || res.Status != virtio.BlkSOK {
					t.Fatalf("write %d: %v status %d", i, res.Err, res.Status)
				}
			}
			for i := range 2 * n {
				got, err := d.Queue(i%2).Read(uint64(i*8), 4096)
				if err != nil || !bytes.Equal(got, pattern(uint64(i), 4096)) {
					t.Fatalf("read back %d: %v", i, err)
				}
			}
			if _, err := d.Conn().GetFeatures(); err != nil {
				t.Fatalf("the connection broke: %v", err)
			}
		})
	}
}
