package serve

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// Requests go to the engine with the least load; ties take turns.
func TestRoute(t *testing.T) {
	es := []*Engine{{Name: "cuda:0", Pipeline: &dimoo.Pipeline{}}, {Name: "cuda:1", Pipeline: &dimoo.Pipeline{}},
		{Name: "cuda:2", Pipeline: &dimoo.Pipeline{}}}
	s, err := New(es, Options{})
	require.NoError(t, err)
	es[0].load.Store(3)
	es[1].load.Store(1)
	es[2].load.Store(2)
	assert.Equal(t, "cuda:1", s.route().Name) // now 3, 2, 2
	e := s.route()
	assert.Contains(t, []string{"cuda:1", "cuda:2"}, e.Name)
	// Seven more requests spread until the loads are even.
	for i := 0; i < 7; i++ {
		s.route()
	}
	assert.Equal(t, []int64{5, 5, 5}, []int64{es[0].Load(), es[1].Load(), es[2].Load()})
	// Equal loads: each engine in turn, not always the first.
	seen := map[string]bool{}
	for i := 0; i < 3; i++ {
		e := s.route()
		seen[e.Name] = true
		e.load.Add(-1)
	}
	assert.Len(t, seen, 3)
	_, err = New(nil, Options{})
	assert.Error(t, err)
}
