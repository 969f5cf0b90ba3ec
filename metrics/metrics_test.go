package metrics_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/metrics"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

const (
	diskSize = 1 << 20
	lanes    = 2
	// guard bounds waits that only a deadlock could make long.
	guard = time.Minute
)

// heldStore holds writes while hold is open, so that a test can look at
// requests in flight.
type heldStore struct {
	*backend.CrashStore
	hold chan struct{} // nil: writes run at once
}

func (s *heldStore) WriteAt(bufs [][]byte, off int64) error {
	if s.hold != nil {
		<-s.hold
	}
	return s.CrashStore.WriteAt(bufs, off)
}

// export is a disk served as cmd/vublk serves one: an engine over a
// CrashStore, a BlkDevice and a vhost-user server, with the test front-end
// connected as the guest.
type export struct {
	store  *backend.CrashStore
	engine *backend.Engine
	dev    *virtio.BlkDevice
	q      *frontend.Queue
}

func newExport(t *testing.T, store backend.Store, crash *backend.CrashStore) *export {
	t.Helper()
	log := logrus.New()
	log.SetOutput(io.Discard)
	entry := log.WithField("export", t.Name())
	engine := backend.NewEngine(store, lanes)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{
		Capacity: diskSize, BlockSize: 512, NumQueues: 1, Serial: "metrics", Writeback: true, Discard: true,
	}, entry)
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "vublk")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := vhostuser.NewServer(dev, 1, entry)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	d, err := frontend.Connect(sock, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Close()
		srv.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		engine.Close()
		os.RemoveAll(dir)
	})
	return &export{store: crash, engine: engine, dev: dev, q: d.Queue(0)}
}

func serve(t *testing.T, reg *prometheus.Registry) *metrics.Server {
	t.Helper()
	srv, err := metrics.Serve("127.0.0.1:0", reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("metrics server: %v", err)
		}
	})
	return srv
}

// scrape gets the metrics over HTTP and parses them.
func scrape(t *testing.T, client *http.Client, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mf, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return mf
}

// find returns the series of family name whose labels include want
// ("name=value" pairs), or nil.
func find(mf map[string]*dto.MetricFamily, name string, want ...string) *dto.Metric {
	f := mf[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for _, w := range want {
			k, v, _ := strings.Cut(w, "=")
			if have[k] != v {
				continue next
			}
		}
		return m
	}
	return nil
}

func histogramCount(t *testing.T, mf map[string]*dto.MetricFamily, name string, labels ...string) uint64 {
	t.Helper()
	m := find(mf, name, labels...)
	if m == nil || m.Histogram == nil {
		t.Fatalf("no histogram %s%v in the scrape", name, labels)
	}
	return m.Histogram.GetSampleCount()
}

func mustOK(t *testing.T, what string, r frontend.Result) {
	t.Helper()
	if r.Err != nil {
		t.Fatalf("%s: %v", what, r.Err)
	}
}

func TestScrapeShowsGuestRequests(t *testing.T) {
	crash := backend.NewCrashStore(diskSize)
	e := newExport(t, crash, crash)
	reg := metrics.NewRegistry()
	x := metrics.NewExporter("disk0", e.engine, e.dev)
	if err := x.Register(reg); err != nil {
		t.Fatal(err)
	}
	srv := serve(t, reg)

	// What the guest does.
	data := make([]byte, 4096)
	for i := range 3 {
		mustOK(t, "write", e.q.Do(frontend.WriteRequest(uint64(i*8), data)))
	}
	mustOK(t, "read", e.q.Do(frontend.ReadRequest(0, 4096)))
	mustOK(t, "read", e.q.Do(frontend.ReadRequest(8, 8192)))
	mustOK(t, "flush", e.q.Do(frontend.FlushRequest()))
	mustOK(t, "discard", e.q.Do(frontend.DiscardRequest(64, 8)))
	mustOK(t, "write-zeroes", e.q.Do(frontend.WriteZeroesRequest(72, 8, false)))
	mustOK(t, "get-id", e.q.Do(frontend.GetIDRequest()))
	// Beyond the end of the disk: the device answers IOERR without the store.
	if r := e.q.Do(frontend.ReadRequest(diskSize/512, 512)); !errors.Is(r.Err, frontend.ErrIOError) {
		t.Fatalf("read beyond the end: %v, want IOERR", r.Err)
	}
	if r := e.q.Do(frontend.Request{Type: 99}); !errors.Is(r.Err, frontend.ErrUnsupported) {
		t.Fatalf("unknown request type: %v, want UNSUPP", r.Err)
	}

	const want = `
# HELP vublk_requests_total Requests executed by the engine, by operation (read, write, discard, write-zeroes, flush). Requests the device rejected before the store (bad range, read-only, unsupported) are counted only in vublk_request_errors_total.
# TYPE vublk_requests_total counter
vublk_requests_total{export="disk0",op="discard"} 1
vublk_requests_total{export="disk0",op="flush"} 1
vublk_requests_total{export="disk0",op="read"} 2
vublk_requests_total{export="disk0",op="write"} 3
vublk_requests_total{export="disk0",op="write-zeroes"} 1
# HELP vublk_bytes_total Bytes read and written by successful requests, by operation (read, write).
# TYPE vublk_bytes_total counter
vublk_bytes_total{export="disk0",op="read"} 12288
vublk_bytes_total{export="disk0",op="write"} 12288
# HELP vublk_request_errors_total Requests completed to the guest with an error status (ioerr, unsupp): bad requests, failed store operations and failed flushes.
# TYPE vublk_request_errors_total counter
vublk_request_errors_total{export="disk0",status="ioerr"} 1
vublk_request_errors_total{export="disk0",status="unsupp"} 1
# HELP vublk_store_errors_total Store operations (read, write, discard, write-zeroes) that failed.
# TYPE vublk_store_errors_total counter
vublk_store_errors_total{export="disk0"} 0
# HELP vublk_flush_errors_total Guest flushes that failed.
# TYPE vublk_flush_errors_total counter
vublk_flush_errors_total{export="disk0"} 0
# HELP vublk_sync_failed 1 once a sync of the store has failed: every later flush fails until the export is restarted.
# TYPE vublk_sync_failed gauge
vublk_sync_failed{export="disk0"} 0
# HELP vublk_lane_inflight Requests handed to a lane and not finished: queued or executing.
# TYPE vublk_lane_inflight gauge
vublk_lane_inflight{export="disk0",lane="0"} 0
vublk_lane_inflight{export="disk0",lane="1"} 0
# HELP vublk_uring_inflight Requests on the io_uring and not finished (always 0 with --io-engine lanes).
# TYPE vublk_uring_inflight gauge
vublk_uring_inflight{export="disk0"} 0
`
	if err := testutil.ScrapeAndCompare(srv.URL(), strings.NewReader(want),
		"vublk_requests_total", "vublk_bytes_total", "vublk_request_errors_total", "vublk_store_errors_total",
		"vublk_flush_errors_total", "vublk_sync_failed", "vublk_lane_inflight", "vublk_uring_inflight"); err != nil {
		t.Error(err)
	}

	mf := scrape(t, http.DefaultClient, srv.URL())
	// How many ran inline depends on how fast the store was: at most the reads and writes.
	if m := find(mf, "vublk_inline_requests_total", "export=disk0"); m == nil || m.Counter.GetValue() > 5 {
		t.Errorf("vublk_inline_requests_total = %v, want a counter of at most 5", m)
	}
	for op, n := range map[string]uint64{"read": 2, "write": 3, "discard": 1, "write-zeroes": 1, "flush": 1} {
		if got := histogramCount(t, mf, "vublk_request_duration_seconds", "export=disk0", "op="+op); got != n {
			t.Errorf("vublk_request_duration_seconds{op=%q} has %d samples, want %d", op, got, n)
		}
	}
	for _, name := range []string{"vublk_flush_barrier_wait_seconds", "vublk_flush_sync_seconds"} {
		if got := histogramCount(t, mf, name, "export=disk0"); got != 1 {
			t.Errorf("%s has %d samples, want 1", name, got)
		}
	}
	// The registry's own collectors are served too.
	if mf["go_goroutines"] == nil || mf["process_open_fds"] == nil {
		t.Error("the Go and process collectors are missing from the scrape")
	}
}

func TestScrapeShowsFailures(t *testing.T) {
	crash := backend.NewCrashStore(diskSize)
	e := newExport(t, crash, crash)
	reg := prometheus.NewRegistry()
	x := metrics.NewExporter("disk0", e.engine, e.dev)
	if err := x.Register(reg); err != nil {
		t.Fatal(err)
	}
	srv := serve(t, reg)

	crash.SetSyncError(errors.New("injected EIO"))
	mustOK(t, "write", e.q.Do(frontend.WriteRequest(0, make([]byte, 512))))
	for range 2 {
		if r := e.q.Do(frontend.FlushRequest()); !errors.Is(r.Err, frontend.ErrIOError) {
			t.Fatalf("flush after a failed sync: %v, want IOERR", r.Err)
		}
	}
	const want = `
# HELP vublk_flush_errors_total Guest flushes that failed.
# TYPE vublk_flush_errors_total counter
vublk_flush_errors_total{export="disk0"} 2
# HELP vublk_sync_failed 1 once a sync of the store has failed: every later flush fails until the export is restarted.
# TYPE vublk_sync_failed gauge
vublk_sync_failed{export="disk0"} 1
# HELP vublk_request_errors_total Requests completed to the guest with an error status (ioerr, unsupp): bad requests, failed store operations and failed flushes.
# TYPE vublk_request_errors_total counter
vublk_request_errors_total{export="disk0",status="ioerr"} 2
vublk_request_errors_total{export="disk0",status="unsupp"} 0
`
	if err := testutil.ScrapeAndCompare(srv.URL(), strings.NewReader(want),
		"vublk_flush_errors_total", "vublk_sync_failed", "vublk_request_errors_total"); err != nil {
		t.Error(err)
	}
}

func TestScrapeShowsLaneInflight(t *testing.T) {
	crash := backend.NewCrashStore(diskSize)
	held := &heldStore{CrashStore: crash, hold: make(chan struct{})}
	e := newExport(t, held, crash)
	reg := prometheus.NewRegistry()
	x := metrics.NewExporter("disk0", e.engine, e.dev)
	if err := x.Register(reg); err != nil {
		t.Fatal(err)
	}
	srv := serve(t, reg)

	const n = 5
	var pending []*frontend.Pending
	for i := range n {
		p, err := e.q.Submit(frontend.WriteRequest(uint64(i), make([]byte, 512)))
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, p)
	}
	// The device submits them to the engine as it pops them; count until
	// every one is held in a lane.
	deadline := time.Now().Add(guard)
	for {
		mf := scrape(t, http.DefaultClient, srv.URL())
		var per []float64
		total := 0.0
		for lane := range lanes {
			m := find(mf, "vublk_lane_inflight", "export=disk0", fmt.Sprintf("lane=%d", lane))
			if m == nil {
				t.Fatalf("no vublk_lane_inflight for lane %d", lane)
			}
			per = append(per, m.Gauge.GetValue())
			total += m.Gauge.GetValue()
		}
		if total == n {
			// Round robin over two lanes.
			if per[0]+per[1] != n || per[0] < 2 || per[1] < 2 {
				t.Errorf("lanes hold %v requests, want 2 and 3", per)
			}
			break
		}
		if total > n || time.Now().After(deadline) {
			t.Fatalf("lanes hold %v requests, want %d in all", per, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(held.hold)
	for _, p := range pending {
		mustOK(t, "held write", p.Wait())
	}
	mf := scrape(t, http.DefaultClient, srv.URL())
	for lane := range lanes {
		if m := find(mf, "vublk_lane_inflight", "export=disk0", fmt.Sprintf("lane=%d", lane)); m.Gauge.GetValue() != 0 {
			t.Errorf("lane %d holds %v requests after they completed", lane, m.Gauge.GetValue())
		}
	}
	if got := histogramCount(t, mf, "vublk_request_duration_seconds", "export=disk0", "op=write"); got != n {
		t.Errorf("%d writes timed, want %d", got, n)
	}
}

// TestRegisterUnregister is what a reload does: exports come and go on one
// registry served all along.
func TestRegisterUnregister(t *testing.T) {
	crash0 := backend.NewCrashStore(diskSize)
	crash1 := backend.NewCrashStore(diskSize)
	e0 := newExport(t, crash0, crash0)
	e1 := newExport(t, crash1, crash1)
	reg := prometheus.NewRegistry()
	srv := serve(t, reg)
	x0 := metrics.NewExporter("disk0", e0.engine, e0.dev)
	x1 := metrics.NewExporter("disk1", e1.engine, e1.dev)
	for _, x := range []*metrics.Exporter{x0, x1} {
		if err := x.Register(reg); err != nil {
			t.Fatal(err)
		}
	}
	// A second exporter of a registered name is refused.
	if err := metrics.NewExporter("disk0", e1.engine, e1.dev).Register(reg); err == nil {
		t.Error("a second exporter named disk0 was registered")
	}
	mustOK(t, "write disk0", e0.q.Do(frontend.WriteRequest(0, make([]byte, 512))))
	mustOK(t, "write disk1", e1.q.Do(frontend.WriteRequest(0, make([]byte, 1024))))

	series := func() map[string]int {
		n := map[string]int{}
		for _, f := range scrape(t, http.DefaultClient, srv.URL()) {
			for _, m := range f.Metric {
				for _, l := range m.Label {
					if l.GetName() == "export" {
						n[l.GetValue()]++
					}
				}
			}
		}
		return n
	}
	if n := series(); n["disk0"] == 0 || n["disk0"] != n["disk1"] {
		t.Fatalf("series by export: %v, want as many for disk0 as for disk1", n)
	}

	if !x0.Unregister(reg) {
		t.Fatal("Unregister disk0: not registered")
	}
	if n := series(); n["disk0"] != 0 || n["disk1"] == 0 {
		t.Errorf("series by export after unregistering disk0: %v, want only disk1", n)
	}
	// The unregistered export is no longer timed.
	mustOK(t, "write disk0", e0.q.Do(frontend.WriteRequest(0, make([]byte, 512))))
	if x0.Unregister(reg) {
		t.Error("Unregister disk0 twice: reported registered")
	}

	// The export comes back (a reload): its series are back, with the
	// engine's counters and new histograms.
	x0 = metrics.NewExporter("disk0", e0.engine, e0.dev)
	if err := x0.Register(reg); err != nil {
		t.Fatal(err)
	}
	mf := scrape(t, http.DefaultClient, srv.URL())
	if m := find(mf, "vublk_requests_total", "export=disk0", "op=write"); m == nil || m.Counter.GetValue() != 2 {
		t.Errorf("disk0 writes after re-registering: %v, want 2", m)
	}
	if got := histogramCount(t, mf, "vublk_request_duration_seconds", "export=disk0", "op=write"); got != 0 {
		t.Errorf("disk0 has %d timed writes after re-registering, want 0", got)
	}
	if m := find(mf, "vublk_bytes_total", "export=disk1", "op=write"); m == nil || m.Counter.GetValue() != 1024 {
		t.Errorf("disk1 bytes written: %v, want 1024", m)
	}
}

// The exporter describes what it collects (a pedantic registry checks) and
// follows the Prometheus naming conventions (promlint).
func TestExporterLint(t *testing.T) {
	crash := backend.NewCrashStore(diskSize)
	e := newExport(t, crash, crash)
	mustOK(t, "write", e.q.Do(frontend.WriteRequest(0, make([]byte, 512))))
	mustOK(t, "flush", e.q.Do(frontend.FlushRequest()))
	problems, err := testutil.CollectAndLint(metrics.NewExporter("disk0", e.engine, e.dev))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: %s", p.Metric, p.Text)
	}
}

func TestServeUnixSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "vublk")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "metrics.sock")
	// A stale socket from an earlier run is replaced.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()

	engine := backend.NewEngine(backend.NewCrashStore(diskSize), 1)
	defer engine.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.NewExporter("disk0", engine, nil))
	srv, err := metrics.Serve("unix:"+path, reg)
	if err != nil {
		t.Fatal(err)
	}
	// A second server on the same socket is refused.
	if s2, err := metrics.Serve("unix:"+path, reg); err == nil {
		s2.Close()
		t.Error("a second server was started on a socket in use")
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
	mf := scrape(t, client, "http://vublk"+metrics.Path)
	if find(mf, "vublk_requests_total", "export=disk0", "op=read") == nil {
		t.Error("no vublk_requests_total for disk0 over the unix socket")
	}
	if mf["vublk_request_errors_total"] != nil {
		t.Error("vublk_request_errors_total is served for an exporter without a device")
	}
	client.CloseIdleConnections()
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after Close: %v", err)
	}
}

func TestServeErrors(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"unix:", "unix:" + file, "127.0.0.1:notaport", "256.0.0.1:0"} {
		if s, err := metrics.Serve(addr, prometheus.NewRegistry()); err == nil {
			s.Close()
			t.Errorf("Serve(%q) succeeded", addr)
		}
	}
}

// nullStore does nothing, so that the benchmark measures the engine and the
// exporter's histograms alone.
type nullStore struct{}

func (nullStore) ReadAt(bufs [][]byte, off int64) error  { return nil }
func (nullStore) WriteAt(bufs [][]byte, off int64) error { return nil }
func (nullStore) Sync() error                            { return nil }
func (nullStore) Size() int64                            { return 1 << 40 }
func (nullStore) Close() error                           { return nil }

type chanDone chan *backend.Request

func (c chanDone) Complete(r *backend.Request) { c <- r }

// BenchmarkEngineExported is backend's BenchmarkEngineSubmit with an
// Exporter registered: the cost of timing every request into a histogram.
func BenchmarkEngineExported(b *testing.B) {
	const window = 32
	e := backend.NewEngine(nullStore{}, 4)
	defer e.Close()
	if err := metrics.NewExporter("bench", e, nil).Register(prometheus.NewRegistry()); err != nil {
		b.Fatal(err)
	}
	buf := [][]byte{make([]byte, 4096)}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		done := make(chanDone, window)
		reqs := make([]backend.Request, window)
		for i := range reqs {
			reqs[i] = backend.Request{Op: backend.OpWrite, Offset: int64(i) * 4096, Bufs: buf, Done: done}
			e.Submit(&reqs[i])
		}
		for pb.Next() {
			r := <-done
			e.Submit(r)
		}
		for range window {
			<-done
		}
	})
}
