package virtio

import (
	"io"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
)

func TestLimitedLog(t *testing.T) {
	for _, tc := range []struct {
		name  string
		level logrus.Level
	}{
		{"guest errors warn", logrus.WarnLevel},
		{"storage errors error", logrus.ErrorLevel},
	} {
		t.Run(tc.name, func(t *testing.T) {
			logger := logrus.New()
			logger.SetOutput(io.Discard)
			logger.SetLevel(logrus.DebugLevel)
			hook := test.NewLocal(logger)
			l := NewLimitedLog(logrus.NewEntry(logger), tc.level, "things")
			l.interval = 200 * time.Millisecond
			for i := 0; i < 25; i++ {
				l.Log(logrus.Fields{"i": i}, "it failed")
			}
			count := func(level logrus.Level, msg string) int {
				n := 0
				for _, e := range hook.AllEntries() {
					if e.Level == level && e.Message == msg {
						n++
					}
				}
				return n
			}
			if n := count(tc.level, "it failed"); n != l.burst {
				t.Errorf("%d lines at %v, want the burst of %d", n, tc.level, l.burst)
			}
			if n := count(logrus.DebugLevel, "it failed"); n != 25-l.burst {
				t.Errorf("%d lines at debug, want %d", n, 25-l.burst)
			}
			time.Sleep(l.interval)
			l.Log(logrus.Fields{}, "it failed")
			if n := count(tc.level, "it failed"); n != l.burst+1 {
				t.Errorf("after the interval: %d lines at %v, want %d", n, tc.level, l.burst+1)
			}
			var summary *logrus.Entry
			for _, e := range hook.AllEntries() {
				if e.Message == "things suppressed by the rate limit" {
					summary = e
				}
			}
			if summary == nil || summary.Level != tc.level || summary.Data["suppressed"] != 15 {
				t.Errorf("suppressed summary = %+v, want 15 at %v", summary, tc.level)
			}
		})
	}
}
