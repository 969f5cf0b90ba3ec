//go:build e2e

package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestBackendRestart kills vublk with SIGKILL several times while a guest writes and verifies,
// and restarts it on the same socket and file each time. QEMU reconnects (-chardev
// socket,reconnect=1) and hands the new vublk the inflight buffer
// (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), which resubmits the requests the dead one had taken.
// The guest must see no I/O error, and its data must verify.
func TestBackendRestart(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q *qemuBinary) { testBackendRestart(t, q, splitRestart) })
}

// TestBackendRestartPacked is TestBackendRestart on packed rings (packed=on; the inflight buffer
// has the packed layout): at least 4 kills, more until 2 find requests in flight, at most 16 in
// at most 75 s of guest I/O. A packed restart counts only when it resubmits requests (a split one
// also when it corrects QEMU's stale ring base), and with requests run inline most kills find
// none: one run of the final make test found none in 8 kills.
func TestBackendRestartPacked(t *testing.T) {
	forEachQEMU(t, func(t *testing.T, q *qemuBinary) { testBackendRestart(t, q, packedRestart) })
}

// restartRun is how long a backend-restart test runs: at least minKills kills, and more until
// wantResumed restarts have found requests in flight (a kill lands between requests more often
// than not), at most maxKills, while the guest writes for at most seconds (the kills stop 15 s
// before; the host ends the guest's I/O restartTail after the last kill).
type restartRun struct {
	minKills, maxKills, wantResumed, seconds int
	packed                                   bool
}

var (
	splitRestart  = restartRun{minKills: 10, maxKills: 16, wantResumed: 3, seconds: 90}
	packedRestart = restartRun{minKills: 4, maxKills: 16, wantResumed: 2, seconds: 75, packed: true}
)

func testBackendRestart(t *testing.T, q *qemuBinary, run restartRun) {
	minKills, maxKills, wantResumed := run.minKills, run.maxKills, run.wantResumed
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	sock := filepath.Join(dir, "rw.sock")
	args := []string{"--blk-file", img, "--size", "1G", "--lanes", "4", "--name", "rw", "--packed-ring=" + strconv.FormatBool(run.packed)}
	deviceOpts, resumeMsg := "", "resuming the queue from the inflight buffer"
	params := map[string]string{"phase": "restart", "size": strconv.Itoa(diskSize), "seconds": strconv.Itoa(run.seconds)}
	checks := []string{"size", "restart_dd", "restart_fio", "restart_io_errors"}
	if run.packed {
		deviceOpts, resumeMsg = "packed=on", "resuming the packed queue from the inflight buffer"
		params["packed"] = "1"
		checks = append(checks, "restart_packed")
	}
	d := startVublk(t, sock, args...)
	starve(t, d)

	running := make(chan struct{})
	var once sync.Once
	result := make(chan *vm, 1)
	console := consolePipe(t)
	go func() {
		result <- bootGuest(t, boot{
			qemu:    q,
			disks:   []disk{{socket: sock, numQueues: 2, reconnect: true, deviceOpts: deviceOpts}},
			params:  params,
			console: console.r,
			// the I/O, then checks: a guest whose requests were lost hangs.
			timeout: 5 * time.Minute,
			onLine: func(line string) {
				if line == "E2E restart-running" {
					once.Do(func() { close(running) })
				}
			},
		})
	}()
	select {
	case <-running:
	case v := <-result:
		t.Fatalf("the guest ended before its workload started; console:\n%s", v.console.String())
	case <-time.After(5 * time.Minute):
		t.Fatal("the guest did not start its workload")
	}

	daemons := []*daemon{d}
	resumed := func() int {
		n := 0
		for _, d := range daemons[1:] {
			if d.countLogs(resumeMsg) > 0 {
				n++
			}
		}
		return n
	}
	deadline := time.Now().Add(time.Duration(run.seconds-15) * time.Second)
	kills := 0
	for i := 0; i < maxKills && time.Now().Before(deadline) && (i < minKills || resumed() < wantResumed); i++ {
		kills++
		time.Sleep(time.Duration(800+rand.IntN(2200)) * time.Millisecond)
		d.cmd.Process.Kill() // SIGKILL: no draining, requests stay in flight
		<-d.done
		t.Logf("kill %d: vublk killed", i+1)
		d = startVublk(t, sock, args...)
		starve(t, d)
		daemons = append(daemons, d)
		waitLog(t, d, "front-end connected", time.Minute)
		t.Logf("kill %d: QEMU reconnected to the new vublk", i+1)
	}
	console.stopRestartPhase(t)
	v := <-result
	v.expectChecks(t, "restart", checks)

	t.Logf("vublk killed with SIGKILL and restarted %d times; %d restarts resubmitted requests in flight", kills, resumed())
	if kills < minKills {
		t.Errorf("only %d kills while the guest ran, want at least %d", kills, minKills)
	}
	if resumed() == 0 {
		t.Error("no restart found requests in flight: resubmission was not exercised")
	}
	stats, err := d.stop()
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := stats["errors"].(float64); n != 0 {
		t.Errorf("the last vublk counted %v errors", n)
	}
}

// restartTail is how long the guest's restart phase goes on writing and verifying after the last
// kill or fault, before the host ends it ("stop" on the console) instead of waiting out its
// vublk.seconds: what the kills' deadline (15 s before the end) left at least before.
const restartTail = 15 * time.Second

// console is a pipe to a guest's serial console (boot.console).
type console struct{ r, w *os.File }

func consolePipe(t *testing.T) console {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return console{r, w}
}

// stopRestartPhase ends the guest's restart phase restartTail from now, if its vublk.seconds
// have not ended it before.
func (c console) stopRestartPhase(t *testing.T) {
	t.Helper()
	time.Sleep(restartTail)
	if _, err := c.w.WriteString("stop\n"); err != nil {
		t.Logf("the guest's console: %v", err) // QEMU has exited: the guest ended by itself
	}
}

// starve runs every thread of the daemon at nice 19: it loses the CPU to QEMU's busy TCG threads,
// so the requests it has taken stay in flight for a while, as on a slow or loaded host, and a
// SIGKILL at a random moment catches some. Threads it starts later inherit the nice value.
func starve(t *testing.T, d *daemon) {
	t.Helper()
	pid := d.cmd.Process.Pid
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		tid, err := strconv.Atoi(task.Name())
		if err != nil {
			continue
		}
		if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, 19); err != nil {
			t.Fatalf("renice thread %d of vublk: %v", tid, err)
		}
	}
}

// waitLog waits until the daemon has logged msg.
func waitLog(t *testing.T, d *daemon, msg string, timeout time.Duration) {
	t.Helper()
	for start := time.Now(); d.countLogs(msg) == 0; time.Sleep(50 * time.Millisecond) {
		if time.Since(start) > timeout {
			t.Fatalf("vublk did not log %q within %v", msg, timeout)
		}
	}
}
