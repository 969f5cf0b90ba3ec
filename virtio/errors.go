// Package virtio reads and writes virtqueues in guest memory and turns
// descriptor chains into virtio-blk requests.
//
// Everything here treats the guest as hostile: every address, length, index
// and count read from guest memory is checked before use, and bad input
// becomes an error (a virtio-blk error status, or a broken queue), never a
// panic or an access outside the guest's mapped regions.
package virtio

import "errors"

// Sentinel errors.
var (
	// ErrBadAddress is returned when a guest physical or frontend virtual
	// address range is not inside the guest's memory regions.
	ErrBadAddress = errors.New("address range outside guest memory")

	// ErrBrokenRing is returned when the ring's indices are impossible (more
	// entries available than the ring holds, a head index beyond the ring):
	// the queue cannot be trusted any more and must be stopped.
	ErrBrokenRing = errors.New("virtqueue indices are inconsistent")

	// ErrBadChain is returned when a descriptor chain is malformed: a loop,
	// a next index beyond the table, nested or misaligned indirect tables,
	// a readable descriptor after a writable one, too many descriptors.
	ErrBadChain = errors.New("malformed descriptor chain")

	// ErrChainLimit is returned when a well-formed descriptor chain has
	// more descriptors, or a longer one, than the device advertised
	// (virtio-blk seg_max, size_max): the request fails with an error
	// status and is not parsed further.
	ErrChainLimit = errors.New("descriptor chain beyond the device's limits")

	// ErrBadRequest is returned when a chain is well formed but is not a
	// valid virtio-blk request (no header, no status byte, wrong lengths).
	ErrBadRequest = errors.New("malformed virtio-blk request")

	// ErrBadRegion is returned when a memory region description from the
	// frontend is unusable (zero size, overflowing, overlapping).
	ErrBadRegion = errors.New("invalid guest memory region")
)
