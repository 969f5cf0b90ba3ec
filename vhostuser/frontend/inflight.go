package frontend

import (
	"encoding/binary"
	"fmt"
	"io"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// Inflight I/O tracking as QEMU does it for vhost-user-blk
// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the front-end gets a buffer from
// the back-end once (GET_INFLIGHT_FD), hands it back before every start
// (SET_INFLIGHT_FD), and keeps it when the back-end dies, so that the
// restarted back-end finds the requests that were in flight and resubmits
// them. Device.Reconnect is QEMU's reconnect=1.

// inflightMsgSize is struct VhostUserInflight with its trailing padding.
const inflightMsgSize = 24

// Inflight is the inflight description of GET_INFLIGHT_FD and
// SET_INFLIGHT_FD.
type Inflight struct {
	MmapSize, MmapOffset uint64
	NumQueues, QueueSize uint16
}

func (inf Inflight) encode() []byte {
	p := make([]byte, inflightMsgSize)
	binary.LittleEndian.PutUint64(p[0:], inf.MmapSize)
	binary.LittleEndian.PutUint64(p[8:], inf.MmapOffset)
	binary.LittleEndian.PutUint16(p[16:], inf.NumQueues)
	binary.LittleEndian.PutUint16(p[18:], inf.QueueSize)
	return p
}

// GetInflightFd asks the back-end for an inflight buffer for numQueues
// queues of queueSize entries. It returns the buffer's description and its
// descriptor, which the caller owns; a back-end that has no buffer to give
// answers a size of 0 and no descriptor (fd -1).
func (c *Conn) GetInflightFd(numQueues, queueSize uint16) (Inflight, int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	req := Inflight{NumQueues: numQueues, QueueSize: queueSize}
	if err := c.write(EncodeMessage(vhostuser.GetInflightFd, FlagVersion, req.encode()), nil); err != nil {
		return Inflight{}, -1, err
	}
	r, fds, err := c.readReplyFds()
	closeFds := func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	switch {
	case err != nil:
		return Inflight{}, -1, fmt.Errorf("reading GET_INFLIGHT_FD reply: %w", err)
	case r.Request != vhostuser.GetInflightFd || r.Flags&FlagReply == 0 || len(r.Payload) != inflightMsgSize:
		closeFds()
		return Inflight{}, -1, fmt.Errorf("%w: GET_INFLIGHT_FD answered with %v, flags %#x, %d bytes", ErrBadReply, r.Request, r.Flags, len(r.Payload))
	}
	le := binary.LittleEndian
	inf := Inflight{MmapSize: le.Uint64(r.Payload[0:]), MmapOffset: le.Uint64(r.Payload[8:]),
		NumQueues: le.Uint16(r.Payload[16:]), QueueSize: le.Uint16(r.Payload[18:])}
	switch {
	case inf.MmapSize == 0 && len(fds) == 0:
		return inf, -1, nil
	case len(fds) != 1 || inf.MmapSize == 0:
		closeFds()
		return Inflight{}, -1, fmt.Errorf("%w: GET_INFLIGHT_FD answered %d bytes with %d descriptors", ErrBadReply, inf.MmapSize, len(fds))
	}
	return inf, fds[0], nil
}

// SetInflightFd hands the inflight buffer to the back-end.
func (c *Conn) SetInflightFd(inf Inflight, fd int) error {
	return c.do(vhostuser.SetInflightFd, inf.encode(), []int{fd})
}

// readReplyFds is readReply for a reply that may carry descriptors.
func (c *Conn) readReplyFds() (Reply, []int, error) {
	var hdr [HeaderSize]byte
	oob := make([]byte, unix.CmsgSpace(8*4))
	n, oobn, _, _, err := c.sock.ReadMsgUnix(hdr[:], oob)
	var fds []int
	if oobn > 0 {
		if cmsgs, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
			for _, cm := range cmsgs {
				if got, err := unix.ParseUnixRights(&cm); err == nil {
					fds = append(fds, got...)
				}
			}
		}
	}
	fail := func(err error) (Reply, []int, error) {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return Reply{}, nil, err
	}
	if err != nil {
		return fail(err)
	}
	if n == 0 {
		return fail(io.EOF)
	}
	if _, err := io.ReadFull(c.sock, hdr[n:]); err != nil {
		return fail(err)
	}
	r := Reply{
		Request: vhostuser.Request(binary.LittleEndian.Uint32(hdr[0:])),
		Flags:   binary.LittleEndian.Uint32(hdr[4:]),
	}
	size := binary.LittleEndian.Uint32(hdr[8:])
	if size > maxReplyPayload {
		return fail(fmt.Errorf("%w: %v reply of %d bytes", ErrBadReply, r.Request, size))
	}
	r.Payload = make([]byte, size)
	if _, err := io.ReadFull(c.sock, r.Payload); err != nil {
		return fail(fmt.Errorf("%w: truncated %v reply: %w", ErrBadReply, r.Request, err))
	}
	return r, fds, nil
}

// inflightBuf is the inflight buffer a Device keeps across back-end
// restarts, mapped so that tests can look into it.
type inflightBuf struct {
	desc Inflight
	fd   int
	data []byte // the mapping, from offset 0 of the file
}

// setupInflight gets an inflight buffer and hands it back, as QEMU does
// before it first starts the device.
func (d *Device) setupInflight(numQueues, queueSize int) error {
	inf, fd, err := d.conn.GetInflightFd(uint16(numQueues), uint16(queueSize))
	if err != nil {
		return err
	}
	if fd < 0 {
		return nil // the back-end tracks nothing
	}
	end := inf.MmapOffset + inf.MmapSize
	if end < inf.MmapOffset || end > 1<<40 {
		unix.Close(fd)
		return fmt.Errorf("%w: inflight buffer offset %#x size %#x", ErrBadReply, inf.MmapOffset, inf.MmapSize)
	}
	data, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return fmt.Errorf("map the inflight buffer: %w", err)
	}
	d.inflight = &inflightBuf{desc: inf, fd: fd, data: data}
	return d.conn.SetInflightFd(inf, fd)
}

func (b *inflightBuf) close() error {
	if b == nil {
		return nil
	}
	err := unix.Munmap(b.data)
	if cerr := unix.Close(b.fd); err == nil {
		err = cerr
	}
	return err
}

// InflightPending counts the descriptors the back-end has marked in flight
// in queue i's region of the inflight buffer: requests it popped and has not
// completed. It is -1 without an inflight buffer. Reading the buffer while
// the back-end runs gives a snapshot, good for waiting until the back-end has
// taken what it was given. After Close it is -1.
func (d *Device) InflightPending(i int) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	b := d.inflight
	if b == nil || d.closed || i >= int(b.desc.NumQueues) {
		return -1
	}
	// The back-end lays the buffer out (its regions may have room for
	// more entries than the queue size): split evenly, each region's
	// header says how many states it holds.
	per := b.desc.MmapSize / uint64(b.desc.NumQueues)
	region := b.data[b.desc.MmapOffset+uint64(i)*per:][:per]
	n := 0
	hdr, state := 16, 16
	if d.features&(1<<virtio.FRingPacked) != 0 { // the packed layout: chains, by their head state
		hdr, state = 32, 32
	}
	states := min(int(binary.LittleEndian.Uint16(region[10:])), (len(region)-hdr)/state)
	for j := range states {
		if region[hdr+state*j] != 0 { // after the header, each state's first byte
			n++
		}
	}
	return n
}

// Reconnect connects to a back-end again after the last one went away
// (died, or was restarted) and continues where it left off, as QEMU does
// with -chardev socket,reconnect=N: the same features, the inflight buffer,
// the memory table, and every queue restarted from its used index (the
// back-end that died could not say how far it had popped; with the inflight
// buffer the new one knows). Requests still in flight stay pending and
// complete once the new back-end has resubmitted them. It must not run
// concurrently with other calls on the Device.
func (d *Device) Reconnect(path string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.conn.Close()
	for _, q := range d.queues {
		q.halt() // collects what the old back-end completed
	}
	c, err := Dial(path)
	if err != nil {
		return err
	}
	d.conn = c
	offered, err := c.GetFeatures()
	if err != nil {
		return err
	}
	if d.features&^offered != 0 {
		return fmt.Errorf("%w: features %#x after reconnecting, %#x acknowledged before", ErrNotOffered, offered, d.features)
	}
	pf, err := c.GetProtocolFeatures()
	if err != nil {
		return err
	}
	if d.protocol&^pf != 0 {
		return fmt.Errorf("%w: protocol features %#x after reconnecting, %#x acknowledged before", ErrNotOffered, pf, d.protocol)
	}
	if err := c.SetProtocolFeatures(d.protocol); err != nil {
		return err
	}
	if d.protocol&(1<<vhostuser.ProtocolFMQ) != 0 {
		n, err := c.GetQueueNum()
		if err != nil {
			return err
		}
		if n < uint64(len(d.queues)) {
			return fmt.Errorf("%w: %d queues after reconnecting, %d in use", ErrNotOffered, n, len(d.queues))
		}
	}
	if err := c.SetOwner(); err != nil {
		return err
	}
	if err := c.SetFeatures(d.features); err != nil {
		return err
	}
	if err := d.resumeLogging(); err != nil {
		return err
	}
	if d.inflight != nil {
		if err := c.SetInflightFd(d.inflight.desc, d.inflight.fd); err != nil {
			return err
		}
	}
	fds := make([]int, len(d.mem.Regions()))
	for i := range fds {
		fds[i] = d.mem.Fd()
	}
	if err := c.SetMemTable(d.mem.Regions(), fds); err != nil {
		return err
	}
	for _, q := range d.queues {
		q.base = uint32(q.lastUsed)
		if q.pk != nil {
			q.base = q.packedBase()
		}
		if err := d.startQueue(q); err != nil {
			return err
		}
	}
	return nil
}

// Indices returns the queue's available index (requests made available)
// and the back-end's used index (requests completed): equal when nothing is
// in flight, and never more apart than the queue size. After Close the used
// index is the last one seen.
func (q *Queue) Indices() (avail, used uint16) {
	q.mu.Lock()
	defer q.mu.Unlock()          // Close unmaps the rings only after marking the queue closed under it
	if q.closed || q.pk != nil { // a packed ring's counts are the queue's own
		return q.availIdx, q.lastUsed
	}
	return q.availIdx, load16(q.used, 2)
}
