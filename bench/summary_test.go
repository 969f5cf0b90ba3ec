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
