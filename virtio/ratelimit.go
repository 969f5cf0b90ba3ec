package virtio

import (
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

// guestLog logs problems caused by the guest at warning level, at most burst
// lines per interval; the rest go to debug level and are counted, so a
// hostile guest cannot flood the host's log.
type guestLog struct {
	log      *logrus.Entry
	interval time.Duration
	burst    int

	mu         sync.Mutex
	start      time.Time
	n          int
	suppressed int
}

func newGuestLog(log *logrus.Entry) *guestLog {
	return &guestLog{log: log, interval: 10 * time.Second, burst: 10}
}

func (g *guestLog) Warn(fields logrus.Fields, msg string) {
	g.mu.Lock()
	now := time.Now()
	if now.Sub(g.start) >= g.interval {
		if g.suppressed > 0 {
			g.log.WithField("suppressed", g.suppressed).Warn("guest errors suppressed by the rate limit")
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
	g.log.WithFields(fields).Warn(msg)
}
