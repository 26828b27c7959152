package dimoo

import (
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
