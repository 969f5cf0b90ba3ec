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
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

//go:embed guest.sh
var guestInit []byte

// guestModules are the modules the guest loads, with their dependencies resolved from modules.dep.
// crc32c_generic is ext4's and jbd2's soft dependency (their checksums use the crypto API).
var guestModules = []string{"virtio_pci", "virtio_blk", "crc32c_generic", "ext4"}

// guestTools are host binaries copied into the initramfs with the shared libraries they need.
var guestTools = []string{"fio", "mke2fs", "e2fsck", "blkdiscard"}

// env is what every test in the package shares: built once in TestMain.
var env struct {
	root      string // the repository
	work      string // scratch directory for the whole run
	vublk     string // the binary under test
	kernel    string // vmlinuz
	initramfs string
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
	if env.work, err = os.MkdirTemp("", "vublk-e2e-"); err != nil {
		return 0, err
	}
	env.vublk = filepath.Join(env.work, "vublk")
	build := exec.Command("go", "build", "-o", env.vublk, "./cmd/vublk")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return 0, fmt.Errorf("building vublk: %v\n%s", err, out)
	}
	kroot := filepath.Join(root, ".cache", "kernel", "root")
	kernels, _ := filepath.Glob(filepath.Join(kroot, "boot", "vmlinuz-*"))
	if len(kernels) == 0 {
		return 0, fmt.Errorf("no guest kernel under %s: run `make deps`", kroot)
	}
	sort.Strings(kernels)
	env.kernel = kernels[len(kernels)-1]
	kver := strings.TrimPrefix(filepath.Base(env.kernel), "vmlinuz-")
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
	busybox, err := exec.LookPath("busybox")
	if err != nil {
		return fmt.Errorf("busybox-static is not installed (make deps): %w", err)
	}
	if err := copyFile(busybox, filepath.Join(tree, "bin", "busybox"), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tree, "init"), guestInit, 0o755); err != nil {
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
	numQueues int
	reconnect bool // QEMU reconnects to a back-end that went away (-chardev socket,reconnect=1)
}

// boot describes one guest run.
type boot struct {
	disks   []disk            // vda, vdb, ...
	params  map[string]string // vublk.* kernel parameters for guest.sh
	timeout time.Duration
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
	for i, d := range b.disks {
		id := fmt.Sprintf("vublk%d", i)
		chardev := "socket,id=" + id + ",path=" + d.socket
		if d.reconnect {
			chardev += ",reconnect=1"
		}
		args = append(args, "-chardev", chardev,
			"-device", fmt.Sprintf("vhost-user-blk-pci,chardev=%s,num-queues=%d", id, d.numQueues))
	}
	v := &vm{cmd: exec.Command("qemu-system-x86_64", args...), results: map[string]string{}}
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
		t.Run(name, func(t *testing.T) {
			res, ok := v.results[name]
			switch {
			case !ok:
				t.Errorf("the guest did not report %s", name)
			case strings.HasPrefix(res, "FAIL"):
				t.Errorf("%s: %s", name, res)
			default:
				t.Logf("%s: %s", name, res)
			}
		})
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
