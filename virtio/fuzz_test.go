package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math"
	"reflect"
	"slices"
	"testing"
)

// fuzzReader hands out fuzz input as numbers; past the end it gives zeros,
// so every input is usable.
type fuzzReader struct{ b []byte }

func (f *fuzzReader) u8() uint8 {
	if len(f.b) == 0 {
		return 0
	}
	v := f.b[0]
	f.b = f.b[1:]
	return v
}

func (f *fuzzReader) u16() uint16 { return uint16(f.u8()) | uint16(f.u8())<<8 }
func (f *fuzzReader) u64() uint64 {
	return uint64(f.u16()) | uint64(f.u16())<<16 | uint64(f.u16())<<32 | uint64(f.u16())<<48
}

// Reference model of guest memory, written with inclusive ends so that no
// expression can overflow; it shares no code with memory.go.

// lastByte returns start+n-1, and false when n is 0 or the range wraps.
func lastByte(start, n uint64) (uint64, bool) {
	if n == 0 || n-1 > math.MaxUint64-start {
		return 0, false
	}
	return start + (n - 1), true
}

// modelRegion finds the region holding gpa, in GPA or user space.
func modelRegion(rs []Region, a uint64, user bool) (*Region, bool) {
	for i := range rs {
		start := rs[i].GPA
		if user {
			start = rs[i].UserAddr
		}
		last, _ := lastByte(start, uint64(len(rs[i].Data)))
		if start <= a && a <= last {
			return &rs[i], true
		}
	}
	return nil, false
}

// modelCovered reports whether every byte of [gpa, gpa+n) is in some region
// (a zero-length range is always covered; a wrapping one never is).
func modelCovered(rs []Region, gpa, n uint64) bool {
	if n == 0 {
		return true
	}
	end, ok := lastByte(gpa, n)
	if !ok {
		return false
	}
	for cur := gpa; ; {
		r, ok := modelRegion(rs, cur, false)
		if !ok {
			return false
		}
		rEnd, _ := lastByte(r.GPA, uint64(len(r.Data)))
		if end <= rEnd {
			return true
		}
		cur = rEnd + 1
	}
}

// modelInOne reports whether [a, a+n) lies in one region (GPA or user
// space); n == 0 needs a to be mapped.
func modelInOne(rs []Region, a, n uint64, user bool) bool {
	r, ok := modelRegion(rs, a, user)
	if !ok {
		return false
	}
	start := r.GPA
	if user {
		start = r.UserAddr
	}
	return n <= uint64(len(r.Data))-(a-start)
}

// modelByte reads the guest byte at gpa (which is mapped).
func modelByte(rs []Region, gpa uint64) byte {
	r, _ := modelRegion(rs, gpa, false)
	return r.Data[gpa-r.GPA]
}

// span is a guest physical range.
type span struct{ gpa, n uint64 }

// mergeSpans joins contiguous ranges so that two descriptions of the same
// bytes compare equal however they are cut.
func mergeSpans(in []span) []span {
	var out []span
	for _, s := range in {
		if s.n == 0 {
			continue
		}
		if k := len(out) - 1; k >= 0 && out[k].gpa+out[k].n == s.gpa {
			out[k].n += s.n
			continue
		}
		out = append(out, s)
	}
	return out
}

// spansOf locates each slice in guest memory; any slice outside it fails
// the test.
func spansOf(t *testing.T, mem *GuestMemory, bufs [][]byte) []span {
	t.Helper()
	var out []span
	for i, b := range bufs {
		if len(b) == 0 {
			t.Fatalf("slice %d is empty", i)
		}
		ri, off, ok := locate(mem, b)
		if !ok {
			t.Fatalf("slice %d (%d bytes) is not inside guest memory", i, len(b))
		}
		if _, _, ok := locate(mem, b[:cap(b)]); !ok {
			t.Fatalf("slice %d has capacity beyond guest memory", i)
		}
		out = append(out, span{mem.Regions()[ri].GPA + off, uint64(len(b))})
	}
	return out
}

// trimFront and trimBack drop n bytes from a list of spans.
func trimFront(s []span, n uint64) []span {
	for n > 0 && len(s) > 0 {
		c := min(n, s[0].n)
		s[0] = span{s[0].gpa + c, s[0].n - c}
		n -= c
		if s[0].n == 0 {
			s = s[1:]
		}
	}
	return s
}

func trimBack(s []span, n uint64) []span {
	for n > 0 && len(s) > 0 {
		k := len(s) - 1
		c := min(n, s[k].n)
		s[k].n -= c
		n -= c
		if s[k].n == 0 {
			s = s[:k]
		}
	}
	return s
}

// checkParsed checks a ParseBlkRequest result against a model of what the
// segments describe: the right error, and on success every slice inside
// guest memory, exactly the described bytes, the header decoded from the
// first 16 readable bytes and the status byte the last writable one.
func checkParsed(t *testing.T, mem *GuestMemory, segs []Segment, req *BlkRequest, err error) {
	t.Helper()
	rs := mem.Regions()
	var rd, wr []span
	var rdLen, wrLen uint64
	mapped := true
	for _, s := range segs {
		if !modelCovered(rs, s.Addr, uint64(s.Len)) {
			mapped = false
		}
		if s.Write {
			wr = append(wr, span{s.Addr, uint64(s.Len)})
			wrLen += uint64(s.Len)
		} else {
			rd = append(rd, span{s.Addr, uint64(s.Len)})
			rdLen += uint64(s.Len)
		}
	}
	switch {
	case !mapped || wrLen == 0:
		if !errors.Is(err, ErrBadRequest) || req.Status != nil {
			t.Fatalf("unmapped segment or no writable byte: err %v, status found %v", err, req.Status != nil)
		}
		return
	case rdLen < blkHeaderSize:
		if !errors.Is(err, ErrBadRequest) || req.Status == nil {
			t.Fatalf("short header: err %v, status found %v; want ErrBadRequest with the status byte", err, req.Status != nil)
		}
	case err != nil:
		t.Fatalf("valid request rejected: %v", err)
	}
	// The status byte is the last writable byte.
	wr = mergeSpans(wr)
	last := wr[len(wr)-1]
	if len(req.Status) != 1 || cap(req.Status) != 1 {
		t.Fatalf("status is %d bytes (cap %d)", len(req.Status), cap(req.Status))
	}
	if got := spansOf(t, mem, [][]byte{req.Status}); got[0].gpa != last.gpa+last.n-1 {
		t.Fatalf("status byte at %#x, want the last writable byte %#x", got[0].gpa, last.gpa+last.n-1)
	}
	if req.InLen != wrLen-1 {
		t.Fatalf("InLen %d, want %d", req.InLen, wrLen-1)
	}
	if got, want := mergeSpans(spansOf(t, mem, req.In)), trimBack(wr, 1); !reflect.DeepEqual(got, want) && len(got)+len(want) > 0 {
		t.Fatalf("In maps %v, want %v", got, want)
	}
	if err != nil {
		return
	}
	if req.OutLen != rdLen-blkHeaderSize {
		t.Fatalf("OutLen %d, want %d", req.OutLen, rdLen-blkHeaderSize)
	}
	rd = mergeSpans(rd)
	var hdr []byte
	for _, s := range rd {
		for i := uint64(0); i < s.n && len(hdr) < blkHeaderSize; i++ {
			hdr = append(hdr, modelByte(rs, s.gpa+i))
		}
	}
	if req.Type != binary.LittleEndian.Uint32(hdr[0:]) || req.Sector != binary.LittleEndian.Uint64(hdr[8:]) {
		t.Fatalf("decoded type %d sector %d from header %x", req.Type, req.Sector, hdr)
	}
	if got, want := mergeSpans(spansOf(t, mem, req.Out)), trimFront(rd, blkHeaderSize); !reflect.DeepEqual(got, want) && len(got)+len(want) > 0 {
		t.Fatalf("Out maps %v, want %v", got, want)
	}
	// Discard segments decode from the Out bytes, and decoding twice agrees.
	const maxSegs = 8
	ds, derr := req.DiscardSegments(nil, maxSegs)
	n := req.OutLen / discardSegSize
	if req.OutLen == 0 || req.OutLen%discardSegSize != 0 || n > maxSegs {
		if !errors.Is(derr, ErrBadRequest) {
			t.Fatalf("DiscardSegments of %d bytes: %v, want ErrBadRequest", req.OutLen, derr)
		}
		return
	}
	if derr != nil || uint64(len(ds)) != n {
		t.Fatalf("DiscardSegments: %d segments, %v; want %d", len(ds), derr, n)
	}
	var raw []byte
	for _, b := range req.Out {
		raw = append(raw, b...)
	}
	for i, d := range ds {
		r := raw[16*i:]
		want := DiscardSegment{binary.LittleEndian.Uint64(r), binary.LittleEndian.Uint32(r[8:]), binary.LittleEndian.Uint32(r[12:])}
		if d != want {
			t.Fatalf("discard segment %d = %+v, want %+v", i, d, want)
		}
	}
	if again, _ := req.DiscardSegments(nil, maxSegs); !reflect.DeepEqual(again, ds) {
		t.Fatal("DiscardSegments changed the request")
	}
}

// FuzzGuestMemory builds random region layouts (near each other, adjacent,
// overlapping, at the top of the address space) and translates random
// ranges near the region edges, checking every answer against the model.
func FuzzGuestMemory(f *testing.F) {
	f.Add([]byte{0})
	// A, B adjacent at 0x1000 and 0x2000, C after a gap at 0x10000;
	// lookups across A/B, at B's end and in the gap.
	f.Add(new(memSeed).
		region(0x1000, 0, 0x1000, 0x7000_0000).region(0x1000, 1, 0, 0x9000_0000).region(0x400, 0, 0x10000, 0x7000_1000).
		lookupEdge(0, true, -16, 32).lookupEdge(1, true, -1, 2).lookupEdge(1, false, 0x100, 1).
		lookupAt(0x1800, 0x7000_0800, 0x800).lookupAt(0x1000, 0x7000_0000, math.MaxUint64).b)
	// A region ending at 2^64 and one at 0: ranges must not wrap.
	f.Add(new(memSeed).
		topRegion(0x1000, 0x1000_0000).region(0x1000, 0, 0, 0x2000_0000).
		lookupEdge(0, false, -16, 32).lookupAt(math.MaxUint64, 0, 2).lookupAt(math.MaxUint64-0xfff, 0x1000_0000, 0x2000).b)
	// Overlapping regions (rejected).
	f.Add(new(memSeed).region(0x1000, 0, 0x1000, 0).overlapRegion(0x800, 0x1000, 0x10000).b)
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := &fuzzReader{data}
		n := 1 + int(fr.u8()%4)
		rs := make([]Region, n)
		var prevEnd uint64
		for i := range rs {
			size := uint64(fr.u16() % 0x2001) // 0 (invalid) .. 8 KiB
			var gpa uint64
			switch fr.u8() % 4 {
			case 0:
				gpa = fr.u64()
			case 1: // adjacent to or a little after the previous region
				gpa = prevEnd + uint64(fr.u8())
			case 2: // overlapping the previous region
				gpa = prevEnd - uint64(fr.u16()%0x2000)
			case 3: // ending at or near the top of the address space
				gpa = math.MaxUint64 - size + 1 - uint64(fr.u8())
			}
			user := fr.u64()
			if fr.u8()%2 == 1 {
				user = gpa + 0x7f00_0000_0000 // a typical frontend mapping
			}
			rs[i] = Region{GPA: gpa, UserAddr: user, Data: make([]byte, size)}
			prevEnd = gpa + size
		}

		// NewGuestMemory agrees with the model.
		valid := true
		for i, a := range rs {
			aEnd, ok1 := lastByte(a.GPA, uint64(len(a.Data)))
			aUEnd, ok2 := lastByte(a.UserAddr, uint64(len(a.Data)))
			if !ok1 || !ok2 {
				valid = false
				break
			}
			for _, b := range rs[:i] {
				bEnd, _ := lastByte(b.GPA, uint64(len(b.Data)))
				bUEnd, _ := lastByte(b.UserAddr, uint64(len(b.Data)))
				if a.GPA <= bEnd && b.GPA <= aEnd || a.UserAddr <= bUEnd && b.UserAddr <= aUEnd {
					valid = false
				}
			}
		}
		mem, err := NewGuestMemory(rs)
		if valid != (err == nil) {
			t.Fatalf("NewGuestMemory: err %v, model says valid %v", err, valid)
		}
		if err != nil {
			if !errors.Is(err, ErrBadRegion) || mem != nil {
				t.Fatalf("NewGuestMemory failed with %v", err)
			}
			return
		}
		rs = mem.Regions()

		for range 16 {
			k := rs[int(fr.u8())%len(rs)]
			var gpa, va uint64
			switch fr.u8() % 3 {
			case 0: // near the region's start
				d := uint64(int64(int16(fr.u16())))
				gpa, va = k.GPA+d, k.UserAddr+d
			case 1: // near the region's end
				d := uint64(int64(int16(fr.u16())))
				gpa, va = k.GPA+uint64(len(k.Data))+d, k.UserAddr+uint64(len(k.Data))+d
			case 2:
				gpa, va = fr.u64(), fr.u64()
			}
			var length uint64
			switch fr.u8() % 4 {
			case 0:
				length = uint64(fr.u16())
			case 1:
				length = uint64(fr.u8())
			case 2:
				length = math.MaxUint64 - uint64(fr.u16())
			case 3:
				length = fr.u64()
			}

			s, err := mem.Slice(gpa, length)
			if ok := modelInOne(rs, gpa, length, false); ok != (err == nil) {
				t.Fatalf("Slice(%#x, %#x): err %v, model says ok %v", gpa, length, err, ok)
			}
			if err == nil {
				checkOneSlice(t, mem, s, gpa, length, false)
			} else if !errors.Is(err, ErrBadAddress) {
				t.Fatalf("Slice error %v", err)
			}

			s, err = mem.UserSlice(va, length)
			if ok := modelInOne(rs, va, length, true); ok != (err == nil) {
				t.Fatalf("UserSlice(%#x, %#x): err %v, model says ok %v", va, length, err, ok)
			}
			if err == nil {
				checkOneSlice(t, mem, s, va, length, true)
			} else if !errors.Is(err, ErrBadAddress) {
				t.Fatalf("UserSlice error %v", err)
			}

			bufs, err := mem.AppendSlices(nil, gpa, length)
			if ok := modelCovered(rs, gpa, length); ok != (err == nil) {
				t.Fatalf("AppendSlices(%#x, %#x): err %v, model says ok %v", gpa, length, err, ok)
			}
			if err != nil {
				if !errors.Is(err, ErrBadAddress) {
					t.Fatalf("AppendSlices error %v", err)
				}
				continue
			}
			// The slices are the requested range, in order, with no gaps.
			got := mergeSpans(spansOf(t, mem, bufs))
			if length == 0 {
				if len(bufs) != 0 {
					t.Fatalf("AppendSlices of 0 bytes returned %d slices", len(bufs))
				}
				continue
			}
			if len(got) != 1 || got[0] != (span{gpa, length}) {
				t.Fatalf("AppendSlices(%#x, %#x) maps %v", gpa, length, got)
			}
		}
	})
}

// memSeed writes FuzzGuestMemory inputs in the encoding its body reads.
type memSeed struct {
	b       []byte
	regions int
}

func (m *memSeed) u8(v byte) *memSeed { m.b = append(m.b, v); return m }
func (m *memSeed) u16(v uint16) *memSeed {
	m.b = binary.LittleEndian.AppendUint16(m.b, v)
	return m
}
func (m *memSeed) u64(v uint64) *memSeed {
	m.b = binary.LittleEndian.AppendUint64(m.b, v)
	return m
}

// addRegion appends a region; the first byte of the input is the count-1.
func (m *memSeed) addRegion(size uint16, body func()) *memSeed {
	if m.regions == 0 {
		m.b = append(m.b, 0)
	}
	m.regions++
	m.b[0] = byte(m.regions - 1)
	m.u16(size)
	body()
	return m
}

// region: kind 0 places it at gpa, kind 1 at the previous end + gap.
func (m *memSeed) region(size uint16, kind byte, gpaOrGap uint64, user uint64) *memSeed {
	return m.addRegion(size, func() {
		m.u8(kind)
		if kind == 0 {
			m.u64(gpaOrGap)
		} else {
			m.u8(byte(gpaOrGap))
		}
		m.u64(user).u8(0)
	})
}

func (m *memSeed) topRegion(size uint16, user uint64) *memSeed {
	return m.addRegion(size, func() { m.u8(3).u8(0).u64(user).u8(0) })
}

func (m *memSeed) overlapRegion(size, back uint16, user uint64) *memSeed {
	return m.addRegion(size, func() { m.u8(2).u16(back).u64(user).u8(0) })
}

// lookupEdge looks up n bytes at delta from region k's start or end.
func (m *memSeed) lookupEdge(k byte, end bool, delta int16, n uint16) *memSeed {
	kind := byte(0)
	if end {
		kind = 1
	}
	return m.u8(k).u8(kind).u16(uint16(delta)).u8(0).u16(n)
}

// lookupAt looks up n bytes at gpa and at user address va.
func (m *memSeed) lookupAt(gpa, va, n uint64) *memSeed {
	return m.u8(0).u8(2).u64(gpa).u64(va).u8(3).u64(n)
}

// checkOneSlice checks that s is the n bytes at address a of one region.
func checkOneSlice(t *testing.T, mem *GuestMemory, s []byte, a, n uint64, user bool) {
	t.Helper()
	if uint64(len(s)) != n || cap(s) != len(s) {
		t.Fatalf("slice at %#x: len %d cap %d, want %d", a, len(s), cap(s), n)
	}
	ri, off, ok := locate(mem, s)
	if !ok {
		t.Fatalf("slice at %#x is not inside guest memory", a)
	}
	if n == 0 {
		return // an empty slice carries no position worth checking
	}
	r := mem.Regions()[ri]
	start := r.GPA
	if user {
		start = r.UserAddr
	}
	if start+off != a {
		t.Fatalf("slice for %#x is at %#x", a, start+off)
	}
}

// parseFuzzMemory is the fixed layout of FuzzParseBlkRequest: two regions
// adjacent in GPA space, a gap, and a third.
var parseFuzzBases = [...]uint64{0x1000, 0x2000 - 0x80, 0x10000, 0x4000, math.MaxUint64 - 0xff}

func parseFuzzMem(t *testing.T) *GuestMemory {
	return newTestMemory(t,
		testRegionSpec{gpa: 0x1000, user: 0x7f00_0000_0000, size: 0x1000},
		testRegionSpec{gpa: 0x2000, user: 0x5500_0000_0000, size: 0x800},
		testRegionSpec{gpa: 0x10000, user: 0x7f00_0001_0000, size: 0x400},
	)
}

// encodeSeg is the FuzzParseBlkRequest encoding of one segment: base index,
// offset from it, length, flags (1: writable, 2: length is 2^32-1-len).
func encodeSeg(base int, off, n uint16, write bool) []byte {
	fl := byte(0)
	if write {
		fl = 1
	}
	return []byte{byte(base), byte(off), byte(off >> 8), byte(n), byte(n >> 8), fl}
}

// FuzzParseBlkRequest parses random segment lists over fixed memory with
// fuzzed contents.
func FuzzParseBlkRequest(f *testing.F) {
	seed := func(memory []byte, segs ...[]byte) []byte {
		b := []byte{byte(len(segs))}
		for _, s := range segs {
			b = append(b, s...)
		}
		return append(b, memory...)
	}
	// Memory contents start at gpa 0x1000 (region A).
	in := blkHeader(BlkTIn, 8)
	out := concat(blkHeader(BlkTOut, 3), pattern(64, 1))
	disc := concat(blkHeader(BlkTDiscard, 0), discardSeg(8, 8, 0), discardSeg(64, 8, 1))
	f.Add(seed(in, encodeSeg(0, 0, 16, false), encodeSeg(0, 0x100, 512, true), encodeSeg(0, 0x300, 1, true)))
	f.Add(seed(in, encodeSeg(0, 0, 16, false), encodeSeg(0, 0x100, 513, true)))
	f.Add(seed(out, encodeSeg(0, 0, 80, false), encodeSeg(0, 0x300, 1, true)))
	f.Add(seed(out, encodeSeg(0, 0, 5, false), encodeSeg(0, 5, 11, false), encodeSeg(0, 16, 64, false), encodeSeg(2, 0, 1, true)))
	f.Add(seed(disc, encodeSeg(0, 0, 16, false), encodeSeg(0, 16, 7, false), encodeSeg(0, 23, 25, false), encodeSeg(0, 0x200, 1, true)))
	f.Add(seed(nil, encodeSeg(1, 0, 0x100, false), encodeSeg(1, 0x40, 0x80, true))) // across the A/B boundary
	f.Add(seed(in, encodeSeg(0, 0, 15, false), encodeSeg(0, 0x100, 1, true)))       // short header
	f.Add(seed(in, encodeSeg(0, 0, 16, false)))                                     // no status
	f.Add(seed(in, encodeSeg(3, 0, 16, false), encodeSeg(0, 0x100, 1, true)))       // in the gap
	f.Add(seed(in, encodeSeg(4, 0, 0x200, true)))                                   // runs past 2^64
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := &fuzzReader{data}
		mem := parseFuzzMem(t)
		segs := make([]Segment, fr.u8()%16)
		for i := range segs {
			base := parseFuzzBases[int(fr.u8())%len(parseFuzzBases)]
			off, n, fl := fr.u16(), uint32(fr.u16()), fr.u8()
			if fl&2 != 0 {
				n = math.MaxUint32 - n
			}
			segs[i] = Segment{Addr: base + uint64(off), Len: n, Write: fl&1 != 0}
		}
		rest := fr.b
		for _, r := range mem.Regions() {
			rest = rest[copy(r.Data, rest):]
		}
		// A reused request with stale contents, as the device's pool has.
		req := BlkRequest{Out: [][]byte{make([]byte, 3)}, In: [][]byte{make([]byte, 5)}, OutLen: 3, InLen: 5, Status: make([]byte, 1)}
		err := ParseBlkRequest(mem, segs, &req)
		checkParsed(t, mem, segs, &req, err)
	})
}

// Layout of FuzzReadChain's guest memory: a 64 KiB region holding the ring
// and a data area, and a second region right after it in GPA space.
const (
	rcMainUser   = 0x7f00_0000_0000
	rcSecondUser = 0x5500_0000_0000
	rcAvail      = 0x1000
	rcUsed       = 0x2000
	rcData       = 0x3000
	rcMainSize   = 0x10000
	rcSecondSize = 0x1000
)

// chainSeed builds FuzzReadChain inputs: a ring of 2^sizeLog entries whose
// descriptors point into the data area at gpa rcData.
type chainSeed struct {
	sizeLog, flags byte
	lastAvail      uint16
	desc           []byte
	avail          []byte // flags, idx, ring, used_event
	data           []byte
}

func newChainSeed(sizeLog byte, eventIdx bool) *chainSeed {
	size := 1 << sizeLog
	s := &chainSeed{sizeLog: sizeLog, desc: make([]byte, 16*size), avail: make([]byte, 6+2*size)}
	if eventIdx {
		s.flags = 1
	}
	return s
}

func (s *chainSeed) put(b []byte) uint64 {
	gpa := uint64(rcData + len(s.data))
	s.data = append(s.data, b...)
	for len(s.data)%16 != 0 {
		s.data = append(s.data, 0)
	}
	return gpa
}

func (s *chainSeed) publish(heads ...uint16) {
	size := len(s.desc) / 16
	idx := binary.LittleEndian.Uint16(s.avail[2:])
	for _, h := range heads {
		binary.LittleEndian.PutUint16(s.avail[4+2*(int(idx)%size):], h)
		idx++
	}
	binary.LittleEndian.PutUint16(s.avail[2:], idx)
}

func (s *chainSeed) bytes() []byte {
	b := []byte{s.sizeLog, s.flags, byte(s.lastAvail), byte(s.lastAvail >> 8)}
	b = append(b, s.desc...)
	b = append(b, s.avail...)
	return append(b, s.data...)
}

// FuzzReadChain turns fuzz bytes into a descriptor table, an available ring
// and the buffers they point at, then pops, walks and parses every chain,
// completes it and exercises notification, as the device does.
func FuzzReadChain(f *testing.F) {
	{ // IN, OUT, FLUSH as plain chains
		s := newChainSeed(3, false)
		h := s.put(blkHeader(BlkTIn, 1))
		d, st := s.put(make([]byte, 512)), s.put([]byte{0xff})
		putDesc(s.desc, 0, h, 16, DescFNext, 1)
		putDesc(s.desc, 1, d, 512, DescFNext|DescFWrite, 2)
		putDesc(s.desc, 2, st, 1, DescFWrite, 0)
		ho := s.put(concat(blkHeader(BlkTOut, 2), pattern(512, 3)))
		putDesc(s.desc, 5, ho, 16+512, DescFNext, 4)
		putDesc(s.desc, 4, st, 1, DescFWrite, 0)
		hf := s.put(blkHeader(BlkTFlush, 0))
		putDesc(s.desc, 6, hf, 16, DescFNext, 7)
		putDesc(s.desc, 7, st, 1, DescFWrite, 0)
		s.publish(0, 5, 6)
		f.Add(s.bytes())
	}
	{ // indirect GET_ID and discard, with EVENT_IDX
		s := newChainSeed(2, true)
		s.data = make([]byte, 0x500)
		putDesc(s.data[0x00:], 0, rcData+0x100, 16, DescFNext, 1)
		putDesc(s.data[0x00:], 1, rcData+0x200, 20, DescFNext|DescFWrite, 2)
		putDesc(s.data[0x00:], 2, rcData+0x300, 1, DescFWrite, 0)
		putDesc(s.data[0x40:], 0, rcData+0x400, 32, DescFNext, 1)
		putDesc(s.data[0x40:], 1, rcData+0x300, 1, DescFWrite, 0)
		copy(s.data[0x100:], blkHeader(BlkTGetID, 0))
		copy(s.data[0x400:], concat(blkHeader(BlkTDiscard, 0), discardSeg(8, 8, 0)))
		putDesc(s.desc, 0, rcData, 48, DescFIndirect, 0)
		putDesc(s.desc, 3, rcData+0x40, 32, DescFIndirect, 0)
		s.publish(0, 3)
		f.Add(s.bytes())
	}
	{ // a loop, then an out-of-range next
		s := newChainSeed(2, false)
		putDesc(s.desc, 0, rcData, 16, DescFNext, 1)
		putDesc(s.desc, 1, rcData, 16, DescFNext, 0)
		putDesc(s.desc, 2, rcData, 16, DescFNext, 9)
		s.publish(0, 2)
		f.Add(s.bytes())
	}
	{ // a chain crossing into the second region, resumed near 2^16
		s := newChainSeed(1, true)
		s.lastAvail = 0xffff
		binary.LittleEndian.PutUint16(s.avail[2:], 0xffff)
		putDesc(s.desc, 0, rcMainSize-8, 16, DescFNext, 1)
		putDesc(s.desc, 1, rcMainSize+8, 9, DescFWrite, 0)
		s.publish(0, 0)
		f.Add(s.bytes())
	}
	{ // broken ring: avail.idx far ahead
		s := newChainSeed(2, false)
		binary.LittleEndian.PutUint16(s.avail[2:], 0x100)
		f.Add(s.bytes())
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := &fuzzReader{data}
		size := 1 << (fr.u8() % 9) // 1..256 entries
		eventIdx := fr.u8()&1 != 0
		lastAvail := fr.u16()
		mem := newTestMemory(t,
			testRegionSpec{gpa: 0, user: rcMainUser, size: rcMainSize},
			testRegionSpec{gpa: rcMainSize, user: rcSecondUser, size: rcSecondSize},
		)
		main := mem.Regions()[0].Data
		rest := fr.b
		rest = rest[copy(main[:16*size], rest):]
		rest = rest[copy(main[rcAvail:rcAvail+6+2*size], rest):]
		copy(main[rcData:], rest)

		q, err := NewSplitQueue(mem, size, RingAddrs{Desc: rcMainUser, Avail: rcMainUser + rcAvail, Used: rcMainUser + rcUsed}, eventIdx, lastAvail)
		if err != nil {
			t.Fatalf("NewSplitQueue: %v", err)
		}
		var c, lc DescChain
		var req BlkRequest
		q.DisableNotify()
		for pops := 0; ; pops++ {
			head, ok, err := q.Next()
			if err != nil {
				if !errors.Is(err, ErrBrokenRing) {
					t.Fatalf("Next: %v", err)
				}
				break
			}
			if !ok {
				break
			}
			if pops >= size {
				t.Fatalf("popped %d chains from a ring of %d", pops+1, size)
			}
			if int(head) >= size {
				t.Fatalf("head %d beyond the ring", head)
			}
			errLim := q.ReadChainLimited(head, &lc, ChainLimits{MaxSegs: 1 + int(head)%4, MaxSegLen: 16 << (head % 8)})
			limited := slices.Clone(lc.Segs)
			if err := q.ReadChain(head, &c); err != nil {
				if !errors.Is(err, ErrBadChain) {
					t.Fatalf("ReadChain: %v", err)
				}
				if !errors.Is(errLim, ErrBadChain) {
					t.Fatalf("ReadChainLimited on a bad chain: %v", errLim)
				}
				continue
			}
			checkLimited(t, c.Segs, limited, errLim, 1+int(head)%4, 16<<(head%8))
			// A chain is at most a table long: the ring, or an indirect
			// table, which lies in one 64 KiB region.
			if len(c.Segs) == 0 || len(c.Segs) > max(size, rcMainSize/16) {
				t.Fatalf("chain of %d segments", len(c.Segs))
			}
			for i := 1; i < len(c.Segs); i++ {
				if c.Segs[i-1].Write && !c.Segs[i].Write {
					t.Fatal("readable segment after a writable one")
				}
			}
			err = ParseBlkRequest(mem, c.Segs, &req)
			checkParsed(t, mem, c.Segs, &req, err)
			if req.Status != nil {
				req.Status[0] = BlkSOK
			}
			q.PushUsed(head, 1)
			q.NeedInterrupt()
		}
		q.EnableNotify()
		if !bytes.Equal(main[rcUsed+2:rcUsed+4], []byte{byte(q.UsedIdx()), byte(q.UsedIdx() >> 8)}) {
			t.Fatal("used.idx in memory differs from the queue's")
		}
	})
}

// checkLimited compares a walk within limits (limited, errLim) with the
// unlimited walk of the same chain (full): the same segments when the chain
// fits, else ErrChainLimit with only the chain's last descriptor.
func checkLimited(t *testing.T, full, limited []Segment, errLim error, maxSegs int, maxLen uint32) {
	t.Helper()
	fits := len(full) <= maxSegs
	for _, s := range full {
		fits = fits && s.Len <= maxLen
	}
	switch {
	case fits && errLim != nil:
		t.Fatalf("a chain within the limits: %v", errLim)
	case fits && !slices.Equal(full, limited):
		t.Fatalf("limited walk %v, unlimited %v", limited, full)
	case !fits && !errors.Is(errLim, ErrChainLimit):
		t.Fatalf("a chain of %d segments beyond %d x %d bytes: %v", len(full), maxSegs, maxLen, errLim)
	case !fits && (len(limited) != 1 || limited[0] != full[len(full)-1]):
		t.Fatalf("a chain beyond the limits kept %v, want its last segment %v", limited, full[len(full)-1])
	}
}
