package bench

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// ReadResults reads Results as vublk bench --json prints them, one JSON
// object per line; blank lines are skipped.
func ReadResults(r io.Reader) ([]Result, error) {
	var out []Result
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for line := 1; sc.Scan(); line++ {
		b := sc.Bytes()
		if len(strings.TrimSpace(string(b))) == 0 {
			continue
		}
		var res Result
		if err := json.Unmarshal(b, &res); err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, res)
	}
	return out, sc.Err()
}

// Summary is the median, per job and back-end, of repeated runs.
type Summary struct {
	// Base is the back-end the others are compared with.
	Base string
	// Labels are the back-ends, Base first, then in order of appearance.
	Labels []string
	// Jobs are in order of first appearance.
	Jobs []JobSummary
}

// JobSummary is one job's medians for each back-end.
type JobSummary struct {
	Name string
	// RW, BlockSize and FlushEvery are the job's, from its first run.
	RW         string
	BlockSize  int
	FlushEvery int
	By         map[string]Medians
}

// Medians are the medians of one job's runs on one back-end, each metric
// taken on its own. A metric no run measured is NaN.
type Medians struct {
	Runs int
	IOPS float64
	// IOPSSpread is half the range of IOPS over the runs, as a percentage
	// of the median: how far apart the runs were.
	IOPSSpread    float64
	MiBPerS       float64
	P50, P99      float64 // microseconds
	ServerUsPerIO float64
	Errors        uint64 // I/O and verification errors, summed over the runs
}

// Summarize groups results by job name and label and takes medians. base
// must be one of the labels.
func Summarize(results []Result, base string) (*Summary, error) {
	s := &Summary{Base: base}
	runs := map[string]map[string][]Result{}
	seen := map[string]bool{}
	for _, r := range results {
		label := r.Label
		if label == "" {
			label = "-"
		}
		if !seen[label] {
			seen[label] = true
			s.Labels = append(s.Labels, label)
		}
		byLabel, ok := runs[r.Job.Name]
		if !ok {
			byLabel = map[string][]Result{}
			runs[r.Job.Name] = byLabel
			s.Jobs = append(s.Jobs, JobSummary{Name: r.Job.Name, RW: r.Job.RW, BlockSize: r.Job.BlockSize,
				FlushEvery: r.Job.FlushEvery, By: map[string]Medians{}})
		}
		byLabel[label] = append(byLabel[label], r)
	}
	if !seen[base] {
		return nil, fmt.Errorf("no results labelled %q (labels: %s)", base, strings.Join(s.Labels, ", "))
	}
	i := slices.Index(s.Labels, base)
	s.Labels = append([]string{base}, slices.Delete(s.Labels, i, i+1)...)
	for k := range s.Jobs {
		js := &s.Jobs[k]
		for label, rs := range runs[js.Name] {
			m := Medians{Runs: len(rs)}
			pick := func(f func(Result) (float64, bool)) float64 {
				var v []float64
				for _, r := range rs {
					if x, ok := f(r); ok {
						v = append(v, x)
					}
				}
				return Median(v)
			}
			m.IOPS = pick(func(r Result) (float64, bool) { return r.IOPS, true })
			lo, hi := math.Inf(1), math.Inf(-1)
			for _, r := range rs {
				lo, hi = min(lo, r.IOPS), max(hi, r.IOPS)
			}
			m.IOPSSpread = (hi - lo) / 2 / m.IOPS * 100
			m.MiBPerS = pick(func(r Result) (float64, bool) { return r.MiBPerS, true })
			m.P50 = pick(func(r Result) (float64, bool) { return r.Latency.P50, true })
			m.P99 = pick(func(r Result) (float64, bool) { return r.Latency.P99, true })
			m.ServerUsPerIO = pick(func(r Result) (float64, bool) {
				if r.ServerCPU == nil {
					return 0, false
				}
				return r.ServerCPU.MicrosPerIO, true
			})
			for _, r := range rs {
				m.Errors += r.Errors
				if r.Verify != nil {
					m.Errors += r.Verify.Errors
				}
			}
			js.By[label] = m
		}
	}
	return s, nil
}

// Median is the median of v (the mean of the middle two for an even
// count), or NaN for none.
func Median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	v = slices.Clone(v)
	slices.Sort(v)
	n := len(v)
	if n%2 == 1 {
		return v[n/2]
	}
	return (v[n/2-1] + v[n/2]) / 2
}

// WriteText prints the summary as a table: per job, each back-end's median
// IOPS and how far apart its runs were (± half the range, in percent of the
// median), median MiB/s, p50 and p99 latency and server CPU per request, and
// for each back-end but the base, its IOPS and CPU per request as a ratio
// to the base's.
func (s *Summary) WriteText(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	others := s.Labels[1:]
	// Cells are right-aligned; job names are padded to one width so that
	// they read left-aligned.
	width := len("job")
	for _, js := range s.Jobs {
		width = max(width, len(js.Name))
	}
	pad := func(s string) string { return s + strings.Repeat(" ", width-len(s)) }
	var hdr []string
	hdr = append(hdr, pad("job"), "runs")
	group := func(metric string, ratio bool) {
		for _, l := range s.Labels {
			hdr = append(hdr, metric+" "+l)
		}
		if ratio {
			for _, l := range others {
				hdr = append(hdr, l+"/"+s.Base)
			}
		}
	}
	group("IOPS", true)
	group("±%", false)
	group("MiB/s", false)
	group("p50us", false)
	group("p99us", false)
	group("CPUus/IO", true)
	fmt.Fprintln(tw, strings.Join(hdr, "\t")+"\t")
	errs := false
	for _, js := range s.Jobs {
		row := []string{pad(js.Name), runsText(js, s.Labels)}
		metric := func(f func(Medians) float64, format string, ratio bool) {
			for _, l := range s.Labels {
				row = append(row, num(f(js.By[l]), js.By[l].Runs, format))
			}
			if ratio {
				b := js.By[s.Base]
				for _, l := range others {
					o := js.By[l]
					row = append(row, num(f(o)/f(b), min(o.Runs, b.Runs), "%.2f"))
				}
			}
		}
		metric(func(m Medians) float64 { return m.IOPS }, "%.0f", true)
		metric(func(m Medians) float64 { return m.IOPSSpread }, "%.0f", false)
		metric(func(m Medians) float64 { return m.MiBPerS }, "%.1f", false)
		metric(func(m Medians) float64 { return m.P50 }, "%.1f", false)
		metric(func(m Medians) float64 { return m.P99 }, "%.1f", false)
		metric(func(m Medians) float64 { return m.ServerUsPerIO }, "%.2f", true)
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
		for _, l := range s.Labels {
			errs = errs || js.By[l].Errors > 0
		}
	}
	tw.Flush()
	fmt.Fprintf(w, "\nMedians over the runs of each job; ±%% is half the IOPS range over the runs, in %% of the median.\n"+
		"IOPS ratio > 1: faster than %s; CPU ratio < 1: cheaper per request than %s.\n", s.Base, s.Base)
	if errs {
		fmt.Fprintln(w, "Some runs had I/O or verification errors:")
		for _, js := range s.Jobs {
			for _, l := range s.Labels {
				if e := js.By[l].Errors; e > 0 {
					fmt.Fprintf(w, "  %s on %s: %d errors\n", js.Name, l, e)
				}
			}
		}
	}
}

func runsText(js JobSummary, labels []string) string {
	var parts []string
	for _, l := range labels {
		parts = append(parts, fmt.Sprint(js.By[l].Runs))
	}
	return strings.Join(parts, "/")
}

func num(v float64, runs int, format string) string {
	if runs == 0 || math.IsNaN(v) || math.IsInf(v, 0) {
		return "-"
	}
	return fmt.Sprintf(format, v)
}
