package virtio

import "encoding/binary"

// BlkConfig describes the disk a BlkDevice presents to the guest.
type BlkConfig struct {
	// Capacity in bytes; the guest sees Capacity/512 sectors.
	Capacity uint64
	// BlockSize is the logical block size (512 or 4096).
	BlockSize uint32
	// PhysicalBlockSize, when larger than BlockSize, is reported through
	// VIRTIO_BLK_F_TOPOLOGY.
	PhysicalBlockSize uint32
	NumQueues         uint16
	ReadOnly          bool
	// Serial is returned by GET_ID (at most 20 bytes are used).
	Serial string
	// Writeback is the initial cache mode: true is write back (the guest
	// sends flushes), false is write through.
	Writeback bool
	// Discard enables DISCARD and WRITE_ZEROES.
	Discard bool
	// Packed offers VIRTIO_F_RING_PACKED: the driver may then run packed rings.
	Packed bool
}

// Limits the device advertises.
const (
	blkSizeMax       = 4 << 20 // largest single segment
	blkSegMax        = 254     // segments per request
	maxDiscardSector = 1 << 22 // 2 GiB per discard or write-zeroes segment
	maxDiscardSegs   = 1
)

// configSize is the length of struct virtio_blk_config up to and including
// the secure-erase fields; further bytes read as zero.
const configSize = 72

// Offsets in struct virtio_blk_config.
const (
	cfgCapacity        = 0
	cfgSizeMax         = 8
	cfgSegMax          = 12
	cfgBlkSize         = 20
	cfgPhysBlockExp    = 24
	cfgAlignmentOffset = 25
	cfgMinIOSize       = 26
	cfgOptIOSize       = 28
	cfgWriteback       = 32
	cfgNumQueues       = 34
	cfgMaxDiscardSect  = 36
	cfgMaxDiscardSeg   = 40
	cfgDiscardAlign    = 44
	cfgMaxWZSectors    = 48
	cfgMaxWZSeg        = 52
	cfgWZMayUnmap      = 56
)

func (c *BlkConfig) physExp() uint8 {
	if c.PhysicalBlockSize <= c.BlockSize || c.BlockSize == 0 {
		return 0
	}
	exp := uint8(0)
	for c.BlockSize<<(exp+1) <= c.PhysicalBlockSize && exp < 15 {
		exp++
	}
	return exp
}

// Features are the device feature bits for this configuration.
func (c *BlkConfig) Features() uint64 {
	f := uint64(1)<<FVersion1 | 1<<FRingIndirectDesc | 1<<FRingEventIdx |
		1<<BlkFSizeMax | 1<<BlkFSegMax | 1<<BlkFBlkSize | 1<<BlkFFlush |
		1<<BlkFConfigWCE | 1<<BlkFMQ
	if c.Packed {
		f |= 1 << FRingPacked
	}
	if c.ReadOnly {
		f |= 1 << BlkFRO
	} else if c.Discard {
		f |= 1<<BlkFDiscard | 1<<BlkFWriteZeroes
	}
	if c.physExp() > 0 {
		f |= 1 << BlkFTopology
	}
	return f
}

// space encodes struct virtio_blk_config with the given writeback byte.
func (c *BlkConfig) space(writeback bool) [configSize]byte {
	var b [configSize]byte
	le := binary.LittleEndian
	le.PutUint64(b[cfgCapacity:], c.Capacity/SectorSize)
	le.PutUint32(b[cfgSizeMax:], blkSizeMax)
	le.PutUint32(b[cfgSegMax:], blkSegMax)
	le.PutUint32(b[cfgBlkSize:], c.BlockSize)
	if exp := c.physExp(); exp > 0 {
		b[cfgPhysBlockExp] = exp
		b[cfgAlignmentOffset] = 0
		le.PutUint16(b[cfgMinIOSize:], uint16(1)<<exp)
		le.PutUint32(b[cfgOptIOSize:], 0)
	}
	if writeback {
		b[cfgWriteback] = 1
	}
	le.PutUint16(b[cfgNumQueues:], c.NumQueues)
	if c.Discard && !c.ReadOnly {
		align := max(c.BlockSize, c.PhysicalBlockSize) / SectorSize
		le.PutUint32(b[cfgMaxDiscardSect:], maxDiscardSector)
		le.PutUint32(b[cfgMaxDiscardSeg:], maxDiscardSegs)
		le.PutUint32(b[cfgDiscardAlign:], max(align, 1))
		le.PutUint32(b[cfgMaxWZSectors:], maxDiscardSector)
		le.PutUint32(b[cfgMaxWZSeg:], maxDiscardSegs)
		b[cfgWZMayUnmap] = 1
	}
	return b
}
