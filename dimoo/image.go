package dimoo

// Images in and out of the pipeline: reading PNG/JPEG, writing PNG, a
// centre-crop-and-resize to an aspect bucket (for `dimoo vq-encode` on
// arbitrary images; the tasks prepare their inputs as the official scripts
// do, see CropInput), and a side-by-side view for comparisons.

import (
	"bufio"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	_ "image/jpeg" // registers the JPEG decoder for LoadImage
	"image/png"
	"io"
	"math"
	"os"
)

// MaxImagePixels is the largest image LoadImage decodes (width x height,
// read from the file's header first): a small compressed file can declare
// an image whose decoded pixels fill gigabytes.
var MaxImagePixels = 64 << 20

// LoadImage reads a PNG or JPEG file. A missing, unreadable or undecodable
// file, or one larger than MaxImagePixels, is an error wrapping
// ErrInvalidArgument that names it.
func LoadImage(path string) (image.Image, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("%w: image %v", ErrInvalidArgument, err)
	}
	defer f.Close()
	cfg, _, err := image.DecodeConfig(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("%w: image %s: not a readable PNG or JPEG: %v", ErrInvalidArgument, path, err)
	}
	if cfg.Width <= 0 || cfg.Height <= 0 || cfg.Width > MaxImagePixels/cfg.Height {
		return nil, fmt.Errorf("%w: image %s is %dx%d, more than the %d pixels dimoo decodes", ErrInvalidArgument,
			path, cfg.Width, cfg.Height, MaxImagePixels)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("%w: image %s: %v", ErrInvalidArgument, path, err)
	}
	img, _, err := image.Decode(bufio.NewReader(f))
	if err != nil {
		return nil, fmt.Errorf("%w: image %s: not a readable PNG or JPEG: %v", ErrInvalidArgument, path, err)
	}
	return img, nil
}

// SavePNG writes img to path as a PNG, replacing the file.
func SavePNG(path string, img image.Image) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("dimoo: save PNG: %w", err)
	}
	w := bufio.NewWriter(f)
	if err := png.Encode(w, img); err != nil {
		f.Close()
		return fmt.Errorf("dimoo: save PNG %s: %w", path, err)
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("dimoo: save PNG %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("dimoo: save PNG %s: %w", path, err)
	}
	return nil
}

// AspectBucket picks the output size for a srcW x srcH image: sides that are
// positive multiples of `multiple`, an area close to `area`, and the aspect
// ratio closest to the source's. For each width w = k*multiple the height is
// the multiple nearest area/w; among those sizes the one whose aspect ratio
// is nearest the source's in log scale wins, ties going to the area nearest
// `area`, then to the smaller width. A square source and area 512*512,
// multiple 32 gives 512 x 512. Non-positive arguments give (0, 0).
func AspectBucket(srcW, srcH, area, multiple int) (w, h int) {
	if srcW <= 0 || srcH <= 0 || area <= 0 || multiple <= 0 {
		return 0, 0
	}
	target := math.Log(float64(srcW) / float64(srcH))
	bestRatio, bestArea := math.Inf(1), math.Inf(1)
	for cw := multiple; cw <= area/multiple+multiple; cw += multiple {
		ch := int(math.Round(float64(area)/float64(cw)/float64(multiple))) * multiple
		if ch < multiple {
			ch = multiple
		}
		dr := math.Abs(math.Log(float64(cw)/float64(ch)) - target)
		da := math.Abs(float64(cw*ch - area))
		const eps = 1e-12
		if dr < bestRatio-eps || (math.Abs(dr-bestRatio) <= eps && da < bestArea) {
			bestRatio, bestArea, w, h = dr, da, cw, ch
		}
	}
	return w, h
}

// CenterCropResize crops the largest centred rectangle of img with the aspect
// ratio of w x h, then resamples it to exactly w x h pixels. Resampling is
// separable with a triangle (bilinear) kernel whose support widens with the
// reduction factor, so downscaling averages over the covered area (like
// PIL's BILINEAR resize) and upscaling interpolates bilinearly. Colours are
// filtered premultiplied by alpha. The result is an *image.RGBA at the
// origin; w or h <= 0 gives an empty image.
func CenterCropResize(img image.Image, w, h int) image.Image {
	if w <= 0 || h <= 0 || img.Bounds().Empty() {
		return image.NewRGBA(image.Rectangle{})
	}
	b := img.Bounds()
	sw, sh := b.Dx(), b.Dy()
	// Crop: keep the full width or the full height.
	cw, ch := sw, int(math.Round(float64(sw)*float64(h)/float64(w)))
	if ch > sh {
		cw, ch = int(math.Round(float64(sh)*float64(w)/float64(h))), sh
	}
	cw, ch = max(1, min(cw, sw)), max(1, min(ch, sh))
	x0, y0 := b.Min.X+(sw-cw)/2, b.Min.Y+(sh-ch)/2
	src := image.NewRGBA(image.Rect(0, 0, cw, ch))
	draw.Draw(src, src.Bounds(), img, image.Pt(x0, y0), draw.Src)
	if cw == w && ch == h {
		return src
	}
	// Horizontal pass into float rows, then vertical into the result.
	hx := resampleWeights(cw, w)
	tmp := make([]float32, ch*w*4)
	for y := 0; y < ch; y++ {
		row := src.Pix[y*src.Stride:]
		for x := 0; x < w; x++ {
			var acc [4]float32
			for i, wt := range hx.w[x] {
				p := row[4*(hx.first[x]+i):]
				for c := 0; c < 4; c++ {
					acc[c] += wt * float32(p[c])
				}
			}
			copy(tmp[(y*w+x)*4:], acc[:])
		}
	}
	vy := resampleWeights(ch, h)
	dst := image.NewRGBA(image.Rect(0, 0, w, h))
	for y := 0; y < h; y++ {
		for x := 0; x < w; x++ {
			var acc [4]float32
			for i, wt := range vy.w[y] {
				p := tmp[((vy.first[y]+i)*w+x)*4:]
				for c := 0; c < 4; c++ {
					acc[c] += wt * p[c]
				}
			}
			o := dst.Pix[y*dst.Stride+4*x:]
			a := clamp8(acc[3])
			o[3] = a
			for c := 0; c < 3; c++ {
				o[c] = min(clamp8(acc[c]), a) // premultiplied: colour <= alpha
			}
		}
	}
	return dst
}

// weights maps each output index to the source indices first..first+len(w)-1
// with normalised weights.
type weights struct {
	first []int
	w     [][]float32
}

// resampleWeights builds the triangle-kernel weights from n source samples
// to m output samples, pixel centres aligned.
func resampleWeights(n, m int) weights {
	scale := float64(n) / float64(m)
	support := math.Max(scale, 1) // kernel radius in source pixels
	ws := weights{first: make([]int, m), w: make([][]float32, m)}
	for i := 0; i < m; i++ {
		center := (float64(i) + 0.5) * scale
		lo := max(0, int(math.Floor(center-support)))
		hi := min(n, int(math.Ceil(center+support)))
		var row []float64
		sum := 0.0
		for j := lo; j < hi; j++ {
			d := math.Abs(float64(j)+0.5-center) / support
			wt := math.Max(0, 1-d)
			row = append(row, wt)
			sum += wt
		}
		if sum == 0 { // cannot happen with support >= 1, but stay safe
			j := min(n-1, max(0, int(center)))
			lo, row, sum = j, []float64{1}, 1
		}
		// Trim zero weights at the ends.
		for len(row) > 1 && row[0] == 0 {
			row, lo = row[1:], lo+1
		}
		for len(row) > 1 && row[len(row)-1] == 0 {
			row = row[:len(row)-1]
		}
		ws.first[i] = lo
		ws.w[i] = make([]float32, len(row))
		for k, v := range row {
			ws.w[i][k] = float32(v / sum)
		}
	}
	return ws
}

func clamp8(v float32) uint8 {
	if !(v > 0) {
		return 0
	}
	if v >= 255 {
		return 255
	}
	return uint8(v + 0.5)
}

// SideBySide places a and b next to each other, tops aligned, a on the left,
// on an opaque black canvas as tall as the taller one.
func SideBySide(a, b image.Image) image.Image {
	ab, bb := a.Bounds(), b.Bounds()
	out := image.NewRGBA(image.Rect(0, 0, ab.Dx()+bb.Dx(), max(ab.Dy(), bb.Dy())))
	draw.Draw(out, out.Bounds(), image.NewUniform(color.Black), image.Point{}, draw.Src)
	draw.Draw(out, image.Rect(0, 0, ab.Dx(), ab.Dy()), a, ab.Min, draw.Over)
	draw.Draw(out, image.Rect(ab.Dx(), 0, ab.Dx()+bb.Dx(), bb.Dy()), b, bb.Min, draw.Over)
	return out
}
