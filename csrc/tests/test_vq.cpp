// test_vq.cpp - the VQ-VAE: its building blocks (convolutions in every mode,
// GroupNorm + SiLU, attention, the codebook search) against naive loops,
// and the C ABI's error paths. The times of an aMUSEd-sized model: build/dimoo_vqbench.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "dimoo.h"
#include "vq/vq.h"

namespace {

using dimoo::vq::ConvMode;

std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 g(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = d(g);
    return v;
}

double rel_err(const std::vector<float> &got, const std::vector<double> &want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); i++) {
        const double d = double(got[i]) - want[i];
        num += d * d;
        den += want[i] * want[i];
    }
    return std::sqrt(num / den);
}

// Runs conv2d on a compact input the way the model does (padded in and out),
// checks the output's border is zero, and returns the compact output.
// `init` is what the output holds before (for accumulate).
std::vector<float> run_conv(dimoo::vq::Conv2d &c, const std::vector<float> &x, int H, int W, ConvMode mode,
                            bool accumulate, float init = 0.0f) {
    if (mode == ConvMode::Up && c.up.empty()) dimoo::vq::prepare_upsample(c);
    int Ho = 0, Wo = 0;
    dimoo::vq::conv_out_size(mode, H, W, &Ho, &Wo);
    std::vector<float> xp(dimoo::vq::padded_rows(H, W) * c.cin, NAN);
    dimoo::vq::pad(x.data(), H, W, c.cin, xp.data());
    // Fresh outputs start as garbage, accumulated ones as a padded buffer.
    std::vector<float> op(dimoo::vq::padded_rows(Ho, Wo) * c.cout, accumulate ? init : NAN);
    if (accumulate) dimoo::vq::zero_border(op.data(), Ho, Wo, c.cout);
    dimoo::vq::conv2d(c, xp.data(), H, W, op.data(), mode, accumulate);
    std::vector<float> inner(size_t(Ho) * Wo * c.cout);
    dimoo::vq::unpad(op.data(), Ho, Wo, c.cout, inner.data());
    std::vector<float> check(op.size(), 0.0f);
    dimoo::vq::pad(inner.data(), Ho, Wo, c.cout, check.data());
    EXPECT_EQ(op, check) << "the border of the output is not zero";
    return inner;
}

// A conv with random weights; w in (cout, k, k, cin) as the model stores it.
dimoo::vq::Conv2d random_conv(int cin, int cout, int k, uint32_t seed) {
    dimoo::vq::Conv2d c;
    c.cin = cin, c.cout = cout, c.k = k;
    c.w = randn(size_t(cout) * k * k * cin, seed, 1.0f / std::sqrt(float(cin * k * k)));
    c.b = randn(size_t(cout), seed + 1, 0.1f);
    return c;
}

// The textbook convolution, channels last, on the (optionally upsampled)
// input with explicit per-side zero padding.
std::vector<double> naive_conv(const dimoo::vq::Conv2d &c, const std::vector<float> &x, int H, int W, ConvMode mode,
                               int *Ho_out, int *Wo_out) {
    std::vector<float> in = x;
    int Hi = H, Wi = W;
    if (mode == ConvMode::Up) { // nearest x2
        Hi = 2 * H, Wi = 2 * W;
        in.assign(size_t(Hi) * Wi * c.cin, 0.f);
        for (int y = 0; y < Hi; y++)
            for (int xx = 0; xx < Wi; xx++)
                for (int ci = 0; ci < c.cin; ci++)
                    in[(size_t(y) * Wi + xx) * c.cin + ci] = x[(size_t(y / 2) * W + xx / 2) * c.cin + ci];
    }
    const int pt = mode == ConvMode::Down ? 0 : c.k / 2, pb = mode == ConvMode::Down ? 1 : c.k / 2;
    const int stride = mode == ConvMode::Down ? 2 : 1;
    const int Ho = (Hi + pt + pb - c.k) / stride + 1, Wo = (Wi + pt + pb - c.k) / stride + 1;
    std::vector<double> out(size_t(Ho) * Wo * c.cout);
    for (int oy = 0; oy < Ho; oy++)
        for (int ox = 0; ox < Wo; ox++)
            for (int co = 0; co < c.cout; co++) {
                double s = c.b[size_t(co)];
                for (int ky = 0; ky < c.k; ky++)
                    for (int kx = 0; kx < c.k; kx++) {
                        const int iy = oy * stride + ky - pt, ix = ox * stride + kx - pt;
                        if (iy < 0 || iy >= Hi || ix < 0 || ix >= Wi) continue;
                        for (int ci = 0; ci < c.cin; ci++)
                            s += double(c.w[((size_t(co) * c.k + ky) * c.k + kx) * c.cin + ci]) *
                                 in[(size_t(iy) * Wi + ix) * c.cin + ci];
                    }
                out[(size_t(oy) * Wo + ox) * c.cout + co] = s;
            }
    *Ho_out = Ho, *Wo_out = Wo;
    return out;
}

// GroupNorm (+SiLU) of n rows of C channels, in double.
std::vector<double> naive_group_norm(const dimoo::vq::GroupNorm &g, const std::vector<float> &x, int64_t n,
                                     bool silu) {
    const int C = g.c, cg = g.c / g.groups;
    std::vector<double> out(x.size());
    for (int gi = 0; gi < g.groups; gi++) {
        double m = 0, q = 0;
        for (int64_t r = 0; r < n; r++)
            for (int c = gi * cg; c < (gi + 1) * cg; c++) m += x[size_t(r) * C + c];
        m /= double(n * cg);
        for (int64_t r = 0; r < n; r++)
            for (int c = gi * cg; c < (gi + 1) * cg; c++) q += std::pow(x[size_t(r) * C + c] - m, 2);
        const double rstd = 1.0 / std::sqrt(q / double(n * cg) + double(g.eps));
        for (int64_t r = 0; r < n; r++)
            for (int c = gi * cg; c < (gi + 1) * cg; c++) {
                double v = (x[size_t(r) * C + c] - m) * rstd * g.gamma[size_t(c)] + g.beta[size_t(c)];
                if (silu) v = v / (1.0 + std::exp(-v));
                out[size_t(r) * C + c] = v;
            }
    }
    return out;
}

struct ConvCase {
    int cin, cout, k, H, W;
    ConvMode mode;
};

TEST(VQOps, ConvMatchesNaive) {
    const ConvCase cases[] = {
        {3, 16, 3, 9, 7, ConvMode::Same},  {16, 8, 3, 5, 6, ConvMode::Same},  {24, 40, 1, 7, 5, ConvMode::Same},
        {8, 8, 3, 8, 6, ConvMode::Down},   {5, 7, 3, 10, 4, ConvMode::Down},  {8, 12, 3, 3, 5, ConvMode::Up},
        {33, 17, 3, 4, 4, ConvMode::Up},   {64, 48, 3, 12, 11, ConvMode::Same}, {16, 16, 3, 1, 1, ConvMode::Same},
        {16, 8, 3, 1, 2, ConvMode::Up},    {8, 8, 3, 2, 2, ConvMode::Down},   {9, 11, 3, 2, 1, ConvMode::Same},
        {3, 5, 3, 1, 1, ConvMode::Same},   {4, 4, 1, 1, 1, ConvMode::Same},
    };
    uint32_t seed = 1;
    for (const auto &cc : cases) {
        auto c = random_conv(cc.cin, cc.cout, cc.k, seed++);
        auto x = randn(size_t(cc.H) * cc.W * cc.cin, seed++);
        int Ho = 0, Wo = 0;
        auto want = naive_conv(c, x, cc.H, cc.W, cc.mode, &Ho, &Wo);
        int ho = 0, wo = 0;
        dimoo::vq::conv_out_size(cc.mode, cc.H, cc.W, &ho, &wo);
        ASSERT_EQ(ho, Ho);
        ASSERT_EQ(wo, Wo);
        auto got = run_conv(c, x, cc.H, cc.W, cc.mode, false);
        EXPECT_LT(rel_err(got, want), 1e-6) << "cin " << cc.cin << " k " << cc.k << " mode " << int(cc.mode);
        if (cc.mode != ConvMode::Same) continue;
        // accumulate adds the conv to what is there
        auto acc = run_conv(c, x, cc.H, cc.W, cc.mode, true, 1.0f);
        for (auto &v : want) v += 1.0;
        EXPECT_LT(rel_err(acc, want), 1e-6);
    }
}

// Large enough that the GEMMs run in several blocks of rows. The 3x3 ones
// with F(2x2, 3x3), which this grid would otherwise leave for F(4x4, 3x3).
TEST(VQOps, ConvChunked) {
    struct Reset {
        ~Reset() { dimoo::vq::set_winograd_tile(0); }
    } reset;
    dimoo::vq::set_winograd_tile(2);
    auto c = random_conv(96, 64, 3, 7);
    const int H = 70, W = 90;
    auto x = randn(size_t(H) * W * c.cin, 8);
    int Ho = 0, Wo = 0;
    auto want = naive_conv(c, x, H, W, ConvMode::Up, &Ho, &Wo);
    auto got = run_conv(c, x, H, W, ConvMode::Up, false);
    EXPECT_LT(rel_err(got, want), 1e-6);
    auto same = naive_conv(c, x, H, W, ConvMode::Same, &Ho, &Wo);
    EXPECT_LT(rel_err(run_conv(c, x, H, W, ConvMode::Same, false), same), 1e-6);
    auto d = random_conv(512, 16, 3, 9);
    auto xd = randn(size_t(H) * W * d.cin, 10);
    auto down = naive_conv(d, xd, H, W, ConvMode::Down, &Ho, &Wo);
    EXPECT_LT(rel_err(run_conv(d, xd, H, W, ConvMode::Down, false), down), 1e-6);
    auto dsame = naive_conv(d, xd, H, W, ConvMode::Same, &Ho, &Wo); // Winograd in two chunks of tiles
    EXPECT_LT(rel_err(run_conv(d, xd, H, W, ConvMode::Same, false), dsame), 1e-6);
}

// A Scratch hands a released block to the next request of 1 to 2 times its
// size on the same thread; a larger request releases the free blocks; a
// nested Scratch shares the pool; an activation may outlive its Scratch;
// another thread's activations are not pooled.
TEST(VQOps, ScratchReusesReleasedActivations) {
    using dimoo::vq::activation;
    EXPECT_EQ(activation(16).get_deleter().pool, nullptr); // no Scratch: plain blocks
    dimoo::vq::Activation outlives;
    {
        const dimoo::vq::Scratch scratch;
        auto a = activation(1000);
        ASSERT_NE(a.get_deleter().pool, nullptr);
        float *pa = a.get();
        a.reset();
        auto b = activation(600); // fits the released block
        EXPECT_EQ(b.get(), pa);
        EXPECT_EQ(b.get_deleter().capacity, 1000u);
        b.reset();
        // Less than half of it: a block of its own (the free one is released,
        // so malloc may well return the same address).
        auto c = activation(400);
        EXPECT_EQ(c.get_deleter().capacity, 400u);
        float *pc = c.get();
        const auto pool = c.get_deleter().pool;
        c.reset();
        {
            const dimoo::vq::Scratch nested;
            auto d = activation(300);
            EXPECT_EQ(d.get(), pc);
            EXPECT_EQ(d.get_deleter().capacity, 400u);
            EXPECT_EQ(d.get_deleter().pool, pool);
        }
        std::thread([] { EXPECT_EQ(activation(16).get_deleter().pool, nullptr); }).join();
        outlives = activation(500);
        outlives[499] = 1.0f;
    }
    EXPECT_EQ(outlives[499], 1.0f); // still valid; freed with its pool below
    outlives.reset();
    EXPECT_EQ(activation(16).get_deleter().pool, nullptr);
}

// F(4x4, 3x3), forced on for small grids too: partial tiles on every side,
// accumulation, (512 in, 16 out on 100x90) two chunks of tiles, and the
// upsampling conv read from the input in place (odd sides: partial tiles).
// Its transforms round more than F(2x2, 3x3)'s: 1e-5 here, measured 1e-6 to 3e-6.
TEST(VQOps, ConvWinograd4MatchesNaive) {
    struct Reset {
        ~Reset() { dimoo::vq::set_winograd_tile(0); }
    } reset;
    dimoo::vq::set_winograd_tile(4);
    const ConvCase cases[] = {
        {8, 8, 3, 1, 1, ConvMode::Same},    {16, 8, 3, 5, 6, ConvMode::Same},  {9, 11, 3, 4, 4, ConvMode::Same},
        {64, 48, 3, 13, 10, ConvMode::Same}, {256, 32, 3, 9, 7, ConvMode::Same}, {512, 16, 3, 100, 90, ConvMode::Same},
        {8, 12, 3, 3, 5, ConvMode::Up},     {33, 17, 3, 4, 4, ConvMode::Up},    {16, 8, 3, 1, 2, ConvMode::Up},
        {96, 64, 3, 35, 41, ConvMode::Up},
    };
    uint32_t seed = 101;
    for (const auto &cc : cases) {
        auto c = random_conv(cc.cin, cc.cout, cc.k, seed++);
        auto x = randn(size_t(cc.H) * cc.W * cc.cin, seed++);
        int Ho = 0, Wo = 0;
        auto want = naive_conv(c, x, cc.H, cc.W, cc.mode, &Ho, &Wo);
        const auto got = run_conv(c, x, cc.H, cc.W, cc.mode, false);
        EXPECT_LT(rel_err(got, want), 1e-5) << "cin " << cc.cin << " " << cc.H << "x" << cc.W;
        dimoo::vq::set_winograd_tile(2); // the knob picks another path: other roundings
        EXPECT_NE(run_conv(c, x, cc.H, cc.W, cc.mode, false), got);
        dimoo::vq::set_winograd_tile(4);
        if (cc.mode != ConvMode::Same) continue;
        auto acc = run_conv(c, x, cc.H, cc.W, cc.mode, true, 1.0f);
        for (auto &v : want) v += 1.0;
        EXPECT_LT(rel_err(acc, want), 1e-5);
    }
    EXPECT_THROW(dimoo::vq::set_winograd_tile(3), dimoo::Error);
}

TEST(VQOps, GroupNormMatchesNaive) {
    for (int silu = 0; silu < 2; silu++) {
        dimoo::vq::GroupNorm g;
        g.c = 48, g.groups = 6, g.eps = 1e-6f;
        g.gamma = randn(48, 3, 1.0f);
        g.beta = randn(48, 4, 1.0f);
        const int64_t n = 333; // 9 x 37
        auto x = randn(size_t(n) * 48, 5, 2.0f);
        for (auto &v : x) v += 3.0f; // a mean far from 0
        auto want = naive_group_norm(g, x, n, silu != 0);
        // as an image of 9 x 37 pixels
        std::vector<float> xp(dimoo::vq::padded_rows(9, 37) * 48), op(xp.size(), NAN), got(x.size());
        dimoo::vq::pad(x.data(), 9, 37, 48, xp.data());
        dimoo::vq::group_norm(g, xp.data(), 9, 37, op.data(), silu != 0);
        dimoo::vq::unpad(op.data(), 9, 37, 48, got.data());
        EXPECT_LT(rel_err(got, want), 1e-6);
        std::vector<float> check(op.size(), 0.f);
        dimoo::vq::pad(got.data(), 9, 37, 48, check.data());
        EXPECT_EQ(op, check) << "border not zero";
        dimoo::vq::group_norm(g, xp.data(), 9, 37, xp.data(), silu != 0); // in place
        EXPECT_EQ(xp, op);
    }
}

TEST(VQOps, SiluExtremes) {
    std::vector<float> x = {-1000.f, -100.f, -88.f, -20.f, -1.f, 0.f, 1e-8f, 1.f, 20.f, 100.f, 1000.f};
    std::vector<double> want;
    for (float v : x) want.push_back(double(v) / (1.0 + std::exp(-double(v))));
    dimoo::vq::silu_inplace(x.data(), int64_t(x.size()));
    for (size_t i = 0; i < x.size(); i++) {
        EXPECT_TRUE(std::isfinite(x[i]));
        EXPECT_NEAR(x[i], want[i], 1e-6 * std::max(1.0, std::abs(want[i]))) << i;
    }
}

TEST(VQOps, AttentionMatchesNaive) {
    const int C = 32, n = 45;
    dimoo::vq::Attention a;
    a.norm.c = C, a.norm.groups = 8, a.norm.eps = 1e-6f;
    a.norm.gamma = randn(C, 1, 1.0f);
    a.norm.beta = randn(C, 2, 0.5f);
    dimoo::vq::Linear *ls[] = {&a.q, &a.k, &a.v, &a.o};
    uint32_t seed = 10;
    for (auto *l : ls) {
        l->in = l->out = C;
        l->w = randn(size_t(C) * C, seed++, 0.4f);
        l->b = randn(size_t(C), seed++, 0.1f);
    }
    auto x = randn(size_t(n) * C, 99);
    // naive
    auto proj = [&](const dimoo::vq::Linear &l, const std::vector<double> &in) {
        std::vector<double> out(size_t(n) * C);
        for (int i = 0; i < n; i++)
            for (int o = 0; o < C; o++) {
                double s = l.b[size_t(o)];
                for (int c = 0; c < C; c++) s += double(l.w[size_t(o) * C + c]) * in[size_t(i) * C + c];
                out[size_t(i) * C + o] = s;
            }
        return out;
    };
    auto h = naive_group_norm(a.norm, x, n, false);
    auto q = proj(a.q, h), k = proj(a.k, h), v = proj(a.v, h);
    std::vector<double> att(size_t(n) * C, 0.0);
    for (int i = 0; i < n; i++) {
        std::vector<double> p(static_cast<size_t>(n));
        double mx = -1e300, sum = 0;
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int c = 0; c < C; c++) s += q[size_t(i) * C + c] * k[size_t(j) * C + c];
            p[size_t(j)] = s / std::sqrt(double(C));
            mx = std::max(mx, p[size_t(j)]);
        }
        for (auto &t : p) sum += (t = std::exp(t - mx));
        for (int j = 0; j < n; j++)
            for (int c = 0; c < C; c++) att[size_t(i) * C + c] += p[size_t(j)] / sum * v[size_t(j) * C + c];
    }
    auto want = proj(a.o, att);
    for (size_t i = 0; i < want.size(); i++) want[i] += x[i];
    std::vector<float> got(x.size());
    dimoo::vq::attention(a, x.data(), n, got.data());
    EXPECT_LT(rel_err(got, want), 1e-5);
}

// ---- the C ABI ---------------------------------------------------------------------------

dimoo_vq_config small_config() {
    dimoo_vq_config c{};
    c.in_channels = 3;
    c.out_channels = 3;
    c.latent_channels = 4;
    c.num_vq_embeddings = 20;
    c.vq_embed_dim = 5;
    c.norm_num_groups = 4;
    c.layers_per_block = 1;
    c.n_levels = 3;
    c.block_out_channels[0] = 8;
    c.block_out_channels[1] = 16;
    c.block_out_channels[2] = 16;
    c.mid_block_add_attention = 1;
    c.norm_type = DIMOO_VQ_NORM_GROUP;
    return c;
}

struct VQFixture : ::testing::Test {
    dimoo_runtime *rt = nullptr;
    dimoo_vq *vq = nullptr;
    dimoo_vq_config cfg = small_config();
    void SetUp() override {
        char err[256];
        ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 2, &rt, err, sizeof err), DIMOO_OK) << err;
        ASSERT_EQ(dimoo_vq_create(rt, &cfg, &vq, err, sizeof err), DIMOO_OK) << err;
    }
    void TearDown() override {
        dimoo_vq_destroy(vq);
        dimoo_runtime_destroy(rt);
    }
    // Every tensor of the config, random, in dtype dt.
    void load_all(int32_t dt = DIMOO_F32) {
        uint32_t seed = 1;
        for (const auto &name : vq_names()) {
            auto shape = impl()->weight_shape(name);
            size_t n = 1;
            for (auto d : shape) n *= size_t(d);
            auto v = randn(n, seed++, 0.3f);
            std::vector<uint16_t> h(n);
            const void *data = v.data();
            uint64_t nbytes = n * 4;
            if (dt != DIMOO_F32) {
                for (size_t i = 0; i < n; i++) h[i] = dt == DIMOO_F16 ? dimoo::f32_to_f16(v[i]) : dimoo::f32_to_bf16(v[i]);
                data = h.data(), nbytes = n * 2;
            }
            ASSERT_EQ(dimoo_vq_set_weight(vq, name.c_str(), dt, shape.data(), int32_t(shape.size()), data, nbytes),
                      DIMOO_OK)
                << dimoo_vq_error(vq);
        }
    }
    // The model behind the handle: a fresh one with the same config lists
    // the names and shapes (the handle's layout is private to vq_api.cpp).
    dimoo::vq::Model *impl() {
        if (!shadow) shadow = std::make_unique<dimoo::vq::Model>(cfg);
        return shadow.get();
    }
    std::vector<std::string> vq_names() { return impl()->weight_names(); }
    std::unique_ptr<dimoo::vq::Model> shadow;
};

TEST_F(VQFixture, CreateRejectsBadConfigs) {
    char err[256];
    dimoo_vq *out = reinterpret_cast<dimoo_vq *>(1);
    auto bad = [&](dimoo_vq_config c, int32_t want, const char *msg) {
        err[0] = 0;
        EXPECT_EQ(dimoo_vq_create(rt, &c, &out, err, sizeof err), want) << msg;
        EXPECT_EQ(out, nullptr);
        EXPECT_NE(std::string(err).find(msg), std::string::npos) << err;
    };
    auto c = small_config();
    c.norm_type = DIMOO_VQ_NORM_SPATIAL;
    bad(c, DIMOO_ERR_UNSUPPORTED, "spatial");
    c = small_config();
    c.norm_num_groups = 3;
    bad(c, DIMOO_ERR_INVALID_ARGUMENT, "block_out_channels[0] = 8 is not a multiple of norm_num_groups 3");
    c = small_config();
    c.n_levels = 9;
    bad(c, DIMOO_ERR_INVALID_ARGUMENT, "n_levels");
    c = small_config();
    c.n_levels = 0;
    bad(c, DIMOO_ERR_INVALID_ARGUMENT, "n_levels");
    c = small_config();
    c.block_out_channels[2] = 0;
    bad(c, DIMOO_ERR_INVALID_ARGUMENT, "block_out_channels[2]");
    c = small_config();
    c.num_vq_embeddings = 0;
    bad(c, DIMOO_ERR_INVALID_ARGUMENT, "num_vq_embeddings");
    c = small_config();
    c.mid_block_add_attention = 2;
    bad(c, DIMOO_ERR_INVALID_ARGUMENT, "mid_block_add_attention");
    EXPECT_EQ(dimoo_vq_create(rt, nullptr, &out, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_create(nullptr, &cfg, &out, nullptr, 0), DIMOO_ERR_INVALID_ARGUMENT);
}

TEST_F(VQFixture, SetWeightErrors) {
    std::vector<float> w(16 * 8 * 9);
    int64_t shape[] = {16, 8, 3, 3};
    const char *name = "encoder.down_blocks.1.resnets.0.conv1.weight";
    EXPECT_EQ(dimoo_vq_set_weight(vq, name, DIMOO_F32, shape, 4, w.data(), w.size() * 4), DIMOO_OK);
    EXPECT_EQ(dimoo_vq_set_weight(vq, "encoder.down_blocks.7.resnets.0.conv1.weight", DIMOO_F32, shape, 4, w.data(),
                                  w.size() * 4),
              DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_vq_error(vq)).find("not a tensor of this VQ model config"), std::string::npos);
    int64_t wrong[] = {16, 8, 1, 1};
    EXPECT_EQ(dimoo_vq_set_weight(vq, name, DIMOO_F32, wrong, 4, w.data(), 16 * 8 * 4), DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_vq_error(vq)).find("shape (16, 8, 1, 1) but the config implies (16, 8, 3, 3)"),
              std::string::npos)
        << dimoo_vq_error(vq);
    EXPECT_EQ(dimoo_vq_set_weight(vq, name, DIMOO_F32, shape, 4, w.data(), 10), DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_EQ(dimoo_vq_set_weight(vq, name, 7, shape, 4, w.data(), w.size() * 4), DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_EQ(dimoo_vq_set_weight(vq, name, DIMOO_F32, shape, -1, w.data(), 0), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_set_weight(vq, nullptr, DIMOO_F32, shape, 4, w.data(), 0), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_set_weight(nullptr, name, DIMOO_F32, shape, 4, w.data(), 0), DIMOO_ERR_INVALID_ARGUMENT);
    // Not everything is there.
    EXPECT_EQ(dimoo_vq_finalize(vq), DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_vq_error(vq)).find("missing: encoder.conv_in.weight"), std::string::npos)
        << dimoo_vq_error(vq);
    std::vector<int32_t> codes(4, 0);
    std::vector<float> out(3 * 16 * 16);
    EXPECT_EQ(dimoo_vq_decode(vq, codes.data(), 2, 2, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(dimoo_vq_error(vq)).find("not finalized"), std::string::npos);
}

TEST_F(VQFixture, DecodeEncodeChecks) {
    load_all();
    ASSERT_EQ(dimoo_vq_finalize(vq), DIMOO_OK) << dimoo_vq_error(vq);
    EXPECT_EQ(dimoo_vq_finalize(vq), DIMOO_OK); // idempotent
    EXPECT_GT(dimoo_vq_weight_bytes(vq), 0);
    // Weights are frozen now.
    std::vector<float> b(8);
    int64_t bs[] = {8};
    EXPECT_EQ(dimoo_vq_set_weight(vq, "encoder.conv_in.bias", DIMOO_F32, bs, 1, b.data(), 32),
              DIMOO_ERR_INVALID_ARGUMENT);

    const int h = 3, w = 5, f = 4;
    std::vector<int32_t> codes(h * w);
    for (int i = 0; i < h * w; i++) codes[size_t(i)] = i % 20;
    std::vector<float> out(size_t(3) * h * f * w * f, NAN);
    ASSERT_EQ(dimoo_vq_decode(vq, codes.data(), h, w, out.data()), DIMOO_OK) << dimoo_vq_error(vq);
    for (float v : out) ASSERT_TRUE(std::isfinite(v));
    codes[7] = 20;
    EXPECT_EQ(dimoo_vq_decode(vq, codes.data(), h, w, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(dimoo_vq_error(vq)).find("code 20 at row 1, column 2 is outside the codebook [0, 20)"),
              std::string::npos)
        << dimoo_vq_error(vq);
    codes[7] = -3;
    EXPECT_EQ(dimoo_vq_decode(vq, codes.data(), h, w, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_decode(vq, codes.data(), 0, w, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_decode(vq, codes.data(), 1 << 14, 1 << 14, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_decode(vq, nullptr, h, w, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_decode(nullptr, codes.data(), h, w, out.data()), DIMOO_ERR_INVALID_ARGUMENT);

    // Encode: sides must be multiples of 4.
    const int H = 12, W = 8;
    auto pix = randn(size_t(H) * W * 3, 5, 0.3f);
    std::vector<int32_t> ecodes(size_t(H / f) * (W / f), -1);
    ASSERT_EQ(dimoo_vq_encode(vq, pix.data(), H, W, ecodes.data()), DIMOO_OK) << dimoo_vq_error(vq);
    for (int32_t c : ecodes) EXPECT_TRUE(c >= 0 && c < 20);
    EXPECT_EQ(dimoo_vq_encode(vq, pix.data(), 10, 8, ecodes.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(dimoo_vq_error(vq)).find("image 10x8 (height x width) is not a multiple"), std::string::npos)
        << dimoo_vq_error(vq);
    EXPECT_EQ(dimoo_vq_encode(vq, pix.data(), 12, 6, ecodes.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_encode(vq, pix.data(), -4, 8, ecodes.data()), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_vq_encode_latent(vq, pix.data(), 12, 6, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
    // The latent alone.
    std::vector<float> lat(size_t(H / f) * (W / f) * 5);
    ASSERT_EQ(dimoo_vq_encode_latent(vq, pix.data(), H, W, lat.data()), DIMOO_OK);
    EXPECT_EQ(std::string(dimoo_vq_error(vq)), "");
}

// An activation the host cannot hold (DIMOO_HOST_AVAILABLE_MB stands in for
// MemAvailable) ends the decode with OUT_OF_MEMORY and the numbers; the
// handle decodes again afterwards.
TEST_F(VQFixture, DecodeRefusedWhenMemoryIsShort) {
    // Without the mid-block attention, whose cost grows as the grid squared.
    dimoo_vq_destroy(vq);
    vq = nullptr;
    cfg.mid_block_add_attention = 0;
    shadow.reset();
    char err[256];
    ASSERT_EQ(dimoo_vq_create(rt, &cfg, &vq, err, sizeof err), DIMOO_OK) << err;
    load_all();
    ASSERT_EQ(dimoo_vq_finalize(vq), DIMOO_OK) << dimoo_vq_error(vq);
    const int g = 184, f = 4; // 736x736 pixels of 8 channels: 17 MiB an activation
    std::vector<int32_t> codes(size_t(g) * g, 3);
    std::vector<float> out(size_t(3) * g * f * g * f);
    setenv("DIMOO_HOST_AVAILABLE_MB", "40", 1);
    const int32_t st = dimoo_vq_decode(vq, codes.data(), g, g, out.data());
    unsetenv("DIMOO_HOST_AVAILABLE_MB");
    EXPECT_EQ(st, DIMOO_ERR_OUT_OF_MEMORY);
    const std::string e = dimoo_vq_error(vq);
    EXPECT_NE(e.find("the VQ-VAE's activations needs "), std::string::npos) << e;
    EXPECT_NE(e.find(" MiB of host memory but 40 MiB are available (DIMOO_HOST_AVAILABLE_MB)"), std::string::npos) << e;
    EXPECT_EQ(dimoo_vq_decode(vq, codes.data(), 4, 4, out.data()), DIMOO_OK) << dimoo_vq_error(vq);
}

// Decodes and encodes take their activations from a Scratch. With every
// reused block poisoned (NaN), an op that read a buffer before writing it
// would change the result: it must equal the first call's bit for bit.
TEST_F(VQFixture, PoisonedScratchLeavesResults) {
    load_all();
    ASSERT_EQ(dimoo_vq_finalize(vq), DIMOO_OK) << dimoo_vq_error(vq);
    const int h = 6, w = 5, f = 4;
    std::vector<int32_t> codes(h * w);
    for (int i = 0; i < h * w; i++) codes[size_t(i)] = (7 * i) % 20;
    auto pix = randn(size_t(h * f) * (w * f) * 3, 11, 0.3f);
    auto run = [&](std::vector<float> &img, std::vector<int32_t> &enc) {
        img.assign(size_t(3) * h * f * w * f, 0.0f);
        enc.assign(size_t(h) * w, -1);
        ASSERT_EQ(dimoo_vq_decode(vq, codes.data(), h, w, img.data()), DIMOO_OK) << dimoo_vq_error(vq);
        ASSERT_EQ(dimoo_vq_encode(vq, pix.data(), h * f, w * f, enc.data()), DIMOO_OK) << dimoo_vq_error(vq);
    };
    std::vector<float> img0, img1;
    std::vector<int32_t> enc0, enc1;
    run(img0, enc0);
    dimoo::vq::set_scratch_poison(true);
    run(img1, enc1);
    dimoo::vq::set_scratch_poison(false);
    for (float v : img1) ASSERT_TRUE(std::isfinite(v));
    EXPECT_EQ(std::memcmp(img0.data(), img1.data(), img0.size() * sizeof(float)), 0);
    EXPECT_EQ(enc0, enc1);
}

// A whole decode and encode whose full-size level (64x64 pixels, 256 tiles of
// 4x4) takes F(4x4, 3x3) by default: within 1e-5 of the same with F(2x2, 3x3)
// everywhere (each within 1e-6 of a float64 convolution, VQOps tests).
TEST_F(VQFixture, Winograd4DecodeAgrees) {
    struct Reset {
        ~Reset() { dimoo::vq::set_winograd_tile(0); }
    } reset;
    load_all();
    ASSERT_EQ(dimoo_vq_finalize(vq), DIMOO_OK) << dimoo_vq_error(vq);
    const int h = 16, w = 16, f = 4;
    std::vector<int32_t> codes(h * w);
    for (int i = 0; i < h * w; i++) codes[size_t(i)] = (11 * i + 3) % 20;
    auto pix = randn(size_t(h * f) * (w * f) * 3, 12, 0.3f);
    std::vector<float> img[2], lat[2];
    const int tiles[2] = {0, 2};
    for (int t = 0; t < 2; t++) {
        dimoo::vq::set_winograd_tile(tiles[t]);
        img[t].assign(size_t(3) * h * f * w * f, 0.0f);
        lat[t].assign(size_t(h) * w * 5, 0.0f);
        ASSERT_EQ(dimoo_vq_decode(vq, codes.data(), h, w, img[t].data()), DIMOO_OK) << dimoo_vq_error(vq);
        ASSERT_EQ(dimoo_vq_encode_latent(vq, pix.data(), h * f, w * f, lat[t].data()), DIMOO_OK) << dimoo_vq_error(vq);
    }
    auto rel = [](const std::vector<float> &a, const std::vector<float> &b) {
        double num = 0, den = 0;
        for (size_t i = 0; i < a.size(); i++) {
            num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
            den += double(b[i]) * b[i];
        }
        return std::sqrt(num / den);
    };
    EXPECT_NE(img[0], img[1]); // the default took the other path somewhere
    EXPECT_LT(rel(img[0], img[1]), 1e-5);
    EXPECT_NE(lat[0], lat[1]);
    EXPECT_LT(rel(lat[0], lat[1]), 1e-5);
}

TEST_F(VQFixture, HalfWeightsLoad) {
    load_all(DIMOO_BF16);
    ASSERT_EQ(dimoo_vq_finalize(vq), DIMOO_OK) << dimoo_vq_error(vq);
}

TEST(VQOps, QuantizeNearestRowLowestOnTies) {
    dimoo_vq_config c = small_config();
    c.num_vq_embeddings = 300;
    c.vq_embed_dim = 7;
    dimoo::vq::Model m(c);
    auto cb = randn(300 * 7, 3);
    // Duplicate rows: a tie must go to the lower index.
    for (int d = 0; d < 7; d++) cb[size_t(250) * 7 + d] = cb[size_t(40) * 7 + d];
    m.set_weight("quantize.embedding.weight", DIMOO_F32, {300, 7}, cb.data(), cb.size() * 4);
    // Finalize needs every tensor: give the rest zeros.
    for (const auto &name : m.weight_names()) {
        if (name == "quantize.embedding.weight") continue;
        auto s = m.weight_shape(name);
        size_t n = 1;
        for (auto d : s) n *= size_t(d);
        std::vector<float> z(n, 0.f);
        m.set_weight(name, DIMOO_F32, s, z.data(), n * 4);
    }
    m.finalize();
    const int n = 500;
    auto x = randn(size_t(n) * 7, 4);
    for (int d = 0; d < 7; d++) x[d] = cb[size_t(250) * 7 + d]; // exactly on the duplicated row
    std::vector<int32_t> got(n);
    m.quantize(x.data(), n, got.data());
    EXPECT_EQ(got[0], 40);
    for (int i = 0; i < n; i++) {
        int best = 0;
        double bd = 1e300;
        for (int j = 0; j < 300; j++) {
            double s = 0;
            for (int d = 0; d < 7; d++) s += std::pow(double(x[size_t(i) * 7 + d]) - cb[size_t(j) * 7 + d], 2);
            if (s < bd) bd = s, best = j;
        }
        ASSERT_EQ(got[size_t(i)], best) << i;
    }
}

} // namespace
