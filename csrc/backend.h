// backend.h - what every backend (CPU, CUDA, later NPU) implements below the
// C ABI. api.cpp validates arguments once, for all backends, then calls these.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace dimoo {

namespace vq {
class Model;
}

// Which tensor of the checkpoint a weight is.
enum class WeightKind {
    Embedding,  // model.transformer.wte.weight            (embedding_size, d_model)
    AttnNorm,   // blocks.{i}.attn_norm.weight             (d_model)
    QProj,      // blocks.{i}.q_proj.weight                (d_model, d_model)
    KProj,      // blocks.{i}.k_proj.weight                (kv_dim, d_model)
    VProj,      // blocks.{i}.v_proj.weight                (kv_dim, d_model)
    AttnOut,    // blocks.{i}.attn_out.weight              (d_model, d_model)
    FFNorm,     // blocks.{i}.ff_norm.weight               (d_model)
    FFProj,     // blocks.{i}.ff_proj.weight (through silu) (mlp, d_model)
    UpProj,     // blocks.{i}.up_proj.weight (linear gate) (mlp, d_model)
    FFOut,      // blocks.{i}.ff_out.weight                (d_model, mlp)
    FinalNorm,  // model.transformer.ln_f.weight           (d_model)
    Head,       // model.transformer.ff_out.weight         (embedding_size, d_model)
};
constexpr int kLayerWeightKinds = 9; // AttnNorm .. FFOut

struct WeightId {
    WeightKind kind;
    int layer; // -1 for model-level tensors
};

// The config plus the sizes derived from it.
struct ModelShape {
    dimoo_model_config cfg;
    int head_dim;
    int kv_dim;

    explicit ModelShape(const dimoo_model_config &c);
    // Parses a Hugging Face tensor name; throws BAD_WEIGHTS for unknown names.
    WeightId parse_name(const std::string &name) const;
    std::vector<int64_t> expected_shape(WeightId id) const;
    std::string name_of(WeightId id) const;
    // Slot index in [0, n_weights()).
    int slot(WeightId id) const;
    int n_weights() const { return 3 + kLayerWeightKinds * cfg.n_layers; }
};

// Kept logits (ABI 4). A context's backend stores, per seq, keep_rows x
// keep_cols floats of kept rows and max_tokens row maxima (one per slot), on
// its device. All kept rows of a seq have one width w (their column range);
// slot j's row starts at float j * w of the seq's storage. The backend
// knows nothing of positions: api.cpp maps positions to slots (fewer than
// min(max_tokens, keep_rows * keep_cols / w)) and hands the backend slot
// indices, so every backend keeps the same state the same way.
struct ImageStepCall {
    const dimoo_image_step_args *a; // validated: seqs, masked, n_select, outputs
    int n_codes;                    // kept column range width of every branch
    const int32_t *slots[DIMOO_MAX_BRANCHES]; // [n_pos] slot of masked[i] in branch b's seq
    // [n_pos]: nonzero where the guided row's top log-probability stored by
    // an earlier step for this position is still current (no branch's row
    // rewritten since). A backend may ignore it; the decisions are the same.
    const uint8_t *top_valid;
    // [n_pos] where that value lives, seqs[0] * max_tokens + offsets[0] +
    // masked[i]: the backend keeps n_seqs * max_tokens doubles for it.
    const int32_t *top_index;
};

struct TextStepCall {
    const dimoo_text_step_args *a; // validated
    int n_cols, vocab_begin;       // the kept range of both seqs
    const int32_t *slots;          // [n_pos] slot of positions[i] in seq
    const int32_t *uncond_slots;   // [n_pos] in uncond_seq, or null without guidance
};

class Ctx {
public:
    virtual ~Ctx() = default;
    // n forwards on distinct sequences, already validated by api.cpp
    // (ids and positions in range, sorted, cache state consistent);
    // `cancel` is polled between layers. keep_slots[i] (for args[i].keep):
    // the slot of each output row (row j of the output goes to slot
    // keep_slots[i][j]), null for args without keep.
    virtual void forward(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel,
                         const int32_t *const *keep_slots) = 0;
    virtual void image_step(const ImageStepCall &c) = 0;
    virtual void text_step(const TextStepCall &c) = 0;
    // allowed[v] for v < n (n <= embedding_size); replaces the last mask.
    virtual void set_token_mask(const uint8_t *allowed, int n) = 0;
    // ML-Cache selection over the row maxima of slots[0..n) (positions 0..n-1
    // in order): writes the positions <= the q-quantile to out, returns
    // their count.
    virtual int cache_select(int seq, const int32_t *slots, int n, double q, int32_t *out) = 0;
    // Tests and replays: host rows (n rows of n_cols floats) into the slots,
    // as a forward with keep writes them (row maxima computed here).
    virtual void load_kept(int seq, const int32_t *slots, int n, int n_cols, const float *rows) = 0;
    virtual int64_t bytes() const = 0;
};

class Model {
public:
    virtual ~Model() = default;
    virtual void set_weight(WeightId id, int32_t dtype, const void *data, size_t nbytes) = 0;
    virtual void finalize() = 0;
    virtual int64_t weight_bytes() const = 0;
    virtual std::unique_ptr<Ctx> create_ctx(const dimoo_ctx_params &p) = 0;
};

// The VQ-VAE's decoder on a backend's device (the encoder stays on the
// host CPU). A backend that has one returns it for a finalized vq::Model;
// it copies what it needs (the decoder's weights and the codebook) at
// creation and never reads the vq::Model again. Arguments are validated by
// vq_api.cpp (grid sides, codes in range, non-null buffers); both calls
// write the whole of out (h*f x w*f x out_channels floats, host memory) or
// throw, and poll `cancel` between blocks (CANCELLED).
class VqDevice {
public:
    virtual ~VqDevice() = default;
    virtual void decode(const int32_t *codes, int h, int w, float *out, const std::atomic<bool> &cancel) = 0;
    virtual void decode_latent(const float *z, int h, int w, float *out, const std::atomic<bool> &cancel) = 0;
    // The encoder (pixels H*W*in_channels -> latent (H/f)*(W/f)*vq_embed_dim),
    // and with the nearest codebook row of each cell (the CPU's exact search).
    virtual void encode_latent(const float *pixels, int H, int W, float *latent,
                               const std::atomic<bool> &cancel) = 0;
    virtual void encode(const float *pixels, int H, int W, int32_t *codes, const std::atomic<bool> &cancel) = 0;
    virtual int64_t device_bytes() const = 0; // the device copy of the weights
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string describe() const = 0;
    virtual std::unique_ptr<Model> create_model(const ModelShape &shape) = 0;
    // The VQ decoder on this backend's device, or null where the host CPU
    // decodes (the CPU backend). m is finalized.
    virtual std::unique_ptr<VqDevice> create_vq(const vq::Model &m) {
        (void)m;
        return nullptr;
    }
};

std::unique_ptr<Backend> make_cpu_backend(int n_threads);
#ifdef DIMOO_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device);
int cuda_device_count(); // 0 when no driver or no GPU; never throws
#endif

// What a model and a context would report as their bytes
// (dimoo_model_weight_bytes, dimoo_ctx_bytes), without creating them or
// touching a device (dimoo_estimate). p: validated and normalized, or null.
struct Estimate {
    int64_t model = 0, ctx = 0;
};
Estimate cpu_estimate(const ModelShape &s, int32_t dtype, int n_threads, const dimoo_ctx_params *p);
// Throws UNSUPPORTED for a precision the CUDA backend does not compute in.
void cuda_check_precision(const ModelShape &s);
#ifdef DIMOO_WITH_CUDA
Estimate cuda_estimate(const ModelShape &s, const dimoo_ctx_params *p);
#endif

} // namespace dimoo
