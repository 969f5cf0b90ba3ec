package backend

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// maxIOV is the kernel's IOV_MAX: preadv/pwritev take at most this many
// buffers per call.
const maxIOV = 1024

// FileOptions say how OpenFile opens the backing file.
type FileOptions struct {
	// ReadOnly opens the file O_RDONLY; writes fail with ErrReadOnly.
	ReadOnly bool
	// CreateSize, when positive, creates a sparse file of that size if the
	// path does not exist. An existing file keeps its size unless Resize.
	CreateSize int64
	// Resize sets an existing regular file to CreateSize.
	Resize bool
	// Direct opens the file with O_DIRECT: reads and writes bypass the host's
	// page cache. Aligned requests go straight from and to the caller's
	// buffers; others through an aligned bounce buffer (see directIO).
	// OpenFile fails with ErrNotSupported where the file system refuses
	// O_DIRECT (tmpfs before Linux 6.6, procfs).
	Direct bool
	// LogicalBlockSize, when positive, is the unit every request's offset and
	// length are multiples of (the export's logical block size). With Direct,
	// OpenFile refuses one that is not a multiple of the direct-I/O offset
	// alignment (ErrMisaligned): such requests would need a read-modify-write
	// of the device's blocks, which vublk does not do.
	LogicalBlockSize int
}

// FileStore is a Store on a regular file or a raw block device, using
// preadv/pwritev straight into the caller's buffers.
type FileStore struct {
	f        *os.File
	fd       int
	size     atomic.Int64 // changes with Resize
	readOnly bool
	block    bool
	blkSize  int       // physical block size hint (file system block or device physical sector)
	dio      *directIO // nil unless opened with FileOptions.Direct
}

var (
	_ Store         = (*FileStore)(nil)
	_ Discarder     = (*FileStore)(nil)
	_ ZeroWriter    = (*FileStore)(nil)
	_ DurableWriter = (*FileStore)(nil)
	_ RawIO         = (*FileStore)(nil)
)

// OpenFile opens (and with CreateSize, creates) the backing file or block
// device at path.
func OpenFile(path string, opt FileOptions) (*FileStore, error) {
	flags := os.O_RDWR
	if opt.ReadOnly {
		flags = os.O_RDONLY
	}
	st, statErr := os.Stat(path)
	switch {
	case statErr == nil:
	case errors.Is(statErr, os.ErrNotExist) && opt.CreateSize > 0 && !opt.ReadOnly:
		flags |= os.O_CREATE | os.O_EXCL
	case errors.Is(statErr, os.ErrNotExist) && opt.CreateSize > 0:
		return nil, fmt.Errorf("open %s: %w (a read-only export cannot create it)", path, os.ErrNotExist)
	default:
		return nil, fmt.Errorf("open %s: %w", path, statErr)
	}
	if statErr == nil && !st.Mode().IsRegular() && st.Mode()&os.ModeDevice == 0 {
		return nil, fmt.Errorf("open %s: not a regular file or block device", path)
	}
	f, err := os.OpenFile(path, flags, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	s := &FileStore{f: f, fd: int(f.Fd()), readOnly: opt.ReadOnly}
	noATime(s.fd)
	if err := s.init(path, opt, flags&os.O_CREATE != 0); err != nil {
		f.Close()
		if flags&os.O_CREATE != 0 {
			os.Remove(path)
		}
		return nil, err
	}
	return s, nil
}

func (s *FileStore) init(path string, opt FileOptions, created bool) error {
	var st unix.Stat_t
	if err := unix.Fstat(s.fd, &st); err != nil {
		return fmt.Errorf("stat %s: %w", path, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFBLK:
		s.block = true
		end, err := s.f.Seek(0, io.SeekEnd)
		if err != nil {
			return fmt.Errorf("size of block device %s: %w", path, err)
		}
		s.size.Store(end)
		if pbs, err := unix.IoctlGetInt(s.fd, unix.BLKPBSZGET); err == nil {
			s.blkSize = pbs
		}
	case unix.S_IFREG:
		s.size.Store(st.Size)
		s.blkSize = int(st.Blksize)
		if created || (opt.Resize && opt.CreateSize > 0 && opt.CreateSize != st.Size) {
			if err := s.f.Truncate(opt.CreateSize); err != nil {
				return fmt.Errorf("set size of %s: %w", path, err)
			}
			s.size.Store(opt.CreateSize)
		}
	default:
		return fmt.Errorf("open %s: not a regular file or block device", path)
	}
	if opt.Direct {
		dio, err := openDirect(s.fd, path, s.block, int(st.Blksize))
		if err != nil {
			return err
		}
		if opt.LogicalBlockSize > 0 && opt.LogicalBlockSize%dio.offAlign != 0 {
			return fmt.Errorf("open %s: %w: direct I/O there needs offsets and lengths in multiples of %d bytes, larger than the logical block size %d: use a logical block size of %d or more, or no direct I/O",
				path, ErrMisaligned, dio.offAlign, opt.LogicalBlockSize, dio.offAlign)
		}
		s.dio = dio
	}
	return nil
}

// noATime turns O_NOATIME on for fd where the kernel allows it (vublk owns
// the file, or has CAP_FOWNER): a read of the guest's then does not check
// and update the file's access time, a few percent of a 4 KiB read from the
// page cache (README, "Performance"). Writes still update the modification
// time. Where it is refused (EPERM), reads update the access time as
// before.
func noATime(fd int) { addFlags(fd, unix.O_NOATIME) }

// addFlags turns the file status flags flags on for fd, keeping the others.
func addFlags(fd, flags int) error {
	old, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, old|flags)
	}
	return err
}

// Size implements Store.
func (s *FileStore) Size() int64 { return s.size.Load() }

// Resize changes the store's size to size, live. A writable regular file is
// truncated or extended (sparse). A block device or a read-only file cannot
// be resized from here: its current size is read again (it may have been
// grown underneath, e.g. lvextend), and size must fit in it.
func (s *FileStore) Resize(size int64) error {
	if size <= 0 {
		return fmt.Errorf("resize to %d bytes: %w", size, ErrOutOfRange)
	}
	if !s.block && !s.readOnly {
		if err := s.f.Truncate(size); err != nil {
			return fmt.Errorf("resize %s: %w", s.f.Name(), err)
		}
		s.size.Store(size)
		return nil
	}
	end, err := s.f.Seek(0, io.SeekEnd)
	if err != nil {
		return fmt.Errorf("size of %s: %w", s.f.Name(), err)
	}
	if size > end {
		return fmt.Errorf("resize %s to %d bytes: it has %d: %w", s.f.Name(), size, end, ErrOutOfRange)
	}
	s.size.Store(size)
	return nil
}

// IsBlockDevice reports whether the store is a raw block device.
func (s *FileStore) IsBlockDevice() bool { return s.block }

// PhysicalBlockSize is the store's natural I/O unit (the device's physical
// sector, or the file system block of a regular file); 0 if unknown.
func (s *FileStore) PhysicalBlockSize() int { return s.blkSize }

// Direct reports whether the store was opened with O_DIRECT, and if so the
// alignment that requests must have: their offset and length (and those of
// each buffer, for zero copy) a multiple of offset, each buffer's address a
// multiple of memory.
func (s *FileStore) Direct() (direct bool, offset, memory int) {
	if s.dio == nil {
		return false, 0, 0
	}
	return true, s.dio.offAlign, s.dio.memAlign
}

// ReadOnly reports whether the store was opened read-only.
func (s *FileStore) ReadOnly() bool { return s.readOnly }

func (s *FileStore) check(off, n int64) error {
	size := s.size.Load()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: offset %d length %d size %d", ErrOutOfRange, off, n, size)
	}
	return nil
}

// ReadAt implements Store.
func (s *FileStore) ReadAt(bufs [][]byte, off int64) error {
	return s.transfer(bufs, off, false, func(iov [][]byte, off int64) (int, error) {
		return unix.Preadv(s.fd, iov, off)
	})
}

// WriteAt implements Store.
func (s *FileStore) WriteAt(bufs [][]byte, off int64) error {
	if s.readOnly {
		return ErrReadOnly
	}
	return s.transfer(bufs, off, true, func(iov [][]byte, off int64) (int, error) {
		return unix.Pwritev(s.fd, iov, off)
	})
}

// WriteAtDurable implements DurableWriter with pwritev2(RWF_DSYNC).
func (s *FileStore) WriteAtDurable(bufs [][]byte, off int64) error {
	if s.readOnly {
		return ErrReadOnly
	}
	err := s.transfer(bufs, off, true, func(iov [][]byte, off int64) (int, error) {
		return unix.Pwritev2(s.fd, iov, off, unix.RWF_DSYNC)
	})
	if errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT) {
		// Ambiguous: the write found no space (nothing was written), or
		// the data sync did (a thin device, NFS). Written and synced
		// apart, the two are told apart, and a write that now fits is
		// durable.
		if err := s.WriteAt(bufs, off); err != nil {
			return err
		}
		if err := s.Sync(); err != nil {
			return &SyncError{err}
		}
		return nil
	}
	return err
}

// transfer checks a read or write (write says which op does) and runs op over
// bufs, or with O_DIRECT and buffers it cannot take as they are, over the
// bounce buffer.
func (s *FileStore) transfer(bufs [][]byte, off int64, write bool, op func(iov [][]byte, off int64) (int, error)) error {
	if err := s.check(off, totalLen(bufs)); err != nil {
		return err
	}
	if s.dio != nil {
		zeroCopy, err := s.dio.fits(bufs, off)
		if err != nil {
			return err
		}
		if !zeroCopy {
			return s.dio.bounce(bufs, off, write, op)
		}
	}
	return vectored(bufs, off, op)
}

// RawFD implements RawIO: every request that passes the checks can be
// issued as preadv/pwritev on the file's descriptor, except with O_DIRECT
// one whose buffers are not aligned (ok is false: it needs the bounce buffer
// of ReadAt and WriteAt).
func (s *FileStore) RawFD(write bool, bufs [][]byte, off int64) (fd int, ok bool, err error) {
	if write && s.readOnly {
		return 0, false, ErrReadOnly
	}
	if err := s.check(off, totalLen(bufs)); err != nil {
		return 0, false, err
	}
	if s.dio != nil {
		zeroCopy, err := s.dio.fits(bufs, off)
		if err != nil || !zeroCopy {
			return 0, false, err
		}
	}
	return s.fd, true, nil
}

// Sync implements Store with fdatasync.
func (s *FileStore) Sync() error {
	for {
		err := unix.Fdatasync(s.fd)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("fdatasync: %w", err)
		}
		return nil
	}
}

// Discard implements Discarder by punching a hole (regular files) or by
// zeroing with unmap (block devices); either way the range reads as zeros.
func (s *FileStore) Discard(off, n int64) error {
	return s.WriteZeroes(off, n, true)
}

// WriteZeroes implements ZeroWriter with fallocate: PUNCH_HOLE when unmap is
// allowed, ZERO_RANGE otherwise, falling back to writing zeros where the
// file system or device supports neither. With O_DIRECT those zeros are
// written from the page-aligned zeroChunk without a bounce; the range must
// then be aligned like every direct request (ErrMisaligned).
func (s *FileStore) WriteZeroes(off, n int64, unmap bool) error {
	if s.readOnly {
		return ErrReadOnly
	}
	if err := s.check(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	modes := []uint32{unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE}
	if unmap {
		modes = []uint32{unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, modes[0]}
	}
	for _, mode := range modes {
		err := fallocate(s.fd, mode, off, n)
		if err == nil {
			return nil
		}
		if err != unix.EOPNOTSUPP && err != unix.ENOTSUP && err != unix.EINVAL && err != unix.ENODEV {
			return fmt.Errorf("fallocate mode %#x offset %d length %d: %w", mode, off, n, err)
		}
	}
	return writeZeroes(s, off, n)
}

func fallocate(fd int, mode uint32, off, n int64) error {
	for {
		err := unix.Fallocate(fd, mode, off, n)
		if err != unix.EINTR {
			return err
		}
	}
}

// zeroChunk is the source of zeros where a range cannot be zeroed in place.
// It is page aligned so that a store opened with O_DIRECT writes it without
// the bounce buffer.
var zeroChunk = alignedBytes(1<<20, 4096)

// Close implements Store.
func (s *FileStore) Close() error { return s.f.Close() }

func totalLen(bufs [][]byte) int64 {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	return n
}

// vectored runs a preadv/pwritev-like call until every byte of bufs is
// transferred: it splits batches at IOV_MAX, retries EINTR, and resumes
// after a partial transfer. A transfer of zero bytes is ErrShortIO (end of
// file: the file shrank underneath us).
func vectored(bufs [][]byte, off int64, op func(iov [][]byte, off int64) (int, error)) error {
	want := totalLen(bufs)
	if want == 0 {
		return nil
	}
	// Fast path: one call does it all, no allocation.
	if len(bufs) <= maxIOV {
		n, err := op(bufs, off)
		if err == nil && int64(n) == want {
			return nil
		}
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("at offset %d: %w", off, err)
		}
		if n < 0 {
			n = 0
		}
		bufs = advance(append([][]byte(nil), bufs...), n)
		off += int64(n)
		want -= int64(n)
	} else {
		bufs = append([][]byte(nil), bufs...)
	}
	for want > 0 {
		batch := bufs[:min(len(bufs), maxIOV)]
		n, err := op(batch, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("at offset %d: %w", off, err)
		}
		if n == 0 {
			return fmt.Errorf("at offset %d, %d bytes left: %w", off, want, ErrShortIO)
		}
		bufs = advance(bufs, n)
		off += int64(n)
		want -= int64(n)
	}
	return nil
}

// advance drops the first n bytes of bufs (which it may modify).
func advance(bufs [][]byte, n int) [][]byte {
	for n > 0 && len(bufs) > 0 {
		if n >= len(bufs[0]) {
			n -= len(bufs[0])
			bufs = bufs[1:]
			continue
		}
		bufs[0] = bufs[0][n:]
		n = 0
	}
	for len(bufs) > 0 && len(bufs[0]) == 0 {
		bufs = bufs[1:]
	}
	return bufs
}
