package main

// dimoo bench's reports: the --json document (schema in benchSchemaHelp),
// the Chrome trace of --profile, and the files --profile writes.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/gpu"
)

const benchSchema = "dimoo-bench/1"

type benchReport struct {
	Schema          string       `json:"schema"`
	Machine         benchMachine `json:"machine"`
	Model           benchModel   `json:"model"`
	Cases           []*benchCase `json:"cases"`
	TelemetryErrors string       `json:"telemetry_errors,omitempty"`
}

type benchMachine struct {
	Library struct {
		Version string `json:"version"`
		ABI     int32  `json:"abi"`
		Path    string `json:"path"`
		Source  string `json:"source"`
	} `json:"library"`
	Backend string `json:"backend"`
	Runtime string `json:"runtime"` // the library's description of its device
	CPU     struct {
		Model   string `json:"model"`
		Threads int    `json:"threads"`
	} `json:"cpu"`
	Go struct {
		Version string `json:"version"`
		OS      string `json:"os"`
		Arch    string `json:"arch"`
	} `json:"go"`
	GPUs []benchGPU `json:"gpus,omitempty"`
}

type benchGPU struct {
	Index            int    `json:"index"`
	Name             string `json:"name"`
	UUID             string `json:"uuid,omitempty"`
	MemoryTotal      uint64 `json:"memory_total_bytes"`
	MemoryBeforeLoad uint64 `json:"memory_used_before_load_bytes"` // the whole device, before the model loaded
}

// fill records what is known before the model loads.
func (m *benchMachine) fill() {
	m.CPU.Model, m.CPU.Threads = cpuModel(), runtime.NumCPU()
	m.Go.Version, m.Go.OS, m.Go.Arch = runtime.Version(), runtime.GOOS, runtime.GOARCH
}

// fillRuntime records the library and the runtime the pipeline runs on.
func (m *benchMachine) fillRuntime(p *dimoo.Pipeline) {
	rt := p.Model.Runtime()
	lib := rt.Library()
	m.Library.Version, m.Library.ABI, m.Library.Path, m.Library.Source = lib.Version(), lib.ABIVersion(), lib.Path,
		lib.Source
	m.Backend = rt.Backend().String()
	if d, err := rt.Describe(); err == nil {
		m.Runtime = d
	}
}

// cpuModel is the CPU's name from /proc/cpuinfo (Linux), else the
// architecture.
func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if ok && strings.TrimSpace(k) == "model name" {
				return strings.TrimSpace(v)
			}
		}
	}
	return runtime.GOARCH
}

type benchModel struct {
	Dir         string         `json:"dir"`
	Layers      int            `json:"layers"`
	DModel      int            `json:"d_model"`
	Heads       int            `json:"heads"`
	KVHeads     int            `json:"kv_heads"`
	MLP         int            `json:"mlp"`
	Vocab       int            `json:"vocab"`
	Parameters  int64          `json:"parameters"`
	DTypes      map[string]int `json:"dtypes"`
	WeightBytes int64          `json:"weight_bytes"`
	Precision   string         `json:"precision"`
}

func modelInfo(p *dimoo.Pipeline) benchModel {
	c := p.Model.Config
	m := benchModel{Dir: p.Model.Dir, Layers: c.NLayers, DModel: c.DModel, Heads: c.NHeads, KVHeads: c.NKVHeads,
		MLP: c.MLPHidden(), Vocab: c.VocabSize, Parameters: c.ParamCount(), DTypes: map[string]int{},
		WeightBytes: p.Model.WeightBytes(), Precision: p.Model.Precision.String()}
	for _, t := range p.Model.Tensors {
		m.DTypes[t.DTypeName]++
	}
	return m
}

type benchCase struct {
	Settings  benchSettings   `json:"settings"`
	Runs      []benchRun      `json:"runs"`
	Median    benchRun        `json:"median"`
	Telemetry *benchTelemetry `json:"telemetry,omitempty"`

	// run decodes once with seed (a warm-up run when warmup).
	run        func(ctx context.Context, seed uint64, warmup bool) (*runRecord, error)
	start, end time.Time // the timed runs
}

type benchSettings struct {
	Task            string  `json:"task"` // t2i or understand
	Prompt          string  `json:"prompt"`
	Image           string  `json:"image,omitempty"` // understand: the input's path, or "synthetic"
	Width           int     `json:"width"`
	Height          int     `json:"height"`
	GridW           int     `json:"grid_w,omitempty"`
	GridH           int     `json:"grid_h,omitempty"`
	ImageTokens     int     `json:"image_tokens,omitempty"`
	SequenceTokens  seqLens `json:"sequence_tokens"`
	Steps           int     `json:"steps"`
	GenLength       int     `json:"gen_length,omitempty"`   // understand
	BlockLength     int     `json:"block_length,omitempty"` // understand
	CFGScale        float64 `json:"cfg_scale"`
	Temperature     float64 `json:"temperature"`
	UseCache        bool    `json:"use_cache"`
	CacheRatio      float64 `json:"cache_ratio,omitempty"`
	WarmupRatio     float64 `json:"warmup_ratio,omitempty"`
	RefreshInterval int     `json:"refresh_interval,omitempty"`
	Seed            uint64  `json:"seed"`
	Runs            int     `json:"runs"`
	Warmup          int     `json:"warmup"`
	WarmupSteps     int     `json:"warmup_steps"`
}

// seqLens are the guidance branches' sequence lengths (uncond 0: no
// guidance).
type seqLens struct {
	Cond   int `json:"cond"`
	Uncond int `json:"uncond"`
}

func (b *benchFlags) settings(p *dimoo.Pipeline, s dimoo.ImageSampling, gw, gh int) benchSettings {
	f := p.VQ.Factor()
	out := benchSettings{Task: "t2i", Prompt: b.prompt, Width: gw * f, Height: gh * f, GridW: gw, GridH: gh, ImageTokens: gw * gh,
		Steps: min(s.Steps, gw*gh), CFGScale: b.cfgScale, Temperature: b.temperature, UseCache: s.UseCache,
		CacheRatio: s.CacheRatio, WarmupRatio: s.WarmupRatio, RefreshInterval: s.RefreshInterval, Seed: b.seed,
		Runs: b.runs, Warmup: b.warmup, WarmupSteps: b.warmupSteps}
	// The reference's text-to-image layout (dimoo/layout.go): the chat
	// template, then BOA, BOI, rows of codes each ending in a newline, EOI,
	// EOA.
	answer := gh*(gw+1) + 4
	tmpl := func(user string) int {
		return len(p.Tokenizer.Encode("<system>"+dimoo.SystemTextToImage+"</system><user>"+user+"</user>")) + answer
	}
	out.SequenceTokens.Cond = tmpl(b.prompt)
	if b.cfgScale > 0 {
		out.SequenceTokens.Uncond = tmpl("<uncondition>")
	}
	return out
}

type benchRun struct {
	Run             int       `json:"run"`
	Seed            uint64    `json:"seed"`
	Steps           int       `json:"steps"`
	Forwards        int       `json:"forwards"`
	DecodeMS        float64   `json:"decode_ms"`
	ForwardMS       float64   `json:"forward_ms"`
	SamplingMS      float64   `json:"sampling_ms"`
	OutsideMS       float64   `json:"outside_ms"`
	OutsideShare    float64   `json:"outside_share"`
	GenerateMS      float64   `json:"generate_ms"`
	TokensPerSecond float64   `json:"tokens_per_second"`
	StepsPerSecond  float64   `json:"steps_per_second"`
	StepMS          []float64 `json:"step_ms"`
	// The forwards' work: calls that ran only ML-Cache's chosen positions,
	// token rows run through the network (all branches), and those rows per
	// second of forward time.
	CachedForwards  int     `json:"cached_forwards"`
	ForwardRows     int64   `json:"forward_rows"`
	ForwardRowsPerS float64 `json:"forward_rows_per_second"`
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func newBenchRun(run int, seed uint64, rec *runRecord) benchRun {
	s := rec.stats
	r := benchRun{Run: run, Seed: seed, Steps: s.Steps, Forwards: s.Forwards, DecodeMS: ms(s.Total),
		ForwardMS: ms(s.Forward), SamplingMS: ms(s.Sampling), OutsideMS: ms(s.Outside()),
		GenerateMS: ms(rec.end.Sub(rec.start)), StepMS: []float64{}}
	if s.Forward > 0 {
		r.OutsideShare = float64(s.Outside()) / float64(s.Forward)
	}
	if sec := s.Total.Seconds(); sec > 0 {
		r.TokensPerSecond = float64(rec.tokens) / sec
		r.StepsPerSecond = float64(s.Steps) / sec
	}
	r.CachedForwards, r.ForwardRows = s.CachedForwards, s.Rows
	if sec := s.Forward.Seconds(); sec > 0 {
		r.ForwardRowsPerS = float64(s.Rows) / sec
	}
	for _, d := range rec.stepDurations() {
		r.StepMS = append(r.StepMS, ms(d))
	}
	return r
}

type benchTelemetry struct {
	IntervalMS float64       `json:"interval_ms"`
	Summary    []gpu.Summary `json:"summary"`
	Samples    []benchSample `json:"samples"`
}

type benchSample struct {
	TMS         float64 `json:"t_ms"`
	Index       int     `json:"index"`
	PowerWatts  float64 `json:"power_w"`
	SMClockMHz  uint32  `json:"sm_clock_mhz"`
	MemClockMHz uint32  `json:"mem_clock_mhz"`
	MemoryUsed  uint64  `json:"memory_used_bytes"`
	Utilization uint32  `json:"utilization_pct"`
}

// newBenchTelemetry summarizes a case's samples (nil when there are none).
func newBenchTelemetry(samples []gpu.Sample, start time.Time, interval time.Duration) *benchTelemetry {
	if len(samples) == 0 {
		return nil
	}
	t := &benchTelemetry{IntervalMS: ms(interval), Summary: gpu.Summarize(samples)}
	for _, s := range samples {
		t.Samples = append(t.Samples, benchSample{TMS: ms(s.At.Sub(start)), Index: s.Index, PowerWatts: s.PowerWatts,
			SMClockMHz: s.SMClockMHz, MemClockMHz: s.MemClockMHz, MemoryUsed: s.MemoryUsed, Utilization: s.Utilization})
	}
	return t
}

func (r *benchReport) write(w io.Writer) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(r)
}

// The Chrome trace-event format (JSON object form): complete events ("X")
// with microsecond timestamps, counters ("C"), metadata ("M").
type traceEvent struct {
	Name string         `json:"name"`
	Cat  string         `json:"cat,omitempty"`
	Ph   string         `json:"ph"`
	TS   float64        `json:"ts"`
	Dur  *float64       `json:"dur,omitempty"`
	PID  int            `json:"pid"`
	TID  int            `json:"tid"`
	Args map[string]any `json:"args,omitempty"`
}

type benchTrace struct {
	t0     time.Time
	events []traceEvent
}

const (
	tracePID     = 1
	traceRunsTID = 1
)

func newBenchTrace() *benchTrace {
	t := &benchTrace{t0: time.Now()}
	t.events = append(t.events,
		traceEvent{Name: "process_name", Ph: "M", PID: tracePID, Args: map[string]any{"name": "dimoo bench"}},
		traceEvent{Name: "thread_name", Ph: "M", PID: tracePID, TID: traceRunsTID, Args: map[string]any{"name": "runs"}})
	return t
}

func (t *benchTrace) us(at time.Time) float64 {
	return float64(at.Sub(t.t0)) / float64(time.Microsecond)
}

func (t *benchTrace) span(name, cat string, from, to time.Time, args map[string]any) {
	if to.Before(from) {
		to = from
	}
	d := float64(to.Sub(from)) / float64(time.Microsecond)
	t.events = append(t.events, traceEvent{Name: name, Cat: cat, Ph: "X", TS: t.us(from), Dur: &d, PID: tracePID,
		TID: traceRunsTID, Args: args})
}

// refreshStep is the reference's ML-Cache schedule (a full step), for the
// steps' labels: t <= floor(w*S) or (t - floor(w*S)) mod R == 0.
func refreshStep(t, steps int, s dimoo.ImageSampling) bool {
	if !s.UseCache {
		return true
	}
	w := int(float64(steps) * s.WarmupRatio)
	return t <= w || s.RefreshInterval > 0 && (t-w)%s.RefreshInterval == 0
}

// addRun adds a run, its phases (before the decode loop: tokenizing and
// setup; the loop; after it: the VQ-VAE) and its steps.
func (t *benchTrace) addRun(rec *runRecord, caseIdx int, name, cat string) {
	st, s := rec.stats, rec.image
	args := map[string]any{"case": caseIdx, "seed": rec.seed, "steps": st.Steps, "forwards": st.Forwards,
		"decode_ms": ms(st.Total), "forward_ms": ms(st.Forward), "sampling_ms": ms(st.Sampling)}
	if s != nil {
		args["use_cache"] = s.UseCache
	}
	t.span(name, cat, rec.start, rec.end, args)
	ds := rec.decodeStart()
	de := ds.Add(st.Total)
	t.span("before decode", cat, rec.start, ds, nil)
	t.span("decode", cat, ds, de, map[string]any{"forward_ms": ms(st.Forward), "sampling_ms": ms(st.Sampling),
		"outside_ms": ms(st.Outside())})
	prev := ds
	for i, at := range rec.steps {
		args := map[string]any{"step": i + 1, "total": len(rec.steps)}
		if s != nil && s.UseCache {
			args["full"] = refreshStep(i, len(rec.steps), *s)
		}
		t.span(fmt.Sprintf("step %d", i+1), "step", prev, at, args)
		prev = at
	}
	if rec.end.After(de) {
		after := "after decode (detokenizing)"
		if s != nil {
			after = "after decode (VQ-VAE)"
		}
		t.span(after, cat, de, rec.end, nil)
	}
}

// addTelemetry adds the GPU samples as counter tracks.
func (t *benchTrace) addTelemetry(samples []gpu.Sample) {
	for _, s := range samples {
		for _, c := range []struct {
			name string
			v    float64
		}{{"power W", s.PowerWatts}, {"SM clock MHz", float64(s.SMClockMHz)},
			{"memory clock MHz", float64(s.MemClockMHz)}, {"memory used GiB", float64(s.MemoryUsed) / (1 << 30)},
			{"utilization %", float64(s.Utilization)}} {
			t.events = append(t.events, traceEvent{Name: fmt.Sprintf("gpu%d %s", s.Index, c.name), Ph: "C",
				TS: t.us(s.At), PID: tracePID, Args: map[string]any{"value": c.v}})
		}
	}
}

func (t *benchTrace) write(w io.Writer) error {
	return json.NewEncoder(w).Encode(map[string]any{
		"traceEvents":     t.events,
		"displayTimeUnit": "ms",
		"otherData": map[string]any{"start_unix_ns": t.t0.UnixNano(), "command": strings.Join(os.Args, " "),
			"clock": "microseconds since start_unix_ns"},
	})
}

// write puts the three profile files in place (never replacing one without
// --force).
func (p *profileFiles) write(rep *benchReport, tr *benchTrace, cpu []byte) error {
	for _, f := range []struct {
		name  string
		write func(w *bufio.Writer) error
	}{
		{profileCPU, func(w *bufio.Writer) error { _, err := w.Write(cpu); return err }},
		{profileTrace, func(w *bufio.Writer) error { return tr.write(w) }},
		{profileJSON, func(w *bufio.Writer) error { return rep.write(w) }},
	} {
		if err := writeOutput(filepath.Join(p.dir, f.name), p.force, f.write); err != nil {
			return err
		}
	}
	if err := os.Remove(filepath.Join(p.dir, profilePartial)); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// writePartial replaces bench.partial.json (this run's own file: planProfile
// made sure none was there) with the cases finished so far.
func (p *profileFiles) writePartial(rep *benchReport) error {
	return writeOutput(filepath.Join(p.dir, profilePartial), true, func(w *bufio.Writer) error { return rep.write(w) })
}
