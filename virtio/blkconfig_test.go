package virtio

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// specConfig is struct virtio_blk_config written out field by field at the
// offsets of virtio 1.2 section 5.2.4, independently of blkconfig.go's
// constants:
//
//	 0 le64 capacity               32 u8   writeback
//	 8 le32 size_max               33 u8   unused0
//	12 le32 seg_max                34 le16 num_queues
//	16 le16 geometry.cylinders     36 le32 max_discard_sectors
//	18 u8   geometry.heads         40 le32 max_discard_seg
//	19 u8   geometry.sectors       44 le32 discard_sector_alignment
//	20 le32 blk_size               48 le32 max_write_zeroes_sectors
//	24 u8   physical_block_exp     52 le32 max_write_zeroes_seg
//	25 u8   alignment_offset       56 u8   write_zeroes_may_unmap
//	26 le16 min_io_size            57 u8   unused1[3]
//	28 le32 opt_io_size            60 le32 max_secure_erase_sectors ...
type specConfig struct {
	capacity                     uint64
	sizeMax, segMax              uint32
	cylinders                    uint16
	heads, sectors               uint8
	blkSize                      uint32
	physExp, alignOff            uint8
	minIO                        uint16
	optIO                        uint32
	writeback                    uint8
	numQueues                    uint16
	maxDiscardSectors, maxDSeg   uint32
	discardAlign                 uint32
	maxWZSectors, maxWZSeg       uint32
	wzMayUnmap                   uint8
	secEraseSectors, secEraseSeg uint32
	secEraseAlign                uint32
}

func (c specConfig) encode() []byte {
	b := make([]byte, 72)
	le := binary.LittleEndian
	le.PutUint64(b[0:], c.capacity)
	le.PutUint32(b[8:], c.sizeMax)
	le.PutUint32(b[12:], c.segMax)
	le.PutUint16(b[16:], c.cylinders)
	b[18], b[19] = c.heads, c.sectors
	le.PutUint32(b[20:], c.blkSize)
	b[24], b[25] = c.physExp, c.alignOff
	le.PutUint16(b[26:], c.minIO)
	le.PutUint32(b[28:], c.optIO)
	b[32] = c.writeback
	le.PutUint16(b[34:], c.numQueues)
	le.PutUint32(b[36:], c.maxDiscardSectors)
	le.PutUint32(b[40:], c.maxDSeg)
	le.PutUint32(b[44:], c.discardAlign)
	le.PutUint32(b[48:], c.maxWZSectors)
	le.PutUint32(b[52:], c.maxWZSeg)
	b[56] = c.wzMayUnmap
	le.PutUint32(b[60:], c.secEraseSectors)
	le.PutUint32(b[64:], c.secEraseSeg)
	le.PutUint32(b[68:], c.secEraseAlign)
	return b
}

func TestBlkConfigSpace(t *testing.T) {
	const gib = 1 << 30
	tests := []struct {
		name      string
		cfg       BlkConfig
		writeback bool
		want      specConfig
	}{
		{
			name: "plain 1 GiB, 512-byte blocks, write through",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 512, NumQueues: 1},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 1},
		},
		{
			name:      "writeback byte",
			cfg:       BlkConfig{Capacity: gib, BlockSize: 512, NumQueues: 4},
			writeback: true,
			want:      specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 4, writeback: 1},
		},
		{
			name: "capacity not a multiple of 512 rounds down",
			cfg:  BlkConfig{Capacity: 1000, BlockSize: 512, NumQueues: 1},
			want: specConfig{capacity: 1, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 1},
		},
		{
			name: "4096-byte logical blocks: no topology",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 4096, PhysicalBlockSize: 4096, NumQueues: 2},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 4096, numQueues: 2},
		},
		{
			name: "512e: 512 logical on 4096 physical",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 512, PhysicalBlockSize: 4096, NumQueues: 1},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 1,
				physExp: 3, minIO: 8},
		},
		{
			name: "physical smaller than logical is ignored",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 4096, PhysicalBlockSize: 512, NumQueues: 1},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 4096, numQueues: 1},
		},
		{
			name: "discard and write zeroes",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 512, NumQueues: 1, Discard: true},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 1,
				maxDiscardSectors: 1 << 22, maxDSeg: 1, discardAlign: 1,
				maxWZSectors: 1 << 22, maxWZSeg: 1, wzMayUnmap: 1},
		},
		{
			name: "discard alignment follows the physical block",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 512, PhysicalBlockSize: 4096, NumQueues: 1, Discard: true},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 1,
				physExp: 3, minIO: 8,
				maxDiscardSectors: 1 << 22, maxDSeg: 1, discardAlign: 8,
				maxWZSectors: 1 << 22, maxWZSeg: 1, wzMayUnmap: 1},
		},
		{
			name: "read only: no discard fields even if asked",
			cfg:  BlkConfig{Capacity: gib, BlockSize: 512, NumQueues: 1, ReadOnly: true, Discard: true},
			want: specConfig{capacity: gib / 512, sizeMax: 4 << 20, segMax: 254, blkSize: 512, numQueues: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.cfg.space(tt.writeback)
			want := tt.want.encode()
			if !bytes.Equal(got[:], want) {
				for i := range want {
					if got[i] != want[i] {
						t.Errorf("byte %d = %#x, want %#x", i, got[i], want[i])
					}
				}
			}
		})
	}
}

func TestBlkConfigFeatures(t *testing.T) {
	always := []int{FVersion1, FRingIndirectDesc, FRingEventIdx, BlkFSizeMax, BlkFSegMax, BlkFBlkSize, BlkFFlush, BlkFConfigWCE, BlkFMQ}
	tests := []struct {
		name  string
		cfg   BlkConfig
		extra []int // on top of always
	}{
		{"plain", BlkConfig{BlockSize: 512}, nil},
		{"read only", BlkConfig{BlockSize: 512, ReadOnly: true}, []int{BlkFRO}},
		{"discard", BlkConfig{BlockSize: 512, Discard: true}, []int{BlkFDiscard, BlkFWriteZeroes}},
		{"read only with discard: RO, no discard", BlkConfig{BlockSize: 512, ReadOnly: true, Discard: true}, []int{BlkFRO}},
		{"topology", BlkConfig{BlockSize: 512, PhysicalBlockSize: 4096}, []int{BlkFTopology}},
		{"same block sizes: no topology", BlkConfig{BlockSize: 4096, PhysicalBlockSize: 4096}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var want uint64
			for _, b := range append(always, tt.extra...) {
				want |= 1 << b
			}
			if got := tt.cfg.Features(); got != want {
				t.Fatalf("Features = %#x, want %#x (extra %#x, missing %#x)", got, want, got&^want, want&^got)
			}
		})
	}
	// Bit numbers from virtio 1.2 sections 5.2.3 and 6.
	for _, b := range []struct {
		name     string
		got, bit int
	}{
		{"SIZE_MAX", BlkFSizeMax, 1}, {"SEG_MAX", BlkFSegMax, 2}, {"GEOMETRY", BlkFGeometry, 4},
		{"RO", BlkFRO, 5}, {"BLK_SIZE", BlkFBlkSize, 6}, {"FLUSH", BlkFFlush, 9},
		{"TOPOLOGY", BlkFTopology, 10}, {"CONFIG_WCE", BlkFConfigWCE, 11}, {"MQ", BlkFMQ, 12},
		{"DISCARD", BlkFDiscard, 13}, {"WRITE_ZEROES", BlkFWriteZeroes, 14},
		{"INDIRECT_DESC", FRingIndirectDesc, 28}, {"EVENT_IDX", FRingEventIdx, 29}, {"VERSION_1", FVersion1, 32},
	} {
		if b.got != b.bit {
			t.Errorf("feature %s is bit %d, want %d", b.name, b.got, b.bit)
		}
	}
}
