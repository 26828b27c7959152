package gpu

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// On a machine without a driver Open is a clean ErrNoGPU; with one, every
// device answers with a name and memory.
func TestOpen(t *testing.T) {
	p, err := Open()
	if err != nil {
		require.ErrorIs(t, err, ErrNoGPU)
		t.Logf("no GPU: %v", err)
		return
	}
	defer p.Close()
	n, err := p.Count()
	require.NoError(t, err)
	require.Positive(t, n)
	for i := 0; i < n; i++ {
		d, err := p.Device(i)
		require.NoError(t, err)
		assert.Equal(t, i, d.Index)
		assert.NotEmpty(t, d.Name)
		assert.Positive(t, d.MemoryTotal)
		t.Logf("%+v", d)
	}
	_, err = p.Device(n)
	assert.Error(t, err)
}

func TestFake(t *testing.T) {
	f := &Fake{Devices: []Device{{Name: "NVIDIA H200", MemoryTotal: 141 << 30}, {Name: "NVIDIA H200"}}}
	n, err := f.Count()
	require.NoError(t, err)
	assert.Equal(t, 2, n)
	d, err := f.Device(1)
	require.NoError(t, err)
	assert.Equal(t, 1, d.Index)
	_, err = f.Device(2)
	assert.Error(t, err)
	f.Err = errors.New("boom")
	_, err = f.Count()
	assert.Error(t, err)
}

func TestParseDevices(t *testing.T) {
	for _, c := range []struct {
		in   string
		n    int
		want []int
	}{{"cpu", 4, nil}, {"", 4, nil}, {"all", 2, []int{0, 1}}, {"all", 0, []int{}}, {"1,0", 2, []int{1, 0}},
		{"cuda:1", 2, []int{1}}} {
		got, err := ParseDevices(c.in, c.n)
		require.NoError(t, err, c.in)
		if c.want == nil {
			assert.Empty(t, got, c.in)
		} else {
			assert.Equal(t, c.want, got, c.in)
		}
	}
	for _, in := range []string{"2", "x", "0,0", "-1"} {
		_, err := ParseDevices(in, 2)
		assert.Error(t, err, in)
	}
}
