package virtio

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
)

const testDiskSize = 1 << 20 // 2048 sectors

type countNotifier struct{ n atomic.Int64 }

func (c *countNotifier) Notify() { c.n.Add(1) }

// blkHarness is a BlkDevice over a CrashStore, with one queue driven by a
// testRing. Requests are published, ProcessQueue pops them, and Drain waits
// for the lanes, so the checks never depend on timing.
type blkHarness struct {
	t      *testing.T
	r      *testRing
	store  *backend.CrashStore
	engine *backend.Engine
	dev    *BlkDevice
	q      *Queue
	notify *countNotifier
}

func newBlkHarness(t *testing.T, cfg BlkConfig, eventIdx bool) *blkHarness {
	t.Helper()
	return newBlkHarnessOn(t, cfg, eventIdx, backend.NewCrashStore(testDiskSize))
}

// newBlkHarnessOn is newBlkHarness over a given store.
func newBlkHarnessOn(t *testing.T, cfg BlkConfig, eventIdx bool, store *backend.CrashStore) *blkHarness {
	t.Helper()
	if cfg.Capacity == 0 {
		cfg.Capacity = uint64(store.Size())
	}
	if cfg.NumQueues == 0 {
		cfg.NumQueues = 1
	}
	log := logrus.New()
	log.SetOutput(io.Discard)
	log.SetLevel(logrus.DebugLevel) // exercise the guest-error log paths
	engine := backend.NewEngine(store, 3)
	t.Cleanup(func() { engine.Close() })
	h := &blkHarness{t: t, r: newTestRing(t, 256, eventIdx), store: store, engine: engine, notify: &countNotifier{}}
	h.dev = NewBlkDevice(engine, cfg, logrus.NewEntry(log))
	h.dev.SetFeatures(h.dev.Features())
	h.q = &Queue{Index: 0, Ring: h.r.q, Mem: h.r.mem, Notify: h.notify}
	return h
}

// sent is a request as the driver put it in the ring.
type sent struct {
	head   uint16
	in     uint64 // gpa of the IN buffer
	inLen  int
	status uint64 // gpa of the status byte
}

const statusUnset = 0xee // what the status byte holds before the device answers

// send publishes the request [header][out, if any][in, if inLen > 0][status].
func (h *blkHarness) send(typ uint32, sector uint64, out []byte, inLen int) sent {
	h.t.Helper()
	r := h.r
	bufs := []buf{rbuf(r.put(blkHeader(typ, sector)), 16)}
	if len(out) > 0 {
		bufs = append(bufs, rbuf(r.put(out), len(out)))
	}
	s := sent{inLen: inLen}
	if inLen > 0 {
		s.in = r.put(bytes.Repeat([]byte{0x5a}, inLen))
		bufs = append(bufs, wbuf(s.in, inLen))
	}
	s.status = r.put([]byte{statusUnset})
	bufs = append(bufs, wbuf(s.status, 1))
	s.head = r.addChain(bufs...)
	r.publish(s.head)
	return s
}

// sendChain publishes a hand-made chain whose status byte is at status.
func (h *blkHarness) sendChain(status uint64, bufs ...buf) sent {
	h.r.bytes(status, 1)[0] = statusUnset
	s := sent{head: h.r.addChain(bufs...), status: status}
	h.r.publish(s.head)
	return s
}

// run processes the queue, waits for every request to complete and returns
// the used length of each completed head.
func (h *blkHarness) run() map[uint16]uint32 {
	h.t.Helper()
	if err := h.dev.ProcessQueue(h.q); err != nil {
		h.t.Fatalf("ProcessQueue: %v", err)
	}
	h.q.Drain()
	used := map[uint16]uint32{}
	for _, e := range h.r.takeUsed() {
		if _, dup := used[uint16(e.id)]; dup {
			h.t.Fatalf("head %d completed twice", e.id)
		}
		used[uint16(e.id)] = e.len
	}
	return used
}

// check verifies one completed request: its status byte and used length.
func (h *blkHarness) check(used map[uint16]uint32, s sent, status uint8, usedLen uint32) {
	h.t.Helper()
	got, ok := used[s.head]
	if !ok {
		h.t.Fatalf("head %d not completed", s.head)
	}
	if st := h.r.bytes(s.status, 1)[0]; st != status {
		h.t.Errorf("head %d: status %d, want %d", s.head, st, status)
	}
	if got != usedLen {
		h.t.Errorf("head %d: used len %d, want %d", s.head, got, usedLen)
	}
}

// do sends one request, runs the queue and checks status and used length.
func (h *blkHarness) do(typ uint32, sector uint64, out []byte, inLen int, status uint8, usedLen uint32) sent {
	h.t.Helper()
	s := h.send(typ, sector, out, inLen)
	h.check(h.run(), s, status, usedLen)
	return s
}

func (h *blkHarness) in(s sent) []byte { return h.r.bytes(s.in, uint64(s.inLen)) }

func TestBlkDeviceWriteRead(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true}, false)
	data := pattern(4096, 1)
	h.do(BlkTOut, 8, data, 0, BlkSOK, 1)
	if img := h.store.Image(); !bytes.Equal(img[8*512:8*512+4096], data) {
		t.Fatal("store does not hold the written data")
	}
	s := h.do(BlkTIn, 8, nil, 4096, BlkSOK, 4096+1)
	if !bytes.Equal(h.in(s), data) {
		t.Fatal("read back different data")
	}
	// A read that starts before the written range sees zeros, then data.
	s = h.do(BlkTIn, 7, nil, 1024, BlkSOK, 1024+1)
	if !bytes.Equal(h.in(s), concat(make([]byte, 512), data[:512])) {
		t.Fatal("unaligned-to-write read is wrong")
	}
	// The last sector of the disk.
	h.do(BlkTOut, 2047, data[:512], 0, BlkSOK, 1)
	s = h.do(BlkTIn, 2047, nil, 512, BlkSOK, 513)
	if !bytes.Equal(h.in(s), data[:512]) {
		t.Fatal("last sector did not round-trip")
	}
}

// Data split into many descriptors, crossing a region boundary, with the
// header split and the status byte sharing the last data descriptor.
func TestBlkDeviceScatteredBuffers(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true}, false)
	r := h.r
	data := pattern(2048, 9)
	hdr := blkHeader(BlkTOut, 100)
	// OUT: header 10+6 (second part shares with 500 bytes of data), then
	// 1024 bytes across the region boundary, then the rest.
	cross := uint64(ringSecondGPA - 300)
	copy(r.bytes(cross, 300), data[500:800])
	copy(r.bytes(ringSecondGPA, 724), data[800:1524])
	st := r.alloc(1)
	w := h.sendChain(st,
		rbuf(r.put(hdr[:10]), 10),
		rbuf(r.put(concat(hdr[10:], data[:500])), 6+500),
		rbuf(cross, 1024),
		rbuf(r.put(data[1524:]), 2048-1524),
		wbuf(st, 1),
	)
	h.check(h.run(), w, BlkSOK, 1)
	if img := h.store.Image(); !bytes.Equal(img[100*512:100*512+2048], data) {
		t.Fatal("scattered write stored wrong data")
	}
	// IN into three buffers, the last crossing regions and also holding the
	// status byte.
	b1, b2 := r.alloc(1000), r.alloc(24)
	tail := uint64(ringSecondGPA - 100)
	rd := h.sendChain(tail+1024,
		rbuf(r.put(blkHeader(BlkTIn, 100)), 16),
		wbuf(b1, 1000), wbuf(b2, 24), wbuf(tail, 1024+1),
	)
	h.check(h.run(), rd, BlkSOK, 2048+1)
	got := concat(r.bytes(b1, 1000), r.bytes(b2, 24), r.bytes(tail, 100), r.bytes(ringSecondGPA, 924))
	if !bytes.Equal(got, data) {
		t.Fatal("scattered read returned wrong data")
	}
}

func TestBlkDeviceRangeChecks(t *testing.T) {
	tests := []struct {
		name   string
		cfg    BlkConfig
		typ    uint32
		sector uint64
		n      int
		want   uint8
	}{
		{"read at capacity", BlkConfig{}, BlkTIn, 2048, 512, BlkSIOErr},
		{"write at capacity", BlkConfig{}, BlkTOut, 2048, 512, BlkSIOErr},
		{"read crossing the end", BlkConfig{}, BlkTIn, 2047, 1024, BlkSIOErr},
		{"write crossing the end", BlkConfig{}, BlkTOut, 2047, 1024, BlkSIOErr},
		{"read far beyond", BlkConfig{}, BlkTIn, 1 << 40, 512, BlkSIOErr},
		{"sector*512 overflows", BlkConfig{}, BlkTIn, 1<<55 + 1, 512, BlkSIOErr},
		{"sector 2^64-1", BlkConfig{}, BlkTOut, 1<<64 - 1, 512, BlkSIOErr},
		{"read not a multiple of 512", BlkConfig{}, BlkTIn, 0, 700, BlkSIOErr},
		{"write not a multiple of 512", BlkConfig{}, BlkTOut, 0, 100, BlkSIOErr},
		{"4k disk: misaligned sector", BlkConfig{BlockSize: 4096}, BlkTIn, 1, 4096, BlkSIOErr},
		{"4k disk: short length", BlkConfig{BlockSize: 4096}, BlkTOut, 8, 512, BlkSIOErr},
		{"4k disk: aligned", BlkConfig{BlockSize: 4096}, BlkTOut, 8, 4096, BlkSOK},
		{"4k disk: last block", BlkConfig{BlockSize: 4096}, BlkTIn, 2040, 4096, BlkSOK},
		{"zero-length read", BlkConfig{}, BlkTIn, 0, 0, BlkSOK},
		{"zero-length read at capacity", BlkConfig{}, BlkTIn, 2048, 0, BlkSOK},
		{"zero-length read past capacity", BlkConfig{}, BlkTIn, 2049, 0, BlkSIOErr},
		// The export is smaller than its store: the device's own check, not
		// the store's, must stop these.
		{"small export: write at capacity", BlkConfig{Capacity: 512 * 1024}, BlkTOut, 1024, 512, BlkSIOErr},
		{"small export: write crossing the end", BlkConfig{Capacity: 512 * 1024}, BlkTOut, 1023, 1024, BlkSIOErr},
		{"small export: write zeroes crossing the end", BlkConfig{Capacity: 512 * 1024, Discard: true}, BlkTWriteZeroes, 1020, 8, BlkSIOErr},
		{"small export: last sector", BlkConfig{Capacity: 512 * 1024}, BlkTOut, 1023, 512, BlkSOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newBlkHarness(t, tt.cfg, false)
			var s sent
			switch tt.typ {
			case BlkTOut:
				s = h.send(BlkTOut, tt.sector, pattern(tt.n, 3), 0)
			case BlkTWriteZeroes: // n is a sector count here
				s = h.send(BlkTWriteZeroes, 0, discardSeg(tt.sector, uint32(tt.n), 0), 0)
				h.store.WriteAt([][]byte{pattern(testDiskSize, 1)}, 0)
			default:
				s = h.send(BlkTIn, tt.sector, nil, tt.n)
			}
			usedLen := uint32(1)
			if tt.want == BlkSOK && tt.typ == BlkTIn {
				usedLen += uint32(tt.n)
			}
			h.check(h.run(), s, tt.want, usedLen)
			if tt.want != BlkSOK {
				before := make([]byte, testDiskSize)
				if tt.typ == BlkTWriteZeroes {
					before = pattern(testDiskSize, 1)
				}
				if !bytes.Equal(h.store.Image(), before) {
					t.Fatal("a rejected request changed the store")
				}
				if tt.typ == BlkTIn && tt.n > 0 && !bytes.Equal(h.in(s), bytes.Repeat([]byte{0x5a}, tt.n)) {
					t.Fatal("a rejected read wrote guest memory")
				}
			}
		})
	}
}

func TestBlkDeviceUnsupportedTypes(t *testing.T) {
	for _, typ := range []uint32{2, 3, 5, BlkTGetLifetime, BlkTSecureErase, 0x80000000, 0xffffffff} {
		h := newBlkHarness(t, BlkConfig{Discard: true}, false)
		s := h.send(typ, 0, nil, 64)
		h.check(h.run(), s, BlkSUnsupp, 1)
		if !bytes.Equal(h.in(s), bytes.Repeat([]byte{0x5a}, 64)) {
			t.Fatalf("type %d: unsupported request wrote its buffer", typ)
		}
	}
}

func TestBlkDeviceReadOnly(t *testing.T) {
	base := pattern(testDiskSize, 4)
	h := newBlkHarnessOn(t, BlkConfig{ReadOnly: true, Discard: true}, false, backend.NewCrashStoreFrom(base))
	if h.dev.Features()&(1<<BlkFRO) == 0 {
		t.Fatal("read-only export does not offer VIRTIO_BLK_F_RO")
	}

	h.do(BlkTOut, 0, pattern(512, 200), 0, BlkSIOErr, 1)
	h.do(BlkTWriteZeroes, 0, discardSeg(0, 8, 0), 0, BlkSUnsupp, 1)
	h.do(BlkTDiscard, 0, discardSeg(0, 8, 0), 0, BlkSUnsupp, 1)
	if !bytes.Equal(h.store.Image(), base) {
		t.Fatal("read-only store changed")
	}
	s := h.do(BlkTIn, 1, nil, 512, BlkSOK, 513)
	if !bytes.Equal(h.in(s), base[512:1024]) {
		t.Fatal("read from a read-only disk returned wrong data")
	}
}

func TestBlkDeviceGetID(t *testing.T) {
	tests := []struct {
		name   string
		serial string
		bufs   []int // IN buffer sizes before the status byte
		want   []byte
	}{
		{"short serial is NUL padded", "vublk-0001", []int{20}, append([]byte("vublk-0001"), make([]byte, 10)...)},
		{"exactly 20", "01234567890123456789", []int{20}, []byte("01234567890123456789")},
		{"long serial is cut at 20", "0123456789abcdefghijKLMNOP", []int{20}, []byte("0123456789abcdefghij")},
		{"empty serial", "", []int{20}, make([]byte, 20)},
		{"split buffer", "serial-split-across", []int{7, 13}, append([]byte("serial-split-across"), 0)},
		{"short buffer gets a prefix", "0123456789", []int{8}, []byte("01234567")},
		{"larger buffer: 20 bytes written", "abc", []int{64}, append([]byte("abc"), make([]byte, 17)...)},
		{"no buffer", "abc", nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newBlkHarness(t, BlkConfig{Serial: tt.serial}, false)
			r := h.r
			bufs := []buf{rbuf(r.put(blkHeader(BlkTGetID, 0)), 16)}
			var gpas []uint64
			total := 0
			for _, n := range tt.bufs {
				g := r.put(bytes.Repeat([]byte{0x5a}, n))
				gpas = append(gpas, g)
				bufs = append(bufs, wbuf(g, n))
				total += n
			}
			st := r.alloc(1)
			s := h.sendChain(st, append(bufs, wbuf(st, 1))...)
			h.check(h.run(), s, BlkSOK, uint32(len(tt.want))+1)
			var got []byte
			for i, n := range tt.bufs {
				got = append(got, r.bytes(gpas[i], uint64(n))...)
			}
			want := append(append([]byte(nil), tt.want...), bytes.Repeat([]byte{0x5a}, total-len(tt.want))...)
			if !bytes.Equal(got, want) {
				t.Fatalf("GET_ID wrote %q, want %q", got, want)
			}
		})
	}
}

func TestBlkDeviceFlush(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true}, false)
	if h.engine.WriteThrough() {
		t.Fatal("writeback export in write-through mode")
	}
	data := pattern(4096, 6)
	h.do(BlkTOut, 0, data, 0, BlkSOK, 1)
	syncs := h.store.Syncs()
	h.do(BlkTFlush, 0, nil, 0, BlkSOK, 1)
	if h.store.Syncs() <= syncs {
		t.Fatal("FLUSH did not sync the store")
	}
	// After the acknowledged flush the write survives any crash.
	for seed := range uint64(8) {
		if img := h.store.Crash(rand.New(rand.NewPCG(seed, 1))); !bytes.Equal(img[:4096], data) {
			t.Fatal("flushed write lost in a crash")
		}
	}
	// With nothing written since, a flush is already covered: it succeeds without a sync
	// (the write generation), even though a sync would now fail.
	h.store.SetSyncError(errors.New("EIO"))
	syncs = h.store.Syncs()
	h.do(BlkTFlush, 0, nil, 0, BlkSOK, 1)
	if h.store.Syncs() != syncs {
		t.Fatal("FLUSH with nothing written since the last one synced again")
	}
	// After a write, a failed sync is an IOERR, and stays one (the barrier latches it, and a
	// latched barrier never skips a sync).
	h.do(BlkTOut, 8, data, 0, BlkSOK, 1)
	h.do(BlkTFlush, 0, nil, 0, BlkSIOErr, 1)
	h.store.SetSyncError(nil)
	h.do(BlkTFlush, 0, nil, 0, BlkSIOErr, 1)
}

// Without writeback every acknowledged write is durable without a FLUSH.
func TestBlkDeviceWriteThrough(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: false}, false)
	if !h.engine.WriteThrough() {
		t.Fatal("write-through export in writeback mode")
	}
	data := pattern(4096, 8)
	h.do(BlkTOut, 16, data, 0, BlkSOK, 1)
	for seed := range uint64(8) {
		if img := h.store.Crash(rand.New(rand.NewPCG(seed, 2))); !bytes.Equal(img[16*512:16*512+4096], data) {
			t.Fatal("acknowledged write-through write lost in a crash")
		}
	}
}

func TestBlkDeviceDiscardWriteZeroes(t *testing.T) {
	tests := []struct {
		name    string
		cfg     BlkConfig
		typ     uint32
		payload []byte
		want    uint8
		zeroed  [2]int // sector range expected to read as zeros afterwards
	}{
		{"discard", BlkConfig{Discard: true}, BlkTDiscard, discardSeg(4, 4, 0), BlkSOK, [2]int{4, 8}},
		{"write zeroes", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(2, 10, 0), BlkSOK, [2]int{2, 12}},
		{"write zeroes, may unmap", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(0, 16, discardFlagUnmap), BlkSOK, [2]int{0, 16}},
		{"write zeroes, zero sectors", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(3, 0, 0), BlkSOK, [2]int{}},
		{"discard with unmap flag", BlkConfig{Discard: true}, BlkTDiscard, discardSeg(4, 4, discardFlagUnmap), BlkSUnsupp, [2]int{}},
		{"unknown flag", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(4, 4, 2), BlkSUnsupp, [2]int{}},
		{"two segments (max is 1)", BlkConfig{Discard: true}, BlkTDiscard, concat(discardSeg(0, 1, 0), discardSeg(4, 1, 0)), BlkSIOErr, [2]int{}},
		{"no segment", BlkConfig{Discard: true}, BlkTDiscard, nil, BlkSIOErr, [2]int{}},
		{"half a segment", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(0, 8, 0)[:8], BlkSIOErr, [2]int{}},
		{"too many sectors", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(0, 1<<22+1, 0), BlkSIOErr, [2]int{}},
		{"beyond capacity", BlkConfig{Discard: true}, BlkTDiscard, discardSeg(2040, 16, 0), BlkSIOErr, [2]int{}},
		{"sector 2^64-1", BlkConfig{Discard: true}, BlkTWriteZeroes, discardSeg(1<<64-1, 1, 0), BlkSIOErr, [2]int{}},
		{"misaligned on a 4k disk", BlkConfig{Discard: true, BlockSize: 4096}, BlkTWriteZeroes, discardSeg(1, 8, 0), BlkSIOErr, [2]int{}},
		{"not enabled", BlkConfig{}, BlkTDiscard, discardSeg(4, 4, 0), BlkSUnsupp, [2]int{}},
		{"write zeroes not enabled", BlkConfig{}, BlkTWriteZeroes, discardSeg(4, 4, 0), BlkSUnsupp, [2]int{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newBlkHarness(t, tt.cfg, false)
			data := pattern(16*512, 11)
			h.do(BlkTOut, 0, data, 0, BlkSOK, 1)
			h.do(tt.typ, 0, tt.payload, 0, tt.want, 1)
			want := append([]byte(nil), data...)
			clear(want[tt.zeroed[0]*512 : tt.zeroed[1]*512])
			s := h.do(BlkTIn, 0, nil, 16*512, BlkSOK, 16*512+1)
			if !bytes.Equal(h.in(s), want) {
				t.Fatalf("after the request the disk reads wrong (zeros expected in sectors %v)", tt.zeroed)
			}
		})
	}
}

// Bad requests are answered with IOERR when there is a status byte to write
// it to; a chain that cannot be answered at all breaks the queue.
func TestBlkDeviceHostileChains(t *testing.T) {
	t.Run("short header gets IOERR", func(t *testing.T) {
		h := newBlkHarness(t, BlkConfig{}, false)
		r := h.r
		st := r.alloc(1)
		s := h.sendChain(st, rbuf(r.put(blkHeader(BlkTOut, 0)), 12), wbuf(st, 1))
		h.check(h.run(), s, BlkSIOErr, 1)
	})
	t.Run("requests after a bad one are still served", func(t *testing.T) {
		h := newBlkHarness(t, BlkConfig{}, false)
		r := h.r
		st := r.alloc(1)
		bad := h.sendChain(st, wbuf(st, 1)) // no header at all
		good := h.send(BlkTIn, 0, nil, 512)
		used := h.run()
		h.check(used, bad, BlkSIOErr, 1)
		h.check(used, good, BlkSOK, 513)
	})
	t.Run("data in the wrong direction is IOERR and touches nothing", func(t *testing.T) {
		// A write's data must be driver-to-device, a read's device-to-driver: no byte of
		// misdirected data may reach the disk or be overwritten, and the guest must not be
		// told OK.
		h := newBlkHarness(t, BlkConfig{}, false)
		r := h.r
		d, st := r.put(pattern(512, 1)), r.alloc(1)
		s := h.sendChain(st, rbuf(r.put(blkHeader(BlkTOut, 0)), 16), wbuf(d, 512), wbuf(st, 1))
		d2, st2 := r.put(pattern(512, 2)), r.alloc(1)
		s2 := h.sendChain(st2, rbuf(r.put(blkHeader(BlkTIn, 0)), 16), rbuf(d2, 512), wbuf(st2, 1))
		used := h.run()
		h.check(used, s, BlkSIOErr, 1)
		h.check(used, s2, BlkSIOErr, 1)
		if !bytes.Equal(h.store.Image(), make([]byte, testDiskSize)) {
			t.Fatal("writable data was written to the disk")
		}
		if !bytes.Equal(r.bytes(d, 512), pattern(512, 1)) || !bytes.Equal(r.bytes(d2, 512), pattern(512, 2)) {
			t.Fatal("the device wrote into misdirected data")
		}
	})

	broken := []struct {
		name      string
		build     func(h *blkHarness)
		want      error
		firstDone bool // the good request published first is answered
	}{
		{"no status byte", func(h *blkHarness) {
			h.r.publish(h.r.addChain(rbuf(h.r.put(blkHeader(BlkTIn, 0)), 16)))
		}, ErrBadRequest, true},
		{"data outside memory", func(h *blkHarness) {
			r := h.r
			st := r.alloc(1)
			h.sendChain(st, rbuf(r.put(blkHeader(BlkTIn, 0)), 16), wbuf(ringGapGPA, 512), wbuf(st, 1))
		}, ErrBadRequest, true},
		{"looped chain", func(h *blkHarness) {
			h.r.setDesc(200, 0x1000, 16, DescFNext, 201)
			h.r.setDesc(201, 0x1000, 16, DescFNext, 200)
			h.r.publish(200)
		}, ErrBadChain, true},
		{"readable after writable", func(h *blkHarness) {
			r := h.r
			st := r.alloc(1)
			h.sendChain(st, wbuf(st, 1), rbuf(r.put(blkHeader(BlkTIn, 0)), 16))
		}, ErrBadChain, true},
		// avail.idx is one number: once it is impossible, even the good
		// request before it cannot be popped.
		{"avail.idx beyond the ring", func(h *blkHarness) { h.r.setAvailIdx(257) }, ErrBrokenRing, false},
		{"head beyond the ring", func(h *blkHarness) { h.r.publish(256) }, ErrBrokenRing, true},
	}
	for _, tt := range broken {
		t.Run(tt.name, func(t *testing.T) {
			h := newBlkHarness(t, BlkConfig{}, false)
			good := h.send(BlkTIn, 0, nil, 512) // popped and answered before the bad one
			tt.build(h)
			err := h.dev.ProcessQueue(h.q)
			if !errors.Is(err, tt.want) {
				t.Fatalf("ProcessQueue: %v, want %v", err, tt.want)
			}
			h.q.Drain() // must not hang: nothing is left in flight
			used := map[uint16]uint32{}
			for _, e := range h.r.takeUsed() {
				used[uint16(e.id)] = e.len
			}
			if !tt.firstDone {
				if len(used) != 0 {
					t.Fatalf("%d used entries from a ring that was broken from the start", len(used))
				}
				return
			}
			h.check(used, good, BlkSOK, 513)
			if len(used) != 1 {
				t.Fatalf("%d used entries, want only the good request", len(used))
			}
		})
	}
}

// Many requests in flight on several lanes: every one completes exactly
// once with the right data (run with -race).
func TestBlkDeviceManyInFlight(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true, Discard: true}, true)
	const n = 64
	writes := make([]sent, n)
	for i := range n {
		writes[i] = h.send(BlkTOut, uint64(i*8), pattern(4096, byte(i)), 0)
	}
	used := h.run()
	if len(used) != n {
		t.Fatalf("%d completions, want %d", len(used), n)
	}
	for _, s := range writes {
		h.check(used, s, BlkSOK, 1)
	}
	reads := make([]sent, n)
	for i := range n {
		reads[i] = h.send(BlkTIn, uint64(i*8), nil, 4096)
	}
	used = h.run()
	for i, s := range reads {
		h.check(used, s, BlkSOK, 4097)
		if !bytes.Equal(h.in(s), pattern(4096, byte(i))) {
			t.Fatalf("read %d returned wrong data", i)
		}
	}
	if h.r.availEvent() != h.r.q.LastAvail() {
		t.Fatalf("avail_event %d, want %d after ProcessQueue", h.r.availEvent(), h.r.q.LastAvail())
	}
}

func TestBlkDeviceNotify(t *testing.T) {
	t.Run("interrupt when asked", func(t *testing.T) {
		h := newBlkHarness(t, BlkConfig{}, false)
		h.do(BlkTFlush, 0, nil, 0, BlkSOK, 1)
		if h.notify.n.Load() != 1 {
			t.Fatalf("%d notifications, want 1", h.notify.n.Load())
		}
		if h.r.usedFlags()&usedFNoNotify != 0 {
			t.Fatal("ProcessQueue left kicks disabled")
		}
	})
	t.Run("NO_INTERRUPT", func(t *testing.T) {
		h := newBlkHarness(t, BlkConfig{}, false)
		h.r.setAvailFlags(availFNoInterrupt)
		h.do(BlkTFlush, 0, nil, 0, BlkSOK, 1)
		h.do(BlkTIn, 0, nil, 512, BlkSOK, 513)
		if h.notify.n.Load() != 0 {
			t.Fatalf("%d notifications despite NO_INTERRUPT", h.notify.n.Load())
		}
	})
	t.Run("EVENT_IDX", func(t *testing.T) {
		h := newBlkHarness(t, BlkConfig{}, true)
		h.r.setUsedEvent(1000)
		for range 5 {
			h.send(BlkTIn, 0, nil, 512)
		}
		h.run()
		if h.notify.n.Load() != 1 { // the first completion always interrupts
			t.Fatalf("%d notifications, want 1", h.notify.n.Load())
		}
		h.r.setUsedEvent(h.r.usedIdx()) // interrupt on the next one
		h.do(BlkTFlush, 0, nil, 0, BlkSOK, 1)
		if h.notify.n.Load() != 2 {
			t.Fatalf("%d notifications, want 2", h.notify.n.Load())
		}
	})
}

func TestBlkDeviceReadConfig(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Capacity: testDiskSize, Writeback: true}, false)
	space := h.dev.cfg.space(true)
	if got := h.dev.ReadConfig(0, 8); !bytes.Equal(got, []byte{0x00, 0x08, 0, 0, 0, 0, 0, 0}) {
		t.Fatalf("capacity bytes %x, want 2048 sectors", got)
	}
	if got := h.dev.ReadConfig(20, 4); !bytes.Equal(got, []byte{0x00, 0x02, 0, 0}) {
		t.Fatalf("blk_size bytes %x", got)
	}
	if got := h.dev.ReadConfig(0, 72); !bytes.Equal(got, space[:]) {
		t.Fatal("whole config space differs from space()")
	}
	if got := h.dev.ReadConfig(68, 16); !bytes.Equal(got, append(append([]byte(nil), space[68:]...), make([]byte, 12)...)) {
		t.Fatalf("read across the end: %x", got)
	}
	if got := h.dev.ReadConfig(1000, 4); !bytes.Equal(got, make([]byte, 4)) {
		t.Fatalf("read beyond the structure: %x", got)
	}
	if got := h.dev.ReadConfig(0xffffffff, 2); !bytes.Equal(got, make([]byte, 2)) {
		t.Fatalf("read at offset 2^32-1: %x", got)
	}
	if got := h.dev.ReadConfig(8, 0); len(got) != 0 {
		t.Fatalf("zero-length read returned %d bytes", len(got))
	}
}

func TestBlkDeviceWriteConfig(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true}, false)
	wb := func() byte { return h.dev.ReadConfig(32, 1)[0] }
	if wb() != 1 || h.engine.WriteThrough() {
		t.Fatalf("start: writeback byte %d, write-through %v", wb(), h.engine.WriteThrough())
	}
	// Bad writes: wrong offset or length, nothing changes.
	for _, bad := range []struct {
		off  uint32
		data []byte
	}{{33, []byte{0}}, {31, []byte{0}}, {32, []byte{0, 0}}, {32, nil}, {0, make([]byte, 8)}} {
		if err := h.dev.WriteConfig(bad.off, bad.data); err == nil {
			t.Errorf("WriteConfig(%d, %x) accepted", bad.off, bad.data)
		}
	}
	if wb() != 1 {
		t.Fatal("a rejected write changed the writeback byte")
	}

	// Switch to write through: earlier cached writes are flushed first.
	h.do(BlkTOut, 0, pattern(512, 1), 0, BlkSOK, 1)
	syncs := h.store.Syncs()
	if err := h.dev.WriteConfig(32, []byte{0}); err != nil {
		t.Fatal(err)
	}
	if wb() != 0 || !h.engine.WriteThrough() {
		t.Fatalf("after writing 0: writeback byte %d, write-through %v", wb(), h.engine.WriteThrough())
	}
	if h.store.Syncs() <= syncs {
		t.Fatal("switching to write-through did not flush")
	}
	// Any non-zero byte is writeback.
	if err := h.dev.WriteConfig(32, []byte{0x80}); err != nil {
		t.Fatal(err)
	}
	if wb() != 1 || h.engine.WriteThrough() {
		t.Fatalf("after writing 0x80: writeback byte %d, write-through %v", wb(), h.engine.WriteThrough())
	}

	// Without VIRTIO_BLK_F_FLUSH the driver cannot flush: write through
	// whatever the byte says.
	h.dev.SetFeatures(h.dev.Features() &^ (1 << BlkFFlush))
	if !h.engine.WriteThrough() {
		t.Fatal("writeback without FLUSH negotiated")
	}
	if err := h.dev.WriteConfig(32, []byte{1}); err != nil || !h.engine.WriteThrough() {
		t.Fatalf("writeback byte set without FLUSH: err %v, write-through %v", err, h.engine.WriteThrough())
	}

	// Without VIRTIO_BLK_F_CONFIG_WCE the byte is read-only.
	h.dev.SetFeatures(h.dev.Features() &^ (1 << BlkFConfigWCE))
	if err := h.dev.WriteConfig(32, []byte{0}); err == nil {
		t.Fatal("writeback byte written without CONFIG_WCE")
	}
	if wb() != 1 {
		t.Fatal("writeback byte changed without CONFIG_WCE")
	}
}

// SetFeatures keeps only offered bits.
func TestBlkDeviceSetFeaturesMasks(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true}, false)
	h.dev.SetFeatures(^uint64(0))
	h.dev.mu.Lock()
	got := h.dev.features
	h.dev.mu.Unlock()
	if got != h.dev.Features() {
		t.Fatalf("acknowledged %#x, offered %#x", got, h.dev.Features())
	}
}

// Errors counts every error status the guest sees, wherever it was decided.
func TestBlkDeviceErrorCounts(t *testing.T) {
	h := newBlkHarness(t, BlkConfig{Writeback: true, Discard: true}, false)
	counts := func() [3]uint64 {
		return [3]uint64{h.dev.Errors(BlkSOK), h.dev.Errors(BlkSIOErr), h.dev.Errors(BlkSUnsupp)}
	}
	h.do(BlkTOut, 0, pattern(512, 7), 0, BlkSOK, 1)
	h.do(BlkTIn, 0, nil, 512, BlkSOK, 513)
	h.do(BlkTGetID, 0, nil, BlkIDBytes, BlkSOK, BlkIDBytes+1)
	if c := counts(); c != [3]uint64{} {
		t.Fatalf("counts after successful requests: %v, want none", c)
	}
	h.do(BlkTIn, testDiskSize/512, nil, 512, BlkSIOErr, 1)                     // beyond the end
	h.do(BlkTDiscard, 0, discardSeg(0, 8, discardFlagUnmap), 0, BlkSUnsupp, 1) // unmap on discard
	h.do(0x1234, 0, nil, 0, BlkSUnsupp, 1)                                     // unknown type
	h.store.SetSyncError(errors.New("EIO"))
	h.do(BlkTFlush, 0, nil, 0, BlkSIOErr, 1) // failed sync
	if c, want := counts(), [3]uint64{0, 2, 2}; c != want {
		t.Errorf("counts (ok, ioerr, unsupp) = %v, want %v", c, want)
	}
	if n := h.dev.Errors(0xff); n != 0 {
		t.Errorf("Errors(0xff) = %d, want 0", n)
	}
}
