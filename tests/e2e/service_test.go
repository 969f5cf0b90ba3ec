//go:build e2e

package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/config"
	"github.com/vublk/vublk/vhostuser/frontend"
)

// TestServiceFromExampleConfig runs vublk as the host service from the shipped example
// configuration (its paths moved to a temporary directory): a real guest uses one export while
// another export's front-end is killed in the middle of its I/O; the operator grows the guest's
// disk with a SIGHUP reload and the guest sees the new size live; the metrics endpoint shows the
// guest's requests; SIGTERM stops everything cleanly.
func TestServiceFromExampleConfig(t *testing.T) { forEachQEMU(t, testServiceFromExampleConfig) }

func testServiceFromExampleConfig(t *testing.T, q *qemuBinary) {
	dir := t.TempDir()
	example, err := os.ReadFile(filepath.Join(env.root, "examples", "vublk.toml"))
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := freeTCPAddr(t)
	write := func(text string) string {
		path := filepath.Join(dir, "vublk.toml")
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	text := localConfig(string(example), dir, metricsAddr)
	conf := write(text)
	cfg, err := config.Load(conf)
	if err != nil {
		t.Fatalf("the example configuration, moved to %s:\n%v\n%s", dir, err, text)
	}
	if len(cfg.Exports) < 3 {
		t.Fatalf("the example has %d exports, want at least 3", len(cfg.Exports))
	}
	var guest, victim *config.Export
	for i := range cfg.Exports {
		e := &cfg.Exports[i]
		switch {
		case guest == nil && !e.ReadOnly && e.SocketPath != "" && e.Size > 0:
			guest = e
		case victim == nil && e.SocketPath != "" && (guest == nil || e.Name != guest.Name):
			victim = e
		}
	}
	if guest == nil || victim == nil {
		t.Fatalf("the example needs a writable export with a size and another export: %+v", cfg.Exports)
	}
	d := startService(t, conf)

	// Kill the victim's front-end with writes in flight.
	fe, err := frontend.Connect(victim.SocketPath, frontend.Options{NumQueues: 1, MemSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 64; i++ {
		fe.Queue(0).Submit(frontend.WriteRequest(uint64(i*8), make([]byte, 4096)))
	}
	fe.Close()

	grown := guest.Size + 64<<20
	v := bootGuest(t, boot{
		qemu:  q,
		disks: []disk{{socket: guest.SocketPath, numQueues: 2}},
		params: map[string]string{
			"phase": "service", "size": strconv.FormatInt(guest.Size, 10), "serial": guest.Serial,
			"newsize": strconv.FormatInt(grown, 10),
		},
		timeout: 5 * time.Minute,
		onLine: func(line string) {
			if line != "E2E waiting-resize" {
				return
			}
			grownText, ok := setSize(text, guest.Name, grown)
			if !ok {
				t.Errorf("cannot find export %s in the configuration", guest.Name)
			}
			write(grownText)
			d.cmd.Process.Signal(syscall.SIGHUP)
		},
	})
	v.expectChecks(t, "service", []string{"size", "serial", "write", "write_disk", "read_back", "resized", "write_grown", "read_grown"})
	if n := d.countLogs("configuration reloaded"); n != 1 {
		t.Errorf("%d reloads logged, want 1", n)
	}
	if d.lastLog("export resized", guest.Name) == nil {
		t.Error("no \"export resized\" log: the front-end was not notified")
	}

	// Metrics over HTTP show the guest's requests, per export.
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, op := range []string{"read", "write", "flush"} {
		re := regexp.MustCompile(`vublk_requests_total\{export="` + regexp.QuoteMeta(guest.Name) + `",op="` + op + `"\} (\d+)`)
		m := re.FindSubmatch(body)
		if m == nil {
			t.Errorf("no %s counter for %s in the metrics", op, guest.Name)
			continue
		}
		if n, _ := strconv.Atoi(string(m[1])); n == 0 {
			t.Errorf("vublk_requests_total{export=%q,op=%q} is 0", guest.Name, op)
		}
	}
	if !strings.Contains(string(body), `vublk_request_duration_seconds_bucket{export="`+guest.Name+`"`) {
		t.Error("no latency histogram for the guest's export")
	}
	for _, e := range cfg.Exports {
		if !strings.Contains(string(body), `export="`+e.Name+`"`) {
			t.Errorf("no metrics for export %s", e.Name)
		}
	}

	if _, err := d.stop(); err != nil {
		t.Fatal(err)
	}
	for _, e := range cfg.Exports {
		st := d.lastLog("export stopped", e.Name)
		if st == nil {
			t.Errorf("export %s did not log its stop", e.Name)
			continue
		}
		if n, _ := st["flush_errors"].(float64); n != 0 {
			t.Errorf("export %s: %v flush errors", e.Name, n)
		}
	}
	if st := d.lastLog("export stopped", guest.Name); st != nil {
		if n, _ := st["flushes"].(float64); n == 0 {
			t.Errorf("the guest's export counted no flushes: %v", st)
		}
	}
}

// localConfig moves the example's paths into dir, drops the socket owner and group (the users
// may not exist here), logs JSON and serves metrics on addr.
func localConfig(example, dir, addr string) string {
	var out []string
	for _, line := range strings.Split(example, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(trimmed, "socket_owner"), strings.HasPrefix(trimmed, "socket_group"),
			strings.HasPrefix(trimmed, "log_format"), strings.HasPrefix(trimmed, "metrics_address"):
			continue
		}
		out = append(out, line)
	}
	text := strings.Join(out, "\n")
	for _, d := range []string{"/var/lib/vublk", "/run/vublk"} {
		local := filepath.Join(dir, filepath.Base(d))
		os.MkdirAll(local, 0o755)
		text = strings.ReplaceAll(text, d, local)
	}
	global := fmt.Sprintf("log_format = \"json\"\nmetrics_address = %q\n", addr)
	if strings.Contains(text, "[global]\n") {
		return strings.Replace(text, "[global]\n", "[global]\n"+global, 1)
	}
	return "[global]\n" + global + text
}

// setSize sets the size of export name in the configuration text.
func setSize(text, name string, size int64) (string, bool) {
	chunks := strings.Split(text, "[[export]]")
	sizeLine := regexp.MustCompile(`(?m)^\s*size\s*=.*$`)
	for i, c := range chunks {
		if i == 0 || !regexp.MustCompile(`(?m)^\s*name\s*=\s*"`+regexp.QuoteMeta(name)+`"`).MatchString(c) {
			continue
		}
		line := fmt.Sprintf("size = %d", size)
		if sizeLine.MatchString(c) {
			chunks[i] = sizeLine.ReplaceAllString(c, line)
		} else {
			chunks[i] = "\n" + line + c
		}
		return strings.Join(chunks, "[[export]]"), true
	}
	return text, false
}

func freeTCPAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
