package dimoo

// Request validation: every size, count and scale a request carries is
// checked before anything is allocated for it, with arithmetic that cannot
// overflow, so an absurd number is an error naming it rather than a panic,
// a fatal out-of-memory or minutes of work.

import (
	"fmt"
	"math"
	"math/bits"
	"strings"
)

// Upper bounds on the scales a request may carry. The reference uses
// guidance up to about 5 and temperatures around 1; far beyond these the
// float32 guidance weights and Gumbel scores lose all precision.
const (
	MaxGuidance    = 100.0
	MaxTemperature = 100.0
)

// checkFloat requires v to be finite and within [lo, hi].
func checkFloat(name string, v, lo, hi float64) error {
	if math.IsNaN(v) || math.IsInf(v, 0) || v < lo || v > hi {
		return fmt.Errorf("%w: %s must be a finite number in [%g, %g], got %g", ErrInvalidArgument, name, lo, hi, v)
	}
	return nil
}

// checkGuidance allows a negative scale (the API's "none") but no NaN, no
// infinity and nothing above MaxGuidance.
func checkGuidance(name string, v float64) error {
	if v < 0 && !math.IsInf(v, 0) {
		return nil
	}
	return checkFloat(name, v, 0, MaxGuidance)
}

// mulFits returns a*b when both are non-negative and the product fits in
// an int no larger than limit.
func mulFits(a, b, limit int) (int, bool) {
	if a < 0 || b < 0 {
		return 0, false
	}
	hi, lo := bits.Mul64(uint64(a), uint64(b))
	if hi != 0 || lo > uint64(limit) {
		return 0, false
	}
	return int(lo), true
}

// imageAnswerTokens is the length of an answer image of gh rows of gw
// codes (BOA, BOI, a newline after each row, EOI, EOA), or false when it
// exceeds limit.
func imageAnswerTokens(gw, gh, limit int) (int, bool) {
	if gw < 1 || gh < 1 || gw > limit || gh > limit {
		return 0, false
	}
	n, ok := mulFits(gw+1, gh, limit)
	if !ok || n > limit-4 {
		return 0, false
	}
	return n + 4, true
}

// checkGrid refuses an output code grid whose answer alone is longer than
// the model's max_sequence_length: before anything is allocated for it.
func (p *Pipeline) checkGrid(w, h, gw, gh int) error {
	maxT := p.Model.Config.MaxSequenceLength
	if _, ok := imageAnswerTokens(gw, gh, maxT); !ok {
		return fmt.Errorf("%w: image size %dx%d needs a %dx%d code grid, more than the model's max_sequence_length "+
			"of %d tokens", ErrInvalidArgument, w, h, gw, gh, maxT)
	}
	return nil
}

// checkArea refuses an input area whose image would not fit the model's
// sequence (the VQ-VAE would otherwise encode an image of that area first).
func (p *Pipeline) checkArea(area int) error {
	if area < 0 {
		return fmt.Errorf("%w: negative input area %d", ErrInvalidArgument, area)
	}
	f := p.VQ.Factor()
	maxT := p.Model.Config.MaxSequenceLength
	if area/(f*f) > maxT {
		return fmt.Errorf("%w: input area %d pixels is %d codes, more than the model's max_sequence_length of %d",
			ErrInvalidArgument, area, area/(f*f), maxT)
	}
	return nil
}

// checkImageSampling checks an image request's settled sampler settings:
// finite ratios and temperature, and no more steps than codes to decode
// (each step unmasks at least one code; more steps would only repeat
// forwards).
func checkImageSampling(o ImageSampling, masked int) error {
	if o.Steps < 1 {
		return fmt.Errorf("%w: steps must be >= 1, got %d", ErrInvalidArgument, o.Steps)
	}
	if masked > 0 && o.Steps > masked {
		return fmt.Errorf("%w: %d steps for %d codes to decode: steps must be at most the number of masked codes",
			ErrInvalidArgument, o.Steps, masked)
	}
	if err := checkFloat("temperature", o.Temperature, 0, MaxTemperature); err != nil {
		return err
	}
	if !o.UseCache {
		return nil
	}
	if math.IsNaN(o.CacheRatio) || o.CacheRatio < 0 || o.CacheRatio >= 1 {
		return fmt.Errorf("%w: cache_ratio must be in [0, 1), got %g", ErrInvalidArgument, o.CacheRatio)
	}
	if err := checkFloat("warmup_ratio", o.WarmupRatio, 0, 1); err != nil {
		return err
	}
	if o.RefreshInterval < 1 {
		return fmt.Errorf("%w: refresh_interval must be >= 1, got %d", ErrInvalidArgument, o.RefreshInterval)
	}
	return nil
}

// capSteps limits a request's image steps to the codes it decodes: every
// step unmasks at least one code, so further steps would only repeat
// forwards (and a huge count would allocate per step up front). The
// pipeline caps rather than refuses so that a model's default step count
// fits any image; the CLI refuses an explicit --timesteps that is too large.
func capSteps(steps, masked int) int {
	if masked > 0 && steps > masked {
		return masked
	}
	return steps
}

// checkTextLength refuses an answer length the model's sequence cannot
// hold, before the masked answer is allocated.
func (p *Pipeline) checkTextLength(o TextSampling) error {
	if maxT := p.Model.Config.MaxSequenceLength; o.GenLength > maxT {
		return fmt.Errorf("%w: gen_length %d exceeds the model's max_sequence_length of %d", ErrInvalidArgument,
			o.GenLength, maxT)
	}
	return nil
}

// checkDefaults verifies that a checkpoint's dimoo.json sizes fit its model:
// a native size or input area beyond max_sequence_length would fail (or
// exhaust memory) on every request that uses it.
func (p *Pipeline) checkDefaults(dir string) error {
	d := p.defaults
	f := p.VQ.Factor()
	path := dir + "/dimoo.json"
	if d.Width > 0 || d.Height > 0 {
		if d.Width <= 0 || d.Height <= 0 || d.Width%f != 0 || d.Height%f != 0 {
			return checkpointError(path, "width and height must both be positive multiples of %d, got %dx%d", f,
				d.Width, d.Height)
		}
		if err := p.checkGrid(d.Width, d.Height, d.Width/f, d.Height/f); err != nil {
			return checkpointError(path, "%v", err)
		}
	}
	if err := p.checkArea(d.InputArea); err != nil {
		return checkpointError(path, "%v", err)
	}
	ds := d.Sampling
	if ds.GenLength > p.Model.Config.MaxSequenceLength {
		return checkpointError(path, "gen_length %d exceeds max_sequence_length %d", ds.GenLength,
			p.Model.Config.MaxSequenceLength)
	}
	if ds.Temperature != nil {
		if err := checkFloat("temperature", *ds.Temperature, 0, MaxTemperature); err != nil {
			return checkpointError(path, "%v", err)
		}
	}
	for _, g := range []*float64{ds.CFGScale, ds.CFGText, ds.CFGImage} {
		if g != nil {
			if err := checkFloat("guidance scale", *g, 0, MaxGuidance); err != nil {
				return checkpointError(path, "%v", err)
			}
		}
	}
	return nil
}

// LoadDefaults reads a checkpoint folder's dimoo.json (zero Defaults when
// it has none) without loading the model: for front ends that show the
// settings a request will get.
func LoadDefaults(dir string) (Defaults, error) { return loadDefaults(dir) }

// temperature settles an image request's temperature: 0 takes the model's
// dimoo.json value, else the reference's 1.0; a negative value asks for
// argmax decoding (0 to the sampler), as a negative guidance scale asks for
// none. NaN and -Inf are left for checkImageSampling to refuse.
func (p *Pipeline) temperature(t float64) float64 {
	switch {
	case t == 0:
		if d := p.defaults.Sampling.Temperature; d != nil {
			return *d
		}
		return DefaultImageSampling().Temperature
	case t < 0 && !math.IsInf(t, -1):
		return 0
	}
	return t
}

func (p *Pipeline) checkEdit(req EditRequest) error {
	if strings.TrimSpace(req.Prompt) == "" {
		return fmt.Errorf("%w: empty prompt: an edit needs an instruction", ErrInvalidArgument)
	}
	if err := checkGuidance("cfg_text", req.CFGText); err != nil {
		return err
	}
	if err := checkGuidance("cfg_img", req.CFGImage); err != nil {
		return err
	}
	return p.checkArea(req.InputArea)
}

func (p *Pipeline) checkInpaint(req InpaintRequest) error {
	if err := checkFloat("mask_h_ratio", req.MaskH, 0, 1); err != nil {
		return err
	}
	if err := checkFloat("mask_w_ratio", req.MaskW, 0, 1); err != nil {
		return err
	}
	// InputArea is unused: the image keeps its own size (checkOutputSize).
	return checkGuidance("cfg_scale", req.CFGScale)
}

func (p *Pipeline) checkUnderstand(req UnderstandRequest, o TextSampling) error {
	if err := p.checkTextLength(o); err != nil {
		return err
	}
	return p.checkArea(req.InputArea)
}

// countID counts the occurrences of id in s.
func countID(s []int32, id int32) int {
	n := 0
	for _, t := range s {
		if t == id {
			n++
		}
	}
	return n
}

// textTokens marks the ids an understanding answer may draw: those the
// tokenizer can turn back into text, image codes excluded (the model's head
// spans both, and an answer holding an image code cannot be detokenized);
// built once per pipeline, read-only after.
func (p *Pipeline) textTokens() []bool {
	p.textIDs.Do(func() { p.textMask = p.textTokenMask() })
	return p.textMask
}

func (p *Pipeline) textTokenMask() []bool {
	allowed := make([]bool, p.Model.Config.EmbeddingRows())
	lo, hi := int(p.Special.ImageOffset), int(p.Special.ImageOffset)+int(p.Special.Codebook)
	for v := range allowed {
		if v >= lo && v < hi {
			continue
		}
		_, allowed[v] = p.Tokenizer.Token(int32(v))
	}
	return allowed
}
