package virtio

import (
	"errors"
	"math"
	"reflect"
	"testing"
)

func TestNewSplitQueue(t *testing.T) {
	base := newTestRing(t, 8, false)
	good := base.addrs()
	tests := []struct {
		name  string
		size  int
		addrs RingAddrs
		ok    bool
	}{
		{"ok", 8, good, true},
		{"size 1", 1, good, true},
		{"largest table that fits the test layout", 1024, good, true},
		{"size 0", 0, good, false},
		{"negative size", -8, good, false},
		{"not a power of two", 12, good, false},
		{"beyond MaxQueueSize", 2 * MaxQueueSize, good, false},
		{"desc misaligned", 8, RingAddrs{good.Desc + 8, good.Avail, good.Used}, false},
		{"avail misaligned", 8, RingAddrs{good.Desc, good.Avail + 1, good.Used}, false},
		{"used misaligned", 8, RingAddrs{good.Desc, good.Avail, good.Used + 2}, false},
		{"avail at an odd but 2-aligned address is fine", 8, RingAddrs{good.Desc, good.Avail + 2, good.Used}, true},
		{"desc given as a gpa, not a user address", 8, RingAddrs{ringMainGPA, good.Avail, good.Used}, false},
		{"used ring runs off the region", 8, RingAddrs{good.Desc, good.Avail, ringMainUser + ringMainSize - 64}, false},
		{"desc table at 2^64-16", 8, RingAddrs{math.MaxUint64 - 15, good.Avail, good.Used}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q, err := NewSplitQueue(base.mem, tt.size, tt.addrs, false, 0)
			if tt.ok {
				if err != nil || q.Size() != tt.size {
					t.Fatalf("NewSplitQueue: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("NewSplitQueue accepted a bad ring")
			}
			if !errors.Is(err, ErrBrokenRing) && !errors.Is(err, ErrBadAddress) {
				t.Fatalf("err %v, want ErrBrokenRing or ErrBadAddress", err)
			}
		})
	}
}

// After a reconnect the used index comes from the ring and last_avail from
// VHOST_USER_SET_VRING_BASE.
func TestNewSplitQueueResumes(t *testing.T) {
	r := newTestRing(t, 8, false)
	r.used[2], r.used[3] = 0x05, 0x01 // used.idx = 0x105
	q, err := NewSplitQueue(r.mem, 8, r.addrs(), false, 0x100)
	if err != nil {
		t.Fatal(err)
	}
	if q.UsedIdx() != 0x105 || q.LastAvail() != 0x100 {
		t.Fatalf("UsedIdx %#x LastAvail %#x, want 0x105 0x100", q.UsedIdx(), q.LastAvail())
	}
}

func TestSplitQueueNextEmptyAndOrder(t *testing.T) {
	r := newTestRing(t, 4, false)
	if _, ok, err := r.q.Next(); ok || err != nil {
		t.Fatalf("empty ring: ok %v err %v", ok, err)
	}
	r.publish(2, 0, 3)
	for _, want := range []uint16{2, 0, 3} {
		h, ok, err := r.q.Next()
		if !ok || err != nil || h != want {
			t.Fatalf("Next = %d, %v, %v; want %d", h, ok, err, want)
		}
	}
	if _, ok, err := r.q.Next(); ok || err != nil {
		t.Fatalf("drained ring: ok %v err %v", ok, err)
	}
	if r.q.LastAvail() != 3 {
		t.Fatalf("LastAvail %d, want 3", r.q.LastAvail())
	}
}

// The 16-bit indices wrap: last_avail 65534 and avail.idx 2 means 4 entries.
func TestSplitQueueNextIndexWrap(t *testing.T) {
	r := newTestRing(t, 4, false)
	q, err := NewSplitQueue(r.mem, 4, r.addrs(), false, 65534)
	if err != nil {
		t.Fatal(err)
	}
	r.availIdx = 65534
	r.publish(1, 2, 3, 0) // slots 2, 3, 0, 1; avail.idx becomes 2
	var got []uint16
	for {
		h, ok, err := q.Next()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			break
		}
		got = append(got, h)
	}
	if !reflect.DeepEqual(got, []uint16{1, 2, 3, 0}) || q.LastAvail() != 2 {
		t.Fatalf("popped %v, last avail %d; want [1 2 3 0], 2", got, q.LastAvail())
	}
}

func TestSplitQueueBrokenRing(t *testing.T) {
	tests := []struct {
		name   string
		setup  func(r *testRing)
		popped int // entries popped fine before the error
	}{
		{"avail.idx runs ahead by size+1", func(r *testRing) { r.setAvailIdx(5) }, 0},
		{"avail.idx behind last_avail", func(r *testRing) { r.setAvailIdx(0xffff) }, 0},
		{"avail.idx far ahead", func(r *testRing) { r.setAvailIdx(0x8000) }, 0},
		{"head beyond the ring", func(r *testRing) { r.publish(0, 4) }, 1},
		{"head 0xffff", func(r *testRing) { r.publish(0xffff) }, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, 4, false)
			tt.setup(r)
			for i := 0; i < tt.popped; i++ {
				if _, ok, err := r.q.Next(); !ok || err != nil {
					t.Fatalf("pop %d: ok %v err %v", i, ok, err)
				}
			}
			if _, ok, err := r.q.Next(); ok || !errors.Is(err, ErrBrokenRing) {
				t.Fatalf("Next: ok %v err %v; want ErrBrokenRing", ok, err)
			}
		})
	}
	// Exactly size entries pending is a full ring, not a broken one.
	r := newTestRing(t, 4, false)
	r.publish(0, 1, 2, 3)
	for i := 0; i < 4; i++ {
		if _, ok, err := r.q.Next(); !ok || err != nil {
			t.Fatalf("full ring, pop %d: ok %v err %v", i, ok, err)
		}
	}
}

func TestReadChain(t *testing.T) {
	const size = 8
	type step func(r *testRing) uint16 // builds a chain, returns its head
	tests := []struct {
		name  string
		build step
		want  []Segment // nil: ErrBadChain
	}{
		{
			name: "single descriptor",
			build: func(r *testRing) uint16 {
				return r.addChain(wbuf(0x20_0000, 7))
			},
			want: []Segment{{0x20_0000, 7, true}},
		},
		{
			name: "header, data, status",
			build: func(r *testRing) uint16 {
				return r.addChain(rbuf(0x1000, 16), wbuf(0x2000, 512), wbuf(0x3000, 1))
			},
			want: []Segment{{0x1000, 16, false}, {0x2000, 512, true}, {0x3000, 1, true}},
		},
		{
			name: "descriptors out of order in the table",
			build: func(r *testRing) uint16 {
				r.setDesc(5, 0xa, 1, DescFNext, 1)
				r.setDesc(1, 0xb, 2, DescFNext, 7)
				r.setDesc(7, 0xc, 3, DescFWrite, 0)
				return 5
			},
			want: []Segment{{0xa, 1, false}, {0xb, 2, false}, {0xc, 3, true}},
		},
		{
			name: "chain as long as the ring",
			build: func(r *testRing) uint16 {
				for i := 0; i < size; i++ {
					r.setDesc(i, uint64(i), 1, DescFNext, uint16(i+1))
				}
				r.setDesc(size-1, size-1, 1, 0, 0)
				return 0
			},
			want: []Segment{{0, 1, false}, {1, 1, false}, {2, 1, false}, {3, 1, false}, {4, 1, false}, {5, 1, false}, {6, 1, false}, {7, 1, false}},
		},
		{
			name: "zero-length and unmapped addresses are the parser's business",
			build: func(r *testRing) uint16 {
				return r.addChain(rbuf(math.MaxUint64, 0), wbuf(ringGapGPA, 1<<31))
			},
			want: []Segment{{math.MaxUint64, 0, false}, {ringGapGPA, 1 << 31, true}},
		},
		{
			name: "indirect",
			build: func(r *testRing) uint16 {
				return r.addIndirect(rbuf(0x1000, 16), wbuf(0x2000, 4096), wbuf(0x3000, 1))
			},
			want: []Segment{{0x1000, 16, false}, {0x2000, 4096, true}, {0x3000, 1, true}},
		},
		{
			name: "indirect with a WRITE flag on the table descriptor (ignored, 2.7.5.3.2)",
			build: func(r *testRing) uint16 {
				h := r.addIndirect(rbuf(0x1000, 16), wbuf(0x3000, 1))
				r.setDesc(int(h), r.dataNext-32, 32, DescFIndirect|DescFWrite, 0)
				return h
			},
			want: []Segment{{0x1000, 16, false}, {0x3000, 1, true}},
		},
		{
			name: "indirect table longer than the ring",
			build: func(r *testRing) uint16 {
				bufs := make([]buf, 3*size)
				for i := range bufs {
					bufs[i] = rbuf(uint64(i), 1)
				}
				return r.addIndirect(bufs...)
			},
			want: func() []Segment {
				s := make([]Segment, 3*size)
				for i := range s {
					s[i] = Segment{uint64(i), 1, false}
				}
				return s
			}(),
		},
		{
			name: "indirect entries out of order",
			build: func(r *testRing) uint16 {
				gpa := r.alloc(48)
				tb := r.bytes(gpa, 48)
				putDesc(tb, 0, 0xa, 1, DescFNext, 2) // an indirect chain starts at entry 0
				putDesc(tb, 2, 0xb, 2, DescFNext|DescFWrite, 1)
				putDesc(tb, 1, 0xc, 3, DescFWrite, 0)
				r.setDesc(3, gpa, 48, DescFIndirect, 0)
				return 3
			},
			want: []Segment{{0xa, 1, false}, {0xb, 2, true}, {0xc, 3, true}},
		},

		// Malformed chains.
		{
			name: "self loop",
			build: func(r *testRing) uint16 {
				r.setDesc(2, 0x1000, 1, DescFNext, 2)
				return 2
			},
		},
		{
			name: "two-descriptor loop",
			build: func(r *testRing) uint16 {
				r.setDesc(0, 0x1000, 1, DescFNext, 1)
				r.setDesc(1, 0x1000, 1, DescFNext, 0)
				return 0
			},
		},
		{
			name: "loop through every descriptor",
			build: func(r *testRing) uint16 {
				for i := 0; i < size; i++ {
					r.setDesc(i, 0x1000, 1, DescFNext, uint16((i+1)%size))
				}
				return 3
			},
		},
		{
			name: "next == size",
			build: func(r *testRing) uint16 {
				r.setDesc(0, 0x1000, 1, DescFNext, size)
				return 0
			},
		},
		{
			name: "next 0xffff",
			build: func(r *testRing) uint16 {
				r.setDesc(0, 0x1000, 1, DescFNext, 0xffff)
				return 0
			},
		},
		{
			name: "readable after writable",
			build: func(r *testRing) uint16 {
				return r.addChain(rbuf(0x1000, 16), wbuf(0x2000, 1), rbuf(0x3000, 1))
			},
		},
		{
			name: "loop inside an indirect table",
			build: func(r *testRing) uint16 {
				gpa := r.alloc(32)
				tb := r.bytes(gpa, 32)
				putDesc(tb, 0, 0x1000, 1, DescFNext, 1)
				putDesc(tb, 1, 0x1000, 1, DescFNext, 0)
				r.setDesc(0, gpa, 32, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "next beyond the indirect table (but inside the ring's range)",
			build: func(r *testRing) uint16 {
				gpa := r.alloc(32)
				tb := r.bytes(gpa, 32)
				putDesc(tb, 0, 0x1000, 1, DescFNext, 2)
				r.setDesc(0, gpa, 32, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect within indirect",
			build: func(r *testRing) uint16 {
				inner := r.alloc(16)
				putDesc(r.bytes(inner, 16), 0, 0x1000, 1, 0, 0)
				outer := r.alloc(16)
				putDesc(r.bytes(outer, 16), 0, inner, 16, DescFIndirect, 0)
				r.setDesc(0, outer, 16, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect length 0",
			build: func(r *testRing) uint16 {
				r.setDesc(0, r.alloc(16), 0, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect length 15",
			build: func(r *testRing) uint16 {
				r.setDesc(0, r.alloc(16), 15, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect length 24",
			build: func(r *testRing) uint16 {
				r.setDesc(0, r.alloc(32), 24, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect length 0xfffffff0",
			build: func(r *testRing) uint16 {
				r.setDesc(0, ringMainGPA, 0xfffffff0, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect table outside memory",
			build: func(r *testRing) uint16 {
				r.setDesc(0, ringGapGPA, 32, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect table running off the end of memory",
			build: func(r *testRing) uint16 {
				r.setDesc(0, ringGapGPA-16, 32, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect table at 2^64-16",
			build: func(r *testRing) uint16 {
				r.setDesc(0, math.MaxUint64-15, 32, DescFIndirect, 0)
				return 0
			},
		},
		{
			name: "indirect with NEXT",
			build: func(r *testRing) uint16 {
				gpa := r.alloc(16)
				putDesc(r.bytes(gpa, 16), 0, 0x1000, 1, 0, 0)
				r.setDesc(0, gpa, 16, DescFIndirect|DescFNext, 1)
				r.setDesc(1, 0x2000, 1, DescFWrite, 0)
				return 0
			},
		},
		{
			name: "indirect after a direct descriptor",
			build: func(r *testRing) uint16 {
				gpa := r.alloc(16)
				putDesc(r.bytes(gpa, 16), 0, 0x1000, 1, 0, 0)
				r.setDesc(0, 0x2000, 16, DescFNext, 1)
				r.setDesc(1, gpa, 16, DescFIndirect, 0)
				return 0
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, size, false)
			head := tt.build(r)
			r.publish(head)
			h, ok, err := r.q.Next()
			if !ok || err != nil || h != head {
				t.Fatalf("Next = %d, %v, %v", h, ok, err)
			}
			// A reused chain with stale segments must come back clean.
			c := DescChain{Head: 99, Segs: []Segment{{1, 1, true}, {2, 2, true}}}
			err = r.q.ReadChain(h, &c)
			if tt.want == nil {
				if !errors.Is(err, ErrBadChain) {
					t.Fatalf("ReadChain = %v, %v; want ErrBadChain", c.Segs, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ReadChain: %v", err)
			}
			if c.Head != head || !reflect.DeepEqual(c.Segs, tt.want) {
				t.Fatalf("ReadChain = head %d %v\nwant head %d %v", c.Head, c.Segs, head, tt.want)
			}
		})
	}
}

// The chain is copied out of guest memory: a guest that rewrites the table
// after ReadChain does not change what the device acts on.
func TestReadChainCopiesDescriptors(t *testing.T) {
	r := newTestRing(t, 4, false)
	head := r.addChain(rbuf(0x1000, 16), wbuf(0x2000, 1))
	var c DescChain
	if err := r.q.ReadChain(head, &c); err != nil {
		t.Fatal(err)
	}
	r.setDesc(int(head), 0xdead, 0xffff, DescFWrite, 0)
	if c.Segs[0] != (Segment{0x1000, 16, false}) {
		t.Fatalf("segment changed with guest memory: %+v", c.Segs[0])
	}
}

func TestPushUsed(t *testing.T) {
	r := newTestRing(t, 4, false)
	r.setAvailFlags(0)
	// Six completions wrap the 4-entry used ring.
	for i := 0; i < 6; i++ {
		r.q.PushUsed(uint16(i%4), uint32(100+i))
		if got := r.usedIdx(); got != uint16(i+1) {
			t.Fatalf("used.idx %d after %d pushes", got, i+1)
		}
	}
	if r.q.UsedIdx() != 6 {
		t.Fatalf("UsedIdx %d, want 6", r.q.UsedIdx())
	}
	// Slots 0 and 1 hold pushes 4 and 5, slots 2 and 3 pushes 2 and 3.
	for slot, want := range []usedEntry{{0, 104}, {1, 105}, {2, 102}, {3, 103}} {
		id, n := r.usedElem(uint16(slot))
		if (usedEntry{id, n}) != want {
			t.Errorf("used slot %d = {%d %d}, want %v", slot, id, n, want)
		}
	}
	// The index wraps at 2^16 too.
	r2 := newTestRing(t, 4, false)
	r2.used[2], r2.used[3] = 0xff, 0xff
	q, err := NewSplitQueue(r2.mem, 4, r2.addrs(), false, 0)
	if err != nil {
		t.Fatal(err)
	}
	q.PushUsed(3, 7)
	q.PushUsed(2, 8)
	if r2.usedIdx() != 1 {
		t.Fatalf("used.idx %d after wrapping, want 1", r2.usedIdx())
	}
	if id, n := r2.usedElem(0xffff); id != 3 || n != 7 {
		t.Fatalf("slot of idx 0xffff = {%d %d}, want {3 7}", id, n)
	}
	if id, n := r2.usedElem(0); id != 2 || n != 8 {
		t.Fatalf("slot of idx 0 = {%d %d}, want {2 8}", id, n)
	}
}

// used.flags and used.idx share a 32-bit word: writing one leaves the other.
func TestUsedFlagsAndIdxIndependent(t *testing.T) {
	r := newTestRing(t, 4, false)
	r.q.PushUsed(0, 1)
	r.q.DisableNotify()
	if r.usedIdx() != 1 || r.usedFlags() != usedFNoNotify {
		t.Fatalf("after DisableNotify: idx %d flags %d", r.usedIdx(), r.usedFlags())
	}
	r.q.PushUsed(1, 1)
	if r.usedIdx() != 2 || r.usedFlags() != usedFNoNotify {
		t.Fatalf("after PushUsed: idx %d flags %d", r.usedIdx(), r.usedFlags())
	}
}

func TestNeedInterruptNoEventIdx(t *testing.T) {
	r := newTestRing(t, 4, false)
	r.q.PushUsed(0, 1)
	if !r.q.NeedInterrupt() {
		t.Fatal("no interrupt with avail.flags 0")
	}
	r.setAvailFlags(availFNoInterrupt)
	r.q.PushUsed(1, 1)
	if r.q.NeedInterrupt() {
		t.Fatal("interrupt despite VIRTQ_AVAIL_F_NO_INTERRUPT")
	}
	r.setAvailFlags(0)
	if !r.q.NeedInterrupt() {
		t.Fatal("no interrupt after the driver cleared NO_INTERRUPT")
	}
}

// With VIRTIO_F_EVENT_IDX the driver asks for an interrupt once the device
// has written the used entry at index used_event, i.e. when used.idx moves
// from old to new with old <= used_event < new (virtio 1.2 2.7.10,
// vring_need_event). The first check after start always interrupts.
func TestNeedInterruptEventIdx(t *testing.T) {
	type step struct {
		usedEvent uint16
		pushes    int
		want      bool
	}
	tests := []struct {
		name  string
		start uint16 // used.idx when the queue starts
		steps []step
	}{
		{"first check always interrupts", 0, []step{{100, 1, true}}},
		{"event is the entry just written", 0, []step{{0, 1, true}, {1, 1, true}, {2, 1, true}}},
		{"event not reached yet", 0, []step{{0, 1, true}, {5, 1, false}, {5, 1, false}, {5, 1, false}, {5, 1, false}, {5, 1, true}, {5, 1, false}}},
		{"event passed inside a batch", 0, []step{{0, 1, true}, {2, 3, true}}},
		{"event at the last entry of a batch", 0, []step{{0, 1, true}, {3, 3, true}}},
		{"event one past the batch", 0, []step{{0, 1, true}, {4, 3, false}}},
		{"event already behind (driver is not asking)", 0, []step{{0, 4, true}, {1, 1, false}}},
		{"no pushes, no interrupt", 0, []step{{0, 1, true}, {0, 0, false}, {1, 0, false}}},
		{"wraps at 2^16", 0xfffe, []step{{0xfffe, 1, true}, {0xffff, 1, true}, {0, 1, true}, {2, 1, false}, {2, 1, true}}},
		{"batch across the wrap", 0xfffc, []step{{0xfffc, 1, true}, {0xffff, 3, true}, {3, 2, false}, {3, 2, true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestRing(t, 4, true)
			r.used[2], r.used[3] = byte(tt.start), byte(tt.start>>8)
			q, err := NewSplitQueue(r.mem, 4, r.addrs(), true, 0)
			if err != nil {
				t.Fatal(err)
			}
			r.setAvailFlags(availFNoInterrupt) // ignored with EVENT_IDX
			for i, s := range tt.steps {
				r.setUsedEvent(s.usedEvent)
				for j := 0; j < s.pushes; j++ {
					q.PushUsed(0, 1)
				}
				if got := q.NeedInterrupt(); got != s.want {
					t.Fatalf("step %d (used_event %d, used.idx now %d): NeedInterrupt %v, want %v", i, s.usedEvent, q.UsedIdx(), got, s.want)
				}
			}
		})
	}
}

func TestNotifySuppressionNoEventIdx(t *testing.T) {
	r := newTestRing(t, 4, false)
	r.q.DisableNotify()
	if r.usedFlags()&usedFNoNotify == 0 {
		t.Fatal("DisableNotify did not set VIRTQ_USED_F_NO_NOTIFY")
	}
	if more := r.q.EnableNotify(); more {
		t.Fatal("EnableNotify reported entries in an empty ring")
	}
	if r.usedFlags()&usedFNoNotify != 0 {
		t.Fatal("EnableNotify did not clear VIRTQ_USED_F_NO_NOTIFY")
	}
	// An entry that arrives while notifications were off is reported.
	r.q.DisableNotify()
	r.publish(r.addChain(wbuf(0x1000, 1)))
	if !r.q.EnableNotify() {
		t.Fatal("EnableNotify missed an entry published while notifications were off")
	}
	if _, ok, _ := r.q.Next(); !ok {
		t.Fatal("entry not poppable")
	}
	if r.q.EnableNotify() {
		t.Fatal("EnableNotify reported entries after the ring was drained")
	}
	if r.availEvent() != 0 {
		t.Fatal("avail_event written without EVENT_IDX")
	}
}

func TestNotifySuppressionEventIdx(t *testing.T) {
	r := newTestRing(t, 4, true)
	r.q.DisableNotify()
	if r.usedFlags() != 0 {
		t.Fatal("DisableNotify set used.flags with EVENT_IDX")
	}
	r.publish(r.addChain(wbuf(0x1000, 1)), r.addChain(wbuf(0x1000, 1)))
	if !r.q.EnableNotify() {
		t.Fatal("EnableNotify missed available entries")
	}
	if r.availEvent() != 0 {
		t.Fatalf("avail_event %d, want 0 (nothing popped yet)", r.availEvent())
	}
	for i := 0; i < 2; i++ {
		if _, ok, err := r.q.Next(); !ok || err != nil {
			t.Fatal(ok, err)
		}
	}
	if r.q.EnableNotify() {
		t.Fatal("EnableNotify reported entries after the ring was drained")
	}
	if r.availEvent() != 2 {
		t.Fatalf("avail_event %d, want 2: kick me when entry 2 is made available", r.availEvent())
	}
}

// load16 and store16 touch only the two bytes of their field, and refuse a
// field that is not inside the slice (len, not cap, is the limit).
func TestRingFieldAccess(t *testing.T) {
	b := make([]byte, 8)
	store16(b, 2, 0xabcd)
	store16(b, 4, 0x1234)
	if !reflect.DeepEqual(b, []byte{0, 0, 0xcd, 0xab, 0x34, 0x12, 0, 0}) {
		t.Fatalf("memory after stores: %x", b)
	}
	if load16(b, 2) != 0xabcd || load16(b, 4) != 0x1234 || load16(b, 6) != 0 {
		t.Fatal("load16 does not read back what store16 wrote")
	}
	short := b[:4] // cap 8: the check must use len
	for name, f := range map[string]func(){
		"load16 at len-1":  func() { load16(short, 3) },
		"store16 at len-1": func() { store16(short, 3, 1) },
		"load16 at len":    func() { load16(short, 4) },
		"store16 at len":   func() { store16(short, 4, 1) },
	} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("%s did not panic", name)
				}
			}()
			f()
		}()
	}
	if b[4] != 0x34 || b[5] != 0x12 {
		t.Fatal("an out-of-bounds store16 wrote memory")
	}
}
