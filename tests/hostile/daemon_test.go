// Package hostile plays a hostile front-end and a hostile guest against the
// real vublk binary, through its vhost-user socket, with the Go front-end
// (vhostuser/frontend): it writes guest memory and rings directly, hands
// over descriptors the way an attacker would, and measures what the daemon
// must bound: its heap, how long GET_VRING_BASE, SIGTERM and a reload take
// while a guest keeps its ring full. Each test is the reproduction of one
// attack of issue 11 and fails on the code that had the bug.
package hostile

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/tests/internal/buildvublk"
	"github.com/vublk/vublk/vhostuser/frontend"
)

// vublkBin is the binary under test, built once by TestMain.
var vublkBin string

func TestMain(m *testing.M) {
	flag.Parse()
	if testing.Short() {
		os.Exit(m.Run()) // every test skips itself
	}
	dir, err := os.MkdirTemp("", "vublk-hostile-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	vublkBin = filepath.Join(dir, "vublk")
	if err := buildvublk.Build(vublkBin, ""); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	diskSize = 64 << 20
	// guard bounds waits that only a hang makes long; the bounds the issue
	// sets are checked against the measured times.
	guard = 30 * time.Second
)

// exportConf is one [[export]] of the daemon's configuration.
type exportConf struct {
	name         string
	lanes        int    // 0: the default
	ioEngine     string // "": the default
	writeThrough bool
}

// daemon is a running `vublk serve --config`.
type daemon struct {
	t       *testing.T
	dir     string
	config  string
	cmd     *exec.Cmd
	logs    *syncBuffer
	done    chan error
	exited  bool
	metrics string // the metrics socket
}

// syncBuffer is the daemon's stderr.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startDaemon writes a configuration of exports and starts vublk on it; it
// returns once every socket listens. Its log is printed if the test fails;
// cleanup kills it if it still runs.
func startDaemon(t *testing.T, exports ...exportConf) *daemon {
	t.Helper()
	if testing.Short() {
		t.Skip("runs the vublk binary")
	}
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "vublk-hostile")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	d := &daemon{t: t, dir: dir, config: filepath.Join(dir, "vublk.toml"), logs: &syncBuffer{}, done: make(chan error, 1),
		metrics: filepath.Join(dir, "metrics.sock")}
	d.writeConfig(exports...)
	d.cmd = exec.Command(vublkBin, "serve", "--config", d.config)
	d.cmd.Stderr = d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		if !d.exited {
			d.cmd.Process.Kill()
			<-d.done
		}
		if t.Failed() {
			t.Logf("vublk log:\n%s", d.logs.String())
		}
	})
	d.waitLog("vublk serving", guard)
	return d
}

func (d *daemon) sock(name string) string { return filepath.Join(d.dir, name+".sock") }

func (d *daemon) writeConfig(exports ...exportConf) {
	var b strings.Builder
	fmt.Fprintf(&b, "[global]\nlog_level = \"info\"\nmetrics_address = \"unix:%s\"\n", d.metrics)
	for _, e := range exports {
		fmt.Fprintf(&b, "\n[[export]]\nname = %q\nsocket_path = %q\nfile = %q\nsize = \"%d\"\nnum_queues = 2\n",
			e.name, d.sock(e.name), filepath.Join(d.dir, e.name+".img"), diskSize)
		if e.lanes > 0 {
			fmt.Fprintf(&b, "lanes = %d\n", e.lanes)
		}
		if e.ioEngine != "" {
			fmt.Fprintf(&b, "io_engine = %q\n", e.ioEngine)
		}
		if e.writeThrough {
			b.WriteString("write_cache = \"writethrough\"\n")
		}
	}
	if err := os.WriteFile(d.config, []byte(b.String()), 0o644); err != nil {
		d.t.Fatal(err)
	}
}

// waitLog waits until the log holds s, and fails the test after within.
func (d *daemon) waitLog(s string, within time.Duration) {
	d.t.Helper()
	deadline := time.Now().Add(within)
	for !strings.Contains(d.logs.String(), s) {
		if time.Now().After(deadline) {
			d.t.Fatalf("no %q in the log after %v", s, within)
		}
		select {
		case err := <-d.done:
			d.exited = true
			d.t.Fatalf("vublk exited (%v) before logging %q", err, s)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// alive fails the test if the daemon has exited (a crash: SIGBUS, a Go
// fatal error).
func (d *daemon) alive() {
	d.t.Helper()
	select {
	case err := <-d.done:
		d.exited = true
		d.t.Fatalf("vublk died: %v", err)
	default:
	}
}

// stop sends SIGTERM and returns how long vublk took to exit; it fails the
// test if the exit was not clean, or took longer than within.
func (d *daemon) stop(within time.Duration) time.Duration {
	d.t.Helper()
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		d.exited = true
		took := time.Since(start)
		if err != nil {
			d.t.Fatalf("vublk exited with %v after SIGTERM", err)
		}
		if took > within {
			d.t.Fatalf("vublk exited %v after SIGTERM, want within %v", took, within)
		}
		return took
	case <-time.After(max(guard, within)):
		d.t.Fatalf("vublk did not exit within %v of SIGTERM", max(guard, within))
	}
	return 0
}

// heapInuse scrapes the daemon's go_memstats_heap_inuse_bytes.
func (d *daemon) heapInuse() (uint64, error) {
	c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", d.metrics)
		},
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://vublk/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_inuse_bytes "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return uint64(f), err
		}
	}
	return 0, errors.New("no go_memstats_heap_inuse_bytes in the scrape")
}

// connect sets a device up on export name as QEMU would.
func (d *daemon) connect(name string, opt frontend.Options) *frontend.Device {
	d.t.Helper()
	dev, err := frontend.Connect(d.sock(name), opt)
	if err != nil {
		d.t.Fatalf("connect to %s: %v", name, err)
	}
	d.t.Cleanup(func() { dev.Close() })
	return dev
}

// serves checks that export name serves a new front-end: a write and its
// read back.
func (d *daemon) serves(name string) {
	d.t.Helper()
	dev := d.connect(name, frontend.Options{MemSize: 4 << 20})
	defer dev.Close()
	data := bytes.Repeat([]byte("served!!"), 64)
	q := dev.Queue(0)
	if err := q.Write(8, data); err != nil {
		d.t.Fatalf("%s: write on a new connection: %v", name, err)
	}
	got, err := q.Read(8, len(data))
	if err != nil || !bytes.Equal(got, data) {
		d.t.Fatalf("%s: read back on a new connection: %v", name, err)
	}
}

// timed runs f and returns how long it took. If f has not returned within
// guard the test fails, and the daemon is killed first, so that f (blocked
// on the daemon) returns and cleanup does not hang.
func (d *daemon) timed(what string, f func() error) time.Duration {
	d.t.Helper()
	start := time.Now()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if err != nil {
			d.t.Fatalf("%s: %v", what, err)
		}
		return time.Since(start)
	case <-time.After(guard):
		d.cmd.Process.Kill()
		<-done
		d.t.Fatalf("%s: no answer within %v", what, guard)
	}
	return 0
}
