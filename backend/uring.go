package backend

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// The io_uring ABI (include/uapi/linux/io_uring.h), as far as uringEngine
// uses it.
const (
	uringOffSQRing = 0
	uringOffCQRing = 0x8000000
	uringOffSQEs   = 0x10000000

	uringSetupClamp = 1 << 4 // IORING_SETUP_CLAMP: clamp entries to the kernel's maximum

	uringFeatSingleMmap = 1 << 0 // IORING_FEAT_SINGLE_MMAP: SQ and CQ rings share one mapping
	uringFeatNoDrop     = 1 << 1 // IORING_FEAT_NODROP: CQEs are never dropped on overflow

	uringOpReadv  = 1 // IORING_OP_READV
	uringOpWritev = 2 // IORING_OP_WRITEV

	uringRegisterEventfd = 4 // IORING_REGISTER_EVENTFD
)

// uringSQE is struct io_uring_sqe (64 bytes), with the unions flattened to
// the members READV and WRITEV use.
type uringSQE struct {
	opcode      uint8
	flags       uint8
	ioprio      uint16
	fd          int32
	off         uint64
	addr        uint64
	len         uint32
	rwFlags     uint32
	userData    uint64
	bufIndex    uint16
	personality uint16
	spliceFDIn  int32
	addr3       uint64
	_           uint64
}

// uringCQE is struct io_uring_cqe (without the big-CQE extension).
type uringCQE struct {
	userData uint64
	res      int32
	flags    uint32
}

// uringSQOffsets is struct io_sqring_offsets.
type uringSQOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

// uringCQOffsets is struct io_cqring_offsets.
type uringCQOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// uringParams is struct io_uring_params.
type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  uringSQOffsets
	cqOff                                                                  uringCQOffsets
}

// uring is one io_uring instance: its fd and the mapped SQ ring, SQE array
// and CQ ring. It knows nothing about requests. Producing SQEs must be
// serialised by the caller, and so must consuming CQEs.
type uring struct {
	fd       int
	features uint32

	sqRing, cqRing, sqeMem []byte // mappings
	singleMmap             bool   // cqRing is sqRing's mapping

	sqHead, sqTail *uint32
	sqMask         uint32
	sqEntries      uint32
	sqes           []uringSQE
	sqTailLocal    uint32 // our copy of *sqTail (we are its only writer)

	cqHead, cqTail *uint32
	cqMask         uint32
	cqEntries      uint32
	cqes           []uringCQE
}

// uringSetup is io_uring_setup(2); tests replace it to fail.
var uringSetup = sysURingSetup

// newURing sets up a ring of at least entries submission entries (the
// completion ring is twice that, the kernel's default).
func newURing(entries uint32) (*uring, error) {
	var p uringParams
	p.flags = uringSetupClamp
	fd, err := uringSetup(entries, &p)
	if err != nil {
		return nil, fmt.Errorf("io_uring_setup: %w", err)
	}
	u := &uring{fd: fd, features: p.features}
	if err := u.mapRings(&p); err != nil {
		u.close()
		return nil, err
	}
	return u, nil
}

func (u *uring) mapRings(p *uringParams) error {
	if p.features&uringFeatNoDrop == 0 {
		// Without NODROP an overflowing CQ loses completions; we size the CQ
		// so it cannot overflow, but refuse kernels older than 5.5 anyway.
		return fmt.Errorf("io_uring without IORING_FEAT_NODROP (kernel older than 5.5): %w", ErrNotSupported)
	}
	sqSize := p.sqOff.array + p.sqEntries*4
	cqSize := p.cqOff.cqes + p.cqEntries*uint32(16)
	single := p.features&uringFeatSingleMmap != 0
	if single {
		sqSize = max(sqSize, cqSize)
		cqSize = sqSize
	}
	var err error
	prot, flags := unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE
	if u.sqRing, err = unix.Mmap(u.fd, uringOffSQRing, int(sqSize), prot, flags); err != nil {
		return fmt.Errorf("mmap io_uring SQ ring: %w", err)
	}
	if single {
		u.cqRing, u.singleMmap = u.sqRing, true
	} else if u.cqRing, err = unix.Mmap(u.fd, uringOffCQRing, int(cqSize), prot, flags); err != nil {
		return fmt.Errorf("mmap io_uring CQ ring: %w", err)
	}
	if u.sqeMem, err = unix.Mmap(u.fd, uringOffSQEs, int(p.sqEntries)*64, prot, flags); err != nil {
		return fmt.Errorf("mmap io_uring SQEs: %w", err)
	}

	u.sqHead = ringWord(u.sqRing, p.sqOff.head)
	u.sqTail = ringWord(u.sqRing, p.sqOff.tail)
	u.sqMask = *ringWord(u.sqRing, p.sqOff.ringMask)
	u.sqEntries = *ringWord(u.sqRing, p.sqOff.ringEntries)
	u.sqes = ringSQEs(u.sqeMem, u.sqEntries)
	u.sqTailLocal = atomic.LoadUint32(u.sqTail)
	// SQE i always sits at index i of the indirection array, so the array is
	// written once here and never again.
	for i, a := 0, ringWords(u.sqRing, p.sqOff.array, u.sqEntries); i < len(a); i++ {
		a[i] = uint32(i)
	}

	u.cqHead = ringWord(u.cqRing, p.cqOff.head)
	u.cqTail = ringWord(u.cqRing, p.cqOff.tail)
	u.cqMask = *ringWord(u.cqRing, p.cqOff.ringMask)
	u.cqEntries = *ringWord(u.cqRing, p.cqOff.ringEntries)
	u.cqes = ringCQEs(u.cqRing, p.cqOff.cqes, u.cqEntries)
	return nil
}

// errSQFull is returned by push when the SQ has no free entry. uringEngine
// never has more SQEs pending than the ring holds, so it is a bug.
var errSQFull = errors.New("io_uring submission queue full")

// push queues sqe and publishes it to the kernel (it is consumed by the next
// submit). The caller serialises push.
func (u *uring) push(sqe uringSQE) error {
	tail := u.sqTailLocal
	if tail-atomic.LoadUint32(u.sqHead) >= u.sqEntries {
		return errSQFull
	}
	u.sqes[tail&u.sqMask] = sqe
	u.sqTailLocal = tail + 1
	atomic.StoreUint32(u.sqTail, tail+1) // publishes the SQE
	return nil
}

// submit asks the kernel to consume up to n pushed SQEs. Several goroutines
// may call it concurrently, each for the SQEs it pushed: the kernel consumes
// whatever is pending, so every push followed by its own submit(1) is
// consumed by the time the last of those submits returns. It retries EINTR
// and EAGAIN (no memory for a request right now).
func (u *uring) submit(n uint32) error {
	for try := 0; ; try++ {
		_, errno := sysURingEnter(u.fd, n, 0, 0)
		switch errno {
		case 0:
			return nil
		case unix.EINTR:
			continue
		case unix.EAGAIN, unix.EBUSY, unix.ENOMEM:
			// The kernel is short of memory for requests, or of CQ room:
			// transient. Back off a little if it lasts.
			if try >= 100 {
				time.Sleep(50 * time.Microsecond)
			}
			continue
		}
		return fmt.Errorf("io_uring_enter: %w", errno)
	}
}

// reap calls fn for every CQE now in the CQ, in order, releasing each slot
// of the ring before calling fn (so fn may submit again). It returns how
// many it reaped. The caller serialises reap.
func (u *uring) reap(fn func(userData uint64, res int32)) int {
	head := atomic.LoadUint32(u.cqHead)
	n := 0
	for {
		tail := atomic.LoadUint32(u.cqTail)
		if head == tail {
			return n
		}
		for ; head != tail; head++ {
			c := u.cqes[head&u.cqMask]
			atomic.StoreUint32(u.cqHead, head+1)
			fn(c.userData, c.res)
			n++
		}
	}
}

// close unmaps the rings and closes the ring fd. The kernel cancels what is
// still in flight, so the caller must have reaped everything first.
func (u *uring) close() error {
	u.sqHead, u.sqTail, u.cqHead, u.cqTail = nil, nil, nil, nil
	u.sqes, u.cqes = nil, nil
	var errs []error
	maps := []*[]byte{&u.sqeMem, &u.sqRing, &u.cqRing}
	if u.singleMmap {
		u.cqRing = nil // shares the SQ ring's mapping
	}
	for _, m := range maps {
		if *m == nil {
			continue
		}
		if err := unix.Munmap(*m); err != nil {
			errs = append(errs, fmt.Errorf("munmap io_uring ring: %w", err))
		}
		*m = nil
	}
	if u.fd >= 0 {
		if err := unix.Close(u.fd); err != nil {
			errs = append(errs, fmt.Errorf("close io_uring: %w", err))
		}
		u.fd = -1
	}
	return errors.Join(errs...)
}
