package dimoo

import (
	"fmt"
	"runtime"
	"unsafe"
)

// imageSampleArgs is one step of the fused image sampler in the library
// (dimoo_sample_image): guidance over the branches' logit rows, Gumbel-max
// draw and keep-masked score per position.
type imageSampleArgs struct {
	logits   [][]float32 // per branch: rows of codebook floats
	rows     [][]int32   // per branch: the row of each position (nil: row i)
	weights  []float32
	rngPos   []int32 // per position: the position in the conditional sequence
	codebook int
	step     int
	seed     uint64
	tau      float64
	// Optional, per position: topLogp receives log softmax(l)[argmax];
	// where topValid is nonzero it is read instead (the rows did not
	// change since it was written), which spares reading them.
	topLogp  []float64
	topValid []uint8
}

// sampleImage fills codes[i] and conf[i] for every position of a.
func (r *Runtime) sampleImage(a imageSampleArgs, codes []int32, conf []float64) error {
	return r.sampleImageSelect(a, codes, conf, nil)
}

// sampleImageSelect with a non-empty sel asks only for the len(sel)
// positions a stable ascending sort by conf puts last: sel receives them in
// increasing order, with codes and conf exact there; the library may skip
// drawing the others (code -1, conf unspecified).
func (r *Runtime) sampleImageSelect(a imageSampleArgs, codes []int32, conf []float64, sel []int32) error {
	n := len(a.rngPos)
	nb := len(a.logits)
	if nb < 1 || nb > maxBranches || len(a.weights) != nb || len(a.rows) != nb {
		return fmt.Errorf("%w: %d guidance branches (1..%d, one weight and row list each)", ErrInvalidArgument, nb,
			maxBranches)
	}
	if len(codes) != n || len(conf) != n {
		return fmt.Errorf("%w: output lengths %d, %d for %d positions", ErrInvalidArgument, len(codes), len(conf), n)
	}
	if len(sel) > n {
		return fmt.Errorf("%w: %d positions to select of %d", ErrInvalidArgument, len(sel), n)
	}
	if n == 0 {
		return nil
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	c := cSampleArgs{NPos: int32(n), NBranches: int32(nb), NCodes: int32(a.codebook), Step: int32(a.step),
		Seed: a.seed, Temperature: float32(a.tau)}
	for b := 0; b < nb; b++ {
		if len(a.logits[b]) < a.codebook {
			return fmt.Errorf("%w: branch %d has no logit row", ErrInvalidArgument, b)
		}
		c.Weights[b] = a.weights[b]
		pin.Pin(&a.logits[b][0])
		c.Logits[b] = unsafe.Pointer(&a.logits[b][0])
		c.NRows[b] = int64(len(a.logits[b]) / a.codebook)
		if a.rows[b] != nil {
			if len(a.rows[b]) != n {
				return fmt.Errorf("%w: branch %d has %d rows for %d positions", ErrInvalidArgument, b, len(a.rows[b]), n)
			}
			pin.Pin(&a.rows[b][0])
			c.Rows[b] = unsafe.Pointer(&a.rows[b][0])
		}
	}
	pin.Pin(&a.rngPos[0])
	pin.Pin(&codes[0])
	pin.Pin(&conf[0])
	c.RNGPos, c.OutCodes, c.OutConf = unsafe.Pointer(&a.rngPos[0]), unsafe.Pointer(&codes[0]), unsafe.Pointer(&conf[0])
	if len(sel) > 0 {
		pin.Pin(&sel[0])
		c.OutSelected, c.NSelect = unsafe.Pointer(&sel[0]), int32(len(sel))
	}
	if a.topLogp != nil {
		if len(a.topLogp) != n || (a.topValid != nil && len(a.topValid) != n) {
			return fmt.Errorf("%w: top_logp of %d, valid flags of %d for %d positions", ErrInvalidArgument,
				len(a.topLogp), len(a.topValid), n)
		}
		pin.Pin(&a.topLogp[0])
		c.TopLogp = unsafe.Pointer(&a.topLogp[0])
		if a.topValid != nil {
			pin.Pin(&a.topValid[0])
			c.TopValid = unsafe.Pointer(&a.topValid[0])
		}
	} else if a.topValid != nil {
		return fmt.Errorf("%w: top_logp valid flags without top_logp", ErrInvalidArgument)
	}
	err := errClosed
	r.lib.native.locked(&r.mu, func() {
		if r.h != 0 {
			st := r.lib.sampleImage(r.h, &c)
			err = statusError(st, "dimoo_sample_image", func() string { return r.lib.runtimeError(r.h) })
		}
	})
	return err
}
