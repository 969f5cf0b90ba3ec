package frontend

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/vublk/vublk/virtio"
)

// Request is one virtio-blk request (virtio 1.2, section 5.2.6).
type Request struct {
	// Type is the request type, virtio.BlkTIn, BlkTOut, BlkTFlush, ...
	Type uint32
	// Sector is the first 512-byte sector.
	Sector uint64
	// Out is the payload the driver sends after the header: the data of a
	// write, the segments of a discard or write-zeroes.
	Out []byte
	// InLen is how many bytes the device writes before the status byte:
	// the length of a read, virtio.BlkIDBytes for GET_ID.
	InLen int
	// OnComplete, if set, is called with the result on the queue's
	// completion goroutine as soon as the completion is seen, before Wait
	// returns. It must not block, nor wait for another request.
	OnComplete func(Result)
}

// WriteRequest writes data at sector.
func WriteRequest(sector uint64, data []byte) Request {
	return Request{Type: virtio.BlkTOut, Sector: sector, Out: data}
}

// ReadRequest reads n bytes from sector.
func ReadRequest(sector uint64, n int) Request {
	return Request{Type: virtio.BlkTIn, Sector: sector, InLen: n}
}

// FlushRequest makes every completed write durable.
func FlushRequest() Request { return Request{Type: virtio.BlkTFlush} }

// GetIDRequest asks for the device's serial.
func GetIDRequest() Request { return Request{Type: virtio.BlkTGetID, InLen: virtio.BlkIDBytes} }

// DiscardRequest discards sectors sectors from sector.
func DiscardRequest(sector uint64, sectors uint32) Request {
	return Request{Type: virtio.BlkTDiscard, Out: discardSegment(sector, sectors, false)}
}

// WriteZeroesRequest zeroes sectors sectors from sector; with unmap the
// device may deallocate them.
func WriteZeroesRequest(sector uint64, sectors uint32, unmap bool) Request {
	return Request{Type: virtio.BlkTWriteZeroes, Out: discardSegment(sector, sectors, unmap)}
}

// discardSegment encodes struct virtio_blk_discard_write_zeroes.
func discardSegment(sector uint64, sectors uint32, unmap bool) []byte {
	b := binary.LittleEndian.AppendUint64(nil, sector)
	b = binary.LittleEndian.AppendUint32(b, sectors)
	flags := uint32(0)
	if unmap {
		flags = 1
	}
	return binary.LittleEndian.AppendUint32(b, flags)
}

// Do submits r and waits for its result.
func (q *Queue) Do(r Request) Result {
	p, err := q.Submit(r)
	if err != nil {
		return Result{Err: err}
	}
	return p.Wait()
}

// Write writes data (a multiple of the block size) at sector.
func (q *Queue) Write(sector uint64, data []byte) error { return q.Do(WriteRequest(sector, data)).Err }

// Read reads n bytes from sector.
func (q *Queue) Read(sector uint64, n int) ([]byte, error) {
	r := q.Do(ReadRequest(sector, n))
	return r.In, r.Err
}

// Flush waits until every write completed before it is durable.
func (q *Queue) Flush() error { return q.Do(FlushRequest()).Err }

// Discard discards sectors sectors from sector.
func (q *Queue) Discard(sector uint64, sectors uint32) error {
	return q.Do(DiscardRequest(sector, sectors)).Err
}

// WriteZeroes zeroes sectors sectors from sector.
func (q *Queue) WriteZeroes(sector uint64, sectors uint32, unmap bool) error {
	return q.Do(WriteZeroesRequest(sector, sectors, unmap)).Err
}

// GetID returns the device serial, without the NUL padding.
func (q *Queue) GetID() (string, error) {
	r := q.Do(GetIDRequest())
	if r.Err != nil {
		return "", r.Err
	}
	id, _, _ := bytes.Cut(r.In, []byte{0})
	return string(id), nil
}

// configSize is how much of struct virtio_blk_config the front-end reads:
// everything up to and including the write-zeroes fields.
const configSize = 60

// Config is the decoded struct virtio_blk_config (virtio 1.2, 5.2.4).
type Config struct {
	Capacity              uint64 // in 512-byte sectors
	SizeMax               uint32
	SegMax                uint32
	BlkSize               uint32
	PhysicalBlockExp      uint8
	Writeback             bool
	NumQueues             uint16
	MaxDiscardSectors     uint32
	MaxDiscardSeg         uint32
	DiscardAlignment      uint32
	MaxWriteZeroesSectors uint32
	MaxWriteZeroesSeg     uint32
	WriteZeroesMayUnmap   bool
}

// DecodeConfig decodes the first 60 bytes of a virtio-blk config space.
func DecodeConfig(b []byte) (Config, error) {
	if len(b) < configSize {
		return Config{}, fmt.Errorf("%w: virtio-blk config of %d bytes", ErrBadReply, len(b))
	}
	le := binary.LittleEndian
	return Config{
		Capacity:              le.Uint64(b[0:]),
		SizeMax:               le.Uint32(b[8:]),
		SegMax:                le.Uint32(b[12:]),
		BlkSize:               le.Uint32(b[20:]),
		PhysicalBlockExp:      b[24],
		Writeback:             b[32] != 0,
		NumQueues:             le.Uint16(b[34:]),
		MaxDiscardSectors:     le.Uint32(b[36:]),
		MaxDiscardSeg:         le.Uint32(b[40:]),
		DiscardAlignment:      le.Uint32(b[44:]),
		MaxWriteZeroesSectors: le.Uint32(b[48:]),
		MaxWriteZeroesSeg:     le.Uint32(b[52:]),
		WriteZeroesMayUnmap:   b[56] != 0,
	}, nil
}
