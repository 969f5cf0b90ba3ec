package vhostuser_test

import (
	"bytes"
	"fmt"
	"testing"

	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// TestPackedRings runs the front-end on packed rings: VIRTIO_F_RING_PACKED is offered only when
// the device is configured so, is negotiated, and reads, writes, flushes, discards and
// write-zeroes work with and without EVENT_IDX and indirect descriptors, on rings whose size is
// not a power of two, with requests completing out of order across several laps.
func TestPackedRings(t *testing.T) {
	split := newExport(t, exportOptions{writeback: true})
	d := connect(t, split, frontend.Options{Packed: true})
	if d.Features()&(1<<virtio.FRingPacked) != 0 {
		t.Fatal("VIRTIO_F_RING_PACKED negotiated though the device does not offer it")
	}
	d.Close()

	for _, tc := range []struct {
		eventIdx, indirect bool
		size               int
	}{{false, false, 64}, {true, false, 64}, {true, false, 100}, {false, true, 100}, {true, true, 64}, {true, true, 100}, {false, true, 7}} {
		t.Run(fmt.Sprintf("event_idx=%v,indirect=%v,size=%d", tc.eventIdx, tc.indirect, tc.size), func(t *testing.T) {
			e := newExport(t, exportOptions{writeback: true, packed: true})
			d := connect(t, e, frontend.Options{Packed: true, NumQueues: 2, QueueSize: tc.size, EventIdx: tc.eventIdx, Indirect: tc.indirect})
			if d.Features()&(1<<virtio.FRingPacked) == 0 {
				t.Fatal("VIRTIO_F_RING_PACKED not negotiated")
			}
			q := d.Queue(1)
			// many more requests than ring entries, in flight together: the ring laps
			const n = 300
			var ps []*frontend.Pending
			for i := range n {
				p, err := q.Submit(frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096)))
				if err != nil {
					t.Fatal(err)
				}
				ps = append(ps, p)
			}
			for i, p := range ps {
				if res := wait(t, p); res.Err != nil {
					t.Fatalf("write %d: %v", i, res.Err)
				}
			}
			if err := q.Flush(); err != nil {
				t.Fatal(err)
			}
			for i := range n {
				got, err := d.Queue(i%2).Read(uint64(i*8), 4096)
				if err != nil || !bytes.Equal(got, pattern(uint64(i), 4096)) {
					t.Fatalf("read %d: %v", i, err)
				}
			}
			if err := q.Discard(0, 8); err != nil {
				t.Fatal(err)
			}
			if err := q.WriteZeroes(8, 8, false); err != nil {
				t.Fatal(err)
			}
			if got, err := q.Read(8, 4096); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
				t.Fatalf("after write-zeroes: %v", err)
			}
			if id, err := q.GetID(); err != nil || id != serial {
				t.Fatalf("GET_ID %q, %v", id, err)
			}
		})
	}
}

// TestPackedVringBase stops a packed queue with requests in flight: GET_VRING_BASE answers in
// the packed encoding (avail position and wrap counter, used position and wrap counter), both
// positions equal once what was popped has completed, and the queue goes on from there.
func TestPackedVringBase(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true, packed: true})
	d := connect(t, e, frontend.Options{Packed: true, QueueSize: 16})
	q := d.Queue(0)
	// 20 one-chain requests of 3 descriptors: past the end of the 16-entry ring
	for i := range 20 {
		if err := q.Write(uint64(i*8), pattern(uint64(i), 512)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := d.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	raw := q.VringBase()
	// 60 descriptors in a ring of 16: position 12 of the fourth lap (wrap counter 0)
	if want := virtio.PackedBase(12, false, 12, false); raw != want {
		t.Fatalf("GET_VRING_BASE %#x, want %#x", raw, want)
	}
	if err := d.StartQueue(0); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if got, err := q.Read(uint64(i*8), 512); err != nil || !bytes.Equal(got, pattern(uint64(i), 512)) {
			t.Fatalf("read %d after the restart: %v", i, err)
		}
	}
	// a split ring's base is 16 bits: a packed encoding is refused there
	s := newExport(t, exportOptions{writeback: true})
	ds := connect(t, s, frontend.Options{})
	if _, err := ds.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	if err := ds.Conn().SetVringBase(0, virtio.InitialPackedBase); err == nil {
		t.Fatal("a packed base on a split ring was accepted")
	}
}

// TestPackedSubmitBatch: batches of slot requests (vublk bench's path) on a packed ring, more
// than fit at once, complete, and what they wrote reads back.
func TestPackedSubmitBatch(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true, packed: true})
	d := connect(t, e, frontend.Options{Packed: true, QueueSize: 128, EventIdx: true})
	q := d.Queue(0)
	const n = 64 // 192 descriptors: the batch waits for room once
	done := make(chan frontend.Result, n)
	reqs := make([]frontend.SlotRequest, n)
	for i := range reqs {
		s, err := q.NewSlot(4096)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Free()
		reqs[i] = frontend.SlotRequest{Slot: s, Type: virtio.BlkTOut, Sector: uint64(8 * i), Out: pattern(uint64(i), 4096),
			OnComplete: func(r frontend.Result) { done <- r }}
	}
	if err := q.SubmitBatch(reqs); err != nil {
		t.Fatal(err)
	}
	for range n {
		if r := <-done; r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	for i := range n {
		if got, err := q.Read(uint64(8*i), 4096); err != nil || !bytes.Equal(got, pattern(uint64(i), 4096)) {
			t.Fatalf("read %d: %v", i, err)
		}
	}
}
