package vhostuser

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// eventNotifier writes to an eventfd owned as an *os.File, so that a write
// racing with a replacement (SET_VRING_CALL while completions run) fails
// cleanly instead of hitting a reused descriptor number.
//
// The eventfd is made non-blocking: the front-end owns it and may leave its
// counter at the maximum, where a blocking write would wait forever, and
// with it the lane, the io_uring reaper or the ring that completes a request
// (and then GET_VRING_BASE, the next connection and shutdown). EAGAIN means
// the counter is not zero: the front-end is signalled already.
type eventNotifier struct {
	f atomic.Pointer[notifierFile]
}

type notifierFile struct {
	f  *os.File
	rc syscall.RawConn
}

var eventOne = []byte{1, 0, 0, 0, 0, 0, 0, 0}

// Notify signals the eventfd, if one is set. It never blocks.
func (n *eventNotifier) Notify() {
	if nf := n.f.Load(); nf != nil {
		// Control holds the descriptor open during the write; the write
		// itself is a plain non-blocking write(2), never a wait in the
		// poller.
		nf.rc.Control(func(fd uintptr) {
			unix.Write(int(fd), eventOne) // EAGAIN: already signalled
		})
	}
}

// set replaces the eventfd (fd < 0: none) and closes the old one. It makes
// fd non-blocking, and fails (closing fd, keeping the old one) if it cannot.
func (n *eventNotifier) set(fd int, name string) error {
	var nf *notifierFile
	if fd >= 0 {
		// The File is made while fd is still blocking, so that it is not
		// registered with Go's network poller: every signal would
		// otherwise also wake the poller, for nothing (Notify never waits
		// on it). Non-blocking after that, for Notify's raw write.
		f := os.NewFile(uintptr(fd), name)
		rc, err := f.SyscallConn()
		if err == nil {
			err = unix.SetNonblock(fd, true)
		}
		if err != nil {
			f.Close()
			return fmt.Errorf("%w: %s descriptor: %w", ErrRejected, name, err)
		}
		nf = &notifierFile{f: f, rc: rc}
	}
	if old := n.f.Swap(nf); old != nil {
		old.f.Close()
	}
	return nil
}

// vring is the back-end state of one virtqueue across its life: what the
// front-end configured, and the goroutine that serves it while started.
type vring struct {
	index   int
	num     int
	addr    VringAddr
	addrSet bool
	base    uint32 // where to go on when (re)started: virtio.Ring.Base
	kick    int    // -1: none
	call    eventNotifier
	err     eventNotifier
	enabled atomic.Bool

	// While started: the queue and the goroutine serving it.
	q        *virtio.Queue
	waiter   *kickWaiter // the goroutine waits for kicks and pokes on it
	stopping atomic.Bool
	// waitMem: the ring was stopped because REM_MEM_REG removed the last
	// memory region; it starts again when memory is added.
	waitMem bool
	broken  atomic.Bool
	done    chan struct{}
}

func newVring(index int) *vring {
	return &vring{index: index, kick: -1}
}

func (v *vring) started() bool { return v.done != nil }

// poke wakes the ring's goroutine (to stop, or to process after an enable).
func (v *vring) poke() {
	if v.waiter != nil {
		v.waiter.poke()
	}
}

// kickWaiter waits for the front-end's kicks through Go's network poller, on
// a non-blocking duplicate of the kick eventfd: the ring's goroutine then
// parks like any goroutine instead of holding a thread in poll(2), which saves
// a thread hand-off on every kick. A poke sets a read deadline in the past,
// which ends the current (or next) wait at once.
//
// The wait does not read the eventfd: Go's poller watches it edge-triggered,
// and every write of the front-end is a new edge that wakes the parked
// goroutine. Reading the counter would cost two read(2) calls per kick (one
// finding it empty before parking, one after). The poller forgets an edge
// that came before the wait began, so wait asks its caller, once the poller
// is armed, whether there is work already (a kick comes after the buffers it
// announces are visible in the ring). The counter is drained every drainEvery
// waits, which keeps it far from its 2^64 limit.
type kickWaiter struct {
	f      *os.File
	rc     syscall.RawConn
	waits  int
	pokedc chan struct{} // for waitPoke, after the kick descriptor failed
	// The poller's callback, made once: a closure made in wait would be
	// allocated on every wait. armed and ready are its state for one wait.
	readFn func(uintptr) bool
	armed  bool
	ready  func() bool
}

// drainEvery is how many waits go by between reads of the kick counter.
const drainEvery = 1024

func newKickWaiter(kick int) (*kickWaiter, error) {
	fd, err := unix.FcntlInt(uintptr(kick), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("dup kick descriptor: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("kick descriptor: %w", err)
	}
	f := os.NewFile(uintptr(fd), "vring-kick")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("kick descriptor: %w", err)
	}
	k := &kickWaiter{f: f, rc: rc, pokedc: make(chan struct{}, 1)}
	k.readFn = func(uintptr) bool {
		// Called once the poller is armed, and again after each wake-up.
		if k.armed {
			return true
		}
		k.armed = true
		return k.ready()
	}
	return k, nil
}

// wait returns after a kick or a poke, or at once if ready reports true once
// the poller is armed (work that came before the wait); an error means the
// kick descriptor is unusable.
func (k *kickWaiter) wait(ready func() bool) error {
	k.waits++
	if k.waits%drainEvery == 0 {
		var buf [8]byte
		k.rc.Read(func(fd uintptr) bool {
			unix.Read(int(fd), buf[:]) // EAGAIN: already empty
			return true
		})
	}
	k.armed, k.ready = false, ready
	err := k.rc.Read(k.readFn)
	k.ready = nil
	if errors.Is(err, os.ErrDeadlineExceeded) {
		k.f.SetReadDeadline(time.Time{})
		return nil
	}
	return err
}

// waitPoke waits for the next poke only.
func (k *kickWaiter) waitPoke() { <-k.pokedc }

// poke ends the current or next wait.
func (k *kickWaiter) poke() {
	k.f.SetReadDeadline(time.Unix(1, 0))
	select {
	case k.pokedc <- struct{}{}:
	default:
	}
}

func (k *kickWaiter) close() { k.f.Close() }

func (v *vring) closeKick() {
	if v.kick >= 0 {
		unix.Close(v.kick)
		v.kick = -1
	}
}

// ringPoll decides how long a ring's goroutine polls the available ring
// after its queue ran empty, before it waits for a kick (virtio.Queue.Poll).
// It tunes itself as QEMU's event loop does (util/aio-posix.c): a wait that
// ended sooner than the maximum says the driver comes back quickly, and the
// poll time grows (doubling, from pollStart); a wait longer than the
// maximum halves it, down to no polling. A driver that submits again within
// the poll time makes no kick and the device no wake-up; one that is idle
// costs at most a few polls that time out.
type ringPoll struct {
	max time.Duration // 0: never poll
	cur time.Duration
}

// pollStart is the first poll time once polling starts to pay.
const pollStart = 2 * time.Microsecond

// SuggestedPollMax is a poll time to start from (QEMU's iothreads poll for
// up to 32 µs). Polling is off unless asked for (Server.SetPollMax): on a
// machine whose cores the driver needs too, the spinning took CPU from it
// and cost more than the wake-ups it saved (README, "Performance").
const SuggestedPollMax = 32 * time.Microsecond

// idled adapts the poll time to how long the queue stayed empty: the poll
// that timed out plus the wait for the kick.
func (p *ringPoll) idled(d time.Duration) {
	switch {
	case p.max <= 0:
	case d > p.max:
		if p.cur /= 2; p.cur < pollStart {
			p.cur = 0
		}
	case d > p.cur:
		p.cur = min(p.max, max(pollStart, 2*p.cur))
	}
}
