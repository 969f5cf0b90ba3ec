package crash

import (
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

const (
	diskSize  = 8 << 20 // small, so that random writes overlap often
	maxSector = diskSize / SectorSize
)

// slowStore delays every write by a random few hundred microseconds, so that writes are still
// running when flushes arrive: without it a barrier that syncs before draining would rarely have
// anything to miss.
type slowStore struct {
	*backend.CrashStore
}

func (s slowStore) WriteAt(bufs [][]byte, off int64) error {
	time.Sleep(time.Duration(rand.IntN(400)) * time.Microsecond)
	return s.CrashStore.WriteAt(bufs, off)
}

// memoryStore wraps the CrashStore without slowing it, for the runs where the engine runs a
// queue's only request on the queue's goroutine (Engine.SubmitIdle) instead of a lane.
type memoryStore struct {
	*backend.CrashStore
}

// rig is the whole stack over a crashable store: a vhost-user server with a virtio-blk device on
// an engine with lanes, and the test front-end connected to it through a unix socket.
type rig struct {
	store  *backend.CrashStore
	engine *backend.Engine
	dev    *frontend.Device
	hist   *History
	qmu    []sync.Mutex // orders History records with the available ring, per queue
}

type rigConfig struct {
	lanes, queues int
	// writeThrough: "config" exports with --write-cache writethrough; "wce" has the driver switch
	// to write through via the config space; "" is write back.
	writeThrough string
	unsafe       backend.UnsafeMode // a broken barrier (Safe: the real one)
	// flushHeavy: as many flushes as writes, and many reads, so that flushes often find
	// nothing written since the last sync and skip it (the write generation).
	flushHeavy bool
	// inline: one request in flight per queue on a fast store, so that requests run on the
	// queues' goroutines (SubmitIdle), not on lanes.
	inline bool
	// throttle: the export has I/O limits (a write IOPS limit with a burst), so that requests
	// wait in the throttle's queue, admitted through the barrier, before they reach a lane. With
	// inline, the queues call SubmitIdle, which must then go through the throttle too.
	throttle bool
	// packed: the queues are packed rings (VIRTIO_F_RING_PACKED), completed out of order.
	packed bool
}

func (c rigConfig) String() string {
	s := fmt.Sprintf("lanes=%d/queues=%d", c.lanes, c.queues)
	if c.writeThrough != "" {
		s += "/writethrough-" + c.writeThrough
	}
	if c.unsafe != backend.Safe {
		s += "/" + c.unsafe.String()
	}
	if c.flushHeavy {
		s += "/flush-heavy"
	}
	if c.inline {
		s += "/inline-qd1"
	}
	if c.throttle {
		s += "/limited"
	}
	if c.packed {
		s += "/packed"
	}
	return s
}

func startRig(t *testing.T, c rigConfig) *rig {
	t.Helper()
	store := backend.NewCrashStore(diskSize)
	var wrapped backend.Store = slowStore{store}
	if c.inline {
		wrapped = memoryStore{store}
	}
	engine := backend.NewEngine(wrapped, c.lanes)
	if c.inline {
		// The crash store (with the race detector) is not as fast as a page cache: let the
		// engine count it as fast.
		engine.SetInlineLimit(time.Second)
	}
	engine.Barrier().SetUnsafe(c.unsafe)
	if c.throttle {
		engine.SetThrottle(backend.NewThrottle(backend.Limits{
			IOPSWrite: backend.Rate{Avg: 3000, Max: 6000, MaxLength: time.Second},
			BPS:       backend.Rate{Avg: 16 << 20},
		}))
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{
		Capacity: diskSize, BlockSize: 512, PhysicalBlockSize: 512, NumQueues: uint16(c.queues),
		Serial: "crash", Writeback: c.writeThrough != "config", Discard: true, Packed: c.packed,
	}, log.WithField("export", "crash"))
	srv := vhostuser.NewServer(dev, c.queues, log.WithField("export", "crash"))
	sock := filepath.Join(t.TempDir(), "crash.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	fd, err := frontend.Connect(sock, frontend.Options{NumQueues: c.queues, QueueSize: 128, EventIdx: true, MemSize: 128 << 20, Packed: c.packed})
	if err != nil {
		t.Fatal(err)
	}
	if c.packed != (fd.Features()&(1<<virtio.FRingPacked) != 0) {
		t.Fatalf("%v: features %#x", c, fd.Features())
	}
	if c.writeThrough == "wce" {
		if err := fd.SetWriteback(false); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := fd.Config()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Writeback != (c.writeThrough == "") {
		t.Fatalf("config writeback = %v for %v", cfg.Writeback, c)
	}
	r := &rig{store: store, engine: engine, dev: fd, hist: NewHistory(), qmu: make([]sync.Mutex, c.queues)}
	t.Cleanup(func() {
		fd.Close()
		srv.Close()
		<-served
		engine.Close()
	})
	return r
}

// write submits one write of random data on queue q, recording it in the history in the order
// it enters the available ring.
func (r *rig) write(q int, sector, sectors uint64) (*frontend.Pending, error) {
	buf := make([]byte, sectors*SectorSize)
	r.qmu[q].Lock()
	defer r.qmu[q].Unlock()
	w := r.hist.StartWrite(q, sector, sectors)
	SectorData(buf, w.ID, sector)
	return r.dev.Queue(q).Submit(frontend.Request{Type: virtio.BlkTOut, Sector: sector, Out: buf,
		OnComplete: func(res frontend.Result) {
			if res.Err == nil {
				r.hist.WriteDone(w)
			}
		}})
}

func (r *rig) flush(q int) (*frontend.Pending, error) {
	r.qmu[q].Lock()
	defer r.qmu[q].Unlock()
	f := r.hist.StartFlush(q)
	return r.dev.Queue(q).Submit(frontend.Request{Type: virtio.BlkTFlush,
		OnComplete: func(res frontend.Result) { r.hist.FlushDone(f, res.Err == nil) }})
}

func (r *rig) read(q int, sector, sectors uint64) (*frontend.Pending, error) {
	r.qmu[q].Lock()
	defer r.qmu[q].Unlock()
	r.hist.SkipQueueSlot(q)
	return r.dev.Queue(q).Submit(frontend.ReadRequest(sector, int(sectors*SectorSize)))
}

// randomSectors picks a request of 512 B to 1 MiB, mostly small, anywhere on the disk.
func randomSectors(rng *rand.Rand) (sector, sectors uint64) {
	sectors = 1 + rng.Uint64N(1<<rng.IntN(12)) // 1..2048 sectors, log-uniform
	sector = rng.Uint64N(maxSector - sectors + 1)
	return sector, sectors
}

// crashRun drives random concurrent I/O from several goroutines and takes up to crashPoints crash
// images while it runs (stopping at the first bad one if untilBad); it returns the number of crash
// points taken, how many had violations, and the first violations seen.
func crashRun(t *testing.T, c rigConfig, seed uint64, crashPoints int, untilBad bool) (points, bad int, examples []string, ops int64) {
	r := startRig(t, c)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var nops atomic.Int64
	var ioErr atomic.Value
	workers, depth := max(2*c.queues, 4), 6
	if c.inline {
		workers, depth = c.queues, 0 // one goroutine per queue, each waiting for every request
	}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(w)))
			var inflight []*frontend.Pending
			for {
				select {
				case <-stop:
					for _, p := range inflight {
						p.Wait()
					}
					return
				default:
				}
				q := rng.IntN(c.queues)
				if c.inline {
					q = w
				}
				var p *frontend.Pending
				var err error
				sector, sectors := randomSectors(rng)
				writes, reads := 70, 88 // percentages: writes, then reads, then flushes
				if c.flushHeavy {
					writes, reads = 30, 60
				}
				switch k := rng.IntN(100); {
				case k < writes:
					p, err = r.write(q, sector, sectors)
				case k < reads:
					p, err = r.read(q, sector, sectors)
				default:
					p, err = r.flush(q)
				}
				if err != nil {
					ioErr.Store(err)
					return
				}
				nops.Add(1)
				inflight = append(inflight, p)
				// Keep up to depth requests in flight per goroutine; wait for the oldest beyond that.
				if len(inflight) > depth || rng.IntN(8) == 0 {
					res := inflight[0].Wait()
					inflight = inflight[1:]
					if res.Err != nil {
						ioErr.Store(res.Err)
						return
					}
				}
			}
		}(w)
	}
	crng := rand.New(rand.NewPCG(seed, 1<<32))
	wt := c.writeThrough != ""
	for points < crashPoints && (bad == 0 || !untilBad) {
		points++
		if untilBad {
			// Hunting a broken barrier: crash as soon as a flush has completed, when what it
			// should have made durable is most likely still unsynced.
			r.hist.WaitFlushDone(50 * time.Millisecond)
		} else {
			time.Sleep(time.Duration(2000+crng.IntN(8000)) * time.Microsecond)
		}
		before := r.hist.Now()
		img := r.store.Crash(crng)
		after := r.hist.Now()
		writes, flushes := r.hist.Snapshot()
		if v := Check(img, writes, flushes, before, after, wt); len(v) > 0 {
			bad++
			if len(examples) < 3 {
				examples = append(examples, fmt.Sprintf("crash point %d: %d bad sectors, first %v", points, len(v), v[0]))
			}
		}
	}
	close(stop)
	wg.Wait()
	if err := ioErr.Load(); err != nil {
		t.Fatalf("%v: I/O failed: %v", c, err)
	}
	// The store must have seen the flushes: a run without syncs would prove nothing in write-back.
	if r.store.Syncs() == 0 {
		t.Fatalf("%v: no sync reached the store", c)
	}
	if n := r.engine.Barrier().SkippedSyncs(); c.flushHeavy && c.unsafe == backend.Safe && n == 0 {
		t.Fatalf("%v: no flush skipped its sync", c)
	} else if c.flushHeavy {
		t.Logf("%v: %d of %d flushes skipped the sync, %d syncs", c, n, r.engine.Stats.Flushes.Load(), r.store.Syncs())
	}
	if n := r.engine.Stats.Inline.Load(); c.inline && c.throttle && n > 0 {
		// With limits, SubmitIdle goes through the throttle like Submit.
		t.Fatalf("%v: %d requests ran inline past the limits", c, n)
	} else if c.inline && !c.throttle && n == 0 {
		t.Fatalf("%v: no request ran inline", c)
	} else if c.inline {
		t.Logf("%v: %d of %d reads and writes ran inline", c, n, r.engine.Stats.Reads.Load()+r.engine.Stats.Writes.Load())
	}
	return points, bad, examples, nops.Load()
}

// TestCrashConsistency is the randomized crash checker: at least 200 crash points across lane
// counts 1, 2, 8 and queue counts 1, 2, 4 in write-back mode, plus write-through by config and
// by the driver's WCE switch. No crash image may lose a write that a completed flush covered.
func TestCrashConsistency(t *testing.T) {
	perConfig := 20
	if testing.Short() {
		perConfig = 4
	}
	var configs []rigConfig
	for _, lanes := range []int{1, 2, 8} {
		for _, queues := range []int{1, 2, 4} {
			configs = append(configs, rigConfig{lanes: lanes, queues: queues})
		}
	}
	for _, wt := range []string{"config", "wce"} {
		configs = append(configs, rigConfig{lanes: 2, queues: 2, writeThrough: wt}, rigConfig{lanes: 8, queues: 4, writeThrough: wt})
	}
	configs = append(configs, rigConfig{lanes: 2, queues: 4, inline: true}, rigConfig{lanes: 2, queues: 2, writeThrough: "config", inline: true})
	configs = append(configs, rigConfig{lanes: 2, queues: 4, throttle: true}, rigConfig{lanes: 2, queues: 2, inline: true, throttle: true})
	configs = append(configs, rigConfig{lanes: 8, queues: 4, packed: true}, rigConfig{lanes: 2, queues: 2, inline: true, packed: true})
	configs = append(configs, rigConfig{lanes: 8, queues: 4, flushHeavy: true}, rigConfig{lanes: 2, queues: 2, inline: true, flushHeavy: true},
		rigConfig{lanes: 2, queues: 4, flushHeavy: true, throttle: true})
	total, totalOps := 0, int64(0)
	start := time.Now()
	for i, c := range configs {
		t.Run(c.String(), func(t *testing.T) {
			_, bad, examples, ops := crashRun(t, c, uint64(i+1), perConfig, false)
			total += perConfig
			totalOps += ops
			if bad > 0 {
				t.Errorf("%d of %d crash images lost acknowledged data: %v", bad, perConfig, examples)
			}
		})
	}
	t.Logf("checked %d crash points in %d configurations (%d requests) in %v", total, len(configs), totalOps, time.Since(start).Round(time.Millisecond))
}

// TestCrashCheckerCatchesSyncBeforeDrain runs the same checker against a barrier that syncs
// before draining (the loop-driver bug) until a crash image shows it: it must be caught.
// A crash point catches it only when it falls between such a flush and the next sync and the
// crash drops a write the flush should have covered, so the crash points follow completed flushes.
// The same goes for a barrier that skips the sync when no write completed since the last one but
// some are still in flight (the write generation read before the drain).
func TestCrashCheckerCatchesSyncBeforeDrain(t *testing.T) {
	const maxPoints = 600
	sbd, skip := backend.UnsafeSyncBeforeDrain, backend.UnsafeSkipInflight
	for i, c := range []rigConfig{{lanes: 8, queues: 4, unsafe: sbd}, {lanes: 2, queues: 1, unsafe: sbd}, {lanes: 2, queues: 4, unsafe: sbd, throttle: true},
		{lanes: 8, queues: 4, unsafe: sbd, packed: true}, {lanes: 8, queues: 4, unsafe: skip, flushHeavy: true}} {
		t.Run(c.String(), func(t *testing.T) {
			points, bad, examples, _ := crashRun(t, c, uint64(100+i), maxPoints, true)
			if bad == 0 {
				t.Fatalf("a barrier that is %v passed %d crash points", c.unsafe, points)
			}
			t.Logf("caught after %d crash points: %s", points, examples[0])
		})
	}
}
