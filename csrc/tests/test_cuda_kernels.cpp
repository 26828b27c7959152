// test_cuda_kernels.cpp - every kernel of the CUDA forward against a CPU
// reference through its launcher: fresh random inputs, NaN-poisoned outputs,
// relative errors bounded for bf16 (||out - ref|| / ||ref||), and each run
// twice to catch races (the two results must be bitwise equal). Skips with a
// reason where the CUDA backend is not built or no GPU is present.
#include <gtest/gtest.h>

#ifndef DIMOO_WITH_CUDA
TEST(CudaKernels, Skipped) { GTEST_SKIP() << "built without the CUDA backend"; }
#else

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "backend.h"
#include "common.h"
#include "cuda/attention.cuh"
#include "cuda/embed.cuh"
#include "cuda/gemm.cuh"
#include "cuda/plan.h"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "cuda/rowmax.cuh"
#include "cuda/swiglu.cuh"

namespace {

using dimoo::bf16_to_f32;
using dimoo::f32_to_bf16;

#define SKIP_WITHOUT_GPU()                                                                                   \
    do {                                                                                                     \
        if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";                               \
    } while (0)
#define CK(call) ASSERT_EQ((call), cudaSuccess) << #call << ": " << cudaGetErrorString(cudaGetLastError())

// A device copy of a host vector; download() reads it back.
template <class T> struct Dev {
    T *p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count, int poison_byte = 0xff) : n(count) {
        if (cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) p = nullptr;
        if (p) cudaMemset(p, poison_byte, n * sizeof(T)); // 0xffff is a NaN in bf16 and fp32
    }
    explicit Dev(const std::vector<T> &h) : Dev(h.size()) {
        if (p) cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
    }
    ~Dev() { cudaFree(p); }
    std::vector<T> download() const {
        std::vector<T> h(n);
        cudaDeviceSynchronize();
        cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
        return h;
    }
};

std::vector<uint16_t> rand_bf16(size_t n, std::mt19937 &rng, float sd = 1.f) {
    std::normal_distribution<float> nd(0.f, sd);
    std::vector<uint16_t> v(n);
    for (auto &x : v) x = f32_to_bf16(nd(rng));
    return v;
}

// ||a - ref|| / ||ref||, infinity if any element of a is NaN.
double rel_err(const std::vector<double> &a, const std::vector<double> &ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (std::isnan(a[i])) return INFINITY;
        num += (a[i] - ref[i]) * (a[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

std::vector<double> widen(const std::vector<uint16_t> &v) {
    std::vector<double> o(v.size());
    for (size_t i = 0; i < v.size(); i++) o[i] = bf16_to_f32(v[i]);
    return o;
}

TEST(CudaKernels, EmbeddingGatherIsExact) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(1);
    const int E = 300, d = 136, rows = 77;
    auto wte = rand_bf16(size_t(E) * d, rng);
    std::vector<int32_t> tok(rows);
    for (auto &t : tok) t = int32_t(rng() % E);
    Dev<uint16_t> dw(wte);
    Dev<int32_t> dt(tok);
    Dev<float> dx(size_t(rows) * d);
    CK(dimoo::embed_launch(dw.p, dt.p, dx.p, rows, d, 0));
    auto x = dx.download();
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < d; c++) ASSERT_EQ(x[size_t(r) * d + c], bf16_to_f32(wte[size_t(tok[r]) * d + c]));
}

TEST(CudaKernels, RMSNormF32ToBF16WithGather) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(2);
    std::normal_distribution<float> nd(0.f, 3.f);
    // Rows held in registers (cols % 4 == 0 up to 8192: 1, 2, 4 or 8 float4
    // a thread, idle threads at 1028), and read twice: 257, 8196, and 4096
    // with x one float off 16-byte alignment (shift).
    const std::pair<int, int> cases[] = {{32, 0}, {257, 0}, {1028, 0}, {4096, 0}, {8192, 0}, {8196, 0}, {4096, 1}};
    for (const auto &[cols, shift] : cases) {
        const int rows = 41, out_rows = 13;
        std::vector<float> x(size_t(rows) * cols + shift), w(cols);
        for (auto &v : x) v = nd(rng);
        for (auto &v : w) v = 1.f + 0.1f * nd(rng);
        std::vector<int32_t> idx(out_rows);
        for (auto &i : idx) i = int32_t(rng() % rows);
        Dev<float> dx(x), dw(w);
        Dev<int32_t> di(idx);
        Dev<uint16_t> a(size_t(rows) * cols), g(size_t(out_rows) * cols);
        CK(dimoo::rmsnorm_f32_bf16_launch(dx.p + shift, nullptr, dw.p, a.p, rows, cols, 1e-5f, 0));
        CK(dimoo::rmsnorm_f32_bf16_launch(dx.p + shift, di.p, dw.p, g.p, out_rows, cols, 1e-5f, 0));
        const float *xs = x.data() + shift;
        auto ref = [&](int r, int c) {
            double ss = 0;
            for (int k = 0; k < cols; k++) ss += double(xs[size_t(r) * cols + k]) * xs[size_t(r) * cols + k];
            return xs[size_t(r) * cols + c] / std::sqrt(ss / cols + 1e-5) * w[c];
        };
        std::vector<double> ra, rg;
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) ra.push_back(ref(r, c));
        for (int r = 0; r < out_rows; r++)
            for (int c = 0; c < cols; c++) rg.push_back(ref(idx[r], c));
        EXPECT_LT(rel_err(widen(a.download()), ra), 4e-3) << cols << " shift " << shift;
        EXPECT_LT(rel_err(widen(g.download()), rg), 4e-3) << cols << " shift " << shift;
    }
}

// SwiGLU over rows of width 2*mlp: 8 values a load where mlp % 8 == 0 and
// the buffers are 16-byte aligned, else one at a time (mlp = 353, or the
// same rows one bf16 off alignment); both paths compute each element alike.
std::vector<uint16_t> check_swiglu(int rows, int mlp, int shift) {
    std::mt19937 rng(3);
    auto gu = rand_bf16(size_t(rows) * 2 * mlp, rng, 2.f);
    std::vector<uint16_t> shifted(size_t(shift), 0);
    shifted.insert(shifted.end(), gu.begin(), gu.end());
    Dev<uint16_t> dgu(shifted), dout(size_t(rows) * mlp + shift);
    EXPECT_EQ(dimoo::swiglu_launch(dgu.p + shift, dout.p + shift, rows, mlp, 0), cudaSuccess);
    std::vector<double> ref;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < mlp; c++) {
            const double g = bf16_to_f32(gu[size_t(r) * 2 * mlp + c]), u = bf16_to_f32(gu[size_t(r) * 2 * mlp + mlp + c]);
            ref.push_back(g / (1 + std::exp(-g)) * u);
        }
    auto out = dout.download();
    out.erase(out.begin(), out.begin() + shift);
    EXPECT_LT(rel_err(widen(out), ref), 4e-3) << "mlp " << mlp << " shift " << shift;
    return out;
}

TEST(CudaKernels, SwiGLU) {
    SKIP_WITHOUT_GPU();
    const auto vec = check_swiglu(29, 352, 0);
    EXPECT_TRUE(vec == check_swiglu(29, 352, 1)) << "the 8-wide and the scalar paths differ";
    check_swiglu(7, 353, 0);
    check_swiglu(3, 1544, 0); // more 8-wide groups than threads
}

TEST(CudaKernels, RowMaxIsExact) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(4);
    std::normal_distribution<float> nd(0.f, 5.f);
    const int rows = 19, cols = 8195, ld = 8200;
    std::vector<float> x(size_t(rows) * ld);
    for (auto &v : x) v = nd(rng);
    Dev<float> dx(x), dm(rows);
    CK(dimoo::rowmax_launch(dx.p, rows, cols, ld, dm.p, 0));
    auto m = dm.download();
    for (int r = 0; r < rows; r++)
        EXPECT_EQ(m[r], *std::max_element(x.begin() + size_t(r) * ld, x.begin() + size_t(r) * ld + cols));
}

TEST(CudaKernels, CublasLtGemm) {
    SKIP_WITHOUT_GPU();
    std::mt19937 rng(5);
    cudaStream_t s;
    CK(cudaStreamCreate(&s));
    {
        dimoo::LtGemm lt(s, size_t(32) << 20);
        struct Shape { int M, N, K; };
        for (Shape sh : {Shape{1, 8, 16}, Shape{37, 100, 64}, Shape{300, 352, 128}, Shape{129, 982, 256}}) {
            const int M = sh.M, N = sh.N, K = sh.K;
            auto X = rand_bf16(size_t(M) * K, rng), W = rand_bf16(size_t(N) * K, rng, 0.1f);
            std::vector<float> y0(size_t(M) * N);
            std::normal_distribution<float> nd(0.f, 1.f);
            for (auto &v : y0) v = nd(rng);
            Dev<uint16_t> dX(X), dW(W), dYb(size_t(M) * N);
            Dev<float> dYf(y0);
            lt.run(M, N, K, dX.p, K, dW.p, K, dYb.p, N, DIMOO_BF16, false);
            lt.run(M, N, K, dX.p, K, dW.p, K, dYf.p, N, DIMOO_F32, true); // residual add
            std::vector<double> ref(size_t(M) * N), refacc(size_t(M) * N);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    double acc = 0;
                    for (int k = 0; k < K; k++)
                        acc += double(bf16_to_f32(X[size_t(m) * K + k])) * bf16_to_f32(W[size_t(n) * K + k]);
                    ref[size_t(m) * N + n] = acc;
                    refacc[size_t(m) * N + n] = acc + y0[size_t(m) * N + n];
                }
            EXPECT_LT(rel_err(widen(dYb.download()), ref), 1e-2) << M << "x" << N << "x" << K;
            auto yf = dYf.download();
            EXPECT_LT(rel_err(std::vector<double>(yf.begin(), yf.end()), refacc), 1e-3) << M << "x" << N << "x" << K;
        }
    }
    cudaStreamDestroy(s);
}

// RoPE with scattered positions into a two-sequence cache: Q rows compact,
// K (rotated) and V at their positions, every other cache row untouched.
// `shift` moves the qkv rows one bf16 off 4-byte alignment, which takes the
// launcher's one-pair-at-a-time path; returns q | k cache | v cache.
std::vector<uint16_t> check_rope(int hd, int H, int Hkv, int shift) {
    std::mt19937 rng(6);
    const int d = H * hd, kv = Hkv * hd, L = 3, T = 50, layer = 1;
    const auto table = dimoo::cuda::rope_table(T, hd, 500000.f);
    // seq 0: positions 3, 7, 20 (USE-like); seq 1: all 0..T-1 (STORE-like).
    std::vector<int32_t> pos = {3, 7, 20}, seq = {0, 0, 0};
    for (int p = 0; p < T; p++) {
        pos.push_back(p);
        seq.push_back(1);
    }
    const int rows = int(pos.size());
    auto qkv = rand_bf16(size_t(rows) * (d + 2 * kv), rng);
    std::vector<uint16_t> shifted(size_t(shift), 0);
    shifted.insert(shifted.end(), qkv.begin(), qkv.end());
    Dev<uint16_t> dqkv(shifted), dq(size_t(rows) * d), kc(size_t(2) * L * T * kv), vc(size_t(2) * L * T * kv);
    std::vector<dimoo::cuda::AttnSeq> seqs(2);
    for (int s = 0; s < 2; s++) {
        seqs[s].k = kc.p + size_t(s) * L * T * kv;
        seqs[s].v = vc.p + size_t(s) * L * T * kv;
        seqs[s].layer_stride = int64_t(T) * kv;
    }
    Dev<dimoo::cuda::AttnSeq> dseqs(seqs);
    Dev<float> dtab(table);
    Dev<int32_t> dpos(pos), dseq(seq);
    dimoo::RopeArgs a{dqkv.p + shift, dq.p, dtab.p, T, dpos.p, dseq.p, dseqs.p, layer, rows, d, kv, hd};
    EXPECT_EQ(dimoo::rope_kv_launch(a, 0), cudaSuccess);
    auto q = dq.download(), k = kc.download(), v = vc.download();
    const int half = hd / 2;
    std::vector<double> got, ref;
    std::vector<char> written(k.size(), 0);
    for (int r = 0; r < rows; r++) {
        const uint16_t *src = qkv.data() + size_t(r) * (d + 2 * kv);
        const size_t krow = (size_t(seq[r]) * L + layer) * T * kv + size_t(pos[r]) * kv;
        for (int h = 0; h < H + Hkv; h++)
            for (int i = 0; i < half; i++) {
                const bool isq = h < H;
                const int e = (isq ? h : h - H) * hd + i;
                const double x0 = bf16_to_f32(src[(isq ? 0 : d) + e]), x1 = bf16_to_f32(src[(isq ? 0 : d) + e + half]);
                const double th = double(pos[r]) * std::pow(500000.0, -2.0 * i / hd);
                ref.push_back(x0 * std::cos(th) - x1 * std::sin(th));
                ref.push_back(x1 * std::cos(th) + x0 * std::sin(th));
                const uint16_t *out = isq ? q.data() + size_t(r) * d : k.data() + krow;
                got.push_back(bf16_to_f32(out[e]));
                got.push_back(bf16_to_f32(out[e + half]));
            }
        for (int c = 0; c < kv; c++) {
            EXPECT_EQ(v[krow + c], src[d + kv + c]) << "V row " << r << " hd " << hd;
            written[krow + c] = 1;
        }
    }
    EXPECT_LT(rel_err(got, ref), 4e-3) << "hd " << hd << " shift " << shift;
    size_t stray = 0;
    for (size_t i = 0; i < k.size(); i++)
        if (!written[i]) stray += k[i] != 0xffff || v[i] != 0xffff;
    EXPECT_EQ(stray, 0u) << "cache elements written outside the rows' positions";
    q.insert(q.end(), k.begin(), k.end());
    q.insert(q.end(), v.begin(), v.end());
    return q;
}

TEST(CudaKernels, RopeWritesQAndScattersKV) {
    SKIP_WITHOUT_GPU();
    // Two pairs per step (hd % 4 == 0) and one (hd = 6), GQA and not; the
    // same shape through both paths must agree bit for bit.
    const auto paired = check_rope(64, 4, 2, 0);
    const auto single = check_rope(64, 4, 2, 1);
    EXPECT_TRUE(paired == single) << "the paired and the one-at-a-time paths differ";
    check_rope(6, 3, 3, 0);
    check_rope(128, 2, 1, 0);
}

// Attention of several sequences in one launch against a float64 reference.
struct AttnCase {
    int hd, H, Hkv;
    std::vector<std::pair<int, int>> lens; // (q_len, kv_len) per sequence
};

void check_attention(const AttnCase &c, dimoo::AttnImpl impl, std::mt19937 &rng,
                     std::vector<double> *ref_cache = nullptr) {
    const int d = c.H * c.hd, kv = c.Hkv * c.hd, n = int(c.lens.size()), layer = 1, L = 2;
    int M = 0, maxq = 0, maxkv = 0;
    for (auto [q, k] : c.lens) {
        M += q;
        maxq = std::max(maxq, q);
        maxkv = std::max(maxkv, k);
    }
    auto q = rand_bf16(size_t(M) * d, rng);
    auto K = rand_bf16(size_t(n) * L * maxkv * kv, rng), V = rand_bf16(size_t(n) * L * maxkv * kv, rng);
    // Rows past a sequence's keys are NaN: a kernel must neither use them nor
    // multiply them by a zero probability.
    for (int s = 0; s < n; s++)
        for (int l = 0; l < L; l++)
            for (int j = c.lens[s].second; j < maxkv; j++)
                for (int i = 0; i < kv; i++) K[((size_t(s) * L + l) * maxkv + j) * kv + i] =
                    V[((size_t(s) * L + l) * maxkv + j) * kv + i] = 0xffff;
    Dev<uint16_t> dq(q), dK(K), dV(V), dO(size_t(M) * d);
    std::vector<dimoo::cuda::AttnSeq> seqs(n);
    int row = 0;
    for (int s = 0; s < n; s++) {
        seqs[s].q_begin = row;
        seqs[s].q_len = c.lens[s].first;
        seqs[s].kv_len = c.lens[s].second;
        seqs[s].k = dK.p + size_t(s) * L * maxkv * kv;
        seqs[s].v = dV.p + size_t(s) * L * maxkv * kv;
        seqs[s].layer_stride = int64_t(maxkv) * kv;
        row += c.lens[s].first;
    }
    Dev<dimoo::cuda::AttnSeq> dseqs(seqs);
    const float scale = 1.f / std::sqrt(float(c.hd));
    dimoo::AttnArgs a{dq.p, d, dO.p, d, dseqs.p, n, maxq, layer, c.H, c.Hkv, c.hd, kv, scale, seqs.data()};
    ASSERT_EQ(dimoo::attention_launch(a, impl, 0), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    auto o1 = dO.download();
    ASSERT_EQ(dimoo::attention_launch(a, impl, 0), cudaSuccess);
    auto o2 = dO.download();
    ASSERT_EQ(o1, o2) << "two runs differ: a race";

    // The float64 reference depends on the case and the random data only:
    // callers running several kernels on the same data share it (ref_cache).
    std::vector<double> local, got;
    std::vector<double> &ref = ref_cache ? *ref_cache : local;
    const bool have_ref = !ref.empty();
    for (int s = 0; s < n; s++) {
        const size_t kvbase = (size_t(s) * L + layer) * maxkv * kv;
        for (int r = 0; r < seqs[s].q_len; r++)
            for (int h = 0; h < c.H; h++) {
                for (int i = 0; i < c.hd; i++)
                    got.push_back(bf16_to_f32(o1[size_t(seqs[s].q_begin + r) * d + size_t(h) * c.hd + i]));
                if (have_ref) continue;
                const int kh = h / (c.H / c.Hkv);
                const uint16_t *qr = q.data() + size_t(seqs[s].q_begin + r) * d + size_t(h) * c.hd;
                std::vector<double> sc(seqs[s].kv_len), acc(c.hd, 0.0);
                double mx = -INFINITY;
                for (int j = 0; j < seqs[s].kv_len; j++) {
                    double dot = 0;
                    for (int i = 0; i < c.hd; i++)
                        dot += double(bf16_to_f32(qr[i])) * bf16_to_f32(K[kvbase + size_t(j) * kv + kh * c.hd + i]);
                    sc[j] = dot * scale;
                    mx = std::max(mx, sc[j]);
                }
                double sum = 0;
                for (auto &x : sc) sum += (x = std::exp(x - mx));
                for (int j = 0; j < seqs[s].kv_len; j++) {
                    const uint16_t *vr = V.data() + kvbase + size_t(j) * kv + kh * c.hd;
                    for (int i = 0; i < c.hd; i++) acc[i] += sc[j] * bf16_to_f32(vr[i]);
                }
                for (int i = 0; i < c.hd; i++) ref.push_back(acc[i] / sum);
            }
    }
    ASSERT_EQ(got.size(), ref.size());
    const double e = rel_err(got, ref);
    EXPECT_LT(e, 1e-2) << "hd " << c.hd << " impl " << int(impl);
}

// A sequence of 601..5000 keys and 1..keys queries, one head: the lengths
// the issue asks for beyond the fixed tail cases (the trace names them).
AttnCase long_random_case(std::mt19937 &rng) {
    const int kvl = std::uniform_int_distribution<int>(601, 5000)(rng);
    const int ql = std::uniform_int_distribution<int>(1, kvl)(rng);
    return {128, 1, 1, {{ql, kvl}}};
}

TEST(CudaKernels, AttentionMatchesFloat64) {
    SKIP_WITHOUT_GPU();
    const unsigned seed = std::random_device{}(); // random lengths below differ every run
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    std::vector<AttnCase> cases;
    for (int hd : {32, 64, 128}) {
        // Tails around the 64-row tiles, single rows, ML-Cache shapes (few
        // queries against many keys) and two sequences of different lengths.
        for (int T : {1, 7, 63, 64, 65, 127, 128, 129, 300, 600})
            cases.push_back({hd, 2, hd == 32 ? 1 : 2, {{T, T}}});
        cases.push_back({hd, 4, 2, {{5, 300}, {97, 129}}});
        cases.push_back({hd, 2, 2, {{200, 200}, {17, 600}, {1, 1}}});
    }
#ifndef DIMOO_CUDA_EMU // emulated warps: minutes for this one
    cases.push_back({128, 1, 1, {{4228, 4228}}}); // the 1024x1024 image's length, one head (a few s of float64)
#endif
    std::uniform_int_distribution<int> len(1, 600);
    for (int i = 0; i < 4; i++) { // random lengths, fresh each run of the suite
        int kvl = len(rng), ql = std::min(kvl, len(rng));
        cases.push_back({128, 2, 2, {{ql, kvl}, {kvl, kvl}}});
    }
#ifndef DIMOO_CUDA_EMU
    cases.push_back(long_random_case(rng)); // up to 5000 keys, one head (the float64 reference's cost)
#endif
    for (const auto &c : cases) {
        for (auto impl : {dimoo::AttnImpl::Reference, dimoo::AttnImpl::Sm80}) {
#ifdef DIMOO_CUDA_EMU // the reference's per-key warp reductions are slow to emulate: short cases only
            if (impl == dimoo::AttnImpl::Reference && c.lens[0].second > 129) continue;
#endif
            if (impl == dimoo::AttnImpl::Reference && c.lens[0].second > 600) continue; // sm80 is the one to check
            SCOPED_TRACE("hd " + std::to_string(c.hd) + " first (q, kv) = (" + std::to_string(c.lens[0].first) +
                         ", " + std::to_string(c.lens[0].second) + ")");
            check_attention(c, impl, rng);
        }
    }
}

// The sm_90a kernels' cases: the tails around 64- and 128-row tiles and
// 176-key blocks (sm90tw), the ML-Cache shape, several sequences per launch.
std::vector<AttnCase> sm90_cases() {
    std::vector<AttnCase> cases;
    for (int T : {1, 7, 63, 64, 65, 127, 128, 129, 176, 177, 300, 353, 600}) cases.push_back({128, 2, 2, {{T, T}}});
    cases.push_back({128, 4, 2, {{5, 300}, {97, 129}}});
    cases.push_back({128, 2, 2, {{200, 200}, {17, 600}, {1, 1}}});
    // More sequences than one TMA launch takes (its tensor maps are per sequence).
    cases.push_back({128, 2, 1, {{30, 30}, {5, 64}, {70, 130}, {1, 1}, {64, 200}, {3, 5}}});
    // Sequences without query rows (an ML-Cache USE that recomputes nothing
    // there): they own no tiles, and the others' tiles still map right.
    cases.push_back({128, 2, 2, {{0, 50}, {70, 130}, {0, 7}, {200, 260}}});
#ifndef DIMOO_CUDA_EMU // a minute of emulated wgmma
    cases.push_back({128, 1, 1, {{4228, 4228}}});
    // Random long lengths, fresh each process (all kernels see the same).
    const unsigned seed = std::random_device{}();
    std::printf("sm90 attention cases: random lengths from seed %u\n", seed);
    std::mt19937 rng(seed);
    cases.push_back(long_random_case(rng));
#endif
    return cases;
}

// Every kernel sees the same data (the same seed), so the float64
// references are computed once per process.
void check_sm90(dimoo::AttnImpl impl, const char *name) {
    static const std::vector<AttnCase> cases = sm90_cases();
    static std::vector<std::vector<double>> refs(cases.size());
    std::mt19937 rng(8);
    // Flushed before the kernel runs: should one hang on the device (a wrong
    // mbarrier phase), the log's last line names it.
    std::printf("attention %s: %zu cases\n", name, cases.size());
    std::fflush(stdout);
    for (size_t i = 0; i < cases.size(); i++) {
        const AttnCase &c = cases[i];
        SCOPED_TRACE(std::string(name) + " first (q, kv) = (" + std::to_string(c.lens[0].first) + ", " +
                     std::to_string(c.lens[0].second) + ")");
        check_attention(c, impl, rng, &refs[i]);
    }
}

// The wgmma kernels (sm_90a, head dim 128; plain and pipelined). Their own
// test, so device-check can run them apart: a fault there must not take the
// others down.
TEST(CudaKernels, AttentionSm90MatchesFloat64) {
    SKIP_WITHOUT_GPU();
    if (!dimoo::attention_supported(dimoo::AttnImpl::Sm90, 128)) GTEST_SKIP() << "not an sm_90 device";
    check_sm90(dimoo::AttnImpl::Sm90, "sm90");
    check_sm90(dimoo::AttnImpl::Sm90Pipe, "sm90p");
    check_sm90(dimoo::AttnImpl::Sm90Pipe2, "sm90p2");
    check_sm90(dimoo::AttnImpl::Sm90Wide, "sm90w");
}

// The warp-specialized TMA kernels (without and with ping-pong, one CTA per
// tile and persistent), apart again (an mbarrier pipeline that is wrong on
// the device hangs rather than fails). On the host emulation the persistent
// grid is one CTA per emulated SM (DIMOO_EMU_SMS, 1 by default): every tile
// of a launch through one CTA's barriers.
TEST(CudaKernels, AttentionSm90TmaMatchesFloat64) {
    SKIP_WITHOUT_GPU();
    if (!dimoo::attention_supported(dimoo::AttnImpl::Sm90Tma, 128)) GTEST_SKIP() << "not an sm_90 device";
    check_sm90(dimoo::AttnImpl::Sm90Tma, "sm90t");
    check_sm90(dimoo::AttnImpl::Sm90TmaPingPong, "sm90tp");
    check_sm90(dimoo::AttnImpl::Sm90TmaPersistent, "sm90ts");
    check_sm90(dimoo::AttnImpl::Sm90TmaPingPongPersistent, "sm90tps");
    check_sm90(dimoo::AttnImpl::Sm90TmaWide, "sm90tw");
}

// On an sm_90 device the forward's default is the wide pipelined wgmma kernel,
// chosen only after it agreed with the reference kernel there; elsewhere sm80.
TEST(CudaKernels, DefaultAttentionIsCheckedOnTheDevice) {
    SKIP_WITHOUT_GPU();
    if (std::getenv("DIMOO_CUDA_ATTN")) GTEST_SKIP() << "DIMOO_CUDA_ATTN is set";
    const auto want = dimoo::attention_supported(dimoo::AttnImpl::Sm90Wide, 128) ? dimoo::AttnImpl::Sm90Wide
                                                                                 : dimoo::AttnImpl::Sm80;
    EXPECT_EQ(int(dimoo::attention_default_impl(128)), int(want))
        << "the sm_90a kernel failed its start-up check on this device";
    EXPECT_EQ(int(dimoo::attention_default_impl(64)), int(dimoo::AttnImpl::Sm80));
}

TEST(CudaKernels, AttentionRejectsUnsupportedShapes) {
    SKIP_WITHOUT_GPU();
    dimoo::cuda::AttnSeq s{};
    dimoo::AttnArgs a{nullptr, 96, nullptr, 96, &s, 1, 1, 0, 1, 1, 96, 96, 1.f};
    EXPECT_EQ(dimoo::attention_launch(a, dimoo::AttnImpl::Sm80, 0), cudaErrorInvalidValue);
    a.n_kv_heads = 0;
    EXPECT_EQ(dimoo::attention_launch(a, dimoo::AttnImpl::Reference, 0), cudaErrorInvalidValue);
    if (dimoo::attention_supported(dimoo::AttnImpl::Sm90Tma, 128)) {
        // The TMA kernel encodes its tensor maps from the host copy of the sequences.
        Dev<uint16_t> buf(size_t(64) * 256);
        dimoo::cuda::AttnSeq hs{0, 64, 64, 0, buf.p, buf.p, 0};
        Dev<dimoo::cuda::AttnSeq> ds(std::vector<dimoo::cuda::AttnSeq>{hs});
        dimoo::AttnArgs t{buf.p, 256, buf.p, 256, ds.p, 1, 64, 0, 2, 2, 128, 256, 1.f};
        EXPECT_EQ(dimoo::attention_launch(t, dimoo::AttnImpl::Sm90Tma, 0), cudaErrorInvalidValue);
        hs.kv_len = 0; // no keys: nothing for the pipeline to wait for
        t.host_seqs = &hs;
        EXPECT_EQ(dimoo::attention_launch(t, dimoo::AttnImpl::Sm90Tma, 0), cudaErrorInvalidValue);
    }
}

} // namespace

#endif // DIMOO_WITH_CUDA
