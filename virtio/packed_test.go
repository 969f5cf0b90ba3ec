package virtio

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
)

// Fake guest layout of a packed ring: the descriptor ring at ringDescOff, the driver area at
// ringAvailOff, the device area at ringUsedOff of the main region (testring_test.go).

// testPackedRing is the driver side of one packed virtqueue in fake guest memory (virtio 1.2,
// 2.8), plus the device-side PackedQueue over it.
type testPackedRing struct {
	*testRing // memory, data allocator; its split ring is unused
	pq        *PackedQueue
	driver    []byte
	device    []byte
	// driver state: where the next chain goes, and where the next used descriptor is read
	next, usedPos     uint16
	nextWrap, useWrap bool
	chainLen          map[uint16]uint16 // ring descriptors of each id in flight
}

func newTestPackedRing(t testing.TB, size int, eventIdx bool) *testPackedRing {
	t.Helper()
	r := &testPackedRing{testRing: newTestRing(t, 256, false), nextWrap: true, useWrap: true, chainLen: map[uint16]uint16{}}
	r.size = size
	r.desc = r.bytes(ringMainGPA+ringDescOff, uint64(16*size))
	clear(r.desc)
	r.driver = r.bytes(ringMainGPA+ringAvailOff, 4)
	r.device = r.bytes(ringMainGPA+ringUsedOff, 4)
	q, err := NewPackedQueue(r.mem, size, r.addrs(), eventIdx, InitialPackedBase)
	if err != nil {
		t.Fatalf("NewPackedQueue: %v", err)
	}
	r.pq = q
	return r
}

// descFlags are the flags of a descriptor made available in the lap of wrap.
func availFlags(wrap bool) uint16 {
	if wrap {
		return packedDescFAvail
	}
	return packedDescFUsed
}

func putPacked(b []byte, i int, addr uint64, length uint32, id, flags uint16) {
	d := b[16*i : 16*i+16]
	binary.LittleEndian.PutUint64(d[0:], addr)
	binary.LittleEndian.PutUint32(d[8:], length)
	binary.LittleEndian.PutUint16(d[12:], id)
	binary.LittleEndian.PutUint16(d[14:], flags)
}

// addChain writes bufs as the chain of buffer id at the driver's position; the head's flags are
// written last, which makes the chain available. It returns the position of the head.
func (r *testPackedRing) addChain(id uint16, bufs ...buf) uint16 {
	r.t.Helper()
	return r.addRaw(id, 0, bufs...)
}

// addRaw is addChain with extra flags on every descriptor.
func (r *testPackedRing) addRaw(id, extra uint16, bufs ...buf) uint16 {
	head, headWrap := r.next, r.nextWrap
	var headFlags uint16
	for i, b := range bufs {
		flags := availFlags(r.nextWrap) | extra
		if b.write {
			flags |= DescFWrite
		}
		if i+1 < len(bufs) {
			flags |= DescFNext
		}
		if i == 0 {
			headFlags = flags
			putPacked(r.desc, int(r.next), b.addr, b.len, id, 0)
			binary.LittleEndian.PutUint16(r.desc[16*int(r.next)+14:], availFlags(!headWrap)) // not yet
		} else {
			putPacked(r.desc, int(r.next), b.addr, b.len, id, flags)
		}
		r.next++
		if int(r.next) == r.size {
			r.next, r.nextWrap = 0, !r.nextWrap
		}
	}
	binary.LittleEndian.PutUint16(r.desc[16*int(head)+14:], headFlags)
	r.chainLen[id] = uint16(len(bufs))
	return head
}

// addIndirect writes bufs into an indirect table and one ring descriptor for buffer id.
func (r *testPackedRing) addIndirect(id uint16, bufs ...buf) uint16 {
	gpa := r.alloc(16 * len(bufs))
	table := r.bytes(gpa, uint64(16*len(bufs)))
	for i, b := range bufs {
		var flags uint16
		if b.write {
			flags = DescFWrite
		}
		putPacked(table, i, b.addr, b.len, 0, flags)
	}
	return r.addRaw(id, DescFIndirect, buf{addr: gpa, len: uint32(16 * len(bufs))})
}

// takeUsed reads the used descriptors the device wrote since the last call, skipping each
// chain's other descriptors as the driver does.
func (r *testPackedRing) takeUsed() []usedEntry {
	var out []usedEntry
	for {
		d := r.desc[16*int(r.usedPos):]
		flags := binary.LittleEndian.Uint16(d[14:])
		used := flags&packedDescFUsed != 0
		if used != r.useWrap || (flags&packedDescFAvail != 0) != r.useWrap {
			return out
		}
		id := binary.LittleEndian.Uint16(d[12:])
		n, ok := r.chainLen[id]
		if !ok {
			r.t.Fatalf("used descriptor at %d for buffer %d, which is not in flight", r.usedPos, id)
		}
		delete(r.chainLen, id)
		out = append(out, usedEntry{uint32(id), binary.LittleEndian.Uint32(d[8:])})
		p := int(r.usedPos) + int(n)
		if p >= r.size {
			p -= r.size
			r.useWrap = !r.useWrap
		}
		r.usedPos = uint16(p)
	}
}

func (r *testPackedRing) setDriverEvent(offWrap, flags uint16) {
	binary.LittleEndian.PutUint16(r.driver[0:], offWrap)
	binary.LittleEndian.PutUint16(r.driver[2:], flags)
}

func (r *testPackedRing) deviceEvent() (offWrap, flags uint16) {
	return binary.LittleEndian.Uint16(r.device[0:]), binary.LittleEndian.Uint16(r.device[2:])
}

func TestNewPackedQueue(t *testing.T) {
	r := newTestPackedRing(t, 8, false)
	tests := []struct {
		name  string
		size  int
		addrs RingAddrs
		base  uint32
		ok    bool
	}{
		{"fresh", 8, r.addrs(), InitialPackedBase, true},
		{"not a power of two", 6, r.addrs(), InitialPackedBase, true},
		{"zero size", 0, r.addrs(), InitialPackedBase, false},
		{"too large", MaxQueueSize + 1, r.addrs(), InitialPackedBase, false},
		{"misaligned ring", 8, RingAddrs{Desc: ringMainUser + 8, Avail: ringMainUser + ringAvailOff, Used: ringMainUser + ringUsedOff}, 0, false},
		{"misaligned driver area", 8, RingAddrs{Desc: ringMainUser, Avail: ringMainUser + ringAvailOff + 2, Used: ringMainUser + ringUsedOff}, 0, false},
		{"device area unmapped", 8, RingAddrs{Desc: ringMainUser, Avail: ringMainUser + ringAvailOff, Used: 0x1000}, 0, false},
		{"avail position beyond ring", 8, r.addrs(), PackedBase(8, true, 0, true), false},
		{"used position beyond ring", 8, r.addrs(), PackedBase(0, true, 9, true), false},
		{"resume mid-ring", 8, r.addrs(), PackedBase(5, false, 5, false), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q, err := NewPackedQueue(r.mem, tc.size, tc.addrs, false, tc.base)
			if (err == nil) != tc.ok {
				t.Fatalf("err = %v, want ok %v", err, tc.ok)
			}
			if err == nil && q.Base() != tc.base {
				t.Errorf("Base() = %#x, want %#x", q.Base(), tc.base)
			}
			if err != nil && !errors.Is(err, ErrBrokenRing) && !errors.Is(err, ErrBadAddress) {
				t.Errorf("err = %v, want ErrBrokenRing or ErrBadAddress", err)
			}
		})
	}
}

func TestPackedBase(t *testing.T) {
	if got := PackedBase(0, true, 0, true); got != 0x80008000 {
		t.Errorf("fresh ring base %#x, want 0x80008000", got)
	}
	if got := PackedBase(5, false, 3, true); got != 0x80030005 {
		t.Errorf("PackedBase(5, false, 3, true) = %#x", got)
	}
}

// TestPackedChains pops chains of several shapes and checks their segments and ids.
func TestPackedChains(t *testing.T) {
	r := newTestPackedRing(t, 8, false)
	a, b, c := r.alloc(16), r.alloc(512), r.alloc(1)
	tests := []struct {
		name string
		add  func(id uint16)
		want []Segment
	}{
		{"one descriptor", func(id uint16) { r.addChain(id, wbuf(c, 1)) }, []Segment{{c, 1, true}}},
		{"three descriptors", func(id uint16) { r.addChain(id, rbuf(a, 16), wbuf(b, 512), wbuf(c, 1)) },
			[]Segment{{a, 16, false}, {b, 512, true}, {c, 1, true}}},
		{"indirect", func(id uint16) { r.addIndirect(id, rbuf(a, 16), rbuf(b, 512), wbuf(c, 1)) },
			[]Segment{{a, 16, false}, {b, 512, false}, {c, 1, true}}},
		// the ring is 8: by now the driver is at 5, and this one wraps to the next lap
		{"across the end of the ring", func(id uint16) { r.addChain(id, rbuf(a, 16), rbuf(b, 8), rbuf(b, 8), wbuf(c, 1)) },
			[]Segment{{a, 16, false}, {b, 8, false}, {b, 8, false}, {c, 1, true}}},
		{"second lap", func(id uint16) { r.addChain(id, rbuf(a, 16), wbuf(c, 1)) }, []Segment{{a, 16, false}, {c, 1, true}}},
	}
	var chain DescChain
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id := uint16(7 - i)
			tc.add(id)
			got, ok, err := r.pq.Next()
			if err != nil || !ok || got != id {
				t.Fatalf("Next = %d, %v, %v; want %d", got, ok, err, id)
			}
			if err := r.pq.ReadChainLimited(got, &chain, ChainLimits{}); err != nil {
				t.Fatalf("ReadChain: %v", err)
			}
			if len(chain.Segs) != len(tc.want) {
				t.Fatalf("segments %+v, want %+v", chain.Segs, tc.want)
			}
			for j := range tc.want {
				if chain.Segs[j] != tc.want[j] {
					t.Errorf("segment %d = %+v, want %+v", j, chain.Segs[j], tc.want[j])
				}
			}
			if _, ok, _ := r.pq.Next(); ok {
				t.Fatal("Next found a second chain")
			}
			r.pq.PushUsed(got, 42)
			used := r.takeUsed()
			if len(used) != 1 || used[0] != (usedEntry{uint32(id), 42}) {
				t.Fatalf("used %+v, want id %d len 42", used, id)
			}
		})
	}
}

// TestPackedOutOfOrder completes chains out of order over many laps of a small ring: every
// completion is seen once, with its id and length, and the wrap counters stay in step.
func TestPackedOutOfOrder(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		r := newTestPackedRing(t, 8, eventIdx)
		d := r.alloc(64)
		var popped []uint16
		free := []uint16{0, 1, 2, 3, 4, 5, 6, 7}
		seen := 0
		for round := 0; round < 200; round++ {
			// fill: chains of 1..3 descriptors while ids and ring room last
			for len(free) > 0 && r.pq.outstanding.Load()+3 <= 8 {
				id := free[0]
				free = free[1:]
				n := 1 + (round+int(id))%3
				bufs := make([]buf, n)
				for j := range bufs {
					bufs[j] = wbuf(d, 8)
				}
				r.addChain(id, bufs...)
				got, ok, err := r.pq.Next()
				if err != nil || !ok || got != id {
					t.Fatalf("round %d: Next = %d, %v, %v; want %d", round, got, ok, err, id)
				}
				popped = append(popped, got)
			}
			// complete the newest first, then the oldest
			last, first := popped[len(popped)-1], popped[0]
			r.pq.PushUsed(last, uint32(last)+100)
			popped = popped[:len(popped)-1]
			if len(popped) > 0 {
				r.pq.PushUsed(first, uint32(first)+100)
				popped = popped[1:]
			}
			for _, u := range r.takeUsed() {
				if u.len != u.id+100 {
					t.Fatalf("round %d: id %d has length %d", round, u.id, u.len)
				}
				free = append(free, uint16(u.id))
				seen++
			}
		}
		if seen < 200 {
			t.Errorf("event idx %v: %d completions seen", eventIdx, seen)
		}
	}
}

// TestPackedHostile: every way a guest can break the ring is an error, never a panic, a second
// completion or a chain taken from memory the guest does not own.
func TestPackedHostile(t *testing.T) {
	tests := []struct {
		name string
		// setup writes the ring; the first Next (and ReadChain of what it returns) is checked
		setup func(r *testPackedRing, d uint64)
		next  error // what Next returns
		read  error // what ReadChainLimited returns, if Next succeeded
		lim   ChainLimits
	}{
		{"id out of range", func(r *testPackedRing, d uint64) { r.addChain(8, wbuf(d, 1)) }, ErrBrokenRing, nil, ChainLimits{}},
		{"id in use twice", func(r *testPackedRing, d uint64) {
			r.addChain(3, wbuf(d, 1))
			r.pq.Next()
			r.addChain(3, wbuf(d, 1))
		}, ErrBrokenRing, nil, ChainLimits{}},
		{"chain runs into a descriptor not available", func(r *testPackedRing, d uint64) {
			r.addChain(1, rbuf(d, 16), wbuf(d, 1))
			binary.LittleEndian.PutUint16(r.desc[16+14:], availFlags(false)) // second: previous lap
		}, ErrBrokenRing, nil, ChainLimits{}},
		{"chain longer than the ring", func(r *testPackedRing, d uint64) {
			for i := range 8 {
				putPacked(r.desc, i, d, 1, 0, availFlags(true)|DescFNext)
			}
		}, ErrBrokenRing, nil, ChainLimits{}},
		{"wrong wrap counter: not available", func(r *testPackedRing, d uint64) {
			putPacked(r.desc, 0, d, 1, 0, availFlags(false)) // made available for the second lap
		}, nil, nil, ChainLimits{}},
		{"both bits set: used, not available", func(r *testPackedRing, d uint64) {
			putPacked(r.desc, 0, d, 1, 0, packedDescFAvail|packedDescFUsed)
		}, nil, nil, ChainLimits{}},
		{"in-flight slots made available again", func(r *testPackedRing, d uint64) {
			for id := range uint16(4) {
				r.addChain(id, wbuf(d, 1), wbuf(d, 1))
				r.pq.Next()
			}
			// the ring is full of chains in flight; the guest rewrites slot 0 for the new lap
			putPacked(r.desc, 0, d, 1, 5, availFlags(false))
		}, ErrBrokenRing, nil, ChainLimits{}},
		{"indirect with next", func(r *testPackedRing, d uint64) {
			r.addRaw(0, DescFIndirect, buf{addr: d, len: 16}, wbuf(d, 1))
		}, nil, ErrBadChain, ChainLimits{}},
		{"indirect length not a multiple of 16", func(r *testPackedRing, d uint64) {
			r.addRaw(0, DescFIndirect, buf{addr: d, len: 24})
		}, nil, ErrBadChain, ChainLimits{}},
		{"indirect length zero", func(r *testPackedRing, d uint64) { r.addRaw(0, DescFIndirect, buf{addr: d, len: 0}) }, nil, ErrBadChain, ChainLimits{}},
		{"indirect table outside memory", func(r *testPackedRing, d uint64) {
			r.addRaw(0, DescFIndirect, buf{addr: ringGapGPA, len: 32})
		}, nil, ErrBadChain, ChainLimits{}},
		{"indirect inside indirect", func(r *testPackedRing, d uint64) {
			table := r.bytes(d, 32)
			putPacked(table, 0, d, 16, 0, DescFIndirect)
			putPacked(table, 1, d, 1, 0, DescFWrite)
			r.addRaw(0, DescFIndirect, buf{addr: d, len: 32})
		}, nil, ErrBadChain, ChainLimits{}},
		{"readable after writable", func(r *testPackedRing, d uint64) { r.addChain(0, wbuf(d, 1), rbuf(d, 1)) }, nil, ErrBadChain, ChainLimits{}},
		{"more segments than seg_max", func(r *testPackedRing, d uint64) {
			r.addChain(0, rbuf(d, 16), rbuf(d, 8), rbuf(d, 8), wbuf(d, 1))
		}, nil, ErrChainLimit, ChainLimits{MaxSegs: 3}},
		{"segment longer than size_max", func(r *testPackedRing, d uint64) {
			r.addChain(0, rbuf(d, 16), rbuf(d, 4096), wbuf(d, 1))
		}, nil, ErrChainLimit, ChainLimits{MaxSegLen: 512}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := newTestPackedRing(t, 8, false)
			d := r.alloc(4096)
			tc.setup(r, d)
			id, ok, err := r.pq.Next()
			if !errors.Is(err, tc.next) || (tc.next == nil && err != nil) {
				t.Fatalf("Next: %v, want %v", err, tc.next)
			}
			if err != nil || !ok {
				return
			}
			var c DescChain
			err = r.pq.ReadChainLimited(id, &c, tc.lim)
			if (tc.read == nil) != (err == nil) || (tc.read != nil && !errors.Is(err, tc.read)) {
				t.Fatalf("ReadChain: %v, want %v", err, tc.read)
			}
			if errors.Is(err, ErrChainLimit) && (len(c.Segs) != 1 || c.Segs[0] != (Segment{d, 1, true})) {
				t.Errorf("over the limit: segments %+v, want the status descriptor only", c.Segs)
			}
		})
	}

	t.Run("chain rewritten between Next and ReadChain", func(t *testing.T) {
		r := newTestPackedRing(t, 8, false)
		d := r.alloc(64)
		r.addChain(0, rbuf(d, 16), wbuf(d, 1))
		id, _, err := r.pq.Next()
		if err != nil {
			t.Fatal(err)
		}
		binary.LittleEndian.PutUint16(r.desc[14:], availFlags(true)) // head loses NEXT
		var c DescChain
		if err := r.pq.ReadChainLimited(id, &c, ChainLimits{}); !errors.Is(err, ErrBadChain) {
			t.Fatalf("ReadChain: %v, want ErrBadChain", err)
		}
	})
	t.Run("id not popped", func(t *testing.T) {
		r := newTestPackedRing(t, 8, false)
		var c DescChain
		if err := r.pq.ReadChainLimited(2, &c, ChainLimits{}); !errors.Is(err, ErrBadChain) {
			t.Fatalf("ReadChain: %v, want ErrBadChain", err)
		}
	})
}

func TestPackedNeedInterrupt(t *testing.T) {
	t.Run("flags", func(t *testing.T) {
		r := newTestPackedRing(t, 8, false)
		d := r.alloc(8)
		for _, tc := range []struct {
			flags uint16
			want  bool
		}{{eventFlagsEnable, true}, {eventFlagsDisable, false}, {eventFlagsDesc, true}} {
			r.addChain(0, wbuf(d, 1))
			id, _, _ := r.pq.Next()
			r.setDriverEvent(0, tc.flags)
			r.pq.PushUsed(id, 1)
			if got := r.pq.NeedInterrupt(); got != tc.want {
				t.Errorf("flags %d: NeedInterrupt = %v, want %v", tc.flags, got, tc.want)
			}
			r.takeUsed()
		}
	})
	t.Run("event idx", func(t *testing.T) {
		r := newTestPackedRing(t, 8, true)
		d := r.alloc(8)
		push := func() bool {
			r.addChain(0, wbuf(d, 1))
			id, _, err := r.pq.Next()
			if err != nil {
				t.Fatal(err)
			}
			r.pq.PushUsed(id, 1)
			r.takeUsed()
			return r.pq.NeedInterrupt()
		}
		r.setDriverEvent(withWrap(3, true), eventFlagsDesc)
		if !push() { // the first is always signalled
			t.Error("first push: no interrupt")
		}
		// used position now 1; the driver wants the used descriptor at 3: pushes 2 and 3 do not
		// reach it, the one that writes at 3 does
		for i, want := range []bool{false, false, true, false} {
			if got := push(); got != want {
				t.Errorf("push %d: NeedInterrupt = %v, want %v", i+2, got, want)
			}
		}
		// an event in the next lap (position 1, wrap 0): the pushes writing at 5, 6, 7 and 0 do
		// not reach it, the one writing at 1 in the new lap does
		r.setDriverEvent(withWrap(1, false), eventFlagsDesc)
		for i, want := range []bool{false, false, false, false, true} {
			if got := push(); got != want {
				t.Errorf("lap push %d: NeedInterrupt = %v, want %v", i, got, want)
			}
		}
	})
}

func TestPackedNotifySuppression(t *testing.T) {
	t.Run("flags", func(t *testing.T) {
		r := newTestPackedRing(t, 8, false)
		r.pq.DisableNotify()
		if _, f := r.deviceEvent(); f != eventFlagsDisable {
			t.Errorf("after DisableNotify flags %d", f)
		}
		if r.pq.EnableNotify() {
			t.Error("EnableNotify on an empty ring reports more")
		}
		if _, f := r.deviceEvent(); f != eventFlagsEnable {
			t.Errorf("after EnableNotify flags %d", f)
		}
		r.addChain(0, wbuf(r.alloc(1), 1))
		if !r.pq.EnableNotify() || !r.pq.Pending() {
			t.Error("a chain made available: EnableNotify or Pending misses it")
		}
	})
	t.Run("event idx", func(t *testing.T) {
		r := newTestPackedRing(t, 8, true)
		d := r.alloc(1)
		for range 9 { // past the end of the ring: the wrap counter flips
			r.addChain(0, wbuf(d, 1))
			id, _, _ := r.pq.Next()
			r.pq.PushUsed(id, 1)
			r.takeUsed()
		}
		r.pq.DisableNotify()
		if r.pq.EnableNotify() {
			t.Error("EnableNotify on an empty ring reports more")
		}
		off, f := r.deviceEvent()
		if f != eventFlagsDesc || off != withWrap(1, false) {
			t.Errorf("device event off_wrap %#x flags %d, want %#x %d", off, f, withWrap(1, false), eventFlagsDesc)
		}
	})
}

// TestPackedResume: chains a dead back-end had in flight are resubmitted from their saved
// descriptors, even where used descriptors overwrote them in the ring.
func TestPackedResume(t *testing.T) {
	r := newTestPackedRing(t, 8, false)
	d := r.alloc(64)
	saved := make([]byte, 32)
	putPacked(saved, 0, d, 16, 4, availFlags(true)|DescFNext)
	putPacked(saved, 1, d+16, 1, 4, availFlags(true)|DescFWrite)
	q, err := NewPackedQueue(r.mem, 8, r.addrs(), false, PackedBase(3, true, 0, true))
	if err != nil {
		t.Fatal(err)
	}
	q.Resume(3, true, 1, true, []ResumePacked{{ID: 4, Descs: saved}, {ID: 9, Descs: saved}, {ID: 4, Descs: saved}})
	id, ok, err := q.Next()
	if err != nil || !ok || id != 4 {
		t.Fatalf("Next = %d %v %v, want 4", id, ok, err)
	}
	var c DescChain
	if err := q.ReadChainLimited(id, &c, ChainLimits{}); err != nil || len(c.Segs) != 2 || c.Segs[1] != (Segment{d + 16, 1, true}) {
		t.Fatalf("resubmitted chain %+v, %v", c.Segs, err)
	}
	if _, ok, _ := q.Next(); ok {
		t.Fatal("out-of-range and duplicate resubmissions were not dropped")
	}
	q.PushUsed(4, 1)
	if got := q.Base(); got != PackedBase(3, true, 3, true) {
		t.Errorf("Base after the resubmitted chain completed: %#x", got)
	}
}

// newPackedBlkHarness is a blkHarness whose queue is a packed ring.
func newPackedBlkHarness(t *testing.T, eventIdx bool) (*blkHarness, *testPackedRing) {
	t.Helper()
	store := backend.NewCrashStore(testDiskSize)
	log := logrus.New()
	log.SetOutput(io.Discard)
	engine := backend.NewEngine(store, 3)
	t.Cleanup(func() { engine.Close() })
	r := newTestPackedRing(t, 16, eventIdx)
	h := &blkHarness{t: t, r: r.testRing, store: store, engine: engine, notify: &countNotifier{}}
	h.dev = NewBlkDevice(engine, BlkConfig{Capacity: uint64(store.Size()), NumQueues: 1, Packed: true}, logrus.NewEntry(log))
	h.dev.SetFeatures(h.dev.Features())
	h.q = &Queue{Index: 0, Ring: r.pq, Mem: r.mem, Notify: h.notify}
	return h, r
}

// TestBlkDevicePacked: the device serves a packed ring as it serves a split one, without
// knowing which it has (writes, reads back, flushes).
func TestBlkDevicePacked(t *testing.T) {
	h, r := newPackedBlkHarness(t, true)
	if h.dev.Features()&(1<<FRingPacked) == 0 {
		t.Fatal("VIRTIO_F_RING_PACKED not offered with Packed")
	}
	data := bytes.Repeat([]byte{0xc3}, 4096)
	for round := range 20 {
		var want []uint16
		for i := range 5 {
			id := uint16(i)
			hdr, out, st := r.put(blkHeader(BlkTOut, uint64(8*(round*5+i)))), r.put(data), r.put([]byte{statusUnset})
			r.addChain(id, rbuf(hdr, 16), rbuf(out, 4096), wbuf(st, 1))
			want = append(want, id)
		}
		hdr, st := r.put(blkHeader(BlkTFlush, 0)), r.put([]byte{statusUnset})
		r.addIndirect(5, rbuf(hdr, 16), wbuf(st, 1))
		if err := h.dev.ProcessQueue(h.q); err != nil {
			t.Fatalf("ProcessQueue: %v", err)
		}
		h.q.Drain()
		used := r.takeUsed()
		if len(used) != len(want)+1 {
			t.Fatalf("round %d: %d completions, want %d", round, len(used), len(want)+1)
		}
		r.dataNext = ringMainGPA + ringDataOff // reuse the data area
	}
	hdr, in, st := r.put(blkHeader(BlkTIn, 8*97)), r.alloc(4096), r.put([]byte{statusUnset})
	r.addChain(0, rbuf(hdr, 16), wbuf(in, 4096), wbuf(st, 1))
	if err := h.dev.ProcessQueue(h.q); err != nil {
		t.Fatal(err)
	}
	h.q.Drain()
	if u := r.takeUsed(); len(u) != 1 || u[0].len != 4097 || r.bytes(st, 1)[0] != BlkSOK || !bytes.Equal(r.bytes(in, 4096), data) {
		t.Fatalf("read back: used %+v status %d", u, r.bytes(st, 1)[0])
	}
}
