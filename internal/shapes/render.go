package shapes

import (
	"fmt"
	"image"
)

// Jitter ranges of shapes_data.jitter: a side of 10..12 pixels and an offset
// of -1..1 pixels on each axis.
const (
	MinJitterSize   = 10
	MaxJitterSize   = 12
	MaxJitterOffset = 1
)

// NumJitters is the number of distinct (size, dy, dx) jitter triples.
const NumJitters = (MaxJitterSize - MinJitterSize + 1) * (2*MaxJitterOffset + 1) * (2*MaxJitterOffset + 1)

// JitterOf maps any index onto the 27 jitter triples (index mod 27; size
// slowest, then dy, then dx), so that loops can cover every variant without
// going through the seeded generator.
func JitterOf(i int) (size, dy, dx int) {
	k := i % NumJitters
	if k < 0 {
		k += NumJitters
	}
	return MinJitterSize + k/9, k/3%3 - 1, k%3 - 1
}

// Jitter is shapes_data.jitter: the (size, dy, dx) that numpy's
// RandomState(seed mod 2^32) draws with randint(10, 13), randint(-1, 2),
// randint(-1, 2), so Go can render exactly the training image of a seed.
func Jitter(seed int64) (size, dy, dx int) {
	var mt mt19937
	mt.seed(uint32(uint64(seed))) // Python's int(seed) % 2**32
	size = MinJitterSize + int(mt.boundedMasked(2))
	dy = -1 + int(mt.boundedMasked(2))
	dx = -1 + int(mt.boundedMasked(2))
	return size, dy, dx
}

// mt19937 is numpy's legacy MT19937 (init_genrand seeding, genrand_int32).
type mt19937 struct {
	key [624]uint32
	pos int
}

func (m *mt19937) seed(s uint32) {
	for i := 0; i < 624; i++ {
		m.key[i] = s
		s = 1812433253*(s^(s>>30)) + uint32(i) + 1
	}
	m.pos = 624
}

func (m *mt19937) next() uint32 {
	const upper, lower, matrixA = 0x80000000, 0x7fffffff, 0x9908b0df
	if m.pos >= 624 {
		k := &m.key
		for i := 0; i < 624; i++ {
			y := k[i]&upper | k[(i+1)%624]&lower
			v := k[(i+397)%624] ^ y>>1
			if y&1 != 0 {
				v ^= matrixA
			}
			k[i] = v
		}
		m.pos = 0
	}
	y := m.key[m.pos]
	m.pos++
	y ^= y >> 11
	y ^= y << 7 & 0x9d2c5680
	y ^= y << 15 & 0xefc60000
	y ^= y >> 18
	return y
}

// boundedMasked draws uniformly from 0..rng by masked rejection, numpy's
// legacy bounded integer method (one 32-bit draw per try).
func (m *mt19937) boundedMasked(rng uint32) uint32 {
	mask := rng
	for i := uint(1); i < 32; i <<= 1 {
		mask |= mask >> i
	}
	for {
		if v := m.next() & mask; v <= rng {
			return v
		}
	}
}

// shapeMask is shapes_data.shape_mask for an explicit jitter, with the same
// float64 pixel-centre arithmetic so that pixels on the boundary fall on the
// same side as in numpy.
func shapeMask(shape, position string, size, dy, dx int) (*[Size][Size]bool, error) {
	cen, ok := centers[position]
	if !ok {
		return nil, fmt.Errorf("shapes: unknown position %q", position)
	}
	if !contains(Shapes, shape) {
		return nil, fmt.Errorf("shapes: unknown shape %q", shape)
	}
	if size < MinJitterSize || size > MaxJitterSize || dy < -MaxJitterOffset || dy > MaxJitterOffset ||
		dx < -MaxJitterOffset || dx > MaxJitterOffset {
		return nil, fmt.Errorf("shapes: jitter (size %d, dy %d, dx %d) out of range", size, dy, dx)
	}
	s := float64(size)
	cy, cx := cen[0]+float64(dy), cen[1]+float64(dx)
	top, left := cy-s/2.0, cx-s/2.0
	r := s / 2.0
	var m [Size][Size]bool
	for i := 0; i < Size; i++ {
		yy := float64(i) + 0.5
		for j := 0; j < Size; j++ {
			xx := float64(j) + 0.5
			var in bool
			switch shape {
			case "square":
				in = yy >= top && yy < top+s && xx >= left && xx < left+s
			case "circle":
				// Explicit conversions forbid fused multiply-adds (numpy rounds each step).
				in = float64((yy-cy)*(yy-cy))+float64((xx-cx)*(xx-cx)) <= r*r
			case "triangle":
				// Apex up: the half-width grows linearly down the rows.
				frac := (yy - top) / s
				half := float64(frac*s) / 2.0
				in = yy >= top && yy < top+s && abs(xx-cx) <= half
			}
			m[i][j] = in
		}
	}
	return &m, nil
}

func abs(x float64) float64 {
	if x < 0 {
		return -x
	}
	return x
}

// Render draws one combination on a background with an explicit jitter,
// pixel for pixel as shapes_data.render (take the jitter from Jitter(seed) to
// get the image of a jitter seed). Unknown names and out-of-range jitters are
// errors.
func Render(c Combo, background string, size, dy, dx int) (*image.RGBA, error) {
	bg, ok := BackgroundPalette[background]
	if !ok {
		return nil, fmt.Errorf("shapes: unknown background %q", background)
	}
	fg, ok := Palette[c.Color]
	if !ok {
		return nil, fmt.Errorf("shapes: unknown color %q", c.Color)
	}
	m, err := shapeMask(c.Shape, c.Position, size, dy, dx)
	if err != nil {
		return nil, err
	}
	img := image.NewRGBA(image.Rect(0, 0, Size, Size))
	for y := 0; y < Size; y++ {
		for x := 0; x < Size; x++ {
			col := bg
			if m[y][x] {
				col = fg
			}
			img.SetRGBA(x, y, col)
		}
	}
	return img, nil
}
