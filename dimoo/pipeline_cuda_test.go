package dimoo

import (
	"context"
	"image"
	"image/color"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// samePixels is the fraction of pixels two images of the same size share exactly.
func samePixels(a, b image.Image) float64 {
	r := a.Bounds()
	same := 0
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			if color.NRGBAModel.Convert(a.At(x, y)) == color.NRGBAModel.Convert(b.At(x, y)) {
				same++
			}
		}
	}
	return float64(same) / float64(r.Dx()*r.Dy())
}

// Every task through the CUDA backend next to the CPU backend, on the shipped
// model, same requests and seeds: the device-resident path (kept logits, the
// device samplers, graphs, the GPU VQ decoder) must land on the CPU's
// pictures and answer. The GPU computes in bf16, so a decision may flip at a
// near tie; the pictures must still agree on 90% of their pixels. Runs where
// the library sees a CUDA device: a GPU, or the host emulation
// (DIMOO_LIBRARY=build-emu/lib/libdimoo.so, `make test-emu`).
func TestPipelineCUDAMatchesCPU(t *testing.T) {
	lib := testLibrary(t)
	if lib.DeviceCount(BackendCUDA) == 0 {
		t.Skip("no CUDA device")
	}
	dir := ShippedModelDir()
	if dir == "" {
		t.Skip("no shipped model under models/")
	}
	ctx := context.Background()
	var p [2]*Pipeline
	for i, be := range []Backend{BackendCPU, BackendCUDA} {
		var err error
		p[i], err = OpenPipeline(ctx, dir, PipelineOptions{LoadOptions: LoadOptions{Library: lib, Backend: be}})
		require.NoError(t, err)
		t.Cleanup(func() { p[i].Close() })
	}
	w, h := p[0].NativeSize()
	in := square(w, h, color.NRGBA{255, 0, 0, 255})
	tasks := []struct {
		name string
		run  func(p *Pipeline) (image.Image, error)
	}{
		{"t2i", func(p *Pipeline) (image.Image, error) {
			return p.GenerateImage(ctx, ImageRequest{Prompt: "a red circle at the top left",
				Sampling: ImageSampling{Steps: 8, Temperature: 0.5, Seed: 1}})
		}},
		{"t2i_mlcache", func(p *Pipeline) (image.Image, error) {
			return p.GenerateImage(ctx, ImageRequest{Prompt: "a blue square at the center",
				Sampling: ImageSampling{Steps: 8, Temperature: 0.5, Seed: 4, UseCache: true}})
		}},
		{"edit", func(p *Pipeline) (image.Image, error) {
			return p.EditImage(ctx, EditRequest{Prompt: "change the color to blue", Image: in, InputArea: w * h,
				Sampling: ImageSampling{Steps: 8, Seed: 2}})
		}},
		{"inpaint", func(p *Pipeline) (image.Image, error) {
			return p.Inpaint(ctx, InpaintRequest{Prompt: "a red square at the top left", Image: in, InputArea: w * h,
				Sampling: ImageSampling{Steps: 8, Seed: 3}})
		}},
	}
	for _, task := range tasks {
		var img [2]image.Image
		for i := range p {
			var err error
			img[i], err = task.run(p[i])
			require.NoError(t, err, task.name)
		}
		frac := samePixels(img[0], img[1])
		t.Logf("%s: %.1f%% of the pixels equal", task.name, 100*frac)
		assert.GreaterOrEqual(t, frac, 0.9, task.name)
	}
	var ans [2]string
	for i := range p {
		var err error
		ans[i], err = p[i].Understand(ctx, UnderstandRequest{Question: "What is in the image?", Image: in,
			InputArea: w * h, Sampling: TextSampling{Steps: 16, GenLength: 16, BlockLength: 16}})
		require.NoError(t, err)
	}
	t.Logf("understand: cpu %q, cuda %q", ans[0], ans[1])
	assert.Equal(t, ans[0], ans[1])
}
