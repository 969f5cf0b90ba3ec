package vhostuser_test

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/vhostuser/vhostusertest"
	"github.com/vublk/vublk/virtio"
)

// TestNotifyConfigChange resizes a disk under a connected front-end: the front-end hands over a
// back-end request channel (SET_BACKEND_REQ_FD), receives CONFIG_CHANGE_MSG on it, answers, and
// then reads the new capacity with GET_CONFIG, as QEMU does before telling the guest.
func TestNotifyConfigChange(t *testing.T) {
	for _, replyAck := range []bool{true, false} {
		name := "reply-ack"
		if !replyAck {
			name = "no-reply-ack"
		}
		t.Run(name, func(t *testing.T) { testNotifyConfigChange(t, replyAck) })
	}
}

func testNotifyConfigChange(t *testing.T, replyAck bool) {
	srv, dev, sock := serveCrashStore(t, 4<<20, 2<<20, io.Discard)

	// No front-end yet: nothing to notify.
	if err := srv.NotifyConfigChange(); err != nil {
		t.Fatalf("without a front-end: %v", err)
	}

	c, err := frontend.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	offered, err := c.GetProtocolFeatures()
	if err != nil {
		t.Fatal(err)
	}
	if offered&(1<<vhostuser.ProtocolFBackendReq) == 0 {
		t.Fatalf("BACKEND_REQ not offered: %#x", offered)
	}
	want := uint64(1<<vhostuser.ProtocolFBackendReq | 1<<vhostuser.ProtocolFConfig)
	if replyAck {
		want |= 1 << vhostuser.ProtocolFReplyAck
	}
	if err := c.SetProtocolFeatures(want); err != nil {
		t.Fatal(err)
	}
	// Connected but no channel yet.
	waitConnected(t, srv)
	if err := srv.NotifyConfigChange(); !errors.Is(err, vhostuser.ErrNoBackendChannel) {
		t.Fatalf("without a channel: %v, want ErrNoBackendChannel", err)
	}

	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ours, err := net.FileConn(os.NewFile(uintptr(fds[0]), "frontend-side")) // a net.Conn, so deadlines work
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	flags := uint32(1)
	if replyAck {
		flags |= 1 << 3
	}
	if err := c.Send(vhostuser.SetBackendReqFd, flags, make([]byte, 8), []int{fds[1]}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds[1])
	if replyAck {
		if r, err := c.ReadReply(); err != nil || len(r.Payload) != 8 || binary.LittleEndian.Uint64(r.Payload) != 0 {
			t.Fatalf("SET_BACKEND_REQ_FD ack: %+v %v", r, err)
		}
	} else if _, err := c.GetFeatures(); err != nil { // answered only after SET_BACKEND_REQ_FD was handled
		t.Fatal(err)
	}

	dev.SetCapacity(3 << 20)
	done := make(chan error, 1)
	go func() { done <- srv.NotifyConfigChange() }()
	ours.SetReadDeadline(time.Now().Add(time.Minute))
	var hdr [12]byte
	if _, err := io.ReadFull(ours, hdr[:]); err != nil {
		t.Fatal(err)
	}
	req, gotFlags, size := binary.LittleEndian.Uint32(hdr[0:]), binary.LittleEndian.Uint32(hdr[4:]), binary.LittleEndian.Uint32(hdr[8:])
	if req != 2 || size != 0 || gotFlags&3 != 1 || (gotFlags&(1<<3) != 0) != replyAck {
		t.Fatalf("back-end message: request %d flags %#x size %d", req, gotFlags, size)
	}
	// QEMU re-reads the config space on the main channel before it answers.
	cfg, err := c.GetConfig(0, 8)
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.LittleEndian.Uint64(cfg); got != (3<<20)/512 {
		t.Fatalf("capacity %d sectors after the resize, want %d", got, (3<<20)/512)
	}
	if replyAck {
		reply := make([]byte, 20)
		binary.LittleEndian.PutUint32(reply[0:], 2)
		binary.LittleEndian.PutUint32(reply[4:], 1|1<<2)
		binary.LittleEndian.PutUint32(reply[8:], 8)
		if _, err := ours.Write(reply); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("NotifyConfigChange: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("NotifyConfigChange did not return")
	}

	// SET_BACKEND_REQ_FD without the protocol feature is refused: the back-end closes the
	// descriptor and sends nothing on it, and the connection goes on.
	c2 := reconnect(t, c, sock)
	defer c2.Close()
	fds2, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	defer unix.Close(fds2[0])
	if err := c2.Send(vhostuser.SetBackendReqFd, 1, make([]byte, 8), []int{fds2[1]}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fds2[1])
	if _, err := c2.GetFeatures(); err != nil {
		t.Fatalf("the connection broke: %v", err)
	}
	if err := srv.NotifyConfigChange(); !errors.Is(err, vhostuser.ErrNoBackendChannel) {
		t.Fatalf("a refused channel was used: %v", err)
	}
	// The back-end closed its copy of the refused descriptor: our end sees EOF.
	var b [1]byte
	unix.SetNonblock(fds2[0], false)
	if n, err := unix.Read(fds2[0], b[:]); n != 0 || err != nil {
		t.Fatalf("the refused channel is still open in the back-end: %d %v", n, err)
	}
}

// serveCrashStore serves a one-queue disk of capacity bytes on a CrashStore of size bytes,
// logging to w, until the test ends.
func serveCrashStore(t *testing.T, size int64, capacity uint64, w io.Writer) (*vhostuser.Server, *virtio.BlkDevice, string) {
	t.Helper()
	e := vhostusertest.Serve(t, backend.NewCrashStore(size), 2,
		virtio.BlkConfig{Capacity: capacity, BlockSize: 512, NumQueues: 1, Writeback: true}, w)
	return e.Server, e.Device, e.Socket
}

// waitConnected waits until the server has a front-end (NotifyConfigChange stops returning nil).
func waitConnected(t *testing.T, srv *vhostuser.Server) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		if srv.NotifyConfigChange() != nil {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("the server never saw the front-end")
}

func reconnect(t *testing.T, old *frontend.Conn, sock string) *frontend.Conn {
	t.Helper()
	old.Close()
	var c *frontend.Conn
	var err error
	for i := 0; i < 200; i++ {
		if c, err = frontend.Dial(sock); err == nil {
			if _, err = c.GetFeatures(); err == nil {
				return c
			}
			c.Close()
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("reconnect: %v", err)
	return nil
}
