package vhostuser_test

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser/frontend"
)

// logLines hands log lines to the test as they are written (dropping them when nobody reads).
type logLines struct {
	ch chan string
}

func (b logLines) Write(p []byte) (int, error) {
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
	logs := logLines{ch: make(chan string, 1000)}
	_, _, sock := serveCrashStore(t, 1<<20, 1<<20, logs)

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
