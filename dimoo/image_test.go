package dimoo

import (
	"image"
	"image/color"
	"image/jpeg"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func uniformImage(w, h int, c color.NRGBA) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for i := 0; i < w*h; i++ {
		copy(img.Pix[4*i:], []uint8{c.R, c.G, c.B, c.A})
	}
	return img
}

func TestLoadSaveImage(t *testing.T) {
	dir := t.TempDir()
	img := image.NewNRGBA(image.Rect(0, 0, 7, 5))
	for i := range img.Pix {
		img.Pix[i] = uint8(i * 7)
	}
	for i := 3; i < len(img.Pix); i += 4 {
		img.Pix[i] = 255
	}
	p := filepath.Join(dir, "a.png")
	require.NoError(t, SavePNG(p, img))
	got, err := LoadImage(p)
	require.NoError(t, err)
	assert.Equal(t, ImageToPixels(img), ImageToPixels(got))

	// JPEG: decodes to about the same colours.
	jp := filepath.Join(dir, "a.jpg")
	f, err := os.Create(jp)
	require.NoError(t, err)
	require.NoError(t, jpeg.Encode(f, uniformImage(16, 16, color.NRGBA{200, 100, 50, 255}), &jpeg.Options{Quality: 95}))
	require.NoError(t, f.Close())
	got, err = LoadImage(jp)
	require.NoError(t, err)
	px := ImageToPixels(got)
	assert.InDelta(t, 200.0/255, px[0], 3.0/255)
	assert.InDelta(t, 100.0/255, px[1], 3.0/255)
	assert.InDelta(t, 50.0/255, px[2], 3.0/255)

	// Unreadable files name themselves.
	_, err = LoadImage(filepath.Join(dir, "missing.png"))
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "missing.png")
	bad := filepath.Join(dir, "bad.png")
	require.NoError(t, os.WriteFile(bad, []byte("not an image"), 0o644))
	_, err = LoadImage(bad)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "bad.png")
	assert.Error(t, SavePNG(filepath.Join(dir, "no", "such", "dir.png"), img))
}

func TestAspectBucket(t *testing.T) {
	for _, tc := range []struct{ sw, sh, w, h int }{
		{1000, 1000, 512, 512},
		{512, 512, 512, 512},
		{1920, 1080, 672, 384}, // 1.75 vs 1.78
		{1080, 1920, 384, 672},
		{800, 600, 576, 448},  // 1.29 vs 1.33
		{4000, 100, 3264, 96}, // 34:1 beats 64:1 for 40:1
	} {
		w, h := AspectBucket(tc.sw, tc.sh, 512*512, 32)
		assert.Equal(t, [2]int{tc.w, tc.h}, [2]int{w, h}, "%dx%d", tc.sw, tc.sh)
		assert.Zero(t, w%32)
		assert.Zero(t, h%32)
	}
	w, h := AspectBucket(0, 10, 512*512, 32)
	assert.Equal(t, [2]int{0, 0}, [2]int{w, h})
	w, h = AspectBucket(30, 20, 64*64, 16) // 1.5: 80x48 (1.67) or 64x64 (1) or 96x48 (2)... nearest ratio
	assert.InDelta(t, 1.5, float64(w)/float64(h), 0.2)
}

func TestCenterCropResize(t *testing.T) {
	// A wide image: red in the centre square, blue on the sides. A square
	// crop keeps only red.
	img := uniformImage(300, 100, color.NRGBA{0, 0, 255, 255})
	for y := 0; y < 100; y++ {
		for x := 100; x < 200; x++ {
			img.SetNRGBA(x, y, color.NRGBA{255, 0, 0, 255})
		}
	}
	out := CenterCropResize(img, 50, 50)
	require.Equal(t, image.Rect(0, 0, 50, 50), out.Bounds())
	for _, v := range chunks(ImageToPixels(out)) {
		assert.Equal(t, [3]float32{1, 0, 0}, v)
	}
	// Same size: a plain copy. Upscaling a uniform image stays uniform.
	same := CenterCropResize(img, 300, 100)
	assert.Equal(t, ImageToPixels(img), ImageToPixels(same))
	up := CenterCropResize(uniformImage(3, 5, color.NRGBA{10, 20, 30, 255}), 64, 32)
	require.Equal(t, image.Rect(0, 0, 64, 32), up.Bounds())
	for _, v := range chunks(ImageToPixels(up)) {
		assert.Equal(t, [3]float32{10.0 / 255, 20.0 / 255, 30.0 / 255}, v)
	}
	// Halving a checkerboard averages it to grey.
	cb := image.NewNRGBA(image.Rect(0, 0, 64, 64))
	for y := 0; y < 64; y++ {
		for x := 0; x < 64; x++ {
			v := uint8(255 * ((x + y) % 2))
			cb.SetNRGBA(x, y, color.NRGBA{v, v, v, 255})
		}
	}
	half := CenterCropResize(cb, 32, 32)
	for _, v := range chunks(ImageToPixels(half))[33:34] {
		assert.InDelta(t, 0.5, v[0], 0.02)
	}
	// A non-zero origin is honoured.
	sub := img.SubImage(image.Rect(100, 0, 200, 100))
	for _, v := range chunks(ImageToPixels(CenterCropResize(sub, 10, 10))) {
		assert.Equal(t, [3]float32{1, 0, 0}, v)
	}
	assert.True(t, CenterCropResize(img, 0, 5).Bounds().Empty())
}

func chunks(p []float32) [][3]float32 {
	out := make([][3]float32, len(p)/3)
	for i := range out {
		out[i] = [3]float32{p[3*i], p[3*i+1], p[3*i+2]}
	}
	return out
}

func TestSideBySide(t *testing.T) {
	a := uniformImage(4, 3, color.NRGBA{255, 0, 0, 255})
	b := uniformImage(2, 5, color.NRGBA{0, 255, 0, 255})
	s := SideBySide(a, b)
	require.Equal(t, image.Rect(0, 0, 6, 5), s.Bounds())
	px := chunks(ImageToPixels(s))
	assert.Equal(t, [3]float32{1, 0, 0}, px[0])     // (0, 0): a
	assert.Equal(t, [3]float32{0, 1, 0}, px[5])     // (5, 0): b
	assert.Equal(t, [3]float32{0, 0, 0}, px[4*6+0]) // (0, 4): below a
	assert.Equal(t, [3]float32{0, 1, 0}, px[4*6+4]) // (4, 4): b
}

func TestPixelConversions(t *testing.T) {
	img := PixelsToImage([]float32{-1, 0, 0.5, 1, 2, float32(math.NaN()), 0.2, 0.7, 0.0019}, 3, 1)
	assert.Equal(t, []uint8{0, 0, 128, 255, 255, 255, 0, 255, 51, 178, 0, 255}, img.Pix)
	// Every image type reads to the same floats.
	n := image.NewNRGBA(image.Rect(0, 0, 2, 2))
	for i := range n.Pix {
		n.Pix[i] = uint8(30 + 50*i)
	}
	for i := 3; i < 16; i += 4 {
		n.Pix[i] = 255
	}
	r := image.NewRGBA(n.Bounds())
	g := image.NewGray(n.Bounds())
	for y := 0; y < 2; y++ {
		for x := 0; x < 2; x++ {
			r.Set(x, y, n.At(x, y))
			g.Set(x, y, color.Gray{uint8(10 * (x + 2*y))})
		}
	}
	assert.Equal(t, ImageToPixels(n), ImageToPixels(r))
	gp := ImageToPixels(g)
	assert.Equal(t, []float32{0, 0, 0}, gp[0:3])
	assert.Equal(t, float32(30.0/255), gp[9])
	// Translucent RGBA un-premultiplies like NRGBA.
	tr := image.NewRGBA(image.Rect(0, 0, 1, 1))
	tr.Set(0, 0, color.NRGBA{200, 100, 0, 128})
	tn := image.NewNRGBA(tr.Bounds())
	tn.Set(0, 0, tr.At(0, 0))
	assert.Equal(t, ImageToPixels(tn), ImageToPixels(tr))
}
