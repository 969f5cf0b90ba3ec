package frontend

import (
	"encoding/binary"
	"fmt"

	"github.com/vublk/vublk/virtio"
)

// The driver side of a packed virtqueue (virtio 1.2, 2.8): the queue writes each chain at its
// next ring position, the head's id and flags last and in one store, and reads used
// descriptors at its used position, skipping each chain's length. Buffer ids come from a free
// list; completions may come in any order.
const (
	packedFAvail = 1 << 7
	packedFUsed  = 1 << 15
	wrapBit      = 1 << 15

	eventEnable  = 0
	eventDisable = 1
	eventDesc    = 2
)

// packedState is the part of a Queue only a packed ring has.
type packedState struct {
	driver, device []byte // event suppression areas: ours, the back-end's
	next, usedPos  uint16
	nextWrap       bool
	usedWrap       bool
	freeIDs        []uint16
	freeSlots      int
	chainLen       []uint16 // ring descriptors of each id in flight
}

// packedLayout returns the offsets of the driver and device areas and the total size.
func packedLayout(size int) (driverOff, deviceOff, total int) {
	driverOff = int(roundUp(uint64(descSize*size), minAlign))
	deviceOff = driverOff + minAlign
	return driverOff, deviceOff, deviceOff + minAlign
}

func (q *Queue) initPacked() {
	driverOff, deviceOff, _ := packedLayout(int(q.size))
	p := &packedState{
		driver: q.rings.Data[driverOff : driverOff+4], device: q.rings.Data[deviceOff : deviceOff+4],
		nextWrap: true, usedWrap: true, freeSlots: int(q.size), chainLen: make([]uint16, q.size),
	}
	for i := int(q.size) - 1; i >= 0; i-- {
		p.freeIDs = append(p.freeIDs, uint16(i))
	}
	q.pk = p
	q.base = virtio.InitialPackedBase
}

func availFlags(wrap bool) uint16 {
	if wrap {
		return packedFAvail
	}
	return packedFUsed
}

// publishPackedLocked is publishLocked for a packed ring.
func (q *Queue) publishPackedLocked(chain []Desc, p *Pending) error {
	pk := q.pk
	n := len(chain)
	for (pk.freeSlots < n || len(pk.freeIDs) == 0) && !q.closed {
		q.space.Wait()
	}
	if q.closed {
		return ErrClosed
	}
	head, headWrap := pk.next, pk.nextWrap
	q.putPackedLocked(chain, p)
	if q.kick != nil && q.needKickPacked(head, headWrap, n) {
		q.kicks.Add(1)
		q.kick.Write(eventOne)
	}
	return nil
}

// putPackedLocked writes chain at the next ring position and makes it available, without a
// kick. There is room for it.
func (q *Queue) putPackedLocked(chain []Desc, p *Pending) {
	pk := q.pk
	n := len(chain)
	id := pk.freeIDs[len(pk.freeIDs)-1]
	pk.freeIDs = pk.freeIDs[:len(pk.freeIDs)-1]
	pk.freeSlots -= n
	pk.chainLen[id] = uint16(n)
	q.inflight[id] = p
	head := pk.next
	var headFlags uint16
	for i, c := range chain {
		flags := c.Flags | availFlags(pk.nextWrap)
		if i+1 < n {
			flags |= virtio.DescFNext
		}
		d := q.desc[descSize*int(pk.next):]
		binary.LittleEndian.PutUint64(d[0:], c.Addr)
		binary.LittleEndian.PutUint32(d[8:], c.Len)
		if i == 0 {
			headFlags = flags
		} else {
			binary.LittleEndian.PutUint16(d[12:], id)
			binary.LittleEndian.PutUint16(d[14:], flags)
		}
		if pk.next++; pk.next == q.size {
			pk.next, pk.nextWrap = 0, !pk.nextWrap
		}
	}
	// The head last, id and flags together: this makes the chain available.
	store32(q.desc, descSize*int(head)+12, uint32(id)|uint32(headFlags)<<16)
	q.availIdx++
}

// submitBatchPacked is SubmitBatch for a packed ring: each chain is made available as it is
// written, and one kick at most covers the batch (or what was written before a wait for room).
func (q *Queue) submitBatchPacked(reqs []SlotRequest) error {
	pk := q.pk
	q.mu.Lock()
	defer q.mu.Unlock()
	old, oldWrap, count := pk.next, pk.nextWrap, 0
	announce := func() {
		if count > 0 && !q.closed && q.kick != nil && q.needKickPacked(old, oldWrap, count) {
			q.kicks.Add(1)
			q.kick.Write(eventOne)
		}
		old, oldWrap, count = pk.next, pk.nextWrap, 0
	}
	defer announce()
	for i := range reqs {
		r := &reqs[i]
		chain, p := q.slotChainLocked(r)
		for (pk.freeSlots < len(chain) || len(pk.freeIDs) == 0) && !q.closed {
			announce()
			q.space.Wait()
		}
		if q.closed {
			return ErrClosed
		}
		q.putPackedLocked(chain, p)
		count += len(chain)
	}
	return nil
}

// needKickPacked reports whether the back-end asked to be kicked for the n descriptors made
// available from old (virtio 1.2, 2.8.10).
func (q *Queue) needKickPacked(old uint16, oldWrap bool, n int) bool {
	w := load32(q.pk.device, 0)
	offWrap, flags := uint16(w), uint16(w>>16)
	if flags != eventDesc || !q.eventIdx {
		return flags != eventDisable
	}
	// positions as if the ring were laid out lap after lap, from old's lap
	event := int(offWrap &^ wrapBit)
	if (offWrap&wrapBit != 0) != oldWrap {
		event += int(q.size)
	}
	// the event lies in [old, old+n)
	return event >= int(old) && event < int(old)+n
}

// collectPacked is collect for a packed ring.
func (q *Queue) collectPacked() {
	pk := q.pk
	for {
		for {
			w := load32(q.desc, descSize*int(pk.usedPos)+12)
			id, flags := uint16(w), uint16(w>>16)
			if (flags&packedFAvail != 0) != pk.usedWrap || (flags&packedFUsed != 0) != pk.usedWrap {
				break
			}
			length := binary.LittleEndian.Uint32(q.desc[descSize*int(pk.usedPos)+8:])
			q.mu.Lock()
			var n uint16
			if id < q.size && q.inflight[id] != nil {
				n = pk.chainLen[id]
			}
			q.mu.Unlock()
			if n == 0 {
				q.fail(fmt.Errorf("%w: queue %d: used descriptor at %d for buffer %d, which is not in flight", ErrQueueFailed, q.index, pk.usedPos, id))
				return
			}
			p := int(pk.usedPos) + int(n)
			if p >= int(q.size) {
				p -= int(q.size)
				pk.usedWrap = !pk.usedWrap
			}
			pk.usedPos = uint16(p)
			q.lastUsed++
			q.complete(uint32(id), length)
		}
		if !q.eventIdx {
			return
		}
		// ask for an interrupt at the next used position, then look again
		store32(pk.driver, 0, uint32(pk.usedPos)|boolBit(pk.usedWrap)|eventDesc<<16)
		w := load32(q.desc, descSize*int(pk.usedPos)+12)
		if flags := uint16(w >> 16); (flags&packedFAvail != 0) != pk.usedWrap || (flags&packedFUsed != 0) != pk.usedWrap {
			return
		}
	}
}

func boolBit(wrap bool) uint32 {
	if wrap {
		return wrapBit
	}
	return 0
}

// releasePackedLocked frees the ring descriptors and id of a completed chain. q.mu is held.
func (q *Queue) releasePackedLocked(id uint16) {
	q.pk.freeSlots += int(q.pk.chainLen[id])
	q.pk.chainLen[id] = 0
	q.pk.freeIDs = append(q.pk.freeIDs, id)
}

// packedBase is where the back-end goes on after a reconnect without inflight tracking: at the
// position of the oldest request in flight, as used (what completed is known).
func (q *Queue) packedBase() uint32 {
	return virtio.PackedBase(q.pk.usedPos, q.pk.usedWrap, q.pk.usedPos, q.pk.usedWrap)
}
