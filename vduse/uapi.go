package vduse

import (
	"encoding/binary"
	"fmt"
)

// The kernel interface of include/uapi/linux/vduse.h (API version 0, Linux 5.15 and later). The
// structures are marshalled by hand into byte slices in the kernel's layout (x86-64 and arm64:
// little-endian, natural alignment), so that no Go struct layout is trusted; ioctl_unsafe.go
// hands the bytes to the kernel.

// apiVersion is the VDUSE API this code speaks (VDUSE_API_VERSION 0).
const apiVersion = 0

// ioctl request numbers: _IOC(dir, 0x81, nr, size) with dir 1 = write, 2 = read.
func ioc(dir, nr, size uint) uint { return dir<<30 | size<<16 | 0x81<<8 | nr }

const (
	iocNone  = 0
	iocWrite = 1
	iocRead  = 2
)

var (
	ioctlGetAPIVersion   = ioc(iocRead, 0x00, 8)
	ioctlSetAPIVersion   = ioc(iocWrite, 0x01, 8)
	ioctlCreateDev       = ioc(iocWrite, 0x02, devConfigSize)
	ioctlDestroyDev      = ioc(iocWrite, 0x03, nameMax)
	ioctlIOTLBGetFD      = ioc(iocRead|iocWrite, 0x10, iotlbEntrySize)
	ioctlGetFeatures     = ioc(iocRead, 0x11, 8)
	ioctlSetConfig       = ioc(iocWrite, 0x12, 8)
	ioctlInjectConfigIRQ = ioc(iocNone, 0x13, 0)
	ioctlVQSetup         = ioc(iocWrite, 0x14, vqConfigSize)
	ioctlVQGetInfo       = ioc(iocRead|iocWrite, 0x15, vqInfoSize)
	ioctlVQSetupKickFD   = ioc(iocWrite, 0x16, 8)
	ioctlVQInjectIRQ     = ioc(iocWrite, 0x17, 4)
)

// Sizes and fields of the structures.
const (
	nameMax        = 256 // VDUSE_NAME_MAX, with the terminating NUL
	devConfigSize  = 336 // struct vduse_dev_config without its config[] bytes
	iotlbEntrySize = 32  // struct vduse_iotlb_entry (u8 perm padded to 8)
	vqConfigSize   = 32  // struct vduse_vq_config
	vqInfoSize     = 48  // struct vduse_vq_info
	requestSize    = 152 // struct vduse_dev_request
	responseSize   = 152 // struct vduse_dev_response

	// The kernel refuses a config space larger than a page.
	maxConfigSize = 4096
)

// Request types read from the device (enum vduse_req_type).
const (
	reqGetVQState  = 0
	reqSetStatus   = 1
	reqUpdateIOTLB = 2
)

// Response results.
const (
	resultOK     = 0
	resultFailed = 1
)

// IOTLB access permissions (VDUSE_ACCESS_*).
const (
	accessRO = 1
	accessWO = 2
	accessRW = 3
)

// Virtio device status bits (virtio 1.2, 2.1).
const (
	statusAcknowledge = 1
	statusDriver      = 2
	statusDriverOK    = 4
	statusFeaturesOK  = 8
	statusNeedsReset  = 64
	statusFailed      = 128
)

// Device and feature numbers VDUSE needs beyond virtio-blk's own.
const (
	virtioIDBlock    = 2
	virtioVendorID   = 0 // any: virtio_vdpa matches on the device id
	fAccessPlatform  = 33
	blkFConfigWCE    = 11
	defaultQueueSize = 256
	defaultVQAlign   = 4096
)

// devConfig is struct vduse_dev_config followed by the config space.
type devConfig struct {
	name     string
	deviceID uint32
	vendorID uint32
	features uint64
	vqNum    uint32
	vqAlign  uint32
	config   []byte
}

func (c *devConfig) marshal() ([]byte, error) {
	if c.name == "" || len(c.name) >= nameMax {
		return nil, fmt.Errorf("%w: %q (1 to %d bytes)", ErrBadName, c.name, nameMax-1)
	}
	if len(c.config) > maxConfigSize {
		return nil, fmt.Errorf("config space of %d bytes is larger than %d", len(c.config), maxConfigSize)
	}
	b := make([]byte, devConfigSize+len(c.config))
	copy(b, c.name)
	le := binary.LittleEndian
	le.PutUint32(b[256:], c.vendorID)
	le.PutUint32(b[260:], c.deviceID)
	le.PutUint64(b[264:], c.features)
	le.PutUint32(b[272:], c.vqNum)
	le.PutUint32(b[276:], c.vqAlign)
	// reserved[13] at 280 stays zero
	le.PutUint32(b[332:], uint32(len(c.config)))
	copy(b[devConfigSize:], c.config)
	return b, nil
}

// nameBytes is a device name as VDUSE_DESTROY_DEV takes it.
func nameBytes(name string) ([]byte, error) {
	if name == "" || len(name) >= nameMax {
		return nil, fmt.Errorf("%w: %q (1 to %d bytes)", ErrBadName, name, nameMax-1)
	}
	b := make([]byte, nameMax)
	copy(b, name)
	return b, nil
}

// iotlbEntry is struct vduse_iotlb_entry: IOVA range [start, last] of a mapping, which is at
// offset in the file the ioctl returns.
type iotlbEntry struct {
	offset, start, last uint64
	perm                uint8
}

func (e *iotlbEntry) marshal() []byte {
	b := make([]byte, iotlbEntrySize)
	le := binary.LittleEndian
	le.PutUint64(b[0:], e.offset)
	le.PutUint64(b[8:], e.start)
	le.PutUint64(b[16:], e.last)
	b[24] = e.perm
	return b
}

func (e *iotlbEntry) unmarshal(b []byte) {
	le := binary.LittleEndian
	e.offset, e.start, e.last, e.perm = le.Uint64(b[0:]), le.Uint64(b[8:]), le.Uint64(b[16:]), b[24]
}

// vqConfig is struct vduse_vq_config.
func vqConfig(index uint32, maxSize uint16) []byte {
	b := make([]byte, vqConfigSize)
	binary.LittleEndian.PutUint32(b[0:], index)
	binary.LittleEndian.PutUint16(b[4:], maxSize)
	return b
}

// vqInfo is struct vduse_vq_info for a split ring.
type vqInfo struct {
	index                            uint32
	num                              uint32
	descAddr, driverAddr, deviceAddr uint64
	availIndex                       uint16 // split.avail_index: where the device resumes
	ready                            bool
}

func (v *vqInfo) unmarshal(b []byte) {
	le := binary.LittleEndian
	v.index, v.num = le.Uint32(b[0:]), le.Uint32(b[4:])
	v.descAddr, v.driverAddr, v.deviceAddr = le.Uint64(b[8:]), le.Uint64(b[16:]), le.Uint64(b[24:])
	v.availIndex = le.Uint16(b[32:])
	v.ready = b[40] != 0
}

// vqEventfd is struct vduse_vq_eventfd (fd -1 deassigns).
func vqEventfd(index uint32, fd int32) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint32(b[0:], index)
	binary.LittleEndian.PutUint32(b[4:], uint32(fd))
	return b
}

// request is struct vduse_dev_request as read from the device.
type request struct {
	typ   uint32
	id    uint32
	index uint32 // GET_VQ_STATE: the queue
	// SET_STATUS
	status uint8
	// UPDATE_IOTLB: the IOVA range [start, last] whose mappings changed
	start, last uint64
}

// parseRequest decodes a request; the kernel writes exactly requestSize bytes.
func parseRequest(b []byte, r *request) error {
	if len(b) != requestSize {
		return fmt.Errorf("%w: %d bytes, want %d", ErrBadRequest, len(b), requestSize)
	}
	le := binary.LittleEndian
	*r = request{typ: le.Uint32(b[0:]), id: le.Uint32(b[4:])}
	u := b[24:] // the union, after type, request_id and reserved[4]
	switch r.typ {
	case reqGetVQState:
		r.index = le.Uint32(u[0:])
	case reqSetStatus:
		r.status = u[0]
	case reqUpdateIOTLB:
		r.start, r.last = le.Uint64(u[0:]), le.Uint64(u[8:])
		if r.last < r.start {
			return fmt.Errorf("%w: IOTLB update of [%#x, %#x]", ErrBadRequest, r.start, r.last)
		}
	default:
		return fmt.Errorf("%w: unknown request type %d", ErrBadRequest, r.typ)
	}
	return nil
}

// response is struct vduse_dev_response; availIndex answers GET_VQ_STATE.
func response(id, result uint32, index uint32, availIndex uint16) []byte {
	b := make([]byte, responseSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], id)
	le.PutUint32(b[4:], result)
	// reserved[4] must be zero
	le.PutUint32(b[24:], index)
	le.PutUint16(b[28:], availIndex)
	return b
}
