package virtio

import (
	"errors"
	"fmt"
	"runtime/debug"
)

// ErrMemoryFault is returned when touching guest memory faulted: the front-end shrank the
// file behind the memory it shared (truncated its memfd) after handing it over. The queue is
// then broken; the daemon and its other disks go on.
var ErrMemoryFault = errors.New("virtio: guest memory fault")

// catchFault, deferred as
//
//	defer catchFault(debug.SetPanicOnFault(true), &err)
//
// turns a fault on guest memory in the calling goroutine (SIGBUS past the end of a truncated
// memfd) into *err instead of killing the process, and restores the goroutine's previous
// setting. Other panics go on.
func catchFault(old bool, err *error) {
	debug.SetPanicOnFault(old)
	if r := recover(); r != nil {
		if _, ok := r.(interface{ Addr() uintptr }); ok {
			*err = fmt.Errorf("%w: %v", ErrMemoryFault, r)
			return
		}
		panic(r)
	}
}
