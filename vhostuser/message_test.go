package vhostuser

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"reflect"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// leakGuard bounds the wait for a descriptor to be closed; only a leak
// makes it expire.
const leakGuard = 30 * time.Second

// encode builds a front-end message as QEMU sends it.
func encode(req Request, flags uint32, payload ...[]byte) []byte {
	var p []byte
	for _, b := range payload {
		p = append(p, b...)
	}
	b := binary.LittleEndian.AppendUint32(nil, uint32(req))
	b = binary.LittleEndian.AppendUint32(b, flags)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
	return append(b, p...)
}

func le32(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint32(b, v)
	}
	return b
}

func le64(vs ...uint64) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.LittleEndian.AppendUint64(b, v)
	}
	return b
}

// memTable encodes SET_MEM_TABLE's payload for n regions, with room for
// slots entries (QEMU sends n; the fixed-size array is 8).
func memTable(n, slots int) []byte {
	b := le32(uint32(n), 0)
	for i := range slots {
		if i < n {
			b = append(b, le64(uint64(i)<<30, 1<<30, 0x7f0000000000+uint64(i)<<30, 0)...)
		} else {
			b = append(b, make([]byte, memRegionSize)...)
		}
	}
	return b
}

func TestDecodeHeader(t *testing.T) {
	cases := []struct {
		name string
		b    []byte
		req  Request
		size uint32
		ok   bool
	}{
		{"get features", encode(GetFeatures, flagVersion), GetFeatures, 0, true},
		{"need reply", encode(SetFeatures, flagVersion|flagNeedReply, le64(1)), SetFeatures, 8, true},
		{"unknown request decodes; dispatch rejects it", encode(99, flagVersion), 99, 0, true},
		{"largest payload", le32(uint32(SetConfig), flagVersion, maxPayload), SetConfig, maxPayload, true},
		{"payload too large", le32(uint32(SetConfig), flagVersion, maxPayload+1), 0, 0, false},
		{"huge payload", le32(uint32(SetConfig), flagVersion, 0xffffffff), 0, 0, false},
		{"short", encode(GetFeatures, flagVersion)[:headerSize-1], 0, 0, false},
		{"empty", nil, 0, 0, false},
		{"version 0", encode(GetFeatures, 0), 0, 0, false},
		{"version 2", encode(GetFeatures, 2), 0, 0, false},
		{"version 3", encode(GetFeatures, 3), 0, 0, false},
		{"reply flag", encode(GetFeatures, flagVersion|flagReply), 0, 0, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, _, size, err := DecodeHeader(c.b)
			if !c.ok {
				if !errors.Is(err, ErrProtocol) {
					t.Fatalf("got %v, want ErrProtocol", err)
				}
				return
			}
			if err != nil || req != c.req || size != c.size {
				t.Fatalf("got %v size %d err %v, want %v size %d", req, size, err, c.req, c.size)
			}
		})
	}
}

// socketPair returns the two ends of a connected unix stream socket.
func socketPair(t testing.TB) (front, back *net.UnixConn) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socketpair")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	front, back = conn(fds[0]), conn(fds[1])
	t.Cleanup(func() { front.Close(); back.Close() })
	return front, back
}

// send writes b with fds attached.
func send(t testing.TB, c *net.UnixConn, b []byte, fds ...int) {
	t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
}

// trackedFd returns a descriptor to send and a function that reports
// whether every copy of it has been closed: it is a pipe's write end, and
// the read end sees EOF only then.
func trackedFd(t *testing.T) (fd int, allClosed func() bool) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return int(w.Fd()), func() bool {
		w.Close()
		r.SetReadDeadline(time.Now().Add(leakGuard))
		_, err := r.Read(make([]byte, 1))
		return errors.Is(err, io.EOF)
	}
}

func TestReadMessage(t *testing.T) {
	t.Run("normal", func(t *testing.T) {
		front, back := socketPair(t)
		send(t, front, encode(SetFeatures, flagVersion|flagNeedReply, le64(0x1234)))
		m, err := ReadMessage(back)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if m.Request != SetFeatures || !m.NeedReply() || len(m.Fds) != 0 {
			t.Fatalf("got %+v", m)
		}
		if v, err := m.U64(); err != nil || v != 0x1234 {
			t.Fatalf("payload %#x, %v", v, err)
		}
	})
	t.Run("two messages back to back", func(t *testing.T) {
		front, back := socketPair(t)
		send(t, front, append(encode(SetOwner, flagVersion), encode(GetFeatures, flagVersion)...))
		for _, want := range []Request{SetOwner, GetFeatures} {
			m, err := ReadMessage(back)
			if err != nil || m.Request != want {
				t.Fatalf("got %v, %v; want %v", m, err, want)
			}
		}
	})
	t.Run("with a descriptor", func(t *testing.T) {
		front, back := socketPair(t)
		fd, allClosed := trackedFd(t)
		send(t, front, encode(SetVringKick, flagVersion, le64(2)), fd)
		m, err := ReadMessage(back)
		if err != nil {
			t.Fatal(err)
		}
		if idx, hasFd, err := m.VringFile(); err != nil || idx != 2 || !hasFd {
			t.Fatalf("VringFile: %d %v %v", idx, hasFd, err)
		}
		got := m.TakeFd(0)
		if _, err := unix.FcntlInt(uintptr(got), unix.F_GETFD, 0); err != nil {
			t.Fatalf("received descriptor is not open: %v", err)
		}
		m.Close() // does not close a taken descriptor
		unix.Close(got)
		if !allClosed() {
			t.Fatal("descriptor leaked")
		}
	})
	t.Run("header split, descriptor on the first part", func(t *testing.T) {
		front, back := socketPair(t)
		fd, allClosed := trackedFd(t)
		b := encode(SetVringCall, flagVersion, le64(1))
		send(t, front, b[:5], fd)
		send(t, front, b[5:])
		m, err := ReadMessage(back)
		if err != nil {
			t.Fatal(err)
		}
		if m.Request != SetVringCall || len(m.Fds) != 1 {
			t.Fatalf("got %v with %d descriptors", m.Request, len(m.Fds))
		}
		m.Close()
		if !allClosed() {
			t.Fatal("Close leaked the descriptor")
		}
	})
	t.Run("descriptor on a message that carries none", func(t *testing.T) {
		front, back := socketPair(t)
		fd, allClosed := trackedFd(t)
		send(t, front, encode(GetFeatures, flagVersion), fd)
		m, err := ReadMessage(back)
		if err != nil {
			t.Fatal(err)
		}
		if err := noFds(m); !errors.Is(err, ErrRejected) {
			t.Fatalf("noFds: %v", err)
		}
		m.Close()
		if !allClosed() {
			t.Fatal("descriptor leaked")
		}
	})

	// Each of these fails; every descriptor that came with it is closed.
	errCases := []struct {
		name  string
		write func(t *testing.T, front *net.UnixConn, fd int)
		want  error
	}{
		{"end of stream", func(t *testing.T, front *net.UnixConn, fd int) {}, io.EOF},
		{"truncated header", func(t *testing.T, front *net.UnixConn, fd int) {
			send(t, front, encode(SetOwner, flagVersion)[:7], fd)
		}, ErrProtocol},
		{"truncated payload", func(t *testing.T, front *net.UnixConn, fd int) {
			send(t, front, encode(SetFeatures, flagVersion, le64(1))[:headerSize+4], fd)
		}, ErrProtocol},
		{"oversized size", func(t *testing.T, front *net.UnixConn, fd int) {
			send(t, front, le32(uint32(SetMemTable), flagVersion, maxPayload+1), fd)
		}, ErrProtocol},
		{"bad version", func(t *testing.T, front *net.UnixConn, fd int) {
			send(t, front, encode(SetMemTable, 2, memTable(1, 1)), fd)
		}, ErrProtocol},
		{"too many descriptors", func(t *testing.T, front *net.UnixConn, fd int) {
			fds := make([]int, maxFds+1)
			for i := range fds {
				fds[i] = fd
			}
			send(t, front, encode(SetMemTable, flagVersion, memTable(1, 1)), fds...)
		}, ErrProtocol},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			front, back := socketPair(t)
			fd, allClosed := trackedFd(t)
			c.write(t, front, fd)
			front.CloseWrite()
			m, err := ReadMessage(back)
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, %v; want %v", m, err, c.want)
			}
			if !allClosed() {
				t.Fatal("a received descriptor leaked")
			}
		})
	}
}

// fakeFds stands for n received descriptors; -1 is never closed.
func fakeFds(n int) []int {
	fds := make([]int, n)
	for i := range fds {
		fds[i] = -1
	}
	return fds
}

func TestPayloadDecoders(t *testing.T) {
	u64 := func(m *Message) (any, error) { return m.U64() }
	state := func(m *Message) (any, error) { return m.VringState() }
	addr := func(m *Message) (any, error) { return m.VringAddr() }
	type file struct {
		Index uint32
		HasFd bool
	}
	vfile := func(m *Message) (any, error) {
		i, has, err := m.VringFile()
		return file{i, has}, err
	}
	table := func(m *Message) (any, error) { return m.MemTable() }
	reg := func(m *Message) (any, error) { return m.MemReg() }
	config := func(m *Message) (any, error) { return m.Config() }
	region := func(i int) MemRegion {
		return MemRegion{uint64(i) << 30, 1 << 30, 0x7f0000000000 + uint64(i)<<30, 0}
	}
	cases := []struct {
		name    string
		decode  func(*Message) (any, error)
		payload []byte
		fds     int
		want    any // nil: an ErrProtocol
	}{
		{"u64", u64, le64(0xdeadbeef), 0, uint64(0xdeadbeef)},
		{"u64 short", u64, le32(1), 0, nil},
		{"u64 long", u64, make([]byte, 9), 0, nil},

		{"vring state", state, le32(1, 256), 0, VringState{1, 256}},
		{"vring state short", state, le32(1), 0, nil},

		// desc, used, avail, log: the order of struct vhost_vring_addr.
		{"vring addr", addr, append(le32(3, 0), le64(0x1000, 0x3000, 0x2000, 0)...), 0,
			VringAddr{Index: 3, Desc: 0x1000, Used: 0x3000, Avail: 0x2000}},
		{"vring addr short", addr, make([]byte, 39), 0, nil},

		{"vring file with fd", vfile, le64(3), 1, file{3, true}},
		{"vring file highest index", vfile, le64(0xff), 1, file{0xff, true}},
		{"vring file nofd", vfile, le64(3 | 1<<8), 0, file{3, false}},
		{"vring file nofd but a descriptor", vfile, le64(3 | 1<<8), 1, nil},
		{"vring file descriptor missing", vfile, le64(3), 0, nil},
		{"vring file two descriptors", vfile, le64(3), 2, nil},
		{"vring file unknown bit", vfile, le64(3 | 1<<9), 1, nil},
		{"vring file index beyond the mask", vfile, le64(0x1ff | 1<<32), 1, nil},
		{"vring file short", vfile, le32(3), 1, nil},

		{"mem table one region", table, memTable(1, 1), 1, []MemRegion{region(0)}},
		{"mem table two regions", table, memTable(2, 2), 2, []MemRegion{region(0), region(1)}},
		{"mem table full array", table, memTable(2, maxMemTableRegions), 2, []MemRegion{region(0), region(1)}},
		{"mem table eight regions", table, memTable(8, 8), 8,
			[]MemRegion{region(0), region(1), region(2), region(3), region(4), region(5), region(6), region(7)}},
		{"mem table no regions", table, memTable(0, 0), 0, nil},
		{"mem table nine regions", table, memTable(9, 9), 9, nil},
		{"mem table huge count", table, append(le32(0xffffffff, 0), make([]byte, 32)...), 1, nil},
		{"mem table size mismatch", table, memTable(1, 2), 1, nil},
		{"mem table truncated", table, memTable(2, 2)[:8+32+16], 2, nil},
		{"mem table short", table, le32(1), 1, nil},
		{"mem table fewer descriptors", table, memTable(2, 2), 1, nil},
		{"mem table more descriptors", table, memTable(1, 1), 2, nil},

		{"mem reg", reg, append(le64(0), le64(1<<30, 1<<20, 0x7f0000000000, 0x1000)...), 0,
			MemRegion{1 << 30, 1 << 20, 0x7f0000000000, 0x1000}},
		{"mem reg short", reg, make([]byte, 39), 0, nil},

		{"config read", config, append(le32(0, 60, 0), make([]byte, 60)...), 0, ConfigMsg{0, 60, 0, make([]byte, 60)}},
		{"config writeback byte", config, append(le32(32, 1, 0), 1), 0, ConfigMsg{32, 1, 0, []byte{1}}},
		{"config whole space", config, append(le32(0, maxConfigSize, 0), make([]byte, maxConfigSize)...), 0,
			ConfigMsg{0, maxConfigSize, 0, make([]byte, maxConfigSize)}},
		{"config empty", config, le32(256, 0, 0), 0, ConfigMsg{256, 0, 0, []byte{}}},
		{"config size beyond 256", config, append(le32(0, maxConfigSize+1, 0), make([]byte, maxConfigSize+1)...), 0, nil},
		{"config offset beyond 256", config, le32(maxConfigSize+1, 0, 0), 0, nil},
		{"config offset plus size beyond 256", config, append(le32(200, 100, 0), make([]byte, 100)...), 0, nil},
		{"config offset plus size wraps", config, append(le32(0xffffffff, 2, 0), 0, 0), 0, nil},
		{"config data shorter than size", config, append(le32(0, 4, 0), 1, 2, 3), 0, nil},
		{"config data longer than size", config, append(le32(0, 1, 0), 1, 2), 0, nil},
		{"config short", config, le32(0, 0), 0, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := &Message{Request: SetMemTable, Flags: flagVersion, Payload: c.payload, Fds: fakeFds(c.fds)}
			got, err := c.decode(m)
			if c.want == nil {
				// A well-framed request with a bad payload is rejected
				// (NACKed); the connection goes on.
				if !errors.Is(err, ErrRejected) {
					t.Fatalf("got %+v, %v; want ErrRejected", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, c.want) {
				t.Fatalf("got  %+v\nwant %+v", got, c.want)
			}
		})
	}
}
