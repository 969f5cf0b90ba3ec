package vhostuser

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sirupsen/logrus"
)

// Listen opens the unix socket at path. A stale socket left by a previous run
// is replaced; a path that exists and is not a socket, or a socket another
// process still listens on, is an error.
func Listen(path string) (*net.UnixListener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("socket path %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("socket path %s is in use by another process", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(true)
	return ln, nil
}

// ListenFD uses an inherited listening unix socket (the --fd convention of
// vhost-user back-end programs).
func ListenFD(fd int) (*net.UnixListener, error) {
	f := os.NewFile(uintptr(fd), fmt.Sprintf("fd %d", fd))
	if f == nil {
		return nil, fmt.Errorf("fd %d is not open", fd)
	}
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("fd %d is not a listening socket: %w", fd, err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, fmt.Errorf("fd %d is not a unix socket", fd)
	}
	return ul, nil
}

// Server serves one device to one front-end connection at a time; when the
// front-end goes away it cleans up and accepts the next one.
type Server struct {
	dev       Device
	numQueues int
	log       *logrus.Entry

	mu     sync.Mutex
	ln     *net.UnixListener
	cur    *net.UnixConn
	cc     *conn // the connection being served, for NotifyConfigChange
	closed bool
	done   chan struct{}
	conns  int

	pollMax atomic.Int64 // ns, for the next connection (SetPollMax)
}

// NewServer returns a server for dev with numQueues virtqueues.
func NewServer(dev Device, numQueues int, log *logrus.Entry) *Server {
	return &Server{dev: dev, numQueues: numQueues, log: log, done: make(chan struct{})}
}

// SetPollMax sets how long, at most, a ring's goroutine polls the available
// ring after its queue ran empty, before it waits for a kick (0, the
// default: it never polls). It applies to the next connection.
func (s *Server) SetPollMax(d time.Duration) { s.pollMax.Store(int64(max(d, 0))) }

// Serve accepts front-ends on ln until Close. It returns nil after Close.
func (s *Server) Serve(ln *net.UnixListener) error {
	defer close(s.done)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.ln = ln
	s.mu.Unlock()
	for {
		sock, err := ln.AcceptUnix()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed || errors.Is(err, net.ErrClosed) {
				return nil
			}
			s.log.WithError(err).Warn("accept failed")
			time.Sleep(100 * time.Millisecond)
			continue
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			sock.Close()
			return nil
		}
		s.cur = sock
		s.conns++
		id := s.conns
		s.mu.Unlock()

		log := s.log.WithField("conn", id)
		log.Info("front-end connected")
		c := newConn(sock, s.dev, s.numQueues, log)
		c.pollMax = time.Duration(s.pollMax.Load())
		s.mu.Lock()
		s.cc = c
		s.mu.Unlock()
		c.serve()

		s.mu.Lock()
		s.cur, s.cc = nil, nil
		s.mu.Unlock()
	}
}

// NotifyConfigChange tells the connected front-end that the device's config
// space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), so that it re-reads it
// and notifies the guest: a resized disk. With no front-end connected it does
// nothing (the next one reads the new config); a front-end without a back-end
// request channel gives ErrNoBackendChannel.
func (s *Server) NotifyConfigChange() error {
	s.mu.Lock()
	c := s.cc
	s.mu.Unlock()
	if c == nil {
		return nil
	}
	return c.backend.send(backendConfigChangeMsg)
}

// Close stops accepting, disconnects the current front-end, and waits until
// its rings are stopped and their requests have completed.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.done
		return
	}
	s.closed = true
	started := s.ln != nil
	if s.ln != nil {
		s.ln.Close()
	}
	if s.cur != nil {
		s.cur.Close()
	}
	s.mu.Unlock()
	if started {
		<-s.done
	}
}
