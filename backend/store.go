package backend

// Store is the backing storage of one export.
//
// Durability contract:
//   - A WriteAt that returned nil is visible to every later ReadAt, but it is
//     durable (survives a host crash) only once a Sync that was called after
//     the WriteAt returned has itself returned nil.
//   - ReadAt, WriteAt and the optional operations may run concurrently from
//     several lanes, also on overlapping ranges; the result of overlapping
//     concurrent writes is unspecified, as it is for a disk.
//   - Sync may run concurrently with reads. The Barrier never runs it
//     concurrently with a write that the sync must cover.
//   - After Sync returned an error the store may have lost writeback: a later
//     Sync returning nil proves nothing about writes made before the failure.
//     The Barrier latches the first failure (ErrSyncFailed).
//
// Buffers are vectored ([][]byte) so that guest memory is read and written in
// place, without copying.
type Store interface {
	// ReadAt fills every buffer in bufs, in order, from off. It returns an
	// error unless all bytes were read.
	ReadAt(bufs [][]byte, off int64) error
	// WriteAt writes every buffer in bufs, in order, at off. It returns an
	// error unless all bytes were written.
	WriteAt(bufs [][]byte, off int64) error
	// Sync makes every write that returned before the call durable
	// (fdatasync for files and block devices).
	Sync() error
	// Size is the size of the store in bytes.
	Size() int64
	// Close releases the store. It does not sync.
	Close() error
}

// Discarder is implemented by stores that can drop a range (punch a hole).
// After Discard the range reads as zeros.
type Discarder interface {
	Discard(off, n int64) error
}

// ZeroWriter is implemented by stores that can zero a range without being
// sent zeros. With unmap the store may deallocate the range.
type ZeroWriter interface {
	WriteZeroes(off, n int64, unmap bool) error
}

// DurableWriter is implemented by stores that can write a range and make just
// that range durable in one operation (pwritev2 with RWF_DSYNC). It serves
// write-through mode; stores without it get WriteAt followed by Sync. An error
// that may come from the sync part must be a *SyncError, or one that
// writeOnlyError does not know: the engine latches those as failed syncs,
// and lets the known write errors (no space, a fault on the buffers, a bad
// range) fail the one request.
type DurableWriter interface {
	WriteAtDurable(bufs [][]byte, off int64) error
}

// RawIO is implemented by stores whose reads and writes are plain
// preadv/pwritev on a file descriptor, so that an engine may issue them
// itself (io_uring). RawFD checks the request as ReadAt or WriteAt would: a
// non-nil err (out of range, read-only) is the request's result. ok is false
// when this request must go through ReadAt or WriteAt instead (e.g. buffers
// that O_DIRECT cannot take as they are).
type RawIO interface {
	RawFD(write bool, bufs [][]byte, off int64) (fd int, ok bool, err error)
}

// AsyncIO is implemented by stores that issue reads and writes themselves and complete them
// later, from a goroutine of their own (librbd's aio): the Engine then hands reads and writes
// (not write-through writes) to StartIO instead of a lane, so that no lane waits for them.
type AsyncIO interface {
	// StartIO starts r (OpRead or OpWrite, with r.Bufs and r.Offset) and reports true; done is
	// then called exactly once with r and the result, from any goroutine, possibly before StartIO
	// returns. It reports false without touching r when r must run on a lane instead (no
	// capacity left, buffers it cannot take).
	StartIO(r *Request, done func(r *Request, err error)) bool
}
