package frontend

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/vhostuser"
)

// Message header layout and flags (vhost-user.rst, "Header").
const (
	// HeaderSize is the size of a message header: request, flags, size.
	HeaderSize = 12
	// FlagVersion is the protocol version, in the low two bits of flags.
	FlagVersion = 0x1
	// FlagReply marks a message from the back-end answering one of ours.
	FlagReply = 1 << 2
	// FlagNeedReply asks the back-end for a REPLY_ACK.
	FlagNeedReply = 1 << 3
)

// maxReplyPayload bounds the payload of a reply we accept; the largest
// legitimate one is a GET_CONFIG answer (12 + 256 bytes).
const maxReplyPayload = 4096

// Conn is the front-end side of a vhost-user connection: it encodes
// messages, sends them with their file descriptors and reads the replies.
// One exchange runs at a time; Conn is safe for concurrent use.
//
// The typed methods (GetFeatures, SetVringAddr, ...) each send one message
// as QEMU does. Once REPLY_ACK has been negotiated through
// SetProtocolFeatures, every message that has no reply of its own asks for
// an acknowledgement, and a non-zero one is ErrNack. Send, SendRaw and
// ReadReply give hostile tests raw access.
type Conn struct {
	mu       sync.Mutex
	sock     *net.UnixConn
	replyAck bool
}

// Dial connects to the back-end's unix socket at path.
func Dial(path string) (*Conn, error) {
	sock, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("connect to vhost-user back-end: %w", err)
	}
	return &Conn{sock: sock}, nil
}

// Close closes the connection; the back-end sees the front-end go away.
func (c *Conn) Close() error { return c.sock.Close() }

// Reply is one message from the back-end.
type Reply struct {
	Request vhostuser.Request
	Flags   uint32
	Payload []byte
}

// EncodeMessage returns the bytes of one message: the header, then payload.
func EncodeMessage(req vhostuser.Request, flags uint32, payload []byte) []byte {
	b := make([]byte, HeaderSize+len(payload))
	binary.LittleEndian.PutUint32(b[0:], uint32(req))
	binary.LittleEndian.PutUint32(b[4:], flags)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[HeaderSize:], payload)
	return b
}

// Send sends one message with exactly the given flags, payload and
// descriptors, and does not wait for a reply.
func (c *Conn) Send(req vhostuser.Request, flags uint32, payload []byte, fds []int) error {
	return c.SendRaw(EncodeMessage(req, flags, payload), fds)
}

// SendRaw writes b as it is, with fds attached to its first byte. Nothing is
// checked: b may be any bytes at all.
func (c *Conn) SendRaw(b []byte, fds []int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.write(b, fds)
}

// ReadReply reads one message from the back-end. It returns io.EOF when the
// back-end has closed the connection.
func (c *Conn) ReadReply() (Reply, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.readReply()
}

func (c *Conn) write(b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	n, _, err := c.sock.WriteMsgUnix(b, oob, nil)
	if err == nil && n < len(b) {
		_, err = c.sock.Write(b[n:]) // the descriptors went with the first part
	}
	if err != nil {
		return fmt.Errorf("send vhost-user message: %w", err)
	}
	return nil
}

func (c *Conn) readReply() (Reply, error) {
	var hdr [HeaderSize]byte
	if _, err := io.ReadFull(c.sock, hdr[:]); err != nil {
		return Reply{}, err
	}
	r := Reply{
		Request: vhostuser.Request(binary.LittleEndian.Uint32(hdr[0:])),
		Flags:   binary.LittleEndian.Uint32(hdr[4:]),
	}
	size := binary.LittleEndian.Uint32(hdr[8:])
	if size > maxReplyPayload {
		return Reply{}, fmt.Errorf("%w: %v reply of %d bytes", ErrBadReply, r.Request, size)
	}
	r.Payload = make([]byte, size)
	if _, err := io.ReadFull(c.sock, r.Payload); err != nil {
		return Reply{}, fmt.Errorf("%w: truncated %v reply: %w", ErrBadReply, r.Request, err)
	}
	return r, nil
}

// call sends a message that has a reply of its own and returns the reply's
// payload, which must be size bytes long (size < 0: any length).
func (c *Conn) call(req vhostuser.Request, payload []byte, size int) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.write(EncodeMessage(req, FlagVersion, payload), nil); err != nil {
		return nil, err
	}
	return c.reply(req, size)
}

// reply reads the reply to req and checks its header and size.
func (c *Conn) reply(req vhostuser.Request, size int) ([]byte, error) {
	r, err := c.readReply()
	if err != nil {
		return nil, fmt.Errorf("reading %v reply: %w", req, err)
	}
	switch {
	case r.Request != req:
		return nil, fmt.Errorf("%w: got a %v reply to %v", ErrBadReply, r.Request, req)
	case r.Flags&FlagReply == 0 || r.Flags&0x3 != FlagVersion:
		return nil, fmt.Errorf("%w: %v reply with flags %#x", ErrBadReply, req, r.Flags)
	case size >= 0 && len(r.Payload) != size:
		return nil, fmt.Errorf("%w: %v reply of %d bytes, want %d", ErrBadReply, req, len(r.Payload), size)
	}
	return r.Payload, nil
}

// do sends a message that has no reply of its own; with REPLY_ACK it waits
// for the acknowledgement.
func (c *Conn) do(req vhostuser.Request, payload []byte, fds []int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	flags := uint32(FlagVersion)
	if c.replyAck {
		flags |= FlagNeedReply
	}
	if err := c.write(EncodeMessage(req, flags, payload), fds); err != nil {
		return err
	}
	if !c.replyAck {
		return nil
	}
	ack, err := c.reply(req, 8)
	if err != nil {
		return err
	}
	if v := binary.LittleEndian.Uint64(ack); v != 0 {
		return fmt.Errorf("%w: %v acknowledged with %d", ErrNack, req, v)
	}
	return nil
}

func (c *Conn) getU64(req vhostuser.Request) (uint64, error) {
	p, err := c.call(req, nil, 8)
	if err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(p), nil
}

func u64Payload(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

func vringState(index, num uint32) []byte {
	p := binary.LittleEndian.AppendUint32(nil, index)
	return binary.LittleEndian.AppendUint32(p, num)
}

// GetFeatures asks for the virtio and vhost-user feature bits offered.
func (c *Conn) GetFeatures() (uint64, error) { return c.getU64(vhostuser.GetFeatures) }

// SetFeatures acknowledges feature bits.
func (c *Conn) SetFeatures(f uint64) error { return c.do(vhostuser.SetFeatures, u64Payload(f), nil) }

// GetProtocolFeatures asks for the protocol feature bits offered.
func (c *Conn) GetProtocolFeatures() (uint64, error) {
	return c.getU64(vhostuser.GetProtocolFeatures)
}

// SetProtocolFeatures acknowledges protocol feature bits. If they include
// REPLY_ACK, later messages ask for acknowledgements.
func (c *Conn) SetProtocolFeatures(f uint64) error {
	if err := c.do(vhostuser.SetProtocolFeatures, u64Payload(f), nil); err != nil {
		return err
	}
	c.mu.Lock()
	c.replyAck = f&(1<<vhostuser.ProtocolFReplyAck) != 0
	c.mu.Unlock()
	return nil
}

// SetOwner claims the back-end for this connection.
func (c *Conn) SetOwner() error { return c.do(vhostuser.SetOwner, nil, nil) }

// GetQueueNum asks how many queues the back-end supports (needs the MQ
// protocol feature).
func (c *Conn) GetQueueNum() (uint64, error) { return c.getU64(vhostuser.GetQueueNum) }

// GetConfig reads size bytes of the device config space at offset.
func (c *Conn) GetConfig(offset, size uint32) ([]byte, error) {
	p := make([]byte, 12+int(size))
	binary.LittleEndian.PutUint32(p[0:], offset)
	binary.LittleEndian.PutUint32(p[4:], size)
	r, err := c.call(vhostuser.GetConfig, p, len(p))
	if err != nil {
		return nil, err
	}
	return r[12:], nil
}

// SetConfig writes data to the device config space at offset, as a
// front-end (not migration) write.
func (c *Conn) SetConfig(offset uint32, data []byte) error {
	p := make([]byte, 12, 12+len(data))
	binary.LittleEndian.PutUint32(p[0:], offset)
	binary.LittleEndian.PutUint32(p[4:], uint32(len(data)))
	return c.do(vhostuser.SetConfig, append(p, data...), nil)
}

// SetMemTable sends the memory table: one descriptor per region, and only
// as many region entries as there are regions (as QEMU sends it).
func (c *Conn) SetMemTable(regions []vhostuser.MemRegion, fds []int) error {
	p := binary.LittleEndian.AppendUint32(nil, uint32(len(regions)))
	p = binary.LittleEndian.AppendUint32(p, 0) // padding
	for _, r := range regions {
		p = binary.LittleEndian.AppendUint64(p, r.GuestPhysAddr)
		p = binary.LittleEndian.AppendUint64(p, r.MemorySize)
		p = binary.LittleEndian.AppendUint64(p, r.UserspaceAddr)
		p = binary.LittleEndian.AppendUint64(p, r.MmapOffset)
	}
	return c.do(vhostuser.SetMemTable, p, fds)
}

// SetVringNum sets the size of ring index.
func (c *Conn) SetVringNum(index, num uint32) error {
	return c.do(vhostuser.SetVringNum, vringState(index, num), nil)
}

// SetVringBase sets the next available index the back-end pops from ring
// index.
func (c *Conn) SetVringBase(index, base uint32) error {
	return c.do(vhostuser.SetVringBase, vringState(index, base), nil)
}

// SetVringAddr sets the addresses of a ring, in the front-end's virtual
// address space.
func (c *Conn) SetVringAddr(a vhostuser.VringAddr) error {
	p := binary.LittleEndian.AppendUint32(nil, a.Index)
	p = binary.LittleEndian.AppendUint32(p, a.Flags)
	for _, v := range []uint64{a.Desc, a.Used, a.Avail, a.Log} {
		p = binary.LittleEndian.AppendUint64(p, v)
	}
	return c.do(vhostuser.SetVringAddr, p, nil)
}

// GetVringBase stops ring index and returns the next available index the
// back-end would pop. The back-end answers once every request it popped
// has completed and is on the used ring.
func (c *Conn) GetVringBase(index uint32) (uint32, error) {
	p, err := c.call(vhostuser.GetVringBase, vringState(index, 0), 8)
	if err != nil {
		return 0, err
	}
	if got := binary.LittleEndian.Uint32(p); got != index {
		return 0, fmt.Errorf("%w: GET_VRING_BASE for ring %d answered for ring %d", ErrBadReply, index, got)
	}
	return binary.LittleEndian.Uint32(p[4:]), nil
}

// vringFile sends SET_VRING_KICK, CALL or ERR: the ring index, with the
// no-descriptor bit when fd < 0.
func (c *Conn) vringFile(req vhostuser.Request, index uint32, fd int) error {
	v := uint64(index)
	var fds []int
	if fd < 0 {
		v |= 1 << 8 // VHOST_USER_VRING_NOFD_MASK
	} else {
		fds = []int{fd}
	}
	return c.do(req, u64Payload(v), fds)
}

// SetVringKick sends the eventfd the front-end signals when it makes buffers
// available (fd < 0: none). The back-end starts the ring when it gets it.
func (c *Conn) SetVringKick(index uint32, fd int) error {
	return c.vringFile(vhostuser.SetVringKick, index, fd)
}

// SetVringCall sends the eventfd the back-end signals on completions.
func (c *Conn) SetVringCall(index uint32, fd int) error {
	return c.vringFile(vhostuser.SetVringCall, index, fd)
}

// SetVringErr sends the eventfd the back-end signals when the ring breaks.
func (c *Conn) SetVringErr(index uint32, fd int) error {
	return c.vringFile(vhostuser.SetVringErr, index, fd)
}

// SetVringEnable enables or disables ring index.
func (c *Conn) SetVringEnable(index uint32, on bool) error {
	num := uint32(0)
	if on {
		num = 1
	}
	return c.do(vhostuser.SetVringEnable, vringState(index, num), nil)
}
