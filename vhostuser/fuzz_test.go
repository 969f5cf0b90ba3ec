package vhostuser

import (
	"encoding/binary"
	"io"
	"net"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/vublk/vublk/backend"
	"github.com/vublk/vublk/virtio"
)

// qemuMessages are valid messages as QEMU sends them to a vhost-user-blk
// back-end, in the order of a VM start, each with its descriptor count.
func qemuMessages() []struct {
	raw []byte
	fds int
} {
	need := uint32(flagVersion | flagNeedReply)
	return []struct {
		raw []byte
		fds int
	}{
		{encode(GetFeatures, flagVersion), 0},
		{encode(GetProtocolFeatures, flagVersion), 0},
		{encode(SetProtocolFeatures, flagVersion, le64(offeredProtocolFeatures)), 0},
		{encode(GetQueueNum, flagVersion), 0},
		{encode(GetMaxMemSlots, flagVersion), 0},
		{encode(SetOwner, need), 0},
		{encode(GetConfig, flagVersion, le32(0, 60, 0), make([]byte, 60)), 0},
		{encode(SetFeatures, need, le64(1<<32|1<<30|1<<29|1<<28|1<<12|1<<9)), 0},
		{encode(SetMemTable, need, memTable(1, 1)), 1},
		{encode(SetMemTable, need, memTable(2, maxMemTableRegions)), 2},
		{encode(AddMemReg, need, le64(0), le64(1<<30, 1<<20, 0x7f0000000000, 0)), 1},
		{encode(RemMemReg, need, le64(0), le64(1<<30, 1<<20, 0x7f0000000000, 0)), 0},
		{encode(SetVringNum, need, le32(0, 256)), 0},
		{encode(SetVringBase, need, le32(0, 0)), 0},
		{encode(SetVringAddr, need, le32(0, 0), le64(0x7f0000001000, 0x7f0000003000, 0x7f0000002000, 0)), 0},
		{encode(SetVringKick, need, le64(0)), 1},
		{encode(SetVringCall, need, le64(1)), 1},
		{encode(SetVringCall, need, le64(1|1<<8)), 0},
		{encode(SetVringErr, need, le64(0)), 1},
		{encode(SetVringEnable, need, le32(0, 1)), 0},
		{encode(SetConfig, need, le32(32, 1, 0), []byte{0}), 0},
		// A migration starts: the dirty log, VHOST_F_LOG_ALL, the used ring logged.
		{encode(SetLogBase, flagVersion, le64(0x1000, 0)), 1},
		{encode(SetLogFd, need), 1},
		{encode(SetFeatures, need, le64(1<<32|1<<30|1<<29|1<<28|1<<26|1<<12|1<<9)), 0},
		{encode(SetVringAddr, need, le32(0, 1), le64(0x7f0000001000, 0x7f0000003000, 0x7f0000002000, 0x3000)), 0},
		{encode(GetVringBase, flagVersion, le32(0, 0)), 0},
		{encode(SetBackendReqFd, need, le64(0)), 1},
		{encode(ResetDevice, need), 0},
	}
}

// decodeAll runs every payload decoder on m and checks what each promises.
func decodeAll(t *testing.T, m *Message) {
	m.U64()
	m.VringState()
	m.VringAddr()
	if idx, hasFd, err := m.VringFile(); err == nil && (idx > vringIdxMask || hasFd != (len(m.Fds) == 1)) {
		t.Fatalf("VringFile accepted index %d, fd %v with %d descriptors", idx, hasFd, len(m.Fds))
	}
	if regions, err := m.MemTable(); err == nil && (len(regions) > maxMemTableRegions || len(regions) != len(m.Fds)) {
		t.Fatalf("MemTable accepted %d regions with %d descriptors", len(regions), len(m.Fds))
	}
	m.MemReg()
	if l, err := m.Log(); err == nil && len(m.Payload) != 16 {
		t.Fatalf("Log accepted a payload of %d bytes: %+v", len(m.Payload), l)
	}
	if c, err := m.Config(); err == nil && (uint64(c.Offset)+uint64(c.Size) > maxConfigSize || len(c.Data) != int(c.Size)) {
		t.Fatalf("Config accepted offset %d size %d with %d bytes", c.Offset, c.Size, len(c.Data))
	}
}

// FuzzDecode feeds raw bytes, header and payload, to the header decoder and
// every payload decoder, directly and through ReadMessage on a socket with
// nfds descriptors attached. Nothing may panic, and nothing accepted may
// break the decoders' bounds.
func FuzzDecode(f *testing.F) {
	var stream []byte
	for _, m := range qemuMessages() {
		f.Add(m.raw, uint8(m.fds))
		stream = append(stream, m.raw...)
	}
	f.Add(stream, uint8(1))
	f.Fuzz(func(t *testing.T, raw []byte, nfds uint8) {
		if len(raw) > 64<<10 {
			return // stays below the socket buffer: the write must not block
		}
		n := int(nfds % (maxFds + 2))
		if req, flags, size, err := DecodeHeader(raw); err == nil {
			if size > maxPayload {
				t.Fatalf("DecodeHeader accepted a payload of %d bytes", size)
			}
			payload := raw[headerSize:]
			if uint32(len(payload)) > size {
				payload = payload[:size]
			}
			decodeAll(t, &Message{Request: req, Flags: flags, Payload: payload, Fds: fakeFds(n)})
		}

		front, back := socketPair(t)
		var fds []int
		if n > 0 {
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(efd)
			for range n {
				fds = append(fds, efd)
			}
		}
		send(t, front, raw, fds...)
		front.CloseWrite()
		for {
			m, err := ReadMessage(back)
			if err != nil {
				return
			}
			if len(m.Payload) > maxPayload || len(m.Fds) > maxFds {
				t.Fatalf("ReadMessage returned %d bytes, %d descriptors", len(m.Payload), len(m.Fds))
			}
			decodeAll(t, m)
			m.Close()
		}
	})
}

// Guest memory of the FuzzConn seed: one region of fuzzMemSize bytes at
// guest physical address 0 and front-end address fuzzUserBase, holding
// queue 0 (8 entries) with one write request made available.
const (
	fuzzMemSize = 64 << 10
	// fuzzDiskSize is the disk the fuzzed connections serve: small, so that
	// creating and syncing its in-memory store costs little per input.
	fuzzDiskSize = 128 << 10 // a read of seg_max sectors fits
	fuzzUserBase = 0x7f0000000000
	fuzzAvail    = 0x80
	fuzzUsed     = 0x100
)

// fuzzBoot is a VM start as QEMU performs it on that memory, then a stop.
func fuzzBoot() []byte {
	need := uint32(flagVersion | flagNeedReply)
	var b []byte
	for _, m := range [][]byte{
		encode(GetFeatures, flagVersion),
		encode(GetProtocolFeatures, flagVersion),
		encode(SetProtocolFeatures, flagVersion, le64(1<<ProtocolFReplyAck|1<<ProtocolFMQ|1<<ProtocolFConfig|1<<ProtocolFBackendReq)),
		encode(GetQueueNum, flagVersion),
		encode(SetOwner, need),
		encode(SetBackendReqFd, need, le64(0)),
		encode(GetConfig, flagVersion, le32(0, 60, 0), make([]byte, 60)),
		encode(SetFeatures, need, le64(1<<virtio.FVersion1|1<<FProtocolFeatures|1<<virtio.BlkFFlush)),
		encode(SetMemTable, need, le32(1, 0), le64(0, fuzzMemSize, fuzzUserBase, 0)),
		encode(SetVringNum, need, le32(0, 8)),
		encode(SetVringBase, need, le32(0, 0)),
		encode(SetVringAddr, need, le32(0, 0), le64(fuzzUserBase, fuzzUserBase+fuzzUsed, fuzzUserBase+fuzzAvail, 0)),
		encode(SetVringCall, need, le64(0)),
		// Enabled before the kick: the ring's goroutine then processes once as it starts, before
		// it can see the stop that GET_VRING_BASE asks for, so the write is always served.
		encode(SetVringEnable, need, le32(0, 1)),
		encode(SetVringKick, need, le64(0)),
		encode(GetVringBase, flagVersion, le32(0, 0)),
	} {
		b = append(b, m...)
	}
	return b
}

// fuzzRing is guest memory with a write of 512 bytes to sector 0 on queue 0:
// header at 0x1000, data at 0x2000, status at 0x3000.
func fuzzRing() []byte {
	mem := make([]byte, 0x3001)
	desc := func(i int, addr uint64, n uint32, flags, next uint16) {
		d := mem[16*i:]
		binary.LittleEndian.PutUint64(d, addr)
		binary.LittleEndian.PutUint32(d[8:], n)
		binary.LittleEndian.PutUint16(d[12:], flags)
		binary.LittleEndian.PutUint16(d[14:], next)
	}
	desc(0, 0x1000, 16, virtio.DescFNext, 1)
	desc(1, 0x2000, 512, virtio.DescFNext, 2)
	desc(2, 0x3000, 1, virtio.DescFWrite, 0)
	binary.LittleEndian.PutUint16(mem[fuzzAvail+2:], 1) // avail idx; ring[0] = head 0
	binary.LittleEndian.PutUint32(mem[0x1000:], virtio.BlkTOut)
	copy(mem[0x2000:], "fuzz")
	return mem
}

// splitMessages cuts a stream into messages by their size fields; the last
// one may be truncated.
func splitMessages(b []byte) [][]byte {
	var msgs [][]byte
	for len(b) > 0 {
		n := len(b)
		if len(b) >= headerSize {
			if size := binary.LittleEndian.Uint32(b[8:]); uint64(size) <= uint64(len(b)-headerSize) {
				n = headerSize + int(size)
			}
		}
		msgs = append(msgs, b[:n])
		b = b[n:]
	}
	return msgs
}

// fdsFor returns the descriptors msg would carry if it came from QEMU:
// the guest memory fd for each region, an eventfd for a vring file without
// the no-descriptor bit, a socket for the back-end request channel. The
// caller closes them once sent.
func fdsFor(t *testing.T, msg []byte, memfd int) []int {
	if len(msg) < headerSize {
		return nil
	}
	p := msg[headerSize:]
	var fds []int
	dup := func(fd int) {
		d, err := unix.Dup(fd)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, d)
	}
	switch Request(binary.LittleEndian.Uint32(msg)) {
	case SetMemTable:
		if len(p) >= 4 {
			for range min(binary.LittleEndian.Uint32(p), maxFds) {
				dup(memfd)
			}
		}
	case AddMemReg, SetLogBase:
		dup(memfd)
	case SetLogFd:
		efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, efd)
	case SetBackendReqFd:
		pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, pair[0])
		unix.Close(pair[1]) // the front-end never answers
	case SetVringKick, SetVringCall, SetVringErr:
		if len(p) >= 8 && p[1]&1 == 0 {
			efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
			if err != nil {
				t.Fatal(err)
			}
			fds = append(fds, efd)
		}
	}
	return fds
}

// runConn runs one connection's message handler on stream, each message
// with the descriptors its type carries, over a virtio-blk device on guest
// memory whose first bytes are mem. It returns the device's store and the
// first 64 KiB of guest memory once the handler has finished.
//
// The messages go straight to the handler, as the connection's goroutine
// hands them over after ReadMessage (whose framing over a socket
// FuzzDecode covers), and replies go to a socket nobody reads: no socket
// round trip per message, so that FuzzConn runs thousands of inputs a
// second. A message whose header or payload is cut short ends the stream,
// as it ends the connection.
func runConn(t *testing.T, stream, mem []byte) (*backend.CrashStore, []byte) {
	log := logrus.New()
	log.SetOutput(io.Discard)
	memfd, err := unix.MemfdCreate("fuzz-guest", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(memfd)
	if err := unix.Ftruncate(memfd, fuzzMemSize); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Pwrite(memfd, mem, 0); err != nil {
		t.Fatal(err)
	}
	store := backend.NewCrashStore(fuzzDiskSize)
	engine := backend.NewEngine(store, 1)
	defer engine.Close()
	entry := log.WithField("test", t.Name())
	dev := virtio.NewBlkDevice(engine, virtio.BlkConfig{Capacity: fuzzDiskSize, NumQueues: 2, Writeback: true, Discard: true}, entry)

	// Replies stay unread in the socket's buffer; only the handler's end
	// is a net.UnixConn.
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pair[0])
	f := os.NewFile(uintptr(pair[1]), "fuzz-back")
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	c := newConn(fc.(*net.UnixConn), dev, 2, entry)
	served := make(chan struct{})
	go func() {
		defer close(served)
		defer c.cleanup()
		for _, raw := range splitMessages(stream) {
			req, flags, size, err := DecodeHeader(raw)
			if err != nil || int(size) != len(raw)-headerSize {
				return // cut short, or a header ReadMessage refuses
			}
			m := &Message{Request: req, Flags: flags, Payload: slices.Clone(raw[headerSize:]), Fds: fdsFor(t, raw, memfd)}
			if err := c.handle(m); err != nil {
				return
			}
		}
	}()
	select {
	case <-served:
	case <-time.After(leakGuard):
		t.Fatal("the handler did not finish after the front-end went away")
	}
	out := make([]byte, 64<<10)
	if _, err := unix.Pread(memfd, out, 0); err != nil {
		t.Fatal(err)
	}
	return store, out
}

// TestConnBootSequence checks that the FuzzConn seed does what it says:
// the write on the ring is served and the ring stopped cleanly.
func TestConnBootSequence(t *testing.T) {
	store, mem := runConn(t, fuzzBoot(), fuzzRing())
	if img := store.Image(); string(img[:4]) != "fuzz" {
		t.Fatalf("store holds %q, want the write", img[:4])
	}
	if used := binary.LittleEndian.Uint16(mem[fuzzUsed+2:]); used != 1 || mem[0x3000] != virtio.BlkSOK {
		t.Fatalf("used index %d, status %d", used, mem[0x3000])
	}
}

// FuzzConn feeds arbitrary message streams and guest memory to a
// connection's handler (see runConn): it must neither panic nor hang, and
// must release everything when the front-end goes away.
func FuzzConn(f *testing.F) {
	boot := fuzzBoot()
	f.Add(boot, fuzzRing())
	f.Add(boot[:len(boot)/2], fuzzRing())
	f.Add(boot, fuzzRingIndirect(blkSegMaxForFuzz+3))
	f.Fuzz(func(t *testing.T, stream, mem []byte) {
		if len(stream) > 16<<10 || len(mem) > 64<<10 {
			return
		}
		runConn(t, stream, mem)
	})
}

// blkSegMaxForFuzz is the seg_max the device advertises (virtio's blkSegMax).
const blkSegMaxForFuzz = 254

// fuzzRingIndirect is guest memory whose queue 0 holds one read as an
// indirect table of n descriptors (header at 0x1000, n-2 segments of 512
// bytes all at 0x2000, status at 0x3000, the table at 0x4000): beyond
// seg_max when n > seg_max+2, the attack's shape.
func fuzzRingIndirect(n int) []byte {
	mem := make([]byte, 0x4000+16*n)
	put := func(b []byte, addr uint64, length uint32, flags, next uint16) {
		binary.LittleEndian.PutUint64(b, addr)
		binary.LittleEndian.PutUint32(b[8:], length)
		binary.LittleEndian.PutUint16(b[12:], flags)
		binary.LittleEndian.PutUint16(b[14:], next)
	}
	put(mem[0:], 0x4000, uint32(16*n), virtio.DescFIndirect, 0)
	for i := range n {
		addr, length, flags := uint64(0x2000), uint32(512), uint16(virtio.DescFWrite|virtio.DescFNext)
		switch i {
		case 0:
			addr, length, flags = 0x1000, 16, virtio.DescFNext
		case n - 1:
			addr, length, flags = 0x3000, 1, virtio.DescFWrite
		}
		put(mem[0x4000+16*i:], addr, length, flags, uint16(i+1))
	}
	binary.LittleEndian.PutUint16(mem[fuzzAvail+2:], 1) // avail idx; ring[0] = head 0
	binary.LittleEndian.PutUint32(mem[0x1000:], virtio.BlkTIn)
	return mem
}

// TestConnIndirectBeyondSegMax checks the third FuzzConn seed: the read
// beyond seg_max is answered IOERR, the ring goes on.
func TestConnIndirectBeyondSegMax(t *testing.T) {
	_, mem := runConn(t, fuzzBoot(), fuzzRingIndirect(blkSegMaxForFuzz+3))
	if used := binary.LittleEndian.Uint16(mem[fuzzUsed+2:]); used != 1 || mem[0x3000] != virtio.BlkSIOErr {
		t.Fatalf("used index %d, status %d, want 1 and IOERR", used, mem[0x3000])
	}
	_, mem = runConn(t, fuzzBoot(), fuzzRingIndirect(blkSegMaxForFuzz+2))
	if used := binary.LittleEndian.Uint16(mem[fuzzUsed+2:]); used != 1 || mem[0x3000] != virtio.BlkSOK {
		t.Fatalf("at seg_max: used index %d, status %d, want 1 and OK", used, mem[0x3000])
	}
}
