package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestUsageErrors(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	notSocket := filepath.Join(dir, "file")
	if err := os.WriteFile(notSocket, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "s.sock")
	tests := []struct {
		name string
		args []string
		want string // in the one-line error
	}{
		{"no command", nil, "Usage"},
		{"unknown command", []string{"frobnicate"}, "unknown command"},
		{"unknown flag", []string{"serve", "--bogus"}, "flag provided but not defined: -bogus"},
		{"bad flag value", []string{"serve", "--lanes", "many"}, "invalid value"},
		{"no blk-file", []string{"serve", "--socket-path", sock}, "--blk-file is required"},
		{"no socket", []string{"serve", "--blk-file", img}, "exactly one of --socket-path, --fd and --vduse"},
		{"vduse and socket", []string{"serve", "--blk-file", img, "--vduse", "vd0", "--socket-path", sock}, "--vduse excludes --socket-path and --fd"},
		{"bad vduse bus", []string{"serve", "--blk-file", img, "--vduse", "vd0", "--vduse-bus", "pci"}, `--vduse-bus must be virtio or vhost, not "pci"`},
		{"socket and fd", []string{"serve", "--blk-file", img, "--socket-path", sock, "--fd", "3"}, "exactly one of"},
		{"missing file", []string{"serve", "--socket-path", sock, "--blk-file", filepath.Join(dir, "nope")}, "does not exist"},
		{"socket path not a socket", []string{"serve", "--socket-path", notSocket, "--blk-file", img}, "exists and is not a socket"},
		{"size not multiple of 512", []string{"serve", "--socket-path", sock, "--blk-file", img, "--size", "1000"}, "not a positive multiple of 512"},
		{"size garbage", []string{"serve", "--socket-path", sock, "--blk-file", img, "--size", "lots"}, "--size"},
		{"bad io engine", []string{"serve", "--socket-path", sock, "--blk-file", img, "--io-engine", "bogus"}, `--io-engine must be lanes or uring, not "bogus"`},
		{"empty io engine", []string{"serve", "--socket-path", sock, "--blk-file", img, "--io-engine", ""}, "--io-engine"},
		{"direct with a value", []string{"serve", "--socket-path", sock, "--blk-file", img, "--direct=maybe"}, "invalid boolean value"},
		{"bad write cache", []string{"serve", "--socket-path", sock, "--blk-file", img, "--write-cache", "none"}, "--write-cache"},
		{"bad block size", []string{"serve", "--socket-path", sock, "--blk-file", img, "--logical-block-size", "1024"}, "--logical-block-size"},
		{"long serial", []string{"serve", "--socket-path", sock, "--blk-file", img, "--serial", strings.Repeat("x", 21)}, "longer than 20 bytes"},
		{"zero lanes", []string{"serve", "--socket-path", sock, "--blk-file", img, "--lanes", "0"}, "--lanes"},
		{"too many queues", []string{"serve", "--socket-path", sock, "--blk-file", img, "--num-queues", "1000"}, "--num-queues"},
		{"bad log format", []string{"serve", "--socket-path", sock, "--blk-file", img, "--log-format", "xml"}, "--log-format"},
		{"extra argument", []string{"serve", "--socket-path", sock, "--blk-file", img, "extra"}, "unexpected argument"},
		{"top-level serve flags", []string{"--blk-file", img}, "exactly one of"},
		{"replay without log", []string{"replay", "--out", img}, "usage: vublk replay"},
		{"replay unknown flag", []string{"replay", "--nope"}, "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tt.args, &stdout, &stderr)
			if code != exitUsage {
				t.Errorf("exit code %d, want %d; stderr: %s", code, exitUsage, stderr.String())
			}
			msg := stderr.String()
			if !strings.Contains(msg, tt.want) {
				t.Errorf("stderr %q does not mention %q", msg, tt.want)
			}
			if tt.args != nil && strings.Count(strings.TrimSuffix(msg, "\n"), "\n") > 0 && tt.name != "unknown command" {
				t.Errorf("error is not one line: %q", msg)
			}
			if _, err := os.Stat(sock); err == nil {
				t.Errorf("a failed start left %s behind", sock)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"help"}, {"serve", "-h"}, {"replay", "--help"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != 0 {
			t.Errorf("%v: exit code %d", args, code)
		}
		if stdout.Len() == 0 || stderr.Len() != 0 {
			t.Errorf("%v: help should go to stdout only; stdout %q stderr %q", args, stdout.String(), stderr.String())
		}
	}
}

func TestPrintCapabilities(t *testing.T) {
	for _, args := range [][]string{{"--print-capabilities"}, {"serve", "--print-capabilities"}} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != 0 {
			t.Fatalf("%v: exit code %d: %s", args, code, stderr.String())
		}
		var caps struct {
			Type     string   `json:"type"`
			Features []string `json:"features"`
		}
		if err := json.Unmarshal(stdout.Bytes(), &caps); err != nil {
			t.Fatalf("%v: %v: %q", args, err, stdout.String())
		}
		if caps.Type != "block" || strings.Join(caps.Features, ",") != "read-only,blk-file" {
			t.Errorf("%v: capabilities %+v", args, caps)
		}
	}
}

// binary builds vublk once for the tests that run it as a process.
func binary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	bin := filepath.Join(t.TempDir(), "vublk")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// started runs vublk and waits for its "export ready" log line.
func started(t *testing.T, cmd *exec.Cmd) (logs *bytes.Buffer, wait func() error) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	logs = &bytes.Buffer{}
	ready := make(chan bool, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			logs.WriteString(sc.Text() + "\n")
			if strings.Contains(sc.Text(), "export ready") {
				ready <- true
			}
		}
		ready <- false
	}()
	select {
	case ok := <-ready:
		if !ok {
			cmd.Wait()
			t.Fatalf("vublk exited before it was ready:\n%s", logs.String())
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("vublk did not become ready")
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	return logs, func() error {
		err := cmd.Wait()
		<-done
		return err
	}
}

func TestServeCreatesSparseFileAndStopsOnSignal(t *testing.T) {
	bin := binary(t)
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "disk.img")
			sock := filepath.Join(dir, "vublk.sock")
			// A stale socket from an earlier run that nobody listens on is replaced.
			stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			stale.SetUnlinkOnClose(false)
			stale.Close()

			cmd := exec.Command(bin, "serve", "--socket-path", sock, "--blk-file", img, "--size", "1G")
			logs, wait := started(t, cmd)
			fi, err := os.Stat(img)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Size() != 1<<30 {
				t.Errorf("size %d, want 1 GiB", fi.Size())
			}
			if blocks := fi.Sys().(*syscall.Stat_t).Blocks; blocks*512 > 1<<20 {
				t.Errorf("the new file is not sparse: %d blocks", blocks)
			}
			// A front-end that connects and goes away does not stop the daemon.
			c, err := net.Dial("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
			c, err = net.Dial("unix", sock)
			if err != nil {
				t.Fatalf("second connection: %v", err)
			}
			c.Close()

			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			if err := wait(); err != nil {
				t.Fatalf("exit: %v\n%s", err, logs.String())
			}
			if !strings.Contains(logs.String(), "export stopped") {
				t.Errorf("no final log line:\n%s", logs.String())
			}
			if _, err := os.Stat(sock); err == nil {
				t.Errorf("the socket %s was left behind", sock)
			}
		})
	}
}

func TestServeInheritedFD(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "fd.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--fd", "3", "--blk-file", img, "--read-only")
	cmd.ExtraFiles = []*os.File{f}
	logs, wait := started(t, cmd)
	f.Close()
	ln.Close()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("dial the inherited socket: %v", err)
	}
	c.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	if err := wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, logs.String())
	}
}

func TestExistingFileKeepsItsSize(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 2<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", "--socket-path", filepath.Join(dir, "s"), "--blk-file", img, "--size", "4M")
	logs, wait := started(t, cmd)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := wait(); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(img); fi.Size() != 2<<20 {
		t.Errorf("size changed to %d without --resize", fi.Size())
	}
	if !strings.Contains(logs.String(), "--resize") {
		t.Errorf("no warning about --size differing from the file:\n%s", logs.String())
	}
}

func TestSystemdNotify(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	notify := filepath.Join(dir, "notify")
	nc, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	cmd := exec.Command(bin, "serve", "--socket-path", filepath.Join(dir, "s"), "--blk-file", filepath.Join(dir, "d.img"), "--size", "1M")
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
	logs, wait := started(t, cmd)
	read := func() string {
		nc.SetReadDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 256)
		n, err := nc.Read(buf)
		if err != nil {
			t.Fatalf("no systemd notification: %v\n%s", err, logs.String())
		}
		return string(buf[:n])
	}
	if got := read(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if got := read(); got != "STOPPING=1" {
		t.Fatalf("notification on SIGTERM %q, want STOPPING=1", got)
	}
	if err := wait(); err != nil {
		t.Fatal(err)
	}
}

// TestServeCPUProfile: --cpuprofile writes a profile go tool pprof reads (gzip-compressed protobuf)
// when the server stops on SIGTERM; a profile path that cannot be created is a usage error.
func TestServeCPUProfile(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	prof := filepath.Join(dir, "cpu.prof")
	cmd := exec.Command(bin, "serve", "--socket-path", filepath.Join(dir, "s.sock"), "--blk-file",
		filepath.Join(dir, "d.img"), "--size", "4M", "--cpuprofile", prof)
	logs, wait := started(t, cmd)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := wait(); err != nil {
		t.Fatalf("exit: %v\n%s", err, logs.String())
	}
	data, err := os.ReadFile(prof)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) < 2 || data[0] != 0x1f || data[1] != 0x8b {
		t.Errorf("the profile (%d bytes) is not gzip-compressed pprof data", len(data))
	}
	out, err := exec.Command(bin, "serve", "--socket-path", filepath.Join(dir, "t.sock"), "--blk-file",
		filepath.Join(dir, "d.img"), "--cpuprofile", filepath.Join(dir, "missing", "cpu.prof")).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "--cpuprofile") {
		t.Errorf("unwritable --cpuprofile: %v, %q; want exit 2 and the flag named", err, out)
	}
}

// TestVDUSEUnavailable: on a kernel without VDUSE (this host's, and Debian 12's) --vduse fails
// with one clear line and exit code 1 (valid settings this host cannot serve), and leaves the
// file closed and nothing running.
func TestVDUSEUnavailable(t *testing.T) {
	if _, err := os.Stat("/dev/vduse/control"); err == nil {
		t.Skip("this kernel has VDUSE")
	}
	img := filepath.Join(t.TempDir(), "disk.img")
	var stdout, stderr bytes.Buffer
	code := run([]string{"serve", "--vduse", "vd0", "--blk-file", img, "--size", "1M"}, &stdout, &stderr)
	if code != 1 {
		t.Errorf("exit code %d, want 1; stderr: %s", code, stderr.String())
	}
	msg := strings.TrimSuffix(stderr.String(), "\n")
	if strings.Count(msg, "\n") != 0 || !strings.Contains(msg, "the kernel has no VDUSE (/dev/vduse/control is missing") {
		t.Errorf("stderr %q: want one line saying the kernel has no VDUSE", msg)
	}
}
