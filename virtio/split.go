package virtio

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"
)

// Split virtqueue layout (virtio 1.2, section 2.7).
const (
	descSize = 16

	DescFNext     = 1 // VIRTQ_DESC_F_NEXT
	DescFWrite    = 2 // VIRTQ_DESC_F_WRITE: device-writable
	DescFIndirect = 4 // VIRTQ_DESC_F_INDIRECT

	availFNoInterrupt = 1 // VIRTQ_AVAIL_F_NO_INTERRUPT
	usedFNoNotify     = 1 // VIRTQ_USED_F_NO_NOTIFY

	// MaxQueueSize is the largest split virtqueue (2^15).
	MaxQueueSize = 32768
	// maxIndirect bounds an indirect table (entries).
	maxIndirect = MaxQueueSize
)

// RingAddrs are the three parts of a split ring in the frontend's virtual
// address space (VHOST_USER_SET_VRING_ADDR).
type RingAddrs struct {
	Desc, Avail, Used uint64
}

// SplitQueue is the device side of one split virtqueue.
//
// Next, ReadChain, DisableNotify and EnableNotify belong to the one goroutine
// that pops the queue; PushUsed and NeedInterrupt must be serialised by the
// caller (completions come from several lanes). The two sides touch disjoint
// fields of this struct.
type SplitQueue struct {
	size     uint16
	desc     []byte
	avail    []byte
	used     []byte
	mem      *GuestMemory
	eventIdx bool

	// popping side
	lastAvail uint16
	usedFlags uint16
	resubmit  []uint16 // heads to pop again before the available ring (Resume)

	inflight InflightLog // nil: not tracked

	// Dirty logging of the used ring (VHOST_VRING_F_LOG): writes to it are logged at usedLogGPA
	// plus their offset while logger has a log.
	logger     *DirtyLogger
	usedLogGPA uint64
	logUsed    bool

	// completing side
	usedIdx        uint16
	signalledUsed  uint16
	signalledValid bool
}

// NewSplitQueue maps a split ring of size entries at addrs. lastAvail is the
// index of the next available entry to pop (VHOST_USER_SET_VRING_BASE); the
// used index is read from the ring.
func NewSplitQueue(mem *GuestMemory, size int, addrs RingAddrs, eventIdx bool, lastAvail uint16) (*SplitQueue, error) {
	if size <= 0 || size > MaxQueueSize || size&(size-1) != 0 {
		return nil, fmt.Errorf("%w: queue size %d is not a power of two in 1..%d", ErrBrokenRing, size, MaxQueueSize)
	}
	// Alignment rules of virtio 1.2 section 2.7: 16, 2 and 4 bytes.
	if addrs.Desc%16 != 0 || addrs.Avail%2 != 0 || addrs.Used%4 != 0 {
		return nil, fmt.Errorf("%w: misaligned ring addresses desc %#x avail %#x used %#x", ErrBrokenRing, addrs.Desc, addrs.Avail, addrs.Used)
	}
	n := uint64(size)
	q := &SplitQueue{size: uint16(size), mem: mem, eventIdx: eventIdx, lastAvail: lastAvail}
	var err error
	if q.desc, err = mem.UserSlice(addrs.Desc, descSize*n); err != nil {
		return nil, fmt.Errorf("descriptor table: %w", err)
	}
	if q.avail, err = mem.UserSlice(addrs.Avail, 6+2*n); err != nil {
		return nil, fmt.Errorf("available ring: %w", err)
	}
	if q.used, err = mem.UserSlice(addrs.Used, 6+8*n); err != nil {
		return nil, fmt.Errorf("used ring: %w", err)
	}
	if err := q.readUsed(); err != nil {
		return nil, err
	}
	return q, nil
}

// readUsed loads the used ring's index and flags; it runs on the connection's goroutine, so a
// fault on guest memory is caught here.
func (q *SplitQueue) readUsed() (err error) {
	defer catchFault(debug.SetPanicOnFault(true), &err)
	q.usedIdx = load16(q.used, 2)
	q.usedFlags = load16(q.used, 0)
	return nil
}

// SetUsedLog makes writes to the used ring (elements, index, flags, avail_event) be logged
// in the active log of logger, at gpa (log_guest_addr of VHOST_USER_SET_VRING_ADDR) plus their
// offset in the ring. Call it before the queue is processed.
func (q *SplitQueue) SetUsedLog(logger *DirtyLogger, gpa uint64) {
	q.logger, q.usedLogGPA, q.logUsed = logger, gpa, true
}

// logUsedWrite logs a write of n bytes at offset off of the used ring.
func (q *SplitQueue) logUsedWrite(off, n int) {
	if !q.logUsed {
		return
	}
	if l := q.logger.Load(); l != nil {
		l.Mark(q.usedLogGPA+uint64(off), uint64(n))
	}
}

// InflightLog is told which chains the device has popped and not yet
// completed, in memory that outlives the back-end process, so that a
// restarted back-end can resubmit them (vhost-user.rst, "Inflight I/O
// tracking"). Popped runs on the popping goroutine; Publishing and Published
// run where PushUsed does, serialised by its caller.
type InflightLog interface {
	// Popped is called with the head of a chain just taken from the
	// available ring, before it is processed.
	Popped(head uint16)
	// Publishing is called before the used element for head is written.
	Publishing(head uint16)
	// Published is called once usedIdx, the used index that publishes
	// head, is visible to the driver.
	Published(head, usedIdx uint16)
}

// SetInflightLog makes l (nil: none) track the chains popped from now on.
// Call it before the queue is processed.
func (q *SplitQueue) SetInflightLog(l InflightLog) { q.inflight = l }

// Resume continues a queue that a back-end that died had been processing:
// popping the available ring goes on at lastAvail, and first Next returns
// resubmit, the heads of chains it had popped and not completed, in this
// order. Call it before the queue is processed; heads beyond the queue size
// are dropped (the caller has checked them).
func (q *SplitQueue) Resume(lastAvail uint16, resubmit []uint16) {
	q.lastAvail = lastAvail
	q.resubmit = q.resubmit[:0]
	for _, h := range resubmit {
		if h < q.size {
			q.resubmit = append(q.resubmit, h)
		}
	}
}

// Size is the number of entries.
func (q *SplitQueue) Size() int { return int(q.size) }

// LastAvail is the index of the next available entry to pop.
func (q *SplitQueue) LastAvail() uint16 { return q.lastAvail }

// UsedIdx is the index of the next used entry to publish.
func (q *SplitQueue) UsedIdx() uint16 { return q.usedIdx }

// Next pops the head of the next available chain. ok is false when the ring
// is empty. An impossible ring state is ErrBrokenRing.
func (q *SplitQueue) Next() (head uint16, ok bool, err error) {
	if len(q.resubmit) > 0 {
		head, q.resubmit = q.resubmit[0], q.resubmit[1:]
		return head, true, nil
	}
	availIdx := load16(q.avail, 2)
	pending := availIdx - q.lastAvail
	if pending == 0 {
		return 0, false, nil
	}
	if pending > q.size {
		return 0, false, fmt.Errorf("%w: avail idx %d, last popped %d, size %d", ErrBrokenRing, availIdx, q.lastAvail, q.size)
	}
	head = load16(q.avail, 4+2*int(q.lastAvail%q.size))
	if head >= q.size {
		return 0, false, fmt.Errorf("%w: head %d beyond queue size %d", ErrBrokenRing, head, q.size)
	}
	if q.inflight != nil {
		q.inflight.Popped(head)
	}
	q.lastAvail++
	return head, true, nil
}

// Pending reports whether Next would find another chain now (it may also
// be a broken ring: Next says so).
func (q *SplitQueue) Pending() bool {
	return len(q.resubmit) > 0 || load16(q.avail, 2) != q.lastAvail
}

// Segment is one buffer of a descriptor chain, as the guest described it.
type Segment struct {
	Addr  uint64
	Len   uint32
	Write bool // device-writable
}

// DescChain is a walked descriptor chain. Reuse one across calls to avoid
// allocating.
type DescChain struct {
	Head uint16
	Segs []Segment
	// Walked is how many descriptors the last walk read (including those
	// past a limit), the work it cost: ProcessQueue charges it to the
	// queue's turn.
	Walked int
}

// ChainLimits bound what ReadChainLimited collects of one chain: what the
// device advertised (virtio-blk seg_max and size_max). Zero fields do not
// limit.
type ChainLimits struct {
	// MaxSegs is the most descriptors (after following an indirect table)
	// a chain may have.
	MaxSegs int
	// MaxSegLen is the largest length one descriptor may have.
	MaxSegLen uint32
}

// ReadChain walks the chain starting at head into c, following at most one
// indirect table. Each descriptor is copied out of guest memory once and the
// copy is checked: the guest may rewrite the table meanwhile.
func (q *SplitQueue) ReadChain(head uint16, c *DescChain) error {
	return q.ReadChainLimited(head, c, ChainLimits{})
}

// ReadChainLimited is ReadChain within lim. A chain that is well formed but
// exceeds lim is ErrChainLimit: nothing more is collected from the
// descriptor that went over (no memory grows with the guest's chain), the
// rest of the chain is only walked, within its table, to find its end, and
// c.Segs then holds only the chain's last descriptor, whose last byte is the
// status byte of a virtio-blk request. A malformed chain is still
// ErrBadChain.
func (q *SplitQueue) ReadChainLimited(head uint16, c *DescChain, lim ChainLimits) error {
	c.Head = head
	c.Segs = c.Segs[:0]
	c.Walked = 0
	table := q.desc
	limit := int(q.size) // entries in the current table, and max steps in it
	idx := int(head)
	indirect := false
	sawWrite := false
	over := false // beyond lim: walk only
	var last Segment
	for steps := 0; ; steps++ {
		if steps >= limit {
			return fmt.Errorf("%w: chain at head %d is longer than its table (%d)", ErrBadChain, head, limit)
		}
		if idx >= limit {
			return fmt.Errorf("%w: next index %d beyond table of %d", ErrBadChain, idx, limit)
		}
		c.Walked++
		d := table[descSize*idx : descSize*idx+descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])

		if flags&DescFIndirect != 0 {
			switch {
			case indirect:
				return fmt.Errorf("%w: indirect descriptor inside an indirect table", ErrBadChain)
			case c.Walked > 1 || flags&DescFNext != 0: // not len(c.Segs): past a limit they are not kept
				return fmt.Errorf("%w: indirect descriptor must be the whole chain", ErrBadChain)
			case length == 0 || length%descSize != 0 || length/descSize > maxIndirect:
				return fmt.Errorf("%w: indirect table length %d", ErrBadChain, length)
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("%w: indirect table: %w", ErrBadChain, err)
			}
			table, limit, idx, indirect, steps = t, int(length/descSize), 0, true, -1
			continue
		}
		write := flags&DescFWrite != 0
		if sawWrite && !write {
			return fmt.Errorf("%w: device-readable descriptor after a writable one", ErrBadChain)
		}
		sawWrite = sawWrite || write
		last = Segment{Addr: addr, Len: length, Write: write}
		if !over && ((lim.MaxSegs > 0 && len(c.Segs) >= lim.MaxSegs) || (lim.MaxSegLen > 0 && length > lim.MaxSegLen)) {
			over = true
		}
		if !over {
			c.Segs = append(c.Segs, last)
		}
		if flags&DescFNext == 0 {
			if over {
				c.Segs = append(c.Segs[:0], last)
				return fmt.Errorf("%w: head %d: %d descriptors, at most %d of at most %d bytes each", ErrChainLimit, head, c.Walked, lim.MaxSegs, lim.MaxSegLen)
			}
			return nil
		}
		idx = int(next)
	}
}

// PushUsed publishes one used element: the chain at head, of which the device
// wrote written bytes. The element is written before the index that
// publishes it (store16 is a full barrier).
func (q *SplitQueue) PushUsed(head uint16, written uint32) {
	if q.inflight != nil {
		q.inflight.Publishing(head)
	}
	slot := 4 + 8*int(q.usedIdx%q.size)
	binary.LittleEndian.PutUint32(q.used[slot:], uint32(head))
	binary.LittleEndian.PutUint32(q.used[slot+4:], written)
	q.logUsedWrite(slot, 8)
	q.usedIdx++
	store16(q.used, 2, q.usedIdx)
	q.logUsedWrite(2, 2)
	if q.inflight != nil {
		q.inflight.Published(head, q.usedIdx)
	}
}

// NeedInterrupt reports whether the driver wants an interrupt for what was
// pushed since the last interrupt (VIRTIO_F_EVENT_IDX's used_event, or the
// avail ring's NO_INTERRUPT flag without it).
func (q *SplitQueue) NeedInterrupt() bool {
	fence()
	if !q.eventIdx {
		return load16(q.avail, 0)&availFNoInterrupt == 0
	}
	usedEvent := load16(q.avail, 4+2*int(q.size))
	valid, old, now := q.signalledValid, q.signalledUsed, q.usedIdx
	q.signalledValid, q.signalledUsed = true, now
	return !valid || needEvent(usedEvent, now, old)
}

// needEvent is vring_need_event of the virtio spec: whether event lies in
// [old, now), i.e. the used entry at index event was written since old.
func needEvent(event, now, old uint16) bool {
	return now-event-1 < now-old
}

// DisableNotify asks the driver not to kick while we are popping (or
// polling the ring).
func (q *SplitQueue) DisableNotify() {
	if q.eventIdx {
		// avail_event one behind the next entry to pop: the driver's next
		// additions do not cross it (virtio 1.2 2.7.10), so it does not
		// kick, however long the device polls. EnableNotify moves it up.
		store16(q.used, 4+8*int(q.size), q.lastAvail-1)
		q.logUsedWrite(4+8*int(q.size), 2)
		return
	}
	if q.usedFlags&usedFNoNotify == 0 {
		q.usedFlags |= usedFNoNotify
		store16(q.used, 0, q.usedFlags)
		q.logUsedWrite(0, 2)
	}
}

// EnableNotify asks the driver to kick for the next available entry, then
// re-reads the available index: if it returns true, entries arrived in the
// meantime and the caller must pop again.
func (q *SplitQueue) EnableNotify() (more bool) {
	if q.eventIdx {
		store16(q.used, 4+8*int(q.size), q.lastAvail)
		q.logUsedWrite(4+8*int(q.size), 2)
	} else {
		q.usedFlags &^= usedFNoNotify
		store16(q.used, 0, q.usedFlags)
		q.logUsedWrite(0, 2)
	}
	fence()
	return load16(q.avail, 2) != q.lastAvail
}
