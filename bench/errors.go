package bench

import (
	"errors"
	"fmt"
)

// Sentinel errors.
var (
	// ErrBadJob is returned by Job.Validate and Run when the job's options
	// are unusable, on their own or for the device (a region larger than
	// the disk, writes to a read-only disk): a usage error.
	ErrBadJob = errors.New("bad job")

	// ErrStalled is returned by Run when requests were in flight and none
	// completed for StallTimeout: the back-end hung.
	ErrStalled = errors.New("requests stopped completing")

	// ErrDisconnected is returned by Run when the back-end closed the
	// connection during the run.
	ErrDisconnected = errors.New("back-end closed the connection")
)

// jobError is an ErrBadJob whose message is only the problem, such as
// "--bs 1000 is not a positive multiple of 512 bytes", for a one-line
// usage error.
type jobError struct {
	msg string
	err error // wrapped, or nil
}

func (e *jobError) Error() string        { return e.msg }
func (e *jobError) Is(target error) bool { return target == ErrBadJob }
func (e *jobError) Unwrap() error        { return e.err }

// badJob returns an ErrBadJob; a %w verb in format wraps that error too.
func badJob(format string, a ...any) error {
	err := fmt.Errorf(format, a...)
	return &jobError{msg: err.Error(), err: errors.Unwrap(err)}
}
