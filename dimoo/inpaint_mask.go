package dimoo

import (
	"context"
	"fmt"
	"image"
	"image/color"
	"image/draw"
)

// MaskPixels reads an inpainting mask: with transparency (any alpha below
// opaque), the transparent pixels (alpha < 50%) are the ones to repaint, as
// in OpenAI's image edits; otherwise the light ones (luma > 50%, white =
// repaint), as in diffusers' inpainting. The result is white where to paint.
func MaskPixels(m image.Image) *image.Gray {
	b := m.Bounds()
	hasAlpha := false
	for y := b.Min.Y; y < b.Max.Y && !hasAlpha; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			if _, _, _, a := m.At(x, y).RGBA(); a < 0xffff {
				hasAlpha = true
				break
			}
		}
	}
	g := image.NewGray(image.Rect(0, 0, b.Dx(), b.Dy()))
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			var paint bool
			if hasAlpha {
				_, _, _, a := m.At(x, y).RGBA()
				paint = a < 0x8000
			} else {
				paint = color.GrayModel.Convert(m.At(x, y)).(color.Gray).Y > 127
			}
			if paint {
				g.SetGray(x-b.Min.X, y-b.Min.Y, color.Gray{Y: 255})
			}
		}
	}
	return g
}

// maskGrid maps a mask (white = paint) onto the gw x gh code grid of an
// input cropped and resized to w x h: the mask gets the same crop and
// resize, and a cell is regenerated when more than half of it is painted.
func maskGrid(mask image.Image, w, h, gw, gh int) []bool {
	g := image.NewGray(image.Rect(0, 0, mask.Bounds().Dx(), mask.Bounds().Dy()))
	draw.Draw(g, g.Bounds(), mask, mask.Bounds().Min, draw.Src)
	r := CenterCropResize(g, w, h).(*image.RGBA)
	fx, fy := w/gw, h/gh
	out := make([]bool, gw*gh)
	for cy := 0; cy < gh; cy++ {
		for cx := 0; cx < gw; cx++ {
			sum := 0
			for y := cy * fy; y < (cy+1)*fy; y++ {
				for x := cx * fx; x < (cx+1)*fx; x++ {
					sum += int(r.Pix[y*r.Stride+4*x])
				}
			}
			out[cy*gw+cx] = 2*sum > 255*fx*fy
		}
	}
	return out
}

// InpaintMask regenerates the parts of req.Image that a mask image marks
// (see MaskPixels; it must have the image's size), guided by req.Prompt.
// req.MaskH, MaskW and Outpaint are not used.
func (p *Pipeline) InpaintMask(ctx context.Context, req InpaintRequest, mask image.Image) (image.Image, error) {
	if req.Image == nil || mask == nil {
		return nil, fmt.Errorf("%w: inpainting needs an image and a mask", ErrInvalidArgument)
	}
	if ib, mb := req.Image.Bounds(), mask.Bounds(); ib.Dx() != mb.Dx() || ib.Dy() != mb.Dy() {
		return nil, fmt.Errorf("%w: the mask is %dx%d but the image is %dx%d", ErrInvalidArgument, mb.Dx(), mb.Dy(),
			ib.Dx(), ib.Dy())
	}
	if req.InputArea == 0 {
		req.InputArea = 1024 * 1024
	}
	if req.CFGScale == 0 {
		req.CFGScale = guidanceDefault(p.defaults.Sampling.CFGScale, 4.0)
	}
	painted := MaskPixels(mask)
	if err := p.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.slots.Release(1)
	grid, w, h, err := p.encodeInput(ctx, req.Image, req.InputArea)
	if err != nil {
		return nil, err
	}
	gw, gh, err := p.gridSize(w, h)
	if err != nil {
		return nil, err
	}
	codes := make([]int32, 0, gw*gh)
	for _, t := range grid[1 : len(grid)-1] {
		if t != p.Special.Newline {
			codes = append(codes, t)
		}
	}
	n := 0
	for i, m := range maskGrid(painted, w, h, gw, gh) {
		if m {
			codes[i] = p.Special.Mask
			n++
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("%w: the mask covers no code cell of the %dx%d grid (more than half of a %dx%d cell must be painted)",
			ErrInvalidArgument, gw, gh, w/gw, h/gh)
	}
	answer := p.Special.answerImage(codes, gh, gw)
	prefixes := [][]int32{p.Tokenizer.Encode(promptText(SystemTextToImage, req.Prompt))}
	if req.CFGScale > 0 {
		prefixes = append(prefixes, p.Tokenizer.Encode(uncondText(SystemTextToImage)))
	}
	return p.decodeImage(ctx, prefixes, cfgWeights(req.CFGScale), answer, gw, gh, p.imageSampling(req.Sampling),
		req.Progress, req.Stats)
}
