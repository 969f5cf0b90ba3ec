package bench

import (
	"math"
	"math/bits"
	"time"
)

// subBits sets the histogram's precision: every power-of-two range of
// values is split into 2^subBits equal buckets, so a bucket is at most
// 1/2^subBits (0.8 %) of the values it holds wide.
const subBits = 7

// numBuckets covers every uint64: values below 2^(subBits+1) have a bucket
// each, and each of the 63-subBits octaves above has 2^subBits.
const numBuckets = (65 - subBits) << subBits

// Histogram is a log-linear histogram of durations in nanoseconds, like
// HdrHistogram with a fixed precision: recording is a few instructions and
// no allocation, percentiles are within 0.8 % of the exact ones, and
// histograms merge by adding buckets. The mean, minimum and maximum are
// exact. The zero value is empty and ready; it is not safe for concurrent
// use.
type Histogram struct {
	counts   []uint64 // allocated on the first Record
	n        uint64
	sum      float64 // nanoseconds; a float so that it cannot overflow
	min, max uint64
}

// bucketOf is the index of the bucket holding v.
func bucketOf(v uint64) int {
	l := bits.Len64(v)
	if l <= subBits+1 {
		return int(v) // exact: values below 2^(subBits+1)
	}
	shift := l - 1 - subBits                    // >= 1
	return shift<<subBits + int(v>>uint(shift)) // v>>shift is in [2^subBits, 2^(subBits+1))
}

// bucketRange is the smallest and the largest value bucket i holds.
func bucketRange(i int) (lo, hi uint64) {
	if i < 2<<subBits {
		return uint64(i), uint64(i)
	}
	shift := uint(i>>subBits - 1)
	m := uint64(i) - uint64(shift)<<subBits
	lo = m << shift
	return lo, lo + (1<<shift - 1)
}

// Record adds one duration; negative durations count as 0.
func (h *Histogram) Record(d time.Duration) {
	h.RecordValue(uint64(max(d, 0)))
}

// RecordValue adds one value (nanoseconds); values above the largest
// time.Duration count as that.
func (h *Histogram) RecordValue(v uint64) {
	v = min(v, math.MaxInt64)
	if h.counts == nil {
		h.counts = make([]uint64, numBuckets)
	}
	h.counts[bucketOf(v)]++
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.n++
	h.sum += float64(v)
}

// Merge adds every value of o to h.
func (h *Histogram) Merge(o *Histogram) {
	if o.n == 0 {
		return
	}
	if h.counts == nil {
		h.counts = make([]uint64, numBuckets)
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	h.max = max(h.max, o.max)
	h.n += o.n
	h.sum += o.sum
}

// Count is the number of values recorded.
func (h *Histogram) Count() uint64 { return h.n }

// Min is the smallest value recorded (0 when empty).
func (h *Histogram) Min() time.Duration { return time.Duration(h.min) }

// Max is the largest value recorded (0 when empty).
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean is the exact mean (0 when empty).
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(math.Round(h.sum / float64(h.n)))
}

// Percentile returns the value at or below which p percent of the values
// lie (the nearest-rank definition: the value of rank ceil(p/100 * n)), as
// the largest value its bucket holds, clamped to [Min, Max]: exact for
// values below 256 ns, else at most 0.8 % above the exact answer.
// Percentile(0) is Min, Percentile(100) is Max; an empty histogram gives 0.
func (h *Histogram) Percentile(p float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	if p <= 0 {
		return time.Duration(h.min)
	}
	rank := uint64(math.Ceil(p / 100 * float64(h.n)))
	rank = min(max(rank, 1), h.n)
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			_, hi := bucketRange(i)
			return time.Duration(min(max(hi, h.min), h.max))
		}
	}
	return time.Duration(h.max)
}
