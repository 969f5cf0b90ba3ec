package frontend

import "errors"

// Sentinel errors.
var (
	// ErrIOError is returned when the device completes a request with
	// VIRTIO_BLK_S_IOERR.
	ErrIOError = errors.New("virtio-blk status IOERR")

	// ErrUnsupported is returned when the device completes a request with
	// VIRTIO_BLK_S_UNSUPP.
	ErrUnsupported = errors.New("virtio-blk status UNSUPP")

	// ErrBadStatus is returned when the device writes a status byte that is
	// none of the three virtio-blk defines.
	ErrBadStatus = errors.New("unknown virtio-blk status")

	// ErrClosed is returned by calls on a closed Device, Queue or Memory,
	// and is the result of every request that had not completed when the
	// Device was closed.
	ErrClosed = errors.New("front-end closed")

	// ErrNack is returned when the back-end answers a message with a
	// non-zero REPLY_ACK.
	ErrNack = errors.New("back-end rejected the message")

	// ErrBadReply is returned when a reply from the back-end is malformed:
	// wrong request type, missing reply flag, wrong payload size.
	ErrBadReply = errors.New("malformed reply from the back-end")

	// ErrNotOffered is returned by Connect when the back-end lacks a
	// feature this front-end needs, or has fewer queues than asked for.
	ErrNotOffered = errors.New("back-end does not offer what the front-end needs")

	// ErrQueueFailed is returned by Queue.Err once the back-end has
	// signalled the queue's error eventfd (it found the ring broken), or
	// has published a used element for a chain that is not in flight.
	ErrQueueFailed = errors.New("virtqueue failed")

	// ErrTooLarge is returned when a request can never fit: its buffer is
	// larger than guest memory, or its chain longer than the queue.
	ErrTooLarge = errors.New("request too large for the queue or guest memory")
)
