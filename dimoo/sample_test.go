package dimoo

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The Go side of dimoo_sample_image refuses what the C struct cannot hold.
func TestSampleImageArguments(t *testing.T) {
	lib := testLibrary(t)
	rt, err := lib.NewRuntime(BackendCPU, 0, 1)
	require.NoError(t, err)
	defer rt.Close()
	row := make([]float32, 8)
	row[5] = 3
	a := imageSampleArgs{logits: [][]float32{row}, rows: [][]int32{nil}, weights: []float32{1}, rngPos: []int32{4},
		codebook: 8}
	codes, conf := make([]int32, 1), make([]float64, 1)
	require.NoError(t, rt.sampleImage(a, codes, conf))
	assert.Equal(t, int32(5), codes[0], "temperature 0 takes the argmax")

	five := a
	five.logits = [][]float32{row, row, row, row, row}
	five.rows = make([][]int32, 5)
	five.weights = []float32{1, 1, 1, 1, 1}
	assert.ErrorIs(t, rt.sampleImage(five, codes, conf), ErrInvalidArgument)
	assert.ErrorIs(t, rt.sampleImage(a, make([]int32, 2), conf), ErrInvalidArgument)
	bad := a
	bad.rows = [][]int32{{7}}
	err = rt.sampleImage(bad, codes, conf)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "outside its 1 rows")
}

// RowMax returns each output row's largest logit, as a scan of the row gives.
func TestForwardRowMax(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-f32"))
	s, err := m.NewSession(SessionOptions{MaxTokens: 20, Seqs: 1})
	require.NoError(t, err)
	defer s.Close()
	toks := []int32{1, 5, 9, 33, 2, 7, 7, 40, 3}
	outs, err := s.Forward(context.Background(), ForwardRequest{Tokens: toks, Logits: true, Positions: []int32{0, 4, 8},
		VocabBegin: 10, VocabEnd: 60, RowMax: true})
	require.NoError(t, err)
	l := outs[0]
	require.Len(t, l.Max, 3)
	for i := 0; i < l.Rows; i++ {
		want := l.Row(i)[0]
		for _, v := range l.Row(i) {
			want = max(want, v)
		}
		assert.Equal(t, want, l.Max[i], "row %d", i)
	}
}
