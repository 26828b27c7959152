package shapes

import (
	"image"
	"image/color"
	"math"
	"sort"
)

// Checker thresholds of eval_small.check_image.
const (
	farDist     = 60.0 // a pixel farther than this from the background is a shape pixel
	minPixels   = 12   // fewer shape (or core) pixels: no shape
	alphaFloor  = 0.1  // coverage below this counts as background
	coreAlpha   = 0.5  // coverage above this is the shape's core
	centreRange = 4.0  // |centroid - 16| below this on both axes: "center"
	squareFill  = 0.92 // bounding-box fill above this: square
	circleFill  = 0.69 // above this (and not a square): circle, else triangle
)

// analysis holds check_image's intermediate values; tests compare them bit
// for bit with the Python ones.
type analysis struct {
	bg       [3]float64
	modeKey  int64
	n        int
	median   float64
	inner    [3]float64
	alphaSum float64
	core     int
	cy, cx   float64
	fill     float64
	box      [4]int // y0, y1, x0, x1
	stage    string // "few_far_pixels", "small_core" or "done"
	verdict  Combo
}

// Check decides the (color, shape, position) of a 32x32 image exactly as
// eval_small.check_image does, so that Go evaluations score generated images
// the way the Python reports do. It returns false when no shape is found or
// the image is not 32x32. Only the RGB channels are read (non-premultiplied).
func Check(img image.Image) (Combo, bool) {
	a, ok := analyse(img)
	if !ok || a.stage != "done" {
		return Combo{}, false
	}
	return a.verdict, true
}

// rgb reads the image as float64 RGB rows, numpy's img.astype(np.float64).
func rgb(img image.Image) (*[Size][Size][3]float64, bool) {
	b := img.Bounds()
	if b.Dx() != Size || b.Dy() != Size {
		return nil, false
	}
	var im [Size][Size][3]float64
	for y := 0; y < Size; y++ {
		for x := 0; x < Size; x++ {
			c := color.NRGBAModel.Convert(img.At(b.Min.X+x, b.Min.Y+y)).(color.NRGBA)
			im[y][x] = [3]float64{float64(c.R), float64(c.G), float64(c.B)}
		}
	}
	return &im, true
}

// sumSq3 is ((v)**2).sum(-1) of a 3-vector: numpy adds left to right.
func sumSq3(a, b, c float64) float64 {
	return float64(float64(a*a)+float64(b*b)) + float64(c*c)
}

func analyse(img image.Image) (analysis, bool) {
	var a analysis
	im, ok := rgb(img)
	if !ok {
		return a, false
	}
	const H, W = Size, Size

	// Background: the most common border colour after /32 quantisation
	// (np.round: half to even; np.unique + argmax: the smallest key wins a tie).
	border := make([][3]float64, 0, 4*Size-4)
	border = append(border, im[0][:]...)
	border = append(border, im[H-1][:]...)
	for y := 1; y < H-1; y++ {
		border = append(border, im[y][0])
	}
	for y := 1; y < H-1; y++ {
		border = append(border, im[y][W-1])
	}
	keys := make([]int64, len(border))
	counts := map[int64]int{}
	for i, p := range border {
		q := func(v float64) int64 { return int64(math.RoundToEven(v / 32.0)) }
		keys[i] = q(p[0])*10000 + q(p[1])*100 + q(p[2])
		counts[keys[i]]++
	}
	best, bestN := int64(0), -1
	for k, n := range counts {
		if n > bestN || (n == bestN && k < best) {
			best, bestN = k, n
		}
	}
	a.modeKey = best
	// Integer sums are exact in float64, so the order of the mean's sum is moot.
	var sum [3]float64
	for i, p := range border {
		if keys[i] == best {
			for ch := 0; ch < 3; ch++ {
				sum[ch] += p[ch]
			}
		}
	}
	for ch := 0; ch < 3; ch++ {
		a.bg[ch] = sum[ch] / float64(bestN)
	}
	bg := a.bg

	// Shape pixels: farther than 60 from the background.
	var dist [H][W]float64
	var far []float64 // dist of the shape pixels, row-major (numpy's dist[m])
	var farPix [][3]float64
	for y := 0; y < H; y++ {
		for x := 0; x < W; x++ {
			p := im[y][x]
			dist[y][x] = math.Sqrt(sumSq3(p[0]-bg[0], p[1]-bg[1], p[2]-bg[2]))
			if dist[y][x] > farDist {
				far = append(far, dist[y][x])
				farPix = append(farPix, p)
			}
		}
	}
	a.n = len(far)
	if a.n < minPixels {
		a.stage = "few_far_pixels"
		return a, true
	}
	var mean [3]float64
	for ch := 0; ch < 3; ch++ {
		s := 0.0
		for _, p := range farPix {
			s += p[ch]
		}
		mean[ch] = s / float64(a.n)
	}

	// Colour: mean of the shape pixels at least as far as the median distance
	// (edge pixels blend into the background).
	sorted := append([]float64(nil), far...)
	sort.Float64s(sorted)
	if a.n%2 == 1 {
		a.median = sorted[a.n/2]
	} else {
		a.median = (sorted[a.n/2-1] + sorted[a.n/2]) / 2
	}
	var innerSum [3]float64
	nInner := 0
	for i, p := range farPix {
		if far[i] >= a.median {
			for ch := 0; ch < 3; ch++ {
				innerSum[ch] += p[ch]
			}
			nInner++
		}
	}
	for ch := 0; ch < 3; ch++ {
		a.inner[ch] = innerSum[ch] / float64(nInner)
	}
	colorIdx, bestD := 0, math.Inf(1)
	for i, name := range Colors {
		pc := Palette[name]
		d := sumSq3(float64(pc.R)-a.inner[0], float64(pc.G)-a.inner[1], float64(pc.B)-a.inner[2])
		if d < bestD { // np.argmin: first minimum
			colorIdx, bestD = i, d
		}
	}

	// Soft coverage: projection of (pixel - bg) on (mean - bg), clipped.
	// numpy does these 3-term products in OpenBLAS (dgemv for the pixels,
	// ddot for fg.fg) with fused multiply-adds in this order.
	fg := [3]float64{mean[0] - bg[0], mean[1] - bg[1], mean[2] - bg[2]}
	den := math.FMA(fg[2], fg[2], math.FMA(fg[1], fg[1], float64(fg[0]*fg[0])))
	if den < 1e-6 {
		den = 1e-6
	}
	var alpha [H * W]float64
	for y := 0; y < H; y++ {
		for x := 0; x < W; x++ {
			p := im[y][x]
			d0, d1, d2 := p[0]-bg[0], p[1]-bg[1], p[2]-bg[2]
			num := math.FMA(d2, fg[2], math.FMA(d0, fg[0], float64(d1*fg[1])))
			v := math.Min(math.Max(num/den, 0), 1)
			if v < alphaFloor {
				v = 0
			}
			alpha[y*W+x] = v
			if v > coreAlpha {
				a.core++
			}
		}
	}
	a.alphaSum = pairwiseSum(alpha[:])
	if a.core < minPixels {
		a.stage = "small_core"
		return a, true
	}

	// Centroid (alpha-weighted, pixel centres at +0.5) and the core's box.
	var wy, wx [H * W]float64
	y0, y1, x0, x1 := H, 0, W, 0
	for y := 0; y < H; y++ {
		for x := 0; x < W; x++ {
			w := alpha[y*W+x]
			wy[y*W+x] = w * (float64(y) + 0.5)
			wx[y*W+x] = w * (float64(x) + 0.5)
			if w > coreAlpha {
				y0, y1 = min(y0, y), max(y1, y+1)
				x0, x1 = min(x0, x), max(x1, x+1)
			}
		}
	}
	a.cy = pairwiseSum(wy[:]) / a.alphaSum
	a.cx = pairwiseSum(wx[:]) / a.alphaSum
	position := ""
	if math.Abs(a.cy-H/2) < centreRange && math.Abs(a.cx-W/2) < centreRange {
		position = "center"
	} else {
		if a.cy < H/2 {
			position = "top "
		} else {
			position = "bottom "
		}
		if a.cx < W/2 {
			position += "left"
		} else {
			position += "right"
		}
	}

	// Fill ratio of the coverage over the core's bounding box. numpy copies
	// the strided block to a contiguous buffer and sums it pairwise.
	block := make([]float64, 0, (y1-y0)*(x1-x0))
	for y := y0; y < y1; y++ {
		block = append(block, alpha[y*W+x0:y*W+x1]...)
	}
	a.box = [4]int{y0, y1, x0, x1}
	a.fill = pairwiseSum(block) / float64((y1-y0)*(x1-x0))
	shape := "triangle"
	if a.fill > squareFill {
		shape = "square"
	} else if a.fill > circleFill {
		shape = "circle"
	}
	a.stage = "done"
	a.verdict = Combo{Colors[colorIdx], shape, position}
	return a, true
}

// pairwiseSum is numpy's float64 add.reduce of a contiguous array (pairwise
// summation with 8 accumulators in blocks of up to 128), whose rounding
// decides borderline centroids and fill ratios.
func pairwiseSum(a []float64) float64 {
	n := len(a)
	switch {
	case n < 8:
		res := 0.0
		for _, v := range a {
			res += v
		}
		return res
	case n <= 128:
		var r [8]float64
		copy(r[:], a[:8])
		i := 8
		for ; i < n-n%8; i += 8 {
			for j := 0; j < 8; j++ {
				r[j] += a[i+j]
			}
		}
		res := ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
		for ; i < n; i++ {
			res += a[i]
		}
		return res
	default:
		n2 := n / 2
		n2 -= n2 % 8
		return pairwiseSum(a[:n2]) + pairwiseSum(a[n2:])
	}
}
