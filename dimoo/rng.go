package dimoo

import "math"

// Counter-based random numbers: every draw is a pure function of (seed,
// step, position, purpose, index), so a seed gives the same result on every
// run, in any order of evaluation, and on every backend (the CUDA sampler
// computes the same Philox4x32-10 function per thread).

// Purposes of random draws; part of the counter, so streams never overlap.
const (
	purposeImageSample = 1 // Gumbel noise added to image-code logits
	purposeImageRemask = 2 // Gumbel noise for the keep-masked choice
	purposeTextSample  = 3 // Gumbel noise added to text logits
)

// philox4x32 runs the 10-round Philox4x32 bijection on a 128-bit counter
// under a 64-bit key.
func philox4x32(c [4]uint32, k0, k1 uint32) [4]uint32 {
	const (
		m0 = 0xD2511F53
		m1 = 0xCD9E8D57
		w0 = 0x9E3779B9
		w1 = 0xBB67AE85
	)
	for r := 0; r < 10; r++ {
		p0 := uint64(m0) * uint64(c[0])
		p1 := uint64(m1) * uint64(c[2])
		c = [4]uint32{
			uint32(p1>>32) ^ c[1] ^ k0,
			uint32(p1),
			uint32(p0>>32) ^ c[3] ^ k1,
			uint32(p0),
		}
		k0 += w0
		k1 += w1
	}
	return c
}

// uniform01 is a draw in the open interval (0, 1): word index&3 of the
// block at counter (pos, index>>2, step, purpose), so one block serves four
// consecutive indices (the library's dimoo_sample_image draws the same).
func uniform01(seed uint64, step, pos, purpose, index int) float64 {
	w := philox4x32([4]uint32{uint32(pos), uint32(index >> 2), uint32(step), uint32(purpose)},
		uint32(seed), uint32(seed>>32))
	return (float64(w[index&3]) + 0.5) / 4294967296.0
}

// gumbel is a standard Gumbel(0, 1) draw: -log(-log(u)).
func gumbel(seed uint64, step, pos, purpose, index int) float64 {
	return -math.Log(-math.Log(uniform01(seed, step, pos, purpose, index)))
}
