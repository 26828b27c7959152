package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// cmdBench times text-to-image decodes end to end: per run the decode loop's
// wall time, the forwards' share, and the time spent outside them (the
// sampler and its bookkeeping) as a share of the forward time; then the
// median run. The first --warmup runs are not reported.
func cmdBench(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var g t2iFlags
	g.register(fs)
	runs := fs.Int("runs", 3, "timed runs")
	warmup := fs.Int("warmup", 1, "untimed runs first")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *runs < 1 || *warmup < 0 {
		return fmt.Errorf("%w: --runs must be >= 1 and --warmup >= 0", errUsage)
	}
	if strings.TrimSpace(g.prompt) == "" {
		g.prompt = "a red circle at the top left"
	}
	p, o, err := g.open(ctx, fs)
	if err != nil {
		return err
	}
	defer p.Close()
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "run\tdecode ms\tsteps\tforward ms/step\toutside us/step\tsampling us/step\toutside/forward\t\n")
	var all []dimoo.DecodeStats
	for r := -*warmup; r < *runs; r++ {
		var st dimoo.DecodeStats
		o.Seed = g.seed + uint64(max(r, 0))
		_, err := p.GenerateImage(ctx, dimoo.ImageRequest{Prompt: g.prompt, Width: g.width, Height: g.height,
			CFGScale: guidance(g.cfgScale), Sampling: o, Stats: &st})
		if err != nil {
			return err
		}
		if r >= 0 {
			all = append(all, st)
			benchRow(tw, fmt.Sprint(r+1), st)
		}
	}
	// The median run by outside share.
	slices.SortFunc(all, func(a, b dimoo.DecodeStats) int { return compareShare(a, b) })
	benchRow(tw, "median", all[len(all)/2])
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(w, "%dx%d, %d steps, cfg %g, temperature %g, ML-Cache %v\n", g.width, g.height, o.Steps, g.cfgScale,
		o.Temperature, o.UseCache)
	return nil
}

func share(s dimoo.DecodeStats) float64 {
	if s.Forward <= 0 {
		return 0
	}
	return float64(s.Outside()) / float64(s.Forward)
}

func compareShare(a, b dimoo.DecodeStats) int {
	switch x, y := share(a), share(b); {
	case x < y:
		return -1
	case x > y:
		return 1
	}
	return 0
}

func benchRow(w io.Writer, name string, s dimoo.DecodeStats) {
	per := func(d time.Duration, unit time.Duration) float64 {
		return float64(d) / float64(unit) / float64(max(s.Steps, 1))
	}
	fmt.Fprintf(w, "%s\t%.1f\t%d\t%.2f\t%.0f\t%.0f\t%.2f%%\t\n", name, float64(s.Total)/float64(time.Millisecond),
		s.Steps, per(s.Forward, time.Millisecond), per(s.Outside(), time.Microsecond),
		per(s.Sampling, time.Microsecond), 100*share(s))
}
