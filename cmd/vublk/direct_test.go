package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/backend"
)

// directDir is a temporary directory on a file system that takes O_DIRECT, or the test is
// skipped.
func directDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	s, err := backend.OpenFile(filepath.Join(dir, "probe.img"), backend.FileOptions{CreateSize: 1 << 20, Direct: true})
	if err != nil {
		t.Skipf("the temporary directory does not take O_DIRECT: %v", err)
	}
	s.Close()
	os.Remove(filepath.Join(dir, "probe.img"))
	return dir
}

// skipWithoutURing skips the test where an io_uring engine cannot start.
func skipWithoutURing(t *testing.T, dir string) {
	t.Helper()
	s, err := backend.OpenFile(filepath.Join(dir, "uring-probe.img"), backend.FileOptions{CreateSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(filepath.Join(dir, "uring-probe.img"))
	defer s.Close()
	e, err := backend.NewEngineWith(s, backend.EngineOptions{Lanes: 1, IOEngine: backend.IOEngineURing})
	if err != nil {
		t.Skipf("no io_uring engine here: %v", err)
	}
	e.Close()
}

// TestServeDirectAndIOEngine runs vublk serve with --direct and --io-engine, and a guest's
// writes and reads go through.
func TestServeDirectAndIOEngine(t *testing.T) {
	bin := binary(t)
	for _, tc := range []struct {
		name  string
		args  []string
		logs  []string // in the "export ready" line
		uring bool     // skipped where the kernel refuses io_uring
	}{
		{"direct with lanes", []string{"--direct", "--io-engine", "lanes"}, []string{"direct=true", "io_engine=lanes"}, false},
		{"default", nil, []string{"direct=false", "io_engine=lanes"}, false},
		{"direct with 4096-byte blocks", []string{"--direct", "--logical-block-size", "4096"}, []string{"direct=true"}, false},
		{"direct with io_uring", []string{"--direct", "--io-engine", "uring"}, []string{"direct=true", "io_engine=uring"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := directDir(t)
			if tc.uring {
				skipWithoutURing(t, dir)
			}
			sock := filepath.Join(dir, "s.sock")
			cmd := exec.Command(bin, append([]string{"serve", "--socket-path", sock, "--blk-file", filepath.Join(dir, "d.img"),
				"--size", "4M", "--num-queues", "2"}, tc.args...)...)
			logs, wait := started(t, cmd)
			d := connect(t, sock)
			roundTrip(t, d, 8)
			roundTrip(t, d, 4096)
			d.Close()
			cmd.Process.Signal(syscall.SIGTERM)
			if err := wait(); err != nil { // logs is written until then
				t.Fatalf("exit: %v\n%s", err, logs.String())
			}
			for _, want := range tc.logs {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("the log does not say %s:\n%s", want, logs.String())
				}
			}
		})
	}
}

// TestServeURing: io_uring either serves, or (a kernel without it, or one that refuses it) the
// export does not start: one error line and exit code 1, not a usage error.
func TestServeURing(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	cmd, logs, done := startServe(t, bin, "serve", "--socket-path", sock, "--blk-file", filepath.Join(dir, "d.img"), "--size", "4M",
		"--io-engine", "uring")
	deadline := time.After(30 * time.Second)
	for !strings.Contains(logs.String(), "export ready") {
		select {
		case err := <-done:
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("exit %v, want code 1:\n%s", err, logs.String())
			}
			if !strings.Contains(logs.String(), "cannot start the export") || !strings.Contains(logs.String(), "uring") {
				t.Errorf("the error does not name io_uring:\n%s", logs.String())
			}
			if strings.Count(strings.TrimSpace(logs.String()), "\n") != 0 {
				t.Errorf("more than one line:\n%s", logs.String())
			}
			t.Logf("io_uring refused: %s", logs.String())
			return
		case <-deadline:
			t.Fatalf("neither ready nor exited:\n%s", logs.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	if !strings.Contains(logs.String(), "io_engine=uring") {
		t.Errorf("the log does not say io_engine=uring:\n%s", logs.String())
	}
	d := connect(t, sock)
	roundTrip(t, d, 8)
	d.Close()
	cmd.Process.Signal(syscall.SIGTERM)
	if err := <-done; err != nil {
		t.Fatalf("exit: %v\n%s", err, logs.String())
	}
}

// TestStartExportEngine: startExport hands io_engine to the backend; an engine that cannot
// run fails the start with an engineError and leaves no socket behind.
func TestStartExportEngine(t *testing.T) {
	logger, err := newLogger("error", "text", &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	for _, engine := range []string{"lanes", "uring", "bogus"} {
		t.Run(engine, func(t *testing.T) {
			dir := t.TempDir()
			sock := filepath.Join(dir, "s.sock")
			e, err := startExport(exportSpec{
				name: "x", socketPath: sock, fd: -1, file: filepath.Join(dir, "d.img"), size: 1 << 20,
				numQueues: 1, lanes: 2, ioEngine: engine, blockSize: 512, socketUID: -1, socketGID: -1,
			}, logger)
			switch {
			case err == nil && engine == "bogus":
				e.stop()
				t.Fatal("an unknown engine started")
			case err == nil:
				if err := e.stop(); err != nil {
					t.Fatal(err)
				}
				return
			case engine == "lanes":
				t.Fatal(err)
			case engine == "uring":
				// The kernel refused io_uring (ErrNotSupported, or the errno of the refusal).
				t.Logf("io_uring refused: %v", err)
			}
			if !errors.As(err, new(engineError)) {
				t.Errorf("%v is not an engineError", err)
			}
			if _, err := os.Stat(sock); err == nil {
				t.Error("the failed start left its socket behind")
			}
		})
	}
}

// TestServiceConfigDirect: direct and io_engine from the configuration reach the export, and
// changing direct restarts it on reload.
func TestServiceConfigDirect(t *testing.T) {
	bin := binary(t)
	dir := directDir(t)
	conf := serviceConfig(t, dir, map[string]string{"alpha": "4M", "beta": "4M"}, "direct = true\nio_engine = \"lanes\"")
	cmd, logs, done := startServe(t, bin, "serve", "--config", conf)
	waitLog(t, logs, `"msg":"export ready"`, 2)
	if n := strings.Count(logs.String(), `"direct":true`); n != 2 {
		t.Errorf("%d exports say direct, want 2:\n%s", n, logs.String())
	}
	if n := strings.Count(logs.String(), `"io_engine":"lanes"`); n != 2 {
		t.Errorf("%d exports say io_engine lanes, want 2:\n%s", n, logs.String())
	}
	alpha := connect(t, filepath.Join(dir, "alpha.sock"))
	roundTrip(t, alpha, 8)
	alpha.Close()

	// direct = false for beta alone: beta restarts, alpha is not touched.
	data, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.Replace(string(data), "name = \"beta\"\n", "name = \"beta\"\ndirect = false\n", 1)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, logs, `"msg":"configuration reloaded"`, 1)
	if !strings.Contains(logs.String(), `"restarted":["beta"]`) {
		t.Errorf("reload summary:\n%s", logs.String())
	}
	waitLog(t, logs, `"direct":false`, 1)
	beta := connect(t, filepath.Join(dir, "beta.sock"))
	roundTrip(t, beta, 8)
	beta.Close()

	stopServe(t, cmd, logs, done)
}
