package faults

import (
	"bytes"
	"encoding/binary"
	"testing"
	"time"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/vhostuser/frontend"
)

// TestRingsComeBackWhenMemoryIsAddedAgain: the front-end removes its only
// memory region (REM_MEM_REG, as QEMU does before it changes a region) while
// the guest goes on queueing requests, then adds it again (ADD_MEM_REG). The
// rings stopped with the memory; they must start again by themselves, without
// a new SET_VRING_KICK, and answer what was queued meanwhile.
func TestRingsComeBackWhenMemoryIsAddedAgain(t *testing.T) {
	a := startExport(t, "a", backend.NewCrashStore(diskSize), true)
	d := a.connect(t)
	for q := range numQueues {
		if err := d.Queue(q).Write(uint64(q*8), pattern(byte(q), 4096)); err != nil {
			t.Fatal(err)
		}
	}
	regions := d.Memory().Regions()
	if len(regions) != 1 {
		t.Fatalf("the front-end has %d memory regions, want 1", len(regions))
	}
	r := regions[0]
	reg := make([]byte, 8, 40) // padding, then the region
	for _, v := range []uint64{r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset} {
		reg = binary.LittleEndian.AppendUint64(reg, v)
	}
	for round := range 3 {
		ack(t, d.Conn(), vhostuser.RemMemReg, reg, nil)
		// Requests queued while the back-end has no memory wait.
		var pend []*frontend.Pending
		for q := range numQueues {
			p, err := d.Queue(q).Submit(frontend.ReadRequest(uint64(q*8), 4096))
			if err != nil {
				t.Fatal(err)
			}
			pend = append(pend, p)
		}
		time.Sleep(20 * time.Millisecond)
		for q, p := range pend {
			select {
			case <-p.Done():
				t.Fatalf("round %d: queue %d answered a request without memory: %v", round, q, p.Wait().Err)
			default:
			}
		}
		ack(t, d.Conn(), vhostuser.AddMemReg, reg, []int{d.Memory().Fd()})
		for q, p := range pend {
			if res := wait(t, p); res.Err != nil || !bytes.Equal(res.In, pattern(byte(q), 4096)) {
				t.Fatalf("round %d: queue %d read queued while memory was away: %v", round, q, res.Err)
			}
		}
		for q := range numQueues {
			if err := d.Queue(q).Write(uint64(64+q*8), pattern(byte(round), 4096)); err != nil {
				t.Fatalf("round %d: queue %d write after ADD_MEM_REG: %v", round, q, err)
			}
		}
	}
}
