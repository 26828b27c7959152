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

struct dimoo_ctx {
    dimoo_model *model = nullptr;
    dimoo_ctx_params params{};
    std::unique_ptr<dimoo::Ctx> impl;
    std::vector<int32_t> cached_len; // per seq: n_tokens of the last STORE, 0 = no cache
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
    if (!a.logits) {
        DIMOO_CHECK_ARG(a.n_out == 0 && a.out_positions == nullptr, who + "output positions given but logits is NULL");
        DIMOO_CHECK_ARG(a.row_max == nullptr, who + "row_max given but logits is NULL");
        return;
    }
    int32_t vend = a.vocab_end == 0 ? cfg.embedding_size : a.vocab_end;
    DIMOO_CHECK_ARG(a.vocab_begin >= 0 && a.vocab_begin < vend && vend <= cfg.embedding_size,
                    who + "vocab range [" + std::to_string(a.vocab_begin) + ", " + std::to_string(vend) +
                        ") is not inside [0, " + std::to_string(cfg.embedding_size) + ")");
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
    DIMOO_FIELD(dimoo_ctx_params, n_seqs),
    DIMOO_FIELD(dimoo_ctx_params, max_tokens),
    DIMOO_FIELD(dimoo_ctx_params, flags),
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

int32_t dimoo_op_rmsnorm(dimoo_runtime *rt, int32_t dtype, const void *x, const void *w, void *out, int32_t rows,
                         int32_t cols, float eps) {
    if (!rt) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&rt->err, [&] {
        DIMOO_CHECK_ARG(dimoo::dtype_size(dtype) != 0, "unknown dtype " + std::to_string(dtype));
        DIMOO_CHECK_ARG(x && w && out, "NULL buffer");
        DIMOO_CHECK_ARG(rows >= 0 && cols > 0, "bad shape");
        DIMOO_CHECK_ARG(eps > 0, "eps must be positive");
        rt->impl->rmsnorm(dtype, x, w, out, rows, cols, eps);
    });
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
        DIMOO_CHECK_ARG(p->n_seqs > 0 && p->n_seqs <= 64, "n_seqs must be in [1, 64]");
        DIMOO_CHECK_ARG(p->max_tokens > 0, "max_tokens must be positive");
        DIMOO_CHECK_ARG(p->max_tokens <= m->shape->cfg.max_sequence_length,
                        "max_tokens " + std::to_string(p->max_tokens) + " exceeds the model's max_sequence_length " +
                            std::to_string(m->shape->cfg.max_sequence_length));
        DIMOO_CHECK_ARG((p->flags & ~DIMOO_CTX_KV_CACHE) == 0, "unknown context flags");
        auto c = std::make_unique<dimoo_ctx>();
        c->model = m;
        c->params = *p;
        c->cached_len.assign(p->n_seqs, 0);
        c->impl = m->impl->create_ctx(*p);
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
        // A failed or cancelled forward leaves caches half-written: drop them.
        for (int32_t i = 0; i < n_args; i++)
            if (args[i].cache_mode != DIMOO_CACHE_NONE) c->cached_len[args[i].seq] = 0;
        c->impl->forward(args, n_args, c->cancel);
        for (int32_t i = 0; i < n_args; i++)
            if (args[i].cache_mode != DIMOO_CACHE_NONE) c->cached_len[args[i].seq] = args[i].n_tokens;
    });
}

} // extern "C"

// ---- for the extern "C" files beside this one (vq_api.cpp) -------------------

namespace dimoo {
int32_t runtime_backend_id(const dimoo_runtime *rt) { return rt->backend; }
int32_t runtime_threads(const dimoo_runtime *rt) { return rt->n_threads; }
} // namespace dimoo
