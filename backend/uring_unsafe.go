package backend

// The io_uring rings live in memory shared with the kernel (mmap of the ring
// fd). The head and tail indices are 32-bit words that the kernel reads and
// writes concurrently with us: they are accessed only with sync/atomic
// through pointers cast from the mapped []byte (the slice-then-cast idiom of
// virtio/ring_unsafe.go). Go's atomics are sequentially consistent, so a tail
// store also publishes the SQE written before it (release) and a tail load
// makes the CQEs before it visible (acquire).
//
// Pointers into the mappings are not Go heap pointers; uring.close drops
// every one before unmapping. The kernel is only ever given the address of
// memory that Go keeps referenced elsewhere (the slot table of uringEngine):
// an iovec array and the buffers it points to stay reachable from Go until
// their CQE has been reaped.

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The ABI sizes are fixed by the kernel; these fail to compile if a struct
// drifts.
var (
	_ [unsafe.Sizeof(uringSQE{}) - 64]struct{}
	_ [64 - unsafe.Sizeof(uringSQE{})]struct{}
	_ [unsafe.Sizeof(uringCQE{}) - 16]struct{}
	_ [16 - unsafe.Sizeof(uringCQE{})]struct{}
	_ [unsafe.Sizeof(uringParams{}) - 120]struct{}
	_ [120 - unsafe.Sizeof(uringParams{})]struct{}
)

// sysURingSetup is io_uring_setup(2).
func sysURingSetup(entries uint32, p *uringParams) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(p)), 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// sysURingRegisterEventfd is io_uring_register(2) of an eventfd (opcode
// IORING_REGISTER_EVENTFD).
func sysURingRegisterEventfd(ringFD int, opcode uint32, efd int) error {
	arg := int32(efd)
	_, _, errno := unix.Syscall6(unix.SYS_IO_URING_REGISTER, uintptr(ringFD), uintptr(opcode), uintptr(unsafe.Pointer(&arg)), 1, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// sysURingEnter is io_uring_enter(2) without a signal mask. It goes through
// the scheduler's syscall path (not RawSyscall): an inline read or write can
// take a while (a page fault on guest memory, page allocation).
func sysURingEnter(ringFD int, toSubmit, minComplete, flags uint32) (int, unix.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(ringFD), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	return int(n), errno
}

// ringWord returns the 32-bit ring word at b[off:]. The caller has checked
// that off+4 <= len(b) and off%4 == 0 (the kernel's offsets are).
func ringWord(b []byte, off uint32) *uint32 {
	_ = b[off : off+4 : len(b)]
	return (*uint32)(unsafe.Pointer(&b[off]))
}

// ringWords returns n 32-bit words at b[off:] (the SQ index array).
func ringWords(b []byte, off, n uint32) []uint32 {
	_ = b[off : uint64(off)+4*uint64(n) : len(b)]
	return unsafe.Slice((*uint32)(unsafe.Pointer(&b[off])), n)
}

// ringSQEs views the mapped SQE array.
func ringSQEs(b []byte, n uint32) []uringSQE {
	_ = b[: uint64(n)*uint64(unsafe.Sizeof(uringSQE{})) : len(b)]
	return unsafe.Slice((*uringSQE)(unsafe.Pointer(unsafe.SliceData(b))), n)
}

// ringCQEs views the CQE array at b[off:].
func ringCQEs(b []byte, off, n uint32) []uringCQE {
	_ = b[off : uint64(off)+uint64(n)*uint64(unsafe.Sizeof(uringCQE{})) : len(b)]
	return unsafe.Slice((*uringCQE)(unsafe.Pointer(&b[off])), n)
}

// iovecAddr is the address of iov's first element, for an SQE's addr. iov
// must stay referenced from Go until the SQE's CQE is reaped.
func iovecAddr(iov []unix.Iovec) uint64 {
	return uint64(uintptr(unsafe.Pointer(unsafe.SliceData(iov))))
}
