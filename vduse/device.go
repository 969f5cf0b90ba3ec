// Package vduse serves a virtio-blk device to the local kernel through VDUSE (vDPA Device in
// Userspace, Linux 5.15 and later): the device is created through /dev/vduse/control, added to
// the vdpa bus over netlink, and bound to virtio_vdpa (an ordinary /dev/vdX on this host) or
// vhost_vdpa (a /dev/vhost-vdpa-N that QEMU can use). The rings and buffers live in the
// driver's I/O virtual address space, which the device maps from the kernel's IOTLB
// (iotlb.go); requests go to the same virtio.BlkDevice as vhost-user's.
package vduse

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"os"
	"sync"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// Drivers a device can be bound to (--vduse-bus).
const (
	BusVirtio = "virtio" // virtio_vdpa: a block device of this host
	BusVhost  = "vhost"  // vhost_vdpa: /dev/vhost-vdpa-N for QEMU
)

// Paths of the kernel interfaces; variables for tests.
var (
	controlPath = "/dev/vduse/control"
	devDir      = "/dev/vduse"
)

// Options configure a device.
type Options struct {
	// Name of the VDUSE device (/dev/vduse/NAME) and of the vdpa device.
	Name string
	// QueueSize is the largest ring the driver may set up (0: 256).
	QueueSize int
	// Bus is BusVirtio (default) or BusVhost.
	Bus string
	// NoVDPA leaves the vdpa step to the caller (vdpa dev add mgmtdev vduse name NAME).
	NoVDPA bool
	// StateDir holds the inflight record that lets a restarted vublk take the device over ("":
	// /run/vublk).
	StateDir string
}

// Device is one VDUSE virtio-blk device served by this process.
type Device struct {
	opts Options
	blk  *virtio.BlkDevice
	log  *logrus.Entry
	ctl  *os.File // /dev/vduse/control
	fd   int      // /dev/vduse/NAME, for ioctls
	msgs *os.File // a non-blocking duplicate of fd: requests are read through Go's poller
	tlb  *iotlb
	mem  *virtio.GuestMemory

	mu       sync.Mutex // serialises requests from the kernel with Close and config changes
	status   uint8
	features uint64
	queues   []*queue
	state    *inflightFile // the queues' inflight records, shared with a later vublk
	vdpa     bool          // added to the vdpa bus by us
	resumed  bool          // took over a device a vublk that died had served
	closed   bool

	served   chan error    // the request loop's result, for Served
	looping  bool          // the request loop was started
	loopDone chan struct{} // closed when the request loop has ended
}

// Create makes the VDUSE device for blk, starts serving its requests and, unless
// opts.NoVDPA, adds it to the vdpa bus bound to the driver of opts.Bus. A device of the same
// name that a vublk left behind when it died (not in use by any process) is taken over: its
// queues go on where that vublk stopped (see resume.go).
func Create(blk *virtio.BlkDevice, opts Options, log *logrus.Entry) (*Device, error) {
	if opts.QueueSize == 0 {
		opts.QueueSize = defaultQueueSize
	}
	if opts.Bus == "" {
		opts.Bus = BusVirtio
	}
	if opts.StateDir == "" {
		opts.StateDir = "/run/vublk"
	}
	switch {
	case opts.QueueSize < 1 || opts.QueueSize > virtio.MaxQueueSize || opts.QueueSize&(opts.QueueSize-1) != 0:
		return nil, fmt.Errorf("queue size %d is not a power of two up to %d", opts.QueueSize, virtio.MaxQueueSize)
	case opts.Bus != BusVirtio && opts.Bus != BusVhost:
		return nil, fmt.Errorf("bus %q: want %s or %s", opts.Bus, BusVirtio, BusVhost)
	}
	if _, err := nameBytes(opts.Name); err != nil {
		return nil, err
	}
	cfg := blk.Config()
	d := &Device{opts: opts, blk: blk, log: log.WithField("vduse", opts.Name), fd: -1, served: make(chan error, 1), loopDone: make(chan struct{})}
	ctl, err := os.OpenFile(controlPath, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, ErrNoVDUSE
		}
		return nil, fmt.Errorf("open %s: %w", controlPath, err)
	}
	d.ctl = ctl
	if err := d.create(cfg); err != nil {
		ctl.Close()
		return nil, err
	}
	d.tlb = newIOTLB(deviceMappings{fd: d.fd})
	d.mem = virtio.NewResolvedGuestMemory(d.tlb)
	d.queues = make([]*queue, cfg.NumQueues)
	for i := range d.queues {
		d.queues[i] = newQueue(d, i)
	}
	if d.state, err = openInflightFile(opts.StateDir, opts.Name, len(d.queues), opts.QueueSize, d.settings(), !d.resumed); err != nil {
		d.release(false)
		return nil, err
	}
	if d.resumed {
		// The queues restart from the record before any request is read: the kernel sends
		// again what the dead vublk had not answered, and those must find the device as it
		// was. The file may have another size than when the device was made.
		if err := d.resume(); err != nil {
			d.startLoop() // Close removes the vdpa device, whose reset needs an answer
			d.Close()
			return nil, err
		}
		if err := d.NotifyConfigChange(); err != nil {
			d.log.WithError(err).Warn("config space not updated on take-over")
		}
	}
	d.startLoop()
	if !opts.NoVDPA && !d.resumed {
		if err := addVDPA(opts.Name, opts.Bus); err != nil {
			d.Close()
			return nil, err
		}
		d.mu.Lock()
		d.vdpa = true
		d.mu.Unlock()
	}
	d.log.WithFields(logrus.Fields{"bus": opts.Bus, "queues": len(d.queues), "queue_size": opts.QueueSize,
		"resumed": d.resumed}).Info("VDUSE device ready")
	return d, nil
}

// create makes the device (or finds the one a dead vublk left) and opens it.
func (d *Device) create(cfg virtio.BlkConfig) error {
	v := make([]byte, 8) // API version 0, little-endian u64
	if _, err := ioctl(int(d.ctl.Fd()), ioctlSetAPIVersion, v); err != nil {
		return fmt.Errorf("VDUSE_SET_API_VERSION %d: %w", apiVersion, err)
	}
	dc := devConfig{
		name:     d.opts.Name,
		deviceID: virtioIDBlock,
		vendorID: virtioVendorID,
		features: deviceFeatures(d.blk.Features()),
		vqNum:    uint32(cfg.NumQueues),
		vqAlign:  defaultVQAlign,
		config:   d.blk.ReadConfig(0, blkConfigSize),
	}
	b, err := dc.marshal()
	if err != nil {
		return err
	}
	created := true
	if _, err := ioctl(int(d.ctl.Fd()), ioctlCreateDev, b); err != nil {
		if !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("VDUSE_CREATE_DEV %s: %w", d.opts.Name, err)
		}
		created = false
	}
	path := devDir + "/" + d.opts.Name
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if created {
			d.destroy()
		}
		if errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("%w: %s", ErrExists, path)
		}
		return fmt.Errorf("open %s: %w", path, err)
	}
	d.fd = fd
	if !created {
		// A device of this name that no process holds: a vublk that died left it, with the
		// vdpa device and whatever the driver has in flight. Take it over.
		d.resumed = true
		d.log.Warn("a VDUSE device of this name exists and nobody serves it (vublk died?): taking it over")
	} else {
		for i := 0; i < int(cfg.NumQueues); i++ {
			if _, err := ioctl(fd, ioctlVQSetup, vqConfig(uint32(i), uint16(min(d.opts.QueueSize, math.MaxUint16)))); err != nil {
				unix.Close(fd)
				d.fd = -1
				d.destroy()
				return fmt.Errorf("VDUSE_VQ_SETUP %d: %w", i, err)
			}
		}
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err == nil {
		err = unix.SetNonblock(dup, true)
	}
	if err != nil {
		unix.Close(fd)
		d.fd = -1
		if created {
			d.destroy()
		}
		return fmt.Errorf("VDUSE device descriptor: %w", err)
	}
	d.msgs = os.NewFile(uintptr(dup), path)
	return nil
}

// settings is a fingerprint of what the kernel fixed when the device was created: features,
// queues and the config space except the capacity (a resize changes that, through
// VDUSE_DEV_SET_CONFIG).
func (d *Device) settings() uint64 {
	cfg := d.blk.ReadConfig(0, blkConfigSize)
	clear(cfg[0:8]) // capacity
	h := fnv.New64a()
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], deviceFeatures(d.blk.Features()))
	h.Write(b[:])
	binary.LittleEndian.PutUint64(b[:], uint64(len(d.queues))<<32|uint64(d.opts.QueueSize))
	h.Write(b[:])
	h.Write(cfg)
	return h.Sum64()
}

// blkConfigSize is the config space VDUSE is given: struct virtio_blk_config up to the
// secure-erase fields (the driver reads beyond it as zeros).
const blkConfigSize = 72

// deviceFeatures are the features offered through VDUSE: the device's own, plus
// VIRTIO_F_ACCESS_PLATFORM (buffers are IOVAs translated by the IOTLB; VDUSE refuses a device
// without it), minus VIRTIO_BLK_F_CONFIG_WCE (VDUSE's config space is read-only for the
// driver, and it refuses a block device offering it).
func deviceFeatures(f uint64) uint64 {
	return f&^(1<<blkFConfigWCE|1<<virtio.FRingPacked) | 1<<fAccessPlatform // VDUSE queues are split rings
}

// destroy removes the VDUSE device (VDUSE_DESTROY_DEV); the kernel refuses while it is on the
// vdpa bus or open.
func (d *Device) destroy() error {
	b, err := nameBytes(d.opts.Name)
	if err != nil {
		return err
	}
	if _, err := ioctl(int(d.ctl.Fd()), ioctlDestroyDev, b); err != nil {
		return fmt.Errorf("VDUSE_DESTROY_DEV %s: %w", d.opts.Name, err)
	}
	return nil
}

// Served reports the end of the request loop: nil after Close, an error if the device failed.
func (d *Device) Served() <-chan error { return d.served }

func (d *Device) startLoop() {
	d.looping = true
	go d.serveRequests()
}

// serveRequests reads the kernel's requests and answers each, until the device is closed.
func (d *Device) serveRequests() {
	defer close(d.loopDone)
	buf := make([]byte, requestSize)
	for {
		n, err := d.msgs.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrClosed) {
				d.served <- nil
			} else {
				d.served <- fmt.Errorf("reading VDUSE requests: %w", err)
			}
			return
		}
		var r request
		if err := parseRequest(buf[:n], &r); err != nil {
			d.log.WithError(err).Error("cannot decode a VDUSE request; failing it")
			if n >= 8 {
				d.reply(response(r.id, resultFailed, 0, 0))
			}
			continue
		}
		d.reply(d.handle(&r))
	}
}

func (d *Device) reply(b []byte) {
	if _, err := d.msgs.Write(b); err != nil && !errors.Is(err, os.ErrClosed) {
		d.log.WithError(err).Error("answering a VDUSE request")
	}
}

// handle runs one request and returns the response.
func (d *Device) handle(r *request) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	switch r.typ {
	case reqGetVQState:
		if r.index >= uint32(len(d.queues)) {
			d.log.WithField("queue", r.index).Error("GET_VQ_STATE for a queue the device does not have")
			return response(r.id, resultFailed, r.index, 0)
		}
		q := d.queues[r.index]
		// The index must be exact: stop the queue (drained, so every popped request is in
		// the used ring), read it, and let the queue go on.
		running := q.running()
		if running {
			q.stop()
		}
		base := q.base
		if running {
			d.startQueue(q, false)
		}
		d.log.WithFields(logrus.Fields{"queue": r.index, "avail_index": base}).Debug("GET_VQ_STATE")
		return response(r.id, resultOK, r.index, base)
	case reqSetStatus:
		d.setStatus(r.status)
		return response(r.id, resultOK, 0, 0)
	case reqUpdateIOTLB:
		stopped := d.stopQueues()
		n := d.tlb.invalidate(r.start, r.last)
		d.log.WithFields(logrus.Fields{"start": fmt.Sprintf("%#x", r.start), "last": fmt.Sprintf("%#x", r.last),
			"unmapped": n}).Debug("IOTLB updated")
		for _, q := range stopped {
			d.startQueue(q, false)
		}
		return response(r.id, resultOK, 0, 0)
	}
	return response(r.id, resultFailed, 0, 0)
}

// setStatus follows the driver's status writes: the queues run while DRIVER_OK is set; a
// reset (0) stops them, forgets the negotiated features and unmaps the whole IOTLB (the kernel
// drops its mappings without telling).
func (d *Device) setStatus(s uint8) {
	old := d.status
	d.status = s
	d.state.setStatus(s)
	log := d.log.WithField("status", fmt.Sprintf("%#x", s))
	switch {
	case s == 0:
		d.stopQueues()
		d.tlb.invalidate(0, math.MaxUint64)
		d.state.reset()
		d.features = 0
		d.blk.SetFeatures(0)
		if old != 0 {
			log.Info("driver reset the device")
		}
	case s&statusDriverOK != 0 && old&statusDriverOK == 0:
		b := make([]byte, 8)
		if _, err := ioctl(d.fd, ioctlGetFeatures, b); err != nil {
			log.WithError(err).Error("VDUSE_DEV_GET_FEATURES; the queues do not start")
			return
		}
		d.features = leUint64(b)
		d.blk.SetFeatures(d.features)
		started := 0
		for _, q := range d.queues {
			if d.startQueue(q, true) {
				started++
			}
		}
		log.WithFields(logrus.Fields{"features": fmt.Sprintf("%#x", d.features), "queues": started}).Info("driver ready: queues started")
	case s&statusDriverOK == 0 && old&statusDriverOK != 0:
		d.stopQueues()
		log.Info("driver cleared DRIVER_OK: queues stopped")
	}
}

func leUint64(b []byte) uint64 {
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

// stopQueues stops and drains every running queue and returns them.
func (d *Device) stopQueues() []*queue {
	var stopped []*queue
	for _, q := range d.queues {
		if q.running() {
			q.stop()
			stopped = append(stopped, q)
		}
	}
	return stopped
}

// startQueue starts q: with fromKernel, on the ring the driver set up (VDUSE_VQ_GET_INFO, at
// the index the kernel holds), else again on the ring it ran before. It reports whether the
// queue runs.
func (d *Device) startQueue(q *queue, fromKernel bool) bool {
	log := d.log.WithField("queue", q.index)
	if fromKernel {
		b := make([]byte, vqInfoSize)
		b[0], b[1], b[2], b[3] = byte(q.index), byte(q.index>>8), byte(q.index>>16), byte(q.index>>24)
		if _, err := ioctl(d.fd, ioctlVQGetInfo, b); err != nil {
			log.WithError(err).Error("VDUSE_VQ_GET_INFO")
			return false
		}
		var info vqInfo
		info.unmarshal(b)
		if !info.ready || info.num == 0 {
			q.configured = false
			return false
		}
		q.configured = true
		q.num = int(info.num)
		q.addrs = virtio.RingAddrs{Desc: info.descAddr, Avail: info.driverAddr, Used: info.deviceAddr}
		q.base = info.availIndex
		q.resubmit = nil
	}
	if !q.configured {
		return false
	}
	if err := q.start(); err != nil {
		log.WithError(err).Error("queue not started")
		return false
	}
	return true
}

// NotifyConfigChange updates the config space from the block device (a resize) and interrupts
// the driver so that it reads it again.
func (d *Device) NotifyConfigChange() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	cfg := d.blk.ReadConfig(0, blkConfigSize)
	b := make([]byte, 8+len(cfg))
	b[4] = byte(len(cfg)) // offset 0, length
	copy(b[8:], cfg)
	if _, err := ioctl(d.fd, ioctlSetConfig, b); err != nil {
		return fmt.Errorf("VDUSE_DEV_SET_CONFIG: %w", err)
	}
	if d.status&statusDriverOK == 0 {
		return nil
	}
	if _, err := ioctl(d.fd, ioctlInjectConfigIRQ, nil); err != nil {
		return fmt.Errorf("VDUSE_DEV_INJECT_CONFIG_IRQ: %w", err)
	}
	return nil
}

// Close removes the device: off the vdpa bus first (the driver resets it, which this process
// answers), then every queue is stopped and drained, the IOTLB unmapped, and the VDUSE device
// destroyed. Nothing is left behind: no vdpa device, no /dev/vduse/NAME, no inflight record.
func (d *Device) Close() error {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		return nil
	}
	d.closed = true
	added := d.vdpa
	d.mu.Unlock()
	var errs []error
	if added || d.resumed {
		if err := delVDPA(d.opts.Name); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, d.release(true))
	return errors.Join(errs...)
}

// release stops the queues, closes the device and, if destroy, destroys it and removes the
// inflight record.
func (d *Device) release(destroy bool) error {
	d.mu.Lock()
	d.stopQueues()
	if d.tlb != nil {
		d.tlb.invalidate(0, math.MaxUint64)
	}
	for _, q := range d.queues {
		q.closeKick()
	}
	d.mu.Unlock()
	if d.msgs != nil {
		d.msgs.Close()
		if d.looping {
			<-d.loopDone
		}
	}
	if d.fd >= 0 {
		unix.Close(d.fd)
		d.fd = -1
	}
	var err error
	if destroy {
		err = d.destroy()
		if d.state != nil {
			d.state.remove()
		}
	}
	if d.state != nil {
		d.state.close()
	}
	d.ctl.Close()
	return err
}
