package vduse

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// queue is one virtqueue across its life: what the driver set up, the kick eventfd VDUSE
// signals, and the goroutine that serves the ring while it runs. Its fields belong to the
// device's request goroutine (under Device.mu), except what the ring goroutine reads.
type queue struct {
	dev   *Device
	index int

	configured bool // the driver set the ring up (VDUSE_VQ_GET_INFO ready)
	num        int
	addrs      virtio.RingAddrs
	base       uint16   // next available index to pop when (re)started
	resubmit   []uint16 // heads to run again first (taking over from a vublk that died)

	kick    *os.File // our eventfd, non-blocking, read through Go's poller
	kickRC  syscall.RawConn
	irq     irq
	q       *virtio.Queue
	stopped atomic.Bool
	broken  atomic.Bool
	done    chan struct{}
}

func newQueue(d *Device, index int) *queue {
	return &queue{dev: d, index: index, irq: irq{dev: d, index: make([]byte, 4)}}
}

// irq interrupts the driver for one queue (VDUSE_VQ_INJECT_IRQ). Lanes call it concurrently;
// the kernel only reads index.
type irq struct {
	dev   *Device
	index []byte
}

func (n *irq) Notify() {
	if _, err := ioctl(n.dev.fd, ioctlVQInjectIRQ, n.index); err != nil {
		n.dev.log.WithError(err).WithField("queue", binary.LittleEndian.Uint32(n.index)).Debug("VDUSE_VQ_INJECT_IRQ")
	}
}

func (q *queue) running() bool { return q.done != nil }

// start maps the ring, hands VDUSE the kick eventfd and starts the ring's goroutine.
func (q *queue) start() error {
	d := q.dev
	ring, err := virtio.NewSplitQueue(d.mem, q.num, q.addrs, d.features&(1<<virtio.FRingEventIdx) != 0, q.base)
	if err != nil {
		return err
	}
	if log := d.state.queue(q.index, q.num); log != nil {
		if len(q.resubmit) == 0 {
			log.start(ring.UsedIdx())
		}
		ring.SetInflightLog(log)
	}
	if len(q.resubmit) > 0 {
		ring.Resume(q.base, q.resubmit)
		q.resubmit = nil
	}
	if q.kick == nil {
		fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
		if err != nil {
			return fmt.Errorf("eventfd: %w", err)
		}
		q.kick = os.NewFile(uintptr(fd), fmt.Sprintf("vduse-kick-%d", q.index))
		if q.kickRC, err = q.kick.SyscallConn(); err != nil {
			q.kick.Close()
			q.kick = nil
			return fmt.Errorf("kick eventfd: %w", err)
		}
	}
	// VDUSE drops the kick eventfd at every reset: hand it over at every start. A kick that
	// came while none was set is signalled on it at once.
	var kfd int32 = -1
	q.kickRC.Control(func(fd uintptr) { kfd = int32(fd) })
	if _, err := ioctl(d.fd, ioctlVQSetupKickFD, vqEventfd(uint32(q.index), kfd)); err != nil {
		return fmt.Errorf("VDUSE_VQ_SETUP_KICKFD: %w", err)
	}
	binary.LittleEndian.PutUint32(q.irq.index, uint32(q.index))
	q.q = &virtio.Queue{Index: q.index, Ring: ring, Mem: d.mem, Notify: &q.irq}
	q.stopped.Store(false)
	q.broken.Store(false)
	q.done = make(chan struct{})
	d.log.WithFields(logrus.Fields{"queue": q.index, "size": q.num, "base": q.base, "used": ring.UsedIdx()}).Debug("queue started")
	go q.run(q.q, q.done)
	return nil
}

// run serves the ring until the queue is stopped: process, then wait for a kick.
func (q *queue) run(vq *virtio.Queue, done chan struct{}) {
	defer close(done)
	log := q.dev.log.WithField("queue", q.index)
	// Interrupt once at start: a vublk that died may have completed requests without one.
	q.irq.Notify()
	for {
		if !q.broken.Load() {
			if err := q.dev.blk.ProcessQueue(vq); err != nil {
				log.WithError(err).Error("virtqueue is broken; it stays stopped until the driver resets the device")
				q.broken.Store(true)
			}
		}
		if q.stopped.Load() {
			return
		}
		// A turn of ProcessQueue is bounded (a guest that keeps its ring
		// full must not keep the stop path waiting): what it left is
		// processed in the next turn, without waiting for a kick.
		if !q.broken.Load() && vq.Pending() {
			continue
		}
		if err := q.waitKick(); err != nil {
			log.WithError(err).Error("kick eventfd failed")
			return
		}
		if q.stopped.Load() {
			return
		}
	}
}

// waitKick waits until the kick eventfd is signalled (and reads it) or the queue is poked.
func (q *queue) waitKick() error {
	var buf [8]byte
	err := q.kickRC.Read(func(fd uintptr) bool {
		_, err := unix.Read(int(fd), buf[:])
		return err != unix.EAGAIN
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		q.kick.SetReadDeadline(time.Time{})
		return nil
	}
	return err
}

// stop ends the ring's goroutine and waits until every request it popped has completed, so
// that base is the next index to pop and the used ring is up to date.
func (q *queue) stop() {
	if !q.running() {
		return
	}
	q.stopped.Store(true)
	q.kick.SetReadDeadline(time.Unix(1, 0))
	<-q.done
	q.q.Drain()
	q.base = uint16(q.q.Ring.Base())
	q.kick.SetReadDeadline(time.Time{})
	q.q, q.done = nil, nil
}

func (q *queue) closeKick() {
	if q.kick != nil {
		q.kick.Close()
		q.kick = nil
	}
}
