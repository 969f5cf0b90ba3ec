package hostile

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// Bounds of issue 11.
const (
	vringBaseBound = time.Second
	sigtermBound   = 2 * time.Second
	reloadBound    = 2 * time.Second
	heapBound      = 64 << 20
)

// attackSetup connects to export name with a ring of 32768 entries on
// queue 0 and a second queue, and starts the guest of bug 2: head after head
// is one indirect table of 32768 descriptors with an unknown request type,
// published again as fast as it is used. It waits until the daemon has
// been through a few rings' worth.
func attackSetup(t *testing.T, d *daemon, name string) (*frontend.Device, *hammer, table) {
	t.Helper()
	dev := d.connect(name, frontend.Options{QueueSize: maxQueue, NumQueues: 2, Indirect: true, MemSize: 16 << 20})
	tb := aliasTable(t, dev.Memory(), typeUnknown, maxQueue-2, sectorSize)
	h := startHammer(dev.Queue(0), tb.desc())
	t.Cleanup(func() {
		dev.Close() // wakes a submission waiting for descriptors
		h.stop()
	})
	h.waitFor(t, maxQueue+maxQueue/2) // filled, and refilled as it is used
	return dev, h, tb
}

// TestRingKeptFull (bug 2): while a guest keeps its ring full of chains
// that are costly to walk, GET_VRING_BASE on that ring returns within 1 s
// (the queue's turn is bounded, and the stop is seen between turns), the
// device's other queue and the daemon's other exports are served, and the
// request is answered IOERR (32768 descriptors are beyond seg_max).
func TestRingKeptFull(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim"}, exportConf{name: "other"})
	dev, h, tb := attackSetup(t, d, "victim")

	data := bytes.Repeat([]byte{0xa5}, 4096)
	took := d.timed("write on the device's other queue", func() error { return dev.Queue(1).Write(0, data) })
	if took > vringBaseBound {
		t.Errorf("a write on the other queue took %v during the attack", took)
	}
	d.serves("other")
	if st := status(t, dev.Memory(), tb.status); st != virtio.BlkSIOErr {
		t.Errorf("a chain of %d descriptors got status %d, want IOERR", tb.n, st)
	}

	before := h.submitted()
	took = d.timed("GET_VRING_BASE", func() error { _, err := dev.StopQueue(0); return err })
	t.Logf("GET_VRING_BASE returned in %v while the guest kept its ring of %d full (%d chains of %d descriptors so far)",
		took.Round(time.Microsecond), maxQueue, before, tb.n)
	if took > vringBaseBound {
		t.Fatalf("GET_VRING_BASE took %v while the guest kept its ring full, want within %v", took, vringBaseBound)
	}
	d.alive()
}

// TestSigtermUnderAttack (bug 2): SIGTERM drains and exits within 2 s while
// a guest keeps its ring full; the signal is not stuck behind the queue.
func TestSigtermUnderAttack(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim"}, exportConf{name: "other"})
	_, h, _ := attackSetup(t, d, "victim")
	took := d.stop(sigtermBound)
	t.Logf("vublk exited %v after SIGTERM while the guest kept its ring full (%d chains)", took.Round(time.Microsecond), h.submitted())
	if !strings.Contains(d.logs.String(), "export stopped") {
		t.Fatal("no \"export stopped\" line: the exports did not drain and stop")
	}
}

// TestReloadUnderAttack (bug 2): a reload that removes the attacked export
// completes within 2 s, the other export goes on, and later signals are
// still handled.
func TestReloadUnderAttack(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim"}, exportConf{name: "other"})
	attackSetup(t, d, "victim")
	d.writeConfig(exportConf{name: "other"})
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitLog("configuration reloaded", guard)
	took := time.Since(start)
	t.Logf("reload removing the attacked export completed in %v", took.Round(time.Microsecond))
	if took > reloadBound {
		t.Fatalf("the reload took %v while the guest kept its ring full, want within %v", took, reloadBound)
	}
	if _, err := os.Stat(d.sock("victim")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the removed export's socket: %v", err)
	}
	d.serves("other")
	d.stop(sigtermBound)
}

// TestAmplification (bug 3): a guest posts 16 MiB reads made of 32766
// descriptors that all alias one sector (one indirect table for all), on
// one queue, and reads at the advertised limits (254 aliased segments) on
// the other, with 8 lanes. The first get IOERR without being collected, the
// second are served, and the daemon's heap in use stays under 64 MiB.
func TestAmplification(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim", lanes: 8})
	base, err := d.heapInuse()
	if err != nil {
		t.Fatal(err)
	}
	dev := d.connect("victim", frontend.Options{QueueSize: maxQueue, NumQueues: 2, Indirect: true, MemSize: 16 << 20})
	cfg, err := dev.Config()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SegMax != 254 || cfg.SizeMax != 4<<20 {
		t.Fatalf("the device advertises seg_max %d size_max %d; the test's limits are 254 and 4 MiB", cfg.SegMax, cfg.SizeMax)
	}
	mem := dev.Memory()
	over := aliasTable(t, mem, virtio.BlkTIn, maxQueue-2, sectorSize)
	within := aliasTable(t, mem, virtio.BlkTIn, int(cfg.SegMax), sectorSize)
	h0 := startHammer(dev.Queue(0), over.desc())
	h1 := startHammer(dev.Queue(1), within.desc())
	defer func() {
		dev.Close()
		h0.stop()
		h1.stop()
	}()
	var peak uint64
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		v, err := d.heapInuse()
		if err != nil {
			t.Fatal(err)
		}
		peak = max(peak, v)
		if peak >= heapBound {
			break // no need to wait for the OOM killer
		}
	}
	t.Logf("heap in use: %.1f MiB at start, peak %.1f MiB under attack with 8 lanes (%d over-limit and %d at-limit reads submitted)",
		float64(base)/(1<<20), float64(peak)/(1<<20), h0.submitted(), h1.submitted())
	if peak >= heapBound {
		t.Fatalf("the daemon's heap in use reached %d MiB, want under %d MiB", peak>>20, heapBound>>20)
	}
	if h0.submitted() < maxQueue || h1.submitted() < 1000 {
		t.Fatalf("only %d and %d requests submitted: the attack did not run", h0.submitted(), h1.submitted())
	}
	if st := status(t, mem, over.status); st != virtio.BlkSIOErr {
		t.Errorf("a read of %d descriptors got status %d, want IOERR", over.n, st)
	}
	if st := status(t, mem, within.status); st != virtio.BlkSOK {
		t.Errorf("a read of seg_max segments got status %d, want OK", st)
	}
	d.alive()
}

// TestChainLimits: through the socket, a chain of seg_max data segments
// and one of size_max bytes are served; one segment more, or one byte more,
// is IOERR.
func TestChainLimits(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim"})
	dev := d.connect("victim", frontend.Options{QueueSize: 1024, MemSize: 16 << 20})
	cfg, err := dev.Config()
	if err != nil {
		t.Fatal(err)
	}
	mem := dev.Memory()
	for _, tc := range []struct {
		name   string
		segs   int
		segLen uint32
		want   uint8
	}{
		{"seg_max segments", int(cfg.SegMax), sectorSize, virtio.BlkSOK},
		{"seg_max+1 segments", int(cfg.SegMax) + 1, sectorSize, virtio.BlkSIOErr},
		{"a segment of size_max", 1, cfg.SizeMax, virtio.BlkSOK},
		{"a segment of size_max+512", 1, cfg.SizeMax + sectorSize, virtio.BlkSIOErr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb := aliasTable(t, mem, virtio.BlkTIn, tc.segs, tc.segLen)
			// As a direct chain: the table's descriptors go in the ring.
			raw, err := mem.Bytes(tb.gpa, uint64(16*tb.n))
			if err != nil {
				t.Fatal(err)
			}
			var chain []frontend.Desc
			for i := range tb.n {
				e := raw[16*i:]
				chain = append(chain, frontend.Desc{Addr: binary.LittleEndian.Uint64(e), Len: binary.LittleEndian.Uint32(e[8:]),
					Flags: binary.LittleEndian.Uint16(e[12:]) &^ virtio.DescFNext})
			}
			p, err := dev.Queue(0).SubmitChain(chain)
			if err != nil {
				t.Fatal(err)
			}
			if res := p.Wait(); res.Status != tc.want {
				t.Fatalf("status %d (%v), want %d", res.Status, res.Err, tc.want)
			}
		})
	}
}

// TestFaultBeforeHandoff (bug 4): the rings stay inside the front-end's
// memfd, which is truncated below a request's header. The daemon's copy of
// the header faults: the fault is caught, the request uncounted, the queue
// broken; GET_VRING_BASE returns at once, and the export serves the next
// front-end.
func TestFaultBeforeHandoff(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim"}, exportConf{name: "other"})
	dev := d.connect("victim", frontend.Options{MemSize: 8 << 20})
	mem := dev.Memory()
	cut := mem.Size() - 1<<20
	high, err := mem.AllocAt(cut, 1<<20) // everything the truncation takes away
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(high.Data, virtio.BlkTOut)
	st := alloc(t, mem, 1)
	if err := unix.Ftruncate(mem.Fd(), int64(cut)); err != nil {
		t.Fatal(err)
	}
	q := dev.Queue(0)
	if _, err := q.SubmitChain([]frontend.Desc{{Addr: high.GPA, Len: 16}, {Addr: st.GPA, Len: 1, Flags: virtio.DescFWrite}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-q.Failed():
	case <-time.After(guard):
		t.Fatal("the daemon did not signal the broken queue")
	}
	took := d.timed("GET_VRING_BASE", func() error { _, err := dev.StopQueue(0); return err })
	t.Logf("GET_VRING_BASE returned in %v after the fault", took.Round(time.Microsecond))
	if took > vringBaseBound {
		t.Fatalf("GET_VRING_BASE took %v after a caught fault, want within %v", took, vringBaseBound)
	}
	dev.Close()
	d.serves("victim")
	d.serves("other")
	d.alive()
}

// TestBlockingCallFd (bug 5): the front-end passes a blocking call eventfd
// whose counter is at its maximum, so that a write to it would block. The
// daemon completes requests on the ring's goroutine (GET_ID), on a lane and
// on the io_uring reaper; none of them blocks: GET_VRING_BASE returns
// within 1 s, the next connection is served and SIGTERM exits within 2 s.
func TestBlockingCallFd(t *testing.T) {
	for _, tc := range []struct {
		name     string
		ioEngine string
		reqs     func() []frontend.Request
	}{
		{"GET_ID on the ring", "", func() []frontend.Request { return []frontend.Request{frontend.GetIDRequest()} }},
		{"reads on the lanes", "lanes", reads},
		{"reads on io_uring", "uring", reads},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.ioEngine == "uring" {
				if b, err := os.ReadFile("/proc/sys/kernel/io_uring_disabled"); err == nil && strings.TrimSpace(string(b)) != "0" {
					t.Skip("io_uring is disabled on this kernel")
				}
			}
			d := startDaemon(t, exportConf{name: "victim", ioEngine: tc.ioEngine}, exportConf{name: "other"})
			dev := d.connect("victim", frontend.Options{})
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC) // blocking
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(efd)
			if _, err := unix.Write(efd, binary.LittleEndian.AppendUint64(nil, 0xfffffffffffffffe)); err != nil {
				t.Fatal(err)
			}
			if err := dev.Conn().SetVringCall(0, efd); err != nil {
				t.Fatal(err)
			}
			var ps []*frontend.Pending
			for _, r := range tc.reqs() {
				p, err := dev.Queue(0).Submit(r)
				if err != nil {
					t.Fatal(err)
				}
				ps = append(ps, p)
			}
			// The requests complete in the used ring; the daemon's signal
			// finds the counter full. Give it time to try.
			waitUsed(t, dev.Queue(0), len(ps))
			took := d.timed("GET_VRING_BASE", func() error { _, err := dev.StopQueue(0); return err })
			t.Logf("GET_VRING_BASE returned in %v", took.Round(time.Microsecond))
			if took > vringBaseBound {
				t.Fatalf("GET_VRING_BASE took %v with a full blocking call eventfd, want within %v", took, vringBaseBound)
			}
			for i, p := range ps {
				if res := p.Wait(); res.Err != nil {
					t.Fatalf("request %d: %v", i, res.Err)
				}
			}
			dev.Close()
			d.serves("victim")
			d.serves("other")
			d.stop(sigtermBound)
		})
	}
}

// reads are 8 reads at once, so that the lanes (not the queue's goroutine)
// run and complete most of them.
func reads() []frontend.Request {
	var rs []frontend.Request
	for i := range 8 {
		rs = append(rs, frontend.ReadRequest(uint64(i*8), 4096))
	}
	return rs
}

// waitUsed waits until the daemon has put n elements on q's used ring.
func waitUsed(t *testing.T, q *frontend.Queue, n int) {
	t.Helper()
	deadline := time.Now().Add(guard)
	for {
		if _, used := q.Indices(); int(used) >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon did not complete %d requests", n)
		}
		yield()
	}
}

// TestInflightUnsealed (bug 1): the front-end negotiates INFLIGHT_SHMFD and
// hands over an unsealed memfd holding a request in flight, truncates it
// and starts the ring. The daemon would read the region where a fault kills
// it: it refuses the buffer and drops the connection, and goes on serving.
func TestInflightUnsealed(t *testing.T) {
	d := startDaemon(t, exportConf{name: "victim"}, exportConf{name: "other"})
	dev := d.connect("victim", frontend.Options{Inflight: true, QueueSize: 128})
	if _, err := dev.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	size := vhostuser.InflightQueueRegionSize(128)
	fd, err := unix.MemfdCreate("hostile-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	region := make([]byte, size)
	binary.LittleEndian.PutUint16(region[8:], 1)    // version
	binary.LittleEndian.PutUint16(region[10:], 128) // desc_num
	region[16] = 1                                  // descriptor 0 in flight
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Pwrite(fd, region, 0); err != nil {
		t.Fatal(err)
	}
	setErr := dev.Conn().SetInflightFd(frontend.Inflight{MmapSize: uint64(size), NumQueues: 1, QueueSize: 128}, fd)
	if err := unix.Ftruncate(fd, 0); err != nil {
		t.Fatal(err)
	}
	startErr := dev.StartQueue(0)
	if setErr == nil && startErr == nil {
		t.Fatal("the daemon took an unsealed inflight buffer and started the ring on it")
	}
	dev.Close()
	d.serves("victim")
	d.serves("other")
	d.alive()
	if !strings.Contains(d.logs.String(), "F_SEAL_SHRINK") {
		t.Error("the log does not say why the buffer was refused")
	}
}

// TestWriteThroughFaultNotLatched: in write-through mode, a write whose data
// lies in memory the front-end truncated fails alone (IOERR); it is no
// failed sync, so the next flush succeeds.
func TestWriteThroughFaultNotLatched(t *testing.T) {
	d := startDaemon(t, exportConf{name: "wt", writeThrough: true})
	dev := d.connect("wt", frontend.Options{MemSize: 8 << 20})
	mem := dev.Memory()
	q := dev.Queue(0)
	if err := q.Write(0, bytes.Repeat([]byte{1}, 4096)); err != nil {
		t.Fatal(err)
	}
	cut := mem.Size() - 1<<20
	high, err := mem.AllocAt(cut, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	hdr, st := alloc(t, mem, 16), alloc(t, mem, 1)
	binary.LittleEndian.PutUint32(hdr.Data, virtio.BlkTOut)
	if err := unix.Ftruncate(mem.Fd(), int64(cut)); err != nil {
		t.Fatal(err)
	}
	p, err := q.SubmitChain([]frontend.Desc{{Addr: hdr.GPA, Len: 16}, {Addr: high.GPA, Len: 4096}, {Addr: st.GPA, Len: 1, Flags: virtio.DescFWrite}})
	if err != nil {
		t.Fatal(err)
	}
	if res := p.Wait(); res.Status != virtio.BlkSIOErr {
		t.Fatalf("a write from truncated memory: status %d (%v), want IOERR", res.Status, res.Err)
	}
	if err := q.Flush(); err != nil {
		t.Fatalf("flush after a write that faulted: %v (a fault is no failed sync)", err)
	}
	d.alive()
}
