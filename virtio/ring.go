package virtio

// Ring is the device side of one virtqueue, whatever its layout: a split ring (SplitQueue) or
// a packed ring (PackedQueue). The device (BlkDevice) and the lanes see only this.
//
// A chain is named by a token, head: for a split ring the index of its head descriptor, for a
// packed ring its buffer id. Next, Pending, ReadChainLimited, DisableNotify and EnableNotify
// belong to the one goroutine that pops the queue; PushUsed and NeedInterrupt are serialised by
// the caller (completions come from several lanes).
type Ring interface {
	// Size is the number of ring entries.
	Size() int
	// Next pops the next available chain. ok is false when the ring is empty; an impossible
	// ring state is ErrBrokenRing, and the ring must not be touched again.
	Next() (head uint16, ok bool, err error)
	// Pending reports whether Next would find another chain now (or a broken ring).
	Pending() bool
	// ReadChainLimited walks the chain that Next returned as head into c, within lim
	// (SplitQueue.ReadChainLimited says how a chain beyond lim is reported).
	ReadChainLimited(head uint16, c *DescChain, lim ChainLimits) error
	// PushUsed publishes the completion of head, of which the device wrote written bytes.
	PushUsed(head uint16, written uint32)
	// NeedInterrupt reports whether the driver wants an interrupt for what was pushed since
	// the last call.
	NeedInterrupt() bool
	// DisableNotify asks the driver not to kick while the ring is popped.
	DisableNotify()
	// EnableNotify asks for kicks again; true means chains arrived meanwhile and the caller
	// must pop again.
	EnableNotify() (more bool)
	// Base is the ring position to start from again (VHOST_USER_GET_VRING_BASE): for a split
	// ring the next available index, for a packed ring the encoding of PackedBase.
	Base() uint32
}

var (
	_ Ring = (*SplitQueue)(nil)
	_ Ring = (*PackedQueue)(nil)
)

// Base is the next available index (a split ring has no wrap counters; its used index is in
// guest memory).
func (q *SplitQueue) Base() uint32 { return uint32(q.lastAvail) }
