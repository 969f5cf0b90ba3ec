package virtio

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
)

// Packed virtqueue layout (virtio 1.2, section 2.8): one ring of 16-byte descriptors (addr, len,
// id, flags) that the driver makes available and the device marks used in place, and two 4-byte
// event suppression structures (off_wrap, flags).
const (
	packedDescFAvail = 1 << 7  // VIRTQ_DESC_F_AVAIL
	packedDescFUsed  = 1 << 15 // VIRTQ_DESC_F_USED

	eventFlagsEnable  = 0 // RING_EVENT_FLAGS_ENABLE
	eventFlagsDisable = 1 // RING_EVENT_FLAGS_DISABLE
	eventFlagsDesc    = 2 // RING_EVENT_FLAGS_DESC (only with VIRTIO_F_RING_EVENT_IDX)

	eventSuppressSize = 4

	// wrapBit is where a 15-bit ring position carries its wrap counter (off_wrap, and the
	// halves of PackedBase).
	wrapBit = 1 << 15
)

// PackedBase encodes the state a packed ring is stopped and started with
// (VHOST_USER_GET_VRING_BASE/SET_VRING_BASE, as QEMU and Linux vhost encode it): bits 0-14 the
// next descriptor to pop, bit 15 its wrap counter, bits 16-30 the next descriptor to mark
// used, bit 31 its wrap counter. A new ring is 0x80008000: both at 0, both counters 1.
func PackedBase(lastAvail uint16, availWrap bool, usedIdx uint16, usedWrap bool) uint32 {
	return uint32(withWrap(lastAvail, availWrap)) | uint32(withWrap(usedIdx, usedWrap))<<16
}

// InitialPackedBase is the base of a packed ring that was never used.
const InitialPackedBase = 0x80008000

func withWrap(idx uint16, wrap bool) uint16 {
	if wrap {
		return idx | wrapBit
	}
	return idx
}

// PackedQueue is the device side of one packed virtqueue. Its chains are named by buffer id.
//
// The popping side (Next, ReadChainLimited, DisableNotify, EnableNotify, Pending) and the
// completing side (PushUsed, NeedInterrupt, serialised by the caller) touch disjoint fields,
// except the per-id state, which an id's owner hands over: Next fills bufs[id] only after it
// took busy[id], and PushUsed reads it before it releases busy[id].
type PackedQueue struct {
	size     uint16
	desc     []byte // the descriptor ring
	driver   []byte // driver event suppression: when to interrupt (read)
	device   []byte // device event suppression: when to kick (written)
	mem      *GuestMemory
	eventIdx bool

	// popping side
	lastAvail uint16
	availWrap bool
	devFlags  uint16 // the flags last written to the device area
	resubmit  []uint16

	// bufs[id] is where the chain of buffer id starts in the ring and how many ring
	// descriptors it holds, while busy[id] is set (popped, not yet used).
	bufs []packedBuf
	busy []atomic.Bool
	// outstanding counts ring descriptors popped and not yet used: never more than the ring
	// holds, whatever the guest writes in the flags (wrap-counter confusion).
	outstanding atomic.Int32

	inflight PackedInflightLog // nil: not tracked

	logger  *DirtyLogger
	logUsed bool

	// completing side
	usedIdx        uint16
	usedWrap       bool
	signalledUsed  uint16
	signalledValid bool
}

type packedBuf struct {
	pos uint16 // ring index of the chain's first descriptor
	n   uint16 // ring descriptors in the chain
	// saved holds the n descriptors of a resubmitted chain (Resume), whose ring slots
	// other chains' used descriptors may have overwritten; nil: read the ring.
	saved []byte
}

// PackedInflightLog is told which chains a packed ring popped and completed (vhost-user.rst,
// "Inflight I/O tracking", packed virtqueues). Popped runs on the popping goroutine with the
// chain's ring descriptors as the guest wrote them (16 bytes each); Publishing and Published
// run where PushUsed does.
type PackedInflightLog interface {
	Popped(id uint16, descs [][]byte)
	// Publishing is called before the used descriptor of id is written, with the ring's
	// next used position and wrap counter once it is.
	Publishing(id uint16, usedIdx uint16, usedWrap bool)
	// Published is called once the used descriptor is visible.
	Published(id uint16)
}

// NewPackedQueue maps a packed ring of size descriptors: addrs.Desc is the descriptor ring,
// addrs.Avail the driver area and addrs.Used the device area (VHOST_USER_SET_VRING_ADDR), in the
// front-end's address space. base is PackedBase's encoding of where to go on.
func NewPackedQueue(mem *GuestMemory, size int, addrs RingAddrs, eventIdx bool, base uint32) (*PackedQueue, error) {
	if size <= 0 || size > MaxQueueSize {
		return nil, fmt.Errorf("%w: packed queue size %d is not in 1..%d", ErrBrokenRing, size, MaxQueueSize)
	}
	// Alignment (virtio 1.2, 2.8.10.1): 16 for the ring, 4 for the event structures.
	if addrs.Desc%16 != 0 || addrs.Avail%4 != 0 || addrs.Used%4 != 0 {
		return nil, fmt.Errorf("%w: misaligned packed ring addresses desc %#x driver %#x device %#x", ErrBrokenRing, addrs.Desc, addrs.Avail, addrs.Used)
	}
	q := &PackedQueue{size: uint16(size), mem: mem, eventIdx: eventIdx,
		bufs: make([]packedBuf, size), busy: make([]atomic.Bool, size)}
	q.lastAvail, q.availWrap = uint16(base)&^wrapBit, base&wrapBit != 0
	q.usedIdx, q.usedWrap = uint16(base>>16)&^wrapBit, base>>16&wrapBit != 0
	if q.lastAvail >= q.size || q.usedIdx >= q.size {
		return nil, fmt.Errorf("%w: packed ring base %#x beyond %d descriptors", ErrBrokenRing, base, size)
	}
	var err error
	if q.desc, err = mem.UserSlice(addrs.Desc, descSize*uint64(size)); err != nil {
		return nil, fmt.Errorf("descriptor ring: %w", err)
	}
	if q.driver, err = mem.UserSlice(addrs.Avail, eventSuppressSize); err != nil {
		return nil, fmt.Errorf("driver area: %w", err)
	}
	if q.device, err = mem.UserSlice(addrs.Used, eventSuppressSize); err != nil {
		return nil, fmt.Errorf("device area: %w", err)
	}
	q.devFlags = 0xffff // unknown: the first DisableNotify writes
	// Descriptors between the used and the available position were popped by a back-end
	// before us and are not ours to complete (Resume takes them back).
	q.outstanding.Store(int32(q.ringDistance(q.usedIdx, q.usedWrap, q.lastAvail, q.availWrap)))
	return q, nil
}

// ringDistance is how many descriptors lie from (from, fromWrap) forward to (to, toWrap).
func (q *PackedQueue) ringDistance(from uint16, fromWrap bool, to uint16, toWrap bool) int {
	d := int(to) - int(from)
	if fromWrap != toWrap {
		d += int(q.size)
	}
	if d < 0 || d > int(q.size) {
		return int(q.size) // impossible: nothing more can be popped until Resume
	}
	return d
}

// SetInflightLog makes l (nil: none) track the chains popped from now on. Call it before the
// queue is processed.
func (q *PackedQueue) SetInflightLog(l PackedInflightLog) { q.inflight = l }

// SetUsedLog makes the device's writes to the ring (used descriptors, the device area) be
// logged in the active log of logger while it has one (VHOST_VRING_F_LOG). A packed ring's
// used writes land in the descriptor ring, so they are logged by guest address.
func (q *PackedQueue) SetUsedLog(logger *DirtyLogger) { q.logger, q.logUsed = logger, true }

func (q *PackedQueue) logWrite(b []byte) {
	if !q.logUsed {
		return
	}
	if l := q.logger.Load(); l != nil {
		q.mem.markDirty(l, b)
	}
}

// DescRing is the descriptor ring in guest memory (for inflight tracking's resume, which
// reads it on the connection's goroutine).
func (q *PackedQueue) DescRing() []byte { return q.desc }

// Size is the number of descriptors in the ring.
func (q *PackedQueue) Size() int { return int(q.size) }

// Base is the ring's position in PackedBase's encoding. Call it only once every popped chain
// was pushed (the queue drained).
func (q *PackedQueue) Base() uint32 {
	return PackedBase(q.lastAvail, q.availWrap, q.usedIdx, q.usedWrap)
}

// UsedIdx is the next used position and its wrap counter.
func (q *PackedQueue) UsedIdx() (uint16, bool) { return q.usedIdx, q.usedWrap }

// idFlags reads the id and flags of descriptor i in one atomic load (they share a word).
func (q *PackedQueue) idFlags(i uint16) (id, flags uint16) {
	w := load32(q.desc, descSize*int(i)+12)
	return uint16(w), uint16(w >> 16)
}

// isAvail says whether flags mark a descriptor available in the lap of wrap counter wrap
// (virtio 1.2, 2.8.1: AVAIL equals the counter, USED does not).
func isAvail(flags uint16, wrap bool) bool {
	return (flags&packedDescFAvail != 0) == wrap && (flags&packedDescFUsed != 0) != wrap
}

// advance moves a ring position by n descriptors, flipping wrap when it passes the end.
func (q *PackedQueue) advance(pos uint16, wrap bool, n uint16) (uint16, bool) {
	p := uint32(pos) + uint32(n)
	if p >= uint32(q.size) {
		p -= uint32(q.size)
		wrap = !wrap
	}
	return uint16(p), wrap
}

// Next pops the next available chain and returns its buffer id. It reads only the chain's ring
// descriptors' flags and ids (ReadChainLimited reads the rest); a chain that runs into a
// descriptor that is not available, is longer than the ring or than what is free of it, or
// names an id out of range or still in flight, is ErrBrokenRing.
func (q *PackedQueue) Next() (id uint16, ok bool, err error) {
	if len(q.resubmit) > 0 {
		id, q.resubmit = q.resubmit[0], q.resubmit[1:]
		return id, true, nil
	}
	pos, wrap := q.lastAvail, q.availWrap
	id, flags := q.idFlags(pos)
	if !isAvail(flags, wrap) {
		return 0, false, nil
	}
	n := uint16(1)
	for flags&DescFNext != 0 {
		if n >= q.size {
			return 0, false, fmt.Errorf("%w: packed chain at %d is longer than the ring (%d)", ErrBrokenRing, q.lastAvail, q.size)
		}
		pos, wrap = q.advance(pos, wrap, 1)
		id, flags = q.idFlags(pos)
		if !isAvail(flags, wrap) {
			return 0, false, fmt.Errorf("%w: packed chain at %d continues into descriptor %d, which is not available", ErrBrokenRing, q.lastAvail, pos)
		}
		n++
	}
	// The buffer id is the last descriptor's (virtio 1.2, 2.8.6).
	switch {
	case id >= q.size:
		return 0, false, fmt.Errorf("%w: buffer id %d beyond queue size %d", ErrBrokenRing, id, q.size)
	case int(q.outstanding.Load())+int(n) > int(q.size):
		return 0, false, fmt.Errorf("%w: chain of %d descriptors at %d with %d of %d in flight", ErrBrokenRing, n, q.lastAvail, q.outstanding.Load(), q.size)
	case !q.busy[id].CompareAndSwap(false, true):
		return 0, false, fmt.Errorf("%w: buffer id %d made available while in flight", ErrBrokenRing, id)
	}
	q.bufs[id] = packedBuf{pos: q.lastAvail, n: n}
	q.outstanding.Add(int32(n))
	if q.inflight != nil {
		q.inflight.Popped(id, q.ringDescs(q.lastAvail, n))
	}
	q.lastAvail, q.availWrap = q.advance(q.lastAvail, q.availWrap, n)
	return id, true, nil
}

// ringDescs returns the n ring descriptors from pos (for the inflight log).
func (q *PackedQueue) ringDescs(pos, n uint16) [][]byte {
	out := make([][]byte, 0, n)
	for range n {
		out = append(out, q.desc[descSize*int(pos):descSize*int(pos)+descSize])
		pos, _ = q.advance(pos, false, 1)
	}
	return out
}

// Pending reports whether Next would find another chain now.
func (q *PackedQueue) Pending() bool {
	if len(q.resubmit) > 0 {
		return true
	}
	_, flags := q.idFlags(q.lastAvail)
	return isAvail(flags, q.availWrap)
}

// ReadChainLimited walks the chain of buffer id, as Next found it, into c within lim, with the
// rules and the over-limit reporting of SplitQueue.ReadChainLimited. The ring descriptors are
// copied out once each and checked again: the guest may have rewritten them since Next. An
// indirect table's descriptors are taken in order, len/16 of them (virtio 1.2, 2.8.7).
func (q *PackedQueue) ReadChainLimited(id uint16, c *DescChain, lim ChainLimits) error {
	c.Head = id
	c.Segs = c.Segs[:0]
	c.Walked = 0
	if id >= q.size || !q.busy[id].Load() {
		return fmt.Errorf("%w: buffer id %d is not in flight", ErrBadChain, id)
	}
	b := q.bufs[id]
	w := chainWalk{c: c, lim: lim}
	pos := b.pos
	for i := uint16(0); i < b.n; i++ {
		d := q.desc[descSize*int(pos) : descSize*int(pos)+descSize]
		if b.saved != nil {
			d = b.saved[descSize*int(i) : descSize*int(i)+descSize]
		}
		addr := binary.LittleEndian.Uint64(d[0:])
		length := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[14:])
		c.Walked++
		if (flags&DescFNext != 0) != (i+1 < b.n) {
			return fmt.Errorf("%w: packed chain of buffer %d changed while it was popped", ErrBadChain, id)
		}
		if flags&DescFIndirect != 0 {
			switch {
			case b.n != 1:
				return fmt.Errorf("%w: indirect descriptor must be the whole chain", ErrBadChain)
			case length == 0 || length%descSize != 0 || length/descSize > maxIndirect:
				return fmt.Errorf("%w: indirect table length %d", ErrBadChain, length)
			}
			t, err := q.mem.Slice(addr, uint64(length))
			if err != nil {
				return fmt.Errorf("%w: indirect table: %w", ErrBadChain, err)
			}
			for j := 0; j < len(t); j += descSize {
				e := t[j : j+descSize]
				ef := binary.LittleEndian.Uint16(e[14:])
				c.Walked++
				if ef&DescFIndirect != 0 {
					return fmt.Errorf("%w: indirect descriptor inside an indirect table", ErrBadChain)
				}
				if err := w.add(binary.LittleEndian.Uint64(e[0:]), binary.LittleEndian.Uint32(e[8:]), ef&DescFWrite != 0); err != nil {
					return err
				}
			}
			break
		}
		if err := w.add(addr, length, flags&DescFWrite != 0); err != nil {
			return err
		}
		pos, _ = q.advance(pos, false, 1)
	}
	return w.end(id)
}

// chainWalk collects the segments of a packed chain within lim, as SplitQueue.ReadChainLimited
// does: past the limit it only keeps the last descriptor.
type chainWalk struct {
	c        *DescChain
	lim      ChainLimits
	sawWrite bool
	over     bool
	last     Segment
}

func (w *chainWalk) add(addr uint64, length uint32, write bool) error {
	if w.sawWrite && !write {
		return fmt.Errorf("%w: device-readable descriptor after a writable one", ErrBadChain)
	}
	w.sawWrite = w.sawWrite || write
	w.last = Segment{Addr: addr, Len: length, Write: write}
	if !w.over && ((w.lim.MaxSegs > 0 && len(w.c.Segs) >= w.lim.MaxSegs) || (w.lim.MaxSegLen > 0 && length > w.lim.MaxSegLen)) {
		w.over = true
	}
	if !w.over {
		w.c.Segs = append(w.c.Segs, w.last)
	}
	return nil
}

func (w *chainWalk) end(id uint16) error {
	if w.over {
		w.c.Segs = append(w.c.Segs[:0], w.last)
		return fmt.Errorf("%w: buffer %d: %d descriptors, at most %d of at most %d bytes each", ErrChainLimit, id, w.c.Walked, w.lim.MaxSegs, w.lim.MaxSegLen)
	}
	if w.c.Walked == 0 {
		return fmt.Errorf("%w: buffer %d has no descriptors", ErrBadChain, id)
	}
	return nil
}

// PushUsed marks buffer id used, with written bytes, at the next used position, and skips the
// chain's other descriptors (virtio 1.2, 2.8.9 and 2.8.21): completions may come in any order.
// The id and flags are one atomic store after the length, so the driver sees a whole used
// descriptor.
func (q *PackedQueue) PushUsed(id uint16, written uint32) {
	if id >= q.size {
		return // not a token Next returned
	}
	n := q.bufs[id].n
	nextUsed, nextWrap := q.advance(q.usedIdx, q.usedWrap, n)
	if q.inflight != nil {
		q.inflight.Publishing(id, nextUsed, nextWrap)
	}
	// Released before the used descriptor is visible: the driver may make id available again
	// at once.
	q.outstanding.Add(-int32(n))
	q.busy[id].Store(false)
	slot := descSize * int(q.usedIdx)
	binary.LittleEndian.PutUint32(q.desc[slot+8:], written)
	var flags uint32
	if q.usedWrap {
		flags = packedDescFAvail | packedDescFUsed
	}
	store32(q.desc, slot+12, uint32(id)|flags<<16)
	q.logWrite(q.desc[slot : slot+descSize])
	q.usedIdx, q.usedWrap = nextUsed, nextWrap
	if q.inflight != nil {
		q.inflight.Published(id)
	}
}

// NeedInterrupt reports whether the driver asked for an interrupt for what was pushed since the
// last call: its event suppression flags, or with VIRTIO_F_RING_EVENT_IDX and flags DESC, whether
// the used position it named was passed (virtio 1.2, 2.8.10).
func (q *PackedQueue) NeedInterrupt() bool {
	fence()
	w := load32(q.driver, 0)
	offWrap, flags := uint16(w), uint16(w>>16)&3
	old, valid, now := q.signalledUsed, q.signalledValid, q.usedIdx
	q.signalledUsed, q.signalledValid = now, true
	switch {
	case flags == eventFlagsDisable:
		return false
	case flags != eventFlagsDesc || !q.eventIdx:
		return true
	case !valid || old == now: // first, or a whole lap since: cannot tell, interrupt
		return true
	}
	off := int(offWrap &^ wrapBit)
	if (offWrap&wrapBit != 0) != q.usedWrap {
		off -= int(q.size) // the event is in the previous lap
	}
	return needEvent(uint16(off), now, old)
}

// DisableNotify asks the driver not to kick while we are popping. With
// VIRTIO_F_RING_EVENT_IDX the event position is simply not advanced.
func (q *PackedQueue) DisableNotify() {
	if q.eventIdx || q.devFlags == eventFlagsDisable {
		return
	}
	q.devFlags = eventFlagsDisable
	store16(q.device, 2, eventFlagsDisable)
	q.logWrite(q.device)
}

// EnableNotify asks the driver to kick for the next available descriptor, then looks at it
// again: true means it arrived in the meantime and the caller must pop again.
func (q *PackedQueue) EnableNotify() (more bool) {
	if q.eventIdx {
		q.devFlags = eventFlagsDesc
		store32(q.device, 0, uint32(withWrap(q.lastAvail, q.availWrap))|eventFlagsDesc<<16)
	} else {
		q.devFlags = eventFlagsEnable
		store16(q.device, 2, eventFlagsEnable)
	}
	q.logWrite(q.device)
	fence()
	_, flags := q.idFlags(q.lastAvail)
	return isAvail(flags, q.availWrap)
}

// ResumePacked is one chain to resubmit after a back-end died (PackedQueue.Resume).
type ResumePacked struct {
	// ID is the chain's buffer id.
	ID uint16
	// Descs are its ring descriptors as the driver wrote them, 16 bytes each (the inflight
	// region's copy: in the ring, used descriptors of other chains may have overwritten them).
	Descs []byte
}

// Resume makes Next return the chains of resubmit first, in this order: chains a back-end that
// died had popped and not completed (inflight tracking). lastAvail/availWrap and
// usedIdx/usedWrap are where popping and completing go on. Entries that do not fit the ring
// are dropped (the caller has checked them). Call it before the queue is processed.
func (q *PackedQueue) Resume(lastAvail uint16, availWrap bool, usedIdx uint16, usedWrap bool, resubmit []ResumePacked) {
	q.lastAvail, q.availWrap = lastAvail%q.size, availWrap
	q.usedIdx, q.usedWrap = usedIdx%q.size, usedWrap
	q.resubmit = q.resubmit[:0]
	total := 0
	for _, r := range resubmit {
		n := len(r.Descs) / descSize
		if r.ID >= q.size || n == 0 || len(r.Descs)%descSize != 0 || total+n > int(q.size) || q.busy[r.ID].Load() {
			continue
		}
		total += n
		q.busy[r.ID].Store(true)
		q.bufs[r.ID] = packedBuf{n: uint16(n), saved: append([]byte(nil), r.Descs...)}
		q.resubmit = append(q.resubmit, r.ID)
	}
	q.outstanding.Store(int32(total))
}
