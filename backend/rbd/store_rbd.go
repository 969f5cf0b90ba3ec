//go:build rbd && cgo

package rbd

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
)

// Built reports whether this vublk can open RBD images.
const Built = true

const (
	defaultSlots = 256
	// maxIOV is the most buffers one aio request takes from its slot; virtio-blk's seg_max is
	// 254. A request with more runs on a lane.
	maxIOV = 256
	// discardChunk keeps each rbd_discard under the int its result is returned in.
	discardChunk = 1 << 30
)

// Store is a backend.Store on an RBD image. Reads and writes run as librbd aio requests
// (backend.AsyncIO); ReadAt and WriteAt, for the lanes, wait for one on the calling thread.
type Store struct {
	spec     Spec
	conn     *conn
	img      *image
	size     atomic.Int64
	readOnly bool

	// aio; nil with Options.NoAIO
	aio      *aioQueue
	efd      *os.File
	mu       sync.Mutex // guards free
	free     []uint32
	slots    []slot
	inflight sync.WaitGroup // aio requests started and not reaped
	reaped   chan struct{}  // closed when the reaper has exited
	closed   atomic.Bool
}

// slot is one aio request in flight: the request, who to tell, and the pins that keep its
// Go-heap buffers (tests; guest memory is not Go heap) in place while librbd holds them.
type slot struct {
	req  *backend.Request
	done func(*backend.Request, error)
	want int64
	pin  runtime.Pinner
}

var (
	_ backend.Store      = (*Store)(nil)
	_ backend.AsyncIO    = (*Store)(nil)
	_ backend.Discarder  = (*Store)(nil)
	_ backend.ZeroWriter = (*Store)(nil)
)

// opError names the librados/librbd call that failed; errno values stay reachable with
// errors.Is (ENOENT, ETIMEDOUT...).
func opError(op string, err error) error { return fmt.Errorf("rbd: %s: %w", op, err) }

// Open connects to the cluster and opens the image (creating it with CreateSize if it does not
// exist), or its snapshot read-only.
func Open(spec Spec, opt Options) (*Store, error) {
	timeout := ""
	if opt.Timeout > 0 {
		timeout = strconv.FormatFloat(opt.Timeout.Seconds(), 'f', -1, 64)
	}
	var extra []string
	for _, kv := range opt.ClientConf {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("rbd: client option %q: want key=value", kv)
		}
		extra = append(extra, k, v)
	}
	c, err := connect(opt.User, opt.ConfFile, opt.Keyring, timeout, opt.Cache, extra, spec.Pool, spec.Namespace)
	if err != nil {
		return nil, err
	}
	readOnly := opt.ReadOnly || spec.Snap != ""
	img, err := c.open(spec.Image, spec.Snap, readOnly)
	if errors.Is(err, syscall.ENOENT) && spec.Snap == "" && opt.CreateSize > 0 && !readOnly {
		if err = c.create(spec.Image, opt.CreateSize); err == nil || errors.Is(err, syscall.EEXIST) {
			img, err = c.open(spec.Image, "", false)
		}
	}
	if err != nil {
		c.close()
		if errors.Is(err, syscall.ENOENT) && opt.CreateSize == 0 {
			return nil, opError("open "+spec.String(), fmt.Errorf("%w (give a size to create the image)", err))
		}
		return nil, opError("open "+spec.String(), err)
	}
	s := &Store{spec: spec, conn: c, img: img, readOnly: readOnly}
	size, err := img.size()
	if err == nil && opt.Resize && opt.CreateSize > 0 && opt.CreateSize != size && !readOnly {
		if err = img.resize(opt.CreateSize); err == nil {
			size = opt.CreateSize
		}
	}
	if err == nil && !opt.NoAIO {
		err = s.startAIO(max(opt.Slots, 0))
	}
	if err != nil {
		img.close()
		c.close()
		return nil, opError(spec.String(), err)
	}
	s.size.Store(size)
	return s, nil
}

// startAIO sets up the aio slots and the reaper. StartIO's rbd_aio_readv/rbd_aio_writev run
// the request through librbd's layers down to the messenger's send queue on the calling
// thread (connect sets rbd_non_blocking_aio=false): librbd's default hands every request to
// its io_context_pool thread first, a thread wake-up per request (README, "RBD performance").
// No layer waits there for the cluster: a pending image refresh, an exclusive lock to acquire,
// a QoS limit or blocked writes queue the request and dispatch it later from librbd's own
// threads. Only the objecter's in-flight throttle (objecter_inflight_ops and _op_bytes, per
// export) can hold the caller, until replies handled on librbd's threads give budget back.
func (s *Store) startAIO(n int) error {
	if n == 0 {
		n = defaultSlots
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	s.aio = newAIOQueue(s.img, efd, n, maxIOV)
	if s.aio == nil {
		unix.Close(efd)
		return errors.New("out of memory for the aio slots")
	}
	s.efd = os.NewFile(uintptr(efd), "rbd-eventfd")
	s.slots = make([]slot, n)
	s.free = make([]uint32, n)
	for i := range s.free {
		s.free[i] = uint32(n - 1 - i)
	}
	s.reaped = make(chan struct{})
	go s.reaper()
	return nil
}

// Spec is the image (or snapshot) the store serves.
func (s *Store) Spec() Spec { return s.spec }

// Size implements backend.Store.
func (s *Store) Size() int64 { return s.size.Load() }

// ReadOnly reports whether the image was opened read-only (a snapshot always is).
func (s *Store) ReadOnly() bool { return s.readOnly }

// Resize sets the image's size, live (rbd_resize). Shrinking drops the data past the new end.
func (s *Store) Resize(size int64) error {
	if size <= 0 {
		return fmt.Errorf("resize to %d bytes: %w", size, backend.ErrOutOfRange)
	}
	if s.readOnly {
		return fmt.Errorf("resize %s: %w", s.spec, backend.ErrReadOnly)
	}
	if err := s.img.resize(size); err != nil {
		return opError("resize "+s.spec.String(), err)
	}
	s.size.Store(size)
	return nil
}

func (s *Store) check(off, n int64) error {
	size := s.size.Load()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: offset %d length %d size %d", backend.ErrOutOfRange, off, n, size)
	}
	return nil
}

func totalLen(bufs [][]byte) int64 {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	return n
}

// ReadAt implements backend.Store: an aio read waited for on this thread.
func (s *Store) ReadAt(bufs [][]byte, off int64) error { return s.rwWait(false, bufs, off) }

// WriteAt implements backend.Store: an aio write waited for on this thread. The write is in
// librbd's cache (or on its way to the OSDs) when it returns; Sync makes it durable.
func (s *Store) WriteAt(bufs [][]byte, off int64) error {
	if s.readOnly {
		return backend.ErrReadOnly
	}
	return s.rwWait(true, bufs, off)
}

func (s *Store) rwWait(write bool, bufs [][]byte, off int64) error {
	want := totalLen(bufs)
	if err := s.check(off, want); err != nil {
		return err
	}
	n, err := s.img.rwWait(write, bufs, off)
	if write && err == nil {
		n = want // librbd returns 0 or the length for a write that succeeded
	}
	return result(write, off, want, n, err)
}

// result is a read or write's error from librbd's result.
func result(write bool, off, want, n int64, err error) error {
	op := "read"
	if write {
		op = "write"
	}
	switch {
	case err != nil:
		return opError(fmt.Sprintf("%s at offset %d", op, off), err)
	case n != want:
		return fmt.Errorf("rbd: %s at offset %d: %d of %d bytes: %w", op, off, n, want, backend.ErrShortIO)
	}
	return nil
}

// StartIO implements backend.AsyncIO.
func (s *Store) StartIO(r *backend.Request, done func(*backend.Request, error)) bool {
	if s.aio == nil || len(r.Bufs) > maxIOV {
		return false
	}
	write := r.Op == backend.OpWrite
	want := totalLen(r.Bufs)
	err := s.check(r.Offset, want)
	if err == nil && write && s.readOnly {
		err = backend.ErrReadOnly
	}
	if err != nil || want == 0 {
		done(r, err)
		return true
	}
	s.mu.Lock()
	if len(s.free) == 0 {
		s.mu.Unlock()
		return false
	}
	idx := s.free[len(s.free)-1]
	s.free = s.free[:len(s.free)-1]
	s.mu.Unlock()
	sl := &s.slots[idx]
	sl.req, sl.done, sl.want = r, done, want
	for _, b := range r.Bufs {
		if len(b) > 0 {
			sl.pin.Pin(&b[0])
		}
	}
	s.inflight.Add(1)
	if err := s.aio.start(idx, write, r.Bufs, r.Offset); err != nil {
		s.inflight.Done()
		s.release(idx)
		done(r, result(write, r.Offset, want, 0, err))
	}
	return true
}

func (s *Store) release(idx uint32) {
	sl := &s.slots[idx]
	sl.pin.Unpin()
	sl.req, sl.done = nil, nil
	s.mu.Lock()
	s.free = append(s.free, idx)
	s.mu.Unlock()
}

// reaper completes the aio requests librbd has finished, woken by the eventfd.
func (s *Store) reaper() {
	defer close(s.reaped)
	idx := make([]uint32, 64)
	ret := make([]int64, 64)
	var buf [8]byte
	for {
		if _, err := s.efd.Read(buf[:]); err != nil {
			return // closed
		}
		for {
			n := s.aio.reap(idx, ret)
			for i := range n {
				s.finish(idx[i], ret[i])
			}
			if n < len(idx) {
				break
			}
		}
	}
}

func (s *Store) finish(idx uint32, ret int64) {
	sl := &s.slots[idx]
	r, done, want := sl.req, sl.done, sl.want
	s.release(idx)
	var err error
	if ret < 0 {
		err = syscall.Errno(-ret)
	}
	s.inflight.Done()
	// For reads librbd returns the bytes read; for writes 0 or the length.
	n := ret
	if r.Op == backend.OpWrite && ret >= 0 {
		n = want
	}
	done(r, result(r.Op == backend.OpWrite, r.Offset, want, n, err))
}

// Sync implements backend.Store with rbd_flush: every write librbd acknowledged before it is on
// the OSDs when it returns nil.
func (s *Store) Sync() error {
	if s.readOnly {
		return nil
	}
	if err := s.img.flush(); err != nil {
		return opError("flush "+s.spec.String(), err)
	}
	return nil
}

// Discard implements backend.Discarder with rbd_discard.
func (s *Store) Discard(off, n int64) error {
	if s.readOnly {
		return backend.ErrReadOnly
	}
	if err := s.check(off, n); err != nil {
		return err
	}
	for n > 0 {
		c := min(n, discardChunk)
		if err := s.img.discard(off, c); err != nil {
			return opError(fmt.Sprintf("discard offset %d length %d", off, c), err)
		}
		off += c
		n -= c
	}
	return nil
}

// WriteZeroes implements backend.ZeroWriter with rbd_write_zeroes; without unmap the range is
// kept allocated (RBD_WRITE_ZEROES_FLAG_THICK_PROVISION).
func (s *Store) WriteZeroes(off, n int64, unmap bool) error {
	if s.readOnly {
		return backend.ErrReadOnly
	}
	if err := s.check(off, n); err != nil {
		return err
	}
	for n > 0 {
		c := min(n, discardChunk)
		if err := s.img.writeZeroes(off, c, !unmap); err != nil {
			return opError(fmt.Sprintf("write zeroes offset %d length %d", off, c), err)
		}
		off += c
		n -= c
	}
	return nil
}

// Close implements backend.Store: it waits for aio requests in flight, then closes the image
// and the connection. It does not flush.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	if s.aio != nil {
		s.inflight.Wait()
		s.efd.Close()
		<-s.reaped
	}
	err := s.img.close()
	if s.aio != nil {
		s.aio.free()
	}
	s.conn.close()
	if err != nil {
		return opError("close "+s.spec.String(), err)
	}
	return nil
}

// LibraryVersion is the librbd vublk runs with.
func LibraryVersion() string {
	a, b, c := librbdVersion()
	return fmt.Sprintf("%d.%d.%d", a, b, c)
}
