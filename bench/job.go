// Package bench is a vhost-user-blk load generator: a front-end, like fio's
// libblkio engine, that connects to any vhost-user-blk back-end socket (vublk,
// qemu-storage-daemon), shares memfd guest memory with it, keeps a fixed
// number of requests in flight on each queue for a fixed time, and measures
// throughput, latency percentiles and the server's CPU time per request.
//
// It drives the device through vhostuser/frontend, so what it measures is
// the back-end plus the cost of the vhost-user data path (split rings,
// eventfd kicks and calls), with no guest kernel in between.
package bench

import (
	"fmt"
	"time"
)

// Mode is the access pattern of a job, named as fio's rw= option.
type Mode int

// The access patterns.
const (
	RandRead Mode = iota
	RandWrite
	Read  // sequential
	Write // sequential
	RandRW
)

var modeNames = [...]string{RandRead: "randread", RandWrite: "randwrite", Read: "read", Write: "write", RandRW: "randrw"}

func (m Mode) String() string {
	if m >= 0 && int(m) < len(modeNames) {
		return modeNames[m]
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// ParseMode reads a mode name: randread, randwrite, read, write or randrw.
func ParseMode(s string) (Mode, error) {
	for m, name := range modeNames {
		if s == name {
			return Mode(m), nil
		}
	}
	return 0, badJob("--rw must be randread, randwrite, read, write or randrw, not %q", s)
}

// Random reports whether offsets are chosen at random (else sequentially).
func (m Mode) Random() bool { return m == RandRead || m == RandWrite || m == RandRW }

// Reads reports whether the job reads.
func (m Mode) Reads() bool { return m == RandRead || m == Read || m == RandRW }

// Writes reports whether the job writes.
func (m Mode) Writes() bool { return m == RandWrite || m == Write || m == RandRW }

// Limits on a job.
const (
	// SectorSize is the virtio-blk sector: block sizes and regions are
	// multiples of it.
	SectorSize = 512
	// MaxBlockSize bounds --bs: every request's buffer lives in guest memory.
	MaxBlockSize = 16 << 20
	// MaxIODepth bounds --iodepth: a request takes up to three descriptors,
	// and libvhost-user (qemu-storage-daemon) takes queues of at most 1024.
	MaxIODepth = 256
	// MaxQueues bounds --queues.
	MaxQueues = 64
	// maxVerifySlots bounds how many blocks --verify tracks (4 bytes each).
	maxVerifySlots = 1 << 26
)

// Job says what load to generate. The zero value is not valid; start from
// DefaultJob.
type Job struct {
	// Name labels the job in reports; empty means Name() derives one.
	Name string
	// Mode is the access pattern.
	Mode Mode
	// BlockSize is the size of every read and write, in bytes.
	BlockSize int
	// IODepth is how many requests each queue keeps in flight.
	IODepth int
	// Queues is how many virtqueues to drive, each from its own goroutine.
	Queues int
	// Runtime is how long the measured phase lasts.
	Runtime time.Duration
	// Ramp is a warm-up before the measured phase: requests run, nothing is
	// counted.
	Ramp time.Duration
	// FlushEvery, when positive, makes every queue send a FLUSH after every
	// FlushEvery writes. The flush is one of the queue's IODepth requests.
	FlushEvery int
	// Verify writes self-describing data (offset, run, generation, in every
	// sector), checks every read of a block written during the run, and
	// after the run reads back every block written.
	Verify bool
	// Size is the region used, from offset 0, in bytes; 0 is the whole
	// device.
	Size int64
	// ReadMix is the percentage of reads in a randrw job.
	ReadMix int
	// Seed seeds the offsets and the read/write mix; 0 picks one at random.
	Seed uint64
	// Packed drives packed virtqueues (VIRTIO_F_RING_PACKED); the device must offer them.
	Packed bool
}

// DefaultJob is the job with every option at its default: 4 KiB random
// reads, 32 in flight on one queue for 10 seconds.
func DefaultJob() Job {
	return Job{Mode: RandRead, BlockSize: 4096, IODepth: 32, Queues: 1, Runtime: 10 * time.Second, ReadMix: 50}
}

// Validate checks the job on its own, before any device is known. Its
// errors wrap ErrBadJob and are one line.
func (j Job) Validate() error {
	bad := func(format string, a ...any) error {
		return badJob(format, a...)
	}
	switch {
	case j.Mode < 0 || int(j.Mode) >= len(modeNames):
		return bad("unknown mode %d", int(j.Mode))
	case j.BlockSize <= 0 || j.BlockSize%SectorSize != 0:
		return bad("--bs %d is not a positive multiple of %d bytes", j.BlockSize, SectorSize)
	case j.BlockSize > MaxBlockSize:
		return bad("--bs %d is larger than %d bytes", j.BlockSize, MaxBlockSize)
	case j.IODepth < 1 || j.IODepth > MaxIODepth:
		return bad("--iodepth must be between 1 and %d, not %d", MaxIODepth, j.IODepth)
	case j.Queues < 1 || j.Queues > MaxQueues:
		return bad("--queues must be between 1 and %d, not %d", MaxQueues, j.Queues)
	case j.Runtime <= 0:
		return bad("--runtime must be positive, not %v", j.Runtime)
	case j.Ramp < 0:
		return bad("--ramp must not be negative, not %v", j.Ramp)
	case j.FlushEvery < 0:
		return bad("--flush-every must not be negative, not %d", j.FlushEvery)
	case j.FlushEvery > 0 && !j.Mode.Writes():
		return bad("--flush-every needs a job that writes, not %v", j.Mode)
	case j.Verify && !j.Mode.Writes():
		return bad("--verify checks what the run wrote: it needs a job that writes, not %v", j.Mode)
	case j.Size < 0 || j.Size%int64(j.BlockSize) != 0:
		return bad("--size %d is not a multiple of --bs %d", j.Size, j.BlockSize)
	case j.ReadMix < 0 || j.ReadMix > 100:
		return bad("--rwmixread must be between 0 and 100, not %d", j.ReadMix)
	}
	if j.Size > 0 {
		return j.checkRegion(j.Size)
	}
	return nil
}

// checkRegion checks that a region of size bytes gives every queue room
// for its requests.
func (j Job) checkRegion(size int64) error {
	slots := size / int64(j.BlockSize)
	perQueue := slots / int64(j.Queues)
	switch {
	case perQueue < 1:
		return badJob("a region of %d bytes has fewer than one %d-byte block per queue", size, j.BlockSize)
	case j.Verify && perQueue <= int64(j.IODepth):
		// Verify never has two requests on one block: a queue needs more
		// blocks than it has requests in flight.
		return badJob("--verify needs more than --iodepth (%d) blocks per queue, the region has %d", j.IODepth, perQueue)
	case j.Verify && slots > maxVerifySlots:
		return badJob("--verify tracks every block: a region of %d blocks is more than %d, give a smaller --size", slots, maxVerifySlots)
	}
	return nil
}

// Label is the job's name: Name, or one made of its parameters, such as
// randwrite-4k-qd32-q1-flush32.
func (j Job) Label() string {
	if j.Name != "" {
		return j.Name
	}
	s := fmt.Sprintf("%v-%s-qd%d-q%d", j.Mode, sizeName(j.BlockSize), j.IODepth, j.Queues)
	if j.FlushEvery > 0 {
		s += fmt.Sprintf("-flush%d", j.FlushEvery)
	}
	return s
}

func sizeName(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dm", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dk", n>>10)
	}
	return fmt.Sprint(n)
}
