// Package brokenmodel builds broken copies of a checkpoint folder for the
// tests that check every load failure is an error naming the problem:
// garbage, empty, missing or out-of-range files, truncated weights.
package brokenmodel

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Case is one broken folder and a part of the message its load must give.
type Case struct {
	Name string
	Dir  string
	Want string
}

type mutation struct {
	name, file, want string
	// change rewrites the file's bytes; nil removes the file.
	change func([]byte) ([]byte, error)
}

func replace(s string) func([]byte) ([]byte, error) {
	return func([]byte) ([]byte, error) { return []byte(s), nil }
}

func truncate(n int) func([]byte) ([]byte, error) {
	return func(b []byte) ([]byte, error) { return b[:min(n, len(b))], nil }
}

// setJSON sets one key of a JSON object file.
func setJSON(key string, v any) func([]byte) ([]byte, error) {
	return func(b []byte) ([]byte, error) {
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			return nil, err
		}
		m[key] = v
		return json.Marshal(m)
	}
}

var mutations = []mutation{
	{"config_garbage", "config.json", "config.json", replace("garbage")},
	{"config_empty", "config.json", "config.json", replace("")},
	{"config_missing", "config.json", "config.json", nil},
	{"config_negative", "config.json", "d_model", setJSON("d_model", -256)},
	{"config_huge", "config.json", "d_model", setJSON("d_model", int64(1)<<40)},
	{"weights_garbage", "model.safetensors", "model.safetensors", replace("garbage")},
	{"weights_truncated", "model.safetensors", "truncated", truncate(1 << 20)},
	{"weights_missing", "model.safetensors", "model.safetensors", nil},
	{"tokenizer_garbage", "tokenizer.json", "tokenizer.json", replace("{garbage")},
	{"tokenizer_missing", "tokenizer.json", "tokenizer.json", nil},
	{"vq_config_garbage", "vqvae/config.json", "vqvae/config.json", replace("{garbage")},
	{"vq_weights_truncated", "vqvae/diffusion_pytorch_model.safetensors", "truncated", truncate(100000)},
	{"special_out_of_range", "special_tokens.json", "special_tokens.json", setJSON("mask", 100000)},
	{"special_garbage", "special_tokens.json", "special_tokens.json", replace("[1,2")},
	{"dimoo_json_huge_width", "dimoo.json", "dimoo.json", setJSON("width", 1000000)},
	{"dimoo_json_garbage", "dimoo.json", "dimoo.json", replace("{")},
}

// Build makes one broken copy of the checkpoint folder src per case under
// dst. Files a case leaves alone are symbolic links to src's.
func Build(dst, src string) ([]Case, error) {
	src, err := filepath.Abs(src)
	if err != nil {
		return nil, err
	}
	var out []Case
	for _, m := range mutations {
		dir := filepath.Join(dst, m.name)
		if err := linkTree(dir, src); err != nil {
			return nil, err
		}
		path := filepath.Join(dir, filepath.FromSlash(m.file))
		orig, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("brokenmodel: %s: %w", m.name, err)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
		if m.change != nil {
			b, err := m.change(orig)
			if err != nil {
				return nil, fmt.Errorf("brokenmodel: %s: %w", m.name, err)
			}
			if err := os.WriteFile(path, b, 0o644); err != nil {
				return nil, err
			}
		}
		out = append(out, Case{Name: m.name, Dir: dir, Want: m.want})
	}
	return out, nil
}

// linkTree mirrors src's folders under dst with links to its files.
func linkTree(dst, src string) error {
	return filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(target, 0o755)
		}
		return os.Symlink(p, target)
	})
}
