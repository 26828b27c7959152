//go:build !linux || !cgo

package gpu

import "fmt"

// Open reports ErrNoGPU: this build has no NVML (it needs Linux and cgo).
func Open() (Provider, error) {
	return nil, fmt.Errorf("%w: built without NVML (needs linux and cgo)", ErrNoGPU)
}
