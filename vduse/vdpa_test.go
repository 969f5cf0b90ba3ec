package vduse

import (
	"os"
	"path/filepath"
	"testing"
)

// TestBindDriver runs bindDriver on a fake /sys/bus/vdpa: a device that the wrong driver took
// is unbound from it and bound to the one asked for; one already on it is left alone.
func TestBindDriver(t *testing.T) {
	for _, tc := range []struct {
		name, bound, want string
		unbind, bind      bool
	}{
		{"moved to vhost", "virtio_vdpa", "vhost_vdpa", true, true},
		{"moved to virtio", "vhost_vdpa", "virtio_vdpa", true, true},
		{"already there", "virtio_vdpa", "virtio_vdpa", false, false},
		{"unbound", "", "vhost_vdpa", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bus := t.TempDir()
			old := vdpaBusDir
			vdpaBusDir = bus
			defer func() { vdpaBusDir = old }()
			for _, d := range []string{"virtio_vdpa", "vhost_vdpa"} {
				if err := os.MkdirAll(filepath.Join(bus, "drivers", d), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			dev := filepath.Join(bus, "devices", "vd0")
			if err := os.MkdirAll(dev, 0o755); err != nil {
				t.Fatal(err)
			}
			if tc.bound != "" {
				if err := os.Symlink(filepath.Join("..", "..", "drivers", tc.bound), filepath.Join(dev, "driver")); err != nil {
					t.Fatal(err)
				}
			}
			if err := bindDriver("vd0", tc.want); err != nil {
				t.Fatal(err)
			}
			read := func(p string) string {
				b, _ := os.ReadFile(p)
				return string(b)
			}
			if got := read(filepath.Join(bus, "drivers", tc.bound, "unbind")); tc.bound != "" && (got == "vd0") != tc.unbind {
				t.Errorf("unbind from %s: %q", tc.bound, got)
			}
			if got := read(filepath.Join(bus, "drivers", tc.want, "bind")); (got == "vd0") != tc.bind {
				t.Errorf("bind to %s: %q", tc.want, got)
			}
		})
	}
	if driverFor(BusVhost) != "vhost_vdpa" || driverFor(BusVirtio) != "virtio_vdpa" {
		t.Error("driverFor")
	}
}
