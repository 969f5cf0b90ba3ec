package bench

import (
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"text/tabwriter"
)

// Comparison is how make bench reads a Summary against the goals of the
// performance work: the subject (vublk) against the better of several
// reference configurations (qemu-storage-daemon with and without an
// iothread), and every server's CPU per I/O against a floor: the CPU that
// one thread of plain pread/pwrite calls (fio --ioengine=psync) spends per
// I/O of the same size on the same file.
type Comparison struct {
	// Subject is the label compared, e.g. "vublk".
	Subject string
	// Refs are the reference labels; per job the one with the higher
	// median IOPS is the one compared.
	Refs []string
	// Floor is the label of the floor runs. A floor run's job gives the
	// direction (a read or a write), the pattern (random or sequential)
	// and block size it is the floor for: on a page cache a random 4 KiB
	// pread costs about twice a sequential one, so a sequential job
	// measured against a random floor would look cheaper than it is.
	Floor string
}

// floorKey is what a floor applies to: random or sequential reads or writes
// of one size.
type floorKey struct {
	write, random bool
	bs            int
}

func isWrite(rw string) bool { return strings.Contains(rw, "write") }

func keyOf(js JobSummary) floorKey {
	return floorKey{isWrite(js.RW), strings.HasPrefix(js.RW, "rand"), js.BlockSize}
}

// WriteComparison prints, per job other than the floor's, the better
// reference, its and the subject's median IOPS and CPU per I/O and their
// ratios, the floor's CPU per I/O and each server's CPU per I/O as a ratio
// to it; then, for each job with a flush every N writes, what the flushes
// cost each server against the same job without them.
func (s *Summary) WriteComparison(w io.Writer, c Comparison) {
	floors := map[floorKey]float64{}
	var jobs []JobSummary
	for _, js := range s.Jobs {
		if m, ok := js.By[c.Floor]; ok && m.Runs > 0 {
			floors[keyOf(js)] = m.ServerUsPerIO
			continue
		}
		jobs = append(jobs, js)
	}
	var servers []string
	for _, l := range s.Labels {
		if l != c.Floor {
			servers = append(servers, l)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	width := len("job")
	for _, js := range jobs {
		width = max(width, len(js.Name))
	}
	pad := func(s string) string { return s + strings.Repeat(" ", width-len(s)) }
	hdr := []string{pad("job"), "better ref", "IOPS ref", "IOPS " + c.Subject, "IOPS ratio",
		"CPUus ref", "CPUus " + c.Subject, "CPU ratio", "floor us"}
	for _, l := range servers {
		hdr = append(hdr, l+"/floor")
	}
	fmt.Fprintln(tw, strings.Join(hdr, "\t")+"\t")
	for _, js := range jobs {
		ref, rm := "-", Medians{IOPS: math.NaN(), ServerUsPerIO: math.NaN()}
		for _, l := range c.Refs {
			if m, ok := js.By[l]; ok && m.Runs > 0 && (ref == "-" || m.IOPS > rm.IOPS) {
				ref, rm = l, m
			}
		}
		sm, ok := js.By[c.Subject]
		if !ok {
			sm = Medians{IOPS: math.NaN(), ServerUsPerIO: math.NaN()}
		}
		floor, ok := floors[keyOf(js)]
		if !ok {
			floor = math.NaN()
		}
		row := []string{pad(js.Name), ref, num(rm.IOPS, rm.Runs, "%.0f"), num(sm.IOPS, sm.Runs, "%.0f"),
			num(sm.IOPS/rm.IOPS, min(sm.Runs, rm.Runs), "%.2f"),
			num(rm.ServerUsPerIO, rm.Runs, "%.2f"), num(sm.ServerUsPerIO, sm.Runs, "%.2f"),
			num(sm.ServerUsPerIO/rm.ServerUsPerIO, min(sm.Runs, rm.Runs), "%.2f"), num(floor, 1, "%.2f")}
		for _, l := range servers {
			m := js.By[l]
			row = append(row, num(m.ServerUsPerIO/floor, m.Runs, "%.2f"))
		}
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()
	fmt.Fprintf(w, "\nThe better ref is whichever of %s had the higher median IOPS in that job; IOPS ratio = %s/ref,\n"+
		"CPU ratio = %s's CPU per I/O / ref's. floor us is the CPU per I/O of one thread of fio --ioengine=psync\n"+
		"(pread/pwrite) of the same size and pattern (random or sequential) on the same file; X/floor is server X's CPU per I/O over it.\n",
		strings.Join(c.Refs, " and "), c.Subject, c.Subject)

	var flushLines []string
	for _, js := range jobs {
		if js.FlushEvery <= 0 {
			continue
		}
		baseName, ok := strings.CutSuffix(js.Name, fmt.Sprintf("-flush%d", js.FlushEvery))
		if !ok {
			continue
		}
		i := slices.IndexFunc(jobs, func(o JobSummary) bool { return o.Name == baseName })
		if i < 0 {
			continue
		}
		var parts []string
		for _, l := range servers {
			with, without := js.By[l], jobs[i].By[l]
			if with.Runs == 0 || without.Runs == 0 {
				continue
			}
			parts = append(parts, fmt.Sprintf("%s %.0f%%", l, (1-with.IOPS/without.IOPS)*100))
		}
		if len(parts) > 0 {
			flushLines = append(flushLines, fmt.Sprintf("  %s against %s: %s", js.Name, baseName, strings.Join(parts, ", ")))
		}
	}
	if len(flushLines) > 0 {
		fmt.Fprintln(w, "\nIOPS lost to a flush every N writes (1 - IOPS with flushes / IOPS without):")
		for _, l := range flushLines {
			fmt.Fprintln(w, l)
		}
	}
}
