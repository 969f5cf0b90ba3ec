package backend

import "sync/atomic"

// Stats counts what an engine did. All fields are updated atomically and may
// be read at any time.
type Stats struct {
	Reads, Writes, Flushes, Discards, WriteZeroes atomic.Uint64
	BytesRead, BytesWritten                       atomic.Uint64
	Errors, FlushErrors                           atomic.Uint64
	// Inline counts the reads and writes that SubmitIdle ran on the
	// submitter's goroutine instead of a lane.
	Inline atomic.Uint64
}

// Snapshot is a point-in-time copy of Stats.
type Snapshot struct {
	Reads, Writes, Flushes, Discards, WriteZeroes uint64
	BytesRead, BytesWritten                       uint64
	Errors, FlushErrors                           uint64
	Inline                                        uint64
}

// Snapshot copies the counters.
func (s *Stats) Snapshot() Snapshot {
	return Snapshot{
		Reads: s.Reads.Load(), Writes: s.Writes.Load(), Flushes: s.Flushes.Load(),
		Discards: s.Discards.Load(), WriteZeroes: s.WriteZeroes.Load(),
		BytesRead: s.BytesRead.Load(), BytesWritten: s.BytesWritten.Load(),
		Errors: s.Errors.Load(), FlushErrors: s.FlushErrors.Load(), Inline: s.Inline.Load(),
	}
}
