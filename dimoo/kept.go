package dimoo

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Decode steps over kept logits (ABI 4): forwards with Keep leave their
// logits in the session (on the GPU for CUDA), and one library call per step
// makes the sampler's decisions there; only the decisions come back.

// imageStepArgs is one image sampling step on the session (dimoo_image_step).
type imageStepArgs struct {
	seqs    []int // per branch: the session sequence
	offsets []int // per branch: the position of answer index 0
	weights []float32
	masked  []int32 // answer-relative positions still masked, increasing
	step    int
	seed    uint64
	tau     float64
}

// imageStep draws the step. With a non-empty sel it returns the len(sel)
// positions the sampler unmasks (indices into masked, increasing, in sel)
// and their codes in codes[:len(sel)]; with an empty sel every position's
// code in codes[:len(masked)] and, when conf is not nil, confidence.
func (s *Session) imageStep(a imageStepArgs, sel, codes []int32, conf []float64) error {
	nb, n := len(a.seqs), len(a.masked)
	if nb < 1 || nb > maxBranches || len(a.offsets) != nb || len(a.weights) != nb {
		return fmt.Errorf("%w: %d guidance branches (1..%d, one offset and weight each)", ErrInvalidArgument, nb,
			maxBranches)
	}
	want := n
	if len(sel) > 0 {
		want = len(sel)
	}
	if len(sel) > n || len(codes) < want || (conf != nil && len(conf) < want) {
		return fmt.Errorf("%w: output lengths for %d positions", ErrInvalidArgument, n)
	}
	if n == 0 {
		return nil
	}
	c := cImageStepArgs{NBranches: int32(nb), NPos: int32(n), Step: int32(a.step), Seed: a.seed,
		Temperature: float32(a.tau), NSelect: int32(len(sel))}
	for b := 0; b < nb; b++ {
		c.Seqs[b], c.Offsets[b], c.Weights[b] = int32(a.seqs[b]), int32(a.offsets[b]), a.weights[b]
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(&a.masked[0])
	pin.Pin(&codes[0])
	c.Masked, c.OutCodes = unsafe.Pointer(&a.masked[0]), unsafe.Pointer(&codes[0])
	if len(sel) > 0 {
		pin.Pin(&sel[0])
		c.OutSelected = unsafe.Pointer(&sel[0])
	}
	if conf != nil {
		pin.Pin(&conf[0])
		c.OutConf = unsafe.Pointer(&conf[0])
	}
	return s.call("dimoo_image_step", func(h uintptr) int32 { return s.m.rt.lib.imageStep(h, &c) })
}

// textStepArgs is one understanding step on the session (dimoo_text_step).
type textStepArgs struct {
	seq, uncond int // uncond -1: no guidance
	cfg, tau    float64
	step        int
	seed        uint64
	useMask     bool
	positions   []int32 // masked positions of the block, increasing
}

// textStep returns the len(outPos) most confident positions (increasing)
// and their tokens; all, when not nil, gets every position's token.
func (s *Session) textStep(a textStepArgs, outPos, outTok, all []int32) error {
	n := len(a.positions)
	if len(outPos) > n || len(outTok) != len(outPos) || (all != nil && len(all) != n) {
		return fmt.Errorf("%w: output lengths for %d positions", ErrInvalidArgument, n)
	}
	if n == 0 {
		return nil
	}
	c := cTextStepArgs{Seq: int32(a.seq), UncondSeq: int32(a.uncond), CFGScale: a.cfg, Temperature: a.tau,
		Step: int32(a.step), Seed: a.seed, NPos: int32(n), NSelect: int32(len(outPos))}
	if a.useMask {
		c.UseMask = 1
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(&a.positions[0])
	c.Positions = unsafe.Pointer(&a.positions[0])
	if len(outPos) > 0 {
		pin.Pin(&outPos[0])
		pin.Pin(&outTok[0])
		c.OutPositions, c.OutTokens = unsafe.Pointer(&outPos[0]), unsafe.Pointer(&outTok[0])
	}
	if all != nil {
		pin.Pin(&all[0])
		c.OutAll = unsafe.Pointer(&all[0])
	}
	return s.call("dimoo_text_step", func(h uintptr) int32 { return s.m.rt.lib.textStep(h, &c) })
}

// setTokenMask gives the session the tokens text steps with useMask may
// draw.
func (s *Session) setTokenMask(allowed []bool) error {
	if len(allowed) == 0 {
		return fmt.Errorf("%w: empty token mask", ErrInvalidArgument)
	}
	m := make([]uint8, len(allowed))
	for i, ok := range allowed {
		if ok {
			m[i] = 1
		}
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(&m[0])
	return s.call("dimoo_ctx_set_token_mask", func(h uintptr) int32 {
		return s.m.rt.lib.tokenMask(h, &m[0], int32(len(m)))
	})
}

// cacheSelect is ML-Cache's choice of the positions to recompute in seq
// (every one of its first n positions kept): those whose row maximum is at
// most the q-quantile, increasing, appended to out[:0].
func (s *Session) cacheSelect(seq, n int, q float64, out []int32) ([]int32, error) {
	if n < 1 {
		return out[:0], fmt.Errorf("%w: cache selection over %d positions", ErrInvalidArgument, n)
	}
	out = grow(out, n)
	var k int32
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(&out[0])
	err := s.call("dimoo_cache_select", func(h uintptr) int32 {
		return s.m.rt.lib.cacheSelect(h, int32(seq), int32(n), q, &out[0], &k)
	})
	if err != nil {
		return out[:0], err
	}
	return out[:k], nil
}

// call runs one library call on the session's handle on the native thread,
// under the session's mutex, and turns its status into an error.
func (s *Session) call(name string, f func(h uintptr) int32) error {
	err := errClosed
	s.m.rt.lib.native.locked(&s.mu, func() {
		if s.h != 0 {
			err = statusError(f(s.h), name, func() string { return s.m.rt.lib.ctxError(s.h) })
		}
	})
	return err
}
