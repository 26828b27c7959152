// cpu_backend.cpp - the CPU backend: fp32 arithmetic on bf16/fp16/fp32
// weights, OpenMP over the cores, the blocked GEMM of gemm.cpp for every
// projection. The reference every other backend is tested against.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu/gemm.h"

namespace dimoo {
namespace {

// Weights stay in their checkpoint dtype (half the memory for bf16); the
// GEMM converts panels to fp32 as it packs them.
struct Tensor {
    int32_t dtype = DIMOO_F32;
    std::vector<uint8_t> data;
    const void *ptr() const { return data.data(); }
};

// Linux overcommits: a buffer larger than RAM "succeeds" and the OOM killer
// ends the process when it is touched. Refuse such sizes up front.
void check_host_alloc(size_t bytes, const std::string &what) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages <= 0 || page <= 0) return;
    const double ram = double(pages) * double(page);
    if (double(bytes) > ram)
        fail(DIMOO_ERR_OUT_OF_MEMORY, what + " needs " + std::to_string(bytes >> 20) + " MiB but this machine has " +
                                          std::to_string(size_t(ram) >> 20) + " MiB of memory");
}

void rmsnorm_rows(const float *x, const float *w, float *out, int rows, int cols, float eps) {
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + size_t(r) * cols;
        float *orow = out + size_t(r) * cols;
        double ss = 0;
        for (int c = 0; c < cols; c++) ss += double(xr[c]) * xr[c];
        float inv = 1.0f / std::sqrt(float(ss / cols) + eps);
        for (int c = 0; c < cols; c++) orow[c] = xr[c] * inv * w[c];
    }
}

class CpuCtx;

class CpuModel : public Model {
public:
    CpuModel(const ModelShape &s, int n_threads) : shape_(s), n_threads_(n_threads), w_(s.n_weights()) {}

    void set_weight(WeightId id, int32_t dtype, const void *data, size_t nbytes) override {
        Tensor &t = w_[shape_.slot(id)];
        bool norm = id.kind == WeightKind::AttnNorm || id.kind == WeightKind::FFNorm || id.kind == WeightKind::FinalNorm;
        if (norm) { // tiny vectors: keep as fp32 so the norms read them directly
            size_t n = nbytes / dtype_size(dtype);
            t.dtype = DIMOO_F32;
            t.data.resize(n * 4);
            float *dst = reinterpret_cast<float *>(t.data.data());
            for (size_t i = 0; i < n; i++) dst[i] = load_as_f32(data, dtype, i);
            return;
        }
        check_host_alloc(nbytes, shape_.name_of(id));
        t.dtype = dtype;
        t.data.assign(static_cast<const uint8_t *>(data), static_cast<const uint8_t *>(data) + nbytes);
    }

    void finalize() override {}

    int64_t weight_bytes() const override {
        int64_t b = 0;
        for (const auto &t : w_) b += int64_t(t.data.size());
        return b;
    }

    std::unique_ptr<Ctx> create_ctx(const dimoo_ctx_params &p) override;

    const Tensor &w(WeightKind k, int layer = -1) const { return w_[shape_.slot({k, layer})]; }
    const float *wf(WeightKind k, int layer = -1) const {
        return reinterpret_cast<const float *>(w(k, layer).ptr());
    }

    const ModelShape shape_;
    const int n_threads_;

private:
    std::vector<Tensor> w_;
};

class CpuCtx : public Ctx {
public:
    CpuCtx(const CpuModel &m, const dimoo_ctx_params &p) : m_(m), p_(p) {
        const auto &c = m.shape_.cfg;
        const size_t T = size_t(p.max_tokens), d = size_t(c.d_model), kv = size_t(m.shape_.kv_dim),
                     mlp = size_t(c.mlp_hidden_size);
        {
            size_t floats = T * (5 * d + 2 * kv + 2 * mlp + m.shape_.head_dim);
            if (p.flags & DIMOO_CTX_KV_CACHE) floats += 2 * size_t(p.n_seqs) * c.n_layers * T * kv;
            check_host_alloc(floats * sizeof(float), "a context of " + std::to_string(T) + " tokens");
        }
        x_.resize(T * d);
        h_.resize(T * d);
        q_.resize(T * d);
        k_.resize(T * kv);
        v_.resize(T * kv);
        att_.resize(T * d);
        g_.resize(T * mlp);
        u_.resize(T * mlp);
        if (p.flags & DIMOO_CTX_KV_CACHE) {
            kcache_.resize(size_t(p.n_seqs) * c.n_layers * T * kv);
            vcache_.resize(kcache_.size());
        }
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
                   kcache_.size() + vcache_.size() + cos_.size() + sin_.size();
        return int64_t(n * sizeof(float));
    }

    void forward(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel) override {
        int saved = omp_get_max_threads();
        if (m_.n_threads_ > 0) omp_set_num_threads(m_.n_threads_);
        try {
            for (int i = 0; i < n; i++) forward_one(args[i], cancel);
        } catch (...) {
            omp_set_num_threads(saved);
            throw;
        }
        omp_set_num_threads(saved);
    }

private:
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

    void forward_one(const dimoo_forward_args &a, const std::atomic<bool> &cancel) {
        const auto &S = m_.shape_;
        const auto &c = S.cfg;
        const int T = a.n_tokens, d = c.d_model, kv = S.kv_dim, mlp = c.mlp_hidden_size;
        // Rows that run through the network, as sequence positions.
        rows_.clear();
        if (a.cache_mode == DIMOO_CACHE_USE) {
            rows_.assign(a.compute, a.compute + a.n_compute);
        } else {
            rows_.resize(T);
            for (int i = 0; i < T; i++) rows_[i] = i;
        }
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
            for (size_t i = 0; i < size_t(R) * mlp; i++) {
                const float g = g_[i];
                g_[i] = g / (1.0f + std::exp(-g)) * u_[i];
            }
            gemm(R, g_.data(), mlp, m_.w(WeightKind::FFOut, l), d, mlp, x_.data(), true);
        }
        if (!a.logits) return;

        // Output rows: indices into rows_ of the requested positions.
        std::vector<int> sel;
        if (a.out_positions) {
            sel.resize(a.n_out);
            for (int i = 0; i < a.n_out; i++)
                sel[i] = int(std::lower_bound(rows_.begin(), rows_.end(), a.out_positions[i]) - rows_.begin());
        } else {
            sel.resize(R);
            for (int i = 0; i < R; i++) sel[i] = i;
        }
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

    const CpuModel &m_;
    const dimoo_ctx_params p_;
    std::vector<float> x_, h_, q_, k_, v_, att_, g_, u_, kcache_, vcache_, cos_, sin_;
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
        return "cpu: " + std::to_string(n) + " threads, " + isa;
    }

    void rmsnorm(int32_t dtype, const void *x, const void *w, void *out, int rows, int cols, float eps) override {
        std::vector<float> xf(size_t(rows) * cols), wf(cols), of(size_t(rows) * cols);
        for (size_t i = 0; i < xf.size(); i++) xf[i] = load_as_f32(x, dtype, i);
        for (int i = 0; i < cols; i++) wf[i] = load_as_f32(w, dtype, i);
        rmsnorm_rows(xf.data(), wf.data(), of.data(), rows, cols, eps);
        for (size_t i = 0; i < of.size(); i++) {
            switch (dtype) {
            case DIMOO_F32: static_cast<float *>(out)[i] = of[i]; break;
            case DIMOO_F16: static_cast<uint16_t *>(out)[i] = f32_to_f16(of[i]); break;
            default: static_cast<uint16_t *>(out)[i] = f32_to_bf16(of[i]); break;
            }
        }
    }

    std::unique_ptr<Model> create_model(const ModelShape &shape) override {
        return std::make_unique<CpuModel>(shape, n_threads_);
    }

private:
    int n_threads_;
};

} // namespace

std::unique_ptr<Backend> make_cpu_backend(int n_threads) { return std::make_unique<CpuBackend>(n_threads); }

} // namespace dimoo
