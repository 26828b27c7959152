package dimoo

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"
	"time"
)

// ImageSampling holds the knobs of the MaskGIT-style image decoder
// (reference section 3) and of ML-Cache (section 4).
type ImageSampling struct {
	Steps       int     // timesteps (default 64); Pipeline requests cap them at the codes to decode
	Temperature float64 // Gumbel temperature; 0 = argmax (Pipeline requests: 0 = model default, < 0 = argmax)
	Seed        uint64

	UseCache        bool
	CacheRatio      float64 // share of positions whose logits are reused (0.9)
	WarmupRatio     float64 // share of steps that are always full (0.3)
	RefreshInterval int     // full step every this many steps after warm-up (5)
}

// DefaultImageSampling is the reference's text-to-image setting.
func DefaultImageSampling() ImageSampling {
	return ImageSampling{Steps: 64, Temperature: 1.0, CacheRatio: 0.9, WarmupRatio: 0.3, RefreshInterval: 5}
}

func (o ImageSampling) validate() error { return checkImageSampling(o, 0) }

// refreshSteps marks the steps that run every position (section 4): all of
// them without the cache; with it, the warm-up and every R-th step after.
func (o ImageSampling) refreshSteps() []bool {
	r := make([]bool, o.Steps)
	warm := int(float64(o.Steps) * o.WarmupRatio)
	for t := range r {
		r[t] = !o.UseCache || t <= warm || (t-warm)%o.RefreshInterval == 0
	}
	return r
}

// keepMasked is how many positions stay masked after step t of S when N
// started masked: floor(N cos(pi/2 (t+1)/S)), at least 1, and 0 after the
// last step. Computed in float32, as the reference does.
func keepMasked(n, t, steps int) int {
	if t >= steps-1 {
		return 0
	}
	r := float32(float64(t+1) / float64(steps))
	c := float32(math.Cos(float64(r * float32(math.Pi) / 2)))
	k := int(math.Floor(float64(float32(n) * c)))
	if k < 1 {
		k = 1
	}
	return k
}

// quantileF32 is torch.quantile's linear interpolation on float32 data.
func quantileF32(v []float32, q float64) float32 {
	var scratch []float32
	return quantileInto(v, q, &scratch)
}

// quantileInto is quantileF32 with a reusable scratch buffer, by selection
// rather than a full sort: the two order statistics it interpolates are the
// lo-th smallest and the least of those above it.
func quantileInto(v []float32, q float64, scratch *[]float32) float32 {
	s := append((*scratch)[:0], v...)
	*scratch = s
	rank := float32(q) * float32(len(s)-1)
	lo := int(rank)
	hi := lo + 1
	if hi >= len(s) {
		hi = len(s) - 1
	}
	selectNth(s, lo)
	a, b := s[lo], s[lo]
	if hi > lo {
		b = slices.Min(s[lo+1:])
	}
	w := rank - float32(lo)
	if w < 0.5 {
		return a + w*(b-a)
	}
	return b - (b-a)*(1-w)
}

// selectNth reorders s so that s[k] is the value a sort would put there,
// with nothing smaller after it (quickselect, median-of-three pivots).
func selectNth(s []float32, k int) {
	lo, hi := 0, len(s)-1
	for hi > lo {
		mid := lo + (hi-lo)/2
		if s[mid] < s[lo] {
			s[mid], s[lo] = s[lo], s[mid]
		}
		if s[hi] < s[lo] {
			s[hi], s[lo] = s[lo], s[hi]
		}
		if s[hi] < s[mid] {
			s[hi], s[mid] = s[mid], s[hi]
		}
		pivot := s[mid]
		i, j := lo, hi
		for i <= j {
			for s[i] < pivot {
				i++
			}
			for s[j] > pivot {
				j--
			}
			if i <= j {
				s[i], s[j] = s[j], s[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return
		}
	}
}

// TraceCall records one forward the sampler made, for fidelity tests and
// debugging: the branch, its whole input, and the positions recomputed on a
// cached step (nil on a full one).
type TraceCall struct {
	Branch    int
	Input     []int32
	ToCompute []int32
}

// imageDecode is one masked-image decoding problem: per guidance branch a
// prefix (the prompt; branch 0 is the conditional one), a shared answer
// part (BOA, BOI, the grid with MASK where codes are to be decoded,
// newlines, EOI, EOA), and the guidance weights: the logits decoded are
// sum_b weights[b] * logits_b.
type imageDecode struct {
	prefixes [][]int32
	answer   []int32
	weights  []float32
	special  SpecialTokens
	codebook int
}

// StepTrace records one sampling step's inputs and decisions, so an
// independent implementation can replay the step: the masked positions
// (answer-relative) and their RNG positions, each branch's logits there
// (rows of codebook floats), the number kept masked, the codes drawn, and
// the positions re-masked.
type StepTrace struct {
	Step     int         `json:"step"`
	Masked   []int       `json:"masked"`
	RNGPos   []int       `json:"rng_pos"`
	Logits   [][]float32 `json:"logits"`
	Keep     int         `json:"keep"`
	Sampled  []int32     `json:"sampled"`
	Remasked []int       `json:"remasked"`
}

// imageHooks observe the decoding: trace of every forward, of every
// sampling step, and progress after every step.
type imageHooks struct {
	trace    func(TraceCall)
	step     func(StepTrace)
	progress func(step, total int)
	// blockDone (text decodes): after each finished block, the tokens and
	// the end of that block; generated tokens before it are final.
	blockDone func(x []int32, end int)
}

// run decodes every masked position of the answer and returns it.
func (d *imageDecode) run(ctx context.Context, s *Session, o ImageSampling, h imageHooks) ([]int32, error) {
	if err := checkImageSampling(o, countID(d.answer, d.special.Mask)); err != nil {
		return nil, err
	}
	// The whole decode runs on the library's native thread (see
	// nativeThread): its forwards and sampling calls need no hand-off.
	var out []int32
	var err error
	s.m.rt.lib.native.do(func() { out, err = d.decode(ctx, s, o, h) })
	return out, err
}

func (d *imageDecode) decode(ctx context.Context, s *Session, o ImageSampling, h imageHooks) ([]int32, error) {
	st, err := d.start(s, o, h, 0)
	if err != nil {
		return nil, err
	}
	for !st.done() {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrCancelled, err)
		}
		outs, err := s.Forward(ctx, st.requests()...)
		if err != nil {
			return nil, err
		}
		if err := st.finish(outs); err != nil {
			return nil, err
		}
	}
	return st.answer, nil
}

// imageStepper is the image decode as a step machine: requests gives the
// forwards of the next step (one per guidance branch, in sequence slots
// seqBase..seqBase+branches-1), finish takes their outputs and samples. A
// decode loop alternates the two; a batcher joins several steppers'
// requests into one forward call (each stepper's decisions depend only on
// its own rows and its own seed, step and positions).
type imageStepper struct {
	d       *imageDecode
	s       *Session // for the runtime's sampler and its statistics
	o       ImageSampling
	h       imageHooks
	seqBase int

	t       int
	keep    int
	answer  []int32
	masked  []int // answer-relative positions still masked
	n0      int
	C, off  int
	refresh []bool

	seqs       [][]int32
	logitCache [][]float32 // ML-Cache: (T_b, C) image logits per branch
	rowMax     [][]float32 // ML-Cache: the max of each logitCache row
	outBuf     [][]float32 // per-branch forward outputs, reused across steps
	useMax     [][]float32 // row maxima of cached steps' outputs, reused
	toCompute  [][]int32
	// ML-Cache: per answer position, log softmax(l)[argmax] of its guided
	// row, valid while no branch's row there is recomputed: the library's
	// selection then need not read the row.
	topLogp  []float64
	topValid []uint8
	// Buffers reused across steps: a step allocates next to nothing, so the
	// garbage collector stays out of the way of the forwards.
	reqs     []ForwardRequest
	posBuf   [][]int32
	sa       imageSampleArgs
	rowBuf   [][]int32
	codes    []int32
	sel      []int32
	conf     []float64
	spare    []int
	qScratch []float32
	// kept: the logits stay in the library (SessionOptions.KeepCols) and
	// each step is one dimoo_image_step there (finishKept); otherwise they
	// come to Go and the library samples host rows.
	kept     bool
	step     imageStepArgs
	masked32 []int32
}

// start checks the problem against the session and sets up step 0.
func (d *imageDecode) start(s *Session, o ImageSampling, h imageHooks, seqBase int) (*imageStepper, error) {
	if err := o.validate(); err != nil {
		return nil, err
	}
	nb := len(d.prefixes)
	if nb == 0 || nb != len(d.weights) || seqBase < 0 || seqBase+nb > s.opts.Seqs {
		return nil, fmt.Errorf("%w: %d guidance branches for a session of %d sequences", ErrInvalidArgument, nb, s.opts.Seqs)
	}
	if o.UseCache && !s.opts.KVCache {
		return nil, fmt.Errorf("%w: ML-Cache needs a session with KVCache", ErrInvalidArgument)
	}
	st := &imageStepper{d: d, s: s, o: o, h: h, seqBase: seqBase, answer: append([]int32(nil), d.answer...)}
	for i, t := range st.answer {
		if t == d.special.Mask {
			st.masked = append(st.masked, i)
		}
	}
	st.n0 = len(st.masked)
	st.C, st.off = d.codebook, int(d.special.ImageOffset)
	st.refresh = o.refreshSteps()
	st.seqs = make([][]int32, nb)
	st.logitCache, st.rowMax = make([][]float32, nb), make([][]float32, nb)
	st.outBuf, st.useMax = make([][]float32, nb), make([][]float32, nb)
	st.toCompute = make([][]int32, nb)
	if o.UseCache {
		st.topLogp, st.topValid = make([]float64, len(st.answer)), make([]uint8, len(st.answer))
	}
	st.reqs = make([]ForwardRequest, nb)
	st.posBuf = make([][]int32, nb)
	st.sa = imageSampleArgs{codebook: st.C, seed: o.Seed, tau: o.Temperature, weights: d.weights,
		logits: make([][]float32, nb), rows: make([][]int32, nb)}
	st.rowBuf = make([][]int32, nb)
	// Kept logits need room for every position of the longest branch (an
	// ML-Cache STORE keeps them all); the step hook wants host rows.
	longest := 0
	for _, p := range d.prefixes {
		longest = max(longest, len(p)+len(d.answer))
	}
	st.kept = h.step == nil && s.opts.keepCapacity(st.C) >= longest
	if st.kept {
		st.step = imageStepArgs{seqs: make([]int, nb), offsets: make([]int, nb), weights: d.weights, seed: o.Seed,
			tau: o.Temperature}
		for b := range d.prefixes {
			st.step.seqs[b], st.step.offsets[b] = seqBase+b, len(d.prefixes[b])
		}
	}
	return st, nil
}

// done reports whether every step has run or nothing is left masked.
func (st *imageStepper) done() bool { return st.t >= st.o.Steps || len(st.masked) == 0 }

// requests builds step t's forwards (valid until finish returns).
func (st *imageStepper) requests() []ForwardRequest {
	d, o, t, C, off := st.d, st.o, st.t, st.C, st.off
	st.keep = keepMasked(st.n0, t, o.Steps)
	for b := range d.prefixes {
		st.seqs[b] = append(append(st.seqs[b][:0], d.prefixes[b]...), st.answer...)
		r := ForwardRequest{Seq: st.seqBase + b, Tokens: st.seqs[b], Logits: true, VocabBegin: off, VocabEnd: off + C,
			Out: st.outBuf[b]}
		P := int32(len(d.prefixes[b]))
		if st.kept {
			// The logits stay in the library: nothing comes back.
			r.Logits, r.Keep, r.Out = false, true, nil
		}
		switch {
		case st.kept && !o.UseCache:
			st.posBuf[b] = st.posBuf[b][:0]
			for _, p := range st.masked {
				st.posBuf[b] = append(st.posBuf[b], P+int32(p))
			}
			r.Positions = st.posBuf[b]
		case st.kept && st.refresh[t]:
			r.CacheMode = CacheStore
		case st.kept:
			r.CacheMode = CacheUse
			r.Compute, r.Positions = st.toCompute[b], st.toCompute[b]
		case !o.UseCache:
			st.posBuf[b] = st.posBuf[b][:0]
			for _, p := range st.masked {
				st.posBuf[b] = append(st.posBuf[b], P+int32(p))
			}
			r.Positions = st.posBuf[b]
		case st.refresh[t]:
			// The whole (T, C) output becomes the branch's logit cache.
			r.CacheMode = CacheStore
			if cap(st.logitCache[b]) < len(st.seqs[b])*C {
				st.logitCache[b] = make([]float32, len(st.seqs[b])*C)
			}
			r.Out = st.logitCache[b]
			r.RowMax, r.MaxOut = true, st.rowMax[b]
		default:
			r.CacheMode = CacheUse
			r.Compute = st.toCompute[b]
			r.Positions = st.toCompute[b]
			r.RowMax, r.MaxOut = true, st.useMax[b]
		}
		st.reqs[b] = r
		if st.h.trace != nil {
			tc := TraceCall{Branch: b, Input: append([]int32(nil), st.seqs[b]...)}
			if r.CacheMode == CacheUse {
				tc.ToCompute = append([]int32(nil), r.Compute...)
			}
			st.h.trace(tc)
		}
	}
	return st.reqs
}

// finish samples step t from the outputs of requests' forwards (in the same
// order) and moves to the next step.
func (st *imageStepper) finish(outs []*Logits) error {
	if st.kept {
		return st.finishKept()
	}
	d, o, t, C, off := st.d, st.o, st.t, st.C, st.off
	s, h, reqs, sa := st.s, st.h, st.reqs, &st.sa
	answer, masked, keep := st.answer, st.masked, st.keep
	mask := d.special.Mask
	topLogp, topValid := st.topLogp, st.topValid

	// Each branch's logits at the masked positions: rows of the forward's
	// output, or (ML-Cache) of the branch's logit cache, whose row maxima
	// are kept up to date as rows change.
	sa.step = t
	sa.rngPos = sa.rngPos[:0]
	for _, p := range masked {
		sa.rngPos = append(sa.rngPos, int32(len(d.prefixes[0])+p))
	}
	for b := range d.prefixes {
		if reqs[b].CacheMode != CacheStore {
			st.outBuf[b] = outs[b].Data
		}
		if !o.UseCache {
			sa.logits[b], sa.rows[b] = outs[b].Data, nil
			continue
		}
		if reqs[b].CacheMode == CacheStore {
			st.logitCache[b], st.rowMax[b] = outs[b].Data, outs[b].Max
		} else {
			st.useMax[b] = outs[b].Max
			for i, p := range reqs[b].Compute {
				copy(st.logitCache[b][int(p)*C:(int(p)+1)*C], outs[b].Row(i))
				st.rowMax[b][p] = outs[b].Max[i]
			}
		}
		sa.logits[b] = st.logitCache[b]
		P := len(d.prefixes[b])
		st.rowBuf[b] = st.rowBuf[b][:0]
		for _, p := range masked {
			st.rowBuf[b] = append(st.rowBuf[b], int32(P+p))
		}
		sa.rows[b] = st.rowBuf[b]
		if reqs[b].CacheMode == CacheStore {
			clear(topValid)
		} else {
			for _, p := range reqs[b].Compute {
				if q := int(p) - P; q >= 0 && q < len(answer) {
					topValid[q] = 0
				}
			}
		}
	}
	if o.UseCache {
		sa.topLogp, sa.topValid = sa.topLogp[:0], sa.topValid[:0]
		for _, p := range masked {
			sa.topLogp, sa.topValid = append(sa.topLogp, topLogp[p]), append(sa.topValid, topValid[p])
		}
	}
	st.codes, st.conf = grow(st.codes, len(masked)), grow(st.conf, len(masked))
	codes, conf := st.codes, st.conf
	// Keep what the library wrote to topLogp once the call is made.
	saveTop := func() {
		for i, p := range masked {
			topLogp[p], topValid[p] = sa.topLogp[i], 1
		}
	}
	if h.step == nil {
		// Only the len(masked) - keep positions to unmask are needed: the
		// library draws those it must to find them (exactly the ones
		// the full draw and sort below would pick).
		if keep < len(masked) {
			st.sel = grow(st.sel, len(masked)-keep)
			sel := st.sel
			t0 := time.Now()
			err := s.m.rt.sampleImageSelect(*sa, codes, conf, sel)
			s.addSample(time.Since(t0))
			if err != nil {
				return err
			}
			if o.UseCache {
				saveTop()
			}
			still := st.spare[:0]
			k := 0
			for i, p := range masked {
				if k < len(sel) && int(sel[k]) == i {
					answer[p] = int32(off) + codes[i]
					k++
				} else {
					still = append(still, p)
				}
			}
			masked, st.spare = still, masked
		}
	} else {
		t0 := time.Now()
		err := s.m.rt.sampleImage(*sa, codes, conf)
		s.addSample(time.Since(t0))
		if err != nil {
			return err
		}
		if o.UseCache {
			saveTop()
		}
		for i, p := range masked {
			answer[p] = int32(off) + codes[i]
		}
		tr := &StepTrace{Step: t, Masked: append([]int(nil), masked...), Keep: keep, Logits: sa.rowsOf(len(masked))}
		for _, p := range masked {
			tr.RNGPos = append(tr.RNGPos, len(d.prefixes[0])+p)
			tr.Sampled = append(tr.Sampled, answer[p]-int32(off))
		}
		// Re-mask the keep lowest-confidence positions (ties: earlier first).
		if keep >= len(masked) {
			for _, p := range masked {
				answer[p] = mask
			}
		} else {
			order := make([]int, len(masked))
			for i := range order {
				order[i] = i
			}
			slices.SortStableFunc(order, func(a, b int) int { return cmp.Compare(conf[a], conf[b]) })
			still := make([]int, 0, keep)
			for _, i := range order[:keep] {
				answer[masked[i]] = mask
				still = append(still, masked[i])
			}
			slices.Sort(still)
			masked = still
		}
		tr.Remasked = append([]int{}, masked...)
		h.step(*tr)
	}
	st.masked = masked

	// ML-Cache: choose next step's positions from each branch's max logit.
	if o.UseCache && t < o.Steps-1 && !st.refresh[t+1] {
		for b := range d.prefixes {
			mx := st.rowMax[b]
			thr := quantileInto(mx, 1-o.CacheRatio, &st.qScratch)
			st.toCompute[b] = st.toCompute[b][:0]
			for p, v := range mx {
				if v <= thr {
					st.toCompute[b] = append(st.toCompute[b], int32(p))
				}
			}
		}
	}
	st.t++
	if h.progress != nil {
		h.progress(t+1, o.Steps)
	}
	return nil
}

// finishKept is finish over kept logits: one library call draws the step
// and returns the positions to unmask with their codes; with ML-Cache a
// second one per branch chooses the next step's rows.
func (st *imageStepper) finishKept() error {
	o, t, s := st.o, st.t, st.s
	masked, keep := st.masked, st.keep
	if keep < len(masked) {
		st.masked32 = st.masked32[:0]
		for _, p := range masked {
			st.masked32 = append(st.masked32, int32(p))
		}
		n := len(masked) - keep
		st.sel, st.codes = grow(st.sel, n), grow(st.codes, n)
		st.step.masked, st.step.step = st.masked32, t
		t0 := time.Now()
		err := s.imageStep(st.step, st.sel, st.codes, nil)
		s.addSample(time.Since(t0))
		if err != nil {
			return err
		}
		still := st.spare[:0]
		k := 0
		for i, p := range masked {
			if k < n && int(st.sel[k]) == i {
				st.answer[p] = int32(st.off) + st.codes[k]
				k++
			} else {
				still = append(still, p)
			}
		}
		st.masked, st.spare = still, masked
	}
	if o.UseCache && t < o.Steps-1 && !st.refresh[t+1] {
		t0 := time.Now()
		for b := range st.d.prefixes {
			var err error
			st.toCompute[b], err = s.cacheSelect(st.seqBase+b, len(st.seqs[b]), 1-o.CacheRatio, st.toCompute[b])
			if err != nil {
				return err
			}
		}
		s.addSample(time.Since(t0))
	}
	st.t++
	if st.h.progress != nil {
		st.h.progress(t+1, o.Steps)
	}
	return nil
}

// grow returns s resized to n, reallocated only when too small.
func grow[T any](s []T, n int) []T {
	if cap(s) < n {
		return make([]T, n)
	}
	return s[:n]
}

// ImageTokens is an image-decoding problem given as token ids, for callers
// with their own prompts: one prefix per guidance branch (branch 0 the
// conditional one), the answer part they share (BOA, BOI, grid with MASK
// where codes are wanted, EOI, EOA), and the weights that combine the
// branches' logits.
type ImageTokens struct {
	Prefixes [][]int32
	Weights  []float32
	Answer   []int32
	Special  SpecialTokens
}

// DecodeImage runs the image sampler in this session (Seqs >= branches,
// KVCache for ML-Cache) and returns the decoded answer. trace and progress
// may be nil.
func (s *Session) DecodeImage(ctx context.Context, p ImageTokens, o ImageSampling, trace func(TraceCall),
	progress func(step, total int)) ([]int32, error) {
	d := &imageDecode{prefixes: p.Prefixes, answer: p.Answer, weights: p.Weights, special: p.Special,
		codebook: int(p.Special.Codebook)}
	if err := p.Special.checkVocab(s.m.Config.EmbeddingRows()); err != nil {
		return nil, err
	}
	return d.run(ctx, s, o, imageHooks{trace: trace, progress: progress})
}

// rowsOf copies each branch's logit rows at the n positions (for traces).
func (a imageSampleArgs) rowsOf(n int) [][]float32 {
	C := a.codebook
	out := make([][]float32, len(a.logits))
	for b := range a.logits {
		r := make([]float32, n*C)
		for i := 0; i < n; i++ {
			row := i
			if a.rows[b] != nil {
				row = int(a.rows[b][i])
			}
			copy(r[i*C:(i+1)*C], a.logits[b][row*C:(row+1)*C])
		}
		out[b] = r
	}
	return out
}
