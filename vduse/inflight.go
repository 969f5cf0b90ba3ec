package vduse

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"golang.org/x/sys/unix"
)

// inflightFile records, in a file on tmpfs that outlives the process, what a restarted vublk
// needs to take over a VDUSE device whose vublk died: the driver status, and per queue which
// chains were popped and not completed (in pop order) and the used index last published. The
// kernel keeps the device, its rings and the requests it had sent us across our death
// (vduse_dev_release puts unanswered messages back), but not this: VDUSE API version 0 has no
// inflight tracking of its own. The idea is vhost-user's inflight I/O tracking
// (vhost-user.rst, "Inflight I/O tracking") in a layout of our own.
//
// Layout (little-endian): a 32-byte header — magic, version, status, queues, queue size —
// then per queue a 16-byte head (used_idx, last_batch_head, counter) and queue-size 16-byte
// descriptor entries (inflight flag, pop counter).
type inflightFile struct {
	path      string
	data      []byte // the shared mapping
	queues    int
	queueSize int
	logs      []*inflightLog
}

const (
	inflightMagic  = "VUBLKVD1"
	inflightHeader = 32
	inflightQHead  = 16
	inflightEntry  = 16
	hdrStatus      = 8
	hdrQueues      = 12
	hdrQueueSize   = 16
	hdrSettings    = 20 // u64: fingerprint of the settings the device was created with
	qUsedIdx       = 0
	qLastBatchHead = 2
	qCounter       = 8
	entryInflight  = 0
	entryCounter   = 8
)

func inflightPath(dir, name string) string { return filepath.Join(dir, "vduse-"+name+".inflight") }

// openInflightFile opens (fresh: creates empty) the record of device name, for a device
// created with settings (a fingerprint). Taking over a record made for other settings is
// ErrSettingsChanged: the device's features and config space were fixed when it was created.
func openInflightFile(dir, name string, queues, queueSize int, settings uint64, fresh bool) (*inflightFile, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("inflight record: %w", err)
	}
	path := inflightPath(dir, name)
	size := inflightHeader + queues*(inflightQHead+queueSize*inflightEntry)
	flags := os.O_RDWR | os.O_CREATE
	if fresh {
		flags |= os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("inflight record: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("inflight record: %w", err)
	}
	if !fresh && fi.Size() >= inflightHeader {
		// A record of another device geometry or other settings: the device was made by a
		// vublk with other options.
		var hdr [inflightHeader]byte
		if _, err := f.ReadAt(hdr[:], 0); err == nil && string(hdr[:8]) == inflightMagic &&
			(binary.LittleEndian.Uint32(hdr[hdrQueues:]) != uint32(queues) ||
				binary.LittleEndian.Uint32(hdr[hdrQueueSize:]) != uint32(queueSize) ||
				binary.LittleEndian.Uint64(hdr[hdrSettings:]) != settings) {
			return nil, fmt.Errorf("%w: %s", ErrSettingsChanged, path)
		}
	}
	valid := !fresh && fi.Size() == int64(size)
	if !valid {
		if err := f.Truncate(0); err != nil {
			return nil, fmt.Errorf("inflight record: %w", err)
		}
		if err := f.Truncate(int64(size)); err != nil {
			return nil, fmt.Errorf("inflight record: %w", err)
		}
	}
	data, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("inflight record: mmap: %w", err)
	}
	r := &inflightFile{path: path, data: data, queues: queues, queueSize: queueSize}
	if valid && string(data[:8]) != inflightMagic {
		valid = false
		clear(data)
	}
	if !valid {
		copy(data, inflightMagic)
		binary.LittleEndian.PutUint64(data[hdrSettings:], settings)
		binary.LittleEndian.PutUint32(data[hdrQueues:], uint32(queues))
		binary.LittleEndian.PutUint32(data[hdrQueueSize:], uint32(queueSize))
	}
	r.logs = make([]*inflightLog, queues)
	for i := range r.logs {
		off := inflightHeader + i*(inflightQHead+queueSize*inflightEntry)
		r.logs[i] = &inflightLog{b: data[off : off+inflightQHead+queueSize*inflightEntry]}
	}
	for _, l := range r.logs {
		l.counter = binary.LittleEndian.Uint64(l.b[qCounter:])
	}
	return r, nil
}

// status is the driver status last recorded.
func (r *inflightFile) status() uint8 { return r.data[hdrStatus] }

func (r *inflightFile) setStatus(s uint8) { r.data[hdrStatus] = s }

// reset forgets every queue's record (a device reset: nothing is in flight).
func (r *inflightFile) reset() {
	for _, l := range r.logs {
		clear(l.b)
		l.counter = 0
	}
}

// queue returns the record of queue i for a ring of num entries, or nil when the ring is
// larger than the record (then it is served untracked).
func (r *inflightFile) queue(i, num int) *inflightLog {
	if r == nil || i >= len(r.logs) || num > r.queueSize {
		return nil
	}
	return r.logs[i]
}

func (r *inflightFile) close() {
	if r.data != nil {
		unix.Munmap(r.data)
		r.data = nil
	}
}

func (r *inflightFile) remove() { os.Remove(r.path) }

// inflightLog is one queue's record; it implements virtio.InflightLog. Popped runs on the
// ring's goroutine; Publishing and Published under the queue's completion lock.
type inflightLog struct {
	b       []byte
	counter uint64 // pop order
}

func (l *inflightLog) entry(head uint16) []byte {
	off := inflightQHead + int(head)*inflightEntry
	return l.b[off : off+inflightEntry]
}

// start begins a record for a ring whose used index is usedIdx and that has nothing in flight.
func (l *inflightLog) start(usedIdx uint16) {
	clear(l.b)
	l.counter = 0
	binary.LittleEndian.PutUint16(l.b[qUsedIdx:], usedIdx)
}

func (l *inflightLog) Popped(head uint16) {
	if int(head) >= (len(l.b)-inflightQHead)/inflightEntry {
		return
	}
	l.counter++
	e := l.entry(head)
	binary.LittleEndian.PutUint64(e[entryCounter:], l.counter)
	binary.LittleEndian.PutUint64(l.b[qCounter:], l.counter)
	e[entryInflight] = 1
}

func (l *inflightLog) Publishing(head uint16) {
	binary.LittleEndian.PutUint16(l.b[qLastBatchHead:], head)
}

func (l *inflightLog) Published(head, usedIdx uint16) {
	if int(head) < (len(l.b)-inflightQHead)/inflightEntry {
		l.entry(head)[entryInflight] = 0
	}
	binary.LittleEndian.PutUint16(l.b[qUsedIdx:], usedIdx)
}

// recover reconciles the record with the ring's used index ringUsed after a vublk died: a
// completion it had published but not yet cleared is cleared. It returns where to resume
// popping (every popped chain is either in the used ring or in flight) and the chains in
// flight, in the order they were popped.
func (l *inflightLog) recover(ringUsed uint16, size int) (lastAvail uint16, resubmit []uint16) {
	logged := binary.LittleEndian.Uint16(l.b[qUsedIdx:])
	if logged != ringUsed {
		// The used element of last_batch_head reached the ring; its flag was not cleared.
		last := binary.LittleEndian.Uint16(l.b[qLastBatchHead:])
		if int(last) < size {
			l.entry(last)[entryInflight] = 0
		}
		binary.LittleEndian.PutUint16(l.b[qUsedIdx:], ringUsed)
	}
	type popped struct {
		head    uint16
		counter uint64
	}
	var in []popped
	for h := 0; h < size && h < (len(l.b)-inflightQHead)/inflightEntry; h++ {
		e := l.entry(uint16(h))
		if e[entryInflight] == 1 {
			in = append(in, popped{uint16(h), binary.LittleEndian.Uint64(e[entryCounter:])})
		}
	}
	sort.Slice(in, func(i, j int) bool { return in[i].counter < in[j].counter })
	for _, p := range in {
		resubmit = append(resubmit, p.head)
	}
	return ringUsed + uint16(len(resubmit)), resubmit
}
