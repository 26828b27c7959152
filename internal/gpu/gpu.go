// Package gpu discovers GPUs and reads their telemetry (name, memory,
// utilization, power, clocks) behind a small interface: NVML through
// github.com/NVIDIA/go-nvml where it is built (Linux with cgo) and a
// driver is present, and a fake for tests. Without a GPU, Open returns
// ErrNoGPU: callers run on the CPU.
package gpu

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
)

// ErrNoGPU: no NVML (no driver, no cgo build) or no device.
var ErrNoGPU = errors.New("no GPU")

// Device is one GPU's identity and a telemetry sample.
type Device struct {
	Index       int
	Name        string
	UUID        string
	MemoryTotal uint64  // bytes
	MemoryUsed  uint64  // bytes
	Utilization uint32  // percent of time a kernel ran, last sample period
	PowerWatts  float64 // draw
	SMClockMHz  uint32
	MemClockMHz uint32
}

// Provider lists devices and samples them.
type Provider interface {
	Count() (int, error)
	Device(i int) (Device, error)
	Close() error
}

// Fake is a Provider over fixed devices (tests, and machines to model).
// With Series, successive samples of a device step through scripted
// values (telemetry tests): the k-th call of Device(i) returns
// Series[i][k], the last entry once they run out, over Devices[i]'s
// identity (index, name, UUID, total memory). Safe for concurrent use.
type Fake struct {
	Devices []Device
	Series  [][]Device
	Err     error // returned by every call when set

	mu    sync.Mutex
	calls map[int]int
}

func (f *Fake) Count() (int, error) {
	if f.Err != nil {
		return 0, f.Err
	}
	return len(f.Devices), nil
}

func (f *Fake) Device(i int) (Device, error) {
	if f.Err != nil {
		return Device{}, f.Err
	}
	if i < 0 || i >= len(f.Devices) {
		return Device{}, fmt.Errorf("gpu: no device %d of %d", i, len(f.Devices))
	}
	d := f.Devices[i]
	if i < len(f.Series) && len(f.Series[i]) > 0 {
		f.mu.Lock()
		if f.calls == nil {
			f.calls = map[int]int{}
		}
		k := min(f.calls[i], len(f.Series[i])-1)
		f.calls[i]++
		f.mu.Unlock()
		s := f.Series[i][k]
		s.Name, s.UUID, s.MemoryTotal = d.Name, d.UUID, d.MemoryTotal
		d = s
	}
	d.Index = i
	return d, nil
}

func (f *Fake) Close() error { return nil }

// ParseDevices reads a --devices value against n present GPUs: "cpu" (no
// GPU), "all" (every GPU, or the CPU when there are none), or a comma list
// of indices. It returns the GPU indices (empty: the CPU).
func ParseDevices(s string, n int) ([]int, error) {
	s = strings.TrimSpace(s)
	switch s {
	case "", "cpu":
		return nil, nil
	case "all":
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out, nil
	}
	seen := map[int]bool{}
	var out []int
	for _, f := range strings.Split(s, ",") {
		i, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(f), "cuda:")))
		if err != nil || i < 0 {
			return nil, fmt.Errorf("--devices %q: %q is not a device index (want cpu, all or a list like 0,1)", s, f)
		}
		if i >= n {
			return nil, fmt.Errorf("--devices %q: device %d, but %d GPUs are present", s, i, n)
		}
		if seen[i] {
			return nil, fmt.Errorf("--devices %q: device %d twice", s, i)
		}
		seen[i] = true
		out = append(out, i)
	}
	return out, nil
}
