// test_api.cpp - the C ABI: error reporting, argument checks, the forward's
// internal consistency (caches, row/column selection) on a tiny random model,
// and the CUDA RMSNorm against the CPU one where a GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "dimoo.h"
#include "host_memory.h"
#include "test_tensors.h"

namespace {

dimoo_model_config tiny_config() {
    dimoo_model_config c{};
    c.d_model = 32;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.mlp_hidden_size = 48;
    c.vocab_size = 50;
    c.embedding_size = 64;
    c.max_sequence_length = 128;
    c.rope_theta = 10000.f;
    c.rms_norm_eps = 1e-5f;
    return c;
}

struct Fixture : ::testing::Test {
    dimoo_runtime *rt = nullptr;
    dimoo_model *m = nullptr;
    dimoo_ctx *ctx = nullptr;
    dimoo_model_config cfg = tiny_config();

    void SetUp() override {
        char err[256];
        ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 2, &rt, err, sizeof err), DIMOO_OK) << err;
        ASSERT_EQ(dimoo_model_create(rt, &cfg, &m, err, sizeof err), DIMOO_OK) << err;
    }
    void TearDown() override {
        dimoo_ctx_destroy(ctx);
        dimoo_model_destroy(m);
        dimoo_runtime_destroy(rt);
    }
    void load_random(uint32_t seed) {
        std::mt19937 rng(seed);
        std::normal_distribution<float> nd(0.f, 1.f);
        for (const auto &[name, shape] : dimoo::test::checkpoint_tensors(cfg)) {
            size_t n = 1;
            for (auto s : shape) n *= size_t(s);
            std::vector<float> v(n);
            float scale = shape.size() == 2 ? 1.f / std::sqrt(float(shape[1])) : 0.1f;
            for (auto &x : v) x = nd(rng) * scale + (shape.size() == 1 ? 1.f : 0.f);
            ASSERT_EQ(dimoo_model_set_weight(m, name.c_str(), DIMOO_F32, shape.data(), int32_t(shape.size()),
                                             v.data(), n * 4),
                      DIMOO_OK)
                << dimoo_model_error(m);
        }
        ASSERT_EQ(dimoo_model_finalize(m), DIMOO_OK) << dimoo_model_error(m);
    }
    void make_ctx(int n_seqs, int max_tokens, int flags) {
        dimoo_ctx_params p{n_seqs, max_tokens, flags};
        char err[256];
        ASSERT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_OK) << err;
    }
    // Logits of every position, all columns.
    std::vector<float> full(const std::vector<int32_t> &toks, int seq = 0, int mode = DIMOO_CACHE_NONE) {
        std::vector<float> out(toks.size() * size_t(cfg.embedding_size), NAN);
        dimoo_forward_args a{};
        a.seq = seq;
        a.n_tokens = int32_t(toks.size());
        a.tokens = toks.data();
        a.cache_mode = mode;
        a.logits = out.data();
        EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx);
        return out;
    }
};

double rel_err(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

TEST(Library, VersionAndStatus) {
    EXPECT_EQ(dimoo_abi_version(), DIMOO_ABI_VERSION);
    EXPECT_NE(std::string(dimoo_version()).find("cpu"), std::string::npos);
    EXPECT_STREQ(dimoo_status_string(DIMOO_ERR_BAD_WEIGHTS), "bad weights");
    EXPECT_STREQ(dimoo_status_string(12345), "unknown status");
    EXPECT_EQ(dimoo_struct_size("dimoo_forward_args"), int64_t(sizeof(dimoo_forward_args)));
    EXPECT_EQ(dimoo_struct_offset("dimoo_forward_args", "logits"), int64_t(offsetof(dimoo_forward_args, logits)));
    EXPECT_EQ(dimoo_struct_size("nope"), -1);
    EXPECT_EQ(dimoo_struct_offset("dimoo_ctx_params", "nope"), -1);
    EXPECT_EQ(dimoo_device_count(DIMOO_BACKEND_CPU), 1);
}

TEST(Library, CreateErrorsGoToTheCallerBuffer) {
    dimoo_runtime *rt = nullptr;
    char err[256] = {0};
    EXPECT_EQ(dimoo_runtime_create(7, 0, 0, &rt, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("unknown backend"), std::string::npos);
    EXPECT_EQ(rt, nullptr);
    if (!dimoo_backend_built(DIMOO_BACKEND_CUDA)) {
        EXPECT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CUDA, 0, 0, &rt, err, sizeof err), DIMOO_ERR_UNSUPPORTED);
    } else if (dimoo_device_count(DIMOO_BACKEND_CUDA) == 0) {
        EXPECT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CUDA, 0, 0, &rt, err, sizeof err), DIMOO_ERR_UNSUPPORTED);
        EXPECT_NE(std::string(err).find("no CUDA device"), std::string::npos) << err;
    }
#ifdef DIMOO_CUDA_EMU
    // A device older than sm_80 (the emulation can pose as an sm_75) is
    // refused at runtime creation, by name, not at the first kernel launch.
    const char *was = std::getenv("DIMOO_EMU_SM");
    const std::string saved = was ? was : "";
    setenv("DIMOO_EMU_SM", "75", 1);
    EXPECT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CUDA, 0, 0, &rt, err, sizeof err), DIMOO_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(err).find("sm_75) is not supported"), std::string::npos) << err;
    EXPECT_EQ(rt, nullptr);
    if (was) setenv("DIMOO_EMU_SM", saved.c_str(), 1);
    else unsetenv("DIMOO_EMU_SM");
#endif
    // A tiny buffer truncates the message instead of overflowing.
    char small[8];
    EXPECT_EQ(dimoo_runtime_create(7, 0, 0, &rt, small, sizeof small), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(std::strlen(small), 7u);
}

TEST_F(Fixture, BadConfigIsRejected) {
    dimoo_model_config c = cfg;
    c.n_kv_heads = 3;
    dimoo_model *bad = nullptr;
    char err[256];
    EXPECT_EQ(dimoo_model_create(rt, &c, &bad, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("n_kv_heads"), std::string::npos) << err;
    c = cfg;
    c.embedding_size = 10;
    EXPECT_EQ(dimoo_model_create(rt, &c, &bad, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("embedding_size"), std::string::npos) << err;
}

TEST_F(Fixture, SetWeightChecksNameShapeAndSize) {
    std::vector<float> buf(64 * 32);
    int64_t shape[2] = {64, 32};
    EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.nope.weight", DIMOO_F32, shape, 2, buf.data(), buf.size() * 4),
              DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_model_error(m)).find("unknown tensor"), std::string::npos);
    EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.blocks.7.q_proj.weight", DIMOO_F32, shape, 2, buf.data(),
                                     buf.size() * 4),
              DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_model_error(m)).find("layer 7"), std::string::npos) << dimoo_model_error(m);
    int64_t wrong[2] = {32, 64};
    EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.wte.weight", DIMOO_F32, wrong, 2, buf.data(), buf.size() * 4),
              DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_model_error(m)).find("shape (32, 64)"), std::string::npos) << dimoo_model_error(m);
    EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.wte.weight", DIMOO_F32, shape, 2, buf.data(), 12),
              DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.wte.weight", 9, shape, 2, buf.data(), buf.size() * 4),
              DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.wte.weight", DIMOO_F32, shape, 2, buf.data(), buf.size() * 4),
              DIMOO_OK);
    EXPECT_EQ(dimoo_model_finalize(m), DIMOO_ERR_BAD_WEIGHTS);
    EXPECT_NE(std::string(dimoo_model_error(m)).find("missing"), std::string::npos);
    // A context needs a finalized model.
    dimoo_ctx_params p{1, 8, 0};
    char err[256];
    EXPECT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
}

TEST_F(Fixture, ForwardArgumentErrors) {
    load_random(1);
    make_ctx(2, 16, 0);
    std::vector<int32_t> toks = {1, 2, 3};
    std::vector<float> out(3 * 64);
    dimoo_forward_args a{};
    a.n_tokens = 3;
    a.tokens = toks.data();
    a.logits = out.data();
    auto expect_err = [&](const char *needle) {
        EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(dimoo_ctx_error(ctx)).find(needle), std::string::npos) << dimoo_ctx_error(ctx);
    };
    toks[1] = 50; // vocab_size 50: ids < 50
    expect_err("outside the vocabulary");
    toks[1] = -1;
    expect_err("outside the vocabulary");
    toks[1] = 2;
    a.n_tokens = 0;
    expect_err("empty sequence");
    a.n_tokens = 17;
    expect_err("max_tokens");
    a.n_tokens = 3;
    a.cache_mode = DIMOO_CACHE_STORE;
    expect_err("DIMOO_CTX_KV_CACHE");
    a.cache_mode = DIMOO_CACHE_NONE;
    a.vocab_end = 65;
    expect_err("vocab range");
    a.vocab_end = 0;
    a.seq = 2;
    expect_err("seq out of range");
    a.seq = 0;
    int32_t pos[1] = {3};
    a.n_out = 1;
    a.out_positions = pos;
    expect_err("output position 3");
    a.n_out = 0;
    a.out_positions = nullptr;
    dimoo_forward_args two[2] = {a, a};
    EXPECT_EQ(dimoo_forward(ctx, two, 2), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx);
    EXPECT_STREQ(dimoo_ctx_error(ctx), "");
}

TEST_F(Fixture, RowAndColumnSelectionMatchTheFullForward) {
    load_random(2);
    make_ctx(1, 32, 0);
    std::vector<int32_t> toks = {5, 9, 0, 49, 13, 7, 7, 21, 30};
    auto all = full(toks);
    std::vector<int32_t> pos = {8, 0, 4};
    const int vb = 10, ve = 42;
    std::vector<float> part(pos.size() * (ve - vb));
    dimoo_forward_args a{};
    a.n_tokens = int32_t(toks.size());
    a.tokens = toks.data();
    a.n_out = int32_t(pos.size());
    a.out_positions = pos.data();
    a.vocab_begin = vb;
    a.vocab_end = ve;
    a.logits = part.data();
    ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx);
    // Equal up to summation order (the GEMM blocks differently for 3 rows).
    for (size_t i = 0; i < pos.size(); i++)
        for (int j = vb; j < ve; j++)
            EXPECT_NEAR(part[i * (ve - vb) + (j - vb)], all[size_t(pos[i]) * 64 + j], 1e-5);
}

TEST_F(Fixture, CacheUseRecomputesOnlyChosenRows) {
    load_random(3);
    make_ctx(2, 32, DIMOO_CTX_KV_CACHE);
    std::vector<int32_t> toks = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    // STORE equals NONE.
    auto plain = full(toks, 0, DIMOO_CACHE_NONE);
    auto stored = full(toks, 0, DIMOO_CACHE_STORE);
    EXPECT_LT(rel_err(stored.data(), plain.data(), plain.size()), 1e-6);

    // USE with every position computed equals a fresh forward, even after tokens change.
    std::vector<int32_t> changed = toks;
    changed[3] = 40;
    changed[7] = 41;
    std::vector<int32_t> every(toks.size());
    for (size_t i = 0; i < every.size(); i++) every[i] = int32_t(i);
    std::vector<float> out(toks.size() * 64);
    dimoo_forward_args a{};
    a.n_tokens = int32_t(toks.size());
    a.tokens = changed.data();
    a.cache_mode = DIMOO_CACHE_USE;
    a.n_compute = int32_t(every.size());
    a.compute = every.data();
    a.logits = out.data();
    ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx);
    auto fresh = full(changed);
    EXPECT_LT(rel_err(out.data(), fresh.data(), fresh.size()), 1e-6);

    // Unchanged tokens, a subset recomputed: the same logits at those rows,
    // because the cached K/V are exactly what a full forward would produce.
    full(toks, 1, DIMOO_CACHE_STORE);
    std::vector<int32_t> some = {0, 5, 11};
    std::vector<float> sub(some.size() * 64);
    a.seq = 1;
    a.tokens = toks.data();
    a.n_compute = int32_t(some.size());
    a.compute = some.data();
    a.n_out = int32_t(some.size());
    a.out_positions = some.data();
    a.logits = sub.data();
    ASSERT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_OK) << dimoo_ctx_error(ctx);
    for (size_t i = 0; i < some.size(); i++)
        EXPECT_LT(rel_err(sub.data() + i * 64, plain.data() + size_t(some[i]) * 64, 64), 1e-5);

    // An output row that was not computed is refused.
    int32_t notcomputed[1] = {1};
    a.n_out = 1;
    a.out_positions = notcomputed;
    EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_ERR_INVALID_ARGUMENT);
    // USE on a seq without a STORE of that length is refused.
    a.out_positions = some.data();
    a.n_out = 1;
    a.n_tokens = 11;
    EXPECT_EQ(dimoo_forward(ctx, &a, 1), DIMOO_ERR_INVALID_ARGUMENT);
}

TEST_F(Fixture, TwoSequencesInOneCall) {
    load_random(4);
    make_ctx(2, 16, 0);
    std::vector<int32_t> t0 = {1, 2, 3, 4, 5}, t1 = {9, 8, 7};
    auto r0 = full(t0, 0), r1 = full(t1, 1);
    std::vector<float> o0(r0.size()), o1(r1.size());
    dimoo_forward_args a[2] = {};
    a[0].seq = 0;
    a[0].n_tokens = 5;
    a[0].tokens = t0.data();
    a[0].logits = o0.data();
    a[1].seq = 1;
    a[1].n_tokens = 3;
    a[1].tokens = t1.data();
    a[1].logits = o1.data();
    ASSERT_EQ(dimoo_forward(ctx, a, 2), DIMOO_OK) << dimoo_ctx_error(ctx);
    EXPECT_EQ(o0, r0);
    EXPECT_EQ(o1, r1);
}

} // namespace

namespace {
// A context far larger than the machine's memory is an error, not a crash.
TEST_F(Fixture, HugeContextIsOutOfMemory) {
    dimoo_model_config c = cfg;
    c.max_sequence_length = 1 << 30;
    dimoo_model *big = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_model_create(rt, &c, &big, err, sizeof err), DIMOO_OK) << err;
    // Weights for a model this small are fine; finalize needs them all.
    std::swap(m, big);
    load_random(5);
    dimoo_ctx_params p{64, 1 << 30, DIMOO_CTX_KV_CACHE};
    EXPECT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_ERR_OUT_OF_MEMORY);
    EXPECT_NE(std::string(err).find("MiB"), std::string::npos) << err;
    // Measured (not the test hook): the message says how to override it.
    if (!std::getenv("DIMOO_HOST_AVAILABLE_MB"))
        EXPECT_NE(std::string(err).find("DIMOO_HOST_AVAILABLE_MB=N overrides"), std::string::npos) << err;
    std::swap(m, big);
    dimoo_model_destroy(big);
}

// The host memory left decides, not the machine's size: a model whose weights
// (2 bytes a parameter at least) do not fit what is available is refused at
// creation, a tensor or a context that does not fit at its allocation, each
// with the numbers and where they come from. DIMOO_HOST_AVAILABLE_MB stands
// in for MemAvailable.
TEST(HostMemory, RefusedAgainstWhatIsAvailable) {
    const dimoo::HostMemory now = dimoo::host_memory();
    ASSERT_GT(now.available, int64_t(0)) << now.source;
    struct Env { // sets the hook, and puts back what was there
        std::string old;
        bool had;
        explicit Env(const char *mb) : had(std::getenv("DIMOO_HOST_AVAILABLE_MB") != nullptr) {
            if (had) old = std::getenv("DIMOO_HOST_AVAILABLE_MB");
            setenv("DIMOO_HOST_AVAILABLE_MB", mb, 1);
        }
        ~Env() {
            if (had) setenv("DIMOO_HOST_AVAILABLE_MB", old.c_str(), 1);
            else unsetenv("DIMOO_HOST_AVAILABLE_MB");
        }
    };
    dimoo_runtime *rt = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, 1, &rt, err, sizeof err), DIMOO_OK) << err;
    // 4096 x 20000 embedding rows alone: 156 MiB at 2 bytes.
    dimoo_model_config c = tiny_config();
    c.d_model = 4096, c.n_heads = 32, c.n_kv_heads = 32, c.mlp_hidden_size = 64, c.n_layers = 1;
    c.vocab_size = c.embedding_size = 20000;
    dimoo_model *m = nullptr;
    {
        Env e("200"); // less than the weights' 2 bytes a parameter plus the reserve
        EXPECT_EQ(dimoo_model_create(rt, &c, &m, err, sizeof err), DIMOO_ERR_OUT_OF_MEMORY);
        EXPECT_NE(std::string(err).find("the model's weights"), std::string::npos) << err;
        EXPECT_NE(std::string(err).find("200 MiB are available (DIMOO_HOST_AVAILABLE_MB)"), std::string::npos) << err;
        EXPECT_EQ(m, nullptr);
    }
    {
        Env e("600"); // creation fits; the fp32 embedding (312 MiB) as stored does not
        ASSERT_EQ(dimoo_model_create(rt, &c, &m, err, sizeof err), DIMOO_OK) << err;
        std::vector<float> emb(size_t(c.embedding_size) * c.d_model, 0.01f);
        const int64_t shape[2] = {c.embedding_size, c.d_model};
        {
            Env tight("300");
            EXPECT_EQ(dimoo_model_set_weight(m, "model.transformer.wte.weight", DIMOO_F32, shape, 2, emb.data(),
                                             emb.size() * 4),
                      DIMOO_ERR_OUT_OF_MEMORY);
            EXPECT_NE(std::string(dimoo_model_error(m)).find("model.transformer.wte.weight needs 312 MiB"),
                      std::string::npos)
                << dimoo_model_error(m);
        }
        dimoo_model_destroy(m);
    }
    // A context on a small model: fine, then refused when memory is short.
    c = tiny_config();
    ASSERT_EQ(dimoo_model_create(rt, &c, &m, err, sizeof err), DIMOO_OK) << err;
    for (const auto &[name, shape] : dimoo::test::checkpoint_tensors(c)) {
        size_t n = 1;
        for (auto d : shape) n *= size_t(d);
        std::vector<float> v(n, 0.01f);
        ASSERT_EQ(dimoo_model_set_weight(m, name.c_str(), DIMOO_F32, shape.data(), int32_t(shape.size()), v.data(),
                                         n * 4),
                  DIMOO_OK)
            << dimoo_model_error(m);
    }
    ASSERT_EQ(dimoo_model_finalize(m), DIMOO_OK) << dimoo_model_error(m);
    dimoo_ctx *ctx = nullptr;
    dimoo_ctx_params p{2, 128, DIMOO_CTX_KV_CACHE};
    ASSERT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_OK) << err;
    dimoo_ctx_destroy(ctx);
    ctx = nullptr;
    {
        Env e("64"); // all of it the reserve
        EXPECT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_ERR_OUT_OF_MEMORY);
        EXPECT_NE(std::string(err).find("a context of 128 tokens"), std::string::npos) << err;
        EXPECT_EQ(ctx, nullptr);
    }
    dimoo_model_destroy(m);
    dimoo_runtime_destroy(rt);
}
} // namespace
