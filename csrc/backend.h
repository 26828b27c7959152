// backend.h - what every backend (CPU, CUDA, later NPU) implements below the
// C ABI. api.cpp validates arguments once, for all backends, then calls these.
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace dimoo {

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

class Ctx {
public:
    virtual ~Ctx() = default;
    // n forwards on distinct sequences, already validated by api.cpp
    // (ids and positions in range, sorted, cache state consistent);
    // `cancel` is polled between layers.
    virtual void forward(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel) = 0;
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

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string describe() const = 0;
    virtual void rmsnorm(int32_t dtype, const void *x, const void *w, void *out, int rows, int cols,
                         float eps) = 0;
    virtual std::unique_ptr<Model> create_model(const ModelShape &shape) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(int n_threads);
#ifdef DIMOO_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device);
int cuda_device_count(); // 0 when no driver or no GPU; never throws
#endif

} // namespace dimoo
