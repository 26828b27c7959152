package dimoo

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testLibrary loads lib/libdimoo.so, or skips when it has not been built
// (unless DIMOO_REQUIRE_LIBRARY is set, as CI does: then it fails).
func testLibrary(t testing.TB) *Library {
	t.Helper()
	lib, err := DefaultLibrary()
	if err != nil {
		if os.Getenv("DIMOO_REQUIRE_LIBRARY") != "" {
			t.Fatalf("libdimoo is required: %v", err)
		}
		t.Skipf("libdimoo not built (run make): %v", err)
	}
	return lib
}

func testdataDir(parts ...string) string {
	return filepath.Join(append([]string{"..", "testdata"}, parts...)...)
}

func loadTestModel(t testing.TB, dir string) *Model {
	t.Helper()
	lib := testLibrary(t)
	m, err := LoadModel(context.Background(), dir, LoadOptions{Library: lib})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

// relErr is ||got - want|| / ||want||.
func relErr(got []float32, want []float64) float64 {
	var num, den float64
	for i := range want {
		d := float64(got[i]) - want[i]
		num += d * d
		den += want[i] * want[i]
	}
	return math.Sqrt(num / den)
}

type goldenCase struct {
	Tokens []int32 `json:"tokens"`
	Logits string  `json:"logits"`
}

func readCases(t *testing.T, path string) []goldenCase {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var cases []goldenCase
	require.NoError(t, json.Unmarshal(b, &cases))
	require.NotEmpty(t, cases)
	return cases
}

// The official Lumina-DiMOO code's logits (float64, CPU) on its small
// checkpoint: the ground truth.
func TestForwardMatchesOfficialGolden(t *testing.T) {
	dir := testdataDir("official-small")
	m := loadTestModel(t, filepath.Join(dir, "checkpoint"))
	for _, c := range readCases(t, filepath.Join(dir, "forward.json")) {
		want, shape, err := ReadNpyFile(filepath.Join(dir, c.Logits))
		require.NoError(t, err)
		require.Equal(t, []int{len(c.Tokens), m.Config.EmbeddingRows()}, shape)
		got, err := m.Logits(context.Background(), c.Tokens, nil, 0, 0)
		require.NoError(t, err)
		e := relErr(got.Data, want)
		t.Logf("T=%d: relative error %.2e", len(c.Tokens), e)
		assert.LessOrEqual(t, e, 1e-5, "T=%d", len(c.Tokens))
	}
}

// Our own float64 PyTorch reference (scripts/reference_forward.py) on random
// checkpoints in fp32, bf16 and fp16 (GQA), at several lengths.
func TestForwardMatchesReference(t *testing.T) {
	for _, tc := range []struct {
		name  string
		bound float64
	}{
		{"small-f32", 1e-4},
		{"small-bf16", 1e-2},
		{"small-gqa-f16", 1e-3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := testdataDir(tc.name)
			checkReference(t, loadTestModel(t, dir), dir, tc.bound)
		})
	}
}

// checkReference compares m's logits with the float64 reference cases of
// the testdata checkpoint dir.
func checkReference(t *testing.T, m *Model, dir string, bound float64) {
	t.Helper()
	for _, c := range readCases(t, filepath.Join(dir, "golden", "cases.json")) {
		want, _, err := ReadNpyFile(filepath.Join(dir, "golden", c.Logits))
		require.NoError(t, err)
		got, err := m.Logits(context.Background(), c.Tokens, nil, 0, 0)
		require.NoError(t, err)
		e := relErr(got.Data, want)
		t.Logf("%s, precision %s, T=%d: relative error %.2e", filepath.Base(dir), m.Precision, len(c.Tokens), e)
		assert.LessOrEqual(t, e, bound, "%s, precision %s, T=%d", dir, m.Precision, len(c.Tokens))
	}
}

// Every checkpoint at every precision against the same float64 references.
// fp32 arithmetic is within fp32 rounding whatever the stored dtype (bf16
// and fp16 weights widen exactly); bf16 arithmetic is within bf16 rounding,
// which for an fp32 or fp16 checkpoint includes rounding its weights.
func TestForwardPrecisions(t *testing.T) {
	lib := testLibrary(t)
	for _, name := range []string{"small-f32", "small-bf16", "small-gqa-f16"} {
		dir := testdataDir(name)
		for _, tc := range []struct {
			prec  Precision
			bound float64
		}{
			{PrecisionF32, 1e-5},
			{PrecisionBF16, 1e-2},
		} {
			m, err := LoadModel(context.Background(), dir, LoadOptions{Library: lib, Threads: 2, Precision: tc.prec})
			require.NoError(t, err)
			assert.Equal(t, tc.prec, m.Precision)
			checkReference(t, m, dir, tc.bound)
			m.Close()
		}
	}
	for _, s := range []string{"auto", "bf16", "fp32"} {
		p, err := ParsePrecision(s)
		require.NoError(t, err)
		assert.Equal(t, s, p.String())
	}
	_, err := ParsePrecision("fp8")
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = LoadModel(context.Background(), testdataDir("small-f32"), LoadOptions{Library: lib, Precision: 7})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.ErrorContains(t, err, "precision")
}

func TestLogitsRowsAndColumns(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-f32"))
	tokens := []int32{3, 999, 0, 512, 7, 7, 100}
	all, err := m.Logits(context.Background(), tokens, nil, 0, 0)
	require.NoError(t, err)
	require.Equal(t, len(tokens), all.Rows)
	require.Equal(t, 1024, all.Cols)
	part, err := m.Logits(context.Background(), tokens, []int32{6, 1}, 100, 356)
	require.NoError(t, err)
	require.Equal(t, 2, part.Rows)
	require.Equal(t, 256, part.Cols)
	for i, p := range []int{6, 1} {
		for j := 0; j < 256; j++ {
			assert.InDelta(t, all.Row(p)[100+j], part.Row(i)[j], 1e-4)
		}
	}
}

func TestForwardRejectsBadInput(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-f32"))
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		tokens []int32
		pos    []int32
		vb, ve int
		msg    string
	}{
		{"empty", nil, nil, 0, 0, "empty"},
		{"id too large", []int32{1, 1000}, nil, 0, 0, "outside the vocabulary"},
		{"negative id", []int32{-1}, nil, 0, 0, "outside the vocabulary"},
		{"position out of range", []int32{1, 2}, []int32{2}, 0, 0, "output position 2"},
		{"empty positions", []int32{1, 2}, []int32{}, 0, 0, "empty Positions"},
		{"vocab range", []int32{1, 2}, nil, 10, 2000, "vocab range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.Logits(ctx, tc.tokens, tc.pos, tc.vb, tc.ve)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrInvalidArgument)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
	long := make([]int32, m.Config.MaxSequenceLength+1)
	_, err := m.Logits(ctx, long, nil, 0, 0)
	assert.ErrorIs(t, err, ErrInvalidArgument)
}

func TestForwardCancelled(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-f32"))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := m.Logits(ctx, []int32{1, 2, 3}, nil, 0, 0)
	assert.ErrorIs(t, err, ErrCancelled)
}

// Many goroutines share one model, each with its own session: every result
// equals the single-threaded one.
func TestConcurrentSessions(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-bf16"))
	tokens := []int32{5, 6, 7, 8, 9, 10, 11, 12}
	want, err := m.Logits(context.Background(), tokens, nil, 0, 0)
	require.NoError(t, err)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for g := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 3; i++ {
				got, err := m.Logits(context.Background(), tokens, nil, 0, 0)
				if err != nil {
					errs[g] = err
					return
				}
				for j := range got.Data {
					if math.Abs(float64(got.Data[j]-want.Data[j])) > 1e-5 {
						errs[g] = errors.New("result differs from the single-threaded one")
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		assert.NoError(t, err)
	}
}

// ML-Cache through the Go API: STORE then USE over a subset reproduces the
// full forward's logits at the recomputed rows.
func TestSessionCacheModes(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-f32"))
	s, err := m.NewSession(SessionOptions{MaxTokens: 64, Seqs: 2, KVCache: true})
	require.NoError(t, err)
	defer s.Close()
	assert.Greater(t, s.Bytes(), int64(0))
	tokens := make([]int32, 40)
	for i := range tokens {
		tokens[i] = int32(i * 17 % 1000)
	}
	ctx := context.Background()
	full, err := s.Forward(ctx, ForwardRequest{Seq: 1, Tokens: tokens, CacheMode: CacheStore, Logits: true})
	require.NoError(t, err)
	compute := []int32{2, 19, 39}
	part, err := s.Forward(ctx, ForwardRequest{Seq: 1, Tokens: tokens, CacheMode: CacheUse, Compute: compute,
		Logits: true, Positions: compute})
	require.NoError(t, err)
	for i, p := range compute {
		for j := range part[0].Row(i) {
			assert.InDelta(t, full[0].Row(int(p))[j], part[0].Row(i)[j], 1e-4)
		}
	}
	// USE on the other seq, which never stored, is refused.
	_, err = s.Forward(ctx, ForwardRequest{Seq: 0, Tokens: tokens, CacheMode: CacheUse, Compute: compute})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	// Closed sessions refuse work instead of crashing.
	require.NoError(t, s.Close())
	_, err = s.Forward(ctx, ForwardRequest{Tokens: tokens})
	assert.Error(t, err)
}

func TestLayoutsMatchTheLibrary(t *testing.T) {
	lib := testLibrary(t)
	require.NoError(t, lib.CheckLayouts())
	// Each mirrored struct is known to the library, field by field.
	for name := range mirroredStructs {
		assert.Greater(t, lib.structSize(name), int64(0), name)
	}
	assert.Equal(t, int64(-1), lib.structSize("not_a_struct"))
	// A mirror with a wrong layout is caught.
	type wrongArgs struct {
		Seq     int64 `c:"seq"`
		NTokens int32 `c:"n_tokens"`
	}
	saved := mirroredStructs["dimoo_forward_args"]
	mirroredStructs["dimoo_forward_args"] = wrongArgs{}
	defer func() { mirroredStructs["dimoo_forward_args"] = saved }()
	err := lib.CheckLayouts()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "dimoo_forward_args")
}

func TestLibraryLookup(t *testing.T) {
	lib := testLibrary(t)
	assert.NotEmpty(t, lib.Path)
	assert.Contains(t, []string{"$DIMOO_LIBRARY", "executable", "source tree"}, lib.Source)
	assert.Contains(t, lib.Version(), "cpu")
	// An explicit path is the only one tried.
	_, err := OpenLibrary(LibraryOptions{Path: "/nonexistent/libdimoo.so"})
	assert.ErrorIs(t, err, ErrLibrary)
	assert.Contains(t, err.Error(), "/nonexistent/libdimoo.so")
	// A file that is not a library is an error, not a crash.
	bogus := filepath.Join(t.TempDir(), "libdimoo.so")
	require.NoError(t, os.WriteFile(bogus, []byte("not an ELF file"), 0o644))
	_, err = OpenLibrary(LibraryOptions{Path: bogus})
	assert.ErrorIs(t, err, ErrLibrary)
	// $DIMOO_LIBRARY wins over the search path.
	t.Setenv(EnvLibrary, lib.Path)
	l2, err := OpenLibrary(LibraryOptions{})
	require.NoError(t, err)
	assert.Equal(t, "$"+EnvLibrary, l2.Source)
}

func TestRuntimeDescribe(t *testing.T) {
	lib := testLibrary(t)
	rt, err := lib.NewRuntime(BackendCPU, 0, 1)
	require.NoError(t, err)
	defer rt.Close()
	d, err := rt.Describe()
	require.NoError(t, err)
	assert.Contains(t, d, "cpu: 1 threads")
	assert.Regexp(t, `, bf16 tiles (amx|avx512bf16|avx512|avx2|portable)$`, d)
	_, err = lib.NewRuntime(BackendCPU, 3, 0)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	if lib.DeviceCount(BackendCUDA) == 0 {
		_, err = lib.NewRuntime(BackendCUDA, 0, 0)
		assert.ErrorIs(t, err, ErrUnsupported)
	}
}

// Library.Estimate reports what the loaded model and its sessions then hold,
// for every testdata checkpoint (fp32, bf16, fp16 with grouped K/V heads),
// before anything is loaded.
func TestEstimateEqualsLoaded(t *testing.T) {
	lib := testLibrary(t)
	for _, name := range []string{"small-f32", "small-bf16", "small-gqa-f16"} {
		dir := testdataDir(name)
		info, err := Inspect(dir)
		require.NoError(t, err)
		dt := DTypeF32
		for s := range info.DTypes {
			switch s {
			case "BF16":
				dt = DTypeBF16
			case "F16":
				dt = DTypeF16
			}
		}
		for _, prec := range []Precision{PrecisionBF16, PrecisionF32} {
			model, _, err := lib.Estimate(BackendCPU, 2, info.Config, dt, prec, nil)
			require.NoError(t, err)
			m, err := LoadModel(context.Background(), dir, LoadOptions{Library: lib, Threads: 2, Precision: prec})
			require.NoError(t, err)
			assert.Equal(t, model, m.WeightBytes(), "%s %s", name, prec)
			m.Close()
		}
		model, _, err := lib.Estimate(BackendCPU, 2, info.Config, dt, PrecisionAuto, nil)
		require.NoError(t, err)
		m, err := LoadModel(context.Background(), dir, LoadOptions{Library: lib, Threads: 2})
		require.NoError(t, err)
		assert.Equal(t, model, m.WeightBytes(), name)
		for _, o := range []SessionOptions{
			{MaxTokens: 20},
			{MaxTokens: 33, Seqs: 2, KVCache: true, KeepCols: 16},
			{MaxTokens: 40, Seqs: 3, KeepRows: 8, KeepCols: m.Config.EmbeddingRows()},
		} {
			_, want, err := lib.Estimate(BackendCPU, 2, info.Config, dt, PrecisionAuto, &o)
			require.NoError(t, err)
			s, err := m.NewSession(o)
			require.NoError(t, err)
			assert.Equal(t, want, s.Bytes(), "%s %+v", name, o)
			s.Close()
		}
		m.Close()
	}
	_, _, err := lib.Estimate(BackendCPU, 0, nil, DTypeF32, PrecisionAuto, nil)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	info, err := Inspect(testdataDir("small-f32"))
	require.NoError(t, err)
	_, _, err = lib.Estimate(BackendCPU, 0, info.Config, DTypeF32, PrecisionAuto, &SessionOptions{MaxTokens: 1 << 30})
	assert.ErrorIs(t, err, ErrInvalidArgument)
}
