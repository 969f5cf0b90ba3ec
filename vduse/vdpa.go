package vduse

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/vishvananda/netlink"
)

// sysfs paths of the vdpa bus; variables for tests.
var vdpaBusDir = "/sys/bus/vdpa"

// driverFor is the kernel driver of a bus choice.
func driverFor(bus string) string {
	if bus == BusVhost {
		return "vhost_vdpa"
	}
	return "virtio_vdpa"
}

// addVDPA adds the VDUSE device name to the vdpa bus (vdpa dev add mgmtdev vduse name NAME)
// and makes sure the driver of bus, and no other, drives it.
func addVDPA(name, bus string) error {
	driver := driverFor(bus)
	if _, err := os.Stat(filepath.Join(vdpaBusDir, "drivers", driver)); err != nil {
		return fmt.Errorf("%w: the %s driver is not loaded (modprobe %s)", ErrNoVDPA, driver, driver)
	}
	if _, err := netlink.VDPAGetMGMTDevByBusAndName("", "vduse"); err != nil {
		return fmt.Errorf("%w: no vduse management device on the vdpa bus: %w", ErrNoVDPA, err)
	}
	// The driver already loaded probes the device while the add runs: this process answers
	// its requests meanwhile on the device's own goroutines.
	if err := netlink.VDPANewDev(name, "", "vduse", netlink.VDPANewDevParams{}); err != nil {
		return fmt.Errorf("vdpa dev add %s: %w", name, err)
	}
	if err := bindDriver(name, driver); err != nil {
		delVDPA(name)
		return err
	}
	return nil
}

// bindDriver moves the vdpa device to driver if another one took it.
func bindDriver(name, driver string) error {
	dev := filepath.Join(vdpaBusDir, "devices", name)
	cur, err := os.Readlink(filepath.Join(dev, "driver"))
	if err == nil && filepath.Base(cur) == driver {
		return nil
	}
	if err == nil {
		if err := os.WriteFile(filepath.Join(dev, "driver", "unbind"), []byte(name), 0); err != nil {
			return fmt.Errorf("unbinding vdpa device %s from %s: %w", name, filepath.Base(cur), err)
		}
	}
	if err := os.WriteFile(filepath.Join(vdpaBusDir, "drivers", driver, "bind"), []byte(name), 0); err != nil {
		return fmt.Errorf("binding vdpa device %s to %s: %w", name, driver, err)
	}
	return nil
}

// delVDPA removes the vdpa device name; one that is not there is not an error.
func delVDPA(name string) error {
	if err := netlink.VDPADelDev(name); err != nil {
		if _, serr := os.Stat(filepath.Join(vdpaBusDir, "devices", name)); errors.Is(serr, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("vdpa dev del %s: %w", name, err)
	}
	return nil
}

// VDPADevices lists the devices on the vdpa bus (netlink), for checks and tests.
func VDPADevices() ([]string, error) {
	devs, err := netlink.VDPAGetDevList()
	if err != nil {
		return nil, err
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.Name)
	}
	return names, nil
}
