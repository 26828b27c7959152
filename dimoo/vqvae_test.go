package dimoo

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// vqCases mirrors testdata/vq/cases.json (scripts/gen_vq_testdata.py).
type vqCases struct {
	Models []struct {
		Name   string `json:"name"`
		Dir    string `json:"dir"`
		DType  string `json:"dtype"`
		Factor int    `json:"factor"`
		Decode struct {
			H      int     `json:"h"`
			W      int     `json:"w"`
			Codes  []int32 `json:"codes"`
			Pixels string  `json:"pixels"`
		} `json:"decode"`
		Encode struct {
			H      int       `json:"H"`
			W      int       `json:"W"`
			Image  string    `json:"image"`
			Latent string    `json:"latent"`
			Codes  []int32   `json:"codes"`
			Gap    []float64 `json:"gap"`
		} `json:"encode"`
		DiffusersFP32Error struct {
			Decode float64 `json:"decode"`
			Encode float64 `json:"encode"`
		} `json:"diffusers_fp32_error"`
	} `json:"models"`
}

func readVQCases(t *testing.T) vqCases {
	t.Helper()
	b, err := os.ReadFile(testdataDir("vq", "cases.json"))
	require.NoError(t, err)
	var c vqCases
	require.NoError(t, json.Unmarshal(b, &c))
	require.NotEmpty(t, c.Models)
	return c
}

func loadTestVQ(t testing.TB, name string) *VQModel {
	t.Helper()
	lib := testLibrary(t)
	m, err := LoadVQModel(context.Background(), testdataDir("vq", name), LoadOptions{Library: lib})
	require.NoError(t, err)
	t.Cleanup(func() { m.Close() })
	return m
}

func readNpy32(t *testing.T, path string) ([]float32, []float64, []int) {
	t.Helper()
	d, shape, err := ReadNpyFile(path)
	require.NoError(t, err)
	f := make([]float32, len(d))
	for i, v := range d {
		f[i] = float32(v)
	}
	return f, d, shape
}

// Decode, the encoder's latent and the codes agree with diffusers' VQModel
// (run in float64 on the same stored weights, bf16 ones upcast).
func TestVQMatchesDiffusers(t *testing.T) {
	cases := readVQCases(t)
	for _, c := range cases.Models {
		t.Run(c.Name, func(t *testing.T) {
			m := loadTestVQ(t, c.Dir)
			dir := testdataDir("vq", c.Dir)
			require.Equal(t, c.Factor, m.Factor())

			// Decode: the raw output, then the clamped image.
			_, want, shape := readNpy32(t, filepath.Join(dir, c.Decode.Pixels))
			f := m.Factor()
			require.Equal(t, []int{c.Decode.H * f, c.Decode.W * f, 3}, shape)
			got, err := m.DecodeFloat(c.Decode.Codes, c.Decode.H, c.Decode.W)
			require.NoError(t, err)
			e := relErr(got, want)
			t.Logf("decode: rel err %.2e (diffusers fp32 vs fp64: %.2e)", e, c.DiffusersFP32Error.Decode)
			assert.LessOrEqual(t, e, 1e-4)
			img, err := m.Decode(context.Background(), c.Decode.Codes, c.Decode.H, c.Decode.W)
			require.NoError(t, err)
			require.Equal(t, c.Decode.W*f, img.Bounds().Dx())
			require.Equal(t, c.Decode.H*f, img.Bounds().Dy())
			for i := 0; i < len(want)/3; i++ {
				for ch := 0; ch < 3; ch++ {
					ref := math.Round(math.Min(1, math.Max(0, want[3*i+ch])) * 255)
					require.InDelta(t, ref, float64(img.Pix[4*i+ch]), 1, "pixel %d channel %d", i, ch)
				}
				require.Equal(t, uint8(255), img.Pix[4*i+3])
			}

			// Encode: the pre-quantization latent, then the codes.
			pix, _, ishape := readNpy32(t, filepath.Join(dir, c.Encode.Image))
			require.Equal(t, []int{c.Encode.H, c.Encode.W, 3}, ishape)
			_, wantLat, _ := readNpy32(t, filepath.Join(dir, c.Encode.Latent))
			lat, err := m.EncodeLatent(context.Background(), pix, c.Encode.H, c.Encode.W)
			require.NoError(t, err)
			e = relErr(lat, wantLat)
			t.Logf("encode latent: rel err %.2e (diffusers fp32 vs fp64: %.2e)", e, c.DiffusersFP32Error.Encode)
			assert.LessOrEqual(t, e, 1e-4)
			codes, err := m.EncodeFloat(pix, c.Encode.H, c.Encode.W)
			require.NoError(t, err)
			require.Len(t, codes, len(c.Encode.Codes))
			diff := 0
			for i := range codes {
				if codes[i] != c.Encode.Codes[i] {
					diff++
					// Only a near-tie may differ: best and second best within 1e-4.
					assert.Less(t, c.Encode.Gap[i], 1e-4, "cell %d: code %d, diffusers %d", i, codes[i], c.Encode.Codes[i])
				}
			}
			t.Logf("encode: %d of %d codes differ (near-ties only)", diff, len(codes))
		})
	}
}

// Encode of an image.Image equals EncodeFloat of its pixels; decode and
// re-encode of a grid gives codes back for most cells.
func TestVQImageRoundTrip(t *testing.T) {
	m := loadTestVQ(t, "tiny-f32")
	f := m.Factor()
	h, w := 6, 9
	codes := make([]int32, h*w)
	for i := range codes {
		codes[i] = int32((i * 37) % m.Codebook())
	}
	img, err := m.Decode(context.Background(), codes, h, w)
	require.NoError(t, err)
	assert.Equal(t, w*f, img.Bounds().Dx())
	got, gh, gw, err := m.Encode(context.Background(), img)
	require.NoError(t, err)
	assert.Equal(t, h, gh)
	assert.Equal(t, w, gw)
	want, err := m.EncodeFloat(ImageToPixels(img), h*f, w*f)
	require.NoError(t, err)
	assert.Equal(t, want, got)
}

func TestVQBadInputs(t *testing.T) {
	m := loadTestVQ(t, "attn3-f32")
	ctx := context.Background()
	n := int32(m.Codebook())
	for _, tc := range []struct {
		codes []int32
		h, w  int
		msg   string
	}{
		{[]int32{0, 1, n, 2}, 2, 2, "code 32 at row 1, column 0 is outside the codebook [0, 32)"},
		{[]int32{-1}, 1, 1, "code -1 at row 0, column 0"},
		{[]int32{1, 2, 3}, 2, 2, "3 values for a 2x2 grid"},
		{nil, 0, 0, "grid 0x0"},
		{[]int32{1}, 1, -1, "grid 1x-1"},
		{make([]int32, 4), 1 << 14, 1 << 14, "larger than the supported"},
	} {
		_, err := m.DecodeFloat(tc.codes, tc.h, tc.w)
		require.Error(t, err, "%v", tc)
		assert.ErrorIs(t, err, ErrInvalidArgument)
		assert.Contains(t, err.Error(), tc.msg)
		_, err = m.Decode(ctx, tc.codes, tc.h, tc.w)
		assert.ErrorIs(t, err, ErrInvalidArgument)
	}
	// Image sides must be multiples of the factor (4 here).
	for _, sz := range [][2]int{{10, 8}, {8, 6}, {0, 8}} {
		_, err := m.EncodeFloat(make([]float32, sz[0]*sz[1]*3), sz[0], sz[1])
		require.Error(t, err)
		assert.ErrorIs(t, err, ErrInvalidArgument)
		assert.Contains(t, err.Error(), "image")
	}
	_, err := m.EncodeFloat(make([]float32, 8*6*3), 6, 8)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "image 8x6 (width x height) is not a multiple of the VQ-VAE's factor 4")
	_, err = m.EncodeFloat(make([]float32, 5), 8, 8)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, _, _, err = m.Encode(ctx, PixelsToImage(make([]float32, 10*8*3), 10, 8))
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = m.DecodeLatent(ctx, make([]float32, 5), 2, 2)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = m.EncodeLatent(ctx, make([]float32, 9*8*3), 9, 8)
	assert.ErrorIs(t, err, ErrInvalidArgument)

	// The C side checks the same things (bypassing the Go checks).
	var out [3 * 16]float32
	bad := []int32{99}
	st := m.rt.lib.vqDecode(m.h, &bad[0], 1, 1, &out[0])
	assert.Equal(t, int32(StatusInvalidArgument), st)
	assert.Contains(t, m.rt.lib.vqError(m.h), "outside the codebook")
	pix := make([]float32, 6*6*3)
	var codes [9]int32
	st = m.rt.lib.vqEncode(m.h, &pix[0], 6, 6, &codes[0])
	assert.Equal(t, int32(StatusInvalidArgument), st)
	assert.Contains(t, m.rt.lib.vqError(m.h), "image 6x6 (height x width) is not a multiple of the downsampling factor 4")

	// A cancelled context stops before (or during) the call.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = m.Decode(cctx, []int32{1}, 1, 1)
	assert.ErrorIs(t, err, ErrCancelled)

	// A closed model errors, never crashes.
	m2 := loadTestVQ(t, "tiny-f32")
	require.NoError(t, m2.Close())
	_, err = m2.DecodeFloat([]int32{1}, 1, 1)
	assert.Error(t, err)
	assert.Equal(t, int64(0), m2.WeightBytes())
	require.NoError(t, m2.Close())
}

// Cancelling the context of a running decode stops it with ErrCancelled, and
// the model keeps working afterwards.
func TestVQDecodeCancelled(t *testing.T) {
	m := loadTestVQ(t, "attn3-f32")
	ctx, cancel := context.WithCancel(context.Background())
	h, w := 96, 96 // large enough to take a while
	codes := make([]int32, h*w)
	go func() {
		time.Sleep(20 * time.Millisecond)
		cancel()
	}()
	start := time.Now()
	_, err := m.Decode(ctx, codes, h, w)
	if err == nil {
		t.Skipf("decode finished in %v before the cancel", time.Since(start))
	}
	assert.ErrorIs(t, err, ErrCancelled)
	_, err = m.DecodeFloat(codes[:4], 2, 2)
	assert.NoError(t, err)
}

// vqCheckpointCopy copies a testdata VQ folder (without golden/) to a temp dir.
func vqCheckpointCopy(t *testing.T, name string) string {
	t.Helper()
	src := testdataDir("vq", name)
	dst := t.TempDir()
	for _, f := range []string{"config.json", vqWeightsFile} {
		b, err := os.ReadFile(filepath.Join(src, f))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(filepath.Join(dst, f), b, 0o644))
	}
	return dst
}

// rewriteVQWeights rewrites dir's safetensors through edit, which gets the
// tensors (with their data) and returns the ones to write.
func rewriteVQWeights(t *testing.T, dir string, edit func([]testTensor) []testTensor) {
	t.Helper()
	path := filepath.Join(dir, vqWeightsFile)
	f, err := OpenSafetensors(path)
	require.NoError(t, err)
	var ts []testTensor
	for _, name := range f.Names() {
		info := f.Tensors()[name]
		d, err := f.Data(name)
		require.NoError(t, err)
		ts = append(ts, testTensor{Name: name, DType: info.DTypeName, Shape: info.Shape, Data: append([]byte{}, d...)})
	}
	require.NoError(t, f.Close())
	testWriteSafetensors(t, path, edit(ts)...)
}

func editVQConfig(t *testing.T, dir string, edit func(map[string]any)) {
	t.Helper()
	path := filepath.Join(dir, "config.json")
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var v map[string]any
	require.NoError(t, json.Unmarshal(b, &v))
	edit(v)
	b, err = json.Marshal(v)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))
}

// Broken VQ checkpoints give errors naming the problem, never crashes.
func TestVQBadCheckpoints(t *testing.T) {
	lib := testLibrary(t)
	load := func(dir string) error {
		m, err := LoadVQModel(context.Background(), dir, LoadOptions{Library: lib})
		if err == nil {
			m.Close()
		}
		return err
	}
	for _, tc := range []struct {
		name    string
		config  func(map[string]any)
		weights func([]testTensor) []testTensor
		raw     string // config.json contents
		is      error
		msg     string
	}{
		{name: "not json", raw: "{", is: ErrBadCheckpoint, msg: "config.json"},
		{name: "wrong type", config: func(c map[string]any) { c["layers_per_block"] = "two" }, is: ErrBadCheckpoint, msg: "layers_per_block"},
		{name: "null groups", config: func(c map[string]any) { c["norm_num_groups"] = nil }, is: ErrBadCheckpoint, msg: "norm_num_groups is null"},
		{name: "groups", config: func(c map[string]any) { c["norm_num_groups"] = 5 }, is: ErrBadCheckpoint, msg: "not a multiple of norm_num_groups 5"},
		{name: "block types", config: func(c map[string]any) { c["down_block_types"] = []string{"DownEncoderBlock2D"} }, is: ErrBadCheckpoint, msg: "down_block_types has 1 entries"},
		{name: "attn blocks", config: func(c map[string]any) {
			c["up_block_types"] = []string{"AttnUpDecoderBlock2D", "UpDecoderBlock2D"}
		}, is: ErrUnsupported, msg: "AttnUpDecoderBlock2D"},
		{name: "spatial", config: func(c map[string]any) { c["norm_type"] = "spatial" }, is: ErrUnsupported, msg: "spatial"},
		{name: "act", config: func(c map[string]any) { c["act_fn"] = "gelu" }, is: ErrUnsupported, msg: "act_fn"},
		{name: "class", config: func(c map[string]any) { c["_class_name"] = "AutoencoderKL" }, is: ErrUnsupported, msg: "AutoencoderKL"},
		{name: "negative", config: func(c map[string]any) { c["latent_channels"] = -8 }, is: ErrBadCheckpoint, msg: "latent_channels = -8"},
		{name: "config implies other shapes", config: func(c map[string]any) { c["latent_channels"] = 4 }, is: ErrBadCheckpoint, msg: "conv_in.weight: shape (32, 8, 3, 3) but the config implies (32, 4, 3, 3)"},
		{name: "missing tensor", weights: func(ts []testTensor) []testTensor {
			var out []testTensor
			for _, x := range ts {
				if x.Name != "decoder.up_blocks.1.resnets.0.conv1.weight" {
					out = append(out, x)
				}
			}
			return out
		}, is: ErrBadCheckpoint, msg: "1 VQ tensor(s) missing: decoder.up_blocks.1.resnets.0.conv1.weight"},
		{name: "wrong shape", weights: func(ts []testTensor) []testTensor {
			for i := range ts {
				if ts[i].Name == "quantize.embedding.weight" {
					ts[i].Shape = []int64{ts[i].Shape[1], ts[i].Shape[0]}
				}
			}
			return ts
		}, is: ErrBadCheckpoint, msg: "quantize.embedding.weight: shape (8, 64) but the config implies (64, 8)"},
		{name: "unknown tensor", weights: func(ts []testTensor) []testTensor {
			return append(ts, testTensor{Name: "decoder.extra.weight", DType: "F32", Shape: []int64{2}})
		}, is: ErrBadCheckpoint, msg: "decoder.extra.weight: not a tensor of this VQ model config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := vqCheckpointCopy(t, "tiny-f32")
			if tc.raw != "" {
				require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(tc.raw), 0o644))
			}
			if tc.config != nil {
				editVQConfig(t, dir, tc.config)
			}
			if tc.weights != nil {
				rewriteVQWeights(t, dir, tc.weights)
			}
			err := load(dir)
			require.Error(t, err)
			assert.ErrorIs(t, err, tc.is)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
	// No weights file at all.
	dir := vqCheckpointCopy(t, "tiny-f32")
	require.NoError(t, os.Remove(filepath.Join(dir, vqWeightsFile)))
	err := load(dir)
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.Contains(t, err.Error(), vqWeightsFile)
}

func TestVQConfigDefaults(t *testing.T) {
	c, err := ParseVQConfig([]byte(`{"_class_name": "VQModel", "vq_embed_dim": null}`))
	require.NoError(t, err)
	assert.Equal(t, 3, c.InChannels)
	assert.Equal(t, []int{64}, c.BlockOutChannels)
	assert.Equal(t, 3, c.VQEmbedDim) // latent_channels
	assert.Equal(t, 256, c.NumVQEmbeddings)
	assert.Equal(t, 1, c.Factor())
	assert.True(t, c.MidBlockAddAttention)

	// aMUSEd's vqvae config.
	c, err = ParseVQConfig([]byte(`{"_class_name": "VQModel", "act_fn": "silu",
	  "block_out_channels": [128, 256, 256, 512, 768],
	  "down_block_types": ["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
	  "force_upcast": true, "in_channels": 3, "latent_channels": 64, "layers_per_block": 2,
	  "lookup_from_codebook": true, "mid_block_add_attention": false, "norm_num_groups": 32,
	  "norm_type": "group", "num_vq_embeddings": 8192, "out_channels": 3, "sample_size": 32,
	  "scaling_factor": 0.18215,
	  "up_block_types": ["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"],
	  "vq_embed_dim": null}`))
	require.NoError(t, err)
	assert.Equal(t, 16, c.Factor())
	assert.Equal(t, 64, c.VQEmbedDim)
	cc := c.cConfig()
	assert.Equal(t, int32(5), cc.NLevels)
	assert.Equal(t, [8]int32{128, 256, 256, 512, 768}, cc.BlockOutChannels)
	assert.Equal(t, int32(0), cc.MidBlockAddAttention)

	_, err = ParseVQConfig([]byte(`{"block_out_channels": [32,32,32,32,32,32,32,32,32]}`))
	assert.ErrorIs(t, err, ErrUnsupported)
	_, err = ParseVQConfig([]byte(`[1]`))
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.True(t, errors.Is(err, ErrBadCheckpoint))
	assert.True(t, strings.Contains(err.Error(), "config.json"))
}
