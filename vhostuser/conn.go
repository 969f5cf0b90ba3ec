package vhostuser

import (
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/virtio"
)

// Device is what a vhost-user back-end serves: a virtio device's features,
// config space and queue processing.
type Device interface {
	// Features are the virtio feature bits the device offers.
	Features() uint64
	// SetFeatures records the features the driver acknowledged.
	SetFeatures(f uint64)
	// ReadConfig returns n bytes of config space at off.
	ReadConfig(off, n uint32) []byte
	// WriteConfig writes the config space at off.
	WriteConfig(off uint32, data []byte) error
	// ProcessQueue pops and starts every available request of q. An error
	// means the ring is broken and must not be processed again.
	ProcessQueue(q *virtio.Queue) error
	// Sync makes every write the device has completed durable on its
	// store (drain, then sync). It runs when the front-end has stopped
	// every ring (a migration's handover, a VM stop), so that another
	// host reading the same storage sees what the guest saw complete.
	Sync() error
}

// conn is the back-end side of one front-end connection. Messages are handled
// one at a time on the connection's goroutine; each started ring has a
// goroutine of its own.
type conn struct {
	sock      *net.UnixConn
	dev       Device
	log       *logrus.Entry
	numQueues int

	features uint64 // acknowledged virtio + vhost-user feature bits
	protocol uint64 // acknowledged protocol features
	regions  []*mappedRegion
	mem      *virtio.GuestMemory
	rings    []*vring
	backend  backendChannel  // SET_BACKEND_REQ_FD: for config change notifications
	inflight *inflightBuffer // SET_INFLIGHT_FD: where the rings track popped chains
	replyFds []int           // descriptors that go with the next reply (GET_INFLIGHT_FD)
	// untrackedLogged: a ring served without inflight tracking was logged.
	untrackedLogged bool
	// rejected logs failed requests, rate-limited: a front-end controls how
	// many it sends.
	rejected *virtio.LimitedLog

	// Dirty logging (dirtylog.go): the mapped log from SET_LOG_BASE, the
	// switch the queues read, and the log it currently logs into.
	logMap    *logMapping
	logger    virtio.DirtyLogger
	logActive *logMapping
	logFd     eventNotifier // SET_LOG_FD; kept and closed, never signalled
	// featuresAcked: SET_FEATURES came since the connection or the last reset.
	featuresAcked bool
	// pollMax bounds how long a ring polls after it ran empty (ringPoll).
	pollMax time.Duration
}

func newConn(sock *net.UnixConn, dev Device, numQueues int, log *logrus.Entry) *conn {
	c := &conn{sock: sock, dev: dev, log: log, numQueues: numQueues, rings: make([]*vring, numQueues),
		rejected: virtio.NewLimitedLog(log, logrus.WarnLevel, "failed vhost-user requests")}
	for i := range c.rings {
		c.rings[i] = newVring(i)
	}
	return c
}

// serve handles messages until the front-end disconnects or breaks the
// protocol, then releases everything the connection holds.
func (c *conn) serve() {
	defer c.cleanup()
	for {
		m, err := ReadMessage(c.sock)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, unix.ECONNRESET) {
				c.log.Info("front-end disconnected")
			} else {
				c.log.WithError(err).Error("reading vhost-user message; closing the connection")
			}
			return
		}
		if err := c.handle(m); err != nil {
			c.log.WithError(err).WithField("request", m.Request.String()).Error("closing the connection")
			return
		}
	}
}

// handle runs one message: check descriptors, decode, dispatch, reply. It
// returns an error only when the connection must be closed.
//
// What closes the connection (each place says why next to it): an
// ErrProtocol (the stream cannot be followed, a request we do not know, a
// feature acknowledged that was not offered), and a request with a reply of
// its own that fails (the front-end waits for an answer we cannot give).
// Anything else a front-end gets wrong is refused (ErrRejected, or the
// request's own error): the request changes nothing, a REPLY_ACK says it
// failed, the failure is logged (rate-limited) and the connection goes on.
// Where the spec allows something we did not expect (a ring larger than the
// inflight buffer), we serve it.
func (c *conn) handle(m *Message) error {
	defer m.Close()
	log := c.log.WithField("request", m.Request.String())
	log.Debug("message")
	reply, own, err := c.dispatch(m)
	if errors.Is(err, ErrProtocol) {
		if m.NeedReply() && !own {
			c.send(m.Request, u64Payload(1))
		}
		return err
	}
	if err != nil {
		c.rejected.Log(logrus.Fields{"request": m.Request.String(), "error": err.Error()}, "request failed")
	}
	if own {
		if err != nil {
			// Closing: a request with a reply of its own has no way to
			// report failure, and the front-end waits for the reply.
			return err
		}
		return c.send(m.Request, reply)
	}
	if m.NeedReply() && c.protocol&(1<<ProtocolFReplyAck) != 0 {
		status := uint64(0)
		if err != nil {
			status = 1
		}
		return c.send(m.Request, u64Payload(status))
	}
	return nil
}

func (c *conn) send(req Request, payload []byte) error {
	b := encodeReply(req, payload)
	var err error
	if fds := c.replyFds; len(fds) > 0 {
		c.replyFds = nil
		var n int
		n, _, err = c.sock.WriteMsgUnix(b, unix.UnixRights(fds...), nil)
		if err == nil && n < len(b) {
			_, err = c.sock.Write(b[n:]) // the descriptors went with the first part
		}
		for _, fd := range fds {
			unix.Close(fd) // the front-end has its own copies now
		}
	} else {
		_, err = c.sock.Write(b)
	}
	if err != nil {
		return fmt.Errorf("writing %v reply: %w", req, err)
	}
	return nil
}

// noFds checks that a message that carries no descriptors came without any.
func noFds(m *Message) error { return m.wantFds(0) }

// dispatch handles one message. own is true for requests that have a reply of
// their own (which then is reply); for the others a REPLY_ACK is sent if
// asked for.
func (c *conn) dispatch(m *Message) (reply []byte, own bool, err error) {
	switch m.Request {
	case SetMemTable, AddMemReg, RemMemReg, SetVringKick, SetVringCall, SetVringErr, SetBackendReqFd, SetInflightFd,
		SetLogBase, SetLogFd:
		// these check their descriptors themselves
	default:
		if err := noFds(m); err != nil {
			return nil, hasOwnReply(m.Request), err
		}
	}
	switch m.Request {
	case GetFeatures, GetProtocolFeatures, GetQueueNum, GetMaxMemSlots:
		if err := m.wantSize(0); err != nil {
			return nil, true, err
		}
		var v uint64
		switch m.Request {
		case GetFeatures:
			v = c.offeredFeatures()
		case GetProtocolFeatures:
			v = offeredProtocolFeatures
		case GetQueueNum:
			v = uint64(c.numQueues)
		case GetMaxMemSlots:
			v = maxMemSlots
		}
		return u64Payload(v), true, nil
	case SetFeatures:
		return nil, false, c.setFeatures(m)
	case SetProtocolFeatures:
		v, err := m.U64()
		if err != nil {
			return nil, false, err
		}
		if v&^offeredProtocolFeatures != 0 {
			// Closing: the front-end would go on using a protocol
			// feature we do not implement (messages we cannot answer,
			// layouts we do not know); the spec lets it acknowledge only
			// what was offered.
			return nil, false, fmt.Errorf("%w: protocol features %#x were not offered", ErrProtocol, v)
		}
		c.protocol = v
		return nil, false, nil
	case SetOwner:
		return nil, false, m.wantSize(0)
	case ResetOwner, ResetDevice:
		if len(m.Payload) != 0 && len(m.Payload) != 8 { // some front-ends send a zero u64
			return nil, false, m.wantSize(0)
		}
		c.reset()
		return nil, false, nil
	case SetMemTable:
		return nil, false, c.setMemTable(m)
	case AddMemReg:
		return nil, false, c.addMemReg(m)
	case RemMemReg:
		return nil, false, c.remMemReg(m)
	case SetVringNum, SetVringBase, SetVringEnable:
		return nil, false, c.setVringState(m)
	case SetVringAddr:
		return nil, false, c.setVringAddr(m)
	case GetVringBase:
		st, err := m.VringState()
		if err != nil {
			return nil, true, err
		}
		v, err := c.ring(st.Index)
		if err != nil {
			return nil, true, err
		}
		c.stopRing(v)
		c.cleanPackedInflight(v) // the front-end learns the base from the reply
		v.closeKick()
		v.enabled.Store(false)
		c.log.WithFields(logrus.Fields{"queue": v.index, "base": v.base}).Debug("ring stopped")
		if err := c.handover(); err != nil {
			return nil, true, err
		}
		p := make([]byte, 8)
		putVringState(p, st.Index, v.base)
		return p, true, nil
	case SetVringKick, SetVringCall, SetVringErr:
		return nil, false, c.setVringFile(m)
	case GetConfig:
		cfg, err := m.Config()
		if err != nil {
			return nil, true, err
		}
		data := c.dev.ReadConfig(cfg.Offset, cfg.Size)
		p := slices.Clone(m.Payload[:12])
		return append(p, data...), true, nil
	case SetBackendReqFd:
		if err := m.wantFds(1); err != nil {
			return nil, false, err
		}
		if len(m.Payload) != 0 && len(m.Payload) != 8 { // QEMU sends a u64 of zero
			return nil, false, m.wantSize(0)
		}
		if c.protocol&(1<<ProtocolFBackendReq) == 0 {
			return nil, false, fmt.Errorf("%w: SET_BACKEND_REQ_FD without VHOST_USER_PROTOCOL_F_BACKEND_REQ", ErrRejected)
		}
		return nil, false, c.backend.set(m.TakeFd(0), c.protocol&(1<<ProtocolFReplyAck) != 0)
	case SetConfig:
		cfg, err := m.Config()
		if err != nil {
			return nil, false, err
		}
		return nil, false, c.dev.WriteConfig(cfg.Offset, cfg.Data)
	case GetInflightFd:
		reply, err := c.getInflightFd(m)
		return reply, true, err
	case SetLogBase:
		// The back-end answers once it logs into the new log
		// (vhost-user.rst: SET_LOG_BASE has a reply with LOG_SHMFD).
		return u64Payload(0), true, c.setLogBase(m)
	case SetLogFd:
		if err := m.wantFds(1); err != nil {
			return nil, false, err
		}
		if err := m.wantSize(0); err != nil && len(m.Payload) != 8 {
			return nil, false, err
		}
		c.logFd.set(m.TakeFd(0), "log-fd")
		return nil, false, nil
	case SetInflightFd:
		return nil, false, c.setInflightFd(m)
	}
	// Closing: a request we do not know may be one the front-end waits on
	// for an answer we cannot give (it would hang); a NACK is no answer to
	// a request that has a reply of its own. Every request of a feature we
	// offer is handled above.
	return nil, false, fmt.Errorf("%w: unsupported request %v", ErrProtocol, m.Request)
}

// hasOwnReply reports whether the front-end waits for a reply of req's own
// (not a REPLY_ACK): such a request that fails cannot be answered.
func hasOwnReply(req Request) bool {
	switch req {
	case GetFeatures, GetProtocolFeatures, GetQueueNum, GetMaxMemSlots, GetVringBase, GetConfig, GetInflightFd, SetLogBase:
		return true
	}
	return false
}

func putVringState(p []byte, index, num uint32) {
	p[0], p[1], p[2], p[3] = byte(index), byte(index>>8), byte(index>>16), byte(index>>24)
	p[4], p[5], p[6], p[7] = byte(num), byte(num>>8), byte(num>>16), byte(num>>24)
}

func (c *conn) ring(index uint32) (*vring, error) {
	if index >= uint32(len(c.rings)) {
		return nil, fmt.Errorf("%w: queue index %d, the device has %d", ErrRejected, index, len(c.rings))
	}
	return c.rings[index], nil
}

// vhostFeatures are the feature bits of the vhost-user layer, not the device's.
const vhostFeatures = 1<<FProtocolFeatures | 1<<FLogAll

func (c *conn) offeredFeatures() uint64 { return c.dev.Features() | vhostFeatures }

func (c *conn) setFeatures(m *Message) error {
	v, err := m.U64()
	if err != nil {
		return err
	}
	offered := c.offeredFeatures()
	if v&^offered != 0 {
		// Closing: the driver would run the rings with a feature we do
		// not implement (a packed ring read as a split one would be
		// misparsed); virtio 1.2 2.2: the driver MUST NOT accept a
		// feature the device did not offer.
		return fmt.Errorf("%w: features %#x were not offered", ErrProtocol, v&^offered)
	}
	// A SET_FEATURES that only turns VHOST_F_LOG_ALL on or off (a migration
	// starting or ending while the guest runs) leaves the device alone: its
	// cache mode, which the guest may have changed, stays as it is.
	logToggle := c.featuresAcked && v != c.features && (v^c.features)&^(1<<FLogAll) == 0
	c.features, c.featuresAcked = v, true
	if !logToggle {
		c.dev.SetFeatures(v &^ vhostFeatures)
	}
	c.updateLogging()
	c.log.WithField("features", fmt.Sprintf("%#x", v)).Debug("features acknowledged")
	return nil
}

func (c *conn) eventIdx() bool { return c.features&(1<<virtio.FRingEventIdx) != 0 }

// packed reports whether the driver acknowledged VIRTIO_F_RING_PACKED: every ring is packed.
func (c *conn) packed() bool { return c.features&(1<<virtio.FRingPacked) != 0 }

func (c *conn) setVringState(m *Message) error {
	st, err := m.VringState()
	if err != nil {
		return err
	}
	v, err := c.ring(st.Index)
	if err != nil {
		return err
	}
	switch m.Request {
	case SetVringNum:
		// A packed ring's size need not be a power of two (virtio 1.2, 2.8); the features are
		// acknowledged before the rings are set up.
		if st.Num == 0 || st.Num > virtio.MaxQueueSize || (!c.packed() && st.Num&(st.Num-1) != 0) {
			return fmt.Errorf("%w: queue size %d", ErrRejected, st.Num)
		}
		if v.started() {
			return fmt.Errorf("queue %d: SET_VRING_NUM while the ring runs", v.index)
		}
		v.num = int(st.Num)
	case SetVringBase:
		// Packed rings: both positions and wrap counters (virtio.PackedBase); split rings: the
		// next available index.
		if !c.packed() && st.Num > 0xffff {
			return fmt.Errorf("%w: vring base %#x of a split ring", ErrRejected, st.Num)
		}
		if v.started() {
			return fmt.Errorf("queue %d: SET_VRING_BASE while the ring runs", v.index)
		}
		v.base = st.Num
	case SetVringEnable:
		if st.Num > 1 {
			return fmt.Errorf("%w: SET_VRING_ENABLE %d", ErrRejected, st.Num)
		}
		v.enabled.Store(st.Num == 1)
		v.poke()
	}
	return nil
}

func (c *conn) setVringAddr(m *Message) error {
	a, err := m.VringAddr()
	if err != nil {
		return err
	}
	v, err := c.ring(a.Index)
	if err != nil {
		return err
	}
	running := v.started()
	c.stopRing(v)
	v.addr, v.addrSet = a, true
	if running {
		return c.startRing(v)
	}
	return nil
}

func (c *conn) setVringFile(m *Message) error {
	index, hasFd, err := m.VringFile()
	if err != nil {
		return err
	}
	v, err := c.ring(index)
	if err != nil {
		return err
	}
	fd := -1
	if hasFd {
		fd = m.TakeFd(0)
	}
	switch m.Request {
	case SetVringCall:
		return v.call.set(fd, "vring-call")
	case SetVringErr:
		return v.err.set(fd, "vring-err")
	case SetVringKick:
		// The ring starts when it gets a kick descriptor (vhost-user.rst,
		// "Starting and stopping rings").
		c.stopRing(v)
		v.closeKick()
		v.kick = fd
		if fd < 0 {
			return fmt.Errorf("queue %d: polling mode (no kick descriptor) is not supported", v.index)
		}
		if c.features&(1<<FProtocolFeatures) == 0 {
			v.enabled.Store(true) // without protocol features rings start enabled
		}
		return c.startRing(v)
	}
	return nil
}

// startRing maps the ring and starts its goroutine.
func (c *conn) startRing(v *vring) error {
	switch {
	case v.kick < 0:
		return nil // not started yet: it starts with its kick descriptor
	case c.mem == nil:
		return fmt.Errorf("queue %d: no memory table", v.index)
	case v.num == 0 || !v.addrSet:
		return fmt.Errorf("queue %d: size or addresses not set", v.index)
	}
	addrs := virtio.RingAddrs{Desc: v.addr.Desc, Avail: v.addr.Avail, Used: v.addr.Used}
	var (
		ring    virtio.Ring
		resumed bool
		used    any
	)
	if c.packed() {
		// SET_VRING_ADDR's avail and used are the driver and device areas.
		pq, err := virtio.NewPackedQueue(c.mem, v.num, addrs, c.eventIdx(), v.base)
		if err != nil {
			return fmt.Errorf("queue %d: %w", v.index, err)
		}
		if resumed, err = c.resumePackedInflight(v, pq); err != nil {
			v.err.Notify()
			return fmt.Errorf("queue %d: %w", v.index, err)
		}
		if v.addr.Flags&VringFLog != 0 {
			pq.SetUsedLog(&c.logger)
		}
		ring, used = pq, fmt.Sprintf("%#x", pq.Base()>>16)
	} else {
		sq, err := virtio.NewSplitQueue(c.mem, v.num, addrs, c.eventIdx(), uint16(v.base))
		if err != nil {
			return fmt.Errorf("queue %d: %w", v.index, err)
		}
		if resumed, err = c.resumeInflight(v, sq); err != nil {
			// The ring does not start: resubmitting from a region we cannot
			// read, or running without it, could complete a chain the guest
			// already saw completed. The other queues and the connection go
			// on; the front-end hears of it by the NACK and the error fd.
			v.err.Notify()
			return fmt.Errorf("queue %d: %w", v.index, err)
		}
		if v.addr.Flags&VringFLog != 0 {
			sq.SetUsedLog(&c.logger, v.addr.Log)
		}
		ring, used = sq, sq.UsedIdx()
	}
	kick, err := newKickWaiter(v.kick)
	if err != nil {
		return fmt.Errorf("queue %d: %w", v.index, err)
	}
	v.q = &virtio.Queue{Index: v.index, Ring: ring, Mem: c.mem, Notify: &v.call, Log: &c.logger}
	v.waiter = kick
	v.broken.Store(false)
	v.done = make(chan struct{})
	c.log.WithFields(logrus.Fields{"queue": v.index, "size": v.num, "base": v.base, "used": used, "packed": c.packed()}).Debug("ring started")
	go c.runRing(v, v.q, kick, v.done, resumed)
	return nil
}

// runRing is the goroutine of a started ring: it waits for kicks and pokes
// and processes the ring while it is enabled. A ring resumed from the
// inflight buffer interrupts the driver once when it first runs: the back-end
// that died may have published used elements without the interrupt.
func (c *conn) runRing(v *vring, q *virtio.Queue, kick *kickWaiter, done chan struct{}, resumed bool) {
	defer close(done)
	log := c.log.WithField("queue", v.index)
	poll := ringPoll{max: c.pollMax}
	// ready tells the kick waiter whether to skip waiting: a stop, or buffers
	// made available before the wait began.
	ready := func() bool {
		return v.stopping.Load() || (v.enabled.Load() && !v.broken.Load() && q.Pending())
	}
	for {
		// Process first: buffers may have been made available before the
		// kick descriptor was set, or while the ring was disabled.
		if v.enabled.Load() && !v.broken.Load() {
			if err := c.dev.ProcessQueue(q); err != nil {
				log.WithError(err).Error("virtqueue is broken; the guest must reset the device")
				v.broken.Store(true)
				v.err.Notify()
			}
			if resumed {
				resumed = false
				v.call.Notify()
			}
		}
		// Poll for the driver's next request before sleeping (ringPoll).
		var idle time.Duration
		if poll.cur > 0 && v.enabled.Load() && !v.broken.Load() && !v.stopping.Load() {
			t0 := time.Now()
			if q.Poll(poll.cur, v.stopping.Load) {
				continue
			}
			idle = time.Since(t0)
		}
		t0 := time.Now()
		if err := kick.wait(ready); err != nil {
			log.WithError(err).Error("kick descriptor failed; waiting for the ring to be stopped")
			kick.waitPoke()
		}
		if v.stopping.Load() {
			return
		}
		poll.idled(idle + time.Since(t0))
	}
}

// stopRing stops the ring's goroutine and waits until every request it
// popped has completed, so that v.base is the next index to pop and the used
// ring is up to date (GET_VRING_BASE).
func (c *conn) stopRing(v *vring) {
	if !v.started() {
		return
	}
	v.stopping.Store(true)
	v.poke()
	<-v.done
	v.q.Drain()
	v.base = v.q.Ring.Base()
	v.waiter.close()
	v.waiter, v.q, v.done = nil, nil, nil
	v.stopping.Store(false)
}

// handover runs after GET_VRING_BASE stopped a ring: once no ring runs any
// more (the front-end stopped the device, as the source of a migration does
// before the switch-over), every write the guest saw complete is made
// durable before the reply, so that a back-end on another host that opens
// the same storage next sees it. A failed sync cannot be reported in a
// GET_VRING_BASE reply; the connection is closed instead, which the
// front-end sees as a failed stop.
func (c *conn) handover() error {
	for _, v := range c.rings {
		if v.started() {
			return nil
		}
	}
	if err := c.dev.Sync(); err != nil {
		return fmt.Errorf("syncing the store after the device was stopped: %w", err)
	}
	c.log.Debug("device stopped: in-flight requests drained, store synced")
	return nil
}

// stopAll stops every started ring and returns them, for restarting.
func (c *conn) stopAll() []*vring {
	var stopped []*vring
	for _, v := range c.rings {
		if v.started() {
			c.stopRing(v)
			stopped = append(stopped, v)
		}
	}
	return stopped
}

// replaceMemory swaps the memory table: the rings are stopped and drained
// first, so no lane is using the old mappings when they are unmapped. On error
// the new regions were not installed and the caller still owns them.
func (c *conn) replaceMemory(regions []*mappedRegion) error {
	mem, err := buildMemory(regions)
	if err != nil {
		return err
	}
	c.installMemory(regions, mem)
	return nil
}

// installMemory swaps in a checked memory table and restarts the rings that
// ran; a ring that cannot be restarted on the new table stays stopped.
func (c *conn) installMemory(regions []*mappedRegion, mem *virtio.GuestMemory) {
	stopped := c.stopAll()
	old := c.regions
	c.regions, c.mem = regions, mem
	// Rings stopped when the last region was removed start again too: the
	// front-end does not send their kick descriptors again.
	for _, v := range c.rings {
		if v.waitMem && !v.started() {
			stopped = append(stopped, v)
		}
		v.waitMem = false
	}
	for _, v := range stopped {
		if err := c.startRing(v); err != nil {
			c.log.WithError(err).WithField("queue", v.index).Error("ring not restarted after the memory table changed")
		}
	}
	for _, r := range old {
		if !slices.Contains(regions, r) {
			r.unmap()
		}
	}
}

func (c *conn) setMemTable(m *Message) error {
	table, err := m.MemTable()
	if err != nil {
		return err
	}
	regions := make([]*mappedRegion, 0, len(table))
	for i, r := range table {
		mr, err := mapRegion(r, m.TakeFd(i))
		if err != nil {
			unmapAll(regions)
			return err
		}
		regions = append(regions, mr)
	}
	if err := c.replaceMemory(regions); err != nil {
		unmapAll(regions)
		return err
	}
	c.log.WithField("regions", len(regions)).Debug("memory table set")
	return nil
}

func (c *conn) addMemReg(m *Message) error {
	if err := m.wantFds(1); err != nil {
		return err
	}
	r, err := m.MemReg()
	if err != nil {
		return err
	}
	if len(c.regions) >= maxMemSlots {
		return fmt.Errorf("%w: more than %d memory regions", ErrRejected, maxMemSlots)
	}
	mr, err := mapRegion(r, m.TakeFd(0))
	if err != nil {
		return err
	}
	if err := c.replaceMemory(append(slices.Clone(c.regions), mr)); err != nil {
		mr.unmap()
		return err
	}
	return nil
}

func (c *conn) remMemReg(m *Message) error {
	if len(m.Fds) > 1 {
		return m.wantFds(1)
	}
	r, err := m.MemReg()
	if err != nil {
		return err
	}
	i := slices.IndexFunc(c.regions, func(x *mappedRegion) bool {
		return x.GuestPhysAddr == r.GuestPhysAddr && x.MemorySize == r.MemorySize && x.UserspaceAddr == r.UserspaceAddr
	})
	if i < 0 {
		return fmt.Errorf("REM_MEM_REG: no region at gpa %#x size %#x", r.GuestPhysAddr, r.MemorySize)
	}
	regions := slices.Delete(slices.Clone(c.regions), i, i+1)
	if len(regions) == 0 {
		stopped := c.stopAll()
		for _, v := range stopped {
			v.waitMem = true
			c.log.WithField("queue", v.index).Info("ring stopped until memory is added again: its memory was removed")
		}
		unmapAll(c.regions)
		c.regions, c.mem = nil, nil
		return nil
	}
	return c.replaceMemory(regions)
}

// reset returns every ring to its initial state (RESET_OWNER, RESET_DEVICE).
// The memory table stays: the front-end sends it again when it restarts.
func (c *conn) reset() {
	c.stopAll()
	for i, v := range c.rings {
		v.closeKick()
		v.call.set(-1, "")
		v.err.set(-1, "")
		c.rings[i] = newVring(i)
	}
	c.dropInflight() // the front-end gets a new buffer for the reset device
	c.features, c.featuresAcked = 0, false
	c.dropLog()
	c.dev.SetFeatures(0)
	c.log.Info("device reset")
}

// cleanup releases everything when the connection ends.
func (c *conn) cleanup() {
	c.stopAll()
	for _, v := range c.rings {
		v.closeKick()
		v.call.set(-1, "")
		v.err.set(-1, "")
	}
	unmapAll(c.regions)
	c.regions, c.mem = nil, nil
	c.dropInflight()
	c.dropLog()
	c.backend.close()
	c.sock.Close()
	c.log.Debug("connection released: requests drained, memory unmapped, descriptors closed")
}
