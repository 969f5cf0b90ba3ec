// Package backend executes block requests on a Store: parallel lanes of file
// workers, the flush barrier that orders FLUSH against every other request,
// and the stores themselves (regular files and block devices).
//
// The package knows bytes and offsets, never descriptors or guest addresses.
package backend

import "errors"

// SyncError is returned by a DurableWriter when the write reached the file
// and making it durable failed: the engine latches it as a failed sync.
type SyncError struct{ Err error }

func (e *SyncError) Error() string { return "sync after write: " + e.Err.Error() }
func (e *SyncError) Unwrap() error { return e.Err }

// Sentinel errors. Callers test them with errors.Is; the virtio layer maps
// them to a status in one place (virtio.StatusFor).
var (
	// ErrReadOnly is returned when a write, discard or write-zeroes request
	// reaches a store opened read-only.
	ErrReadOnly = errors.New("store is read-only")

	// ErrOutOfRange is returned when a request touches bytes beyond the end
	// of the store, or its offset or length is negative or overflows.
	ErrOutOfRange = errors.New("request out of range")

	// ErrShortIO is returned when the operating system transferred fewer
	// bytes than asked and made no further progress (e.g. the backing file
	// was truncated underneath the export).
	ErrShortIO = errors.New("short read or write")

	// ErrSyncFailed is returned by every Flush after a Sync of the store has
	// failed once: the kernel may have dropped dirty pages, so no later sync
	// can prove that earlier writes are durable. The latch is cleared only by
	// restarting the export.
	ErrSyncFailed = errors.New("an earlier sync of the store failed; writes may be lost")

	// ErrNotSupported is returned by optional store operations the backing
	// file system or device cannot perform.
	ErrNotSupported = errors.New("operation not supported by the store")

	// ErrMisaligned is returned when a request to a store opened with
	// O_DIRECT has an offset or length that is not a multiple of the
	// direct-I/O alignment, and by OpenFile when the export's logical block
	// size is not a multiple of it (such requests would need a
	// read-modify-write).
	ErrMisaligned = errors.New("offset or length not aligned for direct I/O")

	// ErrMemoryFault is returned when a store touching a request's buffers
	// in user space (a bounce buffer copy, the write log, an in-memory
	// store) faulted: the front-end shrank the memory it shared (truncated
	// its memfd). The request fails; the lane and the daemon go on.
	ErrMemoryFault = errors.New("fault on the request's memory")

	// ErrClosed is returned when a request is submitted to an engine that has
	// been closed.
	ErrClosed = errors.New("engine closed")
)
