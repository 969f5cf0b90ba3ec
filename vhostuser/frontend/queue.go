package frontend

import (
	"encoding/binary"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// Split ring layout (virtio 1.2, section 2.7).
const (
	descSize      = 16
	usedFNoNotify = 1 // VIRTQ_USED_F_NO_NOTIFY
)

var eventOne = []byte{1, 0, 0, 0, 0, 0, 0, 0}

// Desc is one descriptor of a chain as the caller wants it in the ring;
// the queue fills in the NEXT flag and link.
type Desc struct {
	Addr  uint64 // guest physical address
	Len   uint32
	Flags uint16 // virtio.DescFWrite, virtio.DescFIndirect
}

// Result is the outcome of one request.
type Result struct {
	// Status is the virtio-blk status byte the device wrote.
	Status uint8
	// Len is the used length the device reported: the bytes it wrote,
	// status byte included.
	Len uint32
	// In is a copy of the device-written bytes before the status (read
	// data, the GET_ID answer) when the status is OK.
	In []byte
	// Err is nil for VIRTIO_BLK_S_OK, else ErrIOError, ErrUnsupported,
	// ErrBadStatus, or ErrClosed if the device closed first.
	Err error
}

// Pending is a request on its way: submitted, not necessarily completed.
type Pending struct {
	q          *Queue
	buf        Buffer // the request's memory; zero for raw chains
	inOff      int    // offset of the device-writable bytes in buf
	inLen      int
	statusGPA  uint64
	hasStatus  bool
	descs      []uint16 // the ring descriptors it holds
	onComplete func(Result)
	done       chan struct{}
	res        Result
}

// Done is closed when the request has completed.
func (p *Pending) Done() <-chan struct{} { return p.done }

// Wait waits for the request to complete and returns its result.
func (p *Pending) Wait() Result {
	<-p.done
	return p.res
}

// finish records the result and releases the request's memory. With err
// set (the device closed) guest memory is not read.
func (p *Pending) finish(used uint32, err error) {
	if err != nil {
		p.res = Result{Err: err}
	} else {
		p.res = Result{Len: used, Status: 0xff}
		if p.hasStatus {
			if b, berr := p.q.mem.Bytes(p.statusGPA, 1); berr == nil {
				p.res.Status = b[0]
			}
		}
		p.res.Err = statusErr(p.res.Status)
		if p.res.Err == nil && p.inLen > 0 {
			p.res.In = append([]byte(nil), p.buf.Data[p.inOff:p.inOff+p.inLen]...)
		}
	}
	p.q.mem.Free(p.buf)
	done := p.done // nil for a slot's request, whose Pending may be reused once onComplete has run
	if p.onComplete != nil {
		p.onComplete(p.res)
	}
	if done != nil {
		close(done)
	}
}

func statusErr(s uint8) error {
	switch s {
	case virtio.BlkSOK:
		return nil
	case virtio.BlkSIOErr:
		return ErrIOError
	case virtio.BlkSUnsupp:
		return ErrUnsupported
	}
	return fmt.Errorf("%w %d", ErrBadStatus, s)
}

// Queue is the driver side of one split virtqueue in guest memory.
//
// Submit and its blocking forms are safe for concurrent use; requests
// submitted by one goroutine enter the available ring in call order.
// Completions are collected by a goroutine per queue that waits on the call
// eventfd. Notifications are suppressed both ways as the negotiated
// features say (VIRTIO_F_EVENT_IDX, or the NO_NOTIFY flag).
type Queue struct {
	index    int
	size     uint16
	mem      *Memory
	eventIdx bool
	indirect bool
	rings    Buffer
	desc     []byte
	avail    []byte
	used     []byte
	base     uint32       // where the back-end goes on when (re)started (SET_VRING_BASE)
	pk       *packedState // nil: a split ring

	mu       sync.Mutex
	space    *sync.Cond // broadcast when descriptors are freed or the queue closes
	freeDesc []uint16
	inflight []*Pending // by head descriptor
	availIdx uint16
	kick     *os.File // nil while stopped
	closed   bool
	kicks    atomic.Uint64 // kicks written, for Kicks

	interrupts atomic.Uint64 // call eventfd reads, for Interrupts

	// While running: the eventfds and the goroutines waiting on them.
	// Completions are collected by the reaper only, or, once it has
	// stopped, by halt.
	call, errf    *os.File
	reaped, erred chan struct{}
	lastUsed      uint16

	failOnce sync.Once
	failed   chan struct{}
	failErr  error
}

// ringLayout returns the offsets of the available and used rings and the
// total size of a ring of size entries; the descriptor table is at 0.
// Padding after each ring keeps the 32-bit words of ring_unsafe.go inside
// the allocation.
func ringLayout(size int) (availOff, usedOff, total int) {
	availOff = descSize * size
	usedOff = int(roundUp(uint64(availOff+6+2*size+2), minAlign))
	total = int(roundUp(uint64(usedOff+6+8*size+2), minAlign))
	return availOff, usedOff, total
}

func newQueue(mem *Memory, index, size int, eventIdx, indirect, packed bool) (*Queue, error) {
	if size <= 0 || size > virtio.MaxQueueSize || (!packed && size&(size-1) != 0) {
		return nil, fmt.Errorf("queue size %d is not a power of two in 1..%d", size, virtio.MaxQueueSize)
	}
	availOff, usedOff, total := ringLayout(size)
	if packed {
		_, _, total = packedLayout(size)
	}
	rings, err := mem.Alloc(uint64(total), 4096)
	if err != nil {
		return nil, fmt.Errorf("queue %d rings: %w", index, err)
	}
	clear(rings.Data)
	q := &Queue{
		index: index, size: uint16(size), mem: mem, eventIdx: eventIdx, indirect: indirect, rings: rings,
		desc:     rings.Data[:descSize*size],
		inflight: make([]*Pending, size),
		failed:   make(chan struct{}),
	}
	q.space = sync.NewCond(&q.mu)
	if packed {
		q.initPacked()
		return q, nil
	}
	q.avail = rings.Data[availOff : availOff+6+2*size]
	q.used = rings.Data[usedOff : usedOff+6+8*size]
	for i := size - 1; i >= 0; i-- {
		q.freeDesc = append(q.freeDesc, uint16(i))
	}
	return q, nil
}

// Index is the queue's index in the device.
func (q *Queue) Index() int { return q.index }

// Size is the number of ring entries.
func (q *Queue) Size() int { return int(q.size) }

// Failed is closed when the queue has failed (see Err).
func (q *Queue) Failed() <-chan struct{} { return q.failed }

// Err is nil, or why the queue failed: ErrQueueFailed when the back-end
// signalled the error eventfd or published a bogus used element.
func (q *Queue) Err() error {
	select {
	case <-q.failed:
		return q.failErr
	default:
		return nil
	}
}

func (q *Queue) fail(err error) {
	q.failOnce.Do(func() {
		q.failErr = err
		close(q.failed)
	})
}

// addrs are the ring addresses for SET_VRING_ADDR, in the front-end's
// virtual address space as QEMU gives them.
func (q *Queue) addrs() vhostuser.VringAddr {
	availOff, usedOff, _ := ringLayout(int(q.size))
	if q.pk != nil { // the driver and device areas
		availOff, usedOff, _ = packedLayout(int(q.size))
	}
	ua := func(off int) uint64 { return q.mem.UserAddr(q.rings.GPA + uint64(off)) }
	return vhostuser.VringAddr{Index: uint32(q.index), Desc: ua(0), Avail: ua(availOff), Used: ua(usedOff)}
}

// Submit puts a virtio-blk request on the available ring and returns at
// once. It waits while the queue has no free descriptors or guest memory is
// exhausted. The chain is: header, Out (if any), In (if any), status; with
// indirect descriptors negotiated it sits in an indirect table.
func (q *Queue) Submit(r Request) (*Pending, error) {
	n := 2
	if len(r.Out) > 0 {
		n++
	}
	if r.InLen > 0 {
		n++
	}
	table := 0
	if q.indirect {
		table = descSize * n
	}
	hdrOff := table
	outOff := hdrOff + 16
	inOff := outOff + len(r.Out)
	statusOff := inOff + r.InLen
	buf, err := q.mem.Alloc(uint64(statusOff+1), descSize)
	if err != nil {
		return nil, err
	}
	gpa := func(off int) uint64 { return buf.GPA + uint64(off) }
	chain := []Desc{{Addr: gpa(hdrOff), Len: 16}}
	if len(r.Out) > 0 {
		chain = append(chain, Desc{Addr: gpa(outOff), Len: uint32(len(r.Out))})
	}
	if r.InLen > 0 {
		chain = append(chain, Desc{Addr: gpa(inOff), Len: uint32(r.InLen), Flags: virtio.DescFWrite})
	}
	chain = append(chain, Desc{Addr: gpa(statusOff), Len: 1, Flags: virtio.DescFWrite})
	p := &Pending{q: q, buf: buf, inOff: inOff, inLen: r.InLen, statusGPA: gpa(statusOff), hasStatus: true,
		onComplete: r.OnComplete, done: make(chan struct{})}

	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		q.mem.Free(buf)
		return nil, ErrClosed
	}
	// Fill the buffer under the lock: Close unmaps memory only after
	// marking the queue closed under it.
	d := buf.Data
	binary.LittleEndian.PutUint32(d[hdrOff:], r.Type)
	binary.LittleEndian.PutUint32(d[hdrOff+4:], 0) // ioprio
	binary.LittleEndian.PutUint64(d[hdrOff+8:], r.Sector)
	copy(d[outOff:], r.Out)
	d[statusOff] = 0xff // a status the device never wrote is ErrBadStatus
	if q.indirect {
		for i, c := range chain {
			flags, next := c.Flags, uint16(0)
			switch {
			case q.pk != nil: // packed: flags at 14, entries taken in order (virtio 1.2, 2.8.7)
				binary.LittleEndian.PutUint64(d[descSize*i:], c.Addr)
				binary.LittleEndian.PutUint32(d[descSize*i+8:], c.Len)
				binary.LittleEndian.PutUint16(d[descSize*i+14:], flags)
				continue
			case i+1 < len(chain):
				flags, next = flags|virtio.DescFNext, uint16(i+1)
			}
			putDesc(d[descSize*i:], c.Addr, c.Len, flags, next)
		}
		chain = []Desc{{Addr: buf.GPA, Len: uint32(table), Flags: virtio.DescFIndirect}}
	}
	if err := q.publishLocked(chain, p); err != nil {
		q.mem.Free(buf)
		return nil, err
	}
	return p, nil
}

// SubmitChain puts a chain the caller built on the available ring, for
// hostile tests and unusual layouts. The buffers are the caller's; when the
// last descriptor is device-writable its last byte is taken as the status.
func (q *Queue) SubmitChain(chain []Desc) (*Pending, error) {
	p := &Pending{q: q, done: make(chan struct{})}
	if len(chain) > 0 {
		if last := chain[len(chain)-1]; last.Flags&virtio.DescFWrite != 0 && last.Len > 0 {
			p.statusGPA, p.hasStatus = last.Addr+uint64(last.Len)-1, true
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, ErrClosed
	}
	if err := q.publishLocked(chain, p); err != nil {
		return nil, err
	}
	return p, nil
}

func putDesc(b []byte, addr uint64, length uint32, flags, next uint16) {
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], length)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

// publishLocked writes chain into free descriptors, makes its head
// available and kicks the back-end if it wants a kick. q.mu is held; it is
// released while waiting for descriptors.
func (q *Queue) publishLocked(chain []Desc, p *Pending) error {
	n := len(chain)
	if n == 0 || n > int(q.size) {
		return fmt.Errorf("%w: chain of %d descriptors in a queue of %d", ErrTooLarge, n, q.size)
	}
	if q.pk != nil {
		return q.publishPackedLocked(chain, p)
	}
	for len(q.freeDesc) < n && !q.closed {
		q.space.Wait()
	}
	if q.closed {
		return ErrClosed
	}
	ids := q.freeDesc[len(q.freeDesc)-n:]
	p.descs = append([]uint16(nil), ids...)
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
	old := q.availIdx
	q.availIdx++
	store16(q.avail, 2, q.availIdx) // publishes the entry; a full barrier
	if q.kick != nil && q.needKick(old, q.availIdx) {
		q.kicks.Add(1)
		q.kick.Write(eventOne)
	}
	return nil
}

// Kicks is how many times the queue has kicked the back-end: the back-end
// asked not to be kicked for the other requests (it was popping or polling).
func (q *Queue) Kicks() uint64 { return q.kicks.Load() }

// Interrupts is how many times the completion goroutine woke up on the call
// eventfd (several signals of the back-end between two wake-ups count once).
func (q *Queue) Interrupts() uint64 { return q.interrupts.Load() }

// needKick reports whether the back-end asked to be kicked for the entries
// made available from old to now (virtio 1.2, 2.7.10).
func (q *Queue) needKick(old, now uint16) bool {
	if q.eventIdx {
		event := load16(q.used, 4+8*int(q.size)) // avail_event
		return now-event-1 < now-old
	}
	return load16(q.used, 0)&usedFNoNotify == 0
}

// run starts collecting completions on call and watching errf; kick is
// what Submit signals. The queue owns the three files from now on.
func (q *Queue) run(kick, call, errf *os.File) {
	q.mu.Lock()
	q.kick = kick
	q.mu.Unlock()
	q.call, q.errf = call, errf
	q.reaped, q.erred = make(chan struct{}), make(chan struct{})
	go q.reap(call, q.reaped)
	go q.watchErr(errf, q.erred)
}

// halt stops the goroutines and closes the eventfds, then collects what
// the back-end completed meanwhile. Requests still on the ring stay
// pending until the queue runs again.
func (q *Queue) halt() {
	q.mu.Lock()
	kick := q.kick
	q.kick = nil
	q.mu.Unlock()
	if q.call == nil {
		return
	}
	kick.Close()
	q.call.Close()
	q.errf.Close()
	<-q.reaped
	<-q.erred
	q.call, q.errf = nil, nil
	q.collect()
}

// close fails every request still in flight with ErrClosed and makes later
// submissions fail; waiting submitters wake up.
func (q *Queue) close() {
	q.mu.Lock()
	q.closed = true
	q.space.Broadcast()
	q.mu.Unlock()
	q.halt()
	q.mu.Lock()
	var left []*Pending
	for i, p := range q.inflight {
		if p != nil {
			left = append(left, p)
			q.inflight[i] = nil
		}
	}
	q.mu.Unlock()
	for _, p := range left {
		p.finish(0, ErrClosed)
	}
}

func (q *Queue) reap(call *os.File, done chan struct{}) {
	defer close(done)
	var buf [8]byte
	for {
		q.collect()
		if _, err := call.Read(buf[:]); err != nil {
			return // closed by halt
		}
		q.interrupts.Add(1)
	}
}

func (q *Queue) watchErr(errf *os.File, done chan struct{}) {
	defer close(done)
	var buf [8]byte
	if _, err := errf.Read(buf[:]); err == nil {
		q.fail(fmt.Errorf("%w: queue %d: the back-end signalled its error eventfd", ErrQueueFailed, q.index))
	}
}

// collect completes every request the back-end has put on the used ring.
// With VIRTIO_F_EVENT_IDX it then asks for an interrupt at the next used
// entry and looks again, so no completion is missed.
func (q *Queue) collect() {
	if q.pk != nil {
		q.collectPacked()
		return
	}
	for {
		usedIdx := load16(q.used, 2)
		if usedIdx-q.lastUsed > q.size {
			q.fail(fmt.Errorf("%w: queue %d: used index %d, %d seen, size %d", ErrQueueFailed, q.index, usedIdx, q.lastUsed, q.size))
			return
		}
		for q.lastUsed != usedIdx {
			slot := 4 + 8*int(q.lastUsed%q.size)
			id := binary.LittleEndian.Uint32(q.used[slot:])
			n := binary.LittleEndian.Uint32(q.used[slot+4:])
			q.lastUsed++
			q.complete(id, n)
		}
		if !q.eventIdx {
			return
		}
		store16(q.avail, 4+2*int(q.size), q.lastUsed) // used_event
		if load16(q.used, 2) == q.lastUsed {
			return
		}
	}
}

func (q *Queue) complete(id, used uint32) {
	q.mu.Lock()
	var p *Pending
	if id < uint32(q.size) {
		p, q.inflight[id] = q.inflight[id], nil
	}
	if p == nil {
		q.mu.Unlock()
		q.fail(fmt.Errorf("%w: queue %d: used element for descriptor %d, which is not in flight", ErrQueueFailed, q.index, id))
		return
	}
	if q.pk != nil {
		q.releasePackedLocked(uint16(id))
	} else {
		q.freeDesc = append(q.freeDesc, p.descs...)
	}
	q.space.Broadcast()
	q.mu.Unlock()
	p.finish(used, nil)
}
