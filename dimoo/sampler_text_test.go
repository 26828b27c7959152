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

// The official text sampler's trace (temperature 0, no CFG): the same input
// at every call and the same final sequence.
func TestTextSamplerMatchesOfficialTrace(t *testing.T) {
	dir := testdataDir("official-small")
	m := loadTestModel(t, filepath.Join(dir, "checkpoint"))
	special, err := LoadSpecialTokens(dir)
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(dir, "text_temperature0.json"))
	require.NoError(t, err)
	var g struct {
		Sequence    []int32 `json:"sequence"`
		CodeStart   int     `json:"code_start"`
		Steps       int     `json:"steps"`
		GenLength   int     `json:"gen_length"`
		BlockLength int     `json:"block_length"`
		Temperature float64 `json:"temperature"`
		Calls       []struct {
			Input []int32 `json:"input"`
		} `json:"calls"`
		Final []int32 `json:"final"`
	}
	require.NoError(t, json.Unmarshal(b, &g))
	// Host logits sampled in Go, and kept logits sampled by dimoo_text_step.
	for _, keep := range []int{0, m.Config.EmbeddingRows()} {
		s, err := m.NewSession(SessionOptions{MaxTokens: len(g.Sequence), KeepRows: g.BlockLength, KeepCols: keep})
		require.NoError(t, err)
		defer s.Close()
		d := &textDecode{seq: g.Sequence, genStart: g.CodeStart, special: special}
		var calls []TraceCall
		out, err := d.run(context.Background(), s, TextSampling{Steps: g.Steps, GenLength: g.GenLength,
			BlockLength: g.BlockLength, Temperature: g.Temperature},
			imageHooks{trace: func(c TraceCall) { calls = append(calls, c) }})
		require.NoError(t, err)
		require.Len(t, calls, len(g.Calls))
		for i := range g.Calls {
			require.Equal(t, g.Calls[i].Input, calls[i].Input, "kept %v, call %d", keep > 0, i)
		}
		assert.Equal(t, g.Final, out, "kept %v", keep > 0)
		n, _ := s.SampleStats()
		assert.Equal(t, keep > 0, n > 0, "library text steps")
	}
}

// dimoo_text_step over kept logits makes the Go sampler's decisions over
// host logits: with and without guidance and a token mask, at temperature 0
// and 1, over seeds.
func TestKeptTextStepsEqualHostSteps(t *testing.T) {
	dir := testdataDir("official-small")
	m := loadTestModel(t, filepath.Join(dir, "checkpoint"))
	special, err := LoadSpecialTokens(dir)
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(dir, "text_temperature0.json"))
	require.NoError(t, err)
	var g struct {
		Sequence  []int32 `json:"sequence"`
		CodeStart int     `json:"code_start"`
		GenLength int     `json:"gen_length"`
	}
	require.NoError(t, json.Unmarshal(b, &g))
	V := m.Config.EmbeddingRows()
	// A mask that allows every third token (and the mask's own id range).
	allowed := make([]bool, V-5)
	for v := range allowed {
		allowed[v] = v%3 != 1
	}
	const block = 8
	open := func(keep int) *Session {
		s, err := m.NewSession(SessionOptions{MaxTokens: len(g.Sequence), Seqs: 2, KeepRows: block, KeepCols: keep})
		require.NoError(t, err)
		t.Cleanup(func() { s.Close() })
		return s
	}
	host, kept := open(0), open(V)
	for _, cfg := range []float64{0, 2.5} {
		for _, tau := range []float64{0, 1} {
			for _, mask := range [][]bool{nil, allowed} {
				for seed := uint64(0); seed < 3; seed++ {
					o := TextSampling{Steps: g.GenLength / 2, GenLength: g.GenLength, BlockLength: block,
						Temperature: tau, CFGScale: cfg, Seed: seed}
					run := func(s *Session) []int32 {
						d := &textDecode{seq: g.Sequence, genStart: g.CodeStart, special: special, allowed: mask}
						out, err := d.run(context.Background(), s, o, imageHooks{})
						require.NoError(t, err)
						return out
					}
					assert.Equal(t, run(host), run(kept), "cfg %g, temperature %g, mask %v, seed %d", cfg, tau,
						mask != nil, seed)
				}
			}
		}
	}
	n, _ := kept.SampleStats()
	assert.Positive(t, n)
}

func TestTransferCounts(t *testing.T) {
	assert.Equal(t, []int{3, 3, 2, 2}, transferCounts(10, 4))
	assert.Equal(t, []int{1, 0, 0}, transferCounts(1, 3))
}

func TestTextSamplingValidation(t *testing.T) {
	for _, o := range []TextSampling{
		{Steps: 8, GenLength: 16, BlockLength: 5},
		{Steps: 3, GenLength: 16, BlockLength: 8},
		{Steps: 0, GenLength: 16, BlockLength: 8},
		{Steps: 8, GenLength: 16, BlockLength: 8, Temperature: -1},
	} {
		assert.ErrorIs(t, o.validate(), ErrInvalidArgument, "%+v", o)
	}
}
