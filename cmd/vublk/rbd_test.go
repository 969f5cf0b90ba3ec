package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vublk/vublk/backend/rbd"
)

// TestRBDUsageErrors: --blk-rbd's flags are checked before anything connects, each problem in
// one line with exit code 2; a vublk built without librbd says how to get it.
func TestRBDUsageErrors(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	type usageCase struct {
		name string
		args []string
		want string
	}
	tests := []usageCase{
		{"file and rbd", []string{"serve", "--socket-path", sock, "--blk-file", img, "--blk-rbd", "rbd/x"}, "exclude each other"},
		{"bad spec", []string{"serve", "--socket-path", sock, "--blk-rbd", "justanimage"}, "--blk-rbd"},
		{"empty snap", []string{"serve", "--socket-path", sock, "--blk-rbd", "rbd/x@"}, "empty snapshot"},
		{"ceph-conf without rbd", []string{"serve", "--socket-path", sock, "--blk-file", img, "--ceph-conf", "/etc/ceph/ceph.conf"}, "need --blk-rbd"},
		{"rbd-timeout without rbd", []string{"serve", "--socket-path", sock, "--blk-file", img, "--rbd-timeout", "5s"}, "need --blk-rbd"},
		{"config and rbd", []string{"serve", "--config", img, "--blk-rbd", "rbd/x"}, "--config cannot be combined"},
	}
	if rbd.Built {
		tests = append(tests,
			usageCase{"short timeout", []string{"serve", "--socket-path", sock, "--blk-rbd", "rbd/x", "--rbd-timeout", "10ms"}, "--rbd-timeout"},
			usageCase{"rbd with uring", []string{"serve", "--socket-path", sock, "--blk-rbd", "rbd/x", "--io-engine", "uring"}, "apply to --blk-file only"},
		)
	} else {
		tests = append(tests, usageCase{"not built", []string{"serve", "--socket-path", sock, "--blk-rbd", "rbd/x"}, "built without RBD support: build with `make`"})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			if code := run(tt.args, &stdout, &stderr); code != exitUsage {
				t.Errorf("exit code %d, want %d; stderr: %s", code, exitUsage, stderr.String())
			}
			msg := stderr.String()
			if !strings.Contains(msg, tt.want) || strings.Count(strings.TrimSuffix(msg, "\n"), "\n") > 0 {
				t.Errorf("stderr %q: want one line mentioning %q", msg, tt.want)
			}
		})
	}
}
