package backend

import (
	"errors"
	"fmt"
	"math/bits"
	"sync"

	"golang.org/x/sys/unix"
)

// Direct I/O (FileOptions.Direct).
//
// O_DIRECT takes a request only when its file offset and the length of every
// buffer are multiples of the offset alignment (the device's logical block
// size), and every buffer's address is a multiple of the memory alignment
// (the device's DMA alignment); anything else fails with EINVAL. Requests from
// the guest are in the export's logical block size, which OpenFile checks to
// be a multiple of the offset alignment, so their offset and total length
// always fit. Their buffers need not: a guest may hand any byte address and
// split a block across descriptors. Such requests go through a bounce buffer,
// aligned memory taken from a pool, on the same O_DIRECT descriptor: a write
// gathers the buffers into it and writes it, a read reads into it and
// scatters. Nothing goes through the page cache.
//
// The alignment comes from, in order:
//   - a block device: its logical block size (BLKSSZGET), for offsets and
//     memory alike (the DMA alignment is never larger);
//   - a regular file: statx STATX_DIOALIGN, when the kernel (Linux 6.1 and
//     later) and the file system report it;
//   - otherwise a probe: a 512-byte O_DIRECT read at offset 0 into memory that
//     is 512- but not 1024-byte aligned. If the file system takes it, 512 for
//     both; if not, the file system's block size, which is a multiple of every
//     device block size under it.

// bounceSize is the size of one bounce buffer; a larger request is bounced
// in several parts. It is a multiple of every supported alignment.
const bounceSize = 1 << 20

// maxDirectAlign is the largest alignment directIO takes (Linux block
// devices have at most 64 KiB logical blocks).
const maxDirectAlign = 64 << 10

// directIO is the state of a store opened with O_DIRECT.
type directIO struct {
	offAlign int // file offsets and lengths: a power of two
	memAlign int // buffer addresses: a power of two
	pool     sync.Pool
}

// bounceBuffer is one pooled buffer, with the one-element iovec that hands it
// to preadv/pwritev (kept here so that a bounced request allocates nothing).
type bounceBuffer struct {
	buf []byte
	iov [1][]byte
}

// openDirect turns O_DIRECT on for fd and finds its alignment. O_DIRECT is set
// with fcntl after the open rather than passed to open: a file system that
// refuses it answers EINVAL either way, but open(O_CREAT|O_DIRECT) may have
// created the file by then, and OpenFile must create it sparse and sized
// first anyway.
func openDirect(fd int, path string, block bool, fsBlock int) (*directIO, error) {
	err := addFlags(fd, unix.O_DIRECT)
	if errors.Is(err, unix.EINVAL) {
		return nil, fmt.Errorf("open %s: direct I/O is not supported on this file system (O_DIRECT: %v): %w", path, err, ErrNotSupported)
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: set O_DIRECT: %w", path, err)
	}
	offAlign, memAlign, err := directAlignment(fd, block, fsBlock)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	for _, a := range []int{offAlign, memAlign} {
		if a <= 0 || a > maxDirectAlign || bits.OnesCount(uint(a)) != 1 {
			return nil, fmt.Errorf("open %s: direct I/O alignment %d is not a power of two up to %d", path, a, maxDirectAlign)
		}
	}
	d := &directIO{offAlign: offAlign, memAlign: memAlign}
	d.pool.New = func() any {
		return &bounceBuffer{buf: alignedBytes(bounceSize, max(offAlign, memAlign))}
	}
	return d, nil
}

// directAlignment finds the offset and memory alignment of fd, opened with
// O_DIRECT (see the package comment above).
func directAlignment(fd int, block bool, fsBlock int) (offset, memory int, err error) {
	if block {
		lbs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
		if err != nil {
			return 0, 0, fmt.Errorf("logical block size (BLKSSZGET): %w", err)
		}
		return lbs, lbs, nil
	}
	var stx unix.Statx_t
	err = unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	if err == nil && stx.Mask&unix.STATX_DIOALIGN != 0 {
		if stx.Dio_offset_align == 0 || stx.Dio_mem_align == 0 {
			// statx says so when the file cannot do direct I/O at all.
			return 0, 0, fmt.Errorf("direct I/O is not supported on this file (statx reports no alignment): %w", ErrNotSupported)
		}
		return int(stx.Dio_offset_align), int(stx.Dio_mem_align), nil
	}
	a := probeDirectAlignment(fd, fsBlock)
	return a, a, nil
}

// probeDirectAlignment is the alignment of a regular file whose kernel or
// file system does not report it: 512 if a 512-byte read at offset 0 into
// memory aligned to 512 bytes but not 1024 works, else fsBlock (the file
// system block; 4096 if that is not a usable power of two).
func probeDirectAlignment(fd int, fsBlock int) int {
	mem := alignedBytes(2048, 1024)[512:1024]
	for {
		_, err := unix.Pread(fd, mem, 0)
		if err == unix.EINTR {
			continue
		}
		if err == nil {
			return 512
		}
		break
	}
	if fsBlock < 512 || fsBlock > maxDirectAlign || bits.OnesCount(uint(fsBlock)) != 1 {
		return 4096
	}
	return fsBlock
}

// fits checks a request against the alignment: err (ErrMisaligned) when its
// offset or total length is not a multiple of the offset alignment, which no
// buffer can fix; otherwise zeroCopy says whether its buffers can go to the
// kernel as they are, or need the bounce buffer.
func (d *directIO) fits(bufs [][]byte, off int64) (zeroCopy bool, err error) {
	mask := int64(d.offAlign - 1)
	n := totalLen(bufs)
	if off&mask != 0 || n&mask != 0 {
		return false, fmt.Errorf("%w: offset %d length %d, direct I/O needs multiples of %d", ErrMisaligned, off, n, d.offAlign)
	}
	memMask := uintptr(d.memAlign - 1)
	for _, b := range bufs {
		if len(b) == 0 {
			continue
		}
		if int64(len(b))&mask != 0 || bufferAddress(b)&memMask != 0 {
			return false, nil
		}
	}
	return true, nil
}

// bounce runs op (a preadv or pwritev on the O_DIRECT descriptor) over a
// pooled aligned buffer instead of bufs, bounceSize bytes at a time: a write
// copies bufs into it first, a read copies it out to bufs after. The request
// was checked by fits, so every part is aligned.
func (d *directIO) bounce(bufs [][]byte, off int64, write bool, op func(iov [][]byte, off int64) (int, error)) error {
	b := d.pool.Get().(*bounceBuffer)
	defer d.pool.Put(b)
	c := bufCursor{bufs: bufs}
	for n := totalLen(bufs); n > 0; {
		part := b.buf[:min(n, int64(len(b.buf)))]
		if write {
			c.gather(part)
		}
		b.iov[0] = part
		err := vectored(b.iov[:], off, op)
		b.iov[0] = nil
		if err != nil {
			return err
		}
		if !write {
			c.scatter(part)
		}
		off += int64(len(part))
		n -= int64(len(part))
	}
	return nil
}

// bufCursor walks through a request's buffers as one stream of bytes.
type bufCursor struct {
	bufs [][]byte
	i    int // the buffer at the cursor
	off  int // the byte in it
}

// gather fills dst from the buffers at the cursor and moves past them.
func (c *bufCursor) gather(dst []byte) {
	for len(dst) > 0 {
		n := copy(dst, c.bufs[c.i][c.off:])
		dst = dst[n:]
		c.step(n)
	}
}

// scatter copies src into the buffers at the cursor and moves past them.
func (c *bufCursor) scatter(src []byte) {
	for len(src) > 0 {
		n := copy(c.bufs[c.i][c.off:], src)
		src = src[n:]
		c.step(n)
	}
}

func (c *bufCursor) step(n int) {
	c.off += n
	if c.off == len(c.bufs[c.i]) {
		c.i++
		c.off = 0
	}
}

// alignedBytes returns n bytes of Go memory whose address is a multiple of
// align (a power of two): it allocates align more and starts at the first
// aligned byte.
func alignedBytes(n, align int) []byte {
	b := make([]byte, n+align)
	skip := int(-bufferAddress(b) & uintptr(align-1))
	return b[skip : skip+n : skip+n]
}
