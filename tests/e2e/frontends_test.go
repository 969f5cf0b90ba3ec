//go:build e2e

package e2e

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// optionDisk is one vhost-user-blk-pci option set of TestDeviceOptions, with the number of queues
// the guest must then have.
type optionDisk struct {
	name   string
	opts   string
	queues int  // the guest's queue count: -smp 2 gives 2 when num-queues is QEMU's default
	numQ   int  // num-queues on the command line; 0: QEMU's default
	packed bool // the guest must run packed rings (VIRTIO_F_RING_PACKED): QEMU and vublk offer them
}

var optionDisks = []optionDisk{
	{"queue_size_128", "queue-size=128", 2, 2, false},
	{"queue_size_256", "queue-size=256", 1, 1, false},
	{"queue_size_1024_wce_off", "queue-size=1024,config-wce=off", 1, 1, false},
	{"default_num_queues", "", 2, 0, false},
	// QEMU offers packed rings with packed=on, and so does vublk: the guest runs packed rings,
	// two queues of them.
	{"packed_on", "packed=on", 2, 2, true},
}

// TestDeviceOptions boots one guest with a disk per device option set, each served by its own
// vublk, and runs the same data checks on each: size, queue count, the ring layout (packed only
// where packed=on, bit 34 of the features the guest negotiated), fio verify, discard and
// write-zeroes reading zeros, and a flush that reaches vublk.
func TestDeviceOptions(t *testing.T) { forEachQEMU(t, testDeviceOptions) }

func testDeviceOptions(t *testing.T, q *qemuBinary) {
	const size = 256 << 20
	dir := t.TempDir()
	var disks []disk
	var daemons []*daemon
	var names, queues, packed []string
	var want []string
	for i, o := range optionDisks {
		d := startVublk(t, filepath.Join(dir, o.name+".sock"), "--blk-file", filepath.Join(dir, o.name+".img"),
			"--size", strconv.Itoa(size), "--name", o.name, "--lanes", "2", "--packed-ring="+strconv.FormatBool(o.packed))
		daemons = append(daemons, d)
		disks = append(disks, disk{socket: d.socket, numQueues: o.numQ, deviceOpts: o.opts})
		dev := fmt.Sprintf("vd%c", 'a'+i)
		names = append(names, dev)
		queues = append(queues, strconv.Itoa(o.queues))
		packed = append(packed, map[bool]string{false: "0", true: "1"}[o.packed])
		for _, c := range []string{"size", "queues", "ring_packed", "fio_verify", "discard", "discard_zeros",
			"write_zeroes", "write_zeroes_zeros", "flush"} {
			want = append(want, dev+"_"+c)
		}
	}
	v := bootGuest(t, boot{qemu: q, disks: disks, timeout: 8 * time.Minute, params: map[string]string{
		"phase": "options", "size": strconv.Itoa(size),
		"optdisks": strings.Join(names, ","), "optqueues": strings.Join(queues, ","), "optpacked": strings.Join(packed, ","),
	}})
	v.expectChecks(t, "options", want)
	for i, d := range daemons {
		if n := d.countLogs("ring larger than the inflight buffer: serving it without inflight tracking"); n > 0 {
			t.Logf("%s: a ring larger than the inflight buffer was served untracked (%s)", optionDisks[i].name, q.name)
		}
		stats, err := d.stop()
		if err != nil {
			t.Fatal(err)
		}
		for _, key := range []string{"flushes", "discards", "write_zeroes", "writes", "reads"} {
			if n, _ := stats[key].(float64); n <= 0 {
				t.Errorf("%s: %s = %v, want > 0", optionDisks[i].name, key, stats[key])
			}
		}
		if n, _ := stats["errors"].(float64); n != 0 {
			t.Errorf("%s: %v errors", optionDisks[i].name, n)
		}
	}
}

// libblkio runs qemu-io or qemu-img of the Debian 13 root (QEMU 10's virtio-blk-vhost-user block
// driver is libblkio 1.5) against a vublk socket, and returns its output.
func libblkio(t *testing.T, prog, socket string, readOnly bool, args ...string) (string, error) {
	t.Helper()
	q := trixieQEMU(t)
	opts := "driver=virtio-blk-vhost-user,path=" + socket + ",cache.direct=on"
	var full []string
	switch prog {
	case "qemu-io":
		if readOnly {
			full = append(full, "-r")
		}
		full = append(full, "--image-opts", opts)
		full = append(full, args...)
	case "qemu-img":
		full = append(append(full, args...), "--image-opts", opts)
	}
	out, err := q.command(prog, full...).CombinedOutput()
	return string(out), err
}

// trixieQEMU is the Debian 13 root's QEMU, the one with libblkio.
func trixieQEMU(t *testing.T) *qemuBinary {
	for _, q := range qemus {
		if len(q.prefix) > 0 {
			return q
		}
	}
	t.Skip("the Debian 13 root is not in VUBLK_E2E_QEMU")
	return nil
}

// qemuIO runs qemu-io commands (-c each) through libblkio and fails the test if qemu-io fails: a
// pattern that does not verify (read -P) makes it exit 1.
func qemuIO(t *testing.T, socket string, cmds ...string) string {
	t.Helper()
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	out, err := libblkio(t, "qemu-io", socket, false, args...)
	if err != nil || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io %q: %v\n%s", cmds, err, out)
	}
	return out
}

// TestLibblkio drives vublk with libblkio 1.5, a front-end written independently of QEMU's
// vhost-user-blk device, through qemu-io and qemu-img bench: pattern writes read back, flush,
// discard and write-zeroes reading zeros, a read-only export refusing writes, and data that a
// QEMU guest reads after libblkio wrote it, and the other way round.
func TestLibblkio(t *testing.T) {
	trixieQEMU(t)
	dir := t.TempDir()
	rw := startVublk(t, filepath.Join(dir, "rw.sock"), "--blk-file", filepath.Join(dir, "rw.img"), "--size", "256M", "--name", "rw")
	sock := rw.socket

	t.Run("patterns", func(t *testing.T) {
		qemuIO(t, sock,
			"write -P 0xa5 0 1M", "read -P 0xa5 0 1M",
			"write -P 0x3c 1000k 24k", "read -P 0xa5 0 1000k", "read -P 0x3c 1000k 24k",
			"flush")
		// The check can fail: a wrong pattern makes qemu-io fail.
		out, err := libblkio(t, "qemu-io", sock, false, "-c", "read -P 0x77 0 4k")
		if err == nil && !strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("qemu-io accepted a wrong pattern: %s", out)
		}
	})
	t.Run("discard_and_write_zeroes", func(t *testing.T) {
		qemuIO(t, sock,
			"write -P 0x11 4M 2M", "discard 4M 1M", "read -P 0 4M 1M", "read -P 0x11 5M 1M",
			"write -P 0x22 8M 2M", "write -z 8M 1M", "read -P 0 8M 1M", "read -P 0x22 9M 1M")
	})
	t.Run("bench", func(t *testing.T) {
		for _, extra := range [][]string{{"-w"}, {}} {
			args := append([]string{"bench", "-c", "20000", "-d", "32", "-s", "4096", "-t", "none"}, extra...)
			out, err := libblkio(t, "qemu-img", sock, false, args...)
			if err != nil || !strings.Contains(out, "Run completed") {
				t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
			}
		}
	})
	t.Run("read_only", func(t *testing.T) {
		qemuIO(t, sock, "write -P 0x6b 200M 1M", "flush")
		ro := startVublk(t, filepath.Join(dir, "ro.sock"), "--blk-file", filepath.Join(dir, "rw.img"), "--read-only", "--name", "ro")
		if out, err := libblkio(t, "qemu-io", ro.socket, true, "-c", "read -P 0x6b 200M 1M"); err != nil {
			t.Fatalf("reading the read-only export: %v\n%s", err, out)
		}
		// libblkio sees VIRTIO_BLK_F_RO and refuses to open the disk for writing.
		out, err := libblkio(t, "qemu-io", ro.socket, false, "-c", "write -P 1 0 4k")
		if err == nil || !strings.Contains(out, "read-only") {
			t.Fatalf("writing the read-only export: %v\n%s", err, out)
		}
		stats, err := ro.stop()
		if err != nil {
			t.Fatal(err)
		}
		if n, _ := stats["writes"].(float64); n != 0 {
			t.Errorf("the read-only export counted %v writes", n)
		}
	})
	// Each QEMU of the matrix reads what libblkio wrote, and writes what libblkio then reads.
	forEachQEMU(t, func(t *testing.T, q *qemuBinary) {
		qemuIO(t, sock, "write -P 0x5a 0 4M", "write -P 0 4M 4M", "flush")
		v := bootGuest(t, boot{qemu: q, disks: []disk{{socket: sock, numQueues: 1}}, timeout: 3 * time.Minute,
			params: map[string]string{"phase": "interop"}})
		v.expectChecks(t, "interop", []string{"interop_read", "interop_write"})
		qemuIO(t, sock, "read -P 0xa5 4M 4M")
	})
	stats, err := rw.stop()
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"flushes", "discards", "write_zeroes", "writes", "reads"} {
		if n, _ := stats[key].(float64); n <= 0 {
			t.Errorf("%s = %v, want > 0: libblkio's requests did not reach vublk", key, stats[key])
		}
	}
}
