//go:build e2e

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
		{"lim", fmt.Sprintf("iops_total = %d", limIOPS)},
		{"burst", "iops_total = 100\niops_total_max = 400\niops_total_max_length = 2\nbps_read = \"2M\""},
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
	throttled  map[string]float64 // requests that waited for the limits
	waiting    map[string]float64 // requests waiting for them now
	// writes' time in vublk (from accepted to done, waits included): seconds and count
	wsecs, wcount map[string]float64
}

var (
	ioCounter        = regexp.MustCompile(`(?m)^vublk_(requests|bytes)_total\{export="([^"]+)",op="(read|write)"\} (\S+)$`)
	throttledCounter = regexp.MustCompile(`(?m)^vublk_throttled_requests_total\{export="([^"]+)"\} (\S+)$`)
	waitingGauge     = regexp.MustCompile(`(?m)^vublk_throttle_waiting\{export="([^"]+)"\} (\S+)$`)
	writeDuration    = regexp.MustCompile(`(?m)^vublk_request_duration_seconds_(sum|count)\{export="([^"]+)",op="write"\} (\S+)$`)
)

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
			asked := time.Now()
			resp, err := http.Get("http://" + addr + "/metrics")
			if err != nil {
				continue
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			// vublk read its counters between the question and the answer: take the middle.
			s := ioSample{at: asked.Add(time.Since(asked) / 2), ios: map[string]float64{}, bytes: map[string]float64{},
				throttled: map[string]float64{}, waiting: map[string]float64{}, wsecs: map[string]float64{}, wcount: map[string]float64{}}
			for _, m := range ioCounter.FindAllStringSubmatch(string(body), -1) {
				v, _ := strconv.ParseFloat(m[4], 64)
				if m[1] == "requests" {
					s.ios[m[2]] += v
				} else {
					s.bytes[m[2]] += v
				}
			}
			for _, m := range throttledCounter.FindAllStringSubmatch(string(body), -1) {
				s.throttled[m[1]], _ = strconv.ParseFloat(m[2], 64)
			}
			for _, m := range waitingGauge.FindAllStringSubmatch(string(body), -1) {
				s.waiting[m[1]], _ = strconv.ParseFloat(m[2], 64)
			}
			for _, m := range writeDuration.FindAllStringSubmatch(string(body), -1) {
				v, _ := strconv.ParseFloat(m[3], 64)
				if m[1] == "sum" {
					s.wsecs[m[2]] = v
				} else {
					s.wcount[m[2]] = v
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
	return interpolate(samples, get, at)
}

// interpolate is get's value at time at, interpolated between samples.
func interpolate(samples []ioSample, get func(ioSample) float64, at time.Time) float64 {
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

// span is one job's I/O on an export: from the sample before its first request to the sample
// that saw its last.
type span struct{ first, last time.Time }

// jobGap is the idle time that separates two jobs on one disk (the guest pauses 2 s between them,
// and a fio takes a while to start; a stall inside a job is shorter, if at times over a second).
const jobGap = 1800 * time.Millisecond

// spans are the jobs that ran on export, in order, told apart by idle gaps of jobGap or more,
// each at least 2 s long.
// (The console cannot time them: a busy TCG guest's lines arrive late and in bursts.)
func spans(samples []ioSample, export string) []span {
	var out []span
	for i := 1; i < len(samples); i++ {
		s, prev := samples[i], samples[i-1]
		if s.ios[export] == prev.ios[export] {
			continue
		}
		if n := len(out); n == 0 || s.at.Sub(out[n-1].last) > jobGap {
			out = append(out, span{first: prev.at})
		}
		out[len(out)-1].last = s.at
	}
	// The guest's own I/O at boot (partition scan, udev) is not a job.
	jobs := out[:0]
	for _, sp := range out {
		if sp.last.Sub(sp.first) >= 2*time.Second {
			jobs = append(jobs, sp)
		}
	}
	return jobs
}

// limitedRate is the rate of export (I/Os or bytes per second) from a to b while the limit alone
// set it: over the spans between two samples where, at the first, enough requests waited to keep
// the limit busy until the second (perSecond requests a second), and how long that was in all. A
// TCG guest on a busy host stalls at times, for up to a second: the requests it sent are then
// soon done, and the limit has nothing to hold back.
func limitedRate(samples []ioSample, export string, bytes bool, a, b time.Time, perSecond float64) (rate float64, busy time.Duration) {
	var n float64
	for i := 1; i < len(samples); i++ {
		s, prev := samples[i], samples[i-1]
		dt := s.at.Sub(prev.at)
		if prev.at.Before(a) || s.at.After(b) || prev.waiting[export] < perSecond*dt.Seconds()+1 {
			continue
		}
		if bytes {
			n += s.bytes[export] - prev.bytes[export]
		} else {
			n += s.ios[export] - prev.ios[export]
		}
		busy += dt
	}
	if busy == 0 {
		return 0, 0
	}
	return n / busy.Seconds(), busy
}

// rateBetween is the rate of export (I/Os or bytes per second) from a to b.
func rateBetween(samples []ioSample, export string, bytes bool, a, b time.Time) float64 {
	return (counterAt(samples, export, bytes, b) - counterAt(samples, export, bytes, a)) / b.Sub(a).Seconds()
}

// series is export's rate every half second from a to b, to show in a failure.
func series(samples []ioSample, export string, bytes bool, a, b time.Time) string {
	var w strings.Builder
	for at := a; at.Before(b); at = at.Add(500 * time.Millisecond) {
		fmt.Fprintf(&w, " %.0f", rateBetween(samples, export, bytes, at, earlier(at.Add(500*time.Millisecond), b)))
	}
	return w.String()
}

// TestIOLimits: a guest runs fio against five disks and the host measures, from vublk's metrics
// and on its own clock, what the limits let through. One disk is limited in IOPS, one has a
// burst and a read bandwidth limit, one has no limit, and two share an io_group; the host raises
// a limit with a SIGHUP while the guest runs. Each rate must be within 10% of its limit, the
// burst must last its length and no longer, the free disk must not wait for the limit of the busy
// one beside it, and the new limit must apply within a second. The guest first measures what it
// does with no limit, for the failure messages. A rate is measured while the limit alone set it
// (enough requests waiting): a busy host's TCG guest stalls at times. 85-115 s per QEMU on the
// busy shared machine, 45-75 s of it the boot.
func TestIOLimits(t *testing.T) { forEachQEMU(t, testIOLimits) }

func testIOLimits(t *testing.T, q *qemuBinary) {
	const (
		seconds     = 5 // the length of most jobs
		burstAvg    = 100
		burstMax    = 400
		burstLength = 2 * time.Second
	)
	began := time.Now()
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
		seen   []ioSample
		sighup time.Time
		rates  []string // the guest's own figures
	)
	// The SIGHUP goes once the host has seen 3 s of the second job on lim.
	collect := sampleIO(t, metricsAddr, stop, func(s ioSample) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, s)
		if !sighup.IsZero() {
			return
		}
		if sp := spans(seen, "lim"); len(sp) == 2 && s.at.Sub(sp[1].first) >= 3*time.Second {
			if err := os.WriteFile(conf, []byte(qosConfig(dir, metricsAddr, 300)), 0o644); err != nil {
				t.Error(err)
			}
			sighup = time.Now()
			d.cmd.Process.Signal(syscall.SIGHUP)
		}
	})
	v := bootGuest(t, boot{
		qemu: q, disks: disks, timeout: 4 * time.Minute,
		params: map[string]string{"phase": "qos", "seconds": strconv.Itoa(seconds)},
		onLine: func(line string) {
			if r, ok := strings.CutPrefix(line, "E2E rate "); ok {
				mu.Lock()
				rates = append(rates, r)
				mu.Unlock()
			}
		},
	})
	close(stop)
	samples := collect()
	v.expectChecks(t, "qos", []string{"qos_clocksource", "qos_disks", "qos_free_alone", "qos_lim_iops", "qos_free_busy",
		"qos_g1", "qos_g2", "qos_bps", "qos_burst", "qos_sighup"})
	if t.Failed() {
		return
	}
	mu.Lock()
	defer mu.Unlock()
	t.Logf("the guest's own figures (IOPS, bytes/s): %s", strings.Join(rates, "; "))
	if len(samples) < 10 {
		t.Fatalf("only %d metrics samples", len(samples))
	}
	jobs := map[string][]span{}
	for export, want := range map[string]int{"lim": 2, "free": 2, "burst": 2, "g1": 1, "g2": 1} {
		jobs[export] = spans(samples, export)
		if len(jobs[export]) != want {
			t.Fatalf("%d jobs seen on %s, want %d: %v", len(jobs[export]), export, want, jobs[export])
		}
	}
	t.Logf("the jobs ran from %.1f s to %.1f s after the test began", jobs["free"][0].first.Sub(began).Seconds(),
		jobs["lim"][1].last.Sub(began).Seconds())
	// What the guest does unlimited, now: the limits below must be well under it, or the test
	// measures the guest.
	alone := jobs["free"][0]
	unlimited := rateBetween(samples, "free", false, alone.first.Add(500*time.Millisecond), alone.last.Add(-500*time.Millisecond))
	t.Logf("the free disk alone (no limit): %.1f IOPS", unlimited)
	// near checks the rate of export from a to b while the limit alone set it (the guest's
	// stalls left out), which must be want ±10%, over at least 1 s (or half of the time from a to
	// b): a limit that holds nothing back fails. reqSize converts a bytes limit into requests.
	near := func(what, export string, bytes bool, a, b time.Time, want, reqSize float64) {
		t.Helper()
		got, busy := limitedRate(samples, export, bytes, a, b, want/reqSize)
		all := rateBetween(samples, export, bytes, a, b)
		if got < want*0.9 || got > want*1.1 || busy < min(time.Second, b.Sub(a)/2) {
			thr := func(s ioSample) float64 { return s.throttled[export] }
			waited := interpolate(samples, thr, b) - interpolate(samples, thr, a)
			t.Errorf("%s: %.1f over the %.1f s of %.1f s when the limit held requests, want %.0f ±10%% over at least 1 s (%.1f over all of it, per half second:%s; %.0f requests waited; unlimited %.0f IOPS)",
				what, got, busy.Seconds(), b.Sub(a).Seconds(), want, all, series(samples, export, bytes, a, b), waited, unlimited)
		} else {
			t.Logf("%s: %.1f over the %.1f s of %.1f s when the limit held requests (%.1f over all of it), limit %.0f",
				what, got, busy.Seconds(), b.Sub(a).Seconds(), all, want)
		}
	}
	// steady is a job's time without its first second (other jobs' fio start at the same time, and
	// a starting fio stalls a TCG guest) and its last half second.
	steady := func(j span) (time.Time, time.Time) {
		return j.first.Add(time.Second), j.last.Add(-500 * time.Millisecond)
	}
	a, b := steady(jobs["lim"][0])
	near("lim IOPS (iops_total 150) beside the free disk", "lim", false, a, b, 150, 1)
	a, b = steady(jobs["burst"][0])
	near("burst read bytes/s (bps_read 2M)", "burst", true, a, b, 2<<20, 64<<10)

	// The free disk beside the limited one: none of its requests waited, and vublk served them
	// as fast as ever, while the limited disk's waited. (How fast the free disk goes is the
	// guest's business: its vCPUs share a busy host, and at times get little of it.)
	a, b = steady(jobs["free"][1])
	busy := rateBetween(samples, "free", false, a, b)
	meanWrite := func(export string, a, b time.Time) float64 {
		secs := interpolate(samples, func(s ioSample) float64 { return s.wsecs[export] }, b) -
			interpolate(samples, func(s ioSample) float64 { return s.wsecs[export] }, a)
		n := interpolate(samples, func(s ioSample) float64 { return s.wcount[export] }, b) -
			interpolate(samples, func(s ioSample) float64 { return s.wcount[export] }, a)
		return secs / max(n, 1)
	}
	freeAlone, freeBusy, limBusy := meanWrite("free", alone.first, alone.last), meanWrite("free", a, b), meanWrite("lim", a, b)
	t.Logf("the free disk: %.1f IOPS alone, %.1f beside the limited one; a write's time in vublk: free %.2f ms alone, %.2f ms beside lim, lim's %.0f ms",
		unlimited, busy, freeAlone*1000, freeBusy*1000, limBusy*1000)
	if freeBusy > 0.05 || limBusy < 0.2 {
		t.Errorf("a write's mean time in vublk beside the limited disk: free %.2f ms (alone %.2f ms), want under 50; lim %.0f ms, want over 200",
			freeBusy*1000, freeAlone*1000, limBusy*1000)
	}
	if end := samples[len(samples)-1]; end.throttled["free"] != 0 || end.throttled["lim"] == 0 {
		t.Errorf("requests that waited for a limit: %.0f of the free disk, %.0f of the limited one", end.throttled["free"], end.throttled["lim"])
	}

	// The group: over the time both ran.
	g1, g2 := jobs["g1"][0], jobs["g2"][0]
	from, to := later(g1.first, g2.first).Add(time.Second), earlier(g1.last, g2.last).Add(-500*time.Millisecond)
	if to.Sub(from) < 2500*time.Millisecond {
		t.Fatalf("g1 %v and g2 %v ran together for less than 4 s", g1, g2)
	}
	// Both wait in the group's queue: each export's gauge is the group's.
	r1, held := limitedRate(samples, "g1", false, from, to, 120)
	r2, _ := limitedRate(samples, "g2", false, from, to, 120)
	if r1+r2 < 108 || r1+r2 > 132 || held < time.Second {
		t.Errorf("g1 + g2 IOPS (io_group g, iops_total 120) over the %.1f s of %.1f s when the limit held requests: %.1f + %.1f, want 120 ±10%% over at least 1 s",
			held.Seconds(), to.Sub(from).Seconds(), r1, r2)
	} else {
		t.Logf("g1 + g2 IOPS (io_group g, iops_total 120) over the %.1f s of %.1f s when the limit held requests: %.1f + %.1f = %.1f",
			held.Seconds(), to.Sub(from).Seconds(), r1, r2, r1+r2)
	}
	if r1 < 30 || r2 < 30 {
		t.Errorf("the group's share is unfair: g1 %.1f, g2 %.1f IOPS", r1, r2)
	}

	// The burst: 400 IOPS for 2 s, then 100. A TCG guest on a busy host stalls now and then: it
	// then uses its burst later, not less. So the burst's rate is that of its first 2 s; its length is
	// what the job did above the average, at max - avg (the credit of a full burst, plus the
	// 100 ms of the average any bucket may save); and after it, the job's last 3 s are at the
	// average (without the job's last half second, as everywhere: a job ends unevenly).
	j := jobs["burst"][1]
	if j.last.Sub(j.first) < 6*time.Second {
		t.Fatalf("the burst job ran %v", j.last.Sub(j.first))
	}
	// Stalls make a burst last longer, never shorter: its first 2 s are at max.
	near("burst IOPS in its first 2 s (iops_total_max 400)", "burst", false, j.first.Add(300*time.Millisecond), j.first.Add(1800*time.Millisecond), burstMax, 1)
	ios := counterAt(samples, "burst", false, j.last) - counterAt(samples, "burst", false, j.first)
	above := ios - burstAvg*j.last.Sub(j.first).Seconds()
	length := time.Duration(above / (burstMax - burstAvg) * float64(time.Second))
	wantLength := burstLength + 100*time.Millisecond*burstAvg/(burstMax-burstAvg)
	if float64(length) < float64(wantLength)*0.9 || float64(length) > float64(wantLength)*1.1 {
		t.Errorf("the burst lasted %v (%.0f I/Os above the average), want %v ±10%% (per half second:%s)", length, above, wantLength,
			series(samples, "burst", false, j.first, j.last))
	} else {
		t.Logf("the burst lasted %v (%.0f I/Os above the average; iops_total_max_length 2)", length.Round(time.Millisecond), above)
	}
	near("burst IOPS in the job's last 3 s (iops_total 100)", "burst", false, j.last.Add(-3500*time.Millisecond), j.last.Add(-500*time.Millisecond), burstAvg, 1)

	// The SIGHUP: 150 before it, 300 from a second after it.
	j = jobs["lim"][1]
	if sighup.IsZero() || sighup.Sub(j.first) < 2*time.Second || j.last.Sub(sighup) < 3*time.Second {
		t.Fatalf("the SIGHUP at %v is not well inside the job's I/O [%v, %v]", sighup, j.first, j.last)
	}
	near("lim IOPS before the SIGHUP", "lim", false, j.first.Add(time.Second), sighup, 150, 1)
	near("lim IOPS from a second after the SIGHUP", "lim", false, sighup.Add(time.Second), j.last.Add(-500*time.Millisecond), 300, 1)
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
