//go:build unix

// Command serve measures what batching buys: text-to-image requests per
// second through a Batcher at concurrency 1, 4 and 16, against the same
// requests one at a time in the same run (and, to separate batching from
// mere concurrency, the same concurrency without a batcher). `go run
// ./bench/serve` prints the table; --model and --device take a real
// checkpoint on a GPU.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

func main() {
	model := flag.String("model", "", "model folder (default: the shipped small model)")
	device := flag.String("device", "cpu", "backend: cpu or cuda")
	threads := flag.Int("threads", 0, "CPU threads (0: every core)")
	requests := flag.Int("requests", 32, "requests per measurement")
	reps := flag.Int("reps", 3, "measurements of each setting (the table gives the median and the range)")
	steps := flag.Int("steps", 16, "sampling steps per request")
	concs := flag.String("concurrency", "1,4,16", "concurrency levels")
	slots := flag.Int("batch", 32, "batch sequence slots (a request with CFG takes 2)")
	flag.Parse()
	if err := run(*model, *device, *threads, *requests, *reps, *steps, *concs, *slots); err != nil {
		fmt.Fprintln(os.Stderr, "serve bench:", err)
		os.Exit(1)
	}
}

func run(dir, device string, threads, n, reps, steps int, concs string, slots int) error {
	if dir == "" {
		dir = dimoo.ShippedModelDir()
	}
	var levels []int
	for _, f := range strings.Split(concs, ",") {
		c, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || c < 1 {
			return fmt.Errorf("--concurrency %q: want positive integers", concs)
		}
		levels = append(levels, c)
	}
	b, err := dimoo.ParseBackend(device)
	if err != nil {
		return err
	}
	ctx := context.Background()
	p, err := dimoo.OpenPipeline(ctx, dir, dimoo.PipelineOptions{LoadOptions: dimoo.LoadOptions{Backend: b,
		Threads: threads}, MaxConcurrent: slices.Max(levels)})
	if err != nil {
		return err
	}
	defer p.Close()
	bat, err := p.NewBatcher(dimoo.BatchOptions{Seqs: slots})
	if err != nil {
		return err
	}
	defer bat.Close()
	prompts := []string{"a red circle at the top left", "a blue square at the center",
		"a green triangle at the bottom right", "a yellow circle at the top right"}
	req := func(i int) dimoo.ImageRequest {
		return dimoo.ImageRequest{Prompt: prompts[i%len(prompts)],
			Sampling: dimoo.ImageSampling{Steps: steps, Temperature: 0.5, Seed: uint64(i)}}
	}
	// measure runs n requests with c workers and returns requests/s and the
	// process's CPU seconds per request (less sensitive to a shared
	// machine's load than wall time).
	measure := func(c int, gen func(context.Context, dimoo.ImageRequest) (any, error)) (float64, float64, error) {
		c0 := cpuSeconds()
		var next atomic.Int64
		var wg sync.WaitGroup
		var firstErr atomic.Value
		t0 := time.Now()
		for w := 0; w < c; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(next.Add(1)) - 1
					if i >= n {
						return
					}
					if _, err := gen(ctx, req(i)); err != nil {
						firstErr.CompareAndSwap(nil, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		if e, ok := firstErr.Load().(error); ok {
			return 0, 0, e
		}
		return float64(n) / time.Since(t0).Seconds(), (cpuSeconds() - c0) / float64(n), nil
	}
	alone := func(ctx context.Context, r dimoo.ImageRequest) (any, error) { return p.GenerateImage(ctx, r) }
	batched := func(ctx context.Context, r dimoo.ImageRequest) (any, error) { return bat.GenerateImage(ctx, r) }

	// Warm up both paths.
	if _, _, err := measure(2, batched); err != nil {
		return err
	}
	type row struct {
		name string
		rps  []float64
		cpu  []float64
	}
	rows := []row{{name: "one at a time"}}
	for _, c := range levels {
		rows = append(rows, row{name: fmt.Sprintf("batched, concurrency %d", c)})
	}
	for _, c := range levels[1:] {
		rows = append(rows, row{name: fmt.Sprintf("unbatched, concurrency %d", c)})
	}
	var widths []float64
	// Interleave the settings rep by rep, so drifting machine load hits all.
	for r := 0; r < reps; r++ {
		k := 0
		add := func(c int, gen func(context.Context, dimoo.ImageRequest) (any, error)) error {
			v, cpu, err := measure(c, gen)
			fmt.Fprintf(os.Stderr, "rep %d: %s: %.2f req/s, %.3f CPU s/req\n", r+1, rows[k].name, v, cpu)
			rows[k].rps = append(rows[k].rps, v)
			rows[k].cpu = append(rows[k].cpu, cpu)
			k++
			return err
		}
		if err := add(1, alone); err != nil {
			return err
		}
		for _, c := range levels {
			s0 := bat.Stats()
			if err := add(c, batched); err != nil {
				return err
			}
			s1 := bat.Stats()
			widths = append(widths, float64(s1.Sequences-s0.Sequences)/float64(s1.Forwards-s0.Forwards))
		}
		for _, c := range levels[1:] {
			if err := add(c, alone); err != nil {
				return err
			}
		}
	}
	base := median(rows[0].rps)
	fmt.Printf("model %s on %s, %d requests of %d steps (CFG: 2 sequences each), %d reps; batch slots %d\n",
		dir, device, n, steps, reps, slots)
	baseCPU := median(rows[0].cpu)
	fmt.Printf("%-28s %8s %17s %7s %11s %9s\n", "setting", "req/s", "range", "ratio", "CPU s/req", "CPU ratio")
	for _, r := range rows {
		fmt.Printf("%-28s %8.2f %8.2f - %-6.2f %6.2fx %11.3f %8.2fx\n", r.name, median(r.rps), slices.Min(r.rps),
			slices.Max(r.rps), median(r.rps)/base, median(r.cpu), baseCPU/median(r.cpu))
	}
	fmt.Printf("mean sequences per batched forward, by level and rep: %.1f\n", widths)
	return nil
}

// cpuSeconds is the process's user and system CPU time so far.
func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
