package bench

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// Result is what a run measured. It is also the --json output, one object
// per run, which Summarize reads back.
type Result struct {
	// Label names the back-end in reports (e.g. "qsd", "vublk"); Run
	// leaves it empty.
	Label  string    `json:"label,omitempty"`
	Job    JobReport `json:"job"`
	Socket string    `json:"socket"`
	// Seconds is the length of the measured phase.
	Seconds float64 `json:"seconds"`
	// IOs are the reads and writes completed in the measured phase
	// (flushes are counted apart).
	IOs      uint64        `json:"ios"`
	IOPS     float64       `json:"iops"`
	MiBPerS  float64       `json:"mib_per_s"`
	Latency  Latency       `json:"latency"`
	Read     OpResult      `json:"read"`
	Write    OpResult      `json:"write"`
	Flush    OpResult      `json:"flush"`
	Errors   uint64        `json:"errors"`
	FirstErr string        `json:"first_error,omitempty"`
	Verify   *VerifyResult `json:"verify,omitempty"`
	// ServerCPU is the back-end's CPU time in the measured phase, with
	// Target.ServerPID.
	ServerCPU *CPUResult `json:"server_cpu,omitempty"`
	// ClientCPU is this process's: the load generator, and the back-end
	// too when it runs in-process.
	ClientCPU CPUResult `json:"client_cpu"`
	// Notify counts the notifications of the measured phase both ways.
	Notify NotifyResult `json:"notify"`
}

// NotifyResult counts kicks (the load generator telling the back-end about
// new requests) and interrupts (the completion goroutines waking up on the
// call eventfd) in the measured phase. Fewer per I/O means larger batches:
// the back-end found more requests per kick, and the load generator more
// completions per wake-up.
type NotifyResult struct {
	Kicks           uint64  `json:"kicks"`
	Interrupts      uint64  `json:"interrupts"`
	KicksPerIO      float64 `json:"kicks_per_io"`
	InterruptsPerIO float64 `json:"interrupts_per_io"`
}

func notifyResult(kicks, interrupts, ios uint64) NotifyResult {
	n := NotifyResult{Kicks: kicks, Interrupts: interrupts}
	if ios > 0 {
		n.KicksPerIO, n.InterruptsPerIO = float64(kicks)/float64(ios), float64(interrupts)/float64(ios)
	}
	return n
}

// JobReport is the job as run.
type JobReport struct {
	Name       string  `json:"name"`
	RW         string  `json:"rw"`
	BlockSize  int     `json:"bs"`
	IODepth    int     `json:"iodepth"`
	Queues     int     `json:"queues"`
	Runtime    float64 `json:"runtime_s"`
	Ramp       float64 `json:"ramp_s"`
	FlushEvery int     `json:"flush_every"`
	Verify     bool    `json:"verify"`
	Size       int64   `json:"size"`
	ReadMix    int     `json:"rwmixread,omitempty"`
	Seed       uint64  `json:"seed"`
}

// Latency summarises a latency histogram, in microseconds: from just before
// a request is put on the available ring to when its completion is seen.
type Latency struct {
	Mean float64 `json:"mean_us"`
	P50  float64 `json:"p50_us"`
	P99  float64 `json:"p99_us"`
	P999 float64 `json:"p99_9_us"`
	Max  float64 `json:"max_us"`
}

// OpResult is one kind of request in the measured phase.
type OpResult struct {
	IOs     uint64  `json:"ios"`
	Bytes   uint64  `json:"bytes"`
	Latency Latency `json:"latency"`
}

// CPUResult is CPU time spent in the measured phase.
type CPUResult struct {
	PID     int     `json:"pid,omitempty"`
	Seconds float64 `json:"seconds"`
	// MicrosPerIO is Seconds per read or write, in microseconds.
	MicrosPerIO float64 `json:"us_per_io"`
}

// VerifyResult counts --verify's checks.
type VerifyResult struct {
	// Checked is the reads compared with what the run wrote, ReadBack of
	// them in the read-back pass after the measured phase.
	Checked  uint64 `json:"checked"`
	ReadBack uint64 `json:"read_back"`
	Errors   uint64 `json:"errors"`
	First    string `json:"first_error,omitempty"`
}

// Failed reports whether the run saw I/O or verification errors.
func (r *Result) Failed() bool {
	return r.Errors > 0 || (r.Verify != nil && r.Verify.Errors > 0)
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func latencyOf(h *Histogram) Latency {
	return Latency{Mean: micros(h.Mean()), P50: micros(h.Percentile(50)), P99: micros(h.Percentile(99)),
		P999: micros(h.Percentile(99.9)), Max: micros(h.Max())}
}

func cpuResult(pid int, d time.Duration, ios uint64) CPUResult {
	c := CPUResult{PID: pid, Seconds: d.Seconds()}
	if ios > 0 {
		c.MicrosPerIO = micros(d) / float64(ios)
	}
	return c
}

// result merges the workers' counts.
func (r *runner) result(workers []*worker, elapsed time.Duration) *Result {
	j := r.j
	res := &Result{
		Job: JobReport{Name: j.Label(), RW: j.Mode.String(), BlockSize: j.BlockSize, IODepth: j.IODepth,
			Queues: j.Queues, Runtime: j.Runtime.Seconds(), Ramp: j.Ramp.Seconds(), FlushEvery: j.FlushEvery,
			Verify: j.Verify, Size: r.size, Seed: j.Seed},
		Socket:  r.t.Socket,
		Seconds: elapsed.Seconds(),
	}
	if j.Mode == RandRW {
		res.Job.ReadMix = j.ReadMix
	}
	var all Histogram
	var hists [numOps]Histogram
	var v VerifyResult
	for _, w := range workers {
		for o := range numOps {
			hists[o].Merge(&w.stats[o].lat)
		}
		for _, o := range []op{opRead, opWrite} {
			all.Merge(&w.stats[o].lat)
		}
		res.Errors += w.errors
		if res.FirstErr == "" && w.firstIOErr != nil {
			res.FirstErr = w.firstIOErr.Error()
		}
		v.Checked += w.verified
		v.ReadBack += w.readBack
		v.Errors += w.verifyErrors
		if v.First == "" && w.firstVerifyErr != nil {
			v.First = w.firstVerifyErr.Error()
		}
	}
	ops := []*OpResult{opRead: &res.Read, opWrite: &res.Write, opFlush: &res.Flush}
	for o, p := range ops {
		for _, w := range workers {
			p.IOs += w.stats[o].ios
			p.Bytes += w.stats[o].bytes
		}
		p.Latency = latencyOf(&hists[o])
	}
	res.IOs = res.Read.IOs + res.Write.IOs
	if s := elapsed.Seconds(); s > 0 {
		res.IOPS = float64(res.IOs) / s
		res.MiBPerS = float64(res.Read.Bytes+res.Write.Bytes) / s / (1 << 20)
	}
	res.Latency = latencyOf(&all)
	if j.Verify {
		res.Verify = &v
	}
	return res
}

// WriteText prints the result for people.
func (r *Result) WriteText(w io.Writer) {
	j := r.Job
	label := ""
	if r.Label != "" {
		label = " [" + r.Label + "]"
	}
	fmt.Fprintf(w, "%s%s on %s: %d queue(s) x %d in flight, %s blocks over %s, %.2f s measured",
		j.Name, label, r.Socket, j.Queues, j.IODepth, bytesText(int64(j.BlockSize)), bytesText(j.Size), r.Seconds)
	if j.FlushEvery > 0 {
		fmt.Fprintf(w, ", a flush every %d writes", j.FlushEvery)
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  total   %10.0f IOPS %9.1f MiB/s %10d IOs %6d errors\n", r.IOPS, r.MiBPerS, r.IOs, r.Errors)
	fmt.Fprintf(w, "  latency %s\n", latencyText(r.Latency))
	for _, o := range []struct {
		name string
		r    OpResult
	}{{"read", r.Read}, {"write", r.Write}, {"flush", r.Flush}} {
		if o.r.IOs > 0 {
			fmt.Fprintf(w, "  %-7s %10d IOs  %s\n", o.name, o.r.IOs, latencyText(o.r.Latency))
		}
	}
	if r.ServerCPU != nil {
		fmt.Fprintf(w, "  server  pid %d: %.2f s CPU, %.2f us/IO\n", r.ServerCPU.PID, r.ServerCPU.Seconds, r.ServerCPU.MicrosPerIO)
	}
	fmt.Fprintf(w, "  client  %.2f s CPU, %.2f us/IO\n", r.ClientCPU.Seconds, r.ClientCPU.MicrosPerIO)
	fmt.Fprintf(w, "  notify  %d kicks (%.3f/IO), %d interrupts (%.3f/IO)\n", r.Notify.Kicks, r.Notify.KicksPerIO,
		r.Notify.Interrupts, r.Notify.InterruptsPerIO)
	if v := r.Verify; v != nil {
		fmt.Fprintf(w, "  verify  %d reads checked (%d read back after the run), %d errors\n", v.Checked, v.ReadBack, v.Errors)
		if v.First != "" {
			fmt.Fprintf(w, "  verify  first error: %s\n", v.First)
		}
	}
	if r.FirstErr != "" {
		fmt.Fprintf(w, "  error   first: %s\n", r.FirstErr)
	}
}

func latencyText(l Latency) string {
	return fmt.Sprintf("mean %s  p50 %s  p99 %s  p99.9 %s  max %s",
		usText(l.Mean), usText(l.P50), usText(l.P99), usText(l.P999), usText(l.Max))
}

// usText prints microseconds with a unit that keeps three or four digits.
func usText(us float64) string {
	switch {
	case us >= 1e6:
		return fmt.Sprintf("%.2fs", us/1e6)
	case us >= 1e4:
		return fmt.Sprintf("%.1fms", us/1e3)
	case us >= 1e3:
		return fmt.Sprintf("%.2fms", us/1e3)
	case us >= 100:
		return fmt.Sprintf("%.0fus", us)
	}
	return fmt.Sprintf("%.1fus", us)
}

func bytesText(n int64) string {
	for _, u := range []struct {
		shift uint
		name  string
	}{{40, "TiB"}, {30, "GiB"}, {20, "MiB"}, {10, "KiB"}} {
		if n >= 1<<u.shift {
			s := fmt.Sprintf("%.2f", float64(n)/float64(int64(1)<<u.shift))
			s = strings.TrimSuffix(strings.TrimRight(s, "0"), ".")
			return s + " " + u.name
		}
	}
	return fmt.Sprintf("%d B", n)
}
