package bench

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// patternMagic starts every sector --verify writes ("vublkbn1").
const patternMagic = 0x316e_626b_6c62_7576

// Unwritten and failed blocks have no expected content.
const (
	genNone    = 0          // not written during this run
	genUnknown = ^uint32(0) // a write to it failed: it may hold anything
)

// nextGen is the generation the next write of a block with generation g
// carries: never genNone nor genUnknown.
func nextGen(g uint32) uint32 {
	g++
	if g == genUnknown || g == genNone {
		g = 1
	}
	return g
}

// fillPattern fills b, which is written at byte offset off, with the data
// --verify writes: every 512-byte sector starts with a header (magic, its
// own offset, the run, the block's generation) and continues with
// pseudo-random bytes derived from all three, so that a sector from another
// place, another run or an older write is told apart.
func fillPattern(b []byte, off int64, run uint64, gen uint32) {
	le := binary.LittleEndian
	for s := 0; s+SectorSize <= len(b); s += SectorSize {
		sec := b[s : s+SectorSize]
		so := uint64(off) + uint64(s)
		le.PutUint64(sec[0:], patternMagic)
		le.PutUint64(sec[8:], so)
		le.PutUint64(sec[16:], run)
		le.PutUint32(sec[24:], gen)
		le.PutUint32(sec[28:], 0)
		x := so ^ run ^ uint64(gen)<<32
		for i := 32; i < SectorSize; i += 8 {
			// splitmix64
			x += 0x9e3779b97f4a7c15
			z := x
			z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
			z = (z ^ z>>27) * 0x94d049bb133111eb
			le.PutUint64(sec[i:], z^z>>31)
		}
	}
}

// checkPattern checks that got, read at byte offset off, is what
// fillPattern wrote for run and gen; scratch is len(got) bytes to use. The
// error names the first sector that differs and what it holds instead.
func checkPattern(got, scratch []byte, off int64, run uint64, gen uint32) error {
	fillPattern(scratch, off, run, gen)
	if bytes.Equal(got, scratch) {
		return nil
	}
	le := binary.LittleEndian
	for s := 0; s+SectorSize <= len(got); s += SectorSize {
		sec := got[s : s+SectorSize]
		if bytes.Equal(sec, scratch[s:s+SectorSize]) {
			continue
		}
		at := off + int64(s)
		switch {
		case le.Uint64(sec[0:]) != patternMagic:
			return fmt.Errorf("offset %d: want generation %d, found data that --verify did not write", at, gen)
		case le.Uint64(sec[8:]) != uint64(at):
			return fmt.Errorf("offset %d: want generation %d, found the sector written at offset %d", at, gen, le.Uint64(sec[8:]))
		case le.Uint64(sec[16:]) != run:
			return fmt.Errorf("offset %d: want generation %d, found a sector of another run", at, gen)
		case le.Uint32(sec[24:]) != gen:
			return fmt.Errorf("offset %d: want generation %d, found generation %d", at, gen, le.Uint32(sec[24:]))
		}
		return fmt.Errorf("offset %d: generation %d has a corrupt payload", at, gen)
	}
	return fmt.Errorf("offset %d: %d bytes read, want %d", off, len(got), len(scratch))
}
