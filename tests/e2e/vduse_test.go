//go:build e2e

package e2e

import (
	"bufio"
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/vublk/vublk/tests/internal/buildvublk"
)

//go:embed vduse_guest.sh
var vduseGuestInit []byte

// vduseModules are what the VDUSE guest loads (dependencies come from modules.dep): VDUSE and
// the vdpa bus, both vdpa drivers, and virtio_blk for the /dev/vda virtio_vdpa makes.
var vduseModules = []string{"vduse", "virtio_vdpa", "vhost_vdpa", "virtio_blk"}

// vduseChecks are the checks vduse_guest.sh must pass.
var vduseChecks = []string{
	"vduse_control", "vda_appeared", "vdpa_driver", "size", "serial", "queues", "write_cache",
	"fio_randwrite_verify", "fio_seq_1m_verify", "discard", "discard_reads_zeros", "write_zeroes",
	"write_zeroes_reads_zeros", "mkfs_ext4", "e2fsck", "vd0_exit", "vd0_nothing_left", "flushes_reach_vublk",
	"vd0_no_vda", "ro_vda_appeared", "ro_flag", "ro_write_refused", "ro_e2fsck", "vdro_exit",
	"vdro_nothing_left", "kill_vda_appeared", "kill_count", "kill_io_waits", "kill_device_kept", "kill_fio_verify",
	"kill_takeover", "kill_no_io_errors", "vdk_exit", "vdk_nothing_left", "vhost_dev_appeared",
	"vhost_driver", "vhost_no_vda", "vhost_qemu_io", "vdv_exit", "vdv_nothing_left", "vhost_data_in_file",
	"vhost_zeroes_in_file", "svc_vda_appeared", "svc_size", "svc_resized", "svc_exit", "svc_nothing_left",
}

// TestVDUSEGuestKernel6_12 boots Debian 13's 6.12 kernel (this host's kernel and Debian 12's
// 6.1 have no vDPA) in a TCG guest under the host's QEMU: this test exercises the guest
// kernel's VDUSE, not QEMU's vhost-user, so it runs under one QEMU only. Inside the guest a
// static vublk serves a file on tmpfs as VDUSE devices, and vduse_guest.sh checks the disk
// (fio verify, mkfs.ext4 and e2fsck, discard, write-zeroes, flushes, read-only), SIGKILL and
// takeover in the middle of verified writes, the vhost_vdpa binding, and that SIGTERM leaves
// no vdpa and no VDUSE device behind.
func TestVDUSEGuestKernel6_12(t *testing.T) {
	kroot := filepath.Join(env.root, ".cache", "kernel-vduse", "root")
	kernels, _ := filepath.Glob(filepath.Join(kroot, "boot", "vmlinuz-*"))
	if len(kernels) == 0 {
		t.Fatalf("no VDUSE guest kernel under %s: run `make deps`", kroot)
	}
	sort.Strings(kernels)
	kernel := kernels[len(kernels)-1]
	kver := strings.TrimPrefix(filepath.Base(kernel), "vmlinuz-")
	initramfs := filepath.Join(t.TempDir(), "vduse-initramfs.cpio")
	if err := buildVDUSEInitramfs(t, initramfs, filepath.Join(kroot, "lib", "modules", kver)); err != nil {
		t.Fatalf("building the VDUSE initramfs: %v", err)
	}
	qemu, _ := exec.Command("qemu-system-x86_64", "--version").Output()
	t.Logf("guest kernel %s under %s", kver, strings.SplitN(string(qemu), "\n", 2)[0])

	v := &vm{results: map[string]string{}}
	v.cmd = exec.Command("qemu-system-x86_64",
		"-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "1G",
		"-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
		"-kernel", kernel, "-initrd", initramfs,
		"-append", "console=ttyS0 panic=-1 loglevel=1")
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
				if strings.HasPrefix(rest, "FAIL") {
					for _, l := range v.recent {
						t.Logf("guest:   | %s", l)
					}
				}
				if strings.HasPrefix(rest, "log ") || strings.HasPrefix(rest, "FAIL") {
					t.Logf("guest: %s", line)
				}
				v.recent = v.recent[:0]
				v.record(rest)
			} else if len(v.recent) < 40 {
				v.recent = append(v.recent, line)
			}
		}
		exited <- v.cmd.Wait()
	}()
	select {
	case <-exited:
	case <-time.After(15 * time.Minute):
		v.cmd.Process.Kill()
		<-exited
		t.Errorf("the guest did not finish within 15 minutes; console:\n%s", v.console.String())
	}
	v.expectChecks(t, "vduse", vduseChecks)
	if t.Failed() {
		t.Logf("guest console:\n%s", v.console.String())
	}
}

// buildVDUSEInitramfs writes the VDUSE guest's initramfs: busybox, fio, mke2fs, e2fsck and
// blkdiscard with their libraries, a static vublk (CGO_ENABLED=0), the modules decompressed
// (busybox insmod does not read .ko.xz) in load order, and vduse_guest.sh as /init.
func buildVDUSEInitramfs(t *testing.T, out, moddir string) error {
	tree := t.TempDir()
	if err := buildvublk.Build(filepath.Join(tree, "vublk"), "", "CGO_ENABLED=0"); err != nil {
		return fmt.Errorf("building a static vublk: %w", err)
	}
	if err := addGuestBase(tree, vduseGuestInit); err != nil {
		return err
	}
	if err := copyTrixieQemuIO(filepath.Join(tree, "trixie")); err != nil {
		return err
	}
	// Debian 13's modules are .ko.xz: moduleOrder keys them by that name.
	want := make([]string, len(vduseModules))
	for i, m := range vduseModules {
		want[i] = m + ".ko.xz"
	}
	order, err := moduleOrder(moddir, want)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(tree, "modules"), 0o755); err != nil {
		return err
	}
	var names []string
	for _, rel := range order {
		name := strings.TrimSuffix(filepath.Base(rel), ".xz")
		xz := exec.Command("xz", "-dc", filepath.Join(moddir, rel))
		data, err := xz.Output()
		if err != nil {
			return fmt.Errorf("xz -dc %s: %w", rel, err)
		}
		if err := os.WriteFile(filepath.Join(tree, "modules", name), data, 0o644); err != nil {
			return err
		}
		names = append(names, name)
	}
	if err := os.WriteFile(filepath.Join(tree, "modules.order"), []byte(strings.Join(names, "\n")+"\n"), 0o644); err != nil {
		return err
	}
	return writeCPIO(tree, out)
}

// copyTrixieQemuIO copies qemu-io of the Debian 13 root (QEMU 10.0 with libblkio 1.5), its
// libblkio block driver module and their libraries into root, a tree the guest chroots into:
// there qemu-io drives /dev/vhost-vdpa-N as a user-space virtio-blk driver
// (driver=virtio-blk-vhost-vdpa), which makes the kernel send vublk IOTLB updates for the
// process's memory.
func copyTrixieQemuIO(root string) error {
	troot := os.Getenv("VUBLK_TRIXIE_ROOT")
	if troot == "" {
		troot = "/var/lib/vublk/trixie"
	}
	bins := []string{"/usr/bin/qemu-io", "/usr/lib/x86_64-linux-gnu/qemu/block-blkio.so"}
	for _, bin := range bins {
		if err := copyFile(filepath.Join(troot, bin), filepath.Join(root, bin), 0o755); err != nil {
			return fmt.Errorf("%w (make deps builds the Debian 13 root)", err)
		}
		out, err := exec.Command(filepath.Join(env.root, "scripts", "trixie-run"), "ldd", bin).Output()
		if err != nil {
			return fmt.Errorf("ldd %s in the Debian 13 root: %w", bin, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			for _, field := range strings.Fields(line) {
				if strings.HasPrefix(field, "/") {
					if err := copyFile(filepath.Join(troot, field), filepath.Join(root, field), 0o755); err != nil {
						return err
					}
				}
			}
		}
	}
	for _, dir := range []string{"dev", "proc", "sys", "tmp"} {
		if err := os.MkdirAll(filepath.Join(root, dir), 0o755); err != nil {
			return err
		}
	}
	return nil
}
