package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/vhostuser/frontend"
)

// serviceConfig writes a configuration with the named exports (each a 4 MiB disk in dir, or the
// size given) and returns its path.
func serviceConfig(t *testing.T, dir string, sizes map[string]string, extra string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("[global]\nlog_format = \"json\"\nlanes = 2\n" + extra + "\n")
	for _, name := range []string{"alpha", "beta", "gamma", "delta"} {
		size, ok := sizes[name]
		if !ok {
			continue
		}
		fmt.Fprintf(&b, "\n[[export]]\nname = %q\nsocket_path = %q\nfile = %q\nsize = %q\nnum_queues = 2\n",
			name, filepath.Join(dir, name+".sock"), filepath.Join(dir, name+".img"), size)
	}
	path := filepath.Join(dir, "vublk.toml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// waitLog waits until the daemon's log has n lines containing s.
func waitLog(t *testing.T, logs *syncBuffer, s string, n int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(logs.String(), s) < n {
		if time.Now().After(deadline) {
			t.Fatalf("no %d× %q in the log:\n%s", n, s, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func connect(t *testing.T, sock string) *frontend.Device {
	t.Helper()
	d, err := frontend.Connect(sock, frontend.Options{NumQueues: 2, MemSize: 16 << 20})
	if err != nil {
		t.Fatalf("connect %s: %v", sock, err)
	}
	return d
}

func roundTrip(t *testing.T, d *frontend.Device, sector uint64) {
	t.Helper()
	data := bytes.Repeat([]byte{byte(sector)}, 4096)
	q := d.Queue(int(sector) % d.NumQueues())
	if err := q.Write(sector, data); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := q.Flush(); err != nil {
		t.Fatalf("flush: %v", err)
	}
	got, err := q.Read(sector, len(data))
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
}

func TestServiceConfigReload(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	conf := serviceConfig(t, dir, map[string]string{"alpha": "4M", "beta": "4M", "gamma": "4M"}, "")
	cmd, logs, done := startServe(t, bin, "serve", "--config", conf)
	waitLog(t, logs, `"msg":"export ready"`, 3)

	alpha := connect(t, filepath.Join(dir, "alpha.sock"))
	defer alpha.Close()
	roundTrip(t, alpha, 8)

	// beta's front-end goes away in the middle of its I/O; alpha does not notice.
	beta := connect(t, filepath.Join(dir, "beta.sock"))
	for i := 0; i < 32; i++ {
		beta.Queue(i % 2).Submit(frontend.WriteRequest(uint64(i*8), make([]byte, 4096)))
	}
	beta.Close()
	roundTrip(t, alpha, 16)

	// Reload: gamma removed, delta added, alpha grown live, beta unchanged.
	serviceConfig(t, dir, map[string]string{"alpha": "8M", "beta": "4M", "delta": "2M"}, "")
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, logs, `"msg":"configuration reloaded"`, 1)
	if !strings.Contains(logs.String(), `"added":["delta"]`) || !strings.Contains(logs.String(), `"removed":["gamma"]`) ||
		!strings.Contains(logs.String(), `"resized":["alpha"]`) {
		t.Errorf("reload summary:\n%s", logs.String())
	}
	cfg, err := alpha.Config()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Capacity != (8<<20)/512 {
		t.Errorf("alpha's capacity after the reload: %d sectors, want %d", cfg.Capacity, (8<<20)/512)
	}
	roundTrip(t, alpha, (6<<20)/512) // in the grown part, on the same connection
	if _, err := os.Stat(filepath.Join(dir, "gamma.sock")); err == nil {
		t.Error("gamma's socket is still there")
	}
	delta := connect(t, filepath.Join(dir, "delta.sock"))
	roundTrip(t, delta, 0)
	delta.Close()
	beta = connect(t, filepath.Join(dir, "beta.sock"))
	roundTrip(t, beta, 0)
	beta.Close()

	// An invalid configuration is rejected and changes nothing.
	if err := os.WriteFile(conf, []byte("[[export]]\nname = \"alpha\"\nbogus = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, logs, "reload rejected", 1)
	if !strings.Contains(logs.String(), "bogus") {
		t.Errorf("the rejected reload does not name the bad key:\n%s", logs.String())
	}
	roundTrip(t, alpha, 24)

	stopServe(t, cmd, logs, done)
	// gamma stopped at the reload; alpha, beta and delta at exit.
	if n := strings.Count(logs.String(), `"msg":"export stopped"`); n != 4 {
		t.Errorf("%d \"export stopped\" lines, want 4:\n%s", n, logs.String())
	}
}

// syncBuffer is a bytes.Buffer safe for the writer (the child's stderr) and the test.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestServiceConfigErrors(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "bad.toml")
	os.WriteFile(conf, []byte("[[export]]\nname = \"a\"\nsocket_path = \"/tmp/x.sock\"\nfile = \"/nonexistent/disk.img\"\nnum_queues = 0\n"), 0o644)
	var stdout, stderr bytes.Buffer
	if code := run([]string{"serve", "--config", conf}, &stdout, &stderr); code != exitUsage {
		t.Errorf("exit code %d, want %d", code, exitUsage)
	}
	if lines := strings.Count(stderr.String(), "\n"); lines < 2 || !strings.Contains(stderr.String(), "bad.toml:") {
		t.Errorf("want every error with file:line, got:\n%s", stderr.String())
	}
	stderr.Reset()
	if code := run([]string{"serve", "--config", conf, "--blk-file", "x"}, &stdout, &stderr); code != exitUsage ||
		!strings.Contains(stderr.String(), "cannot be combined") {
		t.Errorf("--config with --blk-file: %d %s", code, stderr.String())
	}
}

// startServe runs the vublk binary with args, its log collected in logs; done receives its exit.
// The test's cleanup kills it.
func startServe(t *testing.T, bin string, args ...string) (*exec.Cmd, *syncBuffer, chan error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	logs := &syncBuffer{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return cmd, logs, done
}

// stopServe sends SIGTERM to a vublk started by startServe and waits for a clean exit.
func stopServe(t *testing.T, cmd *exec.Cmd, logs *syncBuffer, done chan error) {
	t.Helper()
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit: %v\n%s", err, logs.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
}
