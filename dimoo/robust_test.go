package dimoo

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"image"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/internal/brokenmodel"
)

// Every broken copy of the shipped model fails to open with an error that
// names the problem, and nothing panics (a failed load used to call Close
// on a nil pipeline).
func TestOpenPipelineBrokenFolders(t *testing.T) {
	lib := testLibrary(t)
	src := ShippedModelDir()
	if src == "" {
		t.Skip("no shipped model under models/")
	}
	cases, err := brokenmodel.Build(t.TempDir(), src)
	require.NoError(t, err)
	for _, c := range cases {
		t.Run(c.Name, func(t *testing.T) {
			p, err := OpenPipeline(context.Background(), c.Dir, PipelineOptions{LoadOptions: LoadOptions{Library: lib}})
			require.Error(t, err)
			assert.Nil(t, p)
			assert.ErrorIs(t, err, ErrBadCheckpoint)
			assert.Contains(t, err.Error(), c.Want)
		})
	}
	// Options the library refuses: its error, not a panic.
	for name, o := range map[string]LoadOptions{
		"threads_negative": {Library: lib, Threads: -1},
		"cuda_without_gpu": {Library: lib, Backend: BackendCUDA},
	} {
		t.Run(name, func(t *testing.T) {
			if o.Backend == BackendCUDA && lib.DeviceCount(BackendCUDA) > 0 {
				t.Skip("a CUDA device is present")
			}
			p, err := OpenPipeline(context.Background(), src, PipelineOptions{LoadOptions: o})
			if o.Threads < 0 && err == nil {
				p.Close() // a library that clamps the count is fine too; it must not crash
				return
			}
			require.Error(t, err)
			assert.Nil(t, p)
		})
	}
	var nilPipeline *Pipeline
	assert.NoError(t, nilPipeline.Close())
}

// Absurd numbers are refused before anything is allocated for them: each
// of these used to panic, exhaust memory or run for minutes.
func TestRequestLimits(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	nan, inf := math.NaN(), math.Inf(1)
	in := square(32, 32, color.NRGBA{255, 0, 0, 255})
	const prompt = "a red circle at the top left"
	for _, tc := range []struct {
		name string
		run  func() error
		want string
	}{
		{"huge_size", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Width: 1 << 62, Height: 1 << 62})
			return err
		}, "max_sequence_length"},
		{"wide", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Width: 2147483648, Height: 16})
			return err
		}, "max_sequence_length"},
		{"large", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Width: 100000, Height: 100000})
			return err
		}, "max_sequence_length"},
		{"steps_negative", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Sampling: ImageSampling{Steps: -5}})
			return err
		}, "steps must be >= 1"},
		{"cache_ratio_nan", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt,
				Sampling: ImageSampling{UseCache: true, CacheRatio: nan}})
			return err
		}, "cache_ratio"},
		{"warmup_nan", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt,
				Sampling: ImageSampling{UseCache: true, WarmupRatio: nan}})
			return err
		}, "warmup_ratio"},
		{"temperature_inf", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Sampling: ImageSampling{Temperature: inf}})
			return err
		}, "temperature"},
		{"cfg_nan", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, CFGScale: nan})
			return err
		}, "cfg_scale"},
		{"cfg_inf", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, CFGScale: inf})
			return err
		}, "cfg_scale"},
		{"cfg_1e30", func() error {
			_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, CFGScale: 1e30})
			return err
		}, "cfg_scale"},
		{"edit_empty_prompt", func() error {
			_, err := p.EditImage(ctx, EditRequest{Prompt: " ", Image: in})
			return err
		}, "empty prompt"},
		{"edit_cfg_img_inf", func() error {
			_, err := p.EditImage(ctx, EditRequest{Prompt: "make it a square", Image: in, CFGImage: inf})
			return err
		}, "cfg_img"},
		{"edit_area_huge", func() error {
			_, err := p.EditImage(ctx, EditRequest{Prompt: "make it a square", Image: in, InputArea: 1 << 40})
			return err
		}, "input area"},
		{"inpaint_mask_nan", func() error {
			_, err := p.Inpaint(ctx, InpaintRequest{Prompt: prompt, Image: in, MaskH: nan})
			return err
		}, "mask_h_ratio"},
		{"understand_gen_length_huge", func() error {
			_, err := p.Understand(ctx, UnderstandRequest{Question: "what colour is it", Image: in,
				Sampling: TextSampling{Steps: 1 << 40, GenLength: 1 << 40, BlockLength: 1 << 40}})
			return err
		}, "max_sequence_length"},
		{"understand_steps_over_length", func() error {
			_, err := p.Understand(ctx, UnderstandRequest{Question: "what colour is it", Image: in,
				Sampling: TextSampling{Steps: 32, GenLength: 16, BlockLength: 16}})
			return err
		}, "at most gen_length"},
		{"understand_temperature_inf", func() error {
			_, err := p.Understand(ctx, UnderstandRequest{Question: "what colour is it", Image: in,
				Sampling: TextSampling{Steps: 16, GenLength: 16, BlockLength: 16, Temperature: inf}})
			return err
		}, "temperature"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run()
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrInvalidArgument)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

// More steps than codes to decode are capped to the codes (each step
// unmasks at least one), before anything is allocated per step.
func TestStepsCappedToCodes(t *testing.T) {
	p := openShipped(t)
	total := 0
	_, err := p.GenerateImage(context.Background(), ImageRequest{Prompt: "a red circle at the top left",
		Sampling: ImageSampling{Steps: 99999999999}, Progress: func(_, n int) { total = n }})
	require.NoError(t, err)
	w, h := p.NativeSize()
	f := p.VQ.Factor()
	assert.Equal(t, (w/f)*(h/f), total)
	assert.Equal(t, 7, capSteps(7, 64))
	assert.Equal(t, 64, capSteps(65, 64))
	assert.Equal(t, 5, capSteps(5, 0))
	// The lower-level decoder, asked directly, refuses instead.
	assert.ErrorIs(t, checkImageSampling(ImageSampling{Steps: 65}, 64), ErrInvalidArgument)
}

// Cancellation errors are ErrCancelled and the context's own error.
func TestCancellationErrorsIs(t *testing.T) {
	p := openShipped(t)
	const prompt = "a red circle at the top left"
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt})
	assert.ErrorIs(t, err, ErrCancelled)
	assert.ErrorIs(t, err, context.Canceled)

	// Cancelled between steps of a running decode.
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	_, err = p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Progress: func(step, _ int) {
		if step == 2 {
			cancel()
		}
	}})
	assert.ErrorIs(t, err, ErrCancelled)
	assert.ErrorIs(t, err, context.Canceled)

	dctx, dcancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer dcancel()
	_, err = p.Understand(dctx, UnderstandRequest{Question: "what colour is it",
		Image: square(32, 32, color.NRGBA{255, 0, 0, 255})})
	assert.ErrorIs(t, err, ErrCancelled)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.False(t, errors.Is(err, context.Canceled))
}

// Zero request fields mean the model's defaults, as in the CLI: a request
// with Temperature 0 draws the same image as one with the model's
// dimoo.json temperature; a negative temperature is argmax decoding, which
// no seed changes.
func TestTemperatureZeroIsModelDefault(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	d := p.Defaults().Sampling.Temperature
	require.NotNil(t, d, "the shipped model sets a temperature")
	const prompt = "a green square at the center"
	gen := func(tau float64, seed uint64) image.Image {
		img, err := p.GenerateImage(ctx, ImageRequest{Prompt: prompt, Sampling: ImageSampling{Temperature: tau,
			Seed: seed}})
		require.NoError(t, err)
		return img
	}
	assert.Equal(t, gen(*d, 3), gen(0, 3), "temperature 0 = the model's %g", *d)
	assert.Equal(t, gen(-1, 1), gen(-1, 2), "negative temperature: argmax, whatever the seed")
	assert.Equal(t, *d, p.temperature(0))
	assert.Equal(t, 0.0, p.temperature(-1))
	assert.Equal(t, 0.7, p.temperature(0.7))
}

// Understanding draws only text tokens, so an ordinary question gets an
// answer however the sampler's noise falls (it used to pick image codes,
// which detokenizing rejects).
func TestUnderstandDrawsTextOnly(t *testing.T) {
	p := openShipped(t)
	allowed := p.textTokens()
	for v := range allowed {
		inImage := v >= int(p.Special.ImageOffset) && v < int(p.Special.ImageOffset+p.Special.Codebook)
		_, known := p.Tokenizer.Token(int32(v))
		assert.Equal(t, known && !inImage, allowed[v], "id %d", v)
	}
	in := square(32, 32, color.NRGBA{255, 0, 0, 255})
	for seed := uint64(0); seed < 4; seed++ {
		for _, q := range []string{"what colour is it", "What is in the image?", "where is the shape"} {
			_, err := p.Understand(context.Background(), UnderstandRequest{Question: q, Image: in,
				Sampling: TextSampling{Temperature: 1, Seed: seed}})
			require.NoError(t, err, "%q seed %d", q, seed)
		}
	}
}

// pngHeader is a PNG whose header declares w x h pixels, with no pixel
// data: enough for DecodeConfig, a decompression bomb's first bytes.
func pngHeader(w, h uint32) []byte {
	var b bytes.Buffer
	b.WriteString("\x89PNG\r\n\x1a\n")
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr[0:], w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = 8, 2 // 8-bit RGB
	chunk := append([]byte("IHDR"), ihdr...)
	binary.Write(&b, binary.BigEndian, uint32(len(ihdr)))
	b.Write(chunk)
	binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(chunk))
	return b.Bytes()
}

// LoadImage refuses an image whose header declares more than
// MaxImagePixels, before decoding it.
func TestLoadImagePixelCap(t *testing.T) {
	dir := t.TempDir()
	bomb := filepath.Join(dir, "bomb.png")
	require.NoError(t, os.WriteFile(bomb, pngHeader(20000, 20000), 0o644))
	_, err := LoadImage(bomb)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "20000x20000, more than")

	// A header under the cap passes; the missing pixels are then the error.
	ok := filepath.Join(dir, "ok.png")
	require.NoError(t, os.WriteFile(ok, pngHeader(64, 64), 0o644))
	_, err = LoadImage(ok)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "not a readable PNG")

	small := filepath.Join(dir, "small.png")
	require.NoError(t, SavePNG(small, square(8, 8, color.NRGBA{0, 0, 255, 255})))
	img, err := LoadImage(small)
	require.NoError(t, err)
	assert.Equal(t, image.Rect(0, 0, 8, 8), img.Bounds())
}
