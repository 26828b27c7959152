//go:build linux

package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/brokenmodel"
)

// The CLI child: TestMain runs main() with the arguments in
// $DIMOO_TEST_CLI_ARGS under the data-size limit in $DIMOO_TEST_CLI_AS
// (RLIMIT_DATA: private writable memory, so Go's heap and malloc count but
// the read-only mappings of a CUDA build's cuBLAS do not), so a case that
// tries to allocate gigabytes fails (as a Go "fatal error: out of memory",
// which the test catches) instead of taking the machine.
const (
	childArgsEnv  = "DIMOO_TEST_CLI_ARGS"
	childLimitEnv = "DIMOO_TEST_CLI_AS"
	// Room for a normal run of the shipped model (the library's thread
	// stacks and malloc arenas count too); far below what the bad inputs
	// used to take.
	childLimit = 2 << 30
)

func TestMain(m *testing.M) {
	if a := os.Getenv(childArgsEnv); a != "" {
		var args []string
		if err := json.Unmarshal([]byte(a), &args); err != nil {
			os.Exit(99)
		}
		if lim := os.Getenv(childLimitEnv); lim != "" {
			var n uint64
			if err := json.Unmarshal([]byte(lim), &n); err == nil {
				rl := syscall.Rlimit{Cur: n, Max: n}
				if err := syscall.Setrlimit(syscall.RLIMIT_DATA, &rl); err != nil {
					os.Exit(98)
				}
			}
		}
		os.Args = append([]string{"dimoo"}, args...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type cliResult struct {
	code           int
	stdout, stderr string
}

// runCLI runs the CLI in a child process under the memory limit.
func runCLI(t *testing.T, dir string, args ...string) cliResult {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	a, _ := json.Marshal(args)
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), childArgsEnv+"="+string(a), childLimitEnv+"="+jsonInt(childLimit),
		"DIMOO_MODEL=")
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err = cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return cliResult{code, so.String(), se.String()}
}

func jsonInt(n uint64) string { b, _ := json.Marshal(n); return string(b) }

// snapshot hashes every file under dir.
func snapshot(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	require.NoError(t, filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = sha256.Sum256(b)
		return nil
	}))
	return out
}

// bombPNG is a PNG header declaring w x h pixels and no pixel data.
func bombPNG(w, h uint32) []byte {
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 2
	chunk := append([]byte("IHDR"), ihdr...)
	binary.Write(&b, binary.BigEndian, uint32(len(ihdr)))
	b.Write(chunk)
	binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(chunk))
	return b.Bytes()
}

// Every bad input of issue 15, run as the CLI would be, in a child process
// under a 2 GiB data-size limit: a clear message and the right exit
// status, no panic or Go runtime trace, and no file in the work folder
// created, changed or removed.
func TestCLIBadInputs(t *testing.T) {
	needLibrary(t)
	shipped := dimoo.ShippedModelDir()
	if shipped == "" {
		t.Skip("no shipped model")
	}
	work := t.TempDir()
	broken, err := brokenmodel.Build(filepath.Join(t.TempDir(), "broken"), shipped)
	require.NoError(t, err)
	write := func(name string, data []byte) string {
		p := filepath.Join(work, name)
		require.NoError(t, os.WriteFile(p, data, 0o644))
		return p
	}
	// The files a user already has: none may change.
	res := runCLI(t, work, "generate", "--prompt", "a red circle at the top left", "--output", "mine.png")
	require.Equal(t, 0, res.code, "control run under the memory limit: %s", res.stderr)
	write("notes.txt", []byte("my notes"))
	write("bomb.png", bombPNG(20000, 20000))
	var grid strings.Builder
	row := strings.Repeat("5,", 2999) + "5\n"
	for range 3000 {
		grid.WriteString(row)
	}
	write("grid3000.txt", []byte(grid.String()))
	before := snapshot(t, work)

	const prompt = "a red circle at the top left"
	gen := func(extra ...string) []string { return append([]string{"generate", "--prompt", prompt}, extra...) }
	type tc struct {
		name string
		args []string
		code int
		want string
	}
	cases := []tc{
		{"threads_negative", gen("--threads", "-1"), 2, "--threads -1"},
		{"width_2g", gen("--width", "2147483648", "--height", "16"), 1, "max_sequence_length"},
		{"size_100000", gen("--width", "100000", "--height", "100000"), 1, "max_sequence_length"},
		{"size_2e62", gen("--width", "4611686018427387904", "--height", "4611686018427387904"), 1,
			"max_sequence_length"},
		{"timesteps_huge", gen("--timesteps", "99999999999"), 2, "more than the 64 codes"},
		{"timesteps_1e6", gen("--timesteps", "1000000"), 2, "more than the 64 codes"},
		{"cache_ratio_nan", gen("--use-cache", "--cache_ratio", "NaN"), 2, "--cache_ratio NaN"},
		{"cfg_nan", gen("--cfg_scale", "NaN"), 2, "--cfg_scale NaN"},
		{"warmup_nan", gen("--use-cache", "--warmup_ratio", "NaN"), 2, "--warmup_ratio NaN"},
		{"cfg_inf", gen("--cfg_scale", "Inf"), 2, "--cfg_scale +Inf"},
		{"cfg_1e30", gen("--cfg_scale", "1e30"), 2, "--cfg_scale 1e+30"},
		{"temperature_inf", gen("--temperature", "Inf"), 2, "--temperature +Inf"},
		{"refresh_interval_0", gen("--use-cache", "--refresh_interval", "0"), 2, "--refresh_interval 0"},
		{"cache_ratio_without_cache", gen("--cache_ratio", "0.5"), 2, "only applies with --use-cache"},
		{"mask_ratio_nan", gen("--painting_mode", "inpainting", "--painting_image", "mine.png",
			"--mask_h_ratio", "NaN"), 2, "--mask_h_ratio NaN"},
		{"edit_bomb", []string{"edit", "--prompt", "make it a triangle", "--image_path", "bomb.png"}, 1,
			"20000x20000, more than"},
		{"understand_bomb", []string{"understand", "--prompt", "what colour is it", "--image_path", "bomb.png"}, 1,
			"20000x20000, more than"},
		{"edit_empty_prompt", []string{"edit", "--prompt", "", "--image_path", "mine.png"}, 2, "--prompt is required"},
		{"understand_steps_over_length", []string{"understand", "--prompt", "what colour is it", "--image_path",
			"mine.png", "--steps", "64", "--gen_length", "16", "--block_length", "16"}, 2, "more than --gen_length"},
		{"vq_encode_resize", []string{"vq-encode", "--vqvae", filepath.Join(shipped, "vqvae"), "--image", "mine.png",
			"--out", "codes.txt", "--resize", "100000x100000"}, 2, "--resize 100000x100000"},
		{"vq_decode_grid", []string{"vq-decode", "--vqvae", filepath.Join(shipped, "vqvae"), "--codes",
			"grid3000.txt", "--out", "big.png"}, 1, "more than 4194304 codes"},
		{"output_exists", gen("--output", "mine.png"), 2, "mine.png exists"},
		{"vq_out_exists", []string{"vq-encode", "--vqvae", filepath.Join(shipped, "vqvae"), "--image", "mine.png",
			"--out", "notes.txt"}, 2, "notes.txt exists"},
		// The output location is checked before the model loads: with a
		// broken model, the output folder is still the error.
		{"output_dir_is_file", gen("--model", broken[0].Dir, "--output_dir", "notes.txt"), 2, "notes.txt"},
		{"unknown_flag", gen("--bogus"), 2, "bogus"},
	}
	if lib, err := dimoo.DefaultLibrary(); err == nil && lib.DeviceCount(dimoo.BackendCUDA) == 0 {
		cases = append(cases, tc{"cuda_without_gpu", gen("--device", "cuda"), 1, "CUDA"})
	}
	for _, b := range broken {
		cases = append(cases, tc{"model_" + b.Name, gen("--model", b.Dir), 1, b.Want})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := runCLI(t, work, c.args...)
			out := r.stdout + r.stderr
			assert.Equal(t, c.code, r.code, "exit status; output:\n%s", out)
			assert.Contains(t, r.stderr, c.want)
			assert.True(t, strings.HasPrefix(r.stderr, "dimoo: "), "a dimoo message first: %q", r.stderr)
			for _, bad := range []string{"panic", "goroutine", "fatal error", "SIGSEGV"} {
				assert.NotContains(t, out, bad)
			}
			assert.Equal(t, before, snapshot(t, work), "files in the work folder changed")
		})
	}
}

// Outputs never clobber: the same command twice, edits of two images with
// one prompt, and different non-ASCII prompts all get files of their own;
// --force replaces; --output names the file.
func TestCLIOutputNames(t *testing.T) {
	needLibrary(t)
	dir := t.TempDir()
	gen := func(args ...string) []string {
		var out bytes.Buffer
		require.NoError(t, run(t.Context(), append([]string{"generate", "--quiet", "--timesteps", "2", "--output_dir", dir},
			args...),
			&out))
		return strings.Fields(out.String())
	}
	a := gen("--prompt", "a red circle at the top left")
	b := gen("--prompt", "a red circle at the top left")
	require.Len(t, a, 1)
	require.Len(t, b, 1)
	assert.NotEqual(t, a[0], b[0])
	assert.Equal(t, filepath.Join(dir, "generate_a_red_circle_at_the_top_left_seed0.png"), a[0])
	assert.Equal(t, filepath.Join(dir, "generate_a_red_circle_at_the_top_left_seed0_2.png"), b[0])
	zh := gen("--prompt", "红色的圆")
	ru := gen("--prompt", "красный круг")
	emoji1, emoji2 := gen("--prompt", "🔴"), gen("--prompt", "🟦")
	assert.Equal(t, filepath.Join(dir, "generate_红色的圆_seed0.png"), zh[0])
	assert.Equal(t, filepath.Join(dir, "generate_красный_круг_seed0.png"), ru[0])
	assert.NotEqual(t, emoji1[0], emoji2[0])

	// Two different images edited with one prompt: two pairs of files.
	var o1, o2 bytes.Buffer
	edit := func(img string, w *bytes.Buffer) {
		require.NoError(t, run(t.Context(), []string{"edit", "--quiet", "--timesteps", "2", "--prompt",
			"make it a triangle", "--image_path", img, "--output_dir", dir}, w))
	}
	edit(a[0], &o1)
	edit(zh[0], &o2)
	f1, f2 := strings.Fields(o1.String()), strings.Fields(o2.String())
	require.Len(t, f1, 2)
	require.Len(t, f2, 2)
	assert.NotEqual(t, f1[0], f2[0])
	side, err := dimoo.LoadImage(f1[1])
	require.NoError(t, err)
	res, err := dimoo.LoadImage(f1[0])
	require.NoError(t, err)
	assert.Equal(t, 2*res.Bounds().Dx(), side.Bounds().Dx(), "side-by-side: input at the output's size")

	files := func() []string {
		es, _ := os.ReadDir(dir)
		var n []string
		for _, e := range es {
			n = append(n, e.Name())
		}
		sort.Strings(n)
		return n
	}
	// --output: that file; again: refused; with --force: replaced.
	target := filepath.Join(dir, "chosen.png")
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"generate", "--quiet", "--timesteps", "2", "--prompt",
		"a blue square at the center", "--output", target}, &out))
	assert.Equal(t, target, strings.TrimSpace(out.String()))
	old, _ := os.ReadFile(target)
	list := files()
	err = run(t.Context(), []string{"generate", "--quiet", "--prompt", "a green square at the center", "--output",
		target}, &out)
	assert.ErrorIs(t, err, errUsage)
	assert.Contains(t, err.Error(), "--force")
	now, _ := os.ReadFile(target)
	assert.Equal(t, old, now)
	assert.Equal(t, list, files(), "a refused run leaves no file behind")
	require.NoError(t, run(t.Context(), []string{"generate", "--quiet", "--timesteps", "2", "--prompt",
		"a green square at the center", "--output", target, "--force"}, &out))
	now, _ = os.ReadFile(target)
	assert.NotEqual(t, old, now)
	assert.Equal(t, list, files(), "--force replaced the file in place, no temporary left")
}

// `CMD --help` lists the command's own flags with the defaults that apply
// (the shipped model's dimoo.json ones), on stdout, successfully.
func TestCommandHelp(t *testing.T) {
	d, err := dimoo.LoadDefaults(dimoo.ShippedModelDir())
	require.NoError(t, err)
	for _, c := range []struct {
		cmd  string
		want []string
	}{
		{"generate", []string{"-timesteps", "(default 16)", "-temperature", "(default 0.1)", "(default 0.5)",
			"-painting_mode", "-output", "-force", "native size, 32x32"}},
		{"edit", []string{"-cfg_img", "-edit_type", "-image_path", "-force"}},
		{"understand", []string{"-gen_length", "(default 16)", "-block_length"}},
		{"bench", []string{"-runs", "-timesteps", "(default 16)"}},
		{"info", []string{"-model", "-load"}},
		{"logits", []string{"-tokens", "-vocab-range", "-force"}},
		{"vq-encode", []string{"-resize", "-force"}},
		{"vq-decode", []string{"-codes", "-force"}},
		{"tokenize", []string{"-tokenizer"}},
		{"version", []string{"-lib"}},
	} {
		for _, flagName := range []string{"--help", "-h"} {
			var out bytes.Buffer
			require.NoError(t, run(t.Context(), []string{c.cmd, flagName}, &out), c.cmd)
			s := out.String()
			assert.Contains(t, s, "Usage: dimoo "+c.cmd, c.cmd)
			for _, w := range c.want {
				assert.Contains(t, s, w, c.cmd)
			}
		}
	}
	assert.Equal(t, 16, d.Sampling.Timesteps, "the defaults the help text was checked against")
	// `dimoo help CMD` too.
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"help", "edit"}, &out))
	assert.Contains(t, out.String(), "Usage: dimoo edit")

	// As a process: exit status 0, the text on stdout.
	needLibrary(t)
	r := runCLI(t, t.TempDir(), "generate", "--help")
	assert.Equal(t, 0, r.code)
	assert.Contains(t, r.stdout, "-timesteps")
	assert.Empty(t, r.stderr)
}

// An ordinary question gets an answer (the sampler draws text tokens only);
// info and logits take the shipped model by default; --threads beyond the
// CPUs is capped with a warning.
func TestCLITaskDefaults(t *testing.T) {
	needLibrary(t)
	dir := t.TempDir()
	var out bytes.Buffer
	require.NoError(t, run(t.Context(), []string{"generate", "--quiet", "--timesteps", "4", "--prompt",
		"a red circle at the top left", "--output", filepath.Join(dir, "in.png")}, &out))
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"understand", "--quiet", "--prompt", "what colour is it",
		"--image_path", filepath.Join(dir, "in.png"), "--temperature", "1"}, &out))
	assert.NotEmpty(t, strings.TrimSpace(out.String()), "an answer")
	var answer string
	// --stream prints the same bytes, a block at a time.
	for _, stream := range []string{"--quiet", "--stream"} {
		out.Reset()
		require.NoError(t, run(t.Context(), []string{"understand", stream, "--prompt", "what colour is it",
			"--image_path", filepath.Join(dir, "in.png"), "--temperature", "1", "--block_length", "2"}, &out))
		if stream == "--quiet" {
			answer = out.String()
		}
	}
	assert.Equal(t, answer, out.String())
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"info"}, &out))
	assert.Contains(t, out.String(), "dimoo-small")
	out.Reset()
	require.NoError(t, run(t.Context(), []string{"logits", "--tokens", "5,17,3", "--out",
		filepath.Join(dir, "l.npy")}, &out))
	r := runCLI(t, dir, "generate", "--prompt", "a red circle at the top left", "--threads", "100000",
		"--timesteps", "2", "--quiet", "--output", "t.png")
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "--threads 100000 is more than the")
}
