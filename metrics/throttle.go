package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/vublk/vublk/backend"
)

// throttleDescs are the I/O limit series of an export or an I/O group.
type throttleDescs struct {
	requests, seconds, limit, waiting *prometheus.Desc
}

func newThrottleDescs(prefix, what string, labels prometheus.Labels) throttleDescs {
	desc := func(metric, help string, varLabels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", prefix+metric), help, varLabels, labels)
	}
	return throttleDescs{
		requests: desc("throttled_requests_total", "Requests of "+what+" that waited for its I/O limits."),
		seconds:  desc("throttled_seconds_total", "Total time requests of "+what+" waited for its I/O limits."),
		limit: desc("io_limit", "I/O limits in force for "+what+", by configuration key (iops_total, bps_read_max, "+
			"iops_write_max_length in seconds, iops_size ...); only the limits that are set.", "limit"),
		// An export in a group waits in the group's queue: its gauge is the group's.
		waiting: desc("throttle_waiting", "Requests waiting for the I/O limits of "+what+" now (for an export in an I/O group, the group's)."),
	}
}

func (d throttleDescs) describe(ch chan<- *prometheus.Desc, waiting bool) {
	ch <- d.requests
	ch <- d.seconds
	ch <- d.limit
	if waiting {
		ch <- d.waiting
	}
}

func (d throttleDescs) collect(ch chan<- prometheus.Metric, s *backend.ThrottleStats, t *backend.Throttle, waiting bool) {
	ch <- prometheus.MustNewConstMetric(d.requests, prometheus.CounterValue, float64(s.Throttled.Load()))
	ch <- prometheus.MustNewConstMetric(d.seconds, prometheus.CounterValue, float64(s.WaitNanos.Load())/1e9)
	if t == nil {
		return
	}
	if waiting {
		ch <- prometheus.MustNewConstMetric(d.waiting, prometheus.GaugeValue, float64(t.Waiting()))
	}
	l := t.Limits()
	for _, r := range []struct {
		key  string
		rate backend.Rate
	}{
		{"iops_total", l.IOPS}, {"iops_read", l.IOPSRead}, {"iops_write", l.IOPSWrite},
		{"bps_total", l.BPS}, {"bps_read", l.BPSRead}, {"bps_write", l.BPSWrite},
	} {
		if r.rate.Avg == 0 {
			continue
		}
		ch <- prometheus.MustNewConstMetric(d.limit, prometheus.GaugeValue, float64(r.rate.Avg), r.key)
		if r.rate.Max > 0 {
			ch <- prometheus.MustNewConstMetric(d.limit, prometheus.GaugeValue, float64(r.rate.Max), r.key+"_max")
			ch <- prometheus.MustNewConstMetric(d.limit, prometheus.GaugeValue, r.rate.MaxLength.Seconds(), r.key+"_max_length")
		}
	}
	if l.IOPSSize > 0 {
		ch <- prometheus.MustNewConstMetric(d.limit, prometheus.GaugeValue, float64(l.IOPSSize), "iops_size")
	}
}

// GroupExporter is the metrics of one I/O group ([[io_group]]): what its shared throttle made
// wait, what waits now, and its limits. Every series carries io_group="name".
type GroupExporter struct {
	t *backend.Throttle
	d throttleDescs
}

// NewGroupExporter returns the metrics of the I/O group name enforced by t.
func NewGroupExporter(name string, t *backend.Throttle) *GroupExporter {
	return &GroupExporter{t: t, d: newThrottleDescs("io_group_", "the I/O group", prometheus.Labels{"io_group": name})}
}

// Describe implements prometheus.Collector.
func (g *GroupExporter) Describe(ch chan<- *prometheus.Desc) { g.d.describe(ch, true) }

// Collect implements prometheus.Collector.
func (g *GroupExporter) Collect(ch chan<- prometheus.Metric) { g.d.collect(ch, &g.t.Stats, g.t, true) }
