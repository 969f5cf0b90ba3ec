package vhostuser_test

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// lockedBuffer collects log output from several goroutines.
type lockedBuffer struct {
	ch chan string
}

func (b lockedBuffer) Write(p []byte) (int, error) {
	select {
	case b.ch <- string(p):
	default:
	}
	return len(p), nil
}

// TestShrunkGuestMemory: a hostile front-end truncates the memfd it shared, so that the
// back-end's next touch of the rings faults (SIGBUS). The daemon must survive: that connection
// ends, and the next front-end is served.
func TestShrunkGuestMemory(t *testing.T) {
	logs := lockedBuffer{ch: make(chan string, 1000)}
	log := logrus.New()
	log.SetOutput(logs)
	store := backend.NewCrashStore(1 << 20)
	engine := backend.NewEngine(store, 2)
	defer engine.Close()
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{Capacity: 1 << 20, BlockSize: 512, NumQueues: 1, Writeback: true}, log.WithField("export", "t"))
	srv := vhostuser.NewServer(dev, 1, log.WithField("export", "t"))
	sock := filepath.Join(t.TempDir(), "s.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()

	fe, err := frontend.Connect(sock, frontend.Options{NumQueues: 1, MemSize: 4 << 20})
	if err != nil {
		t.Fatal(err)
	}
	q := fe.Queue(0)
	if err := q.Write(0, bytes.Repeat([]byte{1}, 512)); err != nil {
		t.Fatal(err)
	}
	// Stop the ring, shrink the memory under the back-end's mapping, and start the ring again:
	// starting reads the used ring, which is now past the end of the file.
	if _, err := fe.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fe.Memory().Fd(), 0); err != nil {
		t.Fatal(err)
	}
	fe.StartQueue(0) // fails or not, as long as the daemon lives
	deadline := time.After(time.Minute)
	for seen := false; !seen; {
		select {
		case line := <-logs.ch:
			seen = strings.Contains(line, "guest memory fault")
		case <-deadline:
			t.Fatal("no guest memory fault logged")
		}
	}
	fe.Conn().Close()

	// The daemon is alive and serves the next front-end.
	var fe2 *frontend.Device
	for i := 0; ; i++ {
		if fe2, err = frontend.Connect(sock, frontend.Options{NumQueues: 1, MemSize: 4 << 20}); err == nil {
			break
		}
		if i == 200 {
			t.Fatalf("reconnect: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	defer fe2.Close()
	got, err := fe2.Queue(0).Read(0, 512)
	if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{1}, 512)) {
		t.Fatalf("read after the fault: %v", err)
	}
}
