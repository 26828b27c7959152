// Fused guidance + Gumbel-max + confidence for the image sampler, one step.
//
// The Go sampler spent most of its time outside the forward drawing one
// Philox block and two libm logs per (position, code). Here the Philox
// blocks run vectorised, four codes to a block; the logs (double, within a
// few ulp of libm, so decisions match the float64 PyTorch re-statement)
// are taken only for codes that can still win, by two exact bounds (on the
// logit, and on the raw Philox word); the softmax sum uses vectorised float
// exps; positions are split over the OpenMP threads.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "vecmath.h"

namespace dimoo::cpu {
namespace {

// Philox4x32-10 (Salmon et al., SC'11) on counter c under key (k0, k1).
inline void philox4x32(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        const uint64_t p0 = uint64_t(0xD2511F53u) * c[0];
        const uint64_t p1 = uint64_t(0xCD9E8D57u) * c[2];
        const uint32_t n0 = uint32_t(p1 >> 32) ^ c[1] ^ k0;
        const uint32_t n1 = uint32_t(p1);
        const uint32_t n2 = uint32_t(p0 >> 32) ^ c[3] ^ k1;
        const uint32_t n3 = uint32_t(p0);
        c[0] = n0, c[1] = n1, c[2] = n2, c[3] = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

// Natural log of a positive, normal, finite double: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(f / (2 + f)) by the classic odd
// polynomial in s = f / (2 + f). No branches, so loops over it vectorise.
inline double log_pos(double x) {
    uint64_t b;
    std::memcpy(&b, &x, 8);
    int64_t e = int64_t((b >> 52) & 0x7ff) - 1023;
    uint64_t mb = (b & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
    double m;
    std::memcpy(&m, &mb, 8);
    const bool big = m > 1.4142135623730951;
    m = big ? m * 0.5 : m;
    e += big ? 1 : 0;
    const double f = m - 1.0, s = f / (2.0 + f), z = s * s, w = z * z;
    const double t1 = w * (0.3999999999940941908 + w * (0.2222219843214978396 + w * 0.1531383769920937332));
    const double t2 = z * (0.6666666666666735130 + w * (0.2857142874366239149 + w * (0.1818357216161805012 +
                                                                                     w * 0.1479819860511658591)));
    const double hfsq = 0.5 * f * f, dk = double(e);
    return dk * 6.93147180369123816490e-01 -
           ((hfsq - (s * (hfsq + t1 + t2) + dk * 1.90821492927058770002e-10)) - f);
}

inline double uniform_of(uint32_t w) { return (double(w) + 0.5) * (1.0 / 4294967296.0); }

constexpr int32_t kPurposeSample = 1, kPurposeRemask = 2;

// Above every Gumbel draw: the largest u is (2^32 - 0.5) / 2^32, whose
// -log(-log(u)) is 22.87.
constexpr double kGumbelMax = 23.0;
// Blocks (of four codes) scored exactly before the uniform-domain bound.
constexpr int32_t kFirstBlocks = 16;

// Philox words of each listed block at one position (words[4 j + k]: word
// k of block ids[j]): each round is one vectorised pass over the blocks
// (structure of arrays, 32x32->64-bit multiplies per lane).
__attribute__((target_clones("avx512f", "avx2", "default"))) void philox_blocks(uint32_t *words, uint32_t *work,
                                                                                const int32_t *ids,
                                                                                int32_t blocks, uint64_t seed,
                                                                                int32_t step, int32_t pos) {
    uint32_t *c0 = work, *c1 = work + blocks, *c2 = work + 2 * blocks, *c3 = work + 3 * blocks;
    for (int32_t j = 0; j < blocks; j++) {
        c0[j] = uint32_t(pos), c1[j] = uint32_t(ids[j]), c2[j] = uint32_t(step), c3[j] = uint32_t(kPurposeSample);
    }
    uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
    for (int r = 0; r < 10; r++) {
#pragma omp simd
        for (int32_t j = 0; j < blocks; j++) {
            const uint64_t p0 = uint64_t(0xD2511F53u) * c0[j];
            const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2[j];
            const uint32_t n0 = uint32_t(p1 >> 32) ^ c1[j] ^ k0;
            const uint32_t n2 = uint32_t(p0 >> 32) ^ c3[j] ^ k1;
            c1[j] = uint32_t(p1), c3[j] = uint32_t(p0), c0[j] = n0, c2[j] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int32_t j = 0; j < blocks; j++) {
        words[4 * j + 0] = c0[j], words[4 * j + 1] = c1[j], words[4 * j + 2] = c2[j], words[4 * j + 3] = c3[j];
    }
}

// out[q] = -log(-log(u(w[q]))), vectorised.
__attribute__((target_clones("avx512f", "avx2", "default"))) void gumbel_words(double *out, const uint32_t *w,
                                                                               int32_t n) {
#pragma omp simd
    for (int32_t q = 0; q < n; q++) out[q] = -log_pos(-log_pos(uniform_of(w[q])));
}

// sum_c exp(l_c - mx): float exps (about 2 ulp, 16 to a vector) into tmp,
// then summed in double. The confidence it feeds moves by ~1e-7 against a
// float64 softmax, far below the gaps between the confidences it ranks.
double sum_exp(const float *__restrict l, float *__restrict tmp, int32_t n, float mx) {
    for (int32_t c = 0; c < n; c++) tmp[c] = exp_clamped(l[c] - mx);
    double s = 0;
#pragma omp simd reduction(+ : s)
    for (int32_t c = 0; c < n; c++) s += double(tmp[c]);
    return s;
}

}  // namespace

double gumbel_noise(uint64_t seed, int32_t step, int32_t pos, int32_t purpose, int32_t index) {
    uint32_t c[4] = {uint32_t(pos), uint32_t(index >> 2), uint32_t(step), uint32_t(purpose)};
    philox4x32(c, uint32_t(seed), uint32_t(seed >> 32));
    return -log_pos(-log_pos(uniform_of(c[index & 3])));
}

void sample_image(const dimoo_sample_args &a) {
    const int32_t C = a.n_codes, nb = a.n_branches;
    const double tau = a.temperature;
#pragma omp parallel
    {
        std::vector<float> guided(C);
        std::vector<int32_t> cand(C);
        std::vector<float> etmp(C);
        std::vector<uint32_t> words(tau > 0 ? (C + 3) / 4 * 4 : 0);
        std::vector<uint32_t> work(tau > 0 ? (C + 3) / 4 * 4 : 0);
        std::vector<int32_t> blk(tau > 0 ? (C + 3) / 4 : 0);
        std::vector<int32_t> gidx(tau > 0 ? C : 0);  // codes whose noise a pass draws
        std::vector<uint32_t> gw(tau > 0 ? C : 0);   // their Philox words
        std::vector<double> gval(tau > 0 ? C : 0);   // their Gumbel noise
#pragma omp for schedule(static)
        for (int32_t i = 0; i < a.n_pos; i++) {
            // Guidance in float32, in branch order, as the Go and PyTorch statements do.
            float *__restrict gd = guided.data();
            for (int32_t c = 0; c < C; c++) gd[c] = 0.0f;
            for (int32_t b = 0; b < nb; b++) {
                const int64_t row = a.rows[b] ? a.rows[b][i] : i;
                const float *__restrict l = a.logits[b] + row * C;
                const float w = a.weights[b];
                for (int32_t c = 0; c < C; c++) gd[c] += w * l[c];
            }
            // The largest guided logit and its first index (the temperature-0 draw).
            float mxf = guided[0];
#pragma omp simd reduction(max : mxf)  // without it the max is a scalar latency chain
            for (int32_t c = 1; c < C; c++) mxf = guided[c] > mxf ? guided[c] : mxf;
            const double mx = mxf;
            int32_t top = 0;
            while (guided[top] != mxf) top++;
            int32_t best = top;
            if (tau > 0) {
                // Exact pruning: no Gumbel draw exceeds kGumbelMax, so a code
                // whose l/tau + kGumbelMax is below the score of some code
                // cannot win. Start from the top logit's score, then draw the
                // noise (one Philox block per four codes) only for the codes
                // above the cut, in index order so ties go to the first.
                const double g_top = gumbel_noise(a.seed, a.step, a.rng_pos[i], kPurposeSample, top);
                const double lb = double(guided[top]) / tau + g_top;
                // In logit units, lowered by a relative 1e-6 so float rounding
                // never lifts it above (lb - kGumbelMax) * tau.
                const double cutd = (lb - kGumbelMax) * tau;
                const float cut = float(cutd - std::fabs(cutd) * 1e-6);
                float mnf = guided[0];
#pragma omp simd reduction(min : mnf)
                for (int32_t c = 1; c < C; c++) mnf = guided[c] < mnf ? guided[c] : mnf;
                int32_t nc = 0;
                if (mnf >= cut) {
                    nc = C;  // flat logits: no code is cut (cand unused)
                } else {
                    for (int32_t c = 0; c < C; c++) {  // branch-free compaction
                        cand[nc] = c;
                        nc += guided[c] >= cut ? 1 : 0;
                    }
                }
                // The Philox blocks the candidates fall in (candidates are
                // increasing, so equal blocks are adjacent), drawn vectorised.
                int32_t nblk = 0;
                if (nc == C) {  // flat logits: every block, in order
                    nblk = (C + 3) / 4;
                    for (int32_t j = 0; j < nblk; j++) blk[j] = j;
                } else {
                    for (int32_t k = 0; k < nc; k++) {
                        const int32_t bid = cand[k] >> 2;
                        if (nblk == 0 || blk[nblk - 1] != bid) blk[nblk++] = bid;
                    }
                }
                philox_blocks(words.data(), work.data(), blk.data(), nblk, a.seed, a.step, a.rng_pos[i]);
                // Exact scores of the first kFirstBlocks blocks' candidates;
                // their best bs then bounds the rest in the uniform domain: a
                // code needs g >= bs - mx / tau to reach bs (its logit is at
                // most mx), i.e. u > exp(-exp(-(bs - mx / tau))). Comparing the
                // raw Philox word with that threshold skips both logs for
                // almost every code when the logits are flat. The 0.01 margin
                // covers the rounding of the threshold (g moves by < 1e-5 per
                // ulp of u below 23).
                // Pass 1 gathers the first blocks' candidates, pass 2 the rest
                // that pass the bound; each pass computes its logs in one
                // vectorised loop (gumbel_words), then scores in index order.
                double bs = -INFINITY;
                int32_t k = 0, ng = 0;
                if (nc == C) {
                    for (; k < std::min(C, 4 * kFirstBlocks); k++) gidx[ng] = k, gw[ng++] = words[k];
                } else {
                    for (int32_t j = 0; k < nc; k++) {
                        const int32_t c = cand[k];
                        while (blk[j] != (c >> 2)) j++;
                        if (j >= kFirstBlocks) break;
                        gidx[ng] = c, gw[ng++] = words[4 * j + (c & 3)];
                    }
                }
                auto score = [&] {
                    gumbel_words(gval.data(), gw.data(), ng);
                    for (int32_t q = 0; q < ng; q++) {
                        const double sc = double(guided[gidx[q]]) / tau + gval[q];
                        if (sc > bs) bs = sc, best = gidx[q];
                    }
                };
                score();
                if (k < nc) {
                    const double T = bs - mx / tau - 0.01;
                    const double ustar = std::exp(-std::exp(-T));  // u <= ustar: g < T
                    const double wd = std::floor(ustar * 4294967296.0 - 0.5);
                    const int64_t wstar = wd < -1.0 ? -1 : (wd > 4294967295.0 ? int64_t(4294967295) : int64_t(wd));
                    ng = 0;
                    if (nc == C) {  // block j holds codes 4j..4j+3: words[c] is code c's
                        const uint32_t *__restrict wp = words.data();
                        int32_t *__restrict gi = gidx.data();
                        uint32_t *__restrict gv = gw.data();
                        // Survivors are rare: test 16 words at once by their max.
                        for (; k + 16 <= nc; k += 16) {
                            uint32_t m = 0;
#pragma omp simd reduction(max : m)
                            for (int32_t q = 0; q < 16; q++) m = wp[k + q] > m ? wp[k + q] : m;
                            if (int64_t(m) <= wstar) continue;
                            for (int32_t q = k; q < k + 16; q++)
                                if (int64_t(wp[q]) > wstar) gi[ng] = q, gv[ng++] = wp[q];
                        }
                        for (; k < nc; k++)
                            if (int64_t(wp[k]) > wstar) gi[ng] = k, gv[ng++] = wp[k];
                    }
                    for (int32_t j = kFirstBlocks; k < nc; k++) {
                        const int32_t c = cand[k];
                        while (blk[j] != (c >> 2)) j++;
                        const uint32_t w = words[4 * j + (c & 3)];
                        gidx[ng] = c, gw[ng] = w;  // branch-free compaction
                        ng += int64_t(w) > wstar ? 1 : 0;
                    }
                    score();
                }
            }
            const double sum = sum_exp(guided.data(), etmp.data(), C, mxf);
            double conf = std::log(std::fmax(std::exp(double(guided[best]) - mx) / sum, 1e-20));
            if (tau > 0) conf += tau * gumbel_noise(a.seed, a.step, a.rng_pos[i], kPurposeRemask, 0);
            a.out_codes[i] = best;
            a.out_conf[i] = conf;
        }
    }
}

}  // namespace dimoo::cpu
