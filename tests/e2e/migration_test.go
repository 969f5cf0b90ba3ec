//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/tests/internal/buildvublk"
)

// The migration test's guest: small, so that a TCG migration over a unix socket is quick (its
// memory: migMemFor).
const (
	migDiskSize  = 256 << 20
	migRegionOff = 128 // MiB: the region the guest reads through its page cache
	migRegionMiB = 96
	// migGoodRounds is how many migrations go back and forth between two good vublk processes
	// (MIG_ROUNDS overrides it).
	migGoodRounds = 10
	// migBrokenTries bounds the migrations away from a vublk that does not log read data; one
	// of them must fail the guest's checksum.
	migBrokenTries = 3
	// migQSDRounds is how many migrations run between two qemu-storage-daemons, for the
	// downtime comparison.
	migQSDRounds = 2
	// migRBDRounds is how many migrations TestRBDMigration runs between two vublk processes on
	// one RBD image.
	migRBDRounds = 4
)

// migMemFor is the guest's memory on QEMU q: 512 MiB, and on QEMUs before 9.0 8 KiB less.
// Before 9.0 (the fix is QEMU commit 03bfc2188f, "physmem: Fix migration dirty bitmap coherency
// with TCG memory access"; Debian 12's 7.2.22 does not have it), the fast path of QEMU's
// migration bitmap sync, taken for a RAM block that starts and ends on a 64-page (256 KiB)
// boundary, clears the block's dirty bits without making TCG's TLB trap the next store to those
// pages: a guest store through a TLB entry filled before the sync is not logged, the page is not
// sent again, and the guest runs on with stale memory after the switch-over. On QEMU 7.2 a
// 512 MiB guest oopsed after its 1st to 3rd migration (list_debug BUG, bad page state, slab BUG,
// NULL pointer in virtblk_done) with qemu-storage-daemon as the back-end as well as with vublk;
// at 524280 KiB (not a multiple of 256 KiB) the sync takes the per-page path, which resets the
// TLB entries, and every migration came out clean (30 of 30 with vublk, 10 of 10 with
// qemu-storage-daemon, 8 of 8 on RBD).
func migMemFor(q *qemuBinary) string {
	if q.major < 9 {
		return "524280K"
	}
	return "512M"
}

// TestMigration live-migrates a running guest between two QEMU processes on this host, each
// with its own back-end process serving the same image, on every QEMU of the matrix:
//
//   - 10 migrations back and forth between vublk A (lanes) and vublk B (--io-engine uring
//     --direct), while the guest runs fio randwrite with crc32c verify; in each, once QEMU has
//     sent all of memory once, the guest reads a 96 MiB region into its page cache while the
//     migration is held from converging, and after the switch-over it checksums the region from
//     its page cache (guest.sh phase_migrate): every page of the region was filled after QEMU
//     sent it, so it reaches the destination only if the back-end logged it;
//   - every migration completes, every checksum and fio run is good, the region was still in the
//     page cache at the checksum, and the guest's kernel logs no I/O error;
//   - then the guest goes to vublk C, built with the test hook that leaves read data out of the
//     dirty log, and migrates away from it: the checksum must fail (the check catches a broken
//     logger) within migBrokenTries tries, and vublk C must say it left pages out of the log;
//   - the same guest migrates migQSDRounds times between two qemu-storage-daemons, and the test
//     logs downtime and total time (query-migrate) of both side by side.
//
// On QEMU 10.0 the guest's disk runs packed rings, on 7.2 split rings; the guest checks that it
// negotiated the layout it was given. On 7.2 the guest's memory is 8 KiB short (migMemFor).
// 3 to 9 minutes per QEMU on a 2-core machine, depending on its load (14 migrations, 8 to 40 s
// each).
func TestMigration(t *testing.T) {
	rounds := migGoodRounds
	if s := os.Getenv("MIG_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("MIG_ROUNDS=%q", s)
		}
		rounds = n
	}
	hooked := buildHookedVublk(t)
	forEachQEMU(t, func(t *testing.T, q *qemuBinary) {
		dir := t.TempDir()
		img := filepath.Join(dir, "disk.img")
		sum := writeMigImage(t, img)

		a := startMigVublk(t, env.vublk, nil, filepath.Join(dir, "a.sock"), "a", "--blk-file", img, "--lanes", "2")
		b := startMigVublk(t, env.vublk, nil, filepath.Join(dir, "b.sock"), "b", "--blk-file", img, "--io-engine", "uring", "--direct")
		c := startMigVublk(t, hooked, []string{"VUBLK_TESTHOOK_NO_DATA_LOG=1"}, filepath.Join(dir, "c.sock"), "c", "--blk-file", img)
		c.broken = true

		// Packed rings on QEMU 10.0, split rings on 7.2: both ring layouts go through every
		// check (the guest checks that it negotiated the layout it was given).
		r := newMigRun(t, q, dir, sum, q.major >= 10)
		r.boot(a)
		r.migrateRounds(rounds, b, a) // ends with fio and the kernel log checked, before the broken logger
		goodHeld := r.heldRounds
		// Away from vublk C, which leaves read data out of the dirty log: a try counts when the
		// guest's reads were all done inside the migration, and one must fail the checksum.
		caught, tries := false, 0
		for try := 0; try < migBrokenTries && !caught; try++ {
			r.migrate(c, "go")
			res := r.migrate(a, "go")
			if r.lastHeld {
				tries++
				caught = strings.HasPrefix(res, "FAIL")
			}
			t.Logf("migration away from vublk without data logging (try %d, reads held inside it: %v): %s", try+1, r.lastHeld, res)
		}
		r.finish()
		r.check(t, "vublk")
		if goodHeld < rounds/2 {
			t.Errorf("only %d of %d migrations between good back-ends held the guest's reads inside them", goodHeld, rounds)
		}
		skipped := hookSkippedPages(c.logs())
		switch {
		case skipped == 0:
			t.Errorf("vublk C logged no pages of read data left out of the dirty log: the test hook did not act")
		case tries == 0:
			t.Errorf("no migration away from the vublk that does not log read data held the guest's reads inside it in %d tries", migBrokenTries)
		case !caught:
			t.Errorf("no migration away from the vublk that does not log read data failed the guest's checksum (%d tries, %d pages left out of the log): the check cannot catch a broken logger", tries, skipped)
		default:
			t.Logf("the guest's checksum caught the vublk that left %d pages of read data out of the dirty log", skipped)
		}
		vublkTimes := r.times
		if os.Getenv("MIG_CONSOLE") != "" {
			t.Logf("console:\n%s", r.console.String())
		}

		// The same guest between two qemu-storage-daemons: the reference back-end's figures.
		qa := startQSD(t, q, filepath.Join(dir, "qsd-a.sock"), img)
		qb := startQSD(t, q, filepath.Join(dir, "qsd-b.sock"), img)
		rq := newMigRun(t, q, dir, sum, false) // qemu-storage-daemon's vhost-user-blk export offers no packed rings
		rq.boot(qa)
		rq.migrateRounds(migQSDRounds, qb, qa)
		rq.finish()
		rq.check(t, "qemu-storage-daemon")
		t.Logf("%s, %s guest, %d vCPUs, vublk on %s rings: migration times from query-migrate, median (min-max) in ms\n%s",
			q.version, r.mem, 2, map[bool]string{true: "packed", false: "split"}[r.packed],
			migTable(map[string][]migTimes{"vublk": vublkTimes, "qemu-storage-daemon": rq.times}))
	})
}

// hookSkippedPages adds up the pages a vublk with the test hook VUBLK_TESTHOOK_NO_DATA_LOG says
// it left out of the dirty log (one log line each time logging stops).
func hookSkippedPages(log string) int {
	n := 0
	for _, m := range regexp.MustCompile(`test hook: pages of read data left out of the dirty log.* pages=([0-9]+)`).FindAllStringSubmatch(log, -1) {
		k, _ := strconv.Atoi(m[1])
		n += k
	}
	return n
}

// writeMigImage writes the image: zeros, and random data in the region the guest checksums;
// it returns the region's checksum (POSIX cksum, as the guest computes it).
func writeMigImage(t *testing.T, img string) string {
	t.Helper()
	region := make([]byte, migRegionMiB<<20)
	rand.Read(region)
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(migDiskSize); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(region, migRegionOff<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	cksum := exec.Command("cksum")
	cksum.Stdin = bytes.NewReader(region)
	out, err := cksum.Output()
	if err != nil {
		t.Fatalf("cksum: %v", err)
	}
	crc, _, _ := strings.Cut(string(out), " ")
	return crc
}

var hookedOnce struct {
	sync.Once
	path string
	err  error
}

// buildHookedVublk builds vublk with the test hooks (-tags vublk_testhooks), once.
func buildHookedVublk(t *testing.T) string {
	t.Helper()
	hookedOnce.Do(func() {
		hookedOnce.path = filepath.Join(env.work, "vublk-testhooks")
		if err := buildvublk.Build(hookedOnce.path, "vublk_testhooks"); err != nil {
			hookedOnce.err = fmt.Errorf("building vublk with test hooks: %w", err)
		}
	})
	if hookedOnce.err != nil {
		t.Fatal(hookedOnce.err)
	}
	return hookedOnce.path
}

// migBackend is a back-end process serving the image on a socket.
type migBackend struct {
	name   string
	socket string
	broken bool // does not log read data (test hook)
	cmd    *exec.Cmd
	mu     sync.Mutex
	log    bytes.Buffer
	done   chan struct{}
}

func (b *migBackend) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.log.Write(p)
}

func (b *migBackend) logs() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.log.String()
}

// startBackend runs cmd and waits until socket accepts connections; the process is stopped
// (SIGTERM, then SIGKILL) when the test ends, and its log is printed if the test failed.
func startBackend(t *testing.T, name, socket string, cmd *exec.Cmd) *migBackend {
	t.Helper()
	b := &migBackend{name: name, socket: socket, cmd: cmd, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = b, b
	if dir := os.Getenv("MIG_DEBUG_DIR"); dir != "" { // keep the logs, for debugging by hand
		if f, err := os.Create(filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".log")); err == nil {
			cmd.Stdout, cmd.Stderr = io.MultiWriter(b, f), io.MultiWriter(b, f)
			t.Cleanup(func() { f.Close() })
		}
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { cmd.Wait(); close(b.done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-b.done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-b.done
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", name, b.logs())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return b
		}
		select {
		case <-b.done:
			t.Fatalf("%s exited before it listened:\n%s", name, b.logs())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not listen on %s:\n%s", name, socket, b.logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startMigVublk runs vublk serve of the binary bin (extra environment environ) with args (the
// store and its options).
func startMigVublk(t *testing.T, bin string, environ []string, socket, name string, args ...string) *migBackend {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"serve", "--socket-path", socket, "--name", name,
		"--serial", "vublk-migration", "--log-level", "debug"}, args...)...)
	cmd.Env = append(os.Environ(), environ...)
	return startBackend(t, "vublk "+name, socket, cmd)
}

// startQSD serves img with the qemu-storage-daemon of q's version (the host's 7.2 next to
// QEMU 7.2, the Debian 13 root's next to QEMU 10.0). Two of them share the image: no locking.
func startQSD(t *testing.T, q *qemuBinary, socket, img string) *migBackend {
	t.Helper()
	cmd := q.command("qemu-storage-daemon",
		"--blockdev", "driver=file,node-name=file0,filename="+img+",cache.direct=off,locking=off",
		"--export", "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path="+socket+",writable=on,num-queues=2")
	return startBackend(t, "qemu-storage-daemon "+filepath.Base(socket), socket, cmd)
}

// migVM is one QEMU process of the run.
type migVM struct {
	n       int
	backend *migBackend
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	qmp     *qmpClient
	exited  chan struct{}
}

// migTimes are one migration's figures from query-migrate.
type migTimes struct {
	total, downtime, setup float64 // ms
}

// migRun drives one guest through its migrations.
type migRun struct {
	t        *testing.T
	q        *qemuBinary
	dir      string
	mem      string // the guest's memory (migMemFor)
	packed   bool   // the guest's disk has packed=on
	params   map[string]string
	lines    chan string
	vms      int
	cur      *migVM
	round    int
	ready    int // the last round the guest is ready for (E2E mig-ready N)
	readDone int // the last round the guest read its region in (E2E mig-read-done N)
	// heldRounds counts the rounds whose reads were all done between QEMU's first pass over
	// memory and the switch-over; lastHeld says whether the last round's were.
	heldRounds int
	lastHeld   bool
	results    map[string]string // mig_N, mig_fio, mig_dmesg -> "ok ..." / "FAIL ..."
	order      []string
	done       bool
	times      []migTimes
	console    bytes.Buffer
}

// newMigRun prepares a guest that checksums its region against sum, with its disk on packed
// rings if packed.
func newMigRun(t *testing.T, q *qemuBinary, dir, sum string, packed bool) *migRun {
	return &migRun{t: t, q: q, dir: dir, mem: migMemFor(q), packed: packed, lines: make(chan string, 1024), results: map[string]string{},
		params: map[string]string{
			"phase": "migrate", "mig_off": strconv.Itoa(migRegionOff), "mibs": strconv.Itoa(migRegionMiB), "sum": sum,
			"packed": map[bool]string{true: "1", false: "0"}[packed],
		}}
}

// start runs a QEMU on backend b; with incoming it waits for a migration on that socket.
func (r *migRun) start(b *migBackend, incoming string) *migVM {
	t := r.t
	t.Helper()
	r.vms++
	v := &migVM{n: r.vms, backend: b, exited: make(chan struct{})}
	var cmdline []string
	for k, val := range r.params {
		cmdline = append(cmdline, "vublk."+k+"="+val)
	}
	sort.Strings(cmdline)
	qmpSock := filepath.Join(r.dir, fmt.Sprintf("qmp-%d.sock", v.n))
	args := []string{
		"-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", r.mem,
		"-object", "memory-backend-memfd,id=mem,size=" + r.mem + ",share=on", "-numa", "node,memdev=mem",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", env.kernel, "-initrd", env.initramfs,
		// init_on_alloc=0: the kernel does not zero the page cache pages it allocates, which
		// would make them dirty for QEMU just before the back-end fills them and hide most
		// writes a back-end does not log. init_on_free=1: it zeroes the pages it frees instead,
		// before the migration, so the pages the region lands in hold zeros when QEMU sends
		// them, and free memory goes as zero pages (a quicker first pass).
		"-append", "console=ttyS0 panic=-1 loglevel=4 init_on_alloc=0 init_on_free=1 " + strings.Join(cmdline, " "),
		"-chardev", "socket,id=disk0,path=" + b.socket,
		"-device", "vhost-user-blk-pci,chardev=disk0,num-queues=2,packed=" + map[bool]string{true: "on", false: "off"}[r.packed],
		"-qmp", "unix:" + qmpSock + ",server=on,wait=off",
	}
	if incoming != "" {
		args = append(args, "-incoming", "unix:"+incoming)
	}
	v.cmd = r.q.command("qemu-system-x86_64", args...)
	var err error
	if v.stdin, err = v.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := v.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	v.cmd.Stderr = v.cmd.Stdout
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("starting QEMU: %v", err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			r.lines <- fmt.Sprintf("%d %s", v.n, strings.TrimRight(sc.Text(), "\r"))
		}
		v.cmd.Wait()
		close(v.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-v.exited:
		default:
			v.cmd.Process.Kill()
			<-v.exited
		}
	})
	if v.qmp, err = dialQMP(qmpSock, v.exited); err != nil {
		t.Fatalf("QEMU %d on %s: %v\n%s", v.n, b.name, err, r.console.String())
	}
	t.Cleanup(func() { v.qmp.close() })
	return v
}

// boot starts the guest on b.
func (r *migRun) boot(b *migBackend) {
	r.cur = r.start(b, "")
	r.waitFor("mig-ready 1", 5*time.Minute, func() bool { return r.ready >= 1 })
}

// waitFor handles console lines (recording the guest's results) until cond holds.
func (r *migRun) waitFor(what string, timeout time.Duration, cond func() bool) {
	t := r.t
	t.Helper()
	deadline := time.After(timeout)
	for !cond() {
		var died chan struct{} // the guest's back-end exited (qemu-storage-daemon 7.2 once did, in a vu_panic)
		if r.cur != nil {
			died = r.cur.backend.done
		}
		select {
		case l := <-r.lines:
			r.handleLine(l)
		case <-died:
			r.drain()
			t.Fatalf("round %d: waiting for %s: the guest's back-end %s exited:\n%s\nconsole (QEMU number first):\n%s",
				r.round, what, r.cur.backend.name, r.cur.backend.logs(), lastLines(r.console.String(), 40))
		case <-deadline:
			t.Fatalf("round %d: no %s within %v; console (QEMU number first):\n%s", r.round, what, timeout, r.console.String())
		}
	}
}

// handleLine keeps a console line and records what the guest reported in it.
func (r *migRun) handleLine(l string) {
	_, line, _ := strings.Cut(l, " ")
	r.console.WriteString(time.Now().Format("15:04:05.000 ") + l + "\n")
	if rest, ok := strings.CutPrefix(line, "E2E "); ok {
		r.record(rest)
	}
}

func (r *migRun) record(rest string) {
	kind, rest, _ := strings.Cut(rest, " ")
	name, detail, _ := strings.Cut(rest, " ")
	switch kind {
	case "ok", "FAIL":
		if _, dup := r.results[name]; !dup {
			r.order = append(r.order, name)
		}
		r.results[name] = kind + " " + detail
	case "done":
		r.done = true
	case "mig-ready":
		r.ready, _ = strconv.Atoi(name)
	case "mig-read-done":
		r.readDone, _ = strconv.Atoi(name)
	}
}

// migStatus is what the test reads of query-migrate.
type migStatus struct {
	Status    string  `json:"status"`
	TotalTime float64 `json:"total-time"`
	Downtime  float64 `json:"downtime"`
	SetupTime float64 `json:"setup-time"`
	ErrorDesc string  `json:"error-desc"`
	RAM       struct {
		DirtySyncCount int `json:"dirty-sync-count"`
	} `json:"ram"`
}

// queryMigrate polls the source's query-migrate until done(status) holds; a failed migration
// fails the test.
func (r *migRun) queryMigrate(src *migVM, what string, done func(*migStatus) bool) migStatus {
	t := r.t
	t.Helper()
	start := time.Now()
	for {
		var st migStatus
		raw, err := src.qmp.execute("query-migrate", nil)
		if err != nil {
			t.Fatalf("round %d: query-migrate: %v", r.round, err)
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			t.Fatalf("round %d: query-migrate: %v: %s", r.round, err, raw)
		}
		if done(&st) {
			return st
		}
		if st.Status == "failed" || st.Status == "cancelled" || time.Since(start) > 3*time.Minute {
			t.Fatalf("round %d: migration from %s, waiting for %s: %s %s", r.round, src.backend.name, what, st.Status, st.ErrorDesc)
		}
		r.handleLines(50 * time.Millisecond)
	}
}

// handleLines handles the console lines that arrive within d.
func (r *migRun) handleLines(d time.Duration) {
	deadline := time.After(d)
	for {
		select {
		case l := <-r.lines:
			r.handleLine(l)
		case <-deadline:
			return
		}
	}
}

// The migration parameters of a round's phases. QEMU switches over once what is left to send
// would go within downtime-limit at the bandwidth it measured. While QEMU sends memory the first
// time and the guest reads its region, the limit is 1 ms and the bandwidth is capped below the
// rate at which the guest's dirtier rewrites its pages (guest.sh phase_migrate), so that what is
// left to send never shrinks to nothing; then the guest stops its dirtier, and the limits are
// QEMU's default downtime and a bandwidth a unix socket does not reach.
var (
	migHoldParams = map[string]any{"downtime-limit": 1, "max-bandwidth": migHoldBandwidth}
	migEndParams  = map[string]any{"downtime-limit": 300, "max-bandwidth": 1 << 30}
)

const migHoldBandwidth = 48 << 20

// setMigParams sets migration parameters on v.
func (r *migRun) setMigParams(v *migVM, p map[string]any) {
	t := r.t
	t.Helper()
	if _, err := v.qmp.execute("migrate-set-parameters", p); err != nil {
		t.Fatalf("round %d: migrate-set-parameters %v: %v", r.round, p, err)
	}
}

// migrate moves the guest to a new QEMU on dst while the guest reads its region, then sends it
// cmd, and returns the guest's result for the round. The guest reads the region into its page
// cache once QEMU has sent all of memory once, and the migration is held from converging until
// the reads are done: a page the back-end fills then reaches the destination right only if the
// back-end logged it.
func (r *migRun) migrate(dst *migBackend, cmd string) string {
	t := r.t
	t.Helper()
	r.round++
	began := time.Now()
	sock := filepath.Join(r.dir, fmt.Sprintf("mig-%d.sock", r.round))
	src := r.cur
	dv := r.start(dst, sock)
	r.waitFor(fmt.Sprintf("mig-ready %d", r.round), 5*time.Minute, func() bool { return r.ready >= r.round })
	r.setMigParams(src, migHoldParams)
	start := time.Now()
	if _, err := src.qmp.execute("migrate", map[string]any{"uri": "unix:" + sock}); err != nil {
		t.Fatalf("round %d: migrate from %s to %s: %v", r.round, src.backend.name, dst.name, err)
	}
	// Until the outgoing migration has set itself up, a QEMU that came in by migration reports
	// its incoming one: "completed", without times.
	completed := func(st *migStatus) bool { return st.Status == "completed" && st.TotalTime > 0 }
	// Sync 1 starts the migration with every page dirty; sync 2 comes once all were sent.
	st := r.queryMigrate(src, "the first pass over memory", func(st *migStatus) bool {
		return completed(st) || st.Status == "active" && st.RAM.DirtySyncCount >= 2
	})
	held := !completed(&st)
	if _, err := io.WriteString(src.stdin, "read\n"); err != nil {
		t.Fatalf("round %d: writing to the guest's console: %v", r.round, err)
	}
	if held {
		st = r.queryMigrate(src, "the guest's reads", func(st *migStatus) bool { return completed(st) || r.readDone >= r.round })
		held = !completed(&st)
	}
	r.lastHeld = held
	if held {
		r.heldRounds++
		r.setMigParams(src, migEndParams)
	}
	st = r.queryMigrate(src, "the end of the migration", completed)
	r.times = append(r.times, migTimes{total: st.TotalTime, downtime: st.Downtime, setup: st.SetupTime})
	for {
		raw, err := dv.qmp.execute("query-status", nil)
		if err != nil {
			t.Fatalf("round %d: destination query-status: %v", r.round, err)
		}
		var s struct {
			Status string `json:"status"`
		}
		json.Unmarshal(raw, &s)
		if s.Status == "running" {
			break
		}
		if time.Since(start) > 3*time.Minute {
			t.Fatalf("round %d: the destination is %q, not running", r.round, s.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
	src.qmp.execute("quit", nil)
	select {
	case <-src.exited:
	case <-time.After(30 * time.Second):
		t.Errorf("round %d: the source QEMU did not quit", r.round)
		src.cmd.Process.Kill()
	}
	r.cur = dv
	if _, err := io.WriteString(dv.stdin, cmd+"\n"); err != nil {
		r.drain()
		t.Fatalf("round %d: writing to the guest's console: %v; console:\n%s", r.round, err, r.console.String())
	}
	r.console.WriteString(time.Now().Format("15:04:05.000 ") + fmt.Sprintf("host: round %d switched over after %.1f s (started %.1f s in)\n", r.round, time.Since(start).Seconds(), start.Sub(began).Seconds()))
	name := fmt.Sprintf("mig_%d", r.round)
	r.waitFor(name, 2*time.Minute, func() bool { return r.results[name] != "" })
	t.Logf("round %d (%.0f s): %s -> %s (%s logging): total %.0f ms, downtime %.0f ms, reads held in the migration: %v, guest: %s", r.round, time.Since(began).Seconds(),
		src.backend.name, dst.name, map[bool]string{true: "no data", false: "full"}[src.backend.broken], st.TotalTime, st.Downtime, held, r.results[name])
	// The checksum must have come from the page cache the migration brought over.
	if m := regexp.MustCompile(`buffers_kb=([0-9]+)`).FindStringSubmatch(r.results[name]); m == nil {
		t.Errorf("round %d: the guest did not say how much of its page cache holds the disk: %s", r.round, r.results[name])
	} else if kb, _ := strconv.Atoi(m[1]); kb < migRegionMiB<<10 {
		t.Errorf("round %d: the guest's page cache held %d KiB of the disk at the checksum, less than its %d MiB region: %s", r.round, kb, migRegionMiB, r.results[name])
	}
	if !src.backend.broken && !strings.HasPrefix(r.results[name], "ok") {
		t.Errorf("round %d from %s: %s; console:\n%s", r.round, src.backend.name, r.results[name], lastLines(r.console.String(), 40))
	}
	return r.results[name]
}

// migrateRounds migrates the guest n times, to first, second, first..., and stops fio and checks
// it and the guest's kernel log after the last.
func (r *migRun) migrateRounds(n int, first, second *migBackend) {
	r.t.Helper()
	for i := range n {
		dst := first
		if i%2 == 1 {
			dst = second
		}
		cmd := "go"
		if i == n-1 {
			cmd = "fio"
		}
		r.migrate(dst, cmd)
	}
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// drain handles the console lines that arrived, for a failure message.
func (r *migRun) drain() {
	for {
		select {
		case l := <-r.lines:
			r.console.WriteString(time.Now().Format("15:04:05.000 ") + l + "\n")
		case <-time.After(500 * time.Millisecond):
			return
		}
	}
}

// finish ends the guest's phase on its current QEMU (one more round without a migration) and
// waits for QEMU to exit.
func (r *migRun) finish() {
	t := r.t
	t.Helper()
	r.waitFor("the last round", 5*time.Minute, func() bool { return r.ready > r.round })
	io.WriteString(r.cur.stdin, "end\n")
	r.waitFor("the end of the phase", 5*time.Minute, func() bool { return r.done })
	select {
	case <-r.cur.exited:
	case <-time.After(time.Minute):
		t.Errorf("QEMU did not exit after the guest powered off")
	}
}

// check reports what the guest found apart from the rounds (checked in migrate): fio, the
// kernel log.
func (r *migRun) check(t *testing.T, what string) {
	t.Helper()
	if !r.done {
		t.Errorf("%s: the guest did not finish its phase; console:\n%s", what, r.console.String())
	}
	for _, name := range []string{"mig_ring_packed", "mig_fio", "mig_dmesg"} {
		if res := r.results[name]; !strings.HasPrefix(res, "ok") {
			t.Errorf("%s: %s: %q", what, name, res)
		}
	}
}

// migTable formats the figures of each back-end side by side.
func migTable(runs map[string][]migTimes) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-22s %5s %24s %24s %18s\n", "back-end", "runs", "downtime", "total time", "setup")
	names := make([]string, 0, len(runs))
	for n := range runs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		ts := runs[n]
		col := func(f func(migTimes) float64) string {
			v := make([]float64, len(ts))
			for i, x := range ts {
				v[i] = f(x)
			}
			sort.Float64s(v)
			if len(v) == 0 {
				return "-"
			}
			return fmt.Sprintf("%.0f (%.0f-%.0f)", v[len(v)/2], v[0], v[len(v)-1])
		}
		fmt.Fprintf(&b, "%-22s %5d %24s %24s %18s\n", n, len(ts),
			col(func(m migTimes) float64 { return m.downtime }),
			col(func(m migTimes) float64 { return m.total }),
			col(func(m migTimes) float64 { return m.setup }))
	}
	return b.String()
}

// qmpClient is a minimal QMP client: one command at a time, events skipped.
type qmpClient struct {
	conn net.Conn
	r    *bufio.Reader
}

// dialQMP connects to QEMU's QMP socket once it exists and negotiates capabilities.
func dialQMP(path string, exited <-chan struct{}) (*qmpClient, error) {
	deadline := time.Now().Add(60 * time.Second)
	var conn net.Conn
	for {
		var err error
		if conn, err = net.Dial("unix", path); err == nil {
			break
		}
		select {
		case <-exited:
			return nil, errors.New("QEMU exited before its QMP socket was up")
		default:
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("QMP socket %s: %w", path, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := &qmpClient{conn: conn, r: bufio.NewReader(conn)}
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.r.ReadBytes('\n'); err != nil { // the greeting
		conn.Close()
		return nil, fmt.Errorf("QMP greeting: %w", err)
	}
	if _, err := c.execute("qmp_capabilities", nil); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// execute runs one command and returns its "return" value.
func (c *qmpClient) execute(cmd string, args any) (json.RawMessage, error) {
	c.conn.SetDeadline(time.Now().Add(60 * time.Second))
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, _ := json.Marshal(req)
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		line, err := c.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class, Desc string
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("QMP %s: %w: %s", cmd, err, line)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s: %s", cmd, resp.Error.Class, resp.Error.Desc)
		default:
			return resp.Return, nil
		}
	}
}

func (c *qmpClient) close() { c.conn.Close() }
