package faults

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
)

// openFds lists this process's open descriptors with what they refer to.
func openFds(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var fds []string
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err != nil {
			continue // the descriptor ReadDir itself used, closed by now
		}
		fds = append(fds, e.Name()+" -> "+target)
	}
	return fds
}

// memfdMappings lists this process's mappings of memfds: guest memory, the
// front-end's and the back-end's.
func memfdMappings(t *testing.T) []string {
	t.Helper()
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(maps), "\n") {
		if strings.Contains(line, "memfd:") {
			out = append(out, line)
		}
	}
	return out
}

// resources is a snapshot of what a connection could leak.
type resources struct {
	fds, maps []string
}

func snapshot(t *testing.T) resources { return resources{openFds(t), memfdMappings(t)} }

// grewFrom describes what r has more of than base, or "".
func (r resources) grewFrom(base resources) string {
	var b strings.Builder
	if len(r.fds) > len(base.fds) {
		fmt.Fprintf(&b, "%d open descriptors, %d before; new:", len(r.fds), len(base.fds))
		n := 0
		for _, fd := range r.fds {
			if !slices.Contains(base.fds, fd) && n < 10 {
				b.WriteString("\n  " + fd)
				n++
			}
		}
		b.WriteString("\n")
	}
	if len(r.maps) > len(base.maps) {
		fmt.Fprintf(&b, "%d memfd mappings, %d before:\n  %s\n", len(r.maps), len(base.maps), strings.Join(r.maps[:min(len(r.maps), 10)], "\n  "))
	}
	return b.String()
}

// waitIdle waits until the server has no front-end: the last connection has
// been cleaned up (NotifyConfigChange is a no-op without one, and fails with
// one, since the test front-end gives no back-end channel).
func waitIdle(t *testing.T, srv *vhostuser.Server) {
	t.Helper()
	deadline := time.Now().Add(guard)
	for srv.NotifyConfigChange() != nil {
		if time.Now().After(deadline) {
			t.Fatal("the server still has a front-end")
		}
		time.Sleep(time.Millisecond)
	}
}

// ack sends a message that has no reply of its own with NEED_REPLY and
// checks the back-end's acknowledgement (REPLY_ACK is negotiated).
func ack(t *testing.T, c *frontend.Conn, req vhostuser.Request, payload []byte, fds []int) {
	t.Helper()
	if err := c.Send(req, frontend.FlagVersion|frontend.FlagNeedReply, payload, fds); err != nil {
		t.Fatal(err)
	}
	r, err := c.ReadReply()
	if err != nil {
		t.Fatalf("%v: %v", req, err)
	}
	if r.Request != req || len(r.Payload) != 8 || binary.LittleEndian.Uint64(r.Payload) != 0 {
		t.Fatalf("%v answered with %v %x", req, r.Request, r.Payload)
	}
}

// TestNoLeaksAcrossConnections runs 100 front-end sessions against one
// server: connect, set up memory and queues, do I/O, go away, in four ways
// in turn: a clean close; a close with requests in flight; RESET_DEVICE or
// RESET_OWNER and then reuse of the same connection; a memory table
// replaced while requests run. Every third session shares an inflight
// buffer. Afterwards the process has no more open descriptors and no more
// memfd mappings than before.
func TestNoLeaksAcrossConnections(t *testing.T) {
	cycles := 100
	if testing.Short() {
		cycles = 20
	}
	fs := backend.NewFaultStore(backend.NewCrashStore(diskSize), nil)
	// Slow writes down, so that requests are still in flight when the
	// front-end goes away or replaces the memory table.
	fs.SetInjector(backend.InjectorFunc(func(op backend.Operation) error {
		if op.Op == backend.FaultWrite {
			time.Sleep(200 * time.Microsecond)
		}
		return nil
	}))
	a := startExport(t, "leak", fs, true)

	kinds := []string{"clean close", "close in flight", "reset and reuse", "new memory table"}
	cycle := func(i int) {
		kind := kinds[i%len(kinds)]
		d, err := frontend.Connect(a.sock, frontend.Options{NumQueues: numQueues, QueueSize: 32, EventIdx: i%2 == 0, MemSize: 8 << 20,
			Inflight: i%3 == 0})
		if err != nil {
			t.Fatalf("cycle %d (%s): %v", i, kind, err)
		}
		defer d.Close()
		check := func(step string) {
			for q := range numQueues {
				sector := uint64(8 * (i*numQueues + q) % (diskSize / sectorSize))
				data := pattern(byte(i+q), 4096)
				if err := d.Queue(q).Write(sector, data); err != nil {
					t.Fatalf("cycle %d (%s) %s: queue %d write: %v", i, kind, step, q, err)
				}
				if got, err := d.Queue(q).Read(sector, 4096); err != nil || !bytes.Equal(got, data) {
					t.Fatalf("cycle %d (%s) %s: queue %d read back: %v", i, kind, step, q, err)
				}
			}
		}
		check("set up")
		switch kind {
		case "clean close":
			// With a back-end request channel, which the back-end must
			// close when the connection ends.
			if err := d.Conn().SetProtocolFeatures(d.ProtocolFeatures() | 1<<vhostuser.ProtocolFBackendReq); err != nil {
				t.Fatal(err)
			}
			pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			ack(t, d.Conn(), vhostuser.SetBackendReqFd, nil, pair[1:])
			unix.Close(pair[1])
			defer unix.Close(pair[0])
			if err := d.Queue(0).Flush(); err != nil {
				t.Fatal(err)
			}
		case "close in flight":
			for n := range 24 {
				if _, err := d.Queue(n % numQueues).Submit(frontend.WriteRequest(uint64(n*8), pattern(byte(n), 8192))); err != nil {
					t.Fatal(err)
				}
			}
			// Close now: the back-end drains what it popped and unmaps.
		case "reset and reuse":
			for q := range numQueues {
				if _, err := d.StopQueue(q); err != nil {
					t.Fatal(err)
				}
			}
			req := vhostuser.ResetDevice
			if i%8 == 2 {
				req = vhostuser.ResetOwner
			}
			ack(t, d.Conn(), req, nil, nil)
			// The reset forgot the features; the memory table stays.
			if err := d.Conn().SetFeatures(d.Features()); err != nil {
				t.Fatal(err)
			}
			for q := range numQueues {
				if err := d.StartQueue(q); err != nil {
					t.Fatal(err)
				}
			}
			check("after " + req.String())
		case "new memory table":
			var pend []*frontend.Pending
			for n := range 16 {
				p, err := d.Queue(n % numQueues).Submit(frontend.WriteRequest(uint64(4096+n*16), pattern(byte(n), 8192)))
				if err != nil {
					t.Fatal(err)
				}
				pend = append(pend, p)
			}
			// The same memory as two regions: the back-end maps them,
			// drains and restarts the rings, and unmaps the old region.
			r := d.Memory().Regions()[0]
			half := r.MemorySize / 2
			regions := []vhostuser.MemRegion{
				{GuestPhysAddr: r.GuestPhysAddr, MemorySize: half, UserspaceAddr: r.UserspaceAddr, MmapOffset: r.MmapOffset},
				{GuestPhysAddr: r.GuestPhysAddr + half, MemorySize: half, UserspaceAddr: r.UserspaceAddr + half, MmapOffset: r.MmapOffset + half},
			}
			fd := d.Memory().Fd()
			if err := d.Conn().SetMemTable(regions, []int{fd, fd}); err != nil {
				t.Fatal(err)
			}
			for n, p := range pend {
				if res := wait(t, p); res.Err != nil {
					t.Fatalf("cycle %d: write %d across the memory table change: %v", i, n, res.Err)
				}
			}
			check("after SET_MEM_TABLE")
			// And a region added and removed again (ADD_MEM_REG,
			// REM_MEM_REG), beyond guest memory.
			extra, err := unix.MemfdCreate("vublk-extra-region", unix.MFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			const extraSize = 1 << 20
			if err := unix.Ftruncate(extra, extraSize); err != nil {
				t.Fatal(err)
			}
			reg := make([]byte, 8, 40) // padding, then the region
			for _, v := range []uint64{r.GuestPhysAddr + 2*r.MemorySize, extraSize, r.UserspaceAddr + 2*r.MemorySize, 0} {
				reg = binary.LittleEndian.AppendUint64(reg, v)
			}
			ack(t, d.Conn(), vhostuser.AddMemReg, reg, []int{extra})
			unix.Close(extra)
			check("after ADD_MEM_REG")
			ack(t, d.Conn(), vhostuser.RemMemReg, reg, nil)
			check("after REM_MEM_REG")
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}

	// Warm up: the runtime opens its own descriptors (netpoll) lazily.
	for i := range len(kinds) {
		cycle(i)
	}
	waitIdle(t, a.srv)
	base := snapshot(t)
	for i := range cycles {
		cycle(i)
	}
	waitIdle(t, a.srv)
	// Descriptors closed by another goroutine (a lane completing, a
	// finalizer) may lag a little behind the connection's end.
	var grew string
	for start := time.Now(); time.Since(start) < 5*time.Second; time.Sleep(10 * time.Millisecond) {
		if grew = snapshot(t).grewFrom(base); grew == "" {
			break
		}
	}
	if grew != "" {
		t.Fatalf("after %d sessions:\n%s", cycles, grew)
	}
	t.Logf("%d sessions: %d descriptors and %d memfd mappings before and after", cycles, len(base.fds), len(base.maps))
	if n := fs.Injected(); n != 0 {
		t.Fatalf("%d injected failures", n)
	}
	if errs := a.entries(logrus.ErrorLevel, ""); len(errs) != 0 {
		t.Errorf("%d errors logged, first: %v %v", len(errs), errs[0].Message, errs[0].Data)
	}
}
