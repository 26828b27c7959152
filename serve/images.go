package serve

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"image"
	"image/png"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	_ "image/jpeg" // input images may be JPEG

	"github.com/dimoo-dev/dimoo/dimoo"
)

// imageKnobs are the DiMOO sampler settings a request may give beyond
// OpenAI's fields (zero or nil: the model's defaults).
type imageKnobs struct {
	Seed            *uint64  `json:"seed"`
	Steps           int      `json:"steps"`
	Temperature     *float64 `json:"temperature"`
	CFGScale        *float64 `json:"cfg_scale"`
	UseCache        bool     `json:"use_cache"`
	CacheRatio      float64  `json:"cache_ratio"`
	WarmupRatio     float64  `json:"warmup_ratio"`
	RefreshInterval int      `json:"refresh_interval"`
	Stream          bool     `json:"stream"`
}

// generationRequest is OpenAI's images/generations body with DiMOO's knobs.
type generationRequest struct {
	Model          string `json:"model"`
	Prompt         string `json:"prompt"`
	N              *int   `json:"n"`
	Size           string `json:"size"`
	ResponseFormat string `json:"response_format"`
	User           string `json:"user"`
	imageKnobs
}

// imageData is one image of an answer.
type imageData struct {
	B64JSON string `json:"b64_json"`
	Seed    uint64 `json:"seed"`
}

type imagesResponse struct {
	Created int64       `json:"created"`
	Data    []imageData `json:"data"`
}

// badRequest is a caller mistake, answered 400 with its message.
type badRequest struct{ msg string }

func (e badRequest) Error() string { return e.msg }

func bad(format string, args ...any) error { return badRequest{fmt.Sprintf(format, args...)} }

func (s *Server) checkCommon(model, format string, n *int) (int, error) {
	if model != "" && model != s.opts.ModelName {
		return 0, bad("unknown model %q (this server has %q)", model, s.opts.ModelName)
	}
	if format != "" && format != "b64_json" {
		return 0, bad("response_format %q is not supported: only b64_json (the server keeps no files)", format)
	}
	count := 1
	if n != nil {
		count = *n
	}
	if count < 1 || count > s.opts.MaxN {
		return 0, bad("n must be between 1 and %d, got %d", s.opts.MaxN, count)
	}
	return count, nil
}

// sampling turns the knobs into the sampler settings and the first seed.
func (s *Server) sampling(k imageKnobs, p *dimoo.Pipeline) (dimoo.ImageSampling, uint64, error) {
	if k.Steps < 0 || k.Steps > s.opts.MaxSteps {
		return dimoo.ImageSampling{}, 0, bad("steps must be between 1 and %d, got %d", s.opts.MaxSteps, k.Steps)
	}
	temp := 1.0
	if t := p.Defaults().Sampling.Temperature; t != nil {
		temp = *t
	}
	if k.Temperature != nil {
		temp = *k.Temperature
	}
	if temp < 0 || math.IsNaN(temp) || math.IsInf(temp, 0) {
		return dimoo.ImageSampling{}, 0, bad("temperature must be a finite number >= 0")
	}
	seed := randomSeed()
	if k.Seed != nil {
		seed = *k.Seed
	}
	return dimoo.ImageSampling{Steps: k.Steps, Temperature: temp, Seed: seed, UseCache: k.UseCache,
		CacheRatio: k.CacheRatio, WarmupRatio: k.WarmupRatio, RefreshInterval: k.RefreshInterval}, seed, nil
}

// guidance maps an optional scale to the pipeline's convention: unset is
// the model's default (0), 0 is none (-1).
func guidance(v *float64, name string) (float64, error) {
	switch {
	case v == nil:
		return 0, nil
	case *v < 0 || math.IsNaN(*v) || math.IsInf(*v, 0):
		return 0, bad("%s must be a finite number >= 0", name)
	case *v == 0:
		return -1, nil
	}
	return *v, nil
}

func randomSeed() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) >> 1 // fits JSON integers in most clients
}

func parseSize(size string, maxPixels int) (w, h int, err error) {
	if size == "" {
		return 0, 0, nil
	}
	a, b, ok := strings.Cut(size, "x")
	w, e1 := strconv.Atoi(a)
	h, e2 := strconv.Atoi(b)
	if !ok || e1 != nil || e2 != nil || w <= 0 || h <= 0 {
		return 0, 0, bad("size %q: want WIDTHxHEIGHT, e.g. 1024x1024", size)
	}
	if w*h > maxPixels || w > 1<<15 || h > 1<<15 {
		return 0, 0, bad("size %s is more than the server's %d pixels", size, maxPixels)
	}
	return w, h, nil
}

func (s *Server) handleGenerations(ctx context.Context, w http.ResponseWriter, r *http.Request, e *Engine, release func()) int {
	var req generationRequest
	if err := decodeJSON(r, &req); err != nil {
		return s.fail(ctx, w, err, "")
	}
	n, err := s.checkCommon(req.Model, req.ResponseFormat, req.N)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	if strings.TrimSpace(req.Prompt) == "" {
		return s.fail(ctx, w, bad("prompt is required"), "")
	}
	width, height, err := parseSize(req.Size, s.opts.MaxImagePixels)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	o, seed, err := s.sampling(req.imageKnobs, e.Pipeline)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	cfg, err := guidance(req.CFGScale, "cfg_scale")
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	gen := e.Pipeline.GenerateImage
	if e.Batcher != nil {
		gen = e.Batcher.GenerateImage
	}
	return s.runImages(ctx, w, e, n, seed, req.Stream, release, func(ctx context.Context, seed uint64,
		progress func(int, int), stats *dimoo.DecodeStats) (image.Image, error) {
		o := o
		o.Seed = seed
		return gen(ctx, dimoo.ImageRequest{Prompt: req.Prompt, Width: width, Height: height, CFGScale: cfg,
			Sampling: o, Progress: progress, Stats: stats})
	})
}

// runImages draws n images (seeds seed, seed+1, ...) concurrently, so they
// share the batch, and answers with JSON or, when streaming, with progress
// events and then the result.
func (s *Server) runImages(ctx context.Context, w http.ResponseWriter, e *Engine, n int, seed uint64, stream bool,
	release func(), one func(context.Context, uint64, func(int, int), *dimoo.DecodeStats) (image.Image, error)) int {
	var ev *events
	if stream {
		ev = startEvents(w)
	}
	// rctx ends the other images when one fails; errors are classified
	// against ctx, the request's own context.
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	out := make([]imageData, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var progress func(int, int)
			if ev != nil {
				progress = func(step, total int) { ev.progress(i, step, total) }
			}
			var st dimoo.DecodeStats
			t0 := time.Now()
			img, err := one(rctx, seed+uint64(i), progress, &st)
			if err != nil {
				errs[i] = err
				cancel() // one failure fails the request: stop the others
				return
			}
			s.m.decoded(time.Since(t0), st.Steps)
			var buf bytes.Buffer
			if err := png.Encode(&buf, img); err != nil {
				errs[i] = err
				return
			}
			out[i] = imageData{B64JSON: base64.StdEncoding.EncodeToString(buf.Bytes()), Seed: seed + uint64(i)}
		}()
	}
	if ev != nil {
		done := make(chan struct{})
		go func() {
			wg.Wait()
			close(done)
		}()
		ev.pump(done)
	}
	wg.Wait()
	release()
	// The first error that is not a consequence of cancelling the others.
	var err error
	for _, e := range errs {
		if e != nil && (err == nil || errors.Is(err, dimoo.ErrCancelled) && !errors.Is(e, dimoo.ErrCancelled)) {
			err = e
		}
	}
	resp := imagesResponse{Created: time.Now().Unix(), Data: out}
	if ev != nil {
		if err != nil {
			st, kind, msg := s.classify(ctx, err)
			ev.send("error", errorBody(kind, msg))
			return st
		}
		ev.send("result", resp)
		return http.StatusOK
	}
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	writeJSON(w, http.StatusOK, resp)
	return http.StatusOK
}

// editForm holds the fields of an images/edits multipart form.
type editForm struct {
	prompt, model, format, editType, size string
	n                                     *int
	knobs                                 imageKnobs
	cfgImage                              *float64
	image, mask, ref                      image.Image
}

// readEditForm parses the multipart form field by field, so that images
// are checked for size before they are decoded.
func (s *Server) readEditForm(r *http.Request) (*editForm, error) {
	mr, err := r.MultipartReader()
	if err != nil {
		return nil, bad("images/edits takes multipart/form-data: %v", err)
	}
	f := &editForm{}
	for {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, bodyError(err)
		}
		name := part.FormName()
		switch name {
		case "image", "image[]", "mask", "ref_image":
			img, err := s.readImage(part, name)
			if err != nil {
				return nil, err
			}
			switch {
			case name == "mask":
				f.mask = img
			case name == "ref_image":
				f.ref = img
			case f.image != nil:
				return nil, bad("one input image only")
			default:
				f.image = img
			}
			continue
		}
		b, err := io.ReadAll(io.LimitReader(part, 1<<20))
		if err != nil {
			return nil, bodyError(err)
		}
		if err := f.set(name, string(b)); err != nil {
			return nil, err
		}
	}
	if f.image == nil {
		return nil, bad("the form has no image")
	}
	return f, nil
}

func (f *editForm) set(name, v string) error {
	num := func() (float64, error) {
		x, err := strconv.ParseFloat(v, 64)
		if err != nil || math.IsNaN(x) || math.IsInf(x, 0) {
			return 0, bad("%s: %q is not a number", name, v)
		}
		return x, nil
	}
	integer := func() (int, error) {
		x, err := strconv.Atoi(v)
		if err != nil {
			return 0, bad("%s: %q is not an integer", name, v)
		}
		return x, nil
	}
	var err error
	switch name {
	case "prompt":
		f.prompt = v
	case "model":
		f.model = v
	case "response_format":
		f.format = v
	case "edit_type":
		f.editType = v
	case "size":
		f.size = v
	case "user":
	case "n":
		var x int
		x, err = integer()
		f.n = &x
	case "seed":
		var x uint64
		if x, err = strconv.ParseUint(v, 10, 64); err != nil {
			err = bad("seed: %q is not a non-negative integer", v)
		}
		f.knobs.Seed = &x
	case "steps":
		f.knobs.Steps, err = integer()
	case "temperature":
		var x float64
		x, err = num()
		f.knobs.Temperature = &x
	case "cfg_scale":
		var x float64
		x, err = num()
		f.knobs.CFGScale = &x
	case "cfg_img":
		var x float64
		x, err = num()
		f.cfgImage = &x
	case "use_cache", "stream":
		var x bool
		if x, err = strconv.ParseBool(v); err != nil {
			err = bad("%s: %q is not true or false", name, v)
		}
		if name == "stream" {
			f.knobs.Stream = x
		} else {
			f.knobs.UseCache = x
		}
	case "cache_ratio":
		f.knobs.CacheRatio, err = num()
	case "warmup_ratio":
		f.knobs.WarmupRatio, err = num()
	case "refresh_interval":
		f.knobs.RefreshInterval, err = integer()
	default:
		return bad("unknown field %q", name)
	}
	return err
}

// readImage decodes an uploaded image after checking its header's size.
func (s *Server) readImage(r io.Reader, field string) (image.Image, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, bodyError(err)
	}
	cfg, _, err := image.DecodeConfig(bytes.NewReader(b))
	if err != nil {
		return nil, bad("%s: not a PNG or JPEG image: %v", field, err)
	}
	if cfg.Width <= 0 || cfg.Height <= 0 || cfg.Width*cfg.Height > s.opts.MaxImagePixels {
		return nil, bad("%s: %dx%d is more than the server's %d pixels", field, cfg.Width, cfg.Height,
			s.opts.MaxImagePixels)
	}
	img, _, err := image.Decode(bytes.NewReader(b))
	if err != nil {
		return nil, bad("%s: %v", field, err)
	}
	return img, nil
}

// bodyError reports a body over the limit as such.
func bodyError(err error) error {
	var mb *http.MaxBytesError
	if errors.As(err, &mb) {
		return tooLarge{mb.Limit}
	}
	return bad("reading the request: %v", err)
}

type tooLarge struct{ limit int64 }

func (e tooLarge) Error() string {
	return fmt.Sprintf("the request body is larger than the server's limit of %d bytes", e.limit)
}

func (s *Server) handleEdits(ctx context.Context, w http.ResponseWriter, r *http.Request, e *Engine, release func()) int {
	f, err := s.readEditForm(r)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	n, err := s.checkCommon(f.model, f.format, f.n)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	if strings.TrimSpace(f.prompt) == "" {
		return s.fail(ctx, w, bad("prompt is required"), "")
	}
	if f.size != "" {
		return s.fail(ctx, w, bad("size is not supported for edits: the output has the input's aspect bucket"), "")
	}
	o, seed, err := s.sampling(f.knobs, e.Pipeline)
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	cfgText, err := guidance(f.knobs.CFGScale, "cfg_scale")
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	cfgImage, err := guidance(f.cfgImage, "cfg_img")
	if err != nil {
		return s.fail(ctx, w, err, "")
	}
	p := e.Pipeline
	area := p.NativeArea()
	var one func(context.Context, uint64, func(int, int), *dimoo.DecodeStats) (image.Image, error)
	if f.mask != nil {
		if f.editType != "" && f.editType != "inpaint" {
			return s.fail(ctx, w, bad("a mask means inpainting: edit_type must be empty or \"inpaint\", got %q", f.editType), "")
		}
		inpaint := p.InpaintMask
		if e.Batcher != nil {
			inpaint = e.Batcher.InpaintMask
		}
		one = func(ctx context.Context, seed uint64, progress func(int, int), st *dimoo.DecodeStats) (image.Image, error) {
			o := o
			o.Seed = seed
			return inpaint(ctx, dimoo.InpaintRequest{Prompt: f.prompt, Image: f.image, InputArea: area,
				CFGScale: cfgText, Sampling: o, Progress: progress, Stats: st}, f.mask)
		}
	} else {
		if f.editType == "inpaint" {
			return s.fail(ctx, w, bad("edit_type inpaint needs a mask image"), "")
		}
		edit := p.EditImage
		if e.Batcher != nil {
			edit = e.Batcher.EditImage
		}
		one = func(ctx context.Context, seed uint64, progress func(int, int), st *dimoo.DecodeStats) (image.Image, error) {
			o := o
			o.Seed = seed
			return edit(ctx, dimoo.EditRequest{Prompt: f.prompt, EditType: f.editType, Image: f.image, RefImage: f.ref,
				InputArea: area, CFGText: cfgText, CFGImage: cfgImage, Sampling: o, Progress: progress, Stats: st})
		}
	}
	return s.runImages(ctx, w, e, n, seed, f.knobs.Stream, release, one)
}
