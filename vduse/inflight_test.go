package vduse

import (
	"errors"
	"slices"
	"testing"
)

func TestInflightRecover(t *testing.T) {
	dir := t.TempDir()
	r, err := openInflightFile(dir, "vd0", 2, 8, 42, true)
	if err != nil {
		t.Fatal(err)
	}
	r.setStatus(0x0f)
	l := r.queue(1, 8)
	l.start(100)
	for _, h := range []uint16{5, 2, 7, 1} {
		l.Popped(h)
	}
	// 2 completed; 7's used element reached the ring (used 102) but the process died before
	// its flag was cleared.
	l.Publishing(2)
	l.Published(2, 101)
	l.Publishing(7)
	r.close()

	// Another process opens the record that the first one left.
	r2, err := openInflightFile(dir, "vd0", 2, 8, 42, false)
	if err != nil {
		t.Fatal(err)
	}
	defer r2.close()
	if r2.status() != 0x0f {
		t.Fatalf("status %#x", r2.status())
	}
	last, resubmit := r2.queue(1, 8).recover(102, 8)
	if last != 104 || !slices.Equal(resubmit, []uint16{5, 1}) {
		t.Fatalf("recover: last avail %d resubmit %v, want 104 [5 1]", last, resubmit)
	}
	// Without the publish having reached the ring, 7 runs again too.
	r3, _ := openInflightFile(t.TempDir(), "vd1", 1, 8, 42, true)
	defer r3.close()
	l3 := r3.queue(0, 8)
	l3.start(0)
	l3.Popped(3)
	l3.Popped(4)
	l3.Publishing(4)
	if last, resubmit := l3.recover(0, 8); last != 2 || !slices.Equal(resubmit, []uint16{3, 4}) {
		t.Fatalf("recover: %d %v", last, resubmit)
	}
	// A record of another geometry is refused.
	if _, err := openInflightFile(dir, "vd0", 1, 8, 42, false); !errors.Is(err, ErrSettingsChanged) {
		t.Fatalf("other geometry: %v", err)
	}
	// A record of other settings is refused.
	if _, err := openInflightFile(dir, "vd0", 2, 8, 43, false); !errors.Is(err, ErrSettingsChanged) {
		t.Fatalf("other settings: %v", err)
	}
	if r.queue(0, 16) != nil {
		t.Fatal("a ring larger than the record got a log")
	}
}
