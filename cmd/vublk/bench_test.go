package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	loadgen "github.com/vublk/vublk/bench"
	"github.com/vublk/vublk/vhostuser/vhostusertest"
)

// startBenchServer serves a file in a temporary directory in-process, as vublk serve does, and
// returns the socket.
func startBenchServer(t *testing.T, size int64, queues int) string {
	return vhostusertest.ServeFile(t, size, queues, false).Socket
}

func TestBenchUsageErrors(t *testing.T) {
	sock := startBenchServer(t, 1<<20, 1)
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no socket", nil, "--socket is required"},
		{"bad rw", []string{"--rw", "randtrim"}, `--rw must be randread, randwrite, read, write or randrw, not "randtrim"`},
		{"bs not a multiple of 512", []string{"--bs", "1000"}, "--bs 1000 is not a positive multiple of 512"},
		{"bs garbage", []string{"--bs", "big"}, `invalid value "big" for flag -bs`},
		{"bs too large", []string{"--bs", "1G"}, "larger than"},
		{"iodepth zero", []string{"--iodepth", "0"}, "--iodepth must be between 1 and 256"},
		{"queues zero", []string{"--queues", "0"}, "--queues must be between 1 and 64"},
		{"bad runtime", []string{"--runtime", "soon"}, `invalid value "soon" for flag -runtime`},
		{"zero runtime", []string{"--runtime", "0"}, "--runtime must be positive"},
		{"flush on reads", []string{"--rw", "read", "--flush-every", "4"}, "--flush-every needs a job that writes"},
		{"verify reads", []string{"--rw", "randread", "--verify"}, "--verify checks what the run wrote"},
		{"size not a multiple of bs", []string{"--size", "6k"}, "--size 6144 is not a multiple of --bs 4096"},
		{"size beyond the disk", []string{"--size", "2M"}, "larger than the device"},
		{"more queues than the server", []string{"--queues", "2"}, "queues"},
		{"negative server pid", []string{"--server-pid", "-3"}, "--server-pid must be a process id"},
		{"server pid of no process", []string{"--server-pid", "1073741824"}, "--server-pid 1073741824"},
		{"unknown flag", []string{"--fast"}, "flag provided but not defined: -fast"},
		{"extra argument", []string{"now"}, `unexpected argument "now"`},
		{"summary without files", []string{"summary"}, "no result files"},
		{"summary of a missing file", []string{"summary", filepath.Join(t.TempDir(), "none.jsonl")}, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Every case but these two runs against the server, so that only
			// the option under test is wrong.
			args := append([]string{"bench", "--socket", sock, "--runtime", "100ms"}, tt.args...)
			if tt.args == nil || tt.args[0] == "summary" {
				args = append([]string{"bench"}, tt.args...)
			}
			var stdout, stderr bytes.Buffer
			code := run(args, &stdout, &stderr)
			msg := stderr.String()
			if code != exitUsage {
				t.Errorf("exit code %d, want %d; stderr: %s", code, exitUsage, msg)
			}
			if !strings.HasPrefix(msg, "vublk bench") || !strings.Contains(msg, tt.want) {
				t.Errorf("stderr %q does not mention %q", msg, tt.want)
			}
			if strings.Count(msg, "\n") != 1 {
				t.Errorf("error is not one line: %q", msg)
			}
		})
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"bench", "--socket", filepath.Join(t.TempDir(), "none.sock"), "--runtime", "1s"}, &stdout, &stderr); code != 1 {
		t.Errorf("bench against no server: exit code %d, want 1; stderr %s", code, stderr.String())
	}
}

// benchJSON runs vublk bench with --json and decodes its output.
func benchJSON(t *testing.T, args ...string) loadgen.Result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	if code := run(append([]string{"bench", "--json"}, args...), &stdout, &stderr); code != 0 {
		t.Fatalf("vublk bench %s: exit code %d: %s%s", strings.Join(args, " "), code, stderr.String(), stdout.String())
	}
	var res loadgen.Result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil || strings.Count(stdout.String(), "\n") != 1 {
		t.Fatalf("--json output %q: %v", stdout.String(), err)
	}
	return res
}

func TestBenchVublk(t *testing.T) {
	sock := startBenchServer(t, 8<<20, 2)
	pid := strconv.Itoa(os.Getpid())
	res := benchJSON(t, "--socket", sock, "--rw", "randrw", "--verify", "--flush-every", "8", "--iodepth", "8",
		"--queues", "2", "--runtime", "500ms", "--size", "4M", "--server-pid", pid, "--label", "vublk")
	if res.IOs == 0 || res.Read.IOs == 0 || res.Write.IOs == 0 || res.Flush.IOs == 0 || res.Errors != 0 {
		t.Fatalf("%d IOs (%d reads, %d writes, %d flushes), %d errors: %s", res.IOs, res.Read.IOs, res.Write.IOs,
			res.Flush.IOs, res.Errors, res.FirstErr)
	}
	if v := res.Verify; v == nil || v.Checked == 0 || v.ReadBack == 0 || v.Errors != 0 {
		t.Fatalf("verify %+v", v)
	}
	if res.Label != "vublk" || res.Job.Name != "randrw-4k-qd8-q2-flush8" || res.Job.Size != 4<<20 || res.ServerCPU == nil {
		t.Errorf("result %+v", res)
	}

	// Text output.
	var stdout, stderr bytes.Buffer
	if code := run([]string{"bench", "--socket", sock, "--rw", "write", "--bs", "64k", "--iodepth", "4", "--runtime", "0.3",
		"--server-pid", pid}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit code %d: %s", code, stderr.String())
	}
	for _, want := range []string{"write-64k-qd4-q1 on " + sock, "IOPS", "MiB/s", "p99.9", "server  pid " + pid, "us/IO"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("text output lacks %q:\n%s", want, stdout.String())
		}
	}

	// vublk bench summary over results of two labels.
	var lines []string
	for _, label := range []string{"qsd", "vublk", "qsd", "vublk"} {
		r := benchJSON(t, "--socket", sock, "--rw", "randread", "--iodepth", "4", "--runtime", "100ms", "--label", label, "--server-pid", pid)
		b, _ := json.Marshal(r)
		lines = append(lines, string(b))
	}
	file := filepath.Join(t.TempDir(), "results.jsonl")
	if err := os.WriteFile(file, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout.Reset()
	stderr.Reset()
	if code := run([]string{"bench", "summary", "--base", "qsd", file}, &stdout, &stderr); code != 0 {
		t.Fatalf("summary: exit code %d: %s", code, stderr.String())
	}
	for _, want := range []string{"IOPS qsd", "IOPS vublk", "vublk/qsd", "CPUus/IO", "randread-4k-qd4-q1", "2/2"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, stdout.String())
		}
	}
	stderr.Reset()
	if code := run([]string{"bench", "summary", "--base", "spdk", file}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), `"spdk"`) {
		t.Errorf("summary with an unknown base: exit code %d, %s", code, stderr.String())
	}
}

// TestBenchQSD runs vublk bench for a second against a real
// qemu-storage-daemon, started as scripts/bench.sh starts it.
func TestBenchQSD(t *testing.T) {
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Skip("qemu-storage-daemon is not installed (make deps installs it, with qemu-system-common)")
	}
	dir := t.TempDir()
	img, sock := filepath.Join(dir, "disk.img"), filepath.Join(dir, "qsd.sock")
	if err := os.WriteFile(img, make([]byte, 16<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	cmd := exec.Command(qsd,
		"--blockdev", "driver=file,node-name=f,filename="+img+",cache.direct=off",
		"--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path="+sock+",writable=on,num-queues=2")
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("qemu-storage-daemon exited (%v): %s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qemu-storage-daemon did not listen on %s: %s", sock, logs.String())
		}
	}
	pid := cmd.Process.Pid
	res := benchJSON(t, "--socket", sock, "--rw", "randwrite", "--iodepth", "16", "--queues", "2", "--runtime", "1s",
		"--flush-every", "32", "--verify", "--server-pid", fmt.Sprint(pid), "--label", "qsd")
	if res.IOs == 0 || res.Errors != 0 || res.Flush.IOs == 0 || res.Verify == nil || res.Verify.ReadBack == 0 || res.Verify.Errors != 0 {
		t.Fatalf("%d IOs, %d flushes, %d errors (%s), verify %+v", res.IOs, res.Flush.IOs, res.Errors, res.FirstErr, res.Verify)
	}
	if res.ServerCPU == nil || res.ServerCPU.PID != pid || res.ServerCPU.Seconds <= 0 || res.ServerCPU.MicrosPerIO <= 0 {
		t.Errorf("server CPU %+v", res.ServerCPU)
	}
	t.Logf("qemu-storage-daemon: %.0f IOPS, p99 %.0f us, %.1f us server CPU per IO", res.IOPS, res.Latency.P99, res.ServerCPU.MicrosPerIO)
}
