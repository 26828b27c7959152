package dimoo

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// officialSmallConfig is the config.json of the small checkpoint the official
// Lumina-DiMOO code wrote for the golden tests.
const officialSmallConfig = `{
 "d_model": 128,
 "n_heads": 4,
 "n_kv_heads": 4,
 "n_layers": 2,
 "mlp_hidden_size": 352,
 "mlp_ratio": 4,
 "vocab_size": 384,
 "embedding_size": 384,
 "rope": true,
 "rope_theta": 500000.0,
 "rope_full_precision": true,
 "max_sequence_length": 4096,
 "layer_norm_type": "rms",
 "rms_norm_eps": 1e-05,
 "block_type": "llama",
 "activation_type": "silu",
 "include_bias": false,
 "include_qkv_bias": false,
 "weight_tying": false,
 "attention_dropout": 0.0,
 "residual_dropout": 0.0,
 "embedding_dropout": 0.0,
 "input_emb_norm": false,
 "scale_logits": false,
 "alibi": false,
 "flash_attention": false,
 "block_group_size": 1,
 "mask_token_id": 300,
 "eos_token_id": 307,
 "pad_token_id": 307,
 "architectures": [
  "LLaDAModelLM"
 ],
 "model_type": "llada",
 "torch_dtype": "float32"
}`

func TestConfigOfficialSmall(t *testing.T) {
	c, err := ParseConfig([]byte(officialSmallConfig))
	require.NoError(t, err)
	assert.Equal(t, &Config{
		DModel: 128, NHeads: 4, NKVHeads: 4, NLayers: 2, MLPHiddenSize: 352, MLPRatio: 4,
		VocabSize: 384, EmbeddingSize: 384, Rope: true, RopeTheta: 500000, RopeFullPrecision: true,
		MaxSequenceLength: 4096, LayerNormType: "rms", RMSNormEps: 1e-5, BlockType: "llama",
		ActivationType: "silu", MaskTokenID: 300, EOSTokenID: 307, PadTokenID: 307,
		ModelType: "llada", Architectures: []string{"LLaDAModelLM"}, TorchDType: "float32",
	}, c)
	assert.Equal(t, 32, c.HeadDim())
	assert.Equal(t, 128, c.KVDim())
	assert.Equal(t, 352, c.MLPHidden())
	assert.Equal(t, 384, c.EmbeddingRows())

	specs := c.ExpectedTensors()
	require.Len(t, specs, 2*9+3)
	assert.Equal(t, TensorSpec{"model.transformer.wte.weight", []int64{384, 128}}, specs[0])
	assert.Equal(t, TensorSpec{"model.transformer.blocks.0.attn_norm.weight", []int64{128}}, specs[1])
	assert.Equal(t, TensorSpec{"model.transformer.blocks.1.ff_out.weight", []int64{128, 352}}, specs[18])
	assert.Equal(t, TensorSpec{"model.transformer.ln_f.weight", []int64{128}}, specs[19])
	assert.Equal(t, TensorSpec{"model.transformer.ff_out.weight", []int64{384, 128}}, specs[20])
	names := map[string]bool{}
	var params int64
	for _, s := range specs {
		assert.False(t, names[s.Name], "duplicate %s", s.Name)
		names[s.Name] = true
		n := int64(1)
		for _, d := range s.Shape {
			n *= d
		}
		params += n
	}
	// The official index says total_size 2001408 bytes of float32.
	assert.Equal(t, int64(2001408/4), c.ParamCount())
	assert.Equal(t, params, c.ParamCount())
	assert.Equal(t, int64(2001408), c.WeightBytes(DTypeF32))
	assert.Equal(t, int64(2001408/2), c.WeightBytes(DTypeBF16))

	// The copy under testdata/ (when present) is the same file.
	if data, err := os.ReadFile("../testdata/official-small/checkpoint/config.json"); err == nil {
		c2, err := ParseConfig(data)
		require.NoError(t, err)
		assert.Equal(t, c, c2)
	}
}

func TestConfig8B(t *testing.T) {
	c := &Config{DModel: 4096, NHeads: 32, NKVHeads: 32, NLayers: 32, MLPHiddenSize: 12288,
		VocabSize: 134656, EmbeddingSize: 134656}
	// 2*E*d + d + L*(2d + 2d² + 2*kv*d + 3*m*d)
	//   = 1,103,101,952 + 4,096 + 32*218,112,000
	assert.Equal(t, int64(8_082_690_048), c.ParamCount())
	assert.Equal(t, int64(16_165_380_096), c.WeightBytes(DTypeBF16))
	assert.Equal(t, int64(32_330_760_192), c.WeightBytes(DTypeF32))
	assert.Equal(t, 128, c.HeadDim())
	assert.Len(t, c.ExpectedTensors(), 32*9+3)

	// 4 * (T*(4*4096 + 2*4096 + 2*12288) + 32*T*T) for T = 1024.
	assert.Equal(t, int64(4*(1024*(4*4096+2*4096+2*12288)+32*1024*1024)), c.ActivationBytes(1024))
	assert.Equal(t, int64(0), c.ActivationBytes(0))
	assert.Equal(t, int64(0), c.ActivationBytes(-3))
	assert.Equal(t, int64(math.MaxInt64), c.ActivationBytes(math.MaxInt))
}

// smallConfigMap returns the official-small config as a map to edit.
func smallConfigMap(t *testing.T) map[string]any {
	var m map[string]any
	require.NoError(t, json.Unmarshal([]byte(officialSmallConfig), &m))
	return m
}

func TestConfigDefaults(t *testing.T) {
	m := smallConfigMap(t)
	m["n_kv_heads"] = nil
	m["mlp_hidden_size"] = nil
	delete(m, "embedding_size")
	delete(m, "mask_token_id")
	delete(m, "include_qkv_bias")
	delete(m, "alibi")
	delete(m, "rope_full_precision")
	m["mlp_ratio"] = 3.0 // integral floats are integers
	data, err := json.Marshal(m)
	require.NoError(t, err)
	c, err := ParseConfig(data)
	require.NoError(t, err)
	assert.Equal(t, 4, c.NKVHeads)
	assert.Equal(t, 3*128, c.MLPHidden())
	assert.Equal(t, 384, c.EmbeddingRows())
	assert.Equal(t, -1, c.MaskTokenID)
	assert.False(t, c.IncludeQKVBias)
	assert.False(t, c.Alibi)
	assert.True(t, c.RopeFullPrecision)

	// Grouped-query attention and padded embeddings.
	m = smallConfigMap(t)
	m["n_kv_heads"] = 2
	m["embedding_size"] = 512
	data, _ = json.Marshal(m)
	c, err = ParseConfig(data)
	require.NoError(t, err)
	assert.Equal(t, 64, c.KVDim())
	assert.Equal(t, 512, c.EmbeddingRows())
	assert.Equal(t, []int64{64, 128}, c.ExpectedTensors()[3].Shape) // k_proj
	assert.Equal(t, []int64{512, 128}, c.ExpectedTensors()[0].Shape)
}

func TestConfigBadFields(t *testing.T) {
	const del = "<delete>"
	cases := []struct {
		field string
		value any
		want  error
	}{
		{"d_model", del, ErrBadCheckpoint},
		{"n_heads", del, ErrBadCheckpoint},
		{"n_layers", del, ErrBadCheckpoint},
		{"vocab_size", del, ErrBadCheckpoint},
		{"max_sequence_length", del, ErrBadCheckpoint},
		{"rope_theta", del, ErrBadCheckpoint},
		{"rms_norm_eps", del, ErrBadCheckpoint},
		{"layer_norm_type", del, ErrBadCheckpoint},
		{"block_type", del, ErrBadCheckpoint},
		{"activation_type", del, ErrBadCheckpoint},
		{"rope", del, ErrBadCheckpoint},
		{"include_bias", del, ErrBadCheckpoint},
		{"weight_tying", del, ErrBadCheckpoint},
		{"d_model", nil, ErrBadCheckpoint},
		{"d_model", "128", ErrBadCheckpoint},
		{"d_model", 0, ErrBadCheckpoint},
		{"d_model", -128, ErrBadCheckpoint},
		{"d_model", 128.5, ErrBadCheckpoint},
		{"d_model", 1 << 40, ErrBadCheckpoint},
		{"n_layers", true, ErrBadCheckpoint},
		{"n_kv_heads", 0, ErrBadCheckpoint},
		{"n_kv_heads", 3, ErrBadCheckpoint}, // does not divide n_heads
		{"n_kv_heads", 8, ErrBadCheckpoint}, // more than n_heads
		{"n_heads", 3, ErrBadCheckpoint},    // does not divide d_model
		{"n_heads", 128, ErrUnsupported},    // head dim 1 is odd
		{"embedding_size", 100, ErrBadCheckpoint},
		{"mlp_hidden_size", -1, ErrBadCheckpoint},
		{"rope_theta", 0, ErrBadCheckpoint},
		{"rope_theta", "1e4", ErrBadCheckpoint},
		{"rms_norm_eps", -1e-5, ErrBadCheckpoint},
		{"rope", "yes", ErrBadCheckpoint},
		{"layer_norm_type", 1, ErrBadCheckpoint},
		{"mask_token_id", 384, ErrBadCheckpoint},
		{"mask_token_id", -2, ErrBadCheckpoint},
		{"eos_token_id", 1.5, ErrBadCheckpoint},
		{"architectures", "LLaDAModelLM", ErrBadCheckpoint},
		{"layer_norm_type", "default", ErrUnsupported},
		{"layer_norm_type", "low_precision_rms", ErrUnsupported},
		{"block_type", "sequential", ErrUnsupported},
		{"activation_type", "swiglu", ErrUnsupported},
		{"activation_type", "gelu", ErrUnsupported},
		{"rope", false, ErrUnsupported},
		{"include_bias", true, ErrUnsupported},
		{"include_qkv_bias", true, ErrUnsupported},
		{"weight_tying", true, ErrUnsupported},
		{"alibi", true, ErrUnsupported},
		{"input_emb_norm", true, ErrUnsupported},
		{"scale_logits", true, ErrUnsupported},
	}
	for _, c := range cases {
		t.Run(c.field, func(t *testing.T) {
			m := smallConfigMap(t)
			if c.value == del {
				delete(m, c.field)
			} else {
				m[c.field] = c.value
			}
			data, err := json.Marshal(m)
			require.NoError(t, err)
			cfg, err := ParseConfig(data)
			require.Error(t, err, "%s = %v", c.field, c.value)
			t.Log(err)
			assert.Nil(t, cfg)
			assert.ErrorIs(t, err, c.want)
			assert.ErrorContains(t, err, `"`+c.field+`"`)
			assert.ErrorContains(t, err, "config.json")
		})
	}

	t.Run("mlp missing", func(t *testing.T) {
		m := smallConfigMap(t)
		delete(m, "mlp_hidden_size")
		delete(m, "mlp_ratio")
		data, _ := json.Marshal(m)
		_, err := ParseConfig(data)
		assert.ErrorIs(t, err, ErrBadCheckpoint)
		assert.ErrorContains(t, err, "mlp_hidden_size")
		assert.ErrorContains(t, err, "mlp_ratio")
	})
	t.Run("odd head dim", func(t *testing.T) {
		m := smallConfigMap(t)
		m["d_model"] = 36 // 4 heads of 9
		m["n_heads"] = 4
		data, _ := json.Marshal(m)
		_, err := ParseConfig(data)
		assert.ErrorIs(t, err, ErrUnsupported)
		assert.ErrorContains(t, err, "odd")
	})
	for name, body := range map[string]string{
		"malformed":     `{"d_model": 128,`,
		"array":         `[1]`,
		"duplicate key": `{"d_model": 128, "d_model": 256}`,
		"trailing":      officialSmallConfig + `x`,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseConfig([]byte(body))
			assert.ErrorIs(t, err, ErrBadCheckpoint)
		})
	}
}

func TestConfigLoad(t *testing.T) {
	dir := t.TempDir()
	_, err := LoadConfig(dir)
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.ErrorContains(t, err, filepath.Join(dir, "config.json"))

	path := filepath.Join(dir, "config.json")
	require.NoError(t, os.WriteFile(path, []byte(`{"d_model": `), 0o644))
	_, err = LoadConfig(dir)
	assert.ErrorIs(t, err, ErrBadCheckpoint)
	assert.ErrorContains(t, err, path)

	require.NoError(t, os.WriteFile(path, []byte(officialSmallConfig), 0o644))
	c, err := LoadConfig(dir)
	require.NoError(t, err)
	assert.Equal(t, 128, c.DModel)

	m := smallConfigMap(t)
	m["alibi"] = true
	data, _ := json.Marshal(m)
	require.NoError(t, os.WriteFile(path, data, 0o644))
	_, err = LoadConfig(dir)
	assert.ErrorIs(t, err, ErrUnsupported)
	assert.ErrorContains(t, err, path)
}
