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

// TestPollSkipsKicks drives one queue at depth 1 with the ring polled after
// each completion: a request submitted while the back-end polls needs no
// kick, so the driver must see kicks turned off then (NO_NOTIFY, or
// avail_event held back with EVENT_IDX), and the back-end must still find
// every request, also one made available just as a poll gives up and turns
// kicks on again (a short poll time, and pauses around it, make that
// common). With a long poll time nearly every request goes without a kick;
// without polling most are kicked (those that come while the back-end still
// pops the ring are not).
func TestPollSkipsKicks(t *testing.T) {
	const requests = 2000
	for _, eventIdx := range []bool{true, false} {
		for _, tt := range []struct {
			name    string
			pollMax time.Duration
		}{{"long", 50 * time.Millisecond}, {"short", 20 * time.Microsecond}, {"off", -1}} {
			t.Run(fmt.Sprintf("event_idx=%v/poll=%s", eventIdx, tt.name), func(t *testing.T) {
				e := newExport(t, exportOptions{writeback: true, pollMax: tt.pollMax})
				d := connect(t, e, frontend.Options{NumQueues: 1, QueueSize: 64, EventIdx: eventIdx})
				q := d.Queue(0)
				rng := rand.New(rand.NewPCG(3, uint64(tt.pollMax)))
				for i := range requests {
					p, err := q.Submit(frontend.ReadRequest(uint64(rng.IntN(diskSize/512-8)), 4096))
					if err != nil {
						t.Fatal(err)
					}
					select {
					case <-p.Done():
						if res := p.Wait(); res.Err != nil {
							t.Fatalf("request %d: %v", i, res.Err)
						}
					case <-time.After(10 * time.Second):
						t.Fatalf("request %d: no completion in 10 s: a kick was lost", i)
					}
					// Mostly back to back; now and then a pause of up to 60 µs.
					if rng.IntN(8) == 0 {
						time.Sleep(time.Duration(rng.IntN(60)) * time.Microsecond)
					}
				}
				kicks := q.Kicks()
				switch {
				case tt.pollMax > time.Millisecond && kicks > requests/4:
					t.Errorf("%d kicks for %d requests while the ring was polled: kicks were not turned off", kicks, requests)
				case tt.pollMax < 0 && kicks < requests/2:
					t.Errorf("%d kicks for %d requests without polling", kicks, requests)
				}
			})
		}
	}
}
