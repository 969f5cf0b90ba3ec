package hostile

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

const (
	sectorSize = virtio.SectorSize
	// maxQueue is the largest split ring, what the attacks use.
	maxQueue = virtio.MaxQueueSize
	// typeUnknown is a virtio-blk request type no device knows.
	typeUnknown = 0x7fff
)

// table is an indirect descriptor table in guest memory, built by hand.
type table struct {
	gpa    uint64
	n      int
	status uint64 // the status byte: the last byte of the last descriptor
}

// desc is the ring descriptor that points at the table.
func (tb table) desc() []frontend.Desc {
	return []frontend.Desc{{Addr: tb.gpa, Len: uint32(16 * tb.n), Flags: virtio.DescFIndirect}}
}

// aliasTable writes the attack's table: a header of type typ for sector 0,
// then segs device-writable descriptors of segLen bytes that all point at one
// buffer (the same sector, again and again), then a status byte.
func aliasTable(t *testing.T, mem *frontend.Memory, typ uint32, segs int, segLen uint32) table {
	t.Helper()
	hdr := alloc(t, mem, 16)
	binary.LittleEndian.PutUint32(hdr.Data, typ)
	data := alloc(t, mem, uint64(max(segLen, sectorSize)))
	st := alloc(t, mem, 1)
	st.Data[0] = 0xff
	n := segs + 2
	tb := alloc(t, mem, uint64(16*n))
	put := func(i int, addr uint64, length uint32, flags uint16) {
		d := tb.Data[16*i:]
		if i+1 < n {
			flags |= virtio.DescFNext
		}
		binary.LittleEndian.PutUint64(d[0:], addr)
		binary.LittleEndian.PutUint32(d[8:], length)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], uint16(i+1))
	}
	put(0, hdr.GPA, 16, 0)
	for i := 1; i <= segs; i++ {
		put(i, data.GPA, segLen, virtio.DescFWrite)
	}
	put(n-1, st.GPA, 1, virtio.DescFWrite)
	return table{gpa: tb.GPA, n: n, status: st.GPA}
}

func alloc(t *testing.T, mem *frontend.Memory, n uint64) frontend.Buffer {
	t.Helper()
	b, err := mem.Alloc(n, 64)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// status reads a status byte from guest memory.
func status(t *testing.T, mem *frontend.Memory, gpa uint64) uint8 {
	t.Helper()
	b, err := mem.Bytes(gpa, 1)
	if err != nil {
		t.Fatal(err)
	}
	return b[0]
}

// hammer keeps q's ring full of chain, as a guest that publishes the same
// head again as soon as it is used: every completion frees the descriptor
// for the next submission. It runs until stop is called, which waits for
// it; the device must be closed (or the ring keep running) for a blocked
// submission to return.
type hammer struct {
	stopc chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	n     int // submitted
}

func startHammer(q *frontend.Queue, chain []frontend.Desc) *hammer {
	h := &hammer{stopc: make(chan struct{})}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		for {
			select {
			case <-h.stopc:
				return
			default:
			}
			if _, err := q.SubmitChain(chain); err != nil {
				return // the device closed
			}
			h.mu.Lock()
			h.n++
			h.mu.Unlock()
		}
	}()
	return h
}

func (h *hammer) submitted() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// waitFor waits until the hammer has submitted n chains.
func (h *hammer) waitFor(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(guard)
	for h.submitted() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the guest submitted %d chains in %v, want %d", h.submitted(), guard, n)
		}
		yield()
	}
}

func (h *hammer) stop() {
	close(h.stopc)
	h.wg.Wait()
}

// yield lets the daemon and the hammers run between polls.
func yield() { time.Sleep(time.Millisecond) }
