// Package shapes is the Go port of the procedural "shapes" data set of the
// small DiMOO model (scripts/shapes_data.py) and of its deterministic pixel
// checker (check_image in scripts/eval_small.py).
//
// It lets Go code render ground-truth images, speak the model's caption and
// edit grammar, and score generated images without Python. Everything is
// held to the Python reference bit for bit: the renderer reproduces
// shapes_data.render pixel for pixel and the checker repeats numpy's
// floating-point operation order, so verdicts agree even on borderline images
// (see testdata/shapes and scripts/gen_shapes_testdata.py).
package shapes

import (
	"encoding/json"
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"strings"
)

// Size is the side of every image of the data set, in pixels.
const Size = 32

// Question is the understanding prompt the small model was trained with.
const Question = "What is in the image?"

// Colors lists the shape colours in shapes_data.COLORS order; the order
// matters because All() and the checker's nearest-colour tie-break follow it.
var Colors = []string{"red", "green", "blue", "yellow", "purple", "orange", "white"}

// Palette holds the RGB value of each shape colour (shapes_data.COLORS).
var Palette = map[string]color.RGBA{
	"red":    {230, 30, 30, 255},
	"green":  {30, 190, 40, 255},
	"blue":   {40, 70, 235, 255},
	"yellow": {240, 225, 30, 255},
	"purple": {150, 40, 200, 255},
	"orange": {250, 135, 20, 255},
	"white":  {245, 245, 245, 255},
}

// Shapes lists the shape names in shapes_data.SHAPES order.
var Shapes = []string{"circle", "square", "triangle"}

// Positions lists the position names in shapes_data.POSITIONS order.
var Positions = []string{"top left", "top right", "bottom left", "bottom right", "center"}

// Backgrounds lists the background names in shapes_data.BACKGROUNDS order.
var Backgrounds = []string{"black", "gray"}

// BackgroundPalette holds the RGB value of each background.
var BackgroundPalette = map[string]color.RGBA{
	"black": {0, 0, 0, 255},
	"gray":  {120, 120, 120, 255},
}

// centers is the (row, col) centre of each position in pixel units (pixel i
// spans [i, i+1)), as shapes_data.CENTERS.
var centers = map[string][2]float64{
	"top left":     {8, 8},
	"top right":    {8, 24},
	"bottom left":  {24, 8},
	"bottom right": {24, 24},
	"center":       {16, 16},
}

// EditKinds lists the edit kinds in shapes_data.EDIT_KINDS order.
var EditKinds = []string{"color", "position", "shape"}

// Combo is one (color, shape, position) combination, the unit that captions,
// held-out lists and checker verdicts talk about.
type Combo struct {
	Color, Shape, Position string
}

// Validate reports an unknown colour, shape or position, so that callers can
// reject bad input instead of rendering or captioning nonsense.
func (c Combo) Validate() error {
	if !contains(Colors, c.Color) {
		return fmt.Errorf("shapes: unknown color %q", c.Color)
	}
	if !contains(Shapes, c.Shape) {
		return fmt.Errorf("shapes: unknown shape %q", c.Shape)
	}
	if !contains(Positions, c.Position) {
		return fmt.Errorf("shapes: unknown position %q", c.Position)
	}
	return nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// All returns the 105 combinations in itertools.product order (colour-major,
// then shape, then position), the indexing shapes_data.ALL_COMBOS uses.
func All() []Combo {
	out := make([]Combo, 0, len(Colors)*len(Shapes)*len(Positions))
	for _, c := range Colors {
		for _, s := range Shapes {
			for _, p := range Positions {
				out = append(out, Combo{c, s, p})
			}
		}
	}
	return out
}

// Caption is the model's caption of a combination ("a orange ..." included:
// the grammar has no article agreement).
func Caption(c Combo) string {
	return fmt.Sprintf("a %s %s at the %s", c.Color, c.Shape, c.Position)
}

// captions maps every valid caption back to its combination.
var captions = func() map[string]Combo {
	m := make(map[string]Combo)
	for _, c := range All() {
		m[Caption(c)] = c
	}
	return m
}()

// ParseCaption inverts Caption: an exact match of the grammar after trimming
// surrounding whitespace, like shapes_data.parse_caption, so that a model's
// answer counts only when it is fully grammatical.
func ParseCaption(text string) (Combo, bool) {
	c, ok := captions[strings.TrimSpace(text)]
	return c, ok
}

// EditInstruction is the editing prompt of an edit; it returns "" for an
// unknown kind (shapes_data.edit_instruction raises there).
func EditInstruction(kind, value string) string {
	switch kind {
	case "color":
		return "change the color to " + value
	case "position":
		return "move it to the " + value
	case "shape":
		return "make it a " + value
	}
	return ""
}

// ParseEdit inverts EditInstruction for valid kinds and values (exact match
// after trimming), so that edit prompts can be mapped back to their target.
func ParseEdit(text string) (kind, value string, ok bool) {
	t := strings.TrimSpace(text)
	for _, k := range EditKinds {
		vals := Colors
		switch k {
		case "position":
			vals = Positions
		case "shape":
			vals = Shapes
		}
		for _, v := range vals {
			if t == EditInstruction(k, v) {
				return k, v, true
			}
		}
	}
	return "", "", false
}

// ApplyEdit returns the target combination of an edit. As in
// shapes_data.apply_edit, any kind other than "color" and "shape" sets the
// position; values are not checked (use Combo.Validate).
func ApplyEdit(c Combo, kind, value string) Combo {
	switch kind {
	case "color":
		c.Color = value
	case "shape":
		c.Shape = value
	default:
		c.Position = value
	}
	return c
}

// LoadHeldout reads modelDir/heldout.json (written by shapes_data.py
// --heldout-json): the combinations the model never saw in training, which
// evaluations report separately.
func LoadHeldout(modelDir string) (map[Combo]bool, error) {
	path := filepath.Join(modelDir, "heldout.json")
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc struct {
		Combinations []struct {
			Color    string `json:"color"`
			Shape    string `json:"shape"`
			Position string `json:"position"`
		} `json:"combinations"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("shapes: %s: %w", path, err)
	}
	if doc.Combinations == nil {
		return nil, fmt.Errorf("shapes: %s: no \"combinations\" list", path)
	}
	out := make(map[Combo]bool, len(doc.Combinations))
	for _, x := range doc.Combinations {
		c := Combo{x.Color, x.Shape, x.Position}
		if err := c.Validate(); err != nil {
			return nil, fmt.Errorf("%w (in %s)", err, path)
		}
		out[c] = true
	}
	return out, nil
}
