package main

import (
	"context"
	"flag"
	"fmt"
	"image"
	"io"
	"os"
	"strings"
	"time"

	"github.com/dimoo-dev/dimoo/dimoo"
)

// The task commands take the reference implementation's flag names.

// taskFlags are the flags generate, edit and understand share.
type taskFlags struct {
	common
	model       string
	prompt      string
	temperature float64
	seed        uint64
	outputDir   string
	quiet       bool
}

func (t *taskFlags) register(fs *flag.FlagSet) {
	t.common.register(fs)
	fs.StringVar(&t.model, "model", "", "model folder (default: $DIMOO_MODEL, else the small model shipped in models/)")
	fs.StringVar(&t.prompt, "prompt", "", "text prompt, instruction or question")
	fs.Float64Var(&t.temperature, "temperature", 1.0, "sampling temperature (0: greedy)")
	fs.Uint64Var(&t.seed, "seed", 0, "random seed")
	fs.StringVar(&t.outputDir, "output_dir", ".", "folder for the output images")
	fs.BoolVar(&t.quiet, "quiet", false, "no progress bar")
}

// modelDir resolves --model, $DIMOO_MODEL, then the shipped small model.
func (t *taskFlags) modelDir() (string, error) {
	if t.model != "" {
		return t.model, nil
	}
	if d := os.Getenv("DIMOO_MODEL"); d != "" {
		return d, nil
	}
	if d := dimoo.ShippedModelDir(); d != "" {
		return d, nil
	}
	return "", fmt.Errorf("%w: no --model given, $DIMOO_MODEL unset, and no shipped model found", errUsage)
}

func (t *taskFlags) open(ctx context.Context) (*dimoo.Pipeline, error) {
	dir, err := t.modelDir()
	if err != nil {
		return nil, err
	}
	opts, err := t.loadOptions()
	if err != nil {
		return nil, err
	}
	return dimoo.OpenPipeline(ctx, dir, dimoo.PipelineOptions{LoadOptions: opts})
}

// progress draws a bar on a terminal (stderr) and nothing otherwise.
func (t *taskFlags) progress(label string) func(step, total int) {
	if t.quiet {
		return nil
	}
	fi, err := os.Stderr.Stat()
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		return nil
	}
	start := time.Now()
	return func(step, total int) {
		const width = 30
		done := step * width / total
		fmt.Fprintf(os.Stderr, "\r%s [%s%s] %d/%d %.1fs", label, strings.Repeat("#", done),
			strings.Repeat(".", width-done), step, total, time.Since(start).Seconds())
		if step == total {
			fmt.Fprintln(os.Stderr)
		}
	}
}

// imageFlags are the image sampler's flags.
type imageFlags struct {
	timesteps       int
	cfgScale        float64
	useCache        bool
	cacheRatio      float64
	warmupRatio     float64
	refreshInterval int
}

func (f *imageFlags) register(fs *flag.FlagSet, cfgDefault float64) {
	fs.IntVar(&f.timesteps, "timesteps", 64, "decoding steps")
	fs.Float64Var(&f.cfgScale, "cfg_scale", cfgDefault, "classifier-free guidance scale (text)")
	fs.BoolVar(&f.useCache, "use-cache", false, "ML-Cache: reuse confident tokens' K/V and logits")
	fs.Float64Var(&f.cacheRatio, "cache_ratio", 0.9, "ML-Cache: share of positions reused")
	fs.Float64Var(&f.warmupRatio, "warmup_ratio", 0.3, "ML-Cache: share of steps always run in full")
	fs.IntVar(&f.refreshInterval, "refresh_interval", 5, "ML-Cache: full step every this many steps")
}

func (f *imageFlags) sampling(t *taskFlags) (dimoo.ImageSampling, error) {
	if f.timesteps < 1 {
		return dimoo.ImageSampling{}, fmt.Errorf("%w: --timesteps must be >= 1", errUsage)
	}
	if f.cfgScale < 0 {
		return dimoo.ImageSampling{}, fmt.Errorf("%w: --cfg_scale must be >= 0", errUsage)
	}
	return dimoo.ImageSampling{Steps: f.timesteps, Temperature: greedyZero(t.temperature), Seed: t.seed,
		UseCache: f.useCache, CacheRatio: f.cacheRatio, WarmupRatio: f.warmupRatio, RefreshInterval: f.refreshInterval}, nil
}

// setFlags lists the flags given on the command line.
func setFlags(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}

// modelDefaults replaces the values of the image flags not given on the
// command line by the model's dimoo.json settings (the shipped small model
// has its own). cfgImg is the edit command's image guidance (nil elsewhere).
func (f *imageFlags) modelDefaults(p *dimoo.Pipeline, set map[string]bool, t *taskFlags, cfgImg *float64) {
	d := p.Defaults().Sampling
	if !set["timesteps"] && d.Timesteps > 0 {
		f.timesteps = d.Timesteps
	}
	if !set["temperature"] && d.Temperature != nil {
		t.temperature = *d.Temperature
	}
	cfg := d.CFGScale
	if cfgImg != nil {
		cfg = d.CFGText
		if !set["cfg_img"] && d.CFGImage != nil {
			*cfgImg = *d.CFGImage
		}
	}
	if !set["cfg_scale"] && cfg != nil {
		f.cfgScale = *cfg
	}
}

// guidance maps the CLI's 0 ("none") to the API's negative value.
func guidance(s float64) float64 {
	if s == 0 {
		return -1
	}
	return s
}

// t2iFlags are text-to-image's flags (generate, bench): the task's, the
// sampler's and the output size.
type t2iFlags struct {
	taskFlags
	imageFlags
	width, height int
}

func (g *t2iFlags) register(fs *flag.FlagSet) {
	g.taskFlags.register(fs)
	g.imageFlags.register(fs, 4.0)
	fs.IntVar(&g.width, "width", 0, "image width in pixels (default: the model's native size)")
	fs.IntVar(&g.height, "height", 0, "image height in pixels")
}

// open loads the pipeline, then settles the sampler (the model's defaults
// for the flags not given) and the output size (the model's native one
// when neither side is given).
func (g *t2iFlags) open(ctx context.Context, fs *flag.FlagSet) (*dimoo.Pipeline, dimoo.ImageSampling, error) {
	p, err := g.taskFlags.open(ctx)
	if err != nil {
		return nil, dimoo.ImageSampling{}, err
	}
	g.modelDefaults(p, setFlags(fs), &g.taskFlags, nil)
	o, err := g.sampling(&g.taskFlags)
	if err != nil {
		p.Close()
		return nil, dimoo.ImageSampling{}, err
	}
	if g.width == 0 && g.height == 0 {
		g.width, g.height = p.NativeSize()
	}
	return p, o, nil
}

func cmdGenerate(ctx context.Context, args []string, w io.Writer) error {
	if usesPrompts(args) { // a prompt set: see prompts.go
		return cmdGeneratePrompts(ctx, args, w)
	}
	fs := flag.NewFlagSet("generate", flag.ContinueOnError)
	var g t2iFlags
	g.register(fs)
	t, f := &g.taskFlags, &g.imageFlags
	mode := fs.String("painting_mode", "", "inpainting or outpainting (with --painting_image)")
	paintImage := fs.String("painting_image", "", "image to inpaint or outpaint")
	maskH := fs.Float64("mask_h_ratio", dimoo.DefaultMaskH, "painted rectangle's share of the height")
	maskW := fs.Float64("mask_w_ratio", dimoo.DefaultMaskW, "painted rectangle's share of the width")
	var of outputFlags
	of.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if strings.TrimSpace(t.prompt) == "" {
		return fmt.Errorf("%w: --prompt is required", errUsage)
	}
	if _, err := f.sampling(t); err != nil {
		return err
	}
	var paint image.Image
	var err error
	switch *mode {
	case "":
	case "inpainting", "outpainting":
		if *paintImage == "" {
			return fmt.Errorf("%w: --painting_mode needs --painting_image", errUsage)
		}
		if paint, err = dimoo.LoadImage(*paintImage); err != nil {
			return err
		}
	default:
		return fmt.Errorf("%w: --painting_mode must be inpainting or outpainting, got %q", errUsage, *mode)
	}
	kind := "generate"
	if paint != nil {
		kind = *mode + "_" + slug(fileStem(*paintImage))
	}
	outs, err := planOutputs(of, t.outputDir, []string{kind, slug(t.prompt), fmt.Sprintf("seed%d", t.seed)})
	if err != nil {
		return err
	}
	p, o, err := g.open(ctx, fs)
	if err != nil {
		return err
	}
	defer p.Close()
	var img image.Image
	if paint != nil {
		img, err = p.Inpaint(ctx, dimoo.InpaintRequest{Prompt: t.prompt, Image: paint, Outpaint: *mode == "outpainting",
			MaskH: *maskH, MaskW: *maskW, InputArea: p.NativeArea(), CFGScale: guidance(f.cfgScale), Sampling: o,
			Progress: t.progress(*mode)})
	} else {
		if f := p.VQ.Factor(); g.width%f != 0 || g.height%f != 0 {
			fmt.Fprintf(os.Stderr, "dimoo: %dx%d is not a multiple of %d: generating %dx%d\n", g.width, g.height, f,
				g.width/f*f, g.height/f*f)
		}
		img, err = p.GenerateImage(ctx, dimoo.ImageRequest{Prompt: t.prompt, Width: g.width, Height: g.height,
			CFGScale: guidance(f.cfgScale), Sampling: o, Progress: t.progress("generate")})
	}
	if err != nil {
		return err
	}
	if err := savePNG(outs[0], img, of.force); err != nil {
		return err
	}
	fmt.Fprintln(w, outs[0])
	return nil
}

func cmdEdit(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("edit", flag.ContinueOnError)
	var t taskFlags
	var f imageFlags
	t.register(fs)
	f.register(fs, 2.5)
	cfgImg := fs.Float64("cfg_img", 4.0, "image guidance scale")
	imagePath := fs.String("image_path", "", "input image")
	refPath := fs.String("ref_image_path", "", "style reference image (--edit_type image_ref_transfer, alias style)")
	editType := fs.String("edit_type", "canny_pred", "edit type: "+strings.Join(dimoo.EditTypes(), ", ")+
		" (default: the model's dimoo.json, else canny_pred)")
	// The official script takes --height and --width and ignores them: the
	// output has the input's crop size. Accepted for the same command lines.
	fs.Int("height", 512, "ignored, as in the official script (the output takes the input's crop size)")
	fs.Int("width", 512, "ignored, as in the official script")
	var of outputFlags
	of.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *imagePath == "" {
		return fmt.Errorf("%w: --image_path is required", errUsage)
	}
	// Checked before anything loads; computed again below from the model's defaults.
	if _, err := f.sampling(&t); err != nil {
		return err
	}
	if *cfgImg < 0 {
		return fmt.Errorf("%w: --cfg_img must be >= 0", errUsage)
	}
	in, err := dimoo.LoadImage(*imagePath)
	if err != nil {
		return err
	}
	var ref image.Image
	if *refPath != "" {
		if ref, err = dimoo.LoadImage(*refPath); err != nil {
			return err
		}
	}
	outs, err := planOutputs(of, t.outputDir, []string{"edit", slug(fileStem(*imagePath)), slug(t.prompt),
		fmt.Sprintf("seed%d", t.seed)}, "side_by_side")
	if err != nil {
		return err
	}
	p, err := t.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	f.modelDefaults(p, setFlags(fs), &t, cfgImg)
	o, err := f.sampling(&t)
	if err != nil {
		return err
	}
	if !setFlags(fs)["edit_type"] {
		*editType = "" // the model's default, else the official one
	}
	img, err := p.EditImage(ctx, dimoo.EditRequest{Prompt: t.prompt, EditType: *editType, Image: in, RefImage: ref,
		InputArea: p.NativeArea(), CFGText: guidance(f.cfgScale), CFGImage: guidance(*cfgImg), Sampling: o,
		Progress: t.progress("edit")})
	if err != nil {
		return err
	}
	out, side := outs[0], outs[1]
	if err := savePNG(out, img, of.force); err != nil {
		return err
	}
	if err := savePNG(side, sideBySide(in, img), of.force); err != nil {
		return err
	}
	fmt.Fprintln(w, out)
	fmt.Fprintln(w, side)
	return nil
}

func cmdUnderstand(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("understand", flag.ContinueOnError)
	var t taskFlags
	t.register(fs)
	fs.Lookup("temperature").DefValue = "0"
	t.temperature = 0
	imagePath := fs.String("image_path", "", "input image")
	steps := fs.Int("steps", 128, "decoding steps")
	genLength := fs.Int("gen_length", 1024, "answer length in tokens")
	blockLength := fs.Int("block_length", 256, "block length (gen_length must be a multiple)")
	cfg := fs.Float64("cfg_scale", 0, "classifier-free guidance scale (0: none)")
	stream := fs.Bool("stream", false, "print the answer as its blocks are decoded (no progress bar)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if strings.TrimSpace(t.prompt) == "" || *imagePath == "" {
		return fmt.Errorf("%w: --prompt and --image_path are required", errUsage)
	}
	in, err := dimoo.LoadImage(*imagePath)
	if err != nil {
		return err
	}
	p, err := t.open(ctx)
	if err != nil {
		return err
	}
	defer p.Close()
	// The model's answer length and steps, unless any of the three is given.
	set := setFlags(fs)
	if d := p.Defaults().Sampling; d.GenLength > 0 && !set["steps"] && !set["gen_length"] && !set["block_length"] {
		*steps, *genLength, *blockLength = d.TextSteps, d.GenLength, d.BlockLength
	}
	o := dimoo.TextSampling{Steps: *steps, GenLength: *genLength, BlockLength: *blockLength,
		Temperature: t.temperature, CFGScale: *cfg, Seed: t.seed}
	req := dimoo.UnderstandRequest{Question: t.prompt, Image: in, InputArea: p.NativeArea(), Sampling: o}
	if *stream {
		// The pieces add up to the answer: the output is the same bytes.
		req.Stream = func(piece string) { io.WriteString(w, piece) }
	} else {
		req.Progress = t.progress("understand")
	}
	ans, err := p.Understand(ctx, req)
	if err != nil {
		return err
	}
	if *stream {
		ans = ""
	}
	fmt.Fprintln(w, ans)
	return nil
}
