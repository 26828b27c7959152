package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"image"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// usesPrompts reports whether generate was given --prompts (a prompt set
// rather than one prompt).
// unsafeName: what a prompt id may not carry into a file name.
var unsafeName = regexp.MustCompile(`[^a-zA-Z0-9._-]+`)

func usesPrompts(args []string) bool {
	for _, a := range args {
		if a == "--" {
			return false
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if strings.HasPrefix(a, "-") && name == "prompts" {
			return true
		}
	}
	return false
}

// promptItem is one line of a --prompts file; fields left out take the
// command line's values.
type promptItem struct {
	ID     string  `json:"id"`
	Prompt string  `json:"prompt"`
	Seed   *uint64 `json:"seed"`
	Width  int     `json:"width"`
	Height int     `json:"height"`
}

// shardSpec is --shard i/n: this process takes the items whose index is i
// modulo n (0 <= i < n).
func parseShard(s string) (i, n int, err error) {
	a, b, ok := strings.Cut(s, "/")
	i, e1 := strconv.Atoi(a)
	n, e2 := strconv.Atoi(b)
	if !ok || e1 != nil || e2 != nil || n < 1 || i < 0 || i >= n {
		return 0, 0, fmt.Errorf("%w: --shard %q: want i/n with 0 <= i < n (e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)",
			errUsage, s)
	}
	return i, n, nil
}

// readPrompts reads a JSONL prompt set: one object per line, blank lines
// skipped; an item's index is its place among the objects.
func readPrompts(path string) ([]promptItem, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var items []promptItem
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	ids := map[string]int{}
	for line := 1; sc.Scan(); line++ {
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 {
			continue
		}
		var it promptItem
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&it); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, line, err)
		}
		if strings.TrimSpace(it.Prompt) == "" {
			return nil, fmt.Errorf("%s:%d: no \"prompt\"", path, line)
		}
		if it.ID == "" {
			it.ID = fmt.Sprintf("%06d", len(items))
		}
		it.ID = strings.Trim(unsafeName.ReplaceAllString(it.ID, "_"), "_")
		if prev, dup := ids[it.ID]; dup {
			return nil, fmt.Errorf("%s:%d: id %q again (line %d has it): outputs would collide", path, line, it.ID, prev)
		}
		ids[it.ID] = line
		items = append(items, it)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return items, nil
}

// cmdGeneratePrompts is `dimoo generate --prompts FILE.jsonl --shard i/n
// --output_dir D`: the shard's images, named after each item's id, skipping
// those already written (a rerun resumes), with a progress line.
func cmdGeneratePrompts(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	var g t2iFlags
	g.register(fs)
	prompts := fs.String("prompts", "", "JSONL file: one {\"prompt\", \"id\", \"seed\", \"width\", \"height\"} per line")
	shard := fs.String("shard", "0/1", "i/n: take the items whose index is i modulo n")
	conc := fs.Int("concurrency", 1, "images decoded at once (above 1 they share forwards in a batch)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	t := &g.taskFlags
	if *prompts == "" {
		return fmt.Errorf("%w: --prompts needs a file", errUsage)
	}
	if t.prompt != "" {
		return fmt.Errorf("%w: give --prompt or --prompts, not both", errUsage)
	}
	if *conc < 1 {
		return fmt.Errorf("%w: --concurrency must be >= 1", errUsage)
	}
	si, sn, err := parseShard(*shard)
	if err != nil {
		return err
	}
	items, err := readPrompts(*prompts)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(t.outputDir, 0o755); err != nil {
		return err
	}
	var todo []promptItem
	skipped := 0
	for i, it := range items {
		if i%sn != si {
			continue
		}
		if _, err := os.Stat(filepath.Join(t.outputDir, it.ID+".png")); err == nil {
			skipped++
			continue
		}
		todo = append(todo, it)
	}
	fmt.Fprintf(os.Stderr, "shard %d/%d: %d items, %d already done, %d to do\n", si, sn, len(todo)+skipped, skipped,
		len(todo))
	if len(todo) == 0 {
		fmt.Fprintf(w, "shard %d/%d: wrote 0 images to %s\n", si, sn, t.outputDir)
		return nil
	}
	p, o, err := g.open(ctx, fs)
	if err != nil {
		return err
	}
	defer p.Close()
	gen := p.GenerateImage
	if *conc > 1 {
		b, err := p.NewBatcher(dimoo.BatchOptions{Seqs: 2 * *conc})
		if err != nil {
			return err
		}
		defer b.Close()
		gen = b.GenerateImage
	}
	cfg := guidance(g.cfgScale)
	bar := newBar(len(todo), t.quiet)
	jobs := make(chan promptItem)
	var mu sync.Mutex
	var firstErr error
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for k := 0; k < *conc; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range jobs {
				out, err := generateItem(ctx, gen, it, g, o, cfg)
				mu.Lock()
				if err != nil && firstErr == nil {
					firstErr = fmt.Errorf("item %s: %w", it.ID, err)
					cancel()
				}
				if err == nil {
					bar.done(out)
				}
				mu.Unlock()
			}
		}()
	}
feed:
	for _, it := range todo {
		select {
		case jobs <- it:
		case <-ctx.Done():
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = ctx.Err()
	}
	fmt.Fprintf(w, "shard %d/%d: wrote %d images to %s\n", si, sn, bar.n, t.outputDir)
	return firstErr
}

// generateItem draws one item and writes it atomically (a temporary file
// renamed into place), so an interrupted run leaves no half image to skip.
func generateItem(ctx context.Context, gen func(context.Context, dimoo.ImageRequest) (image.Image, error),
	it promptItem, g t2iFlags, o dimoo.ImageSampling, cfg float64) (string, error) {
	if it.Seed != nil {
		o.Seed = *it.Seed
	}
	w, h := g.width, g.height
	if it.Width != 0 || it.Height != 0 {
		w, h = it.Width, it.Height
	}
	img, err := gen(ctx, dimoo.ImageRequest{Prompt: it.Prompt, Width: w, Height: h, CFGScale: cfg, Sampling: o})
	if err != nil {
		return "", err
	}
	out := filepath.Join(g.outputDir, it.ID+".png")
	tmp := out + ".tmp"
	if err := dimoo.SavePNG(tmp, img); err != nil {
		os.Remove(tmp)
		return "", err
	}
	if err := os.Rename(tmp, out); err != nil {
		os.Remove(tmp)
		return "", err
	}
	return out, nil
}

// bar reports progress: a redrawn bar on a terminal, a line per image in
// logs (Slurm, Kubernetes).
type bar struct {
	total, n int
	t0       time.Time
	tty      bool
	quiet    bool
}

func newBar(total int, quiet bool) *bar {
	fi, err := os.Stderr.Stat()
	return &bar{total: total, t0: time.Now(), tty: err == nil && fi.Mode()&os.ModeCharDevice != 0, quiet: quiet}
}

func (b *bar) done(path string) {
	b.n++
	if b.quiet {
		return
	}
	el := time.Since(b.t0)
	eta := time.Duration(float64(el) / float64(b.n) * float64(b.total-b.n))
	if b.tty {
		const width = 30
		k := b.n * width / b.total
		fmt.Fprintf(os.Stderr, "\r[%s%s] %d/%d %.0fs, ETA %.0fs", strings.Repeat("#", k), strings.Repeat(".", width-k),
			b.n, b.total, el.Seconds(), eta.Seconds())
		if b.n == b.total {
			fmt.Fprintln(os.Stderr)
		}
		return
	}
	fmt.Fprintf(os.Stderr, "[%d/%d] %s %.1fs, ETA %.0fs\n", b.n, b.total, path, el.Seconds(), eta.Seconds())
}
