//go:build !vublk_testhooks

package virtio

// skipDataLog is always false in a normal build; see testhook_on.go.
const skipDataLog = false

// TestHooks describes the test hooks that are on: none in a normal build.
func TestHooks() []string { return nil }

func (q *Queue) noteSkipped(*DirtyLog, *blkReq) {}
