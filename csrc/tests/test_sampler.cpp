// The fused image sampler (dimoo_sample_image) against a plain statement:
// Philox4x32-10 checked on the Random123 known-answer vectors, libm logs,
// and a full argmax over every code (no pruning).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/sampler.h"
#include "dimoo.h"

namespace {

void philox_ref(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = uint64_t(0xD2511F53u) * c[0], p1 = uint64_t(0xCD9E8D57u) * c[2];
        uint32_t o[4] = {uint32_t(p1 >> 32) ^ c[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ c[3] ^ k1, uint32_t(p0)};
        std::memcpy(c, o, sizeof o);
        k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    }
}

double gumbel_ref(uint64_t seed, int step, int pos, int purpose, int index) {
    uint32_t c[4] = {uint32_t(pos), uint32_t(index >> 2), uint32_t(step), uint32_t(purpose)};
    philox_ref(c, uint32_t(seed), uint32_t(seed >> 32));
    double u = (double(c[index & 3]) + 0.5) / 4294967296.0;
    return -std::log(-std::log(u));
}

TEST(Sampler, PhiloxKnownAnswers) {
    uint32_t a[4] = {0, 0, 0, 0};
    philox_ref(a, 0, 0);
    EXPECT_EQ(a[0], 0x6627e8d5u);
    EXPECT_EQ(a[1], 0xe169c58du);
    EXPECT_EQ(a[2], 0xbc57ac4cu);
    EXPECT_EQ(a[3], 0x9b00dbd8u);
    uint32_t b[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u};
    philox_ref(b, 0xa4093822u, 0x299f31d0u);
    EXPECT_EQ(b[0], 0xd16cfe09u);
    EXPECT_EQ(b[1], 0x94fdccebu);
    EXPECT_EQ(b[2], 0x5001e420u);
    EXPECT_EQ(b[3], 0x24126ea1u);
}

TEST(Sampler, NoiseMatchesLibm) {
    double worst = 0;
    for (int i = 0; i < 20000; i++) {
        uint64_t seed = 0x9E3779B97F4A7C15ull * uint64_t(i + 1);
        double got = dimoo::cpu::gumbel_noise(seed, i % 64, i % 4096, 1 + i % 2, i % 8192);
        double want = gumbel_ref(seed, i % 64, i % 4096, 1 + i % 2, i % 8192);
        worst = std::max(worst, std::fabs(got - want) / std::max(1.0, std::fabs(want)));
    }
    EXPECT_LT(worst, 1e-14);
}

struct Case {
    int n, C, nb;
    float scale, tau;
};

// Full argmax over every code with libm noise: the statement the pruned,
// vectorised sampler must reproduce.
void reference(const dimoo_sample_args &a, std::vector<int32_t> &codes, std::vector<double> &conf) {
    for (int i = 0; i < a.n_pos; i++) {
        std::vector<float> g(a.n_codes, 0.0f);
        for (int b = 0; b < a.n_branches; b++) {
            int64_t row = a.rows[b] ? a.rows[b][i] : i;
            for (int c = 0; c < a.n_codes; c++) g[c] += a.weights[b] * a.logits[b][row * a.n_codes + c];
        }
        int best = 0;
        double bs = -INFINITY, mx = -INFINITY;
        for (int c = 0; c < a.n_codes; c++) {
            double sc = a.temperature > 0 ? double(g[c]) / a.temperature +
                                                 gumbel_ref(a.seed, a.step, a.rng_pos[i], 1, c)
                                           : double(g[c]);
            if (sc > bs) bs = sc, best = c;
            mx = std::max(mx, double(g[c]));
        }
        double sum = 0;
        for (int c = 0; c < a.n_codes; c++) sum += std::exp(double(g[c]) - mx);
        double cf = std::log(std::max(std::exp(double(g[best]) - mx) / sum, 1e-20));
        if (a.temperature > 0) cf += a.temperature * gumbel_ref(a.seed, a.step, a.rng_pos[i], 2, 0);
        codes[i] = best;
        conf[i] = cf;
    }
}

void check_fused() {
    // Flat logits (little pruning), peaked ones (most codes pruned), codebooks
    // not a multiple of 4, one to four branches, greedy and noisy draws.
    const Case cases[] = {{64, 512, 2, 0.05f, 1.0f}, {64, 512, 2, 3.0f, 1.0f},  {50, 8192, 3, 2.0f, 1.0f},
                          {33, 37, 1, 1.0f, 0.1f},   {40, 1001, 4, 0.5f, 3.0f}, {64, 512, 2, 3.0f, 0.0f},
                          {17, 64, 2, 30.0f, 0.5f},  {32, 8192, 2, 0.01f, 1.0f}, {32, 2048, 1, 0.3f, 3.0f}};
    std::mt19937 rng(7);
    for (const Case &k : cases) {
        std::vector<std::vector<float>> lg(k.nb);
        std::vector<std::vector<int32_t>> rows(k.nb);
        dimoo_sample_args a{};
        a.n_pos = k.n, a.n_branches = k.nb, a.n_codes = k.C, a.step = 3, a.seed = 12345, a.temperature = k.tau;
        std::normal_distribution<float> nd(0.0f, k.scale);
        for (int b = 0; b < k.nb; b++) {
            const int nrows = k.n + 5;
            lg[b].resize(size_t(nrows) * k.C);
            for (auto &x : lg[b]) x = nd(rng);
            a.logits[b] = lg[b].data();
            a.n_rows[b] = nrows;
            a.weights[b] = b == 0 ? 1.0f + 0.5f * (k.nb - 1) : -0.5f;
            if (b % 2 == 1) {  // odd branches read permuted rows
                rows[b].resize(k.n);
                for (int i = 0; i < k.n; i++) rows[b][i] = (i * 7 + 3) % nrows;
                a.rows[b] = rows[b].data();
            }
        }
        std::vector<int32_t> pos(k.n), got(k.n), want(k.n);
        std::vector<double> cg(k.n), cw(k.n);
        for (int i = 0; i < k.n; i++) pos[i] = 40 + 3 * i;
        a.rng_pos = pos.data(), a.out_codes = got.data(), a.out_conf = cg.data();
        dimoo::cpu::sample_image(a);
        reference(a, want, cw);
        for (int i = 0; i < k.n; i++) {
            ASSERT_EQ(got[i], want[i]) << "C=" << k.C << " scale=" << k.scale << " tau=" << k.tau << " i=" << i;
            // float exps in the softmax sum: ~1e-7 against libm in double
            ASSERT_NEAR(cg[i], cw[i], 2e-6 * std::max(1.0, std::fabs(cw[i])));
        }
    }
}

// Both kernel sets: AVX-512 where the CPU has it, and the portable one.
TEST(Sampler, FusedEqualsFullArgmax) {
    check_fused();
    if (dimoo::cpu::set_avx512(false)) {
        check_fused();
        dimoo::cpu::set_avx512(true);
    }
}

// The n_select positions a stable ascending sort by conf puts last, in
// increasing order: the image sampler's unmasking rule.
std::vector<int32_t> last_by_conf(const std::vector<double> &conf, int m) {
    std::vector<int32_t> order(conf.size());
    for (size_t i = 0; i < order.size(); i++) order[i] = int32_t(i);
    std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return conf[x] < conf[y]; });
    std::vector<int32_t> sel(order.end() - m, order.end());
    std::sort(sel.begin(), sel.end());
    return sel;
}

void check_selection() {
    // Asking only for the positions to unmask (n_select) gives the positions,
    // codes and scores that drawing every position and sorting gives: flat
    // and peaked logits, several temperatures, every share unmasked, and
    // exact ties (positions sharing rows and noise).
    std::mt19937 rng(11);
    const struct {
        int n, C;
        float scale, tau;
    } cases[] = {{97, 512, 0.2f, 1.0f}, {97, 512, 3.0f, 1.0f}, {64, 300, 1.0f, 0.5f},
                 {40, 64, 1.0f, 3.0f},  {50, 128, 0.5f, 0.0f}, {33, 512, 0.01f, 1.0f}};
    for (const auto &k : cases) {
        const int nrows = k.n;
        std::normal_distribution<float> nd(0.0f, k.scale);
        std::vector<float> l0(size_t(nrows) * k.C), l1(l0.size());
        for (auto &x : l0) x = nd(rng);
        for (size_t q = 0; q < l1.size(); q++) l1[q] = l0[q] + 0.3f * nd(rng);  // correlated, as CFG's are
        std::vector<int32_t> pos(k.n), rows(k.n);
        for (int i = 0; i < k.n; i++) pos[i] = 30 + i, rows[i] = i;
        // Positions 5 and 9 (and 20, 21) share rows and noise: exact ties.
        rows[9] = rows[5], pos[9] = pos[5], rows[21] = rows[20], pos[21] = pos[20];
        dimoo_sample_args a{};
        a.n_pos = k.n, a.n_branches = 2, a.n_codes = k.C, a.seed = 99, a.temperature = k.tau;
        a.weights[0] = 3.0f, a.weights[1] = -2.0f;
        a.logits[0] = l0.data(), a.logits[1] = l1.data(), a.n_rows[0] = a.n_rows[1] = nrows;
        a.rows[0] = a.rows[1] = rows.data();
        a.rng_pos = pos.data();
        for (int step = 0; step < 3; step++) {
            a.step = step;
            std::vector<int32_t> codes(k.n), want_codes(k.n);
            std::vector<double> conf(k.n), want_conf(k.n);
            a.out_codes = want_codes.data(), a.out_conf = want_conf.data(), a.n_select = 0;
            dimoo::cpu::sample_image(a);
            for (int m : {1, 2, 5, k.n / 3, k.n / 2, k.n - 1, k.n}) {
                const std::vector<int32_t> want = last_by_conf(want_conf, m);
                std::vector<int32_t> sel(m);
                a.out_codes = codes.data(), a.out_conf = conf.data(), a.n_select = m, a.out_selected = sel.data();
                dimoo::cpu::sample_image(a);
                ASSERT_EQ(sel, want) << "C=" << k.C << " tau=" << k.tau << " m=" << m;
                // With few to unmask and noise, most positions need no draw
                // (code -1): the point of n_select.
                const auto drawn = std::count_if(codes.begin(), codes.end(), [](int32_t c) { return c >= 0; });
                if (k.tau > 0 && m <= 2) EXPECT_LT(drawn, k.n) << "m=" << m;
                for (int i : sel) {
                    ASSERT_EQ(codes[i], want_codes[i]);
                    ASSERT_EQ(conf[i], want_conf[i]);
                }
                // Given every position's top log-probability from an earlier
                // call (rows unchanged), the library need not read the rows
                // for its bounds: same selection.
                std::vector<double> tl(k.n), tl2(k.n);
                std::vector<uint8_t> valid(k.n);
                for (int i = 0; i < k.n; i++) valid[i] = i % 3 != 0;  // some still to compute
                a.top_logp = tl.data(), a.top_logp_valid = nullptr;
                dimoo::cpu::sample_image(a);
                tl2 = tl;
                for (int i = 0; i < k.n; i++) tl2[i] = valid[i] ? tl[i] : -1e300;  // must be overwritten
                std::vector<int32_t> sel2(m);
                a.top_logp = tl2.data(), a.top_logp_valid = valid.data(), a.out_selected = sel2.data();
                dimoo::cpu::sample_image(a);
                ASSERT_EQ(sel2, want) << "with top_logp, m=" << m;
                ASSERT_EQ(tl2, tl);
                a.top_logp = nullptr, a.top_logp_valid = nullptr;
            }
        }
    }
}

TEST(Sampler, SelectionEqualsFullDrawAndSort) {
    check_selection();
    if (dimoo::cpu::set_avx512(false)) {
        check_selection();
        dimoo::cpu::set_avx512(true);
    }
}

// The AVX-512 and the portable kernels give the same codes and the same
// confidences to the bit, so a seed decodes the same image on any x86 CPU.
TEST(Sampler, KernelSetsAgreeBitForBit) {
    if (!dimoo::cpu::set_avx512(true)) GTEST_SKIP() << "no AVX-512 here";
    std::mt19937 rng(5);
    for (float scale : {0.1f, 1.0f, 4.0f}) {
        for (float tau : {1.0f, 0.3f}) {
            const int n = 70, C = 517;
            std::normal_distribution<float> nd(0.0f, scale);
            std::vector<float> l0(size_t(n) * C), l1(l0.size());
            for (auto &x : l0) x = nd(rng);
            for (auto &x : l1) x = nd(rng);
            std::vector<int32_t> pos(n);
            for (int i = 0; i < n; i++) pos[i] = 9 + 2 * i;
            dimoo_sample_args a{};
            a.n_pos = n, a.n_branches = 2, a.n_codes = C, a.step = 4, a.seed = 77, a.temperature = tau;
            a.weights[0] = 2.0f, a.weights[1] = -1.0f, a.logits[0] = l0.data(), a.logits[1] = l1.data();
            a.n_rows[0] = a.n_rows[1] = n, a.rng_pos = pos.data();
            std::vector<int32_t> c1(n), c2(n);
            std::vector<double> f1(n), f2(n);
            a.out_codes = c1.data(), a.out_conf = f1.data();
            dimoo::cpu::sample_image(a);
            ASSERT_TRUE(dimoo::cpu::set_avx512(false));
            a.out_codes = c2.data(), a.out_conf = f2.data();
            dimoo::cpu::sample_image(a);
            ASSERT_TRUE(dimoo::cpu::set_avx512(true));
            ASSERT_EQ(c1, c2) << "scale=" << scale << " tau=" << tau;
            ASSERT_EQ(0, std::memcmp(f1.data(), f2.data(), n * sizeof(double))) << "scale=" << scale << " tau=" << tau;
        }
    }
}

TEST(Sampler, ApiRejectsBadArguments) {
    dimoo_runtime *rt = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 1, &rt, err, sizeof err), DIMOO_OK);
    std::vector<float> lg(4 * 8, 0.5f);
    std::vector<int32_t> pos = {1, 2}, codes(2), rows = {0, 9};
    std::vector<double> conf(2);
    dimoo_sample_args a{};
    a.n_pos = 2, a.n_branches = 1, a.n_codes = 8, a.temperature = 1.0f;
    a.weights[0] = 1, a.logits[0] = lg.data(), a.n_rows[0] = 4;
    a.rng_pos = pos.data(), a.out_codes = codes.data(), a.out_conf = conf.data();
    EXPECT_EQ(dimoo_sample_image(rt, &a), DIMOO_OK);
    auto bad = [&](dimoo_sample_args b, const char *want) {
        EXPECT_EQ(dimoo_sample_image(rt, &b), DIMOO_ERR_INVALID_ARGUMENT) << want;
        EXPECT_NE(std::string(dimoo_runtime_error(rt)).find(want), std::string::npos) << dimoo_runtime_error(rt);
    };
    dimoo_sample_args b = a;
    b.n_branches = 5;
    bad(b, "n_branches");
    b = a, b.logits[0] = nullptr;
    bad(b, "NULL logits");
    b = a, b.rows[0] = rows.data();
    bad(b, "outside its 4 rows");
    b = a, b.temperature = -1;
    bad(b, "temperature");
    b = a, b.n_rows[0] = 1;
    bad(b, "fewer rows");
    b = a, b.n_select = 3;
    bad(b, "n_select");
    b = a, b.n_select = 1;
    bad(b, "out_selected");
    std::vector<uint8_t> valid(2, 1);
    b = a, b.top_logp_valid = valid.data();
    bad(b, "top_logp");
    EXPECT_EQ(dimoo_sample_image(rt, nullptr), DIMOO_ERR_INVALID_ARGUMENT);
    dimoo_runtime_destroy(rt);
}

}  // namespace
