package vduse

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl passes b, a structure marshalled in the kernel's layout, to the ioctl req on fd, and
// returns its result. The kernel reads and, for _IOR/_IOWR requests, writes b in place; b is
// a Go heap slice that stays alive for the duration of the call (the pointer is taken in the
// call expression, as the unsafe.Pointer rules for syscalls require).
func ioctl(fd int, req uint, b []byte) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(unsafe.Pointer(unsafe.SliceData(b))))
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}
