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
	s, err := m.NewSession(SessionOptions{MaxTokens: len(g.Sequence)})
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
		require.Equal(t, g.Calls[i].Input, calls[i].Input, "call %d", i)
	}
	assert.Equal(t, g.Final, out)
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
