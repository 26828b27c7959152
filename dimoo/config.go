package dimoo

// The model configuration: LLaDA's config.json, parsed, defaulted and
// checked against what the engine implements.

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
)

// Config is a LLaDA / Lumina-DiMOO config.json. Nullable fields are resolved
// by ParseConfig: NKVHeads, MLPHiddenSize and EmbeddingSize always hold the
// value the weights use. Fields the engine ignores (dropouts, init, flash
// attention) are not kept.
type Config struct {
	DModel            int     `json:"d_model"`
	NHeads            int     `json:"n_heads"`
	NKVHeads          int     `json:"n_kv_heads"` // null or absent: NHeads
	NLayers           int     `json:"n_layers"`
	MLPHiddenSize     int     `json:"mlp_hidden_size"` // null or absent: MLPRatio * DModel
	MLPRatio          int     `json:"mlp_ratio"`       // 0 if absent
	VocabSize         int     `json:"vocab_size"`
	EmbeddingSize     int     `json:"embedding_size"` // null or absent: VocabSize
	Rope              bool    `json:"rope"`
	RopeTheta         float64 `json:"rope_theta"`
	RopeFullPrecision bool    `json:"rope_full_precision"` // absent: true
	MaxSequenceLength int     `json:"max_sequence_length"`
	LayerNormType     string  `json:"layer_norm_type"`
	RMSNormEps        float64 `json:"rms_norm_eps"`
	BlockType         string  `json:"block_type"`
	ActivationType    string  `json:"activation_type"`
	IncludeBias       bool    `json:"include_bias"`
	IncludeQKVBias    bool    `json:"include_qkv_bias"` // absent: false
	WeightTying       bool    `json:"weight_tying"`
	Alibi             bool    `json:"alibi"`          // absent: false
	InputEmbNorm      bool    `json:"input_emb_norm"` // absent: false
	ScaleLogits       bool    `json:"scale_logits"`   // absent: false
	// Special token ids; -1 when absent or null.
	MaskTokenID   int      `json:"mask_token_id"`
	EOSTokenID    int      `json:"eos_token_id"`
	PadTokenID    int      `json:"pad_token_id"`
	ModelType     string   `json:"model_type,omitempty"`
	Architectures []string `json:"architectures,omitempty"`
	TorchDType    string   `json:"torch_dtype,omitempty"`
}

// TensorSpec is a tensor the forward pass needs: its checkpoint name and its
// shape, (out_features, in_features) for a weight matrix.
type TensorSpec struct {
	Name  string
	Shape []int64
}

// LoadConfig reads dir/config.json with ParseConfig.
func LoadConfig(dir string) (*Config, error) {
	path := filepath.Join(dir, "config.json")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	return parseConfig(path, data)
}

// ParseConfig parses and checks a config.json.
//
// Required: d_model, n_heads, n_layers, vocab_size, max_sequence_length,
// rope, rope_theta, layer_norm_type, rms_norm_eps, block_type,
// activation_type, include_bias and weight_tying (the last ones choose the
// architecture, and LLaDA's defaults for them are not what the engine
// implements, so they must be explicit), plus one of mlp_hidden_size and
// mlp_ratio. A missing, mistyped or inconsistent field is an error wrapping
// ErrBadCheckpoint; a well-formed architecture the engine does not implement
// (not rms/llama/silu, biases, tied weights, ALiBi, no RoPE, embedding norm,
// logit scaling, odd head dim) wraps ErrUnsupported. Errors name the field.
func ParseConfig(data []byte) (*Config, error) {
	return parseConfig("config.json", data)
}

// maxConfigDim bounds every size so that the C side's int32 fields and the
// size arithmetic cannot overflow.
const maxConfigDim = math.MaxInt32

func parseConfig(path string, data []byte) (*Config, error) {
	_, fields, err := decodeJSONObject(data)
	if err != nil {
		return nil, checkpointError(path, "%v", err)
	}
	p := &configParser{path: path, fields: fields}
	c := &Config{
		DModel:            p.size("d_model", true),
		NHeads:            p.size("n_heads", true),
		NKVHeads:          p.size("n_kv_heads", false),
		NLayers:           p.size("n_layers", true),
		MLPHiddenSize:     p.size("mlp_hidden_size", false),
		MLPRatio:          p.size("mlp_ratio", false),
		VocabSize:         p.size("vocab_size", true),
		EmbeddingSize:     p.size("embedding_size", false),
		Rope:              p.boolean("rope", true, false),
		RopeTheta:         p.positive("rope_theta"),
		RopeFullPrecision: p.boolean("rope_full_precision", false, true),
		MaxSequenceLength: p.size("max_sequence_length", true),
		LayerNormType:     p.str("layer_norm_type", true),
		RMSNormEps:        p.positive("rms_norm_eps"),
		BlockType:         p.str("block_type", true),
		ActivationType:    p.str("activation_type", true),
		IncludeBias:       p.boolean("include_bias", true, false),
		IncludeQKVBias:    p.boolean("include_qkv_bias", false, false),
		WeightTying:       p.boolean("weight_tying", true, false),
		Alibi:             p.boolean("alibi", false, false),
		InputEmbNorm:      p.boolean("input_emb_norm", false, false),
		ScaleLogits:       p.boolean("scale_logits", false, false),
		MaskTokenID:       p.tokenID("mask_token_id"),
		EOSTokenID:        p.tokenID("eos_token_id"),
		PadTokenID:        p.tokenID("pad_token_id"),
		ModelType:         p.str("model_type", false),
		Architectures:     p.strs("architectures"),
		TorchDType:        p.str("torch_dtype", false),
	}
	if p.err != nil {
		return nil, p.err
	}

	// Resolve the nullable sizes.
	if c.NKVHeads == 0 {
		c.NKVHeads = c.NHeads
	}
	if c.MLPHiddenSize == 0 {
		if c.MLPRatio == 0 {
			return nil, checkpointError(path, "field \"mlp_hidden_size\" is missing and so is \"mlp_ratio\"")
		}
		h := int64(c.MLPRatio) * int64(c.DModel)
		if h > maxConfigDim {
			return nil, checkpointError(path, "field \"mlp_ratio\": %d * d_model %d is too large", c.MLPRatio, c.DModel)
		}
		c.MLPHiddenSize = int(h)
	}
	if c.EmbeddingSize == 0 {
		c.EmbeddingSize = c.VocabSize
	}

	// Consistency.
	if c.EmbeddingSize < c.VocabSize {
		return nil, checkpointError(path, "field \"embedding_size\" (%d) is smaller than vocab_size (%d)", c.EmbeddingSize, c.VocabSize)
	}
	if c.DModel%c.NHeads != 0 {
		return nil, checkpointError(path, "field \"n_heads\" (%d) does not divide d_model (%d)", c.NHeads, c.DModel)
	}
	if c.NHeads%c.NKVHeads != 0 {
		return nil, checkpointError(path, "field \"n_kv_heads\" (%d) does not divide n_heads (%d)", c.NKVHeads, c.NHeads)
	}
	for _, t := range []struct {
		name string
		id   int
	}{{"mask_token_id", c.MaskTokenID}, {"eos_token_id", c.EOSTokenID}, {"pad_token_id", c.PadTokenID}} {
		if t.id >= c.EmbeddingSize {
			return nil, checkpointError(path, "field %q (%d) is not below embedding_size (%d)", t.name, t.id, c.EmbeddingSize)
		}
	}
	if _, ok := c.paramCount(); !ok {
		return nil, checkpointError(path, "the parameter count overflows 64 bits (d_model %d, n_layers %d, mlp %d, embedding %d)",
			c.DModel, c.NLayers, c.MLPHiddenSize, c.EmbeddingSize)
	}

	// What the engine implements.
	unsupported := func(field string, got, want any) error {
		return fmt.Errorf("%w: %s: field %q is %v; the engine implements only %v", ErrUnsupported, path, field, got, want)
	}
	switch {
	case c.LayerNormType != "rms":
		return nil, unsupported("layer_norm_type", strconv.Quote(c.LayerNormType), `"rms"`)
	case c.BlockType != "llama":
		return nil, unsupported("block_type", strconv.Quote(c.BlockType), `"llama"`)
	case c.ActivationType != "silu":
		return nil, unsupported("activation_type", strconv.Quote(c.ActivationType), `"silu"`)
	case !c.Rope:
		return nil, unsupported("rope", false, true)
	case c.IncludeBias:
		return nil, unsupported("include_bias", true, false)
	case c.IncludeQKVBias:
		return nil, unsupported("include_qkv_bias", true, false)
	case c.WeightTying:
		return nil, unsupported("weight_tying", true, false)
	case c.Alibi:
		return nil, unsupported("alibi", true, false)
	case c.InputEmbNorm:
		return nil, unsupported("input_emb_norm", true, false)
	case c.ScaleLogits:
		return nil, unsupported("scale_logits", true, false)
	case c.HeadDim()%2 != 0:
		return nil, fmt.Errorf("%w: %s: field \"n_heads\": head dim d_model/n_heads = %d is odd; RoPE needs an even head dim",
			ErrUnsupported, path, c.HeadDim())
	}
	return c, nil
}

// configParser pulls typed fields out of a decoded config.json and keeps the
// first error.
type configParser struct {
	path   string
	fields map[string]json.RawMessage
	err    error
}

// raw returns the field's JSON, or nil when it is absent or null. A missing
// required field sets the error.
func (p *configParser) raw(name string, required bool) json.RawMessage {
	if p.err != nil {
		return nil
	}
	r, ok := p.fields[name]
	if !ok || string(r) == "null" {
		if required {
			p.err = checkpointError(p.path, "field %q is missing", name)
		}
		return nil
	}
	return r
}

func (p *configParser) fail(name, want string, r json.RawMessage) {
	p.err = checkpointError(p.path, "field %q is %s, want %s", name, clip(r), want)
}

// integer parses an integral JSON number (4 and 4.0 both work).
func (p *configParser) integer(name string, r json.RawMessage) (int64, bool) {
	if len(r) == 0 || (r[0] != '-' && (r[0] < '0' || r[0] > '9')) {
		p.fail(name, "an integer", r)
		return 0, false
	}
	if v, err := strconv.ParseInt(string(r), 10, 64); err == nil {
		return v, true
	}
	f, err := strconv.ParseFloat(string(r), 64)
	if err != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
		p.fail(name, "an integer", r)
		return 0, false
	}
	return int64(f), true
}

// size is a positive integer up to maxConfigDim; 0 when absent or null.
func (p *configParser) size(name string, required bool) int {
	r := p.raw(name, required)
	if r == nil {
		return 0
	}
	v, ok := p.integer(name, r)
	if !ok {
		return 0
	}
	if v <= 0 || v > maxConfigDim {
		p.fail(name, fmt.Sprintf("a positive integer up to %d", maxConfigDim), r)
		return 0
	}
	return int(v)
}

// tokenID is a non-negative integer; -1 when absent or null.
func (p *configParser) tokenID(name string) int {
	r := p.raw(name, false)
	if r == nil {
		return -1
	}
	v, ok := p.integer(name, r)
	if !ok {
		return -1
	}
	if v < 0 || v > maxConfigDim {
		p.fail(name, "a non-negative token id", r)
		return -1
	}
	return int(v)
}

// positive is a required finite number > 0.
func (p *configParser) positive(name string) float64 {
	r := p.raw(name, true)
	if r == nil {
		return 0
	}
	if r[0] != '-' && (r[0] < '0' || r[0] > '9') {
		p.fail(name, "a number", r)
		return 0
	}
	f, err := strconv.ParseFloat(string(r), 64)
	if err != nil || math.IsInf(f, 0) || math.IsNaN(f) || f <= 0 {
		p.fail(name, "a finite number > 0", r)
		return 0
	}
	return f
}

func (p *configParser) boolean(name string, required, def bool) bool {
	r := p.raw(name, required)
	switch string(r) {
	case "":
		return def
	case "true":
		return true
	case "false":
		return false
	}
	p.fail(name, "true or false", r)
	return def
}

func (p *configParser) str(name string, required bool) string {
	r := p.raw(name, required)
	if r == nil {
		return ""
	}
	var s string
	if r[0] != '"' || json.Unmarshal(r, &s) != nil {
		p.fail(name, "a string", r)
	}
	return s
}

func (p *configParser) strs(name string) []string {
	r := p.raw(name, false)
	if r == nil {
		return nil
	}
	var s []string
	if r[0] != '[' || json.Unmarshal(r, &s) != nil {
		p.fail(name, "an array of strings", r)
	}
	return s
}

// HeadDim is d_model / n_heads.
func (c *Config) HeadDim() int { return c.DModel / c.NHeads }

// KVDim is the width of k and v: n_kv_heads * head dim.
func (c *Config) KVDim() int { return c.NKVHeads * c.HeadDim() }

// MLPHidden is the width of the gated MLP (ff_proj and up_proj outputs).
func (c *Config) MLPHidden() int { return c.MLPHiddenSize }

// EmbeddingRows is the number of rows of wte and of the output ff_out:
// embedding_size, which may exceed vocab_size (padding rows).
func (c *Config) EmbeddingRows() int { return c.EmbeddingSize }

// ExpectedTensors lists every tensor the forward pass reads, in checkpoint
// order of use: wte, then each block's nine weights, then ln_f and ff_out.
func (c *Config) ExpectedTensors() []TensorSpec {
	d, kv, m, e := int64(c.DModel), int64(c.KVDim()), int64(c.MLPHidden()), int64(c.EmbeddingRows())
	specs := make([]TensorSpec, 0, 9*c.NLayers+3)
	specs = append(specs, TensorSpec{"model.transformer.wte.weight", []int64{e, d}})
	for i := 0; i < c.NLayers; i++ {
		b := fmt.Sprintf("model.transformer.blocks.%d.", i)
		specs = append(specs,
			TensorSpec{b + "attn_norm.weight", []int64{d}},
			TensorSpec{b + "q_proj.weight", []int64{d, d}},
			TensorSpec{b + "k_proj.weight", []int64{kv, d}},
			TensorSpec{b + "v_proj.weight", []int64{kv, d}},
			TensorSpec{b + "attn_out.weight", []int64{d, d}},
			TensorSpec{b + "ff_norm.weight", []int64{d}},
			TensorSpec{b + "ff_proj.weight", []int64{m, d}},
			TensorSpec{b + "up_proj.weight", []int64{m, d}},
			TensorSpec{b + "ff_out.weight", []int64{d, m}},
		)
	}
	specs = append(specs,
		TensorSpec{"model.transformer.ln_f.weight", []int64{d}},
		TensorSpec{"model.transformer.ff_out.weight", []int64{e, d}},
	)
	return specs
}

// ParamCount is the number of parameters in ExpectedTensors:
//
//	2*E*d + d + L*(2*d + 2*d*d + 2*kv*d + 3*m*d)
//
// (embedding and output matrices, ln_f, and per block two norms, q and
// attn_out, k and v, and the three MLP matrices).
func (c *Config) ParamCount() int64 {
	n, _ := c.paramCount()
	return n
}

// paramCount is ParamCount with overflow detection (false on overflow).
func (c *Config) paramCount() (int64, bool) {
	var a checkedInt
	d, kv, m, e, l := int64(c.DModel), int64(c.KVDim()), int64(c.MLPHidden()), int64(c.EmbeddingRows()), int64(c.NLayers)
	perBlock := a.add(a.add(a.add(2*d, a.mul(2*d, d)), a.mul(2*kv, d)), a.mul(3*m, d))
	n := a.add(a.add(a.mul(2*e, d), d), a.mul(l, perBlock))
	return n, !a.overflow
}

// WeightBytes is the size of the weights stored as dt.
func (c *Config) WeightBytes(dt DType) int64 {
	var a checkedInt
	n := a.mul(c.ParamCount(), int64(dt.Size()))
	if a.overflow {
		return math.MaxInt64
	}
	return n
}

// ActivationBytes is a rough upper estimate of the fp32 scratch memory of
// one CPU forward over tokens positions:
//
//	4 * (T*(4*d + 2*kv + 2*m) + n_heads*T*T)
//
// that is, per position the residual, the normed input, q, the attention
// output (4*d), k and v (2*kv) and the two MLP activations (2*m), plus a full
// T x T score matrix per head. It excludes the logits (T x vocab_size) and
// any cache. It saturates at math.MaxInt64 and is 0 for tokens <= 0.
func (c *Config) ActivationBytes(tokens int) int64 {
	if tokens <= 0 {
		return 0
	}
	var a checkedInt
	t := int64(tokens)
	perToken := 4*int64(c.DModel) + 2*int64(c.KVDim()) + 2*int64(c.MLPHidden())
	n := a.mul(4, a.add(a.mul(t, perToken), a.mul(a.mul(int64(c.NHeads), t), t)))
	if a.overflow {
		return math.MaxInt64
	}
	return n
}

// checkedInt does non-negative int64 arithmetic and remembers overflow.
type checkedInt struct{ overflow bool }

func (a *checkedInt) mul(x, y int64) int64 {
	if x != 0 && y > math.MaxInt64/x {
		a.overflow = true
		return math.MaxInt64
	}
	return x * y
}

func (a *checkedInt) add(x, y int64) int64 {
	if x > math.MaxInt64-y {
		a.overflow = true
		return math.MaxInt64
	}
	return x + y
}
