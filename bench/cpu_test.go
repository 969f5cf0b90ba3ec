package bench

import (
	"os"
	"testing"
	"time"
)

func TestParseStatCPU(t *testing.T) {
	tests := []struct {
		name string
		stat string
		want time.Duration
		bad  bool
	}{
		{"plain", "1234 (vublk) S 1 1234 1234 0 -1 4194560 500 0 0 0 250 75 0 0 20 0 8 0 100 0 0", 325 * clockTick, false},
		{"name with spaces and parentheses", "99 (qemu (x) y) R 1 2 3 4 5 6 7 8 9 10 7 3 0 0", 10 * clockTick, false},
		{"no name", "1234 vublk S 1 2", 0, true},
		{"too short", "1 (a) S 1 2 3", 0, true},
		{"not a number", "1 (a) S 1 2 3 4 5 6 7 8 9 10 x 3", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatCPU([]byte(tt.stat))
			if (err != nil) != tt.bad || got != tt.want {
				t.Fatalf("parseStatCPU = %v, %v; want %v, error %v", got, err, tt.want, tt.bad)
			}
		})
	}
}

func TestProcessCPU(t *testing.T) {
	end := time.Now().Add(50 * time.Millisecond)
	for time.Now().Before(end) { // use some CPU
	}
	if d, err := ProcessCPU(os.Getpid()); err != nil || d <= 0 {
		t.Errorf("ProcessCPU(self) = %v, %v", d, err)
	}
	if _, err := ProcessCPU(1 << 30); err == nil {
		t.Error("ProcessCPU of a process that does not exist succeeded")
	}
	if selfCPU() <= 0 {
		t.Error("selfCPU is 0")
	}
}
