package dimoo

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// samplerTrace is what scripts/sampler_reference.py replays.
type samplerTrace struct {
	Kind        string    `json:"kind"`
	Temperature float64   `json:"temperature"`
	Seed        uint64    `json:"seed"`
	Weights     []float32 `json:"weights,omitempty"`
	Codebook    int       `json:"codebook,omitempty"`
	CFGScale    float64   `json:"cfg_scale"`
	Steps       any       `json:"steps"`
}

// With noise (temperature 1), an independent PyTorch statement of each
// sampler, fed the noise dimoo drew, makes the same decisions at every step.
// testdata/sampler/decisions.json holds the PyTorch decisions; regenerate
// with scripts/gen_sampler_golden.sh after changing a sampler.
func TestSamplerReplay(t *testing.T) {
	dir := testdataDir("official-small")
	m := loadTestModel(t, filepath.Join(dir, "checkpoint"))
	special, err := LoadSpecialTokens(dir)
	require.NoError(t, err)
	var runs []goldenT2I
	b, err := os.ReadFile(filepath.Join(dir, "t2i_temperature0.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &runs))
	g := runs[0]
	traces := map[string]samplerTrace{}
	imageSteps := map[string][]StepTrace{}
	for _, cache := range []bool{false, true} {
		name := map[bool]string{false: "image", true: "image-cache"}[cache]
		s, err := m.NewSession(SessionOptions{MaxTokens: len(g.CondSequence), Seqs: 2, KVCache: true})
		require.NoError(t, err)
		w := []float32{3, -2}
		d := &imageDecode{prefixes: [][]int32{g.CondSequence[:g.CodeStart-2], g.UncondPrompt},
			answer: g.CondSequence[g.CodeStart-2:], weights: w, special: special, codebook: int(special.Codebook)}
		o := ImageSampling{Steps: 10, Temperature: 1, Seed: 7, UseCache: cache, CacheRatio: 0.5, WarmupRatio: 0.25,
			RefreshInterval: 2}
		_, err = d.run(context.Background(), s, o, imageHooks{step: func(st StepTrace) {
			imageSteps[name] = append(imageSteps[name], st)
		}})
		s.Close()
		require.NoError(t, err)
		traces[name] = samplerTrace{Kind: "image", Temperature: 1, Seed: 7, Weights: w, Codebook: int(special.Codebook),
			Steps: imageSteps[name]}
	}

	var tg struct {
		Sequence  []int32 `json:"sequence"`
		CodeStart int     `json:"code_start"`
	}
	b, err = os.ReadFile(filepath.Join(dir, "text_temperature0.json"))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, &tg))
	textSteps := map[string][]TextStepTrace{}
	for _, cfg := range []float64{0, 1.5} {
		name := map[bool]string{false: "text", true: "text-cfg"}[cfg > 0]
		s, err := m.NewSession(SessionOptions{MaxTokens: len(tg.Sequence), Seqs: 2})
		require.NoError(t, err)
		d := &textDecode{seq: tg.Sequence, genStart: tg.CodeStart, special: special}
		o := TextSampling{Steps: 8, GenLength: 16, BlockLength: 8, Temperature: 1, CFGScale: cfg, Seed: 11}
		_, err = d.runTraced(context.Background(), s, o, imageHooks{}, func(st TextStepTrace) {
			textSteps[name] = append(textSteps[name], st)
		})
		s.Close()
		require.NoError(t, err)
		traces[name] = samplerTrace{Kind: "text", Temperature: 1, Seed: 11, CFGScale: cfg, Steps: textSteps[name]}
	}

	golden := testdataDir("sampler")
	if os.Getenv("DIMOO_WRITE_SAMPLER_TRACE") != "" {
		b, err := json.Marshal(traces)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(golden, "trace.json"), b, 0o644))
		t.Log("wrote", filepath.Join(golden, "trace.json"))
	}
	b, err = os.ReadFile(filepath.Join(golden, "decisions.json"))
	require.NoError(t, err, "run scripts/gen_sampler_golden.sh")
	var want map[string][]struct {
		Step        int     `json:"step"`
		Sampled     []int32 `json:"sampled"`
		Remasked    []int   `json:"remasked"`
		Chosen      []int32 `json:"chosen"`
		Transferred []int32 `json:"transferred"`
	}
	require.NoError(t, json.Unmarshal(b, &want))
	for name, steps := range imageSteps {
		require.Len(t, want[name], len(steps), name)
		for i, st := range steps {
			assert.Equal(t, want[name][i].Sampled, st.Sampled, "%s step %d: sampled codes", name, i)
			assert.Equal(t, want[name][i].Remasked, st.Remasked, "%s step %d: kept masked", name, i)
		}
	}
	for name, steps := range textSteps {
		require.Len(t, want[name], len(steps), name)
		for i, st := range steps {
			assert.Equal(t, want[name][i].Chosen, st.Chosen, "%s step %d: tokens", name, i)
			assert.Equal(t, want[name][i].Transferred, st.Transferred, "%s step %d: unmasked", name, i)
		}
	}
}

// The decode loop asks the library only for the positions it unmasks
// (n_select) unless a step hook wants every draw; both must decode the same
// image, step for step (the replay above checks the full draw). A 20x20
// grid in 6 steps unmasks up to ~100 positions a step, so the library's
// selection runs several rounds.
func TestImageSelectMatchesFullDraw(t *testing.T) {
	dir := testdataDir("official-small")
	m := loadTestModel(t, filepath.Join(dir, "checkpoint"))
	sp, err := LoadSpecialTokens(dir)
	require.NoError(t, err)
	answer := []int32{sp.BOA, sp.BOI}
	for r := 0; r < 20; r++ {
		for c := 0; c < 20; c++ {
			answer = append(answer, sp.Mask)
		}
		answer = append(answer, sp.Newline)
	}
	answer = append(answer, sp.EOI, sp.EOA)
	cond, uncond := []int32{1, 2, 3, 4, 5, 6, 7, 8, 9}, []int32{1, 2, sp.Uncondition, 9}
	for _, cache := range []bool{false, true} {
		for _, tau := range []float64{1, 0.4, 0} {
			o := ImageSampling{Steps: 6, Temperature: tau, Seed: 5, UseCache: cache, CacheRatio: 0.5,
				WarmupRatio: 0.25, RefreshInterval: 2}
			decode := func(full bool) ([]int32, []TraceCall) {
				s, err := m.NewSession(SessionOptions{MaxTokens: len(cond) + len(answer), Seqs: 2, KVCache: true})
				require.NoError(t, err)
				defer s.Close()
				d := &imageDecode{prefixes: [][]int32{cond, uncond}, answer: answer, weights: []float32{3, -2},
					special: sp, codebook: int(sp.Codebook)}
				var calls []TraceCall
				h := imageHooks{trace: func(c TraceCall) { calls = append(calls, c) }}
				if full {
					h.step = func(StepTrace) {}
				}
				out, err := d.run(context.Background(), s, o, h)
				require.NoError(t, err)
				return out, calls
			}
			want, wantCalls := decode(true)
			got, gotCalls := decode(false)
			assert.Equal(t, want, got, "cache=%v temperature=%g", cache, tau)
			assert.Equal(t, wantCalls, gotCalls, "every forward's input, cache=%v temperature=%g", cache, tau)
		}
	}
}
