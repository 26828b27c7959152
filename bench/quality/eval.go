package main

import (
	"context"
	"fmt"
	"image"
	"io"
	"math/rand"
	"sort"
	"strings"

	"github.com/dimoo-dev/dimoo/dimoo"
	"github.com/dimoo-dev/dimoo/internal/shapes"
)

// Sizes is how many items each task draws (0 skips the task).
type Sizes struct {
	T2IReps    int // text-to-image samples per (color, shape, position): 105 combinations each
	T2IMax     int // at most this many text-to-image items (0: no limit), combinations shuffled
	Edit       int
	Inpaint    int
	Understand int
	// TrainOnly draws only combinations seen in training (the CI sample).
	TrainOnly bool
	// AnyJitter draws input renders from all 27 (size, offset) jitters; by
	// default they come from jitter seeds 0..31 as the training data's do
	// (18 of the 27), so only the combinations are new, not the renders.
	AnyJitter bool
}

// Tally counts correct answers, split by whether the combination the item
// is judged against was held out of training.
type Tally struct {
	Train, TrainOK, Held, HeldOK int
}

func (t *Tally) add(held, ok bool) {
	if held {
		t.Held++
		if ok {
			t.HeldOK++
		}
		return
	}
	t.Train++
	if ok {
		t.TrainOK++
	}
}

// Acc is the accuracy over all items (0 when there are none).
func (t Tally) Acc() float64 { return ratio(t.TrainOK+t.HeldOK, t.Train+t.Held) }

// TrainAcc and HeldAcc are the accuracies of each part.
func (t Tally) TrainAcc() float64 { return ratio(t.TrainOK, t.Train) }
func (t Tally) HeldAcc() float64  { return ratio(t.HeldOK, t.Held) }

func ratio(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// Report holds each task's tally and, for understanding, the answers.
type Report struct {
	Checker    Tally // the pixel checker on renders: the measuring stick itself
	T2I        Tally // all three attributes right
	Edit       Tally // the edited image is the instruction's target
	Inpaint    Tally // the restored image matches the caption
	Understand Tally // the answer names colour and shape right
	Examples   []string
}

// evaluator runs the tasks through a Pipeline with the model's defaults.
type evaluator struct {
	p    *dimoo.Pipeline
	held map[shapes.Combo]bool
	rng  *rand.Rand
	tau  float64
	any  bool
}

func newEvaluator(p *dimoo.Pipeline, modelDir string, seed int64, anyJitter bool) (*evaluator, error) {
	held, err := shapes.LoadHeldout(modelDir)
	if err != nil {
		return nil, err
	}
	e := &evaluator{p: p, held: held, rng: rand.New(rand.NewSource(seed)), tau: 1, any: anyJitter}
	if t := p.Defaults().Sampling.Temperature; t != nil {
		e.tau = *t
	}
	return e, nil
}

func (e *evaluator) combos(trainOnly bool) []shapes.Combo {
	var out []shapes.Combo
	for _, c := range shapes.All() {
		if !trainOnly || !e.held[c] {
			out = append(out, c)
		}
	}
	return out
}

// render draws a combination on a random background with a random jitter.
func (e *evaluator) render(c shapes.Combo) (image.Image, error) {
	size, dy, dx := shapes.Jitter(int64(e.rng.Intn(32)))
	if e.any {
		size, dy, dx = shapes.JitterOf(e.rng.Intn(shapes.NumJitters))
	}
	return shapes.Render(c, shapes.Backgrounds[e.rng.Intn(len(shapes.Backgrounds))], size, dy, dx)
}

func (e *evaluator) sampling(seed int) dimoo.ImageSampling {
	return dimoo.ImageSampling{Temperature: e.tau, Seed: uint64(seed)}
}

// Run evaluates every task; progress (if not nil) gets one line per task.
func Run(ctx context.Context, p *dimoo.Pipeline, modelDir string, sz Sizes, seed int64, progress io.Writer) (Report, error) {
	var r Report
	e, err := newEvaluator(p, modelDir, seed, sz.AnyJitter)
	if err != nil {
		return r, err
	}
	logf := func(format string, a ...any) {
		if progress != nil {
			fmt.Fprintf(progress, format, a...)
		}
	}
	all := e.combos(sz.TrainOnly)

	// The checker on fresh renders of every combination.
	for _, c := range shapes.All() {
		img, err := e.render(c)
		if err != nil {
			return r, err
		}
		got, ok := shapes.Check(img)
		r.Checker.add(e.held[c], ok && got == c)
	}

	n := 0
	for rep := 0; rep < sz.T2IReps; rep++ {
		order := append([]shapes.Combo(nil), all...)
		if sz.T2IMax > 0 {
			e.rng.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
		}
		for _, c := range order {
			if sz.T2IMax > 0 && n >= sz.T2IMax {
				break
			}
			img, err := e.p.GenerateImage(ctx, dimoo.ImageRequest{Prompt: shapes.Caption(c), Sampling: e.sampling(n)})
			if err != nil {
				return r, err
			}
			got, ok := shapes.Check(img)
			r.T2I.add(e.held[c], ok && got == c)
			n++
		}
	}
	logf("text-to-image: %d done\n", n)

	for i := 0; i < sz.Edit; i++ {
		// A training source, and an edit whose target is any combination
		// (judged as held out when the target was never trained on).
		src := all[e.rng.Intn(len(all))]
		if e.held[src] {
			continue
		}
		kind := shapes.EditKinds[e.rng.Intn(len(shapes.EditKinds))]
		vals := map[string][]string{"color": shapes.Colors, "shape": shapes.Shapes, "position": shapes.Positions}[kind]
		cur := map[string]string{"color": src.Color, "shape": src.Shape, "position": src.Position}[kind]
		var opts []string
		for _, v := range vals {
			if v != cur && (!sz.TrainOnly || !e.held[shapes.ApplyEdit(src, kind, v)]) {
				opts = append(opts, v)
			}
		}
		if len(opts) == 0 {
			continue
		}
		val := opts[e.rng.Intn(len(opts))]
		tgt := shapes.ApplyEdit(src, kind, val)
		in, err := e.render(src)
		if err != nil {
			return r, err
		}
		img, err := e.p.EditImage(ctx, dimoo.EditRequest{Prompt: shapes.EditInstruction(kind, val), Image: in,
			InputArea: e.p.NativeArea(), Sampling: e.sampling(1000 + i)})
		if err != nil {
			return r, err
		}
		got, ok := shapes.Check(img)
		r.Edit.add(e.held[tgt], ok && got == tgt)
	}
	logf("editing: %d done\n", r.Edit.Train+r.Edit.Held)

	for i := 0; i < sz.Inpaint; i++ {
		c := all[e.rng.Intn(len(all))]
		in, err := e.render(c)
		if err != nil {
			return r, err
		}
		// A masked half: the central band, full height and half the width.
		img, err := e.p.Inpaint(ctx, dimoo.InpaintRequest{Prompt: shapes.Caption(c), Image: in, MaskH: 1, MaskW: 0.5,
			InputArea: e.p.NativeArea(), Sampling: e.sampling(2000 + i)})
		if err != nil {
			return r, err
		}
		got, ok := shapes.Check(img)
		r.Inpaint.add(e.held[c], ok && got == c)
	}
	logf("inpainting: %d done\n", r.Inpaint.Train+r.Inpaint.Held)

	for i := 0; i < sz.Understand; i++ {
		c := all[e.rng.Intn(len(all))]
		in, err := e.render(c)
		if err != nil {
			return r, err
		}
		ans, err := e.p.Understand(ctx, dimoo.UnderstandRequest{Question: shapes.Question, Image: in,
			InputArea: e.p.NativeArea()})
		if err != nil {
			return r, err
		}
		got, ok := shapes.ParseCaption(ans)
		r.Understand.add(e.held[c], ok && got.Color == c.Color && got.Shape == c.Shape)
		if len(r.Examples) < 5 {
			r.Examples = append(r.Examples, fmt.Sprintf("%s -> %q", shapes.Caption(c), ans))
		}
	}
	logf("understanding: %d done\n", r.Understand.Train+r.Understand.Held)
	return r, nil
}

// Table formats the report: one row per task, train / held-out / all.
func (r Report) Table() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%-26s %16s %16s %16s\n", "task", "train", "held-out", "all")
	row := func(name string, t Tally) {
		cell := func(ok, n int) string {
			if n == 0 {
				return "-"
			}
			return fmt.Sprintf("%5.1f%% (%d/%d)", 100*ratio(ok, n), ok, n)
		}
		fmt.Fprintf(&b, "%-26s %16s %16s %16s\n", name, cell(t.TrainOK, t.Train), cell(t.HeldOK, t.Held),
			cell(t.TrainOK+t.HeldOK, t.Train+t.Held))
	}
	row("checker on renders", r.Checker)
	row("text-to-image (all 3)", r.T2I)
	row("editing (target)", r.Edit)
	row("inpainting (half)", r.Inpaint)
	row("understanding (col+shape)", r.Understand)
	ex := append([]string(nil), r.Examples...)
	sort.Strings(ex)
	for _, e := range ex {
		fmt.Fprintf(&b, "  %s\n", e)
	}
	return b.String()
}
