package main

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
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
	direct     bool   // open the file with O_DIRECT
	ioEngine   string // config.IOEngineLanes or config.IOEngineURing
	serial     string
	writeback  bool
	blockSize  int
	discard    bool
	writeLog   string
	// Socket ownership and mode, so that QEMU running as another user (libvirt's) can connect;
	// -1 and 0 leave them as they are.
	socketUID, socketGID int
	socketMode           os.FileMode
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
	file   *backend.FileStore
	store  backend.Store // file, or the write log around it
	engine *backend.Engine
	dev    *virtio.BlkDevice
	srv    *vhostuser.Server
	served chan error // Serve's result
	// ownThrottle enforces the export's own limits (nil until it has any).
	ownThrottle *backend.Throttle
}

// startExport opens the backing file, starts the lanes, listens on the socket and serves.
func startExport(spec exportSpec, logger *logrus.Logger) (*export, error) {
	e := &export{spec: spec, log: logger.WithField("export", spec.name), served: make(chan error, 1)}
	file, err := backend.OpenFile(spec.file, backend.FileOptions{
		ReadOnly: spec.readOnly, CreateSize: spec.size, Resize: spec.resize,
		Direct: spec.direct, LogicalBlockSize: spec.blockSize,
	})
	if err != nil {
		return nil, fmt.Errorf("export %s: %w", spec.name, err)
	}
	e.file, e.store = file, file
	if spec.size > 0 && file.Size() != spec.size {
		e.log.WithFields(logrus.Fields{"file_size": file.Size(), "size": spec.size}).
			Warn("the configured size differs from the existing file's size; keeping the file's size (use --resize, or resize = true in the config, to change it)")
	}
	if spec.writeLog != "" {
		ls, err := backend.NewLoggingStore(file, spec.writeLog)
		if err != nil {
			file.Close()
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
	capacity := file.Size() / int64(spec.blockSize) * int64(spec.blockSize)
	e.dev = virtio.NewBlkDevice(e.engine, virtio.BlkConfig{
		Capacity:          uint64(capacity),
		BlockSize:         uint32(spec.blockSize),
		PhysicalBlockSize: uint32(file.PhysicalBlockSize()),
		NumQueues:         uint16(spec.numQueues),
		ReadOnly:          spec.readOnly,
		Serial:            spec.serial,
		Writeback:         spec.writeback,
		Discard:           spec.discard && !spec.readOnly,
	}, e.log)

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
	go func() { e.served <- e.srv.Serve(ln) }()
	mode := "writethrough"
	if spec.writeback {
		mode = "writeback"
	}
	e.log.WithFields(logrus.Fields{
		"socket": ln.Addr().String(), "file": spec.file, "size": capacity, "read_only": spec.readOnly,
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
	e.srv.Close()
	var errs []error
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
		if err := e.file.Resize(size); err != nil {
			return err
		}
		e.dev.SetCapacity(uint64(capacity))
	} else {
		// Shrinking: stop accepting requests beyond the new end before the file shrinks.
		e.dev.SetCapacity(uint64(capacity))
		if err := e.file.Resize(size); err != nil {
			e.dev.SetCapacity(uint64(old))
			return err
		}
	}
	e.spec.size = size
	log := e.log.WithFields(logrus.Fields{"old_size": old, "size": capacity})
	if err := e.srv.NotifyConfigChange(); err != nil {
		log.WithError(err).Warn("resized, but the front-end was not notified: the guest sees the new size after it reconnects")
		return nil
	}
	log.Info("export resized")
	return nil
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
