// test_estimate.cpp - dimoo_estimate reports what dimoo_model_weight_bytes
// and dimoo_ctx_bytes then report, for every checkpoint dtype and context
// shape, without creating anything; bad arguments are errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "dimoo.h"
#include "test_tensors.h"

namespace {

dimoo_model_config config(int head_dim) {
    dimoo_model_config c{};
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.d_model = 4 * head_dim;
    c.n_layers = 2;
    c.mlp_hidden_size = 72; // not a multiple of the 32-row panels
    c.vocab_size = 90;
    c.embedding_size = 100;
    c.max_sequence_length = 256;
    c.rope_theta = 10000.f;
    c.rms_norm_eps = 1e-5f;
    return c;
}

// A finalized model of cfg with every tensor stored as dtype.
dimoo_model *make_model(dimoo_runtime *rt, const dimoo_model_config &c, int32_t dtype) {
    dimoo_model *m = nullptr;
    char err[256];
    EXPECT_EQ(dimoo_model_create(rt, &c, &m, err, sizeof err), DIMOO_OK) << err;
    if (!m) return nullptr;
    const auto t = dimoo::test::checkpoint_tensors(c);
    std::mt19937 rng(3);
    std::normal_distribution<float> nd(0.f, 0.1f);
    for (const auto &[name, shape] : t) {
        size_t n = 1;
        for (auto s : shape) n *= size_t(s);
        std::vector<uint8_t> buf(n * dimoo::dtype_size(dtype));
        for (size_t i = 0; i < n; i++) {
            const float v = nd(rng);
            if (dtype == DIMOO_F32) reinterpret_cast<float *>(buf.data())[i] = v;
            else if (dtype == DIMOO_F16) reinterpret_cast<uint16_t *>(buf.data())[i] = dimoo::f32_to_f16(v);
            else reinterpret_cast<uint16_t *>(buf.data())[i] = dimoo::f32_to_bf16(v);
        }
        EXPECT_EQ(dimoo_model_set_weight(m, name.c_str(), dtype, shape.data(), int32_t(shape.size()), buf.data(),
                                         buf.size()),
                  DIMOO_OK)
            << dimoo_model_error(m);
    }
    EXPECT_EQ(dimoo_model_finalize(m), DIMOO_OK) << dimoo_model_error(m);
    return m;
}

// Estimates equal the bytes of the model and contexts created after them.
void check_backend(int32_t backend, int32_t n_threads) {
    dimoo_runtime *rt = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(backend, 0, n_threads, &rt, err, sizeof err), DIMOO_OK) << err;
    for (int hd : {16, 32})
        for (int32_t dtype : {DIMOO_F32, DIMOO_F16, DIMOO_BF16})
        for (int32_t prec : {DIMOO_PRECISION_AUTO, DIMOO_PRECISION_BF16, DIMOO_PRECISION_F32}) {
            if (backend == DIMOO_BACKEND_CUDA && prec == DIMOO_PRECISION_F32) continue;
            dimoo_model_config c = config(hd);
            c.precision = prec;
            dimoo_model *m = make_model(rt, c, dtype);
            ASSERT_NE(m, nullptr);
            const std::vector<dimoo_ctx_params> params = {
                {1, 10, 0, 0, 0},
                {2, 37, DIMOO_CTX_KV_CACHE, 0, 0},
                {3, 64, DIMOO_CTX_KV_CACHE, 0, 40},  // keep_rows 0: max_tokens
                {2, 50, 0, 8, 100},                  // text: a block of the vocabulary
                {1, 256, DIMOO_CTX_KV_CACHE, 256, 1}, // keep_cols 1
            };
            int64_t model_est = -1, ctx_est = -1;
            ASSERT_EQ(dimoo_estimate(backend, n_threads, &c, dtype, nullptr, &model_est, nullptr, err, sizeof err),
                      DIMOO_OK)
                << err;
            EXPECT_EQ(model_est, dimoo_model_weight_bytes(m))
                << "dtype " << dtype << ", precision " << prec << ", head_dim " << hd;
            for (const auto &p : params) {
                ASSERT_EQ(dimoo_estimate(backend, n_threads, &c, dtype, &p, &model_est, &ctx_est, err, sizeof err),
                          DIMOO_OK)
                    << err;
                dimoo_ctx *ctx = nullptr;
                ASSERT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_OK) << err;
                EXPECT_EQ(ctx_est, dimoo_ctx_bytes(ctx)) << "dtype " << dtype << ", head_dim " << hd << ", n_seqs "
                                                         << p.n_seqs << ", max_tokens " << p.max_tokens;
                dimoo_ctx_destroy(ctx);
            }
            dimoo_model_destroy(m);
        }
    dimoo_runtime_destroy(rt);
}

TEST(Estimate, CpuEqualsCreated) {
    check_backend(DIMOO_BACKEND_CPU, 2);
    check_backend(DIMOO_BACKEND_CPU, 0);
}

TEST(Estimate, CudaEqualsCreated) {
    if (!dimoo_backend_built(DIMOO_BACKEND_CUDA)) GTEST_SKIP() << "built without the CUDA backend";
    if (dimoo_device_count(DIMOO_BACKEND_CUDA) == 0) GTEST_SKIP() << "no CUDA device";
    check_backend(DIMOO_BACKEND_CUDA, 0);
}

// Without a device the CUDA estimate still works (it never touches one),
// and grows with what the context holds.
TEST(Estimate, CudaWithoutDevice) {
    if (!dimoo_backend_built(DIMOO_BACKEND_CUDA)) GTEST_SKIP() << "built without the CUDA backend";
    const dimoo_model_config c = config(32);
    int64_t mb = 0, small = 0, big = 0;
    char err[256];
    dimoo_ctx_params p{2, 64, 0, 0, 0};
    ASSERT_EQ(dimoo_estimate(DIMOO_BACKEND_CUDA, 0, &c, DIMOO_F32, &p, &mb, &small, err, sizeof err), DIMOO_OK) << err;
    p.flags = DIMOO_CTX_KV_CACHE;
    p.keep_cols = 100;
    ASSERT_EQ(dimoo_estimate(DIMOO_BACKEND_CUDA, 0, &c, DIMOO_F32, &p, &mb, &big, err, sizeof err), DIMOO_OK) << err;
    // bf16 weights on the device whatever the checkpoint's dtype.
    const int64_t d = c.d_model, kv = d / 2, e = c.embedding_size, mlp = c.mlp_hidden_size;
    EXPECT_GE(mb, 2 * (2 * e * d + c.n_layers * (d * (d + 2 * kv) + d * d + 3 * mlp * d)));
    // K/V caches (2 seqs x 2 layers x 64 x kv, bf16, twice) and kept logits at least.
    EXPECT_GE(big - small, 2 * 2 * 2 * 64 * kv * 2 + 2 * 64 * 100 * 4);
}

TEST(Estimate, BadArgumentsAreErrors) {
    dimoo_model_config c = config(16);
    dimoo_ctx_params p{1, 10, 0, 0, 0};
    int64_t mb = 0, cb = 0;
    char err[256];
    EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CPU, 0, &c, 7, &p, &mb, &cb, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("dtype"), std::string::npos) << err;
    EXPECT_EQ(dimoo_estimate(9, 0, &c, DIMOO_F32, &p, &mb, &cb, err, sizeof err), DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("backend"), std::string::npos) << err;
    p.max_tokens = 1000; // beyond max_sequence_length
    EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CPU, 0, &c, DIMOO_F32, &p, &mb, &cb, err, sizeof err),
              DIMOO_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(err).find("max_sequence_length"), std::string::npos) << err;
    p.max_tokens = 10;
    EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CPU, 0, &c, DIMOO_F32, &p, &mb, nullptr, err, sizeof err),
              DIMOO_ERR_INVALID_ARGUMENT);
    c.n_kv_heads = 3; // does not divide n_heads
    EXPECT_NE(dimoo_estimate(DIMOO_BACKEND_CPU, 0, &c, DIMOO_F32, nullptr, &mb, nullptr, err, sizeof err), DIMOO_OK);
    if (!dimoo_backend_built(DIMOO_BACKEND_CUDA)) {
        c.n_kv_heads = 2;
        EXPECT_EQ(dimoo_estimate(DIMOO_BACKEND_CUDA, 0, &c, DIMOO_F32, nullptr, &mb, nullptr, err, sizeof err),
                  DIMOO_ERR_UNSUPPORTED);
    }
}

} // namespace
