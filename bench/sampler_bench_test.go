package bench

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// BenchmarkImageSamplerOverhead: text-to-image decoding on the small random
// model (16x16 grid, 512 codes, CFG, temperature 1), reporting the time per
// step spent outside the library's forward (schedule, guidance, sampling,
// cache bookkeeping, copies) as a share of the forward time. Goal: < 2%.
// kept=true: the logits stay in the library and each step is one
// dimoo_image_step (ABI 4); kept=false: they come to Go and the library
// samples the host rows.
func BenchmarkImageSamplerOverhead(b *testing.B) {
	lib := library(b)
	m, err := dimoo.LoadModel(context.Background(), modelDir(), dimoo.LoadOptions{Library: lib})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	// Special ids inside the small model's 1000-token vocabulary.
	sp := dimoo.SpecialTokens{Mask: 990, Newline: 991, BOA: 992, EOA: 993, BOI: 994, EOI: 995, Uncondition: 996,
		EOS: 997, ImageOffset: 400, Codebook: 512}
	const gw, gh, steps = 16, 16, 16
	answer := []int32{sp.BOA, sp.BOI}
	for r := 0; r < gh; r++ {
		for c := 0; c < gw; c++ {
			answer = append(answer, sp.Mask)
		}
		answer = append(answer, sp.Newline)
	}
	answer = append(answer, sp.EOI, sp.EOA)
	cond := []int32{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}
	uncond := []int32{1, 2, 3, 4, 5, 6, 7, 996, 20}
	for _, c := range []struct{ cache, kept bool }{{false, false}, {false, true}, {true, false}, {true, true}} {
		cache, keep := c.cache, 0
		if c.kept {
			keep = int(sp.Codebook)
		}
		b.Run(fmt.Sprintf("cache=%v/kept=%v", cache, c.kept), func(b *testing.B) {
			var outside, inside, sampling time.Duration
			for i := 0; i < b.N; i++ {
				s, err := m.NewSession(dimoo.SessionOptions{MaxTokens: len(cond) + len(answer), Seqs: 2, KVCache: cache,
					KeepCols: keep})
				if err != nil {
					b.Fatal(err)
				}
				o := dimoo.ImageSampling{Steps: steps, Temperature: 1, Seed: uint64(i), UseCache: cache,
					CacheRatio: 0.9, WarmupRatio: 0.3, RefreshInterval: 5}
				t0 := time.Now()
				_, err = s.DecodeImage(context.Background(), dimoo.ImageTokens{Prefixes: [][]int32{cond, uncond},
					Weights: []float32{5, -4}, Answer: answer, Special: sp}, o, nil, nil)
				total := time.Since(t0)
				if err != nil {
					b.Fatal(err)
				}
				_, fwd := s.ForwardStats()
				_, smp := s.SampleStats()
				sampling += smp
				s.Close()
				inside += fwd
				outside += total - fwd
			}
			b.ReportMetric(100*outside.Seconds()/inside.Seconds(), "%outside-forward")
			b.ReportMetric(float64(outside.Microseconds())/float64(b.N*steps), "us-outside/step")
			b.ReportMetric(float64(inside.Microseconds())/float64(b.N*steps), "us-forward/step")
			b.ReportMetric(float64(sampling.Microseconds())/float64(b.N*steps), "us-sampling/step")
		})
	}
}
