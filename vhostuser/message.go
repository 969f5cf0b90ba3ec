package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// ErrProtocol is returned when the front-end breaks the protocol in a way
// that leaves no safe way to go on: the message stream cannot be followed
// (a bad header, a truncated message, descriptors lost), a request we cannot
// answer while the front-end waits for the answer, or a feature we do not
// implement. The connection is closed after it. Every place that returns it
// says why next to it.
var ErrProtocol = errors.New("vhost-user protocol error")

// ErrRejected is returned when a request is refused but the connection goes
// on: the request was well framed, it changed nothing, and it is NACKed
// (REPLY_ACK) like any failed request. A front-end that sends a bad value in
// one request keeps its other queues and its next requests.
var ErrRejected = errors.New("vhost-user request rejected")

// Message is one vhost-user message: a header, its payload and the file
// descriptors that came with it. Received descriptors are owned by the
// message until a handler takes them (TakeFd) or Close closes the rest.
type Message struct {
	Request Request
	Flags   uint32
	Payload []byte
	Fds     []int
}

// NeedReply reports whether the front-end asked for a REPLY_ACK.
func (m *Message) NeedReply() bool { return m.Flags&flagNeedReply != 0 }

// Close closes every descriptor not taken.
func (m *Message) Close() {
	for i, fd := range m.Fds {
		if fd >= 0 {
			unix.Close(fd)
			m.Fds[i] = -1
		}
	}
}

// TakeFd hands descriptor i to the caller, who must close it.
func (m *Message) TakeFd(i int) int {
	fd := m.Fds[i]
	m.Fds[i] = -1
	return fd
}

// DecodeHeader decodes the 12-byte header and checks it.
func DecodeHeader(b []byte) (req Request, flags, size uint32, err error) {
	// Closing: the stream cannot be followed past a header we cannot read
	// (the version, the size that says where the next message starts).
	if len(b) < headerSize {
		return 0, 0, 0, fmt.Errorf("%w: short header (%d bytes)", ErrProtocol, len(b))
	}
	req = Request(binary.LittleEndian.Uint32(b[0:]))
	flags = binary.LittleEndian.Uint32(b[4:])
	size = binary.LittleEndian.Uint32(b[8:])
	if flags&flagVersionMk != flagVersion {
		return 0, 0, 0, fmt.Errorf("%w: version %d in flags %#x", ErrProtocol, flags&flagVersionMk, flags)
	}
	// Closing: a reply where a request must be means the two sides no
	// longer agree on who waits for whom.
	if flags&flagReply != 0 {
		return 0, 0, 0, fmt.Errorf("%w: %v sent with the reply flag", ErrProtocol, req)
	}
	// Closing: no message is that large; reading it would mean buffering
	// what a front-end chose to send.
	if size > maxPayload {
		return 0, 0, 0, fmt.Errorf("%w: %v payload of %d bytes", ErrProtocol, req, size)
	}
	return req, flags, size, nil
}

// ReadMessage reads one message and its descriptors from conn. On error every
// received descriptor has been closed.
func ReadMessage(conn *net.UnixConn) (*Message, error) {
	var hdr [headerSize]byte
	oob := make([]byte, unix.CmsgSpace(maxFds*4))
	n, oobn, flags, _, err := conn.ReadMsgUnix(hdr[:], oob)
	fds, ferr := parseRights(oob[:oobn])
	m := &Message{Fds: fds}
	if err != nil {
		m.Close()
		if n == 0 && errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, err
	}
	if n == 0 {
		m.Close()
		return nil, io.EOF
	}
	if ferr != nil || flags&unix.MSG_CTRUNC != 0 {
		// Closing: descriptors were lost, so the message is not the one
		// the front-end sent, and it believes we own descriptors we never
		// got.
		m.Close()
		return nil, fmt.Errorf("%w: bad or too many file descriptors (%v)", ErrProtocol, ferr)
	}
	// Closing (both): a message cut short leaves the stream out of step.
	if n < headerSize {
		if _, err := io.ReadFull(conn, hdr[n:]); err != nil {
			m.Close()
			return nil, fmt.Errorf("%w: truncated header: %w", ErrProtocol, err)
		}
	}
	req, fl, size, err := DecodeHeader(hdr[:])
	if err != nil {
		m.Close()
		return nil, err
	}
	m.Request, m.Flags = req, fl
	m.Payload = make([]byte, size)
	if _, err := io.ReadFull(conn, m.Payload); err != nil {
		m.Close()
		return nil, fmt.Errorf("%w: truncated %v payload: %w", ErrProtocol, req, err)
	}
	return m, nil
}

func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	var bad error
	for _, c := range cmsgs {
		got, err := unix.ParseUnixRights(&c)
		if err != nil {
			bad = err
			continue
		}
		fds = append(fds, got...)
	}
	return fds, bad
}

// encodeReply builds a reply to req with payload.
func encodeReply(req Request, payload []byte) []byte {
	b := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(b[0:], uint32(req))
	binary.LittleEndian.PutUint32(b[4:], flagVersion|flagReply)
	binary.LittleEndian.PutUint32(b[8:], uint32(len(payload)))
	copy(b[headerSize:], payload)
	return b
}

// Payload decoders. Each checks the exact size first.

func (m *Message) wantSize(n int) error {
	if len(m.Payload) != n {
		return fmt.Errorf("%w: %v payload is %d bytes, want %d", ErrRejected, m.Request, len(m.Payload), n)
	}
	return nil
}

// wantFds checks that exactly n descriptors came with the message.
func (m *Message) wantFds(n int) error {
	if len(m.Fds) != n {
		return fmt.Errorf("%w: %v came with %d file descriptors, want %d", ErrRejected, m.Request, len(m.Fds), n)
	}
	return nil
}

// U64 decodes a u64 payload.
func (m *Message) U64() (uint64, error) {
	if err := m.wantSize(8); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(m.Payload), nil
}

// VringState is struct vhost_vring_state.
type VringState struct {
	Index, Num uint32
}

// VringState decodes a vring state payload.
func (m *Message) VringState() (VringState, error) {
	if err := m.wantSize(8); err != nil {
		return VringState{}, err
	}
	return VringState{binary.LittleEndian.Uint32(m.Payload), binary.LittleEndian.Uint32(m.Payload[4:])}, nil
}

// VringAddr is struct vhost_vring_addr.
type VringAddr struct {
	Index, Flags           uint32
	Desc, Used, Avail, Log uint64
}

// VringAddr decodes a vring address payload.
func (m *Message) VringAddr() (VringAddr, error) {
	if err := m.wantSize(40); err != nil {
		return VringAddr{}, err
	}
	p := m.Payload
	le := binary.LittleEndian
	return VringAddr{
		Index: le.Uint32(p[0:]), Flags: le.Uint32(p[4:]),
		Desc: le.Uint64(p[8:]), Used: le.Uint64(p[16:]), Avail: le.Uint64(p[24:]), Log: le.Uint64(p[32:]),
	}, nil
}

// VringFile decodes the u64 of SET_VRING_KICK/CALL/ERR: a ring index and
// whether a descriptor came with it; it checks the descriptor count.
func (m *Message) VringFile() (index uint32, hasFd bool, err error) {
	v, err := m.U64()
	if err != nil {
		return 0, false, err
	}
	if v&^uint64(vringIdxMask|vringNoFdMask) != 0 {
		return 0, false, fmt.Errorf("%w: %v payload %#x has unknown bits", ErrRejected, m.Request, v)
	}
	hasFd = v&vringNoFdMask == 0
	want := 0
	if hasFd {
		want = 1
	}
	if err := m.wantFds(want); err != nil {
		return 0, false, err
	}
	return uint32(v & vringIdxMask), hasFd, nil
}

// MemRegion is struct vhost_user_memory_region.
type MemRegion struct {
	GuestPhysAddr, MemorySize, UserspaceAddr, MmapOffset uint64
}

const memRegionSize = 32

func decodeMemRegion(p []byte) MemRegion {
	le := binary.LittleEndian
	return MemRegion{le.Uint64(p[0:]), le.Uint64(p[8:]), le.Uint64(p[16:]), le.Uint64(p[24:])}
}

// MemTable decodes SET_MEM_TABLE: nregions, padding, then the regions; one
// descriptor per region.
func (m *Message) MemTable() ([]MemRegion, error) {
	if len(m.Payload) < 8 {
		return nil, fmt.Errorf("%w: SET_MEM_TABLE payload of %d bytes", ErrRejected, len(m.Payload))
	}
	n := binary.LittleEndian.Uint32(m.Payload)
	if n == 0 || n > maxMemTableRegions {
		return nil, fmt.Errorf("%w: SET_MEM_TABLE with %d regions", ErrRejected, n)
	}
	// QEMU sends the whole fixed-size array; accept that or just n entries.
	if len(m.Payload) != 8+int(n)*memRegionSize && len(m.Payload) != 8+maxMemTableRegions*memRegionSize {
		return nil, fmt.Errorf("%w: SET_MEM_TABLE payload of %d bytes for %d regions", ErrRejected, len(m.Payload), n)
	}
	if err := m.wantFds(int(n)); err != nil {
		return nil, err
	}
	regions := make([]MemRegion, n)
	for i := range regions {
		regions[i] = decodeMemRegion(m.Payload[8+i*memRegionSize:])
	}
	return regions, nil
}

// MemReg decodes ADD_MEM_REG and REM_MEM_REG: padding, then one region.
func (m *Message) MemReg() (MemRegion, error) {
	if err := m.wantSize(8 + memRegionSize); err != nil {
		return MemRegion{}, err
	}
	return decodeMemRegion(m.Payload[8:]), nil
}

// ConfigMsg is the payload of GET_CONFIG and SET_CONFIG.
type ConfigMsg struct {
	Offset, Size, Flags uint32
	Data                []byte
}

// Config decodes a config payload: offset, size, flags, then size bytes.
func (m *Message) Config() (ConfigMsg, error) {
	if len(m.Payload) < 12 {
		return ConfigMsg{}, fmt.Errorf("%w: %v payload of %d bytes", ErrRejected, m.Request, len(m.Payload))
	}
	le := binary.LittleEndian
	c := ConfigMsg{Offset: le.Uint32(m.Payload), Size: le.Uint32(m.Payload[4:]), Flags: le.Uint32(m.Payload[8:])}
	if c.Size > maxConfigSize || c.Offset > maxConfigSize || c.Size+c.Offset > maxConfigSize {
		return ConfigMsg{}, fmt.Errorf("%w: config offset %d size %d", ErrRejected, c.Offset, c.Size)
	}
	if len(m.Payload) != 12+int(c.Size) {
		return ConfigMsg{}, fmt.Errorf("%w: %v payload of %d bytes for %d config bytes", ErrRejected, m.Request, len(m.Payload), c.Size)
	}
	c.Data = m.Payload[12:]
	return c, nil
}

func u64Payload(v uint64) []byte {
	b := make([]byte, 8)
	binary.LittleEndian.PutUint64(b, v)
	return b
}
