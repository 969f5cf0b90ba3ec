package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"reflect"
	"testing"

	"github.com/vublk/vublk/backend"
)

// blkHeader encodes struct virtio_blk_outhdr (virtio 1.2 5.2.6).
func blkHeader(typ uint32, sector uint64) []byte {
	h := make([]byte, 16)
	binary.LittleEndian.PutUint32(h[0:], typ)
	binary.LittleEndian.PutUint32(h[4:], 0xdeadbeef) // ioprio: ignored
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

// discardSeg encodes struct virtio_blk_discard_write_zeroes.
func discardSeg(sector uint64, n, flags uint32) []byte {
	b := make([]byte, 16)
	binary.LittleEndian.PutUint64(b[0:], sector)
	binary.LittleEndian.PutUint32(b[8:], n)
	binary.LittleEndian.PutUint32(b[12:], flags)
	return b
}

func concat(bs ...[]byte) []byte {
	var out []byte
	for _, b := range bs {
		out = append(out, b...)
	}
	return out
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// piece is a run of guest memory a request slice must map: gpa and length.
type piece struct {
	gpa uint64
	n   int
}

func pieces(t *testing.T, mem *GuestMemory, bufs [][]byte) []piece {
	t.Helper()
	var out []piece
	for _, b := range bufs {
		if len(b) == 0 {
			t.Fatal("request holds an empty slice")
		}
		out = append(out, piece{gpaOf(t, mem, b), len(b)})
	}
	return out
}

func TestParseBlkRequest(t *testing.T) {
	type want struct {
		typ    uint32
		sector uint64
		out    []piece // nil: no OUT payload
		in     []piece // nil: no IN payload
		status uint64  // gpa of the status byte
	}
	// Each case builds its chain in a fresh ring's memory and returns the
	// segments and what the request must look like.
	tests := []struct {
		name  string
		build func(r *testRing) ([]Segment, want)
	}{
		{"IN: header, data, status", func(r *testRing) ([]Segment, want) {
			h, d, s := r.put(blkHeader(BlkTIn, 42)), r.alloc(512), r.alloc(1)
			return []Segment{{h, 16, false}, {d, 512, true}, {s, 1, true}},
				want{typ: BlkTIn, sector: 42, in: []piece{{d, 512}}, status: s}
		}},
		{"IN: status byte shares the data descriptor", func(r *testRing) ([]Segment, want) {
			h, d := r.put(blkHeader(BlkTIn, 7)), r.alloc(513)
			return []Segment{{h, 16, false}, {d, 513, true}},
				want{typ: BlkTIn, sector: 7, in: []piece{{d, 512}}, status: d + 512}
		}},
		{"IN: data in three descriptors, status alone", func(r *testRing) ([]Segment, want) {
			h, d1, d2, d3, s := r.put(blkHeader(BlkTIn, 1)), r.alloc(100), r.alloc(200), r.alloc(212), r.alloc(1)
			return []Segment{{h, 16, false}, {d1, 100, true}, {d2, 200, true}, {d3, 212, true}, {s, 1, true}},
				want{typ: BlkTIn, sector: 1, in: []piece{{d1, 100}, {d2, 200}, {d3, 212}}, status: s}
		}},
		{"OUT: header, data, status", func(r *testRing) ([]Segment, want) {
			h, d, s := r.put(blkHeader(BlkTOut, 9)), r.put(pattern(1024, 1)), r.alloc(1)
			return []Segment{{h, 16, false}, {d, 1024, false}, {s, 1, true}},
				want{typ: BlkTOut, sector: 9, out: []piece{{d, 1024}}, status: s}
		}},
		{"OUT: header and data in one descriptor", func(r *testRing) ([]Segment, want) {
			hd, s := r.put(concat(blkHeader(BlkTOut, 3), pattern(512, 2))), r.alloc(1)
			return []Segment{{hd, 16 + 512, false}, {s, 1, true}},
				want{typ: BlkTOut, sector: 3, out: []piece{{hd + 16, 512}}, status: s}
		}},
		{"header split 5+11 across descriptors", func(r *testRing) ([]Segment, want) {
			hdr := blkHeader(BlkTOut, 0x1122334455667788)
			h1, h2, d, s := r.put(hdr[:5]), r.put(hdr[5:]), r.put(pattern(512, 3)), r.alloc(1)
			return []Segment{{h1, 5, false}, {h2, 11, false}, {d, 512, false}, {s, 1, true}},
				want{typ: BlkTOut, sector: 0x1122334455667788, out: []piece{{d, 512}}, status: s}
		}},
		{"header split 8+8, second half shares with data", func(r *testRing) ([]Segment, want) {
			hdr := blkHeader(BlkTOut, 77)
			h1, h2d, s := r.put(hdr[:8]), r.put(concat(hdr[8:], pattern(512, 4))), r.alloc(1)
			return []Segment{{h1, 8, false}, {h2d, 8 + 512, false}, {s, 1, true}},
				want{typ: BlkTOut, sector: 77, out: []piece{{h2d + 8, 512}}, status: s}
		}},
		{"header one byte per descriptor", func(r *testRing) ([]Segment, want) {
			hdr := blkHeader(BlkTIn, 5)
			var segs []Segment
			for i := range hdr {
				segs = append(segs, Segment{r.put(hdr[i : i+1]), 1, false})
			}
			s := r.alloc(1)
			return append(segs, Segment{s, 1, true}), want{typ: BlkTIn, sector: 5, status: s}
		}},
		{"header and data cross a region boundary", func(r *testRing) ([]Segment, want) {
			// Bytes [ringSecondGPA-8, ringSecondGPA+24): header half in each
			// region, 16 bytes of data in the second.
			gpa := uint64(ringSecondGPA - 8)
			src := concat(blkHeader(BlkTOut, 11), pattern(16, 5))
			copy(r.bytes(gpa, 8), src[:8])
			copy(r.bytes(ringSecondGPA, 24), src[8:])
			s := r.alloc(1)
			return []Segment{{gpa, 32, false}, {s, 1, true}},
				want{typ: BlkTOut, sector: 11, out: []piece{{ringSecondGPA + 8, 16}}, status: s}
		}},
		{"status byte in the second region of a crossing buffer", func(r *testRing) ([]Segment, want) {
			h := r.put(blkHeader(BlkTIn, 0))
			gpa := uint64(ringSecondGPA - 512)
			return []Segment{{h, 16, false}, {gpa, 513, true}},
				want{typ: BlkTIn, in: []piece{{gpa, 512}}, status: ringSecondGPA}
		}},
		{"status is the only byte in the second region and IN data ends the first", func(r *testRing) ([]Segment, want) {
			h := r.put(blkHeader(BlkTIn, 0))
			gpa := uint64(ringSecondGPA - 4)
			return []Segment{{h, 16, false}, {gpa, 4, true}, {ringSecondGPA, 1, true}},
				want{typ: BlkTIn, in: []piece{{gpa, 4}}, status: ringSecondGPA}
		}},
		{"FLUSH", func(r *testRing) ([]Segment, want) {
			h, s := r.put(blkHeader(BlkTFlush, 0)), r.alloc(1)
			return []Segment{{h, 16, false}, {s, 1, true}}, want{typ: BlkTFlush, status: s}
		}},
		{"GET_ID", func(r *testRing) ([]Segment, want) {
			h, id, s := r.put(blkHeader(BlkTGetID, 0)), r.alloc(20), r.alloc(1)
			return []Segment{{h, 16, false}, {id, 20, true}, {s, 1, true}},
				want{typ: BlkTGetID, in: []piece{{id, 20}}, status: s}
		}},
		{"DISCARD: segment after the header in one descriptor", func(r *testRing) ([]Segment, want) {
			hd, s := r.put(concat(blkHeader(BlkTDiscard, 0), discardSeg(8, 8, 0))), r.alloc(1)
			return []Segment{{hd, 32, false}, {s, 1, true}},
				want{typ: BlkTDiscard, out: []piece{{hd + 16, 16}}, status: s}
		}},
		{"WRITE_ZEROES: segment in its own descriptor", func(r *testRing) ([]Segment, want) {
			h, d, s := r.put(blkHeader(BlkTWriteZeroes, 0)), r.put(discardSeg(8, 8, 1)), r.alloc(1)
			return []Segment{{h, 16, false}, {d, 16, false}, {s, 1, true}},
				want{typ: BlkTWriteZeroes, out: []piece{{d, 16}}, status: s}
		}},
		{"zero-length descriptors anywhere, even unmapped", func(r *testRing) ([]Segment, want) {
			h, s := r.put(blkHeader(BlkTIn, 2)), r.alloc(1)
			return []Segment{{ringGapGPA, 0, false}, {h, 16, false}, {0, 0, false}, {ringGapGPA, 0, true}, {s, 1, true}, {1 << 63, 0, true}},
				want{typ: BlkTIn, sector: 2, status: s}
		}},
		{"unknown type parses (the device answers UNSUPP)", func(r *testRing) ([]Segment, want) {
			h, s := r.put(blkHeader(0xffffffff, 1<<63)), r.alloc(1)
			return []Segment{{h, 16, false}, {s, 1, true}}, want{typ: 0xffffffff, sector: 1 << 63, status: s}
		}},
		{"OUT with device-writable data: parsed, data lands in In", func(r *testRing) ([]Segment, want) {
			// ParseBlkRequest does not know request types; the data simply
			// is not OUT payload, so nothing of it can be written to disk.
			h, d, s := r.put(blkHeader(BlkTOut, 0)), r.alloc(512), r.alloc(1)
			return []Segment{{h, 16, false}, {d, 512, true}, {s, 1, true}},
				want{typ: BlkTOut, in: []piece{{d, 512}}, status: s}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, 8, false)
			segs, w := tt.build(r)
			// Stale slices in a reused request must not survive.
			req := BlkRequest{Out: [][]byte{make([]byte, 9)}, In: [][]byte{make([]byte, 9), make([]byte, 3)}, InLen: 12, OutLen: 9}
			if err := ParseBlkRequest(r.mem, segs, &req); err != nil {
				t.Fatalf("ParseBlkRequest: %v", err)
			}
			if req.Type != w.typ || req.Sector != w.sector {
				t.Errorf("type %d sector %d, want %d %d", req.Type, req.Sector, w.typ, w.sector)
			}
			if got := pieces(t, r.mem, req.Out); !reflect.DeepEqual(got, w.out) {
				t.Errorf("Out = %v, want %v", got, w.out)
			}
			if got := pieces(t, r.mem, req.In); !reflect.DeepEqual(got, w.in) {
				t.Errorf("In = %v, want %v", got, w.in)
			}
			var outLen, inLen uint64
			for _, p := range w.out {
				outLen += uint64(p.n)
			}
			for _, p := range w.in {
				inLen += uint64(p.n)
			}
			if req.OutLen != outLen || req.InLen != inLen {
				t.Errorf("OutLen %d InLen %d, want %d %d", req.OutLen, req.InLen, outLen, inLen)
			}
			if len(req.Status) != 1 || gpaOf(t, r.mem, req.Status) != w.status {
				t.Errorf("status byte at %#x (len %d), want %#x", gpaOf(t, r.mem, req.Status), len(req.Status), w.status)
			}
			// The slices are guest memory itself: the status write is seen
			// by the guest.
			req.Status[0] = 0xab
			if r.bytes(w.status, 1)[0] != 0xab {
				t.Error("status byte is not guest memory")
			}
		})
	}
}

// The header is copied before it is decoded: a guest that changes it after
// parsing does not change the request.
func TestParseBlkRequestCopiesHeader(t *testing.T) {
	r := newTestRing(t, 8, false)
	h, s := r.put(blkHeader(BlkTIn, 100)), r.alloc(1)
	var req BlkRequest
	if err := ParseBlkRequest(r.mem, []Segment{{h, 16, false}, {s, 1, true}}, &req); err != nil {
		t.Fatal(err)
	}
	copy(r.bytes(h, 16), blkHeader(BlkTOut, 5))
	if req.Type != BlkTIn || req.Sector != 100 {
		t.Fatalf("request changed with guest memory: type %d sector %d", req.Type, req.Sector)
	}
}

func TestParseBlkRequestMalformed(t *testing.T) {
	tests := []struct {
		name       string
		build      func(r *testRing) []Segment
		wantStatus bool // the status byte was found, so the device can answer IOERR
	}{
		{"no segments", func(r *testRing) []Segment { return nil }, false},
		{"only readable", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 16, false}}
		}, false},
		{"writable bytes all zero-length", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 16, false}, {r.alloc(1), 0, true}}
		}, false},
		{"header of 15 bytes", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 15, false}, {r.alloc(1), 1, true}}
		}, true},
		{"header of 15 bytes in two descriptors", func(r *testRing) []Segment {
			h := r.put(blkHeader(BlkTOut, 0))
			return []Segment{{h, 10, false}, {h + 10, 5, false}, {r.alloc(1), 1, true}}
		}, true},
		{"no header, only the status byte", func(r *testRing) []Segment {
			return []Segment{{r.alloc(1), 1, true}}
		}, true},
		{"header given device-writable", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 16, true}, {r.alloc(1), 1, true}}
		}, true},
		{"header outside memory", func(r *testRing) []Segment {
			return []Segment{{ringGapGPA, 16, false}, {r.alloc(1), 1, true}}
		}, false},
		{"header runs off the end of memory", func(r *testRing) []Segment {
			return []Segment{{ringGapGPA - 8, 16, false}, {r.alloc(1), 1, true}}
		}, false},
		{"status outside memory", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 16, false}, {ringGapGPA, 1, true}}
		}, false},
		{"data of 4 GiB-1 bytes", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 16, false}, {ringMainGPA, 0xffffffff, true}}
		}, false},
		{"data at 2^64-1", func(r *testRing) []Segment {
			return []Segment{{r.put(blkHeader(BlkTIn, 0)), 16, false}, {1<<64 - 1, 2, true}, {r.alloc(1), 1, true}}
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, 8, false)
			var req BlkRequest
			err := ParseBlkRequest(r.mem, tt.build(r), &req)
			if !errors.Is(err, ErrBadRequest) {
				t.Fatalf("ParseBlkRequest: %v, want ErrBadRequest", err)
			}
			if gotStatus := req.Status != nil; gotStatus != tt.wantStatus {
				t.Fatalf("status found: %v, want %v", gotStatus, tt.wantStatus)
			}
			if req.Status != nil {
				if len(req.Status) != 1 {
					t.Fatalf("status is %d bytes", len(req.Status))
				}
				gpaOf(t, r.mem, req.Status)
			}
		})
	}
}

// segsFor places payload as the OUT data of a request, in descriptors of
// the given sizes, and parses it.
func parsedWithPayload(t *testing.T, r *testRing, typ uint32, payload []byte, split ...int) *BlkRequest {
	t.Helper()
	segs := []Segment{{r.put(blkHeader(typ, 0)), 16, false}}
	rest := payload
	for _, n := range split {
		segs = append(segs, Segment{r.put(rest[:n]), uint32(n), false})
		rest = rest[n:]
	}
	if len(rest) > 0 {
		segs = append(segs, Segment{r.put(rest), uint32(len(rest)), false})
	}
	segs = append(segs, Segment{r.alloc(1), 1, true})
	var req BlkRequest
	if err := ParseBlkRequest(r.mem, segs, &req); err != nil {
		t.Fatal(err)
	}
	return &req
}

func TestDiscardSegments(t *testing.T) {
	tests := []struct {
		name    string
		payload []byte
		split   []int
		max     int
		want    []DiscardSegment // nil: ErrBadRequest
	}{
		{"one", discardSeg(8, 16, 0), nil, 1, []DiscardSegment{{8, 16, 0}}},
		{"unmap flag", discardSeg(8, 16, discardFlagUnmap), nil, 1, []DiscardSegment{{8, 16, 1}}},
		{"unknown flags are decoded, not judged", discardSeg(1, 2, 0xfffffffe), nil, 1, []DiscardSegment{{1, 2, 0xfffffffe}}},
		{"large values", discardSeg(1<<64-1, 0xffffffff, 0), nil, 1, []DiscardSegment{{1<<64 - 1, 0xffffffff, 0}}},
		{"split 3+5+8 across descriptors", discardSeg(0x0102030405060708, 0x0a0b0c0d, 1), []int{3, 5}, 1, []DiscardSegment{{0x0102030405060708, 0x0a0b0c0d, 1}}},
		{"three", concat(discardSeg(0, 8, 0), discardSeg(64, 8, 1), discardSeg(128, 8, 0)), []int{20}, 4, []DiscardSegment{{0, 8, 0}, {64, 8, 1}, {128, 8, 0}}},
		{"more than max", concat(discardSeg(0, 8, 0), discardSeg(64, 8, 0)), nil, 1, nil},
		{"empty", nil, nil, 1, nil},
		{"15 bytes", discardSeg(0, 8, 0)[:15], nil, 1, nil},
		{"17 bytes", concat(discardSeg(0, 8, 0), []byte{0}), nil, 1, nil},
		{"max 0", discardSeg(0, 8, 0), nil, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, 8, false)
			req := parsedWithPayload(t, r, BlkTDiscard, tt.payload, tt.split...)
			prefix := []DiscardSegment{{99, 99, 99}}
			got, err := req.DiscardSegments(prefix, tt.max)
			if tt.want == nil {
				if !errors.Is(err, ErrBadRequest) {
					t.Fatalf("DiscardSegments = %v, %v; want ErrBadRequest", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, append(prefix, tt.want...)) {
				t.Fatalf("DiscardSegments = %v, want %v after the prefix", got, tt.want)
			}
			// Decoding does not consume the request: a second call agrees.
			again, err := req.DiscardSegments(nil, tt.max)
			if err != nil || !reflect.DeepEqual(again, tt.want) {
				t.Fatalf("second DiscardSegments = %v, %v; want %v", again, err, tt.want)
			}
		})
	}
}

// DiscardSegments copies the segments out: changing guest memory afterwards
// does not change them.
func TestDiscardSegmentsCopies(t *testing.T) {
	r := newTestRing(t, 8, false)
	req := parsedWithPayload(t, r, BlkTWriteZeroes, discardSeg(8, 8, 0))
	got, err := req.DiscardSegments(nil, 1)
	if err != nil {
		t.Fatal(err)
	}
	copy(req.Out[0], discardSeg(1<<40, 1<<30, 3))
	if got[0] != (DiscardSegment{8, 8, 0}) {
		t.Fatalf("segment changed with guest memory: %+v", got[0])
	}
}

func TestStatusFor(t *testing.T) {
	tests := []struct {
		err  error
		want uint8
	}{
		{nil, BlkSOK},
		{backend.ErrNotSupported, BlkSUnsupp},
		{fmt.Errorf("discard: %w", backend.ErrNotSupported), BlkSUnsupp},
		{fmt.Errorf("lane 2: %w", fmt.Errorf("fallocate: %w", backend.ErrNotSupported)), BlkSUnsupp},
		{errors.Join(errors.New("x"), backend.ErrNotSupported), BlkSUnsupp},
		{backend.ErrOutOfRange, BlkSIOErr},
		{fmt.Errorf("read: %w", backend.ErrOutOfRange), BlkSIOErr},
		{backend.ErrReadOnly, BlkSIOErr},
		{fmt.Errorf("write: %w", backend.ErrReadOnly), BlkSIOErr},
		{backend.ErrSyncFailed, BlkSIOErr},
		{fmt.Errorf("flush: %w", backend.ErrSyncFailed), BlkSIOErr},
		{backend.ErrShortIO, BlkSIOErr},
		{backend.ErrClosed, BlkSIOErr},
		{ErrBadRequest, BlkSIOErr},
		{io.ErrUnexpectedEOF, BlkSIOErr},
		{errors.New("EIO"), BlkSIOErr},
	}
	for _, tt := range tests {
		name := "nil"
		if tt.err != nil {
			name = tt.err.Error()
		}
		t.Run(name, func(t *testing.T) {
			if got := StatusFor(tt.err); got != tt.want {
				t.Fatalf("StatusFor(%v) = %d, want %d", tt.err, got, tt.want)
			}
		})
	}
}

// TestParseBlkRequestNoAllocs: a request reused for write after write (the pooled blkReq) parses
// without allocating once its slices have grown: the header's slice, cut off the front of Out,
// must not be lost from the capacity kept for the next request.
func TestParseBlkRequestNoAllocs(t *testing.T) {
	r := newTestRing(t, 8, false)
	h, d, s := r.put(blkHeader(BlkTOut, 9)), r.put(pattern(4096, 1)), r.alloc(1)
	hd := r.put(append(blkHeader(BlkTOut, 9), pattern(512, 2)...))
	for _, segs := range [][]Segment{
		{{h, 16, false}, {d, 4096, false}, {s, 1, true}},
		{{hd, 16 + 512, false}, {s, 1, true}},
	} {
		var req BlkRequest
		allocs := testing.AllocsPerRun(100, func() {
			if err := ParseBlkRequest(r.mem, segs, &req); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("%d segments: %.2f allocations per request, want 0", len(segs), allocs)
		}
	}
}
