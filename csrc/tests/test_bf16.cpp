// test_bf16.cpp - the CPU backend's bf16 path: packing layout, the GEMM
// tiles of every kernel set this CPU runs against a float64 reference,
// flash attention against plain softmax attention in float64, and the bf16
// forward (every kernel set, ML-Cache rows) through the C ABI.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <sstream>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/bf16.h"
#include "dimoo.h"
#include "source_dir.h"
#include "test_tensors.h"

namespace {

using dimoo::bf16_to_f32;
using dimoo::f32_to_bf16;
using dimoo::cpu::Kernels;

std::vector<Kernels> supported() {
    std::vector<Kernels> v;
    for (Kernels k : {Kernels::Portable, Kernels::Avx2, Kernels::Avx512, Kernels::Avx512Bf16, Kernels::Amx})
        if (dimoo::cpu::kernels_supported(k)) v.push_back(k);
    return v;
}

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = nd(rng);
    return v;
}

// Rows of fp32 as bf16 pairs, row stride ceil(K / 2) pairs.
std::vector<uint32_t> to_pairs(const std::vector<float> &a, int M, int K) {
    const int kp = (K + 1) / 2;
    std::vector<uint32_t> out(size_t(M) * kp);
    for (int m = 0; m < M; m++)
        dimoo::cpu::round_bf16(a.data() + size_t(m) * K, K, reinterpret_cast<uint16_t *>(out.data() + size_t(m) * kp),
                               2 * kp);
    return out;
}

float rb(float x) { return bf16_to_f32(f32_to_bf16(x)); }

TEST(Bf16, RoundingIsNearestEven) {
    const float in[] = {1.0f, 1.00390625f /* 1 + 2^-8: tie, stays */, 1.01171875f /* 1 + 3*2^-8: tie, up */,
                        -2.5f, 3.1415926f};
    uint16_t out[6];
    dimoo::cpu::round_bf16(in, 5, out, 6);
    for (int i = 0; i < 5; i++) EXPECT_EQ(out[i], f32_to_bf16(in[i])) << i;
    EXPECT_EQ(out[5], 0);
    EXPECT_EQ(bf16_to_f32(out[1]), 1.0f);
    EXPECT_EQ(bf16_to_f32(out[2]), 1.015625f);
}

// Blocks of 2 MiB and more start on a 2 MiB boundary, and (Linux, unless
// DIMOO_CPU_HUGEPAGES=0) their mapping carries the huge-page advice ("hg"
// in /proc/self/smaps), which is what lets the kernel back them with 2 MiB
// pages; smaller blocks keep the 64-byte alignment.
TEST(LineVector, AlignmentAndHugePageAdvice) {
    dimoo::LineVector<float> small(100), big((size_t(4) << 20) / sizeof(float));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(small.data()) % 64, 0u);
    const uintptr_t at = reinterpret_cast<uintptr_t>(big.data());
    EXPECT_EQ(at % (size_t(2) << 20), 0u);
#if defined(__linux__)
    std::ifstream smaps("/proc/self/smaps");
    if (!smaps) GTEST_SKIP() << "no /proc/self/smaps";
    std::string line, flags;
    bool inside = false;
    while (std::getline(smaps, line)) {
        unsigned long lo = 0, hi = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2) // a mapping's first line
            inside = lo <= at && at < hi;
        else if (inside && line.rfind("VmFlags:", 0) == 0) {
            flags = line;
            break;
        }
    }
    ASSERT_FALSE(flags.empty()) << "the block's mapping is not in /proc/self/smaps";
    EXPECT_EQ(flags.find(" hg") != std::string::npos, dimoo::huge_pages_wanted()) << flags;
#endif
}

// Zeros past N and K, with an odd K (the element loop) and an even one (the
// pair transpose). The second pack reuses the first's storage, filled with
// ones first: the packer must write the padding itself (pack_matrix does
// not zero its buffer before the loop).
TEST(Bf16, PackLayout) {
    const int N = 33;
    dimoo::cpu::PackedMatrix p;
    for (int K : {5, 4}) {
        std::vector<uint16_t> w(size_t(N) * K);
        for (size_t i = 0; i < w.size(); i++) w[i] = uint16_t(i + 1);
        for (int pass = 0; pass < 2; pass++) {
            if (pass) std::fill(p.data.begin(), p.data.end(), uint16_t(0xffff));
            dimoo::cpu::pack_matrix(w.data(), DIMOO_BF16, N, K, p);
            ASSERT_EQ(p.Kp, (K + 1) / 2);
            ASSERT_EQ(p.panels, 2);
            ASSERT_EQ(p.bytes(), size_t(2 * p.Kp * 64 * 2));
            for (int n = 0; n < 64; n++)
                for (int k = 0; k < 2 * p.Kp; k++) {
                    const uint16_t got = p.data[((size_t(n / 32) * p.Kp + k / 2) * 32 + n % 32) * 2 + k % 2];
                    const uint16_t want = n < N && k < K ? w[size_t(n) * K + k] : 0;
                    ASSERT_EQ(got, want) << "K=" << K << " pass " << pass << " n=" << n << " k=" << k;
                }
        }
    }
    // The fp32 panels likewise.
    std::vector<float> wf(size_t(N) * 3);
    for (size_t i = 0; i < wf.size(); i++) wf[i] = float(i) + 0.5f;
    dimoo::cpu::PackedMatrixF32 pf;
    for (int pass = 0; pass < 2; pass++) {
        if (pass) std::fill(pf.data.begin(), pf.data.end(), NAN);
        dimoo::cpu::pack_matrix_f32(wf.data(), DIMOO_F32, N, 3, pf);
        ASSERT_EQ(pf.data.size(), size_t(2 * 3 * 32));
        for (int n = 0; n < 64; n++)
            for (int k = 0; k < 3; k++)
                ASSERT_EQ(pf.data[(size_t(n / 32) * 3 + k) * 32 + n % 32], n < N ? wf[size_t(n) * 3 + k] : 0.0f)
                    << "pass " << pass << " n=" << n << " k=" << k;
    }
    // Wider dtypes are rounded to bf16.
    std::vector<float> f = {1.0f, 1.01171875f, -3.0f};
    p = {};
    dimoo::cpu::pack_matrix(f.data(), DIMOO_F32, 1, 3, p);
    EXPECT_EQ(p.data[0], f32_to_bf16(1.0f));
    EXPECT_EQ(p.data[1], f32_to_bf16(1.01171875f));
    EXPECT_EQ(p.data[64], f32_to_bf16(-3.0f));
}

// unpack_matrix(_f32) gives back exactly what was packed, at sizes with a
// partial last panel and an odd k.
TEST(Bf16, UnpackInvertsPack) {
    for (auto [N, K] : {std::pair{1, 1}, {33, 5}, {45, 37}, {64, 16}}) {
        std::vector<uint16_t> w(size_t(N) * K), back(w.size(), 0xffff);
        std::vector<float> f(w.size()), fback(w.size(), NAN);
        for (size_t i = 0; i < w.size(); i++) {
            w[i] = uint16_t(i * 2654435761u >> 7);
            f[i] = float(i) * 0.37f - 11.0f;
        }
        dimoo::cpu::PackedMatrix p;
        dimoo::cpu::pack_matrix(w.data(), DIMOO_BF16, N, K, p);
        dimoo::cpu::unpack_matrix(p, back.data());
        EXPECT_EQ(back, w) << N << "x" << K;
        dimoo::cpu::PackedMatrixF32 pf;
        dimoo::cpu::pack_matrix_f32(f.data(), DIMOO_F32, N, K, pf);
        dimoo::cpu::unpack_matrix_f32(pf, fback.data());
        EXPECT_EQ(fback, f) << N << "x" << K;
    }
}

// C = A W^T on bf16-rounded inputs: the products are exact in fp32, so the
// only error is fp32 accumulation, at most about K * 2^-24 * sum |a w|
// (bounded here by 4 K 2^-24 sum |a w|).
TEST(Bf16, GemmMatchesFloat64Reference) {
    struct Case {
        int M, N, K, n0, n1;
        bool acc;
    };
    const Case cases[] = {{1, 32, 64, 0, 32, false},   {5, 70, 33, 0, 70, false},   {12, 64, 128, 0, 64, true},
                          {13, 45, 7, 3, 41, false},   {100, 96, 300, 17, 90, true}, {97, 33, 1, 0, 33, false},
                          {200, 130, 257, 0, 130, false}, {120, 64, 512, 0, 64, true}, {20, 40, 96, 5, 37, false},
                          // Enough row blocks for groups of panels with partial ends (AVX2's multi-panel tiles).
                          {400, 70, 63, 5, 70, true},     {400, 100, 130, 40, 99, false}};
    for (const Case &c : cases) {
        const auto a = randn(size_t(c.M) * c.K, 1 + c.M), wf = randn(size_t(c.N) * c.K, 2 + c.N, 0.1f);
        std::vector<uint16_t> w(wf.size());
        for (size_t i = 0; i < w.size(); i++) w[i] = f32_to_bf16(wf[i]);
        dimoo::cpu::PackedMatrix p;
        dimoo::cpu::pack_matrix(w.data(), DIMOO_BF16, c.N, c.K, p);
        const auto A = to_pairs(a, c.M, c.K);
        const int W = c.n1 - c.n0;
        const auto c0 = randn(size_t(c.M) * W, 99);
        std::vector<float> fma_bits; // the first FMA set's result (AVX2, AVX-512)
        for (Kernels ks : supported()) {
            std::vector<float> C = c0;
            const dimoo::cpu::GemmJob job{&p, C.data(), size_t(W), c.n0, c.n1, c.acc};
            dimoo::cpu::gemm_team(ks, c.M, A.data(), size_t(p.Kp), &job, 1);
            // Exact products added in the same order (odd k, then even, per
            // pair): the AVX2 and AVX-512 tiles give the same bits.
            if (ks == Kernels::Avx2 || ks == Kernels::Avx512) {
                if (fma_bits.empty()) fma_bits = C;
                else
                    ASSERT_EQ(std::memcmp(C.data(), fma_bits.data(), C.size() * sizeof(float)), 0)
                        << dimoo::cpu::kernels_name(ks) << " M=" << c.M << " N=" << c.N << " K=" << c.K;
            }
            for (int m = 0; m < c.M; m++)
                for (int n = 0; n < W; n++) {
                    double s = c.acc ? double(c0[size_t(m) * W + n]) : 0.0, mag = std::fabs(s);
                    for (int k = 0; k < c.K; k++) {
                        const double t = double(rb(a[size_t(m) * c.K + k])) *
                                         double(bf16_to_f32(w[size_t(c.n0 + n) * c.K + k]));
                        s += t;
                        mag += std::fabs(t);
                    }
                    ASSERT_NEAR(C[size_t(m) * W + n], s, 4.0 * (c.K + 1) * std::ldexp(mag, -24) + 1e-30)
                        << dimoo::cpu::kernels_name(ks) << " M=" << c.M << " N=" << c.N << " K=" << c.K
                        << " at " << m << "," << n;
                }
        }
    }
}

// A row's result does not depend on the rows computed with it (where it
// sits in a tile, how many rows the tile has): ML-Cache's recomputed rows and
// batched sequences rely on it for bit-identical logits.
TEST(Bf16, RowResultsIndependentOfBatch) {
    const int M = 45, N = 64, K = 96 * 2 + 6;
    const auto a = randn(size_t(M) * K, 5), wf = randn(size_t(N) * K, 6, 0.1f);
    std::vector<uint16_t> w(wf.size());
    for (size_t i = 0; i < w.size(); i++) w[i] = f32_to_bf16(wf[i]);
    dimoo::cpu::PackedMatrix p;
    dimoo::cpu::pack_matrix(w.data(), DIMOO_BF16, N, K, p);
    const auto A = to_pairs(a, M, K);
    const std::vector<int> pick = {3, 17, 31, 32, 40, 44};
    std::vector<uint32_t> Asub;
    for (int r : pick) Asub.insert(Asub.end(), A.begin() + size_t(r) * p.Kp, A.begin() + size_t(r + 1) * p.Kp);
    for (Kernels ks : supported()) {
        std::vector<float> all(size_t(M) * N), sub(pick.size() * N);
        const dimoo::cpu::GemmJob j1{&p, all.data(), size_t(N), 0, N, false};
        dimoo::cpu::gemm_team(ks, M, A.data(), size_t(p.Kp), &j1, 1);
        const dimoo::cpu::GemmJob j2{&p, sub.data(), size_t(N), 0, N, false};
        dimoo::cpu::gemm_team(ks, int(pick.size()), Asub.data(), size_t(p.Kp), &j2, 1);
        for (size_t i = 0; i < pick.size(); i++)
            ASSERT_EQ(std::memcmp(&sub[i * N], &all[size_t(pick[i]) * N], N * sizeof(float)), 0)
                << dimoo::cpu::kernels_name(ks) << " row " << pick[i];
    }
}

// The team hands out tiles in two orders (blocked: row blocks that fit L2
// over groups of panels inside 1024-column blocks; panel-major when k is too
// long for that). Either way every output is written once, by the same
// tile arithmetic over all of k: the team's result equals the tiles called
// one by one, bit for bit, for several jobs with unaligned column ranges,
// more than one column block, a partial last group, and both orders (k =
// 8400 pairs' rows are 33 KB: no 96 of them fit three quarters of a 2 MiB
// L2, nor of any L2 under 4 MiB).
TEST(Bf16, GemmTeamEqualsTilesInEitherOrder) {
    struct Case {
        int M, N, K;
    };
    for (const Case c : {Case{400, 1100, 256}, Case{130, 300, 16800}}) {
        const auto a = randn(size_t(c.M) * c.K, 7), wf = randn(size_t(c.N) * c.K, 8, 0.1f);
        dimoo::cpu::PackedMatrix p;
        dimoo::cpu::pack_matrix(wf.data(), DIMOO_F32, c.N, c.K, p);
        const auto A = to_pairs(a, c.M, c.K);
        struct Range {
            int n0, n1;
            bool acc;
        };
        const Range ranges[] = {{0, c.N, false}, {5, 70, true}, {40, c.N - 3, false}};
        for (Kernels ks : supported())
            for (bool blocking : {true, false}) {
                dimoo::cpu::set_gemm_blocking(blocking); // off: panel-major whatever k
                std::vector<std::vector<float>> team(3), want(3);
                dimoo::cpu::GemmJob jobs[3];
                for (int j = 0; j < 3; j++) {
                    const Range r = ranges[j];
                    const size_t W = size_t(r.n1 - r.n0);
                    // Accumulating jobs start from values; the others from NaN,
                    // so an output never written shows.
                    team[size_t(j)] =
                        r.acc ? randn(size_t(c.M) * W, 20 + j) : std::vector<float>(size_t(c.M) * W, NAN);
                    want[size_t(j)] = team[size_t(j)];
                    jobs[j] = {&p, team[size_t(j)].data(), W, r.n0, r.n1, r.acc};
                }
#pragma omp parallel num_threads(2)
                dimoo::cpu::gemm_team(ks, c.M, A.data(), size_t(p.Kp), jobs, 3);
                for (int j = 0; j < 3; j++) {
                    const Range r = ranges[j];
                    const size_t W = size_t(r.n1 - r.n0);
                    for (int q = r.n0 / dimoo::cpu::kPanel; q * dimoo::cpu::kPanel < r.n1; q++) {
                        const int c0 = std::max(r.n0, q * dimoo::cpu::kPanel) - q * dimoo::cpu::kPanel;
                        const int c1 = std::min(r.n1, (q + 1) * dimoo::cpu::kPanel) - q * dimoo::cpu::kPanel;
                        for (int m = 0; m < c.M; m += 32)
                            dimoo::cpu::tile(ks, std::min(32, c.M - m), p.Kp, A.data() + size_t(m) * p.Kp,
                                             size_t(p.Kp), p.panel(q), 64,
                                             want[size_t(j)].data() + size_t(m) * W +
                                                 size_t(q * dimoo::cpu::kPanel + c0 - r.n0),
                                             W, c0, c1, r.acc);
                    }
                    dimoo::cpu::set_gemm_blocking(true);
                    const std::vector<float> &got = team[size_t(j)];
                    ASSERT_EQ(std::memcmp(got.data(), want[size_t(j)].data(), got.size() * 4), 0)
                        << dimoo::cpu::kernels_name(ks) << " M=" << c.M << " K=" << c.K << " job " << j
                        << " blocking " << blocking;
                    for (float v : got) ASSERT_TRUE(std::isfinite(v));
                }
            }
    }
}

// Plain softmax attention in float64 on the bf16-rounded q, k, v.
std::vector<double> attention_ref(const std::vector<float> &q, const std::vector<float> &k,
                                  const std::vector<float> &v, int rows, int T, int H, int Hkv, int hd) {
    const int d = H * hd, kvd = Hkv * hd;
    std::vector<double> out(size_t(rows) * d), s(T);
    for (int h = 0; h < H; h++)
        for (int r = 0; r < rows; r++) {
            const int kh = h / (H / Hkv);
            double mx = -1e300;
            for (int j = 0; j < T; j++) {
                double dot = 0;
                for (int i = 0; i < hd; i++)
                    dot += double(rb(q[size_t(r) * d + h * hd + i])) * rb(k[size_t(j) * kvd + kh * hd + i]);
                s[j] = dot / std::sqrt(double(hd));
                mx = std::max(mx, s[j]);
            }
            double sum = 0;
            for (int j = 0; j < T; j++) sum += (s[j] = std::exp(s[j] - mx));
            for (int i = 0; i < hd; i++) {
                double o = 0;
                for (int j = 0; j < T; j++) o += s[j] * rb(v[size_t(j) * kvd + kh * hd + i]);
                out[size_t(r) * d + h * hd + i] = o / sum;
            }
        }
    return out;
}

// Flash attention rounds P and the output to bf16 (relative 2^-9 each), so
// an output element is off by at most about 2^-8 of the largest |v| it
// averages; asserted with margin as 2^-6 of max |v| of its head.
TEST(Bf16, FlashAttentionMatchesFloat64) {
    struct Case {
        int rows, T, H, Hkv, hd;
        bool subset; // ML-Cache: a few query rows against every key
    };
    const Case cases[] = {{1, 1, 2, 2, 8, false},    {7, 7, 4, 2, 8, false},     {63, 63, 2, 1, 64, false},
                          {65, 65, 2, 2, 64, false}, {130, 130, 4, 4, 32, false}, {3, 200, 4, 2, 64, true},
                          {50, 301, 2, 1, 128, true}, {49, 49, 1, 1, 48, false}};
    for (const Case &c : cases) {
        const int d = c.H * c.hd, kvd = c.Hkv * c.hd;
        const auto q = randn(size_t(c.rows) * d, 5 + c.T, 1.5f), k = randn(size_t(c.T) * kvd, 6 + c.T, 1.5f),
                   v = randn(size_t(c.T) * kvd, 7 + c.T);
        const auto want = attention_ref(q, k, v, c.rows, c.T, c.H, c.Hkv, c.hd);
        const auto Q = to_pairs(q, c.rows, d);
        dimoo::cpu::PackedKV kv;
        kv.T = c.T;
        kv.Tpad = dimoo::cpu::packed_kv_tpad(c.T);
        kv.head_dim = c.hd;
        kv.n_kv = c.Hkv;
        kv.kstride = kv.vstride = dimoo::cpu::packed_kv_elems(c.T, c.hd);
        std::vector<uint16_t> kbuf(kv.kstride * c.Hkv, 0xffff), vbuf(kv.vstride * c.Hkv, 0xffff);
        kv.k = kbuf.data();
        kv.v = vbuf.data();
        dimoo::cpu::pack_kv_team(k.data(), v.data(), size_t(kvd), kv);
        std::vector<float> scratch(dimoo::cpu::flash_scratch_floats(c.hd));
        for (Kernels ks : supported()) {
            std::vector<uint16_t> out(size_t(c.rows) * d, 0xffff);
            dimoo::cpu::flash_attention_team(ks, Q.data(), size_t(d / 2), c.rows, c.H, kv, out.data(), size_t(d),
                                             scratch.data());
            for (int h = 0; h < c.H; h++) {
                double vmax = 0;
                const int kh = h / (c.H / c.Hkv);
                for (int j = 0; j < c.T; j++)
                    for (int i = 0; i < c.hd; i++)
                        vmax = std::max(vmax, std::fabs(double(v[size_t(j) * kvd + kh * c.hd + i])));
                for (int r = 0; r < c.rows; r++)
                    for (int i = 0; i < c.hd; i++) {
                        const size_t at = size_t(r) * d + h * c.hd + i;
                        ASSERT_NEAR(bf16_to_f32(out[at]), want[at], vmax / 64)
                            << dimoo::cpu::kernels_name(ks) << " rows=" << c.rows << " T=" << c.T << " head " << h
                            << " row " << r << " col " << i;
                    }
            }
        }
    }
}

// The fp32 tiles: fp32 accumulation of fp32 products, error at most about
// K 2^-24 sum |a w| (asserted as 4 (K + 1) 2^-24 sum |a w|).
TEST(F32Packed, GemmMatchesFloat64Reference) {
    struct Case {
        int M, N, K, n0, n1;
        bool acc;
    };
    const Case cases[] = {{1, 32, 64, 0, 32, false}, {13, 45, 7, 3, 41, false}, {100, 96, 300, 17, 90, true},
                          {97, 33, 1, 0, 33, false}};
    for (const Case &c : cases) {
        const auto a = randn(size_t(c.M) * c.K, 1 + c.M), w = randn(size_t(c.N) * c.K, 2 + c.N, 0.1f);
        dimoo::cpu::PackedMatrixF32 p;
        dimoo::cpu::pack_matrix_f32(w.data(), DIMOO_F32, c.N, c.K, p);
        ASSERT_EQ(p.bytes(), size_t((c.N + 31) / 32 * 32) * c.K * 4);
        const int W = c.n1 - c.n0;
        const auto c0 = randn(size_t(c.M) * W, 99);
        for (Kernels ks : supported()) {
            std::vector<float> C = c0;
            const dimoo::cpu::GemmJobF32 job{&p, C.data(), size_t(W), c.n0, c.n1, c.acc};
            dimoo::cpu::gemm_team_f32(ks, c.M, a.data(), size_t(c.K), &job, 1);
            for (int m = 0; m < c.M; m++)
                for (int n = 0; n < W; n++) {
                    double s = c.acc ? double(c0[size_t(m) * W + n]) : 0.0, mag = std::fabs(s);
                    for (int k = 0; k < c.K; k++) {
                        const double t = double(a[size_t(m) * c.K + k]) * double(w[size_t(c.n0 + n) * c.K + k]);
                        s += t;
                        mag += std::fabs(t);
                    }
                    ASSERT_NEAR(C[size_t(m) * W + n], s, 4.0 * (c.K + 1) * std::ldexp(mag, -24) + 1e-30)
                        << dimoo::cpu::kernels_name(ks) << " M=" << c.M << " K=" << c.K << " at " << m << "," << n;
                }
        }
    }
}

// fp32 flash attention against float64 softmax attention (no rounding to
// bf16 here: q, k, v as given), to 1e-5 of max |v|.
TEST(F32Packed, FlashAttentionMatchesFloat64) {
    struct Case {
        int rows, T, H, Hkv, hd;
    };
    const Case cases[] = {{1, 1, 2, 2, 8}, {7, 7, 4, 2, 8}, {65, 65, 2, 2, 64}, {3, 200, 4, 2, 64}, {50, 301, 2, 1, 128}};
    for (const Case &c : cases) {
        const int d = c.H * c.hd, kvd = c.Hkv * c.hd;
        const auto q = randn(size_t(c.rows) * d, 5 + c.T, 1.5f), k = randn(size_t(c.T) * kvd, 6 + c.T, 1.5f);
        auto v = randn(size_t(c.T) * kvd, 7 + c.T);
        // Reference on the exact inputs: round nothing.
        std::vector<double> want(size_t(c.rows) * d), s(c.T);
        for (int h = 0; h < c.H; h++)
            for (int r = 0; r < c.rows; r++) {
                const int kh = h / (c.H / c.Hkv);
                double mx = -1e300, sum = 0;
                for (int j = 0; j < c.T; j++) {
                    double dot = 0;
                    for (int i = 0; i < c.hd; i++)
                        dot += double(q[size_t(r) * d + h * c.hd + i]) * k[size_t(j) * kvd + kh * c.hd + i];
                    mx = std::max(mx, s[j] = dot / std::sqrt(double(c.hd)));
                }
                for (int j = 0; j < c.T; j++) sum += (s[j] = std::exp(s[j] - mx));
                for (int i = 0; i < c.hd; i++) {
                    double o = 0;
                    for (int j = 0; j < c.T; j++) o += s[j] * v[size_t(j) * kvd + kh * c.hd + i];
                    want[size_t(r) * d + h * c.hd + i] = o / sum;
                }
            }
        v.resize(v.size() + 32); // V panels read up to 31 floats past the last row
        dimoo::cpu::PackedKVF32 kv;
        kv.T = c.T;
        kv.Tpad = dimoo::cpu::packed_kv_tpad(c.T);
        kv.head_dim = c.hd;
        kv.n_kv = c.Hkv;
        kv.kstride = dimoo::cpu::packed_k_f32_elems(c.T, c.hd);
        std::vector<float> kbuf(kv.kstride * c.Hkv, NAN);
        kv.k = kbuf.data();
        kv.v = v.data();
        kv.ldv = size_t(kvd);
        dimoo::cpu::pack_k_f32_team(k.data(), size_t(kvd), kv);
        std::vector<float> scratch(dimoo::cpu::flash_scratch_floats(c.hd));
        for (Kernels ks : supported()) {
            std::vector<float> out(size_t(c.rows) * d, NAN);
            dimoo::cpu::flash_attention_f32_team(ks, q.data(), size_t(d), c.rows, c.H, kv, out.data(), size_t(d),
                                                 scratch.data());
            for (size_t i = 0; i < out.size(); i++)
                ASSERT_NEAR(out[i], want[i], 1e-5) << dimoo::cpu::kernels_name(ks) << " T=" << c.T << " at " << i;
        }
    }
}

// ---- the bf16 forward through the C ABI -------------------------------------------------------

dimoo_model_config small_config(int hd) {
    dimoo_model_config c{};
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_model = 4 * hd;
    c.n_layers = 2;
    c.mlp_hidden_size = 3 * hd + 2; // not a multiple of the 32-column panel
    c.vocab_size = 90;
    c.embedding_size = 100;
    c.max_sequence_length = 160;
    c.rope_theta = 10000.f;
    c.rms_norm_eps = 1e-5f;
    return c;
}

// The values of a Model's random matrices: rounded to bf16, to fp16, or not
// at all (1-D weights are always rounded to bf16).
enum class Values { Bf16, F16, Raw };

struct Model {
    dimoo_runtime *rt = nullptr;
    dimoo_model *m = nullptr;
    dimoo_ctx *ctx = nullptr;
    dimoo_model_config cfg;
    // Random weights with the given values, stored as dtype (BF16 and F16
    // round to nearest even when the values are wider).
    // dtype_of (optional) gives the dtype of each tensor by its index (a mixed
    // checkpoint); with set_twice each is set first as the other of bf16 and
    // fp32 with other values, then as meant.
    Model(const dimoo_model_config &c, int32_t dtype, uint32_t seed, Values values = Values::Bf16,
          std::function<int32_t(size_t)> dtype_of = nullptr, bool set_twice = false)
        : cfg(c) {
        char err[256];
        EXPECT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 2, &rt, err, sizeof err), DIMOO_OK) << err;
        EXPECT_EQ(dimoo_model_create(rt, &cfg, &m, err, sizeof err), DIMOO_OK) << err;
        const auto t = dimoo::test::checkpoint_tensors(c);
        std::mt19937 rng(seed);
        std::normal_distribution<float> nd(0.f, 1.f);
        size_t index = 0;
        for (const auto &[name, shape] : t) {
            const int32_t dt = dtype_of ? dtype_of(index++) : dtype;
            size_t n = 1;
            for (auto s : shape) n *= size_t(s);
            const float scale = shape.size() == 2 && name.find("wte") == std::string::npos ? 1.f / std::sqrt(float(shape[1])) : 1.f;
            std::vector<float> f(n);
            std::vector<uint16_t> h(n);
            for (size_t i = 0; i < n; i++) {
                const float v = shape.size() == 1 ? 1.f + 0.1f * nd(rng) : nd(rng) * scale;
                f[i] = shape.size() == 1 || values == Values::Bf16 ? bf16_to_f32(f32_to_bf16(v))
                       : values == Values::F16                     ? dimoo::f16_to_f32(dimoo::f32_to_f16(v))
                                                                   : v;
                h[i] = dt == DIMOO_F16 ? dimoo::f32_to_f16(f[i]) : f32_to_bf16(f[i]);
            }
            if (set_twice) {
                const int32_t other = dt == DIMOO_F32 ? DIMOO_BF16 : DIMOO_F32;
                std::vector<float> junk(n, 0.5f);
                std::vector<uint16_t> junk16(n, f32_to_bf16(-0.25f));
                const void *d = other == DIMOO_F32 ? static_cast<const void *>(junk.data()) : junk16.data();
                EXPECT_EQ(dimoo_model_set_weight(m, name.c_str(), other, shape.data(), int32_t(shape.size()), d,
                                                 n * (other == DIMOO_F32 ? 4 : 2)),
                          DIMOO_OK)
                    << dimoo_model_error(m);
            }
            const void *data = dt == DIMOO_F32 ? static_cast<const void *>(f.data()) : h.data();
            EXPECT_EQ(dimoo_model_set_weight(m, name.c_str(), dt, shape.data(), int32_t(shape.size()), data,
                                             n * (dt == DIMOO_F32 ? 4 : 2)),
                      DIMOO_OK)
                << dimoo_model_error(m);
        }
        EXPECT_EQ(dimoo_model_finalize(m), DIMOO_OK) << dimoo_model_error(m);
        dimoo_ctx_params p{2, c.max_sequence_length, DIMOO_CTX_KV_CACHE};
        EXPECT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_OK) << err;
    }
    ~Model() {
        dimoo_ctx_destroy(ctx);
        dimoo_model_destroy(m);
        dimoo_runtime_destroy(rt);
    }
    std::vector<float> logits(const std::vector<int32_t> &toks, int mode = DIMOO_CACHE_NONE, int seq = 0,
                              const std::vector<int32_t> &rows = {}) {
        const size_t n_out = rows.empty() ? toks.size() : rows.size();
        std::vector<float> out(n_out * size_t(cfg.embedding_size), NAN);
        dimoo_forward_args a{};
        a.seq = seq;
        a.n_tokens = int32_t(toks.size());
        a.tokens = toks.data();
        a.cache_mode = mode;
        if (!rows.empty()) {
            a.n_compute = a.n_out = int32_t(rows.size());
            a.compute = a.out_positions = rows.data();
        }
        a.logits = out.data();
        EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx);
        return out;
    }
};

double rel(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

struct KernelsEnv {
    explicit KernelsEnv(const char *v) { setenv("DIMOO_CPU_KERNELS", v, 1); }
    ~KernelsEnv() { unsetenv("DIMOO_CPU_KERNELS"); }
};

// The bf16 forward: weights packed at load (memory accounted), every kernel
// set gives the same logits, and it stays within bf16 rounding of the fp32
// forward on the same (bf16-valued) weights (seen: 3e-3 relative).
TEST(Bf16Forward, KernelSetsAgreeAndTrackFp32) {
    const bool amx = dimoo::cpu::kernels_supported(Kernels::Amx);
    for (int hd : {8, 64}) {
        const auto cfg = small_config(hd);
        std::vector<int32_t> toks(70);
        for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 37 + 5) % 90);
        Model f32(cfg, DIMOO_F32, 11);
        const auto want = f32.logits(toks);
        std::vector<float> vdp; // the AVX-512 BF16 set's logits (the best below AMX)
        for (const char *env : {"avx512bf16", "", "avx512", "avx2", "portable"}) {
            KernelsEnv set(env);
            Model b(cfg, DIMOO_BF16, 11);
            // Packed matrices are the same size as the checkpoint's bf16 (up to
            // padding to 32 rows and even k); the fp32 model holds 2x.
            if (hd == 64) {
                EXPECT_LT(dimoo_model_weight_bytes(b.m), dimoo_model_weight_bytes(f32.m) * 6 / 10);
                EXPECT_GT(dimoo_model_weight_bytes(b.m), dimoo_model_weight_bytes(f32.m) * 4 / 10);
            }
            const auto got = b.logits(toks);
            const double e_f32 = rel(got.data(), want.data(), want.size());
            EXPECT_LT(e_f32, 2e-2) << "hd " << hd << " kernels '" << env << "'";
            if (vdp.empty()) {
                vdp = got;
                continue;
            }
            const double e = rel(got.data(), vdp.data(), vdp.size());
            std::printf("hd %d kernels '%s': vs fp32 %.2e, vs avx512bf16 %.2e\n", hd, env, e_f32, e);
            // Exact products, the same fp32 additions in the same order (odd
            // k first, as VDPBF16PS does) and the same vector exp: the
            // AVX-512 sets give bit-identical logits. AMX adds a tile's
            // products in its own order, and the portable set's scalar exp
            // differs in the last bit; either flips a few bf16 roundings.
            const bool same_bits = std::string(env) == "avx512" || (std::string(env).empty() && !amx);
            if (same_bits) EXPECT_EQ(e, 0.0) << "hd " << hd << " kernels '" << env << "'";
            else EXPECT_LT(e, 5e-3) << "hd " << hd << " kernels '" << env << "'";
        }
    }
}

// The fp32 packed forward: every kernel set within fp32 rounding of the
// others (the AVX-512 and portable tiles add in the same order; FMA
// contraction may differ), weights held at fp32 size.
TEST(F32Forward, KernelSetsAgree) {
    const auto cfg = small_config(64);
    std::vector<int32_t> toks(70);
    for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 37 + 5) % 90);
    std::vector<float> best;
    for (const char *env : {"", "avx512", "avx2", "portable"}) {
        KernelsEnv e(env);
        Model f(cfg, DIMOO_F32, 11);
        const auto got = f.logits(toks);
        if (best.empty()) best = got;
        else EXPECT_LT(rel(got.data(), best.data(), best.size()), 1e-6) << "kernels '" << env << "'";
    }
}

// Precision BF16 rounds any checkpoint to bf16 at load (the embedding too)
// and then computes exactly as a bf16 checkpoint of the rounded values;
// precision F32 widens bf16 and fp16 weights exactly and computes as an fp32
// checkpoint of the same values. Bit for bit, with the weights' bytes of
// the precision, not of the checkpoint.
TEST(Precision, AnyCheckpointComputesAsTheChosenDtype) {
    std::vector<int32_t> toks(70);
    for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 37 + 5) % 90);
    for (int hd : {8, 64}) {
        auto cfg = small_config(hd);
        auto with = [&](int32_t p) {
            auto c = cfg;
            c.precision = p;
            return c;
        };
        {
            Model want(cfg, DIMOO_BF16, 5, Values::Raw); // raw values rounded by the test
            const auto w = want.logits(toks);
            Model f32(with(DIMOO_PRECISION_BF16), DIMOO_F32, 5, Values::Raw);
            EXPECT_EQ(f32.logits(toks), w) << "fp32 checkpoint, precision bf16, hd " << hd;
            EXPECT_EQ(dimoo_model_weight_bytes(f32.m), dimoo_model_weight_bytes(want.m));
            Model auto32(cfg, DIMOO_F32, 5, Values::Raw); // as stored: fp32, not the same logits
            EXPECT_NE(auto32.logits(toks), w);
            Model want16(cfg, DIMOO_BF16, 5, Values::F16);
            Model f16(with(DIMOO_PRECISION_BF16), DIMOO_F16, 5, Values::F16);
            EXPECT_EQ(f16.logits(toks), want16.logits(toks)) << "fp16 checkpoint, precision bf16, hd " << hd;
        }
        {
            Model want(cfg, DIMOO_F32, 6, Values::Bf16);
            Model bf(with(DIMOO_PRECISION_F32), DIMOO_BF16, 6, Values::Bf16);
            EXPECT_EQ(bf.logits(toks), want.logits(toks)) << "bf16 checkpoint, precision fp32, hd " << hd;
            EXPECT_EQ(dimoo_model_weight_bytes(bf.m) - dimoo_model_weight_bytes(want.m),
                      -int64_t(cfg.embedding_size) * cfg.d_model * 2) // the embedding stays bf16
                << "hd " << hd;
            Model want16(cfg, DIMOO_F32, 6, Values::F16);
            Model f16(with(DIMOO_PRECISION_F32), DIMOO_F16, 6, Values::F16);
            EXPECT_EQ(f16.logits(toks), want16.logits(toks)) << "fp16 checkpoint, precision fp32, hd " << hd;
        }
    }
}

// Precision AUTO packs bf16 and fp32 matrices as they arrive. A checkpoint
// that turns out mixed (bf16 and fp32 matrices) computes on the per-call path
// from the matrices as stored: bit for bit what a model that never packed
// (DIMOO_CPU_PACKED=0) computes, with the same bytes held, whether or not
// every weight was first set as the other dtype. All-bf16 and all-fp32
// checkpoints hold packed weights only.
TEST(Precision, MixedCheckpointUnpacksWhatAutoPacked) {
    std::vector<int32_t> toks(70);
    for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 37 + 5) % 90);
    auto mixed = [](size_t i) { return i % 3 == 1 ? DIMOO_F32 : DIMOO_BF16; };
    for (int hd : {8, 64}) {
        const auto cfg = small_config(hd);
        std::vector<float> want;
        int64_t want_bytes = 0;
        {
            setenv("DIMOO_CPU_PACKED", "0", 1);
            Model never(cfg, DIMOO_BF16, 7, Values::Bf16, mixed);
            unsetenv("DIMOO_CPU_PACKED");
            want = never.logits(toks);
            want_bytes = dimoo_model_weight_bytes(never.m);
        }
        for (bool twice : {false, true}) {
            Model m(cfg, DIMOO_BF16, 7, Values::Bf16, mixed, twice);
            EXPECT_EQ(m.logits(toks), want) << "hd " << hd << " set twice " << twice;
            EXPECT_EQ(dimoo_model_weight_bytes(m.m), want_bytes) << "hd " << hd << " set twice " << twice;
        }
        // One dtype, each weight set first as the other: the packed model
        // of that dtype, as if set once.
        for (int32_t dt : {DIMOO_BF16, DIMOO_F32}) {
            Model once(cfg, dt, 8);
            Model twice(cfg, dt, 8, Values::Bf16, nullptr, true);
            EXPECT_EQ(twice.logits(toks), once.logits(toks)) << "hd " << hd << " dtype " << dt;
            EXPECT_EQ(dimoo_model_weight_bytes(twice.m), dimoo_model_weight_bytes(once.m));
        }
    }
}

TEST(Precision, UnknownOrUnsupportedIsAnError) {
    dimoo_runtime *rt = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 1, &rt, err, sizeof err), DIMOO_OK) << err;
    auto cfg = small_config(8);
    cfg.precision = 3;
    dimoo_model *m = nullptr;
    EXPECT_EQ(dimoo_model_create(rt, &cfg, &m, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("precision"), std::string::npos) << err;
    EXPECT_EQ(m, nullptr);
    int64_t mb = 0;
    EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CPU, 0, &cfg, DIMOO_F32, nullptr, &mb, nullptr, err, sizeof err),
              DIMOO_ERR_INVALID_ARGUMENT);
    // The CUDA backend computes in bf16 only (refused without a device too).
    cfg.precision = DIMOO_PRECISION_F32;
    EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CUDA, 0, &cfg, DIMOO_F32, nullptr, &mb, nullptr, err, sizeof err),
              DIMOO_ERR_UNSUPPORTED);
    if (dimoo_backend_built(DIMOO_BACKEND_CUDA)) EXPECT_NE(std::string(err).find("fp32"), std::string::npos) << err;
    // bf16 on the CPU packs K/V rows of at most 1024.
    cfg = small_config(2048);
    cfg.n_heads = cfg.n_kv_heads = 1;
    cfg.d_model = 2048;
    cfg.precision = DIMOO_PRECISION_BF16;
    EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CPU, 0, &cfg, DIMOO_F32, nullptr, &mb, nullptr, err, sizeof err),
              DIMOO_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(err).find("head dim"), std::string::npos) << err;
    dimoo_runtime_destroy(rt);
}

// ML-Cache on the bf16 path: STORE equals NONE; USE on a subset of rows gives
// those rows' logits of the full forward (per-row arithmetic is identical).
TEST(Bf16Forward, CacheRowsMatchFullForward) {
    Model b(small_config(64), DIMOO_BF16, 3);
    std::vector<int32_t> toks(67);
    for (size_t i = 0; i < toks.size(); i++) toks[i] = int32_t((i * 13 + 1) % 90);
    const auto plain = b.logits(toks);
    const auto stored = b.logits(toks, DIMOO_CACHE_STORE, 1);
    EXPECT_EQ(rel(stored.data(), plain.data(), plain.size()), 0.0);
    const std::vector<int32_t> some = {0, 5, 33, 64, 66};
    const auto sub = b.logits(toks, DIMOO_CACHE_USE, 1, some);
    const size_t e = size_t(b.cfg.embedding_size);
    for (size_t i = 0; i < some.size(); i++)
        EXPECT_LT(rel(sub.data() + i * e, plain.data() + size_t(some[i]) * e, e), 1e-6) << "row " << some[i];
}

// Several sequences in one dimoo_forward: their rows share the GEMMs when
// they fit the context together, else they run one after another; either
// way each sequence's logits are those of its forward alone, bit for bit,
// in every cache mode, with its own rows and column range.
TEST(PackedForward, BatchedSequencesEqualAlone) {
    for (int32_t dtype : {DIMOO_BF16, DIMOO_F32}) {
        Model b(small_config(64), dtype, 4); // 2 sequences of up to 160 tokens
        const size_t e = size_t(b.cfg.embedding_size);
        auto toks = [](int T, int salt) {
            std::vector<int32_t> t(static_cast<size_t>(T));
            for (int i = 0; i < T; i++) t[size_t(i)] = int32_t((i * 13 + salt) % 90);
            return t;
        };
        struct Req {
            std::vector<int32_t> toks, compute, out;
            int mode, vb, ve;
        };
        // One forward per request, alone, then all of them in one call.
        auto run = [&](std::vector<Req> &reqs, bool together) {
            std::vector<std::vector<float>> outs(reqs.size());
            std::vector<dimoo_forward_args> args(reqs.size());
            for (size_t i = 0; i < reqs.size(); i++) {
                const Req &r = reqs[i];
                const size_t rows = !r.out.empty() ? r.out.size() : !r.compute.empty() ? r.compute.size() : r.toks.size();
                outs[i].assign(rows * size_t(r.ve - r.vb), NAN);
                dimoo_forward_args &a = args[i];
                a = dimoo_forward_args{};
                a.seq = int32_t(i);
                a.n_tokens = int32_t(r.toks.size());
                a.tokens = r.toks.data();
                a.cache_mode = r.mode;
                if (!r.compute.empty()) a.n_compute = int32_t(r.compute.size()), a.compute = r.compute.data();
                if (!r.out.empty()) a.n_out = int32_t(r.out.size()), a.out_positions = r.out.data();
                a.vocab_begin = r.vb;
                a.vocab_end = r.ve;
                a.logits = outs[i].data();
            }
            if (together) {
                EXPECT_EQ(dimoo_forward(b.ctx, args.data(), int32_t(args.size())), DIMOO_OK) << dimoo_ctx_error(b.ctx);
            } else {
                for (auto &a : args) EXPECT_EQ(dimoo_forward(b.ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(b.ctx);
            }
            return outs;
        };
        for (int T1 : {70, 160}) { // two sequences' rows, up to 2 x 160, go in one pass
            for (int T2 : {60, 160}) {
                std::vector<Req> full = {{toks(T1, 1), {}, {}, DIMOO_CACHE_STORE, 0, int(e)},
                                         {toks(T2, 7), {}, {3, 9, T2 - 1}, DIMOO_CACHE_STORE, 10, 50}};
                const auto alone = run(full, false);
                const auto both = run(full, true);
                for (size_t i = 0; i < full.size(); i++)
                    EXPECT_EQ(both[i], alone[i]) << "dtype " << dtype << " T " << T1 << "," << T2 << " seq " << i;
                // ML-Cache: a few rows of each against its stored K/V.
                std::vector<Req> use = {{toks(T1, 1), {0, 5, 33, T1 - 1}, {0, 5, 33, T1 - 1}, DIMOO_CACHE_USE, 0, int(e)},
                                        {toks(T2, 7), {2, 3, 40}, {3, 40}, DIMOO_CACHE_USE, 5, 90}};
                const auto use_alone = run(use, false);
                run(full, true); // the caches again, batched
                const auto use_both = run(use, true);
                for (size_t i = 0; i < use.size(); i++)
                    EXPECT_EQ(use_both[i], use_alone[i]) << "dtype " << dtype << " T " << T1 << "," << T2 << " seq " << i;
                ASSERT_EQ(use_alone[0].size(), 4 * e);
                for (size_t r = 0; r < 4; r++) // the USE rows are the full forward's rows
                    EXPECT_LT(rel(use_alone[0].data() + r * e, alone[0].data() + size_t(use[0].compute[r]) * e, e),
                              1e-6);
            }
        }
        // Four slots: a pass holds 3 x 160 rows, so four full sequences of
        // 160, 140, 120 and 100 rows run as the first three, then the fourth.
        dimoo_ctx_destroy(b.ctx);
        b.ctx = nullptr;
        dimoo_ctx_params p4{4, b.cfg.max_sequence_length, DIMOO_CTX_KV_CACHE};
        char err[256];
        ASSERT_EQ(dimoo_ctx_create(b.m, &p4, &b.ctx, err, sizeof err), DIMOO_OK) << err;
        std::vector<Req> four;
        for (int i = 0; i < 4; i++) four.push_back({toks(160 - 20 * i, 3 + i), {}, {}, DIMOO_CACHE_STORE, 0, int(e)});
        const auto alone4 = run(four, false);
        const auto all4 = run(four, true);
        for (size_t i = 0; i < four.size(); i++) EXPECT_EQ(all4[i], alone4[i]) << "dtype " << dtype << " seq " << i;
    }
}

std::string slurp(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// The F32 tensors of a safetensors file (the header's JSON read with a
// regex: enough for the files the Python safetensors library writes).
void read_safetensors(const std::string &path, std::map<std::string, std::vector<float>> &out,
                      std::map<std::string, std::vector<int64_t>> &shapes) {
    const std::string b = slurp(path);
    ASSERT_GT(b.size(), 8u) << path;
    uint64_t n;
    std::memcpy(&n, b.data(), 8);
    const std::string h = b.substr(8, n);
    const std::regex re(R"re("([^"]+)":\{"dtype":"F32","shape":\[([0-9,]*)\],"data_offsets":\[([0-9]+),([0-9]+)\]\})re");
    for (auto it = std::sregex_iterator(h.begin(), h.end(), re); it != std::sregex_iterator(); ++it) {
        const auto &m = *it;
        const size_t o0 = std::stoull(m[3]), o1 = std::stoull(m[4]);
        std::vector<float> v((o1 - o0) / 4);
        std::memcpy(v.data(), b.data() + 8 + n + o0, o1 - o0);
        out[m[1]] = std::move(v);
        std::vector<int64_t> shape;
        std::stringstream ss(m[2].str());
        for (std::string x; std::getline(ss, x, ',');) shape.push_back(std::stoll(x));
        shapes[m[1]] = shape;
    }
}

std::vector<double> read_npy_f8(const std::string &path) {
    const std::string b = slurp(path);
    EXPECT_NE(b.find("'descr': '<f8'"), std::string::npos) << path;
    uint16_t hl;
    std::memcpy(&hl, b.data() + 8, 2);
    const size_t off = 10 + hl;
    std::vector<double> v((b.size() - off) / 8);
    std::memcpy(v.data(), b.data() + off, v.size() * 8);
    return v;
}

int config_int(const std::string &cfg, const std::string &key) {
    std::smatch m;
    EXPECT_TRUE(std::regex_search(cfg, m, std::regex("\"" + key + "\": ([0-9.e+-]+)"))) << key;
    return int(std::stod(m[1]));
}

// The official Lumina-DiMOO code's float64 logits on its small checkpoint,
// against dimoo with the checkpoint's weights rounded to bf16, run (1) on the
// bf16 path and (2) as fp32 weights on the fp32 path. (2) - golden is the
// weight rounding alone; (1) - (2) is what rounding the activations to bf16
// adds. Each GEMM input, Q, K, V and P rounded to bf16 is perturbed by at
// most 2^-9 relative (round to nearest even), the same relative size as the
// weights' own rounding, so the activations should cost about what storing
// the checkpoint in bf16 costs. Seen on this trained model (peaked logits):
// weights alone 0.7-2.3e-2, activations 0.5-1.8e-2 (0.64-0.9x the weights'),
// both 0.8-2.9e-2. Asserted: activations <= 1.25x and both <= 2x the weights'
// error, and both < 5e-2. (The random small-bf16 model: 3e-3 against the
// float64 reference, TestForwardMatchesReference.)
TEST(Bf16Forward, OfficialGoldenWithBf16Weights) {
    const std::string dir = dimoo::test::source_path("testdata/official-small/");
    const std::string cfgs = slurp(dir + "checkpoint/config.json");
    ASSERT_FALSE(cfgs.empty());
    dimoo_model_config c{};
    c.d_model = config_int(cfgs, "d_model");
    c.n_heads = config_int(cfgs, "n_heads");
    c.n_kv_heads = config_int(cfgs, "n_kv_heads");
    c.n_layers = config_int(cfgs, "n_layers");
    c.mlp_hidden_size = config_int(cfgs, "mlp_hidden_size");
    c.vocab_size = config_int(cfgs, "vocab_size");
    c.embedding_size = config_int(cfgs, "embedding_size");
    c.max_sequence_length = 256;
    c.rope_theta = 500000.f;
    c.rms_norm_eps = 1e-5f;
    std::map<std::string, std::vector<float>> w;
    std::map<std::string, std::vector<int64_t>> shapes;
    read_safetensors(dir + "checkpoint/model-00001-of-00002.safetensors", w, shapes);
    read_safetensors(dir + "checkpoint/model-00002-of-00002.safetensors", w, shapes);
    ASSERT_EQ(w.size(), size_t(3 + 9 * c.n_layers));

    dimoo_runtime *rt = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 2, &rt, err, sizeof err), DIMOO_OK) << err;
    dimoo_model *m[2] = {nullptr, nullptr};
    dimoo_ctx *ctx[2] = {nullptr, nullptr};
    for (int i = 0; i < 2; i++) {
        ASSERT_EQ(dimoo_model_create(rt, &c, &m[i], err, sizeof err), DIMOO_OK) << err;
        for (const auto &[name, v] : w) {
            std::vector<uint16_t> h(v.size());
            std::vector<float> f(v.size());
            for (size_t j = 0; j < v.size(); j++) f[j] = bf16_to_f32(h[j] = f32_to_bf16(v[j]));
            const auto &sh = shapes[name];
            ASSERT_EQ(dimoo_model_set_weight(m[i], name.c_str(), i == 0 ? DIMOO_BF16 : DIMOO_F32, sh.data(),
                                             int32_t(sh.size()), i == 0 ? static_cast<const void *>(h.data()) : f.data(),
                                             v.size() * (i == 0 ? 2 : 4)),
                      DIMOO_OK)
                << dimoo_model_error(m[i]);
        }
        ASSERT_EQ(dimoo_model_finalize(m[i]), DIMOO_OK) << dimoo_model_error(m[i]);
        dimoo_ctx_params p{1, c.max_sequence_length, 0};
        ASSERT_EQ(dimoo_ctx_create(m[i], &p, &ctx[i], err, sizeof err), DIMOO_OK) << err;
    }
    const std::string cases = slurp(dir + "forward.json");
    const std::regex re(R"re(\{"tokens": \[([0-9, ]*)\], "logits": "([^"]+)"\})re");
    int n_cases = 0;
    for (auto it = std::sregex_iterator(cases.begin(), cases.end(), re); it != std::sregex_iterator(); ++it) {
        std::vector<int32_t> toks;
        std::stringstream ss((*it)[1].str());
        for (std::string x; std::getline(ss, x, ',');) toks.push_back(std::stoi(x));
        const auto want = read_npy_f8(dir + (*it)[2].str());
        ASSERT_EQ(want.size(), toks.size() * size_t(c.embedding_size));
        std::vector<float> got[2];
        for (int i = 0; i < 2; i++) {
            got[i].assign(want.size(), NAN);
            dimoo_forward_args a{};
            a.n_tokens = int32_t(toks.size());
            a.tokens = toks.data();
            a.logits = got[i].data();
            ASSERT_EQ(dimoo_forward(ctx[i], &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx[i]);
        }
        std::vector<float> wantf(want.begin(), want.end());
        const double e_bf = rel(got[0].data(), wantf.data(), want.size());
        const double e_w = rel(got[1].data(), wantf.data(), want.size());
        const double e_act = rel(got[0].data(), got[1].data(), want.size());
        std::printf("T=%zu: bf16 path vs official %.2e (bf16 weights on the fp32 path: %.2e; activations: %.2e)\n",
                    toks.size(), e_bf, e_w, e_act);
        EXPECT_LT(e_act, 1.25 * e_w) << "T=" << toks.size();
        EXPECT_LT(e_bf, 2 * e_w) << "T=" << toks.size();
        EXPECT_LT(e_bf, 5e-2) << "T=" << toks.size();
        n_cases++;
    }
    EXPECT_EQ(n_cases, 4);
    for (int i = 0; i < 2; i++) {
        dimoo_ctx_destroy(ctx[i]);
        dimoo_model_destroy(m[i]);
    }
    dimoo_runtime_destroy(rt);
}

} // namespace
