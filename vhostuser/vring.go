package vhostuser

import (
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// eventNotifier writes to an eventfd owned as an *os.File, so that a write
// racing with a replacement (SET_VRING_CALL while completions run) fails
// cleanly instead of hitting a reused descriptor number.
type eventNotifier struct {
	f atomic.Pointer[os.File]
}

var eventOne = []byte{1, 0, 0, 0, 0, 0, 0, 0}

// Notify signals the eventfd, if one is set.
func (n *eventNotifier) Notify() {
	if f := n.f.Load(); f != nil {
		f.Write(eventOne)
	}
}

// set replaces the eventfd (fd < 0: none) and closes the old one.
func (n *eventNotifier) set(fd int, name string) {
	var nf *os.File
	if fd >= 0 {
		nf = os.NewFile(uintptr(fd), name)
	}
	if old := n.f.Swap(nf); old != nil {
		old.Close()
	}
}

// vring is the back-end state of one virtqueue across its life: what the
// front-end configured, and the goroutine that serves it while started.
type vring struct {
	index   int
	num     int
	addr    VringAddr
	addrSet bool
	base    uint16 // next available index to pop when (re)started
	kick    int    // -1: none
	call    eventNotifier
	err     eventNotifier
	enabled atomic.Bool

	// While started: the queue and the goroutine serving it.
	q        *virtio.Queue
	wake     int // eventfd poking the goroutine (stop, enable)
	stopping atomic.Bool
	broken   atomic.Bool
	done     chan struct{}
}

func newVring(index int) *vring {
	return &vring{index: index, kick: -1, wake: -1}
}

func (v *vring) started() bool { return v.done != nil }

// poke wakes the ring's goroutine.
func (v *vring) poke() {
	if v.wake >= 0 {
		unix.Write(v.wake, eventOne)
	}
}

func (v *vring) closeKick() {
	if v.kick >= 0 {
		unix.Close(v.kick)
		v.kick = -1
	}
}
