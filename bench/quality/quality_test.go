package main

import (
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// The shipped small model does its job: lower bounds on a small sample of
// training combinations (the full figures: go run ./bench/quality). The
// bounds sit well under what the model scores (see README) so that other
// CPUs' rounding cannot flip the test, yet far above chance (1/105 for a
// caption, 1/21 for colour and shape).
func TestShippedModelQuality(t *testing.T) {
	if testing.Short() {
		t.Skip("quality sample skipped in -short mode")
	}
	dir := dimoo.ShippedModelDir()
	if dir == "" {
		t.Skip("no shipped model")
	}
	lib, err := dimoo.DefaultLibrary()
	if err != nil {
		if os.Getenv("DIMOO_REQUIRE_LIBRARY") != "" {
			t.Fatalf("libdimoo required: %v", err)
		}
		t.Skipf("no libdimoo: %v", err)
	}
	ctx := context.Background()
	p, err := dimoo.OpenPipeline(ctx, dir, dimoo.PipelineOptions{LoadOptions: dimoo.LoadOptions{Library: lib}})
	require.NoError(t, err)
	defer p.Close()
	r, err := Run(ctx, p, dir, Sizes{T2IReps: 1, T2IMax: 20, Edit: 12, Inpaint: 12, Understand: 16, TrainOnly: true}, 7, nil)
	require.NoError(t, err)
	t.Logf("\n%s", r.Table())
	assert.Equal(t, 1.0, r.Checker.Acc(), "pixel checker on renders")
	assert.Equal(t, 20, r.T2I.Train)
	assert.GreaterOrEqual(t, r.T2I.Acc(), 0.8, "text-to-image")
	assert.GreaterOrEqual(t, r.Edit.Train, 10)
	assert.GreaterOrEqual(t, r.Edit.Acc(), 0.6, "editing")
	assert.GreaterOrEqual(t, r.Inpaint.Acc(), 0.7, "inpainting")
	assert.GreaterOrEqual(t, r.Understand.Acc(), 0.75, "understanding")
	assert.Zero(t, r.T2I.Held+r.Edit.Held+r.Inpaint.Held+r.Understand.Held, "the CI sample draws training combinations only")
}
