// model_shape.cpp - checkpoint tensor names and the shapes the config implies.
#include <cstdlib>

#include "backend.h"

namespace dimoo {

namespace {
const char *kPrefix = "model.transformer.";

struct LayerName {
    const char *suffix;
    WeightKind kind;
};
const LayerName kLayerNames[kLayerWeightKinds] = {
    {"attn_norm.weight", WeightKind::AttnNorm}, {"q_proj.weight", WeightKind::QProj},
    {"k_proj.weight", WeightKind::KProj},       {"v_proj.weight", WeightKind::VProj},
    {"attn_out.weight", WeightKind::AttnOut},   {"ff_norm.weight", WeightKind::FFNorm},
    {"ff_proj.weight", WeightKind::FFProj},     {"up_proj.weight", WeightKind::UpProj},
    {"ff_out.weight", WeightKind::FFOut},
};
} // namespace

ModelShape::ModelShape(const dimoo_model_config &c) : cfg(c), head_dim(0), kv_dim(0) {
    auto positive = [](int32_t v, const char *name) {
        if (v <= 0) fail(DIMOO_ERR_INVALID_ARGUMENT, std::string("config: ") + name + " must be positive, got " + std::to_string(v));
    };
    positive(c.d_model, "d_model");
    positive(c.n_layers, "n_layers");
    positive(c.n_heads, "n_heads");
    positive(c.n_kv_heads, "n_kv_heads");
    positive(c.mlp_hidden_size, "mlp_hidden_size");
    positive(c.vocab_size, "vocab_size");
    positive(c.embedding_size, "embedding_size");
    positive(c.max_sequence_length, "max_sequence_length");
    DIMOO_CHECK_ARG(c.embedding_size >= c.vocab_size, "config: embedding_size " + std::to_string(c.embedding_size) +
                                                          " is smaller than vocab_size " + std::to_string(c.vocab_size));
    DIMOO_CHECK_ARG(c.d_model % c.n_heads == 0, "config: d_model must be a multiple of n_heads");
    DIMOO_CHECK_ARG(c.n_heads % c.n_kv_heads == 0, "config: n_heads must be a multiple of n_kv_heads");
    head_dim = c.d_model / c.n_heads;
    DIMOO_CHECK_ARG(head_dim % 2 == 0, "config: head dim must be even for RoPE");
    DIMOO_CHECK_ARG(c.rope_theta > 0, "config: rope_theta must be positive");
    DIMOO_CHECK_ARG(c.rms_norm_eps > 0, "config: rms_norm_eps must be positive");
    DIMOO_CHECK_ARG(c.precision == DIMOO_PRECISION_AUTO || c.precision == DIMOO_PRECISION_BF16 ||
                        c.precision == DIMOO_PRECISION_F32,
                    "config: unknown precision " + std::to_string(c.precision) + " (0 auto, 1 bf16, 2 fp32)");
    kv_dim = head_dim * c.n_kv_heads;
}

void cuda_check_precision(const ModelShape &s) {
    if (s.cfg.precision == DIMOO_PRECISION_F32)
        fail(DIMOO_ERR_UNSUPPORTED, "the CUDA backend computes in bf16: precision fp32 is for the CPU backend");
}

WeightId ModelShape::parse_name(const std::string &name) const {
    auto bad = [&]() -> WeightId { fail(DIMOO_ERR_BAD_WEIGHTS, "unknown tensor name \"" + name + "\""); };
    if (name.compare(0, std::strlen(kPrefix), kPrefix) != 0) return bad();
    std::string rest = name.substr(std::strlen(kPrefix));
    if (rest == "wte.weight") return {WeightKind::Embedding, -1};
    if (rest == "ln_f.weight") return {WeightKind::FinalNorm, -1};
    if (rest == "ff_out.weight") return {WeightKind::Head, -1};
    const std::string blocks = "blocks.";
    if (rest.compare(0, blocks.size(), blocks) != 0) return bad();
    rest = rest.substr(blocks.size());
    size_t dot = rest.find('.');
    if (dot == std::string::npos || dot == 0 || dot > 6) return bad();
    int layer = 0;
    for (size_t i = 0; i < dot; i++) {
        if (rest[i] < '0' || rest[i] > '9') return bad();
        layer = layer * 10 + (rest[i] - '0');
    }
    if (layer >= cfg.n_layers) fail(DIMOO_ERR_BAD_WEIGHTS, "tensor \"" + name + "\" names layer " + std::to_string(layer) + " but the config has " + std::to_string(cfg.n_layers) + " layers");
    std::string suffix = rest.substr(dot + 1);
    for (const auto &ln : kLayerNames)
        if (suffix == ln.suffix) return {ln.kind, layer};
    return bad();
}

std::vector<int64_t> ModelShape::expected_shape(WeightId id) const {
    const int64_t d = cfg.d_model, mlp = cfg.mlp_hidden_size, emb = cfg.embedding_size;
    switch (id.kind) {
    case WeightKind::Embedding:
    case WeightKind::Head: return {emb, d};
    case WeightKind::AttnNorm:
    case WeightKind::FFNorm:
    case WeightKind::FinalNorm: return {d};
    case WeightKind::QProj:
    case WeightKind::AttnOut: return {d, d};
    case WeightKind::KProj:
    case WeightKind::VProj: return {int64_t(kv_dim), d};
    case WeightKind::FFProj:
    case WeightKind::UpProj: return {mlp, d};
    case WeightKind::FFOut: return {d, mlp};
    }
    return {};
}

std::string ModelShape::name_of(WeightId id) const {
    switch (id.kind) {
    case WeightKind::Embedding: return std::string(kPrefix) + "wte.weight";
    case WeightKind::FinalNorm: return std::string(kPrefix) + "ln_f.weight";
    case WeightKind::Head: return std::string(kPrefix) + "ff_out.weight";
    default: break;
    }
    for (const auto &ln : kLayerNames)
        if (ln.kind == id.kind) return std::string(kPrefix) + "blocks." + std::to_string(id.layer) + "." + ln.suffix;
    return "?";
}

int ModelShape::slot(WeightId id) const {
    switch (id.kind) {
    case WeightKind::Embedding: return 0;
    case WeightKind::FinalNorm: return 1;
    case WeightKind::Head: return 2;
    default: break;
    }
    int k = int(id.kind) - int(WeightKind::AttnNorm);
    return 3 + id.layer * kLayerWeightKinds + k;
}

} // namespace dimoo
