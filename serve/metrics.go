package serve

import (
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/dimoo-dev/dimoo/internal/gpu"
)

// metrics are the server's counters, written in Prometheus' text format
// (version 0.0.4) by hand: the format is small and the service needs no
// client library.
type metrics struct {
	mu       sync.Mutex
	requests map[[2]string]int64 // (endpoint, outcome) -> count
	// decode seconds histogram (per image or answer), steps
	buckets []float64
	counts  []int64 // per bucket, not cumulative
	sum     float64
	n       int64
	steps   int64
	lastSPS float64
}

func newMetrics() *metrics {
	b := []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
	return &metrics{requests: map[[2]string]int64{}, buckets: b, counts: make([]int64, len(b)+1)}
}

func (m *metrics) request(endpoint, outcome string) {
	m.mu.Lock()
	m.requests[[2]string{endpoint, outcome}]++
	m.mu.Unlock()
}

// decoded records one finished decode and its steps.
func (m *metrics) decoded(d time.Duration, steps int) {
	sec := d.Seconds()
	m.mu.Lock()
	defer m.mu.Unlock()
	i, _ := slices.BinarySearch(m.buckets, sec)
	m.counts[i]++
	m.sum += sec
	m.n++
	m.steps += int64(steps)
	if sec > 0 {
		m.lastSPS = float64(steps) / sec
	}
}

func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	s.writeMetrics(w)
}

func (s *Server) writeMetrics(w io.Writer) {
	head := func(name, typ, help string) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, typ)
	}
	head("dimoo_queue_depth", "gauge", "Requests admitted and waiting for a slot.")
	fmt.Fprintf(w, "dimoo_queue_depth %d\n", s.waiting.Load())
	head("dimoo_requests_running", "gauge", "Requests holding a slot.")
	fmt.Fprintf(w, "dimoo_requests_running %d\n", len(s.run))
	head("dimoo_queue_capacity", "gauge", "Slots plus queue places; beyond them requests get 429.")
	fmt.Fprintf(w, "dimoo_queue_capacity %d\n", s.opts.MaxInflight+s.opts.MaxQueue)

	m := s.m
	m.mu.Lock()
	head("dimoo_requests_total", "counter", "Requests answered, by endpoint and outcome.")
	keys := slices.SortedFunc(func(yield func([2]string) bool) {
		for k := range m.requests {
			if !yield(k) {
				return
			}
		}
	}, func(a, b [2]string) int { return strings.Compare(a[0]+"\x00"+a[1], b[0]+"\x00"+b[1]) })
	for _, k := range keys {
		fmt.Fprintf(w, "dimoo_requests_total{endpoint=%q,outcome=%q} %d\n", k[0], k[1], m.requests[k])
	}
	head("dimoo_decode_seconds", "histogram", "Wall time of one decode (an image or an answer), waiting for the batch included.")
	var cum int64
	for i, b := range m.buckets {
		cum += m.counts[i]
		fmt.Fprintf(w, "dimoo_decode_seconds_bucket{le=\"%g\"} %d\n", b, cum)
	}
	cum += m.counts[len(m.buckets)]
	fmt.Fprintf(w, "dimoo_decode_seconds_bucket{le=\"+Inf\"} %d\n", cum)
	fmt.Fprintf(w, "dimoo_decode_seconds_sum %g\ndimoo_decode_seconds_count %d\n", m.sum, m.n)
	head("dimoo_decode_steps_total", "counter", "Sampling steps of finished decodes (rate() gives steps per second).")
	fmt.Fprintf(w, "dimoo_decode_steps_total %d\n", m.steps)
	head("dimoo_steps_per_second", "gauge", "Steps per second of the last finished decode.")
	fmt.Fprintf(w, "dimoo_steps_per_second %g\n", m.lastSPS)
	m.mu.Unlock()

	head("dimoo_engine_load", "gauge", "Requests routed to an engine and not finished.")
	for _, e := range s.engines {
		fmt.Fprintf(w, "dimoo_engine_load{engine=%q} %d\n", e.Name, e.load.Load())
	}
	head("dimoo_batch_forwards_total", "counter", "Batched forward calls of an engine.")
	for _, e := range s.engines {
		if e.Batcher != nil {
			fmt.Fprintf(w, "dimoo_batch_forwards_total{engine=%q} %d\n", e.Name, e.Batcher.Stats().Forwards)
		}
	}
	head("dimoo_batch_sequences_total", "counter", "Sequences over the batched forwards (divided by forwards: mean batch width).")
	for _, e := range s.engines {
		if e.Batcher != nil {
			fmt.Fprintf(w, "dimoo_batch_sequences_total{engine=%q} %d\n", e.Name, e.Batcher.Stats().Sequences)
		}
	}
	if s.opts.GPUs != nil {
		s.writeGPUMetrics(w, head)
	}
}

// writeGPUMetrics adds each device's telemetry (devices that fail to
// answer are left out).
func (s *Server) writeGPUMetrics(w io.Writer, head func(name, typ, help string)) {
	n, err := s.opts.GPUs.Count()
	if err != nil {
		return
	}
	var devs []gpu.Device
	for i := 0; i < n; i++ {
		if d, err := s.opts.GPUs.Device(i); err == nil {
			devs = append(devs, d)
		}
	}
	for _, g := range []struct {
		name, help string
		val        func(d gpu.Device) float64
	}{
		{"dimoo_gpu_memory_total_bytes", "Device memory.", func(d gpu.Device) float64 { return float64(d.MemoryTotal) }},
		{"dimoo_gpu_memory_used_bytes", "Device memory in use.", func(d gpu.Device) float64 { return float64(d.MemoryUsed) }},
		{"dimoo_gpu_utilization_ratio", "Share of time a kernel ran (0-1).", func(d gpu.Device) float64 { return float64(d.Utilization) / 100 }},
		{"dimoo_gpu_power_watts", "Power draw.", func(d gpu.Device) float64 { return d.PowerWatts }},
		{"dimoo_gpu_sm_clock_hertz", "SM clock.", func(d gpu.Device) float64 { return float64(d.SMClockMHz) * 1e6 }},
		{"dimoo_gpu_memory_clock_hertz", "Memory clock.", func(d gpu.Device) float64 { return float64(d.MemClockMHz) * 1e6 }},
	} {
		head(g.name, "gauge", g.help)
		for _, d := range devs {
			fmt.Fprintf(w, "%s{gpu=\"%d\",name=%q} %g\n", g.name, d.Index, d.Name, g.val(d))
		}
	}
}
