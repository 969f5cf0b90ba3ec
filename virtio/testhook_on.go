//go:build vublk_testhooks

package virtio

import "os"

// skipDataLog, only in a binary built with -tags vublk_testhooks and VUBLK_TESTHOOK_NO_DATA_LOG=1
// in its environment, leaves read data and GET_ID data out of the dirty log (the status byte and
// the used ring are still logged, so the guest keeps running): a broken logger, for the
// migration test to show that its checksum check catches one. Normal builds cannot turn it on.
var skipDataLog = os.Getenv("VUBLK_TESTHOOK_NO_DATA_LOG") == "1"

// TestHooks describes the test hooks that are on, for vublk to log at start.
func TestHooks() []string {
	if skipDataLog {
		return []string{"VUBLK_TESTHOOK_NO_DATA_LOG=1: read data is left out of the dirty log (a broken logger, for tests only)"}
	}
	return nil
}

// noteSkipped counts, in l.Skipped, the pages of r's device-writable buffers that skipDataLog
// left out of l.
func (q *Queue) noteSkipped(l *DirtyLog, r *blkReq) {
	for _, b := range r.blk.In {
		if gpa, ok := q.Mem.gpaOf(b); ok && len(b) > 0 {
			first, last := gpa/LogPageSize, (gpa+uint64(len(b))-1)/LogPageSize
			l.skipped.Add(last - first + 1)
		}
	}
}
