//go:build rbd && cgo

package rbd

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vublk/vublk/backend"
)

// The tests run against the cluster of scripts/ceph-cluster.sh (make test starts it): they
// read its environment. Without it they skip, unless VUBLK_CEPH_REQUIRED is set (make test).
func cluster(t *testing.T) (conf, keyring, pool string) {
	t.Helper()
	conf, keyring, pool = os.Getenv("VUBLK_CEPH_CONF"), os.Getenv("VUBLK_CEPH_KEYRING"), os.Getenv("VUBLK_CEPH_POOL")
	if conf == "" || pool == "" {
		if os.Getenv("VUBLK_CEPH_REQUIRED") != "" {
			t.Fatal("VUBLK_CEPH_CONF/VUBLK_CEPH_POOL are not set: start scripts/ceph-cluster.sh and eval its env")
		}
		t.Skip("no Ceph cluster: eval $(scripts/ceph-cluster.sh start) to run the RBD tests")
	}
	return conf, keyring, pool
}

func openTemp(t *testing.T, size int64, opt Options) (*Store, Spec) {
	t.Helper()
	conf, keyring, pool := cluster(t)
	spec := Spec{Pool: pool, Image: fmt.Sprintf("test-%s-%d", t.Name(), time.Now().UnixNano())}
	for i := range spec.Image {
		if c := spec.Image[i]; c == '/' {
			spec.Image = spec.Image[:i] + "_" + spec.Image[i+1:]
		}
	}
	opt.ConfFile, opt.Keyring, opt.CreateSize = conf, keyring, size
	s, err := Open(spec, opt)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		s.Close()
		rbdCLI(t, "rm", "--no-progress", spec.String())
	})
	return s, spec
}

func rbdCLI(t *testing.T, args ...string) {
	t.Helper()
	conf, keyring, _ := cluster(t)
	out, err := exec.Command("rbd", append([]string{"-c", conf, "-k", keyring}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("rbd %v: %v\n%s", args, err, out)
	}
}

type waiter struct {
	wg sync.WaitGroup
}

func (w *waiter) Complete(r *backend.Request) { w.wg.Done() }

func TestParseSpec(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Spec
		bad  bool
	}{
		{in: "rbd/disk0", want: Spec{Pool: "rbd", Image: "disk0"}},
		{in: "rbd/ns/disk0", want: Spec{Pool: "rbd", Namespace: "ns", Image: "disk0"}},
		{in: "rbd/disk0@snap1", want: Spec{Pool: "rbd", Image: "disk0", Snap: "snap1"}},
		{in: "disk0", bad: true},
		{in: "rbd/", bad: true},
		{in: "/disk0", bad: true},
		{in: "rbd/disk0@", bad: true},
		{in: "rbd//disk0", bad: true},
		{in: "a/b/c/d", bad: true},
		{in: "rbd/a@b@c", bad: true},
	} {
		got, err := ParseSpec(tc.in)
		if tc.bad != (err != nil) || !tc.bad && (got != tc.want || got.String() != tc.in) {
			t.Errorf("ParseSpec(%q) = %+v, %v", tc.in, got, err)
		}
	}
}

// TestStoreIO runs reads and writes through an Engine (aio) and through the lanes (NoAIO),
// concurrently on disjoint blocks, and reads everything back, also after closing and opening
// the image again.
func TestStoreIO(t *testing.T) {
	for _, tc := range []struct {
		name string
		opt  Options
	}{
		{"aio", Options{}},
		// librbd's default: each request handed to its io_context_pool thread first.
		{"aio-queued", Options{ClientConf: []string{"rbd_non_blocking_aio=true"}}},
		// The objecter's in-flight throttle full: StartIO waits in librbd on the submitting
		// goroutine until librbd's threads complete earlier requests.
		{"aio-throttled", Options{ClientConf: []string{"objecter_inflight_ops=2", "objecter_inflight_op_bytes=8192"}}},
		{"noaio", Options{NoAIO: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 8 << 20
			s, spec := openTemp(t, size, tc.opt)
			if s.Size() != size {
				t.Fatalf("size %d, want %d", s.Size(), size)
			}
			e := backend.NewEngine(s, 2)
			want := make([]byte, size)
			rnd := rand.New(rand.NewPCG(1, 2))
			var w waiter
			const n = 200
			reqs := make([]backend.Request, n)
			for i := range reqs {
				blk := int64(i) * 8192 % size
				buf := make([]byte, 4096+512*(i%8))
				for j := range buf {
					buf[j] = byte(rnd.Uint32())
				}
				copy(want[blk:], buf)
				// Two buffers, to go through the vectored path.
				reqs[i] = backend.Request{Op: backend.OpWrite, Offset: blk, Bufs: [][]byte{buf[:512], buf[512:]}, Done: &w}
				w.wg.Add(1)
				e.Submit(&reqs[i])
			}
			w.wg.Wait()
			for i := range reqs {
				if reqs[i].Err != nil {
					t.Fatalf("write %d: %v", i, reqs[i].Err)
				}
			}
			if err := e.Flush(); err != nil {
				t.Fatalf("flush: %v", err)
			}
			got := make([]byte, size)
			for off := int64(0); off < size; off += 1 << 20 {
				r := backend.Request{Op: backend.OpRead, Offset: off, Bufs: [][]byte{got[off : off+4096], got[off+4096 : off+1<<20]}, Done: &w}
				w.wg.Add(1)
				e.Submit(&r)
				w.wg.Wait()
				if r.Err != nil {
					t.Fatalf("read at %d: %v", off, r.Err)
				}
			}
			if !bytes.Equal(got, want) {
				t.Fatal("read back differs from what was written")
			}
			st := e.Stats.Snapshot()
			if st.Writes != n || st.Reads != size>>20 || st.BytesRead != size {
				t.Errorf("stats %+v", st)
			}
			// Out of range through the aio path.
			r := backend.Request{Op: backend.OpRead, Offset: size - 512, Bufs: [][]byte{make([]byte, 1024)}, Done: &w}
			w.wg.Add(1)
			e.Submit(&r)
			w.wg.Wait()
			if !errors.Is(r.Err, backend.ErrOutOfRange) {
				t.Errorf("read past the end: %v, want ErrOutOfRange", r.Err)
			}
			if err := e.Close(); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			conf, keyring, _ := cluster(t)
			s2, err := Open(spec, Options{ConfFile: conf, Keyring: keyring})
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			clear(got)
			if err := s2.ReadAt([][]byte{got}, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("after reopening: read back differs from what was written")
			}
		})
	}
}

// TestStoreDiscardZeroesResizeSnap: discard and write-zeroes read back as zeros, resize changes
// the size, a snapshot is read-only and keeps its data.
func TestStoreDiscardZeroesResizeSnap(t *testing.T) {
	const size = 4 << 20
	s, spec := openTemp(t, size, Options{})
	ones := bytes.Repeat([]byte{0xa5}, size)
	if err := s.WriteAt([][]byte{ones}, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Discard(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := s.WriteZeroes(2<<20, 1<<20, false); err != nil {
		t.Fatal(err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := s.ReadAt([][]byte{got}, 0); err != nil {
		t.Fatal(err)
	}
	for _, rg := range []struct {
		off, n int
		b      byte
	}{{0, 1 << 20, 0}, {1 << 20, 1 << 20, 0xa5}, {2 << 20, 1 << 20, 0}, {3 << 20, 1 << 20, 0xa5}} {
		if !bytes.Equal(got[rg.off:rg.off+rg.n], bytes.Repeat([]byte{rg.b}, rg.n)) {
			t.Errorf("range %d+%d does not read as %#x", rg.off, rg.n, rg.b)
		}
	}
	if err := s.Discard(size-512, 1024); !errors.Is(err, backend.ErrOutOfRange) {
		t.Errorf("discard past the end: %v", err)
	}

	rbdCLI(t, "snap", "create", spec.String()+"@s1")
	defer rbdCLI(t, "snap", "rm", "--no-progress", spec.String()+"@s1")
	if err := s.WriteAt([][]byte{bytes.Repeat([]byte{0x11}, 4096)}, 0); err != nil {
		t.Fatal(err)
	}
	if err := s.Resize(2 * size); err != nil {
		t.Fatal(err)
	}
	if s.Size() != 2*size {
		t.Fatalf("size after resize %d", s.Size())
	}
	if err := s.WriteAt([][]byte{ones[:4096]}, 2*size-4096); err != nil {
		t.Fatalf("write in the grown part: %v", err)
	}

	conf, keyring, _ := cluster(t)
	snap := spec
	snap.Snap = "s1"
	ss, err := Open(snap, Options{ConfFile: conf, Keyring: keyring})
	if err != nil {
		t.Fatal(err)
	}
	defer ss.Close()
	if !ss.ReadOnly() || ss.Size() != size {
		t.Errorf("snapshot: read-only %v size %d", ss.ReadOnly(), ss.Size())
	}
	if err := ss.WriteAt([][]byte{ones[:512]}, 0); !errors.Is(err, backend.ErrReadOnly) {
		t.Errorf("write to a snapshot: %v", err)
	}
	if err := ss.ReadAt([][]byte{got}, 0); err != nil {
		t.Fatal(err)
	}
	if got[0] != 0 || got[1<<20] != 0xa5 {
		t.Errorf("snapshot content: %#x %#x, want 0 and 0xa5 (as at the snapshot)", got[0], got[1<<20])
	}
}

func TestOpenMissing(t *testing.T) {
	conf, keyring, pool := cluster(t)
	_, err := Open(Spec{Pool: pool, Image: "no-such-image"}, Options{ConfFile: conf, Keyring: keyring})
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open a missing image: %v, want ENOENT", err)
	}
	_, err = Open(Spec{Pool: "no-such-pool", Image: "x"}, Options{ConfFile: conf, Keyring: keyring, CreateSize: 1 << 20})
	if err == nil {
		t.Error("open in a missing pool succeeded")
	}
	_, err = Open(Spec{Pool: pool, Image: "x"}, Options{ConfFile: conf + ".missing"})
	if err == nil || !strings.Contains(err.Error(), "read the ceph.conf "+conf+".missing") {
		t.Errorf("open with a missing ceph.conf: %v", err)
	}
}

// TestOpenClientConf checks the client options vublk sets and that ClientConf overrides them.
func TestOpenClientConf(t *testing.T) {
	conf, keyring, pool := cluster(t)
	for _, tc := range []struct {
		name    string
		opt     Options
		want    map[string]string
		wantErr string
	}{
		{"defaults", Options{}, map[string]string{"rbd_non_blocking_aio": "false", "rbd_cache": "false"}, ""},
		{"cache", Options{Cache: true}, map[string]string{"rbd_non_blocking_aio": "false", "rbd_cache": "true"}, ""},
		{"override", Options{ClientConf: []string{"rbd_non_blocking_aio=true", "rbd_io_scheduler=none"}},
			map[string]string{"rbd_non_blocking_aio": "true", "rbd_io_scheduler": "none", "rbd_cache": "false"}, ""},
		{"unknown option", Options{ClientConf: []string{"no_such_option=1"}}, nil, "set the cluster options"},
		{"no value", Options{ClientConf: []string{"rbd_cache"}}, nil, "want key=value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opt.ConfFile, tc.opt.Keyring, tc.opt.CreateSize = conf, keyring, 1<<20
			spec := Spec{Pool: pool, Image: fmt.Sprintf("test-conf-%d", time.Now().UnixNano())}
			s, err := Open(spec, tc.opt)
			if tc.wantErr != "" {
				if err == nil {
					s.Close()
					rbdCLI(t, "rm", "--no-progress", spec.String())
					t.Fatalf("Open succeeded, want an error with %q", tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Open: %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer rbdCLI(t, "rm", "--no-progress", spec.String())
			defer s.Close()
			for k, want := range tc.want {
				if got, err := s.conn.confGet(k); err != nil || got != want {
					t.Errorf("%s = %q (%v), want %q", k, got, err, want)
				}
			}
		})
	}
}
