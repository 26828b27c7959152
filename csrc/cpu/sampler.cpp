// Fused guidance + Gumbel-max + confidence for the image sampler, one step.
//
// Per position: the guided logits, their softmax sum (vectorised float
// exps), and the Gumbel-max draw. The draw generates Philox blocks sixteen
// at a time (AVX-512, or a portable loop with identical results) only for
// codes an exact logit bound keeps, tests every kept code's raw Philox word
// against a conservative bound in float, and takes the two double logs
// (within a few ulp of libm, so decisions match the float64 PyTorch
// re-statement) only for the handful that can still win. Asked for only the
// positions a step unmasks, it draws just those that can be among them (see
// sample_image). Positions are spread over the OpenMP threads.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "sampler_math.h"

namespace dimoo::cpu {
namespace {

// The arithmetic the CUDA sampler shares bit for bit (sampler_math.h).
using sm::exp_clamped;
using sm::gumbel_of;
using sm::kPurposeRemask;
using sm::kPurposeSample;
using sm::philox4x32;

// Around every Gumbel draw: the largest u is (2^32 - 0.5) / 2^32, whose
// -log(-log(u)) is 22.87; the smallest is 0.5 / 2^32, giving -3.13.
constexpr double kGumbelMax = 23.0, kGumbelMin = -3.2;
// See sample_image's selection. On two recorded decodes (flat logits at
// temperature 1; the shipped model's peaked ones at 0.1) 0.55 to 0.7 drew
// the fewest positions: 924 of 2725 and 64 of 677 (64 must be).
constexpr double kGapShare = 0.6;

// Philox words of each listed block at one position (words[4 ids[j] + k]:
// word k of block ids[j], so words[c] is code c's): each round is one
// vectorised pass over the blocks (structure of arrays, 32x32->64-bit
// multiplies per lane). The portable version; AVX-512 has its own below.
__attribute__((target_clones("avx2", "default"))) void philox_blocks_any(uint32_t *words, uint32_t *work,
                                                                         const int32_t *ids, int32_t blocks,
                                                                         uint64_t seed, int32_t step, int32_t pos) {
    uint32_t *c0 = work, *c1 = work + blocks, *c2 = work + 2 * blocks, *c3 = work + 3 * blocks;
    for (int32_t j = 0; j < blocks; j++) {
        c0[j] = uint32_t(pos), c1[j] = uint32_t(ids[j]), c2[j] = uint32_t(step), c3[j] = uint32_t(kPurposeSample);
    }
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; r++) {
#pragma omp simd
        for (int32_t j = 0; j < blocks; j++) sm::philox_round(c0[j], c1[j], c2[j], c3[j], k0, k1);
        k0 += sm::kPhiloxW0;
        k1 += sm::kPhiloxW1;
    }
    for (int32_t j = 0; j < blocks; j++) {
        uint32_t *w = words + 4 * ids[j];
        w[0] = c0[j], w[1] = c1[j], w[2] = c2[j], w[3] = c3[j];
    }
}

#if defined(__x86_64__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own
// _mm512_undefined_* placeholders once inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// Philox4x32-10 on sixteen counters at once.
__attribute__((target("avx512f"))) inline void philox16(__m512i &c0, __m512i &c1, __m512i &c2, __m512i &c3,
                                                         uint64_t seed) {
    const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
    const __mmask16 odd = 0xAAAA;
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; r++) {
        // p0 = m0 * c0, p1 = m1 * c2: even lanes, then odd lanes.
        const __m512i p0e = _mm512_mul_epu32(c0, m0), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
        const __m512i p1e = _mm512_mul_epu32(c2, m1), p1o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
        const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0e, 32), p0o);
        const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0e, _mm512_slli_epi64(p0o, 32));
        const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p1e, 32), p1o);
        const __m512i lo1 = _mm512_mask_blend_epi32(odd, p1e, _mm512_slli_epi64(p1o, 32));
        // n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1 (0x96: three-way xor)
        c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(int32_t(k0)), 0x96);
        c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(int32_t(k1)), 0x96);
        c1 = lo1, c3 = lo0;
        k0 += sm::kPhiloxW0;
        k1 += sm::kPhiloxW1;
    }
}

// The blocks with AVX-512 intrinsics, sixteen to a vector. Compilers widen
// the 64-bit products to vpmullq (three uops); vpmuludq on the even and odd
// lanes is one each. The 4x16 result is transposed in registers.
__attribute__((target("avx512f"))) void philox_blocks_avx512(uint32_t *words, const int32_t *ids,
                                                              int32_t blocks, uint64_t seed, int32_t step,
                                                              int32_t pos) {
    for (int32_t j0 = 0; j0 < blocks; j0 += 16) {
        const int32_t nv = std::min(16, blocks - j0);
        const __mmask16 live = __mmask16((1u << nv) - 1);
        __m512i c0 = _mm512_set1_epi32(pos), c1 = _mm512_maskz_loadu_epi32(live, ids + j0),
                c2 = _mm512_set1_epi32(step), c3 = _mm512_set1_epi32(kPurposeSample);
        philox16(c0, c1, c2, c3, seed);
        // 4x16 -> 16x4: interleave words, then blocks 4l..4l+3 sit in lane l
        // of u0..u3; a 4x4 transpose of 128-bit lanes puts them in order.
        const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
        const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
        const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
        const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
        const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
        const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
        alignas(64) uint32_t out[64];
        _mm512_store_si512(out, _mm512_shuffle_i32x4(v0, v1, 0x88));
        _mm512_store_si512(out + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
        _mm512_store_si512(out + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
        _mm512_store_si512(out + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
        if (nv == 16 && ids[j0 + 15] == ids[j0] + 15) {  // consecutive blocks: one copy
            std::memcpy(words + 4 * ids[j0], out, sizeof out);
        } else {
            for (int32_t q = 0; q < nv; q++) std::memcpy(words + 4 * ids[j0 + q], out + 4 * q, 16);
        }
    }
}

// Word 0 of block 0 of each position's re-masking counter, sixteen
// positions to a vector.
__attribute__((target("avx512f"))) void remask_words_avx512(uint32_t *w, const int32_t *pos, int32_t n,
                                                             uint64_t seed, int32_t step) {
    for (int32_t i0 = 0; i0 < n; i0 += 16) {
        const __mmask16 live = __mmask16((1u << std::min(16, n - i0)) - 1);
        __m512i c0 = _mm512_maskz_loadu_epi32(live, pos + i0), c1 = _mm512_setzero_si512(),
                c2 = _mm512_set1_epi32(step), c3 = _mm512_set1_epi32(kPurposeRemask);
        philox16(c0, c1, c2, c3, seed);
        _mm512_mask_storeu_epi32(w + i0, live, c0);
    }
}

// e[c] = exp((l[c] - mx) * s) exactly as exp_clamped computes it (clamped to
// [-87, 88], degree-7 Taylor on |r| <= ln2 / 2, the same operations in the
// same order, no fused multiply-adds), so every x86 machine draws the same
// confidences whichever kernels it runs.
__attribute__((target("avx512f"))) void exps_avx512(float *e, const float *l, int32_t n, float mx, float s) {
    const __m512 vmx = _mm512_set1_ps(mx), vs = _mm512_set1_ps(s);
    const __m512 lo = _mm512_set1_ps(-87.0f), hi = _mm512_set1_ps(88.0f);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f), shift = _mm512_set1_ps(12582912.0f);
    const __m512 ln2hi = _mm512_set1_ps(0.693145751953125f), ln2lo = _mm512_set1_ps(1.428606820309417232e-6f);
    const float k[8] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    for (int32_t c = 0; c < n; c += 16) {
        const __mmask16 live = __mmask16((1u << std::min(16, n - c)) - 1);
        __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, l + c), vmx), vs);
        x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
        const __m512 t = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, log2e), shift), shift);
        const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(t, ln2hi)), _mm512_mul_ps(t, ln2lo));
        __m512 p = _mm512_set1_ps(k[0]);
        for (int q = 1; q < 8; q++) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(k[q]));
        const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(t), _mm512_set1_epi32(127)), 23);
        _mm512_mask_storeu_ps(e + c, live, _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
    }
}
#pragma GCC diagnostic pop
#endif

// The AVX-512 kernels run where the CPU has them; tests switch them off to
// check the portable ones on the same data.
bool use_avx512 =
#if defined(__x86_64__)
    __builtin_cpu_supports("avx512f");
#else
    false;
#endif

void remask_words(uint32_t *w, const int32_t *pos, int32_t n, uint64_t seed, int32_t step) {
#if defined(__x86_64__)
    if (use_avx512) return remask_words_avx512(w, pos, n, seed, step);
#endif
    for (int32_t q = 0; q < n; q++) {
        uint32_t c[4] = {uint32_t(pos[q]), 0, uint32_t(step), uint32_t(kPurposeRemask)};
        philox4x32(c, uint32_t(seed), uint32_t(seed >> 32));
        w[q] = c[0];
    }
}

void philox_blocks(uint32_t *words, uint32_t *work, const int32_t *ids, int32_t blocks, uint64_t seed,
                   int32_t step, int32_t pos) {
#if defined(__x86_64__)
    if (use_avx512) return philox_blocks_avx512(words, ids, blocks, seed, step, pos);
#endif
    philox_blocks_any(words, work, ids, blocks, seed, step, pos);
}

// out[q] = -log(-log(u(w[q]))), vectorised.
__attribute__((target_clones("avx512f", "avx2", "default"))) void gumbel_words(double *out, const uint32_t *w,
                                                                               int32_t n) {
#pragma omp simd
    for (int32_t q = 0; q < n; q++) out[q] = gumbel_of(w[q]);
}

// flag[c] = 1 where code c may score >= bar (see sample_image): it is not
// cut by the logit bound, and 1 - u <= x - x^2/2 + x^3/6 (>= 1 - exp(-x))
// with x = exp(l / tau - bar + margin) = e[c] * K.
__attribute__((target_clones("avx512f", "avx2", "default"))) void survivors(uint8_t *__restrict flag,
                                                                            const float *__restrict l,
                                                                            const float *__restrict e,
                                                                            const uint32_t *__restrict w,
                                                                            int32_t n, float K, float cut) {
#pragma omp simd
    for (int32_t c = 0; c < n; c++) {
        // e is raised to 1e-20 so that no product below is subnormal (slow
        // on x86); K >= exp(-23), so x >= 1e-30. Raising x only keeps more.
        const float x = (e[c] > 1e-20f ? e[c] : 1e-20f) * K;
        const float ub = x * (1.0f - x * (0.5f - x * (1.0f / 6.0f))) * (1.0f + 1e-5f);
        const float v = (float(~w[c]) + 0.5f) * 2.3283064365386963e-10f;  // 1 - u
        flag[c] = uint8_t((l[c] >= cut) & (v <= ub));
    }
}

// e[c] = exp((l[c] - mx) * s), float exps (about 2 ulp), clamped below at
// exp(-87).
__attribute__((target_clones("avx2", "default"))) void exps_any(float *__restrict e, const float *__restrict l,
                                                                int32_t n, float mx, float s) {
#pragma omp simd
    for (int32_t c = 0; c < n; c++) e[c] = exp_clamped((l[c] - mx) * s);
}

void exps(float *e, const float *l, int32_t n, float mx, float s) {
#if defined(__x86_64__)
    if (use_avx512) return exps_avx512(e, l, n, mx, s);
#endif
    exps_any(e, l, n, mx, s);
}

// First index of the value v, which l holds: a vectorised test per 16.
int32_t find_first(const float *__restrict l, int32_t n, float v) {
    int32_t c = 0;
    for (; c + 16 <= n; c += 16) {
        int32_t hit = 0;
#pragma omp simd reduction(| : hit)
        for (int32_t q = 0; q < 16; q++) hit |= l[c + q] == v;
        if (hit) break;
    }
    while (l[c] != v) c++;
    return c;
}

}  // namespace

bool set_avx512(bool on) {
#if defined(__x86_64__)
    if (on && !__builtin_cpu_supports("avx512f")) return false;
    use_avx512 = on;
    return true;
#else
    return !on;
#endif
}

double gumbel_noise(uint64_t seed, int32_t step, int32_t pos, int32_t purpose, int32_t index) {
    uint32_t c[4] = {uint32_t(pos), uint32_t(index >> 2), uint32_t(step), uint32_t(purpose)};
    philox4x32(c, uint32_t(seed), uint32_t(seed >> 32));
    return gumbel_of(c[index & 3]);
}

namespace {

// Per-thread work space, sized for one codebook.
struct Scratch {
    std::vector<float> guided, esoft, etau;  // guided logits, exp(l - mx), exp((l - mx) / tau)
    std::vector<uint32_t> words, work;       // words[c]: code c's Philox word
    std::vector<int32_t> blk, gidx;          // drawn blocks; survivors
    std::vector<uint8_t> flag;               // zero beyond C
    std::vector<uint32_t> gw;                // survivors' words
    std::vector<double> gval;                // their noise
    void fit(int32_t C) {
        if (int32_t(guided.size()) == C) return;
        const int32_t nb4 = (C + 3) / 4 * 4;
        guided.assign(C, 0), esoft.assign(C, 0), etau.assign(C, 0);
        words.assign(nb4, 0), work.assign(nb4, 0), blk.assign(nb4 / 4, 0), gidx.assign(C, 0);
        flag.assign(nb4, 0), gw.assign(std::max(C, 16), 0), gval.assign(std::max(C, 16), 0);
    }
};

Scratch &scratch(int32_t C) {
    static thread_local Scratch s;
    s.fit(C);
    return s;
}

// Position i's guided logits (s.guided), their exps (s.esoft), largest
// value and its first index, and the softmax sum.
struct Row {
    float mx;
    int32_t top;
    double sum;
};

Row guide(const dimoo_sample_args &a, int32_t i, Scratch &s) {
    const int32_t C = a.n_codes;
    // Guidance in float32, in branch order, as the Go and PyTorch statements
    // do (0 + w0 l0 is w0 l0 exactly, so branch 0 initialises the sum).
    float *__restrict gd = s.guided.data();
    for (int32_t b = 0; b < a.n_branches; b++) {
        const int64_t row = a.rows[b] ? a.rows[b][i] : i;
        const float *__restrict l = a.logits[b] + row * C;
        const float w = a.weights[b];
        if (b == 0) {
            for (int32_t c = 0; c < C; c++) gd[c] = w * l[c];
        } else {
            for (int32_t c = 0; c < C; c++) gd[c] += w * l[c];
        }
    }
    Row r;
    float mxf = gd[0];
#pragma omp simd reduction(max : mxf)  // without it the max is a scalar latency chain
    for (int32_t c = 1; c < C; c++) mxf = gd[c] > mxf ? gd[c] : mxf;
    r.mx = mxf;
    r.top = find_first(gd, C, mxf);
    // Float exps (about 2 ulp) summed in double: the confidence moves by
    // ~1e-7 against a float64 softmax, far below the gaps it ranks.
    exps(s.esoft.data(), gd, C, mxf, 1.0f);
    double sum = 0;
    const float *__restrict es = s.esoft.data();
#pragma omp simd reduction(+ : sum)
    for (int32_t c = 0; c < C; c++) sum += double(es[c]);
    r.sum = sum;
    return r;
}

// log softmax(l)[code] (code -1: the top one), as every path computes it.
double log_prob(const Scratch &s, const Row &r, int32_t code) {
    if (code < 0) code = r.top;
    return std::log(std::fmax(std::exp(double(s.guided[code]) - double(r.mx)) / r.sum, 1e-20));
}

// The Gumbel-max draw at temperature tau > 0 for position i (guide() done).
int32_t draw(const dimoo_sample_args &a, int32_t i, const Row &r, Scratch &s) {
    const int32_t C = a.n_codes, nblocks = (C + 3) / 4;
    const double tau = a.temperature, mx = r.mx;
    const float *__restrict gd = s.guided.data();
    const int32_t pos = a.rng_pos[i], top = r.top;
    int32_t best = top;
    // Exact pruning. Every Gumbel draw lies in [kGumbelMin, kGumbelMax], so a
    // code whose l / tau + kGumbelMax is below the least score the top logit
    // can have cannot win, and its Philox block need not be drawn. In logit
    // units, lowered by a relative 1e-6 so float rounding never lifts it.
    const double cutd = (mx / tau + kGumbelMin - kGumbelMax) * tau;
    const float cut = float(cutd - std::fabs(cutd) * 1e-6);
    float mnf = gd[0];
#pragma omp simd reduction(min : mnf)
    for (int32_t c = 1; c < C; c++) mnf = gd[c] < mnf ? gd[c] : mnf;
    int32_t nblk = 0;
    int32_t *blk = s.blk.data();
    if (mnf >= cut) {  // nothing cut (flat logits): every block
        for (int32_t j = 0; j < nblocks; j++) blk[j] = j;
        nblk = nblocks;
    } else {
        uint8_t *__restrict fl = s.flag.data();
#pragma omp simd
        for (int32_t c = 0; c < C; c++) fl[c] = gd[c] >= cut;
        for (int32_t j = 0; j < nblocks; j++) {  // a block is drawn if any code of it is kept
            uint32_t any;
            std::memcpy(&any, fl + 4 * j, 4);
            blk[nblk] = j;
            nblk += any != 0;
        }
    }
    philox_blocks(s.words.data(), s.work.data(), blk, nblk, a.seed, a.step, pos);
    const uint32_t *__restrict wd = s.words.data();
    // A bar bs no larger than the winning score: the top logit's score, and
    // that of the code with the largest Philox word (the largest noise: the
    // winner when logits are flat).
    uint32_t wmax = 0;
#pragma omp simd reduction(max : wmax)
    for (int32_t c = 0; c < C; c++) {
        const uint32_t v = gd[c] >= cut ? wd[c] : 0u;  // words of undrawn blocks are stale
        wmax = v > wmax ? v : wmax;
    }
    int32_t cw = 0;
    for (; cw + 16 <= C; cw += 16) {
        int32_t hit = 0;
#pragma omp simd reduction(| : hit)
        for (int32_t q = 0; q < 16; q++) hit |= (gd[cw + q] >= cut) & (wd[cw + q] == wmax);
        if (hit) break;
    }
    while (cw < C && !(gd[cw] >= cut && wd[cw] == wmax)) cw++;
    double bs = double(gd[top]) / tau + gumbel_of(wd[top]);
    if (cw < C) bs = std::max(bs, double(gd[cw]) / tau + gumbel_of(wmax));
    // A code can reach bs only if g >= T = bs - l / tau, with g = -log(-log
    // u): then 1 - u <= 1 - exp(-x), x = exp(-T). survivors() tests that on
    // the raw words, vectorised in float, against an upper bound of
    // 1 - exp(-x), with x from exps already taken and T lowered by 1e-4
    // (float rounding moves it by < 2e-5), so it never drops a code that
    // scores >= bs. The survivors, a handful, are scored exactly in index
    // order, so ties go to the first.
    const float *et = s.esoft.data();
    if (tau != 1) {
        exps(s.etau.data(), gd, C, r.mx, float(1.0 / tau));
        et = s.etau.data();
    }
    const float K = float(std::exp(mx / tau - bs + 1e-4));
    survivors(s.flag.data(), gd, et, wd, C, K, cut);
    int32_t ng = 0;
    const uint8_t *__restrict fl = s.flag.data();
    for (int32_t k = 0; k < 4 * nblocks; k += 16) {  // survivors are rare: 16 flags at a time
        uint64_t m[2];
        if (k + 16 <= 4 * nblocks) {
            std::memcpy(m, fl + k, 16);
            if ((m[0] | m[1]) == 0) continue;
        }
        for (int32_t q = k; q < std::min(k + 16, C); q++) {
            s.gidx[ng] = q, s.gw[ng] = wd[q];
            ng += fl[q];
        }
    }
    gumbel_words(s.gval.data(), s.gw.data(), ng);
    double win = -INFINITY;
    for (int32_t q = 0; q < ng; q++) {
        const double sc = double(gd[s.gidx[q]]) / tau + s.gval[q];
        if (sc > win) win = sc, best = s.gidx[q];
    }
    return best;
}

// out[q] = G(seed, step, rng_pos[i0 + q], 2, 0) for q < cnt <= 16: the
// re-masking noise, vectorised over positions.
void remask_chunk(const dimoo_sample_args &a, int32_t i0, int32_t cnt, double *out) {
    uint32_t w[16];
    remask_words(w, a.rng_pos + i0, cnt, a.seed, a.step);
    gumbel_words(out, w, cnt);
}

// Draw and score position i (remask[i] ready when tau > 0).
void draw_one(const dimoo_sample_args &a, const double *remask, int32_t i) {
    const double tau = a.temperature;
    Scratch &s = scratch(a.n_codes);
    const Row r = guide(a, i, s);
    const int32_t best = tau > 0 ? draw(a, i, r, s) : r.top;
    if (a.top_logp && !(a.top_logp_valid && a.top_logp_valid[i])) a.top_logp[i] = log_prob(s, r, r.top);
    a.out_codes[i] = best;
    a.out_conf[i] = tau > 0 ? log_prob(s, r, best) + tau * remask[i] : log_prob(s, r, best);
}

// The n_select positions a stable ascending sort by conf puts last, i.e. the
// largest by (conf, index), among cand, written in increasing order.
void select_last(const dimoo_sample_args &a, std::vector<int32_t> cand) {
    const int32_t m = a.n_select;
    auto later = [&](int32_t x, int32_t y) {  // x sorts after y
        return a.out_conf[x] != a.out_conf[y] ? a.out_conf[x] > a.out_conf[y] : x > y;
    };
    std::nth_element(cand.begin(), cand.begin() + (m - 1), cand.end(), later);
    std::sort(cand.begin(), cand.begin() + m);
    std::copy(cand.begin(), cand.begin() + m, a.out_selected);
}

}  // namespace

void sample_image(const dimoo_sample_args &a) {
    const double tau = a.temperature;
    const int32_t n = a.n_pos, m = a.n_select;
    std::vector<double> remask(tau > 0 ? n : 0);
    if (m <= 0 || tau == 0) {  // every position (greedy draws cost little)
#pragma omp parallel for schedule(dynamic)
        for (int32_t i0 = 0; i0 < n; i0 += 16) {
            const int32_t cnt = std::min(16, n - i0);
            if (tau > 0) remask_chunk(a, i0, cnt, remask.data() + i0);
            for (int32_t i = i0; i < i0 + cnt; i++) draw_one(a, remask.data(), i);
        }
        if (m > 0) {
            std::vector<int32_t> all(n);
            for (int32_t i = 0; i < n; i++) all[i] = i;
            select_last(a, std::move(all));
        }
        return;
    }
    // Only the m most confident positions are wanted. conf_i is at most
    // ub_i = log softmax(l)[top] + tau G_i (the drawn code's probability is
    // at most the top one's; exp, division, fmax and addition are monotone;
    // log is allowed an ulp by the slack below). Draw positions in
    // decreasing order of ub, a batch at a time, until the next ub is below
    // the m-th largest conf drawn: no position left can then be selected.
    // One parallel region for it all (the sequential parts in `single`).
    std::vector<double> ub(n);
    std::vector<int32_t> order(n), drawn;
    int32_t done = 0, batch = 0;
    bool more = true;
    auto higher = [&](int32_t x, int32_t y) { return ub[x] != ub[y] ? ub[x] > ub[y] : x > y; };
    auto later = [&](int32_t x, int32_t y) {  // x sorts after y by (conf, index)
        return a.out_conf[x] != a.out_conf[y] ? a.out_conf[x] > a.out_conf[y] : x > y;
    };
#pragma omp parallel
    {
#pragma omp for schedule(dynamic)
        for (int32_t i0 = 0; i0 < n; i0 += 16) {
            const int32_t cnt = std::min(16, n - i0);
            remask_chunk(a, i0, cnt, remask.data() + i0);
            for (int32_t i = i0; i < i0 + cnt; i++) {
                double lp;
                if (a.top_logp_valid && a.top_logp_valid[i]) {
                    lp = a.top_logp[i];  // the row is unchanged: no need to read it
                } else {
                    Scratch &s = scratch(a.n_codes);
                    lp = log_prob(s, guide(a, i, s), -1);
                    if (a.top_logp) a.top_logp[i] = lp;
                }
                const double u = lp + tau * remask[i];
                ub[i] = u + 1e-12 * (1 + std::fabs(u));
                a.out_codes[i] = -1;
            }
        }
#pragma omp single
        {
            // Round 1: the m positions of largest ub.
            for (int32_t i = 0; i < n; i++) order[i] = i;
            std::nth_element(order.begin(), order.begin() + (m - 1), order.end(), higher);
            batch = m;
        }
        for (int32_t round = 1; more; round++) {
#pragma omp for schedule(dynamic, 1)
            for (int32_t k = done; k < done + batch; k++) draw_one(a, remask.data(), order[k]);
#pragma omp single
            {
                done += batch;
                drawn.assign(order.begin(), order.begin() + done);
                std::nth_element(drawn.begin(), drawn.begin() + (m - 1), drawn.end(), later);
                // Every position left whose ub reaches the m-th largest conf
                // drawn (the bar) may still beat it. The bar only rises as
                // more are drawn, so once those are drawn no position left
                // can, and the selection is final.
                double cut = a.out_conf[drawn[m - 1]];
                if (round == 1) {
                    // Round 2 first takes the likely winners: those whose ub
                    // is within kGapShare of round 1's mean gap ub - conf of
                    // the m-th largest ub. Where logits are peaked (conf near
                    // ub) that is a handful; where they are flat (the drawn
                    // code ~2 below the top one) a wide band, which lifts the
                    // bar at once. Round 3 draws whatever still reaches it.
                    double gap = 0;
                    for (int32_t k = 0; k < m; k++) gap += ub[order[k]] - a.out_conf[order[k]];
                    cut = std::max(cut, ub[order[m - 1]] - kGapShare * gap / m);
                }
                batch = int32_t(std::partition(order.begin() + done, order.end(), [&](int32_t i) { return ub[i] >= cut; }) -
                                order.begin()) - done;
                more = batch > 0 || round == 1;
            }
        }
    }
    select_last(a, std::vector<int32_t>(order.begin(), order.begin() + done));
}

}  // namespace dimoo::cpu
