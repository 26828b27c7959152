package dimoo

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// copyCheckpoint copies a testdata checkpoint folder into a temp dir, so a
// test can damage it.
func copyCheckpoint(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	require.NoError(t, err)
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644))
	}
	return dst
}

func editJSON(t *testing.T, path string, edit func(map[string]any)) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var v map[string]any
	require.NoError(t, json.Unmarshal(b, &v))
	edit(v)
	b, err = json.Marshal(v)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))
}

const shard1 = "model-00001-of-00002.safetensors"

// Every kind of broken checkpoint gives an ErrBadCheckpoint error naming
// the problem, from both Inspect and LoadModel, and nothing crashes.
func TestBadCheckpoints(t *testing.T) {
	lib := testLibrary(t)
	src := testdataDir("small-f32")
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, dir string)
		msg    string
	}{
		{"truncated shard", func(t *testing.T, dir string) {
			p := filepath.Join(dir, shard1)
			fi, err := os.Stat(p)
			require.NoError(t, err)
			require.NoError(t, os.Truncate(p, fi.Size()/2))
		}, shard1},
		{"header length larger than the file", func(t *testing.T, dir string) {
			p := filepath.Join(dir, shard1)
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			require.NoError(t, err)
			defer f.Close()
			var hdr [8]byte
			binary.LittleEndian.PutUint64(hdr[:], 1<<40)
			_, err = f.WriteAt(hdr[:], 0)
			require.NoError(t, err)
		}, shard1},
		{"malformed config JSON", func(t *testing.T, dir string) {
			require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"d_model": 256,`), 0o644))
		}, "config.json"},
		{"missing config field", func(t *testing.T, dir string) {
			editJSON(t, filepath.Join(dir, "config.json"), func(v map[string]any) { delete(v, "n_heads") })
		}, "n_heads"},
		{"missing tensor", func(t *testing.T, dir string) {
			// The config promises a third layer the shards do not have.
			editJSON(t, filepath.Join(dir, "config.json"), func(v map[string]any) { v["n_layers"] = 3 })
		}, "blocks.2"},
		{"wrong shape", func(t *testing.T, dir string) {
			editJSON(t, filepath.Join(dir, "config.json"), func(v map[string]any) { v["mlp_hidden_size"] = 700 })
		}, "shape"},
		{"index names a missing shard", func(t *testing.T, dir string) {
			require.NoError(t, os.Remove(filepath.Join(dir, shard1)))
		}, shard1},
		{"index disagrees with the shards", func(t *testing.T, dir string) {
			editJSON(t, filepath.Join(dir, "model.safetensors.index.json"), func(v map[string]any) {
				wm := v["weight_map"].(map[string]any)
				wm["model.transformer.not_there.weight"] = shard1
			})
		}, "not_there"},
		{"no weights at all", func(t *testing.T, dir string) {
			require.NoError(t, os.Remove(filepath.Join(dir, "model.safetensors.index.json")))
		}, "model.safetensors"},
		{"missing config", func(t *testing.T, dir string) {
			require.NoError(t, os.Remove(filepath.Join(dir, "config.json")))
		}, "config.json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyCheckpoint(t, src)
			tc.damage(t, dir)
			_, err := Inspect(dir)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrBadCheckpoint)
			assert.Contains(t, err.Error(), tc.msg)
			m, err := LoadModel(context.Background(), dir, LoadOptions{Library: lib})
			require.Error(t, err)
			assert.Nil(t, m)
			assert.ErrorIs(t, err, ErrBadCheckpoint)
		})
	}
}

func TestInspect(t *testing.T) {
	info, err := Inspect(testdataDir("small-bf16"))
	require.NoError(t, err)
	assert.Equal(t, 2, info.Shards)
	assert.Equal(t, map[string]int{"BF16": 3 + 9*2}, info.DTypes)
	assert.Empty(t, info.Extra)
	assert.Equal(t, info.Config.ParamCount()*2, info.WeightBytes)
}

func TestLoadModelFreesEverything(t *testing.T) {
	lib := testLibrary(t)
	m, err := LoadModel(context.Background(), testdataDir("small-gqa-f16"), LoadOptions{Library: lib})
	require.NoError(t, err)
	// fp16 as stored, except the norm vectors, which the CPU backend keeps in fp32.
	norms := int64(2*m.Config.NLayers+1) * int64(m.Config.DModel)
	assert.Equal(t, m.Config.ParamCount()*2+norms*2, m.WeightBytes())
	require.NoError(t, m.Close())
	require.NoError(t, m.Close()) // idempotent
	assert.Equal(t, int64(0), m.WeightBytes())
	_, err = m.NewSession(SessionOptions{MaxTokens: 4})
	assert.Error(t, err)
}

func TestLoadModelCancelled(t *testing.T) {
	lib := testLibrary(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := LoadModel(ctx, testdataDir("small-f32"), LoadOptions{Library: lib})
	assert.ErrorIs(t, err, ErrCancelled)
}

// Host memory too short for the weights (DIMOO_HOST_AVAILABLE_MB stands in
// for MemAvailable): LoadModel fails with ErrOutOfMemory and the numbers,
// before any tensor is copied.
func TestLoadModelRefusedWhenMemoryIsShort(t *testing.T) {
	lib := testLibrary(t)
	t.Setenv("DIMOO_HOST_AVAILABLE_MB", "1")
	m, err := LoadModel(context.Background(), testdataDir("small-f32"), LoadOptions{Library: lib})
	require.Error(t, err)
	assert.Nil(t, m)
	assert.ErrorIs(t, err, ErrOutOfMemory)
	assert.Contains(t, err.Error(), "the model's weights")
	assert.Contains(t, err.Error(), "1 MiB are available (DIMOO_HOST_AVAILABLE_MB)")
}
