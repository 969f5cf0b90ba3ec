package vduse

import "errors"

var (
	// ErrNoVDUSE is returned when the kernel has no VDUSE: /dev/vduse/control is missing (no
	// vduse module loaded, or a kernel without CONFIG_VDPA_USER).
	ErrNoVDUSE = errors.New("the kernel has no VDUSE (/dev/vduse/control is missing: modprobe vduse, Linux 5.15 or later with CONFIG_VDPA_USER)")
	// ErrNoVDPA is returned when the vdpa bus or the driver asked for is not available (the
	// vdpa, virtio_vdpa or vhost_vdpa module is not loaded).
	ErrNoVDPA = errors.New("vDPA is not available")
	// ErrBadName is returned for a device name VDUSE cannot take.
	ErrBadName = errors.New("bad VDUSE device name")
	// ErrBadRequest is returned when a message read from the VDUSE device cannot be decoded.
	ErrBadRequest = errors.New("bad VDUSE request")
	// ErrSettingsChanged is returned when taking over a device that was created with other
	// settings (features, queues, block size, read-only...): start vublk with those.
	ErrSettingsChanged = errors.New("the VDUSE device exists with other settings (features, queues or config space); start vublk with the settings it was created with")
	// ErrExists is returned when a VDUSE device of that name exists and is in use by another
	// process.
	ErrExists = errors.New("a VDUSE device of this name exists and is in use")
)
