package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	loadgen "github.com/vublk/vublk/bench"
	"github.com/vublk/vublk/config"
)

const benchUsage = "usage: vublk bench --socket PATH [--rw MODE] [--bs N] [--iodepth N] [--queues N] [--runtime D] " +
	"[--flush-every N] [--verify] [--size N] [--server-pid PID] [--json]  |  vublk bench summary [--base LABEL] [--refs L1,L2 [--subject L] [--floor L]] FILE..."

// bench runs a load against a vhost-user-blk back-end (any, not only
// vublk), as a front-end: see package github.com/vublk/vublk/bench,
// imported as loadgen.
func bench(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "summary" {
		return benchSummary(args[1:], stdout, stderr)
	}
	j := loadgen.DefaultJob()
	var t loadgen.Target
	var asJSON bool
	var label, cpuProfile string
	fs := flag.NewFlagSet("vublk bench", flag.ContinueOnError)
	fs.StringVar(&t.Socket, "socket", "", "vhost-user-blk back-end socket to connect to (vublk, qemu-storage-daemon, ...)")
	rw := fs.String("rw", j.Mode.String(), "access pattern: randread, randwrite, read, write or randrw")
	fs.Func("bs", "block size of every read and write: bytes, or with K/M (default 4k)", func(s string) error {
		n, err := config.ParseSize(s)
		if err != nil {
			return err
		}
		if n > loadgen.MaxBlockSize {
			return fmt.Errorf("%d bytes is larger than %d", n, loadgen.MaxBlockSize)
		}
		j.BlockSize = int(n)
		return nil
	})
	fs.IntVar(&j.IODepth, "iodepth", j.IODepth, "requests kept in flight on each queue")
	fs.IntVar(&j.Queues, "queues", j.Queues, "virtqueues to drive, each from its own goroutine")
	fs.Func("runtime", "length of the measured phase: a duration (10s, 1m) or seconds (default 10s)", func(s string) error {
		d, err := parseSeconds(s)
		j.Runtime = d
		return err
	})
	fs.Func("ramp", "warm-up before the measured phase, not counted (default 0)", func(s string) error {
		d, err := parseSeconds(s)
		j.Ramp = d
		return err
	})
	fs.IntVar(&j.FlushEvery, "flush-every", 0, "on every queue, send a FLUSH after every N writes (0: never)")
	fs.BoolVar(&j.Packed, "packed", false, "drive packed virtqueues (the device must offer VIRTIO_F_RING_PACKED)")
	fs.BoolVar(&j.Verify, "verify", false, "write self-checking data, check every read of it, and read back every block written at the end")
	fs.Func("size", "region to use from offset 0: bytes, or with K/M/G/T (default: the device's capacity)", func(s string) error {
		n, err := config.ParseSize(s)
		j.Size = n
		return err
	})
	fs.IntVar(&j.ReadMix, "rwmixread", j.ReadMix, "percentage of reads in a randrw job")
	fs.Uint64Var(&j.Seed, "seed", 0, "random seed for offsets and the read/write mix (0: random)")
	fs.StringVar(&j.Name, "name", "", "job name in reports (default: from the parameters, e.g. randread-4k-qd32-q1)")
	fs.IntVar(&t.ServerPID, "server-pid", 0, "back-end process: report its CPU time per request (from /proc/PID/stat)")
	fs.DurationVar(&t.StallTimeout, "stall-timeout", 30*time.Second, "give up when requests are in flight and none completes for this long")
	fs.BoolVar(&asJSON, "json", false, "print the result as one JSON object")
	fs.StringVar(&label, "label", "", "name of the back-end in the output (e.g. vublk, qsd)")
	fs.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the load generator (this process) to this file")
	if code, ok := parseFlags(fs, args, stdout, stderr); !ok {
		return code
	}
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "vublk bench: "+format+"\n", a...)
		return code
	}
	switch {
	case fs.NArg() > 0:
		return fail(exitUsage, "unexpected argument %q", fs.Arg(0))
	case t.Socket == "":
		return fail(exitUsage, "--socket is required (%s)", benchUsage)
	case t.ServerPID < 0:
		return fail(exitUsage, "--server-pid must be a process id, not %d", t.ServerPID)
	}
	mode, err := loadgen.ParseMode(*rw)
	if err != nil {
		return fail(exitUsage, "%v", err)
	}
	j.Mode = mode
	if err := j.Validate(); err != nil {
		return fail(exitUsage, "%v", err)
	}

	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		if err != nil {
			return fail(exitUsage, "--cpuprofile: %v", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fail(exitUsage, "--cpuprofile: %v", err)
		}
		defer pprof.StopCPUProfile()
	}
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	res, err := loadgen.Run(ctx, t, j)
	if errors.Is(err, loadgen.ErrBadJob) {
		return fail(exitUsage, "%v", err)
	}
	if err != nil {
		return fail(1, "%v", err)
	}
	res.Label = label
	if asJSON {
		b, _ := json.Marshal(res)
		fmt.Fprintln(stdout, string(b))
	} else {
		res.WriteText(stdout)
	}
	if res.Failed() {
		return fail(1, "%d I/O errors, %d verification errors", res.Errors, verifyErrors(res))
	}
	return 0
}

func verifyErrors(r *loadgen.Result) uint64 {
	if r.Verify == nil {
		return 0
	}
	return r.Verify.Errors
}

// parseSeconds reads a duration: Go's syntax (1m30s), or a number of
// seconds.
func parseSeconds(s string) (time.Duration, error) {
	if d, err := time.ParseDuration(s); err == nil {
		return d, nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v > (1<<62)/1e9 {
		return 0, fmt.Errorf("invalid duration %q (want e.g. 10s, 1m or a number of seconds)", s)
	}
	return time.Duration(v * float64(time.Second)), nil
}

// benchSummary prints the median of each job's repeated runs, per
// back-end, from files of vublk bench --json lines.
func benchSummary(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("vublk bench summary", flag.ContinueOnError)
	base := fs.String("base", "qsd", "label of the back-end the others are compared with (ratio = other/base)")
	subject := fs.String("subject", "vublk", "with --refs: the label compared with the better reference")
	refs := fs.String("refs", "", "comma-separated reference labels: adds a table of --subject against the better of them per job")
	floor := fs.String("floor", "floor", "with --refs: the label of the floor runs (CPU per I/O of plain pread/pwrite)")
	if code, ok := parseFlags(fs, args, stdout, stderr); !ok {
		return code
	}
	if fs.NArg() == 0 {
		fmt.Fprintf(stderr, "vublk bench summary: no result files (%s)\n", benchUsage)
		return exitUsage
	}
	var results []loadgen.Result
	for _, path := range fs.Args() {
		f, err := os.Open(path)
		if err != nil {
			fmt.Fprintf(stderr, "vublk bench summary: %v\n", err)
			return exitUsage
		}
		rs, err := loadgen.ReadResults(f)
		f.Close()
		if err != nil {
			fmt.Fprintf(stderr, "vublk bench summary: %s: %v\n", path, err)
			return 1
		}
		results = append(results, rs...)
	}
	// The floor runs have a table of their own, with --refs.
	servers := results
	if *refs != "" {
		servers = slices.DeleteFunc(slices.Clone(results), func(r loadgen.Result) bool { return r.Label == *floor })
	}
	s, err := loadgen.Summarize(servers, *base)
	if err != nil {
		fmt.Fprintf(stderr, "vublk bench summary: %v\n", err)
		return 1
	}
	s.WriteText(stdout)
	if *refs != "" {
		all, err := loadgen.Summarize(results, *base)
		if err != nil {
			fmt.Fprintf(stderr, "vublk bench summary: %v\n", err)
			return 1
		}
		fmt.Fprintln(stdout)
		all.WriteComparison(stdout, loadgen.Comparison{Subject: *subject, Refs: strings.Split(*refs, ","), Floor: *floor})
	}
	return 0
}
