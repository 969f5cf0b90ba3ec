package vhostuser

import (
	"encoding/binary"
	"fmt"
	"math"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// Dirty page logging for live migration (vhost-user.rst, "Migration"). The front-end shares a
// bitmap with SET_LOG_BASE (VHOST_USER_PROTOCOL_F_LOG_SHMFD) and turns logging on and off with
// VHOST_F_LOG_ALL in SET_FEATURES; while it is on, every write vublk makes to guest memory sets its
// page's bit (virtio.DirtyLog), and a ring whose SET_VRING_ADDR has VHOST_VRING_F_LOG logs its used
// ring writes at log_guest_addr.

const (
	// FLogAll is VHOST_F_LOG_ALL: the back-end can log its writes to guest memory.
	FLogAll = 26
	// VringFLog is VHOST_VRING_F_LOG in the flags of SET_VRING_ADDR: log the used ring's writes.
	VringFLog = 1 << 0
	// maxLogSize bounds the log a front-end may share: one bit per 4 KiB page, so 1 GiB of
	// bitmap covers 32 TiB of guest memory.
	maxLogSize = 1 << 30
)

// LogMsg is struct VhostUserLog, the payload of SET_LOG_BASE.
type LogMsg struct {
	MmapSize, MmapOffset uint64
}

// Log decodes a SET_LOG_BASE payload.
func (m *Message) Log() (LogMsg, error) {
	if err := m.wantSize(16); err != nil {
		return LogMsg{}, err
	}
	return LogMsg{binary.LittleEndian.Uint64(m.Payload), binary.LittleEndian.Uint64(m.Payload[8:])}, nil
}

// logMapping is the mapped log region.
type logMapping struct {
	mapping []byte // the whole mmap, for munmap
	bitmap  []byte // the log itself
}

// mapLog maps the log region lm of fd, always closing fd. Like guest memory, the region must lie
// inside the file when it is mapped; a front-end that shrinks the file later makes marks fault,
// which the code that marks catches (virtio's catchFault).
func mapLog(lm LogMsg, fd int) (*logMapping, error) {
	defer unix.Close(fd)
	end := lm.MmapOffset + lm.MmapSize
	switch {
	case lm.MmapSize == 0 || lm.MmapSize > maxLogSize:
		return nil, fmt.Errorf("%w: dirty log of %d bytes", ErrProtocol, lm.MmapSize)
	case end < lm.MmapOffset || end > math.MaxInt:
		return nil, fmt.Errorf("%w: dirty log offset %#x size %#x overflows", ErrProtocol, lm.MmapOffset, lm.MmapSize)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat dirty log fd: %w", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < end {
		return nil, fmt.Errorf("%w: dirty log ends at %#x beyond its file of %#x bytes", ErrProtocol, end, st.Size)
	}
	m, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("mmap dirty log of %d bytes: %w", lm.MmapSize, err)
	}
	return &logMapping{mapping: m, bitmap: m[lm.MmapOffset:end:end]}, nil
}

func (l *logMapping) unmap() {
	if l != nil && l.mapping != nil {
		unix.Munmap(l.mapping)
		l.mapping, l.bitmap = nil, nil
	}
}

// setLogBase handles SET_LOG_BASE: the new log replaces the old one at once, and the reply goes
// out only once nothing writes to the old log any more, because the front-end reads the old log
// one last time and frees it when it has the reply.
func (c *conn) setLogBase(m *Message) error {
	if c.protocol&(1<<ProtocolFLogShmfd) == 0 {
		return fmt.Errorf("%w: SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD", ErrProtocol)
	}
	if err := m.wantFds(1); err != nil {
		return err
	}
	lm, err := m.Log()
	if err != nil {
		return err
	}
	nm, err := mapLog(lm, m.TakeFd(0))
	if err != nil {
		return err
	}
	old := c.logMap
	c.logMap = nm
	c.updateLogging()
	old.unmap()
	c.log.WithField("bytes", lm.MmapSize).Debug("dirty log set")
	return nil
}

// updateLogging makes the queues log into the current log while VHOST_F_LOG_ALL is acknowledged,
// and not at all otherwise. A log that is replaced is closed, which waits for the marks in
// progress on it.
func (c *conn) updateLogging() {
	var want []byte
	if c.features&(1<<FLogAll) != 0 && c.logMap != nil {
		want = c.logMap.bitmap
	}
	cur := c.logger.Load()
	if cur != nil && want != nil && c.logActive == c.logMap {
		return // already logging into this log
	}
	var nl *virtio.DirtyLog
	if want != nil {
		nl = virtio.NewDirtyLog(want)
	}
	if old := c.logger.Swap(nl); old != nil {
		if n := old.Dropped(); n > 0 {
			c.log.WithField("pages", n).Warn("the front-end's dirty log did not cover every page vublk wrote; those pages were not logged")
		}
		if n := old.Skipped(); n > 0 {
			c.log.WithField("pages", n).Warn("test hook: pages of read data left out of the dirty log")
		}
		old.Close()
	}
	if nl != nil {
		c.logActive = c.logMap
		c.log.Info("dirty page logging on")
	} else {
		if c.logActive != nil {
			c.log.Info("dirty page logging off")
		}
		c.logActive = nil
	}
}

// dropLog stops logging and unmaps the log (reset, disconnect).
func (c *conn) dropLog() {
	c.logMap.unmap()
	c.logMap = nil
	c.updateLogging()
	c.logFd.set(-1, "")
}
