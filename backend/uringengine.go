package backend

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// uringSlots is how many requests may be in flight on the ring at once. It is
// also the SQ size (and the CQ holds twice as many), so neither ring can
// overflow. A request that finds every slot taken runs on a lane.
const uringSlots = 1024

// uringEngine issues the reads and writes of a RawIO store as
// IORING_OP_READV/WRITEV on one io_uring shared by every queue of an export.
//
// Life of a request: Engine.Submit admits it through the barrier and hands it
// to submit, which takes a slot, pushes an SQE whose user_data is the slot's
// index and calls io_uring_enter. Then the submitter polls the CQ: a request
// the kernel finished inline (a page-cache hit) is completed right there, on
// the submitting goroutine. A request that went asynchronous (io-wq, the block
// layer) is reaped when the ring's eventfd fires: the reaper goroutine waits
// for it in the Go netpoller. (The eventfd fires for inline completions too,
// see openURing: the reaper then wakes for nothing, which is most of what
// uring costs more than a lane on page-cache hits.) Either way
// complete runs the same steps as a lane (Engine.finish): the barrier is
// exited only after the data transfer has finished, before Done.Complete.
//
// The slot holds the Request and the iovec array the SQE points to, so that
// Go keeps both (and the buffers) referenced while the kernel uses them.
type uringEngine struct {
	e    *Engine
	raw  RawIO
	ring *uring
	efd  *os.File // eventfd registered with the ring; read through the netpoller

	mu    sync.Mutex // guards free and SQ production
	free  []uint32   // indices of idle slots
	slots []uringSlot

	// polling counts the goroutines that asked to reap since the active
	// reaper (the one that moved it from 0) last looked: see poll.
	polling atomic.Int32

	// closing is held shared while a submitter uses the ring, so that close
	// cannot unmap it under a goroutine still polling.
	closing  sync.RWMutex
	reaped   func(userData uint64, res int32) // complete, bound once
	reaperOK chan struct{}                    // closed when the reaper has exited
}

// uringSlot is one request in flight on the ring.
type uringSlot struct {
	// busy is 1 from submit to completion. Its atomic store before the SQE
	// is published and load when the CQE is reaped also tell the race
	// detector that the reaper sees what the submitter wrote (the real
	// ordering goes through the kernel, which the detector cannot see).
	busy  atomic.Uint32
	req   *Request
	fd    int
	off   int64 // offset of the next byte to transfer
	left  int64 // bytes still to transfer
	iov   []unix.Iovec
	write bool
}

// openURing sets up the ring and its eventfd for newURingEngine. It fails with
// the kernel's error when io_uring is missing (ENOSYS) or disabled (EPERM:
// sysctl kernel.io_uring_disabled).
func openURing() (*uring, *os.File, error) {
	ring, err := newURing(uringSlots)
	if err != nil {
		return nil, nil, err
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		ring.close()
		return nil, nil, fmt.Errorf("eventfd: %w", err)
	}
	// Not IORING_REGISTER_EVENTFD_ASYNC: that one fires only for CQEs posted
	// by io-wq workers, not for those posted from task work (O_DIRECT and
	// block-device completions, async buffered reads), which would then sit
	// in the CQ until some later submit happened to poll. Inline completions
	// fire the plain eventfd too; the reaper then finds the CQ empty, and
	// the eventfd counter coalesces them while it runs.
	if err := sysURingRegisterEventfd(ring.fd, uringRegisterEventfd, efd); err != nil {
		unix.Close(efd)
		ring.close()
		return nil, nil, fmt.Errorf("io_uring_register eventfd: %w", err)
	}
	return ring, os.NewFile(uintptr(efd), "io_uring-eventfd"), nil
}

// newURingEngine serves e's store through ring and starts the reaper.
func newURingEngine(e *Engine, raw RawIO, ring *uring, efd *os.File) *uringEngine {
	n := min(uringSlots, ring.sqEntries, ring.cqEntries)
	u := &uringEngine{
		e: e, raw: raw, ring: ring, efd: efd,
		free:     make([]uint32, n),
		slots:    make([]uringSlot, n),
		reaperOK: make(chan struct{}),
	}
	for i := range u.free {
		u.free[i] = uint32(len(u.free) - 1 - i)
	}
	u.reaped = u.complete
	go u.reaper()
	return u
}

// submit issues r, which has entered the barrier, and reports true; or it
// reports false without touching r when r must run on a lane instead.
func (u *uringEngine) submit(r *Request) bool {
	write := r.Op == OpWrite
	if len(r.Bufs) > maxIOV {
		return false // more than one READV can take; the lane splits it
	}
	fd, ok, err := u.raw.RawFD(write, r.Bufs, r.Offset)
	if err == nil && !ok {
		return false
	}
	n := totalLen(r.Bufs)
	if err != nil || n == 0 {
		// Refused (out of range, read-only) or nothing to do: the result is
		// known without the kernel.
		u.countOp(write)
		r.Err = err
		u.e.finish(r)
		return true
	}

	u.closing.RLock()
	defer u.closing.RUnlock()
	u.mu.Lock()
	if len(u.free) == 0 {
		u.mu.Unlock()
		return false
	}
	idx := u.free[len(u.free)-1]
	u.free = u.free[:len(u.free)-1]
	s := &u.slots[idx]
	s.req, s.fd, s.off, s.left, s.write = r, fd, r.Offset, n, write
	s.iov = appendIovecs(s.iov[:0], r.Bufs, 0)
	sqe := u.sqe(idx)
	// From here the slot belongs to whoever reaps its CQE: do not read it.
	s.busy.Store(1)
	err = u.ring.push(sqe)
	u.mu.Unlock()
	if err != nil {
		// Cannot happen (the SQ has a place for every slot); fall back.
		u.release(idx)
		return false
	}
	u.countOp(write) // before submitting: r is not ours once the kernel has it
	u.enter()
	u.poll()
	return true
}

func (u *uringEngine) countOp(write bool) {
	if write {
		u.e.Stats.Writes.Add(1)
	} else {
		u.e.Stats.Reads.Add(1)
	}
}

// sqe is the SQE of slot idx's next transfer.
func (u *uringEngine) sqe(idx uint32) uringSQE {
	s := &u.slots[idx]
	op := uint8(uringOpReadv)
	if s.write {
		op = uringOpWritev
	}
	return uringSQE{
		opcode:   op,
		fd:       int32(s.fd),
		off:      uint64(s.off),
		addr:     iovecAddr(s.iov),
		len:      uint32(len(s.iov)),
		userData: uint64(idx),
	}
}

// enter submits what was pushed. A failure other than a transient one means
// the ring itself is broken (a bad fd or mapping): no request could ever
// complete again, so it is not turned into a request error.
func (u *uringEngine) enter() {
	if err := u.ring.submit(1); err != nil {
		panic(fmt.Sprintf("backend: io_uring is broken: %v", err))
	}
}

// poll reaps the CQ. Reaping is serialised without making anyone wait: the
// goroutine that moves polling from 0 reaps, and reaps again as long as
// another goroutine asked in the meantime (its CQE may have been posted after
// the last look). Every other caller returns at once.
func (u *uringEngine) poll() {
	if u.polling.Add(1) != 1 {
		return
	}
	for {
		asked := u.polling.Load()
		u.ring.reap(u.reaped)
		if u.polling.CompareAndSwap(asked, 0) {
			return
		}
	}
}

// reaper waits on the eventfd, through the netpoller, for completions that
// nobody polled for, until close closes the eventfd.
func (u *uringEngine) reaper() {
	defer close(u.reaperOK)
	var b [8]byte
	for {
		if _, err := u.efd.Read(b[:]); err != nil {
			return // closed by close; nothing can be in flight then
		}
		u.poll()
	}
}

// complete handles the CQE of slot userData: it resumes a short transfer or
// retries a transient failure, and otherwise finishes the request.
func (u *uringEngine) complete(userData uint64, res int32) {
	if userData >= uint64(len(u.slots)) {
		panic(fmt.Sprintf("backend: io_uring completion for unknown slot %d", userData))
	}
	idx := uint32(userData)
	s := &u.slots[idx]
	if s.busy.Load() != 1 {
		panic(fmt.Sprintf("backend: io_uring completion for idle slot %d", idx))
	}
	var err error
	switch {
	case res == -int32(unix.EINTR) || res == -int32(unix.EAGAIN):
		u.resubmit(idx)
		return
	case res < 0:
		err = fmt.Errorf("at offset %d: %w", s.off, unix.Errno(-res))
	case res == 0:
		err = fmt.Errorf("at offset %d, %d bytes left: %w", s.off, s.left, ErrShortIO)
	case int64(res) < s.left:
		// Short transfer: go on from where it stopped.
		done := totalLen(s.req.Bufs) - s.left + int64(res)
		s.off += int64(res)
		s.left -= int64(res)
		s.iov = appendIovecs(s.iov[:0], s.req.Bufs, done)
		u.resubmit(idx)
		return
	}
	r := s.req
	u.release(idx)
	if err == nil {
		if r.Op == OpWrite {
			u.e.Stats.BytesWritten.Add(uint64(totalLen(r.Bufs)))
		} else {
			u.e.Stats.BytesRead.Add(uint64(totalLen(r.Bufs)))
		}
	}
	r.Err = err
	u.e.finish(r)
}

// resubmit pushes slot idx again (its iovecs and offset already moved on).
// It runs on the reaping goroutine; the CQE is reaped by the same loop.
func (u *uringEngine) resubmit(idx uint32) {
	sqe := u.sqe(idx)
	u.mu.Lock()
	err := u.ring.push(sqe)
	u.mu.Unlock()
	if err != nil {
		panic(fmt.Sprintf("backend: io_uring resubmit: %v", err))
	}
	u.enter()
}

// release returns slot idx to the free list.
func (u *uringEngine) release(idx uint32) {
	s := &u.slots[idx]
	s.req = nil
	clear(s.iov) // drop the buffer pointers: the GC need not keep them
	s.busy.Store(0)
	u.mu.Lock()
	u.free = append(u.free, idx)
	u.mu.Unlock()
}

// inflight is how many requests are on the ring now.
func (u *uringEngine) inflight() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.slots) - len(u.free)
}

// close stops the reaper and releases the ring and the eventfd. Every request
// must have finished (the engine drained the barrier first).
func (u *uringEngine) close() error {
	if n := u.inflight(); n != 0 {
		return fmt.Errorf("io_uring closed with %d requests in flight", n)
	}
	errEFD := u.efd.Close() // the reaper's Read returns
	<-u.reaperOK
	u.closing.Lock() // no submitter is still polling
	defer u.closing.Unlock()
	return errors.Join(errEFD, u.ring.close())
}

// appendIovecs appends to iov the iovecs of bufs after skipping the first skip
// bytes; empty buffers are left out.
func appendIovecs(iov []unix.Iovec, bufs [][]byte, skip int64) []unix.Iovec {
	for _, b := range bufs {
		if skip >= int64(len(b)) {
			skip -= int64(len(b))
			continue
		}
		b = b[skip:]
		skip = 0
		v := unix.Iovec{Base: &b[0]}
		v.SetLen(len(b))
		iov = append(iov, v)
	}
	return iov
}
