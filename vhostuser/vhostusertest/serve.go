// Package vhostusertest serves a virtio-blk disk in-process for tests and benchmarks, wired as
// `vublk serve` wires it: a vhost-user server on a unix socket, a BlkDevice, an Engine with lanes,
// and the given store.
package vhostusertest

import (
	"io"
	"path/filepath"
	"testing"

	"github.com/sirupsen/logrus"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/vhostuser"
	"github.com/vublk/vublk/virtio"
)

// Export is a disk being served until the test ends.
type Export struct {
	Socket string
	Engine *backend.Engine
	Device *virtio.BlkDevice
	Server *vhostuser.Server
}

// Serve serves store with cfg on lanes lanes, logging to log (nil: nowhere). When the test
// ends the server stops, then the engine drains and syncs, then the store is closed.
func Serve(t testing.TB, store backend.Store, lanes int, cfg virtio.BlkConfig, log io.Writer) *Export {
	t.Helper()
	return ServeWith(t, store, backend.EngineOptions{Lanes: lanes}, cfg, log)
}

// ServeWith is Serve with the engine's options (lanes, io_uring).
func ServeWith(t testing.TB, store backend.Store, opt backend.EngineOptions, cfg virtio.BlkConfig, log io.Writer) *Export {
	t.Helper()
	if log == nil {
		log = io.Discard
	}
	logger := logrus.New()
	logger.SetOutput(log)
	entry := logger.WithField("export", "test")
	engine, err := backend.NewEngineWith(store, opt)
	if err != nil {
		store.Close()
		t.Fatal(err)
	}
	dev := virtio.NewBlkDevice(engine, cfg, entry)
	srv := vhostuser.NewServer(dev, int(cfg.NumQueues), entry)
	sock := filepath.Join(t.TempDir(), "vublk.sock")
	ln, err := vhostuser.Listen(sock)
	if err != nil {
		engine.Close()
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { srv.Serve(ln); close(served) }()
	t.Cleanup(func() {
		srv.Close()
		<-served
		engine.Close()
		store.Close()
	})
	return &Export{Socket: sock, Engine: engine, Device: dev, Server: srv}
}

// ServeFile serves a new sparse file of size bytes, with queues queues and 2 lanes.
func ServeFile(t testing.TB, size int64, queues int, readOnly bool) *Export {
	t.Helper()
	store, err := backend.OpenFile(filepath.Join(t.TempDir(), "disk.img"), backend.FileOptions{CreateSize: size})
	if err != nil {
		t.Fatal(err)
	}
	return Serve(t, store, 2, virtio.BlkConfig{
		Capacity: uint64(size), BlockSize: 512, PhysicalBlockSize: uint32(store.PhysicalBlockSize()),
		NumQueues: uint16(queues), Serial: "test", Writeback: true, Discard: true, ReadOnly: readOnly,
	}, nil)
}
