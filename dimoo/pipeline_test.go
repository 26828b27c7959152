package dimoo

import (
	"context"
	"image"
	"image/color"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func openShipped(t *testing.T) *Pipeline {
	t.Helper()
	lib := testLibrary(t)
	dir := ShippedModelDir()
	if dir == "" {
		t.Skip("no shipped model under models/")
	}
	p, err := OpenPipeline(context.Background(), dir, PipelineOptions{LoadOptions: LoadOptions{Library: lib}})
	require.NoError(t, err)
	t.Cleanup(func() { p.Close() })
	return p
}

func square(w, h int, c color.NRGBA) image.Image {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := h / 4; y < h/2; y++ {
		for x := w / 4; x < w/2; x++ {
			img.SetNRGBA(x, y, c)
		}
	}
	return img
}

// Every task runs end to end through the shipped model: tokenizer, sampler,
// forward, VQ-VAE; sizes and the progress callback are as asked.
func TestPipelineTasks(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	w, h := p.NativeSize()
	steps := 0
	o := ImageSampling{Steps: 8, Temperature: 0.5, Seed: 1}
	img, err := p.GenerateImage(ctx, ImageRequest{Prompt: "a red circle at the top left", Sampling: o,
		Progress: func(s, n int) { steps = s; assert.Equal(t, 8, n) }})
	require.NoError(t, err)
	assert.Equal(t, image.Rect(0, 0, w, h), img.Bounds())
	assert.Equal(t, 8, steps)
	o.UseCache = true
	_, err = p.GenerateImage(ctx, ImageRequest{Prompt: "a blue square at the center", Sampling: o})
	require.NoError(t, err)
	in := square(w, h, color.NRGBA{255, 0, 0, 255})
	out, err := p.EditImage(ctx, EditRequest{Prompt: "change the color to blue", Image: in, InputArea: w * h,
		Sampling: ImageSampling{Steps: 8, Seed: 2}})
	require.NoError(t, err)
	assert.Equal(t, image.Rect(0, 0, w, h), out.Bounds())
	_, err = p.Inpaint(ctx, InpaintRequest{Prompt: "a red square at the top left", Image: in, InputArea: w * h,
		Sampling: ImageSampling{Steps: 8, Seed: 3}})
	require.NoError(t, err)
	_, err = p.Inpaint(ctx, InpaintRequest{Prompt: "a red square at the top left", Image: in, Outpaint: true,
		InputArea: w * h, Sampling: ImageSampling{Steps: 8, Seed: 3}})
	require.NoError(t, err)
	ans, err := p.Understand(ctx, UnderstandRequest{Question: "What is in the image?", Image: in, InputArea: w * h,
		Sampling: TextSampling{Steps: 16, GenLength: 16, BlockLength: 16}})
	require.NoError(t, err)
	t.Logf("understand: %q", ans)
}

func TestPipelineRejectsBadRequests(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	_, err := p.GenerateImage(ctx, ImageRequest{Prompt: "a red circle", Width: 2, Height: 32}) // floors to 0
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = p.GenerateImage(ctx, ImageRequest{Prompt: "a red circle", Width: 4096, Height: 4096})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.Contains(t, err.Error(), "max_sequence_length")
	_, err = p.GenerateImage(ctx, ImageRequest{Prompt: ""})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = p.GenerateImage(ctx, ImageRequest{Prompt: "x", Sampling: ImageSampling{Steps: -1}})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = p.EditImage(ctx, EditRequest{Prompt: "x", EditType: "paint", Image: square(32, 32, color.NRGBA{A: 255})})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = p.EditImage(ctx, EditRequest{Prompt: "x", EditType: "style", Image: square(32, 32, color.NRGBA{A: 255})})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = p.EditImage(ctx, EditRequest{Prompt: "x"})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = p.Understand(ctx, UnderstandRequest{Question: "What?", Image: square(32, 32, color.NRGBA{A: 255}),
		Sampling: TextSampling{Steps: 4, GenLength: 10, BlockLength: 4}})
	assert.ErrorIs(t, err, ErrInvalidArgument)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = p.GenerateImage(cctx, ImageRequest{Prompt: "a red circle"})
	assert.ErrorIs(t, err, ErrCancelled)
}

// A request's Stats hold the decode's timing: one forward per step, the
// forwards and the sampling inside the loop's wall time.
func TestImageRequestStats(t *testing.T) {
	p := openShipped(t)
	for _, cache := range []bool{false, true} {
		var st DecodeStats
		_, err := p.GenerateImage(context.Background(), ImageRequest{Prompt: "a blue square at the center",
			Sampling: ImageSampling{Steps: 6, Temperature: 1, UseCache: cache}, Stats: &st})
		require.NoError(t, err)
		assert.Equal(t, 6, st.Steps)
		assert.Equal(t, 6, st.Forwards, "one library forward per step (all branches in one call)")
		assert.Positive(t, st.Forward)
		assert.Positive(t, st.Sampling)
		assert.GreaterOrEqual(t, st.Total, st.Forward+st.Sampling)
		assert.Equal(t, st.Total-st.Forward, st.Outside())
		// The work: two branches (CFG); full steps run every row of both.
		require.Len(t, st.SeqLens, 2)
		full := int64(st.SeqLens[0] + st.SeqLens[1])
		o := ImageSampling{Steps: 6, UseCache: cache, WarmupRatio: 0.3, RefreshInterval: 5}
		nFull := 0
		for _, r := range o.refreshSteps() {
			if r {
				nFull++
			}
		}
		assert.Equal(t, 6-nFull, st.CachedForwards)
		if cache {
			assert.Positive(t, st.CachedForwards)
			assert.Less(t, st.Rows, 6*full)
			assert.Greater(t, st.Rows, int64(nFull)*full)
		} else {
			assert.Equal(t, 6*full, st.Rows)
		}
		assert.False(t, st.Start.IsZero())
	}
}

// An understanding request's Stats: a forward per step of the blocks
// decoded (decoding stops after the block with the end of text), every row
// of the sequence (and of the unguided branch) through the network; the
// batched decode reports its steps and forwards too.
func TestUnderstandRequestStats(t *testing.T) {
	p := openShipped(t)
	w, h := p.NativeSize()
	b, err := p.NewBatcher(BatchOptions{Seqs: 4})
	require.NoError(t, err)
	defer b.Close()
	for _, o := range []TextSampling{{Steps: 16, GenLength: 16, BlockLength: 4}, {Steps: 8, GenLength: 16,
		BlockLength: 16, CFGScale: 0.5, Temperature: 0.5, Seed: 3}} {
		var st, bst DecodeStats
		var use TokenUsage
		steps := 0
		req := UnderstandRequest{Question: "What is in the image?", Image: square(w, h, color.NRGBA{0, 0, 255, 255}),
			InputArea: w * h, Sampling: o, Stats: &st, Progress: func(step, _ int) { steps = step }, Usage: &use}
		answer, err := p.Understand(context.Background(), req)
		require.NoError(t, err)
		// Usage: everything before the answer (the sequence less the answer
		// and its closing EOA), and the answer's tokens, each of them text.
		assert.Equal(t, st.SeqLens[0]-o.GenLength-1, use.Prompt)
		assert.Positive(t, use.Completion)
		assert.LessOrEqual(t, use.Completion, st.Steps/(o.Steps/(o.GenLength/o.BlockLength))*o.BlockLength)
		assert.GreaterOrEqual(t, use.Completion, len(strings.Fields(answer)), "at least a token a word")
		assert.Positive(t, st.Steps)
		assert.LessOrEqual(t, st.Steps, o.Steps)
		assert.Equal(t, 0, st.Steps%(o.Steps/(o.GenLength/o.BlockLength)), "whole blocks")
		assert.Equal(t, steps, st.Forwards, "a forward per step with masked positions, each reporting progress")
		assert.Positive(t, st.Forward)
		assert.Positive(t, st.Sampling)
		assert.GreaterOrEqual(t, st.Total, st.Forward+st.Sampling)
		branches := 1
		if o.CFGScale > 0 {
			branches = 2
		}
		require.Len(t, st.SeqLens, branches)
		assert.Equal(t, int64(st.Forwards*branches*st.SeqLens[0]), st.Rows)
		assert.Zero(t, st.CachedForwards)
		assert.False(t, st.Start.IsZero())

		req.Stats, req.Progress = &bst, nil
		_, err = b.Understand(context.Background(), req)
		require.NoError(t, err)
		assert.Equal(t, st.Steps, bst.Steps, "batched")
		assert.Equal(t, st.Forwards, bst.Forwards, "batched")
		assert.Positive(t, bst.Forward)
		t.Logf("%+v: alone %+v; batched %+v", o, st, bst)
	}
}

// Stream gives an answer in pieces as its blocks are decoded: the same
// answer, the pieces adding up to it, a piece per block the answer spans
// and its last word; the same through a Batcher.
func TestUnderstandStream(t *testing.T) {
	p := openShipped(t)
	ctx := context.Background()
	w, h := p.NativeSize()
	img := square(w, h, color.NRGBA{255, 0, 0, 255})
	b, err := p.NewBatcher(BatchOptions{Seqs: 4})
	require.NoError(t, err)
	defer b.Close()
	for _, o := range []TextSampling{
		{Steps: 8, GenLength: 16, BlockLength: 4},
		{Steps: 16, GenLength: 16, BlockLength: 2, Temperature: 0.7, Seed: 5},
		{Steps: 8, GenLength: 16, BlockLength: 4, CFGScale: 0.5, Temperature: 0.5, Seed: 2},
		{Steps: 8, GenLength: 16, BlockLength: 16},
	} {
		req := UnderstandRequest{Question: "What is in the image?", Image: img, InputArea: w * h, Sampling: o}
		plain, err := p.Understand(ctx, req)
		require.NoError(t, err)
		require.Greater(t, len(strings.Fields(plain)), 2, "an answer of several words")
		for _, understand := range []func(context.Context, UnderstandRequest) (string, error){p.Understand, b.Understand} {
			var pieces []string
			req.Stream = func(s string) { pieces = append(pieces, s) }
			got, err := understand(ctx, req)
			require.NoError(t, err)
			assert.Equal(t, plain, got, "%+v", o)
			assert.Equal(t, got, strings.Join(pieces, ""), "%+v: %q", o, pieces)
			for _, s := range pieces {
				assert.NotEmpty(t, s)
			}
			// After each block all but its last word, and that at the end.
			if o.BlockLength == 16 {
				assert.Len(t, pieces, 2, "one block")
			} else {
				assert.Greater(t, len(pieces), 2, "%+v: %q", o, pieces)
			}
			t.Logf("%+v: %q", o, pieces)
		}
	}
}

// streamable streams only text that extends what was sent, without its last
// word, which more tokens could still change.
func TestStreamable(t *testing.T) {
	for _, c := range []struct{ text, sent, want string }{
		{"a red", "", "a"},
		{"a red circle", "a", " red"},
		{"a red circle at", "a red", " circle"},
		{"word", "", ""},                 // one word: all of it waits
		{"a red", "a red", ""},           // nothing new
		{"b red", "a", ""},               // not an extension: wait
		{"naïve caf\uFFFD", "", "naïve"}, // a cut character waits with its word
		{"x .\ny z", "x", " .\ny"},
	} {
		assert.Equal(t, c.want, streamable(c.text, c.sent), "%q after %q", c.text, c.sent)
	}
}
