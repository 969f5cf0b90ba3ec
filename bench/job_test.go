package bench

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseMode(t *testing.T) {
	for _, name := range []string{"randread", "randwrite", "read", "write", "randrw"} {
		m, err := ParseMode(name)
		if err != nil || m.String() != name {
			t.Errorf("ParseMode(%q) = %v, %v", name, m, err)
		}
	}
	for _, bad := range []string{"", "RandRead", "rw", "trim", "randread "} {
		if _, err := ParseMode(bad); !errors.Is(err, ErrBadJob) || !strings.Contains(err.Error(), "--rw") {
			t.Errorf("ParseMode(%q) = %v, want ErrBadJob naming --rw", bad, err)
		}
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Job)
		want string // "" for a valid job, else part of the error
	}{
		{"default", func(*Job) {}, ""},
		{"randrw verify flush", func(j *Job) { j.Mode, j.Verify, j.FlushEvery, j.Size = RandRW, true, 32, 1<<20 }, ""},
		{"64k sequential", func(j *Job) { j.Mode, j.BlockSize, j.IODepth = Write, 64<<10, 8 }, ""},
		{"bs not a multiple of 512", func(j *Job) { j.BlockSize = 1000 }, "--bs 1000 is not a positive multiple of 512"},
		{"bs zero", func(j *Job) { j.BlockSize = 0 }, "--bs 0"},
		{"bs too large", func(j *Job) { j.BlockSize = 32 << 20 }, "larger than"},
		{"iodepth zero", func(j *Job) { j.IODepth = 0 }, "--iodepth must be between 1 and 256"},
		{"iodepth too deep", func(j *Job) { j.IODepth = 257 }, "--iodepth"},
		{"no queues", func(j *Job) { j.Queues = 0 }, "--queues must be between 1 and 64"},
		{"too many queues", func(j *Job) { j.Queues = 65 }, "--queues"},
		{"no runtime", func(j *Job) { j.Runtime = 0 }, "--runtime must be positive"},
		{"negative ramp", func(j *Job) { j.Ramp = -time.Second }, "--ramp"},
		{"negative flush-every", func(j *Job) { j.FlushEvery = -1 }, "--flush-every must not be negative"},
		{"flush on reads", func(j *Job) { j.FlushEvery = 8 }, "--flush-every needs a job that writes"},
		{"verify reads", func(j *Job) { j.Verify = true }, "--verify checks what the run wrote"},
		{"size not a multiple of bs", func(j *Job) { j.Size = 4096*10 + 512 }, "--size 41472 is not a multiple of --bs 4096"},
		{"negative size", func(j *Job) { j.Size = -4096 }, "--size"},
		{"size below a block per queue", func(j *Job) { j.Size, j.Queues = 4096, 2 }, "fewer than one"},
		{"verify region too small", func(j *Job) { j.Mode, j.Verify, j.Size = RandWrite, true, 32*4096 }, "--verify needs more than --iodepth (32) blocks per queue"},
		{"verify region too large", func(j *Job) { j.Mode, j.Verify, j.Size, j.BlockSize = Write, true, 1<<40, 512 }, "give a smaller --size"},
		{"rwmixread", func(j *Job) { j.Mode, j.ReadMix = RandRW, 101 }, "--rwmixread"},
		{"unknown mode", func(j *Job) { j.Mode = 9 }, "unknown mode"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j := DefaultJob()
			tt.edit(&j)
			err := j.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate: %v", err)
			case tt.want == "":
				return
			case !errors.Is(err, ErrBadJob):
				t.Fatalf("Validate = %v, want ErrBadJob", err)
			case !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n"):
				t.Fatalf("Validate = %q, want one line containing %q", err, tt.want)
			}
		})
	}
}

func TestGuestMemory(t *testing.T) {
	j := DefaultJob()
	if m, err := guestMemory(j); err != nil || m != 64<<20 {
		t.Errorf("default job: %d, %v", m, err)
	}
	j.BlockSize, j.IODepth, j.Queues = 1<<20, 256, 4
	if m, err := guestMemory(j); err != nil || m < 2*4*256<<20 || m%(2<<20) != 0 {
		t.Errorf("1 MiB x 256 x 4: %d, %v", m, err)
	}
	j.BlockSize, j.Queues = 16<<20, 64
	if _, err := guestMemory(j); !errors.Is(err, ErrBadJob) {
		t.Errorf("16 MiB x 256 x 64: %v, want ErrBadJob", err)
	}
	for depth, want := range map[int]int{1: 128, 32: 128, 43: 256, 256: 1024} {
		if got := queueSize(depth); got != want {
			t.Errorf("queueSize(%d) = %d, want %d", depth, got, want)
		}
	}
}

func TestLabel(t *testing.T) {
	tests := []struct {
		job  Job
		want string
	}{
		{DefaultJob(), "randread-4k-qd32-q1"},
		{Job{Mode: Write, BlockSize: 64 << 10, IODepth: 8, Queues: 2}, "write-64k-qd8-q2"},
		{Job{Mode: RandWrite, BlockSize: 4096, IODepth: 32, Queues: 1, FlushEvery: 32}, "randwrite-4k-qd32-q1-flush32"},
		{Job{Mode: RandRW, BlockSize: 1536, IODepth: 1, Queues: 1}, "randrw-1536-qd1-q1"},
		{Job{Mode: Read, BlockSize: 1 << 20, IODepth: 4, Queues: 1}, "read-1m-qd4-q1"},
		{Job{Name: "mine", Mode: Read}, "mine"},
	}
	for _, tt := range tests {
		if got := tt.job.Label(); got != tt.want {
			t.Errorf("Label() = %q, want %q", got, tt.want)
		}
	}
}
