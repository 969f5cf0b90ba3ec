package virtio

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
)

// newBlkHarnessSize is newBlkHarness on a ring of size entries.
func newBlkHarnessSize(t *testing.T, size int) *blkHarness {
	t.Helper()
	store := backend.NewCrashStore(testDiskSize)
	log := logrus.New()
	log.SetOutput(io.Discard)
	engine := backend.NewEngine(store, 2)
	t.Cleanup(func() { engine.Close() })
	h := &blkHarness{t: t, r: newTestRing(t, size, false), store: store, engine: engine, notify: &countNotifier{}}
	h.dev = NewBlkDevice(engine, BlkConfig{Capacity: testDiskSize, NumQueues: 1, Writeback: true}, logrus.NewEntry(log))
	h.dev.SetFeatures(h.dev.Features())
	h.q = &Queue{Index: 0, Ring: h.r.q, Mem: h.r.mem, Notify: h.notify}
	return h
}

// turn runs one ProcessQueue turn and waits for what it started.
func (h *blkHarness) turn() {
	h.t.Helper()
	if err := h.dev.ProcessQueue(h.q); err != nil {
		h.t.Fatalf("ProcessQueue: %v", err)
	}
	h.q.Drain()
}

// TestProcessQueueTurn: one call of ProcessQueue takes at most turnRequests
// requests, or turnDescs descriptors, however many the guest made
// available; the rest stay pending (Pending is true, so the ring's goroutine
// calls again) and nothing is lost.
func TestProcessQueueTurn(t *testing.T) {
	t.Run("requests", func(t *testing.T) {
		h := newBlkHarnessSize(t, 1024)
		const n = 600
		var sent []sent
		for range n {
			sent = append(sent, h.send(BlkTGetID, 0, nil, BlkIDBytes))
		}
		for turn, want := range []int{turnRequests, 2 * turnRequests, n} {
			h.turn()
			if got := int(h.r.q.UsedIdx()); got != want {
				t.Fatalf("turn %d: %d requests completed, want %d", turn, got, want)
			}
			if pending := h.q.Pending(); pending != (want < n) {
				t.Fatalf("turn %d: Pending %v with %d of %d done", turn, pending, want, n)
			}
		}
		used := map[uint16]uint32{}
		for _, e := range h.r.takeUsed() {
			used[uint16(e.id)] = e.len
		}
		for _, s := range sent[len(sent)-10:] {
			h.check(used, s, BlkSOK, BlkIDBytes+1)
		}
	})
	// A turn that ends just as the ring runs empty turns kicks on again:
	// with none pending, the ring's goroutine waits for a kick.
	for _, eventIdx := range []bool{false, true} {
		t.Run(fmt.Sprintf("exactly one turn, event_idx=%v", eventIdx), func(t *testing.T) {
			h := newBlkHarnessSize(t, 1024)
			if eventIdx {
				h.r = newTestRing(t, 1024, true)
				h.q = &Queue{Index: 0, Ring: h.r.q, Mem: h.r.mem, Notify: h.notify}
			}
			for range turnRequests {
				h.send(BlkTGetID, 0, nil, BlkIDBytes)
			}
			h.turn()
			q := h.r.q
			if got := int(q.UsedIdx()); got != turnRequests || h.q.Pending() {
				t.Fatalf("%d of %d requests completed, Pending %v", got, turnRequests, h.q.Pending())
			}
			if eventIdx {
				if ev := load16(q.used, 4+8*int(q.size)); ev != q.lastAvail {
					t.Fatalf("avail_event %d with the ring empty at %d: the driver's next request is not kicked", ev, q.lastAvail)
				}
			} else if load16(q.used, 0)&usedFNoNotify != 0 {
				t.Fatal("VRING_USED_F_NO_NOTIFY still set with the ring empty: the driver's next request is not kicked")
			}
		})
	}
	t.Run("descriptors", func(t *testing.T) {
		// Chains of 1024 descriptors (beyond seg_max: IOERR, but each
		// walked to its end): a turn stops after turnDescs of them.
		h := newBlkHarnessSize(t, 256)
		r := h.r
		hdr, data, st := r.put(blkHeader(0x7fff, 0)), r.alloc(512), r.alloc(1)
		bufs := []buf{rbuf(hdr, 16)}
		for range 1022 {
			bufs = append(bufs, wbuf(data, 512))
		}
		bufs = append(bufs, wbuf(st, 1))
		// One table for every chain, as the attack reuses it.
		const n = 100
		head := r.addIndirect(bufs...)
		for range n {
			r.publish(head)
		}
		h.turn()
		if got, want := int(r.q.UsedIdx()), turnDescs/(len(bufs)+1)+1; got != want {
			t.Fatalf("%d chains of %d descriptors in one turn, want %d", got, len(bufs)+1, want)
		}
		for range 3 {
			h.turn()
		}
		if got := int(r.q.UsedIdx()); got != n || h.q.Pending() {
			t.Fatalf("%d of %d chains completed after 4 turns", got, n)
		}
		if st := r.bytes(st, 1)[0]; st != BlkSIOErr {
			t.Fatalf("status %d, want IOERR", st)
		}
	})
}

// TestBlkDeviceChainLimits: a chain beyond the advertised seg_max (plus
// header and status) or size_max is answered IOERR without being collected,
// direct or indirect; one at the limits is served.
func TestBlkDeviceChainLimits(t *testing.T) {
	for _, tc := range []struct {
		name     string
		data     int    // data descriptors
		dataLen  uint32 // bytes each
		indirect bool
		status   uint8
	}{
		{"seg_max segments", blkSegMax, 512, false, BlkSOK},
		{"seg_max segments, indirect", blkSegMax, 512, true, BlkSOK},
		{"seg_max+1 segments", blkSegMax + 1, 512, false, BlkSIOErr},
		{"seg_max+1 segments, indirect", blkSegMax + 1, 512, true, BlkSIOErr},
		{"32766 segments, indirect", 32766, 512, true, BlkSIOErr},
		{"a segment beyond size_max", 1, blkSizeMax + 512, false, BlkSIOErr},
		{"a segment beyond size_max, indirect", 1, blkSizeMax + 512, true, BlkSIOErr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newBlkHarnessSize(t, 1024)
			r := h.r
			// Every data descriptor is the same sector-sized buffer (the
			// aliasing of the amplification attack); a segment beyond
			// size_max points anywhere: it must not be looked at.
			hdr, data, st := r.put(blkHeader(BlkTIn, 0)), r.alloc(512), r.alloc(1)
			bufs := []buf{rbuf(hdr, 16)}
			for range tc.data {
				bufs = append(bufs, buf{addr: data, len: tc.dataLen, write: true})
			}
			bufs = append(bufs, wbuf(st, 1))
			r.bytes(st, 1)[0] = statusUnset
			var head uint16
			if tc.indirect {
				head = r.addIndirect(bufs...)
			} else {
				head = r.addChain(bufs...)
			}
			r.publish(head)
			s := sent{head: head, status: st}
			used := h.run()
			wantLen := uint32(1)
			if tc.status == BlkSOK {
				wantLen += uint32(tc.data) * tc.dataLen
			}
			h.check(used, s, tc.status, wantLen)
		})
	}
	t.Run("beyond the limits without a status byte breaks the ring", func(t *testing.T) {
		h := newBlkHarnessSize(t, 1024)
		r := h.r
		hdr := r.put(blkHeader(BlkTIn, 0))
		bufs := []buf{rbuf(hdr, 16)}
		for range blkSegMax + 2 {
			bufs = append(bufs, rbuf(hdr, 16))
		}
		r.publish(r.addChain(bufs...))
		if err := h.dev.ProcessQueue(h.q); !errors.Is(err, ErrBadRequest) || !errors.Is(err, ErrChainLimit) {
			t.Fatalf("ProcessQueue: %v, want ErrBadRequest and ErrChainLimit", err)
		}
		h.q.Drain() // nothing stays counted in flight
	})
}
