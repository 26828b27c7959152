// api.cpp - the extern "C" surface. Every function here catches everything:
// dimoo::Error becomes its status, std::bad_alloc becomes OUT_OF_MEMORY, and
// anything else INTERNAL, each with a message stored on the handle.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu/sampler.h"
#include "guard.h"
#include "dimoo.h"

#define DIMOO_VERSION_STRING "0.1.0"

struct dimoo_runtime {
    int32_t backend = 0;
    int32_t n_threads = 0; // as created (0: every core); the VQ-VAE reads it
    std::unique_ptr<dimoo::Backend> impl;
    std::string err;
};

struct dimoo_model {
    dimoo_runtime *rt = nullptr;
    std::unique_ptr<dimoo::ModelShape> shape;
    std::unique_ptr<dimoo::Model> impl;
    std::vector<char> present; // one flag per weight slot
    bool finalized = false;
    std::string err;
};

// Which positions of a seq have kept logits, in which slot, over which
// columns, and since when (stamps from the context's clock: a row rewritten
// gets a new one). The backend only sees slots.
struct KeptSeq {
    int32_t vb = 0, ve = 0;          // column range of the kept rows
    int32_t used = 0;                // slots in use: 0 .. used-1
    std::vector<int32_t> slot_of;    // [max_tokens] slot, or -1
    std::vector<uint64_t> stamp;     // [max_tokens] clock at the row's write
    void forget() {
        std::fill(slot_of.begin(), slot_of.end(), -1);
        used = 0;
    }
};

// What an image step's top log-probabilities were computed from.
struct TopSig {
    int32_t n_branches = 0, seqs[DIMOO_MAX_BRANCHES] = {}, offsets[DIMOO_MAX_BRANCHES] = {}, vb = 0, ve = 0;
    float weights[DIMOO_MAX_BRANCHES] = {};
    bool operator==(const TopSig &o) const {
        if (n_branches != o.n_branches || vb != o.vb || ve != o.ve) return false;
        for (int b = 0; b < n_branches; b++)
            if (seqs[b] != o.seqs[b] || offsets[b] != o.offsets[b] || weights[b] != o.weights[b]) return false;
        return true;
    }
};

struct dimoo_ctx {
    dimoo_model *model = nullptr;
    dimoo_ctx_params params{};
    std::unique_ptr<dimoo::Ctx> impl;
    std::vector<int32_t> cached_len; // per seq: n_tokens of the last STORE, 0 = no cache
    std::vector<KeptSeq> kept;       // per seq (keep_cols > 0)
    uint64_t clock = 0;
    std::vector<uint64_t> top_stamp; // [n_seqs * max_tokens]: stamp the top value was computed at, 0 = none
    std::vector<TopSig> top_sig;     // per seq (as branch 0)
    int32_t mask_len = 0;            // dimoo_ctx_set_token_mask's n
    std::atomic<bool> cancel{false};
    std::string err;
};

namespace {

using dimoo::copy_err;
using dimoo::guard;

// Validates one forward's arguments against the model and the context.
void check_forward(const dimoo_ctx *c, const dimoo_forward_args &a, std::vector<char> &seen) {
    const auto &cfg = c->model->shape->cfg;
    const std::string who = "forward (seq " + std::to_string(a.seq) + "): ";
    DIMOO_CHECK_ARG(a.seq >= 0 && a.seq < c->params.n_seqs,
                    who + "seq out of range [0, " + std::to_string(c->params.n_seqs) + ")");
    DIMOO_CHECK_ARG(!seen[a.seq], who + "the same seq appears twice in one call");
    seen[a.seq] = 1;
    DIMOO_CHECK_ARG(a.n_tokens > 0, who + "empty sequence");
    DIMOO_CHECK_ARG(a.n_tokens <= c->params.max_tokens,
                    who + std::to_string(a.n_tokens) + " tokens exceed the context's max_tokens " +
                        std::to_string(c->params.max_tokens));
    DIMOO_CHECK_ARG(a.tokens != nullptr, who + "tokens is NULL");
    for (int32_t i = 0; i < a.n_tokens; i++) {
        int32_t t = a.tokens[i];
        if (t < 0 || t >= cfg.vocab_size)
            dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, who + "token id " + std::to_string(t) + " at position " +
                                                        std::to_string(i) + " is outside the vocabulary [0, " +
                                                        std::to_string(cfg.vocab_size) + ")");
    }
    switch (a.cache_mode) {
    case DIMOO_CACHE_NONE:
    case DIMOO_CACHE_STORE:
        DIMOO_CHECK_ARG(a.n_compute == 0 && a.compute == nullptr, who + "compute positions need cache_mode USE");
        break;
    case DIMOO_CACHE_USE:
        DIMOO_CHECK_ARG(c->cached_len[a.seq] == a.n_tokens,
                        who + "cache_mode USE needs an earlier STORE of " + std::to_string(a.n_tokens) +
                            " tokens on this seq");
        DIMOO_CHECK_ARG(a.n_compute > 0 && a.compute != nullptr, who + "cache_mode USE needs compute positions");
        for (int32_t i = 0; i < a.n_compute; i++) {
            int32_t p = a.compute[i];
            DIMOO_CHECK_ARG(p >= 0 && p < a.n_tokens, who + "compute position " + std::to_string(p) + " out of range");
            DIMOO_CHECK_ARG(i == 0 || p > a.compute[i - 1], who + "compute positions must be strictly increasing");
        }
        break;
    default: dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, who + "unknown cache_mode " + std::to_string(a.cache_mode));
    }
    if ((a.cache_mode == DIMOO_CACHE_STORE || a.cache_mode == DIMOO_CACHE_USE) && !(c->params.flags & DIMOO_CTX_KV_CACHE))
        dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, who + "cache modes need a context created with DIMOO_CTX_KV_CACHE");
    DIMOO_CHECK_ARG(a.keep == 0 || a.keep == 1, who + "keep must be 0 or 1");
    if (a.keep)
        DIMOO_CHECK_ARG(c->params.keep_cols > 0, who + "keep needs a context created with keep_cols > 0");
    if (!a.logits && !a.keep) {
        DIMOO_CHECK_ARG(a.n_out == 0 && a.out_positions == nullptr, who + "output positions given but logits is NULL");
        DIMOO_CHECK_ARG(a.row_max == nullptr, who + "row_max given but logits is NULL");
        return;
    }
    int32_t vend = a.vocab_end == 0 ? cfg.embedding_size : a.vocab_end;
    DIMOO_CHECK_ARG(a.vocab_begin >= 0 && a.vocab_begin < vend && vend <= cfg.embedding_size,
                    who + "vocab range [" + std::to_string(a.vocab_begin) + ", " + std::to_string(vend) +
                        ") is not inside [0, " + std::to_string(cfg.embedding_size) + ")");
    if (a.keep)
        DIMOO_CHECK_ARG(vend - a.vocab_begin <= c->params.keep_cols,
                        who + "kept logits of " + std::to_string(vend - a.vocab_begin) + " columns exceed keep_cols " +
                            std::to_string(c->params.keep_cols));
    if (a.out_positions == nullptr) {
        DIMOO_CHECK_ARG(a.n_out == 0, who + "n_out > 0 needs out_positions");
        DIMOO_CHECK_ARG(a.cache_mode != DIMOO_CACHE_USE || a.n_compute == a.n_tokens,
                        who + "under cache_mode USE, logits of all positions need every position computed");
        return;
    }
    DIMOO_CHECK_ARG(a.n_out > 0, who + "out_positions given with n_out <= 0");
    for (int32_t i = 0; i < a.n_out; i++) {
        int32_t p = a.out_positions[i];
        DIMOO_CHECK_ARG(p >= 0 && p < a.n_tokens, who + "output position " + std::to_string(p) + " out of range [0, " +
                                                      std::to_string(a.n_tokens) + ")");
        if (a.cache_mode == DIMOO_CACHE_USE)
            DIMOO_CHECK_ARG(std::binary_search(a.compute, a.compute + a.n_compute, p),
                            who + "output position " + std::to_string(p) + " is not among the compute positions");
    }
}

// The kept state of a seq after a forward with keep, and the slot of each
// of its output rows.
struct KeptPlan {
    KeptSeq next;
    std::vector<int32_t> positions; // output rows' positions
    std::vector<int32_t> slots;     // their slots
};

KeptPlan plan_keep(const dimoo_ctx *c, const dimoo_forward_args &a) {
    const auto &cfg = c->model->shape->cfg;
    KeptPlan p;
    p.next = c->kept[a.seq];
    const int32_t vend = a.vocab_end == 0 ? cfg.embedding_size : a.vocab_end;
    if (a.cache_mode != DIMOO_CACHE_USE || p.next.vb != a.vocab_begin || p.next.ve != vend) p.next.forget();
    p.next.vb = a.vocab_begin;
    p.next.ve = vend;
    if (a.out_positions) p.positions.assign(a.out_positions, a.out_positions + a.n_out);
    else if (a.cache_mode == DIMOO_CACHE_USE) p.positions.assign(a.compute, a.compute + a.n_compute);
    else {
        p.positions.resize(a.n_tokens);
        for (int32_t i = 0; i < a.n_tokens; i++) p.positions[i] = i;
    }
    const int64_t cap = std::min<int64_t>(c->params.max_tokens, int64_t(c->params.keep_rows) * c->params.keep_cols /
                                                                     (vend - a.vocab_begin));
    p.slots.resize(p.positions.size());
    for (size_t i = 0; i < p.positions.size(); i++) {
        int32_t &s = p.next.slot_of[p.positions[i]];
        if (s < 0) {
            if (p.next.used >= cap)
                dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT,
                            "forward (seq " + std::to_string(a.seq) + "): more than " + std::to_string(cap) +
                                " kept rows of " + std::to_string(vend - a.vocab_begin) +
                                " columns (the context's keep_rows x keep_cols hold that many)");
            s = p.next.used++;
        }
        p.slots[i] = s;
    }
    return p;
}

// A context's parameters checked against the model, keep_rows normalized.
dimoo_ctx_params checked_params(const dimoo_model_config &cfg, const dimoo_ctx_params &p) {
    DIMOO_CHECK_ARG(p.n_seqs > 0 && p.n_seqs <= 64, "n_seqs must be in [1, 64]");
    DIMOO_CHECK_ARG(p.max_tokens > 0, "max_tokens must be positive");
    DIMOO_CHECK_ARG(p.max_tokens <= cfg.max_sequence_length, "max_tokens " + std::to_string(p.max_tokens) +
                                                                 " exceeds the model's max_sequence_length " +
                                                                 std::to_string(cfg.max_sequence_length));
    DIMOO_CHECK_ARG((p.flags & ~DIMOO_CTX_KV_CACHE) == 0, "unknown context flags");
    DIMOO_CHECK_ARG(p.keep_cols >= 0 && p.keep_cols <= cfg.embedding_size,
                    "keep_cols must be in [0, embedding_size " + std::to_string(cfg.embedding_size) + "]");
    DIMOO_CHECK_ARG(p.keep_rows >= 0 && p.keep_rows <= p.max_tokens, "keep_rows must be in [0, max_tokens]");
    dimoo_ctx_params q = p;
    if (q.keep_cols == 0) q.keep_rows = 0;
    else if (q.keep_rows == 0) q.keep_rows = q.max_tokens;
    return q;
}

struct LayoutField {
    const char *strct;
    const char *field;
    int64_t offset;
};

#define DIMOO_FIELD(S, F) {#S, #F, int64_t(offsetof(S, F))}
const LayoutField kLayout[] = {
    DIMOO_FIELD(dimoo_sample_args, n_pos),
    DIMOO_FIELD(dimoo_sample_args, n_branches),
    DIMOO_FIELD(dimoo_sample_args, n_codes),
    DIMOO_FIELD(dimoo_sample_args, step),
    DIMOO_FIELD(dimoo_sample_args, seed),
    DIMOO_FIELD(dimoo_sample_args, temperature),
    DIMOO_FIELD(dimoo_sample_args, weights),
    DIMOO_FIELD(dimoo_sample_args, logits),
    DIMOO_FIELD(dimoo_sample_args, rows),
    DIMOO_FIELD(dimoo_sample_args, n_rows),
    DIMOO_FIELD(dimoo_sample_args, rng_pos),
    DIMOO_FIELD(dimoo_sample_args, out_codes),
    DIMOO_FIELD(dimoo_sample_args, out_conf),
    DIMOO_FIELD(dimoo_sample_args, out_selected),
    DIMOO_FIELD(dimoo_sample_args, n_select),
    DIMOO_FIELD(dimoo_sample_args, top_logp),
    DIMOO_FIELD(dimoo_sample_args, top_logp_valid),
    DIMOO_FIELD(dimoo_model_config, d_model),
    DIMOO_FIELD(dimoo_model_config, n_layers),
    DIMOO_FIELD(dimoo_model_config, n_heads),
    DIMOO_FIELD(dimoo_model_config, n_kv_heads),
    DIMOO_FIELD(dimoo_model_config, mlp_hidden_size),
    DIMOO_FIELD(dimoo_model_config, vocab_size),
    DIMOO_FIELD(dimoo_model_config, embedding_size),
    DIMOO_FIELD(dimoo_model_config, max_sequence_length),
    DIMOO_FIELD(dimoo_model_config, rope_theta),
    DIMOO_FIELD(dimoo_model_config, rms_norm_eps),
    DIMOO_FIELD(dimoo_model_config, precision),
    DIMOO_FIELD(dimoo_ctx_params, n_seqs),
    DIMOO_FIELD(dimoo_ctx_params, max_tokens),
    DIMOO_FIELD(dimoo_ctx_params, flags),
    DIMOO_FIELD(dimoo_ctx_params, keep_rows),
    DIMOO_FIELD(dimoo_ctx_params, keep_cols),
    DIMOO_FIELD(dimoo_forward_args, seq),
    DIMOO_FIELD(dimoo_forward_args, n_tokens),
    DIMOO_FIELD(dimoo_forward_args, tokens),
    DIMOO_FIELD(dimoo_forward_args, cache_mode),
    DIMOO_FIELD(dimoo_forward_args, n_compute),
    DIMOO_FIELD(dimoo_forward_args, compute),
    DIMOO_FIELD(dimoo_forward_args, n_out),
    DIMOO_FIELD(dimoo_forward_args, out_positions),
    DIMOO_FIELD(dimoo_forward_args, row_max),
    DIMOO_FIELD(dimoo_forward_args, vocab_begin),
    DIMOO_FIELD(dimoo_forward_args, vocab_end),
    DIMOO_FIELD(dimoo_forward_args, logits),
    DIMOO_FIELD(dimoo_forward_args, keep),
    DIMOO_FIELD(dimoo_image_step_args, n_branches),
    DIMOO_FIELD(dimoo_image_step_args, seqs),
    DIMOO_FIELD(dimoo_image_step_args, offsets),
    DIMOO_FIELD(dimoo_image_step_args, weights),
    DIMOO_FIELD(dimoo_image_step_args, n_pos),
    DIMOO_FIELD(dimoo_image_step_args, masked),
    DIMOO_FIELD(dimoo_image_step_args, step),
    DIMOO_FIELD(dimoo_image_step_args, seed),
    DIMOO_FIELD(dimoo_image_step_args, temperature),
    DIMOO_FIELD(dimoo_image_step_args, n_select),
    DIMOO_FIELD(dimoo_image_step_args, out_selected),
    DIMOO_FIELD(dimoo_image_step_args, out_codes),
    DIMOO_FIELD(dimoo_image_step_args, out_conf),
    DIMOO_FIELD(dimoo_text_step_args, seq),
    DIMOO_FIELD(dimoo_text_step_args, uncond_seq),
    DIMOO_FIELD(dimoo_text_step_args, cfg_scale),
    DIMOO_FIELD(dimoo_text_step_args, temperature),
    DIMOO_FIELD(dimoo_text_step_args, step),
    DIMOO_FIELD(dimoo_text_step_args, seed),
    DIMOO_FIELD(dimoo_text_step_args, use_mask),
    DIMOO_FIELD(dimoo_text_step_args, n_pos),
    DIMOO_FIELD(dimoo_text_step_args, positions),
    DIMOO_FIELD(dimoo_text_step_args, n_select),
    DIMOO_FIELD(dimoo_text_step_args, out_positions),
    DIMOO_FIELD(dimoo_text_step_args, out_tokens),
    DIMOO_FIELD(dimoo_text_step_args, out_all_tokens),
    // VQ-VAE
    DIMOO_FIELD(dimoo_vq_config, in_channels),
    DIMOO_FIELD(dimoo_vq_config, out_channels),
    DIMOO_FIELD(dimoo_vq_config, latent_channels),
    DIMOO_FIELD(dimoo_vq_config, num_vq_embeddings),
    DIMOO_FIELD(dimoo_vq_config, vq_embed_dim),
    DIMOO_FIELD(dimoo_vq_config, norm_num_groups),
    DIMOO_FIELD(dimoo_vq_config, layers_per_block),
    DIMOO_FIELD(dimoo_vq_config, n_levels),
    DIMOO_FIELD(dimoo_vq_config, block_out_channels),
    DIMOO_FIELD(dimoo_vq_config, mid_block_add_attention),
    DIMOO_FIELD(dimoo_vq_config, norm_type),
};
#undef DIMOO_FIELD

} // namespace

extern "C" {

int32_t dimoo_abi_version(void) { return DIMOO_ABI_VERSION; }

const char *dimoo_version(void) {
#ifdef DIMOO_WITH_CUDA
    return DIMOO_VERSION_STRING " (cpu, cuda)";
#else
    return DIMOO_VERSION_STRING " (cpu)";
#endif
}

const char *dimoo_status_string(int32_t s) {
    switch (s) {
    case DIMOO_OK: return "ok";
    case DIMOO_ERR_INVALID_ARGUMENT: return "invalid argument";
    case DIMOO_ERR_OUT_OF_MEMORY: return "out of memory";
    case DIMOO_ERR_DEVICE_OUT_OF_MEMORY: return "out of device memory";
    case DIMOO_ERR_BAD_WEIGHTS: return "bad weights";
    case DIMOO_ERR_UNSUPPORTED: return "unsupported";
    case DIMOO_ERR_DEVICE: return "device error";
    case DIMOO_ERR_CANCELLED: return "cancelled";
    case DIMOO_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

int32_t dimoo_backend_built(int32_t backend) {
    if (backend == DIMOO_BACKEND_CPU) return 1;
#ifdef DIMOO_WITH_CUDA
    if (backend == DIMOO_BACKEND_CUDA) return 1;
#endif
    return 0;
}

int32_t dimoo_device_count(int32_t backend) {
    if (backend == DIMOO_BACKEND_CPU) return 1;
#ifdef DIMOO_WITH_CUDA
    if (backend == DIMOO_BACKEND_CUDA) return dimoo::cuda_device_count();
#endif
    return 0;
}

int64_t dimoo_struct_size(const char *name) {
    if (!name) return -1;
    std::string n(name);
    if (n == "dimoo_model_config") return sizeof(dimoo_model_config);
    if (n == "dimoo_ctx_params") return sizeof(dimoo_ctx_params);
    if (n == "dimoo_forward_args") return sizeof(dimoo_forward_args);
    if (n == "dimoo_vq_config") return sizeof(dimoo_vq_config);
    if (n == "dimoo_sample_args") return sizeof(dimoo_sample_args);
    if (n == "dimoo_image_step_args") return sizeof(dimoo_image_step_args);
    if (n == "dimoo_text_step_args") return sizeof(dimoo_text_step_args);
    return -1;
}

int64_t dimoo_struct_offset(const char *strct, const char *field) {
    if (!strct || !field) return -1;
    for (const auto &f : kLayout)
        if (std::strcmp(f.strct, strct) == 0 && std::strcmp(f.field, field) == 0) return f.offset;
    return -1;
}

// ---- runtime ---------------------------------------------------------------

int32_t dimoo_runtime_create(int32_t backend, int32_t device, int32_t n_threads, dimoo_runtime **out, char *err,
                             size_t err_len) {
    std::string msg;
    int32_t st = guard(&msg, [&] {
        DIMOO_CHECK_ARG(out != nullptr, "out is NULL");
        *out = nullptr;
        auto rt = std::make_unique<dimoo_runtime>();
        rt->backend = backend;
        rt->n_threads = n_threads;
        if (backend == DIMOO_BACKEND_CPU) {
            DIMOO_CHECK_ARG(device == 0, "the CPU backend has one device, 0");
            DIMOO_CHECK_ARG(n_threads >= 0, "n_threads must be >= 0");
            rt->impl = dimoo::make_cpu_backend(n_threads);
        } else if (backend == DIMOO_BACKEND_CUDA) {
#ifdef DIMOO_WITH_CUDA
            rt->impl = dimoo::make_cuda_backend(device);
#else
            dimoo::fail(DIMOO_ERR_UNSUPPORTED, "this libdimoo was built without the CUDA backend");
#endif
        } else {
            dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, "unknown backend " + std::to_string(backend));
        }
        *out = rt.release();
    });
    copy_err(msg, err, err_len);
    return st;
}

void dimoo_runtime_destroy(dimoo_runtime *rt) { delete rt; }

const char *dimoo_runtime_error(const dimoo_runtime *rt) { return rt ? rt->err.c_str() : "runtime is NULL"; }

int32_t dimoo_runtime_describe(dimoo_runtime *rt, char *buf, size_t len) {
    if (!rt) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&rt->err, [&] { copy_err(rt->impl->describe(), buf, len); });
}

// ---- sampling ----------------------------------------------------------------

int32_t dimoo_sample_image(dimoo_runtime *rt, const dimoo_sample_args *a) {
    if (!rt) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&rt->err, [&] {
        DIMOO_CHECK_ARG(a != nullptr, "args is NULL");
        DIMOO_CHECK_ARG(a->n_pos >= 0, "n_pos must be >= 0");
        DIMOO_CHECK_ARG(a->n_branches >= 1 && a->n_branches <= DIMOO_MAX_BRANCHES,
                        "n_branches must be in 1.." + std::to_string(DIMOO_MAX_BRANCHES));
        DIMOO_CHECK_ARG(a->n_codes >= 1, "n_codes must be >= 1");
        DIMOO_CHECK_ARG(a->temperature >= 0 && std::isfinite(a->temperature), "temperature must be finite and >= 0");
        DIMOO_CHECK_ARG(a->n_select >= 0 && a->n_select <= a->n_pos,
                        "n_select must be in 0..n_pos, got " + std::to_string(a->n_select));
        DIMOO_CHECK_ARG(a->n_select == 0 || a->out_selected, "n_select > 0 needs out_selected");
        DIMOO_CHECK_ARG(!a->top_logp_valid || a->top_logp, "top_logp_valid needs top_logp");
        if (a->n_pos == 0) return;
        DIMOO_CHECK_ARG(a->rng_pos && a->out_codes && a->out_conf, "NULL rng_pos or output");
        for (int b = 0; b < a->n_branches; b++) {
            DIMOO_CHECK_ARG(a->logits[b] != nullptr, "NULL logits of branch " + std::to_string(b));
            const int64_t nr = a->n_rows[b];
            if (a->rows[b]) {
                for (int i = 0; i < a->n_pos; i++)
                    DIMOO_CHECK_ARG(a->rows[b][i] >= 0 && a->rows[b][i] < nr,
                                    "row " + std::to_string(a->rows[b][i]) + " of branch " + std::to_string(b) +
                                        " outside its " + std::to_string(nr) + " rows");
            } else {
                DIMOO_CHECK_ARG(nr >= a->n_pos, "branch " + std::to_string(b) + " has fewer rows than positions");
            }
        }
        dimoo::cpu::sample_image(*a);
    });
}

// ---- estimates ----------------------------------------------------------------

int32_t dimoo_estimate(int32_t backend, int32_t n_threads, const dimoo_model_config *cfg, int32_t dtype,
                       const dimoo_ctx_params *p, int64_t *model_bytes, int64_t *ctx_bytes, char *err,
                       size_t err_len) {
    std::string msg;
    int32_t st = guard(&msg, [&] {
        DIMOO_CHECK_ARG(cfg && model_bytes, "NULL cfg or model_bytes");
        DIMOO_CHECK_ARG(!p || ctx_bytes, "ctx_bytes is NULL");
        DIMOO_CHECK_ARG(dimoo::dtype_size(dtype) != 0, "unknown dtype " + std::to_string(dtype));
        DIMOO_CHECK_ARG(n_threads >= 0, "n_threads must be >= 0");
        const dimoo::ModelShape shape(*cfg);
        dimoo_ctx_params q{};
        if (p) q = checked_params(*cfg, *p);
        dimoo::Estimate e;
        if (backend == DIMOO_BACKEND_CPU) {
            e = dimoo::cpu_estimate(shape, dtype, n_threads, p ? &q : nullptr);
        } else if (backend == DIMOO_BACKEND_CUDA) {
#ifdef DIMOO_WITH_CUDA
            e = dimoo::cuda_estimate(shape, p ? &q : nullptr);
#else
            dimoo::fail(DIMOO_ERR_UNSUPPORTED, "this libdimoo was built without the CUDA backend");
#endif
        } else {
            dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, "unknown backend " + std::to_string(backend));
        }
        *model_bytes = e.model;
        if (p) *ctx_bytes = e.ctx;
    });
    copy_err(msg, err, err_len);
    return st;
}

// ---- model -----------------------------------------------------------------

int32_t dimoo_model_create(dimoo_runtime *rt, const dimoo_model_config *cfg, dimoo_model **out, char *err,
                           size_t err_len) {
    std::string msg;
    int32_t st = guard(&msg, [&] {
        DIMOO_CHECK_ARG(rt && cfg && out, "NULL argument");
        *out = nullptr;
        auto m = std::make_unique<dimoo_model>();
        m->rt = rt;
        m->shape = std::make_unique<dimoo::ModelShape>(*cfg);
        m->present.assign(m->shape->n_weights(), 0);
        m->impl = rt->impl->create_model(*m->shape);
        *out = m.release();
    });
    copy_err(msg, err, err_len);
    return st;
}

void dimoo_model_destroy(dimoo_model *m) { delete m; }

const char *dimoo_model_error(const dimoo_model *m) { return m ? m->err.c_str() : "model is NULL"; }

int32_t dimoo_model_set_weight(dimoo_model *m, const char *name, int32_t dtype, const int64_t *shape, int32_t ndim,
                               const void *data, uint64_t nbytes) {
    if (!m) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&m->err, [&] {
        DIMOO_CHECK_ARG(name && (shape || ndim == 0) && data, "NULL argument");
        DIMOO_CHECK_ARG(!m->finalized, "the model is finalized; weights can no longer change");
        dimoo::WeightId id = m->shape->parse_name(name);
        if (dimoo::dtype_size(dtype) == 0)
            dimoo::fail(DIMOO_ERR_BAD_WEIGHTS, std::string(name) + ": unsupported dtype code " + std::to_string(dtype));
        auto want = m->shape->expected_shape(id);
        std::vector<int64_t> got(shape, shape + std::max(ndim, 0));
        if (got != want) {
            auto fmt = [](const std::vector<int64_t> &v) {
                std::string s = "(";
                for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
                return s + ")";
            };
            dimoo::fail(DIMOO_ERR_BAD_WEIGHTS,
                        std::string(name) + ": shape " + fmt(got) + " but the config implies " + fmt(want));
        }
        uint64_t elems = 1;
        for (auto d : want) elems *= uint64_t(d);
        if (elems * dimoo::dtype_size(dtype) != nbytes)
            dimoo::fail(DIMOO_ERR_BAD_WEIGHTS, std::string(name) + ": " + std::to_string(nbytes) + " bytes for " +
                                                   std::to_string(elems) + " " + dimoo::dtype_name(dtype) + " values");
        m->impl->set_weight(id, dtype, data, size_t(nbytes));
        m->present[m->shape->slot(id)] = 1;
    });
}

int32_t dimoo_model_finalize(dimoo_model *m) {
    if (!m) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&m->err, [&] {
        if (m->finalized) return;
        std::string missing;
        int n_missing = 0;
        const auto &s = *m->shape;
        auto check = [&](dimoo::WeightId id) {
            if (!m->present[s.slot(id)]) {
                if (n_missing++ < 5) missing += (missing.empty() ? "" : ", ") + s.name_of(id);
            }
        };
        check({dimoo::WeightKind::Embedding, -1});
        for (int l = 0; l < s.cfg.n_layers; l++)
            for (int k = 0; k < dimoo::kLayerWeightKinds; k++)
                check({dimoo::WeightKind(int(dimoo::WeightKind::AttnNorm) + k), l});
        check({dimoo::WeightKind::FinalNorm, -1});
        check({dimoo::WeightKind::Head, -1});
        if (n_missing)
            dimoo::fail(DIMOO_ERR_BAD_WEIGHTS, std::to_string(n_missing) + " tensor(s) missing: " + missing +
                                                   (n_missing > 5 ? ", ..." : ""));
        m->impl->finalize();
        m->finalized = true;
    });
}

int64_t dimoo_model_weight_bytes(const dimoo_model *m) { return m ? m->impl->weight_bytes() : 0; }

// ---- context -----------------------------------------------------------------

int32_t dimoo_ctx_create(dimoo_model *m, const dimoo_ctx_params *p, dimoo_ctx **out, char *err, size_t err_len) {
    std::string msg;
    int32_t st = guard(&msg, [&] {
        DIMOO_CHECK_ARG(m && p && out, "NULL argument");
        *out = nullptr;
        DIMOO_CHECK_ARG(m->finalized, "the model is not finalized");
        auto c = std::make_unique<dimoo_ctx>();
        c->model = m;
        c->params = checked_params(m->shape->cfg, *p);
        c->cached_len.assign(p->n_seqs, 0);
        if (c->params.keep_cols > 0) {
            c->kept.resize(p->n_seqs);
            for (auto &k : c->kept) {
                k.slot_of.assign(p->max_tokens, -1);
                k.stamp.assign(p->max_tokens, 0);
            }
            c->top_stamp.assign(size_t(p->n_seqs) * p->max_tokens, 0);
            c->top_sig.resize(p->n_seqs);
        }
        c->impl = m->impl->create_ctx(c->params);
        *out = c.release();
    });
    copy_err(msg, err, err_len);
    return st;
}

void dimoo_ctx_destroy(dimoo_ctx *c) { delete c; }

const char *dimoo_ctx_error(const dimoo_ctx *c) { return c ? c->err.c_str() : "context is NULL"; }

void dimoo_ctx_cancel(dimoo_ctx *c) {
    if (c) c->cancel.store(true);
}

int64_t dimoo_ctx_bytes(const dimoo_ctx *c) { return c ? c->impl->bytes() : 0; }

int32_t dimoo_forward(dimoo_ctx *c, const dimoo_forward_args *args, int32_t n_args) {
    if (!c) return DIMOO_ERR_INVALID_ARGUMENT;
    c->cancel.store(false);
    return guard(&c->err, [&] {
        DIMOO_CHECK_ARG(args != nullptr && n_args > 0, "no forward arguments");
        std::vector<char> seen(c->params.n_seqs, 0);
        for (int32_t i = 0; i < n_args; i++) check_forward(c, args[i], seen);
        // Slots of the kept rows, planned (and checked against keep_rows)
        // before anything runs.
        std::vector<KeptPlan> plans(n_args);
        std::vector<const int32_t *> slots(n_args, nullptr);
        for (int32_t i = 0; i < n_args; i++)
            if (args[i].keep) {
                plans[i] = plan_keep(c, args[i]);
                slots[i] = plans[i].slots.data();
            }
        // A failed or cancelled forward leaves caches and kept rows
        // half-written: drop them (kept rows of seqs run without keep come
        // back once it succeeds).
        std::vector<KeptSeq> before(c->kept.empty() ? 0 : n_args);
        for (int32_t i = 0; i < n_args; i++) {
            if (args[i].cache_mode != DIMOO_CACHE_NONE) c->cached_len[args[i].seq] = 0;
            if (!c->kept.empty()) {
                before[i] = c->kept[args[i].seq];
                c->kept[args[i].seq].forget();
            }
        }
        c->impl->forward(args, n_args, c->cancel, slots.data());
        for (int32_t i = 0; i < n_args; i++) {
            if (args[i].cache_mode != DIMOO_CACHE_NONE) c->cached_len[args[i].seq] = args[i].n_tokens;
            if (args[i].keep) {
                KeptSeq &k = c->kept[args[i].seq];
                k = std::move(plans[i].next);
                const uint64_t now = ++c->clock;
                for (int32_t p : plans[i].positions) k.stamp[p] = now;
            } else if (!c->kept.empty()) {
                c->kept[args[i].seq] = std::move(before[i]);
            }
        }
    });
}

} // extern "C"

// ---- decode steps over kept logits ---------------------------------------------

namespace {

// The slot of seq's kept row at pos; a position without one is the caller's
// mistake.
int32_t kept_slot(const dimoo_ctx *c, int32_t seq, int64_t pos, const char *who) {
    DIMOO_CHECK_ARG(pos >= 0 && pos < c->params.max_tokens,
                    std::string(who) + ": position " + std::to_string(pos) + " of seq " + std::to_string(seq) +
                        " is outside the context's " + std::to_string(c->params.max_tokens) + " tokens");
    const int32_t s = c->kept[seq].slot_of[pos];
    if (s < 0)
        dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT, std::string(who) + ": seq " + std::to_string(seq) +
                                                    " has no kept logits at position " + std::to_string(pos) +
                                                    " (run a forward with keep = 1 there first)");
    return s;
}

void check_kept_ctx(const dimoo_ctx *c, const char *who) {
    DIMOO_CHECK_ARG(!c->kept.empty(), std::string(who) + " needs a context created with keep_cols > 0");
}

void check_seq(const dimoo_ctx *c, int32_t seq, const char *who) {
    DIMOO_CHECK_ARG(seq >= 0 && seq < c->params.n_seqs, std::string(who) + ": seq " + std::to_string(seq) +
                                                            " out of range [0, " + std::to_string(c->params.n_seqs) +
                                                            ")");
}

} // namespace

extern "C" {

int32_t dimoo_image_step(dimoo_ctx *c, const dimoo_image_step_args *a) {
    if (!c) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&c->err, [&] {
        const char *who = "image step";
        check_kept_ctx(c, who);
        DIMOO_CHECK_ARG(a != nullptr, "args is NULL");
        DIMOO_CHECK_ARG(a->n_branches >= 1 && a->n_branches <= DIMOO_MAX_BRANCHES,
                        "n_branches must be in 1.." + std::to_string(DIMOO_MAX_BRANCHES));
        DIMOO_CHECK_ARG(a->n_pos >= 0, "n_pos must be >= 0");
        DIMOO_CHECK_ARG(a->n_select >= 0 && a->n_select <= a->n_pos,
                        "n_select must be in 0..n_pos, got " + std::to_string(a->n_select));
        DIMOO_CHECK_ARG(a->temperature >= 0 && std::isfinite(a->temperature), "temperature must be finite and >= 0");
        for (int b = 0; b < a->n_branches; b++) {
            check_seq(c, a->seqs[b], who);
            DIMOO_CHECK_ARG(a->offsets[b] >= 0, "offsets must be >= 0");
            DIMOO_CHECK_ARG(std::isfinite(a->weights[b]), "guidance weights must be finite");
        }
        if (a->n_pos == 0) return;
        DIMOO_CHECK_ARG(a->masked && a->out_codes, "NULL masked or out_codes");
        DIMOO_CHECK_ARG(a->n_select == 0 || a->out_selected, "n_select > 0 needs out_selected");
        for (int i = 0; i < a->n_pos; i++)
            DIMOO_CHECK_ARG(a->masked[i] >= 0 && (i == 0 || a->masked[i] > a->masked[i - 1]),
                            "masked positions must be >= 0 and strictly increasing");
        const KeptSeq &k0 = c->kept[a->seqs[0]];
        dimoo::ImageStepCall call{};
        call.a = a;
        call.n_codes = k0.ve - k0.vb;
        std::vector<std::vector<int32_t>> slots(a->n_branches, std::vector<int32_t>(a->n_pos));
        std::vector<uint64_t> newest(a->n_pos, 0);
        for (int b = 0; b < a->n_branches; b++) {
            const KeptSeq &k = c->kept[a->seqs[b]];
            DIMOO_CHECK_ARG(k.vb == k0.vb && k.ve == k0.ve, "branches' kept logits cover different columns");
            for (int i = 0; i < a->n_pos; i++) {
                const int64_t pos = int64_t(a->offsets[b]) + a->masked[i];
                slots[b][i] = kept_slot(c, a->seqs[b], pos, who);
                newest[i] = std::max(newest[i], k.stamp[pos]);
            }
            call.slots[b] = slots[b].data();
        }
        // Top log-probabilities still current: same branches, weights and
        // columns as when stored, and no row rewritten since.
        TopSig sig;
        sig.n_branches = a->n_branches;
        sig.vb = k0.vb, sig.ve = k0.ve;
        for (int b = 0; b < a->n_branches; b++)
            sig.seqs[b] = a->seqs[b], sig.offsets[b] = a->offsets[b], sig.weights[b] = a->weights[b];
        const bool same = c->top_sig[a->seqs[0]] == sig;
        std::vector<uint8_t> valid(a->n_pos);
        std::vector<int32_t> index(a->n_pos);
        for (int i = 0; i < a->n_pos; i++) {
            const int64_t pos = int64_t(a->offsets[0]) + a->masked[i];
            index[i] = int32_t(int64_t(a->seqs[0]) * c->params.max_tokens + pos);
            valid[i] = same && c->top_stamp[index[i]] == newest[i];
        }
        call.top_valid = valid.data();
        call.top_index = index.data();
        c->top_sig[a->seqs[0]] = TopSig{}; // unknown until the step succeeds
        c->impl->image_step(call);
        for (int i = 0; i < a->n_pos; i++) c->top_stamp[index[i]] = newest[i];
        c->top_sig[a->seqs[0]] = sig;
    });
}

int32_t dimoo_text_step(dimoo_ctx *c, const dimoo_text_step_args *a) {
    if (!c) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&c->err, [&] {
        const char *who = "text step";
        check_kept_ctx(c, who);
        DIMOO_CHECK_ARG(a != nullptr, "args is NULL");
        check_seq(c, a->seq, who);
        if (a->uncond_seq != -1) check_seq(c, a->uncond_seq, who);
        DIMOO_CHECK_ARG(std::isfinite(a->cfg_scale), "cfg_scale must be finite");
        DIMOO_CHECK_ARG(a->temperature >= 0 && std::isfinite(a->temperature), "temperature must be finite and >= 0");
        DIMOO_CHECK_ARG(a->n_pos >= 0, "n_pos must be >= 0");
        DIMOO_CHECK_ARG(a->n_select >= 0 && a->n_select <= a->n_pos,
                        "n_select must be in 0..n_pos, got " + std::to_string(a->n_select));
        DIMOO_CHECK_ARG(!a->use_mask || c->mask_len > 0, "use_mask without a token mask (dimoo_ctx_set_token_mask)");
        if (a->n_pos == 0) return;
        DIMOO_CHECK_ARG(a->positions != nullptr, "positions is NULL");
        DIMOO_CHECK_ARG(a->n_select == 0 || (a->out_positions && a->out_tokens), "NULL out_positions or out_tokens");
        const KeptSeq &k = c->kept[a->seq];
        dimoo::TextStepCall call{};
        call.a = a;
        call.n_cols = k.ve - k.vb;
        call.vocab_begin = k.vb;
        std::vector<int32_t> slots(a->n_pos), uslots;
        for (int i = 0; i < a->n_pos; i++) {
            DIMOO_CHECK_ARG(i == 0 || a->positions[i] > a->positions[i - 1], "positions must be strictly increasing");
            slots[i] = kept_slot(c, a->seq, a->positions[i], who);
        }
        call.slots = slots.data();
        if (a->uncond_seq >= 0) {
            const KeptSeq &u = c->kept[a->uncond_seq];
            DIMOO_CHECK_ARG(u.vb == k.vb && u.ve == k.ve, "the two seqs' kept logits cover different columns");
            uslots.resize(a->n_pos);
            for (int i = 0; i < a->n_pos; i++) uslots[i] = kept_slot(c, a->uncond_seq, a->positions[i], who);
            call.uncond_slots = uslots.data();
        }
        c->impl->text_step(call);
    });
}

int32_t dimoo_ctx_set_token_mask(dimoo_ctx *c, const uint8_t *allowed, int32_t n) {
    if (!c) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&c->err, [&] {
        check_kept_ctx(c, "token mask");
        DIMOO_CHECK_ARG(allowed != nullptr, "allowed is NULL");
        const int32_t E = c->model->shape->cfg.embedding_size;
        DIMOO_CHECK_ARG(n >= 1 && n <= E, "token mask length must be in [1, " + std::to_string(E) + "]");
        DIMOO_CHECK_ARG(std::any_of(allowed, allowed + n, [](uint8_t v) { return v != 0; }),
                        "the token mask allows no token");
        c->mask_len = 0;
        c->impl->set_token_mask(allowed, n);
        c->mask_len = n;
    });
}

int32_t dimoo_cache_select(dimoo_ctx *c, int32_t seq, int32_t n_tokens, double q, int32_t *out, int32_t *n_out) {
    if (!c) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&c->err, [&] {
        const char *who = "cache select";
        check_kept_ctx(c, who);
        check_seq(c, seq, who);
        DIMOO_CHECK_ARG(out && n_out, "NULL out or n_out");
        DIMOO_CHECK_ARG(n_tokens >= 1 && n_tokens <= c->params.max_tokens,
                        "n_tokens must be in [1, " + std::to_string(c->params.max_tokens) + "]");
        DIMOO_CHECK_ARG(q >= 0 && q <= 1, "q must be in [0, 1]");
        std::vector<int32_t> slots(n_tokens);
        for (int32_t p = 0; p < n_tokens; p++) slots[p] = kept_slot(c, seq, p, who);
        *n_out = c->impl->cache_select(seq, slots.data(), n_tokens, q, out);
    });
}

} // extern "C"

// ---- for the extern "C" files beside this one (vq_api.cpp) -------------------

namespace dimoo {
int32_t runtime_backend_id(const dimoo_runtime *rt) { return rt->backend; }
int32_t runtime_threads(const dimoo_runtime *rt) { return rt->n_threads; }
Backend *runtime_backend(dimoo_runtime *rt) { return rt->impl.get(); }
} // namespace dimoo
