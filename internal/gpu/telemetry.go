package gpu

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
)

// Sample is one device's telemetry at one moment.
type Sample struct {
	At time.Time
	Device
}

// Sampler reads devices in a goroutine at a fixed interval (benchmarks run
// while it samples). It takes a first sample when it starts and a last one
// when it stops, so even a run shorter than the interval has two.
type Sampler struct {
	p       Provider
	devices []int
	stop    chan struct{}
	done    chan struct{}
	ticker  *time.Ticker
	once    sync.Once

	mu      sync.Mutex
	samples []Sample
	errs    int
	lastErr error
}

// StartSampler samples the given devices (indices of p) every interval
// until Stop.
func StartSampler(p Provider, devices []int, interval time.Duration) *Sampler {
	if interval <= 0 {
		interval = 100 * time.Millisecond
	}
	t := time.NewTicker(interval)
	s := startSampler(p, devices, t.C)
	s.ticker = t
	return s
}

// startSampler samples once, then on every tick (tests drive the ticks).
func startSampler(p Provider, devices []int, tick <-chan time.Time) *Sampler {
	s := &Sampler{p: p, devices: slices.Clone(devices), stop: make(chan struct{}), done: make(chan struct{})}
	s.sample()
	go func() {
		defer close(s.done)
		for {
			select {
			case <-s.stop:
				s.sample()
				return
			case <-tick:
				s.sample()
			}
		}
	}()
	return s
}

func (s *Sampler) sample() {
	for _, i := range s.devices {
		d, err := s.p.Device(i)
		now := time.Now()
		s.mu.Lock()
		if err != nil {
			s.errs++
			s.lastErr = err
		} else {
			s.samples = append(s.samples, Sample{At: now, Device: d})
		}
		s.mu.Unlock()
	}
}

// SampleNow takes a sample at once, besides the periodic ones (callers
// mark the edges of a span they will ask Samples for).
func (s *Sampler) SampleNow() { s.sample() }

// Samples returns a copy of the samples taken so far within [from, to]
// (zero times: unbounded).
func (s *Sampler) Samples(from, to time.Time) []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Sample
	for _, x := range s.samples {
		if (from.IsZero() || !x.At.Before(from)) && (to.IsZero() || !x.At.After(to)) {
			out = append(out, x)
		}
	}
	return out
}

// Errors is how many device reads failed, and the last failure.
func (s *Sampler) Errors() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.errs, s.lastErr
}

// Stop takes a last sample, ends the goroutine and returns every sample.
// Calling it again returns the same samples.
func (s *Sampler) Stop() []Sample {
	s.once.Do(func() {
		close(s.stop)
		<-s.done
		if s.ticker != nil {
			s.ticker.Stop()
		}
	})
	return s.Samples(time.Time{}, time.Time{})
}

// Stat is a metric's smallest, median and largest sampled value. The
// median of an even count is the mean of the two middle values.
type Stat struct {
	Min    float64 `json:"min"`
	Median float64 `json:"median"`
	Max    float64 `json:"max"`
}

func stat(v []float64) Stat {
	if len(v) == 0 {
		return Stat{}
	}
	v = slices.Clone(v)
	slices.Sort(v)
	n := len(v)
	med := v[n/2]
	if n%2 == 0 {
		med = (v[n/2-1] + v[n/2]) / 2
	}
	return Stat{Min: v[0], Median: med, Max: v[n-1]}
}

// Summary is one device's telemetry over a span of samples.
type Summary struct {
	Index       int     `json:"index"`
	Name        string  `json:"name"`
	Samples     int     `json:"samples"`
	SpanSeconds float64 `json:"span_s"` // first to last sample
	PowerWatts  Stat    `json:"power_w"`
	SMClockMHz  Stat    `json:"sm_clock_mhz"`
	MemClockMHz Stat    `json:"mem_clock_mhz"`
	MemoryUsed  Stat    `json:"memory_used_bytes"`
	Utilization Stat    `json:"utilization_pct"`
	// PeakMemory is the largest memory-used sample (bytes, the whole
	// device as NVML reports it: every process, CUDA contexts included).
	PeakMemory  uint64 `json:"peak_memory_bytes"`
	MemoryTotal uint64 `json:"memory_total_bytes"`
	// EnergyJoules is the power integrated over the samples' times
	// (trapezoids): zero with fewer than two samples.
	EnergyJoules float64 `json:"energy_j"`
}

// Summarize groups samples by device (in index order) and gives each
// metric's min/median/max, the peak memory and the energy.
func Summarize(samples []Sample) []Summary {
	by := map[int][]Sample{}
	var idx []int
	for _, s := range samples {
		if _, ok := by[s.Index]; !ok {
			idx = append(idx, s.Index)
		}
		by[s.Index] = append(by[s.Index], s)
	}
	slices.Sort(idx)
	out := make([]Summary, 0, len(idx))
	for _, i := range idx {
		ss := by[i]
		slices.SortStableFunc(ss, func(a, b Sample) int { return a.At.Compare(b.At) })
		col := func(f func(Sample) float64) Stat {
			v := make([]float64, len(ss))
			for k, s := range ss {
				v[k] = f(s)
			}
			return stat(v)
		}
		sum := Summary{Index: i, Name: ss[0].Name, Samples: len(ss), MemoryTotal: ss[0].MemoryTotal,
			SpanSeconds: ss[len(ss)-1].At.Sub(ss[0].At).Seconds(),
			PowerWatts:  col(func(s Sample) float64 { return s.PowerWatts }),
			SMClockMHz:  col(func(s Sample) float64 { return float64(s.SMClockMHz) }),
			MemClockMHz: col(func(s Sample) float64 { return float64(s.MemClockMHz) }),
			MemoryUsed:  col(func(s Sample) float64 { return float64(s.MemoryUsed) }),
			Utilization: col(func(s Sample) float64 { return float64(s.Utilization) })}
		for k, s := range ss {
			sum.PeakMemory = max(sum.PeakMemory, s.MemoryUsed)
			if k > 0 {
				dt := s.At.Sub(ss[k-1].At).Seconds()
				sum.EnergyJoules += dt * (s.PowerWatts + ss[k-1].PowerWatts) / 2
			}
		}
		out = append(out, sum)
	}
	return out
}

// String is the summary on one line: each metric as min/median/max.
func (s Summary) String() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "gpu%d %s: power %.0f/%.0f/%.0f W, SM %.0f/%.0f/%.0f MHz, mem %.0f/%.0f/%.0f MHz, "+
		"util %.0f/%.0f/%.0f%%, memory peak %.2f GiB", s.Index, s.Name,
		s.PowerWatts.Min, s.PowerWatts.Median, s.PowerWatts.Max,
		s.SMClockMHz.Min, s.SMClockMHz.Median, s.SMClockMHz.Max,
		s.MemClockMHz.Min, s.MemClockMHz.Median, s.MemClockMHz.Max,
		s.Utilization.Min, s.Utilization.Median, s.Utilization.Max, float64(s.PeakMemory)/(1<<30))
	if s.MemoryTotal > 0 {
		fmt.Fprintf(&sb, " of %.0f", float64(s.MemoryTotal)/(1<<30))
	}
	fmt.Fprintf(&sb, ", %.0f J (%d samples, min/median/max)", s.EnergyJoules, s.Samples)
	return sb.String()
}
