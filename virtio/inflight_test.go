package virtio

import (
	"fmt"
	"slices"
	"testing"
)

// recordingLog is an InflightLog that records the calls in order.
type recordingLog struct{ calls []string }

func (l *recordingLog) Popped(head uint16) { l.calls = append(l.calls, fmt.Sprintf("popped %d", head)) }
func (l *recordingLog) Publishing(head uint16) {
	l.calls = append(l.calls, fmt.Sprintf("publishing %d", head))
}
func (l *recordingLog) Published(head, usedIdx uint16) {
	l.calls = append(l.calls, fmt.Sprintf("published %d at %d", head, usedIdx))
}

// TestInflightLogHooks: every chain popped from the available ring is
// reported before it is returned, and every used element is reported around
// the used index store that publishes it, with that index.
func TestInflightLogHooks(t *testing.T) {
	r := newTestRing(t, 8, false)
	log := &recordingLog{}
	r.q.SetInflightLog(log)
	a := r.addChain(rbuf(r.alloc(16), 16), wbuf(r.alloc(1), 1))
	b := r.addChain(rbuf(r.alloc(16), 16), wbuf(r.alloc(1), 1))
	r.publish(a, b)
	for _, want := range []uint16{a, b} {
		head, ok, err := r.q.Next()
		if err != nil || !ok || head != want {
			t.Fatalf("Next = %d, %v, %v; want %d", head, ok, err, want)
		}
	}
	r.q.PushUsed(b, 1)
	if r.usedIdx() != 1 {
		t.Fatalf("used index %d", r.usedIdx())
	}
	r.q.PushUsed(a, 1)
	want := []string{
		fmt.Sprintf("popped %d", a), fmt.Sprintf("popped %d", b),
		fmt.Sprintf("publishing %d", b), fmt.Sprintf("published %d at 1", b),
		fmt.Sprintf("publishing %d", a), fmt.Sprintf("published %d at 2", a),
	}
	if !slices.Equal(log.calls, want) {
		t.Fatalf("calls %q, want %q", log.calls, want)
	}
}

// TestResume: a resumed queue returns the resubmitted heads first, in the
// given order and without reporting them as popped again (they still are),
// then pops the available ring from the given index.
func TestResume(t *testing.T) {
	r := newTestRing(t, 8, false)
	var heads []uint16
	for range 5 {
		heads = append(heads, r.addChain(rbuf(r.alloc(16), 16), wbuf(r.alloc(1), 1)))
	}
	r.publish(heads...)
	// A back-end that died had popped the first three and completed the
	// second.
	q, err := NewSplitQueue(r.mem, 8, r.addrs(), false, 0)
	if err != nil {
		t.Fatal(err)
	}
	log := &recordingLog{}
	q.SetInflightLog(log)
	q.Resume(3, []uint16{heads[2], heads[0], 99}) // 99 is beyond the ring: dropped
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
	if want := []uint16{heads[2], heads[0], heads[3], heads[4]}; !slices.Equal(got, want) {
		t.Fatalf("popped %v, want %v", got, want)
	}
	if want := []string{fmt.Sprintf("popped %d", heads[3]), fmt.Sprintf("popped %d", heads[4])}; !slices.Equal(log.calls, want) {
		t.Fatalf("calls %q, want %q", log.calls, want)
	}
	if q.LastAvail() != 5 {
		t.Fatalf("last avail %d, want 5", q.LastAvail())
	}
	if q.EnableNotify() {
		t.Fatal("EnableNotify sees more to pop")
	}
}
