package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Two shards write every item once; a rerun skips what is done and
// redraws a missing image with the same bytes.
func TestGeneratePrompts(t *testing.T) {
	needLibrary(t)
	dir := t.TempDir()
	set := filepath.Join(dir, "set.jsonl")
	require.NoError(t, os.WriteFile(set, []byte(`{"prompt": "a red circle at the top left", "id": "a"}
{"prompt": "a blue square at the center", "seed": 7}

{"prompt": "a green triangle at the bottom right", "id": "c/1"}
{"prompt": "a white circle at the center"}
{"prompt": "a purple square at the top right", "id": "e"}
`), 0o644))
	out := filepath.Join(dir, "out")
	gen := func(args ...string) (string, error) {
		var stdout bytes.Buffer
		err := run(context.Background(), append([]string{"generate", "--prompts", set, "--output_dir", out,
			"--timesteps", "4", "--threads", "1", "--quiet"}, args...), &stdout)
		return stdout.String(), err
	}
	s, err := gen("--shard", "0/2")
	require.NoError(t, err)
	assert.Contains(t, s, "wrote 3 images")
	s, err = gen("--shard", "1/2", "--concurrency", "2")
	require.NoError(t, err)
	assert.Contains(t, s, "wrote 2 images")
	names := []string{"a.png", "000001.png", "c_1.png", "000003.png", "e.png"}
	for _, n := range names {
		assert.FileExists(t, filepath.Join(out, n))
	}
	entries, _ := os.ReadDir(out)
	assert.Len(t, entries, len(names), "no temporary files left")

	first, err := os.ReadFile(filepath.Join(out, "000001.png"))
	require.NoError(t, err)
	require.NoError(t, os.Remove(filepath.Join(out, "000001.png")))
	s, err = gen("--shard", "1/2")
	require.NoError(t, err)
	assert.Contains(t, s, "wrote 1 images")
	again, err := os.ReadFile(filepath.Join(out, "000001.png"))
	require.NoError(t, err)
	assert.Equal(t, first, again, "a resumed item has the same bytes")
	s, err = gen("--shard", "0/1")
	require.NoError(t, err)
	assert.Contains(t, s, "wrote 0 images")

	for _, bad := range [][]string{{"--shard", "2/2"}, {"--shard", "x"}, {"--prompt", "a", "--shard", "0/1"},
		{"--concurrency", "0"}} {
		_, err := gen(bad...)
		assert.True(t, errors.Is(err, errUsage), "%v: %v", bad, err)
	}
	require.NoError(t, os.WriteFile(set, []byte("{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"colour\": 1}\n"), 0o644))
	_, err = gen()
	assert.ErrorContains(t, err, "set.jsonl:2")
	require.NoError(t, os.WriteFile(set, []byte("{\"prompt\": \"a\", \"id\": \"x\"}\n{\"prompt\": \"b\", \"id\": \"x\"}\n"), 0o644))
	_, err = gen()
	assert.ErrorContains(t, err, "again")
}
