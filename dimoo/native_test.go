package dimoo

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Calls from many goroutines run on one OS thread, nested calls run in place
// (no deadlock), and a panic reaches the caller.
func TestNativeThread(t *testing.T) {
	if !nativeThreadSupported {
		t.Skip("calls run on the caller's thread on this OS")
	}
	var n nativeThread
	tids := make([]int, 16)
	var wg sync.WaitGroup
	for g := range tids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n.do(func() { tids[g] = threadID() })
		}()
	}
	wg.Wait()
	for _, id := range tids {
		assert.Equal(t, tids[0], id)
	}
	nested := 0
	n.do(func() { n.do(func() { nested = threadID() }) })
	assert.Equal(t, tids[0], nested)
	require.PanicsWithValue(t, "boom", func() { n.do(func() { panic("boom") }) })
	ran := false
	n.do(func() { ran = true }) // the thread survives the panic
	assert.True(t, ran)
}

// Other goroutines calling the library on the same runtime and session
// while a decode holds the native thread must queue, not deadlock: handle
// mutexes are taken on the thread, never while waiting for it.
func TestNativeThreadNoLockOrderDeadlock(t *testing.T) {
	m := loadTestModel(t, testdataDir("small-f32"))
	sp := SpecialTokens{Mask: 990, Newline: 991, BOA: 992, EOA: 993, BOI: 994, EOI: 995, Uncondition: 996, EOS: 997,
		ImageOffset: 400, Codebook: 512}
	answer := []int32{sp.BOA, sp.BOI}
	for i := 0; i < 128; i++ {
		answer = append(answer, sp.Mask)
	}
	answer = append(answer, sp.EOI, sp.EOA)
	s, err := m.NewSession(SessionOptions{MaxTokens: 140, Seqs: 2, KVCache: true})
	require.NoError(t, err)
	defer s.Close()
	// Calls on the same runtime (the sampler's mutex) and session (Forward's)
	// from another goroutine, for as long as the decode runs.
	stop := make(chan struct{})
	calls := make(chan int, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				calls <- n
				return
			default:
			}
			if _, err := m.Runtime().Describe(); err == nil {
				n++
			}
			_, _ = s.ForwardStats()
		}
	}()
	done := make(chan error, 1)
	go func() {
		_, err := s.DecodeImage(context.Background(), ImageTokens{Prefixes: [][]int32{{1, 2, 3}, {1, sp.Uncondition}},
			Weights: []float32{2, -1}, Answer: answer, Special: sp},
			ImageSampling{Steps: 24, Temperature: 1, UseCache: true, CacheRatio: 0.5, WarmupRatio: 0.25, RefreshInterval: 2},
			nil, nil)
		done <- err
	}()
	select {
	case err := <-done:
		close(stop)
		require.NoError(t, err)
		assert.Positive(t, <-calls)
	case <-time.After(2 * time.Minute):
		t.Fatal("deadlock: the decode did not finish while other calls queued")
	}
}
