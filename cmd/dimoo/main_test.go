package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
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
	// The library's estimate, before loading, is what loading then takes,
	// at each precision (bf16 holds this fp32 checkpoint in half the bytes).
	held := map[string]string{}
	for _, prec := range []string{"auto", "bf16", "fp32"} {
		stdout.Reset()
		require.NoError(t, run(context.Background(), []string{"info", "--model", small, "--load", "--precision", prec},
			&stdout))
		s := stdout.String()
		assert.Contains(t, s, "layers:     2, d_model 256")
		assert.Contains(t, s, "parameters: 2131200")
		assert.Contains(t, s, "dtypes:     F32 x21")
		assert.Contains(t, s, "loaded:")
		assert.Contains(t, s, "(precision "+prec+")")
		var est, loaded string
		for _, line := range strings.Split(s, "\n") {
			if f := strings.Fields(line); len(f) > 4 && f[0] == "cpu" && f[1] == "holds" {
				est = f[2] + " " + f[3]
			} else if len(f) > 3 && f[0] == "loaded:" {
				loaded = f[1] + " " + f[2]
			}
		}
		assert.NotEmpty(t, est, s)
		assert.Equal(t, loaded, est, s)
		assert.Contains(t, s, "a session of 2 x")
		held[prec] = loaded
	}
	assert.Equal(t, held["auto"], held["fp32"])
	assert.Equal(t, "8.1 MiB", held["auto"])
	assert.Equal(t, "4.1 MiB", held["bf16"])
}

func TestCommandErrors(t *testing.T) {
	var stdout bytes.Buffer
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{nil, "no command"},
		{[]string{"frobnicate"}, "unknown command"},
		{[]string{"logits", "--model", small}, "--tokens and --out are required"},
		{[]string{"logits", "--model", small, "--tokens", "1,x", "--out", "o.npy"}, "not an integer"},
		{[]string{"logits", "--model", small, "--tokens", "1", "--vocab-range", "9:3", "--out", "o.npy"}, "vocab-range"},
		{[]string{"info", "--bogus"}, "bogus"},
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
	err = run(context.Background(), []string{"info", "--model", small, "--precision", "fp8"}, &stdout)
	assert.ErrorIs(t, err, dimoo.ErrInvalidArgument)
	assert.ErrorContains(t, err, "precision")
}

// `dimoo bench` prints a row per timed run and the median, with the
// outside-forward share consistent with its own columns.
func TestBenchCommand(t *testing.T) {
	needLibrary(t)
	var stdout bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"bench", "--runs", "2", "--warmup", "0", "--timesteps", "4",
		"--use-cache"}, &stdout))
	lines := strings.Split(strings.TrimSpace(stdout.String()), "\n")
	require.Len(t, lines, 5, stdout.String())
	assert.Contains(t, lines[0], "outside/forward")
	for i, name := range []string{"1", "2", "median"} {
		f := strings.Fields(lines[i+1])
		require.Len(t, f, 7, lines[i+1])
		assert.Equal(t, name, f[0])
		assert.Equal(t, "4", f[2], "steps")
		fwd, err := strconv.ParseFloat(f[3], 64)
		require.NoError(t, err)
		out, err := strconv.ParseFloat(f[4], 64)
		require.NoError(t, err)
		pct, err := strconv.ParseFloat(strings.TrimSuffix(f[6], "%"), 64)
		require.NoError(t, err)
		assert.Positive(t, fwd)
		assert.InDelta(t, 100*out/1000/fwd, pct, 0.02*pct+0.05, "share = outside / forward")
	}
	assert.Contains(t, lines[4], "4 steps")
	assert.Contains(t, lines[4], "ML-Cache true")
}
