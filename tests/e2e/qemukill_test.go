//go:build e2e

package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestFrontendRestarts kills QEMU with SIGKILL in the middle of the guest's I/O and starts it
// again, frontendKills times, against the same running vublk. Before each kill the guest writes
// 1 MiB of its own and flushes it (dd conv=fsync: the kernel sends VIRTIO_BLK_T_FLUSH); then it
// keeps 64 random writes in flight when the host kills it. Every later boot reads back every
// region flushed so far. After each disconnect vublk must be back to the file descriptors it had
// before the first connection, with none of the guest's memory still mapped.
func TestFrontendRestarts(t *testing.T) { forEachQEMU(t, testFrontendRestarts) }

func testFrontendRestarts(t *testing.T, q *qemuBinary) {
	// 20 kills on the host's QEMU (the count issue 5 asked for), 10 on the others of the matrix:
	// the same code path, and half the test time.
	frontendKills := 20
	if len(q.prefix) > 0 {
		frontendKills = 10
	}
	if n, err := strconv.Atoi(os.Getenv("VUBLK_E2E_FRONTEND_KILLS")); err == nil && n > 0 {
		frontendKills = n // for a quicker run by hand
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	sock := filepath.Join(dir, "rw.sock")
	d := startVublk(t, sock, "--blk-file", img, "--size", "1G", "--lanes", "4", "--name", "rw")
	pid := d.cmd.Process.Pid
	baseline, err := openFds(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("vublk has %d open descriptors before the first connection", len(baseline))

	var sums []string // md5 of the region each killed guest flushed
	maxFds := 0
	for i := 0; i <= frontendKills; i++ {
		final := i == frontendKills
		params := map[string]string{
			"phase": "qemukill", "size": strconv.Itoa(diskSize), "iter": strconv.Itoa(i),
			"sums": strings.Join(append([]string{"none"}, sums...), ","),
		}
		b := boot{qemu: q, disks: []disk{{socket: sock, numQueues: 2}}, params: params, timeout: 3 * time.Minute}
		if final {
			params["final"] = "1"
		} else {
			b.killOn = "E2E qemukill-busy"
			b.killAfter = time.Duration(50+rand.IntN(700)) * time.Millisecond
		}
		started := time.Now()
		v := bootGuest(t, b)
		if final {
			v.expectChecks(t, "qemukill", []string{"size", "qk_verify"})
			break
		}
		for _, name := range []string{"size", "qk_verify", "qk_write", "qk_flushed"} {
			if res := v.results[name]; !strings.HasPrefix(res, "ok") {
				t.Fatalf("boot %d: check %s: %q; console:\n%s", i+1, name, res, v.console.String())
			}
		}
		if !strings.Contains(v.console.String(), "E2E qemukill-busy") {
			t.Fatalf("boot %d: the guest never started its background I/O", i+1)
		}
		if v.done != "" {
			t.Fatalf("boot %d: the guest finished before it was killed", i+1)
		}
		sums = append(sums, strings.TrimPrefix(v.results["qk_flushed"], "ok "))
		t.Logf("boot %d (%.1f s): %s; QEMU killed %v after the background I/O started",
			i+1, time.Since(started).Seconds(), v.results["qk_verify"], b.killAfter)

		// The connection is released once its requests drained: the descriptors must be back to
		// the baseline, and no guest memory may stay mapped.
		waitLogCount(t, d, "connection released: requests drained, memory unmapped, descriptors closed", i+1, time.Minute)
		fds, err := openFds(pid)
		if err != nil {
			t.Fatal(err)
		}
		maxFds = max(maxFds, len(fds))
		if extra := diffFds(baseline, fds); len(extra) > 0 {
			t.Errorf("after kill %d vublk has %d descriptors, %d at the start; new: %v", i+1, len(fds), len(baseline), extra)
		}
		if n, err := memfdMappings(pid); err != nil || n != 0 {
			t.Errorf("after kill %d vublk still maps %d memfd regions of the dead guest (%v)", i+1, n, err)
		}
	}
	t.Logf("QEMU killed mid-I/O and restarted %d times; each boot verified every region flushed before (%d regions at the end); vublk's descriptors: %d at the start, at most %d after a disconnect",
		frontendKills, len(sums), len(baseline), maxFds)
	stats, err := d.stop()
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := stats["flush_errors"].(float64); n != 0 {
		t.Errorf("vublk counted %v flush errors", n)
	}
	t.Logf("vublk: %v", stats)
}

// openFds maps each open descriptor of process pid to what it refers to.
func openFds(pid int) (map[string]string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	fds := map[string]string{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		fds[e.Name()] = target
	}
	return fds, nil
}

// diffFds lists the descriptors in now that were not open, as the same thing, in base.
func diffFds(base, now map[string]string) []string {
	var extra []string
	for fd, target := range now {
		if base[fd] != target {
			extra = append(extra, fd+" -> "+target)
		}
	}
	return extra
}

// memfdMappings counts the mappings of memfd files (a guest's memory) in process pid.
func memfdMappings(pid int) (int, error) {
	maps, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return 0, err
	}
	n := 0
	for _, line := range strings.Split(string(maps), "\n") {
		if strings.Contains(line, "/memfd:") {
			n++
		}
	}
	return n, nil
}

// waitLogCount waits until the daemon has logged msg at least n times.
func waitLogCount(t *testing.T, d *daemon, msg string, n int, timeout time.Duration) {
	t.Helper()
	for start := time.Now(); d.countLogs(msg) < n; time.Sleep(20 * time.Millisecond) {
		if time.Since(start) > timeout {
			t.Fatalf("vublk logged %q %d times within %v, want %d", msg, d.countLogs(msg), timeout, n)
		}
	}
}

// TestGuestReboot: the guest writes, flushes and reboots itself with reboot -f. QEMU resets the
// machine, the driver resets the device (vublk stops and restarts the rings on the same
// connection), and the second boot of the same VM reads the data back and writes again. vublk
// runs here with the other I/O path, io_uring over an O_DIRECT file, so that a real guest
// exercises it too, and on packed rings (packed=on): the driver's reset of a packed ring, and the
// second boot negotiating it again.
func TestGuestReboot(t *testing.T) { forEachQEMU(t, testGuestReboot) }

func testGuestReboot(t *testing.T, q *qemuBinary) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "rw.sock")
	d := startVublk(t, sock, "--blk-file", filepath.Join(dir, "disk.img"), "--size", "1G", "--name", "rw",
		"--io-engine", "uring", "--direct", "--packed-ring")
	if ready := d.lastLog("export ready", "rw"); ready == nil || ready["io_engine"] != "uring" || ready["direct"] != true {
		t.Fatalf("vublk did not start with io_uring and O_DIRECT: %v", ready)
	}
	v := bootGuest(t, boot{
		qemu:    q,
		disks:   []disk{{socket: sock, numQueues: 2, deviceOpts: "packed=on"}},
		params:  map[string]string{"phase": "reboot", "size": strconv.Itoa(diskSize)},
		timeout: 3 * time.Minute,
		reboot:  true,
	})
	v.expectChecks(t, "reboot", []string{"size", "reboot_packed", "reboot_write", "reboot_first", "reboot_second", "reboot_data", "reboot_write_again"})
	if n := strings.Count(v.console.String(), "E2E ok size"); n != 2 {
		t.Errorf("the guest booted %d times, want 2", n)
	}
	if n := d.countLogs("front-end connected"); n != 1 {
		t.Errorf("QEMU connected %d times, want once: a reboot keeps the connection", n)
	}
	stats, err := d.stop()
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := stats["errors"].(float64); n != 0 {
		t.Errorf("vublk counted %v errors", n)
	}
	t.Logf("vublk: %v", stats)
}
