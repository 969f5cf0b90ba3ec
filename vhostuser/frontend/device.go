// Package frontend is a small vhost-user-blk front-end: it does what QEMU
// does for a vhost-user-blk-pci device, in-process, for tests, crash
// checkers and benchmarks. Connect negotiates features, shares memfd guest
// memory and sets up split virtqueues; a Queue then submits virtio-blk
// requests and collects their completions. Conn gives message-level access,
// also for malformed messages.
//
// It is a test fake of the front-end; end-to-end tests still drive real
// QEMU.
package frontend

import (
	"cmp"
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// Options say how Connect sets the device up. The zero value is one queue
// of 256 entries in 64 MiB of guest memory.
type Options struct {
	// MemSize is the size of guest memory in bytes (default 64 MiB).
	MemSize int64
	// Regions splits guest memory into this many equal memory table
	// regions (default 1), so that buffers can cross regions.
	Regions int
	// NumQueues is how many queues to set up (default 1).
	NumQueues int
	// QueueSize is the number of entries per queue (default 256).
	QueueSize int
	// EventIdx negotiates VIRTIO_F_RING_EVENT_IDX if the back-end offers
	// it.
	EventIdx bool
	// Indirect negotiates VIRTIO_F_RING_INDIRECT_DESC if offered and then
	// puts every request's chain in an indirect table.
	Indirect bool
	// DropFeatures are device feature bits not to acknowledge even when
	// offered (e.g. 1<<virtio.BlkFFlush for a driver without flushes).
	DropFeatures uint64
	// Inflight negotiates VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD if offered
	// and shares an inflight buffer with the back-end, as QEMU does, so
	// that Reconnect can resume after the back-end died (inflight.go).
	Inflight bool
	// Log negotiates VHOST_USER_PROTOCOL_F_LOG_SHMFD if offered, for
	// StartLogging (dirty page logging during a migration).
	Log bool
	// Packed negotiates VIRTIO_F_RING_PACKED if the back-end offers it: every queue is then a
	// packed ring.
	Packed bool
	// InflightQueueSize is the queue size asked for in GET_INFLIGHT_FD
	// (default QueueSize). QEMU 10 asks for its queue-size and then runs
	// the firmware's rings with more entries than that.
	InflightQueueSize int
}

// blkFeatures are the device features this front-end understands.
const blkFeatures = 1<<virtio.FVersion1 | 1<<virtio.BlkFSizeMax | 1<<virtio.BlkFSegMax |
	1<<virtio.BlkFGeometry | 1<<virtio.BlkFRO | 1<<virtio.BlkFBlkSize | 1<<virtio.BlkFFlush |
	1<<virtio.BlkFTopology | 1<<virtio.BlkFConfigWCE | 1<<virtio.BlkFMQ |
	1<<virtio.BlkFDiscard | 1<<virtio.BlkFWriteZeroes

// wantProtocol are the protocol features used when offered; CONFIG is
// required.
const wantProtocol = 1<<vhostuser.ProtocolFReplyAck | 1<<vhostuser.ProtocolFMQ | 1<<vhostuser.ProtocolFConfig

// cfgWriteback is the offset of the writeback byte in the config space.
const cfgWriteback = 32

// Device is a connected vhost-user-blk device with running queues.
type Device struct {
	conn     *Conn
	mem      *Memory
	queues   []*Queue
	features uint64
	protocol uint64
	maxQueue int
	inflight *inflightBuf // nil: no inflight buffer
	logging  bool         // VHOST_F_LOG_ALL is on: rings are set up with VHOST_VRING_F_LOG
	dirtyLog *DirtyLog    // the log shared by StartLogging (the caller owns it)

	mu     sync.Mutex // serialises StopQueue, StartQueue and Close
	closed bool
}

// Connect dials the back-end at path and sets the device up as QEMU does:
// features, protocol features, owner, config, memory table, then each
// queue's size, base, addresses, eventfds and enable.
func Connect(path string, opt Options) (*Device, error) {
	opt.MemSize = cmp.Or(opt.MemSize, 64<<20)
	opt.Regions = cmp.Or(opt.Regions, 1)
	opt.NumQueues = cmp.Or(opt.NumQueues, 1)
	opt.QueueSize = cmp.Or(opt.QueueSize, 256)
	c, err := Dial(path)
	if err != nil {
		return nil, err
	}
	d := &Device{conn: c}
	if err := d.setup(opt); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func (d *Device) setup(opt Options) error {
	c := d.conn
	offered, err := c.GetFeatures()
	if err != nil {
		return err
	}
	if offered&(1<<vhostuser.FProtocolFeatures) == 0 || offered&(1<<virtio.FVersion1) == 0 {
		return fmt.Errorf("%w: features %#x lack VERSION_1 or PROTOCOL_FEATURES", ErrNotOffered, offered)
	}
	pf, err := c.GetProtocolFeatures()
	if err != nil {
		return err
	}
	if pf&(1<<vhostuser.ProtocolFConfig) == 0 {
		return fmt.Errorf("%w: protocol features %#x lack CONFIG", ErrNotOffered, pf)
	}
	d.protocol = pf & wantProtocol
	if opt.Inflight {
		d.protocol |= pf & (1 << vhostuser.ProtocolFInflightShmfd)
	}
	if opt.Log {
		d.protocol |= pf & (1 << vhostuser.ProtocolFLogShmfd)
	}
	if err := c.SetProtocolFeatures(d.protocol); err != nil {
		return err
	}
	d.maxQueue = 1
	if d.protocol&(1<<vhostuser.ProtocolFMQ) != 0 {
		n, err := c.GetQueueNum()
		if err != nil {
			return err
		}
		d.maxQueue = int(min(n, 1<<16))
	}
	if err := c.SetOwner(); err != nil {
		return err
	}
	cfg, err := d.Config()
	if err != nil {
		return err
	}
	if opt.NumQueues > d.maxQueue || (offered&(1<<virtio.BlkFMQ) != 0 && opt.NumQueues > int(cfg.NumQueues)) {
		return fmt.Errorf("%w: %d queues asked for, the back-end has %d and its config says %d",
			ErrNotOffered, opt.NumQueues, d.maxQueue, cfg.NumQueues)
	}

	want := uint64(blkFeatures | 1<<vhostuser.FProtocolFeatures)
	if opt.EventIdx {
		want |= 1 << virtio.FRingEventIdx
	}
	if opt.Indirect {
		want |= 1 << virtio.FRingIndirectDesc
	}
	if opt.Packed {
		want |= 1 << virtio.FRingPacked
	}
	d.features = offered & want &^ (opt.DropFeatures &^ (1 << vhostuser.FProtocolFeatures))
	if opt.NumQueues > 1 && d.features&(1<<virtio.BlkFMQ) == 0 {
		return fmt.Errorf("%w: %d queues without VIRTIO_BLK_F_MQ", ErrNotOffered, opt.NumQueues)
	}
	if err := c.SetFeatures(d.features); err != nil {
		return err
	}
	if d.protocol&(1<<vhostuser.ProtocolFInflightShmfd) != 0 {
		if err := d.setupInflight(opt.NumQueues, cmp.Or(opt.InflightQueueSize, opt.QueueSize)); err != nil {
			return err
		}
	}

	if d.mem, err = NewMemory(opt.MemSize, opt.Regions); err != nil {
		return err
	}
	fds := make([]int, opt.Regions)
	for i := range fds {
		fds[i] = d.mem.Fd()
	}
	if err := c.SetMemTable(d.mem.Regions(), fds); err != nil {
		return err
	}
	eventIdx := d.features&(1<<virtio.FRingEventIdx) != 0
	indirect := d.features&(1<<virtio.FRingIndirectDesc) != 0
	packed := d.features&(1<<virtio.FRingPacked) != 0
	for i := range opt.NumQueues {
		q, err := newQueue(d.mem, i, opt.QueueSize, eventIdx, indirect, packed)
		if err != nil {
			return err
		}
		d.queues = append(d.queues, q)
		if err := d.startQueue(q); err != nil {
			return err
		}
	}
	return nil
}

// newEventFd returns a non-blocking eventfd: os.NewFile makes it pollable.
func newEventFd() (int, error) {
	fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return -1, fmt.Errorf("eventfd: %w", err)
	}
	return fd, nil
}

// startQueue tells the back-end about q and starts it from q.base. The
// call eventfd goes before the kick, so that no completion of a ring the
// kick starts can be signalled to nobody.
func (d *Device) startQueue(q *Queue) error {
	var fds [3]int // kick, call, err
	for i := range fds {
		fd, err := newEventFd()
		if err != nil {
			for _, f := range fds[:i] {
				unix.Close(f)
			}
			return err
		}
		fds[i] = fd
	}
	kick, call, errf := fds[0], fds[1], fds[2]
	idx := uint32(q.index)
	for _, step := range []func() error{
		func() error { return d.conn.SetVringNum(idx, uint32(q.size)) },
		func() error { return d.conn.SetVringBase(idx, q.base) },
		func() error { return d.conn.SetVringAddr(d.vringAddr(q)) },
		func() error { return d.conn.SetVringCall(idx, call) },
		func() error { return d.conn.SetVringErr(idx, errf) },
		func() error { return d.conn.SetVringKick(idx, kick) },
	} {
		if err := step(); err != nil {
			for _, f := range fds {
				unix.Close(f)
			}
			return fmt.Errorf("start queue %d: %w", q.index, err)
		}
	}
	q.run(os.NewFile(uintptr(kick), "vring-kick"), os.NewFile(uintptr(call), "vring-call"), os.NewFile(uintptr(errf), "vring-err"))
	if err := d.conn.SetVringEnable(idx, true); err != nil {
		q.halt()
		return fmt.Errorf("enable queue %d: %w", q.index, err)
	}
	// Buffers may have been made available while the ring was stopped; a
	// kick makes sure the back-end looks (vhost-user.rst, "Ring states").
	q.mu.Lock()
	q.kick.Write(eventOne)
	q.mu.Unlock()
	return nil
}

// Conn is the device's connection, for raw messages.
func (d *Device) Conn() *Conn { return d.conn }

// Memory is the device's guest memory.
func (d *Device) Memory() *Memory { return d.mem }

// Features are the feature bits acknowledged with SET_FEATURES.
func (d *Device) Features() uint64 { return d.features }

// ProtocolFeatures are the protocol feature bits acknowledged.
func (d *Device) ProtocolFeatures() uint64 { return d.protocol }

// MaxQueues is the back-end's answer to GET_QUEUE_NUM (1 without MQ).
func (d *Device) MaxQueues() int { return d.maxQueue }

// NumQueues is the number of queues set up.
func (d *Device) NumQueues() int { return len(d.queues) }

// Queue returns queue i.
func (d *Device) Queue(i int) *Queue { return d.queues[i] }

// Config reads and decodes the device config space.
func (d *Device) Config() (Config, error) {
	b, err := d.conn.GetConfig(0, configSize)
	if err != nil {
		return Config{}, err
	}
	return DecodeConfig(b)
}

// SetWriteback writes the config space writeback byte: true is write back
// (flushes needed), false write through (VIRTIO_BLK_F_CONFIG_WCE). A
// rejection is ErrNack when REPLY_ACK was negotiated.
func (d *Device) SetWriteback(on bool) error {
	b := []byte{0}
	if on {
		b[0] = 1
	}
	return d.conn.SetConfig(cfgWriteback, b)
}

// StopQueue stops queue i with GET_VRING_BASE and returns the back-end's
// next available index (of a packed ring: its position, with the wrap counter in bit 15). Every request the back-end had popped has
// completed when it returns; requests it had not popped stay pending until
// StartQueue.
func (d *Device) StopQueue(i int) (uint16, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return 0, ErrClosed
	}
	q := d.queues[i]
	base, err := d.conn.GetVringBase(uint32(i))
	q.halt()
	if err != nil {
		return 0, err
	}
	q.base = base
	return uint16(base), nil
}

// VringBase is the base the back-end last returned for the queue in GET_VRING_BASE, all 32
// bits (a packed ring's positions and wrap counters), or the one it starts from.
func (q *Queue) VringBase() uint32 { return q.base }

// StartQueue restarts queue i after StopQueue, from the index the back-end
// returned, with new eventfds, as QEMU does when a stopped VM continues.
func (d *Device) StartQueue(i int) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	q := d.queues[i]
	if q.call != nil {
		return fmt.Errorf("queue %d is running", i)
	}
	return d.startQueue(q)
}

// Close disconnects from the back-end, fails the requests still in flight
// with ErrClosed and unmaps guest memory.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return nil
	}
	d.closed = true
	err := d.conn.Close()
	for _, q := range d.queues {
		q.close()
	}
	if d.mem != nil {
		err = errors.Join(err, d.mem.Close())
	}
	if d.inflight != nil {
		err = errors.Join(err, d.inflight.close())
	}
	return err
}
