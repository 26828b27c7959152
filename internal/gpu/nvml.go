//go:build linux && cgo

package gpu

import (
	"errors"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// nvmlProvider reads devices through NVML (loaded by Init; go-nvml dlopens
// libnvidia-ml.so.1, so a machine without a driver still runs).
type nvmlProvider struct {
	mu     sync.Mutex
	closed bool
}

// Open initializes NVML; ErrNoGPU when it cannot (no driver) or sees no
// device.
func Open() (Provider, error) {
	if err := initNVML(); err != nil {
		return nil, err
	}
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS || n == 0 {
		nvml.Shutdown()
		if ret != nvml.SUCCESS {
			return nil, fmt.Errorf("%w: NVML device count: %v", ErrNoGPU, ret)
		}
		return nil, fmt.Errorf("%w: NVML sees no device", ErrNoGPU)
	}
	return &nvmlProvider{}, nil
}

// initNVML calls nvml.Init, turning a failure (or a panic from a broken
// library) into ErrNoGPU.
func initNVML() (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: NVML: %v", ErrNoGPU, r)
		}
	}()
	if ret := nvml.Init(); ret != nvml.SUCCESS {
		return fmt.Errorf("%w: NVML: %v", ErrNoGPU, ret)
	}
	return nil
}

var errClosed = errors.New("gpu: provider closed")

func (p *nvmlProvider) Count() (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return 0, errClosed
	}
	n, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return 0, fmt.Errorf("gpu: NVML device count: %v", ret)
	}
	return n, nil
}

func (p *nvmlProvider) Device(i int) (Device, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return Device{}, errClosed
	}
	h, ret := nvml.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		return Device{}, fmt.Errorf("gpu: NVML device %d: %v", i, ret)
	}
	d := Device{Index: i}
	// Fields a device does not report stay zero.
	if v, ret := h.GetName(); ret == nvml.SUCCESS {
		d.Name = v
	}
	if v, ret := h.GetUUID(); ret == nvml.SUCCESS {
		d.UUID = v
	}
	if m, ret := h.GetMemoryInfo(); ret == nvml.SUCCESS {
		d.MemoryTotal, d.MemoryUsed = m.Total, m.Used
	}
	if u, ret := h.GetUtilizationRates(); ret == nvml.SUCCESS {
		d.Utilization = u.Gpu
	}
	if mw, ret := h.GetPowerUsage(); ret == nvml.SUCCESS {
		d.PowerWatts = float64(mw) / 1000
	}
	if c, ret := h.GetClockInfo(nvml.CLOCK_SM); ret == nvml.SUCCESS {
		d.SMClockMHz = c
	}
	if c, ret := h.GetClockInfo(nvml.CLOCK_MEM); ret == nvml.SUCCESS {
		d.MemClockMHz = c
	}
	return d, nil
}

func (p *nvmlProvider) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	if ret := nvml.Shutdown(); ret != nvml.SUCCESS {
		return fmt.Errorf("gpu: NVML shutdown: %v", ret)
	}
	return nil
}
