package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
)

func needLibrary(t *testing.T) {
	if _, err := dimoo.DefaultLibrary(); err != nil {
		if os.Getenv("DIMOO_REQUIRE_LIBRARY") != "" {
			t.Fatalf("libdimoo is required: %v", err)
		}
		t.Skipf("libdimoo not built: %v", err)
	}
}

var small = filepath.Join("..", "..", "testdata", "small-f32")

// `dimoo logits` writes exactly what the Go API computes, as a float32 .npy.
func TestLogitsCommand(t *testing.T) {
	needLibrary(t)
	out := filepath.Join(t.TempDir(), "l.npy")
	var stdout bytes.Buffer
	err := run(context.Background(), []string{"logits", "--model", small, "--tokens", "5,17,3",
		"--positions", "0,2", "--vocab-range", "10:42", "--out", out}, &stdout)
	require.NoError(t, err)
	assert.Contains(t, stdout.String(), "(2, 32)")
	data, shape, err := dimoo.ReadNpyFile(out)
	require.NoError(t, err)
	assert.Equal(t, []int{2, 32}, shape)

	m, err := dimoo.LoadModel(context.Background(), small, dimoo.LoadOptions{})
	require.NoError(t, err)
	defer m.Close()
	want, err := m.Logits(context.Background(), []int32{5, 17, 3}, []int32{0, 2}, 10, 42)
	require.NoError(t, err)
	for i := range want.Data {
		assert.Equal(t, float64(want.Data[i]), data[i])
	}
}

func TestInfoCommand(t *testing.T) {
	needLibrary(t)
	var stdout bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"info", "--model", small, "--load"}, &stdout))
	s := stdout.String()
	assert.Contains(t, s, "layers:     2, d_model 256")
	assert.Contains(t, s, "parameters: 2131200")
	assert.Contains(t, s, "dtypes:     F32 x21")
	assert.Contains(t, s, "loaded:")
}

func TestCommandErrors(t *testing.T) {
	var stdout bytes.Buffer
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{nil, "no command"},
		{[]string{"frobnicate"}, "unknown command"},
		{[]string{"logits", "--model", small}, "required"},
		{[]string{"logits", "--model", small, "--tokens", "1,x", "--out", "o.npy"}, "not an integer"},
		{[]string{"logits", "--model", small, "--tokens", "1", "--vocab-range", "9:3", "--out", "o.npy"}, "vocab-range"},
		{[]string{"info"}, "--model is required"},
		{[]string{"info", "--model", small, "--bogus"}, "bogus"},
	} {
		err := run(context.Background(), tc.args, &stdout)
		require.Error(t, err, "%v", tc.args)
		assert.ErrorIs(t, err, errUsage)
		assert.Contains(t, err.Error(), tc.msg)
	}
	needLibrary(t)
	err := run(context.Background(), []string{"logits", "--model", small, "--tokens", "1,1000", "--out",
		filepath.Join(t.TempDir(), "o.npy")}, &stdout)
	assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)
	err = run(context.Background(), []string{"info", "--model", t.TempDir()}, &stdout)
	assert.ErrorIs(t, err, dimoo.ErrBadCheckpoint)
}
