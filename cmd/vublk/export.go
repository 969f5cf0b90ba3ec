package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/backend/rbd"
	"github.com/vublk/vublk/vduse"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// exportSpec is one export's validated settings, from flags or a config file.
type exportSpec struct {
	name       string
	socketPath string // or fd >= 0
	fd         int
	file       string
	size       int64 // create (or, with resize, set) the file at this size; 0: keep
	resize     bool
	readOnly   bool
	numQueues  int
	lanes      int
	pollMax    time.Duration // how long a ring polls (vhostuser.Server.SetPollMax); 0: never
	direct     bool          // open the file with O_DIRECT
	ioEngine   string        // config.IOEngineLanes or config.IOEngineURing
	serial     string
	writeback  bool
	blockSize  int
	discard    bool
	packed     bool // offer VIRTIO_F_RING_PACKED
	writeLog   string
	// An RBD image instead of file ("pool/image[@snap]"), and the cluster's settings.
	rbd         string
	cephConf    string
	cephUser    string
	cephKeyring string
	rbdTimeout  time.Duration
	rbdCache    bool // librbd's cache as ceph.conf says (acknowledged writes die with vublk)
	// Socket ownership and mode, so that QEMU running as another user (libvirt's) can connect;
	// -1 and 0 leave them as they are.
	socketUID, socketGID int
	socketMode           os.FileMode
	// vduse names a VDUSE device to serve instead of a socket; vduseBus is its vdpa driver.
	vduse, vduseBus string
	// I/O limits: the export's own (a throttle of its own when any is set), or throttle, its
	// io_group's, shared with the other exports of the group.
	limits   backend.Limits
	throttle *backend.Throttle
}

// export is one running disk: file store, engine with its lanes, virtio-blk device and
// vhost-user server on its socket. Exports are independent of each other.
type export struct {
	spec   exportSpec
	log    *logrus.Entry
	file   *backend.FileStore // nil for an RBD export
	image  *rbd.Store         // nil for a file export
	store  backend.Store      // file or image, or the write log around it
	engine *backend.Engine
	dev    *virtio.BlkDevice
	srv    *vhostuser.Server // or vd
	vd     *vduse.Device
	served chan error // Serve's result
	// ownThrottle enforces the export's own limits (nil until it has any).
	ownThrottle *backend.Throttle
}

// startExport opens the backing file, starts the lanes, listens on the socket and serves.
func startExport(spec exportSpec, logger *logrus.Logger) (*export, error) {
	e := &export{spec: spec, log: logger.WithField("export", spec.name), served: make(chan error, 1)}
	var err error
	if spec.rbd != "" {
		err = e.openImage()
	} else {
		err = e.openFile()
	}
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", spec.name, err)
	}
	if spec.size > 0 && e.store.Size() != spec.size {
		e.log.WithFields(logrus.Fields{"current_size": e.store.Size(), "size": spec.size}).
			Warn("the configured size differs from the existing file's or image's size; keeping it (use --resize, or resize = true in the config, to change it)")
	}
	if spec.writeLog != "" {
		ls, err := backend.NewLoggingStore(e.store, spec.writeLog)
		if err != nil {
			e.store.Close()
			return nil, fmt.Errorf("export %s: write log: %w", spec.name, err)
		}
		e.store = ls
	}
	e.engine, err = backend.NewEngineWith(e.store, backend.EngineOptions{Lanes: spec.lanes, IOEngine: backend.IOEngine(spec.ioEngine)})
	if err != nil {
		e.store.Close()
		return nil, engineError{fmt.Errorf("export %s: %w", spec.name, err)}
	}
	e.setLimits(spec.limits, spec.throttle)
	capacity := e.store.Size() / int64(spec.blockSize) * int64(spec.blockSize)
	physBlock := 0
	if e.file != nil {
		physBlock = e.file.PhysicalBlockSize()
	}
	readOnly := spec.readOnly || e.image != nil && e.image.ReadOnly()
	e.dev = virtio.NewBlkDevice(e.engine, virtio.BlkConfig{
		Capacity:          uint64(capacity),
		BlockSize:         uint32(spec.blockSize),
		PhysicalBlockSize: uint32(physBlock),
		NumQueues:         uint16(spec.numQueues),
		ReadOnly:          readOnly,
		Serial:            spec.serial,
		Writeback:         spec.writeback,
		Discard:           spec.discard && !readOnly,
		Packed:            spec.packed,
	}, e.log)

	if spec.vduse != "" {
		return e.startVDUSE(capacity)
	}
	var ln *net.UnixListener
	if spec.fd >= 0 {
		ln, err = vhostuser.ListenFD(spec.fd)
	} else {
		ln, err = vhostuser.Listen(spec.socketPath)
		if err == nil {
			err = setSocketAccess(spec)
			if err != nil {
				ln.Close()
			}
		}
	}
	if err != nil {
		e.engine.Close()
		e.store.Close()
		return nil, fmt.Errorf("export %s: %w", spec.name, err)
	}
	e.srv = vhostuser.NewServer(e.dev, spec.numQueues, e.log)
	if spec.pollMax > 0 {
		e.srv.SetPollMax(spec.pollMax)
	}
	go func() { e.served <- e.srv.Serve(ln) }()
	mode := "writethrough"
	if spec.writeback {
		mode = "writeback"
	}
	fields := logrus.Fields{
		"socket": ln.Addr().String(), "size": capacity, "read_only": readOnly,
		"lanes": spec.lanes, "num_queues": spec.numQueues, "write_cache": mode, "serial": spec.serial,
		"limited": e.engine.Throttle() != nil,
	}
	if e.image != nil {
		fields["rbd"], fields["librbd"], fields["rbd_cache"] = spec.rbd, rbd.LibraryVersion(), spec.rbdCache
	} else {
		fields["file"], fields["direct"], fields["io_engine"] = spec.file, spec.direct, spec.ioEngine
	}
	e.log.WithFields(fields).Info("export ready")
	return e, nil
}

// startVDUSE serves the device to this host's kernel through VDUSE.
func (e *export) startVDUSE(capacity int64) (*export, error) {
	spec := e.spec
	vd, err := vduse.Create(e.dev, vduse.Options{Name: spec.vduse, Bus: spec.vduseBus}, e.log)
	if err != nil {
		e.engine.Close()
		e.store.Close()
		// Not a usage error: the settings are valid and this kernel cannot serve them.
		return nil, engineError{fmt.Errorf("export %s: VDUSE: %w", spec.name, err)}
	}
	e.vd = vd
	go func() { e.served <- <-vd.Served() }()
	mode := "writethrough"
	if spec.writeback {
		mode = "writeback"
	}
	e.log.WithFields(logrus.Fields{
		"vduse": spec.vduse, "vduse_bus": spec.vduseBus, "file": spec.file, "size": capacity, "read_only": spec.readOnly,
		"lanes": spec.lanes, "num_queues": spec.numQueues, "write_cache": mode, "serial": spec.serial,
		"direct": spec.direct, "io_engine": spec.ioEngine, "limited": e.engine.Throttle() != nil,
	}).Info("export ready")
	return e, nil
}

// engineError is a failure to start an export's I/O engine (io_uring refused by the kernel):
// the settings are valid, this host cannot run them.
type engineError struct{ error }

func (e engineError) Unwrap() error { return e.error }

// setSocketAccess applies the socket's owner, group and mode.
func setSocketAccess(spec exportSpec) error {
	if spec.socketUID >= 0 || spec.socketGID >= 0 {
		if err := os.Lchown(spec.socketPath, spec.socketUID, spec.socketGID); err != nil {
			return fmt.Errorf("socket owner: %w", err)
		}
	}
	if spec.socketMode != 0 {
		if err := os.Chmod(spec.socketPath, spec.socketMode); err != nil {
			return fmt.Errorf("socket mode: %w", err)
		}
	}
	return nil
}

// stop disconnects the front-end, drains every request, syncs and closes the file, and logs
// the export's counters. An error means the final sync failed or the file did not close.
func (e *export) stop() error {
	var errs []error
	if e.vd != nil {
		// Off the vdpa bus while the device still serves: the driver's removal resets it.
		if err := e.vd.Close(); err != nil {
			e.log.WithError(err).Error("removing the VDUSE device")
			errs = append(errs, err)
		}
	} else {
		e.srv.Close()
	}
	if err := e.engine.Close(); err != nil {
		e.log.WithError(err).Error("final flush failed: data may not be durable")
		errs = append(errs, err)
	}
	if err := e.store.Close(); err != nil {
		e.log.WithError(err).Error("closing the backing file")
		errs = append(errs, err)
	}
	stats := e.engine.Stats.Snapshot()
	e.log.WithFields(logrus.Fields{
		"reads": stats.Reads, "writes": stats.Writes, "flushes": stats.Flushes, "discards": stats.Discards,
		"write_zeroes": stats.WriteZeroes, "bytes_read": stats.BytesRead, "bytes_written": stats.BytesWritten,
		"errors": stats.Errors, "flush_errors": stats.FlushErrors, "inline": stats.Inline,
	}).Info("export stopped")
	return errors.Join(errs...)
}

// resize changes the disk's size live: the file first (growing), then what the guest may
// address, then the front-end is told to re-read the config space so the guest sees it.
func (e *export) resize(size int64) error {
	capacity := size / int64(e.spec.blockSize) * int64(e.spec.blockSize)
	old := int64(e.dev.Config().Capacity)
	if capacity == old {
		return nil
	}
	if capacity > old {
		if err := e.resizeStore(size); err != nil {
			return err
		}
		e.dev.SetCapacity(uint64(capacity))
	} else {
		// Shrinking: stop accepting requests beyond the new end before the file shrinks.
		e.dev.SetCapacity(uint64(capacity))
		if err := e.resizeStore(size); err != nil {
			e.dev.SetCapacity(uint64(old))
			return err
		}
	}
	e.spec.size = size
	log := e.log.WithFields(logrus.Fields{"old_size": old, "size": capacity})
	notify := func() error {
		if e.vd != nil {
			return e.vd.NotifyConfigChange()
		}
		return e.srv.NotifyConfigChange()
	}
	if err := notify(); err != nil {
		log.WithError(err).Warn("resized, but the front-end was not notified: the guest sees the new size after it reconnects")
		return nil
	}
	log.Info("export resized")
	return nil
}

// openFile opens the export's backing file or block device.
func (e *export) openFile() error {
	file, err := backend.OpenFile(e.spec.file, backend.FileOptions{
		ReadOnly: e.spec.readOnly, CreateSize: e.spec.size, Resize: e.spec.resize,
		Direct: e.spec.direct, LogicalBlockSize: e.spec.blockSize,
	})
	if err != nil {
		return err
	}
	e.file, e.store = file, file
	return nil
}

// openImage connects to the Ceph cluster and opens the export's RBD image (creating it with a
// size), or its snapshot read-only.
func (e *export) openImage() error {
	spec, err := rbd.ParseSpec(e.spec.rbd)
	if err != nil {
		return err
	}
	img, err := rbd.Open(spec, rbd.Options{
		ConfFile: e.spec.cephConf, User: e.spec.cephUser, Keyring: e.spec.cephKeyring,
		ReadOnly: e.spec.readOnly, CreateSize: e.spec.size, Resize: e.spec.resize, Timeout: e.spec.rbdTimeout,
		Cache: e.spec.rbdCache,
		// For measurements: blocking librbd calls on the lanes instead of aio (README, "Ceph RBD").
		NoAIO: os.Getenv("VUBLK_RBD_NO_AIO") == "1",
		// For measurements: more client options, "key=value key=value".
		ClientConf: strings.Fields(os.Getenv("VUBLK_RBD_CONF")),
	})
	if err != nil {
		return err
	}
	if img.Size()%int64(e.spec.blockSize) != 0 {
		e.log.WithFields(logrus.Fields{"image_size": img.Size(), "block_size": e.spec.blockSize}).
			Warn("the image's size is not a multiple of the logical block size; the guest sees it rounded down")
	}
	e.image, e.store = img, img
	return nil
}

// resizeStore resizes the file or image.
func (e *export) resizeStore(size int64) error {
	if e.image != nil {
		return e.image.Resize(size)
	}
	return e.file.Resize(size)
}

// setLimits applies I/O limits live: group's throttle when it is not nil, else the export's own
// limits. The export's own throttle is made on first need and kept (with no limits it lets
// everything through at once), so that requests waiting in it are never left behind.
func (e *export) setLimits(own backend.Limits, group *backend.Throttle) {
	e.spec.limits, e.spec.throttle = own, group
	switch cur := e.engine.Throttle(); {
	case group != nil:
		e.engine.SetThrottle(group)
	case cur != nil && cur != e.ownThrottle:
		// Leaving a group: its own limits from now on (none: a throttle that passes all).
		if e.ownThrottle == nil {
			e.ownThrottle = backend.NewThrottle(own)
		} else {
			e.ownThrottle.SetLimits(own)
		}
		e.engine.SetThrottle(e.ownThrottle)
	case cur != nil:
		cur.SetLimits(own)
	case !own.Unlimited():
		e.ownThrottle = backend.NewThrottle(own)
		e.engine.SetThrottle(e.ownThrottle)
	}
}
