//go:build e2e

// Package e2e runs vublk against real QEMU with a real Linux guest. It needs what `make deps`
// installs: qemu-system-x86, busybox-static, fio, e2fsprogs, cpio, and the Debian guest kernel
// unpacked under .cache/kernel. Run it with `make e2e` (go test -tags e2e ./tests/e2e/).
package e2e

import (
	"bufio"
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/tests/internal/buildvublk"
)

//go:embed guest.sh
var guestInit []byte

// guestModules are the modules the guest loads, with their dependencies resolved from modules.dep.
// crc32c_generic is ext4's and jbd2's soft dependency (their checksums use the crypto API).
var guestModules = []string{"virtio_pci", "virtio_blk", "crc32c_generic", "ext4"}

// guestTools are host binaries copied into the initramfs with the shared libraries they need.
var guestTools = []string{"fio", "mke2fs", "e2fsck", "blkdiscard", "cksum"}

// env is what every test in the package shares: built once in TestMain.
var env struct {
	root      string // the repository
	work      string // scratch directory for the whole run, under /tmp (see qemuBinary)
	vublk     string // the binary under test
	kernel    string // vmlinuz, copied into work
	initramfs string
}

// qemuBinary is one front-end of the matrix every real-guest test runs on: the host's QEMU
// (Debian 12: 7.2) and the Debian 13 root's (10.0), which runs chrooted through
// scripts/trixie-run with the host's /tmp bound in. Every path handed to QEMU must therefore be
// under /tmp: env.work, and t.TempDir() (TMPDIR is env.work).
type qemuBinary struct {
	name    string   // subtest name: qemu7.2, qemu10.0
	version string   // what `qemu-system-x86_64 --version` printed
	prefix  []string // what runs the binary: nothing for the host's, trixie-run for Debian 13's
	major   int
}

// qemus are the front-ends of the matrix, found in TestMain. VUBLK_E2E_QEMU=7.2 (or 10.0) keeps
// one, for a quicker run by hand.
var qemus []*qemuBinary

// command runs this QEMU's program (qemu-system-x86_64, qemu-io, qemu-img,
// qemu-storage-daemon) with args.
func (q *qemuBinary) command(prog string, args ...string) *exec.Cmd {
	full := append(append(slices.Clone(q.prefix), prog), args...)
	return exec.Command(full[0], full[1:]...)
}

// reconnectOpt is the -chardev socket option that makes QEMU reconnect to a back-end that went
// away: whole seconds before QEMU 9.2, milliseconds since (reconnect= is deprecated in 10.0).
func (q *qemuBinary) reconnectOpt() string {
	if q.major >= 10 {
		return "reconnect-ms=500"
	}
	return "reconnect=1"
}

// forEachQEMU runs f as a subtest per QEMU of the matrix.
func forEachQEMU(t *testing.T, f func(t *testing.T, q *qemuBinary)) {
	t.Helper()
	for _, q := range qemus {
		t.Run(q.name, func(t *testing.T) { f(t, q) })
	}
}

// findQEMUs fills qemus: the host's QEMU, and the Debian 13 root's through scripts/trixie-run.
func findQEMUs() error {
	only := os.Getenv("VUBLK_E2E_QEMU")
	for _, prefix := range [][]string{nil, {filepath.Join(env.root, "scripts", "trixie-run")}} {
		q := &qemuBinary{prefix: prefix}
		out, err := q.command("qemu-system-x86_64", "--version").CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s: %v: %s (make deps installs both QEMUs)", strings.Join(append(prefix, "qemu-system-x86_64"), " "), err, out)
		}
		first, _, _ := strings.Cut(string(out), "\n")
		var major, minor int
		if _, err := fmt.Sscanf(first, "QEMU emulator version %d.%d", &major, &minor); err != nil {
			return fmt.Errorf("unexpected QEMU version line %q", first)
		}
		q.major, q.version = major, first
		q.name = fmt.Sprintf("qemu%d.%d", major, minor)
		if only == "" || q.name == "qemu"+only {
			qemus = append(qemus, q)
		}
	}
	if len(qemus) == 0 {
		return fmt.Errorf("VUBLK_E2E_QEMU=%s matches no QEMU", only)
	}
	return nil
}

// hostQEMU is the host's QEMU, for the tests that are not about the front-end (benchmarks).
func hostQEMU() *qemuBinary {
	for _, q := range qemus {
		if len(q.prefix) == 0 {
			return q
		}
	}
	return qemus[0]
}

func TestMain(m *testing.M) {
	code, err := setup(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
		code = 1
	}
	if env.work != "" && os.Getenv("VUBLK_E2E_KEEP") == "" {
		os.RemoveAll(env.work)
	}
	os.Exit(code)
}

func setup(m *testing.M) (int, error) {
	root, err := filepath.Abs("../..")
	if err != nil {
		return 0, err
	}
	env.root = root
	// Under /tmp, which the Debian 13 root shares; the tests' own temporary directories too.
	if env.work, err = os.MkdirTemp("/tmp", "vublk-e2e-"); err != nil {
		return 0, err
	}
	os.Setenv("TMPDIR", env.work)
	if err := findQEMUs(); err != nil {
		return 0, err
	}
	env.vublk = filepath.Join(env.work, "vublk")
	if err := buildvublk.Build(env.vublk, vublkBuildTags()); err != nil {
		return 0, fmt.Errorf("building vublk: %w", err)
	}
	kroot := filepath.Join(root, ".cache", "kernel", "root")
	kernels, _ := filepath.Glob(filepath.Join(kroot, "boot", "vmlinuz-*"))
	if len(kernels) == 0 {
		return 0, fmt.Errorf("no guest kernel under %s: run `make deps`", kroot)
	}
	sort.Strings(kernels)
	kver := strings.TrimPrefix(filepath.Base(kernels[len(kernels)-1]), "vmlinuz-")
	env.kernel = filepath.Join(env.work, "vmlinuz")
	if err := copyFile(kernels[len(kernels)-1], env.kernel, 0o644); err != nil {
		return 0, err
	}
	env.initramfs = filepath.Join(env.work, "initramfs.cpio")
	if err := buildInitramfs(env.initramfs, filepath.Join(kroot, "lib", "modules", kver)); err != nil {
		return 0, fmt.Errorf("building the initramfs: %w", err)
	}
	return m.Run(), nil
}

// buildInitramfs writes an uncompressed newc cpio archive with busybox, the guest tools and their
// libraries, the kernel modules in load order, and guest.sh as /init.
func buildInitramfs(out, moddir string) error {
	tree, err := os.MkdirTemp(env.work, "initramfs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tree)
	if err := addGuestBase(tree, guestInit); err != nil {
		return err
	}
	order, err := moduleOrder(moddir, guestModules)
	if err != nil {
		return err
	}
	var names []string
	for _, rel := range order {
		name := filepath.Base(rel)
		if err := copyFile(filepath.Join(moddir, rel), filepath.Join(tree, "modules", name), 0o644); err != nil {
			return err
		}
		names = append(names, name)
	}
	if err := os.WriteFile(filepath.Join(tree, "modules.order"), []byte(strings.Join(names, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	return writeCPIO(tree, out)
}

// addGuestBase puts what every guest's initramfs has into tree: busybox, init as /init, the
// guest tools with their libraries, and mke2fs.conf.
func addGuestBase(tree string, init []byte) error {
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return fmt.Errorf("busybox-static is not installed (make deps): %w", err)
	}
	if err := copyFile(busybox, filepath.Join(tree, "bin", "busybox"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tree, "init"), init, 0o755); err != nil {
		return err
	}
	for _, tool := range guestTools {
		path, err := exec.LookPath(tool)
		if err != nil {
			return fmt.Errorf("%s is not installed (make deps): %w", tool, err)
		}
		if err := copyWithLibs(path, tree); err != nil {
			return err
		}
	}
	if err := copyFile("/etc/mke2fs.conf", filepath.Join(tree, "etc", "mke2fs.conf"), 0o644); err != nil {
		return err
	}
	return nil
}

// writeCPIO writes tree as an uncompressed newc cpio archive to out.
func writeCPIO(tree, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	cpio := exec.Command("sh", "-c", "find . | LC_ALL=C sort | cpio --quiet -o -H newc")
	cpio.Dir = tree
	cpio.Stdout = f
	var stderr bytes.Buffer
	cpio.Stderr = &stderr
	if err := cpio.Run(); err != nil {
		return fmt.Errorf("cpio: %v: %s", err, stderr.String())
	}
	return f.Close()
}

// moduleOrder resolves want (module names) and their dependencies from modules.dep into a load
// order: every module after the modules it depends on.
func moduleOrder(moddir string, want []string) ([]string, error) {
	data, err := os.ReadFile(filepath.Join(moddir, "modules.dep"))
	if err != nil {
		return nil, fmt.Errorf("%w (make deps runs depmod)", err)
	}
	deps := map[string][]string{} // module path -> dependency paths
	byName := map[string]string{} // module name -> path
	for _, line := range strings.Split(string(data), "\n") {
		mod, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		deps[mod] = strings.Fields(rest)
		byName[strings.TrimSuffix(filepath.Base(mod), ".ko")] = mod
	}
	var order []string
	seen := map[string]bool{}
	var visit func(string)
	visit = func(mod string) {
		if seen[mod] {
			return
		}
		seen[mod] = true
		for _, d := range deps[mod] {
			visit(d)
		}
		order = append(order, mod)
	}
	for _, name := range want {
		mod, ok := byName[name]
		if !ok {
			return nil, fmt.Errorf("module %s not found in %s/modules.dep", name, moddir)
		}
		visit(mod)
	}
	return order, nil
}

// copyWithLibs copies an executable to /tools and the shared libraries ldd lists for it to their
// own paths.
func copyWithLibs(path, tree string) error {
	if err := copyFile(path, filepath.Join(tree, "tools", filepath.Base(path)), 0o755); err != nil {
		return err
	}
	out, err := exec.Command("ldd", path).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %w", path, err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, field := range strings.Fields(line) {
			if strings.HasPrefix(field, "/") {
				if err := copyFile(field, filepath.Join(tree, field), 0o755); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	if _, err := os.Stat(dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// daemon is a running `vublk serve` with its JSON log collected.
type daemon struct {
	t      *testing.T
	cmd    *exec.Cmd
	socket string
	mu     sync.Mutex
	logs   []map[string]any
	done   chan struct{}
	err    error // the exit status, valid after done is closed
}

// startVublk runs `vublk serve` for one export on socket and waits until it logs "export ready".
func startVublk(t *testing.T, socket string, args ...string) *daemon {
	t.Helper()
	full := append([]string{"serve", "--socket-path", socket, "--log-format", "json", "--log-level", "debug"}, args...)
	d := runDaemon(t, full, "export ready")
	d.socket = socket
	return d
}

// startService runs `vublk serve --config conf` (which must log JSON) and waits until it
// logs "vublk serving".
func startService(t *testing.T, conf string) *daemon {
	t.Helper()
	return runDaemon(t, []string{"serve", "--config", conf}, "vublk serving")
}

// runDaemon runs vublk with args and waits for the log message ready.
func runDaemon(t *testing.T, args []string, ready string) *daemon {
	t.Helper()
	d := &daemon{t: t, cmd: exec.Command(env.vublk, args...), done: make(chan struct{})}
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	readyCh := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<16), 1<<20)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			t.Logf("vublk: %s", line)
			var entry map[string]any
			if json.Unmarshal([]byte(line), &entry) != nil {
				continue
			}
			d.mu.Lock()
			d.logs = append(d.logs, entry)
			d.mu.Unlock()
			if entry["msg"] == ready {
				once.Do(func() { close(readyCh) })
			}
		}
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	select {
	case <-readyCh:
	case <-d.done:
		t.Fatalf("vublk exited before it was ready: %v", d.err)
	case <-time.After(30 * time.Second):
		d.cmd.Process.Kill()
		t.Fatal("vublk did not become ready")
	}
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
	})
	return d
}

// stop sends SIGTERM, waits for the exit and returns the fields of the last "export stopped" log.
func (d *daemon) stop() (map[string]any, error) {
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return nil, err
	}
	select {
	case <-d.done:
	case <-time.After(60 * time.Second):
		d.cmd.Process.Kill()
		return nil, fmt.Errorf("vublk did not exit within 60 s of SIGTERM")
	}
	if d.err != nil {
		return nil, fmt.Errorf("vublk exited with %v after SIGTERM", d.err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := len(d.logs) - 1; i >= 0; i-- {
		if d.logs[i]["msg"] == "export stopped" {
			return d.logs[i], nil
		}
	}
	return nil, fmt.Errorf("no \"export stopped\" log line")
}

// lastLog returns the fields of the daemon's last log entry with this message and export.
func (d *daemon) lastLog(msg, export string) map[string]any {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := len(d.logs) - 1; i >= 0; i-- {
		if d.logs[i]["msg"] == msg && d.logs[i]["export"] == export {
			return d.logs[i]
		}
	}
	return nil
}

// countLogs counts the daemon's log entries with this message.
func (d *daemon) countLogs(msg string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, e := range d.logs {
		if e["msg"] == msg {
			n++
		}
	}
	return n
}

// vm is one QEMU guest run.
type vm struct {
	cmd     *exec.Cmd
	results map[string]string // check name -> "ok ..." or "FAIL ..."
	order   []string
	done    string // phase named by "E2E done", empty if the guest did not finish
	console bytes.Buffer
	recent  []string // console lines since the last E2E line: the output of a failed check
}

// disk is a vhost-user-blk device for the guest.
type disk struct {
	socket    string
	numQueues int  // 0: QEMU's default (one per vCPU)
	reconnect bool // QEMU reconnects to a back-end that went away (qemuBinary.reconnectOpt)
	// deviceOpts are more vhost-user-blk-pci options, comma-separated (queue-size=1024,packed=on).
	deviceOpts string
}

// boot describes one guest run.
type boot struct {
	qemu      *qemuBinary       // the front-end; nil: the host's
	extraArgs []string          // more QEMU arguments (-qmp, -incoming, ...)
	disks     []disk            // vda, vdb, ...
	params    map[string]string // vublk.* kernel parameters for guest.sh
	timeout   time.Duration
	// killOn, when set, makes the host SIGKILL QEMU killAfter after the guest prints this line:
	// a VM that dies with requests in flight.
	killOn    string
	killAfter time.Duration
	// onLine, when set, sees every console line as it arrives.
	onLine func(line string)
	// reboot lets the guest reboot (QEMU resets the machine and boots it again) instead of
	// ending the run.
	reboot bool
}

// bootGuest boots the guest and collects the results of its checks.
func bootGuest(t *testing.T, b boot) *vm {
	t.Helper()
	var cmdline []string
	for k, v := range b.params {
		cmdline = append(cmdline, "vublk."+k+"="+v)
	}
	sort.Strings(cmdline)
	args := []string{
		"-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1G",
		"-object", "memory-backend-memfd,id=mem,size=1G,share=on", "-numa", "node,memdev=mem",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
		"-kernel", env.kernel, "-initrd", env.initramfs,
		"-append", "console=ttyS0 panic=-1 loglevel=4 " + strings.Join(cmdline, " "),
	}
	if !b.reboot {
		args = append(args, "-no-reboot")
	}
	q := b.qemu
	if q == nil {
		q = hostQEMU()
	}
	for i, d := range b.disks {
		id := fmt.Sprintf("vublk%d", i)
		chardev := "socket,id=" + id + ",path=" + d.socket
		if d.reconnect {
			chardev += "," + q.reconnectOpt()
		}
		dev := "vhost-user-blk-pci,chardev=" + id
		if d.numQueues > 0 {
			dev += fmt.Sprintf(",num-queues=%d", d.numQueues)
		}
		if d.deviceOpts != "" {
			dev += "," + d.deviceOpts
		}
		args = append(args, "-chardev", chardev, "-device", dev)
	}
	args = append(args, b.extraArgs...)
	v := &vm{cmd: q.command("qemu-system-x86_64", args...), results: map[string]string{}}
	stdout, err := v.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	v.cmd.Stderr = v.cmd.Stdout
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("starting QEMU: %v", err)
	}
	exited := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := strings.TrimRight(sc.Text(), "\r")
			v.console.WriteString(line + "\n")
			if rest, ok := strings.CutPrefix(line, "E2E "); ok {
				t.Logf("guest: %s", line)
				if strings.HasPrefix(rest, "FAIL") {
					for _, l := range v.recent {
						t.Logf("guest:   | %s", l)
					}
				}
				v.recent = v.recent[:0]
				v.record(rest)
			} else if len(v.recent) < 40 {
				v.recent = append(v.recent, line)
			}
			if b.onLine != nil {
				b.onLine(line)
			}
			if b.killOn != "" && line == b.killOn {
				t.Logf("killing QEMU in %v", b.killAfter)
				time.AfterFunc(b.killAfter, func() { v.cmd.Process.Kill() })
			}
		}
		exited <- v.cmd.Wait()
	}()
	select {
	case <-exited:
	case <-time.After(b.timeout):
		v.cmd.Process.Kill()
		<-exited
		t.Errorf("the guest did not finish within %v; console:\n%s", b.timeout, v.console.String())
	}
	return v
}

func (v *vm) record(rest string) {
	kind, rest, _ := strings.Cut(rest, " ")
	name, detail, _ := strings.Cut(rest, " ")
	switch kind {
	case "ok", "FAIL":
		if _, dup := v.results[name]; !dup {
			v.order = append(v.order, name)
		}
		v.results[name] = kind + " " + detail
	case "done":
		v.done = name
	}
}

// expectChecks turns the guest's results into subtests: every name in want must have passed.
func (v *vm) expectChecks(t *testing.T, phase string, want []string) {
	t.Helper()
	if v.done != phase {
		t.Errorf("guest phase %s did not finish; console:\n%s", phase, v.console.String())
	}
	for _, name := range want {
		res, ok := v.results[name]
		switch {
		case !ok:
			t.Errorf("the guest did not report %s", name)
		case strings.HasPrefix(res, "FAIL"):
			t.Errorf("%s: %s", name, res)
		}
	}
	for _, name := range v.order {
		if strings.HasPrefix(v.results[name], "FAIL") && !contains(want, name) {
			t.Errorf("unexpected failing check %s: %s", name, v.results[name])
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
