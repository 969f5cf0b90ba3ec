package bench

import (
	"bytes"
	"encoding/json"
	"math"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	tests := []struct {
		v    []float64
		want float64
	}{
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{10, 10, 1000}, 10},
		{[]float64{-1, 7}, 3},
	}
	for _, tt := range tests {
		in := append([]float64(nil), tt.v...)
		if got := Median(tt.v); got != tt.want {
			t.Errorf("Median(%v) = %v, want %v", tt.v, got, tt.want)
		}
		if !slicesEqual(in, tt.v) {
			t.Errorf("Median reordered its argument: %v", tt.v)
		}
	}
	if !math.IsNaN(Median(nil)) {
		t.Error("Median of nothing is not NaN")
	}
}

func slicesEqual(a, b []float64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestSummarize(t *testing.T) {
	mk := func(label, job string, iops, p99, cpu float64, errs uint64) Result {
		return Result{Label: label, Job: JobReport{Name: job}, IOPS: iops, MiBPerS: iops / 256,
			Latency: Latency{P50: p99 / 2, P99: p99}, ServerCPU: &CPUResult{MicrosPerIO: cpu}, Errors: errs}
	}
	results := []Result{
		mk("vublk", "randread-4k-qd1-q1", 12000, 100, 30, 0),
		mk("qsd", "randread-4k-qd1-q1", 10000, 120, 50, 0),
		mk("qsd", "randread-4k-qd1-q1", 9000, 130, 40, 0),
		mk("vublk", "randread-4k-qd1-q1", 11000, 90, 20, 0),
		mk("qsd", "randread-4k-qd1-q1", 11000, 110, 60, 0),
		mk("vublk", "randread-4k-qd1-q1", 30000, 80, 25, 1),
		mk("qsd", "write-64k-qd8-q1", 2000, 900, 40, 0),
	}
	var buf bytes.Buffer
	for _, r := range results {
		b, _ := json.Marshal(r)
		buf.Write(append(b, '\n', '\n'))
	}
	back, err := ReadResults(&buf)
	if err != nil || len(back) != len(results) {
		t.Fatalf("ReadResults: %d results, %v", len(back), err)
	}
	s, err := Summarize(back, "qsd")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(s.Labels, ",") != "qsd,vublk" || len(s.Jobs) != 2 || s.Jobs[0].Name != "randread-4k-qd1-q1" {
		t.Fatalf("labels %v, jobs %+v", s.Labels, s.Jobs)
	}
	q, v := s.Jobs[0].By["qsd"], s.Jobs[0].By["vublk"]
	if q.Runs != 3 || q.IOPS != 10000 || q.IOPSSpread != 10 || q.P99 != 120 || q.ServerUsPerIO != 50 || q.Errors != 0 {
		t.Errorf("qsd medians %+v", q)
	}
	if v.Runs != 3 || v.IOPS != 12000 || v.P99 != 90 || v.P50 != 45 || v.ServerUsPerIO != 25 || v.Errors != 1 {
		t.Errorf("vublk medians %+v", v)
	}
	var out bytes.Buffer
	s.WriteText(&out)
	text := out.String()
	for _, want := range []string{"IOPS qsd", "IOPS vublk", "±% qsd", "vublk/qsd", "CPUus/IO vublk", "randread-4k-qd1-q1",
		" 1.20 ", " 0.50\n", "write-64k-qd8-q1", "randread-4k-qd1-q1 on vublk: 1 errors"} {
		if !strings.Contains(text, want) {
			t.Errorf("summary lacks %q:\n%s", want, text)
		}
	}
	// The job with no vublk runs shows dashes, not NaN.
	if strings.Contains(text, "NaN") || strings.Contains(text, "Inf") {
		t.Errorf("summary shows NaN or Inf:\n%s", text)
	}
	if _, err := Summarize(back, "nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Summarize with an unknown base: %v", err)
	}
	if _, err := ReadResults(strings.NewReader("{\"iops\": 1}\nnot json\n")); err == nil || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("ReadResults of a bad line: %v", err)
	}
}

func TestWriteComparison(t *testing.T) {
	mk := func(label, job, rw string, bs, flush int, iops, cpu float64) Result {
		return Result{Label: label, Job: JobReport{Name: job, RW: rw, BlockSize: bs, FlushEvery: flush}, IOPS: iops,
			ServerCPU: &CPUResult{MicrosPerIO: cpu}}
	}
	results := []Result{
		mk("floor", "floor-randread-4k", "randread", 4096, 0, 200000, 2),
		mk("floor", "floor-randwrite-4k", "randwrite", 4096, 0, 200000, 2.5),
		mk("floor", "floor-read-4k", "read", 4096, 0, 400000, 1),
		mk("qsd10", "randread-4k-qd32-q1", "randread", 4096, 0, 100000, 10),
		mk("qsd10-iot", "randread-4k-qd32-q1", "randread", 4096, 0, 120000, 8),
		mk("vublk", "randread-4k-qd32-q1", "randread", 4096, 0, 300000, 3),
		mk("qsd10", "randwrite-4k-qd32-q1", "randwrite", 4096, 0, 110000, 10),
		mk("qsd10-iot", "randwrite-4k-qd32-q1", "randwrite", 4096, 0, 90000, 8),
		mk("vublk", "randwrite-4k-qd32-q1", "randwrite", 4096, 0, 220000, 4),
		mk("vublk", "randwrite-4k-qd32-q1-flush32", "randwrite", 4096, 32, 198000, 4),
		mk("vublk", "read-64k-qd8-q1", "read", 65536, 0, 40000, 12),
		mk("vublk", "read-4k-qd32-q1", "read", 4096, 0, 400000, 1.5),
		mk("vublk", "write-4k-qd32-q1", "write", 4096, 0, 300000, 2),
	}
	s, err := Summarize(results, "qsd10")
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	s.WriteComparison(&out, Comparison{Subject: "vublk", Refs: []string{"qsd10", "qsd10-iot"}, Floor: "floor"})
	text := out.String()
	lines := map[string]string{}
	for _, l := range strings.Split(text, "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			lines[f[0]] = strings.Join(f, " ")
		}
	}
	for job, want := range map[string]string{
		// The better reference is the one with more IOPS, not less CPU.
		"randread-4k-qd32-q1":  "randread-4k-qd32-q1 qsd10-iot 120000 300000 2.50 8.00 3.00 0.38 2.00 5.00 4.00 1.50",
		"randwrite-4k-qd32-q1": "randwrite-4k-qd32-q1 qsd10 110000 220000 2.00 10.00 4.00 0.40 2.50 4.00 3.20 1.60",
		// No reference ran it, and no floor of its size.
		"read-64k-qd8-q1": "read-64k-qd8-q1 - - 40000 - - 12.00 - - - - -",
		// Sequential jobs take the sequential floor, not the random one
		// (there is none for sequential writes here).
		"read-4k-qd32-q1":  "read-4k-qd32-q1 - - 400000 - - 1.50 - 1.00 - - 1.50",
		"write-4k-qd32-q1": "write-4k-qd32-q1 - - 300000 - - 2.00 - - - - -",
	} {
		if lines[job] != want {
			t.Errorf("row %q, want %q\n%s", lines[job], want, text)
		}
	}
	if _, ok := lines["floor-randread-4k"]; ok {
		t.Errorf("the floor's jobs have rows:\n%s", text)
	}
	if !strings.Contains(text, "randwrite-4k-qd32-q1-flush32 against randwrite-4k-qd32-q1: vublk 10%") {
		t.Errorf("no flush cost line:\n%s", text)
	}
	if strings.Contains(text, "NaN") || strings.Contains(text, "Inf") {
		t.Errorf("comparison shows NaN or Inf:\n%s", text)
	}
}
