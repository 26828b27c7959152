package dimoo

import (
	"fmt"
	"math/rand"
	"testing"
)

// BenchmarkSampleImage: one fused sampling call, 256 positions x 512 codes,
// two guidance branches (5, -4), temperature 1; logits of a random model
// (flat: noise drawn for most codes) and of a trained one (peaked: most
// codes pruned by the logit bound).
func BenchmarkSampleImage(b *testing.B) {
	lib, err := DefaultLibrary()
	if err != nil {
		b.Skip(err)
	}
	rt, err := lib.NewRuntime(BackendCPU, 0, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer rt.Close()
	const n, C = 256, 512
	for _, scale := range []float64{0.05, 0.3, 1, 3, 10} {
		b.Run(fmt.Sprintf("logit-std=%g", scale), func(b *testing.B) {
			rng := rand.New(rand.NewSource(1))
			lg := [][]float32{make([]float32, n*C), make([]float32, n*C)}
			for _, l := range lg {
				for i := range l {
					l[i] = float32(rng.NormFloat64() * scale)
				}
			}
			pos := make([]int32, n)
			for i := range pos {
				pos[i] = int32(100 + i)
			}
			codes, conf := make([]int32, n), make([]float64, n)
			a := imageSampleArgs{logits: lg, rows: [][]int32{nil, nil}, weights: []float32{5, -4}, rngPos: pos,
				codebook: C, seed: 3, tau: 1}
			b.ResetTimer()
			var err error
			rt.lib.native.do(func() { // as a decode loop calls it
				for i := 0; i < b.N && err == nil; i++ {
					a.step = i
					err = rt.sampleImage(a, codes, conf)
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/position")
		})
	}
}
