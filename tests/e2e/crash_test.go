//go:build e2e

package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vublk/vublk/backend"
)

const (
	crashDiskSize     = 64 << 20
	randomCrashStates = 40
)

// durableFile is a file the guest was told is durable: written, fsynced, renamed into place and
// its directory fsynced. logSize is the write log's size when the host saw the guest say so: every
// flush mark that made it durable ends at or before that offset.
type durableFile struct {
	name    string
	size    int
	round   int
	logSize int64
}

// TestExt4CrashStates runs a journaled ext4 workload that flushes a lot (fsync, rename, directory
// fsync, unlink, four processes at once) in a real guest against `vublk serve --write-log`, then
// replays the log into every flush-mark state and into random crash states between marks. Each
// state must be repaired by e2fsck -fy and then be clean for e2fsck -fn, and every file the guest
// had been told was durable must be there with its content, until the guest deleted it.
func TestExt4CrashStates(t *testing.T) { forEachQEMU(t, testExt4CrashStates) }

func testExt4CrashStates(t *testing.T, q *qemuBinary) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.img")
	img := filepath.Join(dir, "disk.img")
	wlog := filepath.Join(dir, "write.log")
	if err := os.WriteFile(base, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(base, crashDiskSize); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mke2fs", "-F", "-q", "-t", "ext4", base).CombinedOutput(); err != nil {
		t.Fatalf("mke2fs: %v\n%s", err, out)
	}
	baseData, err := os.ReadFile(base)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, baseData, 0o644); err != nil {
		t.Fatal(err)
	}
	d := startVublk(t, filepath.Join(dir, "crash.sock"), "--blk-file", img, "--write-log", wlog, "--lanes", "4", "--name", "crash")

	var mu sync.Mutex
	var files []durableFile
	roundLogSize := map[int]int64{} // round -> log size when the guest said "synced"
	round := func(name string) int {
		r, _ := strconv.Atoi(strings.TrimPrefix(strings.SplitN(name, "-", 2)[0], "r"))
		return r
	}
	logSize := func() int64 {
		fi, err := os.Stat(wlog)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	onLine := func(line string) {
		f := strings.Fields(line)
		switch {
		case len(f) == 4 && f[0] == "E2E" && f[1] == "durable":
			size, err := strconv.Atoi(f[3])
			if err != nil {
				return
			}
			n := logSize()
			mu.Lock()
			files = append(files, durableFile{name: f[2], size: size, round: round(f[2]), logSize: n})
			mu.Unlock()
		case len(f) == 3 && f[0] == "E2E" && f[1] == "synced":
			r, _ := strconv.Atoi(f[2])
			n := logSize()
			mu.Lock()
			roundLogSize[r] = n
			mu.Unlock()
		}
	}
	start := time.Now()
	v := bootGuest(t, boot{qemu: q, disks: []disk{{socket: d.socket, numQueues: 2}},
		params: map[string]string{"phase": "crashwork"}, timeout: 10 * time.Minute, onLine: onLine})
	v.expectChecks(t, "crashwork", []string{"mount_ext4", "umount_ext4"})
	stats, err := d.stop()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("workload took %v; vublk: %v", time.Since(start).Round(time.Second), stats)
	if len(files) != 6*4*5 {
		t.Fatalf("the guest announced %d durable files, want %d", len(files), 6*4*5)
	}

	f, err := os.Open(wlog)
	if err != nil {
		t.Fatal(err)
	}
	l, err := backend.ReadWriteLog(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	var markEnds []int64 // markEnds[m-1] is where flush mark m ends in the log
	for _, r := range l.Records {
		if r.Type == backend.LogFlush {
			markEnds = append(markEnds, r.End)
		}
	}
	// marksBy returns how many flush marks the log held at that size.
	marksBy := func(size int64) int {
		n := 0
		for n < len(markEnds) && markEnds[n] <= size {
			n++
		}
		return n
	}
	t.Logf("write log: %d records, %d flush marks", len(l.Records), l.Marks)
	if l.Marks < 30 {
		t.Fatalf("only %d flush marks: the workload did not flush enough", l.Marks)
	}

	// The whole log replayed onto the base image is the disk vublk left behind.
	final := append([]byte(nil), baseData...)
	if err := l.ReplayToMark(final, -1); err != nil {
		t.Fatal(err)
	}
	if disk, err := os.ReadFile(img); err != nil || !bytes.Equal(disk, final) {
		t.Fatalf("replaying the whole log does not rebuild the disk (err %v)", err)
	}

	// A file of round r must exist, with its content, in a state whose last complete flush mark is
	// b when the mark that made it durable is at most b and the guest had not yet started deleting
	// it: round r+2 deletes it, and starts only after the guest saw round r+1 synced.
	required := func(b int) []durableFile {
		var out []durableFile
		for _, f := range files {
			deleteAfter, deleted := roundLogSize[f.round+1]
			if marksBy(f.logSize) <= b && (!deleted || b < marksBy(deleteAfter)) {
				out = append(out, f)
			}
		}
		return out
	}

	type state struct {
		name string
		mark int
		seed uint64 // 0: the state at the mark itself
	}
	var states []state
	for m := 1; m <= l.Marks; m++ {
		states = append(states, state{name: fmt.Sprintf("mark %d", m), mark: m})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < randomCrashStates; i++ {
		m := rng.IntN(l.Marks + 1)
		seed := uint64(i + 1)
		states = append(states, state{name: fmt.Sprintf("crash after mark %d seed %d", m, seed), mark: m, seed: seed})
	}

	// The check can fail: the final state without the write that carried one durable file's data
	// must be rejected.
	t.Run("check_catches_a_lost_write", func(t *testing.T) {
		want := required(l.Marks)
		if len(want) == 0 {
			t.Fatal("no file is required at the last mark")
		}
		victim := fileContent(want[0].name, want[0].size)[:64]
		lost := &backend.WriteLog{DiskSize: l.DiskSize}
		dropped := 0
		for _, r := range l.Records {
			if r.Type == backend.LogWrite && bytes.Contains(r.Data, victim) {
				dropped++
				continue
			}
			lost.Records = append(lost.Records, r)
		}
		if dropped == 0 {
			t.Fatalf("no write carries %s", want[0].name)
		}
		_, err := checkState(filepath.Join(dir, "lost"), lost, baseData, base, wlog, -1, 0, want)
		if err == nil {
			t.Fatalf("dropping the %d write(s) with %s's data went unnoticed", dropped, want[0].name)
		}
		t.Logf("caught: %v", firstLine(err.Error()))
	})

	var (
		checkedFiles int
		failures     int
		fmu          sync.Mutex
	)
	checkStart := time.Now()
	work := make(chan state)
	var wg sync.WaitGroup
	for w := 0; w < runtime.NumCPU(); w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			wdir := filepath.Join(dir, fmt.Sprintf("check%d", w))
			for s := range work {
				n, err := checkState(wdir, l, baseData, base, wlog, s.mark, s.seed, required(s.mark))
				fmu.Lock()
				checkedFiles += n
				if err != nil {
					failures++
					if failures <= 5 {
						t.Errorf("%s: %v", s.name, err)
					}
				}
				fmu.Unlock()
			}
		}(w)
	}
	for _, s := range states {
		work <- s
	}
	close(work)
	wg.Wait()
	t.Logf("checked %d crash states (%d flush marks + %d random crash points) and %d durable-file contents in %v; %d failed",
		len(states), l.Marks, randomCrashStates, checkedFiles, time.Since(checkStart).Round(time.Second), failures)
	if checkedFiles == 0 {
		t.Error("no durable file was checked")
	}
}

// checkState builds one crash state in wdir — at flush mark `mark`, or with seed != 0 a random
// crash state after it made by the `vublk replay --crash` command — and checks it: e2fsck -fy
// repairs it, e2fsck -fn then finds it clean, and the required files have their content.
// It returns how many file contents it checked.
func checkState(wdir string, l *backend.WriteLog, baseData []byte, base, wlog string, mark int, seed uint64, want []durableFile) (int, error) {
	os.RemoveAll(wdir)
	if err := os.MkdirAll(wdir, 0o755); err != nil {
		return 0, err
	}
	img := filepath.Join(wdir, "state.img")
	if seed == 0 {
		data := append([]byte(nil), baseData...)
		if err := l.ReplayToMark(data, mark); err != nil {
			return 0, err
		}
		if err := os.WriteFile(img, data, 0o644); err != nil {
			return 0, err
		}
	} else {
		out, err := exec.Command(env.vublk, "replay", "--log", wlog, "--base", base, "--out", img,
			"--mark", strconv.Itoa(mark), "--crash", "--seed", strconv.FormatUint(seed, 10)).CombinedOutput()
		if err != nil {
			return 0, fmt.Errorf("vublk replay: %v\n%s", err, out)
		}
	}
	// e2fsck exit codes: 0 clean, 1 errors corrected, 2 corrected and reboot; 4 and up is failure.
	out, err := exec.Command("e2fsck", "-fy", img).CombinedOutput()
	var exit *exec.ExitError
	if err != nil && (!errors.As(err, &exit) || exit.ExitCode() >= 4) {
		return 0, fmt.Errorf("e2fsck -fy: %v\n%s", err, out)
	}
	if out, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("e2fsck -fn after e2fsck -fy is not clean: %v\n%s", err, out)
	}
	dump := filepath.Join(wdir, "dump")
	if err := os.Mkdir(dump, 0o755); err != nil {
		return 0, err
	}
	if out, err := exec.Command("debugfs", "-R", "rdump /data "+dump, img).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("debugfs rdump: %v\n%s", err, out)
	}
	for _, f := range want {
		got, err := os.ReadFile(filepath.Join(dump, "data", f.name))
		if err != nil {
			return 0, fmt.Errorf("durable file %s (round %d) is missing: %v", f.name, f.round, err)
		}
		if !bytes.Equal(got, fileContent(f.name, f.size)) {
			return 0, fmt.Errorf("durable file %s has %d bytes of wrong content (want %d bytes)", f.name, len(got), f.size)
		}
	}
	return len(want), nil
}

// fileContent is what guest.sh writes to a file: its name, one per line, cut to size.
func fileContent(name string, size int) []byte {
	line := []byte(name + "\n")
	return bytes.Repeat(line, size/len(line)+1)[:size]
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}
