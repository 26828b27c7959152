package dimoo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"image"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The goldens in testdata/official-inputs are the sequences the official
// scripts built (scripts/gen_official_inputs.py): every task, every guidance
// branch, non-square images, on a byte-level BPE with the real special ids
// and a random VQ-VAE with the real factor of 16.

type officialImage struct{ W, H, Seed int }

type vqInput struct {
	W, H   int
	SHA256 string `json:"sha256"`
}

type officialCase struct {
	Name        string
	Task        string
	Prompt      string
	Width       int
	Height      int
	EditType    string `json:"edit_type"`
	Image       *officialImage
	RefImage    *officialImage `json:"ref_image"`
	MaskH       *float64       `json:"mask_h_ratio"`
	MaskW       *float64       `json:"mask_w_ratio"`
	Branches    [][]int32
	CodeStart   int `json:"code_start"`
	Grid        [2]int
	Seq         []int32
	AnswerStart int `json:"answer_start"`
	GenLength   int `json:"gen_length"`
	BlockLength int `json:"block_length"`
	Steps       int
	VQInputs    []vqInput `json:"vq_inputs"`
}

func officialCases(t *testing.T, task ...string) []officialCase {
	t.Helper()
	b, err := os.ReadFile(testdataDir("official-inputs", "cases.json"))
	require.NoError(t, err)
	var f struct{ Cases []officialCase }
	require.NoError(t, json.Unmarshal(b, &f))
	var out []officialCase
	for _, c := range f.Cases {
		for _, k := range task {
			if c.Task == k {
				out = append(out, c)
			}
		}
	}
	require.NotEmpty(t, out)
	return out
}

func officialBuilder(t *testing.T) inputBuilder {
	t.Helper()
	lib := testLibrary(t)
	tok, err := LoadTokenizer(testdataDir("official-inputs", "tokenizer.json"))
	require.NoError(t, err)
	vq, err := LoadVQModel(context.Background(), testdataDir("official-inputs", "vqvae"), LoadOptions{Library: lib})
	require.NoError(t, err)
	t.Cleanup(func() { vq.Close() })
	require.Equal(t, 16, vq.Factor())
	return inputBuilder{tok: tok, vq: vq, special: DefaultSpecialTokens()}
}

// officialPattern is gen_official_inputs.py's pattern(): the same integers.
func officialPattern(spec officialImage) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, spec.W, spec.H))
	for y := 0; y < spec.H; y++ {
		for x := 0; x < spec.W; x++ {
			o := img.Pix[img.PixOffset(x, y):]
			for c := 0; c < 3; c++ {
				v := (x*(17+2*c) + y*(31+4*c) + ((x * y) >> (4 + c)) + spec.Seed*37) ^ ((x>>3)*(y>>3)*13 + c*71)
				o[c] = uint8(v & 255)
			}
			o[3] = 255
		}
	}
	return img
}

func hashRGB(m *rgb8) string {
	s := sha256.Sum256(m.pix)
	return hex.EncodeToString(s[:])
}

// checkBranches compares dimoo's prefixes + answer with the official
// branches: the first is the whole conditional sequence, the others the
// prefixes the sampler puts before the answer (from code_start-2 on).
func checkBranches(t *testing.T, c officialCase, in ImageInputs) {
	t.Helper()
	require.Len(t, in.Prefixes, len(c.Branches))
	cond := append(append([]int32(nil), in.Prefixes[0]...), in.Answer...)
	require.Equal(t, c.Branches[0], cond, "%s: conditional sequence", c.Name)
	assert.Equal(t, c.Branches[0][c.CodeStart-2:], in.Answer, "%s: answer", c.Name)
	for i := 1; i < len(c.Branches); i++ {
		assert.Equal(t, c.Branches[i], in.Prefixes[i], "%s: branch %d", c.Name, i)
	}
	assert.Equal(t, c.Grid, [2]int{in.GridW, in.GridH}, "%s: grid (w, h)", c.Name)
}

// Item 10: text-to-image takes any size and floors it to multiples of 16
// (1000x600 gives a 62x37 grid), both branches as the official script.
func TestOfficialInputsTextToImage(t *testing.T) {
	b := officialBuilder(t)
	for _, c := range officialCases(t, "t2i") {
		in, err := b.textToImage(c.Prompt, c.Width, c.Height)
		require.NoError(t, err)
		checkBranches(t, c, in)
		assert.Equal(t, [2]int{c.Width / 16 * 16, c.Height / 16 * 16}, [2]int{in.Width, in.Height})
	}
	_, err := b.textToImage("x", 15, 600)
	assert.ErrorIs(t, err, ErrInvalidArgument)
}

// Items 2, 3, 4: inpainting and outpainting keep the image's own size
// (1024x768 -> 64x48, 1536x512 -> 96x32, 1000x700 resized with Lanczos to
// 992x688), the rectangle is computed in pixels and area-averaged, and
// the default ratios are the official 1 x 0.2.
func TestOfficialInputsInpaint(t *testing.T) {
	b := officialBuilder(t)
	ctx := context.Background()
	grids := map[string][2]int{"inpainting_1024x768": {64, 48}, "outpainting_1536x512": {96, 32},
		"inpainting_1000x700": {62, 43}}
	for _, c := range officialCases(t, "inpainting", "outpainting") {
		var mh, mw float64
		if c.MaskH != nil {
			mh, mw = *c.MaskH, *c.MaskW
		}
		mh, mw = maskDefaults(mh, mw) // the golden without ratios ran on the official defaults
		in, err := b.inpaint(ctx, c.Prompt, officialPattern(*c.Image), mh, mw, c.Task == "outpainting")
		require.NoError(t, err)
		checkBranches(t, c, in)
		assert.Equal(t, grids[c.Name], [2]int{in.GridW, in.GridH}, c.Name)
	}
	assert.Equal(t, [2]float64{1, 0.2}, [2]float64{DefaultMaskH, DefaultMaskW})
}

// Items 1, 5, 6, 8, 9: every edit-type branch of the official image-to-image
// script (edit, control, subject, style transfer with the content image
// first, the generic *_pred, dense, multi-view, single-image ref_transfer),
// with all three guidance branches, from non-square images.
func TestOfficialInputsEdit(t *testing.T) {
	b := officialBuilder(t)
	ctx := context.Background()
	for _, c := range officialCases(t, "i2i") {
		var ref image.Image
		if c.RefImage != nil {
			ref = officialPattern(*c.RefImage)
		}
		in, err := b.edit(ctx, c.EditType, c.Prompt, officialPattern(*c.Image), ref, 0, 0)
		require.NoError(t, err, c.Name)
		checkBranches(t, c, in)
		// The output takes the crop size of the last image the script encoded
		// (style transfer: the reference's).
		last := c.VQInputs[len(c.VQInputs)-1]
		assert.Equal(t, [2]int{last.W, last.H}, [2]int{in.Width, in.Height}, c.Name)
	}
}

// Items 1, 7, 8: understanding crops to the 1024 list (640x480 -> 1152x864),
// one newline per row, and the official defaults of 1024 / 256 / 128.
func TestOfficialInputsUnderstand(t *testing.T) {
	b := officialBuilder(t)
	d := DefaultTextSampling()
	assert.Equal(t, TextSampling{Steps: 128, GenLength: 1024, BlockLength: 256}, d)
	for _, c := range officialCases(t, "mmu") {
		seq, start, err := b.understand(context.Background(), c.Prompt, officialPattern(*c.Image), 0, c.GenLength, 0)
		require.NoError(t, err)
		require.Equal(t, c.Seq, seq, c.Name)
		assert.Equal(t, c.AnswerStart, start)
		if c.Image.W == 640 {
			assert.Equal(t, [3]int{d.Steps, d.GenLength, d.BlockLength}, [3]int{c.Steps, c.GenLength, c.BlockLength},
				"the golden ran on the official defaults")
			assert.Equal(t, vqInput{W: 1152, H: 864, SHA256: c.VQInputs[0].SHA256}, c.VQInputs[0])
		}
	}
}

// Item 9: the images the official scripts encoded, byte for byte: box
// halving, bicubic, centred crop (seed 0); Lanczos for inpainting sizes
// that are not multiples of 16.
func TestOfficialInputsResize(t *testing.T) {
	n := 0
	for _, c := range officialCases(t, "i2i", "mmu", "inpainting", "outpainting") {
		var imgs []officialImage
		area := EditInputArea
		switch c.Task {
		case "i2i":
			if c.RefImage != nil {
				imgs = append(imgs, *c.Image, *c.RefImage)
			} else {
				imgs = append(imgs, *c.Image)
			}
		case "mmu":
			area = UnderInputArea
			imgs = append(imgs, *c.Image)
		default:
			src := toRGB8(officialPattern(*c.Image))
			got := src.resize(src.w/16*16, src.h/16*16, filterLanczos)
			require.Len(t, c.VQInputs, 1)
			assert.Equal(t, c.VQInputs[0], vqInput{W: got.w, H: got.h, SHA256: hashRGB(got)}, c.Name)
			n++
			continue
		}
		require.Len(t, c.VQInputs, len(imgs))
		for i, spec := range imgs {
			src := toRGB8(officialPattern(spec))
			cw, ch := PickCropSize(src.w, src.h, CropSizeList(area/(CropPatch*CropPatch), CropPatch))
			got := cropInput(src, cw, ch, 0)
			assert.Equal(t, c.VQInputs[i], vqInput{W: got.w, H: got.h, SHA256: hashRGB(got)}, c.Name)
			n++
		}
	}
	assert.GreaterOrEqual(t, n, 10)
}

// Item 8: the crop sizes the issue names, from the official lists.
func TestCropSizes(t *testing.T) {
	l512 := CropSizeList(EditInputArea/(CropPatch*CropPatch), CropPatch)
	l1024 := CropSizeList(UnderInputArea/(CropPatch*CropPatch), CropPatch)
	for _, tc := range []struct {
		list         [][2]int
		w, h, cw, ch int
	}{
		{l512, 1368, 1024, 576, 416}, {l512, 3000, 2000, 608, 416}, {l1024, 640, 480, 1152, 864},
		{l512, 512, 512, 512, 512}, {l512, 100, 1000, 256, 1024}, // ratio 10: the list stops at 4
	} {
		cw, ch := PickCropSize(tc.w, tc.h, tc.list)
		assert.Equal(t, [2]int{tc.cw, tc.ch}, [2]int{cw, ch}, "%dx%d", tc.w, tc.h)
	}
	assert.Equal(t, [][2]int{{32, 32}}, CropSizeList(1024/(CropPatch*CropPatch), CropPatch), "the small model's list")
	for _, s := range l512 {
		assert.LessOrEqual(t, s[0]*s[1], 512*512)
		assert.LessOrEqual(t, max(s[0], s[1]), 4*min(s[0], s[1]))
	}
}

// Item 9: the crop offset is a function of the seed: centred for 0, the
// same for the same seed, inside the image, and it moves with the seed.
func TestCropOffsetSeed(t *testing.T) {
	assert.Equal(t, 20, cropOffset(41, 0, 0))
	assert.Equal(t, 0, cropOffset(0, 7, 1))
	seen := map[int]bool{}
	for seed := uint64(1); seed < 50; seed++ {
		x := cropOffset(100, seed, 0)
		assert.Equal(t, x, cropOffset(100, seed, 0))
		assert.True(t, x >= 0 && x <= 100)
		seen[x] = true
	}
	assert.Greater(t, len(seen), 20)
	src := officialPattern(officialImage{W: 300, H: 100, Seed: 1})
	a, b := CropInput(src, 64, 32, 9), CropInput(src, 64, 32, 9)
	assert.Equal(t, a, b)
	assert.Equal(t, image.Rect(0, 0, 64, 32), a.Bounds())
}

// Item 6: the official dispatch, in its order, for official names and
// dimoo's aliases; *_pred falls to the generic prompt.
func TestEditTypeDispatch(t *testing.T) {
	const p = "make it blue"
	for _, tc := range []struct{ name, system, user string }{
		{"edit_add", SystemEdit, p}, {"edit_text_transfer", SystemEdit, p}, {"edit", SystemEdit, p},
		{"depth_control", SystemControl, p}, {"canny", SystemControl, p}, {"control", SystemControl, p},
		{"subject_driven", SystemSubject, p}, {"subject", SystemSubject, p},
		{"image_ref_transfer", SystemStyle, styleTransferText}, {"style", SystemStyle, styleTransferText},
		{"canny_pred", SystemI2IOther, p}, {"depth_pred", SystemI2IOther, p},
		{"normal_dense", SystemDense, "Generate a normal map according to the image."},
		{"dense", SystemDense, "Generate a dense map according to the image."},
		{"multi_view_left", SystemMultiView, "Generate the left view based on the provided front view."},
	} {
		name, err := ResolveEditType(tc.name)
		require.NoError(t, err, tc.name)
		sys, user := editPrompt(name, p)
		assert.Equal(t, [2]string{tc.system, tc.user}, [2]string{sys, user}, tc.name)
	}
	assert.True(t, twoImages("image_ref_transfer"))
	assert.False(t, twoImages("ref_transfer"))
	_, err := ResolveEditType("paint")
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "canny_pred")
	assert.Equal(t, "canny_pred", inputBuilder{}.editTypeDefault())
	assert.Equal(t, "edit", inputBuilder{defaults: Defaults{EditType: "edit"}}.editTypeDefault())
}

// Item 3: the pixel rectangle, area-averaged: a 1024x768 image with the
// default band keeps the rectangle's centre columns only.
func TestPaintMask(t *testing.T) {
	m := paintMask(1024, 768, 1024, 768, 16, 1, 0.2, false)
	// mw = round(204.8) = 205, left = 409: columns 409..613 cover cells
	// 25 (7/16), 26..37 fully, 38 (6/16): cells 26..37 are painted.
	for c := 0; c < 64; c++ {
		assert.Equal(t, c >= 26 && c <= 37, m[c], "column %d", c)
		assert.Equal(t, m[c], m[47*64+c])
	}
	out := paintMask(1024, 768, 1024, 768, 16, 1, 0.2, true)
	for i := range m {
		assert.NotEqual(t, m[i], out[i])
	}
}

// The shipped 32x32 model's dimoo.json overrides: its crop list is 32x32
// alone, its default edit type is edit; inpainting keeps a non-square
// image's own size (multiples of its factor of 4).
func TestShippedModelInputs(t *testing.T) {
	p := openShipped(t)
	b := p.inputs()
	ctx := context.Background()
	src := officialPattern(officialImage{W: 48, H: 40, Seed: 1})
	name, err := ResolveEditType(b.editTypeDefault())
	require.NoError(t, err)
	assert.Equal(t, "edit", name)
	in, err := b.edit(ctx, name, "make it a triangle", src, nil, 0, 0)
	require.NoError(t, err)
	assert.Equal(t, [4]int{32, 32, 8, 8}, [4]int{in.Width, in.Height, in.GridW, in.GridH})
	sys, _ := editPrompt(name, "make it a triangle")
	assert.Equal(t, p.Tokenizer.Encode(promptText(sys, "make it a triangle")), in.Prefixes[2])
	in, err = b.inpaint(ctx, "a red circle at the center", officialPattern(officialImage{W: 40, H: 24, Seed: 2}),
		DefaultMaskH, DefaultMaskW, false)
	require.NoError(t, err)
	assert.Equal(t, [4]int{40, 24, 10, 6}, [4]int{in.Width, in.Height, in.GridW, in.GridH})
	seq, start, err := b.understand(ctx, "What is in the image?", src, 0, 16, 0)
	require.NoError(t, err)
	assert.Len(t, seq, start+16+1)
	assert.Equal(t, 8*9+2, start-len(p.Tokenizer.Encode(promptText(SystemUnderstand, "What is in the image?")))-1,
		"one 8x8 grid with a newline per row, BOI and EOI, and BOA")
}
