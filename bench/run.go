package bench

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// Target is the back-end to measure.
type Target struct {
	// Socket is the back-end's vhost-user unix socket.
	Socket string
	// ServerPID, when positive, is the back-end's process: the CPU time it
	// used during the measured phase is reported, per request.
	ServerPID int
	// StallTimeout is how long requests may be in flight without any of
	// them completing before Run gives up (default 30 s).
	StallTimeout time.Duration
}

// maxGuestMemory bounds the guest memory Run shares: the requests' buffers
// must fit.
const maxGuestMemory = 4 << 30

// Run connects to the back-end, runs the job and disconnects. A job that
// does not fit the device, or a back-end that lacks what the job needs, is
// ErrBadJob. I/O errors the device reports do not stop the run: they are
// counted in the Result, as are verification failures. Cancelling ctx ends
// the measured phase early; the Result covers the time until then.
func Run(ctx context.Context, t Target, j Job) (*Result, error) {
	if err := j.Validate(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if j.Seed == 0 {
		j.Seed = rand.Uint64() | 1
	}
	mem, err := guestMemory(j)
	if err != nil {
		return nil, err
	}
	if t.ServerPID > 0 {
		if _, err := ProcessCPU(t.ServerPID); err != nil {
			return nil, badJob("--server-pid %d: %w", t.ServerPID, err)
		}
	}
	dev, err := frontend.Connect(t.Socket, frontend.Options{
		NumQueues: j.Queues, QueueSize: queueSize(j.IODepth), EventIdx: true, MemSize: mem, Packed: j.Packed,
	})
	if err != nil {
		if errors.Is(err, frontend.ErrNotOffered) {
			return nil, badJob("%s: %w", t.Socket, err)
		}
		return nil, fmt.Errorf("%s: %w", t.Socket, err)
	}
	r := &runner{t: t, j: j, dev: dev}
	defer r.close()
	if err := r.checkDevice(); err != nil {
		return nil, err
	}
	return r.run(ctx)
}

// queueSize is the ring size for depth requests of up to three descriptors
// (header, data, status), as a power of two, at least QEMU's default of 128.
func queueSize(depth int) int {
	n := 128
	for n < 3*depth {
		n *= 2
	}
	return n
}

// guestMemory sizes guest memory: every request's buffer (header, data,
// status) and every ring, twice over so that first-fit allocation never
// waits for a fragmented free list, rounded up to 2 MiB, at least 64 MiB.
func guestMemory(j Job) (int64, error) {
	perReq := int64(j.BlockSize) + 128
	perQueue := int64(j.IODepth)*perReq + int64(queueSize(j.IODepth))*32 + 16<<10
	need := 2 * int64(j.Queues) * perQueue
	if need > maxGuestMemory {
		return 0, badJob("--bs %d × --iodepth %d × --queues %d needs %d MiB of guest memory, more than %d MiB",
			j.BlockSize, j.IODepth, j.Queues, need>>20, maxGuestMemory>>20)
	}
	const align = 2 << 20
	return max(64<<20, (need+align-1)/align*align), nil
}

// runner is one Run: the device and what the run found out about it.
type runner struct {
	t        Target
	j        Job
	dev      *frontend.Device
	size     int64 // the region, bytes
	cfg      frontend.Config
	closing  atomic.Bool
	lost     atomic.Bool // the back-end closed the connection
	stalled  atomic.Bool
	watchers sync.WaitGroup
}

func (r *runner) close() {
	r.closing.Store(true)
	r.dev.Close()
	r.watchers.Wait()
}

// checkDevice fits the job to the device: the region, the block size, and
// the features the job needs.
func (r *runner) checkDevice() error {
	cfg, err := r.dev.Config()
	if err != nil {
		return err
	}
	r.cfg = cfg
	j := &r.j
	capacity := int64(cfg.Capacity) * SectorSize
	f := r.dev.Features()
	switch {
	case f&(1<<virtio.BlkFBlkSize) != 0 && cfg.BlkSize != 0 && j.BlockSize%int(cfg.BlkSize) != 0:
		return badJob("--bs %d is not a multiple of the device's %d-byte logical block", j.BlockSize, cfg.BlkSize)
	case j.Mode.Writes() && f&(1<<virtio.BlkFRO) != 0:
		return badJob("%v on a read-only device", j.Mode)
	case j.Packed && f&(1<<virtio.FRingPacked) == 0:
		return badJob("--packed on a device that does not offer VIRTIO_F_RING_PACKED")
	case j.FlushEvery > 0 && f&(1<<virtio.BlkFFlush) == 0:
		return badJob("--flush-every on a device that does not offer VIRTIO_BLK_F_FLUSH")
	case j.Size > capacity:
		return badJob("--size %d is larger than the device (%d bytes)", j.Size, capacity)
	}
	r.size = j.Size
	if r.size == 0 {
		r.size = capacity / int64(j.BlockSize) * int64(j.BlockSize)
	}
	return j.checkRegion(r.size)
}

func (r *runner) stallTimeout() time.Duration {
	if r.t.StallTimeout <= 0 {
		return 30 * time.Second
	}
	return r.t.StallTimeout
}

// watch ends the run when the back-end goes away or stops completing
// requests: it closes the device, which fails every request in flight.
func (r *runner) watch(workers []*worker, stop <-chan struct{}) {
	r.watchers.Add(2)
	go func() {
		defer r.watchers.Done()
		// No message is sent after setup, and the back-end sends none
		// unasked (no back-end channel is negotiated): a read returns when
		// the connection closes.
		r.dev.Conn().ReadReply()
		if !r.closing.Load() {
			r.lost.Store(true)
			r.dev.Close()
		}
	}()
	go func() {
		defer r.watchers.Done()
		timeout := r.stallTimeout()
		tick := time.NewTicker(min(timeout/4, time.Second))
		defer tick.Stop()
		last := make([]uint64, len(workers))
		idle := time.Duration(0)
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			moved := false
			for i, w := range workers {
				if p := w.progress.Load(); p != last[i] {
					last[i], moved = p, true
				}
			}
			if moved {
				idle = 0
				continue
			}
			if idle += min(timeout/4, time.Second); idle >= timeout {
				r.stalled.Store(true)
				r.dev.Close()
				return
			}
		}
	}()
}

func (r *runner) run(ctx context.Context) (*Result, error) {
	j := &r.j
	blocks := r.size / int64(j.BlockSize)
	run := rand.New(rand.NewPCG(j.Seed, 0x5eed)).Uint64()
	workers := make([]*worker, j.Queues)
	for i := range workers {
		lo, hi := blocks*int64(i)/int64(j.Queues), blocks*int64(i+1)/int64(j.Queues)
		w, err := newWorker(r.dev.Queue(i), j, lo, hi-lo, rand.New(rand.NewPCG(j.Seed, uint64(i))), run)
		if err != nil {
			return nil, err
		}
		workers[i] = w
	}
	stop := make(chan struct{})
	r.watch(workers, stop)
	defer close(stop)

	// The measured phase runs from `from` to `until`: a request counts if
	// it completes in it. The CPU clocks are read at both ends.
	start := nanotime()
	from, until := start+int64(j.Ramp), start+int64(j.Ramp)+int64(j.Runtime)
	type clocks struct {
		at                int64
		server, self      time.Duration
		kicks, interrupts uint64
		err               error
	}
	read := func() clocks {
		c := clocks{at: nanotime(), self: selfCPU()}
		for _, w := range workers {
			c.kicks += w.q.Kicks()
			c.interrupts += w.q.Interrupts()
		}
		if r.t.ServerPID > 0 {
			c.server, c.err = ProcessCPU(r.t.ServerPID)
		}
		return c
	}
	// ctxEnd closes at the end of the measured phase, or when ctx is
	// cancelled; workersDone when the workers have stopped (early, if the
	// device went away).
	ctxEnd, workersDone := make(chan struct{}), make(chan struct{})
	var begin, end clocks
	var measured atomic.Bool
	var clockWG sync.WaitGroup
	clockWG.Add(1)
	go func() {
		defer clockWG.Done()
		defer close(ctxEnd)
		wait := func(at int64) bool {
			t := time.NewTimer(time.Duration(at - nanotime()))
			defer t.Stop()
			select {
			case <-t.C:
				return true
			case <-ctx.Done():
			case <-workersDone:
			}
			return false
		}
		if !wait(from) {
			return
		}
		begin = read()
		measured.Store(true)
		wait(until)
		end = read()
	}()

	var wg sync.WaitGroup
	errs := make([]error, len(workers))
	for i, w := range workers {
		w.from, w.until = from, until
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = w.drive(ctxEnd, w.pickTimed)
		}()
	}
	wg.Wait()
	close(workersDone)
	clockWG.Wait()
	if err := r.failure(errs); err != nil {
		return nil, err
	}
	if !measured.Load() {
		return nil, fmt.Errorf("interrupted before the measured phase began: %w", ctx.Err())
	}
	if j.Verify && j.Mode.Writes() {
		// Read back every block written, on every queue at full depth.
		for i, w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				w.measuring = false
				errs[i] = w.drive(nil, w.pickReadBack())
			}()
		}
		wg.Wait()
		if err := r.failure(errs); err != nil {
			return nil, err
		}
	}
	res := r.result(workers, time.Duration(end.at-begin.at))
	res.ClientCPU = cpuResult(0, end.self-begin.self, res.IOs)
	res.Notify = notifyResult(end.kicks-begin.kicks, end.interrupts-begin.interrupts, res.IOs)
	if r.t.ServerPID > 0 {
		if err := errors.Join(begin.err, end.err); err != nil {
			return nil, err
		}
		c := cpuResult(r.t.ServerPID, end.server-begin.server, res.IOs)
		res.ServerCPU = &c
	}
	return res, nil
}

// failure turns the workers' errors into Run's: the back-end going away
// or stalling explains the errors the workers saw.
func (r *runner) failure(errs []error) error {
	err := errors.Join(errs...)
	switch {
	case err == nil:
		return nil
	case r.stalled.Load(): // first: giving up closes the connection too
		return fmt.Errorf("%w: %s: nothing completed for %v", ErrStalled, r.t.Socket, r.stallTimeout())
	case r.lost.Load():
		return fmt.Errorf("%w: %s", ErrDisconnected, r.t.Socket)
	}
	return err
}

// epoch is the origin of nanotime.
var epoch = time.Now()

// nanotime reads the monotonic clock, in nanoseconds since epoch.
func nanotime() int64 { return int64(time.Since(epoch)) }

// op is what a request does.
type op uint8

const (
	opRead op = iota
	opWrite
	opFlush
	numOps
)

// request is one of a worker's IODepth requests, with its buffer in guest
// memory. The queue's completion goroutine fills in res and end (and for a
// checked read, in), then passes the request's index back to the worker over
// its channel, which orders those writes before the worker's reads.
type request struct {
	op         op
	block      int64 // relative to the worker's first block
	gen        uint32
	start, end int64
	res        frontend.Result
	slot       *frontend.Slot
	in         []byte // --verify: a copy of what a read of a written block returned
	filled     bool   // the slot holds the worker's write data (wbuf): a write need not copy it again
	out        []byte // --verify: the data of a write
	onComplete func(frontend.Result)
}

// opStats counts one kind of request in the measured phase.
type opStats struct {
	ios, bytes uint64
	lat        Histogram
}

// worker drives one queue: it keeps IODepth requests in flight on it, in
// blocks [lo, lo+n) of the region, from a single goroutine. Requests live
// in slots allocated once in guest memory; whatever completed since the
// worker last looked is replaced by one batch with at most one kick, as a
// guest driver does.
type worker struct {
	q     *frontend.Queue
	j     *Job
	rng   *rand.Rand
	lo    int64 // first block
	n     int64 // blocks
	seq   int64 // next block of a sequential job, relative to lo
	done  chan int
	reqs  []request
	batch []frontend.SlotRequest
	idle  []int  // requests to submit next
	wbuf  []byte // the data of every write without --verify

	// --verify: the generation of every block (genNone, genUnknown or the
	// last one written), which blocks have a request in flight, a scratch
	// buffer for the expected data, and the run's identity.
	gens    []uint32
	busy    []bool
	scratch []byte
	run     uint64

	writes      int // writes submitted since the last flush
	from, until int64
	measuring   bool

	stats          [numOps]opStats
	errors         uint64 // requests completed with an error status
	verified       uint64 // reads checked against what was written
	readBack       uint64 // reads of the final read-back pass
	verifyErrors   uint64
	firstVerifyErr error
	firstIOErr     error
	progress       atomic.Uint64 // completions, for the stall watcher
}

func newWorker(q *frontend.Queue, j *Job, lo, n int64, rng *rand.Rand, run uint64) (*worker, error) {
	w := &worker{q: q, j: j, rng: rng, lo: lo, n: n, done: make(chan int, j.IODepth),
		reqs: make([]request, j.IODepth), batch: make([]frontend.SlotRequest, 0, j.IODepth),
		idle: make([]int, 0, j.IODepth), wbuf: make([]byte, j.BlockSize), run: run, measuring: true}
	for i := range w.reqs {
		r := &w.reqs[i]
		slot, err := q.NewSlot(j.BlockSize)
		if err != nil {
			return nil, fmt.Errorf("queue %d: request buffers: %w", q.Index(), err)
		}
		r.slot = slot
		if j.Verify {
			r.in = make([]byte, j.BlockSize)
			r.out = make([]byte, j.BlockSize)
		}
		r.onComplete = func(res frontend.Result) {
			r.end = nanotime()
			r.res = res
			if r.in != nil && r.op == opRead && res.Err == nil && r.gen != genNone {
				// The slot's memory may be read here only.
				copy(r.in, r.slot.In(j.BlockSize))
			}
			w.done <- i // never blocks: at most IODepth are in flight
		}
	}
	if j.Verify {
		w.gens = make([]uint32, n)
		w.busy = make([]bool, n)
		w.scratch = make([]byte, j.BlockSize)
	} else {
		// Incompressible data, the same for every write.
		for i := 0; i+8 <= len(w.wbuf); i += 8 {
			v := rng.Uint64()
			for k := range 8 {
				w.wbuf[i+k] = byte(v >> (8 * k))
			}
		}
	}
	return w, nil
}

// pick is what a worker submits next: an operation and a block (relative
// to lo), or ok false to stop submitting.
type pick func(now int64) (o op, block int64, ok bool)

// pickTimed is the timed phase: the job's mix until the measured phase
// ends, with a flush after every FlushEvery writes.
func (w *worker) pickTimed(now int64) (op, int64, bool) {
	if now >= w.until {
		return 0, 0, false
	}
	j := w.j
	if j.FlushEvery > 0 && w.writes >= j.FlushEvery {
		w.writes = 0
		return opFlush, 0, true
	}
	o := opRead
	switch j.Mode {
	case RandWrite, Write:
		o = opWrite
	case RandRW:
		if w.rng.IntN(100) >= j.ReadMix {
			o = opWrite
		}
	}
	if o == opWrite {
		w.writes++
	}
	return o, w.nextBlock(), true
}

// nextBlock chooses the block of the next read or write. With --verify it
// skips blocks that have a request in flight; there are fewer of those
// than blocks (checkRegion).
func (w *worker) nextBlock() int64 {
	if !w.j.Mode.Random() {
		for {
			b := w.seq
			w.seq = (w.seq + 1) % w.n
			if w.busy == nil || !w.busy[b] {
				return b
			}
		}
	}
	b := w.rng.Int64N(w.n)
	for tries := 0; w.busy != nil && w.busy[b]; tries++ {
		if tries < 16 {
			b = w.rng.Int64N(w.n)
		} else {
			b = (b + 1) % w.n
		}
	}
	return b
}

// pickReadBack reads every block written during the run once.
func (w *worker) pickReadBack() pick {
	next := int64(0)
	return func(int64) (op, int64, bool) {
		for next < w.n {
			b := next
			next++
			if g := w.gens[b]; g != genNone && g != genUnknown {
				return opRead, b, true
			}
		}
		return 0, 0, false
	}
}

// drive keeps IODepth requests in flight while next has more, until stop
// is closed, then waits for those in flight. It returns an error only when
// requests could not be submitted or the device went away; the requests
// still in flight then complete with ErrClosed, unwatched.
func (w *worker) drive(stop <-chan struct{}, next pick) error {
	w.idle = w.idle[:0]
	for i := range w.reqs {
		w.idle = append(w.idle, i)
	}
	outstanding := 0
	stopping := false
	for {
		if !stopping && len(w.idle) > 0 {
			w.batch = w.batch[:0]
			now := nanotime()
			for _, i := range w.idle {
				req, ok := w.prepare(i, next, now)
				if !ok {
					stopping = true
					break
				}
				w.batch = append(w.batch, req)
			}
			if len(w.batch) > 0 {
				if err := w.q.SubmitBatch(w.batch); err != nil {
					return err
				}
			}
			outstanding += len(w.batch)
			w.idle = w.idle[:0]
		}
		if outstanding == 0 {
			return nil
		}
		var i int
		select {
		case i = <-w.done:
		case <-stop:
			stopping, stop = true, nil
			continue
		}
		// Take every completion there is, then submit their successors
		// together.
		for {
			outstanding--
			r := &w.reqs[i]
			if errors.Is(r.res.Err, frontend.ErrClosed) {
				return r.res.Err
			}
			w.complete(r)
			w.idle = append(w.idle, i)
			select {
			case i = <-w.done:
				continue
			default:
			}
			break
		}
	}
}

// prepare turns request i into the next request of next; ok is false when
// next has no more.
func (w *worker) prepare(i int, next pick, now int64) (req frontend.SlotRequest, ok bool) {
	o, b, ok := next(now)
	if !ok {
		return req, false
	}
	r := &w.reqs[i]
	j := w.j
	r.op, r.block, r.gen = o, b, genNone
	req = frontend.SlotRequest{Slot: r.slot, Sector: uint64(w.lo+b) * uint64(j.BlockSize) / SectorSize,
		OnComplete: r.onComplete}
	switch o {
	case opFlush:
		req.Type, req.Sector = virtio.BlkTFlush, 0
	case opRead:
		req.Type, req.InLen = virtio.BlkTIn, j.BlockSize
		r.filled = false // the device writes the slot's data area
		if w.gens != nil {
			r.gen = w.gens[b] // what the read must find; it cannot change while the read is in flight
		}
	case opWrite:
		// Without --verify every write sends the same data: a slot that
		// already holds it is not copied to again (a guest does not copy
		// the data of a write twice either; qemu-img bench sends its buffers
		// as they are).
		req.Type, req.Out, req.Prefilled = virtio.BlkTOut, w.wbuf, r.filled
		r.filled = w.gens == nil
		if w.gens != nil {
			r.gen = nextGen(w.gens[b])
			fillPattern(r.out, (w.lo+b)*int64(j.BlockSize), w.run, r.gen)
			req.Out = r.out
		}
	}
	if w.busy != nil && o != opFlush {
		w.busy[b] = true
	}
	r.start = now
	return req, true
}

// complete accounts for a completed request.
func (w *worker) complete(r *request) {
	w.progress.Add(1)
	j := w.j
	if r.res.Err != nil {
		w.errors++
		if w.firstIOErr == nil {
			w.firstIOErr = fmt.Errorf("%v at block %d: %w", r.op, w.lo+r.block, r.res.Err)
		}
	}
	if w.busy != nil && r.op != opFlush {
		w.busy[r.block] = false
		switch {
		case r.op == opWrite && r.res.Err == nil:
			w.gens[r.block] = r.gen
		case r.op == opWrite:
			w.gens[r.block] = genUnknown
		case r.res.Err == nil && r.gen != genNone && r.gen != genUnknown:
			w.verified++
			if !w.measuring {
				w.readBack++
			}
			off := (w.lo + r.block) * int64(j.BlockSize)
			if err := checkPattern(r.in, w.scratch, off, w.run, r.gen); err != nil {
				w.verifyErrors++
				if w.firstVerifyErr == nil {
					w.firstVerifyErr = err
				}
			}
		}
	}
	if !w.measuring || r.end < w.from || r.end > w.until {
		return
	}
	s := &w.stats[r.op]
	s.ios++
	if r.op != opFlush {
		s.bytes += uint64(j.BlockSize)
	}
	s.lat.Record(time.Duration(r.end - r.start))
}

func (o op) String() string {
	switch o {
	case opRead:
		return "read"
	case opWrite:
		return "write"
	case opFlush:
		return "flush"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}
