package vhostuser_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// Full-stack tests: vhostuser.Server over virtio.BlkDevice over
// backend.Engine over a store, driven by the test front-end through the
// socket.

const (
	diskSize   = 16 << 20
	diskQueues = 4
	serial     = "vublk-test-serial"
	// guard bounds waits that only a deadlock could make long.
	guard = 2 * time.Minute
)

type exportOptions struct {
	readOnly  bool
	writeback bool
	store     backend.Store // default: a FileStore in a temporary directory
	packed    bool          // offer VIRTIO_F_RING_PACKED
	pollMax   time.Duration // > 0: the ring is polled for up to this long (SetPollMax)
}

type export struct {
	sock   string
	engine *backend.Engine
}

// newExport serves a disk as cmd/vublk does and stops it when the test
// ends.
func newExport(t *testing.T, o exportOptions) *export {
	t.Helper()
	store := o.store
	if store == nil {
		path := filepath.Join(t.TempDir(), "disk.img")
		fs, err := backend.OpenFile(path, backend.FileOptions{CreateSize: diskSize})
		if err != nil {
			t.Fatal(err)
		}
		if o.readOnly {
			fs.Close()
			if fs, err = backend.OpenFile(path, backend.FileOptions{ReadOnly: true}); err != nil {
				t.Fatal(err)
			}
		}
		store = fs
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	entry := log.WithField("export", t.Name())
	engine := backend.NewEngine(store, 4)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{
		Capacity: uint64(store.Size()), BlockSize: 512, NumQueues: diskQueues, ReadOnly: o.readOnly,
		Serial: serial, Writeback: o.writeback, Discard: !o.readOnly, Packed: o.packed,
	}, entry)
	// A short directory: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "vublk")
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := vhostuser.NewServer(dev, diskQueues, entry)
	if o.pollMax > 0 {
		srv.SetPollMax(o.pollMax)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		if err := engine.Close(); err != nil {
			t.Errorf("engine close: %v", err)
		}
		store.Close()
		os.RemoveAll(dir)
	})
	return &export{sock: sock, engine: engine}
}

func connect(t *testing.T, e *export, opt frontend.Options) *frontend.Device {
	t.Helper()
	d, err := frontend.Connect(e.sock, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// wait waits for p; the guard only turns a deadlock into a failure.
func wait(t *testing.T, p *frontend.Pending) frontend.Result {
	t.Helper()
	select {
	case <-p.Done():
		return p.Wait()
	case <-time.After(guard):
		t.Fatal("request did not complete")
		return frontend.Result{}
	}
}

func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x76626c6b))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func TestConfig(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{})
	cfg, err := d.Config()
	if err != nil {
		t.Fatal(err)
	}
	want := frontend.Config{
		Capacity: diskSize / 512, SizeMax: 4 << 20, SegMax: 254, BlkSize: 512, Writeback: true,
		NumQueues: diskQueues, MaxDiscardSectors: 1 << 22, MaxDiscardSeg: 1, DiscardAlignment: 1,
		MaxWriteZeroesSectors: 1 << 22, MaxWriteZeroesSeg: 1, WriteZeroesMayUnmap: true,
	}
	if cfg != want {
		t.Fatalf("config\n got %+v\nwant %+v", cfg, want)
	}
	if d.MaxQueues() != diskQueues {
		t.Fatalf("GET_QUEUE_NUM %d, want %d", d.MaxQueues(), diskQueues)
	}
	for _, bit := range []int{virtio.FVersion1, virtio.BlkFFlush, virtio.BlkFConfigWCE, virtio.BlkFMQ, virtio.BlkFDiscard, virtio.BlkFWriteZeroes} {
		if d.Features()&(1<<bit) == 0 {
			t.Errorf("feature bit %d not negotiated (features %#x)", bit, d.Features())
		}
	}
	if d.Features()&(1<<virtio.BlkFRO) != 0 {
		t.Error("read-write export offers VIRTIO_BLK_F_RO")
	}
}

func TestReadWrite(t *testing.T) {
	cases := []struct {
		name string
		opt  frontend.Options
	}{
		{"one queue", frontend.Options{}},
		{"four queues", frontend.Options{NumQueues: 4}},
		{"event idx and indirect", frontend.Options{NumQueues: 4, EventIdx: true, Indirect: true}},
		{"two memory regions", frontend.Options{NumQueues: 2, Regions: 2, MemSize: 8 << 20}},
		// Four entries: submitters wait for descriptors and the ring wraps.
		{"tiny queues", frontend.Options{NumQueues: 2, QueueSize: 4, MemSize: 4 << 20}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newExport(t, exportOptions{writeback: true})
			d := connect(t, e, c.opt)
			const workers, rounds, chunk = 8, 16, 8192 // chunk bytes per write
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					q := d.Queue(w % d.NumQueues())
					for r := range rounds {
						sector := uint64((w*rounds + r) * chunk / 512)
						data := pattern(uint64(w*rounds+r), chunk)
						if err := q.Write(sector, data); err != nil {
							errs <- fmt.Errorf("worker %d write: %w", w, err)
							return
						}
						got, err := q.Read(sector, chunk)
						if err != nil || !bytes.Equal(got, data) {
							errs <- fmt.Errorf("worker %d: read back differs (err %v)", w, err)
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			// Everything is visible through every queue.
			q := d.Queue(d.NumQueues() - 1)
			for i := range workers * rounds {
				got, err := q.Read(uint64(i*chunk/512), chunk)
				if err != nil || !bytes.Equal(got, pattern(uint64(i), chunk)) {
					t.Fatalf("chunk %d differs (err %v)", i, err)
				}
			}
		})
	}
}

func TestAsyncSubmitAndCallbacks(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{QueueSize: 16, EventIdx: true})
	q := d.Queue(0)
	const n = 200
	var mu sync.Mutex
	called := 0
	var ps []*frontend.Pending
	for i := range n {
		r := frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096))
		r.OnComplete = func(res frontend.Result) {
			mu.Lock()
			called++
			mu.Unlock()
		}
		p, err := q.Submit(r)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	flush, err := q.Submit(frontend.FlushRequest())
	if err != nil {
		t.Fatal(err)
	}
	if res := wait(t, flush); res.Err != nil {
		t.Fatalf("flush: %v", res.Err)
	}
	for i, p := range ps {
		if res := wait(t, p); res.Err != nil || res.Len != 1 {
			t.Fatalf("write %d: %+v", i, res)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if called != n {
		t.Fatalf("OnComplete called %d times, want %d", called, n)
	}
}

// TestFlushMakesWritesDurable submits writes and, without waiting for
// them, a flush on the same queue: once the flush completes every one of
// those writes survives any crash of the store.
func TestFlushMakesWritesDurable(t *testing.T) {
	store := backend.NewCrashStore(diskSize)
	e := newExport(t, exportOptions{writeback: true, store: store})
	d := connect(t, e, frontend.Options{NumQueues: 2})
	q := d.Queue(0)
	const n = 64
	for i := range n {
		if _, err := q.Submit(frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096))); err != nil {
			t.Fatal(err)
		}
	}
	if err := q.Flush(); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 20 {
		img := store.Crash(rng)
		for i := range n {
			if !bytes.Equal(img[i*4096:(i+1)*4096], pattern(uint64(i), 4096)) {
				t.Fatalf("write %d, submitted before an acknowledged flush, lost in a crash", i)
			}
		}
	}
	if e.engine.Stats.Snapshot().Flushes == 0 {
		t.Fatal("no flush reached the engine")
	}
}

func TestDiscardAndWriteZeroes(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{})
	q := d.Queue(0)
	zeros := make([]byte, 64<<10)
	cases := []struct {
		name string
		op   func(sector uint64, sectors uint32) error
	}{
		{"discard", q.Discard},
		{"write zeroes", func(s uint64, n uint32) error { return q.WriteZeroes(s, n, false) }},
		{"write zeroes unmap", func(s uint64, n uint32) error { return q.WriteZeroes(s, n, true) }},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sector := uint64(i) * 1024
			data := pattern(uint64(i), 3*len(zeros))
			if err := q.Write(sector, data); err != nil {
				t.Fatal(err)
			}
			// Zero the middle third; the rest keeps its data.
			if err := c.op(sector+uint64(len(zeros)/512), uint32(len(zeros)/512)); err != nil {
				t.Fatal(err)
			}
			got, err := q.Read(sector, len(data))
			if err != nil {
				t.Fatal(err)
			}
			n := len(zeros)
			if !bytes.Equal(got[:n], data[:n]) || !bytes.Equal(got[n:2*n], zeros) || !bytes.Equal(got[2*n:], data[2*n:]) {
				t.Fatal("wrong data after zeroing the middle third")
			}
		})
	}
	t.Run("discard with the unmap flag is unsupported", func(t *testing.T) {
		seg := binary.LittleEndian.AppendUint64(nil, 0)
		seg = binary.LittleEndian.AppendUint32(seg, 8)
		seg = binary.LittleEndian.AppendUint32(seg, 1)
		if err := q.Do(frontend.Request{Type: virtio.BlkTDiscard, Out: seg}).Err; !errors.Is(err, frontend.ErrUnsupported) {
			t.Fatalf("got %v, want UNSUPP", err)
		}
	})
	t.Run("unknown request type is unsupported", func(t *testing.T) {
		if err := q.Do(frontend.Request{Type: 99}).Err; !errors.Is(err, frontend.ErrUnsupported) {
			t.Fatalf("got %v, want UNSUPP", err)
		}
	})
	t.Run("read beyond capacity is an I/O error", func(t *testing.T) {
		if _, err := q.Read(diskSize/512-1, 1024); !errors.Is(err, frontend.ErrIOError) {
			t.Fatalf("got %v, want IOERR", err)
		}
	})
}

func TestGetID(t *testing.T) {
	e := newExport(t, exportOptions{})
	d := connect(t, e, frontend.Options{Indirect: true})
	id, err := d.Queue(0).GetID()
	if err != nil {
		t.Fatal(err)
	}
	if id != serial {
		t.Fatalf("serial %q, want %q", id, serial)
	}
}

func TestReadOnlyExport(t *testing.T) {
	e := newExport(t, exportOptions{readOnly: true})
	d := connect(t, e, frontend.Options{})
	if d.Features()&(1<<virtio.BlkFRO) == 0 {
		t.Fatal("read-only export without VIRTIO_BLK_F_RO")
	}
	q := d.Queue(0)
	if err := q.Write(0, make([]byte, 4096)); !errors.Is(err, frontend.ErrIOError) {
		t.Fatalf("write: got %v, want IOERR", err)
	}
	if err := q.Discard(0, 8); !errors.Is(err, frontend.ErrUnsupported) {
		t.Fatalf("discard: got %v, want UNSUPP", err)
	}
	if got, err := q.Read(0, 4096); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatalf("read: %v", err)
	}
}

func TestWriteCacheToggle(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{})
	for _, wb := range []bool{false, true, false} {
		if err := d.SetWriteback(wb); err != nil {
			t.Fatal(err)
		}
		cfg, err := d.Config()
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Writeback != wb || e.engine.WriteThrough() == wb {
			t.Fatalf("after SET_CONFIG writeback=%v: config says %v, engine write-through %v", wb, cfg.Writeback, e.engine.WriteThrough())
		}
	}
	d.Close()

	// Without VIRTIO_BLK_F_CONFIG_WCE the byte is read-only: a REPLY_ACK
	// failure, and the connection stays usable.
	d = connect(t, e, frontend.Options{DropFeatures: 1 << virtio.BlkFConfigWCE})
	if err := d.SetWriteback(false); !errors.Is(err, frontend.ErrNack) {
		t.Fatalf("SET_CONFIG without CONFIG_WCE: got %v, want a nack", err)
	}
	if err := d.Queue(0).Write(0, make([]byte, 512)); err != nil {
		t.Fatal(err)
	}
}

// TestReconnect is a VM restart: the front-end goes away and a new one
// connects to the same daemon and finds the data.
func TestReconnect(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	for i := range 3 {
		d := connect(t, e, frontend.Options{NumQueues: 1 + i})
		if i > 0 {
			got, err := d.Queue(i).Read(uint64(i-1)*8, 4096)
			if err != nil || !bytes.Equal(got, pattern(uint64(i-1), 4096)) {
				t.Fatalf("connection %d: data of connection %d lost (err %v)", i, i-1, err)
			}
		}
		if err := d.Queue(0).Write(uint64(i)*8, pattern(uint64(i), 4096)); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// expectDisconnect reads from c until the back-end closes it. A NACK may
// come first.
func expectDisconnect(t *testing.T, c *frontend.Conn) {
	t.Helper()
	for range 4 {
		r, err := c.ReadReply()
		if errors.Is(err, io.EOF) || errors.Is(err, unix.ECONNRESET) {
			return
		}
		if err != nil {
			t.Fatalf("reading: %v", err)
		}
		if r.Flags&frontend.FlagReply == 0 || len(r.Payload) != 8 || binary.LittleEndian.Uint64(r.Payload) == 0 {
			t.Fatalf("unexpected message %v flags %#x payload %x before the disconnect", r.Request, r.Flags, r.Payload)
		}
	}
	t.Fatal("the back-end kept the connection")
}

func header(req vhostuser.Request, flags, size uint32) []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(req))
	b = binary.LittleEndian.AppendUint32(b, flags)
	return binary.LittleEndian.AppendUint32(b, size)
}

// TestMalformedMessages sends each bad message on a fresh connection. The
// back-end drops the connection only where going on is unsafe (the stream
// cannot be followed, a request it cannot answer is waiting for its answer,
// a feature it does not implement would be used); a well-framed request with
// a bad value is refused and the connection goes on. Either way the next
// front-end is served.
func TestMalformedMessages(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(efd)
	const v = frontend.FlagVersion
	const closes, rejected = true, false
	u64 := func(x uint64) []byte { return binary.LittleEndian.AppendUint64(nil, x) }
	cases := []struct {
		name   string
		msg    []byte
		fds    []int
		closes bool
	}{
		{"unknown request", header(99, v|frontend.FlagNeedReply, 0), nil, closes},
		{"unsupported request (POSTCOPY_ADVISE)", header(28, v, 0), nil, closes},
		{"version 0", header(vhostuser.GetFeatures, 0, 0), nil, closes},
		{"version 2", header(vhostuser.GetFeatures, 2, 0), nil, closes},
		{"reply flag from the front-end", header(vhostuser.GetFeatures, v|frontend.FlagReply, 0), nil, closes},
		{"oversized payload", header(vhostuser.SetFeatures, v, 1<<20), nil, closes},
		{"wrong payload size", append(header(vhostuser.SetVringNum, v, 4), 0, 0, 0, 0), nil, rejected},
		{"payload on GET_FEATURES", append(header(vhostuser.GetFeatures, v, 8), u64(0)...), nil, closes},
		{"descriptor on GET_FEATURES", header(vhostuser.GetFeatures, v, 0), []int{efd}, closes},
		{"descriptor on SET_VRING_NUM", append(header(vhostuser.SetVringNum, v, 8), make([]byte, 8)...), []int{efd}, rejected},
		{"SET_MEM_TABLE without descriptors", append(header(vhostuser.SetMemTable, v, 40), append([]byte{1, 0, 0, 0, 0, 0, 0, 0}, make([]byte, 32)...)...), nil, rejected},
		{"SET_VRING_KICK with NOFD and a descriptor", append(header(vhostuser.SetVringKick, v, 8), u64(1<<8)...), []int{efd}, rejected},
		{"SET_VRING_CALL with unknown bits", append(header(vhostuser.SetVringCall, v, 8), u64(1<<9)...), []int{efd}, rejected},
		{"queue index out of range", append(header(vhostuser.SetVringNum, v, 8), 200, 0, 0, 0, 0, 1, 0, 0), nil, rejected},
		{"queue size not a power of two", append(header(vhostuser.SetVringNum, v, 8), 0, 0, 0, 0, 100, 0, 0, 0), nil, rejected},
		{"GET_VRING_BASE index out of range", append(header(vhostuser.GetVringBase, v, 8), 200, 0, 0, 0, 0, 0, 0, 0), nil, closes},
		{"config beyond 256 bytes", append(header(vhostuser.GetConfig, v, 12), 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0), nil, closes},
		{"features not offered", append(header(vhostuser.SetFeatures, v, 8), u64(1<<63)...), nil, closes},
		{"SET_BACKEND_REQ_FD without a descriptor", append(header(vhostuser.SetBackendReqFd, v, 8), u64(0)...), nil, rejected},
		{"SET_BACKEND_REQ_FD not negotiated", append(header(vhostuser.SetBackendReqFd, v, 8), u64(0)...), []int{efd}, rejected},
		{"truncated payload", header(vhostuser.SetFeatures, v, 8), nil, closes},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			conn, err := frontend.Dial(e.sock)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if err := conn.SendRaw(c.msg, c.fds); err != nil {
				t.Fatal(err)
			}
			switch {
			case c.name == "truncated payload":
				// The rest never comes: the front-end hangs up mid-message.
				conn.Close()
			case c.closes:
				expectDisconnect(t, conn)
			default:
				// Refused, and the connection answers the next request.
				if _, err := conn.GetFeatures(); err != nil {
					t.Fatalf("the connection did not go on: %v", err)
				}
				conn.Close()
			}
			d := connect(t, e, frontend.Options{})
			if err := d.Queue(0).Write(8, pattern(8, 4096)); err != nil {
				t.Fatalf("next connection: %v", err)
			}
			d.Close()
		})
	}
}

// TestMalformedMessageMidSession breaks the protocol while queues run with
// requests on them.
func TestMalformedMessageMidSession(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{NumQueues: 2})
	for i := range 32 {
		if _, err := d.Queue(i % 2).Submit(frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096))); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Conn().Send(1000, frontend.FlagVersion, []byte("garbage"), nil); err != nil {
		t.Fatal(err)
	}
	expectDisconnect(t, d.Conn())
	d.Close()

	d = connect(t, e, frontend.Options{NumQueues: 2})
	got, err := d.Queue(1).Read(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	// The write may or may not have run before the disconnect.
	if !bytes.Equal(got, pattern(0, 4096)) && !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("torn or foreign data at sector 0")
	}
}

// TestGetVringBase stops a queue with requests in flight: GET_VRING_BASE
// answers after every request the back-end popped has completed, and the
// rest run once the queue is restarted from that index.
func TestGetVringBase(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{NumQueues: 2, QueueSize: 128})
	q := d.Queue(0)
	const n = 100
	var ps []*frontend.Pending
	for i := range n {
		p, err := q.Submit(frontend.WriteRequest(uint64(i*8), pattern(uint64(i), 4096)))
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	base, err := d.StopQueue(0)
	if err != nil {
		t.Fatal(err)
	}
	done := 0
	for _, p := range ps {
		select {
		case <-p.Done():
			if err := p.Wait().Err; err != nil {
				t.Fatal(err)
			}
			done++
		default:
		}
	}
	if base > n || done != int(base) {
		t.Fatalf("GET_VRING_BASE returned %d with %d of %d requests completed", base, done, n)
	}
	// The other queue is not affected.
	if err := d.Queue(1).Write(2048, pattern(1000, 512)); err != nil {
		t.Fatal(err)
	}
	// Requests submitted while stopped wait for the restart too.
	late, err := q.Submit(frontend.ReadRequest(0, 4096))
	if err != nil {
		t.Fatal(err)
	}
	if err := d.StartQueue(0); err != nil {
		t.Fatal(err)
	}
	for i, p := range ps {
		if res := wait(t, p); res.Err != nil {
			t.Fatalf("write %d after restart: %v", i, res.Err)
		}
	}
	if res := wait(t, late); res.Err != nil || !bytes.Equal(res.In, pattern(0, 4096)) {
		t.Fatalf("read submitted while stopped: %v", res.Err)
	}
	if base, err := d.StopQueue(0); err != nil || base != n+1 {
		t.Fatalf("second GET_VRING_BASE: %d, %v; want %d", base, err, n+1)
	}
}

// TestBrokenQueue has a hostile guest break one queue: the back-end stops
// that queue and signals its error eventfd; the other queues, and the next
// connection, keep working.
func TestBrokenQueue(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{NumQueues: 2, MemSize: 4 << 20})
	mem := d.Memory()
	status, err := mem.Alloc(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free(status)

	// A header too short to be one: answerable, so an IOERR status.
	hdr, err := mem.Alloc(8, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free(hdr)
	p, err := d.Queue(0).SubmitChain([]frontend.Desc{{Addr: hdr.GPA, Len: 8}, {Addr: status.GPA, Len: 1, Flags: virtio.DescFWrite}})
	if err != nil {
		t.Fatal(err)
	}
	if res := wait(t, p); !errors.Is(res.Err, frontend.ErrIOError) {
		t.Fatalf("short header: got %v, want IOERR", res.Err)
	}

	// A buffer outside guest memory: nothing can be answered, the ring is
	// broken.
	if _, err := d.Queue(0).SubmitChain([]frontend.Desc{
		{Addr: mem.Size() + 4096, Len: 16}, {Addr: status.GPA, Len: 1, Flags: virtio.DescFWrite},
	}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Queue(0).Failed():
	case <-time.After(guard):
		t.Fatal("the back-end did not signal the error eventfd")
	}
	if !errors.Is(d.Queue(0).Err(), frontend.ErrQueueFailed) {
		t.Fatalf("queue error %v", d.Queue(0).Err())
	}
	if err := d.Queue(1).Write(0, pattern(1, 4096)); err != nil {
		t.Fatalf("other queue: %v", err)
	}
	d.Close()
	d = connect(t, e, frontend.Options{})
	if got, err := d.Queue(0).Read(0, 4096); err != nil || !bytes.Equal(got, pattern(1, 4096)) {
		t.Fatalf("next connection: %v", err)
	}
}

// TestCrossRegionBuffer puts a data buffer across the boundary of two
// memory table regions: the back-end must split it, not reject it.
func TestCrossRegionBuffer(t *testing.T) {
	e := newExport(t, exportOptions{writeback: true})
	d := connect(t, e, frontend.Options{Regions: 2, MemSize: 4 << 20})
	mem := d.Memory()
	boundary := mem.Regions()[1].GuestPhysAddr
	data, err := mem.AllocAt(boundary-2048, 8192)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free(data)
	hdr, err := mem.Alloc(16, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free(hdr)
	status, err := mem.Alloc(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free(status)
	q := d.Queue(0)
	submit := func(typ uint32, flags uint16) frontend.Result {
		binary.LittleEndian.PutUint32(hdr.Data, typ)
		binary.LittleEndian.PutUint64(hdr.Data[8:], 64)
		p, err := q.SubmitChain([]frontend.Desc{
			{Addr: hdr.GPA, Len: 16},
			{Addr: data.GPA, Len: uint32(len(data.Data)), Flags: flags},
			{Addr: status.GPA, Len: 1, Flags: virtio.DescFWrite},
		})
		if err != nil {
			t.Fatal(err)
		}
		return wait(t, p)
	}
	want := pattern(7, len(data.Data))
	copy(data.Data, want)
	if res := submit(virtio.BlkTOut, 0); res.Err != nil {
		t.Fatalf("write across regions: %v", res.Err)
	}
	if got, err := q.Read(64, len(want)); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read back: %v", err)
	}
	clear(data.Data)
	if res := submit(virtio.BlkTIn, virtio.DescFWrite); res.Err != nil || res.Len != uint32(len(want))+1 {
		t.Fatalf("read across regions: %+v", res)
	}
	if !bytes.Equal(data.Data, want) {
		t.Fatal("read across regions returned wrong data")
	}
}
