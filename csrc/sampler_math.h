// The sampler arithmetic that the CPU sampler (csrc/cpu/sampler.cpp) and the
// CUDA kernels (kernels/cuda/sampler.cu, text_sampler.cu) must share bit for
// bit: Philox4x32-10, the uniform from a Philox word, the portable double log
// behind the Gumbel noise, the Gumbel value, and the clamped float exp.
//
// Every product and sum is rounded on its own: on the device through the
// __*_rn intrinsics (never contracted, whatever -fmad says); on the host the
// including file must be compiled with -ffp-contract=off (CMakeLists.txt sets
// it for each file that includes this one).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DIMOO_HD __host__ __device__ __forceinline__
#else
#define DIMOO_HD inline
#endif

namespace dimoo::sm {

// Philox counter purposes (dimoo/rng.go has the same).
constexpr int32_t kPurposeSample = 1, kPurposeRemask = 2, kPurposeTextSample = 3;

// IEEE operations rounded one at a time.
DIMOO_HD double dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}
DIMOO_HD double dadd(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}
DIMOO_HD double dsub(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}
DIMOO_HD double ddiv(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __ddiv_rn(a, b);
#else
    return a / b;
#endif
}
DIMOO_HD float fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
DIMOO_HD float fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
DIMOO_HD float fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

DIMOO_HD uint64_t bits_of(double x) {
#if defined(__CUDA_ARCH__)
    return uint64_t(__double_as_longlong(x));
#else
    uint64_t b;
    std::memcpy(&b, &x, 8);
    return b;
#endif
}
DIMOO_HD double double_of(uint64_t b) {
#if defined(__CUDA_ARCH__)
    return __longlong_as_double(static_cast<long long>(b));
#else
    double x;
    std::memcpy(&x, &b, 8);
    return x;
#endif
}
DIMOO_HD float float_of(uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(b);
#else
    float x;
    std::memcpy(&x, &b, 4);
    return x;
#endif
}

// One Philox4x32 round on (c0, c1, c2, c3) under (k0, k1); the caller bumps
// the key. Written on scalars so that the CPU's structure-of-arrays loop
// vectorises the same statement.
DIMOO_HD void philox_round(uint32_t &c0, uint32_t &c1, uint32_t &c2, uint32_t &c3, uint32_t k0, uint32_t k1) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1), c3 = uint32_t(p0), c0 = n0, c2 = n2;
}

constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// Philox4x32-10 (Salmon et al., SC'11) on counter c under key (k0, k1).
DIMOO_HD void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        philox_round(c[0], c[1], c[2], c[3], k0, k1);
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
    }
}

// The four words of the block at counter (pos, block, step, purpose) under
// the seed: word k is index 4 block + k's.
DIMOO_HD void philox_block(uint32_t w[4], uint64_t seed, int32_t step, int32_t pos, int32_t purpose,
                           int32_t block) {
    w[0] = uint32_t(pos), w[1] = uint32_t(block), w[2] = uint32_t(step), w[3] = uint32_t(purpose);
    philox4x32(w, uint32_t(seed), uint32_t(seed >> 32));
}

// Natural log of a positive, normal, finite double: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(f / (2 + f)) by the classic odd
// polynomial in s = f / (2 + f). No branches, so loops over it vectorise.
DIMOO_HD double log_pos(double x) {
    const uint64_t b = bits_of(x);
    int64_t e = int64_t((b >> 52) & 0x7ff) - 1023;
    double m = double_of((b & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);
    const bool big = m > 1.4142135623730951;
    m = big ? dmul(m, 0.5) : m;
    e += big ? 1 : 0;
    const double f = dsub(m, 1.0), s = ddiv(f, dadd(2.0, f)), z = dmul(s, s), w = dmul(z, z);
    const double t1 =
        dmul(w, dadd(0.3999999999940941908, dmul(w, dadd(0.2222219843214978396, dmul(w, 0.1531383769920937332)))));
    const double t2 = dmul(
        z, dadd(0.6666666666666735130,
                dmul(w, dadd(0.2857142874366239149,
                             dmul(w, dadd(0.1818357216161805012, dmul(w, 0.1479819860511658591)))))));
    const double hfsq = dmul(dmul(0.5, f), f), dk = double(e);
    return dsub(dmul(dk, 6.93147180369123816490e-01),
                dsub(dsub(hfsq, dadd(dmul(s, dadd(dadd(hfsq, t1), t2)), dmul(dk, 1.90821492927058770002e-10))), f));
}

// The uniform in (0, 1) of a Philox word: (w + 1/2) / 2^32, exact.
DIMOO_HD double uniform_of(uint32_t w) { return dmul(dadd(double(w), 0.5), 1.0 / 4294967296.0); }

// Standard Gumbel noise from a Philox word: -log(-log(u)).
DIMOO_HD double gumbel_of(uint32_t w) { return -log_pos(-log_pos(uniform_of(w))); }

// The noise at (pos, index) of a counter: word index & 3 of block index >> 2.
DIMOO_HD double gumbel_at(uint64_t seed, int32_t step, int32_t pos, int32_t purpose, int32_t index) {
    uint32_t w[4];
    philox_block(w, seed, step, pos, purpose, index >> 2);
    return gumbel_of(w[index & 3]);
}

// exp(x) for x in [-87, 88] to about 2 ulp: 2^n by exponent bits times a
// degree-7 Taylor polynomial of exp(r), |r| <= ln2/2; inputs outside the
// range are clamped (std::min/max's comparisons, so NaN stays NaN). The same
// operations in the same order as dimoo::exp_clamped (vecmath.h) and the
// CPU sampler's AVX-512 exps.
DIMOO_HD float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = 88.0f < x ? 88.0f : x;
    const float t = fmul(x, 1.44269504088896341f);
    const float n = fsub(fadd(t, 12582912.0f), 12582912.0f);  // round to nearest
    const float r = fsub(fsub(x, fmul(n, 0.693145751953125f)), fmul(n, 1.428606820309417232e-6f));
    float p = 1.0f / 5040.0f;
    p = fadd(fmul(p, r), 1.0f / 720.0f);
    p = fadd(fmul(p, r), 1.0f / 120.0f);
    p = fadd(fmul(p, r), 1.0f / 24.0f);
    p = fadd(fmul(p, r), 1.0f / 6.0f);
    p = fadd(fmul(p, r), 0.5f);
    p = fadd(fmul(p, r), 1.0f);
    p = fadd(fmul(p, r), 1.0f);
    return fmul(p, float_of(uint32_t(int32_t(n) + 127) << 23));
}

// Unsigned keys in the order of the values (-0 and +0 equal), for radix
// selection; key_float inverts the float one.
DIMOO_HD uint64_t order_key(double x) {
    const uint64_t b = x == 0 ? 0 : bits_of(x);
    return (b >> 63) ? ~b : b | (1ull << 63);
}
DIMOO_HD uint64_t order_key(float x) {
    uint32_t b = 0;
    if (x != 0) {
#if defined(__CUDA_ARCH__)
        b = __float_as_uint(x);
#else
        std::memcpy(&b, &x, 4);
#endif
    }
    return (b >> 31) ? uint32_t(~b) : b | (1u << 31);
}
DIMOO_HD float key_float(uint64_t k) {
    const uint32_t b = uint32_t(k);
    return float_of((b >> 31) ? b & 0x7fffffffu : ~b);
}

// Selection of the k largest keys by radix select, eight bits a pass from
// the top (the CUDA selection kernels run these per pass; tests drive them
// on the host). Given the histogram of the current byte over the keys that
// match the bytes chosen so far, and rem, the rank wanted among them (1: the
// largest), radix_pick returns the byte of the rem-th largest and makes rem
// its rank among the keys with that byte.
DIMOO_HD int radix_pick(const uint32_t hist[256], int32_t &rem) {
    int32_t above = 0, d = 255;
    for (; d > 0; d--) {
        if (above + int32_t(hist[d]) >= rem) break;
        above += int32_t(hist[d]);
    }
    rem -= above;
    return d;
}

// Of `equal` keys equal to the k-th largest, `take` are among the k: the
// last ones in index order (high_first: the image sampler's stable
// ascending sort puts them last) or the first (the text sampler's stable
// descending sort). eo: this key's ordinal among the equal ones.
DIMOO_HD bool take_equal(int32_t eo, int32_t equal, int32_t take, bool high_first) {
    return high_first ? eo >= equal - take : eo < take;
}

// The image sampler's draw score of code c: l / tau + G, in double.
DIMOO_HD double draw_score(float l, double tau, uint32_t word) { return dadd(ddiv(double(l), tau), gumbel_of(word)); }

}  // namespace dimoo::sm
