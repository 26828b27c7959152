package dimoo

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type goldenT2I struct {
	UseCache        bool    `json:"use_cache"`
	CacheRatio      float64 `json:"cache_ratio"`
	WarmupRatio     float64 `json:"warmup_ratio"`
	RefreshInterval int     `json:"refresh_interval"`
	Timesteps       int     `json:"timesteps"`
	CFGScale        float64 `json:"cfg_scale"`
	Temperature     float64 `json:"temperature"`
	Grid            []int   `json:"grid"`
	CondSequence    []int32 `json:"cond_sequence"`
	UncondPrompt    []int32 `json:"uncond_prompt"`
	CodeStart       int     `json:"code_start"`
	FinalCodes      []int32 `json:"final_codes"`
	Calls           []struct {
		Input     []int32 `json:"input"`
		Cat       string  `json:"cat"`
		ToCompute []int32 `json:"to_compute"`
	} `json:"calls"`
}

// loadT2IGolden loads the official small checkpoint, its special tokens and
// the official image sampler's traces at temperature 0.
func loadT2IGolden(t *testing.T) (*Model, SpecialTokens, []goldenT2I) {
	t.Helper()
	dir := testdataDir("official-small")
	m := loadTestModel(t, filepath.Join(dir, "checkpoint"))
	special, err := LoadSpecialTokens(dir)
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(dir, "t2i_temperature0.json"))
	require.NoError(t, err)
	var runs []goldenT2I
	require.NoError(t, json.Unmarshal(b, &runs))
	return m, special, runs
}

// The official image sampler's traces (temperature 0, CFG, with and without
// ML-Cache): dimoo feeds the model the same sequence at every call,
// recomputes the same positions on cached steps, and ends with the same codes.
func TestImageSamplerMatchesOfficialTrace(t *testing.T) {
	m, special, runs := loadT2IGolden(t)
	require.Len(t, runs, 2)
	for _, run := range []struct {
		g    goldenT2I
		keep int
	}{{runs[0], 0}, {runs[1], 0}, {runs[0], int(special.Codebook)}, {runs[1], int(special.Codebook)}} {
		g := run.g
		// keep > 0: the logits stay in the library (dimoo_image_step).
		t.Run(fmt.Sprintf("cache=%v/kept=%v", g.UseCache, run.keep > 0), func(t *testing.T) {
			s, err := m.NewSession(SessionOptions{MaxTokens: len(g.CondSequence), Seqs: 2, KVCache: true,
				KeepCols: run.keep})
			require.NoError(t, err)
			defer s.Close()
			sc := float32(g.CFGScale)
			d := &imageDecode{
				prefixes: [][]int32{g.CondSequence[:g.CodeStart-2], g.UncondPrompt},
				answer:   g.CondSequence[g.CodeStart-2:],
				weights:  []float32{1 + sc, -sc},
				special:  special,
				codebook: int(special.Codebook),
			}
			var calls []TraceCall
			o := ImageSampling{Steps: g.Timesteps, Temperature: g.Temperature, UseCache: g.UseCache,
				CacheRatio: g.CacheRatio, WarmupRatio: g.WarmupRatio, RefreshInterval: g.RefreshInterval}
			out, err := d.run(context.Background(), s, o, imageHooks{trace: func(c TraceCall) { calls = append(calls, c) }})
			require.NoError(t, err)
			require.Len(t, calls, len(g.Calls))
			for i, want := range g.Calls {
				got := calls[i]
				assert.Equal(t, map[string]int{"cond": 0, "uncond": 1}[want.Cat], got.Branch, "call %d", i)
				require.Equal(t, want.Input, got.Input, "call %d (%s): input", i, want.Cat)
				requireSameSelection(t, want.ToCompute, got.ToCompute, len(got.Input), 1-g.CacheRatio,
					"call %d (%s): to_compute", i, want.Cat)
			}
			var codes []int32
			for _, v := range out[2 : len(out)-2] {
				if v != special.Newline {
					codes = append(codes, v)
				}
			}
			assert.Equal(t, g.FinalCodes, codes)
		})
	}
}

// requireSameSelection compares ML-Cache selections. The official goldens
// were computed in float64 and compare each float64 max logit with a
// threshold that torch.quantile computed in float32; when the quantile's rank
// is a whole number the threshold is one of the values, rounded to float32,
// and whether that one position counts then depends on the rounding
// direction of a value dimoo (computing in float32, like the real bf16
// model, where the value and threshold are equal) cannot know. Only that one
// position may differ, and only then.
func requireSameSelection(t *testing.T, want, got []int32, n int, q float64, msgAndArgs ...any) {
	t.Helper()
	if assert.ObjectsAreEqual(want, got) {
		return
	}
	rank := q * float64(n-1)
	require.True(t, rank == math.Trunc(rank) && len(got) == len(want)+1, msgAndArgs...)
	extra := 0
	for _, p := range got {
		found := false
		for _, w := range want {
			found = found || w == p
		}
		if !found {
			extra++
		}
	}
	require.Equal(t, 1, extra, msgAndArgs...)
}

func TestKeepMaskedSchedule(t *testing.T) {
	// floor(24 cos(pi/2 (t+1)/10)), at least 1, 0 on the last step.
	want := []int{23, 22, 21, 19, 16, 14, 10, 7, 3, 0}
	for s, w := range want {
		assert.Equal(t, w, keepMasked(24, s, 10), "step %d", s)
	}
	assert.Equal(t, 1, keepMasked(2, 8, 10))
}

func TestQuantileMatchesLinearInterpolation(t *testing.T) {
	v := []float32{5, 1, 4, 2, 3}
	assert.Equal(t, float32(1), quantileF32(v, 0))
	assert.Equal(t, float32(5), quantileF32(v, 1))
	assert.Equal(t, float32(3), quantileF32(v, 0.5))
	assert.InDelta(t, 1.4, quantileF32(v, 0.1), 1e-6)
	assert.InDelta(t, 4.6, quantileF32(v, 0.9), 1e-6)
}

func TestGumbelIsDeterministicAndStandard(t *testing.T) {
	assert.Equal(t, gumbel(7, 1, 2, purposeImageSample, 3), gumbel(7, 1, 2, purposeImageSample, 3))
	assert.NotEqual(t, gumbel(7, 1, 2, purposeImageSample, 3), gumbel(8, 1, 2, purposeImageSample, 3))
	// Mean of Gumbel(0,1) is the Euler-Mascheroni constant, variance pi^2/6.
	const n = 200000
	var sum, sq float64
	for i := 0; i < n; i++ {
		g := gumbel(42, i/1000, i%1000, purposeImageRemask, 0)
		sum += g
		sq += g * g
	}
	mean := sum / n
	assert.InDelta(t, 0.5772, mean, 0.01)
	assert.InDelta(t, math.Pi*math.Pi/6, sq/n-mean*mean, 0.03)
}

// ML-Cache that refreshes at every step is the plain sampler: same tokens.
func TestCacheRefreshingEveryStepEqualsNoCache(t *testing.T) {
	m, special, runs := loadT2IGolden(t)
	g := runs[0]
	s, err := m.NewSession(SessionOptions{MaxTokens: len(g.CondSequence), Seqs: 2, KVCache: true})
	require.NoError(t, err)
	defer s.Close()
	p := ImageTokens{Prefixes: [][]int32{g.CondSequence[:g.CodeStart-2], g.UncondPrompt},
		Answer: g.CondSequence[g.CodeStart-2:], Weights: []float32{3, -2}, Special: special}
	for seed := uint64(0); seed < 4; seed++ {
		o := ImageSampling{Steps: 12, Temperature: 1, Seed: seed}
		plain, err := s.DecodeImage(context.Background(), p, o, nil, nil)
		require.NoError(t, err)
		o.UseCache, o.CacheRatio, o.WarmupRatio, o.RefreshInterval = true, 0.9, 0.3, 1
		cached, err := s.DecodeImage(context.Background(), p, o, nil, nil)
		require.NoError(t, err)
		assert.Equal(t, plain, cached, "seed %d", seed)
	}
}

// sortedQuantileF32 is the plain statement quantileInto must equal (tests).
func sortedQuantileF32(v []float32, q float64) float32 {
	s := append([]float32(nil), v...)
	slices.Sort(s)
	rank := float32(q) * float32(len(s)-1)
	lo := int(rank)
	hi := lo + 1
	if hi >= len(s) {
		hi = len(s) - 1
	}
	w := rank - float32(lo)
	a, b := s[lo], s[hi]
	if w < 0.5 {
		return a + w*(b-a)
	}
	return b - (b-a)*(1-w)
}

// The selection-based quantile equals the sort-based statement, duplicates
// and all (ML-Cache's threshold must not move).
func TestQuantileSelectEqualsSort(t *testing.T) {
	rng := rand.New(rand.NewSource(3))
	var scratch []float32
	for trial := 0; trial < 2000; trial++ {
		n := 1 + rng.Intn(400)
		v := make([]float32, n)
		levels := 1 + rng.Intn(50) // few distinct values: many ties
		for i := range v {
			if trial%2 == 0 {
				v[i] = float32(rng.Intn(levels))
			} else {
				v[i] = float32(rng.NormFloat64())
			}
		}
		q := rng.Float64()
		if trial%7 == 0 {
			q = []float64{0, 1, 0.1, 0.5}[trial%4]
		}
		want := sortedQuantileF32(v, q)
		require.Equal(t, want, quantileInto(v, q, &scratch), "n=%d q=%g", n, q)
	}
}

// Kept logits and dimoo_image_step make the decisions the host path makes
// (host logits through dimoo_sample_image and Go's ML-Cache bookkeeping):
// the same answers for one to three branches, with and without ML-Cache, at
// temperature 0 and 1, over several seeds.
func TestKeptImageStepsEqualHostSteps(t *testing.T) {
	m, special, runs := loadT2IGolden(t)
	g := runs[0]
	cond, answer := g.CondSequence[:g.CodeStart-2], g.CondSequence[g.CodeStart-2:]
	T := len(g.CondSequence)
	open := func(keep int) *Session {
		s, err := m.NewSession(SessionOptions{MaxTokens: T, Seqs: 3, KVCache: true, KeepCols: keep})
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		return s
	}
	host, kept := open(0), open(int(special.Codebook))
	branches := []struct {
		prefixes [][]int32
		weights  []float32
	}{
		{[][]int32{cond}, []float32{1}},
		{[][]int32{cond, g.UncondPrompt}, []float32{3, -2}},
		// Three branches with prefixes of three lengths (offsets differ).
		{[][]int32{cond, g.UncondPrompt, cond[:len(cond)-3]}, []float32{2.5, -1, -0.5}},
	}
	kc, hc := 0, 0
	for bi, br := range branches {
		for _, cache := range []bool{false, true} {
			for _, tau := range []float64{0, 1} {
				for seed := uint64(0); seed < 2; seed++ {
					p := ImageTokens{Prefixes: br.prefixes, Answer: answer, Weights: br.weights, Special: special}
					o := ImageSampling{Steps: 10, Temperature: tau, Seed: seed, UseCache: cache, CacheRatio: 0.7,
						WarmupRatio: 0.2, RefreshInterval: 3}
					want, err := host.DecodeImage(context.Background(), p, o, nil, nil)
					require.NoError(t, err)
					got, err := kept.DecodeImage(context.Background(), p, o, nil, nil)
					require.NoError(t, err)
					require.Equal(t, want, got, "branches %d, cache %v, temperature %g, seed %d", bi+1, cache, tau, seed)
				}
			}
		}
	}
	// The kept session really took the library's step path.
	kc, _ = kept.SampleStats()
	hc, _ = host.SampleStats()
	assert.Positive(t, kc)
	assert.Positive(t, hc)
}
