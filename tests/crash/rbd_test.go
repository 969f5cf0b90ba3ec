//go:build rbd

package crash

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vublk/vublk/tests/internal/buildvublk"
	"github.com/vublk/vublk/vhostuser/frontend"
	"github.com/vublk/vublk/virtio"
)

// TestRBDKillRestart is the crash checker's workload through the socket of a real vublk process
// serving an RBD image of the test cluster (scripts/ceph-cluster.sh; make rbd starts it):
// concurrent overlapping writes, reads and flushes on 2 queues, then vublk is SIGKILLed at a
// random moment, started again on the same image, and the whole disk is read back through the
// socket. Every write that a completed flush covered must be there (Check, the same rules as
// for the crashable in-memory store); writes not covered may be there or not, whole or torn at
// sectors, but nothing else. librbd runs with its writeback cache (--rbd-cache and a ceph.conf
// that asks for it), where a flush has the most to do.
func TestRBDKillRestart(t *testing.T) {
	conf, keyring, pool := os.Getenv("VUBLK_CEPH_CONF"), os.Getenv("VUBLK_CEPH_KEYRING"), os.Getenv("VUBLK_CEPH_POOL")
	if conf == "" || pool == "" {
		if os.Getenv("VUBLK_CEPH_REQUIRED") != "" {
			t.Fatal("VUBLK_CEPH_CONF/VUBLK_CEPH_POOL are not set")
		}
		t.Skip("no Ceph cluster: run with make rbd, or eval $(scripts/ceph-cluster.sh start)")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "vublk")
	if err := buildvublk.Build(bin, "rbd"); err != nil {
		t.Fatalf("building vublk: %v", err)
	}
	// librbd's default cache policy (writearound) sends every write to the OSDs at once; in
	// writeback mode (from the first write on, not only after the first flush) it keeps them in
	// the client's cache until a flush, up to a second: that is where a flush that did not reach
	// librbd would lose data when vublk dies.
	base, err := os.ReadFile(conf)
	if err != nil {
		t.Fatal(err)
	}
	conf = filepath.Join(dir, "ceph.conf")
	if err := os.WriteFile(conf, append(base, "\n[client]\nrbd_cache_policy = writeback\nrbd_cache_writethrough_until_flush = false\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	const rounds, queues = 4, 2
	totalWrites, totalFlushes := 0, 0
	for round := range rounds {
		img := fmt.Sprintf("%s/crash-%d-%d", pool, time.Now().UnixNano(), round)
		t.Cleanup(func() { exec.Command("rbd", "-c", conf, "-k", keyring, "rm", "--no-progress", img).Run() })
		sock := filepath.Join(dir, fmt.Sprintf("r%d.sock", round))
		args := []string{"serve", "--socket-path", sock, "--blk-rbd", img, "--ceph-conf", conf, "--ceph-keyring", keyring,
			"--size", fmt.Sprint(diskSize), "--num-queues", fmt.Sprint(queues), "--lanes", "4", "--rbd-cache"}

		d := startDaemon(t, bin, args)
		fd, err := frontend.Connect(sock, frontend.Options{NumQueues: queues, QueueSize: 128, EventIdx: true, MemSize: 128 << 20})
		if err != nil {
			t.Fatal(err)
		}
		r := &rig{dev: fd, hist: NewHistory(), qmu: make([]sync.Mutex, queues)}
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(round), uint64(w)))
				var inflight []*frontend.Pending
				for {
					q := rng.IntN(queues)
					sector, sectors := randomSectors(rng)
					sectors = min(sectors, 256) // up to 128 KiB: the OSD is slow
					sector = min(sector, maxSector-sectors)
					var p *frontend.Pending
					var err error
					switch k := rng.IntN(100); {
					case k < 70:
						p, err = r.write(q, sector, sectors)
					case k < 85:
						p, err = r.read(q, sector, sectors)
					default:
						p, err = r.flush(q)
					}
					if err != nil {
						return // the device closed
					}
					inflight = append(inflight, p)
					if len(inflight) > 6 || rng.IntN(8) == 0 {
						res := inflight[0].Wait()
						inflight = inflight[1:]
						if res.Err != nil {
							return // killed: the front-end was closed
						}
					}
				}
			}()
		}
		// Let the workload run, and kill after a completed flush half the time (when what it
		// covered is most likely still on its way in librbd), at a random moment otherwise.
		time.Sleep(time.Duration(1500+rand.IntN(1500)) * time.Millisecond)
		if round%2 == 0 {
			r.hist.WaitFlushDone(time.Second)
		}
		before := r.hist.Now()
		d.Process.Kill()
		d.Wait()
		after := r.hist.Now()
		fd.Close()
		wg.Wait()
		writes, flushes := r.hist.Snapshot()

		// A new vublk on the same image; read the whole disk back through the socket.
		d2 := startDaemon(t, bin, args)
		fd2, err := frontend.Connect(sock, frontend.Options{NumQueues: 1, QueueSize: 128, MemSize: 64 << 20})
		if err != nil {
			t.Fatal(err)
		}
		imgData := make([]byte, 0, diskSize)
		for off := uint64(0); off < diskSize; off += 1 << 20 {
			p, err := fd2.Queue(0).Submit(frontend.ReadRequest(off/SectorSize, 1<<20))
			if err != nil {
				t.Fatal(err)
			}
			res := p.Wait()
			if res.Err != nil {
				t.Fatalf("reading back at %d: %v", off, res.Err)
			}
			imgData = append(imgData, res.In...)
		}
		fd2.Close()
		d2.Process.Signal(os.Interrupt)
		d2.Wait()

		nw, nf := 0, 0
		for _, w := range writes {
			if w.Complete != Never {
				nw++
			}
		}
		for _, f := range flushes {
			if f.OK {
				nf++
			}
		}
		totalWrites, totalFlushes = totalWrites+nw, totalFlushes+nf
		if nf == 0 {
			t.Errorf("round %d: no flush completed before the kill: nothing was checked", round)
		}
		if v := Check(imgData, writes, flushes, before, after, false); len(v) > 0 {
			t.Errorf("round %d: %d bad sectors after SIGKILL and restart, first %v", round, len(v), v[0])
		}
	}
	t.Logf("checked %d kills of vublk on RBD: %d completed writes, %d completed flushes", rounds, totalWrites, totalFlushes)
}

// startDaemon runs vublk with args and waits for "export ready".
func startDaemon(t *testing.T, bin string, args []string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(bin, args...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	ready := make(chan struct{})
	var log strings.Builder
	var mu sync.Mutex
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			mu.Lock()
			log.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if strings.Contains(sc.Text(), "export ready") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(30 * time.Second):
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("vublk did not become ready:\n%s", log.String())
	}
	return cmd
}

// TestRBDTimeout stops the cluster's only OSD under a vublk export with --rbd-timeout 3s: a
// write sent during the outage fails with IOERR within the timeout (plus slack), a request
// behind it on the same queue that needs no OSD completes meanwhile, and the daemon goes on
// serving. When the OSD is back, writes and reads go on, and what was flushed before the
// outage reads back intact. A flush that failed stays failed (latched) until the export is
// restarted, after which flushes succeed again.
func TestRBDTimeout(t *testing.T) {
	conf, keyring, pool := os.Getenv("VUBLK_CEPH_CONF"), os.Getenv("VUBLK_CEPH_KEYRING"), os.Getenv("VUBLK_CEPH_POOL")
	if conf == "" || pool == "" {
		if os.Getenv("VUBLK_CEPH_REQUIRED") != "" {
			t.Fatal("VUBLK_CEPH_CONF/VUBLK_CEPH_POOL are not set")
		}
		t.Skip("no Ceph cluster: run with make rbd, or eval $(scripts/ceph-cluster.sh start)")
	}
	cluster := func(cmd string) {
		sh := exec.Command("bash", "../../scripts/ceph-cluster.sh", cmd)
		sh.Env = append(os.Environ(), "CEPH_DIR="+filepath.Dir(conf))
		if out, err := sh.CombinedOutput(); err != nil {
			t.Fatalf("ceph-cluster.sh %s: %v\n%s", cmd, err, out)
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "vublk")
	if err := buildvublk.Build(bin, "rbd"); err != nil {
		t.Fatalf("building vublk: %v", err)
	}
	img := fmt.Sprintf("%s/timeout-%d", pool, time.Now().UnixNano())
	t.Cleanup(func() { exec.Command("rbd", "-c", conf, "-k", keyring, "rm", "--no-progress", img).Run() })
	sock := filepath.Join(dir, "t.sock")
	const timeout = 3 * time.Second
	args := []string{"serve", "--socket-path", sock, "--blk-rbd", img, "--ceph-conf", conf, "--ceph-keyring", keyring,
		"--size", "16M", "--num-queues", "1", "--rbd-timeout", timeout.String()}
	d := startDaemon(t, bin, args)
	fd, err := frontend.Connect(sock, frontend.Options{NumQueues: 1, QueueSize: 128, MemSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	do := func(req frontend.Request) frontend.Result {
		t.Helper()
		p, err := fd.Queue(0).Submit(req)
		if err != nil {
			t.Fatal(err)
		}
		return p.Wait()
	}
	pattern := func(b byte) []byte {
		buf := make([]byte, 1<<20)
		for i := range buf {
			buf[i] = b ^ byte(i>>9)
		}
		return buf
	}
	a := pattern(0xa5)
	if res := do(frontend.Request{Type: virtio.BlkTOut, Sector: 0, Out: a}); res.Err != nil {
		t.Fatal(res.Err)
	}
	if res := do(frontend.Request{Type: virtio.BlkTFlush}); res.Err != nil {
		t.Fatal(res.Err)
	}

	cluster("osd-stop")
	restarted := false
	defer func() {
		if !restarted {
			cluster("osd-start")
		}
	}()
	t0 := time.Now()
	wp, err := fd.Queue(0).Submit(frontend.Request{Type: virtio.BlkTOut, Sector: 4096, Out: pattern(0x11)})
	if err != nil {
		t.Fatal(err)
	}
	// librbd dispatches the write on the queue's goroutine (rbd_non_blocking_aio=false), which
	// must not wait there for the OSD: a GET_ID behind the write on the same queue completes
	// while the write is still waiting, long before the timeout.
	ip, err := fd.Queue(0).Submit(frontend.GetIDRequest())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-ip.Done():
		if res := ip.Wait(); res.Err != nil {
			t.Errorf("GET_ID during the outage: %v", res.Err)
		}
		select {
		case <-wp.Done():
			t.Errorf("the write during the outage ended after %v, before a GET_ID behind it", time.Since(t0))
		default:
		}
	case <-wp.Done():
		t.Errorf("the write during the outage ended after %v, before a GET_ID behind it", time.Since(t0))
	case <-time.After(timeout / 2):
		t.Errorf("a GET_ID behind a write to the stopped OSD took more than %v: the queue waits in librbd", timeout/2)
	}
	w := wp.Wait()
	f := do(frontend.Request{Type: virtio.BlkTFlush})
	took := time.Since(t0)
	t.Logf("during the outage: write %v, flush %v, after %v", w.Err, f.Err, took.Round(time.Millisecond))
	// Without librbd's cache the write itself waits for the OSD and fails; the flush has nothing
	// left to write back and may succeed.
	if !errors.Is(w.Err, frontend.ErrIOError) {
		t.Errorf("write during the outage: %v, want IOERR", w.Err)
	}
	flushFailed := f.Err != nil
	if flushFailed && !errors.Is(f.Err, frontend.ErrIOError) {
		t.Errorf("flush during the outage: %v, want OK or IOERR", f.Err)
	}
	if took > 2*timeout+10*time.Second {
		t.Errorf("the requests took %v to fail, with a timeout of %v", took, timeout)
	}
	if err := d.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("vublk is gone: %v", err)
	}
	cluster("osd-start")
	restarted = true

	// Back: new writes go on (retried until the OSD is up), what was flushed before is intact.
	deadline := time.Now().Add(60 * time.Second)
	for {
		res := do(frontend.Request{Type: virtio.BlkTOut, Sector: 8192, Out: pattern(0x22)})
		if res.Err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("writes still fail a minute after the OSD came back: %v", res.Err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	t.Logf("writes go on %v after the OSD was started again", time.Since(t0.Add(took)).Round(time.Millisecond))
	res := do(frontend.ReadRequest(0, 1<<20))
	if res.Err != nil || !bytes.Equal(res.In, a) {
		t.Errorf("what was flushed before the outage does not read back (%v)", res.Err)
	}
	if res := do(frontend.ReadRequest(8192, 1<<20)); res.Err != nil || !bytes.Equal(res.In, pattern(0x22)) {
		t.Errorf("a write after the outage does not read back (%v)", res.Err)
	}
	if res := do(frontend.Request{Type: virtio.BlkTFlush}); flushFailed && !errors.Is(res.Err, frontend.ErrIOError) {
		t.Errorf("a flush after a failed one: %v, want IOERR (latched)", res.Err)
	} else if !flushFailed && res.Err != nil {
		t.Errorf("a flush after the outage: %v", res.Err)
	}

	// A restarted export starts with a clean slate.
	fd.Close()
	d.Process.Signal(os.Interrupt)
	d.Wait()
	startDaemon(t, bin, args)
	fd2, err := frontend.Connect(sock, frontend.Options{NumQueues: 1, QueueSize: 128, MemSize: 32 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer fd2.Close()
	p, err := fd2.Queue(0).Submit(frontend.Request{Type: virtio.BlkTFlush})
	if err != nil {
		t.Fatal(err)
	}
	if res := p.Wait(); res.Err != nil {
		t.Errorf("flush after restarting the export: %v", res.Err)
	}
	p, err = fd2.Queue(0).Submit(frontend.ReadRequest(0, 1<<20))
	if err != nil {
		t.Fatal(err)
	}
	if res := p.Wait(); res.Err != nil || !bytes.Equal(res.In, a) {
		t.Errorf("after restarting: the data flushed before the outage does not read back (%v)", res.Err)
	}
}
