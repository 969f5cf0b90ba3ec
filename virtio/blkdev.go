package virtio

import (
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
)

// Notifier interrupts the driver (the vring call eventfd).
type Notifier interface {
	Notify()
}

// Queue is one virtqueue of a device while it runs: the ring, the memory its
// buffers live in, and what completions need.
type Queue struct {
	Index  int
	Ring   Ring
	Mem    *GuestMemory
	Notify Notifier
	// Log, when it holds a log, records every write of a completion to guest memory (read data,
	// GET_ID data, status byte) before the completion is published.
	Log *DirtyLogger

	mu       sync.Mutex     // serialises used-ring pushes from the lanes
	inflight sync.WaitGroup // popped and not yet pushed to the used ring
	active   atomic.Int32   // the same count, readable: see submit
	chain    DescChain      // scratch for the popping goroutine
	// notifyDue: a request the popping goroutine completed itself (run
	// inline) needs an interrupt, which is sent once, at the end of its
	// turn (or before a flush waits): one call for a batch of completions.
	// Only the popping goroutine touches it.
	notifyDue bool
}

// sendDueNotify sends the interrupt that inline completions asked for.
func (q *Queue) sendDueNotify() {
	if q.notifyDue {
		q.notifyDue = false
		if q.Notify != nil {
			q.Notify.Notify()
		}
	}
}

// Drain waits until every request popped from q has been completed. Call it
// only after the popping goroutine has stopped.
func (q *Queue) Drain() { q.inflight.Wait() }

// Pending reports whether the driver has made buffers available that were not
// popped yet. Only the popping goroutine may call it. A fault on guest memory
// reports true: ProcessQueue then finds the fault and breaks the queue.
func (q *Queue) Pending() (pending bool) {
	var err error
	defer func() {
		if err != nil {
			pending = true
		}
	}()
	defer catchFault(debug.SetPanicOnFault(true), &err)
	return q.Ring.Pending()
}

// Poll watches q's available ring for up to d, with the driver's kicks
// turned off (VRING_USED_F_NO_NOTIFY, or avail_event held back with
// EVENT_IDX), so that a driver submitting again soon after a completion
// makes no system call, and neither does the device. It returns true as soon
// as buffers are available, notifications still off: the caller processes
// the queue (ProcessQueue turns them on again when the ring is empty). After
// d, or once stop reports true, notifications are turned on again and it
// returns whether buffers came meanwhile. Only the popping goroutine may call
// it. A fault on guest memory returns true too: ProcessQueue then finds it.
func (q *Queue) Poll(d time.Duration, stop func() bool) (found bool) {
	var err error
	defer func() {
		if err != nil {
			found = true
		}
	}()
	defer catchFault(debug.SetPanicOnFault(true), &err)
	q.Ring.DisableNotify()
	end := time.Now().Add(d)
	for i := 0; ; i++ {
		if q.Ring.Pending() {
			return true
		}
		// The clock and the stop flag are read every few checks only: a
		// check of the ring is one load.
		if i%16 == 15 && (stop() || time.Now().After(end)) {
			break
		}
	}
	return q.Ring.EnableNotify()
}

// BlkDevice is a virtio-blk device over a backend engine. One BlkDevice serves
// all queues of one export.
type BlkDevice struct {
	engine *backend.Engine
	cfg    BlkConfig
	log    *logrus.Entry
	glog   *LimitedLog // bad requests from the guest
	slog   *LimitedLog // failed store operations

	mu        sync.Mutex
	features  uint64 // acknowledged by the driver
	writeback bool   // current cache mode as the guest sees it

	capacity atomic.Uint64 // bytes; changes with SetCapacity (a live resize)

	pool sync.Pool

	// errs counts completions by error status (indexed by BlkSIOErr,
	// BlkSUnsupp; BlkSOK is not counted, to keep successes free of a shared
	// atomic).
	errs [BlkSUnsupp + 1]atomic.Uint64
}

// NewBlkDevice returns a device presenting cfg over engine.
func NewBlkDevice(engine *backend.Engine, cfg BlkConfig, log *logrus.Entry) *BlkDevice {
	if cfg.BlockSize == 0 {
		cfg.BlockSize = SectorSize
	}
	d := &BlkDevice{engine: engine, cfg: cfg, log: log, glog: NewLimitedLog(log, logrus.WarnLevel, "guest errors"),
		slog: NewLimitedLog(log, logrus.ErrorLevel, "storage errors"), writeback: cfg.Writeback}
	d.capacity.Store(cfg.Capacity)
	d.pool.New = func() any { return &blkReq{dev: d} }
	engine.SetWriteThrough(!cfg.Writeback)
	return d
}

// Config returns the device's configuration.
func (d *BlkDevice) Config() BlkConfig {
	cfg := d.cfg
	cfg.Capacity = d.capacity.Load()
	return cfg
}

// SetCapacity changes the disk size the guest sees (a live resize): requests
// are checked against it from now on, and the config space shows it. The
// caller resizes the store first when growing, and tells the front-end
// (vhostuser.Server.NotifyConfigChange) so that the guest re-reads it.
func (d *BlkDevice) SetCapacity(bytes uint64) {
	d.capacity.Store(bytes / uint64(d.cfg.BlockSize) * uint64(d.cfg.BlockSize))
}

// Sync drains the engine and syncs the store (the flush barrier, not
// counted as a guest flush): vhostuser calls it when the front-end stopped
// the device. A failed sync stays failed, as for guest flushes.
func (d *BlkDevice) Sync() error { return d.engine.Sync() }

// Engine returns the backend engine.
func (d *BlkDevice) Engine() *backend.Engine { return d.engine }

// Errors is how many requests the device has completed with the error status
// status (BlkSIOErr or BlkSUnsupp): bad requests from the guest, failed store
// operations and failed flushes alike. Successful completions are not
// counted (the engine's Stats count operations): for BlkSOK, and any other
// status, it returns 0.
func (d *BlkDevice) Errors(status uint8) uint64 {
	if status == BlkSOK || int(status) >= len(d.errs) {
		return 0
	}
	return d.errs[status].Load()
}

// Features are the device feature bits offered to the driver.
func (d *BlkDevice) Features() uint64 { return d.cfg.Features() }

// SetFeatures records the features the driver acknowledged and sets the cache
// mode that follows from them: without VIRTIO_BLK_F_FLUSH the driver cannot
// flush, so every write must be durable on completion.
func (d *BlkDevice) SetFeatures(f uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.features = f & d.cfg.Features()
	d.writeback = d.cfg.Writeback
	d.engine.SetWriteThrough(!d.writeback || d.features&(1<<BlkFFlush) == 0)
}

// ReadConfig returns n bytes of the config space from offset off; bytes
// beyond the structure read as zero.
func (d *BlkDevice) ReadConfig(off, n uint32) []byte {
	d.mu.Lock()
	cfg := d.cfg
	cfg.Capacity = d.capacity.Load()
	space := cfg.space(d.writeback)
	d.mu.Unlock()
	out := make([]byte, n)
	if off < uint32(len(space)) {
		copy(out, space[off:])
	}
	return out
}

// WriteConfig handles a driver write to the config space. Only the writeback
// byte is writable, and only with VIRTIO_BLK_F_CONFIG_WCE.
func (d *BlkDevice) WriteConfig(off uint32, data []byte) error {
	if off != cfgWriteback || len(data) != 1 {
		return fmt.Errorf("config write at offset %d length %d: only the writeback byte is writable", off, len(data))
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.features&(1<<BlkFConfigWCE) == 0 {
		return errors.New("config write to writeback without VIRTIO_BLK_F_CONFIG_WCE")
	}
	wb := data[0] != 0
	if wb == d.writeback {
		return nil
	}
	if !wb {
		// Switching to write through: make what was cached durable first,
		// so that "write through" holds for earlier writes too.
		if err := d.engine.Flush(); err != nil {
			d.log.WithError(err).Error("flush on switch to write-through failed")
		}
	}
	d.writeback = wb
	d.engine.SetWriteThrough(!wb || d.features&(1<<BlkFFlush) == 0)
	d.log.WithField("write_cache", cacheMode(wb)).Info("guest changed the write cache mode")
	return nil
}

func cacheMode(writeback bool) string {
	if writeback {
		return "writeback"
	}
	return "writethrough"
}

// A queue's turn (one call of ProcessQueue) ends after turnRequests requests
// or turnDescs descriptors walked, whichever comes first, as Linux vhost's
// vhost_exceeds_weight does: a guest that keeps its ring full cannot hold
// the queue's goroutine, and with it GET_VRING_BASE, SIGTERM or a reload,
// for longer than one turn. Descriptors are the parsing work, which a guest
// can make large per request (up to a 32768-entry indirect table per chain).
const (
	turnRequests = 256
	turnDescs    = 1 << 16
)

// chainLimits are what the device advertises in its config space: a
// request has at most blkSegMax data segments plus the header and the
// status descriptors, and no descriptor is longer than blkSizeMax. The
// limits hold whether or not the driver acknowledged VIRTIO_BLK_F_SEG_MAX
// and VIRTIO_BLK_F_SIZE_MAX: they bound the memory one request costs.
var chainLimits = ChainLimits{MaxSegs: blkSegMax + 2, MaxSegLen: blkSizeMax}

// ProcessQueue pops and starts the available requests of q, for one turn.
// It returns nil when the ring is empty and notifications are re-enabled,
// or when the turn's budget is spent with requests still available: then
// notifications stay off, q.Pending() is true, and the caller must call
// again soon (after looking at its stop requests), since no kick may come
// for those requests. An error means the ring is broken and must not be
// touched again.
func (d *BlkDevice) ProcessQueue(q *Queue) (err error) {
	defer catchFault(debug.SetPanicOnFault(true), &err)
	// The completions of this turn's inline requests are on the used ring
	// already; their interrupt goes before the goroutine waits again.
	defer q.sendDueNotify()
	requests, descs := 0, 0
	for {
		q.Ring.DisableNotify()
		for {
			if requests >= turnRequests || descs >= turnDescs {
				if q.Ring.Pending() {
					return nil // the turn is over; Pending stays true
				}
				// The ring ran empty just as the turn ended: kicks go on
				// again below, or the driver's next request would find
				// them off and no one would pop it.
				break
			}
			head, ok, err := q.Ring.Next()
			if err != nil {
				return err
			}
			if !ok {
				break
			}
			requests++
			walked, err := d.start(q, head)
			descs += walked
			if err != nil {
				return err
			}
		}
		// The interrupt first: a driver that submits again at once finds
		// kicks still off if the caller polls the ring next (Poll).
		q.sendDueNotify()
		if !q.Ring.EnableNotify() {
			return nil
		}
	}
}

// blkReq is one request in flight. It is pooled: nothing on the hot path
// allocates once the pool is warm.
type blkReq struct {
	dev     *BlkDevice
	q       *Queue
	head    uint16
	blk     BlkRequest
	io      backend.Request
	written uint32 // bytes of In to report on success
	segs    []DiscardSegment
	// inline: the queue's goroutine runs r itself (RunInline), so that its
	// interrupt can wait for the end of the turn (Queue.notifyDue).
	inline bool
}

// start handles one popped chain and returns how many descriptors it
// walked. Problems in the request become an error status; only a chain that
// cannot be answered at all breaks the queue.
func (d *BlkDevice) start(q *Queue, head uint16) (walked int, err error) {
	err = q.Ring.ReadChainLimited(head, &q.chain, chainLimits)
	walked = q.chain.Walked
	over := errors.Is(err, ErrChainLimit)
	if err != nil && !over {
		return walked, err
	}
	r := d.pool.Get().(*blkReq)
	r.q, r.head, r.written = q, head, 0
	q.inflight.Add(1)
	q.active.Add(1)
	if err := d.dispatch(q, r, over, err); err != nil {
		// r was neither finished nor handed to the engine (a fault on
		// guest memory, or no status byte to answer with): it must not
		// stay counted, or Drain (GET_VRING_BASE) would wait for it
		// forever.
		r.q = nil
		d.pool.Put(r)
		q.active.Add(-1)
		q.inflight.Done()
		return walked, err
	}
	return walked, nil
}

// dispatch parses r from q.chain and starts it, or finishes it with an
// error status. It returns an error only when it did neither: the request
// has no status byte, or touching guest memory faulted (caught here, so that
// start can uncount r). overErr is the ErrChainLimit of a chain beyond the
// advertised limits, whose only segment is its last descriptor.
func (d *BlkDevice) dispatch(q *Queue, r *blkReq, over bool, overErr error) (err error) {
	defer catchFault(debug.SetPanicOnFault(true), &err)
	if over {
		// Answered without parsing: IOERR in the chain's last byte if the
		// device may write it.
		last := q.chain.Segs[0]
		r.blk = BlkRequest{Out: r.blk.Out[:0], In: r.blk.In[:0], outBuf: r.blk.outBuf}
		if !last.Write || last.Len == 0 {
			return fmt.Errorf("%w: %w, and no status byte", ErrBadRequest, overErr)
		}
		status, err := q.Mem.Slice(last.Addr+uint64(last.Len)-1, 1)
		if err != nil {
			return fmt.Errorf("%w: status byte: %w", ErrBadRequest, err)
		}
		r.blk.Status = status
		d.guestError(q, r, overErr)
		d.finish(r, BlkSIOErr)
		return nil
	}
	if err := ParseBlkRequest(q.Mem, q.chain.Segs, &r.blk); err != nil {
		if r.blk.Status == nil {
			return err // no status byte: nothing we can answer
		}
		d.guestError(q, r, err)
		d.finish(r, BlkSIOErr)
		return nil
	}
	switch r.blk.Type {
	case BlkTIn, BlkTOut:
		d.startRW(r)
	case BlkTFlush:
		// The flush runs on this queue's goroutine: later requests of this
		// queue wait for it, and the barrier holds those of other queues.
		// The driver hears of what completed before it first.
		q.sendDueNotify()
		err := d.engine.Flush()
		if err != nil {
			d.slog.Log(logrus.Fields{"queue": q.Index, "error": err.Error()}, "flush failed")
		}
		d.finish(r, StatusFor(err))
	case BlkTGetID:
		d.getID(r)
	case BlkTDiscard, BlkTWriteZeroes:
		d.startDiscard(r)
	default:
		d.finish(r, BlkSUnsupp)
	}
	return nil
}

// checkRange validates a byte range given in 512-byte sectors against the
// capacity and the logical block size.
func (d *BlkDevice) checkRange(sector, bytes uint64) error {
	capSectors := d.capacity.Load() / SectorSize
	lbs := uint64(d.cfg.BlockSize)
	switch {
	case sector > capSectors || bytes/SectorSize > capSectors-sector:
		return fmt.Errorf("%w: sector %d + %d bytes beyond capacity of %d sectors", ErrBadRequest, sector, bytes, capSectors)
	case (sector*SectorSize)%lbs != 0 || bytes%lbs != 0:
		return fmt.Errorf("%w: sector %d length %d not aligned to the %d-byte block size", ErrBadRequest, sector, bytes, lbs)
	}
	return nil
}

func (d *BlkDevice) startRW(r *blkReq) {
	op, bufs, n := backend.OpRead, r.blk.In, r.blk.InLen
	if r.blk.Type == BlkTOut {
		op, bufs, n = backend.OpWrite, r.blk.Out, r.blk.OutLen
	}
	// Data in the wrong direction (a write whose data the device may write, a read whose data the
	// device may only read) is a malformed request: answering OK would tell the guest that data
	// was written, or read, which was not.
	if (op == backend.OpWrite && r.blk.InLen > 0) || (op == backend.OpRead && r.blk.OutLen > 0) {
		d.guestError(r.q, r, fmt.Errorf("%w: %v request with %d bytes of data in the wrong direction", ErrBadRequest, op, max(r.blk.InLen, r.blk.OutLen)))
		d.finish(r, BlkSIOErr)
		return
	}
	if op == backend.OpWrite {
		if d.cfg.ReadOnly {
			d.guestError(r.q, r, errors.New("write to a read-only disk"))
			d.finish(r, BlkSIOErr)
			return
		}
	}
	if err := d.checkRange(r.blk.Sector, n); err != nil {
		d.guestError(r.q, r, err)
		d.finish(r, BlkSIOErr)
		return
	}
	if op == backend.OpRead {
		r.written = uint32(min(n, 1<<32-2))
	}
	r.io = backend.Request{Op: op, Offset: int64(r.blk.Sector * SectorSize), Bufs: bufs, Done: r}
	d.submit(r)
}

func (d *BlkDevice) startDiscard(r *blkReq) {
	op := backend.OpDiscard
	if r.blk.Type == BlkTWriteZeroes {
		op = backend.OpWriteZeroes
	}
	if d.cfg.ReadOnly || !d.cfg.Discard {
		d.finish(r, BlkSUnsupp)
		return
	}
	var err error
	r.segs, err = r.blk.DiscardSegments(r.segs[:0], maxDiscardSegs)
	if err != nil {
		d.guestError(r.q, r, err)
		d.finish(r, BlkSIOErr)
		return
	}
	s := r.segs[0]
	unmap := s.Flags&discardFlagUnmap != 0
	// Unknown flags, or unmap on a plain discard: UNSUPP (virtio 1.2 5.2.6.2).
	if s.Flags&^discardFlagUnmap != 0 || (op == backend.OpDiscard && unmap) {
		d.finish(r, BlkSUnsupp)
		return
	}
	if s.NumSectors > maxDiscardSector {
		d.guestError(r.q, r, fmt.Errorf("%w: %d sectors in one segment", ErrBadRequest, s.NumSectors))
		d.finish(r, BlkSIOErr)
		return
	}
	bytes := uint64(s.NumSectors) * SectorSize
	if err := d.checkRange(s.Sector, bytes); err != nil {
		d.guestError(r.q, r, err)
		d.finish(r, BlkSIOErr)
		return
	}
	r.io = backend.Request{Op: op, Offset: int64(s.Sector * SectorSize), Length: int64(bytes), Unmap: unmap, Done: r}
	d.submit(r)
}

func (d *BlkDevice) getID(r *blkReq) {
	var id [BlkIDBytes]byte
	copy(id[:], d.cfg.Serial)
	n := min(r.blk.InLen, BlkIDBytes)
	src := id[:n]
	for _, b := range r.blk.In {
		if len(src) == 0 {
			break
		}
		c := copy(b, src)
		src = src[c:]
	}
	r.written = uint32(n)
	d.finish(r, BlkSOK)
}

// Complete implements backend.Completer: a lane finished r.io.
func (r *blkReq) Complete(io *backend.Request) {
	d := r.dev
	if io.Err != nil {
		d.slog.Log(logrus.Fields{"queue": r.q.Index, "op": io.Op.String(), "offset": io.Offset, "error": io.Err.Error()},
			"store operation failed")
	}
	d.finish(r, StatusFor(io.Err))
}

// finish writes the status byte, publishes the used element and interrupts
// the driver if it asked for it.
func (d *BlkDevice) finish(r *blkReq, status uint8) {
	q := r.q
	written := uint32(1)
	if status == BlkSOK {
		written += r.written
	} else if int(status) < len(d.errs) {
		d.errs[status].Add(1)
	}
	notify, err := q.publish(r, status, written)
	if err != nil {
		d.log.WithError(err).WithField("queue", q.Index).Error("cannot complete a request: the front-end's memory is gone")
	}
	switch {
	case notify && r.inline:
		q.notifyDue = true // sent at the end of the turn (ProcessQueue)
	case notify && q.Notify != nil:
		q.Notify.Notify()
	}
	r.q, r.inline = nil, false
	r.io = backend.Request{}
	d.pool.Put(r)
	q.active.Add(-1)
	q.inflight.Done()
}

// submit hands r.io to the engine. While the store is fast, the queue's
// goroutine runs it itself (RunInline): handing a page-cache read to a lane
// costs more CPU than the read (a goroutine wake-up, the scheduler's
// spinning), and the completions of a turn share one interrupt. When the
// store is slow, the lanes run requests in parallel, and the queue's
// goroutine goes on popping.
func (d *BlkDevice) submit(r *blkReq) {
	r.inline = true
	if d.engine.RunInline(&r.io) {
		return // r is finished, and back in the pool
	}
	r.inline = false
	d.engine.Submit(&r.io)
}

// publish writes r's status byte and puts it on the used ring. It runs on the lane that finished
// the request (or the queue's goroutine), so a fault on guest memory is caught here too.
func (q *Queue) publish(r *blkReq, status uint8, written uint32) (notify bool, err error) {
	defer catchFault(debug.SetPanicOnFault(true), &err)
	r.blk.Status[0] = status
	if l := q.Log.Load(); l != nil {
		q.logCompletion(l, r)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	q.Ring.PushUsed(r.head, written)
	return q.Ring.NeedInterrupt(), nil
}

// logCompletion marks the pages a request's completion wrote: the device-writable buffers (read
// data, GET_ID data, whatever the store wrote into them) and the status byte. All of them are
// logged whatever was written: a page logged and not written is only sent twice.
func (q *Queue) logCompletion(l *DirtyLog, r *blkReq) {
	if !skipDataLog {
		for _, b := range r.blk.In {
			q.Mem.markDirty(l, b)
		}
	} else {
		q.noteSkipped(l, r)
	}
	q.Mem.markDirty(l, r.blk.Status)
}

func (d *BlkDevice) guestError(q *Queue, r *blkReq, err error) {
	d.glog.Log(logrus.Fields{"queue": q.Index, "type": r.blk.Type, "sector": r.blk.Sector, "error": err.Error()},
		"bad request from the guest")
}
