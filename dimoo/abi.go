package dimoo

import (
	"fmt"
	"reflect"
	"strings"
	"unsafe"
)

// Go mirrors of the structs in include/dimoo.h. purego has no C compiler to
// check them, so CheckLayouts compares every size and field offset with what
// the library reports; a mismatch is an error at load, never silent
// corruption. Field order and types follow the header exactly; the `c` tag
// gives the C field name.

// dimoo_model_config
type cModelConfig struct {
	DModel            int32   `c:"d_model"`
	NLayers           int32   `c:"n_layers"`
	NHeads            int32   `c:"n_heads"`
	NKVHeads          int32   `c:"n_kv_heads"`
	MLPHiddenSize     int32   `c:"mlp_hidden_size"`
	VocabSize         int32   `c:"vocab_size"`
	EmbeddingSize     int32   `c:"embedding_size"`
	MaxSequenceLength int32   `c:"max_sequence_length"`
	RopeTheta         float32 `c:"rope_theta"`
	RMSNormEps        float32 `c:"rms_norm_eps"`
	Precision         int32   `c:"precision"`
}

// dimoo_ctx_params
type cCtxParams struct {
	NSeqs     int32 `c:"n_seqs"`
	MaxTokens int32 `c:"max_tokens"`
	Flags     int32 `c:"flags"`
	KeepRows  int32 `c:"keep_rows"`
	KeepCols  int32 `c:"keep_cols"`
}

// dimoo_forward_args
type cForwardArgs struct {
	Seq          int32          `c:"seq"`
	NTokens      int32          `c:"n_tokens"`
	Tokens       unsafe.Pointer `c:"tokens"`
	CacheMode    int32          `c:"cache_mode"`
	NCompute     int32          `c:"n_compute"`
	Compute      unsafe.Pointer `c:"compute"`
	NOut         int32          `c:"n_out"`
	OutPositions unsafe.Pointer `c:"out_positions"`
	VocabBegin   int32          `c:"vocab_begin"`
	VocabEnd     int32          `c:"vocab_end"`
	Logits       unsafe.Pointer `c:"logits"`
	RowMax       unsafe.Pointer `c:"row_max"`
	Keep         int32          `c:"keep"`
}

// dimoo_image_step_args
type cImageStepArgs struct {
	NBranches   int32          `c:"n_branches"`
	Seqs        [4]int32       `c:"seqs"`
	Offsets     [4]int32       `c:"offsets"`
	Weights     [4]float32     `c:"weights"`
	NPos        int32          `c:"n_pos"`
	Masked      unsafe.Pointer `c:"masked"`
	Step        int32          `c:"step"`
	Seed        uint64         `c:"seed"`
	Temperature float32        `c:"temperature"`
	NSelect     int32          `c:"n_select"`
	OutSelected unsafe.Pointer `c:"out_selected"`
	OutCodes    unsafe.Pointer `c:"out_codes"`
	OutConf     unsafe.Pointer `c:"out_conf"`
}

// dimoo_text_step_args
type cTextStepArgs struct {
	Seq          int32          `c:"seq"`
	UncondSeq    int32          `c:"uncond_seq"`
	CFGScale     float64        `c:"cfg_scale"`
	Temperature  float64        `c:"temperature"`
	Step         int32          `c:"step"`
	Seed         uint64         `c:"seed"`
	UseMask      int32          `c:"use_mask"`
	NPos         int32          `c:"n_pos"`
	Positions    unsafe.Pointer `c:"positions"`
	NSelect      int32          `c:"n_select"`
	OutPositions unsafe.Pointer `c:"out_positions"`
	OutTokens    unsafe.Pointer `c:"out_tokens"`
	OutAll       unsafe.Pointer `c:"out_all_tokens"`
}

// dimoo_sample_args
type cSampleArgs struct {
	NPos        int32             `c:"n_pos"`
	NBranches   int32             `c:"n_branches"`
	NCodes      int32             `c:"n_codes"`
	Step        int32             `c:"step"`
	Seed        uint64            `c:"seed"`
	Temperature float32           `c:"temperature"`
	Weights     [4]float32        `c:"weights"`
	Logits      [4]unsafe.Pointer `c:"logits"`
	Rows        [4]unsafe.Pointer `c:"rows"`
	NRows       [4]int64          `c:"n_rows"`
	RNGPos      unsafe.Pointer    `c:"rng_pos"`
	OutCodes    unsafe.Pointer    `c:"out_codes"`
	OutConf     unsafe.Pointer    `c:"out_conf"`
	OutSelected unsafe.Pointer    `c:"out_selected"`
	NSelect     int32             `c:"n_select"`
	TopLogp     unsafe.Pointer    `c:"top_logp"`
	TopValid    unsafe.Pointer    `c:"top_logp_valid"`
}

// maxBranches is DIMOO_MAX_BRANCHES: guidance branches one sampling call takes.
const maxBranches = 4

// dimoo_vq_config
type cVQConfig struct {
	InChannels           int32    `c:"in_channels"`
	OutChannels          int32    `c:"out_channels"`
	LatentChannels       int32    `c:"latent_channels"`
	NumVQEmbeddings      int32    `c:"num_vq_embeddings"`
	VQEmbedDim           int32    `c:"vq_embed_dim"`
	NormNumGroups        int32    `c:"norm_num_groups"`
	LayersPerBlock       int32    `c:"layers_per_block"`
	NLevels              int32    `c:"n_levels"`
	BlockOutChannels     [8]int32 `c:"block_out_channels"`
	MidBlockAddAttention int32    `c:"mid_block_add_attention"`
	NormType             int32    `c:"norm_type"`
}

// mirroredStructs maps each C struct name to a zero value of its Go mirror.
var mirroredStructs = map[string]any{
	"dimoo_model_config":    cModelConfig{},
	"dimoo_ctx_params":      cCtxParams{},
	"dimoo_forward_args":    cForwardArgs{},
	"dimoo_vq_config":       cVQConfig{},
	"dimoo_sample_args":     cSampleArgs{},
	"dimoo_image_step_args": cImageStepArgs{},
	"dimoo_text_step_args":  cTextStepArgs{},
}

// CheckLayouts compares every mirrored struct's size and field offsets with
// the library's. It runs at load; tests call it too.
func (l *Library) CheckLayouts() error {
	var bad []string
	for name, v := range mirroredStructs {
		t := reflect.TypeOf(v)
		if got, want := int64(t.Size()), l.structSize(name); got != want {
			bad = append(bad, fmt.Sprintf("%s: Go size %d, C size %d", name, got, want))
		}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			cname := f.Tag.Get("c")
			if got, want := int64(f.Offset), l.structOffset(name, cname); got != want {
				bad = append(bad, fmt.Sprintf("%s.%s: Go offset %d, C offset %d", name, cname, got, want))
			}
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%w: %s: struct layouts differ from this Go package: %s", ErrLibrary, l.Path,
			strings.Join(bad, "; "))
	}
	return nil
}
