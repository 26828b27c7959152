// Command quality measures the shipped small model (or --model) through the
// Go pipeline with the repo's pixel checker: text-to-image, editing,
// inpainting of a masked half and understanding, held-out combinations
// reported apart. `go run ./bench/quality` prints the table.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

func main() {
	model := flag.String("model", "", "model folder (default: the shipped small model)")
	reps := flag.Int("t2i-reps", 2, "text-to-image samples per combination (105 combinations)")
	edits := flag.Int("edit", 210, "editing items")
	inpaint := flag.Int("inpaint", 210, "inpainting items")
	und := flag.Int("understand", 210, "understanding items")
	seed := flag.Int64("seed", 1, "seed of the item draws")
	anyJitter := flag.Bool("any-jitter", false, "input renders from all 27 jitters (default: the training data's 18)")
	flag.Parse()
	sz := Sizes{T2IReps: *reps, Edit: *edits, Inpaint: *inpaint, Understand: *und, AnyJitter: *anyJitter}
	if err := run(*model, sz, *seed); err != nil {
		fmt.Fprintln(os.Stderr, "quality:", err)
		os.Exit(1)
	}
}

func run(dir string, sz Sizes, seed int64) error {
	if dir == "" {
		dir = dimoo.ShippedModelDir()
	}
	ctx := context.Background()
	p, err := dimoo.OpenPipeline(ctx, dir, dimoo.PipelineOptions{})
	if err != nil {
		return err
	}
	defer p.Close()
	t0 := time.Now()
	r, err := Run(ctx, p, dir, sz, seed, os.Stderr)
	if err != nil {
		return err
	}
	fmt.Printf("model %s, %.0f s\n%s", dir, time.Since(t0).Seconds(), r.Table())
	return nil
}
