package dimoo

import (
	"context"
	"errors"
	"fmt"
	"image"
	"image/color"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// batchCase is one request of the batching tests, run alone or batched.
type batchCase struct {
	name string
	run  func(ctx context.Context, gen func(context.Context, ImageRequest) (image.Image, error),
		edit func(context.Context, EditRequest) (image.Image, error),
		mask func(context.Context, InpaintRequest, image.Image) (image.Image, error)) (image.Image, error)
}

func batchCases(p *Pipeline, cache bool) []batchCase {
	w, h := p.NativeSize()
	in := square(w, h, color.NRGBA{255, 0, 0, 255})
	m := image.NewGray(image.Rect(0, 0, w, h))
	for y := 0; y < h/2; y++ {
		for x := 0; x < w; x++ {
			m.SetGray(x, y, color.Gray{Y: 255})
		}
	}
	var cs []batchCase
	prompts := []string{"a red circle at the top left", "a blue square at the center", "a green triangle at the bottom right"}
	for i := 0; i < 4; i++ {
		o := ImageSampling{Steps: 6 + i%3, Temperature: 0.7, Seed: uint64(100 + i), UseCache: cache}
		prompt := prompts[i%len(prompts)]
		cfg := []float64{0.5, -1}[i%2] // two branches, or one
		cs = append(cs, batchCase{name: fmt.Sprintf("generate%d", i),
			run: func(ctx context.Context, gen func(context.Context, ImageRequest) (image.Image, error),
				_ func(context.Context, EditRequest) (image.Image, error),
				_ func(context.Context, InpaintRequest, image.Image) (image.Image, error)) (image.Image, error) {
				return gen(ctx, ImageRequest{Prompt: prompt, CFGScale: cfg, Sampling: o})
			}})
	}
	cs = append(cs, batchCase{name: "edit3", // text and image guidance: three branches
		run: func(ctx context.Context, _ func(context.Context, ImageRequest) (image.Image, error),
			edit func(context.Context, EditRequest) (image.Image, error),
			_ func(context.Context, InpaintRequest, image.Image) (image.Image, error)) (image.Image, error) {
			return edit(ctx, EditRequest{Prompt: "change the color to blue", Image: in, InputArea: w * h, CFGText: 1,
				CFGImage: 1, Sampling: ImageSampling{Steps: 6, Temperature: 0.5, Seed: 7, UseCache: cache}})
		}})
	cs = append(cs, batchCase{name: "inpaint-mask",
		run: func(ctx context.Context, _ func(context.Context, ImageRequest) (image.Image, error),
			_ func(context.Context, EditRequest) (image.Image, error),
			mask func(context.Context, InpaintRequest, image.Image) (image.Image, error)) (image.Image, error) {
			return mask(ctx, InpaintRequest{Prompt: "a red square at the top left", Image: in, InputArea: w * h,
				Sampling: ImageSampling{Steps: 6, Temperature: 0.5, Seed: 9, UseCache: cache}}, m)
		}})
	return cs
}

func pixels(img image.Image) []byte {
	b := img.Bounds()
	out := image.NewNRGBA(image.Rect(0, 0, b.Dx(), b.Dy()))
	for y := 0; y < b.Dy(); y++ {
		for x := 0; x < b.Dx(); x++ {
			out.Set(x, y, img.At(b.Min.X+x, b.Min.Y+y))
		}
	}
	return out.Pix
}

// Concurrent requests share forwards, and each gives the bytes it gives
// alone: with and without ML-Cache, with one, two and three branches.
func TestBatcherSameBytes(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	for _, cache := range []bool{false, true} {
		t.Run(fmt.Sprintf("cache=%v", cache), func(t *testing.T) {
			cs := batchCases(p, cache)
			alone := make([][]byte, len(cs))
			for i, c := range cs {
				img, err := c.run(ctx, p.GenerateImage, p.EditImage, p.InpaintMask)
				require.NoError(t, err, c.name)
				alone[i] = pixels(img)
			}
			// A pipeline with enough slots for every request at once.
			q, err := OpenPipeline(ctx, ShippedModelDir(), PipelineOptions{LoadOptions: LoadOptions{Library: p.Model.Runtime().Library()},
				MaxConcurrent: len(cs)})
			require.NoError(t, err)
			defer q.Close()
			b, err := q.NewBatcher(BatchOptions{Seqs: 12, KVCache: cache})
			require.NoError(t, err)
			defer b.Close()
			got := make([][]byte, len(cs))
			errs := make([]error, len(cs))
			var wg sync.WaitGroup
			for i, c := range cs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					img, err := c.run(ctx, b.GenerateImage, b.EditImage, b.InpaintMask)
					errs[i] = err
					if err == nil {
						got[i] = pixels(img)
					}
				}()
			}
			wg.Wait()
			for i, c := range cs {
				require.NoError(t, errs[i], c.name)
				assert.Equal(t, alone[i], got[i], "%s: batched bytes differ from the request alone", c.name)
			}
			st := b.Stats()
			assert.EqualValues(t, len(cs), st.Requests)
			// More sequences than one request's per forward: the batch was shared.
			assert.Greater(t, float64(st.Sequences)/float64(st.Forwards), 3.0, "%+v", st)
			assert.Less(t, st.Forwards, st.Steps, "%+v", st)
		})
	}
}

// A cancelled request leaves the batch at the next step with ErrCancelled;
// the others finish; Close answers waiting requests with ErrShutdown.
func TestBatcherCancelAndClose(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	q, err := OpenPipeline(ctx, ShippedModelDir(), PipelineOptions{LoadOptions: LoadOptions{Library: p.Model.Runtime().Library()},
		MaxConcurrent: 8})
	require.NoError(t, err)
	defer q.Close()
	b, err := q.NewBatcher(BatchOptions{Seqs: 2})
	require.NoError(t, err)

	// Cancelled after its third step, while another request runs beside it.
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var errCancelled, errOther error
	wg.Add(2)
	go func() {
		defer wg.Done()
		_, errCancelled = b.GenerateImage(cctx, ImageRequest{Prompt: "a red circle at the center", CFGScale: -1,
			Sampling: ImageSampling{Steps: 64, Seed: 1}, Progress: func(s, _ int) {
				if s == 3 {
					cancel()
				}
			}})
	}()
	go func() {
		defer wg.Done()
		_, errOther = b.GenerateImage(ctx, ImageRequest{Prompt: "a blue circle at the center", CFGScale: -1,
			Sampling: ImageSampling{Steps: 16, Seed: 2}})
	}()
	wg.Wait()
	assert.ErrorIs(t, errCancelled, ErrCancelled)
	assert.NoError(t, errOther)

	// Two-slot batch: a long request runs, more wait; Close fails them all.
	errs := make(chan error, 4)
	started := make(chan struct{})
	var once sync.Once
	for i := 0; i < 4; i++ {
		go func() {
			_, err := b.GenerateImage(ctx, ImageRequest{Prompt: "a red circle at the center",
				Sampling: ImageSampling{Steps: 500, Seed: uint64(i)}, Progress: func(int, int) { once.Do(func() { close(started) }) }})
			errs <- err
		}()
	}
	<-started
	time.Sleep(20 * time.Millisecond) // let the other three queue
	require.NoError(t, b.Close())
	for i := 0; i < 4; i++ {
		err := <-errs
		require.Error(t, err)
		assert.True(t, errors.Is(err, ErrShutdown), "%v", err)
	}
	_, err = b.GenerateImage(ctx, ImageRequest{Prompt: "a red circle at the center"})
	assert.ErrorIs(t, err, ErrShutdown)
}

// A mask image marks the cells to repaint: by transparency when it has
// any, else by lightness.
func TestMaskGrid(t *testing.T) {
	m := image.NewNRGBA(image.Rect(0, 0, 8, 8))
	for y := 0; y < 8; y++ {
		for x := 0; x < 8; x++ {
			a := uint8(255)
			if x < 4 && y < 4 {
				a = 0
			}
			m.SetNRGBA(x, y, color.NRGBA{0, 0, 0, a})
		}
	}
	g := maskCells(MaskPixels(m), 8, 8, 8, 8, 4)
	assert.Equal(t, []bool{true, false, false, false}, g)
	gray := image.NewGray(image.Rect(0, 0, 8, 8))
	for x := 0; x < 8; x++ {
		gray.SetGray(x, 7, color.Gray{Y: 255})
		gray.SetGray(x, 6, color.Gray{Y: 255})
		gray.SetGray(x, 5, color.Gray{Y: 255})
	}
	// 3 of 4 rows of the bottom cells painted: > half.
	assert.Equal(t, []bool{false, false, true, true}, maskCells(MaskPixels(gray), 8, 8, 8, 8, 4))
	// A 10x9 image encoded at 8x8: cells cover 5x4 (then 5x5) original pixels;
	// the left 5 columns painted fill the left cells.
	left := image.NewGray(image.Rect(0, 0, 10, 9))
	for y := 0; y < 9; y++ {
		for x := 0; x < 5; x++ {
			left.SetGray(x, y, color.Gray{Y: 255})
		}
	}
	assert.Equal(t, []bool{true, false, true, false}, maskCells(MaskPixels(left), 10, 9, 8, 8, 4))
}

// Understanding decodes batch too, beside image decodes, with the answers
// they give alone.
func TestBatcherUnderstand(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	w, h := p.NativeSize()
	imgs := []image.Image{square(w, h, color.NRGBA{255, 0, 0, 255}), square(w, h, color.NRGBA{0, 0, 255, 255})}
	reqs := []UnderstandRequest{
		{Question: "What is in the image?", Image: imgs[0], InputArea: w * h,
			Sampling: TextSampling{Steps: 8, GenLength: 16, BlockLength: 16}},
		{Question: "What is in the image?", Image: imgs[1], InputArea: w * h,
			Sampling: TextSampling{Steps: 8, GenLength: 16, BlockLength: 8, Temperature: 0.8, Seed: 3}},
		{Question: "What is in the image?", Image: imgs[1], InputArea: w * h,
			Sampling: TextSampling{Steps: 8, GenLength: 16, BlockLength: 16, CFGScale: 0.5, Temperature: 0.5, Seed: 4}},
	}
	alone := make([]string, len(reqs))
	for i, r := range reqs {
		var err error
		alone[i], err = p.Understand(ctx, r)
		require.NoError(t, err)
	}
	q, err := OpenPipeline(ctx, ShippedModelDir(), PipelineOptions{LoadOptions: LoadOptions{Library: p.Model.Runtime().Library()},
		MaxConcurrent: 8})
	require.NoError(t, err)
	defer q.Close()
	b, err := q.NewBatcher(BatchOptions{Seqs: 8})
	require.NoError(t, err)
	defer b.Close()
	got := make([]string, len(reqs))
	errs := make([]error, len(reqs)+1)
	var wg sync.WaitGroup
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = b.Understand(ctx, r)
		}()
	}
	wg.Add(1)
	go func() { // an image decode in the same batch
		defer wg.Done()
		_, errs[len(reqs)] = b.GenerateImage(ctx, ImageRequest{Prompt: "a red circle at the center",
			Sampling: ImageSampling{Steps: 8}})
	}()
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	assert.Equal(t, alone, got)
	t.Logf("answers: %q; %+v", got, b.Stats())
	st := b.Stats()
	assert.EqualValues(t, len(reqs)+1, st.Requests)
	assert.Less(t, st.Forwards, st.Steps, "decodes shared forwards")
}
