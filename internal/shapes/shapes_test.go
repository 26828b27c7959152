package shapes

import (
	"encoding/json"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Fixtures written by scripts/gen_shapes_testdata.py.
var testdataDir = filepath.Join("..", "..", "testdata", "shapes")

func readJSON(t *testing.T, name string, v any) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testdataDir, name))
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal(b, v))
}

func readPNG(t *testing.T, name string) image.Image {
	t.Helper()
	f, err := os.Open(filepath.Join(testdataDir, name))
	require.NoError(t, err)
	defer f.Close()
	img, err := png.Decode(f)
	require.NoError(t, err)
	return img
}

// verdictOf turns a JSON verdict (null or [color, shape, position]) into Check's result.
func verdictOf(v []string) (Combo, bool) {
	if v == nil {
		return Combo{}, false
	}
	return Combo{v[0], v[1], v[2]}, true
}

func TestGrammar(t *testing.T) {
	all := All()
	require.Len(t, all, 105)
	assert.Equal(t, Combo{"red", "circle", "top left"}, all[0])
	assert.Equal(t, Combo{"red", "circle", "top right"}, all[1])
	assert.Equal(t, Combo{"red", "square", "top left"}, all[5])
	assert.Equal(t, Combo{"green", "circle", "top left"}, all[15])
	assert.Equal(t, Combo{"white", "triangle", "center"}, all[104])
	assert.Len(t, Palette, len(Colors))
	assert.Equal(t, color.RGBA{250, 135, 20, 255}, Palette["orange"])
	assert.Equal(t, color.RGBA{120, 120, 120, 255}, BackgroundPalette["gray"])

	assert.Equal(t, "a orange triangle at the bottom right", Caption(Combo{"orange", "triangle", "bottom right"}))
	for _, c := range all {
		require.NoError(t, c.Validate())
		got, ok := ParseCaption(Caption(c))
		require.True(t, ok, Caption(c))
		assert.Equal(t, c, got)
		got, ok = ParseCaption("  " + Caption(c) + "\n")
		require.True(t, ok)
		assert.Equal(t, c, got)
	}
	for _, bad := range []string{"", "a red circle", "a red circle at the top left.", "A red circle at the top left",
		"a red  circle at the top left", "a pink circle at the top left", "a red circle at the middle"} {
		_, ok := ParseCaption(bad)
		assert.False(t, ok, bad)
	}

	assert.Equal(t, "change the color to blue", EditInstruction("color", "blue"))
	assert.Equal(t, "move it to the bottom left", EditInstruction("position", "bottom left"))
	assert.Equal(t, "make it a square", EditInstruction("shape", "square"))
	assert.Equal(t, "", EditInstruction("size", "big"))
	for kind, vals := range map[string][]string{"color": Colors, "shape": Shapes, "position": Positions} {
		for _, v := range vals {
			k, val, ok := ParseEdit(EditInstruction(kind, v))
			require.True(t, ok)
			assert.Equal(t, kind, k)
			assert.Equal(t, v, val)
		}
	}
	_, _, ok := ParseEdit("make it a hexagon")
	assert.False(t, ok)

	src := Combo{"red", "circle", "top left"}
	assert.Equal(t, Combo{"blue", "circle", "top left"}, ApplyEdit(src, "color", "blue"))
	assert.Equal(t, Combo{"red", "square", "top left"}, ApplyEdit(src, "shape", "square"))
	assert.Equal(t, Combo{"red", "circle", "center"}, ApplyEdit(src, "position", "center"))
}

func TestLoadHeldout(t *testing.T) {
	held, err := LoadHeldout(filepath.Join("..", "..", "models", "dimoo-small"))
	require.NoError(t, err)
	assert.Len(t, held, 16)
	assert.True(t, held[Combo{"blue", "circle", "bottom left"}])
	assert.True(t, held[Combo{"white", "triangle", "top right"}])
	assert.False(t, held[Combo{"red", "circle", "top left"}])

	dir := t.TempDir()
	_, err = LoadHeldout(dir)
	assert.Error(t, err, "missing file")
	write := func(s string) {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "heldout.json"), []byte(s), 0o644))
	}
	write(`{"combinations": [{"color": "pink", "shape": "circle", "position": "center"}]}`)
	_, err = LoadHeldout(dir)
	assert.ErrorContains(t, err, "pink")
	write(`{"count": 0}`)
	_, err = LoadHeldout(dir)
	assert.Error(t, err)
	write(`not json`)
	_, err = LoadHeldout(dir)
	assert.Error(t, err)
}

func TestBadNames(t *testing.T) {
	ok := Combo{"red", "circle", "center"}
	for _, tc := range []struct {
		c      Combo
		bg     string
		size   int
		dy, dx int
	}{
		{Combo{"pink", "circle", "center"}, "black", 11, 0, 0},
		{Combo{"red", "hexagon", "center"}, "black", 11, 0, 0},
		{Combo{"red", "circle", "middle"}, "black", 11, 0, 0},
		{ok, "white", 11, 0, 0},
		{ok, "black", 9, 0, 0},
		{ok, "black", 13, 0, 0},
		{ok, "black", 11, 2, 0},
		{ok, "black", 11, 0, -2},
	} {
		img, err := Render(tc.c, tc.bg, tc.size, tc.dy, tc.dx)
		assert.Error(t, err, "%+v", tc)
		assert.Nil(t, img)
	}
	assert.Error(t, Combo{"red", "circle", ""}.Validate())
	assert.Error(t, Combo{"Red", "circle", "center"}.Validate())
	assert.Error(t, Combo{"red", "Circle", "center"}.Validate())
}

func TestJitter(t *testing.T) {
	seen := map[[3]int]bool{}
	for i := -NumJitters; i < 2*NumJitters; i++ {
		s, dy, dx := JitterOf(i)
		s2, dy2, dx2 := JitterOf(i + NumJitters)
		assert.Equal(t, [3]int{s, dy, dx}, [3]int{s2, dy2, dx2})
		seen[[3]int{s, dy, dx}] = true
		_, err := Render(Combo{"red", "triangle", "top left"}, "gray", s, dy, dx)
		require.NoError(t, err)
	}
	assert.Len(t, seen, 27)

	var doc struct {
		Jitter [][4]int64 `json:"jitter"`
	}
	readJSON(t, "jitter.json", &doc)
	require.NotEmpty(t, doc.Jitter)
	for _, j := range doc.Jitter {
		s, dy, dx := Jitter(j[0])
		assert.Equal(t, [3]int64{j[1], j[2], j[3]}, [3]int64{int64(s), int64(dy), int64(dx)}, "seed %d", j[0])
	}
	// Python reduces the seed mod 2^32.
	a, b, c := Jitter(5)
	a2, b2, c2 := Jitter(5 + 1<<32)
	assert.Equal(t, [3]int{a, b, c}, [3]int{a2, b2, c2})
}

// The Go checker must be right on every Go render: all combinations, both
// backgrounds, all 27 jitters.
func TestCheckGoRenders(t *testing.T) {
	n := 0
	for _, c := range All() {
		for _, bg := range Backgrounds {
			for j := 0; j < NumJitters; j++ {
				s, dy, dx := JitterOf(j)
				img, err := Render(c, bg, s, dy, dx)
				require.NoError(t, err)
				got, ok := Check(img)
				require.True(t, ok, "%v on %s jitter %d", c, bg, j)
				require.Equal(t, c, got, "%s jitter %d", bg, j)
				n++
			}
		}
	}
	assert.Equal(t, 105*2*27, n)
}

func TestRendersMatchPython(t *testing.T) {
	var doc struct {
		Renders []struct {
			File                   string
			Color, Shape, Position string
			Background             string
			JitterSeed             int64 `json:"jitter_seed"`
			Size, Dy, Dx           int
			Verdict                []string
		}
	}
	readJSON(t, "renders.json", &doc)
	require.Len(t, doc.Renders, 40)
	for _, r := range doc.Renders {
		s, dy, dx := Jitter(r.JitterSeed)
		require.Equal(t, [3]int{r.Size, r.Dy, r.Dx}, [3]int{s, dy, dx}, "jitter of seed %d", r.JitterSeed)
		c := Combo{r.Color, r.Shape, r.Position}
		img, err := Render(c, r.Background, r.Size, r.Dy, r.Dx)
		require.NoError(t, err)
		want := readPNG(t, r.File)
		require.Equal(t, want.Bounds(), img.Bounds())
		diff := 0
		for y := 0; y < Size; y++ {
			for x := 0; x < Size; x++ {
				w := color.NRGBAModel.Convert(want.At(x, y)).(color.NRGBA)
				if w != color.NRGBAModel.Convert(img.At(x, y)).(color.NRGBA) {
					diff++
				}
			}
		}
		assert.Zero(t, diff, "%s: %v on %s jitter %d/%d/%d: pixels differ", r.File, c, r.Background, r.Size, r.Dy, r.Dx)
		wc, wok := verdictOf(r.Verdict)
		gc, gok := Check(img)
		assert.Equal(t, wok, gok, r.File)
		assert.Equal(t, wc, gc, r.File)
	}
}

// pyFloat parses a Python repr float (exact round trip).
func pyFloat(t *testing.T, s string) float64 {
	t.Helper()
	v, err := strconv.ParseFloat(s, 64)
	require.NoError(t, err, s)
	return v
}

func sameBits(t *testing.T, want string, got float64, msg string) {
	t.Helper()
	w := pyFloat(t, want)
	assert.Equal(t, math.Float64bits(w), math.Float64bits(got), "%s: python %s go %s", msg, want,
		strconv.FormatFloat(got, 'g', -1, 64))
}

// The Go checker must give Python's verdict on VQ-VAE reconstructions and
// hard images, and its intermediates must be bit-identical (so verdicts
// agree on borderline images too).
func TestCheckerMatchesPython(t *testing.T) {
	var doc struct {
		Fixtures []struct {
			File    string
			Source  string
			Verdict []string
			Details struct {
				Bg       []string
				ModeKey  int64 `json:"mode_key"`
				N        int
				Median   string
				Inner    []string
				AlphaSum string `json:"alpha_sum"`
				Core     int
				Stage    string
				Cy, Cx   string
				Fill     string
				Box      []int
			}
		}
	}
	readJSON(t, "verdicts.json", &doc)
	require.GreaterOrEqual(t, len(doc.Fixtures), 50)
	stages := map[string]int{}
	for _, f := range doc.Fixtures {
		img := readPNG(t, f.File)
		msg := f.File + " (" + f.Source + ")"
		wc, wok := verdictOf(f.Verdict)
		gc, gok := Check(img)
		assert.Equal(t, wok, gok, msg)
		assert.Equal(t, wc, gc, msg)

		d := f.Details
		stages[d.Stage]++
		a, ok := analyse(img)
		require.True(t, ok)
		assert.Equal(t, d.Stage, a.stage, msg)
		assert.Equal(t, d.ModeKey, a.modeKey, msg)
		for ch := 0; ch < 3; ch++ {
			sameBits(t, d.Bg[ch], a.bg[ch], msg+" bg")
		}
		assert.Equal(t, d.N, a.n, msg)
		if d.Stage == "few_far_pixels" {
			continue
		}
		sameBits(t, d.Median, a.median, msg+" median")
		for ch := 0; ch < 3; ch++ {
			sameBits(t, d.Inner[ch], a.inner[ch], msg+" inner")
		}
		sameBits(t, d.AlphaSum, a.alphaSum, msg+" alpha sum")
		assert.Equal(t, d.Core, a.core, msg)
		if d.Stage == "small_core" {
			continue
		}
		sameBits(t, d.Cy, a.cy, msg+" cy")
		sameBits(t, d.Cx, a.cx, msg+" cx")
		sameBits(t, d.Fill, a.fill, msg+" fill")
		assert.Equal(t, d.Box, a.box[:], msg)
	}
	// The fixtures reach every exit of the checker.
	assert.Positive(t, stages["done"])
	assert.Positive(t, stages["few_far_pixels"])
	assert.Positive(t, stages["small_core"])
}

func TestCheckImageKinds(t *testing.T) {
	c := Combo{"yellow", "square", "bottom right"}
	img, err := Render(c, "gray", 12, 1, -1)
	require.NoError(t, err)

	// Other image types and non-zero origins read the same pixels.
	nrgba := image.NewNRGBA(img.Bounds())
	draw.Draw(nrgba, nrgba.Bounds(), img, image.Point{}, draw.Src)
	got, ok := Check(nrgba)
	require.True(t, ok)
	assert.Equal(t, c, got)

	big := image.NewRGBA(image.Rect(0, 0, 40, 40))
	draw.Draw(big, image.Rect(5, 3, 37, 35), img, image.Point{}, draw.Src)
	got, ok = Check(big.SubImage(image.Rect(5, 3, 37, 35)))
	require.True(t, ok)
	assert.Equal(t, c, got)

	// Wrong sizes are rejected, not analysed.
	_, ok = Check(big)
	assert.False(t, ok)
	_, ok = Check(image.NewRGBA(image.Rect(0, 0, 32, 31)))
	assert.False(t, ok)
	_, ok = Check(image.NewRGBA(image.Rect(0, 0, 0, 0)))
	assert.False(t, ok)
}
