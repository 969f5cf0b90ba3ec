//go:build e2e

package e2e

import (
	"bytes"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

const (
	diskSize   = 1 << 30
	roDiskSize = 64 << 20
	serial     = "vublk-e2e-0123456789" // 20 bytes: the longest serial virtio-blk carries
)

// TestGuest boots a Linux guest three times against the same two vublk processes:
//
//  1. main: geometry, queues, serial, cache mode, fio verify, discard, write-zeroes, ext4, and a
//     read-only export;
//  2. reconnect: a new VM sees the data of the first, then is SIGKILLed while writing;
//  3. verify: a third VM recovers the journal and finds the file system clean.
//
// Then vublk must exit 0 on SIGTERM, and its counters must show the guest's flushes.
func TestGuest(t *testing.T) { forEachQEMU(t, testGuest) }

func testGuest(t *testing.T, q *qemuBinary) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	roImg := filepath.Join(dir, "ro.img")
	roData := make([]byte, roDiskSize)
	rand.Read(roData)
	if err := os.WriteFile(roImg, roData, 0o644); err != nil {
		t.Fatal(err)
	}
	rw := startVublk(t, filepath.Join(dir, "rw.sock"),
		"--blk-file", img, "--size", "1G", "--serial", serial, "--lanes", "4", "--name", "rw")
	ro := startVublk(t, filepath.Join(dir, "ro.sock"), "--blk-file", roImg, "--read-only", "--name", "ro")
	disks := []disk{{socket: rw.socket, numQueues: 2}, {socket: ro.socket, numQueues: 1}}
	params := func(phase string) map[string]string {
		return map[string]string{
			"phase": phase, "size": strconv.Itoa(diskSize), "serial": serial, "rosize": strconv.Itoa(roDiskSize),
		}
	}

	t.Run("main", func(t *testing.T) {
		v := bootGuest(t, boot{qemu: q, disks: disks, params: params("main"), timeout: 10 * time.Minute})
		v.expectChecks(t, "main", []string{
			"size", "logical_block_size", "queues", "serial", "write_cache",
			"fio_randwrite_verify", "fio_seq_1m_verify",
			"discard", "discard_reads_zeros", "write_zeroes", "write_zeroes_reads_zeros",
			"cache_write_through", "write_through_io", "cache_write_back",
			"mkfs_ext4", "mount_ext4", "sync", "umount_ext4", "e2fsck_clean", "remount_ext4",
			"checksums_after_drop_caches",
			"ro_size", "ro_flag", "ro_read", "ro_write_fails",
		})
		if n := rw.countLogs("guest changed the write cache mode"); n != 2 {
			t.Errorf("vublk logged %d cache mode changes, want 2 (write through, write back)", n)
		}
		// What the guest wrote is in the host file: the host's e2fsck agrees.
		hostFsck(t, img)
	})

	t.Run("reconnect_and_kill", func(t *testing.T) {
		v := bootGuest(t, boot{qemu: q, disks: disks, params: params("reconnect"), timeout: 5 * time.Minute,
			killOn: "E2E writing", killAfter: 3 * time.Second})
		for _, name := range []string{"size", "mount_ext4", "checksums"} {
			if res := v.results[name]; len(res) < 2 || res[:2] != "ok" {
				t.Errorf("%s: %q", name, res)
			}
		}
		select {
		case <-rw.done:
			t.Fatalf("vublk exited when the VM was killed: %v", rw.err)
		default:
		}
	})

	t.Run("verify_after_kill", func(t *testing.T) {
		v := bootGuest(t, boot{qemu: q, disks: disks, params: params("verify"), timeout: 5 * time.Minute})
		v.expectChecks(t, "verify", []string{"size", "mount_ext4", "checksums", "umount_ext4", "e2fsck_clean"})
		if n := rw.countLogs("front-end connected"); n != 3 {
			t.Errorf("the read-write export saw %d connections, want 3", n)
		}
	})

	t.Run("sigterm", func(t *testing.T) {
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
		if n, _ := stats["flush_errors"].(float64); n != 0 {
			t.Errorf("flush_errors = %v", n)
		}
		rostats, err := ro.stop()
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("read-only export: %v", rostats)
		if n, _ := rostats["writes"].(float64); n != 0 {
			t.Errorf("the read-only export counted %v writes", n)
		}
		got, err := os.ReadFile(roImg)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, roData) {
			t.Error("the read-only image changed")
		}
		hostFsck(t, img)
	})
}

// hostFsck checks the ext4 file system in img from the host, read-only.
func hostFsck(t *testing.T, img string) {
	t.Helper()
	out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput()
	if err != nil {
		t.Errorf("host e2fsck -fn %s: %v\n%s", img, err, out)
	} else {
		t.Logf("host e2fsck: clean")
	}
}
