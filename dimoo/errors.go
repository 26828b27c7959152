package dimoo

import (
	"errors"
	"fmt"
)

// Sentinel errors callers act on. Every error dimoo returns wraps at most one
// of them, so errors.Is(err, dimoo.ErrBadCheckpoint) works on any of them.
var (
	// ErrBadCheckpoint: a checkpoint or config file is missing, malformed, or
	// disagrees with itself (missing tensor, wrong shape or dtype, truncated
	// shard).
	ErrBadCheckpoint = errors.New("bad checkpoint")
	// ErrInvalidArgument: a caller mistake (token id out of range, empty
	// sequence, bad position list, odd image size).
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrOutOfMemory: host or device memory ran out.
	ErrOutOfMemory = errors.New("out of memory")
	// ErrUnsupported: a feature or backend that is not built or not present.
	ErrUnsupported = errors.New("unsupported")
	// ErrCancelled: the context was cancelled.
	ErrCancelled = errors.New("cancelled")
	// ErrLibrary: libdimoo could not be found or loaded, or has the wrong ABI.
	ErrLibrary = errors.New("libdimoo unavailable")
)

// Status is a dimoo_status code from the C library.
type Status int32

// The dimoo_status values of include/dimoo.h.
const (
	StatusOK                Status = 0
	StatusInvalidArgument   Status = 1
	StatusOutOfMemory       Status = 2
	StatusDeviceOutOfMemory Status = 3
	StatusBadWeights        Status = 4
	StatusUnsupported       Status = 5
	StatusDevice            Status = 6
	StatusCancelled         Status = 7
	StatusInternal          Status = 8
)

var statusNames = map[Status]string{
	StatusOK:                "ok",
	StatusInvalidArgument:   "invalid argument",
	StatusOutOfMemory:       "out of memory",
	StatusDeviceOutOfMemory: "out of device memory",
	StatusBadWeights:        "bad weights",
	StatusUnsupported:       "unsupported",
	StatusDevice:            "device error",
	StatusCancelled:         "cancelled",
	StatusInternal:          "internal error",
}

func (s Status) String() string {
	if n, ok := statusNames[s]; ok {
		return n
	}
	return fmt.Sprintf("status %d", int32(s))
}

// Error is a failure reported by libdimoo: the status code, the call that
// failed, and the library's message.
type Error struct {
	Status Status
	Op     string // the C function, e.g. "dimoo_forward"
	Msg    string
}

func (e *Error) Error() string {
	if e.Msg == "" {
		return fmt.Sprintf("dimoo: %s: %s", e.Op, e.Status)
	}
	return fmt.Sprintf("dimoo: %s: %s: %s", e.Op, e.Status, e.Msg)
}

// Unwrap maps the status to the sentinel a caller can test with errors.Is.
func (e *Error) Unwrap() error {
	switch e.Status {
	case StatusInvalidArgument:
		return ErrInvalidArgument
	case StatusOutOfMemory, StatusDeviceOutOfMemory:
		return ErrOutOfMemory
	case StatusBadWeights:
		return ErrBadCheckpoint
	case StatusUnsupported:
		return ErrUnsupported
	case StatusCancelled:
		return ErrCancelled
	}
	return nil
}

// checkpointError builds an ErrBadCheckpoint error naming the file.
func checkpointError(path, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", ErrBadCheckpoint, path, fmt.Sprintf(format, args...))
}
