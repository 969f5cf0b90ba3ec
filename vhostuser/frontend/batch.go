package frontend

import (
	"encoding/binary"
	"fmt"

	"github.com/vublk/vublk/virtio"
)

// Slot is a request buffer that stays allocated in guest memory and is
// reused request after request, as a guest driver recycles its request
// structures: a 16-byte header, room for Cap bytes of data and the status
// byte. Requests submitted from slots with SubmitBatch cost no allocation in
// guest memory and no copy of read data, and a batch is announced with at
// most one kick: what a load generator needs so as not to compete with the
// back-end for CPU.
//
// A slot holds one request at a time: submit it again only after its
// OnComplete has run.
type Slot struct {
	q   *Queue
	buf Buffer
	cap int
	p   Pending // the request in flight from the slot, reused request after request
}

// slotHeader is the offset of the data in a slot's buffer.
const slotHeader = 16

// NewSlot allocates a slot for requests of up to capacity data bytes.
func (q *Queue) NewSlot(capacity int) (*Slot, error) {
	if capacity < 0 {
		return nil, fmt.Errorf("slot of %d bytes", capacity)
	}
	buf, err := q.mem.Alloc(uint64(slotHeader+capacity+1), descSize)
	if err != nil {
		return nil, err
	}
	return &Slot{q: q, buf: buf, cap: capacity}, nil
}

// Cap is the most data bytes a request from the slot may carry.
func (s *Slot) Cap() int { return s.cap }

// In returns the first n bytes the device wrote for the slot's last
// request. Call it only from that request's OnComplete: guest memory stays
// mapped until every completion goroutine has stopped, and the next
// request may overwrite it.
func (s *Slot) In(n int) []byte { return s.buf.Data[slotHeader : slotHeader+n : slotHeader+n] }

// Free returns the slot's memory. The slot must not be in flight.
func (s *Slot) Free() { s.q.mem.Free(s.buf) }

// SlotRequest is one request of a batch.
type SlotRequest struct {
	Slot   *Slot
	Type   uint32 // virtio.BlkTIn, BlkTOut, BlkTFlush, ...
	Sector uint64
	// Out is copied into the slot (under the queue's lock, so that a
	// concurrent Close cannot unmap it meanwhile) for types that send data.
	Out []byte
	// Prefilled says that the slot already holds Out: the caller copied
	// the same bytes with an earlier request of this slot and nothing
	// wrote the slot since (no read used it). Only len(Out) is used then,
	// and nothing is copied, as a driver that writes one buffer again and
	// again does not rewrite it.
	Prefilled bool
	// InLen is how many bytes the device writes before the status byte:
	// the length of a read. Read them with Slot.In from OnComplete.
	InLen int
	// OnComplete is called with the result on the queue's completion
	// goroutine; Result.In is nil. It must not block.
	OnComplete func(Result)
}

// SubmitBatch makes every request of reqs available, in order, and kicks
// the back-end once at most, when it asked for a kick for any of them. It
// waits while the ring has too few free descriptors, after kicking for
// what it published before. On an error, the requests before the failing
// one were submitted and will complete.
func (q *Queue) SubmitBatch(reqs []SlotRequest) error {
	for i := range reqs {
		r := &reqs[i]
		if r.Slot == nil || r.Slot.q != q {
			return fmt.Errorf("request %d: its slot is not one of queue %d", i, q.index)
		}
		if len(r.Out) > 0 && r.InLen > 0 || len(r.Out) > r.Slot.cap || r.InLen > r.Slot.cap {
			return fmt.Errorf("%w: request %d: %d bytes out and %d in, in a slot of %d", ErrTooLarge, i, len(r.Out), r.InLen, r.Slot.cap)
		}
	}
	if q.pk != nil {
		return q.submitBatchPacked(reqs)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	old := q.availIdx
	defer func() { q.announceLocked(old) }()
	for i := range reqs {
		r := &reqs[i]
		n := 2
		if len(r.Out) > 0 || r.InLen > 0 {
			n = 3
		}
		for len(q.freeDesc) < n && !q.closed {
			// The descriptors come back only when the back-end completes
			// something: it must have seen what is published.
			q.announceLocked(old)
			old = q.availIdx
			q.space.Wait()
		}
		if q.closed {
			return ErrClosed
		}
		q.putSlotLocked(r, n)
	}
	return nil
}

// putSlotLocked writes r into its slot and n free descriptors and puts it
// on the available ring, without publishing the ring index.
func (q *Queue) putSlotLocked(r *SlotRequest, n int) {
	chain, p := q.slotChainLocked(r)
	ids := q.freeDesc[len(q.freeDesc)-n:]
	p.descs = append(p.descs[:0], ids...)
	q.freeDesc = q.freeDesc[:len(q.freeDesc)-n]
	for i, c := range chain {
		flags, next := c.Flags, uint16(0)
		if i+1 < n {
			flags, next = flags|virtio.DescFNext, p.descs[i+1]
		}
		putDesc(q.desc[descSize*int(p.descs[i]):], c.Addr, c.Len, flags, next)
	}
	head := p.descs[0]
	q.inflight[head] = p
	binary.LittleEndian.PutUint16(q.avail[4+2*int(q.availIdx%q.size):], head)
	q.availIdx++
}

// slotChainLocked writes r into its slot and returns its chain (2 or 3 descriptors: header,
// data if any, status) and its Pending.
func (q *Queue) slotChainLocked(r *SlotRequest) ([]Desc, *Pending) {
	n := 2
	if len(r.Out) > 0 || r.InLen > 0 {
		n = 3
	}
	s := r.Slot
	d := s.buf.Data
	binary.LittleEndian.PutUint32(d[0:], r.Type)
	binary.LittleEndian.PutUint32(d[4:], 0) // ioprio
	binary.LittleEndian.PutUint64(d[8:], r.Sector)
	if !r.Prefilled {
		copy(d[slotHeader:], r.Out)
	}
	statusOff := slotHeader + s.cap
	d[statusOff] = 0xff // a status the device never wrote is ErrBadStatus
	gpa := s.buf.GPA
	var chain [3]Desc
	chain[0] = Desc{Addr: gpa, Len: slotHeader}
	if n == 3 {
		chain[1] = Desc{Addr: gpa + slotHeader, Len: uint32(len(r.Out))}
		if r.InLen > 0 {
			chain[1] = Desc{Addr: gpa + slotHeader, Len: uint32(r.InLen), Flags: virtio.DescFWrite}
		}
	}
	chain[n-1] = Desc{Addr: gpa + uint64(statusOff), Len: 1, Flags: virtio.DescFWrite}

	// The slot's buffer is not the request's to free (buf stays zero), and
	// the read data stays in the slot (inLen stays zero). The slot's
	// Pending is free: its last request has completed. Nobody waits for it
	// (done stays nil); it keeps its descriptor list's memory.
	p := &s.p
	*p = Pending{q: q, statusGPA: gpa + uint64(statusOff), hasStatus: true, onComplete: r.OnComplete, descs: p.descs[:0]}
	return chain[:n], p
}

// announceLocked publishes the available index and kicks the back-end if
// it asked to be kicked for any entry made available since old. Once the
// queue is closed the rings may be unmapped at any moment: it does nothing.
func (q *Queue) announceLocked(old uint16) {
	if old == q.availIdx || q.closed {
		return
	}
	store16(q.avail, 2, q.availIdx) // publishes the entries; a full barrier
	if q.kick != nil && q.needKick(old, q.availIdx) {
		q.kicks.Add(1)
		q.kick.Write(eventOne)
	}
}
