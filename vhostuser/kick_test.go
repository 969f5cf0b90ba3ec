package vhostuser_test

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/vublk/vublk/vhostuser/frontend"
)

// TestNoKickIsLost drives every queue at depth 1, so that the ring goroutine
// parks after nearly every request and the next kick has to wake it: the
// kick waiter does not read the eventfd, and a kick that came between the
// ring check and the park must still be seen. A lost wake-up shows as a
// request that never completes. Varying pauses move the kick around the
// park; each queue waits more than drainEvery times, so the counter is
// drained along the way.
func TestNoKickIsLost(t *testing.T) {
	for _, eventIdx := range []bool{true, false} {
		t.Run(fmt.Sprintf("event_idx=%v", eventIdx), func(t *testing.T) {
			e := newExport(t, exportOptions{writeback: true})
			d := connect(t, e, frontend.Options{NumQueues: diskQueues, QueueSize: 64, EventIdx: eventIdx})
			const perQueue = 2500
			var wg sync.WaitGroup
			errs := make(chan error, diskQueues)
			for q := range diskQueues {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(q), 7))
					for i := range perQueue {
						p, err := d.Queue(q).Submit(frontend.ReadRequest(uint64(rng.IntN(diskSize/512-8)), 4096))
						if err != nil {
							errs <- err
							return
						}
						select {
						case <-p.Done():
							if res := p.Wait(); res.Err != nil {
								errs <- fmt.Errorf("queue %d request %d: %w", q, i, res.Err)
								return
							}
						case <-time.After(10 * time.Second):
							errs <- fmt.Errorf("queue %d request %d: no completion in 10 s: a kick was lost", q, i)
							return
						}
						if k := rng.IntN(16); k < 3 {
							time.Sleep(time.Duration(k*20) * time.Microsecond)
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}
