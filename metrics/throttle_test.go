package metrics_test

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/metrics"
)

type wgDone struct{ wg *sync.WaitGroup }

func (d wgDone) Complete(*backend.Request) { d.wg.Done() }

// TestThrottleMetrics: an export and its group show the requests that waited, the time they
// waited and the limits in force; a pedantic registry accepts both collectors and promlint has
// nothing to say.
func TestThrottleMetrics(t *testing.T) {
	eng := backend.NewEngine(nullStore{}, 1)
	defer eng.Close()
	th := backend.NewThrottle(backend.Limits{IOPS: backend.Rate{Avg: 100, Max: 200, MaxLength: 2 * time.Second}, BPSRead: backend.Rate{Avg: 1 << 20}})
	eng.SetThrottle(th)
	var wg sync.WaitGroup
	for range 40 {
		wg.Add(1)
		eng.Submit(&backend.Request{Op: backend.OpWrite, Bufs: [][]byte{make([]byte, 512)}, Done: wgDone{&wg}})
	}
	wg.Wait()
	x := metrics.NewExporter("disk0", eng, nil)
	g := metrics.NewGroupExporter("tenant1", th)
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(x, g)
	if n := value(t, reg, "vublk_throttled_requests_total"); n < 20 {
		t.Errorf("vublk_throttled_requests_total = %v, want at least 20 of 40 requests", n)
	}
	want := `
# HELP vublk_io_group_io_limit I/O limits in force for the I/O group, by configuration key (iops_total, bps_read_max, iops_write_max_length in seconds, iops_size ...); only the limits that are set.
# TYPE vublk_io_group_io_limit gauge
vublk_io_group_io_limit{io_group="tenant1",limit="bps_read"} 1.048576e+06
vublk_io_group_io_limit{io_group="tenant1",limit="iops_total"} 100
vublk_io_group_io_limit{io_group="tenant1",limit="iops_total_max"} 200
vublk_io_group_io_limit{io_group="tenant1",limit="iops_total_max_length"} 2
# HELP vublk_io_group_throttle_waiting Requests waiting for the I/O limits of the I/O group now (for an export in an I/O group, the group's).
# TYPE vublk_io_group_throttle_waiting gauge
vublk_io_group_throttle_waiting{io_group="tenant1"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "vublk_io_group_io_limit", "vublk_io_group_throttle_waiting"); err != nil {
		t.Error(err)
	}
	if n := value(t, reg, "vublk_throttle_waiting"); n != 0 {
		t.Errorf("vublk_throttle_waiting = %v with nothing waiting", n)
	}
	if secs := value(t, reg, "vublk_io_group_throttled_seconds_total"); secs <= 0 {
		t.Errorf("vublk_io_group_throttled_seconds_total = %v", secs)
	}
	for _, c := range []prometheus.Collector{x, g} {
		problems, err := testutil.CollectAndLint(c)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range problems {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
	}
}

// value is the value of the one series called name in reg.
func value(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.Metric) == 1 {
			m := mf.Metric[0]
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			return m.Gauge.GetValue()
		}
	}
	t.Fatalf("no single series %s", name)
	return 0
}
