package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/vhostuser/frontend"
)

// limitsConfig writes a configuration with exports alpha and beta in the I/O group t1 (group
// limits groupLimits) and gamma with its own limits gammaLimits.
func limitsConfig(t *testing.T, dir, groupLimits, gammaLimits string) string {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "[global]\nlog_format = \"json\"\nlanes = 2\n\n[[io_group]]\nname = \"t1\"\n%s\n", groupLimits)
	for _, name := range []string{"alpha", "beta", "gamma"} {
		fmt.Fprintf(&b, "\n[[export]]\nname = %q\nsocket_path = %q\nfile = %q\nsize = \"4M\"\nnum_queues = 2\n",
			name, filepath.Join(dir, name+".sock"), filepath.Join(dir, name+".img"))
		if name == "gamma" {
			b.WriteString(gammaLimits + "\n")
		} else {
			b.WriteString("io_group = \"t1\"\n")
		}
	}
	path := filepath.Join(dir, "vublk.toml")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// writeRate writes 4 KiB with 4 writers on each queue of dev for d and returns the writes per
// second: enough in flight that the limit, not the round trip, sets the pace.
func writeRate(t *testing.T, dev *frontend.Device, d time.Duration) float64 {
	t.Helper()
	var n atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range 4 * dev.NumQueues() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q := dev.Queue(w % dev.NumQueues())
			buf := make([]byte, 4096)
			for time.Since(start) < d {
				if err := q.Write(uint64(w)*8, buf); err != nil {
					t.Errorf("write: %v", err)
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	return float64(n.Load()) / time.Since(start).Seconds()
}

// TestServiceLimits: two exports of one I/O group share its limit, an export with no limit is
// not slowed, and a SIGHUP that changes limits applies them at once on the same connections,
// without restarting anything.
func TestServiceLimits(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	conf := limitsConfig(t, dir, "iops_total = 40", "")
	cmd, logs, done := startServe(t, bin, "serve", "--config", conf)
	waitLog(t, logs, `"msg":"export ready"`, 3)
	devs := map[string]*frontend.Device{}
	for _, name := range []string{"alpha", "beta", "gamma"} {
		devs[name] = connect(t, filepath.Join(dir, name+".sock"))
		defer devs[name].Close()
	}
	measure := func(names ...string) map[string]float64 {
		var mu sync.Mutex
		var wg sync.WaitGroup
		rates := map[string]float64{}
		for _, name := range names {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := writeRate(t, devs[name], 2*time.Second)
				mu.Lock()
				rates[name] = r
				mu.Unlock()
			}()
		}
		wg.Wait()
		return rates
	}

	r := measure("alpha", "beta", "gamma")
	if sum := r["alpha"] + r["beta"]; sum < 36 || sum > 46 {
		t.Errorf("the group t1 (40 IOPS) did %.1f + %.1f writes/s", r["alpha"], r["beta"])
	}
	if r["alpha"] < 10 || r["beta"] < 10 {
		t.Errorf("unfair share of the group: %.1f and %.1f writes/s", r["alpha"], r["beta"])
	}
	if r["gamma"] < 200 {
		t.Errorf("gamma, unlimited, did only %.1f writes/s", r["gamma"])
	}

	// Raise the group's limit and limit gamma: live, on the same connections.
	limitsConfig(t, dir, "iops_total = 150", "iops_write = 30")
	cmd.Process.Signal(syscall.SIGHUP)
	waitLog(t, logs, `"msg":"configuration reloaded"`, 1)
	if !strings.Contains(logs.String(), `"limits":["gamma"]`) {
		t.Errorf("reload summary does not list gamma's new limits:\n%s", logs.String())
	}
	r = measure("alpha", "gamma")
	if r["alpha"] < 135 || r["alpha"] > 170 {
		t.Errorf("alpha after raising t1 to 150 IOPS: %.1f writes/s", r["alpha"])
	}
	if r["gamma"] < 27 || r["gamma"] > 35 {
		t.Errorf("gamma after limiting it to 30 write IOPS: %.1f writes/s", r["gamma"])
	}
	if strings.Contains(logs.String(), `"msg":"export stopped"`) {
		t.Errorf("an export restarted on a change of limits:\n%s", logs.String())
	}
	stopServe(t, cmd, logs, done)
}

func TestServeLimitFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--iops-total-max", "10"}, "--iops-total-max needs --iops-total"},
		{[]string{"--bps-read", "2M", "--bps-read-max", "1M"}, "--bps-read-max is below --bps-read"},
		{[]string{"--iops-write", "10", "--iops-write-max-length", "3"}, "--iops-write-max-length needs --iops-write-max"},
		{[]string{"--iops-read", "x"}, `--iops-read "x": want a positive number`},
		{[]string{"--bps-total", "0"}, `want a positive number`},
		{[]string{"--iops-size", "100"}, "--iops-size must be at least 512"},
	} {
		var stdout, stderr strings.Builder
		args := append([]string{"serve", "--socket-path", "/tmp/none.sock", "--blk-file", "/tmp/none.img", "--size", "1M"}, tc.args...)
		if code := run(args, &stdout, &stderr); code != exitUsage || !strings.Contains(stderr.String(), tc.msg) {
			t.Errorf("%v: exit %d, stderr %q, want %q", tc.args, code, stderr.String(), tc.msg)
		}
	}
}

// TestServeIOPSFlag: vublk serve --iops-write limits the export.
func TestServeIOPSFlag(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "d.sock")
	cmd, logs, done := startServe(t, bin, "serve", "--socket-path", sock, "--blk-file", filepath.Join(dir, "d.img"),
		"--size", "4M", "--num-queues", "2", "--iops-write", "50", "--log-format", "json")
	waitLog(t, logs, `"msg":"export ready"`, 1)
	if !strings.Contains(logs.String(), `"limited":true`) {
		t.Errorf("export ready does not say it is limited:\n%s", logs.String())
	}
	dev := connect(t, sock)
	if r := writeRate(t, dev, 2*time.Second); r < 45 || r > 57 {
		t.Errorf("--iops-write 50: %.1f writes/s", r)
	}
	dev.Close()
	stopServe(t, cmd, logs, done)
}
