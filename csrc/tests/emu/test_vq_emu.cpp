// test_vq_emu.cpp - kernels/cuda/vq.cu run on the host through the emulated
// CUDA runtime and cuBLAS of this folder (builds without CUDA only: the
// decoder's walk, buffer use, kernel indexing and GEMM parameters against the
// CPU decoder on machines with no GPU). Emulated "device" memory starts as
// NaN, so a value read before it is written shows in the output. Nothing
// here says the CUDA code runs on a GPU: test_cuda_vq.cpp does that.
#define DIMOO_VQ_EMU_THREADS 8
// Attention scores in blocks of a few query rows (a remainder block too).
#define DIMOO_VQ_EMU_SCORE_FLOATS 100
#include "cuda/vq.cu"

#include <gtest/gtest.h>

#include "../vq_testing.h"

#include <atomic>
#include <limits>
#include <random>

namespace {

using dimoo::test::all_finite;
using dimoo::test::rel_err;
using dimoo::test::vq_config;

void load_random(dimoo::vq::Model &m) {
    uint32_t seed = 3;
    for (const auto &name : m.weight_names()) {
        auto s = m.weight_shape(name);
        size_t n = 1;
        for (auto d : s) n *= size_t(d);
        std::mt19937 g(seed++);
        const float fan_in = s.size() > 1 ? float(n / size_t(s[0])) : 1.0f;
        std::normal_distribution<float> nd(0.0f, s.size() > 1 ? 1.0f / std::sqrt(fan_in) : 0.1f);
        std::vector<float> v(n);
        for (auto &x : v) x = nd(g);
        if (name.find("norm") != std::string::npos && name.find(".weight") != std::string::npos)
            for (auto &x : v) x += 1.0f;
        m.set_weight(name, DIMOO_F32, s, v.data(), n * 4);
    }
    m.finalize();
}

TEST(CudaVQEmu, MatchesCpu) {
    const dimoo_vq_config cfgs[] = {
        vq_config(12, 40, 7, 4, 2, {8, 24, 16}, 1), // shortcuts, attention, vq_embed_dim != latent_channels
        vq_config(8, 64, 0, 8, 1, {16, 32}, 0),     // testdata/vq/tiny-f32's shape
        vq_config(4, 10, 4, 2, 1, {6}, 1),          // one level: no upsampler
    };
    const int grids[][2] = {{1, 1}, {2, 3}, {5, 4}, {8, 8}, {3, 7}};
    for (const auto &c : cfgs) {
        dimoo::vq::Model m(c);
        load_random(m);
        auto dev = dimoo::make_cuda_vq(m, 0);
        EXPECT_GT(dev->device_bytes(), 0);
        const int f = m.factor(), D = m.embed_dim();
        std::atomic<bool> no{false};
        uint32_t seed = 9;
        for (const auto &g : grids) {
            SCOPED_TRACE("levels " + std::to_string(c.n_levels) + " grid " + std::to_string(g[0]) + "x" +
                         std::to_string(g[1]));
            const size_t n = size_t(g[0]) * g[1], px = n * size_t(f * f) * 3;
            std::vector<int32_t> codes(n);
            std::mt19937 r(seed++);
            for (auto &x : codes) x = int32_t(r() % uint32_t(c.num_vq_embeddings));
            std::vector<float> want(px), got(px, std::numeric_limits<float>::quiet_NaN());
            m.decode(codes.data(), g[0], g[1], want.data(), no);
            dev->decode(codes.data(), g[0], g[1], got.data(), no);
            EXPECT_TRUE(all_finite(got));
            EXPECT_LT(rel_err(got, want), 1e-5);
            std::vector<float> z(n * size_t(D));
            std::normal_distribution<float> nd;
            for (auto &x : z) x = nd(r);
            std::fill(got.begin(), got.end(), std::numeric_limits<float>::quiet_NaN());
            m.decode_latent(z.data(), g[0], g[1], want.data(), no);
            dev->decode_latent(z.data(), g[0], g[1], got.data(), no);
            EXPECT_TRUE(all_finite(got));
            EXPECT_LT(rel_err(got, want), 1e-5);
        }
        // A grid whose activations cannot fit (the emulation reports 8 GiB
        // free): refused before anything is read or allocated.
        try {
            int32_t one = 0;
            float sink = 0;
            const int side = 16384 / f; // 2^28 pixels, 1 GiB a channel
            dev->decode(&one, side, side, &sink, no);
            ADD_FAILURE() << "a " << side << "x" << side << " grid was not refused";
        } catch (const dimoo::Error &e) {
            EXPECT_EQ(e.status(), DIMOO_ERR_DEVICE_OUT_OF_MEMORY);
            EXPECT_NE(std::string(e.what()).find("free of"), std::string::npos) << e.what();
        }
        std::atomic<bool> yes{true};
        std::vector<int32_t> codes(4, 0);
        std::vector<float> out(size_t(4 * f * f * 3));
        try {
            dev->decode(codes.data(), 2, 2, out.data(), yes);
            ADD_FAILURE() << "not cancelled";
        } catch (const dimoo::Error &e) {
            EXPECT_EQ(e.status(), DIMOO_ERR_CANCELLED);
        }
    }
}

} // namespace
