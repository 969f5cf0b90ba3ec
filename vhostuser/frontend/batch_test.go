package frontend

import (
	"bytes"
	"errors"
	"io"
	"path/filepath"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// connectTestServer serves an in-process vublk export over a crashable
// in-memory store and connects a Device to it.
func connectTestServer(t *testing.T, size uint64, opt Options) (*Device, *backend.CrashStore) {
	t.Helper()
	store := backend.NewCrashStore(int64(size))
	engine := backend.NewEngine(store, 2)
	log := logrus.New()
	log.SetOutput(io.Discard)
	queues := max(opt.NumQueues, 1)
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{Capacity: size, BlockSize: 512, NumQueues: uint16(queues),
		Serial: "batch", Writeback: true}, log.WithField("export", "batch"))
	srv := vhostuser.NewServer(dev, queues, log.WithField("export", "batch"))
	sock := filepath.Join(t.TempDir(), "batch.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	d, err := Connect(sock, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		d.Close()
		srv.Close()
		<-served
		engine.Close()
	})
	return d, store
}

func TestSubmitBatch(t *testing.T) {
	for _, eventIdx := range []bool{false, true} {
		name := "no event idx"
		if eventIdx {
			name = "event idx"
		}
		t.Run(name, func(t *testing.T) {
			// 16 entries: a batch of 12 three-descriptor requests must wait
			// for descriptors midway, after kicking for what it published.
			d, _ := connectTestServer(t, 1<<20, Options{QueueSize: 16, EventIdx: eventIdx})
			q := d.Queue(0)
			const n, bs = 12, 4096
			slots := make([]*Slot, n)
			for i := range slots {
				s, err := q.NewSlot(bs)
				if err != nil {
					t.Fatal(err)
				}
				slots[i] = s
			}
			data := func(i int) []byte { return bytes.Repeat([]byte{byte(i + 1)}, bs) }

			// Writes, then a flush, each batch with every completion awaited.
			run := func(reqs []SlotRequest) []Result {
				t.Helper()
				res := make([]Result, len(reqs))
				var wg sync.WaitGroup
				for i := range reqs {
					wg.Add(1)
					inLen := reqs[i].InLen
					slot := reqs[i].Slot
					reqs[i].OnComplete = func(r Result) {
						if r.Err == nil && inLen > 0 {
							r.In = append([]byte(nil), slot.In(inLen)...)
						}
						res[i] = r
						wg.Done()
					}
				}
				if err := q.SubmitBatch(reqs); err != nil {
					t.Fatal(err)
				}
				wg.Wait()
				return res
			}
			var writes []SlotRequest
			for i := range n {
				writes = append(writes, SlotRequest{Slot: slots[i], Type: virtio.BlkTOut, Sector: uint64(i * bs / 512), Out: data(i)})
			}
			for i, r := range run(writes) {
				if r.Err != nil || r.Len != 1 || r.In != nil {
					t.Fatalf("write %d: %+v", i, r)
				}
			}
			// Prefilled: slot 1 still holds data(1), so a write from it sends that, not Out
			// (only Out's length counts); a write that is not prefilled copies Out.
			for _, tc := range []struct {
				prefilled bool
				want      []byte
			}{{true, data(1)}, {false, data(99)}} {
				sector := uint64(n * bs / 512)
				if r := run([]SlotRequest{{Slot: slots[1], Type: virtio.BlkTOut, Sector: sector, Out: data(99), Prefilled: tc.prefilled}}); r[0].Err != nil {
					t.Fatalf("write prefilled=%v: %v", tc.prefilled, r[0].Err)
				}
				if got, err := q.Read(sector, bs); err != nil || !bytes.Equal(got, tc.want) {
					t.Fatalf("prefilled=%v: read back the wrong data (%d bytes), err %v", tc.prefilled, len(got), err)
				}
			}
			if r := run([]SlotRequest{{Slot: slots[0], Type: virtio.BlkTFlush}}); r[0].Err != nil {
				t.Fatalf("flush: %v", r[0].Err)
			}
			var reads []SlotRequest
			for i := range n {
				// Read block n-1-i into slot i: slots are reused for other data.
				reads = append(reads, SlotRequest{Slot: slots[i], Type: virtio.BlkTIn, Sector: uint64((n - 1 - i) * bs / 512), InLen: bs})
			}
			for i, r := range run(reads) {
				if r.Err != nil || r.Len != bs+1 || !bytes.Equal(r.In, data(n-1-i)) {
					t.Fatalf("read %d: status %d len %d err %v", i, r.Status, r.Len, r.Err)
				}
			}
			// The plain path still works alongside: a read through Submit
			// sees a write through a slot.
			if got, err := q.Read(0, bs); err != nil || !bytes.Equal(got, data(0)) {
				t.Fatalf("Read after a batch: %v", err)
			}
			// An error status comes back as it does for Submit.
			r := run([]SlotRequest{{Slot: slots[0], Type: virtio.BlkTIn, Sector: 1 << 40, InLen: bs}})
			if !errors.Is(r[0].Err, ErrIOError) {
				t.Fatalf("read beyond the disk: %v", r[0].Err)
			}
			for _, s := range slots {
				s.Free()
			}
		})
	}
}

func TestSubmitBatchRejects(t *testing.T) {
	d, _ := connectTestServer(t, 1<<20, Options{NumQueues: 2})
	q0, q1 := d.Queue(0), d.Queue(1)
	s, err := q0.NewSlot(512)
	if err != nil {
		t.Fatal(err)
	}
	for name, r := range map[string]SlotRequest{
		"no slot":           {Type: virtio.BlkTFlush},
		"another queue's":   {Slot: s, Type: virtio.BlkTFlush},
		"too much out":      {Slot: s, Type: virtio.BlkTOut, Out: make([]byte, 1024)},
		"too much in":       {Slot: s, Type: virtio.BlkTIn, InLen: 1024},
		"both out and in":   {Slot: s, Type: virtio.BlkTIn, Out: make([]byte, 512), InLen: 512},
		"negative capacity": {},
	} {
		q := q0
		if name == "another queue's" {
			q = q1
		}
		if name == "negative capacity" {
			if _, err := q.NewSlot(-1); err == nil {
				t.Errorf("%s: accepted", name)
			}
			continue
		}
		if err := q.SubmitBatch([]SlotRequest{r}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	d.Close()
	if err := q0.SubmitBatch([]SlotRequest{{Slot: s, Type: virtio.BlkTFlush}}); !errors.Is(err, ErrClosed) {
		t.Errorf("SubmitBatch after Close = %v, want ErrClosed", err)
	}
}
