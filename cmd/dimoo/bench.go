package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"image"
	"image/color"
	"io"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/gpu"
)

// openGPU opens the telemetry provider (tests put a gpu.Fake here).
var openGPU = gpu.Open

// benchSchemaHelp documents --json's document (and --profile's bench.json);
// `dimoo bench --help` prints it under the flags.
const benchSchemaHelp = `
--json prints one JSON document on stdout (the table goes to stderr unless
--quiet); --profile DIR writes the same document to DIR/bench.json (and,
while cases finish, the ones done so far to DIR/bench.partial.json, removed
at the end, so a run stopped by a time limit keeps them):

  schema            "dimoo-bench/1"
  machine           library {version, abi, path, source}, backend, runtime (the
                    library's device description), cpu {model, threads},
                    go {version, os, arch}, gpus [{index, name, uuid,
                    memory_total_bytes, memory_used_before_load_bytes}] (NVML)
  model             dir, layers, d_model, heads, mlp, vocab, parameters,
                    dtypes {NAME: tensors}, weight_bytes (as loaded), precision (--precision)
  cases []          one per ML-Cache setting (two with --compare-cache):
    settings        task ("t2i"), prompt, width, height (floored to the VQ
                    factor), grid_w, grid_h, image_tokens, sequence_tokens
                    {cond, uncond} (from the reference's layout), steps,
                    cfg_scale, temperature, use_cache, cache_ratio,
                    warmup_ratio, refresh_interval, seed (run i uses
                    seed+i-1), runs, warmup, warmup_steps; with --task
                    understand one case: task "understand", prompt (the
                    question), image (its path or "synthetic"), width and
                    height (the input's), sequence_tokens (as the first
                    timed run built them), steps, gen_length, block_length,
                    cfg_scale, temperature, seed, runs, warmup
    runs []         run, seed, steps, forwards, decode_ms (the sampling loop),
                    forward_ms, sampling_ms, outside_ms (decode - forward),
                    outside_share (outside / forward), generate_ms (the whole
                    call: tokenizing and the VQ-VAE too), tokens_per_second
                    (image tokens, or the answer positions of the blocks
                    decoded, / decode s), steps_per_second, step_ms []
                    (per step, from the progress callback)
    median          the run with the median decode_ms (of an even count, the
                    upper middle)
    telemetry       only with a GPU and NVML: interval_ms, summary [{index,
                    name, samples, span_s, power_w, sm_clock_mhz, mem_clock_mhz,
                    memory_used_bytes, utilization_pct (each {min, median,
                    max}), peak_memory_bytes, memory_total_bytes, energy_j}],
                    samples [{t_ms (from the case's first timed run), index,
                    power_w, sm_clock_mhz, mem_clock_mhz, memory_used_bytes,
                    utilization_pct}] over the case's timed runs
  telemetry_errors  device reads that failed (absent when none)

--profile DIR also writes DIR/cpu.pprof (Go CPU profile over the timed runs:
go tool pprof bin/dimoo DIR/cpu.pprof) and DIR/trace.json (Chrome trace events
for Perfetto or chrome://tracing: each run, its decode loop and steps, and
GPU telemetry counters). On a GPU, nsys adds the kernels (and, once the
library emits them, its NVTX ranges) on the same runs:
  nsys profile -t cuda,nvtx,osrt -o dimoo-bench bin/dimoo bench --device cuda --profile DIR
`

// benchFlags are bench's flags: text-to-image's, understanding's (with
// --task understand), and how to run and report.
type benchFlags struct {
	t2iFlags
	task                      string
	imagePath                 string
	genLength, blockLength    int
	runs, warmup, warmupSteps int
	jsonOut, compareCache     bool
	profile                   string
	force                     bool
	telemetry                 time.Duration
}

func (b *benchFlags) register(fs *flag.FlagSet) {
	b.t2iFlags.register(fs)
	fs.StringVar(&b.task, "task", "t2i", "t2i (text-to-image) or understand (a question about --image_path, "+
		"else a synthetic --width x --height image)")
	fs.StringVar(&b.imagePath, "image_path", "", "understand: the input image")
	fs.IntVar(&b.genLength, "gen_length", 1024, "understand: answer length in tokens")
	fs.IntVar(&b.blockLength, "block_length", 256, "understand: block length (gen_length must be a multiple)")
	fs.Var(&intAlias{&b.timesteps}, "steps", "same as --timesteps")
	fs.Lookup("steps").DefValue = "0" // help: no default of its own
	fs.IntVar(&b.runs, "runs", 3, "timed runs")
	fs.IntVar(&b.warmup, "warmup", 1, "untimed runs first")
	fs.IntVar(&b.warmupSteps, "warmup-steps", 0,
		"steps of the warm-up runs (0: as the timed runs; understand: rounded to whole blocks, at least one a block)")
	fs.BoolVar(&b.jsonOut, "json", false, "print the results as one JSON document on stdout (the table on stderr)")
	fs.BoolVar(&b.compareCache, "compare-cache", false,
		"run every setting without and with ML-Cache (the cache flags still need --use-cache)")
	fs.StringVar(&b.profile, "profile", "", "write DIR/cpu.pprof, DIR/trace.json and DIR/bench.json")
	fs.BoolVar(&b.force, "force", false, "replace existing --profile files")
	fs.DurationVar(&b.telemetry, "telemetry-interval", 100*time.Millisecond,
		"GPU telemetry period while the runs go (0: none; needs NVML)")
}

// cmdBench times text-to-image decodes end to end: per run the decode loop's
// wall time, the forwards' share, and the time spent outside them (the
// sampler and its bookkeeping) as a share of the forward time; then the
// median run, and GPU telemetry where NVML sees a GPU. The first --warmup
// runs are not reported.
func cmdBench(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var b benchFlags
	b.register(fs)
	if err := parseFlags(fs, args); err != nil {
		var h *helpShown
		if errors.As(err, &h) {
			h.text += benchSchemaHelp
		}
		return err
	}
	set := setFlags(fs)
	given := setFlags(fs) // as typed (set gets --steps' alias below)
	if set["steps"] && set["timesteps"] {
		return fmt.Errorf("%w: give --steps or --timesteps, not both", errUsage)
	}
	if set["steps"] {
		set["timesteps"] = true
	}
	if b.warmupSteps < 0 {
		return fmt.Errorf("%w: --warmup-steps must be >= 0", errUsage)
	}
	if b.telemetry < 0 || b.telemetry > 0 && b.telemetry < time.Millisecond {
		return fmt.Errorf("%w: --telemetry-interval %v: want 0 (none) or at least 1ms", errUsage, b.telemetry)
	}
	if b.task != "t2i" && b.task != "understand" {
		return fmt.Errorf("%w: --task %q: want t2i or understand", errUsage, b.task)
	}
	if b.task == "understand" {
		for _, f := range []string{"use-cache", "compare-cache", "cache_ratio", "warmup_ratio", "refresh_interval",
			"timesteps"} {
			if given[f] {
				return fmt.Errorf("%w: --%s is text-to-image's; --task understand takes --steps, --gen_length, "+
					"--block_length", errUsage, f)
			}
		}
		if strings.TrimSpace(b.prompt) == "" {
			b.prompt = "What is in the image?"
		}
	} else if set["image_path"] || set["gen_length"] || set["block_length"] {
		return fmt.Errorf("%w: --image_path, --gen_length and --block_length need --task understand", errUsage)
	}
	if strings.TrimSpace(b.prompt) == "" {
		b.prompt = "a red circle at the top left"
	}
	var input image.Image
	if b.imagePath != "" { // before the model loads: a bad image fails fast
		var err error
		if input, err = dimoo.LoadImage(b.imagePath); err != nil {
			return err
		}
	}
	profile, err := b.planProfile()
	if err != nil {
		return err
	}
	table := w
	if b.jsonOut {
		table = io.Discard
		if !b.quiet {
			table = os.Stderr
		}
	}

	rep := &benchReport{Schema: benchSchema}
	rep.Machine.fill()
	// GPUs first, so their memory before the model loads is known.
	var gpus gpu.Provider
	var gpuIdx []int
	if b.telemetry > 0 {
		if p, err := openGPU(); err == nil {
			defer p.Close()
			if n, err := p.Count(); err == nil && n > 0 {
				gpus = p
				for i := range n {
					if d, err := p.Device(i); err == nil {
						gpuIdx = append(gpuIdx, i)
						rep.Machine.GPUs = append(rep.Machine.GPUs, benchGPU{Index: i, Name: d.Name, UUID: d.UUID,
							MemoryTotal: d.MemoryTotal, MemoryBeforeLoad: d.MemoryUsed})
					}
				}
			}
		}
	}

	p, err := b.taskFlags.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	rep.Machine.fillRuntime(p)
	rep.Model = modelInfo(p)
	if b.width == 0 && b.height == 0 {
		b.width, b.height = p.NativeSize()
	}
	if b.task == "understand" {
		c, err := b.understandCase(p, set, input)
		if err != nil {
			return err
		}
		rep.Cases = append(rep.Cases, c)
	} else if rep.Cases, err = b.imageCases(p, set); err != nil {
		return err
	}

	var sampler *gpu.Sampler
	if gpus != nil {
		sampler = gpu.StartSampler(gpus, gpuIdx, b.telemetry)
		defer sampler.Stop()
	}
	tr := newBenchTrace()
	// Every case's warm-up first, then the timed runs: the CPU profile
	// covers exactly the timed runs.
	for ci, c := range rep.Cases {
		for r := range b.warmup {
			rec, err := c.run(ctx, b.seed, true)
			if err != nil {
				return err
			}
			tr.addRun(rec, ci, fmt.Sprintf("warmup %d", r+1), "warmup")
		}
	}
	var prof bytes.Buffer
	if profile != nil {
		if err := pprof.StartCPUProfile(&prof); err != nil {
			return fmt.Errorf("dimoo: CPU profile: %w", err)
		}
	}
	for ci, c := range rep.Cases {
		c.start = time.Now()
		if sampler != nil {
			sampler.SampleNow() // every case has samples at its edges, however short
		}
		for r := range b.runs {
			seed := b.seed + uint64(r)
			rec, err := c.run(ctx, seed, false)
			if err != nil {
				if profile != nil {
					pprof.StopCPUProfile()
				}
				return err
			}
			if c.Settings.Task == "understand" && r == 0 { // the sequence as the pipeline built it
				c.Settings.SequenceTokens = seqLensOf(rec.stats.SeqLens)
			}
			c.Runs = append(c.Runs, newBenchRun(r+1, seed, rec))
			tr.addRun(rec, ci, fmt.Sprintf("run %d", r+1), "run")
		}
		if sampler != nil {
			sampler.SampleNow()
		}
		c.end = time.Now()
		c.Median = c.medianRun()
		if profile != nil {
			part := *rep
			part.Cases = rep.Cases[:ci+1]
			if err := profile.writePartial(&part); err != nil {
				pprof.StopCPUProfile()
				return err
			}
		}
	}
	if profile != nil {
		pprof.StopCPUProfile()
	}
	if sampler != nil {
		all := sampler.Stop()
		for _, c := range rep.Cases {
			c.Telemetry = newBenchTelemetry(sampler.Samples(c.start, c.end), c.start, b.telemetry)
		}
		tr.addTelemetry(all)
		if n, err := sampler.Errors(); n > 0 {
			rep.TelemetryErrors = fmt.Sprintf("%d reads failed, the last: %v", n, err)
		}
	}

	for i, c := range rep.Cases {
		if i > 0 {
			fmt.Fprintln(table)
		}
		if err := c.writeTable(table); err != nil {
			return err
		}
	}
	if b.jsonOut {
		if err := rep.write(w); err != nil {
			return err
		}
	}
	if profile != nil {
		return profile.write(rep, tr, prof.Bytes())
	}
	return nil
}

// imageCases are text-to-image's cases: one, or two with --compare-cache.
func (b *benchFlags) imageCases(p *dimoo.Pipeline, set map[string]bool) ([]*benchCase, error) {
	b.modelDefaults(p, set, &b.taskFlags, nil)
	o, err := b.sampling(&b.taskFlags)
	if err != nil {
		return nil, err
	}
	f := p.VQ.Factor()
	gw, gh := b.width/f, b.height/f
	if set["steps"] && o.Steps > gw*gh {
		return nil, fmt.Errorf("%w: --steps %d is more than the %d codes of a %dx%d image (at least one code per step)",
			errUsage, o.Steps, gw*gh, b.width, b.height)
	}
	cacheModes := []bool{o.UseCache}
	if b.compareCache {
		cacheModes = []bool{false, true}
	}
	var cases []*benchCase
	for _, uc := range cacheModes {
		s := o
		s.UseCache = uc
		c := &benchCase{Settings: b.settings(p, s, gw, gh)}
		c.run = func(ctx context.Context, seed uint64, warmup bool) (*runRecord, error) {
			s := s
			if warmup && b.warmupSteps > 0 {
				s.Steps = min(b.warmupSteps, s.Steps)
			}
			s.Seed = seed
			rec := &runRecord{steps: make([]time.Time, 0, s.Steps), seed: seed, image: &s, tokens: gw * gh}
			rec.start = time.Now()
			_, err := p.GenerateImage(ctx, dimoo.ImageRequest{Prompt: b.prompt, Width: b.width, Height: b.height,
				CFGScale: guidance(b.cfgScale), Sampling: s, Stats: &rec.stats,
				Progress: func(step, total int) { rec.steps = append(rec.steps, time.Now()) }})
			rec.end = time.Now()
			return rec, err
		}
		cases = append(cases, c)
	}
	return cases, nil
}

// understandCase is understanding's case: a question about the input image
// (a synthetic one of --width x --height without --image_path), the
// model's answer length and steps unless given, else the reference's.
func (b *benchFlags) understandCase(p *dimoo.Pipeline, set map[string]bool, in image.Image) (*benchCase, error) {
	// As dimoo understand: the model's answer length and steps unless any
	// of the three is given.
	o := dimoo.DefaultTextSampling()
	o.GenLength, o.BlockLength = b.genLength, b.blockLength
	if set["steps"] {
		o.Steps = b.timesteps
	}
	if d := p.Defaults().Sampling; d.GenLength > 0 && !set["steps"] && !set["gen_length"] && !set["block_length"] {
		o.Steps, o.GenLength, o.BlockLength = d.TextSteps, d.GenLength, d.BlockLength
	}
	// Greedy unless --temperature is given, as dimoo understand.
	if set["temperature"] {
		o.Temperature = b.temperature
	}
	if b.cfgScale < 0 {
		return nil, fmt.Errorf("%w: --cfg_scale must be >= 0", errUsage)
	}
	if set["cfg_scale"] {
		o.CFGScale = b.cfgScale
	}
	src := b.imagePath
	if in == nil {
		if b.width < 1 || b.height < 1 || b.width > 4096 || b.height > 4096 {
			return nil, fmt.Errorf("%w: a synthetic input of %dx%d: want 1 to 4096 pixels a side", errUsage,
				b.width, b.height)
		}
		in, src = syntheticImage(b.width, b.height), "synthetic"
	}
	bounds := in.Bounds()
	c := &benchCase{Settings: benchSettings{Task: "understand", Prompt: b.prompt, Image: src,
		Width: bounds.Dx(), Height: bounds.Dy(), Steps: o.Steps, GenLength: o.GenLength, BlockLength: o.BlockLength,
		CFGScale: o.CFGScale, Temperature: o.Temperature, Seed: b.seed, Runs: b.runs, Warmup: b.warmup}}
	c.run = func(ctx context.Context, seed uint64, warmup bool) (*runRecord, error) {
		s := o
		s.Seed = seed
		if blocks := s.GenLength / s.BlockLength; warmup && b.warmupSteps > 0 && blocks > 0 {
			// The same sequence (so the same shapes), fewer steps a block.
			s.Steps = max(blocks, min(b.warmupSteps, s.Steps)/blocks*blocks)
		}
		rec := &runRecord{steps: make([]time.Time, 0, s.Steps), seed: seed}
		rec.start = time.Now()
		_, err := p.Understand(ctx, dimoo.UnderstandRequest{Question: b.prompt, Image: in,
			InputArea: p.NativeArea(), Sampling: s, Stats: &rec.stats,
			Progress: func(step, total int) { rec.steps = append(rec.steps, time.Now()) }})
		rec.end = time.Now()
		// The answer positions decoded: whole blocks, until the one with
		// the end of text.
		if per := s.Steps / (s.GenLength / s.BlockLength); per > 0 {
			rec.tokens = rec.stats.Steps / per * s.BlockLength
		}
		return rec, err
	}
	return c, nil
}

// syntheticImage is a deterministic input for understanding benchmarks:
// colour gradients with a bright square in the middle.
func syntheticImage(w, h int) image.Image {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			c := color.NRGBA{uint8(255 * x / max(1, w-1)), uint8(255 * y / max(1, h-1)), 128, 255}
			if 3*x >= w && 3*x < 2*w && 3*y >= h && 3*y < 2*h {
				c = color.NRGBA{250, 240, 40, 255}
			}
			img.SetNRGBA(x, y, c)
		}
	}
	return img
}

// seqLensOf turns a decode's branch lengths into settings' (uncond 0: one branch).
func seqLensOf(lens []int) seqLens {
	var s seqLens
	if len(lens) > 0 {
		s.Cond = lens[0]
	}
	if len(lens) > 1 {
		s.Uncond = lens[1]
	}
	return s
}

// runRecord is one decode call as the bench saw it.
type runRecord struct {
	start, end time.Time
	steps      []time.Time // when each step's progress call came
	stats      dimoo.DecodeStats
	seed       uint64
	image      *dimoo.ImageSampling // text-to-image's settings (nil: understanding)
	tokens     int                  // the tokens decoded: image codes, or answer positions
}

// decodeStart is when the decode loop began: the progress calls come at
// the ends of steps and the loop's wall time (Stats.Total) ends just after
// the last, so the loop started Total before the last call (within the
// microseconds between the last step and the loop's return).
func (r *runRecord) decodeStart() time.Time {
	if len(r.steps) == 0 {
		return r.start
	}
	t := r.steps[len(r.steps)-1].Add(-r.stats.Total)
	if t.Before(r.start) {
		return r.start
	}
	return t
}

// stepDurations are the steps' wall times, from the progress calls.
func (r *runRecord) stepDurations() []time.Duration {
	out := make([]time.Duration, len(r.steps))
	prev := r.decodeStart()
	for i, t := range r.steps {
		out[i] = t.Sub(prev)
		prev = t
	}
	return out
}

// intAlias is a second name for an int flag (bench's --steps).
type intAlias struct{ p *int }

func (a *intAlias) String() string {
	if a == nil || a.p == nil {
		return "0"
	}
	return strconv.Itoa(*a.p)
}

func (a *intAlias) Set(s string) error {
	v, err := strconv.Atoi(s)
	if err != nil {
		return errors.New("not an integer")
	}
	*a.p = v
	return nil
}

// profileFiles are --profile's outputs, checked before anything loads.
type profileFiles struct {
	dir   string
	force bool
}

const (
	profileCPU   = "cpu.pprof"
	profileTrace = "trace.json"
	profileJSON  = "bench.json"
	// The cases finished so far, rewritten after each: a run killed by a
	// time limit still leaves them. Removed once bench.json is written.
	profilePartial = "bench.partial.json"
)

// planProfile makes --profile's folder and checks it is writable and that
// no output exists there (unless --force); nil without --profile.
func (b *benchFlags) planProfile() (*profileFiles, error) {
	if b.profile == "" {
		if b.force {
			return nil, fmt.Errorf("%w: --force only applies with --profile", errUsage)
		}
		return nil, nil
	}
	if err := os.MkdirAll(b.profile, 0o755); err != nil {
		return nil, fmt.Errorf("%w: --profile folder: %v", errUsage, err)
	}
	if err := checkDir(b.profile); err != nil {
		return nil, err
	}
	for _, name := range []string{profileCPU, profileTrace, profileJSON, profilePartial} {
		if err := checkTarget(filepath.Join(b.profile, name), b.force); err != nil {
			return nil, err
		}
	}
	return &profileFiles{dir: b.profile, force: b.force}, nil
}

// medianRun is the run with the median decode time (the upper middle of
// an even count).
func (c *benchCase) medianRun() benchRun {
	runs := slices.Clone(c.Runs)
	slices.SortStableFunc(runs, func(a, b benchRun) int {
		switch {
		case a.DecodeMS < b.DecodeMS:
			return -1
		case a.DecodeMS > b.DecodeMS:
			return 1
		}
		return 0
	})
	return runs[len(runs)/2]
}

// writeTable prints the case: a row per timed run and the median, the
// settings, and one line per GPU of telemetry.
func (c *benchCase) writeTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "run\tdecode ms\tsteps\tforward ms/step\toutside us/step\tsampling us/step\toutside/forward\t\n")
	for _, r := range c.Runs {
		benchRow(tw, fmt.Sprint(r.Run), r)
	}
	benchRow(tw, "median", c.Median)
	if err := tw.Flush(); err != nil {
		return err
	}
	s := c.Settings
	if s.Task == "understand" {
		fmt.Fprintf(w, "understand a %dx%d image (%s; %d tokens a branch), answer %d in blocks of %d, %d steps, "+
			"cfg %g, temperature %g; median %.1f answer tokens/s, %.2f steps/s\n", s.Width, s.Height, s.Image,
			s.SequenceTokens.Cond, s.GenLength, s.BlockLength, s.Steps, s.CFGScale, s.Temperature,
			c.Median.TokensPerSecond, c.Median.StepsPerSecond)
	} else {
		fmt.Fprintf(w, "%dx%d, %d steps, cfg %g, temperature %g, ML-Cache %v; median %.1f tokens/s, %.2f steps/s\n",
			s.Width, s.Height, s.Steps, s.CFGScale, s.Temperature, s.UseCache, c.Median.TokensPerSecond,
			c.Median.StepsPerSecond)
	}
	if c.Telemetry != nil {
		for _, d := range c.Telemetry.Summary {
			fmt.Fprintln(w, d.String())
		}
	}
	return nil
}

func benchRow(w io.Writer, name string, r benchRun) {
	per := func(ms float64, unit float64) float64 { return ms * unit / float64(max(r.Steps, 1)) }
	fmt.Fprintf(w, "%s\t%.1f\t%d\t%.2f\t%.0f\t%.0f\t%.2f%%\t\n", name, r.DecodeMS, r.Steps, per(r.ForwardMS, 1),
		per(r.OutsideMS, 1000), per(r.SamplingMS, 1000), 100*r.OutsideShare)
}
