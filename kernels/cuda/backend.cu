// backend.cu - the CUDA backend: device selection, the model (weights in
// bf16 on the device, uploaded once, q|k|v and ff_proj|up_proj concatenated
// so each is one GEMM) and the context (device-resident activations, K/V
// caches, its own stream and cuBLASLt workspace). A forward runs every
// sequence of the call as one batch of M = sum(rows) rows per GEMM; only
// attention and RoPE look at sequence boundaries (cuda/plan.h).
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "backend.h"
#include "cuda/attention.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_model.h"
#include "cuda/embed.cuh"
#include "cuda/gemm.cuh"
#include "cuda/plan.h"
#include "cuda/random.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "cuda/rowmax.cuh"
#include "cuda/swiglu.cuh"

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

constexpr size_t kAlign = 256;
constexpr size_t kLtWorkspace = size_t(32) << 20;
// Kept free for cuBLAS, the CUDA context's own allocations and fragmentation.
constexpr size_t kReserve = size_t(256) << 20;

size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }
std::string mib(size_t b) { return std::to_string(b >> 20) + " MiB"; }

// Refuses an allocation the device cannot hold, with the numbers.
void check_device_room(int device, size_t need, const std::string &what) {
    size_t free_b = 0, total_b = 0;
    DIMOO_CUDA(cudaMemGetInfo(&free_b, &total_b));
    if (need + kReserve > free_b)
        fail(DIMOO_ERR_DEVICE_OUT_OF_MEMORY, what + " needs " + mib(need) + " of device memory but cuda:" +
                                                 std::to_string(device) + " has " + mib(free_b) + " free of " +
                                                 mib(total_b));
}

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

class CudaCtx : public Ctx {
public:
    CudaCtx(const CudaModel &m, const dimoo_ctx_params &p) : m_(m), p_(p) {
        const auto &S = m.shape_;
        const auto &c = S.cfg;
        DIMOO_CUDA(cudaSetDevice(m.device_));
        // A call batches up to n_seqs sequences of up to max_tokens rows each.
        const size_t Mx = size_t(p.n_seqs) * p.max_tokens, d = c.d_model, kv = S.kv_dim,
                     mlp = c.mlp_hidden_size;
        const size_t cache_rows = (p.flags & DIMOO_CTX_KV_CACHE) ? size_t(p.n_seqs) * c.n_layers * p.max_tokens : 0;
        sizes_ = {
            Mx * d * 4,                                   // x
            Mx * d * 2,                                   // h
            Mx * (d + 2 * kv) * 2,                        // qkv
            Mx * d * 2,                                   // q
            Mx * d * 2,                                   // att
            Mx * 2 * mlp * 2,                             // gu
            Mx * mlp * 2,                                 // act
            Mx * kv * 2, Mx * kv * 2,                     // K, V scratch (cache mode NONE)
            cache_rows * kv * 2, cache_rows * kv * 2,     // K, V caches
            size_t(p.max_tokens) * S.head_dim * 4,        // RoPE table
            Mx * 4 * 4 + size_t(p.n_seqs) * sizeof(cuda::AttnSeq), // row metadata
            Mx * 4,                                       // row maxima
        };
        size_t need = kLtWorkspace;
        for (size_t b : sizes_) need += align_up(b);
        check_device_room(m.device_, need, "a context of " + std::to_string(p.n_seqs) + " x " +
                                               std::to_string(p.max_tokens) + " tokens");
        for (size_t b : sizes_) bufs_.push_back(std::make_unique<DeviceBuffer>(b));
        DIMOO_CUDA(cudaStreamCreateWithFlags(&stream_.s, cudaStreamNonBlocking));
        lt_ = std::make_unique<LtGemm>(stream_.s, kLtWorkspace);
        const auto table = cuda::rope_table(p.max_tokens, S.head_dim, c.rope_theta);
        // On the context's stream: a plain cudaMemcpy may still be in flight
        // on the legacy stream, which a non-blocking stream does not wait for.
        DIMOO_CUDA(cudaMemcpyAsync(bufs_[kRope]->get(), table.data(), table.size() * 4, cudaMemcpyHostToDevice,
                                   stream_.s));
        DIMOO_CUDA(cudaStreamSynchronize(stream_.s));
        attn_ = attention_default_impl(S.head_dim);
    }

    int64_t bytes() const override {
        size_t b = kLtWorkspace + (logits_ ? logits_->size() : 0);
        for (size_t s : sizes_) b += s;
        return int64_t(b);
    }

    void forward(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel) override {
        DIMOO_CUDA(cudaSetDevice(m_.device_));
        try {
            run(args, n, cancel);
        } catch (...) {
            cudaStreamSynchronize(stream_.s); // nothing may still write after we return
            cudaGetLastError();
            throw;
        }
    }

private:
    enum Buf { kX, kH, kQKV, kQ, kAtt, kGU, kAct, kKs, kVs, kKc, kVc, kRope, kMeta, kRowMax };
    template <class T = uint16_t> T *b(Buf i) const { return static_cast<T *>(bufs_[i]->get()); }

    void run(const dimoo_forward_args *args, int n, const std::atomic<bool> &cancel) {
        const auto &S = m_.shape_;
        const auto &c = S.cfg;
        const int d = c.d_model, kv = S.kv_dim, mlp = c.mlp_hidden_size, L = c.n_layers;
        const cuda::BatchPlan plan = cuda::make_plan(args, n, kv, L, p_.max_tokens, b(kKs), b(kVs), b(kKc), b(kVc));
        const int M = plan.M;

        // Row metadata: tok | pos | seq | out_rows at fixed offsets, then the seqs.
        const size_t Mx = size_t(p_.n_seqs) * p_.max_tokens;
        if (size_t(M) > Mx || plan.out_rows.size() > Mx) fail(DIMOO_ERR_INTERNAL, "batch larger than the context");
        int32_t *dmeta = b<int32_t>(kMeta);
        auto *dseqs = reinterpret_cast<cuda::AttnSeq *>(dmeta + 4 * Mx);
        const std::vector<int32_t> *parts[4] = {&plan.tok, &plan.pos, &plan.seq_of, &plan.out_rows};
        for (int i = 0; i < 4; i++)
            if (!parts[i]->empty())
                DIMOO_CUDA(cudaMemcpyAsync(dmeta + i * Mx, parts[i]->data(), parts[i]->size() * 4,
                                           cudaMemcpyHostToDevice, stream_.s));
        DIMOO_CUDA(cudaMemcpyAsync(dseqs, plan.seqs.data(), plan.seqs.size() * sizeof(cuda::AttnSeq),
                                   cudaMemcpyHostToDevice, stream_.s));
        const int32_t *d_tok = dmeta, *d_pos = dmeta + Mx, *d_seq = dmeta + 2 * Mx, *d_out = dmeta + 3 * Mx;

        const auto &W = m_.lay_;
        float *x = b<float>(kX);
        DIMOO_CUDA(embed_launch(m_.bf(W.wte), d_tok, x, M, d, stream_.s));
        for (int l = 0; l < L; l++) {
            if (cancel.load(std::memory_order_relaxed)) {
                cudaStreamSynchronize(stream_.s);
                fail(DIMOO_ERR_CANCELLED, "forward cancelled");
            }
            const auto &Lw = W.layers[size_t(l)];
            DIMOO_CUDA(rmsnorm_f32_bf16_launch(x, nullptr, m_.f32(Lw.attn_norm), b(kH), M, d, c.rms_norm_eps, stream_.s));
            lt_->run(M, d + 2 * kv, d, b(kH), d, m_.bf(Lw.wqkv), d, b(kQKV), d + 2 * kv, DIMOO_BF16, false);
            RopeArgs ra{b(kQKV), b(kQ), b<float>(kRope), p_.max_tokens, d_pos, d_seq, dseqs, l, M, d, kv, S.head_dim};
            DIMOO_CUDA(rope_kv_launch(ra, stream_.s));
            AttnArgs aa{b(kQ), d, b(kAtt), d, dseqs, n, plan.max_q, l, c.n_heads, c.n_kv_heads, S.head_dim, kv,
                        1.0f / std::sqrt(float(S.head_dim))};
            DIMOO_CUDA(attention_launch(aa, attn_, stream_.s));
            lt_->run(M, d, d, b(kAtt), d, m_.bf(Lw.wo), d, x, d, DIMOO_F32, true);
            DIMOO_CUDA(rmsnorm_f32_bf16_launch(x, nullptr, m_.f32(Lw.ff_norm), b(kH), M, d, c.rms_norm_eps, stream_.s));
            lt_->run(M, 2 * mlp, d, b(kH), d, m_.bf(Lw.wgu), d, b(kGU), 2 * mlp, DIMOO_BF16, false);
            DIMOO_CUDA(swiglu_launch(b(kGU), b(kAct), M, mlp, stream_.s));
            lt_->run(M, d, mlp, b(kAct), mlp, m_.bf(Lw.wdown), mlp, x, d, DIMOO_F32, true);
        }

        const int O = int(plan.out_rows.size());
        if (O > 0) {
            // Final norm on the requested rows only (gathered in the same pass).
            DIMOO_CUDA(rmsnorm_f32_bf16_launch(x, d_out, m_.f32(W.lnf), b(kH), O, d, c.rms_norm_eps, stream_.s));
            // Each argument's logits in its own 256-byte aligned slice.
            std::vector<size_t> at(size_t(n), 0);
            size_t total = 0;
            for (int i = 0; i < n; i++) {
                at[size_t(i)] = total;
                const int ve = args[i].vocab_end == 0 ? c.embedding_size : args[i].vocab_end;
                total = align_up(total + size_t(plan.out_count[size_t(i)]) * size_t(ve - args[i].vocab_begin) * 4);
            }
            if (!logits_ || total > logits_->size()) {
                logits_.reset();
                check_device_room(m_.device_, total, "the logits of this forward");
                logits_ = std::make_unique<DeviceBuffer>(total);
            }
            uint8_t *lg = static_cast<uint8_t *>(logits_->get());
            for (int i = 0; i < n; i++) {
                const auto &a = args[i];
                const int rows = plan.out_count[size_t(i)], r0 = plan.out_begin[size_t(i)];
                if (!a.logits || rows == 0) continue;
                const int vb = a.vocab_begin, ve = a.vocab_end == 0 ? c.embedding_size : a.vocab_end, cols = ve - vb;
                float *dl = reinterpret_cast<float *>(lg + at[size_t(i)]);
                lt_->run(rows, cols, d, b(kH) + size_t(r0) * d, d, m_.bf(W.head) + size_t(vb) * d, d, dl, cols,
                         DIMOO_F32, false);
                if (a.row_max) DIMOO_CUDA(rowmax_launch(dl, rows, cols, cols, b<float>(kRowMax) + r0, stream_.s));
                DIMOO_CUDA(cudaMemcpyAsync(a.logits, dl, size_t(rows) * cols * 4, cudaMemcpyDeviceToHost, stream_.s));
                if (a.row_max)
                    DIMOO_CUDA(cudaMemcpyAsync(a.row_max, b<float>(kRowMax) + r0, size_t(rows) * 4,
                                               cudaMemcpyDeviceToHost, stream_.s));
            }
        }
        DIMOO_CUDA(cudaStreamSynchronize(stream_.s));
        DIMOO_CUDA(cudaGetLastError());
    }

    const CudaModel &m_;
    const dimoo_ctx_params p_;
    std::vector<size_t> sizes_;
    std::vector<std::unique_ptr<DeviceBuffer>> bufs_;
    std::unique_ptr<DeviceBuffer> logits_; // grows to the largest request seen
    // Destroyed in reverse order: the cuBLASLt plans, then the stream (after
    // its work has finished), then the buffers that work used.
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
    AttnImpl attn_ = AttnImpl::Sm80;
};

std::unique_ptr<Ctx> CudaModel::create_ctx(const dimoo_ctx_params &p) { return std::make_unique<CudaCtx>(*this, p); }

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
        DIMOO_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }

    ~CudaBackend() override {
        if (stream_) cudaStreamDestroy(stream_);
    }

    std::string describe() const override {
        char buf[256];
        std::snprintf(buf, sizeof buf, "cuda:%d %s (sm_%d%d, %.1f GiB, %d SMs)", device_, prop_.name, prop_.major,
                      prop_.minor, double(prop_.totalGlobalMem) / (1024.0 * 1024 * 1024), prop_.multiProcessorCount);
        return buf;
    }

    void rmsnorm(int32_t dtype, const void *x, const void *w, void *out, int rows, int cols, float eps) override {
        DIMOO_CUDA(cudaSetDevice(device_));
        const size_t es = dtype_size(dtype), nx = size_t(rows) * cols * es, nw = size_t(cols) * es;
        DeviceBuffer dx(nx), dw(nw), dout(nx);
        DIMOO_CUDA(cudaMemcpyAsync(dx.get(), x, nx, cudaMemcpyHostToDevice, stream_));
        DIMOO_CUDA(cudaMemcpyAsync(dw.get(), w, nw, cudaMemcpyHostToDevice, stream_));
        DIMOO_CUDA(rmsnorm_launch(dtype, dx.get(), dw.get(), dout.get(), rows, cols, eps, stream_));
        DIMOO_CUDA(cudaMemcpyAsync(out, dout.get(), nx, cudaMemcpyDeviceToHost, stream_));
        DIMOO_CUDA(cudaStreamSynchronize(stream_));
    }

    std::unique_ptr<Model> create_model(const ModelShape &shape) override {
        DIMOO_CUDA(cudaSetDevice(device_));
        return std::make_unique<CudaModel>(shape, device_);
    }

private:
    int device_;
    cudaDeviceProp prop_{};
    cudaStream_t stream_ = nullptr;
};

} // namespace

void cuda_fill_random_weights(Model &m, uint64_t seed) {
    auto *cm = dynamic_cast<CudaModel *>(&m);
    if (!cm) fail(DIMOO_ERR_INVALID_ARGUMENT, "not a CUDA model");
    cm->fill_random(seed);
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

} // namespace dimoo
