// The samplers' shared arithmetic (sampler_math.h) and the CUDA samplers
// (kernels/cuda/sampler.cu). On the host: the shared pieces equal the CPU
// sampler's bit for bit, and the algorithm the device runs (full Gumbel-max
// over every code, no pruning) makes the CPU sampler's decisions. On a
// device: the kernels' codes and selections equal the CPU sampler's, their
// confidences within 1e-12, on NaN-poisoned outputs, twice over.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "backend.h"
#include "cpu/kept.h"
#include "cpu/sampler.h"
#include "dimoo.h"
#include "sampler_math.h"
#include "vecmath.h"

#if defined(DIMOO_WITH_CUDA)
#include "cuda/sampler.cuh"
#endif

namespace {

namespace sm = dimoo::sm;

bool close(double got, double want, double rel = 1e-12) {
    return std::fabs(got - want) <= rel * std::max(1.0, std::fabs(want));
}

// ---- host: the shared pieces ------------------------------------------------

TEST(SamplerMath, PhiloxKnownAnswers) {
    uint32_t a[4] = {0, 0, 0, 0};
    sm::philox4x32(a, 0, 0);
    EXPECT_EQ(a[0], 0x6627e8d5u);
    EXPECT_EQ(a[3], 0x9b00dbd8u);
    uint32_t b[4];
    // counter (pos, block, step, purpose) = Random123's pi vector
    sm::philox_block(b, 0x299f31d0a4093822ull, 0x13198a2e, 0x243f6a88, 0x03707344, int32_t(0x85a308d3u));
    EXPECT_EQ(b[0], 0xd16cfe09u);
    EXPECT_EQ(b[1], 0x94fdccebu);
    EXPECT_EQ(b[2], 0x5001e420u);
    EXPECT_EQ(b[3], 0x24126ea1u);
}

// The noise the CPU sampler draws, to the bit, and within 1e-14 of libm.
TEST(SamplerMath, GumbelEqualsCpuSampler) {
    std::mt19937_64 rng(3);
    double worst = 0;
    for (int q = 0; q < 200000; q++) {
        const uint64_t seed = rng();
        const int32_t step = int32_t(rng() % 128), pos = int32_t(rng() % 20000), purpose = 1 + int32_t(rng() % 3),
                      index = int32_t(rng() % 140000);
        const double got = sm::gumbel_at(seed, step, pos, purpose, index);
        const double want = dimoo::cpu::gumbel_noise(seed, step, pos, purpose, index);
        ASSERT_EQ(sm::bits_of(got), sm::bits_of(want)) << q;
        uint32_t w[4];
        sm::philox_block(w, seed, step, pos, purpose, index >> 2);
        const double u = (double(w[index & 3]) + 0.5) / 4294967296.0;
        worst = std::max(worst, std::fabs(got + std::log(-std::log(u))) / std::max(1.0, std::fabs(got)));
    }
    EXPECT_LT(worst, 1e-14);
    // The extreme words: u nearest 0 and nearest 1.
    EXPECT_NEAR(sm::gumbel_of(0), -std::log(-std::log(0.5 / 4294967296.0)), 1e-14);
    EXPECT_NEAR(sm::gumbel_of(0xffffffffu), -std::log(-std::log((4294967295.5) / 4294967296.0)), 1e-13);
}

// The shared float exp is vecmath.h's, to the bit, over a sweep of every
// exponent and the clamps.
TEST(SamplerMath, ExpEqualsVecmath) {
    std::vector<float> xs = {0.0f, -0.0f, -87.0f, 88.0f, -87.5f, 88.5f, -1e30f, 1e30f,
                             std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
    for (uint64_t b = 0; b < (1ull << 32); b += 4099) {
        float x;
        const uint32_t u = uint32_t(b);
        std::memcpy(&x, &u, 4);
        if (!std::isnan(x)) xs.push_back(x);
    }
    for (float x : xs) {
        const float got = sm::exp_clamped(x), want = dimoo::exp_clamped(x);
        ASSERT_EQ(0, std::memcmp(&got, &want, 4)) << x;
    }
    EXPECT_TRUE(std::isnan(sm::exp_clamped(std::nanf(""))));
}

// The selection kernels' keys sort as the values do; -0 equals +0.
TEST(SamplerMath, OrderKeysSortAsValues) {
    std::mt19937_64 rng(4);
    std::vector<double> d = {0.0, -0.0, 1e-310, -1e-310, 1e300, -1e300, INFINITY, -INFINITY, 1.0, -1.0};
    std::vector<float> f = {0.0f, -0.0f, 1e-40f, -1e-40f, 3e38f, -3e38f, INFINITY, -INFINITY, 1.0f, -1.0f};
    std::normal_distribution<double> nd(0.0, 50.0);
    for (int q = 0; q < 2000; q++) d.push_back(nd(rng)), f.push_back(float(nd(rng)));
    for (size_t x = 0; x < d.size(); x++) {
        for (size_t y = 0; y < d.size(); y += 7) {
            ASSERT_EQ(d[x] < d[y], sm::order_key(d[x]) < sm::order_key(d[y])) << d[x] << " " << d[y];
            ASSERT_EQ(d[x] == d[y], sm::order_key(d[x]) == sm::order_key(d[y])) << d[x] << " " << d[y];
            ASSERT_EQ(f[x] < f[y], sm::order_key(f[x]) < sm::order_key(f[y])) << f[x] << " " << f[y];
            ASSERT_EQ(f[x] == f[y], sm::order_key(f[x]) == sm::order_key(f[y])) << f[x] << " " << f[y];
        }
        const float back = sm::key_float(sm::order_key(f[x]));
        ASSERT_EQ(back, f[x]);
        if (f[x] != 0) ASSERT_EQ(0, std::memcmp(&back, &f[x], 4));
    }
}

// The selection kernels' passes, driven on the host: the k largest keys
// with either tie rule, against a stable sort.
std::vector<int32_t> radix_largest(const std::vector<uint64_t> &key, int32_t k, bool high_first) {
    uint64_t prefix = 0, mask = 0;
    int32_t rem = k, equal = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        uint32_t hist[256] = {};
        for (uint64_t u : key)
            if ((u & mask) == prefix) hist[(u >> shift) & 255]++;
        const int d = sm::radix_pick(hist, rem);
        prefix |= uint64_t(d) << shift, mask |= 0xffull << shift, equal = int32_t(hist[d]);
    }
    std::vector<int32_t> out;
    int32_t eo = 0;
    for (int32_t i = 0; i < int32_t(key.size()); i++) {
        const bool eq = key[i] == prefix;
        if (key[i] > prefix || (eq && sm::take_equal(eo, equal, rem, high_first))) out.push_back(i);
        eo += eq;
    }
    return out;
}

TEST(SamplerMath, RadixSelectionEqualsStableSort) {
    std::mt19937 rng(9);
    for (int n : {1, 2, 7, 100, 1000, 4096}) {
        for (int distinct : {1, 3, 50, 1 << 30}) {
            std::vector<double> conf(n);
            std::uniform_int_distribution<int> pick(0, distinct - 1);
            for (int i = 0; i < n; i++) {
                const double fine = distinct == 1 << 30 ? std::ldexp(pick(rng), -20) : 0.0;
                conf[i] = fine - pick(rng) % 7;
                if (conf[i] == 0 && i % 2) conf[i] = -0.0;  // equal to +0
            }
            std::vector<uint64_t> key(n);
            for (int i = 0; i < n; i++) key[i] = sm::order_key(conf[i]);
            for (int k : {1, 2, n / 3, n - 1, n}) {
                if (k < 1 || k > n) continue;
                // Image: the k a stable ascending sort puts last. Text: the k
                // a stable descending sort puts first.
                std::vector<int32_t> order(n);
                for (int i = 0; i < n; i++) order[i] = i;
                std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return conf[x] < conf[y]; });
                std::vector<int32_t> img(order.end() - k, order.end());
                std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return conf[x] > conf[y]; });
                std::vector<int32_t> txt(order.begin(), order.begin() + k);
                std::sort(img.begin(), img.end()), std::sort(txt.begin(), txt.end());
                ASSERT_EQ(radix_largest(key, k, true), img) << "n=" << n << " distinct=" << distinct << " k=" << k;
                ASSERT_EQ(radix_largest(key, k, false), txt) << "n=" << n << " distinct=" << distinct << " k=" << k;
            }
        }
    }
}

// ---- host: the device algorithm, stated plainly --------------------------------

// What image_rows_kernel computes for position i: the same guided floats,
// max, first index, float exps, a double sum (in index order) and the
// Gumbel-max over every code in double.
void device_image_row(const dimoo_sample_args &a, int32_t i, int32_t &code, double &conf, double &top_lp) {
    const int32_t C = a.n_codes;
    std::vector<float> g(C);
    for (int32_t c = 0; c < C; c++) {
        float v = 0;
        for (int b = 0; b < a.n_branches; b++) {
            const float *l = a.logits[b] + int64_t(a.rows[b] ? a.rows[b][i] : i) * C;
            v = b == 0 ? a.weights[0] * l[c] : v + a.weights[b] * l[c];
        }
        g[c] = v;
    }
    const float mx = *std::max_element(g.begin(), g.end());
    const int32_t top = int32_t(std::find(g.begin(), g.end(), mx) - g.begin());
    double sum = 0;
    for (int32_t c = 0; c < C; c++) sum += double(sm::exp_clamped((g[c] - mx) * 1.0f));
    const double tau = a.temperature;
    int32_t best = top;
    if (tau > 0) {
        double bs = -INFINITY;
        for (int32_t c = 0; c < C; c++) {
            uint32_t w[4];
            sm::philox_block(w, a.seed, a.step, a.rng_pos[i], sm::kPurposeSample, c >> 2);
            const double s = sm::draw_score(g[c], tau, w[c & 3]);
            if (s > bs) bs = s, best = c;
        }
    }
    auto lp = [&](int32_t k) { return std::log(std::fmax(std::exp(double(g[k]) - double(mx)) / sum, 1e-20)); };
    top_lp = lp(top);
    conf = lp(best);
    if (tau > 0) conf += tau * sm::gumbel_at(a.seed, a.step, a.rng_pos[i], sm::kPurposeRemask, 0);
    code = best;
}

struct ImageCase {
    int n, C, nb;
    float scale, tau;
};

// Random logits for a case: odd branches read permuted rows; positions 5
// and 9 share rows and noise (an exact tie) when ties is set.
struct ImageProblem {
    std::vector<std::vector<float>> lg;
    std::vector<std::vector<int32_t>> rows;
    std::vector<int32_t> pos;
    dimoo_sample_args a{};
    ImageProblem(const ImageCase &k, std::mt19937 &rng, bool ties) : lg(k.nb), rows(k.nb), pos(k.n) {
        a.n_pos = k.n, a.n_branches = k.nb, a.n_codes = k.C, a.step = 5, a.seed = 0x1234567890abcdefull;
        a.temperature = k.tau;
        std::normal_distribution<float> nd(0.0f, k.scale);
        const int nrows = k.n + 3;
        for (int b = 0; b < k.nb; b++) {
            lg[b].resize(size_t(nrows) * k.C);
            for (auto &x : lg[b]) x = nd(rng);
            a.logits[b] = lg[b].data(), a.n_rows[b] = nrows;
            a.weights[b] = b == 0 ? 1.0f + 1.5f * (k.nb - 1) : -1.5f;
            rows[b].resize(k.n);
            for (int i = 0; i < k.n; i++) rows[b][i] = b % 2 ? (i * 7 + 2) % nrows : i;
            if (ties && k.n > 9) rows[b][9] = rows[b][5];
            a.rows[b] = rows[b].data();
        }
        for (int i = 0; i < k.n; i++) pos[i] = 100 + 2 * i;
        if (ties && k.n > 9) pos[9] = pos[5];
        a.rng_pos = pos.data();
    }
};

const ImageCase kImageCases[] = {
    {96, 8192, 2, 0.05f, 1.0f}, {96, 8192, 2, 4.0f, 1.0f},  {64, 1001, 1, 1.0f, 0.1f}, {64, 1001, 3, 30.0f, 0.1f},
    {80, 517, 3, 0.5f, 0.0f},   {50, 8192, 1, 2.0f, 0.0f},  {70, 37, 2, 1.0f, 1.0f},   {40, 2048, 3, 0.01f, 0.1f}};

void check_device_algorithm() {
    std::mt19937 rng(21);
    for (const ImageCase &k : kImageCases) {
        ImageProblem p(k, rng, true);
        std::vector<int32_t> codes(k.n);
        std::vector<double> conf(k.n), top(k.n);
        p.a.out_codes = codes.data(), p.a.out_conf = conf.data(), p.a.top_logp = top.data();
        dimoo::cpu::sample_image(p.a);
        for (int i = 0; i < k.n; i++) {
            int32_t c;
            double cf, tl;
            device_image_row(p.a, i, c, cf, tl);
            ASSERT_EQ(c, codes[i]) << "C=" << k.C << " scale=" << k.scale << " tau=" << k.tau << " i=" << i;
            ASSERT_TRUE(close(cf, conf[i])) << cf << " vs " << conf[i] << " i=" << i;
            ASSERT_TRUE(close(tl, top[i])) << tl << " vs " << top[i] << " i=" << i;
        }
    }
}

// The device's full draw decides as the CPU's pruned one, with both CPU
// kernel sets.
TEST(SamplerMath, DeviceAlgorithmEqualsCpuSampler) {
    check_device_algorithm();
    if (dimoo::cpu::set_avx512(false)) {
        check_device_algorithm();
        dimoo::cpu::set_avx512(true);
    }
}

// ---- text sampler statements ----------------------------------------------------

struct TextProblem {
    int n, cols, col_begin;
    double tau, cfg;
    std::vector<float> cond, uncond;
    std::vector<int32_t> pos;
};

TextProblem make_text(int n, int cols, int col_begin, double tau, double cfg, float scale, std::mt19937 &rng) {
    TextProblem t{n, cols, col_begin, tau, cfg, {}, {}, {}};
    std::normal_distribution<float> nd(0.0f, scale);
    t.cond.resize(size_t(n) * cols);
    for (auto &x : t.cond) x = nd(rng);
    if (cfg > 0) {
        t.uncond.resize(t.cond.size());
        for (size_t q = 0; q < t.cond.size(); q++) t.uncond[q] = t.cond[q] + 0.5f * nd(rng);
    }
    for (int i = 0; i < n; i++) t.pos.push_back(700 + 3 * i);
    return t;
}

// dimoo/sampler_text.go's statement, with libm logs for the noise.
void go_text_row(const TextProblem &t, int i, int32_t &token, double &conf) {
    std::vector<double> row(t.cols);
    for (int j = 0; j < t.cols; j++) {
        row[j] = t.cond[size_t(i) * t.cols + j];
        if (t.cfg > 0) {
            const double u = t.uncond[size_t(i) * t.cols + j];
            row[j] = u + (t.cfg + 1) * (row[j] - u);
        }
    }
    int best = 0;
    double bs = -INFINITY, mx = -INFINITY;
    for (int j = 0; j < t.cols; j++) {
        double s = row[j];
        if (t.tau > 0) {
            uint32_t w[4];
            const int v = t.col_begin + j;
            sm::philox_block(w, 99, 4, t.pos[i], sm::kPurposeTextSample, v >> 2);
            s += t.tau * -std::log(-std::log((double(w[v & 3]) + 0.5) / 4294967296.0));
        }
        if (s > bs) bs = s, best = j;
        mx = std::max(mx, row[j]);
    }
    double sum = 0;
    for (int j = 0; j < t.cols; j++) sum += std::exp(row[j] - mx);
    token = t.col_begin + best;
    conf = std::exp(row[best] - mx) / sum;
}

// The device's statement: the shared noise (portable log) in double.
void device_text_row(const TextProblem &t, int i, int32_t &token, double &conf) {
    auto logit = [&](int j) {
        const double c = t.cond[size_t(i) * t.cols + j];
        if (t.cfg <= 0) return c;
        const double u = t.uncond[size_t(i) * t.cols + j];
        return u + (t.cfg + 1) * (c - u);
    };
    int best = 0;
    double bs = -INFINITY, mx = -INFINITY;
    for (int j = 0; j < t.cols; j++) {
        const double l = logit(j);
        double s = l;
        if (t.tau > 0) s = l + t.tau * sm::gumbel_at(99, 4, t.pos[i], sm::kPurposeTextSample, t.col_begin + j);
        if (s > bs) bs = s, best = j;
        mx = std::max(mx, l);
    }
    double sum = 0;
    for (int j = 0; j < t.cols; j++) sum += std::exp(logit(j) - mx);
    token = t.col_begin + best;
    conf = std::exp(logit(best) - mx) / sum;
}

// The k most confident (stable descending: ties to the earlier), as
// sequence positions in increasing order.
std::vector<int32_t> text_selection(const std::vector<double> &conf, const std::vector<int32_t> &pos, int k) {
    std::vector<int> order(conf.size());
    for (size_t j = 0; j < order.size(); j++) order[j] = int(j);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return conf[x] > conf[y]; });
    std::vector<int32_t> out;
    for (int q = 0; q < k; q++) out.push_back(pos[order[q]]);
    std::sort(out.begin(), out.end());
    return out;
}

TEST(SamplerMath, TextNoiseDecidesAsGo) {
    std::mt19937 rng(8);
    for (double tau : {0.0, 0.3, 1.0}) {
        for (double cfg : {0.0, 2.0}) {
            TextProblem t = make_text(24, 3001, 5, tau, cfg, 2.0f, rng);
            for (int i = 0; i < t.n; i++) {
                int32_t a, b;
                double ca, cb;
                go_text_row(t, i, a, ca);
                device_text_row(t, i, b, cb);
                ASSERT_EQ(a, b) << "tau=" << tau << " cfg=" << cfg << " i=" << i;
                ASSERT_TRUE(close(ca, cb)) << ca << " vs " << cb;
            }
        }
    }
}

// What text_rows_kernel computes, with the device's decomposition of
// text_pick's scan: the largest non-NaN logit, the first allowed column, the
// first of the largest non-NaN allowed scores (reductions in any order give
// these), the scan's rule for a NaN score at the first allowed column, and
// the sum in column order. With the host's exp it equals text_pick bit for
// bit, NaNs, masks and empty masks included.
int32_t device_text_pick(const float *cond, const float *uncond, int n, int v0, double cfg, double tau, uint64_t seed,
                         int32_t step, int32_t pos, const uint8_t *mask, int mask_len, double *conf) {
    auto logit = [&](int j) {
        if (!uncond) return double(cond[j]);
        const double u = uncond[j];
        return sm::dadd(u, sm::dmul(sm::dadd(cfg, 1.0), sm::dsub(double(cond[j]), u)));
    };
    auto allowed = [&](int j) { return !mask || (v0 + j < mask_len && mask[v0 + j]); };
    auto score = [&](int j) {
        const double l = logit(j);
        return tau > 0 ? sm::dadd(l, sm::dmul(tau, sm::gumbel_at(seed, step, pos, sm::kPurposeTextSample, v0 + j))) : l;
    };
    double mx = -INFINITY;
    int first = n, best = n;
    double bs = -INFINITY;
    // Visit the columns in a scrambled order, as the device's threads and
    // reductions do: only (value, index) comparisons decide.
    std::vector<int> order(n);
    for (int j = 0; j < n; j++) order[j] = (j * 7919) % n;
    if (std::gcd(7919, n) != 1)
        for (int j = 0; j < n; j++) order[j] = n - 1 - j;
    for (int j : order) {
        const double l = logit(j);
        if (l > mx) mx = l;
        if (!allowed(j)) continue;
        first = std::min(first, j);
        const double s = score(j);
        if (s > bs || (s == bs && j < best)) bs = s, best = j;
    }
    double sum = 0;
    for (int j = 0; j < n; j++) sum = sm::dadd(sum, std::exp(sm::dsub(logit(j), mx)));
    int j = 0;
    if (first < n) j = std::isnan(score(first)) ? first : best;
    *conf = sm::ddiv(std::exp(sm::dsub(logit(j), mx)), sum);
    return v0 + j;
}

TEST(SamplerMath, TextDeviceDecompositionEqualsTextPick) {
    std::mt19937 rng(77);
    std::normal_distribution<float> nd(0.0f, 2.0f);
    int cases = 0;
    for (int n : {1, 5, 37, 1000}) {
        for (int v0 : {0, 3}) {
            for (int rep = 0; rep < 40; rep++, cases++) {
                std::vector<float> c(n), u(n);
                for (int j = 0; j < n; j++) c[j] = nd(rng), u[j] = c[j] + 0.5f * nd(rng);
                // NaNs: at a random column, at the first column, at the first allowed one.
                const int nan_at = rep % 4 == 0 ? int(rng() % n) : rep % 4 == 1 ? 0 : -1;
                if (nan_at >= 0) c[nan_at] = NAN;
                if (rep % 8 == 3) c[rng() % n] = -INFINITY;
                std::vector<uint8_t> mask(size_t(v0 + n) + 3);
                for (auto &m : mask) m = rng() % 3 == 0;
                int mask_len = int(mask.size()) - int(rng() % 4);
                if (rep % 5 == 0) std::fill(mask.begin(), mask.end(), 0), mask[0] = v0 > 0; // nothing allowed in range
                const bool use_mask = rep % 2 == 1 || rep % 5 == 0;
                if (use_mask && rep % 4 == 2) { // NaN at the first allowed column
                    for (int j = 0; j < n; j++)
                        if (v0 + j < mask_len && mask[v0 + j]) {
                            c[j] = NAN;
                            break;
                        }
                }
                const double tau = rep % 3 == 0 ? 0.0 : rep % 3 == 1 ? 0.7 : 1.0;
                const double cfg = rep % 6 < 3 ? 0.0 : -0.4 + 0.3 * (rep % 5);
                const float *uc = rep % 6 < 3 ? nullptr : u.data();
                const uint8_t *mk = use_mask ? mask.data() : nullptr;
                double want_conf, got_conf;
                const int32_t want = dimoo::cpu::text_pick(c.data(), uc, n, v0, cfg, tau, 0xfeedull + rep, 3, 100 + rep,
                                                           mk, mask_len, &want_conf);
                const int32_t got =
                    device_text_pick(c.data(), uc, n, v0, cfg, tau, 0xfeedull + rep, 3, 100 + rep, mk, mask_len, &got_conf);
                ASSERT_EQ(got, want) << "n=" << n << " v0=" << v0 << " rep=" << rep;
                ASSERT_TRUE(sm::bits_of(got_conf) == sm::bits_of(want_conf) || (std::isnan(got_conf) && std::isnan(want_conf)))
                    << got_conf << " vs " << want_conf << " n=" << n << " rep=" << rep;
            }
        }
    }
    EXPECT_EQ(cases, 320);
}

// dimoo/sampler_image.go's quantileInto, by a full sort.
float go_quantile(std::vector<float> v, double q) {
    std::sort(v.begin(), v.end());
    const float rank = float(q) * float(v.size() - 1);
    const int lo = int(rank), hi = std::min(lo + 1, int(v.size()) - 1);
    const float a = v[lo], b = v[hi], w = rank - float(lo);
    return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1 - w);
}

// ---- kept logits at the Ctx level (ABI 4) ------------------------------------------
//
// The same host rows loaded into a context (Ctx::load_kept, at scattered
// slots), then image steps (1-3 branches at different offsets, temperature 0
// and 1, every position or a selection, each step again with the CPU's
// top-log-probability shortcut), text steps (guided or not, with and without
// a token mask, one that allows nothing in the kept range) and ML-Cache
// selections. A CUDA context must decide exactly as a CPU context (image
// confidences within 1e-12); without a GPU the CPU context is checked
// against the statements over the host rows (sample_image, text_pick,
// quantile_f32), which checks this harness too.

namespace kept {

constexpr int kSeqs = 3, kMaxT = 600, kKeepRows = 400, kVocab = 10007;

dimoo_model_config config() {
    dimoo_model_config c{};
    c.d_model = 64;
    c.n_layers = 1;
    c.n_heads = c.n_kv_heads = 2;
    c.mlp_hidden_size = 64;
    c.vocab_size = c.embedding_size = kVocab;
    c.max_sequence_length = 1024;
    c.rope_theta = 10000.f;
    c.rms_norm_eps = 1e-5f;
    return c;
}

dimoo_ctx_params params() {
    dimoo_ctx_params p{};
    p.n_seqs = kSeqs;
    p.max_tokens = kMaxT;
    p.keep_rows = kKeepRows;
    p.keep_cols = kVocab;
    return p;
}

// One seq's rows by position (row p is position p) and the slot each goes to.
struct Seq {
    int n = 0, cols = 0, vb = 0;
    std::vector<float> rows;
    std::vector<int32_t> slots;
};

enum Kind { kFlat, kPeaked };

Seq make_seq(int n, int cols, int vb, Kind kind, std::mt19937 &rng) {
    Seq s;
    s.n = n, s.cols = cols, s.vb = vb;
    s.rows.resize(size_t(n) * cols);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(0.0f, 1.0f);
    for (auto &x : s.rows) x = nd(rng);
    if (kind == kPeaked) // one to three large logits a row, of random heights
        for (int p = 0; p < n; p++)
            for (int q = 0; q <= p % 3; q++) s.rows[size_t(p) * cols + rng() % unsigned(cols)] += 8.0f + 4.0f * ud(rng);
    std::vector<int32_t> perm(kKeepRows);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    s.slots.assign(perm.begin(), perm.begin() + n);
    return s;
}

struct ImageArgs {
    int nb = 1, step = 0, n_select = 0;
    uint64_t seed = 0;
    float tau = 0;
    std::vector<int32_t> masked;
    bool revisit = false; // the same step again: the CPU may use its stored top log-probabilities
};
constexpr int kOffsets[3] = {5, 0, 37};

float image_weight(int nb, int b) { return nb == 1 ? 1.0f : b == 0 ? 1.0f + 1.5f * float(nb - 1) : -1.5f; }

struct TextArgs {
    bool guided = false, use_mask = false, all_tokens = false;
    double cfg = 0, tau = 0;
    int step = 0, n_select = 0;
    uint64_t seed = 0;
    std::vector<int32_t> positions;
};

// A decision: the integers (selected indices then codes; tokens; positions;
// a compute list) and the image confidences.
struct Out {
    std::string what;
    std::vector<int32_t> ints;
    std::vector<double> conf;
};

class Runner {
public:
    virtual ~Runner() = default;
    virtual void load(int seq, const Seq &s) = 0;
    virtual void mask(const std::vector<uint8_t> &m) = 0;
    virtual Out image(const ImageArgs &a) = 0;
    virtual Out text(const TextArgs &a) = 0;
    virtual Out cache(int seq, int n, double q) = 0;
};

// Through the backend's Ctx, outputs NaN/-7-poisoned and checked filled.
class CtxRunner : public Runner {
public:
    explicit CtxRunner(dimoo::Ctx &ctx) : ctx_(ctx) {}
    void load(int seq, const Seq &s) override {
        seqs_[seq] = s;
        ctx_.load_kept(seq, s.slots.data(), s.n, s.cols, s.rows.data());
    }
    void mask(const std::vector<uint8_t> &m) override { ctx_.set_token_mask(m.data(), int(m.size())); }
    Out image(const ImageArgs &k) override {
        const int n = int(k.masked.size()), m = k.n_select, len = m ? m : n;
        dimoo_image_step_args a{};
        a.n_branches = k.nb;
        for (int b = 0; b < k.nb; b++) a.seqs[b] = b, a.offsets[b] = kOffsets[b], a.weights[b] = image_weight(k.nb, b);
        a.n_pos = n, a.masked = k.masked.data(), a.step = k.step, a.seed = k.seed, a.temperature = k.tau;
        a.n_select = m;
        std::vector<int32_t> sel(std::max(m, 1), -7), codes(len, -7);
        std::vector<double> conf(len, NAN);
        a.out_selected = m ? sel.data() : nullptr, a.out_codes = codes.data(), a.out_conf = conf.data();
        dimoo::ImageStepCall c{};
        c.a = &a;
        c.n_codes = seqs_[0].cols;
        std::vector<std::vector<int32_t>> slots(k.nb, std::vector<int32_t>(n));
        std::vector<int32_t> index(n);
        std::vector<uint8_t> valid(n, 1);
        for (int b = 0; b < k.nb; b++) {
            for (int i = 0; i < n; i++) slots[b][i] = seqs_[b].slots[size_t(kOffsets[b] + k.masked[i])];
            c.slots[b] = slots[b].data();
        }
        for (int i = 0; i < n; i++) index[i] = kOffsets[0] + k.masked[i];
        c.top_valid = k.revisit ? valid.data() : nullptr;
        c.top_index = index.data();
        ctx_.image_step(c);
        Out o;
        if (m) o.ints.assign(sel.begin(), sel.begin() + m);
        o.ints.insert(o.ints.end(), codes.begin(), codes.end());
        o.conf = conf;
        for (int i = 0; i < len; i++) {
            EXPECT_TRUE(codes[i] >= 0 && codes[i] < c.n_codes) << "code " << codes[i] << " at " << i;
            EXPECT_TRUE(std::isfinite(conf[i])) << "conf not written at " << i;
            if (m) EXPECT_TRUE(sel[i] >= 0 && sel[i] < n && (i == 0 || sel[i] > sel[i - 1])) << "selected " << sel[i];
        }
        return o;
    }
    Out text(const TextArgs &k) override {
        const int n = int(k.positions.size()), m = k.n_select;
        dimoo_text_step_args a{};
        a.seq = 0, a.uncond_seq = k.guided ? 1 : -1, a.cfg_scale = k.cfg, a.temperature = k.tau, a.step = k.step;
        a.seed = k.seed, a.use_mask = k.use_mask, a.n_pos = n, a.positions = k.positions.data(), a.n_select = m;
        std::vector<int32_t> op(std::max(m, 1), -7), ot(std::max(m, 1), -7), all(n, -7);
        a.out_positions = op.data(), a.out_tokens = ot.data(), a.out_all_tokens = k.all_tokens ? all.data() : nullptr;
        std::vector<int32_t> slots(n), uslots(n);
        for (int i = 0; i < n; i++) {
            slots[i] = seqs_[0].slots[size_t(k.positions[i])];
            uslots[i] = seqs_[1].slots[size_t(k.positions[i])];
        }
        dimoo::TextStepCall c{};
        c.a = &a, c.n_cols = seqs_[0].cols, c.vocab_begin = seqs_[0].vb, c.slots = slots.data();
        c.uncond_slots = k.guided ? uslots.data() : nullptr;
        ctx_.text_step(c);
        Out o;
        o.ints.assign(op.begin(), op.begin() + m);
        o.ints.insert(o.ints.end(), ot.begin(), ot.begin() + m);
        if (k.all_tokens) o.ints.insert(o.ints.end(), all.begin(), all.end());
        for (int32_t v : o.ints) EXPECT_GE(v, 0) << "an output was not written";
        return o;
    }
    Out cache(int seq, int n, double q) override {
        std::vector<int32_t> out(n, -7);
        const int k = ctx_.cache_select(seq, seqs_[seq].slots.data(), n, q, out.data());
        Out o;
        o.ints.assign(out.begin(), out.begin() + k);
        return o;
    }

private:
    dimoo::Ctx &ctx_;
    Seq seqs_[kSeqs];
};

// The statements over the host rows.
class RefRunner : public Runner {
public:
    void load(int seq, const Seq &s) override { seqs_[seq] = s; }
    void mask(const std::vector<uint8_t> &m) override { mask_ = m; }
    Out image(const ImageArgs &k) override {
        const int n = int(k.masked.size()), m = k.n_select;
        dimoo_sample_args a{};
        a.n_pos = n, a.n_branches = k.nb, a.n_codes = seqs_[0].cols, a.step = k.step, a.seed = k.seed;
        a.temperature = k.tau;
        std::vector<std::vector<int32_t>> rows(k.nb, std::vector<int32_t>(n));
        std::vector<int32_t> rng_pos(n), codes(n), sel(std::max(m, 1));
        std::vector<double> conf(n);
        for (int b = 0; b < k.nb; b++) {
            a.weights[b] = image_weight(k.nb, b);
            a.logits[b] = seqs_[b].rows.data();
            a.n_rows[b] = seqs_[b].n;
            for (int i = 0; i < n; i++) rows[b][i] = kOffsets[b] + k.masked[i];
            a.rows[b] = rows[b].data();
        }
        for (int i = 0; i < n; i++) rng_pos[i] = kOffsets[0] + k.masked[i];
        a.rng_pos = rng_pos.data(), a.out_codes = codes.data(), a.out_conf = conf.data();
        a.n_select = m, a.out_selected = m ? sel.data() : nullptr;
        dimoo::cpu::sample_image(a);
        Out o;
        if (!m) {
            o.ints = codes, o.conf = conf;
            return o;
        }
        o.ints.assign(sel.begin(), sel.begin() + m);
        for (int j = 0; j < m; j++) o.ints.push_back(codes[size_t(sel[j])]);
        for (int j = 0; j < m; j++) o.conf.push_back(conf[size_t(sel[j])]);
        return o;
    }
    Out text(const TextArgs &k) override {
        const int n = int(k.positions.size()), C = seqs_[0].cols;
        std::vector<int32_t> tok(n);
        std::vector<double> conf(n);
        for (int i = 0; i < n; i++) {
            const size_t r = size_t(k.positions[i]) * C;
            tok[i] = dimoo::cpu::text_pick(seqs_[0].rows.data() + r, k.guided ? seqs_[1].rows.data() + r : nullptr, C,
                                           seqs_[0].vb, k.cfg, k.tau, k.seed, k.step, k.positions[i],
                                           k.use_mask ? mask_.data() : nullptr, int(mask_.size()), &conf[i]);
        }
        std::vector<int> order(n);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return conf[x] > conf[y]; });
        order.resize(k.n_select);
        std::sort(order.begin(), order.end());
        Out o;
        for (int j : order) o.ints.push_back(k.positions[j]);
        for (int j : order) o.ints.push_back(tok[j]);
        if (k.all_tokens) o.ints.insert(o.ints.end(), tok.begin(), tok.end());
        return o;
    }
    Out cache(int seq, int n, double q) override {
        const Seq &s = seqs_[seq];
        std::vector<float> mx(n);
        for (int p = 0; p < n; p++) mx[p] = *std::max_element(&s.rows[size_t(p) * s.cols], &s.rows[size_t(p + 1) * s.cols]);
        std::vector<float> v = mx;
        const float thr = dimoo::cpu::quantile_f32(v, q);
        Out o;
        for (int p = 0; p < n; p++)
            if (mx[p] <= thr) o.ints.push_back(p);
        return o;
    }

private:
    Seq seqs_[kSeqs];
    std::vector<uint8_t> mask_;
};

// The scenario; every decision goes to outs.
void scenario(Runner &r, std::vector<Out> &outs) {
    std::mt19937 rng(2024);
    auto subset = [&](int lo, int hi, int percent) {
        std::vector<int32_t> v;
        for (int p = lo; p < hi; p++)
            if (int(rng() % 100) < percent) v.push_back(p);
        if (v.empty()) v.push_back(lo);
        return v;
    };
    for (Kind kind : {kFlat, kPeaked}) {
        const std::string kn = kind == kFlat ? "flat" : "peaked";
        Seq img[3];
        for (int s = 0; s < 3; s++) img[s] = make_seq(300, 8192, 0, kind, rng);
        for (int p : {7, 8}) // equal row maxima for the selection's ties
            std::copy(&img[2].rows[3 * 8192], &img[2].rows[4 * 8192], &img[2].rows[size_t(p) * 8192]);
        for (int s = 0; s < 3; s++) r.load(s, img[s]);
        const std::vector<int32_t> masked = subset(0, 250, 50);
        int step = 0;
        for (int nb = 1; nb <= 3; nb++)
            for (float tau : {0.0f, 1.0f})
                for (int m : {0, int(masked.size()) / 4 + 1})
                    for (bool revisit : {false, true}) {
                        ImageArgs a;
                        a.nb = nb, a.tau = tau, a.n_select = m, a.masked = masked, a.revisit = revisit;
                        a.step = step, a.seed = 0x5eed0000ull + uint64_t(step);
                        if (revisit) step++;
                        outs.push_back(r.image(a));
                        outs.back().what = kn + " image nb=" + std::to_string(nb) + " tau=" + std::to_string(tau) +
                                           " n_select=" + std::to_string(m) + (revisit ? " again" : "");
                    }
        for (int n : {300, 137, 1, 2})
            for (double q : {0.0, 0.1, 0.37, 0.5, 0.9, 1.0}) {
                outs.push_back(r.cache(2, n, q));
                outs.back().what = kn + " cache n=" + std::to_string(n) + " q=" + std::to_string(q);
            }
        // Text: rows over token ids [7, kVocab) of seqs 0 (cond) and 1 (uncond).
        Seq txt[2];
        for (int s = 0; s < 2; s++) {
            txt[s] = make_seq(64, kVocab - 7, 7, kind, rng);
            r.load(s, txt[s]);
        }
        const std::vector<int32_t> positions = subset(0, 64, 60);
        std::vector<uint8_t> mask_a(6000), mask_b(5, 0);
        for (auto &v : mask_a) v = rng() % 10 < 4;
        mask_b[3] = 1; // allows only id 3, below the kept range: column 0 is taken
        for (int mk = 0; mk < 3; mk++) {
            if (mk == 1) r.mask(mask_a);
            if (mk == 2) r.mask(mask_b);
            for (double cfg : {-1.0, 0.8, -0.4})
                for (double tau : {0.0, 1.0})
                    for (int m : {0, 5}) {
                        TextArgs a;
                        a.guided = cfg > -1, a.cfg = a.guided ? cfg : 0, a.tau = tau, a.use_mask = mk > 0;
                        a.n_select = m, a.all_tokens = m == 0 || mk == 1, a.positions = positions;
                        a.step = step++, a.seed = 0xfeed0000ull + uint64_t(step);
                        outs.push_back(r.text(a));
                        outs.back().what = kn + " text mask=" + std::to_string(mk) + " cfg=" + std::to_string(cfg) +
                                           " tau=" + std::to_string(tau) + " n_select=" + std::to_string(m);
                    }
        }
        TextArgs all; // every position selected, low temperature
        all.guided = true, all.cfg = 1.5, all.tau = 0.3, all.n_select = int(positions.size()), all.positions = positions;
        all.step = step++, all.seed = 99;
        outs.push_back(r.text(all));
        outs.back().what = kn + " text every position";
    }
}

void expect_same(const std::vector<Out> &got, const std::vector<Out> &want, const char *got_name) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t q = 0; q < got.size(); q++) {
        SCOPED_TRACE(want[q].what);
        ASSERT_EQ(got[q].ints, want[q].ints) << got_name << " decides otherwise";
        ASSERT_EQ(got[q].conf.size(), want[q].conf.size());
        for (size_t i = 0; i < got[q].conf.size(); i++)
            ASSERT_TRUE(close(got[q].conf[i], want[q].conf[i])) << got_name << " conf " << got[q].conf[i] << " vs "
                                                                << want[q].conf[i] << " at " << i;
    }
}

} // namespace kept

// Runs everywhere: the CPU context over kept rows decides as the statements.
TEST(KeptCtx, CpuEqualsStatements) {
    auto be = dimoo::make_cpu_backend(0);
    auto m = be->create_model(dimoo::ModelShape(kept::config()));
    auto ctx = m->create_ctx(kept::params());
    kept::CtxRunner cpu(*ctx);
    kept::RefRunner ref;
    std::vector<kept::Out> got, want;
    kept::scenario(cpu, got);
    kept::scenario(ref, want);
    kept::expect_same(got, want, "the CPU context");
}

// ---- device -----------------------------------------------------------------------

#if defined(DIMOO_WITH_CUDA)

bool have_device() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return n > 0;
}

// A device copy of a host vector, or n elements poisoned with 0xff bytes
// (NaN as doubles, -1 as integers).
template <class T> struct Dev {
    T *p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count) : n(count) {
        EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
        poison();
    }
    explicit Dev(const std::vector<T> &v) : Dev(v.size()) {
        EXPECT_EQ(cudaMemcpy(p, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
    }
    ~Dev() { cudaFree(p); }
    Dev(const Dev &) = delete;
    void poison() { EXPECT_EQ(cudaMemset(p, 0xff, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess); }
    std::vector<T> get() const {
        std::vector<T> v(n);
        EXPECT_EQ(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
        return v;
    }
};

struct DeviceImage {
    std::vector<std::unique_ptr<Dev<float>>> logits;
    std::vector<std::unique_ptr<Dev<int32_t>>> rows;
    Dev<int32_t> pos, codes, sel, sel_codes;
    Dev<double> conf, sel_conf;
    dimoo::SampleDeviceArgs d;
    DeviceImage(const ImageProblem &p, int m)
        : pos(p.pos), codes(p.pos.size()), sel(std::max(m, 1)), sel_codes(std::max(m, 1)), conf(p.pos.size()),
          sel_conf(std::max(m, 1)) {
        d.n_pos = p.a.n_pos, d.n_branches = p.a.n_branches, d.n_codes = p.a.n_codes, d.step = p.a.step;
        d.seed = p.a.seed, d.temperature = p.a.temperature, d.n_select = m;
        for (int b = 0; b < p.a.n_branches; b++) {
            logits.emplace_back(new Dev<float>(p.lg[b]));
            rows.emplace_back(new Dev<int32_t>(p.rows[b]));
            d.weights[b] = p.a.weights[b], d.logits[b] = logits[b]->p, d.rows[b] = rows[b]->p;
        }
        d.rng_pos = pos.p, d.codes = codes.p, d.conf = conf.p, d.sel = sel.p, d.sel_codes = sel_codes.p;
        d.sel_conf = sel_conf.p;
    }
};

struct ImageResult {
    std::vector<int32_t> codes, sel, sel_codes;
    std::vector<double> conf, sel_conf, top;
    bool operator==(const ImageResult &o) const {
        auto same = [](const std::vector<double> &x, const std::vector<double> &y) {
            return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * 8) == 0;
        };
        return codes == o.codes && sel == o.sel && sel_codes == o.sel_codes && same(conf, o.conf) &&
               same(sel_conf, o.sel_conf) && same(top, o.top);
    }
};

TEST(CudaSampler, ImageEqualsCpuSampler) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device";
    std::mt19937 rng(31);
    for (const ImageCase &k : kImageCases) {
        ImageProblem p(k, rng, true);
        // The CPU: every position (with its top log-probability), then the
        // selection of the k to unmask.
        std::vector<int32_t> want_codes(k.n);
        std::vector<double> want_conf(k.n), want_top(k.n);
        p.a.out_codes = want_codes.data(), p.a.out_conf = want_conf.data(), p.a.top_logp = want_top.data();
        dimoo::cpu::sample_image(p.a);
        const int m = k.n / 3;
        std::vector<int32_t> want_sel(m), scratch_codes(k.n);
        std::vector<double> scratch_conf(k.n);
        p.a.out_codes = scratch_codes.data(), p.a.out_conf = scratch_conf.data(), p.a.top_logp = nullptr;
        p.a.n_select = m, p.a.out_selected = want_sel.data();
        dimoo::cpu::sample_image(p.a);
        p.a.n_select = 0;
        // ML-Cache: two thirds of the rows carry a current top_logp, which
        // must stay untouched; the rest (NaN) must be computed.
        std::vector<uint8_t> valid(k.n);
        std::vector<double> top_in(k.n);
        for (int i = 0; i < k.n; i++) {
            valid[i] = i % 3 != 0;
            top_in[i] = valid[i] ? want_top[i] : std::nan("");
        }
        for (int mm : {0, m}) {
            ImageResult runs[2];
            for (ImageResult &r : runs) {
                DeviceImage di(p, mm);
                Dev<double> top(top_in);
                Dev<uint8_t> val(valid);
                di.d.top_logp = top.p, di.d.top_logp_valid = val.p;
                std::vector<int32_t> hs(std::max(mm, 1)), hc(mm ? mm : k.n);
                std::vector<double> hf(hc.size());
                di.d.host_sel = hs.data(), di.d.host_codes = hc.data(), di.d.host_conf = hf.data();
                ASSERT_EQ(dimoo::cuda_sample_image(di.d, nullptr), cudaSuccess);
                ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
                r.codes = di.codes.get(), r.conf = di.conf.get(), r.top = top.get();
                if (mm) r.sel = di.sel.get(), r.sel_codes = di.sel_codes.get(), r.sel_conf = di.sel_conf.get();
                // The host copies are what the device holds.
                if (mm) {
                    EXPECT_EQ(hs, r.sel);
                    EXPECT_EQ(hc, r.sel_codes);
                } else {
                    EXPECT_EQ(hc, r.codes);
                }
            }
            ASSERT_TRUE(runs[0] == runs[1]) << "two runs differ: C=" << k.C << " tau=" << k.tau;
            const ImageResult &r = runs[0];
            for (int i = 0; i < k.n; i++) {
                ASSERT_EQ(r.codes[i], want_codes[i]) << "C=" << k.C << " scale=" << k.scale << " tau=" << k.tau
                                                     << " nb=" << k.nb << " i=" << i;
                ASSERT_TRUE(close(r.conf[i], want_conf[i])) << r.conf[i] << " vs " << want_conf[i] << " i=" << i;
                if (valid[i]) {
                    ASSERT_EQ(sm::bits_of(r.top[i]), sm::bits_of(want_top[i])) << "valid top_logp rewritten, i=" << i;
                } else {
                    ASSERT_TRUE(close(r.top[i], want_top[i])) << r.top[i] << " vs " << want_top[i] << " i=" << i;
                }
            }
            if (mm) {
                ASSERT_EQ(r.sel, want_sel) << "C=" << k.C << " scale=" << k.scale << " tau=" << k.tau;
                for (int q = 0; q < mm; q++) {
                    ASSERT_EQ(r.sel_codes[q], want_codes[want_sel[q]]);
                    ASSERT_TRUE(close(r.sel_conf[q], want_conf[want_sel[q]]));
                }
            }
        }
    }
}

TEST(CudaSampler, TextEqualsStatement) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device";
    std::mt19937 rng(41);
    for (double tau : {0.0, 0.1, 1.0}) {
        for (double cfg : {0.0, 1.5}) {
            for (int col_begin : {0, 3}) {
                TextProblem t = make_text(32, 20011, col_begin, tau, cfg, 3.0f, rng);
                std::vector<int32_t> want_tok(t.n);
                std::vector<double> want_conf(t.n);
                for (int i = 0; i < t.n; i++) device_text_row(t, i, want_tok[i], want_conf[i]);
                for (int m : {0, 7}) {
                    std::vector<int32_t> got_sel[2], got_tok[2];
                    std::vector<double> got_conf[2];
                    for (int run = 0; run < 2; run++) {
                        Dev<float> c(t.cond), u(t.uncond);
                        Dev<int32_t> pos(t.pos), tok(t.n), sp(std::max(m, 1)), st(std::max(m, 1));
                        Dev<double> conf(t.n);
                        dimoo::TextSampleDeviceArgs a;
                        a.n_pos = t.n, a.n_cols = t.cols, a.col_begin = t.col_begin, a.step = 4, a.seed = 99;
                        a.temperature = tau, a.cfg_scale = cfg, a.cond = c.p, a.uncond = cfg > 0 ? u.p : nullptr;
                        a.positions = pos.p, a.n_select = m, a.tokens = tok.p, a.conf = conf.p;
                        a.sel_pos = sp.p, a.sel_tokens = st.p;
                        ASSERT_EQ(dimoo::cuda_sample_text(a, nullptr), cudaSuccess);
                        ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
                        got_tok[run] = tok.get(), got_conf[run] = conf.get();
                        if (m) got_sel[run] = sp.get();
                    }
                    ASSERT_EQ(got_tok[0], got_tok[1]);
                    ASSERT_EQ(0, std::memcmp(got_conf[0].data(), got_conf[1].data(), t.n * 8));
                    ASSERT_EQ(got_sel[0], got_sel[1]);
                    ASSERT_EQ(got_tok[0], want_tok) << "tau=" << tau << " cfg=" << cfg;
                    for (int i = 0; i < t.n; i++) ASSERT_TRUE(close(got_conf[0][i], want_conf[i])) << i;
                    if (m) ASSERT_EQ(got_sel[0], text_selection(want_conf, t.pos, m));
                }
            }
        }
    }
}

TEST(CudaSampler, CacheSelectEqualsGo) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device";
    std::mt19937 rng(51);
    std::normal_distribution<float> nd(5.0f, 2.0f);
    for (int n : {1, 2, 37, 1024, 4228, 5000}) {
        std::vector<float> mx(n);
        for (auto &x : mx) x = nd(rng);
        for (int i = 0; i + 7 < n; i += 11) mx[i + 7] = mx[i];  // duplicates
        if (n > 3) mx[1] = -0.0f, mx[2] = 0.0f, mx[3] = -mx[0];
        for (double q : {0.0, 0.1, 1 - 0.9, 0.5, 0.75, 1.0}) {
            const float want_thr = go_quantile(mx, q);
            std::vector<int32_t> want;
            for (int p = 0; p < n; p++)
                if (mx[p] <= want_thr) want.push_back(p);
            Dev<float> dm(mx), thr(1);
            Dev<int32_t> list(n), cnt(1);
            ASSERT_EQ(dimoo::cuda_cache_select(dm.p, n, q, list.p, cnt.p, thr.p, nullptr), cudaSuccess);
            ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
            const float got_thr = thr.get()[0];
            ASSERT_EQ(got_thr, want_thr) << got_thr << " vs " << want_thr << " n=" << n << " q=" << q;
            const int got_n = cnt.get()[0];
            ASSERT_EQ(got_n, int(want.size()));
            std::vector<int32_t> got = list.get();
            got.resize(got_n);
            ASSERT_EQ(got, want);
        }
    }
}

// The same kept rows in a CPU and a CUDA context: identical decisions, run
// twice on the device (bitwise the same).
TEST(CudaKept, CtxDecidesAsCpu) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device";
    auto cpu_be = dimoo::make_cpu_backend(0);
    auto cpu_m = cpu_be->create_model(dimoo::ModelShape(kept::config()));
    auto cpu_ctx = cpu_m->create_ctx(kept::params());
    kept::CtxRunner cpu(*cpu_ctx);
    std::vector<kept::Out> want;
    kept::scenario(cpu, want);
    auto cuda_be = dimoo::make_cuda_backend(0);
    auto cuda_m = cuda_be->create_model(dimoo::ModelShape(kept::config()));
    std::vector<kept::Out> got[2];
    for (int run = 0; run < 2; run++) {
        auto cuda_ctx = cuda_m->create_ctx(kept::params());
        kept::CtxRunner gpu(*cuda_ctx);
        kept::scenario(gpu, got[run]);
        kept::expect_same(got[run], want, "the CUDA context");
    }
    for (size_t q = 0; q < got[0].size(); q++) {
        ASSERT_EQ(got[0][q].ints, got[1][q].ints) << got[0][q].what;
        ASSERT_EQ(0, std::memcmp(got[0][q].conf.data(), got[1][q].conf.data(), got[0][q].conf.size() * 8))
            << "two runs differ: " << got[0][q].what;
    }
}

// The CUDA context refuses what api.cpp would never pass, without touching
// the device state: load_kept beyond the context, an image step wider than
// shared memory holds.
TEST(CudaKept, LoadKeptChecksItsArguments) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device";
    auto be = dimoo::make_cuda_backend(0);
    auto m = be->create_model(dimoo::ModelShape(kept::config()));
    auto ctx = m->create_ctx(kept::params());
    std::vector<float> row(kept::kVocab, 1.0f);
    // Full-width rows: keep_rows of them. Narrow rows: as many as fit, up to max_tokens.
    const int32_t slot = 0;
    for (auto [bad_slot, width] : {std::pair<int32_t, int>{kept::kKeepRows, kept::kVocab}, {kept::kMaxT, 10}}) {
        try {
            ctx->load_kept(0, &bad_slot, 1, width, row.data());
            ADD_FAILURE() << "slot " << bad_slot << " beyond the capacity for rows of " << width << " accepted";
        } catch (const dimoo::Error &e) {
            EXPECT_EQ(e.status(), DIMOO_ERR_INVALID_ARGUMENT);
        }
    }
    const int32_t last_narrow = kept::kMaxT - 1;
    ctx->load_kept(0, &last_narrow, 1, 10, row.data()); // within the capacity for narrow rows
    ctx->load_kept(0, &slot, 1, kept::kVocab, row.data()); // a full-width row is fine
    dimoo_image_step_args a{};
    const int32_t masked = 0;
    int32_t code = -1;
    a.n_branches = 1, a.weights[0] = 1, a.n_pos = 1, a.masked = &masked, a.out_codes = &code;
    dimoo::ImageStepCall c{};
    const int32_t index = 0;
    c.a = &a, c.n_codes = kept::kVocab, c.slots[0] = &slot, c.top_index = &index;
    try {
        ctx->image_step(c); // 10007 floats = 40 KB: fits on any device
        EXPECT_GE(code, 0);
    } catch (const dimoo::Error &e) {
        EXPECT_EQ(e.status(), DIMOO_ERR_UNSUPPORTED) << e.what();
    }
}

TEST(CudaSampler, RejectsBadArguments) {
    dimoo::SampleDeviceArgs a;
    EXPECT_EQ(dimoo::cuda_sample_image(a, nullptr), cudaErrorInvalidValue);  // no branches
    dimoo::TextSampleDeviceArgs t;
    EXPECT_EQ(dimoo::cuda_sample_text(t, nullptr), cudaErrorInvalidValue);  // no columns
    EXPECT_EQ(dimoo::cuda_cache_select(nullptr, 0, 0.1, nullptr, nullptr, nullptr, nullptr), cudaErrorInvalidValue);
}

#endif  // DIMOO_WITH_CUDA

}  // namespace
