// cpu_backend.cpp - the CPU backend. Two forwards:
//  - packed (bf16 or fp32 checkpoints): every matrix but the embedding packed
//    once at load into 32-row panels (bf16.h). bf16: every GEMM input and
//    attention's Q, K, V and P rounded to bf16 as the official model computes
//    them, VDPBF16PS tiles; fp32: fp32 throughout (the reference other
//    backends are tested against). fp32 accumulation and an fp32 residual
//    stream in both; flash-style attention. One OpenMP parallel region per
//    forward; each layer stage is work-shared with dynamically handed out
//    tiles, so a thread whose core is busy elsewhere just takes fewer.
//  - per call (fp16 or mixed checkpoints, or DIMOO_CPU_PACKED=0): fp32
//    activations, the blocked GEMM of gemm.cpp converting weights as it packs
//    them, a parallel region per operation.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu/bf16.h"
#include "cpu/gemm.h"
#include "cpu/kept.h"
#include "host_memory.h"
#include "vecmath.h"

namespace dimoo {
namespace {

// Weights stay in their checkpoint dtype (half the memory for bf16); the
// GEMM converts panels to fp32 as it packs them.
struct Tensor {
    int32_t dtype = DIMOO_F32;
    LineVector<uint8_t> data;
    const void *ptr() const { return data.data(); }
};

// DIMOO_CPU_PACKED=0: precision AUTO keeps the per-call packing path of a
// checkpoint as stored (for A/B benchmarks).
bool packing_disabled() {
    const char *e = std::getenv("DIMOO_CPU_PACKED");
    return e && std::string(e) == "0";
}

// The bf16 path packs K and V through a 1024-element row buffer.
void check_cpu_precision(const ModelShape &s) {
    if (s.cfg.precision == DIMOO_PRECISION_BF16 && (s.head_dim % 2 != 0 || s.head_dim > 1024))
        fail(DIMOO_ERR_UNSUPPORTED, "precision bf16 on the CPU needs an even head dim of at most 1024, got " +
                                        std::to_string(s.head_dim));
}

void rmsnorm_rows(const float *x, const float *w, float *out, int rows, int cols, float eps) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + size_t(r) * cols;
        float *orow = out + size_t(r) * cols;
        const double ss = sum_squares(xr, cols);
        float inv = 1.0f / std::sqrt(float(ss / cols) + eps);
        for (int c = 0; c < cols; c++) orow[c] = xr[c] * inv * w[c];
    }
}

class CpuCtx;

class CpuModel : public Model {
public:
    CpuModel(const ModelShape &s, int n_threads)
        : shape_(s), n_threads_(n_threads), w_(s.n_weights()), kind_of_slot_(s.n_weights(), WeightId{WeightKind::Embedding, -1}) {
        kind_of_slot_[s.slot({WeightKind::FinalNorm, -1})] = {WeightKind::FinalNorm, -1};
        kind_of_slot_[s.slot({WeightKind::Head, -1})] = {WeightKind::Head, -1};
        for (int l = 0; l < s.cfg.n_layers; l++)
            for (int k = int(WeightKind::AttnNorm); k <= int(WeightKind::FFOut); k++)
                kind_of_slot_[s.slot({WeightKind(k), l})] = {WeightKind(k), l};
        check_cpu_precision(s);
        // The weights take at least 2 bytes a parameter (4 at precision
        // F32): refused before the first tensor when even that does not fit.
        int64_t params = 0;
        for (int slot = 0; slot < s.n_weights(); slot++) {
            int64_t n = 1;
            for (auto d : s.expected_shape(kind_of_slot_[slot])) n *= d;
            params += n;
        }
        const int bytes = s.cfg.precision == DIMOO_PRECISION_F32 ? 4 : 2;
        check_host_room(size_t(params) * size_t(bytes), "the model's weights (" + std::to_string(params) +
                                                             " parameters at " + std::to_string(bytes) + " bytes)");
    }

    void set_weight(WeightId id, int32_t dtype, const void *data, size_t nbytes) override {
        const int slot = shape_.slot(id);
        Tensor &t = w_[slot];
        const int32_t prec = shape_.cfg.precision;
        bool norm = id.kind == WeightKind::AttnNorm || id.kind == WeightKind::FFNorm || id.kind == WeightKind::FinalNorm;
        if (norm) { // tiny vectors: keep as fp32 so the norms read them directly
            size_t n = nbytes / dtype_size(dtype);
            t.dtype = DIMOO_F32;
            t.data.resize(n * 4);
            float *dst = reinterpret_cast<float *>(t.data.data());
            for (size_t i = 0; i < n; i++) dst[i] = load_as_f32(data, dtype, i);
            return;
        }
        if (is_matrix(slot)) { // a weight set again replaces what was packed of it
            if (size_t(slot) < packed_.size()) packed_[slot] = cpu::PackedMatrix{};
            if (size_t(slot) < packed_f32_.size()) packed_f32_[slot] = cpu::PackedMatrixF32{};
        }
        if (is_matrix(slot) && (prec != DIMOO_PRECISION_AUTO || auto_packs(dtype))) {
            // The precision is known: packed straight from the caller's
            // data, so an fp32 checkpoint never has a wide copy here (peak
            // memory: the packed weights, not twice the checkpoint).
            // AUTO packs a bf16 (fp32) matrix as it arrives too, as BF16
            // (F32) would, betting on a checkpoint stored all in bf16 (all
            // in fp32); finalize unpacks the bet for a mixed one. So the
            // usual load never copies the checkpoint first (for the real
            // one: 16 GB written and freed again).
            const bool bf = prec == DIMOO_PRECISION_BF16 || (prec == DIMOO_PRECISION_AUTO && dtype == DIMOO_BF16);
            const auto dims = shape_.expected_shape(id);
            const size_t N = size_t(dims[0]), K = size_t(dims[1]), panels = (N + cpu::kPanel - 1) / cpu::kPanel;
            check_host_room(bf ? panels * ((K + 1) / 2) * 128 : panels * K * cpu::kPanel * 4, shape_.name_of(id));
            if (bf) {
                packed_.resize(w_.size());
                cpu::pack_matrix(data, dtype, int(N), int(K), packed_[slot]);
            } else {
                packed_f32_.resize(w_.size());
                cpu::pack_matrix_f32(data, dtype, int(N), int(K), packed_f32_[slot]);
            }
            t.dtype = dtype;
            LineVector<uint8_t>().swap(t.data);
            return;
        }
        if (prec == DIMOO_PRECISION_BF16 && dtype != DIMOO_BF16) {
            // The embedding, in bf16 as the official model holds it.
            const size_t n = nbytes / dtype_size(dtype);
            check_host_room(n * 2, shape_.name_of(id));
            t.data.resize(n * 2);
            uint16_t *dst = reinterpret_cast<uint16_t *>(t.data.data());
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < n; i++) dst[i] = f32_to_bf16(load_as_f32(data, dtype, i));
            t.dtype = DIMOO_BF16;
            return;
        }
        check_host_room(nbytes, shape_.name_of(id));
        t.dtype = dtype;
        t.data.assign(static_cast<const uint8_t *>(data), static_cast<const uint8_t *>(data) + nbytes);
    }

    // Every matrix but the embedding is packed once (bf16 pair panels, or
    // fp32 panels) and its checkpoint copy freed. Precision AUTO packs here:
    // bf16 checkpoints as bf16 and fp32 ones as fp32 (the same size up to
    // padding); fp16 or mixed checkpoints keep the per-call packing of
    // gemm.cpp. BF16 (rounding whatever is stored) and F32 (widening it)
    // packed each matrix as it arrived.
    void finalize() override {
        if (shape_.cfg.precision != DIMOO_PRECISION_AUTO) {
            kernels_ = cpu::best_kernels();
            return;
        }
        if (packing_disabled()) return;
        const int hd = shape_.head_dim;
        bool all_bf16 = hd % 2 == 0 && hd <= 1024, all_f32 = true;
        for (int s = 0; s < shape_.n_weights(); s++) {
            if (is_matrix(s) && w_[s].dtype != DIMOO_BF16) all_bf16 = false;
            if (is_matrix(s) && w_[s].dtype != DIMOO_F32) all_f32 = false;
        }
        const bool bf = all_bf16, f32 = !bf && all_f32;
        if (!bf && !f32) {
            // Mixed: the matrices set_weight packed go back to the layout
            // they came in (exactly), for the per-call packing path.
            for (int s = 0; s < shape_.n_weights(); s++) {
                if (size_t(s) < packed_.size() && !packed_[s].data.empty()) {
                    w_[s].data.resize(size_t(packed_[s].N) * size_t(packed_[s].K) * 2);
                    cpu::unpack_matrix(packed_[s], reinterpret_cast<uint16_t *>(w_[s].data.data()));
                    packed_[s] = cpu::PackedMatrix{};
                }
                if (size_t(s) < packed_f32_.size() && !packed_f32_[s].data.empty()) {
                    const auto &p = packed_f32_[s];
                    w_[s].data.resize(size_t(p.N) * size_t(p.K) * 4);
                    cpu::unpack_matrix_f32(p, reinterpret_cast<float *>(w_[s].data.data()));
                    packed_f32_[s] = cpu::PackedMatrixF32{};
                }
            }
            std::vector<cpu::PackedMatrix>().swap(packed_);
            std::vector<cpu::PackedMatrixF32>().swap(packed_f32_);
            return;
        }
        // One kind of packed matrices (packed() tells the forward which): the
        // other's slots can only be empty ones of weights set again.
        if (bf) {
            packed_.resize(w_.size());
            std::vector<cpu::PackedMatrixF32>().swap(packed_f32_);
        } else {
            packed_f32_.resize(w_.size());
            std::vector<cpu::PackedMatrix>().swap(packed_);
        }
        for (int s = 0; s < shape_.n_weights(); s++) {
            if (!is_matrix(s)) continue;
            if (bf ? !packed_[s].data.empty() : !packed_f32_[s].data.empty()) continue; // packed as it arrived
            const auto dims = shape_.expected_shape(kind_of_slot_[s]);
            if (bf) cpu::pack_matrix(w_[s].ptr(), w_[s].dtype, int(dims[0]), int(dims[1]), packed_[s]);
            else cpu::pack_matrix_f32(w_[s].ptr(), w_[s].dtype, int(dims[0]), int(dims[1]), packed_f32_[s]);
            LineVector<uint8_t>().swap(w_[s].data);
        }
        kernels_ = cpu::best_kernels();
    }

    int64_t weight_bytes() const override {
        int64_t b = 0;
        for (const auto &t : w_) b += int64_t(t.data.size());
        for (const auto &p : packed_) b += int64_t(p.bytes());
        for (const auto &p : packed_f32_) b += int64_t(p.bytes());
        return b;
    }

    bool packed_bf16() const { return !packed_.empty(); }
    bool packed_f32() const { return !packed_f32_.empty(); }
    bool packed() const { return packed_bf16() || packed_f32(); }
    cpu::Kernels kernels() const { return kernels_; }
    const cpu::PackedMatrix &pw(WeightKind k, int layer = -1) const { return packed_[shape_.slot({k, layer})]; }
    const cpu::PackedMatrixF32 &pwf(WeightKind k, int layer = -1) const {
        return packed_f32_[shape_.slot({k, layer})];
    }

    std::unique_ptr<Ctx> create_ctx(const dimoo_ctx_params &p) override;

    const Tensor &w(WeightKind k, int layer = -1) const { return w_[shape_.slot({k, layer})]; }
    const float *wf(WeightKind k, int layer = -1) const {
        return reinterpret_cast<const float *>(w(k, layer).ptr());
    }

    const ModelShape shape_;
    const int n_threads_;

private:
    // Whether precision AUTO packs a matrix of this dtype as it arrives:
    // what finalize would choose for a checkpoint stored all in it.
    bool auto_packs(int32_t dtype) const {
        if (packing_disabled()) return false;
        const int hd = shape_.head_dim;
        return (dtype == DIMOO_BF16 && hd % 2 == 0 && hd <= 1024) || dtype == DIMOO_F32;
    }

    bool is_matrix(int slot) const {
        const WeightKind k = kind_of_slot_[slot].kind;
        return k != WeightKind::Embedding && k != WeightKind::AttnNorm && k != WeightKind::FFNorm &&
               k != WeightKind::FinalNorm;
    }

    std::vector<Tensor> w_;
    std::vector<WeightId> kind_of_slot_;
    std::vector<cpu::PackedMatrix> packed_; // by slot; empty unless every matrix is bf16
    std::vector<cpu::PackedMatrixF32> packed_f32_; // by slot; empty unless every matrix is fp32
    cpu::Kernels kernels_ = cpu::Kernels::Portable;
};

constexpr int kGateRows = 8 * cpu::kTileRows; // rows per gate/up task of the MLP

// Element counts of every buffer a CPU context allocates (4-byte elements
// unless noted), for the constructor and for dimoo_estimate alike.
// Sequences whose rows the packed forward can take in one pass: the
// guidance branches of a step (two, or three for text and image guidance)
// read each weight once (measured 1.09-1.2x on a full step of the real
// model at 256x256 on 2 cores). More would grow the row buffers of a context
// of many slots (a server's) without more to gain.
constexpr int kBatchSeqs = 3;

struct CpuCtxSizes {
    size_t rows = 0;                         // rows one forward pass holds (all its sequences)
    size_t dp = 0, mp = 0, ast = 0, hst = 0; // A-operand row lengths and strides
    size_t x = 0, q = 0, k = 0, v = 0, abf = 0, qbf = 0, hbf = 0, kpack16 = 0, kpack_f32 = 0, scratch = 0;
    size_t h = 0, att = 0, g = 0, u = 0, kcache = 0, vcache = 0, rope = 0;
    size_t kvstride16 = 0, kcache16 = 0; // bf16: the caches packed (uint16 per KV head; for K and again V)
    int64_t kept = 0; // bytes of the kept logits (cpu::HostKept)

    // packed: the model packed its matrices (bf: as bf16 pairs); nt threads.
    CpuCtxSizes(const ModelShape &S, bool packed, bool bf, int nt, const dimoo_ctx_params &p) {
        const auto &c = S.cfg;
        const size_t T = size_t(p.max_tokens), d = size_t(c.d_model), kv = size_t(S.kv_dim),
                     mlp = size_t(c.mlp_hidden_size), n_kv = size_t(c.n_kv_heads), hd = size_t(S.head_dim);
        // bf16: K and V packed (uint16 each); fp32: K packed (floats), V in place.
        const size_t kv_elems = bf ? cpu::packed_kv_elems(int(T), int(hd)) : cpu::packed_k_f32_elems(int(T), int(hd));
        const size_t per_thread = std::max(cpu::flash_scratch_floats(int(hd)), size_t(2 * kGateRows * cpu::kPanel));
        // A-operand elements per row: bf16 pairs, or floats.
        dp = bf ? d / 2 : d;
        mp = bf ? (mlp + 1) / 2 : mlp;
        // Row strides of the A buffers: 64 bytes more than a row, so that the
        // 12 rows a micro-tile reads are not 4 KiB multiples apart (they
        // would share L1 sets; measured 1.4x slower at d = 4096).
        ast = dp + 16;
        hst = mp + 16;
        // The packed forward batches up to kBatchSeqs sequences' rows; the
        // per-call path runs one sequence at a time.
        rows = packed ? T * size_t(std::max(1, std::min(p.n_seqs, kBatchSeqs))) : T;
        const size_t R = rows;
        // + 32: the fp32 attention reads V panels up to 31 floats past the last row.
        x = R * d, q = R * d, k = R * kv, v = R * kv + 32;
        if (packed) {
            abf = R * ast;
            qbf = bf ? R * ast : 0;
            hbf = R * hst;
            kpack16 = bf ? n_kv * kv_elems : 0; // uint16, for K and again for V
            kpack_f32 = bf ? 0 : n_kv * kv_elems;
            scratch = size_t(nt) * per_thread;
        } else {
            h = T * d, att = T * d, g = T * mlp, u = T * mlp;
        }
        if (p.flags & DIMOO_CTX_KV_CACHE) {
            if (packed && bf) {
                // Kept as attention reads them (bf16, packed), written row
                // by row: half the bytes, and no packing per forward.
                kvstride16 = cpu::packed_kv_elems(int(T), int(hd));
                kcache16 = size_t(p.n_seqs) * c.n_layers * n_kv * kvstride16;
            } else {
                kcache = size_t(p.n_seqs) * c.n_layers * T * kv;
                vcache = kcache + 32;
            }
        }
        rope = T * size_t(S.head_dim / 2); // cos, and again sin
        if (p.keep_cols > 0)
            kept = cpu::HostKept::bytes_for(p.n_seqs, p.max_tokens, p.keep_rows, p.keep_cols, c.embedding_size);
    }
    int64_t bytes() const {
        return int64_t((x + q + k + v + abf + qbf + hbf + kpack_f32 + scratch + h + att + g + u + kcache + vcache +
                        2 * rope) *
                           4 +
                       2 * kpack16 * 2 + 2 * kcache16 * 2) +
               kept;
    }
};

class CpuCtx : public Ctx {
public:
    CpuCtx(const CpuModel &m, const dimoo_ctx_params &p) : m_(m), p_(p) {
        const auto &c = m.shape_.cfg;
        const size_t T = size_t(p.max_tokens);
        nt_ = m.n_threads_ > 0 ? m.n_threads_ : std::max(1, omp_get_max_threads());
        const CpuCtxSizes z(m.shape_, m.packed(), m.packed_bf16(), nt_, p);
        dp_ = z.dp, mp_ = z.mp, ast_ = z.ast, hst_ = z.hst, row_cap_ = int(z.rows);
        check_host_room(size_t(z.bytes()), "a context of " + std::to_string(T) + " tokens");
        if (p.keep_cols > 0)
            kept_ = std::make_unique<cpu::HostKept>(p.n_seqs, p.max_tokens, p.keep_rows, p.keep_cols, c.embedding_size);
        x_.resize(z.x);
        q_.resize(z.q);
        k_.resize(z.k);
        v_.resize(z.v);
        abf_.resize(z.abf);
        qbf_.resize(z.qbf);
        hbf_.resize(z.hbf);
        kpack_.resize(z.kpack16);
        vpack_.resize(z.kpack16);
        kpack_f32_.resize(z.kpack_f32);
        scratch_.resize(z.scratch);
        h_.resize(z.h);
        att_.resize(z.att);
        g_.resize(z.g);
        u_.resize(z.u);
        kcache_.resize(z.kcache);
        vcache_.resize(z.vcache);
        kvstride16_ = z.kvstride16;
        kcache16_.resize(z.kcache16);
        vcache16_.resize(z.kcache16);
        // RoPE table computed the way the reference does, in fp32:
        // inv_freq_i = 1 / theta^(2i/hd), angle = float(pos) * inv_freq_i.
        const int half = m.shape_.head_dim / 2;
        cos_.resize(T * half);
        sin_.resize(T * half);
        std::vector<float> inv_freq(half);
        for (int i = 0; i < half; i++)
            inv_freq[i] = 1.0f / std::pow(c.rope_theta, float(2 * i) / float(m.shape_.head_dim));
        for (size_t t = 0; t < T; t++)
            for (int i = 0; i < half; i++) {
                float a = float(t) * inv_freq[i];
                cos_[t * half + i] = std::cos(a);
                sin_[t * half + i] = std::sin(a);
            }
    }

    int64_t bytes() const override {
        size_t n = x_.size() + h_.size() + q_.size() + k_.size() + v_.size() + att_.size() + g_.size() + u_.size() +
                   kcache_.size() + vcache_.size() + cos_.size() + sin_.size() + abf_.size() + qbf_.size() +
                   hbf_.size() + scratch_.size() + kpack_f32_.size();
        return int64_t(n * sizeof(float) +
                       (kpack_.size() + vpack_.size() + kcache16_.size() + vcache16_.size()) * sizeof(uint16_t)) +
               (kept_ ? kept_->bytes() : 0);
    }

    void forward(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel,
                 const int32_t *const *keep_slots) override {
        ThreadScope ts(m_.n_threads_);
        const bool packed = m_.packed();
        for (int g0 = 0; g0 < n;) {
            // A group: consecutive sequences whose rows fit the buffers
            // together (a step's guidance branches, up to kBatchSeqs full
            // sequences or more ML-Cache ones), batched. Without packed
            // weights, one at a time.
            int g1 = g0 + 1, rows = run_rows(args[g0]);
            while (packed && g1 < n && rows + run_rows(args[g1]) <= row_cap_) rows += run_rows(args[g1++]);
            std::vector<dimoo_forward_args> as(args + g0, args + g1);
            std::vector<std::vector<float>> own(as.size()); // kept rows of the group past the first in scratch
            std::vector<char> post(as.size(), 0);
            bool scratch_used = false;
            for (size_t i = 0; i < as.size(); i++) {
                dimoo_forward_args &a = as[i];
                if (!a.keep) continue;
                // Rows to keep come out of the head into the caller's buffer,
                // or into scratch when the caller wants none, then go to
                // their slots; straight into the slots when in order.
                const int32_t *slots = keep_slots[g0 + int(i)];
                const int cols = logit_cols(a), nr = kept_rows(a);
                bool in_order = !a.logits && !a.row_max;
                for (int j = 0; in_order && j < nr; j++) in_order = slots[j] == j;
                if (in_order) {
                    a.logits = kept_->slot_rows(a.seq);
                    a.row_max = kept_->slot_max(a.seq);
                    continue;
                }
                post[i] = 1;
                if (a.logits && a.row_max) continue;
                if (!scratch_used) {
                    scratch_used = true;
                    if (!a.logits) a.logits = kept_->scratch_rows();
                    if (!a.row_max) a.row_max = kept_->scratch_max();
                    continue;
                }
                own[i].resize(size_t(nr) * size_t(cols) + size_t(nr));
                if (!a.logits) a.logits = own[i].data();
                if (!a.row_max) a.row_max = own[i].data() + size_t(nr) * size_t(cols);
            }
            if (m_.packed_bf16()) forward_packed<true>(as.data(), int(as.size()), cancel);
            else if (m_.packed_f32()) forward_packed<false>(as.data(), int(as.size()), cancel);
            else forward_one(as[0], cancel);
            for (size_t i = 0; i < as.size(); i++) {
                if (!post[i]) continue;
                const dimoo_forward_args &a = as[i];
                kept_->write(a.seq, keep_slots[g0 + int(i)], kept_rows(a), logit_cols(a), a.logits, a.row_max);
            }
            g0 = g1;
        }
    }

    void image_step(const ImageStepCall &c) override {
        ThreadScope ts(m_.n_threads_);
        kept_->image_step(c);
    }
    void text_step(const TextStepCall &c) override {
        ThreadScope ts(m_.n_threads_);
        kept_->text_step(c);
    }
    void set_token_mask(const uint8_t *allowed, int n) override { kept_->set_token_mask(allowed, n); }
    int cache_select(int seq, const int32_t *slots, int n, double q, int32_t *out) override {
        return kept_->cache_select(seq, slots, n, q, out);
    }
    void load_kept(int seq, const int32_t *slots, int n, int n_cols, const float *rows) override {
        kept_->write(seq, slots, n, n_cols, rows, nullptr);
    }

private:
    // OpenMP's team size for the runtime's thread count, restored on exit.
    struct ThreadScope {
        int saved;
        explicit ThreadScope(int n) : saved(omp_get_max_threads()) {
            if (n > 0) omp_set_num_threads(n);
        }
        ~ThreadScope() { omp_set_num_threads(saved); }
    };

    // Rows a forward runs through the network, and rows it keeps.
    static int run_rows(const dimoo_forward_args &a) {
        return a.cache_mode == DIMOO_CACHE_USE ? a.n_compute : a.n_tokens;
    }
    static int kept_rows(const dimoo_forward_args &a) { return a.out_positions ? a.n_out : run_rows(a); }
    // Columns of a forward's logits.
    int logit_cols(const dimoo_forward_args &a) const {
        return (a.vocab_end == 0 ? m_.shape_.cfg.embedding_size : a.vocab_end) - a.vocab_begin;
    }

    void rope(float *x, int rows, int width, const int32_t *pos) const {
        const int hd = m_.shape_.head_dim, half = hd / 2, heads = width / hd;
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; r++) {
            const float *cs = cos_.data() + size_t(pos[r]) * half;
            const float *sn = sin_.data() + size_t(pos[r]) * half;
            for (int h = 0; h < heads; h++) {
                float *v = x + size_t(r) * width + size_t(h) * hd;
                for (int i = 0; i < half; i++) {
                    float a = v[i], b = v[i + half];
                    v[i] = a * cs[i] - b * sn[i];
                    v[i + half] = b * cs[i] + a * sn[i];
                }
            }
        }
    }

    // Bidirectional attention of `rows` queries over T keys/values.
    void attention(const float *q, const float *k, const float *v, float *out, int rows, int T) const {
        const int hd = m_.shape_.head_dim, H = m_.shape_.cfg.n_heads, Hkv = m_.shape_.cfg.n_kv_heads;
        const int d = m_.shape_.cfg.d_model, kv = m_.shape_.kv_dim, group = H / Hkv;
        const float scale = 1.0f / std::sqrt(float(hd));
#pragma omp parallel
        {
            std::vector<float> s(T);
#pragma omp for collapse(2) schedule(static)
            for (int h = 0; h < H; h++)
                for (int r = 0; r < rows; r++) {
                    const float *qr = q + size_t(r) * d + size_t(h) * hd;
                    const int kh = h / group;
                    float mx = -INFINITY;
                    for (int j = 0; j < T; j++) {
                        const float *kj = k + size_t(j) * kv + size_t(kh) * hd;
                        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                        int i = 0;
                        for (; i + 8 <= hd; i += 8)
                            for (int u = 0; u < 8; u++) acc[u] += qr[i + u] * kj[i + u];
                        float dot = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                        for (; i < hd; i++) dot += qr[i] * kj[i];
                        s[j] = dot * scale;
                        mx = std::max(mx, s[j]);
                    }
                    double sum = 0;
                    for (int j = 0; j < T; j++) {
                        s[j] = std::exp(s[j] - mx);
                        sum += s[j];
                    }
                    const float inv = float(1.0 / sum);
                    float *o = out + size_t(r) * d + size_t(h) * hd;
                    for (int i = 0; i < hd; i++) o[i] = 0;
                    for (int j = 0; j < T; j++) {
                        const float p = s[j] * inv;
                        const float *vj = v + size_t(j) * kv + size_t(kh) * hd;
                        for (int i = 0; i < hd; i++) o[i] += p * vj[i];
                    }
                }
        }
    }

    void gemm(int M, const float *A, int lda, const Tensor &W, int N, int K, float *C, bool acc,
              int w_row_offset = 0) const {
        const uint8_t *base = static_cast<const uint8_t *>(W.ptr()) + size_t(w_row_offset) * K * dtype_size(W.dtype);
        cpu::gemm_nt(M, N, K, A, lda, base, W.dtype, K, C, N, acc);
    }

    // Rows that run through the network, as sequence positions: the
    // `compute` positions under ML-Cache USE, else all of them.
    void set_rows(const dimoo_forward_args &a) {
        rows_.clear();
        if (a.cache_mode == DIMOO_CACHE_USE) {
            rows_.assign(a.compute, a.compute + a.n_compute);
        } else {
            rows_.resize(a.n_tokens);
            for (int i = 0; i < a.n_tokens; i++) rows_[i] = i;
        }
    }

    // Output rows: indices into rows_ of the requested positions.
    std::vector<int> out_rows(const dimoo_forward_args &a) const {
        std::vector<int> sel;
        if (a.out_positions) {
            sel.resize(a.n_out);
            for (int i = 0; i < a.n_out; i++)
                sel[i] = int(std::lower_bound(rows_.begin(), rows_.end(), a.out_positions[i]) - rows_.begin());
        } else {
            sel.resize(rows_.size());
            for (size_t i = 0; i < sel.size(); i++) sel[i] = int(i);
        }
        return sel;
    }

    void forward_one(const dimoo_forward_args &a, const std::atomic<bool> &cancel) {
        const auto &S = m_.shape_;
        const auto &c = S.cfg;
        const int T = a.n_tokens, d = c.d_model, kv = S.kv_dim, mlp = c.mlp_hidden_size;
        set_rows(a);
        const int R = int(rows_.size());

        const Tensor &wte = m_.w(WeightKind::Embedding);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < R; r++) {
            const size_t tok = size_t(a.tokens[rows_[r]]);
            float *xr = x_.data() + size_t(r) * d;
            for (int i = 0; i < d; i++) xr[i] = load_as_f32(wte.ptr(), wte.dtype, tok * d + i);
        }

        const size_t layer_cache = size_t(p_.max_tokens) * kv;
        for (int l = 0; l < c.n_layers; l++) {
            if (cancel.load(std::memory_order_relaxed)) fail(DIMOO_ERR_CANCELLED, "forward cancelled");
            rmsnorm_rows(x_.data(), m_.wf(WeightKind::AttnNorm, l), h_.data(), R, d, c.rms_norm_eps);
            gemm(R, h_.data(), d, m_.w(WeightKind::QProj, l), d, d, q_.data(), false);
            gemm(R, h_.data(), d, m_.w(WeightKind::KProj, l), kv, d, k_.data(), false);
            gemm(R, h_.data(), d, m_.w(WeightKind::VProj, l), kv, d, v_.data(), false);
            rope(q_.data(), R, d, rows_.data());
            rope(k_.data(), R, kv, rows_.data());

            const float *K = k_.data(), *V = v_.data();
            if (a.cache_mode != DIMOO_CACHE_NONE) {
                float *kc = kcache_.data() + (size_t(a.seq) * c.n_layers + l) * layer_cache;
                float *vc = vcache_.data() + (size_t(a.seq) * c.n_layers + l) * layer_cache;
                for (int r = 0; r < R; r++) {
                    std::copy_n(k_.data() + size_t(r) * kv, kv, kc + size_t(rows_[r]) * kv);
                    std::copy_n(v_.data() + size_t(r) * kv, kv, vc + size_t(rows_[r]) * kv);
                }
                K = kc;
                V = vc;
            }
            attention(q_.data(), K, V, att_.data(), R, T);
            gemm(R, att_.data(), d, m_.w(WeightKind::AttnOut, l), d, d, x_.data(), true);

            rmsnorm_rows(x_.data(), m_.wf(WeightKind::FFNorm, l), h_.data(), R, d, c.rms_norm_eps);
            gemm(R, h_.data(), d, m_.w(WeightKind::FFProj, l), mlp, d, g_.data(), false);
            gemm(R, h_.data(), d, m_.w(WeightKind::UpProj, l), mlp, d, u_.data(), false);
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < size_t(R) * mlp; i++) g_[i] = silu(g_[i]) * u_[i];
            gemm(R, g_.data(), mlp, m_.w(WeightKind::FFOut, l), d, mlp, x_.data(), true);
        }
        if (!a.logits) return;

        const std::vector<int> sel = out_rows(a);
        const int O = int(sel.size());
        // Gather, norm, then only the requested columns of the head.
        for (int i = 0; i < O; i++) std::copy_n(x_.data() + size_t(sel[i]) * d, d, att_.data() + size_t(i) * d);
        rmsnorm_rows(att_.data(), m_.wf(WeightKind::FinalNorm), h_.data(), O, d, c.rms_norm_eps);
        const int vb = a.vocab_begin, ve = a.vocab_end == 0 ? c.embedding_size : a.vocab_end;
        gemm(O, h_.data(), d, m_.w(WeightKind::Head), ve - vb, d, a.logits, false, vb);
        if (a.row_max) {
            const int n = ve - vb;
#pragma omp parallel for schedule(static)
            for (int i = 0; i < O; i++) {
                const float *r = a.logits + size_t(i) * n;
                float m = r[0];
#pragma omp simd reduction(max : m)
                for (int j = 1; j < n; j++) m = r[j] > m ? r[j] : m;
                a.row_max[i] = m;
            }
        }
    }

    // RoPE on one row of `width` (heads of head_dim), in place.
    void rope_row(float *v, int width, int pos) const {
        const int hd = m_.shape_.head_dim, half = hd / 2;
        const float *cs = cos_.data() + size_t(pos) * half, *sn = sin_.data() + size_t(pos) * half;
        for (int h = 0; h < width / hd; h++, v += hd)
            for (int i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = b * cs[i] + a * sn[i];
            }
    }

    // RMSNorm of one row into the next GEMM's input: bf16 pairs, or fp32.
    template <bool BF>
    static void norm_row(const float *x, const float *w, uint32_t *out, int cols, float eps) {
        const double ss = sum_squares(x, cols);
        const float inv = 1.0f / std::sqrt(float(ss / cols) + eps);
        if constexpr (!BF) {
            float *o = reinterpret_cast<float *>(out);
            for (int c = 0; c < cols; c++) o[c] = x[c] * inv * w[c];
        } else {
            float t[4096];
            uint16_t *o = reinterpret_cast<uint16_t *>(out);
            for (int c0 = 0; c0 < cols; c0 += 4096) {
                const int n = std::min(4096, cols - c0);
                for (int c = 0; c < n; c++) t[c] = x[c0 + c] * inv * w[c0 + c];
                cpu::round_bf16(t, n, o + c0, n);
            }
            if (cols % 2) o[cols] = 0;
        }
    }

    // The packed forward (bf16 pairs when BF, else fp32) of n sequences at
    // once: their rows (ML-Cache: the computed ones) side by side in the
    // buffers (at most row_cap_ in all), so each weight is read once per
    // layer for all of them (guidance branches: one M = sum(T) GEMM).
    // Attention and the K/V caches stay per sequence. One parallel region;
    // stages separated by the barriers of their work-sharing loops (9 per
    // layer). A row's arithmetic does not depend on the rows beside it, so
    // each sequence's logits are those of its forward alone, bit for bit.
    template <bool BF> void forward_packed(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel) {
        const auto &S = m_.shape_;
        const auto &c = S.cfg;
        const int d = c.d_model, kv = S.kv_dim, mlp = c.mlp_hidden_size, hd = S.head_dim;
        const cpu::Kernels ks = m_.kernels();
        // Per sequence: its rows at [off, off + R), its output rows (indices
        // into rows_) normed into abf_ at [oo, oo + sel.size()).
        struct Seg {
            const dimoo_forward_args *a;
            int off, R, oo, vb, ve;
            std::vector<int> sel;
        };
        std::vector<Seg> segs(static_cast<size_t>(n));
        std::vector<int32_t> rows;
        std::vector<int> out_rows_all; // output rows, as rows of the buffers
        for (int i = 0; i < n; i++) {
            Seg &g = segs[size_t(i)];
            g.a = &args[i];
            g.off = int(rows.size());
            set_rows(args[i]);
            g.R = int(rows_.size());
            if (args[i].logits) g.sel = out_rows(args[i]);
            g.oo = int(out_rows_all.size());
            for (int r : g.sel) out_rows_all.push_back(g.off + r);
            g.vb = args[i].vocab_begin;
            g.ve = args[i].vocab_end == 0 ? c.embedding_size : args[i].vocab_end;
            rows.insert(rows.end(), rows_.begin(), rows_.end());
        }
        rows_.swap(rows);
        const int R = int(rows_.size()), O = int(out_rows_all.size());
        std::vector<int> row_seg(static_cast<size_t>(R));
        for (int i = 0; i < n; i++)
            std::fill_n(row_seg.begin() + segs[size_t(i)].off, segs[size_t(i)].R, i);
        const size_t layer_cache = size_t(p_.max_tokens) * kv;
        // Attention's packed K/V for sequence i (T of its forward).
        auto packed_kv = [&](int T) {
            cpu::PackedKV pk;
            pk.T = T;
            pk.Tpad = cpu::packed_kv_tpad(T);
            pk.head_dim = hd;
            pk.n_kv = c.n_kv_heads;
            pk.kstride = pk.vstride = cpu::packed_kv_elems(T, hd);
            pk.k = kpack_.data();
            pk.v = vpack_.data();
            return pk;
        };
        auto packed_k_f32 = [&](int T) {
            cpu::PackedKVF32 pkf;
            pkf.T = T;
            pkf.Tpad = cpu::packed_kv_tpad(T);
            pkf.head_dim = hd;
            pkf.n_kv = c.n_kv_heads;
            pkf.kstride = cpu::packed_k_f32_elems(T, hd);
            pkf.k = kpack_f32_.data();
            pkf.ldv = size_t(kv);
            return pkf;
        };
        const Tensor &wte = m_.w(WeightKind::Embedding);
        float *abf_f = reinterpret_cast<float *>(abf_.data());
        float *hbf_f = reinterpret_cast<float *>(hbf_.data());
        const size_t mp = mp_, as = ast_, hs = hst_;
        const int mlp_panels = (mlp + cpu::kPanel - 1) / cpu::kPanel;
        const int mblocks = (R + kGateRows - 1) / kGateRows;
        bool stop = false;
        const bool timing = cpu::stage_timing_on();

        // C = A W^T over the team for the jobs (W: weight kind, layer).
        struct Job {
            WeightKind k;
            int layer;
            float *C;
            size_t ldc;
            int n0, n1;
            bool acc;
        };
        auto gemm = [&](int M, const uint32_t *A, size_t lda, std::initializer_list<Job> jobs) {
            if constexpr (BF) {
                cpu::GemmJob g[3];
                int n = 0;
                for (const Job &j : jobs) g[n++] = {&m_.pw(j.k, j.layer), j.C, j.ldc, j.n0, j.n1, j.acc};
                cpu::gemm_team(ks, M, A, lda, g, n);
            } else {
                cpu::GemmJobF32 g[3];
                int n = 0;
                for (const Job &j : jobs) g[n++] = {&m_.pwf(j.k, j.layer), j.C, j.ldc, j.n0, j.n1, j.acc};
                cpu::gemm_team_f32(ks, M, reinterpret_cast<const float *>(A), lda, g, n);
            }
        };

#pragma omp parallel num_threads(nt_)
        {
            // Thread 0 times the stages: each ends with the team's barrier.
            const bool clock = timing && omp_get_thread_num() == 0;
            double last = clock ? omp_get_wtime() : 0.0;
            auto mark = [&](cpu::Stage st) {
                if (!clock) return;
                const double now = omp_get_wtime();
                cpu::stage_time_add(st, now - last);
                last = now;
            };
            float *G = scratch_.data() + size_t(omp_get_thread_num()) * (scratch_.size() / size_t(nt_));
            float *U = G + kGateRows * cpu::kPanel;
            if (omp_get_thread_num() == 0) stop = cancel.load(std::memory_order_relaxed);
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                const size_t tok = size_t(segs[size_t(row_seg[size_t(r)])].a->tokens[rows_[r]]);
                float *xr = x_.data() + size_t(r) * d;
                for (int i = 0; i < d; i++) xr[i] = load_as_f32(wte.ptr(), wte.dtype, tok * d + i);
            }
            mark(cpu::Stage::Rest);
            for (int l = 0; l < c.n_layers && !stop; l++) {
                const float *attn_norm = m_.wf(WeightKind::AttnNorm, l), *ff_norm = m_.wf(WeightKind::FFNorm, l);
#pragma omp for schedule(static)
                for (int r = 0; r < R; r++)
                    norm_row<BF>(x_.data() + size_t(r) * d, attn_norm, abf_.data() + size_t(r) * as, d,
                                 c.rms_norm_eps);
                mark(cpu::Stage::Rest);
                gemm(R, abf_.data(), as,
                     {{WeightKind::QProj, l, q_.data(), size_t(d), 0, d, false},
                      {WeightKind::KProj, l, k_.data(), size_t(kv), 0, kv, false},
                      {WeightKind::VProj, l, v_.data(), size_t(kv), 0, kv, false}});
                mark(cpu::Stage::Gemm);

                // This layer's K/V cache of a sequence (null without one):
                // fp32 rows, or (BF) packed bf16 (kcache16).
                auto kcache = [&](const Seg &g) {
                    return g.a->cache_mode == DIMOO_CACHE_NONE || BF
                               ? nullptr
                               : kcache_.data() + (size_t(g.a->seq) * c.n_layers + l) * layer_cache;
                };
                auto vcache = [&](const Seg &g) {
                    return g.a->cache_mode == DIMOO_CACHE_NONE || BF
                               ? nullptr
                               : vcache_.data() + (size_t(g.a->seq) * c.n_layers + l) * layer_cache;
                };
                auto kcache16 = [&](const Seg &g, LineVector<uint16_t> &buf) {
                    return g.a->cache_mode == DIMOO_CACHE_NONE || !BF
                               ? nullptr
                               : buf.data() + (size_t(g.a->seq) * c.n_layers + l) * c.n_kv_heads * kvstride16_;
                };
                // A sequence's packed bf16 cache of this layer, for T keys.
                auto cache16 = [&](const Seg &g, int T) {
                    cpu::PackedKV pk = packed_kv(T);
                    pk.k = kcache16(g, kcache16_);
                    pk.v = kcache16(g, vcache16_);
                    pk.kstride = pk.vstride = kvstride16_;
                    return pk;
                };
#pragma omp for schedule(static)
                for (int r = 0; r < R; r++) {
                    const Seg &g = segs[size_t(row_seg[size_t(r)])];
                    float *kc = kcache(g), *vc = vcache(g);
                    float *qr = q_.data() + size_t(r) * d, *kr = k_.data() + size_t(r) * kv;
                    rope_row(qr, d, rows_[r]);
                    if constexpr (BF)
                        cpu::round_bf16(qr, d, reinterpret_cast<uint16_t *>(qbf_.data() + size_t(r) * as), d);
                    rope_row(kr, kv, rows_[r]);
                    if (kc) {
                        std::copy_n(kr, kv, kc + size_t(rows_[r]) * kv);
                        std::copy_n(v_.data() + size_t(r) * kv, kv, vc + size_t(rows_[r]) * kv);
                    }
                    if (kcache16(g, kcache16_))
                        cpu::pack_kv_row(kr, v_.data() + size_t(r) * kv, rows_[r], cache16(g, g.a->n_tokens));
                }
                mark(cpu::Stage::Rest);
                for (const Seg &g : segs) {
                    // Keys: the whole sequence, from its cache, or its rows here.
                    float *kc = kcache(g), *vc = vcache(g);
                    const float *K = kc ? kc : k_.data() + size_t(g.off) * kv;
                    const float *V = vc ? vc : v_.data() + size_t(g.off) * kv;
                    if constexpr (BF) {
                        cpu::PackedKV pk;
                        if (kcache16(g, kcache16_)) { // the cache, as it is
                            pk = cache16(g, g.a->n_tokens);
                            cpu::zero_kv_tail_team(pk);
                        } else {
                            pk = packed_kv(g.a->n_tokens);
                            cpu::pack_kv_team(K, V, size_t(kv), pk);
                        }
                        cpu::flash_attention_team(ks, qbf_.data() + size_t(g.off) * as, as, g.R, c.n_heads, pk,
                                                  reinterpret_cast<uint16_t *>(abf_.data()) + size_t(g.off) * 2 * as,
                                                  2 * as, scratch_.data());
                    } else {
                        cpu::PackedKVF32 pkf = packed_k_f32(g.a->n_tokens);
                        pkf.v = V;
                        cpu::pack_k_f32_team(K, size_t(kv), pkf);
                        cpu::flash_attention_f32_team(ks, q_.data() + size_t(g.off) * d, size_t(d), g.R, c.n_heads,
                                                      pkf, abf_f + size_t(g.off) * as, as, scratch_.data());
                    }
                }
                mark(cpu::Stage::Attention);
                gemm(R, abf_.data(), as, {{WeightKind::AttnOut, l, x_.data(), size_t(d), 0, d, true}});
                mark(cpu::Stage::Gemm);

#pragma omp for schedule(static)
                for (int r = 0; r < R; r++)
                    norm_row<BF>(x_.data() + size_t(r) * d, ff_norm, abf_.data() + size_t(r) * as, d,
                                 c.rms_norm_eps);
                mark(cpu::Stage::Rest);
                // Gate and up panels side by side; silu(g) * u (rounded to
                // bf16) straight into the down projection's input.
#pragma omp for schedule(dynamic, 1)
                for (int t = 0; t < mlp_panels * mblocks; t++) {
                    const int p = t / mblocks, r0 = (t % mblocks) * kGateRows, nr = std::min(kGateRows, R - r0);
                    const int ncols = std::min(cpu::kPanel, int(BF ? 2 * mp : mp) - p * cpu::kPanel);
                    if constexpr (BF) {
                        const cpu::PackedMatrix &wg = m_.pw(WeightKind::FFProj, l), &wu = m_.pw(WeightKind::UpProj, l);
                        const uint32_t *A = abf_.data() + size_t(r0) * as;
                        cpu::tile(ks, nr, wg.Kp, A, as, wg.panel(p), 64, G, cpu::kPanel, 0, cpu::kPanel, false);
                        cpu::tile(ks, nr, wu.Kp, A, as, wu.panel(p), 64, U, cpu::kPanel, 0, cpu::kPanel, false);
                    } else {
                        const cpu::PackedMatrixF32 &wg = m_.pwf(WeightKind::FFProj, l),
                                                   &wu = m_.pwf(WeightKind::UpProj, l);
                        const float *A = abf_f + size_t(r0) * as;
                        cpu::tile_f32(ks, nr, wg.K, A, as, wg.panel(p), cpu::kPanel, G, cpu::kPanel, 0, cpu::kPanel,
                                      false);
                        cpu::tile_f32(ks, nr, wu.K, A, as, wu.panel(p), cpu::kPanel, U, cpu::kPanel, 0, cpu::kPanel,
                                      false);
                    }
                    for (int i = 0; i < nr; i++) {
                        float *g = G + size_t(i) * cpu::kPanel;
                        const float *u = U + size_t(i) * cpu::kPanel;
                        // All 32 columns (a fixed count the compiler vectorises), then ncols out.
                        for (int j = 0; j < cpu::kPanel; j++) g[j] = silu(g[j]) * u[j];
                        if constexpr (BF) {
                            cpu::round_bf16(g, ncols,
                                            reinterpret_cast<uint16_t *>(hbf_.data()) + size_t(r0 + i) * 2 * hs +
                                                size_t(p) * cpu::kPanel,
                                            ncols);
                        } else {
                            std::copy_n(g, ncols, hbf_f + size_t(r0 + i) * hs + size_t(p) * cpu::kPanel);
                        }
                    }
                }
                if (omp_get_thread_num() == 0) stop = cancel.load(std::memory_order_relaxed);
                gemm(R, hbf_.data(), hs, {{WeightKind::FFOut, l, x_.data(), size_t(d), 0, d, true}});
                mark(cpu::Stage::Gemm);
            }
            if (!stop && O > 0) {
#pragma omp for schedule(static)
                for (int i = 0; i < O; i++)
                    norm_row<BF>(x_.data() + size_t(out_rows_all[size_t(i)]) * d, m_.wf(WeightKind::FinalNorm),
                                 abf_.data() + size_t(i) * as, d, c.rms_norm_eps);
                mark(cpu::Stage::Rest);
                for (const Seg &g : segs) // each its own column range and output
                    gemm(int(g.sel.size()), abf_.data() + size_t(g.oo) * as, as,
                         {{WeightKind::Head, -1, g.a->logits, size_t(g.ve - g.vb), g.vb, g.ve, false}});
                mark(cpu::Stage::Gemm);
                for (const Seg &g : segs) {
                    if (!g.a->row_max) continue;
                    const int w = g.ve - g.vb, no = int(g.sel.size());
#pragma omp for schedule(static)
                    for (int i = 0; i < no; i++) {
                        const float *r = g.a->logits + size_t(i) * w;
                        float m = r[0];
                        for (int j = 1; j < w; j++) m = r[j] > m ? r[j] : m;
                        g.a->row_max[i] = m;
                    }
                }
                mark(cpu::Stage::Rest);
            }
        }
        if (stop) fail(DIMOO_ERR_CANCELLED, "forward cancelled");
    }


    const CpuModel &m_;
    const dimoo_ctx_params p_;
    int nt_ = 1;
    size_t dp_ = 0, mp_ = 0;   // A-operand elements per row of d and of mlp (bf16 pairs or floats)
    size_t ast_ = 0, hst_ = 0; // their row strides in abf_/qbf_ and hbf_
    int row_cap_ = 0;          // rows one pass of the packed forward holds (CpuCtxSizes::rows)
    // Line-aligned: the AMX and AVX-512 kernels' rows (common.h).
    LineVector<float> x_, h_, q_, k_, v_, att_, g_, u_, kcache_, vcache_, cos_, sin_, scratch_;
    std::unique_ptr<cpu::HostKept> kept_; // kept logits (keep_cols > 0)
    LineVector<uint32_t> abf_, qbf_, hbf_; // bf16 pairs: GEMM inputs and attention's queries
    LineVector<uint16_t> kpack_, vpack_;
    size_t kvstride16_ = 0;                  // uint16 per KV head of a packed bf16 cache
    LineVector<uint16_t> kcache16_, vcache16_; // [seq][layer][kv head]: packed as cpu::PackedKV
    LineVector<float> kpack_f32_;
    std::vector<int32_t> rows_;
};

std::unique_ptr<Ctx> CpuModel::create_ctx(const dimoo_ctx_params &p) { return std::make_unique<CpuCtx>(*this, p); }

class CpuBackend : public Backend {
public:
    explicit CpuBackend(int n_threads) : n_threads_(n_threads) {}

    std::string describe() const override {
        int n = n_threads_ > 0 ? n_threads_ : omp_get_max_threads();
        std::string isa = "generic";
#if defined(__AVX512F__)
        isa = "avx512";
#elif defined(__AVX2__)
        isa = "avx2";
#elif defined(__ARM_NEON)
        isa = "neon";
#endif
        // The fp32 GEMM's compile-time ISA, then the bf16 tiles picked at run time.
        return "cpu: " + std::to_string(n) + " threads, " + isa + ", bf16 tiles " +
               cpu::kernels_name(cpu::best_kernels());
    }

    std::unique_ptr<Model> create_model(const ModelShape &shape) override {
        return std::make_unique<CpuModel>(shape, n_threads_);
    }

private:
    int n_threads_;
};

} // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads) { return std::make_unique<CpuBackend>(n_threads); }

Estimate cpu_estimate(const ModelShape &S, int32_t dtype, int n_threads, const dimoo_ctx_params *p) {
    // CpuModel::finalize's choice, for a checkpoint whose matrices are all `dtype`.
    check_cpu_precision(S);
    const int32_t prec = S.cfg.precision;
    const bool off = prec == DIMOO_PRECISION_AUTO && packing_disabled();
    const bool bf = prec == DIMOO_PRECISION_BF16 ||
                    (prec == DIMOO_PRECISION_AUTO && !off && dtype == DIMOO_BF16 && S.head_dim % 2 == 0 &&
                     S.head_dim <= 1024);
    const bool f32 = prec == DIMOO_PRECISION_F32 || (prec == DIMOO_PRECISION_AUTO && !off && dtype == DIMOO_F32);
    Estimate e;
    auto add = [&](WeightId id) {
        const auto dims = S.expected_shape(id);
        const bool norm = id.kind == WeightKind::AttnNorm || id.kind == WeightKind::FFNorm ||
                          id.kind == WeightKind::FinalNorm;
        if (norm) {
            e.model += dims[0] * 4;
            return;
        }
        const int64_t N = dims[0], K = dims[1], panels = (N + cpu::kPanel - 1) / cpu::kPanel;
        if (id.kind != WeightKind::Embedding && bf) e.model += panels * ((K + 1) / 2) * 64 * 2;
        else if (id.kind != WeightKind::Embedding && f32) e.model += panels * K * cpu::kPanel * 4;
        else if (prec == DIMOO_PRECISION_BF16) e.model += N * K * 2; // the embedding, rounded
        else e.model += N * K * int64_t(dtype_size(dtype));
    };
    add({WeightKind::Embedding, -1});
    add({WeightKind::FinalNorm, -1});
    add({WeightKind::Head, -1});
    for (int l = 0; l < S.cfg.n_layers; l++)
        for (int k = int(WeightKind::AttnNorm); k <= int(WeightKind::FFOut); k++) add({WeightKind(k), l});
    if (p) {
        const int nt = n_threads > 0 ? n_threads : std::max(1, omp_get_max_threads());
        e.ctx = CpuCtxSizes(S, bf || f32, bf, nt, *p).bytes();
    }
    return e;
}

} // namespace dimoo
