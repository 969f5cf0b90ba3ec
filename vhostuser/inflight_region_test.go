package vhostuser

import (
	"encoding/binary"
	"slices"
	"testing"
)

func newInflightQueue(queueSize int) *inflightQueue {
	return &inflightQueue{b: make([]byte, InflightQueueRegionSize(queueSize))}
}

// ringModel is what the ring and the region hold while a back-end pops and
// completes chains: the used index, and the heads popped in order.
type ringModel struct {
	q       *inflightQueue
	usedIdx uint16
}

func (m *ringModel) pop(head uint16) { m.q.Popped(head) }

// complete publishes head's used element; stopAt cuts it short where a kill
// could land: 1 after Publishing, 2 after the used index moved.
func (m *ringModel) complete(head uint16, stopAt int) {
	m.q.Publishing(head)
	if stopAt == 1 {
		return
	}
	m.usedIdx++
	if stopAt == 2 {
		return
	}
	m.q.Published(head, m.usedIdx)
}

func TestInflightResume(t *testing.T) {
	const qs = 16
	for _, tc := range []struct {
		name     string
		run      func(m *ringModel)
		wantLast uint16
		want     []uint16
	}{
		{"nothing in flight", func(m *ringModel) {
			m.pop(3)
			m.complete(3, 0)
		}, 1, nil},
		{"in flight, in popping order", func(m *ringModel) {
			for _, h := range []uint16{9, 2, 14, 0} {
				m.pop(h)
			}
		}, 4, []uint16{9, 2, 14, 0}},
		{"completed out of order", func(m *ringModel) {
			for _, h := range []uint16{5, 6, 7, 8} {
				m.pop(h)
			}
			m.complete(7, 0)
			m.complete(5, 0)
		}, 4, []uint16{6, 8}},
		{"killed after Publishing", func(m *ringModel) {
			m.pop(5)
			m.pop(6)
			m.complete(6, 1) // not published: the guest never saw it
		}, 2, []uint16{5, 6}},
		{"killed after the used index moved", func(m *ringModel) {
			m.pop(5)
			m.pop(6)
			m.complete(6, 2) // published, flag not cleared: must not run again
		}, 2, []uint16{5}},
		{"head reused after completion", func(m *ringModel) {
			m.pop(1)
			m.pop(2)
			m.complete(1, 0)
			m.pop(1) // the driver made head 1 available again
		}, 3, []uint16{2, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := &ringModel{q: newInflightQueue(qs)}
			if _, _, fresh, err := m.q.resume(qs, qs, 0); err != nil || !fresh {
				t.Fatalf("first resume: fresh %v, %v", fresh, err)
			}
			tc.run(m)
			// The back-end dies; a new one maps the same bytes.
			q2 := &inflightQueue{b: m.q.b}
			last, resubmit, fresh, err := q2.resume(qs, qs, m.usedIdx)
			if err != nil || fresh {
				t.Fatalf("resume: fresh %v, %v", fresh, err)
			}
			if last != tc.wantLast || !slices.Equal(resubmit, tc.want) {
				t.Fatalf("resume: last avail %d, resubmit %v; want %d, %v", last, resubmit, tc.wantLast, tc.want)
			}
			// New chains are ordered after the resubmitted ones, so that a
			// second death keeps the order.
			q2.Popped(11)
			last, resubmit, _, err = (&inflightQueue{b: m.q.b}).resume(qs, qs, m.usedIdx)
			if err != nil || last != tc.wantLast+1 || !slices.Equal(resubmit, append(slices.Clone(tc.want), 11)) {
				t.Fatalf("second resume: %d %v %v", last, resubmit, err)
			}
		})
	}
}

func TestInflightResumeRejectsBadRegions(t *testing.T) {
	const qs = 16
	le := binary.LittleEndian
	for _, tc := range []struct {
		name    string
		ring    int
		usedIdx uint16
		corrupt func(b []byte)
		ok      bool
	}{
		{"unknown version", qs, 0, func(b []byte) { le.PutUint16(b[inflightOffVersion:], 2) }, false},
		{"descriptor count changed", qs, 0, func(b []byte) { le.PutUint16(b[inflightOffDescNum:], 8) }, false},
		{"bad flag", qs, 0, func(b []byte) { b[inflightHeaderSize+16*3] = 7 }, false},
		{"in flight beyond a smaller ring", 8, 0, func(b []byte) { b[inflightHeaderSize+16*12] = 1 }, false},
		{"batch list leaves the ring", qs, 1, func(b []byte) {
			b[inflightHeaderSize+16*2] = 1
			le.PutUint16(b[inflightOffLastBatch:], 100)
		}, false},
		{"stale batch list, nothing in flight", qs, 1, func(b []byte) { le.PutUint16(b[inflightOffLastBatch:], 100) }, true},
		{"used index far off with chains in flight", qs, 1000, func(b []byte) { b[inflightHeaderSize] = 1 }, false},
		{"used index far off, nothing in flight", qs, 1000, func(b []byte) {}, true},
		{"smaller ring, nothing in flight", 8, 0, func(b []byte) {}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := newInflightQueue(qs)
			if _, _, _, err := q.resume(qs, qs, 0); err != nil {
				t.Fatal(err)
			}
			tc.corrupt(q.b)
			_, _, _, err := q.resume(tc.ring, qs, tc.usedIdx)
			if (err == nil) != tc.ok {
				t.Fatalf("resume: %v, want ok %v", err, tc.ok)
			}
		})
	}
}

// FuzzInflightResume: whatever the front-end hands over, resume does not
// panic, and what it resubmits is a set of distinct heads inside the ring.
func FuzzInflightResume(f *testing.F) {
	const qs = 8
	m := &ringModel{q: newInflightQueue(qs)}
	m.q.resume(qs, qs, 0)
	m.pop(3)
	m.pop(1)
	m.complete(3, 2)
	f.Add(slices.Clone(m.q.b), uint16(m.usedIdx), uint8(qs))
	f.Add(make([]byte, InflightQueueRegionSize(qs)), uint16(0), uint8(4))
	f.Fuzz(func(t *testing.T, region []byte, usedIdx uint16, ring uint8) {
		b := make([]byte, InflightQueueRegionSize(qs))
		copy(b, region)
		ringSize := 1 << (ring % 5) // 1..16
		q := &inflightQueue{b: b}
		last, resubmit, fresh, err := q.resume(ringSize, qs, usedIdx)
		if err != nil {
			return
		}
		if fresh {
			if len(resubmit) != 0 || q.u16(inflightOffVersion) != inflightVersion {
				t.Fatalf("a fresh region resubmits %v, version %d", resubmit, q.u16(inflightOffVersion))
			}
			return
		}
		if len(resubmit) > ringSize || last != usedIdx+uint16(len(resubmit)) {
			t.Fatalf("last avail %d with used %d and %d resubmitted in a ring of %d", last, usedIdx, len(resubmit), ringSize)
		}
		seen := map[uint16]bool{}
		for _, h := range resubmit {
			if int(h) >= ringSize || seen[h] {
				t.Fatalf("resubmit %v in a ring of %d", resubmit, ringSize)
			}
			seen[h] = true
		}
	})
}
