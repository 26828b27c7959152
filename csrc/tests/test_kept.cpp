// test_kept.cpp - ABI 4's kept logits and decode steps on the CPU backend:
// the steps over kept rows equal dimoo_sample_image / the text sampler over
// the same rows on the host, ML-Cache's logit cache behaves as the header
// says, and every misuse is an error that names the problem.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/kept.h"
#include "dimoo.h"
#include "test_tensors.h"

namespace {

struct Kept : ::testing::Test {
    dimoo_runtime *rt = nullptr;
    dimoo_model *m = nullptr;
    dimoo_ctx *ctx = nullptr;
    dimoo_model_config cfg{};
    static constexpr int kMax = 40;

    void SetUp() override {
        cfg.d_model = 32;
        cfg.n_layers = 2;
        cfg.n_heads = 4;
        cfg.n_kv_heads = 2;
        cfg.mlp_hidden_size = 48;
        cfg.vocab_size = 60;
        cfg.embedding_size = 64;
        cfg.max_sequence_length = 128;
        cfg.rope_theta = 10000.f;
        cfg.rms_norm_eps = 1e-5f;
        char err[256];
        ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 2, &rt, err, sizeof err), DIMOO_OK) << err;
        ASSERT_EQ(dimoo_model_create(rt, &cfg, &m, err, sizeof err), DIMOO_OK) << err;
        std::mt19937 rng(11);
        std::normal_distribution<float> nd(0.f, 1.f);
        const auto t = dimoo::test::checkpoint_tensors(cfg);
        for (const auto &[name, shape] : t) {
            size_t n = 1;
            for (auto s : shape) n *= size_t(s);
            // Large weights: peaked logits, so decisions are not all ties.
            std::vector<float> v(n);
            for (auto &x : v) x = shape.size() == 1 ? 1.f + 0.1f * nd(rng) : 3.f * nd(rng) / std::sqrt(float(shape[1]));
            ASSERT_EQ(dimoo_model_set_weight(m, name.c_str(), DIMOO_F32, shape.data(), int32_t(shape.size()), v.data(),
                                             n * 4),
                      DIMOO_OK)
                << dimoo_model_error(m);
        }
        ASSERT_EQ(dimoo_model_finalize(m), DIMOO_OK) << dimoo_model_error(m);
    }
    void TearDown() override {
        dimoo_ctx_destroy(ctx);
        dimoo_model_destroy(m);
        dimoo_runtime_destroy(rt);
    }
    void make_ctx(int n_seqs, int keep_rows, int keep_cols, int flags = DIMOO_CTX_KV_CACHE) {
        dimoo_ctx_params p{n_seqs, kMax, flags, keep_rows, keep_cols};
        char err[256];
        ASSERT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_OK) << err;
    }
    std::string err() const { return dimoo_ctx_error(ctx); }
    static std::vector<int32_t> tokens(int n, int salt) {
        std::vector<int32_t> t(n);
        for (int i = 0; i < n; i++) t[i] = (i * 7 + salt * 13 + 3) % 60;
        return t;
    }
};

dimoo_forward_args fwd(int seq, const std::vector<int32_t> &toks, int mode, int vb, int ve) {
    dimoo_forward_args a{};
    a.seq = seq;
    a.n_tokens = int32_t(toks.size());
    a.tokens = toks.data();
    a.cache_mode = mode;
    a.vocab_begin = vb;
    a.vocab_end = ve;
    return a;
}

// Image steps over kept rows equal dimoo_sample_image over host copies of
// the same rows, for n_select 0 and k, with branches of different offsets,
// after a STORE and after a USE that recomputes some rows (ML-Cache).
TEST_F(Kept, ImageStepEqualsHostSampler) {
    const int vb = 20, ve = 52, C = ve - vb; // 32 "codes"
    make_ctx(3, 0, C);
    const int P[3] = {6, 3, 9}, A = 24; // prefix lengths, answer length
    std::vector<std::vector<int32_t>> toks(3);
    std::vector<std::vector<float>> host(3); // every position's row, as kept
    for (int b = 0; b < 3; b++) {
        toks[b] = tokens(P[b] + A, b);
        host[b].assign(size_t(P[b] + A) * C, NAN);
        auto a = fwd(b, toks[b], DIMOO_CACHE_STORE, vb, ve);
        a.keep = 1;
        a.logits = host[b].data(); // a host copy as well
        ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << err();
    }
    auto compare = [&](int step, float tau, std::vector<int32_t> masked, int n_select) {
        const int n = int(masked.size());
        dimoo_image_step_args s{};
        s.n_branches = 3;
        const float w[3] = {2.5f, -1.f, -0.5f};
        for (int b = 0; b < 3; b++) s.seqs[b] = b, s.offsets[b] = P[b], s.weights[b] = w[b];
        s.n_pos = n;
        s.masked = masked.data();
        s.step = step;
        s.seed = 77;
        s.temperature = tau;
        s.n_select = n_select;
        std::vector<int32_t> sel(std::max(n_select, 1), -7), codes(n, -7);
        std::vector<double> conf(n, NAN);
        s.out_selected = sel.data();
        s.out_codes = codes.data();
        s.out_conf = conf.data();
        ASSERT_EQ(dimoo_image_step(ctx, &s), DIMOO_OK) << err();

        dimoo_sample_args h{};
        h.n_pos = n;
        h.n_branches = 3;
        h.n_codes = C;
        h.step = step;
        h.seed = 77;
        h.temperature = tau;
        std::vector<std::vector<int32_t>> rows(3, std::vector<int32_t>(n));
        std::vector<int32_t> rng(n), hc(n), hsel(std::max(n_select, 1));
        std::vector<double> hconf(n);
        for (int b = 0; b < 3; b++) {
            h.weights[b] = w[b];
            h.logits[b] = host[b].data();
            for (int i = 0; i < n; i++) rows[b][i] = P[b] + masked[i];
            h.rows[b] = rows[b].data();
            h.n_rows[b] = P[b] + A;
        }
        for (int i = 0; i < n; i++) rng[i] = P[0] + masked[i];
        h.rng_pos = rng.data();
        h.out_codes = hc.data();
        h.out_conf = hconf.data();
        h.n_select = n_select;
        h.out_selected = hsel.data();
        ASSERT_EQ(dimoo_sample_image(rt, &h), DIMOO_OK) << dimoo_runtime_error(rt);
        if (n_select == 0) {
            EXPECT_EQ(codes, hc);
            for (int i = 0; i < n; i++) EXPECT_EQ(conf[i], hconf[i]) << i;
        } else {
            for (int j = 0; j < n_select; j++) {
                EXPECT_EQ(sel[j], hsel[j]) << j;
                EXPECT_EQ(codes[j], hc[hsel[j]]) << j;
                EXPECT_EQ(conf[j], hconf[hsel[j]]) << j;
            }
        }
    };
    std::vector<int32_t> all(A), some;
    std::iota(all.begin(), all.end(), 0);
    for (int i = 0; i < A; i += 3) some.push_back(i);
    for (float tau : {0.f, 1.f}) {
        compare(0, tau, all, 0);
        compare(1, tau, all, 5);
        compare(2, tau, some, 3);
    }
    // ML-Cache USE: a few rows of each branch recomputed (new tokens there);
    // the others keep the STORE's logits.
    for (int b = 0; b < 3; b++) {
        std::vector<int32_t> compute = {1, P[b] + 2, P[b] + 5, P[b] + A - 1};
        for (int p : compute) toks[b][p] = (toks[b][p] + 11) % 60;
        std::vector<float> out(compute.size() * C, NAN);
        auto a = fwd(b, toks[b], DIMOO_CACHE_USE, vb, ve);
        a.n_compute = int32_t(compute.size());
        a.compute = compute.data();
        a.n_out = a.n_compute;
        a.out_positions = compute.data();
        a.keep = 1;
        a.logits = out.data();
        ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << err();
        for (size_t i = 0; i < compute.size(); i++)
            std::copy(out.begin() + i * C, out.begin() + (i + 1) * C, host[b].begin() + size_t(compute[i]) * C);
    }
    for (float tau : {0.f, 1.f}) {
        compare(3, tau, all, 7);
        compare(4, tau, some, 0);
    }
}

// Text steps equal the host statement of the sampler (cpu::text_pick and a
// stable sort), guided and not, with a token mask.
TEST_F(Kept, TextStepEqualsHostSampler) {
    const int V = cfg.embedding_size;
    make_ctx(2, 8, V, 0);
    auto cond = tokens(30, 1), unc = tokens(30, 2);
    std::vector<int32_t> pos = {20, 21, 23, 24, 27, 29};
    std::vector<float> hc(pos.size() * V), hu(pos.size() * V);
    for (int s = 0; s < 2; s++) {
        auto a = fwd(s, s ? unc : cond, DIMOO_CACHE_NONE, 0, 0);
        a.keep = 1;
        a.n_out = int32_t(pos.size());
        a.out_positions = pos.data();
        a.logits = s ? hu.data() : hc.data();
        ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << err();
    }
    std::vector<uint8_t> mask(50);
    for (int v = 0; v < 50; v++) mask[v] = v % 4 != 0;
    ASSERT_EQ(dimoo_ctx_set_token_mask(ctx, mask.data(), int32_t(mask.size())), DIMOO_OK) << err();
    for (int guided = 0; guided < 2; guided++)
        for (int use_mask = 0; use_mask < 2; use_mask++)
            for (double tau : {0.0, 0.7}) {
                dimoo_text_step_args a{};
                a.seq = 0;
                a.uncond_seq = guided ? 1 : -1;
                a.cfg_scale = 1.5;
                a.temperature = tau;
                a.step = 5;
                a.seed = 3;
                a.use_mask = use_mask;
                a.n_pos = int32_t(pos.size());
                a.positions = pos.data();
                a.n_select = 3;
                std::vector<int32_t> op(3, -1), ot(3, -1), all(pos.size(), -1);
                a.out_positions = op.data();
                a.out_tokens = ot.data();
                a.out_all_tokens = all.data();
                ASSERT_EQ(dimoo_text_step(ctx, &a), DIMOO_OK) << err();
                std::vector<int32_t> want(pos.size());
                std::vector<double> conf(pos.size());
                for (size_t i = 0; i < pos.size(); i++)
                    want[i] = dimoo::cpu::text_pick(hc.data() + i * V, guided ? hu.data() + i * V : nullptr, V, 0, 1.5,
                                                    tau, 3, 5, pos[i], use_mask ? mask.data() : nullptr, 50, &conf[i]);
                EXPECT_EQ(all, want);
                for (int32_t t : all)
                    if (use_mask) EXPECT_TRUE(t < 50 && mask[t]) << t;
                std::vector<int> order(pos.size());
                std::iota(order.begin(), order.end(), 0);
                std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return conf[x] > conf[y]; });
                order.resize(3);
                std::sort(order.begin(), order.end());
                for (int j = 0; j < 3; j++) {
                    EXPECT_EQ(op[j], pos[order[j]]);
                    EXPECT_EQ(ot[j], want[order[j]]);
                }
            }
}

// The cache selection is the quantile rule over the kept row maxima.
TEST_F(Kept, CacheSelectIsTheQuantileRule) {
    make_ctx(1, 0, 40);
    auto t = tokens(33, 4);
    std::vector<float> out(33 * 40), mx(33);
    auto a = fwd(0, t, DIMOO_CACHE_STORE, 10, 50);
    a.keep = 1;
    a.logits = out.data();
    a.row_max = mx.data();
    ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << err();
    for (double q : {0.0, 0.1, 0.5, 0.73, 1.0}) {
        std::vector<int32_t> sel(33, -1);
        int32_t n = -1;
        ASSERT_EQ(dimoo_cache_select(ctx, 0, 33, q, sel.data(), &n), DIMOO_OK) << err();
        std::vector<float> s = mx;
        std::sort(s.begin(), s.end());
        const float rank = float(q) * 32.f;
        const int lo = int(rank), hi = std::min(lo + 1, 32);
        const float w = rank - float(lo);
        const float thr = w < 0.5f ? s[lo] + w * (s[hi] - s[lo]) : s[hi] - (s[hi] - s[lo]) * (1 - w);
        std::vector<int32_t> want;
        for (int p = 0; p < 33; p++)
            if (mx[p] <= thr) want.push_back(p);
        EXPECT_EQ(std::vector<int32_t>(sel.begin(), sel.begin() + n), want) << q;
    }
}

// Misuse is an error naming the problem; a failed forward forgets kept rows.
TEST_F(Kept, ErrorsNameTheProblem) {
    auto t = tokens(10, 5);
    // No kept logits in this context.
    make_ctx(2, 0, 0);
    auto a = fwd(0, t, DIMOO_CACHE_NONE, 0, 16);
    a.keep = 1;
    EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("keep_cols"), std::string::npos) << err();
    std::vector<int32_t> masked = {0};
    dimoo_image_step_args s{};
    s.n_branches = 1;
    s.n_pos = 1;
    s.masked = masked.data();
    int32_t code = 0;
    s.out_codes = &code;
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("keep_cols"), std::string::npos) << err();
    dimoo_ctx_destroy(ctx);
    ctx = nullptr;

    make_ctx(2, 4, 16); // 64 floats a seq: 4 rows of 16, 2 of 32
    a.keep = 1;
    a.vocab_end = 17; // wider than keep_cols
    EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("keep_cols"), std::string::npos) << err();
    a.vocab_end = 16; // 10 rows of 16 do not fit in 64 floats
    EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("kept rows"), std::string::npos) << err();
    std::vector<int32_t> out4 = {2, 3, 4, 5};
    a.n_out = 4;
    a.out_positions = out4.data();
    ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << err();
    // A row never kept.
    s.seqs[0] = 0;
    masked = {7};
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("no kept logits at position 7"), std::string::npos) << err();
    masked = {3};
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_OK) << err();
    EXPECT_TRUE(code >= 0 && code < 16) << code;
    // Branches over different column ranges.
    auto b = fwd(1, t, DIMOO_CACHE_NONE, 1, 17);
    b.keep = 1;
    b.n_out = 4;
    b.out_positions = out4.data();
    ASSERT_EQ(dimoo_forward(ctx, &b, 1), DIMOO_OK) << err();
    s.n_branches = 2;
    s.seqs[1] = 1;
    s.weights[0] = 1, s.weights[1] = 1;
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("different columns"), std::string::npos) << err();
    s.n_branches = 1;
    // Unsorted positions, bad seq, n_select too large.
    std::vector<int32_t> two = {3, 2};
    s.masked = two.data();
    s.n_pos = 2;
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_ERR_INVALID_ARGUMENT);
    s.masked = masked.data();
    s.n_pos = 1;
    s.seqs[0] = 5;
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("seq 5"), std::string::npos) << err();
    s.seqs[0] = 0;
    s.n_select = 2;
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_ERR_INVALID_ARGUMENT);
    s.n_select = 0;
    // Text: a mask is needed for use_mask; positions must be kept.
    dimoo_text_step_args ta{};
    ta.seq = 0;
    ta.uncond_seq = -1;
    ta.use_mask = 1;
    ta.n_pos = 1;
    ta.positions = masked.data();
    EXPECT_EQ(dimoo_text_step(ctx, &ta), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("token mask"), std::string::npos) << err();
    std::vector<uint8_t> none(16, 0);
    EXPECT_EQ(dimoo_ctx_set_token_mask(ctx, none.data(), 16), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("allows no token"), std::string::npos) << err();
    // Cache selection needs every position kept.
    std::vector<int32_t> sel(10);
    int32_t n = 0;
    EXPECT_EQ(dimoo_cache_select(ctx, 0, 10, 0.5, sel.data(), &n), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(err().find("no kept logits at position 0"), std::string::npos) << err();
    EXPECT_EQ(dimoo_cache_select(ctx, 0, 4, 1.5, sel.data(), &n), DIMOO_ERR_INVALID_ARGUMENT);
    // A failed forward (a bad token) forgets the seq's kept rows.
    std::vector<int32_t> bad = t;
    bad[1] = 999;
    auto f = fwd(0, bad, DIMOO_CACHE_NONE, 0, 16);
    f.keep = 1;
    f.n_out = 4;
    f.out_positions = out4.data();
    EXPECT_EQ(dimoo_forward(ctx, &f, 1), DIMOO_ERR_INVALID_ARGUMENT); // refused before running: rows stay
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_OK) << err();
    dimoo_ctx_cancel(ctx); // cleared when the next forward starts: not a failure
    // A forward without keep leaves the kept rows alone.
    auto g = fwd(0, t, DIMOO_CACHE_NONE, 0, 16);
    std::vector<float> lg(10 * 16);
    g.logits = lg.data();
    ASSERT_EQ(dimoo_forward(ctx, &g, 1), DIMOO_OK) << err();
    EXPECT_EQ(dimoo_image_step(ctx, &s), DIMOO_OK) << err();
    EXPECT_GT(dimoo_ctx_bytes(ctx), int64_t(2 * 64 * sizeof(float)));
}

// ML-Cache's saving of top log-probabilities never changes a decision: the
// same steps on rows rewritten in between equal a fresh context's.
TEST_F(Kept, TopLogpReuseKeepsDecisions) {
    const int vb = 8, ve = 40, C = ve - vb, T = 30;
    make_ctx(2, 0, C);
    dimoo_ctx *fresh = nullptr;
    {
        dimoo_ctx_params p{2, kMax, DIMOO_CTX_KV_CACHE, 0, C};
        char e[256];
        ASSERT_EQ(dimoo_ctx_create(m, &p, &fresh, e, sizeof e), DIMOO_OK) << e;
    }
    std::vector<std::vector<int32_t>> toks = {tokens(T, 7), tokens(T, 8)};
    auto store = [&](dimoo_ctx *c, int b) {
        auto a = fwd(b, toks[b], DIMOO_CACHE_STORE, vb, ve);
        a.keep = 1;
        ASSERT_EQ(dimoo_forward(c, &a, 1), DIMOO_OK) << dimoo_ctx_error(c);
    };
    auto use = [&](dimoo_ctx *c, int b, std::vector<int32_t> compute) {
        auto a = fwd(b, toks[b], DIMOO_CACHE_USE, vb, ve);
        a.keep = 1;
        a.n_compute = a.n_out = int32_t(compute.size());
        a.compute = a.out_positions = compute.data();
        ASSERT_EQ(dimoo_forward(c, &a, 1), DIMOO_OK) << dimoo_ctx_error(c);
    };
    auto step = [&](dimoo_ctx *c, int t, std::vector<int32_t> masked, int k) {
        dimoo_image_step_args s{};
        s.n_branches = 2;
        s.seqs[0] = 0, s.seqs[1] = 1;
        s.offsets[0] = 4, s.offsets[1] = 2;
        s.weights[0] = 3, s.weights[1] = -2;
        s.n_pos = int32_t(masked.size());
        s.masked = masked.data();
        s.step = t;
        s.seed = 5;
        s.temperature = 1;
        s.n_select = k;
        std::vector<int32_t> sel(k), codes(k);
        s.out_selected = sel.data();
        s.out_codes = codes.data();
        EXPECT_EQ(dimoo_image_step(c, &s), DIMOO_OK) << dimoo_ctx_error(c);
        sel.insert(sel.end(), codes.begin(), codes.end());
        return sel;
    };
    std::vector<int32_t> masked(20);
    std::iota(masked.begin(), masked.end(), 2);
    const auto orig = toks;
    store(ctx, 0), store(ctx, 1);
    auto r0 = step(ctx, 0, masked, 4); // stores every position's top value
    for (int p : {9, 13}) toks[0][p] = (toks[0][p] + 5) % 60;
    use(ctx, 0, {9, 13}); // rows 9 and 13 of branch 0 change; the rest reuse the stored values
    auto r1 = step(ctx, 1, masked, 4);
    // The fresh context computes everything from the rows.
    auto changed = toks;
    toks = orig;
    store(fresh, 0), store(fresh, 1);
    toks = changed;
    use(fresh, 0, {9, 13});
    auto f1 = step(fresh, 1, masked, 4);
    EXPECT_EQ(r1, f1);
    EXPECT_EQ(r0.size(), 8u);
    dimoo_ctx_destroy(fresh);
}

} // namespace
