package dimoo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
	"unicode"

	"golang.org/x/sync/semaphore"
)

// Pipeline is everything the tasks need: the transformer, the text
// tokenizer, the VQ-VAE and the special ids, loaded from one checkpoint
// folder (config.json, safetensors, tokenizer.json, vqvae/). It is safe for
// concurrent use: requests queue (in order of arrival, honouring their
// contexts) for one of MaxConcurrent slots.
type Pipeline struct {
	Model     *Model
	Tokenizer *Tokenizer
	VQ        *VQModel
	Special   SpecialTokens

	defaults Defaults
	slots    *semaphore.Weighted
	textIDs  sync.Once // fills textMask, the ids answers may draw
	textMask []bool
}

// PipelineOptions extend LoadOptions.
type PipelineOptions struct {
	LoadOptions
	// MaxConcurrent requests run at once (default 1: others wait their turn).
	// Their library calls share the library's one compute thread (see
	// nativeThread), so on the CPU more slots overlap only the Go-side
	// work (tokenizing, image I/O), not the decodes.
	MaxConcurrent int
}

// OpenPipeline loads a checkpoint folder with its tokenizer and VQ-VAE.
func OpenPipeline(ctx context.Context, dir string, opts PipelineOptions) (p *Pipeline, err error) {
	tokPath := filepath.Join(dir, "tokenizer.json")
	if _, err := os.Stat(tokPath); err != nil {
		return nil, checkpointError(dir, "no tokenizer.json: the text tokenizer is required")
	}
	vqDir := filepath.Join(dir, "vqvae")
	if _, err := os.Stat(filepath.Join(vqDir, "config.json")); err != nil {
		return nil, checkpointError(dir, "no vqvae/config.json: the VQ-VAE is required")
	}
	special, err := LoadSpecialTokens(dir)
	if err != nil {
		return nil, err
	}
	tok, err := LoadTokenizer(tokPath)
	if err != nil {
		return nil, err
	}
	defaults, err := loadDefaults(dir)
	if err != nil {
		return nil, err
	}
	// The deferred cleanup holds its own pointer: a failing return sets p to nil.
	pl := &Pipeline{Tokenizer: tok, Special: special, defaults: defaults}
	p = pl
	defer func() {
		if err != nil {
			pl.Close()
		}
	}()
	if p.Model, err = LoadModel(ctx, dir, opts.LoadOptions); err != nil {
		return nil, err
	}
	vqOpts := opts.LoadOptions
	if vqOpts.Library == nil {
		vqOpts.Library = p.Model.Runtime().Library()
	}
	if p.VQ, err = LoadVQModel(ctx, vqDir, vqOpts); err != nil {
		return nil, err
	}
	if err := special.checkVocab(p.Model.Config.VocabSize); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(dir, "special_tokens.json"), err)
	}
	if p.VQ.Codebook() != int(special.Codebook) {
		return nil, checkpointError(dir, "the VQ-VAE has %d codes but the model's image vocabulary has %d",
			p.VQ.Codebook(), special.Codebook)
	}
	if err := p.checkDefaults(dir); err != nil {
		return nil, err
	}
	n := opts.MaxConcurrent
	if n < 1 {
		n = 1
	}
	p.slots = semaphore.NewWeighted(int64(n))
	return p, nil
}

// Close frees the model and the VQ-VAE. Closing a nil Pipeline does nothing.
func (p *Pipeline) Close() error {
	if p == nil {
		return nil
	}
	var errs []error
	if p.VQ != nil {
		errs = append(errs, p.VQ.Close())
	}
	if p.Model != nil {
		errs = append(errs, p.Model.Close())
	}
	return errors.Join(errs...)
}

func (p *Pipeline) acquire(ctx context.Context) error {
	if err := p.slots.Acquire(ctx, 1); err != nil {
		return fmt.Errorf("%w: %w", ErrCancelled, err)
	}
	return nil
}

// ImageRequest is a text-to-image request. Zero fields, in it and in the
// other requests, take the model folder's dimoo.json defaults, else the
// reference's (so the API and the CLI draw the same image for the same
// settings); a negative guidance scale asks for no guidance and a negative
// Sampling.Temperature for argmax decoding.
type ImageRequest struct {
	Prompt        string
	Width, Height int     // pixels, rounded down to multiples of the VQ-VAE's factor (16 for DiMOO); default 1024
	CFGScale      float64 // classifier-free guidance (the model's dimoo.json, else 4.0); negative = none
	Sampling      ImageSampling
	// Progress, when set, is called after every step, on the library's
	// compute thread: it must return promptly and not wait for other
	// library work.
	Progress func(step, total int)
	// Stats, when set, receives the decode's timing (benchmarks, telemetry).
	Stats *DecodeStats
}

// DecodeStats is where one image decode spent its time: the whole sampling
// loop (tokenizing and the VQ-VAE excluded), the library's forwards within
// it, and its sampling calls.
type DecodeStats struct {
	Steps    int           // sampling steps run
	Forwards int           // library forward calls
	Total    time.Duration // the decode loop, wall time
	Forward  time.Duration // inside dimoo_forward
	Sampling time.Duration // inside the library's sampling calls (dimoo_image_step, dimoo_cache_select or dimoo_sample_image)
	// The work: each guidance branch's sequence length, the forward calls
	// that ran only some positions (ML-Cache USE), and the token rows the
	// forwards ran through the network, summed over branches (for tokens/s
	// or FLOP/s of the forwards).
	SeqLens        []int
	CachedForwards int
	Rows           int64
	Start          time.Time // when the decode loop began
}

// Outside is the loop's time outside the forwards (schedule, sampling,
// cache bookkeeping, copies).
func (d DecodeStats) Outside() time.Duration { return d.Total - d.Forward }

func (p *Pipeline) imageSampling(s ImageSampling) ImageSampling {
	d := DefaultImageSampling()
	if s.Steps == 0 {
		s.Steps = d.Steps
		if p.defaults.Sampling.Timesteps > 0 {
			s.Steps = p.defaults.Sampling.Timesteps
		}
	}
	if s.CacheRatio == 0 {
		s.CacheRatio = d.CacheRatio
	}
	if s.WarmupRatio == 0 {
		s.WarmupRatio = d.WarmupRatio
	}
	if s.RefreshInterval == 0 {
		s.RefreshInterval = d.RefreshInterval
	}
	s.Temperature = p.temperature(s.Temperature)
	return s
}

// checkOutputSize refuses an output size whose code grid (after flooring
// to the VQ-VAE's factor) would not fit the model, before anything is
// allocated for it.
func (p *Pipeline) checkOutputSize(w, h int) error {
	f := p.VQ.Factor()
	fw, fh, err := FloorSize(w, h, f)
	if err != nil {
		return err
	}
	return p.checkGrid(w, h, fw/f, fh/f)
}

// checkLength refuses sequences longer than the model allows.
func (p *Pipeline) checkLength(seqs ...[]int32) (int, error) {
	n := 0
	for _, s := range seqs {
		n = max(n, len(s))
	}
	if n > p.Model.Config.MaxSequenceLength {
		return 0, fmt.Errorf("%w: the request needs %d tokens but the model's max_sequence_length is %d",
			ErrInvalidArgument, n, p.Model.Config.MaxSequenceLength)
	}
	return n, nil
}

// decodeImage runs the image sampler over branches sharing one answer and
// decodes the codes to pixels.
func (p *Pipeline) decodeImage(ctx context.Context, prefixes [][]int32, weights []float32, answer []int32,
	gw, gh int, o ImageSampling, progress func(int, int), stats *DecodeStats) (image.Image, error) {
	masked := countID(answer, p.Special.Mask)
	o.Steps = capSteps(o.Steps, masked)
	if err := checkImageSampling(o, masked); err != nil {
		return nil, err
	}
	seqs := make([][]int32, len(prefixes))
	for i, pr := range prefixes {
		seqs[i] = append(append([]int32(nil), pr...), answer...)
	}
	T, err := p.checkLength(seqs...)
	if err != nil {
		return nil, err
	}
	if b := batcherFor(ctx, p, len(prefixes), T, o); b != nil { // see batch.go
		return b.decodeImage(ctx, prefixes, weights, answer, gw, gh, o, progress, stats)
	}
	s, err := p.Model.NewSession(SessionOptions{MaxTokens: T, Seqs: len(prefixes), KVCache: o.UseCache,
		KeepCols: int(p.Special.Codebook)})
	if err != nil {
		return nil, err
	}
	defer s.Close()
	d := &imageDecode{prefixes: prefixes, answer: answer, weights: weights, special: p.Special,
		codebook: int(p.Special.Codebook)}
	steps := 0
	t0 := time.Now()
	out, err := d.run(ctx, s, o, imageHooks{progress: func(step, total int) {
		steps = step
		if progress != nil {
			progress(step, total)
		}
	}})
	if err != nil {
		return nil, err
	}
	if stats != nil {
		lens := make([]int, len(seqs))
		for i, sq := range seqs {
			lens[i] = len(sq)
		}
		*stats = s.decodeStats(steps, t0, lens)
	}
	return p.VQ.Decode(ctx, p.Special.gridCodes(out, gh, gw), gh, gw)
}

// guidance turns CFG scales into branch weights: l = (1+s) l_c - s l_u.
func cfgWeights(s float64) []float32 {
	if s <= 0 {
		return []float32{1}
	}
	return []float32{float32(1 + s), float32(-s)}
}

// decodeGuided decodes a text-guided image (cond, and uncond when cfg > 0).
func (p *Pipeline) decodeGuided(ctx context.Context, in ImageInputs, cfg float64, s ImageSampling,
	progress func(int, int), stats *DecodeStats) (image.Image, error) {
	prefixes := [][]int32{in.Prefixes[0]}
	if cfg > 0 {
		prefixes = in.Prefixes
	}
	return p.decodeImage(ctx, prefixes, cfgWeights(cfg), in.Answer, in.GridW, in.GridH, p.imageSampling(s),
		progress, stats)
}

// GenerateImage draws an image for a text prompt.
func (p *Pipeline) GenerateImage(ctx context.Context, req ImageRequest) (image.Image, error) {
	if strings.TrimSpace(req.Prompt) == "" {
		return nil, fmt.Errorf("%w: empty prompt", ErrInvalidArgument)
	}
	if req.Width == 0 && req.Height == 0 {
		req.Width, req.Height = p.NativeSize()
	}
	if req.CFGScale == 0 {
		req.CFGScale = guidanceDefault(p.defaults.Sampling.CFGScale, 4.0)
	}
	if err := checkGuidance("cfg_scale", req.CFGScale); err != nil {
		return nil, err
	}
	if err := p.checkOutputSize(req.Width, req.Height); err != nil {
		return nil, err
	}
	in, err := p.inputs().textToImage(req.Prompt, req.Width, req.Height)
	if err != nil {
		return nil, err
	}
	if err := p.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.slots.Release(1)
	return p.decodeGuided(ctx, in, req.CFGScale, req.Sampling, req.Progress, req.Stats)
}

// EditRequest is an image-to-image request (editing, control, subject,
// style transfer, dense prediction) with text and image guidance.
type EditRequest struct {
	Prompt   string
	EditType string      // see EditTypes; default: the model's dimoo.json, else "canny_pred" (the official default)
	Image    image.Image // the input image (style transfer: the content image)
	RefImage image.Image // style transfer (image_ref_transfer): the style reference
	// InputArea picks the crop-size list (the official one for 512*512, the
	// default, or the model's dimoo.json); the output has the input's crop
	// size (style transfer: the reference's). Sampling.Seed picks the crop's
	// offset (see CropInput).
	InputArea int
	CFGText   float64 // default: the model's dimoo.json, else 2.5; negative = none
	CFGImage  float64 // default: the model's dimoo.json, else 4.0; negative = none
	Sampling  ImageSampling
	Progress  func(step, total int)
	Stats     *DecodeStats // the decode's timing, when set
}

// EditImage applies an instruction to an image.
func (p *Pipeline) EditImage(ctx context.Context, req EditRequest) (image.Image, error) {
	if req.EditType == "" {
		req.EditType = p.inputs().editTypeDefault()
	}
	editType, err := ResolveEditType(req.EditType)
	if err != nil {
		return nil, err
	}
	if req.CFGText == 0 {
		req.CFGText = guidanceDefault(p.defaults.Sampling.CFGText, 2.5)
	}
	if req.CFGImage == 0 {
		req.CFGImage = guidanceDefault(p.defaults.Sampling.CFGImage, 4.0)
	}
	if err := p.checkEdit(req); err != nil {
		return nil, err
	}
	if err := p.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.slots.Release(1)
	in, err := p.inputs().edit(ctx, editType, req.Prompt, req.Image, req.RefImage, req.InputArea, req.Sampling.Seed)
	if err != nil {
		return nil, err
	}
	// l = l_c + s_t (l_c - l_text_uncond) + s_i (l_c - l_img_uncond)
	prefixes := [][]int32{in.Prefixes[0]}
	weights := []float32{1}
	if req.CFGText > 0 {
		prefixes = append(prefixes, in.Prefixes[1])
		weights[0] += float32(req.CFGText)
		weights = append(weights, float32(-req.CFGText))
	}
	if req.CFGImage > 0 {
		prefixes = append(prefixes, in.Prefixes[2])
		weights[0] += float32(req.CFGImage)
		weights = append(weights, float32(-req.CFGImage))
	}
	return p.decodeImage(ctx, prefixes, weights, in.Answer, in.GridW, in.GridH, p.imageSampling(req.Sampling),
		req.Progress, req.Stats)
}

// InpaintRequest regenerates a centred rectangle of an image (inpainting)
// or everything around it (outpainting).
type InpaintRequest struct {
	Prompt    string
	Image     image.Image
	Outpaint  bool
	MaskH     float64 // mask_h_ratio: the rectangle's share of the height (default 1, as the official script)
	MaskW     float64 // mask_w_ratio (default 0.2)
	InputArea int     // unused: the image keeps its own size, rounded down to multiples of the VQ-VAE's factor
	CFGScale  float64 // default: the model's dimoo.json, else 4.0; negative = none
	Sampling  ImageSampling
	Progress  func(step, total int)
	Stats     *DecodeStats // the decode's timing, when set
}

// Inpaint regenerates part of an image guided by a prompt.
func (p *Pipeline) Inpaint(ctx context.Context, req InpaintRequest) (image.Image, error) {
	req.MaskH, req.MaskW = maskDefaults(req.MaskH, req.MaskW)
	if req.MaskH < 0 || req.MaskH > 1 || req.MaskW < 0 || req.MaskW > 1 {
		return nil, fmt.Errorf("%w: mask ratios must be in [0, 1], got %g x %g", ErrInvalidArgument, req.MaskH, req.MaskW)
	}
	if req.CFGScale == 0 {
		req.CFGScale = guidanceDefault(p.defaults.Sampling.CFGScale, 4.0)
	}
	if err := p.checkInpaint(req); err != nil {
		return nil, err
	}
	if req.Image != nil {
		// The image keeps its own size: its grid must fit before it is encoded.
		if b := req.Image.Bounds(); !b.Empty() {
			if err := p.checkOutputSize(b.Dx(), b.Dy()); err != nil {
				return nil, err
			}
		}
	}
	if err := p.acquire(ctx); err != nil {
		return nil, err
	}
	defer p.slots.Release(1)
	in, err := p.inputs().inpaint(ctx, req.Prompt, req.Image, req.MaskH, req.MaskW, req.Outpaint)
	if err != nil {
		return nil, err
	}
	return p.decodeGuided(ctx, in, req.CFGScale, req.Sampling, req.Progress, req.Stats)
}

// UnderstandRequest asks a question about an image.
type UnderstandRequest struct {
	Question  string
	Image     image.Image
	InputArea int          // picks the crop-size list: default the model's dimoo.json, else the official 1024*1024
	Sampling  TextSampling // Seed also picks the crop's offset (see CropInput)
	Progress  func(step, total int)
	Stats     *DecodeStats // the decode's timing, when set (Sampling: dimoo_text_step's)
	Usage     *TokenUsage  // the tokens read and written, when set
	// Stream, if set, receives the answer in pieces as it is decoded: the
	// pieces, in order, add up to the answer Understand returns. Blocks of
	// the answer are decoded in order and never change once done; a piece
	// is the text of finished blocks less its last word (more tokens may
	// still change how that detokenizes), the rest comes at the end. It is
	// called on the decode's thread (the last piece from Understand's
	// caller), so it should return quickly.
	Stream func(piece string)
}

// TokenUsage counts an answer's tokens as OpenAI's usage does: the prompt
// (everything before the answer: the chat template, the question and the
// image's codes) and the answer up to its end (the end-of-text token not
// counted).
type TokenUsage struct {
	Prompt, Completion int
}

// Understand answers a question about an image.
func (p *Pipeline) Understand(ctx context.Context, req UnderstandRequest) (string, error) {
	if strings.TrimSpace(req.Question) == "" {
		return "", fmt.Errorf("%w: empty question", ErrInvalidArgument)
	}
	o := req.Sampling
	d := DefaultTextSampling()
	if o.Steps == 0 && o.GenLength == 0 && o.BlockLength == 0 {
		o.Steps, o.GenLength, o.BlockLength = d.Steps, d.GenLength, d.BlockLength
		if ds := p.defaults.Sampling; ds.GenLength > 0 {
			o.Steps, o.GenLength, o.BlockLength = ds.TextSteps, ds.GenLength, ds.BlockLength
		}
	}
	if o.Temperature < 0 && !math.IsInf(o.Temperature, -1) {
		o.Temperature = 0 // explicitly greedy, which is also the default
	}
	if err := o.validate(); err != nil {
		return "", err
	}
	if err := p.checkUnderstand(req, o); err != nil {
		return "", err
	}
	if err := p.acquire(ctx); err != nil {
		return "", err
	}
	defer p.slots.Release(1)
	seq, start, err := p.inputs().understand(ctx, req.Question, req.Image, req.InputArea, o.GenLength, o.Seed)
	if err != nil {
		return "", err
	}
	if _, err := p.checkLength(seq); err != nil {
		return "", err
	}
	seqs := 1
	if o.CFGScale > 0 {
		seqs = 2
	}
	// A block of full-vocabulary logits stays in the library per step.
	s, err := p.Model.NewSession(SessionOptions{MaxTokens: len(seq), Seqs: seqs, KeepRows: min(o.BlockLength, len(seq)),
		KeepCols: p.Model.Config.EmbeddingRows()})
	if err != nil {
		return "", err
	}
	defer s.Close()
	td := &textDecode{seq: seq, genStart: start, special: p.Special, allowed: p.textTokens(), stats: req.Stats}
	h := imageHooks{progress: req.Progress}
	sent := ""
	if req.Stream != nil {
		h.blockDone = func(x []int32, end int) {
			if text, err := p.answerText(p.answerTokens(x[start:end])); err == nil { // an error shows again at the end
				if piece := streamable(text, sent); piece != "" {
					req.Stream(piece)
					sent += piece
				}
			}
		}
	}
	out, err := td.run(ctx, s, o, h)
	if err != nil {
		return "", err
	}
	ans := p.answerTokens(out[start : start+o.GenLength])
	answer, err := p.answerText(ans)
	if err != nil {
		return "", err
	}
	if req.Usage != nil {
		*req.Usage = TokenUsage{Prompt: start, Completion: len(ans)}
	}
	if req.Stream != nil {
		if !strings.HasPrefix(answer, sent) {
			return "", fmt.Errorf("the streamed text %q does not begin the answer %q", sent, answer)
		}
		if rest := answer[len(sent):]; rest != "" {
			req.Stream(rest)
		}
	}
	return answer, nil
}

// streamable is what can be streamed of text (the answer so far) after
// sent: text must extend it, and its last word (from the last white space
// on) waits, since more tokens may still change how it detokenizes (a
// character cut in two, the clean-up of spaces before punctuation).
func streamable(text, sent string) string {
	if !strings.HasPrefix(text, sent) {
		return ""
	}
	rest := text[len(sent):]
	if i := strings.LastIndexFunc(rest, unicode.IsSpace); i > 0 {
		return rest[:i]
	}
	return ""
}

// answerTokens are the generated answer tokens up to the first
// end-of-text, end-of-answer or mask.
func (p *Pipeline) answerTokens(ans []int32) []int32 {
	for i, t := range ans {
		if t == p.Special.EOS || t == p.Special.EOA || t == p.Special.Mask {
			return ans[:i]
		}
	}
	return ans
}

// answerText is the text of answer tokens (as answerTokens cut them),
// without surrounding white space.
func (p *Pipeline) answerText(ans []int32) (string, error) {
	text, err := p.Tokenizer.Decode(ans, true)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(text), nil
}

// Defaults a checkpoint folder may set in dimoo.json: the image size its
// model was trained for, the area input images are resized to, and the
// sampler settings that suit it. The real model needs none (1024x1024, the
// reference's areas and sampler settings).
type Defaults struct {
	Width  int `json:"width"`
	Height int `json:"height"`
	// InputArea replaces the areas of the official crop-size lists (512*512
	// for image-to-image, 1024*1024 for understanding) with this model's:
	// (input_area / 32^2) patches of 32x32 (the shipped 32x32 model: 1024).
	InputArea int `json:"input_area"`
	// EditType is the edit type of edit requests that give none (the
	// official default is canny_pred).
	EditType string `json:"edit_type"`
	// Sampling: nil fields keep the reference's values. A guidance scale of 0
	// means no guidance.
	Sampling struct {
		Timesteps   int      `json:"timesteps"`
		Temperature *float64 `json:"temperature"`
		CFGScale    *float64 `json:"cfg_scale"`
		CFGText     *float64 `json:"cfg_text"`
		CFGImage    *float64 `json:"cfg_img"`
		// Understanding: all three or none.
		TextSteps   int `json:"steps"`
		GenLength   int `json:"gen_length"`
		BlockLength int `json:"block_length"`
	} `json:"sampling"`
}

// guidanceDefault is the scale a request with 0 gets: the checkpoint's
// (0 there = none, which the API spells negative), else the reference's.
func guidanceDefault(model *float64, reference float64) float64 {
	if model == nil {
		return reference
	}
	if *model <= 0 {
		return -1
	}
	return *model
}

func loadDefaults(dir string) (Defaults, error) {
	path := filepath.Join(dir, "dimoo.json")
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return Defaults{}, nil
	}
	if err != nil {
		return Defaults{}, checkpointError(path, "%v", err)
	}
	var d Defaults
	if err := json.Unmarshal(b, &d); err != nil {
		return Defaults{}, checkpointError(path, "malformed JSON: %v", err)
	}
	if d.Width < 0 || d.Height < 0 || d.InputArea < 0 {
		return Defaults{}, checkpointError(path, "negative size")
	}
	ds := d.Sampling
	for _, v := range []*float64{ds.Temperature, ds.CFGScale, ds.CFGText, ds.CFGImage} {
		if v != nil && (*v < 0 || math.IsNaN(*v)) {
			return Defaults{}, checkpointError(path, "negative temperature or guidance scale in \"sampling\"")
		}
	}
	if ds.Timesteps < 0 || ds.TextSteps < 0 || ds.GenLength < 0 || ds.BlockLength < 0 {
		return Defaults{}, checkpointError(path, "negative step count or length in \"sampling\"")
	}
	if (ds.TextSteps > 0) != (ds.GenLength > 0) || (ds.GenLength > 0) != (ds.BlockLength > 0) {
		return Defaults{}, checkpointError(path, "\"sampling\" must give steps, gen_length and block_length together")
	}
	return d, nil
}

// Defaults are the checkpoint's dimoo.json settings (zero when it has none).
func (p *Pipeline) Defaults() Defaults { return p.defaults }

// NativeSize is the output size used when a request gives none.
func (p *Pipeline) NativeSize() (w, h int) {
	if p.defaults.Width > 0 && p.defaults.Height > 0 {
		return p.defaults.Width, p.defaults.Height
	}
	return 1024, 1024
}

// NativeArea is the input-image area of the model's folder, or 0 for the
// task's reference default.
func (p *Pipeline) NativeArea() int { return p.defaults.InputArea }

// ShippedModelDir finds the small model that ships with dimoo (models/ next
// to the executable, one level up, or in the source tree), or "".
func ShippedModelDir() string {
	var roots []string
	if exe, err := os.Executable(); err == nil {
		roots = append(roots, filepath.Dir(exe), filepath.Join(filepath.Dir(exe), ".."))
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		roots = append(roots, filepath.Join(filepath.Dir(file), ".."))
	}
	for _, r := range roots {
		d := filepath.Join(r, "models", "dimoo-small")
		if _, err := os.Stat(filepath.Join(d, "config.json")); err == nil {
			return d
		}
	}
	return ""
}
