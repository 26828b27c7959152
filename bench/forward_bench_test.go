// Package bench holds the engine's benchmarks (never run as tests):
//
//	go test -run '^$' -bench . ./bench/
//
// Each reports domain metrics with b.ReportMetric: tokens/s for the forward,
// ns per call for the C boundary.
package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/dimoo-dev/dimoo/dimoo"
)

func library(b *testing.B) *dimoo.Library {
	lib, err := dimoo.DefaultLibrary()
	if err != nil {
		b.Skipf("libdimoo not built: %v", err)
	}
	return lib
}

// modelDir is $DIMOO_BENCH_MODEL, or the small random fp32 checkpoint.
func modelDir() string {
	if d := os.Getenv("DIMOO_BENCH_MODEL"); d != "" {
		return d
	}
	return filepath.Join("..", "testdata", "small-f32")
}

// BenchmarkForwardCPU: one full forward (all logits) on the CPU backend.
func BenchmarkForwardCPU(b *testing.B) {
	lib := library(b)
	m, err := dimoo.LoadModel(context.Background(), modelDir(), dimoo.LoadOptions{Library: lib})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	for _, T := range []int{64, 300} {
		b.Run(fmt.Sprintf("T=%d", T), func(b *testing.B) {
			tokens := make([]int32, T)
			for i := range tokens {
				tokens[i] = int32((i * 7919) % m.Config.VocabSize)
			}
			s, err := m.NewSession(dimoo.SessionOptions{MaxTokens: T})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			req := dimoo.ForwardRequest{Tokens: tokens, Logits: true}
			ctx := context.Background()
			if _, err := s.Forward(ctx, req); err != nil { // warm-up: first-touch of scratch pages
				b.Fatal(err)
			}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := s.Forward(ctx, req); err != nil {
					b.Fatal(err)
				}
			}
			sec := b.Elapsed().Seconds()
			b.ReportMetric(float64(T*b.N)/sec, "tokens/s")
			// 2 FLOPs per weight per token in the projections and the head.
			flops := 2 * float64(m.Config.ParamCount()-int64(m.Config.EmbeddingRows()*m.Config.DModel)) * float64(T)
			b.ReportMetric(flops*float64(b.N)/sec/1e9, "GFLOP/s")
		})
	}
}

// BenchmarkPuregoCall prices one crossing of the C boundary (a call that
// does nothing but return a constant), next to a plain Go call as baseline.
func BenchmarkPuregoCall(b *testing.B) {
	lib := library(b)
	b.Run("purego", func(b *testing.B) {
		var sum int32
		for i := 0; i < b.N; i++ {
			sum += lib.ABIVersion()
		}
		if sum == 0 {
			b.Fatal("no calls")
		}
	})
	b.Run("go-baseline", func(b *testing.B) {
		var sum int32
		for i := 0; i < b.N; i++ {
			sum += goABIVersion()
		}
		if sum == 0 {
			b.Fatal("no calls")
		}
	})
}

//go:noinline
func goABIVersion() int32 { return dimoo.ABIVersion }
