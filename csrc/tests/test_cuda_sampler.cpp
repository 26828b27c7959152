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
#include <limits>
#include <memory>
#include <random>
#include <vector>

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

// dimoo/sampler_image.go's quantileInto, by a full sort.
float go_quantile(std::vector<float> v, double q) {
    std::sort(v.begin(), v.end());
    const float rank = float(q) * float(v.size() - 1);
    const int lo = int(rank), hi = std::min(lo + 1, int(v.size()) - 1);
    const float a = v[lo], b = v[hi], w = rank - float(lo);
    return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1 - w);
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

TEST(CudaSampler, CacheUpdateScattersRows) {
    if (!have_device()) GTEST_SKIP() << "no CUDA device";
    const int T = 50, C = 77, P = 10, A = 30;
    std::vector<float> cache(T * C), rmax(T), out;
    for (int q = 0; q < T * C; q++) cache[q] = float(q);
    for (int p = 0; p < T; p++) rmax[p] = float(-p);
    const std::vector<int32_t> compute = {0, 3, 11, 39, 40, 49};
    std::vector<float> omax;
    for (size_t i = 0; i < compute.size(); i++) {
        for (int c = 0; c < C; c++) out.push_back(1e6f + float(i * C + c));
        omax.push_back(1e7f + float(i));
    }
    std::vector<uint8_t> valid(A, 1);
    Dev<float> dc(cache), dr(rmax), dout(out), dom(omax);
    Dev<int32_t> dcomp(compute);
    Dev<uint8_t> dv(valid);
    ASSERT_EQ(dimoo::cuda_cache_update(dout.p, dom.p, dcomp.p, int32_t(compute.size()), C, dc.p, dr.p, dv.p, P, A,
                                       nullptr),
              cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (size_t i = 0; i < compute.size(); i++) {
        const int p = compute[i];
        std::copy(out.begin() + i * C, out.begin() + (i + 1) * C, cache.begin() + p * C);
        rmax[p] = omax[i];
        if (p - P >= 0 && p - P < A) valid[p - P] = 0;
    }
    EXPECT_EQ(dc.get(), cache);
    EXPECT_EQ(dr.get(), rmax);
    EXPECT_EQ(dv.get(), valid);
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
