// backend.cu - the CUDA backend: device selection, the model (weights in
// bf16 on the device, uploaded once, q|k|v and ff_proj|up_proj concatenated
// so each is one GEMM) and the context (device-resident activations, K/V
// caches, kept logits and the decode steps over them, its own stream and
// cuBLASLt workspace). A forward runs every sequence of the call as one
// batch of M = sum(rows) rows per GEMM; only attention and RoPE look at
// sequence boundaries (cuda/plan.h). The layer stack of a forward is
// captured into a CUDA graph per shape the first time that shape repeats
// and replayed afterwards (DIMOO_CUDA_GRAPHS=0: never).
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <list>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "cuda/attention.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_model.h"
#include "cuda/embed.cuh"
#include "cuda/gemm.cuh"
#include "cuda/kept.cuh"
#include "cuda/nvtx.cuh"
#include "cuda/plan.h"
#include "cuda/random.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "cuda/rowmax.cuh"
#include "cuda/sampler.cuh"
#include "cuda/swiglu.cuh"
#include "cuda/vq.cuh"

namespace dimoo {

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

namespace {

constexpr size_t kLtWorkspace = size_t(32) << 20;
// The LM head's work buffer (rows on their way to a host copy or to
// scattered kept slots) holds at most this much; larger outputs go through
// it in chunks of rows.
constexpr size_t kHeadWorkMax = size_t(64) << 20;
// Graphs held per context, and shape keys remembered after one sighting.
constexpr size_t kGraphsHeld = 8;
constexpr size_t kGraphKeysSeen = 32;


// Offsets of every weight in one device allocation.
struct WeightLayout {
    size_t wte = 0, head = 0, lnf = 0, total = 0;
    struct Layer {
        size_t attn_norm, ff_norm, wqkv, wo, wgu, wdown;
    };
    std::vector<Layer> layers;

    explicit WeightLayout(const ModelShape &s) {
        const auto &c = s.cfg;
        const size_t d = c.d_model, kv = s.kv_dim, mlp = c.mlp_hidden_size, E = c.embedding_size;
        size_t o = 0;
        auto take = [&](size_t bytes) {
            size_t at = o;
            o = align_up(o + bytes);
            return at;
        };
        wte = take(E * d * 2);
        head = take(E * d * 2);
        lnf = take(d * 4);
        for (int l = 0; l < c.n_layers; l++) {
            Layer L;
            L.attn_norm = take(d * 4);
            L.ff_norm = take(d * 4);
            L.wqkv = take((d + 2 * kv) * d * 2);
            L.wo = take(d * d * 2);
            L.wgu = take(2 * mlp * d * 2);
            L.wdown = take(d * mlp * 2);
            layers.push_back(L);
        }
        total = o;
    }
};

class CudaModel : public Model {
public:
    CudaModel(const ModelShape &s, int device) : shape_(s), device_(device), lay_(s) {
        DIMOO_CUDA(cudaSetDevice(device));
        check_device_room(device, lay_.total, "the model's weights in bf16");
        buf_ = std::make_unique<DeviceBuffer>(lay_.total);
    }

    void set_weight(WeightId id, int32_t dtype, const void *data, size_t nbytes) override {
        DIMOO_CUDA(cudaSetDevice(device_));
        const size_t n = nbytes / dtype_size(dtype);
        const bool norm = id.kind == WeightKind::AttnNorm || id.kind == WeightKind::FFNorm ||
                          id.kind == WeightKind::FinalNorm;
        uint8_t *dst = base() + offset_of(id);
        if (norm) { // fp32 on the device, read directly by the norms
            std::vector<float> f(n);
            for (size_t i = 0; i < n; i++) f[i] = load_as_f32(data, dtype, i);
            DIMOO_CUDA(cudaMemcpy(dst, f.data(), n * 4, cudaMemcpyHostToDevice));
            return;
        }
        if (dtype == DIMOO_BF16) {
            DIMOO_CUDA(cudaMemcpy(dst, data, nbytes, cudaMemcpyHostToDevice));
            return;
        }
        // fp32/fp16 to bf16 (round to nearest even) on the host, in chunks.
        const size_t chunk = size_t(1) << 24;
        std::vector<uint16_t> h(std::min(n, chunk));
        for (size_t s = 0; s < n; s += chunk) {
            const size_t m = std::min(chunk, n - s);
            for (size_t i = 0; i < m; i++) h[i] = f32_to_bf16(load_as_f32(data, dtype, s + i));
            DIMOO_CUDA(cudaMemcpy(dst + s * 2, h.data(), m * 2, cudaMemcpyHostToDevice));
        }
    }

    void finalize() override { DIMOO_CUDA(cudaDeviceSynchronize()); }
    int64_t weight_bytes() const override { return int64_t(lay_.total); }
    std::unique_ptr<Ctx> create_ctx(const dimoo_ctx_params &p) override;

    // Device pointers.
    uint8_t *base() const { return static_cast<uint8_t *>(buf_->get()); }
    const uint16_t *bf(size_t off) const { return reinterpret_cast<const uint16_t *>(base() + off); }
    const float *f32(size_t off) const { return reinterpret_cast<const float *>(base() + off); }

    void fill_random(uint64_t seed) {
        DIMOO_CUDA(cudaSetDevice(device_));
        const auto &c = shape_.cfg;
        const size_t d = c.d_model, kv = shape_.kv_dim, mlp = c.mlp_hidden_size, E = c.embedding_size;
        auto mat = [&](size_t off, size_t rows, size_t k) {
            const float a = std::sqrt(3.0f / float(k));
            DIMOO_CUDA(fill_uniform_bf16_launch(reinterpret_cast<uint16_t *>(base() + off), rows * k, seed++, -a, a, 0));
        };
        auto vec = [&](size_t off) {
            DIMOO_CUDA(fill_uniform_f32_launch(reinterpret_cast<float *>(base() + off), d, seed++, 0.9f, 1.1f, 0));
        };
        DIMOO_CUDA(fill_uniform_bf16_launch(reinterpret_cast<uint16_t *>(base() + lay_.wte), E * d, seed++, -1.f, 1.f, 0));
        mat(lay_.head, E, d);
        vec(lay_.lnf);
        for (const auto &L : lay_.layers) {
            vec(L.attn_norm);
            vec(L.ff_norm);
            mat(L.wqkv, d + 2 * kv, d);
            mat(L.wo, d, d);
            mat(L.wgu, 2 * mlp, d);
            mat(L.wdown, d, mlp);
        }
        DIMOO_CUDA(cudaDeviceSynchronize());
    }

    const ModelShape shape_;
    const int device_;
    const WeightLayout lay_;

private:
    size_t offset_of(WeightId id) const {
        const auto &c = shape_.cfg;
        const size_t d = c.d_model, kv = shape_.kv_dim, mlp = c.mlp_hidden_size;
        switch (id.kind) {
        case WeightKind::Embedding: return lay_.wte;
        case WeightKind::Head: return lay_.head;
        case WeightKind::FinalNorm: return lay_.lnf;
        default: break;
        }
        const auto &L = lay_.layers.at(size_t(id.layer));
        switch (id.kind) {
        case WeightKind::AttnNorm: return L.attn_norm;
        case WeightKind::FFNorm: return L.ff_norm;
        case WeightKind::QProj: return L.wqkv;
        case WeightKind::KProj: return L.wqkv + d * d * 2;
        case WeightKind::VProj: return L.wqkv + (d + kv) * d * 2;
        case WeightKind::AttnOut: return L.wo;
        case WeightKind::FFProj: return L.wgu;
        case WeightKind::UpProj: return L.wgu + mlp * d * 2;
        case WeightKind::FFOut: return L.wdown;
        default: break;
        }
        fail(DIMOO_ERR_INTERNAL, "no device slot for " + shape_.name_of(id));
    }

    std::unique_ptr<DeviceBuffer> buf_;
};

// The shape of a forward's layer stack, which a captured graph bakes in
// (row count, sequence count, grid sizes): the call's sequence count, then
// per sequence its query rows, key rows and cache mode, and with the TMA
// attention kernels (`by_slot`: their tensor maps hold K/V addresses) the
// cache slot. Everything else the stack reads (token ids, positions, where
// each sequence's K/V live) is in fixed device buffers written before the
// stack runs.
using GraphKey = std::vector<int32_t>;

GraphKey graph_key(const dimoo_forward_args *args, int n, const cuda::BatchPlan &p, bool by_slot) {
    GraphKey k{n};
    for (int i = 0; i < n; i++) {
        k.push_back(p.seqs[size_t(i)].q_len);
        k.push_back(p.seqs[size_t(i)].kv_len);
        k.push_back(args[i].cache_mode);
        if (by_slot) k.push_back(args[i].cache_mode == DIMOO_CACHE_NONE ? -1 : args[i].seq);
    }
    return k;
}

// A small LRU of instantiated graphs, and the keys seen once (a key is
// captured when it repeats, so one-off shapes cost no capture).
class GraphCache {
public:
    GraphCache() = default;
    GraphCache(const GraphCache &) = delete;
    GraphCache &operator=(const GraphCache &) = delete;
    ~GraphCache() { clear(); }

    cudaGraphExec_t find(const GraphKey &k) {
        for (auto it = held_.begin(); it != held_.end(); ++it)
            if (it->first == k) {
                held_.splice(held_.begin(), held_, it);
                return it->second;
            }
        return nullptr;
    }
    // Whether k was seen before; remembers it otherwise.
    bool repeats(const GraphKey &k) {
        for (auto it = seen_.begin(); it != seen_.end(); ++it)
            if (*it == k) {
                seen_.erase(it);
                return true;
            }
        seen_.push_front(k);
        if (seen_.size() > kGraphKeysSeen) seen_.pop_back();
        return false;
    }
    void put(const GraphKey &k, cudaGraphExec_t g) {
        held_.emplace_front(k, g);
        while (held_.size() > kGraphsHeld) {
            cudaGraphExecDestroy(held_.back().second);
            held_.pop_back();
        }
    }
    void clear() {
        for (auto &h : held_) cudaGraphExecDestroy(h.second);
        held_.clear();
        seen_.clear();
    }
    size_t size() const { return held_.size(); }

private:
    std::list<std::pair<GraphKey, cudaGraphExec_t>> held_;
    std::list<GraphKey> seen_;
};

// Every buffer a context of these parameters allocates: computed without a
// device, so dimoo_estimate reports exactly what dimoo_ctx_bytes will.
struct CtxPlan {
    size_t seqs_bytes = 0, meta_bytes = 0, head_ws = 0, kept_stride = 0, step_in = 0, step_work = 0, step_sel = 0,
           pin_out = 0;
    std::vector<size_t> sizes; // device buffers, in CudaCtx's buffer order

    CtxPlan(const ModelShape &S, const dimoo_ctx_params &p) {
        const auto &c = S.cfg;
        // A call batches up to n_seqs sequences of up to max_tokens rows each.
        const size_t T = size_t(p.max_tokens), Mx = size_t(p.n_seqs) * T, d = c.d_model, kv = S.kv_dim,
                     mlp = c.mlp_hidden_size, E = size_t(c.embedding_size);
        const bool keep = p.keep_cols > 0;
        const size_t cache_rows = (p.flags & DIMOO_CTX_KV_CACHE) ? size_t(p.n_seqs) * c.n_layers * T : 0;
        seqs_bytes = align_up(size_t(p.n_seqs) * sizeof(cuda::AttnSeq));
        meta_bytes = seqs_bytes + Mx * 5 * 4;
        head_ws = align_up(std::max(E * 4, std::min(kHeadWorkMax, Mx * E * 4)));
        kept_stride = keep ? align_up(size_t(p.keep_rows) * size_t(p.keep_cols) * 4) : 0;
        // Decode steps: uploads (image: a slot array per branch and the
        // Philox positions), work (text: conf, tokens, then the selection),
        // the image selection (conf, index, code).
        step_in = align_up(T * 5 * 4);
        step_work = align_up(T * 20 + 16);
        step_sel = align_up(T * 16);
        // Pinned staging: uploads (the forward's metadata is the largest),
        // then the decode steps' results.
        pin_out = align_up(T * 16 + 16);
        sizes = {
            Mx * d * 4,                                   // x
            Mx * d * 2,                                   // h
            Mx * (d + 2 * kv) * 2,                        // qkv
            Mx * d * 2,                                   // q
            Mx * d * 2,                                   // att
            Mx * 2 * mlp * 2,                             // gu
            Mx * mlp * 2,                                 // act
            Mx * kv * 2, Mx * kv * 2,                     // K, V scratch (cache mode NONE)
            cache_rows * kv * 2, cache_rows * kv * 2,     // K, V caches
            T * S.head_dim * 4,                           // RoPE table
            meta_bytes,                                   // seqs, then tok | pos | seq | out rows | keep slots
            Mx * 4,                                       // row maxima of the head's rows
            head_ws,                                      // the head's work rows
            keep ? size_t(p.n_seqs) * kept_stride : 0,    // kept logits
            keep ? size_t(p.n_seqs) * size_t(p.max_tokens) * 4 : 0, // their row maxima (one per slot)
            keep ? step_in + step_work + step_sel : 0,    // decode step buffers
            keep ? E : 0,                                 // token mask
        };
    }
    // What dimoo_ctx_bytes reports: the device buffers, the cuBLASLt
    // workspace and the pinned host staging.
    size_t bytes() const {
        size_t b = kLtWorkspace + meta_bytes + pin_out;
        for (size_t v : sizes) b += v;
        return b;
    }
};

class CudaCtx : public Ctx {
public:
    CudaCtx(const CudaModel &m, const dimoo_ctx_params &p) : m_(m), p_(p) {
        const auto &S = m.shape_;
        const auto &c = S.cfg;
        DIMOO_CUDA(cudaSetDevice(m.device_));
        const bool keep = p.keep_cols > 0;
        const CtxPlan plan(S, p);
        seqs_bytes_ = plan.seqs_bytes, meta_bytes_ = plan.meta_bytes, head_ws_ = plan.head_ws;
        kept_stride_ = plan.kept_stride, step_in_ = plan.step_in, step_work_ = plan.step_work;
        step_sel_ = plan.step_sel, pin_out_ = plan.pin_out;
        sizes_ = plan.sizes;
        size_t need = kLtWorkspace;
        for (size_t b : sizes_) need += align_up(b);
        check_device_room(m.device_, need, "a context of " + std::to_string(p.n_seqs) + " x " +
                                               std::to_string(p.max_tokens) + " tokens" +
                                               (keep ? " with " + std::to_string(p.keep_rows) + " x " +
                                                           std::to_string(p.keep_cols) + " kept logits per seq"
                                                     : std::string()));
        for (size_t b : sizes_) bufs_.push_back(std::make_unique<DeviceBuffer>(b));
        pinned_ = std::make_unique<PinnedBuffer>(meta_bytes_ + pin_out_);
        DIMOO_CUDA(cudaStreamCreateWithFlags(&stream_.s, cudaStreamNonBlocking));
        nvtx_name_stream(stream_.s, "dimoo ctx");
        lt_ = std::make_unique<LtGemm>(stream_.s, kLtWorkspace);
        // DIMOO_CUDA_GEMM_TUNE=N: time cuBLASLt's candidates for every GEMM
        // shape of at least N rows at its first eager run (gemm.cuh). The
        // accumulating projections are timed into the gate/up buffer, which
        // is dead whenever they run (written by the next gate_up GEMM, read
        // only by the SwiGLU before the down projection).
        if (const char *t = std::getenv("DIMOO_CUDA_GEMM_TUNE"))
            lt_->set_tuning(std::atoi(t), b(kGU), sizes_[kGU]);
        const auto table = cuda::rope_table(p.max_tokens, S.head_dim, c.rope_theta);
        // On the context's stream: a plain cudaMemcpy may still be in flight
        // on the legacy stream, which a non-blocking stream does not wait for.
        DIMOO_CUDA(cudaMemcpyAsync(bufs_[kRope]->get(), table.data(), table.size() * 4, cudaMemcpyHostToDevice,
                                   stream_.s));
        DIMOO_CUDA(cudaStreamSynchronize(stream_.s));
        attn_ = attention_default_impl(S.head_dim);
        // DIMOO_CUDA_ATTN_USE: another kernel for forwards whose queries are
        // fewer than their keys (ML-Cache USE: the recomputed rows against
        // the whole cache), should the benchmark find one faster there.
        attn_use_ = attn_;
        if (const char *u = std::getenv("DIMOO_CUDA_ATTN_USE")) attention_impl_by_name(u, S.head_dim, &attn_use_);
        DIMOO_CUDA(cudaDeviceGetAttribute(&smem_optin_, cudaDevAttrMaxSharedMemoryPerBlockOptin, m.device_));
        const char *g = std::getenv("DIMOO_CUDA_GRAPHS");
        graphs_on_ = !(g && std::strcmp(g, "0") == 0);
        for (int l = 0; l < c.n_layers; l++) layer_names_.push_back("layer " + std::to_string(l));
    }

    ~CudaCtx() override {
        if (stream_.s) cudaStreamSynchronize(stream_.s);
        graphs_.clear();
    }

    int64_t bytes() const override {
        size_t b = kLtWorkspace + pinned_->size();
        for (size_t s : sizes_) b += s;
        return int64_t(b);
    }

    void forward(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel,
                 const int32_t *const *keep_slots) override {
        guarded([&] { run(args, n, cancel, keep_slots); });
    }

    void image_step(const ImageStepCall &c) override {
        guarded([&] { image(c); });
    }

    void text_step(const TextStepCall &c) override {
        guarded([&] { text(c); });
    }

    void set_token_mask(const uint8_t *allowed, int n) override {
        guarded([&] {
            need_kept("the token mask");
            if (n < 1 || n > m_.shape_.cfg.embedding_size)
                fail(DIMOO_ERR_INVALID_ARGUMENT, "token mask length " + std::to_string(n) + " out of range");
            mask_len_ = 0;
            DIMOO_CUDA(cudaMemcpyAsync(b<uint8_t>(kMask), allowed, size_t(n), cudaMemcpyHostToDevice, stream_.s));
            DIMOO_CUDA(cudaStreamSynchronize(stream_.s));
            mask_len_ = n;
        });
    }

    int cache_select(int seq, const int32_t *slots, int n, double q, int32_t *out) override {
        int k = 0;
        guarded([&] { k = select(seq, slots, n, q, out); });
        return k;
    }

    void load_kept(int seq, const int32_t *slots, int n, int n_cols, const float *rows) override {
        guarded([&] { load(seq, slots, n, n_cols, rows); });
    }

    CudaGemmStats gemm_stats() const { return {lt_->tuned_shapes(), lt_->tuned_changed()}; }

    CudaGraphStats graph_stats() const {
        CudaGraphStats s;
        s.enabled = graphs_on_;
        s.captured = graph_captured_;
        s.replayed = graph_replayed_;
        s.failed = graph_failed_;
        s.held = int64_t(graphs_.size());
        return s;
    }

private:
    enum Buf { kX, kH, kQKV, kQ, kAtt, kGU, kAct, kKs, kVs, kKc, kVc, kRope, kMeta, kRowMax, kHead, kKept, kKeptMax,
               kStep, kMask };
    template <class T = uint16_t> T *b(Buf i) const { return static_cast<T *>(bufs_[i]->get()); }

    // Runs f on the context's device; on any failure waits for the stream
    // (nothing may still run after we return) and clears the error.
    template <class F> void guarded(F &&f) {
        DIMOO_CUDA(cudaSetDevice(m_.device_));
        try {
            f();
        } catch (...) {
            cudaStreamSynchronize(stream_.s);
            cudaGetLastError();
            throw;
        }
    }

    void need_kept(const char *who) const {
        if (p_.keep_cols <= 0)
            fail(DIMOO_ERR_INVALID_ARGUMENT, std::string(who) + " needs a context created with keep_cols > 0");
    }

    // Kept logits of a seq (its slots at a stride of their column count) and their maxima.
    float *kept(int seq) const { return reinterpret_cast<float *>(b<uint8_t>(kKept) + size_t(seq) * kept_stride_); }
    float *kept_max(int seq) const { return b<float>(kKeptMax) + size_t(seq) * size_t(p_.max_tokens); }
    // Slots a seq holds for rows of `cols` columns (backend.h).
    int kept_cap(int cols) const {
        return int(std::min<int64_t>(p_.max_tokens, int64_t(p_.keep_rows) * p_.keep_cols / std::max(cols, 1)));
    }
    int32_t *step_in() const { return b<int32_t>(kStep); }
    uint8_t *step_work() const { return b<uint8_t>(kStep) + step_in_; }
    uint8_t *step_sel() const { return b<uint8_t>(kStep) + step_in_ + step_work_; }
    uint8_t *pin_in() const { return static_cast<uint8_t *>(pinned_->get()); }
    uint8_t *pin_out() const { return static_cast<uint8_t *>(pinned_->get()) + meta_bytes_; }

    void h2d(void *dst, const void *src, size_t bytes) {
        if (bytes) DIMOO_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_.s));
    }
    void d2h(void *dst, const void *src, size_t bytes) {
        if (bytes) DIMOO_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_.s));
    }
    void sync() {
        DIMOO_CUDA(cudaStreamSynchronize(stream_.s));
        DIMOO_CUDA(cudaGetLastError());
    }

    // What the layer stack of one forward reads besides the weights.
    struct Stack {
        int M, n, max_q;
        const int32_t *tok, *pos, *seq;
        const cuda::AttnSeq *seqs;
        const cuda::AttnSeq *host_seqs; // the same, on the host (the TMA kernel's maps)
        AttnImpl attn;                  // the attention kernel of this call
    };

    // Embedding and every layer, enqueued on the stream; `cancel` (null while
    // capturing a graph) is polled between layers.
    void layers(const Stack &st, const std::atomic<bool> *cancel) {
        const auto &S = m_.shape_;
        const auto &c = S.cfg;
        const int d = c.d_model, kv = S.kv_dim, mlp = c.mlp_hidden_size, L = c.n_layers, M = st.M;
        const auto &W = m_.lay_;
        float *x = b<float>(kX);
        {
            NvtxRange r("embed");
            DIMOO_CUDA(embed_launch(m_.bf(W.wte), st.tok, x, M, d, stream_.s));
        }
        for (int l = 0; l < L; l++) {
            if (cancel && cancel->load(std::memory_order_relaxed)) fail(DIMOO_ERR_CANCELLED, "forward cancelled");
            NvtxRange rl(layer_names_[size_t(l)].c_str());
            const auto &Lw = W.layers[size_t(l)];
            {
                NvtxRange ra("attention");
                DIMOO_CUDA(
                    rmsnorm_f32_bf16_launch(x, nullptr, m_.f32(Lw.attn_norm), b(kH), M, d, c.rms_norm_eps, stream_.s));
                lt_->run(M, d + 2 * kv, d, b(kH), d, m_.bf(Lw.wqkv), d, b(kQKV), d + 2 * kv, DIMOO_BF16, false);
                RopeArgs ra_{b(kQKV), b(kQ),  b<float>(kRope), p_.max_tokens, st.pos, st.seq,
                             st.seqs, l,      M,               d,             kv,     S.head_dim};
                DIMOO_CUDA(rope_kv_launch(ra_, stream_.s));
                AttnArgs aa{b(kQ), d,          b(kAtt),      d,          st.seqs, st.n, st.max_q, l, c.n_heads,
                            c.n_kv_heads, S.head_dim, kv, 1.0f / std::sqrt(float(S.head_dim)), st.host_seqs};
                DIMOO_CUDA(attention_launch(aa, st.attn, stream_.s));
                lt_->run(M, d, d, b(kAtt), d, m_.bf(Lw.wo), d, x, d, DIMOO_F32, true);
            }
            {
                NvtxRange rm("mlp");
                DIMOO_CUDA(
                    rmsnorm_f32_bf16_launch(x, nullptr, m_.f32(Lw.ff_norm), b(kH), M, d, c.rms_norm_eps, stream_.s));
                lt_->run(M, 2 * mlp, d, b(kH), d, m_.bf(Lw.wgu), d, b(kGU), 2 * mlp, DIMOO_BF16, false);
                DIMOO_CUDA(swiglu_launch(b(kGU), b(kAct), M, mlp, stream_.s));
                lt_->run(M, d, mlp, b(kAct), mlp, m_.bf(Lw.wdown), mlp, x, d, DIMOO_F32, true);
            }
        }
    }

    // The layer stack captured into a graph (and held under key), or null
    // when capturing failed: the caller then runs the stack without one,
    // and this context stops trying.
    cudaGraphExec_t capture(const Stack &st, const GraphKey &key) {
        NvtxRange r("capture layer stack");
        if (cudaStreamBeginCapture(stream_.s, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
            cudaGetLastError();
            graph_failed_++;
            graphs_on_ = false;
            return nullptr;
        }
        bool ok = true;
        try {
            layers(st, nullptr);
        } catch (...) {
            ok = false;
        }
        cudaGraph_t graph = nullptr;
        cudaError_t e = cudaStreamEndCapture(stream_.s, &graph);
        cudaGraphExec_t exec = nullptr;
        if (ok && e == cudaSuccess && graph) e = cudaGraphInstantiate(&exec, graph, 0ULL);
        if (graph) cudaGraphDestroy(graph);
        if (!ok || e != cudaSuccess || !exec) {
            if (exec) cudaGraphExecDestroy(exec);
            cudaGetLastError();
            graph_failed_++;
            graphs_on_ = false;
            return nullptr;
        }
        graphs_.put(key, exec);
        graph_captured_++;
        return exec;
    }

    void run(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel,
             const int32_t *const *keep_slots) {
        NvtxRange r_fwd("forward");
        const auto &S = m_.shape_;
        const int kv = S.kv_dim, L = S.cfg.n_layers;
        const cuda::BatchPlan plan = cuda::make_plan(args, n, kv, L, p_.max_tokens, b(kKs), b(kVs), b(kKc), b(kVc));
        const int M = plan.M, O = int(plan.out_rows.size());
        const size_t Mx = size_t(p_.n_seqs) * p_.max_tokens;
        if (size_t(M) > Mx || size_t(O) > Mx || size_t(n) > size_t(p_.n_seqs))
            fail(DIMOO_ERR_INTERNAL, "batch larger than the context");

        // Per-call metadata, packed in pinned staging and copied with one
        // upload into the fixed metadata buffer before anything reads it:
        // the seqs, then tok | pos | seq (M each) | out rows | keep slots (O
        // each, by output row). The stack's pointers depend on M only.
        uint8_t *h = pin_in();
        std::memcpy(h, plan.seqs.data(), plan.seqs.size() * sizeof(cuda::AttnSeq));
        int32_t *hi = reinterpret_cast<int32_t *>(h + seqs_bytes_);
        std::memcpy(hi, plan.tok.data(), size_t(M) * 4);
        std::memcpy(hi + M, plan.pos.data(), size_t(M) * 4);
        std::memcpy(hi + 2 * M, plan.seq_of.data(), size_t(M) * 4);
        if (O) std::memcpy(hi + 3 * M, plan.out_rows.data(), size_t(O) * 4);
        int32_t *hk = hi + 3 * M + O;
        for (int i = 0; i < n; i++)
            if (args[i].keep && plan.out_count[size_t(i)] > 0)
                std::memcpy(hk + plan.out_begin[size_t(i)], keep_slots[i], size_t(plan.out_count[size_t(i)]) * 4);
        h2d(b<uint8_t>(kMeta), h, seqs_bytes_ + (size_t(3) * M + size_t(2) * O) * 4);
        const auto *dseqs = reinterpret_cast<const cuda::AttnSeq *>(b<uint8_t>(kMeta));
        const int32_t *d_tok = reinterpret_cast<const int32_t *>(b<uint8_t>(kMeta) + seqs_bytes_);
        const int32_t *d_pos = d_tok + M, *d_seq = d_tok + 2 * M, *d_out = d_tok + 3 * M, *d_keep = d_out + O;
        bool compact = false; // some sequence has fewer query rows than keys
        for (const auto &sq : plan.seqs) compact = compact || sq.q_len < sq.kv_len;
        const Stack st{M, n, plan.max_q, d_tok, d_pos, d_seq, dseqs, plan.seqs.data(), compact ? attn_use_ : attn_};

        if (cancel.load(std::memory_order_relaxed)) fail(DIMOO_ERR_CANCELLED, "forward cancelled");
        cudaGraphExec_t g = nullptr;
        if (graphs_on_) {
            // The kernel follows from the key's lengths (compact or not).
            const GraphKey key = graph_key(args, n, plan, attention_uses_tma(st.attn));
            g = graphs_.find(key);
            if (!g && graphs_.repeats(key)) g = capture(st, key);
        }
        if (g) {
            NvtxRange r("layer stack (graph)");
            DIMOO_CUDA(cudaGraphLaunch(g, stream_.s));
            graph_replayed_++;
        } else {
            layers(st, &cancel);
        }
        if (O > 0) head(args, n, plan, d_out, d_keep, keep_slots);
        sync();
    }

    // Final norm on the output rows only (gathered in the same pass), then
    // each argument's logits: straight into its kept slots when they are
    // 0, 1, ... in order, else through the work buffer (in chunks of rows)
    // to scattered slots and/or the caller's host buffer.
    void head(const dimoo_forward_args *args, int n, const cuda::BatchPlan &plan, const int32_t *d_out,
              const int32_t *d_keep, const int32_t *const *keep_slots) {
        NvtxRange r("head");
        const auto &c = m_.shape_.cfg;
        const int d = c.d_model, O = int(plan.out_rows.size());
        const auto &W = m_.lay_;
        DIMOO_CUDA(rmsnorm_f32_bf16_launch(b<float>(kX), d_out, m_.f32(W.lnf), b(kH), O, d, c.rms_norm_eps, stream_.s));
        float *rmax = b<float>(kRowMax);
        for (int i = 0; i < n; i++) {
            const auto &a = args[i];
            const int rows = plan.out_count[size_t(i)], r0 = plan.out_begin[size_t(i)];
            if (rows == 0 || (!a.logits && !a.keep)) continue;
            const int vb = a.vocab_begin, ve = a.vocab_end == 0 ? c.embedding_size : a.vocab_end, cols = ve - vb;
            const uint16_t *hx = b(kH) + size_t(r0) * d, *wh = m_.bf(W.head) + size_t(vb) * d;
            if (a.keep) {
                if (cols > p_.keep_cols || rows > kept_cap(cols)) fail(DIMOO_ERR_INTERNAL, "kept rows exceed the context");
                bool in_order = true;
                for (int j = 0; in_order && j < rows; j++) in_order = keep_slots[i][j] == j;
                if (in_order) {
                    float *kb = kept(a.seq), *km = kept_max(a.seq);
                    lt_->run(rows, cols, d, hx, d, wh, d, kb, cols, DIMOO_F32, false, LtGemm::kUntuned);
                    DIMOO_CUDA(rowmax_launch(kb, rows, cols, cols, km, stream_.s));
                    if (a.logits) d2h(a.logits, kb, size_t(rows) * cols * 4);
                    if (a.row_max) d2h(a.row_max, km, size_t(rows) * 4);
                    continue;
                }
            }
            const int chunk = int(std::max<size_t>(1, head_ws_ / (size_t(cols) * 4)));
            float *w = b<float>(kHead);
            for (int r = 0; r < rows; r += chunk) {
                const int m = std::min(chunk, rows - r);
                lt_->run(m, cols, d, hx + size_t(r) * d, d, wh, d, w, cols, DIMOO_F32, false, LtGemm::kUntuned);
                if (a.keep || a.row_max) DIMOO_CUDA(rowmax_launch(w, m, cols, cols, rmax + r0 + r, stream_.s));
                if (a.keep)
                    DIMOO_CUDA(kept_scatter_launch(w, cols, rmax + r0 + r, m, cols, d_keep + r0 + r, kept(a.seq),
                                                   kept_max(a.seq), stream_.s));
                // Pageable host memory: the copy is done when the call returns,
                // so the next chunk may reuse the work buffer.
                if (a.logits) d2h(a.logits + size_t(r) * cols, w, size_t(m) * cols * 4);
            }
            if (a.row_max) d2h(a.row_max, rmax + r0, size_t(rows) * 4);
        }
    }

    void image(const ImageStepCall &c) {
        need_kept("image step");
        NvtxRange r("image step");
        const dimoo_image_step_args &a = *c.a;
        const int n = a.n_pos, nb = a.n_branches, k = a.n_select, C = c.n_codes;
        if (n == 0) return;
        if (n > p_.max_tokens || C > p_.keep_cols) fail(DIMOO_ERR_INTERNAL, "image step larger than the context");
        if (size_t(C) * 4 + 1024 > size_t(smem_optin_))
            fail(DIMOO_ERR_UNSUPPORTED, "image step over " + std::to_string(C) +
                                            " columns: the CUDA image sampler holds a guided row in shared memory, " +
                                            std::to_string((smem_optin_ - 1024) / 4) + " columns at most on this device");
        // Slot arrays of each branch, then the Philox positions.
        int32_t *hi = reinterpret_cast<int32_t *>(pin_in());
        for (int bb = 0; bb < nb; bb++) std::memcpy(hi + size_t(bb) * n, c.slots[bb], size_t(n) * 4);
        for (int i = 0; i < n; i++) hi[size_t(nb) * n + i] = a.offsets[0] + a.masked[i];
        int32_t *din = step_in();
        h2d(din, hi, size_t(nb + 1) * n * 4);
        SampleDeviceArgs s;
        s.n_pos = n, s.n_branches = nb, s.n_codes = C, s.step = a.step, s.seed = a.seed, s.temperature = a.temperature;
        for (int bb = 0; bb < nb; bb++) {
            s.weights[bb] = a.weights[bb];
            s.logits[bb] = kept(a.seqs[bb]);
            s.rows[bb] = din + size_t(bb) * n;
        }
        s.rng_pos = din + size_t(nb) * n;
        s.n_select = k;
        // Every position's (conf, code) contiguous; the selection's (conf,
        // index, code) contiguous: one copy brings back what the caller wants.
        s.conf = reinterpret_cast<double *>(step_work());
        s.codes = reinterpret_cast<int32_t *>(step_work() + size_t(n) * 8);
        s.sel_conf = reinterpret_cast<double *>(step_sel());
        s.sel = reinterpret_cast<int32_t *>(step_sel() + size_t(k) * 8);
        s.sel_codes = s.sel + k;
        DIMOO_CUDA(cuda_sample_image(s, stream_.s));
        uint8_t *ho = pin_out();
        if (k == 0) d2h(ho, step_work(), size_t(n) * 12);
        else d2h(ho, step_sel(), size_t(k) * 16);
        sync();
        if (k == 0) {
            std::memcpy(a.out_codes, ho + size_t(n) * 8, size_t(n) * 4);
            if (a.out_conf) std::memcpy(a.out_conf, ho, size_t(n) * 8);
        } else {
            std::memcpy(a.out_selected, ho + size_t(k) * 8, size_t(k) * 4);
            std::memcpy(a.out_codes, ho + size_t(k) * 12, size_t(k) * 4);
            if (a.out_conf) std::memcpy(a.out_conf, ho, size_t(k) * 8);
        }
    }

    void text(const TextStepCall &c) {
        need_kept("text step");
        NvtxRange r("text step");
        const dimoo_text_step_args &a = *c.a;
        const int n = a.n_pos, k = a.n_select;
        if (n == 0) return;
        if (n > p_.max_tokens || c.n_cols > p_.keep_cols) fail(DIMOO_ERR_INTERNAL, "text step larger than the context");
        const bool guided = a.uncond_seq >= 0;
        if (a.use_mask && mask_len_ == 0) fail(DIMOO_ERR_INVALID_ARGUMENT, "use_mask without a token mask");
        // Positions, then the cond and uncond slots.
        int32_t *hi = reinterpret_cast<int32_t *>(pin_in());
        std::memcpy(hi, a.positions, size_t(n) * 4);
        std::memcpy(hi + n, c.slots, size_t(n) * 4);
        if (guided) std::memcpy(hi + 2 * size_t(n), c.uncond_slots, size_t(n) * 4);
        int32_t *din = step_in();
        h2d(din, hi, size_t(guided ? 3 : 2) * n * 4);
        TextSampleDeviceArgs t;
        t.n_pos = n, t.n_cols = c.n_cols, t.col_begin = c.vocab_begin, t.step = a.step, t.seed = a.seed;
        t.temperature = a.temperature, t.cfg_scale = a.cfg_scale;
        t.cond = kept(a.seq);
        t.cond_rows = din + n;
        if (guided) {
            t.uncond = kept(a.uncond_seq);
            t.uncond_rows = din + 2 * size_t(n);
        }
        if (a.use_mask) t.mask = b<uint8_t>(kMask), t.mask_len = mask_len_;
        t.positions = din;
        t.n_select = k;
        // conf, then tokens | selected positions | their tokens, contiguous.
        t.conf = reinterpret_cast<double *>(step_work());
        t.tokens = reinterpret_cast<int32_t *>(step_work() + size_t(n) * 8);
        t.sel_pos = t.tokens + n;
        t.sel_tokens = t.sel_pos + k;
        DIMOO_CUDA(cuda_sample_text(t, stream_.s));
        int32_t *ho = reinterpret_cast<int32_t *>(pin_out());
        if (a.out_all_tokens) d2h(ho, t.tokens, size_t(n + 2 * k) * 4);
        else d2h(ho + n, t.sel_pos, size_t(2 * k) * 4);
        sync();
        if (a.out_all_tokens) std::memcpy(a.out_all_tokens, ho, size_t(n) * 4);
        if (k) {
            std::memcpy(a.out_positions, ho + n, size_t(k) * 4);
            std::memcpy(a.out_tokens, ho + n + k, size_t(k) * 4);
        }
    }

    int select(int seq, const int32_t *slots, int n, double q, int32_t *out) {
        need_kept("cache select");
        NvtxRange r("cache select");
        if (seq < 0 || seq >= p_.n_seqs || n < 1 || n > p_.max_tokens)
            fail(DIMOO_ERR_INVALID_ARGUMENT, "cache select over " + std::to_string(n) + " rows of seq " +
                                                 std::to_string(seq) + " is outside the context");
        int32_t *hi = reinterpret_cast<int32_t *>(pin_in());
        std::memcpy(hi, slots, size_t(n) * 4);
        int32_t *din = step_in();
        h2d(din, hi, size_t(n) * 4);
        // The maxima gathered through the slots (positions 0..n-1 in order),
        // then the count and the list, contiguous.
        float *mx = reinterpret_cast<float *>(step_work());
        int32_t *cnt = reinterpret_cast<int32_t *>(step_work() + size_t(n) * 4);
        DIMOO_CUDA(gather_f32_launch(kept_max(seq), din, n, mx, stream_.s));
        DIMOO_CUDA(cuda_cache_select(mx, n, q, cnt + 1, cnt, nullptr, stream_.s));
        int32_t *ho = reinterpret_cast<int32_t *>(pin_out());
        d2h(ho, cnt, size_t(n + 1) * 4);
        sync();
        const int k = ho[0];
        if (k < 0 || k > n) fail(DIMOO_ERR_INTERNAL, "cache select returned " + std::to_string(k) + " positions");
        std::memcpy(out, ho + 1, size_t(k) * 4);
        return k;
    }

    void load(int seq, const int32_t *slots, int n, int n_cols, const float *rows) {
        need_kept("load_kept");
        if (seq < 0 || seq >= p_.n_seqs || n < 0 || n_cols < 1 || n_cols > p_.keep_cols || n > kept_cap(n_cols))
            fail(DIMOO_ERR_INVALID_ARGUMENT, "load_kept: " + std::to_string(n) + " rows of " + std::to_string(n_cols) +
                                                 " columns into seq " + std::to_string(seq) + " do not fit the context");
        for (int i = 0; i < n; i++)
            if (slots[i] < 0 || slots[i] >= kept_cap(n_cols))
                fail(DIMOO_ERR_INVALID_ARGUMENT, "load_kept: slot " + std::to_string(slots[i]) + " out of range");
        if (n == 0) return;
        int32_t *hi = reinterpret_cast<int32_t *>(pin_in());
        std::memcpy(hi, slots, size_t(n) * 4);
        int32_t *din = step_in();
        h2d(din, hi, size_t(n) * 4);
        const int chunk = int(std::max<size_t>(1, head_ws_ / (size_t(n_cols) * 4)));
        float *w = b<float>(kHead);
        for (int r = 0; r < n; r += chunk) {
            const int m = std::min(chunk, n - r);
            // Pageable source: staged before the call returns; stream order
            // keeps the next chunk's upload behind this chunk's scatter.
            h2d(w, rows + size_t(r) * n_cols, size_t(m) * n_cols * 4);
            DIMOO_CUDA(kept_scatter_launch(w, n_cols, nullptr, m, n_cols, din + r, kept(seq), kept_max(seq), stream_.s));
        }
        sync();
    }

    const CudaModel &m_;
    const dimoo_ctx_params p_;
    size_t seqs_bytes_ = 0, meta_bytes_ = 0, head_ws_ = 0, kept_stride_ = 0, step_in_ = 0, step_work_ = 0,
           step_sel_ = 0, pin_out_ = 0;
    std::vector<size_t> sizes_;
    std::vector<std::unique_ptr<DeviceBuffer>> bufs_;
    std::unique_ptr<PinnedBuffer> pinned_;
    // Destroyed in reverse order: the graphs, the cuBLASLt plans, then the
    // stream (after its work has finished), then the buffers that work used.
    struct Stream {
        cudaStream_t s = nullptr;
        ~Stream() {
            if (s) {
                cudaStreamSynchronize(s);
                cudaStreamDestroy(s);
            }
        }
    } stream_;
    std::unique_ptr<LtGemm> lt_;
    AttnImpl attn_ = AttnImpl::Sm80, attn_use_ = AttnImpl::Sm80;
    int smem_optin_ = 48 * 1024;
    int32_t mask_len_ = 0;
    std::vector<std::string> layer_names_;
    bool graphs_on_ = true;
    int64_t graph_captured_ = 0, graph_replayed_ = 0, graph_failed_ = 0;
    GraphCache graphs_;
};

std::unique_ptr<Ctx> CudaModel::create_ctx(const dimoo_ctx_params &p) { return std::make_unique<CudaCtx>(*this, p); }

} // namespace

Estimate cuda_estimate(const ModelShape &s, const dimoo_ctx_params *p) {
    cuda_check_precision(s);
    Estimate e;
    e.model = int64_t(WeightLayout(s).total);
    if (p) e.ctx = int64_t(CtxPlan(s, *p).bytes());
    return e;
}

namespace {

class CudaBackend : public Backend {
public:
    explicit CudaBackend(int device) : device_(device) {
        int n = cuda_device_count();
        if (n == 0) fail(DIMOO_ERR_UNSUPPORTED, "no CUDA device is available (no GPU or no driver)");
        if (device < 0 || device >= n)
            fail(DIMOO_ERR_INVALID_ARGUMENT,
                 "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " visible)");
        DIMOO_CUDA(cudaSetDevice(device));
        DIMOO_CUDA(cudaGetDeviceProperties(&prop_, device));
        // bf16 tensor cores (mma.sync m16n8k16 bf16) start with sm_80; the
        // library carries sm_80 and sm_90a code and sm_80 PTX for newer ones.
        if (prop_.major < 8)
            fail(DIMOO_ERR_UNSUPPORTED, "CUDA device " + std::to_string(device) + " (" + prop_.name + ", sm_" +
                                            std::to_string(prop_.major) + std::to_string(prop_.minor) +
                                            ") is not supported: dimoo's CUDA kernels need sm_80 or newer");
    }

    std::string describe() const override {
        char buf[256];
        // The attention kernel a head-dim-128 model (DiMOO's) runs with: on
        // sm_90 this is where its start-up check runs, if nothing ran it yet.
        std::snprintf(buf, sizeof buf, "cuda:%d %s (sm_%d%d, %.1f GiB, %d SMs), attention %s", device_, prop_.name,
                      prop_.major, prop_.minor, double(prop_.totalGlobalMem) / (1024.0 * 1024 * 1024),
                      prop_.multiProcessorCount, attention_impl_name(attention_default_impl(128)));
        return buf;
    }

    std::unique_ptr<Model> create_model(const ModelShape &shape) override {
        cuda_check_precision(shape);
        DIMOO_CUDA(cudaSetDevice(device_));
        return std::make_unique<CudaModel>(shape, device_);
    }

    std::unique_ptr<VqDevice> create_vq(const vq::Model &m) override {
        DIMOO_CUDA(cudaSetDevice(device_));
        return make_cuda_vq(m, device_);
    }

private:
    int device_;
    cudaDeviceProp prop_{};
};

} // namespace

void cuda_fill_random_weights(Model &m, uint64_t seed) {
    auto *cm = dynamic_cast<CudaModel *>(&m);
    if (!cm) fail(DIMOO_ERR_INVALID_ARGUMENT, "not a CUDA model");
    cm->fill_random(seed);
}

CudaGraphStats cuda_graph_stats(const Ctx &c) {
    const auto *cc = dynamic_cast<const CudaCtx *>(&c);
    if (!cc) fail(DIMOO_ERR_INVALID_ARGUMENT, "not a CUDA context");
    return cc->graph_stats();
}

CudaGemmStats cuda_gemm_stats(const Ctx &c) {
    const auto *cc = dynamic_cast<const CudaCtx *>(&c);
    if (!cc) fail(DIMOO_ERR_INVALID_ARGUMENT, "not a CUDA context");
    return cc->gemm_stats();
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

} // namespace dimoo
