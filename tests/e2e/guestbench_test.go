//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/vublk/vublk/bench"
)

// guestBenchSize is the backing file both servers serve, on tmpfs.
const guestBenchSize = 512 << 20

// guestBenchRun is one fio job in one guest on one back-end; it is also a line of OUT.
type guestBenchRun struct {
	Backend string  `json:"backend"`
	Round   int     `json:"round"`
	Job     string  `json:"job"`
	Runtime int     `json:"runtime_s"` // fio's --runtime
	IOs     uint64  `json:"ios"`
	IOPS    float64 `json:"iops"`
	P50     float64 `json:"lat_p50_us"` // fio's completion latency median, in the guest
	// ServerCPU is the back-end's CPU time (user and system, all threads) from the guest's
	// bench-start line to its bench-end line, and CPUPerIO that over IOs.
	ServerCPU float64 `json:"server_cpu_s"`
	CPUPerIO  float64 `json:"server_cpu_us_per_io"`
	// CSPerIO is the back-end's context switches (voluntary and involuntary, summed over its
	// threads alive at the job's start and end) per request.
	CSPerIO float64 `json:"server_cs_per_io"`
}

// TestGuestBench is the in-guest half of `make bench`: the TCG guest runs the same fio jobs
// against qemu-storage-daemon and vublk serving one fully allocated file on tmpfs, alternating
// over ROUNDS rounds (2), GUEST_SECONDS (10) per job, and it prints the medians and the
// vublk/QSD ratios. The guest's emulated CPUs limit the IOPS of both, so the server's CPU time per
// request is the figure that tells them apart. OUT, if set, gets every run
// as a JSON line (a relative path is taken from the repository root). It runs only with
// VUBLK_GUEST_BENCH=1 (make bench-guest).
func TestGuestBench(t *testing.T) {
	if os.Getenv("VUBLK_GUEST_BENCH") != "1" {
		t.Skip("the in-guest benchmark runs with VUBLK_GUEST_BENCH=1 (make bench-guest)")
	}
	rounds := envInt(t, "ROUNDS", 2)
	seconds := envInt(t, "GUEST_SECONDS", 10)
	qsd, err := exec.LookPath("qemu-storage-daemon")
	if err != nil {
		t.Fatalf("qemu-storage-daemon is not installed (make deps): %v", err)
	}
	dir, err := os.MkdirTemp("/dev/shm", "vublk-guestbench-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	img := filepath.Join(dir, "disk.img")
	if err := writeZeros(img, guestBenchSize); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "server.sock")
	commands := map[string][]string{
		"qsd": {qsd,
			"--blockdev", "driver=file,node-name=f,filename=" + img + ",cache.direct=off",
			"--export", "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=" + sock +
				",writable=on,num-queues=2"},
		"vublk": {env.vublk, "serve", "--socket-path", sock, "--blk-file", img, "--num-queues", "2",
			"--log-level", "warn"},
	}
	// vublk-packed is the same server, with the guest's disk on packed rings (packed=on).
	commands["vublk-packed"] = commands["vublk"]
	// qsd10 is the Debian 13 root's qemu-storage-daemon 10.0 (scripts/trixie-run keeps its PID, and
	// binds /dev/shm in), with the same options: the goal compares vublk with the better QSD.
	backends := []string{"qsd", "vublk", "vublk-packed"}
	trixie := filepath.Join(env.root, "scripts", "trixie-run")
	if out, err := exec.Command(trixie, "qemu-storage-daemon", "--version").Output(); err == nil {
		commands["qsd10"] = append([]string{trixie, "qemu-storage-daemon"}, commands["qsd"][1:]...)
		backends = append(backends, "qsd10")
		t.Logf("qsd10: %s", strings.SplitN(string(out), "\n", 2)[0])
	} else {
		t.Logf("no qemu-storage-daemon in the Debian 13 root (%v): qsd10 left out", err)
	}
	// VUBLK_GUEST_BENCH_REF=BINARY adds vublk-ref, another vublk binary on split rings (an A/B
	// in the same run); VUBLK_GUEST_BENCH_ONLY=a,b keeps those back-ends only.
	if ref := os.Getenv("VUBLK_GUEST_BENCH_REF"); ref != "" {
		commands["vublk-ref"] = append([]string{ref}, commands["vublk"][1:]...)
		backends = append(backends, "vublk-ref")
	}
	if only := os.Getenv("VUBLK_GUEST_BENCH_ONLY"); only != "" {
		keep := strings.Split(only, ",")
		backends = slices.DeleteFunc(backends, func(b string) bool { return !slices.Contains(keep, b) })
	}

	var runs []guestBenchRun
	for round := 1; round <= rounds; round++ {
		// Alternate which server goes first, as scripts/bench.sh does.
		order := slices.Clone(backends)
		if round%2 == 0 {
			slices.Reverse(order)
		}
		for _, backend := range order {
			t.Run(fmt.Sprintf("round%d-%s", round, backend), func(t *testing.T) {
				argv := commands[backend]
				if prof := os.Getenv("VUBLK_GUEST_BENCH_CPUPROFILE"); prof != "" && strings.HasPrefix(backend, "vublk") {
					// A CPU profile of vublk per round, for go tool pprof.
					argv = append(argv[:len(argv):len(argv)], "--cpuprofile", fmt.Sprintf("%s.%s.round%d", prof, backend, round))
				}
				srv := startServer(t, backend, sock, filepath.Join(dir, backend+".log"), argv)
				got := guestBench(t, srv.cmd.Process.Pid, sock, seconds, backend == "vublk-packed")
				srv.stop(t)
				for i := range got {
					got[i].Backend, got[i].Round = backend, round
					t.Logf("%-22s %8.0f IOPS  p50 %7.1f us  server CPU %.2f s, %.2f us/IO, %.2f cs/IO",
						got[i].Job, got[i].IOPS, got[i].P50, got[i].ServerCPU, got[i].CPUPerIO, got[i].CSPerIO)
				}
				runs = append(runs, got...)
			})
		}
	}

	if out := os.Getenv("OUT"); out != "" {
		if !filepath.IsAbs(out) {
			out = filepath.Join(env.root, out)
		}
		if err := writeJSONLines(out, runs); err != nil {
			t.Error(err)
		} else {
			t.Logf("every run is in %s", out)
		}
	}
	qsdVersion, _ := exec.Command(qsd, "--version").Output()
	describe := exec.Command("git", "describe", "--always", "--dirty")
	describe.Dir = env.root
	vublkVersion, err := describe.Output()
	if err != nil {
		vublkVersion = []byte("unknown")
	}
	fmt.Printf("\nguest bench: %s vs vublk (%s); TCG guest with 2 vCPUs on %d host CPUs, %d MiB file on "+
		"tmpfs, 2 queues; rounds: %d, %d s per job\n",
		strings.SplitN(string(qsdVersion), "\n", 2)[0], strings.TrimSpace(string(vublkVersion)),
		runtime.NumCPU(), guestBenchSize>>20, rounds, seconds)
	writeGuestBenchTable(os.Stdout, runs)
}

// guestBench boots the guest's bench phase on the server at socket and returns its jobs, with the
// server's CPU time read from /proc/PID/stat as the guest starts and ends each one.
func guestBench(t *testing.T, pid int, socket string, seconds int, packed bool) []guestBenchRun {
	t.Helper()
	var runs []guestBenchRun
	started := map[string]time.Duration{}
	used := map[string]time.Duration{}
	csStarted, csUsed := map[string]uint64{}, map[string]uint64{}
	cpu := func() time.Duration {
		d, err := bench.ProcessCPU(pid)
		if err != nil {
			t.Errorf("reading the server's CPU time: %v", err)
		}
		return d
	}
	const jobs = 4 // in phase_bench
	d, ring := disk{socket: socket, numQueues: 2}, "0"
	if packed {
		d.deviceOpts, ring = "packed=on", "1"
	}
	v := bootGuest(t, boot{
		disks:   []disk{d},
		params:  map[string]string{"phase": "bench", "seconds": strconv.Itoa(seconds), "packed": ring},
		timeout: 2*time.Minute + jobs*time.Duration(seconds+30)*time.Second,
		// Runs on the goroutine that reads the console; bootGuest returns after it has seen the
		// last line.
		onLine: func(line string) {
			f := strings.Fields(line)
			if len(f) < 3 || f[0] != "E2E" {
				return
			}
			switch job := f[2]; f[1] {
			case "bench-start":
				started[job], csStarted[job] = cpu(), contextSwitches(pid)
			case "bench-end":
				used[job], csUsed[job] = cpu()-started[job], contextSwitches(pid)-csStarted[job]
			case "bench":
				if len(f) != 6 {
					t.Errorf("malformed bench line %q", line)
					return
				}
				r := guestBenchRun{Job: job, Runtime: seconds, ServerCPU: used[job].Seconds()}
				var errs [3]error
				r.IOs, errs[0] = strconv.ParseUint(f[3], 10, 64)
				r.IOPS, errs[1] = strconv.ParseFloat(f[4], 64)
				r.P50, errs[2] = strconv.ParseFloat(f[5], 64)
				for _, err := range errs {
					if err != nil {
						t.Errorf("bench line %q: %v", line, err)
						return
					}
				}
				if r.IOs > 0 {
					r.CPUPerIO = float64(used[job].Microseconds()) / float64(r.IOs)
					r.CSPerIO = float64(csUsed[job]) / float64(r.IOs)
				}
				runs = append(runs, r)
			}
		},
	})
	want := []string{"queues", "ring_packed"}
	for _, r := range runs {
		want = append(want, "bench_"+r.Job)
	}
	v.expectChecks(t, "bench", want)
	if len(runs) != jobs {
		t.Errorf("the guest reported %d bench jobs, want %d", len(runs), jobs)
	}
	return runs
}

// contextSwitches is the sum of the voluntary and involuntary context switches of pid's threads
// (those alive now: a thread that exited is not counted).
func contextSwitches(pid int) uint64 {
	statuses, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	var n uint64
	for _, p := range statuses {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
				c, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				n += c
			} else if v, ok := strings.CutPrefix(line, "nonvoluntary_ctxt_switches:"); ok {
				c, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				n += c
			}
		}
	}
	return n
}

// server is a vhost-user-blk back-end process (any: QSD, vublk) with its output in a file.
type server struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error // the exit status, valid after done is closed
}

// startServer runs argv with its output to logPath and waits until socket exists.
func startServer(t *testing.T, name, socket, logPath string, argv []string) *server {
	t.Helper()
	os.Remove(socket)
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	s := &server{name: name, cmd: exec.Command(argv[0], argv[1:]...), log: logPath, done: make(chan struct{})}
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		select {
		case <-s.done:
		default:
			s.cmd.Process.Kill()
			<-s.done
		}
	})
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(socket); err == nil {
			return s
		}
		select {
		case <-s.done:
			t.Fatalf("%s exited before it listened (%v): %s", name, s.err, s.output())
		default:
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("%s did not create %s within 30 s: %s", name, socket, s.output())
		}
	}
}

// stop sends SIGTERM and waits for the exit.
func (s *server) stop(t *testing.T) {
	t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
		t.Errorf("%s did not exit within 30 s of SIGTERM: %s", s.name, s.output())
	}
}

func (s *server) output() string {
	b, _ := os.ReadFile(s.log)
	return string(b)
}

// writeGuestBenchTable prints, per job, the medians over the rounds of each back-end's IOPS, fio's
// p50 latency and the server's CPU per I/O, with the vublk/QSD ratios.
func writeGuestBenchTable(w io.Writer, runs []guestBenchRun) {
	type key struct{ job, backend string }
	var jobs []string // in order of first appearance
	by := map[key][]guestBenchRun{}
	for _, r := range runs {
		if !slices.Contains(jobs, r.Job) {
			jobs = append(jobs, r.Job)
		}
		k := key{r.Job, r.Backend}
		by[k] = append(by[k], r)
	}
	median := func(job, backend string, f func(guestBenchRun) float64) float64 {
		var v []float64
		for _, r := range by[key{job, backend}] {
			v = append(v, f(r))
		}
		return bench.Median(v)
	}
	num := func(x float64, format string) string {
		if math.IsNaN(x) || math.IsInf(x, 0) {
			return "-"
		}
		return fmt.Sprintf(format, x)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	width := len("job")
	for _, j := range jobs {
		width = max(width, len(j))
	}
	pad := func(s string) string { return s + strings.Repeat(" ", width-len(s)) }
	// One row per job and back-end; each vublk row has its ratios to each QSD and to the better
	// one (the lower CPU per I/O).
	var backends []string
	for _, b := range []string{"qsd", "qsd10", "vublk", "vublk-packed", "vublk-ref"} {
		if slices.ContainsFunc(runs, func(r guestBenchRun) bool { return r.Backend == b }) {
			backends = append(backends, b)
		}
	}
	fmt.Fprintln(tw, pad("job")+"\tbackend\tIOPS\tp50us\tCPUus/IO\tcs/IO\tCPU/qsd\tCPU/qsd10\tCPU/best qsd\t")
	for _, j := range jobs {
		cpu := func(b string) float64 { return median(j, b, func(r guestBenchRun) float64 { return r.CPUPerIO }) }
		best := math.NaN()
		for _, q := range []string{"qsd", "qsd10"} {
			if c := cpu(q); !math.IsNaN(c) && (math.IsNaN(best) || c < best) {
				best = c
			}
		}
		for _, b := range backends {
			c := cpu(b)
			ratios := []string{"", "", ""}
			if strings.HasPrefix(b, "vublk") {
				ratios = []string{num(c/cpu("qsd"), "%.2f"), num(c/cpu("qsd10"), "%.2f"), num(c/best, "%.2f")}
			}
			fmt.Fprintln(tw, strings.Join(append([]string{pad(j), b,
				num(median(j, b, func(r guestBenchRun) float64 { return r.IOPS }), "%.0f"),
				num(median(j, b, func(r guestBenchRun) float64 { return r.P50 }), "%.1f"),
				num(c, "%.2f"),
				num(median(j, b, func(r guestBenchRun) float64 { return r.CSPerIO }), "%.2f")},
				ratios...), "\t")+"\t")
		}
	}
	tw.Flush()
	fmt.Fprintln(w, "\nMedians over the rounds. The TCG guest's emulated CPUs limit the IOPS of both servers; CPUus/IO,"+
		"\nthe server's CPU time (user+system, /proc/PID/stat, 10 ms ticks) per request, is the figure to"+
		"\ncompare: a ratio (vublk over qsd) < 1 is cheaper. cs/IO: the server's context switches per request.")
}

func writeJSONLines(path string, runs []guestBenchRun) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	var b strings.Builder
	enc := json.NewEncoder(&b)
	for _, r := range runs {
		if err := enc.Encode(r); err != nil {
			return err
		}
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// writeZeros creates path with size bytes of zeros, every block written: a file on tmpfs with no
// holes, so that reads cost the same as after writes.
func writeZeros(path string, size int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for n := 0; n < size; n += len(buf) {
		if _, err := f.Write(buf[:min(len(buf), size-n)]); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// envInt is the positive integer in the environment variable name, or def if it is unset.
func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}
