package dimoo

// The VQ-VAE: diffusers' VQModel as stored under a DiMOO checkpoint's vqvae/
// folder (config.json + diffusion_pytorch_model.safetensors), loaded into
// libdimoo, in fp32: on the GPU of a CUDA runtime, on the CPU otherwise. Decode turns a grid of codes
// into pixels, Encode an image into codes.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"sort"
	"sync"
)

// VQMaxLevels is the most block_out_channels entries libdimoo accepts.
const VQMaxLevels = 8

// VQConfig is a diffusers VQModel config.json. Absent keys take diffusers'
// defaults (VQModel.__init__); VQEmbedDim is resolved (null or absent:
// LatentChannels). ScalingFactor, SampleSize, LookupFromCodebook and
// ForceUpcast are kept for reference and change nothing: VQModel.decode does
// not scale its input, and libdimoo computes in fp32.
type VQConfig struct {
	ClassName            string   `json:"_class_name"`
	InChannels           int      `json:"in_channels"`
	OutChannels          int      `json:"out_channels"`
	DownBlockTypes       []string `json:"down_block_types"`
	UpBlockTypes         []string `json:"up_block_types"`
	BlockOutChannels     []int    `json:"block_out_channels"`
	LayersPerBlock       int      `json:"layers_per_block"`
	ActFn                string   `json:"act_fn"`
	LatentChannels       int      `json:"latent_channels"`
	SampleSize           int      `json:"sample_size"`
	NumVQEmbeddings      int      `json:"num_vq_embeddings"`
	NormNumGroups        int      `json:"norm_num_groups"`
	VQEmbedDim           int      `json:"vq_embed_dim"`
	ScalingFactor        float64  `json:"scaling_factor"`
	NormType             string   `json:"norm_type"`
	MidBlockAddAttention bool     `json:"mid_block_add_attention"`
	LookupFromCodebook   bool     `json:"lookup_from_codebook"`
	ForceUpcast          bool     `json:"force_upcast"`
}

// Factor is the downsampling factor 2^(levels-1): an image side is Factor
// times its code grid side.
func (c *VQConfig) Factor() int { return 1 << (len(c.BlockOutChannels) - 1) }

// LoadVQConfig reads dir/config.json with ParseVQConfig.
func LoadVQConfig(dir string) (*VQConfig, error) {
	path := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	return parseVQConfig(path, data)
}

// ParseVQConfig parses and checks a VQModel config.json. A malformed or
// inconsistent config is an error wrapping ErrBadCheckpoint; a well-formed
// one the engine does not implement (another _class_name or block type,
// norm_type "spatial", an activation other than SiLU, more than VQMaxLevels
// levels) wraps ErrUnsupported. Errors name the field.
func ParseVQConfig(data []byte) (*VQConfig, error) { return parseVQConfig("config.json", data) }

func parseVQConfig(path string, data []byte) (*VQConfig, error) {
	c := &VQConfig{ // diffusers' defaults
		InChannels: 3, OutChannels: 3,
		DownBlockTypes: []string{"DownEncoderBlock2D"}, UpBlockTypes: []string{"UpDecoderBlock2D"},
		BlockOutChannels: []int{64}, LayersPerBlock: 1, ActFn: "silu", LatentChannels: 3,
		SampleSize: 32, NumVQEmbeddings: 256, NormNumGroups: 32, ScalingFactor: 0.18215,
		NormType: "group", MidBlockAddAttention: true,
	}
	// vq_embed_dim may be null; the rest may not.
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, checkpointError(path, "not a JSON object: %v", err)
	}
	for k, v := range raw {
		if string(v) == "null" && k != "vq_embed_dim" && k != "_class_name" {
			switch k {
			case "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
				"layers_per_block", "act_fn", "latent_channels", "num_vq_embeddings", "norm_num_groups",
				"norm_type":
				return nil, checkpointError(path, "%s is null", k)
			}
		}
	}
	if err := json.Unmarshal(data, c); err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	bad := func(format string, args ...any) error { return checkpointError(path, format, args...) }
	unsupported := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrUnsupported, path, fmt.Sprintf(format, args...))
	}
	if c.ClassName != "" && c.ClassName != "VQModel" {
		return nil, unsupported("_class_name %q: only diffusers' VQModel is implemented", c.ClassName)
	}
	for _, f := range []struct {
		name string
		v    int
	}{
		{"in_channels", c.InChannels}, {"out_channels", c.OutChannels}, {"latent_channels", c.LatentChannels},
		{"num_vq_embeddings", c.NumVQEmbeddings}, {"norm_num_groups", c.NormNumGroups},
		{"layers_per_block", c.LayersPerBlock},
	} {
		if f.v <= 0 {
			return nil, bad("%s = %d must be positive", f.name, f.v)
		}
	}
	if c.VQEmbedDim < 0 {
		return nil, bad("vq_embed_dim = %d must be positive (or null)", c.VQEmbedDim)
	}
	if c.VQEmbedDim == 0 {
		c.VQEmbedDim = c.LatentChannels
	}
	n := len(c.BlockOutChannels)
	if n == 0 {
		return nil, bad("block_out_channels is empty")
	}
	if n > VQMaxLevels {
		return nil, unsupported("block_out_channels has %d levels, at most %d are supported", n, VQMaxLevels)
	}
	for i, ch := range c.BlockOutChannels {
		if ch <= 0 {
			return nil, bad("block_out_channels[%d] = %d must be positive", i, ch)
		}
		if ch%c.NormNumGroups != 0 {
			return nil, bad("block_out_channels[%d] = %d is not a multiple of norm_num_groups %d", i, ch, c.NormNumGroups)
		}
	}
	for _, bt := range []struct {
		key   string
		types []string
		want  string
	}{{"down_block_types", c.DownBlockTypes, "DownEncoderBlock2D"}, {"up_block_types", c.UpBlockTypes, "UpDecoderBlock2D"}} {
		if len(bt.types) != n {
			return nil, bad("%s has %d entries but block_out_channels has %d", bt.key, len(bt.types), n)
		}
		for i, t := range bt.types {
			if t != bt.want {
				return nil, unsupported("%s[%d] = %q: only %s is implemented", bt.key, i, t, bt.want)
			}
		}
	}
	if c.ActFn != "silu" && c.ActFn != "swish" {
		return nil, unsupported("act_fn %q: only silu is implemented", c.ActFn)
	}
	switch c.NormType {
	case "group":
	case "spatial":
		return nil, unsupported("norm_type \"spatial\" (SpatialNorm in the decoder) is not implemented")
	default:
		return nil, bad("norm_type %q: want \"group\" or \"spatial\"", c.NormType)
	}
	return c, nil
}

func (c *VQConfig) cConfig() cVQConfig {
	cc := cVQConfig{
		InChannels:      int32(c.InChannels),
		OutChannels:     int32(c.OutChannels),
		LatentChannels:  int32(c.LatentChannels),
		NumVQEmbeddings: int32(c.NumVQEmbeddings),
		VQEmbedDim:      int32(c.VQEmbedDim),
		NormNumGroups:   int32(c.NormNumGroups),
		LayersPerBlock:  int32(c.LayersPerBlock),
		NLevels:         int32(len(c.BlockOutChannels)),
	}
	for i, ch := range c.BlockOutChannels {
		cc.BlockOutChannels[i] = int32(ch)
	}
	if c.MidBlockAddAttention {
		cc.MidBlockAddAttention = 1
	}
	return cc // norm_type "group" = 0; parseVQConfig rejects the rest
}

// VQModel is a VQ-VAE loaded into libdimoo. It is safe for concurrent use;
// its encode and decode calls run one at a time (each uses every thread of
// its runtime).
type VQModel struct {
	Dir    string
	Config *VQConfig

	rt  *Runtime
	own bool // the model created rt and closes it

	mu sync.Mutex // serializes calls on h
	h  uintptr

	cancelMu sync.Mutex // guards call: a late ctx cancel must not hit the next call
	call     uint64
}

// vqWeightsFile is the one file save_pretrained writes.
const vqWeightsFile = "diffusion_pytorch_model.safetensors"

// LoadVQModel reads a VQModel folder (config.json and
// diffusion_pytorch_model.safetensors, any mix of F32, F16 and BF16) and
// copies its weights into the library as fp32. Missing, unknown or misshapen
// tensors are errors wrapping ErrBadCheckpoint that name the tensor.
func LoadVQModel(ctx context.Context, dir string, opts LoadOptions) (*VQModel, error) {
	lib := opts.Library
	if lib == nil {
		var err error
		if lib, err = DefaultLibrary(); err != nil {
			return nil, err
		}
	}
	cfg, err := LoadVQConfig(dir)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, vqWeightsFile)
	f, err := OpenSafetensors(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()

	rt, err := lib.NewRuntime(opts.Backend, opts.Device, opts.Threads)
	if err != nil {
		return nil, err
	}
	m, err := newVQModel(rt, cfg)
	if err != nil {
		rt.Close()
		return nil, err
	}
	m.own, m.Dir = true, dir
	names := f.Names()
	sort.Strings(names)
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			m.Close()
			return nil, fmt.Errorf("%w: loading %s: %w", ErrCancelled, dir, err)
		}
		data, err := f.Data(name)
		if err != nil {
			m.Close()
			return nil, err
		}
		if err := m.setWeight(f.Tensors()[name], data); err != nil {
			m.Close()
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		f.dropPages(name)
	}
	if err := m.finalize(); err != nil {
		m.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m, nil
}

// newVQModel creates an empty VQ model on rt; weights follow with setWeight.
func newVQModel(rt *Runtime, cfg *VQConfig) (*VQModel, error) {
	cc := cfg.cConfig()
	var out uintptr
	var eb errBuf
	h, err := rt.handle()
	if err != nil {
		return nil, err
	}
	st := rt.lib.vqCreate(h, &cc, &out, eb.ptr(), eb.len())
	if err := statusError(st, "dimoo_vq_create", eb.String); err != nil {
		return nil, err
	}
	return &VQModel{Config: cfg, rt: rt, h: out}, nil
}

func (m *VQModel) errMsg() string { return m.rt.lib.vqError(m.h) }

func (m *VQModel) setWeight(info TensorInfo, data []byte) error {
	p, sp, nd := tensorArgs(info, data)
	err := errClosed
	m.rt.lib.native.locked(&m.mu, func() {
		if m.h != 0 {
			st := m.rt.lib.vqSetW(m.h, info.Name, int32(info.DType), sp, nd, p, uint64(len(data)))
			err = statusError(st, "dimoo_vq_set_weight", m.errMsg)
		}
	})
	return err
}

func (m *VQModel) finalize() error {
	var err error
	m.rt.lib.native.locked(&m.mu, func() {
		err = statusError(m.rt.lib.vqFinalize(m.h), "dimoo_vq_finalize", m.errMsg)
	})
	return err
}

// Factor is the downsampling factor: an image is Factor times its code grid.
func (m *VQModel) Factor() int { return m.Config.Factor() }

// Codebook is the number of codes (num_vq_embeddings).
func (m *VQModel) Codebook() int { return m.Config.NumVQEmbeddings }

// WeightBytes is the memory the weights take inside the library.
func (m *VQModel) WeightBytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.h == 0 {
		return 0
	}
	return m.rt.lib.vqWBytes(m.h)
}

// Runtime is the runtime the model lives on.
func (m *VQModel) Runtime() *Runtime { return m.rt }

// Close frees the weights (and the runtime, if LoadVQModel made it).
func (m *VQModel) Close() error {
	m.mu.Lock()
	if m.h != 0 {
		m.rt.lib.vqFree(m.h)
		m.h = 0
	}
	m.mu.Unlock()
	if m.own {
		m.own = false
		return m.rt.Close()
	}
	return nil
}

// run calls f (one library call on h) with m.mu held, cancelling it through
// dimoo_vq_cancel when ctx is done while it runs.
func (m *VQModel) run(ctx context.Context, op string, f func(h uintptr) int32) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %s: %w", ErrCancelled, op, err)
	}
	err := errClosed
	m.rt.lib.native.locked(&m.mu, func() {
		if m.h == 0 {
			return
		}
		m.cancelMu.Lock()
		m.call++
		id := m.call
		m.cancelMu.Unlock()
		h := m.h
		stop := context.AfterFunc(ctx, func() {
			m.cancelMu.Lock()
			defer m.cancelMu.Unlock()
			if m.call == id {
				m.rt.lib.vqCancel(h)
			}
		})
		st := f(h)
		stop()
		m.cancelMu.Lock()
		m.call++ // a cancel that fires from now on finds another id
		m.cancelMu.Unlock()
		err = statusError(st, op, m.errMsg)
	})
	if errors.Is(err, ErrCancelled) && ctx.Err() != nil {
		return fmt.Errorf("%w: %w", err, ctx.Err())
	}
	return err
}

// The largest image libdimoo encodes or decodes (its own limits).
const (
	vqMaxSide   = 1 << 15
	vqMaxPixels = 1 << 28
)

// checkGrid validates an h x w code grid of n codes.
func (m *VQModel) checkGrid(op string, n, h, w int) error {
	f := m.Factor()
	if h <= 0 || w <= 0 {
		return fmt.Errorf("%w: %s: grid %dx%d must have positive sides", ErrInvalidArgument, op, h, w)
	}
	if h > vqMaxSide/f || w > vqMaxSide/f || (h*f)*(w*f) > vqMaxPixels {
		return fmt.Errorf("%w: %s: grid %dx%d decodes to an image larger than the supported 2^28 pixels (sides <= %d)",
			ErrInvalidArgument, op, h, w, vqMaxSide)
	}
	if n != h*w {
		return fmt.Errorf("%w: %s: %d values for a %dx%d grid", ErrInvalidArgument, op, n, h, w)
	}
	return nil
}

// checkImage validates an H x W image for the encoder.
func (m *VQModel) checkImage(op string, H, W int) error {
	f := m.Factor()
	if H <= 0 || W <= 0 || H > vqMaxSide || W > vqMaxSide || H*W > vqMaxPixels {
		return fmt.Errorf("%w: %s: image %dx%d (width x height) must have sides in [1, %d] and at most 2^28 pixels",
			ErrInvalidArgument, op, W, H, vqMaxSide)
	}
	if H%f != 0 || W%f != 0 {
		return fmt.Errorf("%w: %s: image %dx%d (width x height) is not a multiple of the VQ-VAE's factor %d in both sides",
			ErrInvalidArgument, op, W, H, f)
	}
	return nil
}

// DecodeFloat decodes an h x w grid of codes (row-major) into the decoder's
// raw output, unclamped: (h*Factor) x (w*Factor) pixels of out_channels
// floats, channels last (HWC). Codes outside [0, Codebook()) are an error
// wrapping ErrInvalidArgument.
func (m *VQModel) DecodeFloat(codes []int32, h, w int) ([]float32, error) {
	return m.decodeFloat(context.Background(), codes, h, w)
}

func (m *VQModel) decodeFloat(ctx context.Context, codes []int32, h, w int) ([]float32, error) {
	if err := m.checkGrid("decode", len(codes), h, w); err != nil {
		return nil, err
	}
	f := m.Factor()
	out := make([]float32, h*f*w*f*m.Config.OutChannels)
	err := m.run(ctx, "dimoo_vq_decode", func(hd uintptr) int32 {
		return m.rt.lib.vqDecode(hd, &codes[0], int32(h), int32(w), &out[0])
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// DecodeLatent runs the decoder on a continuous h x w latent of
// Config.VQEmbedDim floats per cell (HWC) instead of codebook rows;
// otherwise as DecodeFloat.
func (m *VQModel) DecodeLatent(ctx context.Context, latent []float32, h, w int) ([]float32, error) {
	d := m.Config.VQEmbedDim
	if h <= 0 || w <= 0 || len(latent) != h*w*d {
		return nil, fmt.Errorf("%w: decode latent: %d floats for a %dx%dx%d latent", ErrInvalidArgument,
			len(latent), h, w, d)
	}
	if err := m.checkGrid("decode latent", h*w, h, w); err != nil {
		return nil, err
	}
	f := m.Factor()
	out := make([]float32, h*f*w*f*m.Config.OutChannels)
	err := m.run(ctx, "dimoo_vq_decode_latent", func(hd uintptr) int32 {
		return m.rt.lib.vqDecodeLatent(hd, &latent[0], int32(h), int32(w), &out[0])
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Decode decodes an h x w grid of codes into an image of (w*Factor) x
// (h*Factor) pixels: the decoder output clamped to [0, 1], times 255,
// rounded (DiMOO's convention: no [-1, 1] normalisation). It needs
// out_channels 3. ctx cancels a running decode between layers.
func (m *VQModel) Decode(ctx context.Context, codes []int32, h, w int) (*image.NRGBA, error) {
	if m.Config.OutChannels != 3 {
		return nil, fmt.Errorf("%w: decode to an image needs out_channels 3, the VQ-VAE has %d", ErrUnsupported,
			m.Config.OutChannels)
	}
	pix, err := m.decodeFloat(ctx, codes, h, w)
	if err != nil {
		return nil, err
	}
	f := m.Factor()
	return PixelsToImage(pix, w*f, h*f), nil
}

// EncodeFloat encodes H x W pixels of in_channels floats in [0, 1] (HWC)
// into an (H/Factor) x (W/Factor) grid of codes, row-major: per cell the
// nearest codebook row by Euclidean distance, the lowest code on a tie. H and
// W must be multiples of Factor (else ErrInvalidArgument).
func (m *VQModel) EncodeFloat(pix []float32, H, W int) ([]int32, error) {
	return m.encodeFloat(context.Background(), pix, H, W)
}

func (m *VQModel) encodeFloat(ctx context.Context, pix []float32, H, W int) ([]int32, error) {
	if err := m.checkImage("encode", H, W); err != nil {
		return nil, err
	}
	if len(pix) != H*W*m.Config.InChannels {
		return nil, fmt.Errorf("%w: encode: %d floats for %dx%d pixels of %d channels", ErrInvalidArgument,
			len(pix), W, H, m.Config.InChannels)
	}
	f := m.Factor()
	codes := make([]int32, (H/f)*(W/f))
	err := m.run(ctx, "dimoo_vq_encode", func(hd uintptr) int32 {
		return m.rt.lib.vqEncode(hd, &pix[0], int32(H), int32(W), &codes[0])
	})
	if err != nil {
		return nil, err
	}
	return codes, nil
}

// EncodeLatent is the encoder up to quant_conv, the vectors EncodeFloat
// quantizes: (H/Factor) x (W/Factor) cells of Config.VQEmbedDim floats (HWC).
func (m *VQModel) EncodeLatent(ctx context.Context, pix []float32, H, W int) ([]float32, error) {
	if err := m.checkImage("encode latent", H, W); err != nil {
		return nil, err
	}
	if len(pix) != H*W*m.Config.InChannels {
		return nil, fmt.Errorf("%w: encode latent: %d floats for %dx%d pixels of %d channels", ErrInvalidArgument,
			len(pix), W, H, m.Config.InChannels)
	}
	f := m.Factor()
	lat := make([]float32, (H/f)*(W/f)*m.Config.VQEmbedDim)
	err := m.run(ctx, "dimoo_vq_encode_latent", func(hd uintptr) int32 {
		return m.rt.lib.vqEncodeLatent(hd, &pix[0], int32(H), int32(W), &lat[0])
	})
	if err != nil {
		return nil, err
	}
	return lat, nil
}

// Encode encodes an image whose sides are multiples of Factor (see
// CenterCropResize and AspectBucket to get there) into its code grid: h rows
// of w codes. The image's RGB values are read as 8-bit, un-premultiplied
// (alpha is dropped, like PIL's convert("RGB")), and scaled to [0, 1]. It
// needs in_channels 3. ctx cancels a running encode between layers.
func (m *VQModel) Encode(ctx context.Context, img image.Image) (codes []int32, h, w int, err error) {
	if m.Config.InChannels != 3 {
		return nil, 0, 0, fmt.Errorf("%w: encode from an image needs in_channels 3, the VQ-VAE has %d",
			ErrUnsupported, m.Config.InChannels)
	}
	b := img.Bounds()
	W, H := b.Dx(), b.Dy()
	if err := m.checkImage("encode", H, W); err != nil {
		return nil, 0, 0, err
	}
	codes, err = m.encodeFloat(ctx, ImageToPixels(img), H, W)
	if err != nil {
		return nil, 0, 0, err
	}
	f := m.Factor()
	return codes, H / f, W / f, nil
}

// PixelsToImage turns W x H RGB floats (HWC) into an opaque image: each value
// clamped to [0, 1], times 255, rounded half to even (NaN gives 0).
func PixelsToImage(pix []float32, W, H int) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, W, H))
	for i := 0; i < W*H; i++ {
		for c := 0; c < 3; c++ {
			img.Pix[4*i+c] = to8(pix[3*i+c])
		}
		img.Pix[4*i+3] = 255
	}
	return img
}

func to8(v float32) uint8 {
	if !(v > 0) {
		return 0
	}
	if v >= 1 {
		return 255
	}
	return uint8(math.RoundToEven(float64(v * 255)))
}

// ImageToPixels reads an image's RGB as floats in [0, 1], HWC, row-major
// from the top-left of its bounds: 8-bit un-premultiplied values / 255.
func ImageToPixels(img image.Image) []float32 {
	b := img.Bounds()
	W, H := b.Dx(), b.Dy()
	pix := make([]float32, 0, W*H*3)
	if r, ok := img.(*image.RGBA); ok {
		for y := 0; y < H; y++ {
			row := r.Pix[r.PixOffset(b.Min.X, b.Min.Y+y):]
			for x := 0; x < W; x++ {
				p := row[4*x : 4*x+4]
				if p[3] == 255 {
					pix = append(pix, float32(p[0])/255, float32(p[1])/255, float32(p[2])/255)
				} else {
					c := color.NRGBAModel.Convert(color.RGBA{p[0], p[1], p[2], p[3]}).(color.NRGBA)
					pix = append(pix, float32(c.R)/255, float32(c.G)/255, float32(c.B)/255)
				}
			}
		}
		return pix
	}
	if n, ok := img.(*image.NRGBA); ok {
		for y := 0; y < H; y++ {
			row := n.Pix[n.PixOffset(b.Min.X, b.Min.Y+y):]
			for x := 0; x < W; x++ {
				pix = append(pix, float32(row[4*x])/255, float32(row[4*x+1])/255, float32(row[4*x+2])/255)
			}
		}
		return pix
	}
	for y := b.Min.Y; y < b.Max.Y; y++ {
		for x := b.Min.X; x < b.Max.X; x++ {
			c := color.NRGBAModel.Convert(img.At(x, y)).(color.NRGBA)
			pix = append(pix, float32(c.R)/255, float32(c.G)/255, float32(c.B)/255)
		}
	}
	return pix
}
