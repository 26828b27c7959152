package dimoo

import (
	"context"
	"fmt"
	"math"
	"sort"
)

// TextSampling holds the knobs of the understanding sampler: LLaDA's
// block-wise low-confidence remasking (reference section 5).
type TextSampling struct {
	Steps       int // total steps, divisible by GenLength/BlockLength
	GenLength   int // tokens to generate
	BlockLength int // decoded left to right, Steps*BlockLength/GenLength steps each
	Temperature float64
	CFGScale    float64 // 0: no guidance
	Seed        uint64
}

// DefaultTextSampling is the official understanding script's setting (--steps 128 --gen_length 1024
// --block_length 256).
func DefaultTextSampling() TextSampling {
	return TextSampling{Steps: 128, GenLength: 1024, BlockLength: 256}
}

func (o TextSampling) validate() error {
	switch {
	case o.GenLength < 1:
		return fmt.Errorf("%w: gen_length must be >= 1, got %d", ErrInvalidArgument, o.GenLength)
	case o.BlockLength < 1 || o.GenLength%o.BlockLength != 0:
		return fmt.Errorf("%w: gen_length %d is not a multiple of block_length %d", ErrInvalidArgument,
			o.GenLength, o.BlockLength)
	case o.Steps < 1 || o.Steps%(o.GenLength/o.BlockLength) != 0:
		return fmt.Errorf("%w: steps %d is not a positive multiple of the %d blocks", ErrInvalidArgument, o.Steps,
			o.GenLength/o.BlockLength)
	case o.Steps > o.GenLength:
		return fmt.Errorf("%w: %d steps for %d tokens: steps must be at most gen_length", ErrInvalidArgument,
			o.Steps, o.GenLength)
	}
	if err := checkFloat("temperature", o.Temperature, 0, MaxTemperature); err != nil {
		return err
	}
	return checkFloat("cfg scale", o.CFGScale, 0, MaxGuidance)
}

// transferCounts splits n masked tokens over steps: the same number each,
// the remainder going to the first steps.
func transferCounts(n, steps int) []int {
	c := make([]int, steps)
	for i := range c {
		c[i] = n / steps
		if i < n%steps {
			c[i]++
		}
	}
	return c
}

// textDecode is one understanding problem: seq holds the prompt (with the
// image) and GenLength MASK tokens starting at genStart.
type textDecode struct {
	seq      []int32
	genStart int
	special  SpecialTokens
	// allowed, when set, restricts the draw to the ids marked (text
	// tokens: an answer of image codes could not be detokenized); the
	// confidence stays the full softmax's.
	allowed []bool
}

// run decodes the masked span and returns the whole sequence. Decoding stops
// after the block in which an end-of-text token appears.
// TextStepTrace records one text sampling step for replay: the masked
// positions of the block, each branch's logits there (full rows), the number
// to unmask, the argmax token of each position, and the positions unmasked.
type TextStepTrace struct {
	Step        int         `json:"step"`
	Positions   []int32     `json:"positions"`
	Logits      [][]float32 `json:"logits"`
	Count       int         `json:"count"`
	Chosen      []int32     `json:"chosen"`
	Transferred []int32     `json:"transferred"`
}

func (d *textDecode) run(ctx context.Context, s *Session, o TextSampling, h imageHooks) ([]int32, error) {
	return d.runTraced(ctx, s, o, h, nil)
}

func (d *textDecode) runTraced(ctx context.Context, s *Session, o TextSampling, h imageHooks,
	stepHook func(TextStepTrace)) ([]int32, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	if d.genStart+o.GenLength > len(d.seq) {
		return nil, fmt.Errorf("%w: the sequence has no room for %d generated tokens", ErrInvalidArgument, o.GenLength)
	}
	guided := o.CFGScale > 0
	if guided && s.opts.Seqs < 2 {
		return nil, fmt.Errorf("%w: guidance needs a session of 2 sequences", ErrInvalidArgument)
	}
	// On the library's native thread, as the image decode (see nativeThread).
	var out []int32
	var err error
	s.m.rt.lib.native.do(func() { out, err = d.decode(ctx, s, o, h, stepHook, guided) })
	return out, err
}

func (d *textDecode) decode(ctx context.Context, s *Session, o TextSampling, h imageHooks,
	stepHook func(TextStepTrace), guided bool) ([]int32, error) {
	x := append([]int32(nil), d.seq...)
	mask := d.special.Mask
	// The unconditional pass masks every position that was not masked at the start.
	var uncond []int32
	if guided {
		uncond = make([]int32, len(x))
		for i := range uncond {
			uncond[i] = mask
		}
	}
	promptPos := make([]bool, len(x))
	for i, t := range x {
		promptPos[i] = t != mask
	}
	blocks := o.GenLength / o.BlockLength
	perBlock := o.Steps / blocks
	step := 0
	V := s.m.Config.EmbeddingRows()
	for b := 0; b < blocks; b++ {
		lo, hi := d.genStart+b*o.BlockLength, d.genStart+(b+1)*o.BlockLength
		n := 0
		for i := lo; i < hi; i++ {
			if x[i] == mask {
				n++
			}
		}
		counts := transferCounts(n, perBlock)
		for i := 0; i < perBlock; i++ {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrCancelled, err)
			}
			// Only masked positions of this block can be chosen, so only
			// their logits are computed.
			var pos []int32
			for p := lo; p < hi; p++ {
				if x[p] == mask {
					pos = append(pos, int32(p))
				}
			}
			if h.trace != nil {
				h.trace(TraceCall{Branch: 0, Input: append([]int32(nil), x...)})
			}
			if len(pos) == 0 {
				step++
				continue
			}
			reqs := []ForwardRequest{{Seq: 0, Tokens: x, Logits: true, Positions: pos}}
			if guided {
				for p := range x {
					if !promptPos[p] {
						uncond[p] = x[p]
					}
				}
				reqs = append(reqs, ForwardRequest{Seq: 1, Tokens: uncond, Logits: true, Positions: pos})
			}
			outs, err := s.Forward(ctx, reqs...)
			if err != nil {
				return nil, err
			}
			x0 := make([]int32, len(pos))
			conf := make([]float64, len(pos))
			row := make([]float64, V)
			for j, p := range pos {
				c := outs[0].Row(j)
				for v := range row {
					row[v] = float64(c[v])
				}
				if guided {
					u := outs[1].Row(j)
					for v := range row {
						row[v] = float64(u[v]) + (o.CFGScale+1)*(row[v]-float64(u[v]))
					}
				}
				best, bestScore, mx := 0, math.Inf(-1), math.Inf(-1)
				for v, l := range row {
					if d.allowed != nil && (v >= len(d.allowed) || !d.allowed[v]) {
						mx = math.Max(mx, l)
						continue
					}
					score := l
					if o.Temperature > 0 {
						score += o.Temperature * gumbel(o.Seed, step, int(p), purposeTextSample, v)
					}
					if score > bestScore {
						best, bestScore = v, score
					}
					mx = math.Max(mx, l)
				}
				var sum float64
				for _, l := range row {
					sum += math.Exp(l - mx)
				}
				x0[j] = int32(best)
				conf[j] = math.Exp(row[best]-mx) / sum
			}
			// Unmask the most confident (ties: earlier first).
			order := make([]int, len(pos))
			for j := range order {
				order[j] = j
			}
			sort.SliceStable(order, func(a, b int) bool { return conf[order[a]] > conf[order[b]] })
			k := counts[i]
			if k > len(order) {
				k = len(order)
			}
			for _, j := range order[:k] {
				x[pos[j]] = x0[j]
			}
			if stepHook != nil {
				st := TextStepTrace{Step: step, Positions: pos, Count: k, Chosen: x0}
				for _, out := range outs {
					st.Logits = append(st.Logits, out.Data)
				}
				for _, j := range order[:k] {
					st.Transferred = append(st.Transferred, pos[j])
				}
				sort.Slice(st.Transferred, func(a, b int) bool { return st.Transferred[a] < st.Transferred[b] })
				stepHook(st)
			}
			step++
			if h.progress != nil {
				h.progress(step, o.Steps)
			}
		}
		for i := lo; i < hi; i++ {
			if x[i] == d.special.EOS {
				return x, nil
			}
		}
	}
	return x, nil
}
