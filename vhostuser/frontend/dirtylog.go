package frontend

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// SetLogBase shares a dirty log with the back-end (VHOST_USER_PROTOCOL_F_LOG_SHMFD): the log is
// size bytes at offset in fd. The back-end answers once it logs into it.
func (c *Conn) SetLogBase(size, offset uint64, fd int) error {
	p := binary.LittleEndian.AppendUint64(nil, size)
	p = binary.LittleEndian.AppendUint64(p, offset)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.write(EncodeMessage(vhostuser.SetLogBase, FlagVersion, p), []int{fd}); err != nil {
		return err
	}
	_, err := c.reply(vhostuser.SetLogBase, 8)
	return err
}

// SetLogFd sends the eventfd the back-end may signal when it changed the log.
func (c *Conn) SetLogFd(fd int) error { return c.do(vhostuser.SetLogFd, nil, []int{fd}) }

// DirtyLog is a dirty page log this front-end shares with the back-end during a migration: a
// memfd bitmap, one bit per 4 KiB page of guest memory.
type DirtyLog struct {
	fd     int
	bitmap []byte
}

// NewDirtyLog creates a log that covers memSize bytes of guest memory.
func NewDirtyLog(memSize uint64) (*DirtyLog, error) {
	size := (memSize/virtio.LogPageSize + 63) / 64 * 8 // whole u64s, as QEMU sizes it
	fd, err := unix.MemfdCreate("vublk-dirty-log", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("size dirty log: %w", err)
	}
	b, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("map dirty log: %w", err)
	}
	return &DirtyLog{fd: fd, bitmap: b}, nil
}

// Fd is the memfd holding the log.
func (l *DirtyLog) Fd() int { return l.fd }

// Size is the log's size in bytes.
func (l *DirtyLog) Size() uint64 { return uint64(len(l.bitmap)) }

// Take returns the guest page numbers (gpa / 4096) whose bits are set, in order, and clears
// them, as QEMU's log sync does (an atomic exchange per 64 pages).
func (l *DirtyLog) Take() []uint64 {
	var pages []uint64
	for w := 0; w+8 <= len(l.bitmap); w += 8 {
		v := atomic.SwapUint64(u64At(l.bitmap, w), 0)
		for v != 0 {
			b := bits.TrailingZeros64(v)
			pages = append(pages, uint64(w)*8+uint64(b))
			v &^= 1 << b
		}
	}
	return pages
}

// Close unmaps the log and closes its memfd.
func (l *DirtyLog) Close() error {
	err := unix.Munmap(l.bitmap)
	unix.Close(l.fd)
	return err
}

// StartLogging shares log with the back-end and turns logging on as QEMU does when a migration
// starts: SET_LOG_BASE, SET_FEATURES with VHOST_F_LOG_ALL, then SET_VRING_ADDR with
// VHOST_VRING_F_LOG and the used ring's guest address for every queue. The protocol feature
// LOG_SHMFD must have been negotiated (Options.Log).
func (d *Device) StartLogging(log *DirtyLog) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.protocol&(1<<vhostuser.ProtocolFLogShmfd) == 0 {
		return fmt.Errorf("%w: VHOST_USER_PROTOCOL_F_LOG_SHMFD was not negotiated", ErrNotOffered)
	}
	if err := d.conn.SetLogBase(log.Size(), 0, log.Fd()); err != nil {
		return err
	}
	d.dirtyLog = log
	return d.setLogging(true)
}

// StopLogging turns logging off: SET_FEATURES without VHOST_F_LOG_ALL and the rings' addresses
// without VHOST_VRING_F_LOG.
func (d *Device) StopLogging() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.setLogging(false)
}

func (d *Device) setLogging(on bool) error {
	f := d.features &^ (1 << vhostuser.FLogAll)
	if on {
		f |= 1 << vhostuser.FLogAll
	}
	if err := d.conn.SetFeatures(f); err != nil {
		return err
	}
	d.features, d.logging = f, on
	for _, q := range d.queues {
		if err := d.conn.SetVringAddr(d.vringAddr(q)); err != nil {
			return err
		}
	}
	return nil
}

// resumeLogging shares the log again after a reconnect, before the rings start (Reconnect has
// already acknowledged VHOST_F_LOG_ALL with the other features).
func (d *Device) resumeLogging() error {
	if !d.logging || d.dirtyLog == nil {
		return nil
	}
	return d.conn.SetLogBase(d.dirtyLog.Size(), 0, d.dirtyLog.Fd())
}

// vringAddr is q's SET_VRING_ADDR payload, with the log flag and the used ring's guest address
// while logging.
func (d *Device) vringAddr(q *Queue) vhostuser.VringAddr {
	a := q.addrs()
	if d.logging {
		a.Flags |= vhostuser.VringFLog
		a.Log = q.UsedGPA()
	}
	return a
}

// UsedGPA is the guest physical address of the queue's used ring.
func (q *Queue) UsedGPA() uint64 {
	_, usedOff, _ := ringLayout(int(q.size))
	return q.rings.GPA + uint64(usedOff)
}

// UsedSize is the size in bytes of the used ring (flags, index, elements, avail_event).
func (q *Queue) UsedSize() uint64 { return 6 + 8*uint64(q.size) }
