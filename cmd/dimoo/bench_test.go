package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/internal/gpu"
)

// withGPU makes the bench see p (or no GPU) for the test's length.
func withGPU(t *testing.T, p gpu.Provider) {
	old := openGPU
	t.Cleanup(func() { openGPU = old })
	openGPU = func() (gpu.Provider, error) {
		if p == nil {
			return nil, gpu.ErrNoGPU
		}
		return p, nil
	}
}

// The smallest bench: the shipped model, one timed run of two steps at its
// 32x32 size.
var tinyBench = []string{"bench", "--runs", "1", "--warmup", "0", "--steps", "2", "--width", "32", "--height", "32",
	"--quiet"}

func benchJSON(t *testing.T, args ...string) (map[string]any, benchReport) {
	t.Helper()
	var stdout bytes.Buffer
	require.NoError(t, run(context.Background(), append(append([]string{}, tinyBench...), args...), &stdout))
	var raw map[string]any
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &raw), stdout.String())
	var rep benchReport
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	dec.DisallowUnknownFields()
	require.NoError(t, dec.Decode(&rep))
	return raw, rep
}

// --json is one document with the machine, the model, the settings, the
// runs with their DecodeStats in ms and rates, and the median; without a
// GPU there is no telemetry at all.
func TestBenchJSON(t *testing.T) {
	needLibrary(t)
	withGPU(t, nil)
	raw, rep := benchJSON(t, "--json")
	for _, k := range []string{"schema", "machine", "model", "cases"} {
		assert.Contains(t, raw, k)
	}
	assert.NotContains(t, raw, "telemetry_errors")
	assert.Equal(t, benchSchema, rep.Schema)
	m := rep.Machine
	assert.NotEmpty(t, m.Library.Version)
	assert.Positive(t, m.Library.ABI)
	assert.NotEmpty(t, m.Library.Path)
	assert.Equal(t, "cpu", m.Backend)
	assert.True(t, strings.HasPrefix(m.Runtime, "cpu"), m.Runtime)
	assert.NotEmpty(t, m.CPU.Model)
	assert.Positive(t, m.CPU.Threads)
	assert.Empty(t, m.GPUs)
	assert.NotContains(t, raw["machine"], "gpus")
	assert.Positive(t, rep.Model.Layers)
	assert.Positive(t, rep.Model.Parameters)
	assert.NotEmpty(t, rep.Model.DTypes)

	require.Len(t, rep.Cases, 1)
	c := rep.Cases[0]
	assert.Nil(t, c.Telemetry)
	assert.NotContains(t, raw["cases"].([]any)[0], "telemetry")
	s := c.Settings
	assert.Equal(t, 32, s.Width)
	assert.Equal(t, 32, s.Height)
	assert.Equal(t, s.GridW*s.GridH, s.ImageTokens)
	assert.Equal(t, 2, s.Steps)
	assert.False(t, s.UseCache)
	assert.Equal(t, 0.9, s.CacheRatio)
	assert.Equal(t, 0.3, s.WarmupRatio)
	assert.Equal(t, 5, s.RefreshInterval)
	assert.Equal(t, 1, s.Runs)
	assert.Greater(t, s.SequenceTokens.Cond, s.ImageTokens)
	if s.CFGScale > 0 {
		assert.Greater(t, s.SequenceTokens.Uncond, s.ImageTokens)
	}
	require.Len(t, c.Runs, 1)
	r := c.Runs[0]
	assert.Equal(t, 1, r.Run)
	assert.Equal(t, 2, r.Steps)
	assert.Positive(t, r.Forwards)
	assert.Positive(t, r.DecodeMS)
	assert.Positive(t, r.ForwardMS)
	assert.LessOrEqual(t, r.ForwardMS, r.DecodeMS)
	assert.InDelta(t, r.DecodeMS-r.ForwardMS, r.OutsideMS, 1e-6)
	assert.InDelta(t, r.OutsideMS/r.ForwardMS, r.OutsideShare, 1e-9)
	assert.GreaterOrEqual(t, r.GenerateMS, r.DecodeMS)
	assert.InDelta(t, float64(s.ImageTokens)/(r.DecodeMS/1000), r.TokensPerSecond, 1e-6*r.TokensPerSecond)
	assert.InDelta(t, 2/(r.DecodeMS/1000), r.StepsPerSecond, 1e-6*r.StepsPerSecond)
	// No ML-Cache: every step runs every row of both branches.
	assert.Equal(t, 0, r.CachedForwards)
	assert.Equal(t, int64(2*(s.SequenceTokens.Cond+s.SequenceTokens.Uncond)), r.ForwardRows)
	assert.InDelta(t, float64(r.ForwardRows)/(r.ForwardMS/1000), r.ForwardRowsPerS, 1e-6*r.ForwardRowsPerS)
	require.Len(t, r.StepMS, 2)
	sum := 0.0
	for _, d := range r.StepMS {
		assert.GreaterOrEqual(t, d, 0.0)
		sum += d
	}
	// The steps tile the decode loop, short of the moments after the last.
	assert.LessOrEqual(t, sum, r.DecodeMS+1e-6)
	assert.Equal(t, r, c.Median)
}

// --task understand: one case of the shipped model's question decode on a
// synthetic input, with the settings as run (the sequence as the pipeline
// built it), answer positions per second over whole blocks, the same
// DecodeStats arithmetic as text-to-image's; e2e_compare skips it.
func TestBenchUnderstandJSON(t *testing.T) {
	needLibrary(t)
	withGPU(t, nil)
	var stdout bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"bench", "--task", "understand", "--runs", "2", "--warmup",
		"1", "--warmup-steps", "5", "--gen_length", "16", "--block_length", "4", "--steps", "8", "--quiet", "--json"},
		&stdout))
	var rep benchReport
	dec := json.NewDecoder(bytes.NewReader(stdout.Bytes()))
	dec.DisallowUnknownFields()
	require.NoError(t, dec.Decode(&rep), stdout.String())
	require.Len(t, rep.Cases, 1)
	c := rep.Cases[0]
	s := c.Settings
	assert.Equal(t, "understand", s.Task)
	assert.Equal(t, "synthetic", s.Image)
	assert.Equal(t, "What is in the image?", s.Prompt)
	assert.Equal(t, 32, s.Width) // the shipped model's native size
	assert.Equal(t, []int{8, 16, 4}, []int{s.Steps, s.GenLength, s.BlockLength})
	assert.Greater(t, s.SequenceTokens.Cond, 16, "question, image and answer")
	assert.Zero(t, s.SequenceTokens.Uncond, "no guidance")
	assert.Zero(t, s.Temperature, "greedy, as dimoo understand")
	assert.False(t, s.UseCache)
	assert.NotContains(t, stdout.String(), `"grid_w"`)
	require.Len(t, c.Runs, 2)
	for _, r := range c.Runs {
		// 2 steps a block: the blocks decoded until the end of text.
		assert.Positive(t, r.Steps)
		assert.Equal(t, 0, r.Steps%2)
		assert.Equal(t, r.Steps, r.Forwards)
		blocks := r.Steps / 2
		assert.InDelta(t, float64(4*blocks)/(r.DecodeMS/1000), r.TokensPerSecond, 1e-6*r.TokensPerSecond)
		assert.Equal(t, int64(r.Forwards*s.SequenceTokens.Cond), r.ForwardRows)
		assert.LessOrEqual(t, r.ForwardMS, r.DecodeMS)
		assert.Len(t, r.StepMS, r.Steps)
	}
	assert.Contains(t, []benchRun{c.Runs[0], c.Runs[1]}, c.Median)

	// The table names the task; an image file works as the input.
	dir := t.TempDir()
	img := filepath.Join(dir, "in.png")
	f, err := os.Create(img)
	require.NoError(t, err)
	require.NoError(t, png.Encode(f, syntheticImage(40, 24)))
	require.NoError(t, f.Close())
	stdout.Reset()
	require.NoError(t, run(context.Background(), []string{"bench", "--task", "understand", "--runs", "1", "--warmup",
		"0", "--image_path", img, "--quiet"}, &stdout))
	assert.Contains(t, stdout.String(), "understand a 40x24 image ("+img)
	assert.Contains(t, stdout.String(), "answer tokens/s")
}

// With a GPU (the Fake), the machine lists it with its memory before the
// load, and each case carries the telemetry of its timed runs: with an
// hour's interval exactly the samples at the case's edges, whose values the
// Fake scripts, so the summary is known.
func TestBenchTelemetry(t *testing.T) {
	needLibrary(t)
	const gib = 1 << 30
	fake := &gpu.Fake{
		Devices: []gpu.Device{{Name: "NVIDIA H200", UUID: "GPU-x", MemoryTotal: 141 * gib}},
		Series: [][]gpu.Device{{
			{MemoryUsed: 1 * gib},                   // before the load
			{MemoryUsed: 17 * gib, PowerWatts: 120}, // the sampler's start
			{MemoryUsed: 18 * gib, PowerWatts: 300, SMClockMHz: 1980, MemClockMHz: 3201, Utilization: 40},  // case 1 starts
			{MemoryUsed: 22 * gib, PowerWatts: 500, SMClockMHz: 1755, MemClockMHz: 3201, Utilization: 100}, // case 1 ends
			{MemoryUsed: 23 * gib, PowerWatts: 600, SMClockMHz: 1700, MemClockMHz: 3201, Utilization: 90},  // case 2 starts
			{MemoryUsed: 21 * gib, PowerWatts: 400, SMClockMHz: 1800, MemClockMHz: 3201, Utilization: 70},  // case 2 ends
			{MemoryUsed: 2 * gib, PowerWatts: 90}, // the sampler's stop
		}},
	}
	withGPU(t, fake)
	_, rep := benchJSON(t, "--json", "--telemetry-interval", "1h", "--compare-cache")
	require.Len(t, rep.Machine.GPUs, 1)
	g := rep.Machine.GPUs[0]
	assert.Equal(t, benchGPU{Index: 0, Name: "NVIDIA H200", UUID: "GPU-x", MemoryTotal: 141 * gib,
		MemoryBeforeLoad: 1 * gib}, g)
	require.Len(t, rep.Cases, 2)
	assert.False(t, rep.Cases[0].Settings.UseCache)
	assert.True(t, rep.Cases[1].Settings.UseCache)
	for i, want := range []struct {
		power, sm, util gpu.Stat
		peak            uint64
		first           float64 // the first sample's power
	}{
		{gpu.Stat{Min: 300, Median: 400, Max: 500}, gpu.Stat{Min: 1755, Median: 1867.5, Max: 1980},
			gpu.Stat{Min: 40, Median: 70, Max: 100}, 22 * gib, 300},
		{gpu.Stat{Min: 400, Median: 500, Max: 600}, gpu.Stat{Min: 1700, Median: 1750, Max: 1800},
			gpu.Stat{Min: 70, Median: 80, Max: 90}, 23 * gib, 600},
	} {
		tel := rep.Cases[i].Telemetry
		require.NotNil(t, tel, "case %d", i)
		assert.Equal(t, 3600000.0, tel.IntervalMS)
		require.Len(t, tel.Samples, 2)
		require.Len(t, tel.Summary, 1)
		s := tel.Summary[0]
		assert.Equal(t, "NVIDIA H200", s.Name)
		assert.Equal(t, 2, s.Samples)
		assert.Equal(t, want.power, s.PowerWatts, "case %d", i)
		assert.Equal(t, want.sm, s.SMClockMHz, "case %d", i)
		assert.Equal(t, want.util, s.Utilization, "case %d", i)
		assert.Equal(t, gpu.Stat{Min: 3201, Median: 3201, Max: 3201}, s.MemClockMHz)
		assert.Equal(t, want.peak, s.PeakMemory)
		assert.Equal(t, uint64(141*gib), s.MemoryTotal)
		// Energy: the mean of the two powers over the span between them.
		assert.InDelta(t, want.power.Median*s.SpanSeconds, s.EnergyJoules, 1e-9)
		assert.GreaterOrEqual(t, tel.Samples[0].TMS, 0.0)
		assert.LessOrEqual(t, tel.Samples[0].TMS, tel.Samples[1].TMS)
		assert.Equal(t, want.first, tel.Samples[0].PowerWatts)
	}
}

// The table's summary line per GPU sits under the settings line.
func TestBenchTableTelemetry(t *testing.T) {
	needLibrary(t)
	withGPU(t, &gpu.Fake{Devices: []gpu.Device{{Name: "NVIDIA H200", MemoryTotal: 141 << 30, PowerWatts: 250,
		SMClockMHz: 1980, MemClockMHz: 3201, MemoryUsed: 20 << 30, Utilization: 99}}})
	var stdout bytes.Buffer
	require.NoError(t, run(context.Background(), append(append([]string{}, tinyBench...), "--telemetry-interval",
		"1h"), &stdout))
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	require.Len(t, lines, 5, stdout.String())
	assert.Contains(t, lines[3], "2 steps")
	// The energy depends on how long the run took: only its form is known.
	assert.True(t, strings.HasPrefix(lines[4], "gpu0 NVIDIA H200: power 250/250/250 W, SM 1980/1980/1980 MHz, "+
		"mem 3201/3201/3201 MHz, util 99/99/99%, memory peak 20.00 GiB of 141, "), lines[4])
	assert.True(t, strings.HasSuffix(lines[4], " J (2 samples, min/median/max)"), lines[4])
}

// --profile writes the CPU profile, a Chrome trace with a complete event
// per run and per step, and the --json document; it never replaces them
// without --force.
func TestBenchProfile(t *testing.T) {
	needLibrary(t)
	withGPU(t, nil)
	dir := filepath.Join(t.TempDir(), "prof")
	var stdout bytes.Buffer
	args := append(append([]string{}, tinyBench...), "--profile", dir, "--use-cache")
	require.NoError(t, run(context.Background(), args, &stdout))
	assert.Contains(t, stdout.String(), "median", "the table still goes to stdout")

	cpu, err := os.ReadFile(filepath.Join(dir, "cpu.pprof"))
	require.NoError(t, err)
	require.Greater(t, len(cpu), 2)
	assert.Equal(t, []byte{0x1f, 0x8b}, cpu[:2], "pprof files are gzipped protobuf")

	b, err := os.ReadFile(filepath.Join(dir, "trace.json"))
	require.NoError(t, err)
	var tr struct {
		TraceEvents []traceEvent   `json:"traceEvents"`
		OtherData   map[string]any `json:"otherData"`
	}
	require.NoError(t, json.Unmarshal(b, &tr))
	assert.Contains(t, tr.OtherData, "start_unix_ns")
	byName := map[string]traceEvent{}
	for _, e := range tr.TraceEvents {
		assert.Contains(t, []string{"X", "M", "C"}, e.Ph, e.Name)
		if e.Ph == "X" {
			require.NotNil(t, e.Dur, e.Name)
			assert.GreaterOrEqual(t, *e.Dur, 0.0, e.Name)
			assert.GreaterOrEqual(t, e.TS, 0.0, e.Name)
		}
		byName[e.Name] = e
	}
	for _, n := range []string{"run 1", "decode", "step 1", "step 2", "before decode"} {
		assert.Contains(t, byName, n)
	}
	run1, step1, step2 := byName["run 1"], byName["step 1"], byName["step 2"]
	assert.Equal(t, "run", run1.Cat)
	assert.Equal(t, 2.0, run1.Args["steps"])
	assert.Equal(t, true, step1.Args["full"], "step 1 of 2 is a warm-up (full) step")
	// The steps lie inside the run, one after the other.
	assert.LessOrEqual(t, run1.TS, step1.TS)
	assert.LessOrEqual(t, step1.TS+*step1.Dur, step2.TS+1e-3)
	assert.LessOrEqual(t, step2.TS+*step2.Dur, run1.TS+*run1.Dur+1e-3)

	b, err = os.ReadFile(filepath.Join(dir, "bench.json"))
	require.NoError(t, err)
	var rep benchReport
	require.NoError(t, json.Unmarshal(b, &rep))
	require.Len(t, rep.Cases, 1)
	assert.True(t, rep.Cases[0].Settings.UseCache)
	assert.Len(t, rep.Cases[0].Runs, 1)
	assert.NoFileExists(t, filepath.Join(dir, "bench.partial.json"), "removed once bench.json is written")

	// Again: refused before anything runs, then replaced with --force.
	err = run(context.Background(), args, &stdout)
	require.Error(t, err)
	assert.ErrorIs(t, err, os.ErrExist)
	require.NoError(t, run(context.Background(), append(args, "--force"), &stdout))
}

// The cases finished so far survive a run killed mid-way: the partial
// report is rewritten after each case.
func TestBenchPartialReport(t *testing.T) {
	dir := t.TempDir()
	p := &profileFiles{dir: dir}
	rep := &benchReport{Schema: "dimoo-bench/1"}
	for i := 1; i <= 2; i++ {
		rep.Cases = append(rep.Cases, &benchCase{Settings: benchSettings{Width: 16 * i}, Runs: []benchRun{{Run: 1}}})
		require.NoError(t, p.writePartial(rep))
		b, err := os.ReadFile(filepath.Join(dir, "bench.partial.json"))
		require.NoError(t, err)
		var got benchReport
		require.NoError(t, json.Unmarshal(b, &got))
		require.Len(t, got.Cases, i)
		assert.Equal(t, 16*i, got.Cases[i-1].Settings.Width)
	}
}

func TestBenchBadFlags(t *testing.T) {
	var stdout bytes.Buffer
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--steps", "2", "--timesteps", "2"}, "not both"},
		{[]string{"--steps", "0"}, "--steps 0"},
		{[]string{"--telemetry-interval", "-1s"}, "--telemetry-interval"},
		{[]string{"--telemetry-interval", "10us"}, "--telemetry-interval"},
		{[]string{"--warmup-steps", "-1"}, "--warmup-steps"},
		{[]string{"--force"}, "--force only applies with --profile"},
		{[]string{"--profile", "/proc/none/x"}, "--profile"},
		{[]string{"--task", "caption"}, "want t2i or understand"},
		{[]string{"--task", "understand", "--use-cache"}, "--use-cache is text-to-image's"},
		{[]string{"--task", "understand", "--timesteps", "4"}, "--timesteps is text-to-image's"},
		{[]string{"--gen_length", "16"}, "need --task understand"},
		{[]string{"--task", "understand", "--steps", "32", "--gen_length", "16"}, "more than --gen_length"},
	} {
		err := run(context.Background(), append([]string{"bench"}, tc.args...), &stdout)
		require.Error(t, err, "%v", tc.args)
		assert.True(t, errors.Is(err, errUsage), "%v: %v", tc.args, err)
		assert.Contains(t, err.Error(), tc.msg)
	}
	// An unreadable input image is named before the model loads.
	err := run(context.Background(), []string{"bench", "--task", "understand", "--image_path", "/none.png"}, &stdout)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "/none.png")
	stdout.Reset()
	require.NoError(t, run(context.Background(), []string{"bench", "--help"}, &stdout))
	assert.Contains(t, stdout.String(), "dimoo-bench/1")
	assert.Contains(t, stdout.String(), "nsys profile")
	assert.Contains(t, stdout.String(), "-telemetry-interval")
}
