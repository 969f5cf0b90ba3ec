package crash

import (
	"strings"
	"testing"
)

// image builds a disk of n sectors where sector s holds the data of ids[s]
// (0: zeros).
func image(ids []uint64, writes []WriteRec) []byte {
	img := make([]byte, len(ids)*SectorSize)
	for s, id := range ids {
		if id != 0 {
			SectorData(img[s*SectorSize:(s+1)*SectorSize], id, uint64(s))
		}
	}
	return img
}

func TestCheckRules(t *testing.T) {
	// Write 1 covers sectors 0-1 and completes at 3; write 2 covers
	// sector 1 on queue 0, submitted at 5, still running at the crash.
	w1 := WriteRec{ID: 1, Queue: 0, QSeq: 0, Sector: 0, Sectors: 2, Submit: 1, Complete: 3}
	w2 := WriteRec{ID: 2, Queue: 0, QSeq: 1, Sector: 1, Sectors: 1, Submit: 5, Complete: Never}
	// A flush submitted on queue 1 after write 1 completed.
	fAfterW1 := FlushRec{Queue: 1, QSeq: 0, Submit: 4, Complete: 6, OK: true}
	// A flush on queue 0 submitted after write 2 (same queue): write 2
	// must be durable although it had not completed when the flush was
	// submitted (the drain guarantee).
	fAfterW2 := FlushRec{Queue: 0, QSeq: 2, Submit: 7, Complete: 9, OK: true}
	failedFlush := FlushRec{Queue: 1, QSeq: 0, Submit: 4, Complete: 6, OK: false}
	cases := []struct {
		name         string
		ids          []uint64
		writes       []WriteRec
		flushes      []FlushRec
		writeThrough bool
		want         string // substring of the first violation; "" = none
	}{
		{"no flush: zeros are fine", []uint64{0, 0}, []WriteRec{w1}, nil, false, ""},
		{"no flush: the write is fine", []uint64{1, 1}, []WriteRec{w1}, nil, false, ""},
		{"flushed write lost", []uint64{0, 1}, []WriteRec{w1}, []FlushRec{fAfterW1}, false, "durable write covers it"},
		{"failed flush makes nothing durable", []uint64{0, 0}, []WriteRec{w1}, []FlushRec{failedFlush}, false, ""},
		{"flushed write present", []uint64{1, 1}, []WriteRec{w1, w2}, []FlushRec{fAfterW1}, false, ""},
		{"later unflushed write may replace it", []uint64{1, 2}, []WriteRec{w1, w2}, []FlushRec{fAfterW1}, false, ""},
		{"same-queue write before the flush must be durable", []uint64{1, 1}, []WriteRec{w1, w2}, []FlushRec{fAfterW2}, false, "later durable write"},
		{"same-queue write before the flush present", []uint64{1, 2}, []WriteRec{w1, w2}, []FlushRec{fAfterW2}, false, ""},
		{"write-through: completed write is durable", []uint64{0, 1}, []WriteRec{w1}, nil, true, "durable write covers it"},
		{"data of a write that never covered the sector", []uint64{2, 1}, []WriteRec{w1, w2}, nil, false, "never covered it"},
		{"unknown write id", []uint64{7, 0}, []WriteRec{w1}, nil, false, "never covered it"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := image(c.ids, c.writes)
			bad := Check(img, c.writes, c.flushes, 10, 11, c.writeThrough)
			switch {
			case c.want == "" && len(bad) > 0:
				t.Fatalf("unexpected violation: %v", bad[0])
			case c.want != "" && len(bad) == 0:
				t.Fatalf("no violation, want %q", c.want)
			case c.want != "" && !strings.Contains(bad[0].Msg, c.want):
				t.Fatalf("violation %q, want %q", bad[0].Msg, c.want)
			}
		})
	}
}

func TestCheckTornSector(t *testing.T) {
	w := WriteRec{ID: 1, Sector: 0, Sectors: 1, Submit: 1, Complete: 2}
	img := image([]uint64{1}, []WriteRec{w})
	img[100] ^= 0xff
	if bad := Check(img, []WriteRec{w}, nil, 10, 11, false); len(bad) == 0 || !strings.Contains(bad[0].Msg, "corrupt") {
		t.Fatalf("corrupt sector not reported: %v", bad)
	}
	img = make([]byte, SectorSize)
	img[300] = 1
	if bad := Check(img, nil, nil, 10, 11, false); len(bad) == 0 {
		t.Fatal("garbage in a zero sector not reported")
	}
}
