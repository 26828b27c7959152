// Tests for cpu::gemm_nt against a double-precision naive loop.

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "cpu/gemm.h"

namespace {

using dimoo::cpu::gemm_nt;

struct Shape {
    int M, N, K;
};

// Weights of one dtype plus the same values as fp32, for the reference.
struct Weights {
    int32_t dt;
    std::vector<float> f32;       // used when dt == F32
    std::vector<uint16_t> half;   // used when dt == F16/BF16
    std::vector<float> rounded;   // what the kernel sees, as fp32

    const void *data() const {
        return dt == DIMOO_F32 ? static_cast<const void *>(f32.data())
                               : static_cast<const void *>(half.data());
    }
};

Weights make_weights(int32_t dt, size_t n, std::mt19937 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    Weights w;
    w.dt = dt;
    w.rounded.resize(n);
    if (dt == DIMOO_F32) w.f32.resize(n);
    else w.half.resize(n);
    for (size_t i = 0; i < n; ++i) {
        const float x = u(rng);
        if (dt == DIMOO_F32) {
            w.f32[i] = x;
            w.rounded[i] = x;
        } else if (dt == DIMOO_BF16) {
            w.half[i] = dimoo::f32_to_bf16(x);
            w.rounded[i] = dimoo::bf16_to_f32(w.half[i]);
        } else {
            w.half[i] = dimoo::f32_to_f16(x);
            w.rounded[i] = dimoo::f16_to_f32(w.half[i]);
        }
    }
    return w;
}

std::vector<float> random_vec(size_t n, std::mt19937 &rng) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> v(n);
    for (auto &x : v) x = u(rng);
    return v;
}

// C0 holds C's prior contents (used when accumulating).
std::vector<double> reference(int M, int N, int K, const std::vector<float> &A, int lda,
                              const std::vector<float> &Wf, int ldw, const std::vector<float> &C0,
                              int ldc, bool accumulate) {
    std::vector<double> R(size_t(M) * N);
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            double s = accumulate ? double(C0[size_t(m) * ldc + n]) : 0.0;
            for (int k = 0; k < K; ++k)
                s += double(A[size_t(m) * lda + k]) * double(Wf[size_t(n) * ldw + k]);
            R[size_t(m) * N + n] = s;
        }
    return R;
}

double rel_error(int M, int N, const std::vector<float> &C, int ldc, const std::vector<double> &R) {
    double num = 0.0, den = 0.0;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            const double d = double(C[size_t(m) * ldc + n]) - R[size_t(m) * N + n];
            num += d * d;
            den += R[size_t(m) * N + n] * R[size_t(m) * N + n];
        }
    if (den == 0.0) return std::sqrt(num);
    return std::sqrt(num / den);
}

// Runs one case; pads (lda, ldw, ldc) beyond the row lengths by `pad` and
// checks the padding of C is untouched.
void run_case(Shape s, int32_t dt, int pad, bool accumulate, uint32_t seed) {
    SCOPED_TRACE(::testing::Message() << "M=" << s.M << " N=" << s.N << " K=" << s.K
                                      << " dt=" << dimoo::dtype_name(dt) << " pad=" << pad
                                      << " acc=" << accumulate);
    std::mt19937 rng(seed);
    const int lda = s.K + pad, ldw = s.K + pad, ldc = s.N + pad;
    const auto A = random_vec(size_t(s.M) * lda + 1, rng);
    const Weights W = make_weights(dt, size_t(s.N) * ldw + 1, rng);
    std::vector<float> C = random_vec(size_t(s.M) * ldc + 1, rng);
    if (!accumulate) // poison: the kernel must not read C when overwriting
        for (int m = 0; m < s.M; ++m)
            for (int n = 0; n < s.N; ++n) C[size_t(m) * ldc + n] = std::nanf("");
    const std::vector<float> C0 = C;

    gemm_nt(s.M, s.N, s.K, A.data(), lda, W.data(), dt, ldw, C.data(), ldc, accumulate);

    const auto R = reference(s.M, s.N, s.K, A, lda, W.rounded, ldw, C0, ldc, accumulate);
    EXPECT_LE(rel_error(s.M, s.N, C, ldc, R), 1e-5);
    for (int m = 0; m < s.M; ++m)
        for (int n = s.N; n < ldc && size_t(m) * ldc + n < C.size(); ++n)
            ASSERT_EQ(C[size_t(m) * ldc + n], C0[size_t(m) * ldc + n]) << "padding written";
    EXPECT_EQ(C.back(), C0.back());
}

const std::vector<Shape> kShapes = {
    {1, 1, 1},     {1, 17, 33},   {2, 5, 3},      {3, 100, 50},   {4, 67, 129},
    {5, 1000, 257}, {7, 64, 256},  {8, 32, 16},    {9, 33, 17},    {13, 31, 300},
    {33, 19, 5},   {64, 256, 256}, {17, 1, 77},    {100, 3, 64},   {6, 48, 1},
    {300, 704, 256}, {65, 130, 513}, {129, 97, 1000}, {17, 45, 600}, {24, 33, 1000},
    {25, 70, 700}};

TEST(Gemm, Fp32Shapes) {
    uint32_t seed = 1;
    for (const Shape &s : kShapes) run_case(s, DIMOO_F32, 0, false, seed++);
}

TEST(Gemm, Bf16Shapes) {
    uint32_t seed = 100;
    for (const Shape &s : kShapes) run_case(s, DIMOO_BF16, 0, false, seed++);
}

TEST(Gemm, F16Shapes) {
    uint32_t seed = 200;
    for (const Shape &s : kShapes) run_case(s, DIMOO_F16, 0, false, seed++);
}

TEST(Gemm, LeadingDimensionsAndAccumulate) {
    uint32_t seed = 300;
    const std::vector<Shape> shapes = {{1, 17, 33}, {3, 40, 70}, {7, 64, 256}, {33, 19, 5},
                                       {50, 45, 300}, {5, 1000, 257}};
    for (int32_t dt : {DIMOO_F32, DIMOO_BF16, DIMOO_F16})
        for (const Shape &s : shapes)
            for (bool acc : {false, true}) {
                run_case(s, dt, 3, acc, seed++);
                run_case(s, dt, 16, acc, seed++);
                run_case(s, dt, 0, acc, seed++);
            }
}

TEST(Gemm, ThreadCounts) {
    // Uneven thread grids (split over rows and/or panels), several m blocks
    // per thread (M > 512), a single panel shared by all threads.
    const std::vector<Shape> shapes = {{1100, 40, 70}, {600, 20, 300}, {70, 300, 300},
                                       {9, 1000, 64}, {3, 50, 1000}};
    const int saved = omp_get_max_threads();
    uint32_t seed = 400;
    for (int threads : {1, 3, 5}) {
        omp_set_num_threads(threads);
        for (const Shape &s : shapes) {
            SCOPED_TRACE(::testing::Message() << "threads=" << threads);
            run_case(s, DIMOO_BF16, 5, seed % 2 == 0, seed);
            ++seed;
        }
    }
    omp_set_num_threads(saved);
}

TEST(Gemm, Degenerate) {
    std::vector<float> A(16, 1.0f), W(16, 1.0f), C(16, 5.0f);
    // M == 0 / N == 0: nothing touched, null pointers allowed.
    gemm_nt(0, 4, 4, nullptr, 4, nullptr, DIMOO_F32, 4, nullptr, 4, false);
    gemm_nt(4, 0, 4, nullptr, 4, nullptr, DIMOO_F32, 4, nullptr, 4, false);
    // K == 0: C = 0, or unchanged when accumulating.
    gemm_nt(2, 3, 0, nullptr, 0, nullptr, DIMOO_BF16, 0, C.data(), 4, true);
    for (float c : C) EXPECT_EQ(c, 5.0f);
    gemm_nt(2, 3, 0, nullptr, 0, nullptr, DIMOO_BF16, 0, C.data(), 4, false);
    for (int m = 0; m < 2; ++m)
        for (int n = 0; n < 4; ++n) EXPECT_EQ(C[m * 4 + n], n < 3 ? 0.0f : 5.0f);
}

TEST(Gemm, BadArguments) {
    std::vector<float> A(64), W(64), C(64);
    EXPECT_THROW(gemm_nt(-1, 4, 4, A.data(), 4, W.data(), DIMOO_F32, 4, C.data(), 4, false),
                 dimoo::Error);
    EXPECT_THROW(gemm_nt(4, 4, 4, A.data(), 4, W.data(), 7, 4, C.data(), 4, false), dimoo::Error);
    EXPECT_THROW(gemm_nt(4, 4, 4, A.data(), 3, W.data(), DIMOO_F32, 4, C.data(), 4, false),
                 dimoo::Error);
    EXPECT_THROW(gemm_nt(4, 4, 4, A.data(), 4, W.data(), DIMOO_F32, 3, C.data(), 4, false),
                 dimoo::Error);
    EXPECT_THROW(gemm_nt(4, 4, 4, A.data(), 4, W.data(), DIMOO_F32, 4, C.data(), 3, false),
                 dimoo::Error);
    EXPECT_THROW(gemm_nt(4, 4, 4, A.data(), 4, nullptr, DIMOO_F32, 4, C.data(), 4, false),
                 dimoo::Error);
}

TEST(Gemm, MatchesReferenceFunction) {
    std::mt19937 rng(7);
    const int M = 11, N = 37, K = 91;
    const auto A = random_vec(size_t(M) * K, rng);
    const Weights W = make_weights(DIMOO_BF16, size_t(N) * K, rng);
    std::vector<float> C(size_t(M) * N), R(size_t(M) * N);
    gemm_nt(M, N, K, A.data(), K, W.data(), DIMOO_BF16, K, C.data(), N, false);
    dimoo::cpu::gemm_nt_ref(M, N, K, A.data(), K, W.data(), DIMOO_BF16, K, R.data(), N, false);
    for (size_t i = 0; i < C.size(); ++i) EXPECT_NEAR(C[i], R[i], 1e-4f * (1.0f + std::fabs(R[i])));
}

TEST(Gemm, ConcurrentCallers) {
    // Two host threads, different shapes/dtypes (both paths), several rounds each.
    struct Job {
        Shape s;
        int32_t dt;
        std::vector<float> A, C;
        Weights W;
        std::vector<double> R;
        double err = 0.0;
    };
    std::mt19937 rng(11);
    std::vector<Job> jobs(4);
    const Shape shapes[4] = {{300, 704, 256}, {3, 900, 300}, {64, 256, 256}, {1, 2048, 512}};
    const int32_t dts[4] = {DIMOO_BF16, DIMOO_F32, DIMOO_F16, DIMOO_BF16};
    for (int i = 0; i < 4; ++i) {
        Job &j = jobs[i];
        j.s = shapes[i];
        j.dt = dts[i];
        j.A = random_vec(size_t(j.s.M) * j.s.K, rng);
        j.W = make_weights(j.dt, size_t(j.s.N) * j.s.K, rng);
        j.C.assign(size_t(j.s.M) * j.s.N, 0.0f);
        j.R = reference(j.s.M, j.s.N, j.s.K, j.A, j.s.K, j.W.rounded, j.s.K, j.C, j.s.N, false);
    }
    auto worker = [&jobs](int first) {
        for (int round = 0; round < 5; ++round)
            for (int i = first; i < 4; i += 2) {
                Job &j = jobs[i];
                gemm_nt(j.s.M, j.s.N, j.s.K, j.A.data(), j.s.K, j.W.data(), j.dt, j.s.K,
                        j.C.data(), j.s.N, false);
                j.err = std::max(j.err, rel_error(j.s.M, j.s.N, j.C, j.s.N, j.R));
            }
    };
    std::thread t0(worker, 0), t1(worker, 1);
    t0.join();
    t1.join();
    for (const Job &j : jobs) EXPECT_LE(j.err, 1e-5) << "M=" << j.s.M << " N=" << j.s.N;
}

TEST(Gemm, Isa) {
    const std::string isa = dimoo::cpu::gemm_isa();
    EXPECT_TRUE(isa == "avx512" || isa == "avx2" || isa == "portable") << isa;
    std::printf("gemm_nt ISA: %s\n", isa.c_str());
}

} // namespace
