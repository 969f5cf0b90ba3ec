package vhostuser_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/vhostuser/vhostusertest"
	"github.com/vublk/vublk/virtio"
)

const page = virtio.LogPageSize

// pageSet is a set of guest page numbers.
type pageSet map[uint64]bool

func (s pageSet) add(gpa, n uint64) {
	for p := gpa / page; p <= (gpa+n-1)/page; p++ {
		s[p] = true
	}
}

func (s pageSet) addAll(pages []uint64) {
	for _, p := range pages {
		s[p] = true
	}
}

// logChain is a read, GET_ID or write request built by hand, so that the test knows the guest
// address of every byte the device may write: the header on a page of its own (the device
// must not log it), the data at an offset that makes it cross pages (unaligned: the O_DIRECT
// bounce path), and the status byte on a page of its own.
type logChain struct {
	typ                uint32
	sector             uint64
	hdr, data, status  frontend.Buffer
	dataOff, dataLen   int
	writes, notWritten pageSet // pages the device writes / must not log
}

func newLogChain(t *testing.T, mem *frontend.Memory, typ uint32, sector uint64, dataOff, dataLen int, out []byte) *logChain {
	t.Helper()
	alloc := func(n int) frontend.Buffer {
		b, err := mem.Alloc(uint64(n), page)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	c := &logChain{typ: typ, sector: sector, dataOff: dataOff, dataLen: dataLen,
		writes: pageSet{}, notWritten: pageSet{}}
	c.hdr = alloc(page)
	binary.LittleEndian.PutUint32(c.hdr.Data[0:], typ)
	binary.LittleEndian.PutUint64(c.hdr.Data[8:], sector)
	c.data = alloc(dataOff + dataLen)
	c.status = alloc(page)
	c.status.Data[0] = 0xff
	c.notWritten.add(c.hdr.GPA, page)
	c.writes.add(c.status.GPA, 1)
	if typ == virtio.BlkTOut {
		copy(c.data.Data[dataOff:], out)
		c.notWritten.add(c.data.GPA+uint64(dataOff), uint64(dataLen))
	} else {
		c.writes.add(c.data.GPA+uint64(dataOff), uint64(dataLen))
	}
	return c
}

func (c *logChain) descs() []frontend.Desc {
	dataFlags := uint16(virtio.DescFWrite)
	if c.typ == virtio.BlkTOut {
		dataFlags = 0
	}
	return []frontend.Desc{
		{Addr: c.hdr.GPA, Len: 16},
		{Addr: c.data.GPA + uint64(c.dataOff), Len: uint32(c.dataLen), Flags: dataFlags},
		{Addr: c.status.GPA, Len: 1, Flags: virtio.DescFWrite},
	}
}

func (c *logChain) free(mem *frontend.Memory) {
	mem.Free(c.hdr)
	mem.Free(c.data)
	mem.Free(c.status)
}

type logCase struct {
	name     string
	engine   backend.IOEngine
	direct   bool
	eventIdx bool
	depth    int // requests in flight at once: 1 runs inline, more on the lanes or io_uring
}

func serveForLog(t *testing.T, c logCase) *vhostusertest.Export {
	t.Helper()
	store, err := backend.OpenFile(filepath.Join(t.TempDir(), "disk.img"),
		backend.FileOptions{CreateSize: diskSize, Direct: c.direct, LogicalBlockSize: 512})
	if err != nil {
		t.Skipf("cannot open the file (O_DIRECT=%v): %v", c.direct, err)
	}
	engine, err := backend.NewEngineWith(store, backend.EngineOptions{Lanes: 2, IOEngine: c.engine})
	if err != nil {
		store.Close()
		t.Skipf("io engine %s: %v", c.engine, err)
	}
	engine.Close() // only to probe: Serve makes its own engine
	cfg := virtio.BlkConfig{Capacity: diskSize, BlockSize: 512, NumQueues: 2, Serial: serial, Writeback: true, Discard: true}
	return vhostusertest.ServeWith(t, store, backend.EngineOptions{Lanes: 2, IOEngine: c.engine}, cfg, nil)
}

// TestDirtyLogCoversEveryWrite runs reads, GET_IDs and writes with dirty logging on, on every
// I/O path (inline, lanes, io_uring, O_DIRECT with a bounce buffer), and compares the log with
// the pages the device wrote: every data page, status byte and used ring page it wrote is
// logged by the time the completion is seen, and no page it only read (headers, write data) is.
// With logging off again, nothing is logged.
func TestDirtyLogCoversEveryWrite(t *testing.T) {
	for _, c := range []logCase{
		{name: "inline", engine: backend.IOEngineLanes, depth: 1},
		{name: "lanes", engine: backend.IOEngineLanes, depth: 16, eventIdx: true},
		{name: "lanes_direct_bounce", engine: backend.IOEngineLanes, direct: true, depth: 16},
		{name: "uring", engine: backend.IOEngineURing, depth: 16, eventIdx: true},
		{name: "uring_direct_bounce", engine: backend.IOEngineURing, direct: true, depth: 16},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := serveForLog(t, c)
			d, err := frontend.Connect(e.Socket, frontend.Options{Log: true, NumQueues: 2, EventIdx: c.eventIdx, MemSize: 32 << 20})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if d.Features()&(1<<vhostuser.FLogAll) == 0 && d.ProtocolFeatures()&(1<<vhostuser.ProtocolFLogShmfd) == 0 {
				t.Fatalf("LOG_SHMFD not negotiated: protocol %#x", d.ProtocolFeatures())
			}
			want := pattern(7, 1<<20)
			if err := d.Queue(0).Write(0, want); err != nil {
				t.Fatal(err)
			}
			log, err := frontend.NewDirtyLog(d.Memory().Size())
			if err != nil {
				t.Fatal(err)
			}
			defer log.Close()
			if err := d.StartLogging(log); err != nil {
				t.Fatal(err)
			}
			log.Take()

			logged := pageSet{}
			written, notWritten := pageSet{}, pageSet{}
			mem := d.Memory()
			var mu sync.Mutex
			run := func(chains []*logChain, q int) {
				var wg sync.WaitGroup
				sem := make(chan struct{}, c.depth)
				for _, ch := range chains {
					sem <- struct{}{}
					p, err := d.Queue(q).SubmitChain(ch.descs())
					if err != nil {
						t.Fatal(err)
					}
					wg.Add(1)
					go func() {
						defer wg.Done()
						defer func() { <-sem }()
						res := wait(t, p)
						// The bits must be there as soon as the completion is seen.
						mu.Lock() // Take and merge at once: another goroutine's Take may hold our bits
						defer mu.Unlock()
						logged.addAll(log.Take())
						for pg := range ch.writes {
							if !logged[pg] {
								t.Errorf("type %d sector %d: page %#x was written but not logged when the completion was seen", ch.typ, ch.sector, pg*page)
							}
						}
						if res.Status != virtio.BlkSOK {
							t.Errorf("type %d sector %d: status %d", ch.typ, ch.sector, res.Status)
						}
						if ch.typ == virtio.BlkTIn {
							off := int(ch.sector * 512)
							if !bytes.Equal(ch.data.Data[ch.dataOff:ch.dataOff+ch.dataLen], want[off:off+ch.dataLen]) {
								t.Errorf("read at sector %d: wrong data", ch.sector)
							}
						}
					}()
				}
				wg.Wait()
			}
			var chains []*logChain
			for i := range 48 {
				typ := uint32(virtio.BlkTIn)
				n := 512 * (1 + i%17)
				switch i % 6 {
				case 4:
					typ = virtio.BlkTOut
				case 5:
					typ = virtio.BlkTGetID
					n = virtio.BlkIDBytes
				}
				// Offsets that cross page boundaries and are not 512-aligned for some.
				off := (i * 1000) % page
				sector := uint64(i * 8)
				var out []byte
				if typ == virtio.BlkTOut {
					sector = 1<<20/512 + uint64(i*8)
					out = pattern(uint64(i), n)
				}
				ch := newLogChain(t, mem, typ, sector, off, n, out)
				chains = append(chains, ch)
				for pg := range ch.writes {
					written[pg] = true
				}
				for pg := range ch.notWritten {
					notWritten[pg] = true
				}
			}
			run(chains[:24], 0)
			run(chains[24:], 1)
			logged.addAll(log.Take())
			for pg := range notWritten {
				if logged[pg] && !written[pg] {
					t.Errorf("page %#x was only read by the device, yet logged", pg*page)
				}
			}
			for q := range 2 {
				used := d.Queue(q).UsedGPA()
				// The used index and the elements are in the used ring's first page here.
				if !logged[used/page] {
					t.Errorf("queue %d: used ring page %#x not logged", q, used)
				}
			}
			for _, ch := range chains {
				ch.free(mem)
			}

			// Logging off: the same reads log nothing.
			if err := d.StopLogging(); err != nil {
				t.Fatal(err)
			}
			log.Take()
			if _, err := d.Queue(0).Read(0, 64<<10); err != nil {
				t.Fatal(err)
			}
			if _, err := d.Queue(1).GetID(); err != nil {
				t.Fatal(err)
			}
			if got := log.Take(); len(got) != 0 {
				t.Errorf("logging off, yet %d pages logged", len(got))
			}
		})
	}
}

func connectLogged(t *testing.T, sock string, opt frontend.Options) (*frontend.Device, *frontend.DirtyLog) {
	t.Helper()
	opt.Log = true
	d, err := frontend.Connect(sock, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	log, err := frontend.NewDirtyLog(d.Memory().Size())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { log.Close() })
	if err := d.StartLogging(log); err != nil {
		t.Fatal(err)
	}
	return d, log
}

// readLogged reads n bytes at sector through queue q into a buffer at a page offset, and
// returns the pages of that buffer and whether the log had all of them when the read completed.
func readLogged(t *testing.T, d *frontend.Device, log *frontend.DirtyLog, q int, sector uint64, n int) (pageSet, bool) {
	t.Helper()
	ch := newLogChain(t, d.Memory(), virtio.BlkTIn, sector, 100, n, nil)
	defer ch.free(d.Memory())
	p, err := d.Queue(q).SubmitChain(ch.descs())
	if err != nil {
		t.Fatal(err)
	}
	if res := wait(t, p); res.Status != virtio.BlkSOK {
		t.Fatalf("read: status %d", res.Status)
	}
	got := pageSet{}
	got.addAll(log.Take())
	for pg := range ch.writes {
		if !got[pg] {
			return ch.writes, false
		}
	}
	return ch.writes, true
}

// TestDirtyLogReplaced: a second SET_LOG_BASE (QEMU grows the log when memory is added) moves
// logging to the new log before the reply, and the old log is left alone from then on.
func TestDirtyLogReplaced(t *testing.T) {
	e := vhostusertest.ServeFile(t, diskSize, 1, false)
	d, log1 := connectLogged(t, e.Socket, frontend.Options{})
	if _, ok := readLogged(t, d, log1, 0, 0, 8192); !ok {
		t.Fatal("first log: read not logged")
	}
	log2, err := frontend.NewDirtyLog(d.Memory().Size())
	if err != nil {
		t.Fatal(err)
	}
	defer log2.Close()
	if err := d.Conn().SetLogBase(log2.Size(), 0, log2.Fd()); err != nil {
		t.Fatal(err)
	}
	log1.Take()
	if _, ok := readLogged(t, d, log2, 0, 16, 8192); !ok {
		t.Error("second log: read not logged")
	}
	if got := log1.Take(); len(got) != 0 {
		t.Errorf("the replaced log still got %d pages", len(got))
	}
}

// TestDirtyLogTooSmallOrShrunk: a log that does not cover guest memory loses the pages beyond
// it and nothing else, and a log the front-end truncates after sharing it faults in vublk,
// which survives it: once logging is off the device serves requests again.
func TestDirtyLogTooSmallOrShrunk(t *testing.T) {
	e := vhostusertest.ServeFile(t, diskSize, 2, false)
	d, err := frontend.Connect(e.Socket, frontend.Options{Log: true, NumQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	// 8 bytes: the first 256 KiB of guest memory only.
	small, err := frontend.NewDirtyLog(64 * page)
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	if err := d.StartLogging(small); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Queue(0).Read(0, 64<<10); err != nil {
		t.Fatalf("read with a log too small: %v", err)
	}
	for _, pg := range small.Take() {
		if pg >= 64 {
			t.Errorf("page %d logged beyond an 8-byte log", pg)
		}
	}

	shrunk, err := frontend.NewDirtyLog(d.Memory().Size())
	if err != nil {
		t.Fatal(err)
	}
	defer shrunk.Close()
	if err := d.StartLogging(shrunk); err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(shrunk.Fd(), 0); err != nil {
		t.Fatal(err)
	}
	// Marks now fault: the request is not completed (or its queue breaks), and the process
	// lives on.
	p, err := d.Queue(0).Submit(frontend.ReadRequest(0, 4096))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	case <-time.After(200 * time.Millisecond):
	}
	if err := d.StopLogging(); err != nil {
		t.Fatal(err)
	}
	if got, err := d.Queue(1).Read(0, 4096); err != nil || len(got) != 4096 {
		t.Fatalf("read after the shrunk log was dropped: %v", err)
	}
}

// TestHandoverSyncs: when the front-end stops the last running ring (GET_VRING_BASE, as a
// migration's source does before the switch-over), vublk has made every completed write durable
// by the time it answers; stopping one ring of two does not sync yet.
func TestHandoverSyncs(t *testing.T) {
	store := backend.NewCrashStore(diskSize)
	e := vhostusertest.Serve(t, store, 2, virtio.BlkConfig{Capacity: diskSize, BlockSize: 512, NumQueues: 2,
		Serial: serial, Writeback: true}, nil)
	_ = e
	d, err := frontend.Connect(e.Socket, frontend.Options{NumQueues: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	data := pattern(11, 64<<10)
	if err := d.Queue(0).Write(8, data); err != nil { // no flush: write-back, not durable yet
		t.Fatal(err)
	}
	syncs := store.Syncs()
	if _, err := d.StopQueue(0); err != nil {
		t.Fatal(err)
	}
	if store.Syncs() != syncs {
		t.Errorf("stopping one ring of two synced the store")
	}
	if _, err := d.StopQueue(1); err != nil {
		t.Fatal(err)
	}
	if store.Syncs() == syncs {
		t.Fatal("the device was stopped, and the store was not synced")
	}
	// Whatever a crash now keeps, the write is there.
	img := store.Crash(rand.New(rand.NewPCG(1, 2)))
	if !bytes.Equal(img[8*512:8*512+len(data)], data) {
		t.Error("a completed write is not durable after the device was stopped")
	}
	if err := d.StartQueue(0); err != nil {
		t.Fatal(err)
	}
	if got, err := d.Queue(0).Read(8, len(data)); err != nil || !bytes.Equal(got, data) {
		t.Errorf("read after the restart: %v", err)
	}
}

// TestHandoverSyncFailureClosesConnection: a failed sync at the handover cannot be reported in
// the GET_VRING_BASE reply, so the connection is closed: the front-end sees a failed stop, not a
// clean one.
func TestHandoverSyncFailureClosesConnection(t *testing.T) {
	store := backend.NewCrashStore(diskSize)
	e := vhostusertest.Serve(t, store, 2, virtio.BlkConfig{Capacity: diskSize, BlockSize: 512, NumQueues: 1,
		Serial: serial, Writeback: true}, nil)
	d, err := frontend.Connect(e.Socket, frontend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Queue(0).Write(0, pattern(3, 4096)); err != nil {
		t.Fatal(err)
	}
	store.SetSyncError(errors.New("injected sync failure"))
	if _, err := d.StopQueue(0); err == nil {
		t.Fatal("GET_VRING_BASE answered although the store could not be synced")
	}
}

// TestDirtyLogAcrossReconnect: vublk is killed with a read in flight while logging is on; the
// front-end reconnects to a new vublk and shares the log again (as QEMU does), and the
// resubmitted read's data is logged by the time it completes.
func TestDirtyLogAcrossReconnect(t *testing.T) {
	const size, hang = 16 << 20, 1 << 20
	dir, image := newImage(t, size)
	sock := filepath.Join(dir, "sock")
	a := startHelper(t, sock, image, helperOptions{lanes: 1, hang: hang})
	d, log := connectLogged(t, sock, frontend.Options{NumQueues: helperQueues, QueueSize: 64, EventIdx: true, Inflight: true})
	failFast(t, d)
	want := pattern(21, 8192)
	if err := d.Queue(0).Write(0, want); err != nil {
		t.Fatal(err)
	}
	q0, q1 := d.Queue(0), d.Queue(1)
	// A write that hangs and a flush behind it close the barrier; a read on the other queue is
	// then popped and held until vublk dies.
	for _, r := range []frontend.Request{frontend.WriteRequest(hang/512, pattern(22, 4096)), frontend.FlushRequest()} {
		if _, err := q0.Submit(r); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the back-end to pop the write and the flush", func() bool { return d.InflightPending(0) == 2 })
	ch := newLogChain(t, d.Memory(), virtio.BlkTIn, 0, 100, 8192, nil)
	rd, err := q1.SubmitChain(ch.descs())
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the back-end to pop the read", func() bool { return d.InflightPending(1) == 1 })
	a.kill()
	log.Take()
	b := startHelper(t, sock, image, helperOptions{lanes: 1})
	if err := d.Reconnect(sock); err != nil {
		t.Fatalf("reconnect: %v\n%s", err, b.logs())
	}
	if res := wait(t, rd); res.Status != virtio.BlkSOK {
		t.Fatalf("resubmitted read: status %d", res.Status)
	}
	got := pageSet{}
	got.addAll(log.Take())
	for pg := range ch.writes {
		if !got[pg] {
			t.Errorf("page %#x of the resubmitted read is not logged", pg*page)
		}
	}
	if !bytes.Equal(ch.data.Data[100:100+8192], want) {
		t.Error("resubmitted read: wrong data")
	}
	for _, msg := range []string{"resuming the queue from the inflight buffer", "dirty page logging on"} {
		if !strings.Contains(b.logs(), msg) {
			t.Errorf("the new back-end did not log %q:\n%s", msg, b.logs())
		}
	}
}
