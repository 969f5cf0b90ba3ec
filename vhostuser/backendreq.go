package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Back-end message types, sent by the back-end on the channel the front-end
// hands over with SET_BACKEND_REQ_FD (vhost-user.rst, "Back-end message types").
const backendConfigChangeMsg = 2

// backendReplyTimeout bounds sending a back-end message and waiting for the
// front-end's answer: a front-end that stopped reading must not hang a reload.
const backendReplyTimeout = 10 * time.Second

// ErrNoBackendChannel is returned by NotifyConfigChange when the connected
// front-end did not negotiate VHOST_USER_PROTOCOL_F_BACKEND_REQ.
var ErrNoBackendChannel = errors.New("vhostuser: the front-end gave no back-end request channel")

// backendChannel is the back-end → front-end socket. The connection's
// goroutine installs and closes it; other goroutines send on it.
type backendChannel struct {
	mu        sync.Mutex
	sock      *net.UnixConn
	needReply bool // REPLY_ACK was negotiated: ask for and wait for an answer
}

// set replaces the channel with the socket fd (taking ownership of fd).
func (b *backendChannel) set(fd int, needReply bool) error {
	f := os.NewFile(uintptr(fd), "vhost-user-backend-req")
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("%w: back-end request fd: %v", ErrRejected, err)
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return fmt.Errorf("%w: back-end request fd is not a unix socket", ErrRejected)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sock != nil {
		b.sock.Close()
	}
	b.sock, b.needReply = uc, needReply
	return nil
}

func (b *backendChannel) close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sock != nil {
		b.sock.Close()
		b.sock = nil
	}
}

// send sends a back-end message without payload and, when REPLY_ACK was
// negotiated, waits for the front-end's u64 answer (zero is success).
func (b *backendChannel) send(req uint32) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sock == nil {
		return ErrNoBackendChannel
	}
	flags := uint32(flagVersion)
	if b.needReply {
		flags |= flagNeedReply
	}
	var hdr [headerSize]byte
	binary.LittleEndian.PutUint32(hdr[0:], req)
	binary.LittleEndian.PutUint32(hdr[4:], flags)
	b.sock.SetWriteDeadline(time.Now().Add(backendReplyTimeout))
	defer b.sock.SetWriteDeadline(time.Time{})
	if _, err := b.sock.Write(hdr[:]); err != nil {
		return fmt.Errorf("back-end request %d: %w", req, err)
	}
	if !b.needReply {
		return nil
	}
	b.sock.SetReadDeadline(time.Now().Add(backendReplyTimeout))
	defer b.sock.SetReadDeadline(time.Time{})
	var reply [headerSize + 8]byte
	if _, err := io.ReadFull(b.sock, reply[:]); err != nil {
		return fmt.Errorf("back-end request %d: reading the reply: %w", req, err)
	}
	gotReq, gotFlags, size := binary.LittleEndian.Uint32(reply[0:]), binary.LittleEndian.Uint32(reply[4:]), binary.LittleEndian.Uint32(reply[8:])
	switch {
	case gotReq != req || gotFlags&flagReply == 0 || size != 8:
		// The main connection stays: this fails only the notification
		// (its caller logs it), on the back-end's own channel.
		return fmt.Errorf("%w: bad reply to back-end request %d (request %d, flags %#x, size %d)", ErrProtocol, req, gotReq, gotFlags, size)
	case binary.LittleEndian.Uint64(reply[headerSize:]) != 0:
		return fmt.Errorf("back-end request %d: the front-end answered failure", req)
	}
	return nil
}
