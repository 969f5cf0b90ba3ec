//go:build e2e && qos

package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// qosConfig is the service configuration of TestIOLimits; limIOPS is the export lim's IOPS limit.
func qosConfig(dir, metricsAddr string, limIOPS int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "[global]\nlog_format = \"json\"\nlanes = 2\nmetrics_address = %q\n\n[[io_group]]\nname = \"g\"\niops_total = 120\n", metricsAddr)
	for _, e := range []struct{ name, limits string }{
		{"lim", fmt.Sprintf("iops_total = %d\nbps_read = \"2M\"", limIOPS)},
		{"burst", "iops_total = 100\niops_total_max = 400\niops_total_max_length = 3"},
		{"free", ""},
		{"g1", "io_group = \"g\""},
		{"g2", "io_group = \"g\""},
	} {
		fmt.Fprintf(&b, "\n[[export]]\nname = %q\nsocket_path = %q\nfile = %q\nsize = \"64M\"\nnum_queues = 2\n%s\n",
			e.name, filepath.Join(dir, e.name+".sock"), filepath.Join(dir, e.name+".img"), e.limits)
	}
	return b.String()
}

// ioSample is what vublk had done at one moment, per export: requests (read and write) and
// bytes.
type ioSample struct {
	at         time.Time
	ios, bytes map[string]float64
}

var ioCounter = regexp.MustCompile(`(?m)^vublk_(requests|bytes)_total\{export="([^"]+)",op="(read|write)"\} (\S+)$`)

// sampleIO scrapes vublk's metrics every 100 ms until stop is closed: the rates are measured on
// the host's clock, from what vublk completed. (A TCG guest's clock is off by tens of percent
// when the host is busy, and fio's own timing with it.)
func sampleIO(t *testing.T, addr string, stop chan struct{}, onSample func(ioSample)) func() []ioSample {
	var mu sync.Mutex
	var samples []ioSample
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			resp, err := http.Get("http://" + addr + "/metrics")
			if err != nil {
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			s := ioSample{at: time.Now(), ios: map[string]float64{}, bytes: map[string]float64{}}
			for _, m := range ioCounter.FindAllStringSubmatch(string(body), -1) {
				v, _ := strconv.ParseFloat(m[4], 64)
				if m[1] == "requests" {
					s.ios[m[2]] += v
				} else {
					s.bytes[m[2]] += v
				}
			}
			mu.Lock()
			samples = append(samples, s)
			mu.Unlock()
			onSample(s)
		}
	}()
	return func() []ioSample {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return samples
	}
}

// counterAt is the counter of export at time at, interpolated between samples.
func counterAt(samples []ioSample, export string, bytes bool, at time.Time) float64 {
	get := func(s ioSample) float64 {
		if bytes {
			return s.bytes[export]
		}
		return s.ios[export]
	}
	for i := 1; i < len(samples); i++ {
		a, b := samples[i-1], samples[i]
		if !b.at.Before(at) {
			f := float64(at.Sub(a.at)) / float64(b.at.Sub(a.at))
			f = min(max(f, 0), 1)
			return get(a) + f*(get(b)-get(a))
		}
	}
	return get(samples[len(samples)-1])
}

// activity is when export did its first and its last I/O between from and to.
func activity(samples []ioSample, export string, from, to time.Time) (first, last time.Time) {
	for i := 1; i < len(samples); i++ {
		s, prev := samples[i], samples[i-1]
		if s.at.Before(from) || s.at.After(to) || s.ios[export] == prev.ios[export] {
			continue
		}
		if first.IsZero() {
			first = prev.at
		}
		last = s.at
	}
	return first, last
}

// rateBetween is the rate of export (I/Os or bytes per second) from a to b.
func rateBetween(samples []ioSample, export string, bytes bool, a, b time.Time) float64 {
	return (counterAt(samples, export, bytes, b) - counterAt(samples, export, bytes, a)) / b.Sub(a).Seconds()
}

// TestIOLimits: a guest runs fio against five disks and the host measures, from vublk's metrics
// and on its own clock, what the limits let through. One disk is limited in IOPS and read
// bandwidth, one has a burst, one has no limit, and two share an io_group; the host raises a
// limit with a SIGHUP while the guest runs. Each rate must be within 10% of its limit, the burst
// must last its length and no longer, the free disk must not be held to the limit of the busy one
// beside it, and the new limit must apply within a second.
func TestIOLimits(t *testing.T) { forEachQEMU(t, testIOLimits) }

func testIOLimits(t *testing.T, q *qemuBinary) {
	const seconds = 8
	dir := t.TempDir()
	conf := filepath.Join(dir, "vublk.toml")
	metricsAddr := freeTCPAddr(t)
	if err := os.WriteFile(conf, []byte(qosConfig(dir, metricsAddr, 150)), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startService(t, conf)
	var disks []disk
	for _, name := range []string{"lim", "burst", "free", "g1", "g2"} {
		disks = append(disks, disk{socket: filepath.Join(dir, name+".sock"), numQueues: 2})
	}
	stop := make(chan struct{})
	var (
		mu     sync.Mutex
		starts = map[string]time.Time{}
		ends   = map[string]time.Time{}
		armed  bool      // the guest announced the SIGHUP job
		limIOs float64   // lim's requests when it was armed
		active time.Time // when lim's I/O of that job began
		sighup time.Time
	)
	// The SIGHUP goes once the host has seen 3 s of the job's I/O on lim (console lines arrive
	// late and in bursts from a busy TCG guest: they cannot time it).
	collect := sampleIO(t, metricsAddr, stop, func(s ioSample) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case !armed || !sighup.IsZero():
		case limIOs < 0:
			limIOs = s.ios["lim"]
		case active.IsZero() && s.ios["lim"] > limIOs:
			active = s.at
		case !active.IsZero() && s.at.Sub(active) >= 3*time.Second:
			if err := os.WriteFile(conf, []byte(qosConfig(dir, metricsAddr, 300)), 0o644); err != nil {
				t.Error(err)
			}
			sighup = time.Now()
			d.cmd.Process.Signal(syscall.SIGHUP)
		}
	})
	v := bootGuest(t, boot{
		qemu: q, disks: disks, timeout: 6 * time.Minute,
		params: map[string]string{"phase": "qos", "seconds": strconv.Itoa(seconds)},
		onLine: func(line string) {
			now := time.Now()
			mu.Lock()
			defer mu.Unlock()
			if name, ok := strings.CutPrefix(line, "E2E qos-start "); ok {
				starts[name] = now
			}
			if name, ok := strings.CutPrefix(line, "E2E qos-end "); ok {
				ends[name] = now
			}
			if line == "E2E qos-sighup" {
				armed, limIOs = true, -1
			}
		},
	})
	close(stop)
	samples := collect()
	v.expectChecks(t, "qos", []string{"qos_clocksource", "qos_disks", "qos_lim_iops", "qos_lim_bps", "qos_free_alone",
		"qos_lim_busy", "qos_free_busy", "qos_g1", "qos_g2", "qos_burst", "qos_sighup"})
	if t.Failed() {
		return
	}
	mu.Lock()
	defer mu.Unlock()
	if len(samples) < 10 {
		t.Fatalf("only %d metrics samples", len(samples))
	}

	// steady is the rate of export during the fio job, without its first and last half second.
	steady := func(job, export string, bytes bool) float64 {
		first, last := activity(samples, export, starts[job], ends[job])
		if first.IsZero() || last.Sub(first) < 2*time.Second {
			t.Errorf("%s: no I/O on %s between the job's start and end", job, export)
			return 0
		}
		return rateBetween(samples, export, bytes, first.Add(500*time.Millisecond), last.Add(-500*time.Millisecond))
	}
	near := func(what string, got, want float64) {
		t.Helper()
		if got < want*0.9 || got > want*1.1 {
			t.Errorf("%s: %.1f, want %.0f ±10%%", what, got, want)
		} else {
			t.Logf("%s: %.1f (limit %.0f)", what, got, want)
		}
	}
	near("lim IOPS (iops_total 150)", steady("lim_iops", "lim", false), 150)
	near("lim read bytes/s (bps_read 2M)", steady("lim_bps", "lim", true), 2<<20)
	near("lim IOPS next to the free disk", steady("lim_busy", "lim", false), 150)
	// The group: over the time both ran.
	f1, l1 := activity(samples, "g1", starts["g1"], ends["g1"])
	f2, l2 := activity(samples, "g2", starts["g2"], ends["g2"])
	from, to := later(f1, f2).Add(500*time.Millisecond), earlier(l1, l2).Add(-500*time.Millisecond)
	if to.Sub(from) < 3*time.Second {
		t.Fatalf("g1 [%v, %v] and g2 [%v, %v] ran together for less than 4 s", f1, l1, f2, l2)
	}
	g1, g2 := rateBetween(samples, "g1", false, from, to), rateBetween(samples, "g2", false, from, to)
	near("g1 + g2 IOPS (io_group g, iops_total 120)", g1+g2, 120)
	if g1 < 30 || g2 < 30 {
		t.Errorf("the group's share is unfair: g1 %.1f, g2 %.1f IOPS", g1, g2)
	}
	alone, busy := steady("free_alone", "free", false), steady("free_busy", "free", false)
	t.Logf("free disk: %.1f IOPS alone, %.1f next to the limited one", alone, busy)
	if busy < 3*150 {
		t.Errorf("the free disk did %.1f IOPS next to the limited one, %.1f alone", busy, alone)
	}

	// The burst: 400 IOPS for 3 s from the first request, then 100.
	first, last := activity(samples, "burst", starts["burst"], ends["burst"])
	if last.Sub(first) < 7*time.Second {
		t.Fatalf("the burst job ran %v", last.Sub(first))
	}
	near("burst IOPS in its first 3 s (iops_total_max 400)", rateBetween(samples, "burst", false, first, first.Add(3*time.Second)), 400)
	near("burst IOPS from 4 s on (iops_total 100)", rateBetween(samples, "burst", false, first.Add(4*time.Second), last), 100)

	// The SIGHUP: 150 before it, 300 from a second after it.
	first, last = activity(samples, "lim", starts["sighup"], ends["sighup"])
	if sighup.IsZero() || sighup.Sub(first) < 2*time.Second || last.Sub(sighup) < 3*time.Second {
		t.Fatalf("the SIGHUP at %v is not well inside the job's I/O [%v, %v]", sighup, first, last)
	}
	near("lim IOPS before the SIGHUP", rateBetween(samples, "lim", false, first.Add(500*time.Millisecond), sighup), 150)
	near("lim IOPS from a second after the SIGHUP", rateBetween(samples, "lim", false, sighup.Add(time.Second), last), 300)
	if n := d.countLogs("configuration reloaded"); n != 1 {
		t.Errorf("%d reloads logged, want 1", n)
	}
	if d.lastLog("I/O limits changed", "lim") == nil {
		t.Error("no \"I/O limits changed\" log for lim")
	}
	if n := d.countLogs("export stopped"); n != 0 {
		t.Errorf("%d exports stopped at the reload: limits must change live", n)
	}
	if _, err := d.stop(); err != nil {
		t.Fatal(err)
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func earlier(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}
