package dimoo

// Resampling that gives the same bytes as PIL's Image.resize on 8-bit RGB
// images, which the official scripts use to prepare every input image (box
// halving and bicubic in the crop, Lanczos in the VQ-VAE's preprocessing).
// PIL resamples separably, horizontal pass first, with filter weights
// rounded to 22-bit fixed point and each pass rounded to 8 bits; this file
// does the same arithmetic in the same order, so the results are equal, not
// merely close (tested against Pillow in the official-inputs goldens).

import (
	"image"
	"image/color"
	"math"
)

// rgb8 is an 8-bit RGB raster, what PIL's "RGB" mode holds.
type rgb8 struct {
	w, h int
	pix  []uint8 // 3 bytes per pixel, rows top to bottom
}

// toRGB8 converts like PIL's convert("RGB"): un-premultiplied colours,
// alpha dropped.
func toRGB8(img image.Image) *rgb8 {
	b := img.Bounds()
	m := &rgb8{w: b.Dx(), h: b.Dy(), pix: make([]uint8, 0, 3*b.Dx()*b.Dy())}
	switch s := img.(type) {
	case *image.NRGBA:
		for y := b.Min.Y; y < b.Max.Y; y++ {
			row := s.Pix[s.PixOffset(b.Min.X, y):]
			for x := 0; x < m.w; x++ {
				m.pix = append(m.pix, row[4*x], row[4*x+1], row[4*x+2])
			}
		}
		return m
	case *image.RGBA:
		for y := b.Min.Y; y < b.Max.Y; y++ {
			row := s.Pix[s.PixOffset(b.Min.X, y):]
			for x := 0; x < m.w; x++ {
				p := row[4*x : 4*x+4]
				if p[3] == 255 {
					m.pix = append(m.pix, p[0], p[1], p[2])
					continue
				}
				c := color.NRGBAModel.Convert(color.RGBA{p[0], p[1], p[2], p[3]}).(color.NRGBA)
				m.pix = append(m.pix, c.R, c.G, c.B)
			}
		}
		return m
	}
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			c := color.NRGBAModel.Convert(img.At(x, y)).(color.NRGBA)
			m.pix = append(m.pix, c.R, c.G, c.B)
		}
	}
	return m
}

// image returns an opaque *image.NRGBA copy.
func (m *rgb8) image() *image.NRGBA {
	out := image.NewNRGBA(image.Rect(0, 0, m.w, m.h))
	for i := 0; i < m.w*m.h; i++ {
		copy(out.Pix[4*i:4*i+3], m.pix[3*i:3*i+3])
		out.Pix[4*i+3] = 255
	}
	return out
}

// crop copies the w x h rectangle at (x0, y0), which must lie inside.
func (m *rgb8) crop(x0, y0, w, h int) *rgb8 {
	out := &rgb8{w: w, h: h, pix: make([]uint8, 3*w*h)}
	for y := 0; y < h; y++ {
		copy(out.pix[3*y*w:3*(y+1)*w], m.pix[3*((y0+y)*m.w+x0):])
	}
	return out
}

// resampleFilter is one of PIL's filters: a kernel and its support at scale 1.
type resampleFilter struct {
	support float64
	kernel  func(float64) float64
}

var (
	filterBox = resampleFilter{0.5, func(x float64) float64 {
		if x > -0.5 && x <= 0.5 {
			return 1
		}
		return 0
	}}
	filterBicubic = resampleFilter{2, func(x float64) float64 {
		const a = -0.5
		if x < 0 {
			x = -x
		}
		if x < 1 {
			return float64(float64(float64((a+2)*x)-(a+3))*x)*x + 1
		}
		if x < 2 {
			return float64(float64(float64(float64(x-5)*x)+8)*x-4) * a
		}
		return 0
	}}
	filterLanczos = resampleFilter{3, func(x float64) float64 {
		if -3 <= x && x < 3 {
			return sinc(x) * sinc(x/3)
		}
		return 0
	}}
)

func sinc(x float64) float64 {
	if x == 0 {
		return 1
	}
	x = x * math.Pi
	return math.Sin(x) / x
}

// precision is PIL's fixed-point precision for 8-bit resampling.
const precision = 32 - 8 - 2

// coeffs are one pass's weights: for output i, ksize fixed-point weights
// starting at source index first[i], n[i] of them used.
type coeffs struct {
	ksize    int
	first, n []int
	k        []int32
}

// precomputeCoeffs follows PIL's precompute_coeffs and
// normalize_coeffs_8bpc for a pass from inSize to outSize samples.
func precomputeCoeffs(inSize, outSize int, f resampleFilter) coeffs {
	scale := float64(inSize) / float64(outSize)
	filterscale := scale
	if filterscale < 1 {
		filterscale = 1
	}
	support := f.support * filterscale
	ksize := int(math.Ceil(support))*2 + 1
	c := coeffs{ksize: ksize, first: make([]int, outSize), n: make([]int, outSize), k: make([]int32, outSize*ksize)}
	w := make([]float64, ksize)
	for xx := 0; xx < outSize; xx++ {
		center := float64((float64(xx) + 0.5) * scale)
		ss := 1 / filterscale
		xmin := int(center - support + 0.5) // truncation, as C's (int)
		if xmin < 0 {
			xmin = 0
		}
		xmax := int(center + support + 0.5)
		if xmax > inSize {
			xmax = inSize
		}
		xmax -= xmin
		ww := 0.0
		for x := 0; x < xmax; x++ {
			w[x] = f.kernel(float64(float64(x+xmin)-center+0.5) * ss)
			ww += w[x]
		}
		for x := 0; x < xmax; x++ {
			v := w[x]
			if ww != 0 {
				v /= ww
			}
			if v < 0 {
				c.k[xx*ksize+x] = int32(-0.5 + float64(v*(1<<precision)))
			} else {
				c.k[xx*ksize+x] = int32(0.5 + float64(v*(1<<precision)))
			}
		}
		c.first[xx], c.n[xx] = xmin, xmax
	}
	return c
}

func clip8(v int32) uint8 {
	v >>= precision
	if v < 0 {
		return 0
	}
	if v > 255 {
		return 255
	}
	return uint8(v)
}

// resize is PIL's Image.resize((w, h), filter) on an RGB image: a copy
// when the size is unchanged, else a horizontal pass (when the width
// changes) then a vertical pass (when the height changes).
func (m *rgb8) resize(w, h int, f resampleFilter) *rgb8 {
	src := m
	if w != src.w {
		c := precomputeCoeffs(src.w, w, f)
		out := &rgb8{w: w, h: src.h, pix: make([]uint8, 3*w*src.h)}
		for y := 0; y < src.h; y++ {
			row := src.pix[3*y*src.w:]
			for xx := 0; xx < w; xx++ {
				k := c.k[xx*c.ksize:]
				var s0, s1, s2 int32 = 1 << (precision - 1), 1 << (precision - 1), 1 << (precision - 1)
				for x := 0; x < c.n[xx]; x++ {
					p := row[3*(x+c.first[xx]):]
					s0 += int32(p[0]) * k[x]
					s1 += int32(p[1]) * k[x]
					s2 += int32(p[2]) * k[x]
				}
				o := out.pix[3*(y*w+xx):]
				o[0], o[1], o[2] = clip8(s0), clip8(s1), clip8(s2)
			}
		}
		src = out
	}
	if h != src.h {
		c := precomputeCoeffs(src.h, h, f)
		out := &rgb8{w: src.w, h: h, pix: make([]uint8, 3*src.w*h)}
		for yy := 0; yy < h; yy++ {
			k := c.k[yy*c.ksize:]
			for x := 0; x < src.w; x++ {
				var s0, s1, s2 int32 = 1 << (precision - 1), 1 << (precision - 1), 1 << (precision - 1)
				for y := 0; y < c.n[yy]; y++ {
					p := src.pix[3*((y+c.first[yy])*src.w+x):]
					s0 += int32(p[0]) * k[y]
					s1 += int32(p[1]) * k[y]
					s2 += int32(p[2]) * k[y]
				}
				o := out.pix[3*(yy*src.w+x):]
				o[0], o[1], o[2] = clip8(s0), clip8(s1), clip8(s2)
			}
		}
		src = out
	}
	if src == m {
		return &rgb8{w: m.w, h: m.h, pix: append([]uint8(nil), m.pix...)}
	}
	return src
}
