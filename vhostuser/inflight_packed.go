package vhostuser

// Inflight I/O tracking for packed rings (vhost-user.rst, "Inflight I/O tracking", packed
// virtqueues). In a packed ring a used descriptor overwrites whatever the driver had put at the
// next used position, which may be a chain still in flight: so the region keeps a copy of every
// ring descriptor popped and not yet completed, not only which chains those were.
//
// A packed queue's region is a 32-byte header (features u64, version u16, desc_num u16,
// free_head u16, old_free_head u16, used_idx u16, old_used_idx u16, used_wrap_counter u8,
// old_used_wrap_counter u8, padding) and desc_num 32-byte descriptor states (inflight u8,
// padding u8, next u16, last u16, num u16, counter u64, id u16, flags u16, len u32, addr u64),
// little-endian. The states not in flight form a free list from free_head; a chain takes the
// next states of the list, the first (its head) holding inflight, counter, num and last. The
// old_* fields are the last consistent state: a back-end killed while completing a chain left
// the current ones half updated, and the ring itself tells whether the used descriptor was
// written (then the update is committed) or not (rolled back).

import (
	"encoding/binary"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/virtio"
)

const (
	packedHeaderSize = 32
	packedStateSize  = 32

	pOffVersion     = 8
	pOffDescNum     = 10
	pOffFreeHead    = 12
	pOffOldFreeHead = 14
	pOffUsedIdx     = 16
	pOffOldUsedIdx  = 18
	pOffUsedWrap    = 20
	pOffOldUsedWrap = 21

	sOffInflight = 0
	sOffNext     = 2
	sOffLast     = 4
	sOffNum      = 6
	sOffCounter  = 8
	sOffID       = 16
	sOffFlags    = 18
	sOffLen      = 20
	sOffAddr     = 24
)

// InflightPackedRegionSize is the size of one packed queue's inflight region for rings of
// queueSize descriptors.
func InflightPackedRegionSize(queueSize int) int {
	n := packedHeaderSize + packedStateSize*queueSize
	return (n + inflightAlign - 1) &^ (inflightAlign - 1)
}

// packedInflight is one packed queue's region: the virtio.PackedInflightLog of a running ring.
// The popping goroutine (Popped) and the completions (Publishing, then Published, for one
// chain at a time) both move the free list, so a mutex orders them: it is held from Publishing
// to Published, so that a chain popped meanwhile cannot commit a half-done completion into the
// old_* fields.
type packedInflight struct {
	mu      sync.Mutex
	b       []byte
	n       int      // descriptor states
	counter uint64   // popping order of the next chain
	headOf  []uint16 // the head state of each buffer id in flight
}

var _ virtio.PackedInflightLog = (*packedInflight)(nil)

func (p *packedInflight) u16(off int) uint16       { return binary.LittleEndian.Uint16(p.b[off:]) }
func (p *packedInflight) setU16(off int, v uint16) { binary.LittleEndian.PutUint16(p.b[off:], v) }
func (p *packedInflight) state(i uint16) []byte {
	off := packedHeaderSize + packedStateSize*int(i)
	return p.b[off : off+packedStateSize]
}

// init makes the region empty, every state free, for a ring continuing at used.
func (p *packedInflight) init(used uint16, usedWrap bool) {
	clear(p.b)
	for i := range p.n {
		binary.LittleEndian.PutUint16(p.state(uint16(i))[sOffNext:], uint16(i+1))
	}
	p.setU16(pOffDescNum, uint16(p.n))
	p.setU16(pOffUsedIdx, used)
	p.setU16(pOffOldUsedIdx, used)
	w := byte(0)
	if usedWrap {
		w = 1
	}
	p.b[pOffUsedWrap], p.b[pOffOldUsedWrap] = w, w
	p.setU16(pOffVersion, inflightVersion)
}

// Popped implements virtio.PackedInflightLog: the chain's descriptors go into the next free
// states; the head is marked in flight, and old_free_head moves past the chain only once all of
// it is copied (a kill before that leaves it free).
func (p *packedInflight) Popped(id uint16, descs [][]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	head := p.u16(pOffOldFreeHead)
	if int(head) >= p.n || int(id) >= len(p.headOf) {
		return // cannot happen: at most a ring of descriptors is in flight
	}
	h := p.state(head)
	binary.LittleEndian.PutUint16(h[sOffNum:], 0)
	binary.LittleEndian.PutUint64(h[sOffCounter:], p.counter)
	p.counter++
	h[sOffInflight] = 1
	for i, d := range descs {
		cur := p.u16(pOffFreeHead)
		if int(cur) >= p.n {
			return
		}
		s := p.state(cur)
		if i == len(descs)-1 {
			binary.LittleEndian.PutUint16(h[sOffLast:], cur)
		}
		binary.LittleEndian.PutUint16(h[sOffNum:], binary.LittleEndian.Uint16(h[sOffNum:])+1)
		binary.LittleEndian.PutUint64(s[sOffAddr:], binary.LittleEndian.Uint64(d[0:]))
		binary.LittleEndian.PutUint32(s[sOffLen:], binary.LittleEndian.Uint32(d[8:]))
		binary.LittleEndian.PutUint16(s[sOffID:], binary.LittleEndian.Uint16(d[12:]))
		binary.LittleEndian.PutUint16(s[sOffFlags:], binary.LittleEndian.Uint16(d[14:]))
		p.setU16(pOffFreeHead, binary.LittleEndian.Uint16(s[sOffNext:]))
	}
	p.setU16(pOffOldFreeHead, p.u16(pOffFreeHead))
	p.headOf[id] = head
}

// Publishing implements virtio.PackedInflightLog: the chain's states go back to the free list
// and the used position moves on, in the current fields only.
func (p *packedInflight) Publishing(id uint16, usedIdx uint16, usedWrap bool) {
	p.mu.Lock()
	if int(id) >= len(p.headOf) {
		return
	}
	p.setU16(pOffUsedIdx, usedIdx)
	p.b[pOffUsedWrap] = wrapByte(usedWrap)
	head := p.headOf[id]
	h := p.state(head)
	last := binary.LittleEndian.Uint16(h[sOffLast:])
	if int(last) >= p.n {
		return
	}
	binary.LittleEndian.PutUint16(p.state(last)[sOffNext:], p.u16(pOffFreeHead))
	p.setU16(pOffFreeHead, head)
}

// Published implements virtio.PackedInflightLog: the used descriptor is visible; the head is
// no longer in flight, and the current fields become the consistent ones.
func (p *packedInflight) Published(id uint16) {
	defer p.mu.Unlock()
	if int(id) >= len(p.headOf) {
		return
	}
	p.state(p.headOf[id])[sOffInflight] = 0
	p.setU16(pOffOldFreeHead, p.u16(pOffFreeHead))
	p.setU16(pOffOldUsedIdx, p.u16(pOffUsedIdx))
	p.b[pOffOldUsedWrap] = p.b[pOffUsedWrap]
}

func wrapByte(wrap bool) byte {
	if wrap {
		return 1
	}
	return 0
}

// packedResume is what a packed ring continues with after resumePacked.
type packedResume struct {
	lastAvail, usedIdx  uint16
	availWrap, usedWrap bool
	resubmit            []virtio.ResumePacked
}

// resume reads the region for a ring of ringSize descriptors whose descriptor ring is desc (to
// see whether a half-done completion reached the driver) and repairs it (vhost-user.rst, "When
// reconnecting"). fresh: the region was never used (or the ring was stopped cleanly since), and
// the ring starts where SET_VRING_BASE says. Otherwise popping goes on after the used position
// and the chains in flight, which are resubmitted in the order they were popped.
func (p *packedInflight) resume(ringSize int, desc []byte) (r packedResume, fresh bool, err error) {
	version := p.u16(pOffVersion)
	switch {
	case version == 0:
		return r, true, nil
	case version != inflightVersion:
		return r, false, fmt.Errorf("%w: inflight region version %d", ErrRejected, version)
	case int(p.u16(pOffDescNum)) != p.n || ringSize > p.n:
		return r, false, fmt.Errorf("%w: packed inflight region of %d states (room for %d) for a ring of %d", ErrRejected, p.u16(pOffDescNum), p.n, ringSize)
	}
	used, old := p.u16(pOffUsedIdx), p.u16(pOffOldUsedIdx)
	oldWrap := p.b[pOffOldUsedWrap] != 0
	if int(used) >= ringSize || int(old) >= ringSize || p.b[pOffUsedWrap] > 1 || p.b[pOffOldUsedWrap] > 1 {
		return r, false, fmt.Errorf("%w: packed inflight used position %d (old %d) in a ring of %d", ErrRejected, used, old, ringSize)
	}
	if used != old {
		// A completion was under way: committed if its used descriptor is in the ring.
		flags := binary.LittleEndian.Uint16(desc[16*int(old)+14:])
		if (flags&(1<<7) != 0) == oldWrap && (flags&(1<<15) != 0) == oldWrap {
			p.setU16(pOffOldFreeHead, p.u16(pOffFreeHead))
			p.setU16(pOffOldUsedIdx, used)
			p.b[pOffOldUsedWrap] = p.b[pOffUsedWrap]
		}
	}
	// Roll back whatever is not committed.
	p.setU16(pOffFreeHead, p.u16(pOffOldFreeHead))
	p.setU16(pOffUsedIdx, p.u16(pOffOldUsedIdx))
	p.b[pOffUsedWrap] = p.b[pOffOldUsedWrap]
	r.usedIdx, r.usedWrap = p.u16(pOffUsedIdx), p.b[pOffUsedWrap] != 0

	// The free list: bounded, no state twice; its states are not in flight.
	free := make([]bool, p.n)
	for i, s := 0, p.u16(pOffFreeHead); int(s) < p.n; i++ {
		if free[s] || i >= p.n {
			return r, false, fmt.Errorf("%w: packed inflight free list loops at state %d", ErrRejected, s)
		}
		free[s] = true
		p.state(s)[sOffInflight] = 0
		s = binary.LittleEndian.Uint16(p.state(s)[sOffNext:])
	}
	type pending struct {
		r       virtio.ResumePacked
		head    uint16
		counter uint64
	}
	var found []pending
	total := 0
	ids := make([]bool, ringSize)
	for i := range p.n {
		h := p.state(uint16(i))
		switch h[sOffInflight] {
		case 0:
			continue
		case 1:
		default:
			return r, false, fmt.Errorf("%w: packed inflight state %d has flag %d", ErrRejected, i, h[sOffInflight])
		}
		num := int(binary.LittleEndian.Uint16(h[sOffNum:]))
		if num == 0 || total+num > ringSize {
			return r, false, fmt.Errorf("%w: packed inflight chain at state %d of %d descriptors, %d in flight, ring of %d", ErrRejected, i, num, total, ringSize)
		}
		total += num
		descs := make([]byte, 16*num)
		s := uint16(i)
		for j := range num {
			if int(s) >= p.n || free[s] {
				return r, false, fmt.Errorf("%w: packed inflight chain at state %d reaches state %d", ErrRejected, i, s)
			}
			st := p.state(s)
			d := descs[16*j:]
			binary.LittleEndian.PutUint64(d[0:], binary.LittleEndian.Uint64(st[sOffAddr:]))
			binary.LittleEndian.PutUint32(d[8:], binary.LittleEndian.Uint32(st[sOffLen:]))
			binary.LittleEndian.PutUint16(d[12:], binary.LittleEndian.Uint16(st[sOffID:]))
			binary.LittleEndian.PutUint16(d[14:], binary.LittleEndian.Uint16(st[sOffFlags:]))
			if j+1 < num {
				s = binary.LittleEndian.Uint16(st[sOffNext:])
			}
		}
		if s != binary.LittleEndian.Uint16(h[sOffLast:]) {
			return r, false, fmt.Errorf("%w: packed inflight chain at state %d ends at %d, its last is %d", ErrRejected, i, s, binary.LittleEndian.Uint16(h[sOffLast:]))
		}
		id := binary.LittleEndian.Uint16(descs[16*(num-1)+12:]) // the buffer id is the last's
		if int(id) >= ringSize || ids[id] {
			return r, false, fmt.Errorf("%w: packed inflight buffer id %d out of range or twice", ErrRejected, id)
		}
		ids[id] = true
		found = append(found, pending{virtio.ResumePacked{ID: id, Descs: descs}, uint16(i), binary.LittleEndian.Uint64(h[sOffCounter:])})
	}
	slices.SortFunc(found, func(a, b pending) int { return resumeOrder(a.counter, a.head, b.counter, b.head) })
	p.counter = 0
	for _, f := range found {
		r.resubmit = append(r.resubmit, f.r)
		p.headOf[f.r.ID] = f.head
		p.counter = max(p.counter, f.counter+1)
	}
	// Every chain popped was either completed (the used position counts it) or is in flight.
	pos := int(r.usedIdx) + total
	r.lastAvail, r.availWrap = uint16(pos), r.usedWrap
	if pos >= ringSize {
		r.lastAvail, r.availWrap = uint16(pos-ringSize), !r.usedWrap
	}
	return r, false, nil
}

// resumeCatching is resume with a fault on the region or the ring caught and returned as a
// protocol error, as inflightQueue.resumeCatching does.
func (p *packedInflight) resumeCatching(ringSize int, desc []byte) (r packedResume, fresh bool, err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if e := recover(); e != nil {
			if _, fault := e.(interface{ Addr() uintptr }); !fault {
				panic(e)
			}
			r, fresh, err = packedResume{}, false, fmt.Errorf("%w: fault reading the inflight buffer: %v", ErrProtocol, e)
		}
	}()
	return p.resume(ringSize, desc)
}

// resumePackedInflight is resumeInflight for a packed ring: it makes the ring track its chains
// in its region of the inflight buffer, and continue where the last back-end left off.
func (c *conn) resumePackedInflight(v *vring, ring *virtio.PackedQueue) (bool, error) {
	if c.inflight == nil {
		return false, nil
	}
	var region []byte
	if v.index < len(c.inflight.queues) {
		region = c.inflight.queues[v.index]
	}
	if len(region) < InflightPackedRegionSize(v.num) {
		if !c.untrackedLogged {
			c.untrackedLogged = true
			c.log.WithFields(logrus.Fields{"queue": v.index, "size": v.num}).
				Info("ring larger than the inflight buffer: serving it without inflight tracking")
		}
		return false, nil
	}
	p := &packedInflight{b: region, n: min((len(region)-packedHeaderSize)/packedStateSize, virtio.MaxQueueSize), headOf: make([]uint16, v.num)}
	r, fresh, err := p.resumeCatching(v.num, ring.DescRing())
	if err != nil {
		return false, err
	}
	ring.SetInflightLog(p)
	if fresh {
		used, usedWrap := ring.UsedIdx()
		p.init(used, usedWrap)
		return false, nil
	}
	ring.Resume(r.lastAvail, r.availWrap, r.usedIdx, r.usedWrap, r.resubmit)
	log := c.log.WithFields(logrus.Fields{"queue": v.index, "base": fmt.Sprintf("%#x", v.base), "last_avail": r.lastAvail, "used": r.usedIdx, "resubmit": len(r.resubmit)})
	if len(r.resubmit) > 0 {
		log.Info("resuming the packed queue from the inflight buffer")
	} else {
		log.Debug("inflight buffer: nothing to resubmit")
	}
	return true, nil
}

// cleanPackedInflight marks a packed ring's region unused after the ring was stopped cleanly
// (GET_VRING_BASE: nothing in flight): the next start goes where SET_VRING_BASE says, as after
// a reset of the driver.
func (c *conn) cleanPackedInflight(v *vring) {
	if c.inflight == nil || !c.packed() || v.index >= len(c.inflight.queues) {
		return
	}
	if region := c.inflight.queues[v.index]; len(region) >= InflightPackedRegionSize(v.num) {
		clear(region[:packedHeaderSize])
	}
}
