package bench

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// TestBuckets checks that the buckets tile the uint64 range: every value
// lies in its bucket's range, and consecutive buckets touch.
func TestBuckets(t *testing.T) {
	prevHi := uint64(0)
	for i := range numBuckets {
		lo, hi := bucketRange(i)
		if lo > hi || (i > 0 && lo != prevHi+1) {
			t.Fatalf("bucket %d is [%d, %d], the previous one ended at %d", i, lo, hi, prevHi)
		}
		prevHi = hi
		for _, v := range []uint64{lo, hi, lo + (hi-lo)/2} {
			if got := bucketOf(v); got != i {
				t.Fatalf("bucketOf(%d) = %d, want %d (range [%d, %d])", v, got, i, lo, hi)
			}
		}
		if lo >= 2<<subBits && float64(hi-lo+1)/float64(lo) > 1.0/(1<<subBits) {
			t.Fatalf("bucket %d [%d, %d] is wider than 1/%d of its values", i, lo, hi, 1<<subBits)
		}
	}
	if prevHi != math.MaxUint64 {
		t.Fatalf("the last bucket ends at %d", prevHi)
	}
}

// exactPercentile is the nearest-rank percentile of sorted values.
func exactPercentile(sorted []uint64, p float64) uint64 {
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	return sorted[min(max(rank, 1), len(sorted))-1]
}

func TestPercentiles(t *testing.T) {
	seq := func(from, to uint64) []uint64 {
		var v []uint64
		for x := from; x <= to; x++ {
			v = append(v, x)
		}
		return v
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var lognormal []uint64
	for range 100000 {
		lognormal = append(lognormal, uint64(math.Exp(rng.NormFloat64()*1.5+11))) // around 60 us
	}
	tests := []struct {
		name   string
		values []uint64
		want   map[float64]uint64 // exact answers, where the histogram must be exact
	}{
		{"one value", []uint64{1234567}, map[float64]uint64{0: 1234567, 50: 1234567, 99.9: 1234567, 100: 1234567}},
		{"small values are exact", seq(1, 200), map[float64]uint64{0: 1, 50: 100, 99: 198, 99.9: 200, 100: 200}},
		{"1 to 1000", seq(1, 1000), nil},
		{"two clusters", append(slices.Repeat([]uint64{100_000}, 99), 10_000_000), map[float64]uint64{0: 100_000, 100: 10_000_000}},
		{"one cluster", slices.Repeat([]uint64{100_000}, 99), map[float64]uint64{50: 100_000, 99: 100_000, 100: 100_000}},
		{"zero", []uint64{0, 0, 0}, map[float64]uint64{50: 0, 100: 0}},
		{"huge", []uint64{1 << 62, math.MaxInt64}, map[float64]uint64{100: math.MaxInt64}},
		{"lognormal", lognormal, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Histogram
			sum := 0.0
			for _, v := range tt.values {
				h.RecordValue(v)
				sum += float64(v)
			}
			sorted := slices.Sorted(slices.Values(tt.values))
			if h.Count() != uint64(len(sorted)) || uint64(h.Min()) != sorted[0] || uint64(h.Max()) != sorted[len(sorted)-1] {
				t.Fatalf("count %d min %d max %d, want %d %d %d", h.Count(), h.Min(), h.Max(), len(sorted), sorted[0], sorted[len(sorted)-1])
			}
			if want := sum / float64(len(sorted)); math.Abs(float64(h.Mean())-want) > 0.5+want*1e-12 {
				t.Errorf("mean %d, want %.1f", h.Mean(), want)
			}
			for _, p := range []float64{0, 1, 25, 50, 90, 99, 99.9, 99.99, 100} {
				got := uint64(h.Percentile(p))
				exact := exactPercentile(sorted, p)
				if p == 0 {
					exact = sorted[0]
				}
				if want, ok := tt.want[p]; ok && got != want {
					t.Errorf("p%v = %d, want exactly %d", p, got, want)
				}
				// Never below the exact answer, and at most one bucket width above it.
				if got < exact || float64(got-exact) > float64(exact)/(1<<subBits) {
					t.Errorf("p%v = %d, exact %d: off by more than 1/%d", p, got, exact, 1<<subBits)
				}
			}
		})
	}
}

func TestHistogramEmptyAndMerge(t *testing.T) {
	var empty Histogram
	if empty.Percentile(99) != 0 || empty.Mean() != 0 || empty.Max() != 0 || empty.Count() != 0 {
		t.Fatal("an empty histogram is not all zeros")
	}
	var a, b, all Histogram
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 10000 {
		d := time.Duration(rng.Int64N(int64(10 * time.Millisecond)))
		if i%3 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
		all.Record(d)
	}
	var m Histogram
	m.Merge(&empty)
	m.Merge(&a)
	m.Merge(&b)
	for _, p := range []float64{0, 50, 99, 99.9, 100} {
		if m.Percentile(p) != all.Percentile(p) {
			t.Errorf("merged p%v = %v, recorded together %v", p, m.Percentile(p), all.Percentile(p))
		}
	}
	if m.Count() != all.Count() || m.Min() != all.Min() || m.Max() != all.Max() || m.Mean() != all.Mean() {
		t.Errorf("merged %d/%v/%v/%v, together %d/%v/%v/%v", m.Count(), m.Min(), m.Max(), m.Mean(),
			all.Count(), all.Min(), all.Max(), all.Mean())
	}
	var neg Histogram
	neg.Record(-time.Second)
	if neg.Max() != 0 {
		t.Errorf("a negative duration recorded as %v", neg.Max())
	}
	var big Histogram
	big.RecordValue(math.MaxUint64)
	if big.Max() != math.MaxInt64 || big.Percentile(50) != math.MaxInt64 {
		t.Errorf("a value beyond time.Duration recorded as %v", big.Max())
	}
}

func BenchmarkRecord(b *testing.B) {
	var h Histogram
	for i := 0; b.Loop(); i++ {
		h.Record(time.Duration(i&0xfffff) * 97)
	}
}
