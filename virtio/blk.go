package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/vublk/vublk/backend"
)

// virtio-blk request types (virtio 1.2, section 5.2.6).
const (
	BlkTIn          = 0
	BlkTOut         = 1
	BlkTFlush       = 4
	BlkTGetID       = 8
	BlkTGetLifetime = 10
	BlkTDiscard     = 11
	BlkTWriteZeroes = 13
	BlkTSecureErase = 14
)

// virtio-blk status values.
const (
	BlkSOK     = 0
	BlkSIOErr  = 1
	BlkSUnsupp = 2
)

// Feature bits: virtio-blk (5.2.3) and the transport-independent ones (6).
const (
	BlkFSizeMax     = 1
	BlkFSegMax      = 2
	BlkFGeometry    = 4
	BlkFRO          = 5
	BlkFBlkSize     = 6
	BlkFFlush       = 9
	BlkFTopology    = 10
	BlkFConfigWCE   = 11
	BlkFMQ          = 12
	BlkFDiscard     = 13
	BlkFWriteZeroes = 14

	FRingIndirectDesc = 28
	FRingEventIdx     = 29
	FVersion1         = 32
	FRingPacked       = 34 // VIRTIO_F_RING_PACKED
)

const (
	// SectorSize is the unit of virtio-blk sector numbers, whatever the
	// logical block size.
	SectorSize = 512
	// BlkIDBytes is the length of the GET_ID answer.
	BlkIDBytes = 20
	// blkHeaderSize is struct virtio_blk_outhdr: type, ioprio, sector.
	blkHeaderSize = 16
	// discardSegSize is struct virtio_blk_discard_write_zeroes.
	discardSegSize = 16
	// discardFlagUnmap is its unmap flag.
	discardFlagUnmap = 1
)

// BlkRequest is a parsed virtio-blk request. The slices point into guest
// memory: data is read and written in place.
type BlkRequest struct {
	Type   uint32
	Sector uint64
	// Out is the driver-to-device payload after the header (OUT data,
	// discard/write-zeroes segments).
	Out    [][]byte
	OutLen uint64
	// In is the device-to-driver payload before the status byte (IN data,
	// GET_ID answer).
	In    [][]byte
	InLen uint64
	// Status is the one status byte, the last device-writable byte.
	Status []byte
	// outBuf is Out's whole array, for the next request: Out starts after
	// the header's slices, and reusing Out itself would lose them from its
	// capacity on every request, until an append allocated again (one
	// allocation in five 4k requests).
	outBuf [][]byte
}

// maxRequestSlices bounds the slices of guest memory one request may be made
// of: twice the advertised segments, so that a legitimate request can cross
// region boundaries, while a front-end that cuts its memory into many small
// regions cannot make one request cost more memory (each slice is a 24-byte
// header kept while the request is in flight, and again in the pool).
const maxRequestSlices = 2 * (blkSegMax + 2)

// ParseBlkRequest turns the segments of a descriptor chain into a request.
// The header may be split across descriptors or share one with data, and
// the status byte may share one with IN data (virtio 1.2 2.6.4: no framing
// assumptions). The header is copied out before it is decoded. The capacity
// of r.Out and r.In is reused.
func ParseBlkRequest(mem *GuestMemory, segs []Segment, r *BlkRequest) error {
	out, in := r.outBuf[:0], r.In[:0]
	if cap(r.Out) > cap(out) {
		out = r.Out[:0] // a BlkRequest whose Out was set by its user
	}
	*r = BlkRequest{}
	var err error
	for _, s := range segs {
		if s.Write {
			in, err = mem.AppendSlices(in, s.Addr, uint64(s.Len))
			r.InLen += uint64(s.Len)
		} else {
			out, err = mem.AppendSlices(out, s.Addr, uint64(s.Len))
			r.OutLen += uint64(s.Len)
		}
		if err == nil && len(out)+len(in) > maxRequestSlices {
			err = fmt.Errorf("more than %d slices of guest memory", maxRequestSlices)
		}
		if err != nil {
			r.Out, r.In, r.outBuf = out[:0], in[:0], out[:0]
			return fmt.Errorf("%w: %w", ErrBadRequest, err)
		}
	}
	r.outBuf = out[:0]
	// The status byte first: with it we can report any other problem.
	if r.InLen < 1 {
		r.Out, r.In = out[:0], in[:0]
		return fmt.Errorf("%w: no device-writable status byte", ErrBadRequest)
	}
	in, r.Status = cutLastByte(in)
	r.InLen--
	r.In = in

	var hdr [blkHeaderSize]byte
	if r.OutLen < blkHeaderSize {
		r.Out = out[:0]
		return fmt.Errorf("%w: header is %d bytes, want %d", ErrBadRequest, r.OutLen, blkHeaderSize)
	}
	out = cutFront(out, hdr[:])
	r.OutLen -= blkHeaderSize
	r.Out = out
	r.Type = binary.LittleEndian.Uint32(hdr[0:])
	r.Sector = binary.LittleEndian.Uint64(hdr[8:])
	return nil
}

// cutLastByte splits off the last byte of bufs (total length >= 1).
func cutLastByte(bufs [][]byte) ([][]byte, []byte) {
	for len(bufs) > 0 && len(bufs[len(bufs)-1]) == 0 {
		bufs = bufs[:len(bufs)-1]
	}
	last := bufs[len(bufs)-1]
	n := len(last) - 1
	status := last[n : n+1 : n+1]
	if n == 0 {
		return bufs[:len(bufs)-1], status
	}
	bufs[len(bufs)-1] = last[:n]
	return bufs, status
}

// cutFront copies len(dst) bytes from the front of bufs into dst and drops
// them (bufs holds at least that many bytes).
func cutFront(bufs [][]byte, dst []byte) [][]byte {
	for len(dst) > 0 {
		n := copy(dst, bufs[0])
		dst = dst[n:]
		if n == len(bufs[0]) {
			bufs = bufs[1:]
		} else {
			bufs[0] = bufs[0][n:]
		}
	}
	for len(bufs) > 0 && len(bufs[0]) == 0 {
		bufs = bufs[1:]
	}
	return bufs
}

// DiscardSegment is one struct virtio_blk_discard_write_zeroes.
type DiscardSegment struct {
	Sector     uint64
	NumSectors uint32
	Flags      uint32
}

// DiscardSegments decodes the segments of a DISCARD or WRITE_ZEROES request,
// at most max of them, copying them out of guest memory first. It does not
// change r.
func (r *BlkRequest) DiscardSegments(dst []DiscardSegment, max int) ([]DiscardSegment, error) {
	if r.OutLen == 0 || r.OutLen%discardSegSize != 0 {
		return dst, fmt.Errorf("%w: discard payload of %d bytes", ErrBadRequest, r.OutLen)
	}
	n := r.OutLen / discardSegSize
	if n > uint64(max) {
		return dst, fmt.Errorf("%w: %d discard segments, at most %d", ErrBadRequest, n, max)
	}
	// Walk r.Out by index and offset: cutFront would trim r.Out[0] in
	// place and leave the request consumed.
	var raw [discardSegSize]byte
	i, off := 0, 0
	for range n {
		for got := 0; got < len(raw); {
			c := copy(raw[got:], r.Out[i][off:])
			got, off = got+c, off+c
			if off == len(r.Out[i]) {
				i, off = i+1, 0
			}
		}
		dst = append(dst, DiscardSegment{
			Sector:     binary.LittleEndian.Uint64(raw[0:]),
			NumSectors: binary.LittleEndian.Uint32(raw[8:]),
			Flags:      binary.LittleEndian.Uint32(raw[12:]),
		})
	}
	return dst, nil
}

// StatusFor maps the result of a store operation to a virtio-blk status. It
// is the one place where errors become statuses.
func StatusFor(err error) uint8 {
	switch {
	case err == nil:
		return BlkSOK
	case errors.Is(err, backend.ErrNotSupported):
		return BlkSUnsupp
	default:
		return BlkSIOErr
	}
}
