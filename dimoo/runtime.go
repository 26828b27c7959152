package dimoo

import (
	"fmt"
	"sync"
	"unsafe"
)

// Backend selects where the engine runs.
type Backend int32

// The dimoo_backend values.
const (
	BackendCPU  Backend = 0
	BackendCUDA Backend = 1
)

func (b Backend) String() string {
	switch b {
	case BackendCPU:
		return "cpu"
	case BackendCUDA:
		return "cuda"
	}
	return fmt.Sprintf("backend(%d)", int32(b))
}

// ParseBackend turns "cpu" or "cuda" into a Backend.
func ParseBackend(s string) (Backend, error) {
	switch s {
	case "cpu":
		return BackendCPU, nil
	case "cuda":
		return BackendCUDA, nil
	}
	return 0, fmt.Errorf("%w: unknown device %q (want cpu or cuda)", ErrInvalidArgument, s)
}

// Runtime is a backend on one device. It is safe for concurrent use.
type Runtime struct {
	lib     *Library
	backend Backend
	device  int

	mu sync.Mutex // guards h and the handle's error message
	h  uintptr
}

// NewRuntime opens a backend on a device. threads is the number of CPU
// worker threads (0: every core) and is ignored by CUDA.
func (l *Library) NewRuntime(b Backend, device, threads int) (*Runtime, error) {
	var out uintptr
	var eb errBuf
	st := l.runtimeCreate(int32(b), int32(device), int32(threads), &out, eb.ptr(), eb.len())
	if err := statusError(st, "dimoo_runtime_create", eb.String); err != nil {
		return nil, err
	}
	return &Runtime{lib: l, backend: b, device: device, h: out}, nil
}

// Backend is the runtime's backend.
func (r *Runtime) Backend() Backend { return r.backend }

// Library is the library the runtime lives in.
func (r *Runtime) Library() *Library { return r.lib }

// Describe names the device, e.g. "cpu: 2 threads, avx512, bf16 tiles amx".
func (r *Runtime) Describe() (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h == 0 {
		return "", errClosed
	}
	var buf [256]byte
	st := r.lib.runtimeDesc(r.h, &buf[0], uintptr(len(buf)))
	if err := statusError(st, "dimoo_runtime_describe", func() string { return r.lib.runtimeError(r.h) }); err != nil {
		return "", err
	}
	return cString(buf[:]), nil
}

// Close frees the runtime. Models made on it must be closed first.
func (r *Runtime) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h != 0 {
		r.lib.runtimeFree(r.h)
		r.h = 0
	}
	return nil
}

// handle returns the live C handle, or errClosed.
func (r *Runtime) handle() (uintptr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.h == 0 {
		return 0, errClosed
	}
	return r.h, nil
}

// tensorArgs turns a checkpoint tensor into the data, shape and rank
// arguments of the *_set_weight functions. The C side wants a non-NULL data
// pointer even for an empty tensor.
func tensorArgs(info TensorInfo, data []byte) (unsafe.Pointer, *int64, int32) {
	var p unsafe.Pointer
	if len(data) > 0 {
		p = unsafe.Pointer(&data[0])
	} else {
		var zero byte
		p = unsafe.Pointer(&zero)
	}
	var sp *int64
	if len(info.Shape) > 0 {
		sp = &info.Shape[0]
	}
	return p, sp, int32(len(info.Shape))
}
