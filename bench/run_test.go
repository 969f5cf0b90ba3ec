package bench

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/vhostuser/vhostusertest"
	"github.com/vublk/vublk/virtio"
)

// startServer serves an in-process vublk export (socket, rings, lanes, barrier) over a file in a
// temporary directory.
func startServer(t *testing.T, size int64, queues int, readOnly bool) *vhostusertest.Export {
	return vhostusertest.ServeFile(t, size, queues, readOnly)
}

func TestRunVublk(t *testing.T) {
	s := startServer(t, 16<<20, 2, false)
	tests := []struct {
		name string
		job  Job
	}{
		{"randrw verify flush", Job{Mode: RandRW, BlockSize: 4096, IODepth: 16, Queues: 2, Runtime: 300 * time.Millisecond,
			Verify: true, FlushEvery: 8, ReadMix: 50, Size: 2 << 20}},
		{"sequential write verify", Job{Mode: Write, BlockSize: 64 << 10, IODepth: 4, Queues: 1, Runtime: 200 * time.Millisecond,
			Verify: true, FlushEvery: 3, Ramp: 50 * time.Millisecond}},
		{"randwrite 512 verify", Job{Mode: RandWrite, BlockSize: 512, IODepth: 8, Queues: 1, Runtime: 200 * time.Millisecond,
			Verify: true, Size: 64 << 10}},
		{"randread", Job{Mode: RandRead, BlockSize: 4096, IODepth: 32, Queues: 1, Runtime: 200 * time.Millisecond}},
		{"sequential read qd1", Job{Mode: Read, BlockSize: 8192, IODepth: 1, Queues: 2, Runtime: 200 * time.Millisecond}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := Run(context.Background(), Target{Socket: s.Socket, ServerPID: os.Getpid()}, tt.job)
			if err != nil {
				t.Fatal(err)
			}
			j := tt.job
			if res.IOs == 0 || res.IOPS <= 0 || res.Errors != 0 || res.FirstErr != "" {
				t.Fatalf("%d IOs, %.0f IOPS, %d errors (%s)", res.IOs, res.IOPS, res.Errors, res.FirstErr)
			}
			if j.Mode.Reads() != (res.Read.IOs > 0) || j.Mode.Writes() != (res.Write.IOs > 0) || (j.FlushEvery > 0) != (res.Flush.IOs > 0) {
				t.Errorf("%v: %d reads, %d writes, %d flushes", j.Mode, res.Read.IOs, res.Write.IOs, res.Flush.IOs)
			}
			if j.FlushEvery > 0 && res.Flush.IOs > res.Write.IOs/uint64(j.FlushEvery)+uint64(j.Queues) {
				t.Errorf("%d flushes for %d writes, one every %d", res.Flush.IOs, res.Write.IOs, j.FlushEvery)
			}
			if got := res.Read.Bytes + res.Write.Bytes; got != res.IOs*uint64(j.BlockSize) {
				t.Errorf("%d bytes for %d IOs of %d", got, res.IOs, j.BlockSize)
			}
			if l := res.Latency; !(l.P50 > 0 && l.P50 <= l.P99 && l.P99 <= l.P999 && l.P999 <= l.Max && l.Mean > 0) {
				t.Errorf("latency %+v", l)
			}
			if math := res.Seconds; math < j.Runtime.Seconds()*0.9 || math > j.Runtime.Seconds()*2 {
				t.Errorf("measured %.3f s of a %v run", res.Seconds, j.Runtime)
			}
			if res.ServerCPU == nil || res.ServerCPU.PID != os.Getpid() {
				t.Errorf("server CPU %+v", res.ServerCPU)
			}
			if j.Verify {
				v := res.Verify
				if v == nil || v.Checked == 0 || v.ReadBack == 0 || v.Errors != 0 {
					t.Fatalf("verify %+v", v)
				}
			} else if res.Verify != nil {
				t.Errorf("verify %+v without --verify", res.Verify)
			}
			if res.Job.Name != j.Label() || res.Job.Size == 0 || res.Job.Size%int64(j.BlockSize) != 0 {
				t.Errorf("job report %+v", res.Job)
			}
			var text strings.Builder
			res.WriteText(&text)
			if !strings.Contains(text.String(), "IOPS") || !strings.Contains(text.String(), "server  pid") {
				t.Errorf("text output:\n%s", text.String())
			}
		})
	}
}

// TestVerifyCatchesCorruption runs --verify against a back-end that loses
// some writes: verification must report errors.
func TestVerifyCatchesCorruption(t *testing.T) {
	size := int64(1 << 20)
	store, err := backend.OpenFile(filepath.Join(t.TempDir(), "disk.img"), backend.FileOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	engine := backend.NewEngine(&droppingStore{FileStore: store}, 1)
	defer engine.Close()
	log := logrus.New()
	log.SetOutput(io.Discard)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{Capacity: uint64(size), BlockSize: 512, NumQueues: 1, Writeback: true},
		log.WithField("export", "lossy"))
	srv := vhostuser.NewServer(dev, 1, log.WithField("export", "lossy"))
	sock := filepath.Join(t.TempDir(), "lossy.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	res, err := Run(context.Background(), Target{Socket: sock}, Job{Mode: RandRW, BlockSize: 4096, IODepth: 4, Queues: 1,
		Runtime: 200 * time.Millisecond, Verify: true, ReadMix: 50, Seed: 42})
	if err != nil {
		t.Fatal(err)
	}
	if res.Verify == nil || res.Verify.Errors == 0 || !res.Failed() || res.Verify.First == "" {
		t.Fatalf("a store that drops every 7th write passed verification: %+v", res.Verify)
	}
	t.Logf("caught: %d errors, first: %s", res.Verify.Errors, res.Verify.First)
}

// droppingStore acknowledges every 7th write without writing it.
type droppingStore struct {
	*backend.FileStore
	n atomic.Int64 // the queue's goroutine (inline) and the lane both call WriteAt
}

func (s *droppingStore) WriteAt(bufs [][]byte, off int64) error {
	if s.n.Add(1)%7 == 0 {
		return nil
	}
	return s.FileStore.WriteAt(bufs, off)
}

func TestRunDeviceMismatch(t *testing.T) {
	s := startServer(t, 1<<20, 1, false)
	ro := startServer(t, 1<<20, 1, true)
	tests := []struct {
		name string
		sock string
		job  Job
		want string
	}{
		{"size beyond the disk", s.Socket, Job{Mode: RandRead, BlockSize: 4096, IODepth: 1, Queues: 1, Runtime: time.Second, Size: 2 << 20}, "larger than the device"},
		{"more queues than the back-end", s.Socket, Job{Mode: RandRead, BlockSize: 4096, IODepth: 1, Queues: 2, Runtime: time.Second}, "queues"},
		{"writes to a read-only disk", ro.Socket, Job{Mode: RandWrite, BlockSize: 4096, IODepth: 1, Queues: 1, Runtime: time.Second}, "read-only"},
		{"verify needs more blocks", s.Socket, Job{Mode: RandWrite, BlockSize: 64 << 10, IODepth: 16, Queues: 1, Runtime: time.Second, Verify: true}, "--verify needs more than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Run(context.Background(), Target{Socket: tt.sock}, tt.job)
			if !errors.Is(err, ErrBadJob) || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "bad job") {
				t.Fatalf("Run = %v, want ErrBadJob mentioning %q", err, tt.want)
			}
			if tt.name == "more queues than the back-end" && !errors.Is(err, frontend.ErrNotOffered) {
				t.Errorf("Run = %v, does not wrap frontend.ErrNotOffered", err)
			}
		})
	}
	_, err := Run(context.Background(), Target{Socket: s.Socket, ServerPID: 1 << 30}, DefaultJob())
	if !errors.Is(err, ErrBadJob) || !strings.Contains(err.Error(), "--server-pid") {
		t.Errorf("Run with a server pid that does not exist = %v", err)
	}
	_, err = Run(context.Background(), Target{Socket: filepath.Join(t.TempDir(), "nothing.sock")}, DefaultJob())
	if err == nil || errors.Is(err, ErrBadJob) {
		t.Errorf("Run against no socket = %v", err)
	}
}

// TestRunServerGoesAway closes the back-end in the middle of a run: Run
// must return ErrDisconnected promptly, not hang on requests that will
// never complete.
func TestRunServerGoesAway(t *testing.T) {
	s := startServer(t, 1<<20, 1, false)
	go func() {
		time.Sleep(300 * time.Millisecond)
		s.Server.Close()
	}()
	start := time.Now()
	_, err := Run(context.Background(), Target{Socket: s.Socket, StallTimeout: 5 * time.Second},
		Job{Mode: RandWrite, BlockSize: 4096, IODepth: 8, Queues: 1, Runtime: 10 * time.Second})
	if !errors.Is(err, ErrDisconnected) {
		t.Fatalf("Run = %v, want ErrDisconnected", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Run took %v to notice", d)
	}
}

// TestRunStalls runs against a back-end whose store never finishes a
// write: Run must give up after StallTimeout with ErrStalled.
func TestRunStalls(t *testing.T) {
	size := int64(1 << 20)
	store, err := backend.OpenFile(filepath.Join(t.TempDir(), "disk.img"), backend.FileOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	engine := backend.NewEngine(&stuckStore{FileStore: store, release: release}, 2)
	log := logrus.New()
	log.SetOutput(io.Discard)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{Capacity: uint64(size), BlockSize: 512, NumQueues: 1, Writeback: true},
		log.WithField("export", "stuck"))
	srv := vhostuser.NewServer(dev, 1, log.WithField("export", "stuck"))
	sock := filepath.Join(t.TempDir(), "stuck.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer func() {
		close(release) // the server's Close waits for the requests in flight
		srv.Close()
		engine.Close()
		store.Close()
	}()
	start := time.Now()
	_, err = Run(context.Background(), Target{Socket: sock, StallTimeout: 400 * time.Millisecond},
		Job{Mode: RandWrite, BlockSize: 4096, IODepth: 4, Queues: 1, Runtime: 10 * time.Second})
	if !errors.Is(err, ErrStalled) || !strings.Contains(err.Error(), "400ms") {
		t.Fatalf("Run = %v, want ErrStalled after 400ms", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Run took %v to give up", d)
	}
}

// stuckStore never finishes a write until release is closed.
type stuckStore struct {
	*backend.FileStore
	release chan struct{}
}

func (s *stuckStore) WriteAt(bufs [][]byte, off int64) error {
	<-s.release
	return s.FileStore.WriteAt(bufs, off)
}

func TestRunInterrupted(t *testing.T) {
	s := startServer(t, 1<<20, 1, false)
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(400*time.Millisecond, cancel)
	res, err := Run(ctx, Target{Socket: s.Socket}, Job{Mode: RandRead, BlockSize: 4096, IODepth: 4, Queues: 1,
		Runtime: time.Minute, Ramp: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if res.Seconds > 5 || res.Seconds < 0.1 || res.IOs == 0 {
		t.Errorf("an interrupted run measured %.2f s and %d IOs", res.Seconds, res.IOs)
	}
	ctx, cancel = context.WithCancel(context.Background())
	cancel()
	if _, err := Run(ctx, Target{Socket: s.Socket}, DefaultJob()); !errors.Is(err, context.Canceled) {
		t.Errorf("a run cancelled before measuring = %v", err)
	}
}

// startQSD starts qemu-storage-daemon exporting a file of size bytes over
// vhost-user-blk, as scripts/bench.sh does, and returns its socket and pid.
func startQSD(t *testing.T, size int64, queues int) (string, int) {
	t.Helper()
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (make deps installs it, with qemu-system-common)")
	}
	dir := t.TempDir()
	img, sock := filepath.Join(dir, "disk.img"), filepath.Join(dir, "qsd.sock")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd := exec.Command(qsd,
		"--blockdev", "driver=file,node-name=f,filename="+img+",cache.direct=off",
		"--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="+sock+
			",writable=on,num-queues="+strconv.Itoa(queues))
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return sock, cmd.Process.Pid
		}
		select {
		case <-exited:
			t.Fatalf("qemu-storage-daemon exited: %s", stderr.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon did not create %s: %s", sock, stderr.String())
		}
	}
}

// TestRunQSD runs against qemu-storage-daemon: the load generator is a
// front-end for any vhost-user-blk back-end, not only vublk.
func TestRunQSD(t *testing.T) {
	sock, pid := startQSD(t, 16<<20, 2)
	res, err := Run(context.Background(), Target{Socket: sock, ServerPID: pid}, Job{Mode: RandRW, BlockSize: 4096,
		IODepth: 16, Queues: 2, Runtime: 500 * time.Millisecond, Verify: true, FlushEvery: 16, ReadMix: 50})
	if err != nil {
		t.Fatal(err)
	}
	if res.IOs == 0 || res.Errors != 0 || res.Flush.IOs == 0 || res.Verify.Checked == 0 || res.Verify.Errors != 0 {
		t.Fatalf("%d IOs, %d flushes, %d errors (%s), verify %+v", res.IOs, res.Flush.IOs, res.Errors, res.FirstErr, res.Verify)
	}
	if res.ServerCPU == nil || res.ServerCPU.PID != pid || res.ServerCPU.Seconds <= 0 {
		t.Errorf("server CPU %+v", res.ServerCPU)
	}
}
