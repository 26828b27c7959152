package dimoo_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"path/filepath"
	"strings"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// Text to image with the small model that ships with the repository.
func ExampleOpenPipeline() {
	ctx := context.Background()
	p, err := dimoo.OpenPipeline(ctx, dimoo.ShippedModelDir(), dimoo.PipelineOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	img, err := p.GenerateImage(ctx, dimoo.ImageRequest{
		Prompt:   "a red circle at the top left",
		Sampling: dimoo.ImageSampling{Seed: 7}, // the rest: the model's dimoo.json
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := dimoo.SavePNG("circle.png", img); err != nil {
		log.Fatal(err)
	}
}

// A 1024x1024 image on the GPU with ML-Cache, a deadline, and progress.
func ExamplePipeline_GenerateImage() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	p, err := dimoo.OpenPipeline(ctx, "/models/Lumina-DiMOO", dimoo.PipelineOptions{
		LoadOptions: dimoo.LoadOptions{Backend: dimoo.BackendCUDA, Device: 0}})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	s := dimoo.DefaultImageSampling() // 64 steps, the reference's ML-Cache knobs
	s.UseCache = true
	var stats dimoo.DecodeStats
	img, err := p.GenerateImage(ctx, dimoo.ImageRequest{
		Prompt: "a lighthouse at dawn, oil painting", Width: 1024, Height: 1024, CFGScale: 4, Sampling: s,
		Progress: func(step, total int) { fmt.Printf("\rstep %d/%d", step, total) },
		Stats:    &stats,
	})
	switch {
	case errors.Is(err, dimoo.ErrCancelled):
		log.Fatal("past the deadline")
	case errors.Is(err, dimoo.ErrOutOfMemory):
		log.Fatal("the GPU is too small: ", err)
	case err != nil:
		log.Fatal(err)
	}
	fmt.Printf("\n%v in %v (%v in forwards)\n", img.Bounds().Size(), stats.Total, stats.Forward)
}

// An answer about an image, printed as its blocks are decoded.
func ExamplePipeline_Understand() {
	ctx := context.Background()
	p, err := dimoo.OpenPipeline(ctx, dimoo.ShippedModelDir(), dimoo.PipelineOptions{})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	img, err := dimoo.LoadImage("circle.png")
	if err != nil {
		log.Fatal(err)
	}
	var usage dimoo.TokenUsage
	_, err = p.Understand(ctx, dimoo.UnderstandRequest{
		Question: "What is in the image?", Image: img, Usage: &usage,
		Stream: func(piece string) { fmt.Print(piece) },
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("\n(%d prompt tokens, %d answer tokens)\n", usage.Prompt, usage.Completion)
}

// The text tokenizer is plain Go: no library needed.
func ExampleLoadTokenizer() {
	tok, err := dimoo.LoadTokenizer(filepath.Join(dimoo.ShippedModelDir(), "tokenizer.json"))
	if err != nil {
		log.Fatal(err)
	}
	ids := tok.Encode("a red circle at the top left")
	text, err := tok.Decode(ids, true) // true: without special tokens such as BOS
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(strings.TrimSpace(text))
	// Output: a red circle at the top left
}
