package dimoo

// The token sequences every task feeds the model, built as the official
// inference scripts build them (scripts/inference_t2i.py, inference_i2i.py,
// inference_mmu.py and their utils): checked token for token against
// sequences those scripts produced (testdata/official-inputs,
// scripts/gen_official_inputs.py).

import (
	"context"
	"fmt"
	"image"
	"math"
	"strings"
)

// Input-image crop lists. Image-to-image inputs are cropped to a size from
// the official 512 list, understanding inputs to one from the 1024 list: all
// (w, h) = (a*32, b*32) with a*b <= (side/32)^2 and an aspect ratio of at
// most 4. A checkpoint's dimoo.json "input_area" replaces both sides' areas
// (the shipped 32x32 model sets 1024, whose list is 32x32 alone).
const (
	CropPatch      = 32
	EditInputArea  = 512 * 512
	UnderInputArea = 1024 * 1024
)

// CropSizeList is the official generate_crop_size_list(numPatches, patch)
// with its maximum aspect ratio of 4, in its order.
func CropSizeList(numPatches, patch int) [][2]int {
	var out [][2]int
	wp, hp := numPatches, 1
	for wp > 0 {
		if float64(max(wp, hp))/float64(min(wp, hp)) <= 4.0 {
			out = append(out, [2]int{wp * patch, hp * patch})
		}
		if (hp+1)*wp <= numPatches {
			hp++
		} else {
			wp--
		}
	}
	return out
}

// PickCropSize is the official var_center_crop's choice for a w x h image:
// the size whose aspect ratio keeps the largest share of the image
// (min(cw/w, ch/h) / max(cw/w, ch/h)), ties to the larger size.
func PickCropSize(w, h int, list [][2]int) (cw, ch int) {
	best := -1.0
	for _, s := range list {
		a, b := float64(s[0])/float64(w), float64(s[1])/float64(h)
		r := math.Min(a, b) / math.Max(a, b)
		if r > best || (r == best && (s[0] > cw || (s[0] == cw && s[1] > ch))) {
			best, cw, ch = r, s[0], s[1]
		}
	}
	return cw, ch
}

// CropInput prepares an input image as the official center_crop does for a
// crop of cw x ch: halve with a box filter while both sides are at least
// twice the crop's, resize bicubically so that the crop just fits, then cut
// the crop out. The official offset is random; dimoo's is a function of the
// seed: centred (rounded down) for seed 0, otherwise offsets derived from
// the seed by SplitMix64 (x from the first output, y from the second), so a
// seed gives the same crop every time.
func CropInput(img image.Image, cw, ch int, seed uint64) image.Image {
	return cropInput(toRGB8(img), cw, ch, seed).image()
}

func cropInput(m *rgb8, cw, ch int, seed uint64) *rgb8 {
	for m.w >= 2*cw && m.h >= 2*ch {
		m = m.resize(m.w/2, m.h/2, filterBox)
	}
	scale := math.Max(float64(cw)/float64(m.w), float64(ch)/float64(m.h))
	m = m.resize(int(math.RoundToEven(float64(m.w)*scale)), int(math.RoundToEven(float64(m.h)*scale)), filterBicubic)
	x0, y0 := cropOffset(m.w-cw, seed, 0), cropOffset(m.h-ch, seed, 1)
	return m.crop(x0, y0, cw, ch)
}

// cropOffset picks an offset in [0, slack] for axis 0 (x) or 1 (y).
func cropOffset(slack int, seed uint64, axis int) int {
	if slack <= 0 {
		return 0
	}
	if seed == 0 {
		return slack / 2
	}
	z := seed
	for i := 0; i <= axis; i++ {
		z += 0x9e3779b97f4a7c15
	}
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	z ^= z >> 31
	return int(z % uint64(slack+1))
}

// ImageInputs are the sequences of an image request: one prefix per
// guidance branch, each followed by the same answer (begin-of-answer, the
// image grid, end-of-answer), which the sampler fills in.
//
//	text-to-image, inpainting: cond, uncond
//	image-to-image:            cond, text-uncond (uncond prompt, same images),
//	                           image-uncond (cond prompt, no image)
type ImageInputs struct {
	Prefixes      [][]int32
	Answer        []int32
	Width, Height int // output pixels
	GridW, GridH  int // output codes
}

// inputBuilder builds the sequences from a tokenizer, a VQ-VAE and the
// special ids; it needs no transformer.
type inputBuilder struct {
	tok      *Tokenizer
	vq       *VQModel
	special  SpecialTokens
	defaults Defaults
}

func (p *Pipeline) inputs() inputBuilder {
	return inputBuilder{tok: p.Tokenizer, vq: p.VQ, special: p.Special, defaults: p.defaults}
}

// FloorSize rounds a requested output size down to multiples of the VQ-VAE's
// factor, as the official text-to-image script does (its grid is h//16 x
// w//16). A side below one factor is an error.
func FloorSize(w, h, factor int) (int, int, error) {
	fw, fh := w/factor*factor, h/factor*factor
	if w <= 0 || h <= 0 || fw == 0 || fh == 0 {
		return 0, 0, fmt.Errorf("%w: image size %dx%d: both sides must be at least %d", ErrInvalidArgument, w, h, factor)
	}
	return fw, fh, nil
}

// textToImage: tok(cond) and tok(uncond), the answer all MASK.
func (b inputBuilder) textToImage(prompt string, w, h int) (ImageInputs, error) {
	w, h, err := FloorSize(w, h, b.vq.Factor())
	if err != nil {
		return ImageInputs{}, err
	}
	in := ImageInputs{Width: w, Height: h, GridW: w / b.vq.Factor(), GridH: h / b.vq.Factor()}
	in.Answer = b.special.answerImage(b.special.maskedCodes(in.GridW*in.GridH), in.GridH, in.GridW)
	in.Prefixes = [][]int32{b.tok.Encode(promptText(SystemTextToImage, prompt)),
		b.tok.Encode(uncondText(SystemTextToImage))}
	return in, nil
}

// cropArea is the crop-list area of a task: the checkpoint's, else the
// request's, else the official one.
func (b inputBuilder) cropArea(req, official int) int {
	if req > 0 {
		return req
	}
	if b.defaults.InputArea > 0 {
		return b.defaults.InputArea
	}
	return official
}

// encodeCropped crops an input image to its size from the list for `area`
// and encodes it: the grid (BOI, rows of codes each followed by a newline,
// EOI) and the crop size.
func (b inputBuilder) encodeCropped(ctx context.Context, img image.Image, area int, seed uint64) (grid []int32,
	w, h int, err error) {
	if img == nil || img.Bounds().Empty() {
		return nil, 0, 0, fmt.Errorf("%w: missing or empty input image", ErrInvalidArgument)
	}
	n := area / (CropPatch * CropPatch)
	if n < 1 {
		return nil, 0, 0, fmt.Errorf("%w: input area %d is below one %dx%d patch", ErrInvalidArgument, area,
			CropPatch, CropPatch)
	}
	src := toRGB8(img)
	w, h = PickCropSize(src.w, src.h, CropSizeList(n, CropPatch))
	grid, err = b.encodeGrid(ctx, cropInput(src, w, h, seed))
	return grid, w, h, err
}

// encodeGrid encodes an image whose sides are multiples of the factor into
// BOI, gh rows of gw codes each followed by a newline, EOI.
func (b inputBuilder) encodeGrid(ctx context.Context, m *rgb8) ([]int32, error) {
	codes, gh, gw, err := b.vq.Encode(ctx, m.image())
	if err != nil {
		return nil, err
	}
	return b.special.imageGrid(b.offsetCodes(codes), gh, gw), nil
}

func (b inputBuilder) offsetCodes(codes []int32) []int32 {
	ids := make([]int32, len(codes))
	for i, c := range codes {
		ids[i] = b.special.ImageOffset + c
	}
	return ids
}

// edit: the official image-to-image inputs. editType is an official name
// (see ResolveEditType).
func (b inputBuilder) edit(ctx context.Context, editType, prompt string, img, ref image.Image, area int,
	seed uint64) (ImageInputs, error) {
	system, user := editPrompt(editType, prompt)
	area = b.cropArea(area, EditInputArea)
	var images [][]int32
	out := img
	if twoImages(editType) {
		if ref == nil {
			return ImageInputs{}, fmt.Errorf("%w: edit type %s needs a style reference image", ErrInvalidArgument,
				editType)
		}
		// The content image (--image_path) comes first; the reference second,
		// and the output takes the reference's crop size.
		content, _, _, err := b.encodeCropped(ctx, img, area, seed)
		if err != nil {
			return ImageInputs{}, err
		}
		images = append(images, content)
		out = ref
	}
	grid, w, h, err := b.encodeCropped(ctx, out, area, seed)
	if err != nil {
		return ImageInputs{}, err
	}
	images = append(images, grid)
	f := b.vq.Factor()
	in := ImageInputs{Width: w, Height: h, GridW: w / f, GridH: h / f}
	in.Answer = b.special.answerImage(b.special.maskedCodes(in.GridW*in.GridH), in.GridH, in.GridW)
	cond := b.tok.Encode(promptText(system, user))
	in.Prefixes = [][]int32{withImages(cond, images...),
		withImages(b.tok.Encode(uncondText(system)), images...), cond}
	return in, nil
}

// Official inpainting defaults (--mask_h_ratio 1 --mask_w_ratio 0.2): a
// full-height band of a fifth of the width.
const (
	DefaultMaskH = 1.0
	DefaultMaskW = 0.2
)

// maskDefaults fills in the official ratios for zero values.
func maskDefaults(h, w float64) (float64, float64) {
	if h == 0 {
		h = DefaultMaskH
	}
	if w == 0 {
		w = DefaultMaskW
	}
	return h, w
}

// inpaint: the image keeps its own size, rounded down to multiples of the
// factor (resized with PIL's Lanczos, as the VQ-VAE's image processor does,
// only when it is not one already); its codes fill the answer except the
// painted cells, which are MASK.
func (b inputBuilder) inpaint(ctx context.Context, prompt string, img image.Image, maskH, maskW float64,
	outpaint bool) (ImageInputs, error) {
	return b.inpaintCells(ctx, prompt, img, func(W, H, wp, hp, f int) []bool {
		return paintMask(W, H, wp, hp, f, maskH, maskW, outpaint)
	})
}

// inpaintCells is inpaint with the painted cells of the wp x hp image's
// grid given by `cells` (W x H: the image's own size).
func (b inputBuilder) inpaintCells(ctx context.Context, prompt string, img image.Image,
	cells func(W, H, wp, hp, f int) []bool) (ImageInputs, error) {
	if img == nil || img.Bounds().Empty() {
		return ImageInputs{}, fmt.Errorf("%w: missing or empty input image", ErrInvalidArgument)
	}
	f := b.vq.Factor()
	src := toRGB8(img)
	W, H := src.w, src.h
	wp, hp, err := FloorSize(W, H, f)
	if err != nil {
		return ImageInputs{}, err
	}
	codes, gh, gw, err := b.vq.Encode(ctx, src.resize(wp, hp, filterLanczos).image())
	if err != nil {
		return ImageInputs{}, err
	}
	ids := b.offsetCodes(codes)
	painted := 0
	for i, m := range cells(W, H, wp, hp, f) {
		if m {
			ids[i] = b.special.Mask
			painted++
		}
	}
	if painted == 0 {
		return ImageInputs{}, fmt.Errorf("%w: the mask covers no code cell of the %dx%d grid", ErrInvalidArgument, gw, gh)
	}
	in := ImageInputs{Width: wp, Height: hp, GridW: gw, GridH: gh, Answer: b.special.answerImage(ids, gh, gw)}
	in.Prefixes = [][]int32{b.tok.Encode(promptText(SystemTextToImage, prompt)),
		b.tok.Encode(uncondText(SystemTextToImage))}
	return in, nil
}

// paintMask is the official encode_img_with_paint's mask: the centred
// rectangle is computed in the W x H image's pixels (mh = round(H*ratio),
// top = (H-mh)//2, likewise for the width), scaled to the encoded wp x hp
// image, area-averaged over each f x f cell, and a cell is painted when
// more than half of it is (outpainting: outside the rectangle).
func paintMask(W, H, wp, hp, f int, maskH, maskW float64, outpaint bool) []bool {
	mh := int(math.RoundToEven(float64(H) * maskH))
	mw := int(math.RoundToEven(float64(W) * maskW))
	top, left := (H-mh)/2, (W-mw)/2
	scaled := func(v, to, from int) int { return int(math.RoundToEven(float64(v*to) / float64(from))) }
	y0, x0 := scaled(top, hp, H), scaled(left, wp, W)
	y1, x1 := min(hp, y0+scaled(mh, hp, H)), min(wp, x0+scaled(mw, wp, W))
	gw, gh := wp/f, hp/f
	m := make([]bool, gw*gh)
	for r := 0; r < gh; r++ {
		for c := 0; c < gw; c++ {
			in := max(0, min(y1, (r+1)*f)-max(y0, r*f)) * max(0, min(x1, (c+1)*f)-max(x0, c*f))
			if outpaint {
				in = f*f - in
			}
			m[r*gw+c] = 2*in > f*f
		}
	}
	return m
}

// understand: tok(cond) with the image spliced before its last token, then
// BOA, genLength MASKs, EOA; the answer starts at `start`. The image grid
// has one newline per row: the official script inserts them a second time
// (and BOI/EOI twice), but training and the official evaluation insert them
// once, and we follow training.
func (b inputBuilder) understand(ctx context.Context, question string, img image.Image, area, genLength int,
	seed uint64) (seq []int32, start int, err error) {
	grid, _, _, err := b.encodeCropped(ctx, img, b.cropArea(area, UnderInputArea), seed)
	if err != nil {
		return nil, 0, err
	}
	seq = withImages(b.tok.Encode(promptText(SystemUnderstand, question)), grid)
	seq = append(seq, b.special.BOA)
	start = len(seq)
	seq = append(seq, b.special.maskedCodes(genLength)...)
	return append(seq, b.special.EOA), start, nil
}

// editTypeDefault is the edit type a request without one gets: the
// checkpoint's dimoo.json "edit_type", else the official default.
func (b inputBuilder) editTypeDefault() string {
	if t := strings.TrimSpace(b.defaults.EditType); t != "" {
		return t
	}
	return "canny_pred"
}
