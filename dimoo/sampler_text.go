package dimoo

import (
	"context"
	"fmt"
	"math"
	"sort"
	"time"
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
	// stats, when set, receives the decode's timing.
	stats *DecodeStats
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
	if stepHook == nil && h.trace == nil {
		seqs := 1
		if guided {
			seqs = 2
		}
		if b := textBatcherFor(ctx, s.m, seqs, len(d.seq)); b != nil {
			return b.decodeText(ctx, d, o, h)
		}
	}
	// On the library's native thread, as the image decode (see nativeThread).
	var out []int32
	var err error
	s.m.rt.lib.native.do(func() { out, err = d.decode(ctx, s, o, h, stepHook, guided) })
	return out, err
}

func (d *textDecode) decode(ctx context.Context, s *Session, o TextSampling, h imageHooks,
	stepHook func(TextStepTrace), guided bool) ([]int32, error) {
	t0 := time.Now()
	st := d.start(s, o, h, stepHook, guided, 0)
	for !st.done() {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCancelled, err)
		}
		var outs []*Logits
		if reqs := st.requests(); len(reqs) > 0 {
			var err error
			if outs, err = s.Forward(ctx, reqs...); err != nil {
				return nil, err
			}
		}
		st.finish(outs)
	}
	if st.err != nil {
		return nil, st.err
	}
	if d.stats != nil {
		lens := []int{len(d.seq)}
		if guided {
			lens = append(lens, len(d.seq))
		}
		*d.stats = s.decodeStats(st.step, t0, lens)
	}
	return st.x, nil
}

// textStepper is the text decode as a step machine (see imageStepper):
// requests gives the step's forwards (none when the block has nothing left
// masked), finish samples from their outputs.
type textStepper struct {
	d        *textDecode
	o        TextSampling
	h        imageHooks
	stepHook func(TextStepTrace)
	guided   bool
	seqBase  int
	V        int

	x, uncond []int32
	promptPos []bool
	blocks    int
	perBlock  int
	b, i      int // block, step within it
	step      int
	lo, hi    int
	counts    []int
	pos       []int32
	finished  bool
	// kept: the logits stay in the library and each step is one
	// dimoo_text_step there (the step hook wants host rows, so not with it).
	kept           bool
	s              *Session
	selPos, selTok []int32
	err            error
}

func (d *textDecode) start(s *Session, o TextSampling, h imageHooks, stepHook func(TextStepTrace), guided bool,
	seqBase int) *textStepper {
	st := &textStepper{d: d, o: o, h: h, stepHook: stepHook, guided: guided, seqBase: seqBase,
		V: s.m.Config.EmbeddingRows(), x: append([]int32(nil), d.seq...)}
	mask := d.special.Mask
	// The unconditional pass masks every position that was not masked at the start.
	if guided {
		st.uncond = make([]int32, len(st.x))
		for i := range st.uncond {
			st.uncond[i] = mask
		}
	}
	st.promptPos = make([]bool, len(st.x))
	for i, t := range st.x {
		st.promptPos[i] = t != mask
	}
	st.blocks = o.GenLength / o.BlockLength
	st.perBlock = o.Steps / st.blocks
	st.s = s
	st.kept = stepHook == nil && s.opts.keepCapacity(st.V) >= o.BlockLength
	if st.kept && d.allowed != nil {
		if err := s.setTokenMask(d.allowed); err != nil {
			st.kept = false // the host path needs no mask in the library
		}
	}
	st.enterBlock()
	return st
}

func (st *textStepper) enterBlock() {
	st.lo, st.hi = st.d.genStart+st.b*st.o.BlockLength, st.d.genStart+(st.b+1)*st.o.BlockLength
	n := 0
	for i := st.lo; i < st.hi; i++ {
		if st.x[i] == st.d.special.Mask {
			n++
		}
	}
	st.counts = transferCounts(n, st.perBlock)
}

func (st *textStepper) done() bool { return st.finished }

// requests builds the step's forwards; nil when nothing in the block is
// masked (the step then only counts).
func (st *textStepper) requests() []ForwardRequest {
	x, mask := st.x, st.d.special.Mask
	// Only masked positions of this block can be chosen, so only
	// their logits are computed.
	st.pos = nil
	for p := st.lo; p < st.hi; p++ {
		if x[p] == mask {
			st.pos = append(st.pos, int32(p))
		}
	}
	if st.h.trace != nil {
		st.h.trace(TraceCall{Branch: 0, Input: append([]int32(nil), x...)})
	}
	if len(st.pos) == 0 {
		return nil
	}
	reqs := []ForwardRequest{{Seq: st.seqBase, Tokens: x, Logits: !st.kept, Keep: st.kept, Positions: st.pos}}
	if st.guided {
		for p := range x {
			if !st.promptPos[p] {
				st.uncond[p] = x[p]
			}
		}
		reqs = append(reqs, ForwardRequest{Seq: st.seqBase + 1, Tokens: st.uncond, Logits: !st.kept, Keep: st.kept,
			Positions: st.pos})
	}
	return reqs
}

// finish samples the step from the outputs of requests' forwards and
// moves on; after a block's last step, decoding stops if an end-of-text
// token appeared in it.
func (st *textStepper) finish(outs []*Logits) {
	o, x, pos := st.o, st.x, st.pos
	if len(pos) > 0 && st.kept {
		k := min(st.counts[st.i], len(pos))
		st.selPos, st.selTok = grow(st.selPos, k), grow(st.selTok, k)
		a := textStepArgs{seq: st.seqBase, uncond: -1, cfg: o.CFGScale, tau: o.Temperature, step: st.step, seed: o.Seed,
			useMask: st.d.allowed != nil, positions: pos}
		if st.guided {
			a.uncond = st.seqBase + 1
		}
		t0 := time.Now()
		err := st.s.textStep(a, st.selPos, st.selTok, nil)
		st.s.addSample(time.Since(t0))
		if err != nil {
			st.err, st.finished = err, true
			return
		}
		for j, p := range st.selPos {
			x[p] = st.selTok[j]
		}
	} else if len(pos) > 0 {
		x0 := make([]int32, len(pos))
		conf := make([]float64, len(pos))
		row := make([]float64, st.V)
		for j, p := range pos {
			c := outs[0].Row(j)
			for v := range row {
				row[v] = float64(c[v])
			}
			if st.guided {
				u := outs[1].Row(j)
				for v := range row {
					row[v] = float64(u[v]) + (o.CFGScale+1)*(row[v]-float64(u[v]))
				}
			}
			best, bestScore, mx := 0, math.Inf(-1), math.Inf(-1)
			for v, l := range row {
				if st.d.allowed != nil && (v >= len(st.d.allowed) || !st.d.allowed[v]) {
					mx = math.Max(mx, l)
					continue
				}
				score := l
				if o.Temperature > 0 {
					score += o.Temperature * gumbel(o.Seed, st.step, int(p), purposeTextSample, v)
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
		k := st.counts[st.i]
		if k > len(order) {
			k = len(order)
		}
		for _, j := range order[:k] {
			x[pos[j]] = x0[j]
		}
		if st.stepHook != nil {
			tr := TextStepTrace{Step: st.step, Positions: pos, Count: k, Chosen: x0}
			for _, out := range outs {
				tr.Logits = append(tr.Logits, out.Data)
			}
			for _, j := range order[:k] {
				tr.Transferred = append(tr.Transferred, pos[j])
			}
			sort.Slice(tr.Transferred, func(a, b int) bool { return tr.Transferred[a] < tr.Transferred[b] })
			st.stepHook(tr)
		}
	}
	st.step++
	if len(pos) > 0 && st.h.progress != nil {
		st.h.progress(st.step, o.Steps)
	}
	st.i++
	if st.i < st.perBlock {
		return
	}
	if st.h.blockDone != nil {
		st.h.blockDone(x, st.hi)
	}
	for i := st.lo; i < st.hi; i++ {
		if x[i] == st.d.special.EOS {
			st.finished = true
			return
		}
	}
	st.b, st.i = st.b+1, 0
	if st.b == st.blocks {
		st.finished = true
		return
	}
	st.enterBlock()
}
