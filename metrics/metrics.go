// Package metrics exposes each export's activity to Prometheus: requests,
// bytes and errors, read at scrape time from the counters the engine and the
// device keep anyway (so nothing is counted twice and the request path pays
// nothing for them), requests in flight per lane, and latency histograms fed
// by the engine's Observer.
//
// Metrics are off unless the service turns them on. Then it makes one
// registry (NewRegistry), registers an Exporter for each export it starts
// and unregisters it when the export stops (a reload starts and stops
// exports on the same registry), and serves the registry with Serve.
package metrics

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/virtio"
)

const namespace = "vublk"

// Label values of the op label. Engine operations are named as
// backend.Op.String names them, as in the logs.
const opFlush = "flush"

// flushIdx is the index of the flush histogram, after those of the
// operations a lane executes (backend.OpRead to OpWriteZeroes).
const flushIdx = int(backend.OpWriteZeroes) + 1

// durationBuckets are the upper bounds, in seconds, of the latency
// histograms: 10µs (a read from the page cache) to 10s (a flush behind a
// stalled disk), on a 1-2.5-5 scale.
var durationBuckets = []float64{
	10e-6, 25e-6, 50e-6,
	100e-6, 250e-6, 500e-6,
	1e-3, 2.5e-3, 5e-3,
	10e-3, 25e-3, 50e-3,
	100e-3, 250e-3, 500e-3,
	1, 2.5, 5, 10,
}

// Exporter is the metrics of one export. It is a prometheus.Collector: the
// counters come from the engine's Stats, the engine's lanes and the device's
// error counts when scraped; the histograms are filled as requests complete,
// while the Exporter is registered (Register makes it the engine's
// backend.Observer).
//
// Every series carries the label export="name". Exporters of different
// exports can be registered on one registry; two of the same name cannot.
type Exporter struct {
	name  string
	eng   *backend.Engine
	dev   *virtio.BlkDevice
	lanes []string // lane label values

	requests, bytes, storeErrors, requestErrors *prometheus.Desc
	flushErrors, syncFailed, laneInflight       *prometheus.Desc
	inline, uringInflight                       *prometheus.Desc

	duration             *prometheus.HistogramVec
	flushWait, flushSync prometheus.Histogram
	obs                  *observer
	throttle             throttleDescs // throttle.go
}

// NewExporter returns the metrics of the export name served by eng and dev.
// dev may be nil (no error statuses are then reported). Nothing is measured
// until Register.
func NewExporter(name string, eng *backend.Engine, dev *virtio.BlkDevice) *Exporter {
	export := prometheus.Labels{"export": name}
	desc := func(metric, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", metric), help, labels, export)
	}
	x := &Exporter{
		name: name, eng: eng, dev: dev,
		requests: desc("requests_total",
			"Requests executed by the engine, by operation (read, write, discard, write-zeroes, flush). "+
				"Requests the device rejected before the store (bad range, read-only, unsupported) are counted only in vublk_request_errors_total.",
			"op"),
		bytes:       desc("bytes_total", "Bytes read and written by successful requests, by operation (read, write).", "op"),
		storeErrors: desc("store_errors_total", "Store operations (read, write, discard, write-zeroes) that failed."),
		requestErrors: desc("request_errors_total",
			"Requests completed to the guest with an error status (ioerr, unsupp): bad requests, failed store operations and failed flushes.",
			"status"),
		flushErrors: desc("flush_errors_total", "Guest flushes that failed."),
		syncFailed: desc("sync_failed",
			"1 once a sync of the store has failed: every later flush fails until the export is restarted."),
		laneInflight: desc("lane_inflight", "Requests handed to a lane and not finished: queued or executing.", "lane"),
		inline: desc("inline_requests_total",
			"Reads and writes run on their queue's goroutine instead of a lane (a queue's only request, on a fast store)."),
		uringInflight: desc("uring_inflight", "Requests on the io_uring and not finished (always 0 with --io-engine lanes)."),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "request_duration_seconds",
			Help: "Time from the engine accepting a request until its store operation finished (for a flush: until the flush " +
				"finished), by operation. It includes waiting at the flush barrier and in the lane's queue.",
			ConstLabels: export, Buckets: durationBuckets,
		}, []string{"op"}),
		flushWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "flush_barrier_wait_seconds",
			Help:        "Time from the start of a guest flush until every request accepted before it had finished (the drain).",
			ConstLabels: export, Buckets: durationBuckets,
		}),
		flushSync: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: namespace, Name: "flush_sync_seconds",
			Help:        "Time from the end of a guest flush's drain until the flush finished: the sync of the store.",
			ConstLabels: export, Buckets: durationBuckets,
		}),
	}
	x.throttle = newThrottleDescs("", "the export", export)
	x.lanes = make([]string, eng.Lanes())
	for i := range x.lanes {
		x.lanes[i] = strconv.Itoa(i)
	}
	x.obs = &observer{wait: x.flushWait, sync: x.flushSync}
	for i := range flushIdx {
		x.obs.byOp[i] = x.duration.WithLabelValues(backend.Op(i).String())
	}
	x.obs.byOp[flushIdx] = x.duration.WithLabelValues(opFlush)
	return x
}

// Name is the export name, the value of the export label.
func (x *Exporter) Name() string { return x.name }

// Register registers x with reg and starts timing the engine's requests and
// flushes. It fails if an exporter of the same name is registered there.
func (x *Exporter) Register(reg prometheus.Registerer) error {
	if err := reg.Register(x); err != nil {
		return err
	}
	x.eng.SetObserver(x.obs)
	return nil
}

// Unregister stops timing and removes every series of x from reg. Call it
// when the export stops, before an export of the same name is registered
// again. It reports whether x was registered.
func (x *Exporter) Unregister(reg prometheus.Registerer) bool {
	x.eng.SetObserver(nil)
	return reg.Unregister(x)
}

// Describe implements prometheus.Collector.
func (x *Exporter) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{x.requests, x.bytes, x.storeErrors, x.flushErrors, x.syncFailed, x.laneInflight, x.inline, x.uringInflight} {
		ch <- d
	}
	if x.dev != nil {
		ch <- x.requestErrors
	}
	x.throttle.describe(ch, true)
	x.duration.Describe(ch)
	x.flushWait.Describe(ch)
	x.flushSync.Describe(ch)
}

// Collect implements prometheus.Collector.
func (x *Exporter) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	s := x.eng.Stats.Snapshot()
	counter(x.requests, s.Reads, backend.OpRead.String())
	counter(x.requests, s.Writes, backend.OpWrite.String())
	counter(x.requests, s.Discards, backend.OpDiscard.String())
	counter(x.requests, s.WriteZeroes, backend.OpWriteZeroes.String())
	counter(x.requests, s.Flushes, opFlush)
	counter(x.bytes, s.BytesRead, backend.OpRead.String())
	counter(x.bytes, s.BytesWritten, backend.OpWrite.String())
	counter(x.storeErrors, s.Errors)
	counter(x.flushErrors, s.FlushErrors)
	if x.dev != nil {
		counter(x.requestErrors, x.dev.Errors(virtio.BlkSIOErr), "ioerr")
		counter(x.requestErrors, x.dev.Errors(virtio.BlkSUnsupp), "unsupp")
	}
	failed := 0.0
	if x.eng.Barrier().Failed() != nil {
		failed = 1
	}
	gauge(x.syncFailed, failed)
	for i, lane := range x.lanes {
		gauge(x.laneInflight, float64(x.eng.LaneInflight(i)), lane)
	}
	counter(x.inline, s.Inline)
	gauge(x.uringInflight, float64(x.eng.URingInflight()))
	x.throttle.collect(ch, x.eng.ThrottleStats(), x.eng.Throttle(), true)
	x.duration.Collect(ch)
	x.flushWait.Collect(ch)
	x.flushSync.Collect(ch)
}

// observer feeds the histograms; it is the engine's backend.Observer while
// the Exporter is registered. Each call is a few atomic adds: the histogram
// of every op is looked up once, in NewExporter.
type observer struct {
	byOp       [flushIdx + 1]prometheus.Observer
	wait, sync prometheus.Observer
}

// ObserveRequest implements backend.Observer.
func (o *observer) ObserveRequest(op backend.Op, d time.Duration, _ error) {
	if int(op) < flushIdx {
		o.byOp[op].Observe(d.Seconds())
	}
}

// ObserveFlush implements backend.Observer.
func (o *observer) ObserveFlush(wait, sync time.Duration, _ error) {
	o.wait.Observe(wait.Seconds())
	o.sync.Observe(sync.Seconds())
	o.byOp[flushIdx].Observe((wait + sync).Seconds())
}

// NewRegistry returns a registry with the Go runtime and process collectors,
// for the service's exporters.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}
