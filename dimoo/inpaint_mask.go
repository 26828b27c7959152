package dimoo

import (
	"context"
	"fmt"
	"image"
	"image/color"
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

// maskCells maps a W x H mask (white = paint) onto the code grid of the
// image encoded at wp x hp (its size rounded down to multiples of f): a
// cell is regenerated when more than half of the pixels it covers in the
// original image are painted, as the official rectangle masks are.
func maskCells(mask *image.Gray, W, H, wp, hp, f int) []bool {
	gw, gh := wp/f, hp/f
	out := make([]bool, gw*gh)
	for cy := 0; cy < gh; cy++ {
		y0, y1 := cy*f*H/hp, (cy+1)*f*H/hp
		for cx := 0; cx < gw; cx++ {
			x0, x1 := cx*f*W/wp, (cx+1)*f*W/wp
			n := 0
			for y := y0; y < y1; y++ {
				for x := x0; x < x1; x++ {
					if mask.Pix[y*mask.Stride+x] > 127 {
						n++
					}
				}
			}
			out[cy*gw+cx] = 2*n > (y1-y0)*(x1-x0)
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
	if req.CFGScale == 0 {
		req.CFGScale = guidanceDefault(p.defaults.Sampling.CFGScale, 4.0)
	}
	painted := MaskPixels(mask)
	if err := p.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.slots.Release(1)
	if err := checkGuidance("cfg_scale", req.CFGScale); err != nil {
		return nil, err
	}
	if err := p.checkOutputSize(req.Image.Bounds().Dx(), req.Image.Bounds().Dy()); err != nil {
		return nil, err
	}
	in, err := p.inputs().inpaintCells(ctx, req.Prompt, req.Image, func(W, H, wp, hp, f int) []bool {
		return maskCells(painted, W, H, wp, hp, f)
	})
	if err != nil {
		return nil, err
	}
	return p.decodeGuided(ctx, in, req.CFGScale, req.Sampling, req.Progress, req.Stats)
}
