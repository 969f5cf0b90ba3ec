//go:build e2e

package e2e

import (
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// vublkBuildTags are the build tags of the vublk under test: with RBD support unless
// VUBLK_GO_TAGS says otherwise (make deps installs librbd-dev).
func vublkBuildTags() string {
	if tags, ok := os.LookupEnv("VUBLK_GO_TAGS"); ok {
		return tags
	}
	return "rbd"
}

// cephEnv is the cluster of scripts/ceph-cluster.sh (make rbd starts one for the tests).
type cephEnv struct{ conf, keyring, pool, dir string }

func needCeph(t *testing.T) cephEnv {
	t.Helper()
	c := cephEnv{conf: os.Getenv("VUBLK_CEPH_CONF"), keyring: os.Getenv("VUBLK_CEPH_KEYRING"), pool: os.Getenv("VUBLK_CEPH_POOL")}
	if c.conf == "" || c.pool == "" {
		if os.Getenv("VUBLK_CEPH_REQUIRED") != "" {
			t.Fatal("VUBLK_CEPH_CONF/VUBLK_CEPH_POOL are not set")
		}
		t.Skip("no Ceph cluster: run with make rbd, or eval $(scripts/ceph-cluster.sh start)")
	}
	c.dir = filepath.Dir(c.conf)
	return c
}

// rbd runs the rbd CLI against the cluster.
func (c cephEnv) rbd(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("rbd", append([]string{"-c", c.conf, "-k", c.keyring}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("rbd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// image is a fresh image name for this test; it is removed (with its snapshots) at the end.
func (c cephEnv) image(t *testing.T, name string) string {
	t.Helper()
	img := fmt.Sprintf("%s/e2e-%s-%d", c.pool, name, time.Now().UnixNano())
	t.Cleanup(func() {
		exec.Command("rbd", "-c", c.conf, "-k", c.keyring, "snap", "purge", "--no-progress", img).Run()
		exec.Command("rbd", "-c", c.conf, "-k", c.keyring, "rm", "--no-progress", img).Run()
	})
	return img
}

// args are vublk serve's arguments for an RBD image of this cluster.
func (c cephEnv) args(img string, more ...string) []string {
	return append([]string{"--blk-rbd", img, "--ceph-conf", c.conf, "--ceph-keyring", c.keyring}, more...)
}

// cluster runs scripts/ceph-cluster.sh on this cluster (osd-stop, osd-start).
func (c cephEnv) cluster(t *testing.T, cmd string) {
	t.Helper()
	sh := exec.Command("bash", filepath.Join(env.root, "scripts", "ceph-cluster.sh"), cmd)
	sh.Env = append(os.Environ(), "CEPH_DIR="+c.dir)
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("ceph-cluster.sh %s: %v\n%s", cmd, err, out)
	}
}

// TestRBDGuest is TestGuest's main phase on RBD: the read-write disk is an image vublk creates
// (--size), the read-only disk a snapshot of an image imported from a random file. fio verify,
// discard and write-zeroes reading back zeros, ext4 with e2fsck in the guest, the write-through
// switch; then the host exports the image and e2fsck finds it clean, the snapshot still reads
// as the file, and vublk's counters show the guest's flushes.
func TestRBDGuest(t *testing.T) { forEachQEMU(t, testRBDGuest) }

func testRBDGuest(t *testing.T, q *qemuBinary) {
	c := needCeph(t)
	dir := t.TempDir()
	img := c.image(t, "rw")
	roImg := c.image(t, "ro")
	roData := make([]byte, roDiskSize)
	rand.Read(roData)
	roFile := filepath.Join(dir, "ro.raw")
	if err := os.WriteFile(roFile, roData, 0o644); err != nil {
		t.Fatal(err)
	}
	c.rbd(t, "import", "--no-progress", roFile, roImg)
	c.rbd(t, "snap", "create", roImg+"@base")
	// The image changes after the snapshot: the guest must still see the snapshot.
	c.rbd(t, "bench", "--io-type", "write", "--io-size", "1M", "--io-total", "4M", "--io-pattern", "seq", roImg)

	rw := startVublk(t, filepath.Join(dir, "rw.sock"), c.args(img, "--size", "1G", "--serial", serial, "--lanes", "4", "--name", "rw")...)
	ro := startVublk(t, filepath.Join(dir, "ro.sock"), c.args(roImg+"@base", "--name", "ro")...)
	v := bootGuest(t, boot{qemu: q, disks: []disk{{socket: rw.socket, numQueues: 2}, {socket: ro.socket, numQueues: 1}},
		params: map[string]string{
			"phase": "main", "size": strconv.Itoa(diskSize), "serial": serial, "rosize": strconv.Itoa(roDiskSize),
		}, timeout: 15 * time.Minute})
	v.expectChecks(t, "main", []string{
		"size", "logical_block_size", "queues", "serial", "write_cache",
		"fio_randwrite_verify", "fio_seq_1m_verify",
		"discard", "discard_reads_zeros", "write_zeroes", "write_zeroes_reads_zeros",
		"cache_write_through", "write_through_io", "cache_write_back",
		"mkfs_ext4", "mount_ext4", "sync", "umount_ext4", "e2fsck_clean", "remount_ext4",
		"checksums_after_drop_caches",
		"ro_size", "ro_flag", "ro_read", "ro_write_fails",
	})
	stats, err := rw.stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("read-write export: %v", stats)
	for _, key := range []string{"flushes", "writes", "reads", "discards", "write_zeroes"} {
		if n, _ := stats[key].(float64); n <= 0 {
			t.Errorf("%s = %v, want > 0: the guest's requests did not reach vublk", key, stats[key])
		}
	}
	for _, key := range []string{"flush_errors", "errors"} {
		if n, _ := stats[key].(float64); n != 0 {
			t.Errorf("%s = %v", key, n)
		}
	}
	if _, err := ro.stop(); err != nil {
		t.Fatal(err)
	}
	// What the guest flushed is in the image: export it and check it from the host.
	out := filepath.Join(dir, "rw.raw")
	c.rbd(t, "export", "--no-progress", img, out)
	hostFsck(t, out)
	got := filepath.Join(dir, "ro-after.raw")
	c.rbd(t, "export", "--no-progress", roImg+"@base", got)
	if b, err := os.ReadFile(got); err != nil || string(b) != string(roData) {
		t.Errorf("the snapshot does not read back as imported (%v)", err)
	}
}

// restartWorkload boots a guest running the restart phase (fio randwrite with crc32c verify and
// a flush every 4 writes, plus a write-and-read-back loop) for seconds against sock, calls
// during once the workload runs, and checks that the guest saw no I/O error.
func restartWorkload(t *testing.T, q *qemuBinary, sock string, seconds int, during func()) {
	t.Helper()
	running := make(chan struct{})
	var once sync.Once
	result := make(chan *vm, 1)
	go func() {
		result <- bootGuest(t, boot{
			qemu:    q,
			disks:   []disk{{socket: sock, numQueues: 2, reconnect: true}},
			params:  map[string]string{"phase": "restart", "size": strconv.Itoa(diskSize), "seconds": strconv.Itoa(seconds)},
			timeout: 6 * time.Minute,
			onLine: func(line string) {
				if line == "E2E restart-running" {
					once.Do(func() { close(running) })
				}
			},
		})
	}()
	select {
	case <-running:
	case v := <-result:
		t.Fatalf("the guest ended before its workload started; console:\n%s", v.console.String())
	case <-time.After(5 * time.Minute):
		t.Fatal("the guest did not start its workload")
	}
	during()
	v := <-result
	v.expectChecks(t, "restart", []string{"size", "restart_dd", "restart_fio", "restart_io_errors"})
}

// TestRBDBackendRestart kills vublk (SIGKILL) serving an RBD image several times while the guest
// writes, flushes and verifies, and starts it again on the same socket and image; QEMU
// reconnects and resubmits what was in flight. The guest must see no I/O error.
func TestRBDBackendRestart(t *testing.T) { forEachQEMU(t, testRBDBackendRestart) }

func testRBDBackendRestart(t *testing.T, q *qemuBinary) {
	c := needCeph(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "rw.sock")
	args := c.args(c.image(t, "restart"), "--size", "1G", "--lanes", "4", "--name", "rw")
	d := startVublk(t, sock, args...)
	kills := 0
	restartWorkload(t, q, sock, 50, func() {
		deadline := time.Now().Add(40 * time.Second)
		for kills < 6 && time.Now().Before(deadline) {
			time.Sleep(time.Duration(1500+kills*700) * time.Millisecond)
			d.cmd.Process.Kill() // SIGKILL: requests stay in flight
			<-d.done
			kills++
			d = startVublk(t, sock, args...)
			waitLog(t, d, "front-end connected", time.Minute)
		}
	})
	t.Logf("vublk on RBD killed with SIGKILL and restarted %d times under guest I/O", kills)
	if kills < 3 {
		t.Errorf("only %d kills while the guest ran", kills)
	}
	stats, err := d.stop()
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := stats["errors"].(float64); n != 0 {
		t.Errorf("the last vublk counted %v errors", n)
	}
}

// TestRBDOSDOutage stops the cluster's only OSD for 10 s while the guest writes, flushes and
// verifies on an RBD export without rbd_timeout: the requests wait, and when the OSD is back
// they go on, with no I/O error in the guest and every verify passing. Meanwhile a file export
// of the same vublk keeps serving (the host reads and writes it through the socket).
func TestRBDOSDOutage(t *testing.T) { forEachQEMU(t, testRBDOSDOutage) }

func testRBDOSDOutage(t *testing.T, q *qemuBinary) {
	c := needCeph(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "vublk.toml")
	img := c.image(t, "outage")
	sock, fileSock := filepath.Join(dir, "rbd.sock"), filepath.Join(dir, "file.sock")
	cfg := fmt.Sprintf(`[global]
log_format = "json"
log_level = "debug"

[[export]]
name = "rbd"
socket_path = %q
rbd = %q
ceph_conf = %q
ceph_keyring = %q
size = "1G"
num_queues = 2

[[export]]
name = "file"
socket_path = %q
file = %q
size = "64M"
`, sock, img, c.conf, c.keyring, fileSock, filepath.Join(dir, "file.img"))
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startService(t, conf)
	var outage time.Duration
	restartWorkload(t, q, sock, 45, func() {
		time.Sleep(5 * time.Second)
		stopping := time.Now()
		c.cluster(t, "osd-stop")
		t0 := time.Now()
		t.Logf("OSD stopped (its shutdown took %v)", t0.Sub(stopping).Round(time.Millisecond))
		// The other export serves while the image waits.
		out, err := exec.Command(env.vublk, "bench", "--socket", fileSock, "--rw", "randrw", "--iodepth", "4",
			"--runtime", "3s", "--size", "32M", "--verify").CombinedOutput()
		if err != nil {
			t.Errorf("the file export did not serve during the outage: %v\n%s", err, out)
		}
		time.Sleep(time.Until(t0.Add(10 * time.Second)))
		c.cluster(t, "osd-start")
		outage = time.Since(t0)
		t.Logf("OSD started again after %v down", outage.Round(time.Millisecond))
	})
	if _, err := d.stop(); err != nil {
		t.Fatal(err)
	}
	stats := d.lastLog("export stopped", "rbd")
	t.Logf("rbd export: %v", stats)
	if n, _ := stats["errors"].(float64); n != 0 {
		t.Errorf("vublk counted %v errors on the RBD export", n)
	}
}

// TestRBDServiceResize serves an RBD image from a configuration file; the operator raises its
// size and reloads (SIGHUP): vublk grows the image (rbd_resize) and tells QEMU, and the guest
// sees the new capacity live and writes and reads at its new end.
func TestRBDServiceResize(t *testing.T) { forEachQEMU(t, testRBDServiceResize) }

func testRBDServiceResize(t *testing.T, q *qemuBinary) {
	c := needCeph(t)
	dir := t.TempDir()
	img := c.image(t, "resize")
	sock := filepath.Join(dir, "rbd.sock")
	conf := filepath.Join(dir, "vublk.toml")
	const size, grown = 256 << 20, 320 << 20
	write := func(size int64) {
		cfg := fmt.Sprintf(`[global]
log_format = "json"

[[export]]
name = "disk"
socket_path = %q
rbd = %q
ceph_conf = %q
ceph_keyring = %q
size = %d
resize = true
num_queues = 2
serial = "rbd-resize"
`, sock, img, c.conf, c.keyring, size)
		if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(size)
	d := startService(t, conf)
	v := bootGuest(t, boot{
		qemu:  q,
		disks: []disk{{socket: sock, numQueues: 2}},
		params: map[string]string{
			"phase": "service", "size": strconv.Itoa(size), "serial": "rbd-resize", "newsize": strconv.Itoa(grown),
		},
		timeout: 5 * time.Minute,
		onLine: func(line string) {
			if line == "E2E waiting-resize" {
				write(grown)
				d.cmd.Process.Signal(syscall.SIGHUP)
			}
		},
	})
	v.expectChecks(t, "service", []string{"size", "serial", "write", "write_disk", "read_back", "resized", "write_grown", "read_grown"})
	if d.lastLog("export resized", "disk") == nil {
		t.Error("no \"export resized\" log")
	}
	if _, err := d.stop(); err != nil {
		t.Fatal(err)
	}
	if info := c.rbd(t, "info", "--format", "json", img); !strings.Contains(info, fmt.Sprintf(`"size":%d`, grown)) {
		t.Errorf("the image was not grown to %d bytes: %s", grown, info)
	}
}

// TestRBDMigration is TestMigration's check on an RBD image: the guest migrates migRBDRounds
// times back and forth between two vublk processes serving one image (imported with rbd's
// default features, exclusive-lock among them, as a user's image would have), while it runs
// fio randwrite with crc32c verify and reads its region through its page cache inside each
// migration (held from converging until the reads are done); after each switch-over it
// checksums the region from its page cache. Every migration completes, every checksum and fio
// run is good, and the guest's kernel logs no I/O error.
func TestRBDMigration(t *testing.T) { forEachQEMU(t, testRBDMigration) }

func testRBDMigration(t *testing.T, q *qemuBinary) {
	c := needCeph(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "disk.img")
	sum := writeMigImage(t, file)
	img := c.image(t, "migration")
	c.rbd(t, "import", "--no-progress", file, img)
	os.Remove(file)
	a := startMigVublk(t, env.vublk, nil, filepath.Join(dir, "a.sock"), "a", c.args(img, "--lanes", "2")...)
	b := startMigVublk(t, env.vublk, nil, filepath.Join(dir, "b.sock"), "b", c.args(img)...)
	// Packed rings on QEMU 7.2, split rings on 10.0 (TestMigration has them the other way).
	r := newMigRun(t, q, dir, sum, q.major < 10)
	r.boot(a)
	r.migrateRounds(migRBDRounds, b, a)
	r.finish()
	r.check(t, "vublk on RBD")
	if r.heldRounds < migRBDRounds/2 {
		t.Errorf("only %d of %d migrations held the guest's reads inside them", r.heldRounds, migRBDRounds)
	}
	t.Logf("%s, %s guest, 2 vCPUs, vublk on RBD, %s rings: migration times from query-migrate, median (min-max) in ms\n%s",
		q.version, r.mem, map[bool]string{true: "packed", false: "split"}[r.packed], migTable(map[string][]migTimes{"vublk": r.times}))
}
