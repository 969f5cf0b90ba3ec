package vhostuser

// Inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking",
// VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the back-end records in a buffer
// shared with the front-end which chains it has popped and not completed.
// The front-end keeps the buffer when the back-end dies and hands it to the
// restarted back-end (SET_INFLIGHT_FD), which resubmits those chains in the
// order they were first popped and continues popping after them. The guest
// sees every request completed exactly once.
//
// The buffer holds one region per queue. A split queue's region is a 16-byte
// header (features u64, version u16, desc_num u16, last_batch_head u16,
// used_idx u16) and desc_num 16-byte descriptor states (inflight u8, five
// bytes of padding, next u16, counter u64), all little-endian.

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"math"
	"runtime/debug"
	"slices"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

const (
	inflightVersion    = 1
	inflightHeaderSize = 16
	inflightDescSize   = 16
	// inflightAlign is the alignment of each queue's region; with it our
	// layout is the one libvhost-user uses.
	inflightAlign = 64
	// inflightMsgSize is struct VhostUserInflight with its trailing padding.
	inflightMsgSize = 24
	// inflightMinEntries is the fewest descriptor states a queue's region
	// has room for, whatever queue size GET_INFLIGHT_FD names: QEMU 10
	// names its queue-size (128) and then runs rings of up to its largest
	// ring size (1024; VIRTQUEUE_MAX_SIZE) on the same buffer. The layout
	// is ours: the front-end only hands the buffer back.
	inflightMinEntries = 1024

	// Offsets in a queue region's header and in a descriptor state.
	inflightOffVersion   = 8
	inflightOffDescNum   = 10
	inflightOffLastBatch = 12
	inflightOffUsedIdx   = 14
	descOffInflight      = 0
	descOffNext          = 6
	descOffCounter       = 8
)

// InflightMsg is the payload of GET_INFLIGHT_FD and SET_INFLIGHT_FD (the
// inflight description).
type InflightMsg struct {
	MmapSize, MmapOffset uint64
	NumQueues, QueueSize uint16
}

// Inflight decodes an inflight description.
func (m *Message) Inflight() (InflightMsg, error) {
	if err := m.wantSize(inflightMsgSize); err != nil {
		return InflightMsg{}, err
	}
	le := binary.LittleEndian
	p := m.Payload
	return InflightMsg{MmapSize: le.Uint64(p[0:]), MmapOffset: le.Uint64(p[8:]), NumQueues: le.Uint16(p[16:]), QueueSize: le.Uint16(p[18:])}, nil
}

func (im InflightMsg) encode() []byte {
	p := make([]byte, inflightMsgSize)
	le := binary.LittleEndian
	le.PutUint64(p[0:], im.MmapSize)
	le.PutUint64(p[8:], im.MmapOffset)
	le.PutUint16(p[16:], im.NumQueues)
	le.PutUint16(p[18:], im.QueueSize)
	return p
}

// InflightQueueRegionSize is the size of one split queue's inflight region
// for queues of queueSize entries.
func InflightQueueRegionSize(queueSize int) int {
	n := inflightHeaderSize + inflightDescSize*queueSize
	return (n + inflightAlign - 1) &^ (inflightAlign - 1)
}

// checkShape checks the queue count and size of an inflight description.
func (im InflightMsg) checkShape(maxQueues int) error {
	qs := int(im.QueueSize)
	switch {
	case im.NumQueues == 0 || int(im.NumQueues) > maxQueues:
		return fmt.Errorf("%w: inflight buffer for %d queues, the device has %d", ErrRejected, im.NumQueues, maxQueues)
	case qs == 0 || qs > virtio.MaxQueueSize || qs&(qs-1) != 0:
		return fmt.Errorf("%w: inflight buffer for queues of %d entries", ErrRejected, qs)
	}
	return nil
}

// newInflightBuffer answers GET_INFLIGHT_FD: a zeroed memfd holding one
// region per queue (version 0: not yet initialised). It is sealed against
// resizing, so that no one can truncate it under our mapping and turn an
// access into SIGBUS.
func newInflightBuffer(req InflightMsg, maxQueues int, packed bool) (fd int, reply InflightMsg, err error) {
	if err := req.checkShape(maxQueues); err != nil {
		return -1, InflightMsg{}, err
	}
	region := InflightQueueRegionSize(max(int(req.QueueSize), inflightMinEntries))
	if packed {
		region = InflightPackedRegionSize(max(int(req.QueueSize), inflightMinEntries))
	}
	size := int64(req.NumQueues) * int64(region)
	fd, err = unix.MemfdCreate("vublk-inflight", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return -1, InflightMsg{}, fmt.Errorf("inflight buffer: memfd_create: %w", err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		unix.Close(fd)
		return -1, InflightMsg{}, fmt.Errorf("inflight buffer: size %d: %w", size, err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		unix.Close(fd)
		return -1, InflightMsg{}, fmt.Errorf("inflight buffer: seal: %w", err)
	}
	return fd, InflightMsg{MmapSize: uint64(size), NumQueues: req.NumQueues, QueueSize: req.QueueSize}, nil
}

// inflightBuffer is the buffer of SET_INFLIGHT_FD mapped into this process.
type inflightBuffer struct {
	mapping []byte // the whole mmap, for munmap
	queues  [][]byte
	// entries is how many descriptor states each queue's region has room
	// for: rings up to that size are tracked.
	entries int
}

// mapInflightBuffer maps the buffer the front-end handed over. It always
// closes fd. The buffer must lie inside its file (a mapping beyond it would
// raise SIGBUS on access) and hold a region of the size we use for every
// queue, and the file must be sealed against shrinking (F_SEAL_SHRINK): the
// region is read on the connection's goroutine when a ring starts, where a
// fault is not caught, so a front-end must not be able to truncate it after
// the size check. Buffers from GET_INFLIGHT_FD are sealed, ours as
// libvhost-user's; QEMU hands them back as they are.
func mapInflightBuffer(im InflightMsg, fd int, maxQueues int) (*inflightBuffer, error) {
	defer unix.Close(fd)
	if err := im.checkShape(maxQueues); err != nil {
		return nil, err
	}
	// The buffer is split evenly between the queues (newInflightBuffer
	// makes regions larger than the queue size asks for).
	per := im.MmapSize / uint64(im.NumQueues)
	need := uint64(im.NumQueues) * uint64(InflightQueueRegionSize(int(im.QueueSize)))
	end := im.MmapOffset + im.MmapSize
	switch {
	case im.MmapSize < need:
		return nil, fmt.Errorf("%w: inflight buffer of %d bytes for %d queues of %d entries, want %d", ErrRejected, im.MmapSize, im.NumQueues, im.QueueSize, need)
	case end < im.MmapOffset || end > math.MaxInt:
		return nil, fmt.Errorf("%w: inflight buffer offset %#x size %#x overflows", ErrRejected, im.MmapOffset, im.MmapSize)
	}
	// Seals first, size after: a size read before the seal could be
	// shrunk before the seal was added.
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil || seals&unix.F_SEAL_SHRINK == 0 {
		return nil, fmt.Errorf("%w: inflight fd is not sealed against shrinking (F_SEAL_SHRINK; seals %#x, %v)", ErrRejected, seals, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat inflight fd: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%w: inflight fd is not a memory file", ErrRejected)
	}
	if uint64(st.Size) < end {
		return nil, fmt.Errorf("%w: inflight buffer ends at %#x beyond its file of %#x bytes", ErrRejected, end, st.Size)
	}
	// Map from offset 0, as for guest memory: mmap wants a page-aligned
	// offset, which mmap_offset need not be.
	m, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap inflight buffer: %w", err)
	}
	b := &inflightBuffer{mapping: m, entries: min(int(per-inflightHeaderSize)/inflightDescSize, virtio.MaxQueueSize)}
	for i := range uint64(im.NumQueues) {
		start := im.MmapOffset + i*per
		b.queues = append(b.queues, m[start:start+per:start+per])
	}
	return b, nil
}

func (b *inflightBuffer) unmap() {
	if b != nil && b.mapping != nil {
		unix.Munmap(b.mapping)
		b.mapping, b.queues = nil, nil
	}
}

// inflightQueue is one split queue's region: the virtio.InflightLog of a
// running ring. Its stores are plain stores in program order, which is the
// order they reach memory when the process is killed (the kernel sees every
// store made before the kill, none after); the front-end only hands the
// buffer on, it never reads it while we run.
type inflightQueue struct {
	b       []byte
	counter uint64 // popping order of the next chain popped
}

var _ virtio.InflightLog = (*inflightQueue)(nil)

func (q *inflightQueue) desc(head uint16) []byte {
	off := inflightHeaderSize + inflightDescSize*int(head)
	return q.b[off : off+inflightDescSize]
}

func (q *inflightQueue) u16(off int) uint16       { return binary.LittleEndian.Uint16(q.b[off:]) }
func (q *inflightQueue) setU16(off int, v uint16) { binary.LittleEndian.PutUint16(q.b[off:], v) }

// Popped implements virtio.InflightLog: counter first, then the flag, so a
// chain marked in flight always has its order.
func (q *inflightQueue) Popped(head uint16) {
	d := q.desc(head)
	binary.LittleEndian.PutUint64(d[descOffCounter:], q.counter)
	q.counter++
	d[descOffInflight] = 1
}

// Publishing implements virtio.InflightLog: head becomes the last batch (of
// one: used elements are published one at a time).
func (q *inflightQueue) Publishing(head uint16) {
	binary.LittleEndian.PutUint16(q.desc(head)[descOffNext:], q.u16(inflightOffLastBatch))
	q.setU16(inflightOffLastBatch, head)
}

// Published implements virtio.InflightLog: the flag is cleared before
// used_idx catches up with the ring, so that a kill in between is seen as an
// unfinished batch and repaired by resume.
func (q *inflightQueue) Published(head, usedIdx uint16) {
	q.desc(head)[descOffInflight] = 0
	q.setU16(inflightOffUsedIdx, usedIdx)
}

// resume prepares the region for a ring of ringSize entries whose used
// index is usedIdx, and returns what the ring must do: continue popping at
// lastAvail after resubmitting the heads in resubmit, in order. A region
// never used before (version 0) is initialised and fresh is true: the ring
// starts where the front-end said (SET_VRING_BASE).
func (q *inflightQueue) resume(ringSize int, queueSize int, usedIdx uint16) (lastAvail uint16, resubmit []uint16, fresh bool, err error) {
	version := q.u16(inflightOffVersion)
	n := int(q.u16(inflightOffDescNum)) // the states it was set up with
	switch {
	case version == 0:
		q.init(queueSize, usedIdx)
		return 0, nil, true, nil
	case version != inflightVersion:
		return 0, nil, false, fmt.Errorf("%w: inflight region version %d", ErrRejected, version)
	case n == 0 || n > queueSize:
		return 0, nil, false, fmt.Errorf("%w: inflight region for %d descriptors, room for %d", ErrRejected, n, queueSize)
	case !q.anyInflight(n):
		// Nothing to resubmit: whatever else the header says (a stale
		// batch list), the region starts empty. Popping still continues
		// after the used index, not at the front-end's base: a front-end
		// that lost its back-end gives the base it last knew, which may
		// be older than what was completed since (QEMU does).
		q.init(queueSize, usedIdx)
		return usedIdx, nil, false, nil
	}
	// A batch was published (the used index moved) but its descriptors
	// were not cleared: clear them now, following the batch list. A
	// difference larger than a ring is no batch: the region does not
	// belong to this ring state, and what it says is in flight cannot be
	// trusted.
	if batch := usedIdx - q.u16(inflightOffUsedIdx); batch != 0 {
		if int(batch) > ringSize {
			return 0, nil, false, fmt.Errorf("%w: used index %d, inflight region says %d", ErrRejected, usedIdx, q.u16(inflightOffUsedIdx))
		}
		head := q.u16(inflightOffLastBatch)
		for range batch {
			if int(head) >= min(ringSize, queueSize) { // the region has queueSize descriptors
				return 0, nil, false, fmt.Errorf("%w: inflight batch list reaches descriptor %d of %d", ErrRejected, head, min(ringSize, queueSize))
			}
			d := q.desc(head)
			d[descOffInflight] = 0
			head = binary.LittleEndian.Uint16(d[descOffNext:])
		}
		q.setU16(inflightOffUsedIdx, usedIdx)
	}
	type pending struct {
		head    uint16
		counter uint64
	}
	var found []pending
	for i := range n {
		d := q.desc(uint16(i))
		switch d[descOffInflight] {
		case 0:
			continue
		case 1:
		default:
			return 0, nil, false, fmt.Errorf("%w: descriptor %d has inflight flag %d", ErrRejected, i, d[descOffInflight])
		}
		if i >= ringSize {
			return 0, nil, false, fmt.Errorf("%w: descriptor %d in flight in a ring of %d", ErrRejected, i, ringSize)
		}
		found = append(found, pending{uint16(i), binary.LittleEndian.Uint64(d[descOffCounter:])})
	}
	slices.SortFunc(found, func(a, b pending) int { return resumeOrder(a.counter, a.head, b.counter, b.head) })
	q.counter = 0
	for _, p := range found {
		resubmit = append(resubmit, p.head)
		q.counter = max(q.counter, p.counter+1)
	}
	q.setU16(inflightOffDescNum, uint16(queueSize)) // the rest of the region is empty

	// Every chain popped was either published (usedIdx counts it) or is
	// in flight: popping continues after both.
	return usedIdx + uint16(len(found)), resubmit, false, nil
}

// resumeCatching is resume with a fault on the region caught and returned as
// a protocol error (the connection is closed), not a crash of the daemon.
// The region is sealed against shrinking (mapInflightBuffer), so a fault is
// not expected: this is the second line of defence, as on the data path.
func (q *inflightQueue) resumeCatching(ringSize int, queueSize int, usedIdx uint16) (lastAvail uint16, resubmit []uint16, fresh bool, err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			if _, fault := p.(interface{ Addr() uintptr }); !fault {
				panic(p)
			}
			lastAvail, resubmit, fresh = 0, nil, false
			err = fmt.Errorf("%w: fault reading the inflight buffer: %v", ErrProtocol, p)
		}
	}()
	return q.resume(ringSize, queueSize, usedIdx)
}

// init makes the region an empty one for queues of queueSize entries.
func (q *inflightQueue) init(queueSize int, usedIdx uint16) {
	clear(q.b)
	q.setU16(inflightOffDescNum, uint16(queueSize))
	q.setU16(inflightOffUsedIdx, usedIdx)
	q.setU16(inflightOffVersion, inflightVersion)
}

func (q *inflightQueue) anyInflight(queueSize int) bool {
	for i := range queueSize {
		if q.desc(uint16(i))[descOffInflight] != 0 {
			return true
		}
	}
	return false
}

// getInflightFd handles GET_INFLIGHT_FD: a new buffer, whose descriptor goes
// with the reply. A request we cannot make a buffer for is answered with an
// empty one (mmap_size 0, no descriptor), which front-ends take as "no
// inflight tracking" (QEMU goes on without it, as with a back-end that
// could not allocate one): the rings then run untracked.
func (c *conn) getInflightFd(m *Message) ([]byte, error) {
	req, err := m.Inflight()
	if err != nil {
		return nil, err // closing: its payload is no request we can answer
	}
	if c.protocol&(1<<ProtocolFInflightShmfd) == 0 {
		err = fmt.Errorf("%w: GET_INFLIGHT_FD without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD", ErrRejected)
	}
	var fd int
	var reply InflightMsg
	if err == nil {
		fd, reply, err = newInflightBuffer(req, c.numQueues, c.packed())
	}
	if err != nil {
		c.rejected.Log(logrus.Fields{"request": m.Request.String(), "error": err.Error()}, "no inflight buffer: the rings run without inflight tracking")
		return InflightMsg{NumQueues: req.NumQueues, QueueSize: req.QueueSize}.encode(), nil
	}
	c.replyFds = append(c.replyFds, fd)
	c.log.WithFields(logrus.Fields{"queues": reply.NumQueues, "queue_size": reply.QueueSize, "bytes": reply.MmapSize}).Debug("inflight buffer created")
	return reply.encode(), nil
}

// setInflightFd handles SET_INFLIGHT_FD: the buffer the rings track their
// chains in from their next start.
func (c *conn) setInflightFd(m *Message) error {
	if err := m.wantFds(1); err != nil {
		return err
	}
	if c.protocol&(1<<ProtocolFInflightShmfd) == 0 {
		return fmt.Errorf("%w: SET_INFLIGHT_FD without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD", ErrRejected)
	}
	im, err := m.Inflight()
	if err != nil {
		return err
	}
	fd := m.TakeFd(0)
	for _, v := range c.rings {
		if v.started() {
			unix.Close(fd)
			return fmt.Errorf("SET_INFLIGHT_FD while queue %d runs", v.index)
		}
	}
	b, err := mapInflightBuffer(im, fd, c.numQueues)
	if err != nil {
		// The rings run untracked rather than on a buffer the front-end
		// meant to replace.
		c.dropInflight()
		return err
	}
	c.inflight.unmap()
	c.inflight = b
	c.log.WithFields(logrus.Fields{"queues": im.NumQueues, "queue_size": im.QueueSize}).Debug("inflight buffer set")
	return nil
}

// dropInflight forgets the inflight buffer; the rings must be stopped.
func (c *conn) dropInflight() {
	c.inflight.unmap()
	c.inflight = nil
}

// resumeInflight makes a starting ring track its chains in the inflight
// buffer, and continue where the last back-end left off: chains it popped
// and never completed are resubmitted first, in the order it popped them.
// It reports whether anything was resumed (the driver may have missed an
// interrupt then).
func (c *conn) resumeInflight(v *vring, ring *virtio.SplitQueue) (bool, error) {
	if c.inflight == nil {
		return false, nil
	}
	if v.index >= len(c.inflight.queues) || v.num > c.inflight.entries {
		// The spec lets the ring be larger than the queue size the
		// front-end asked the buffer for: QEMU 10 gives 128 in
		// GET_INFLIGHT_FD and then runs rings of 256 and 1024 entries.
		// Our buffers have room for 1024 (inflightMinEntries), but one
		// handed over by another back-end, or a larger ring, may not fit.
		// Heads beyond the region cannot be recorded, so such a ring runs
		// untracked (a back-end killed meanwhile loses what was in
		// flight, as without inflight tracking) and the region is left as
		// it is for the rings that fit. A queue beyond the buffer's queue
		// count is served the same way.
		if !c.untrackedLogged {
			c.untrackedLogged = true
			c.log.WithFields(logrus.Fields{"queue": v.index, "size": v.num, "inflight_queues": len(c.inflight.queues), "inflight_entries": c.inflight.entries}).
				Info("ring larger than the inflight buffer: serving it without inflight tracking")
		}
		return false, nil
	}
	q := &inflightQueue{b: c.inflight.queues[v.index]}
	lastAvail, resubmit, fresh, err := q.resumeCatching(v.num, c.inflight.entries, ring.UsedIdx())
	if err != nil {
		return false, err
	}
	ring.SetInflightLog(q)
	if fresh {
		return false, nil
	}
	ring.Resume(lastAvail, resubmit)
	log := c.log.WithFields(logrus.Fields{"queue": v.index, "base": v.base, "last_avail": lastAvail, "resubmit": len(resubmit)})
	if len(resubmit) > 0 || uint32(lastAvail) != v.base {
		log.Info("resuming the queue from the inflight buffer")
	} else {
		log.Debug("inflight buffer: nothing to resubmit")
	}
	return true, nil
}

// resumeOrder orders requests found in flight in an inflight region for resubmission: in the
// order they were popped (their counter), and by head where two counters are equal (a region
// written by another back-end).
func resumeOrder(aCounter uint64, aHead uint16, bCounter uint64, bHead uint16) int {
	return cmp.Or(cmp.Compare(aCounter, bCounter), cmp.Compare(aHead, bHead))
}
