package virtio

import (
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// LimitedLog logs at one level (warning for problems the guest caused, error
// for failing storage), at most burst lines per interval; the rest go to
// debug level and are counted, and the count is logged when the next
// interval starts. A hostile guest, or a disk that fails every request,
// cannot flood the host's log, and the first lines of every burst still say
// what went wrong.
type LimitedLog struct {
	log      *logrus.Entry
	level    logrus.Level
	what     string // names the lines in the "suppressed" message
	interval time.Duration
	burst    int

	mu         sync.Mutex
	start      time.Time
	n          int
	suppressed int
}

func NewLimitedLog(log *logrus.Entry, level logrus.Level, what string) *LimitedLog {
	return &LimitedLog{log: log, level: level, what: what, interval: 10 * time.Second, burst: 10}
}

// Log logs msg with fields, or counts it when the burst is used up.
func (g *LimitedLog) Log(fields logrus.Fields, msg string) {
	g.mu.Lock()
	now := time.Now()
	if now.Sub(g.start) >= g.interval {
		if g.suppressed > 0 {
			g.log.WithField("suppressed", g.suppressed).Log(g.level, g.what+" suppressed by the rate limit")
		}
		g.start, g.n, g.suppressed = now, 0, 0
	}
	g.n++
	limited := g.n > g.burst
	if limited {
		g.suppressed++
	}
	g.mu.Unlock()
	if limited {
		g.log.WithFields(fields).Debug(msg)
		return
	}
	g.log.WithFields(fields).Log(g.level, msg)
}
