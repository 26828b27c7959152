package dimoo

import (
	"sync"
	"testing"

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
