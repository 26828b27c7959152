// test_cuda_vq.cpp - the VQ-VAE on the GPU (kernels/cuda/vq.cu) against the
// CPU (csrc/vq), through the C ABI: the same weights on a CPU runtime and on a
// CUDA runtime, decode and decode_latent over several grids, encode_latent
// and encode over images of those grids, relative error ||gpu - cpu|| /
// ||cpu|| within 1e-4 (fp32 GEMMs with TF32 off; only the summation order
// differs), and encode's codes equal but at near ties. Also: NaN-poisoned outputs
// fully overwritten, out-of-range codes refused before anything runs,
// cancel honoured. Skips with a reason where the CUDA backend is not built
// or no GPU is present.
// Also at aMUSEd's size (32x32 -> 512², 5 levels, 768 channels). Their
// times: build/dimoo_vqbench --backend cuda (bench/vq/vqbench.cpp).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backend.h"
#include "common.h"
#include "dimoo.h"
#include "source_dir.h"
#include "test_checkpoint.h"
#include "vq_testing.h"
#include "vq/vq.h"
#ifdef DIMOO_WITH_CUDA
#include "cuda/vq.cuh"
#endif

namespace {

#ifdef DIMOO_WITH_CUDA
#define SKIP_WITHOUT_GPU()                                                                                   \
    do {                                                                                                     \
        if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";                               \
    } while (0)
#endif

constexpr double kTol = 1e-4; // fp32 GEMMs (no TF32), double statistics

std::string src(const std::string &rel) { return dimoo::test::source_path(rel); }

using dimoo::test::all_finite;
using dimoo::test::read_safetensors;
using dimoo::test::rel_err;
using dimoo::test::vq_config;
using dimoo::test::StTensor;

// ---- configs ---------------------------------------------------------------------------------

// testdata/vq's checkpoints (their config.json, written out).
struct Checkpoint {
    const char *dir;
    dimoo_vq_config cfg;
};
std::vector<Checkpoint> checkpoints() {
    return {{"testdata/vq/tiny-f32", vq_config(8, 64, 0, 8, 1, {16, 32}, 0)},
            {"testdata/vq/attn3-f32", vq_config(4, 32, 6, 8, 2, {16, 32, 32}, 1)},
            {"testdata/vq/attn2-bf16", vq_config(8, 48, 0, 16, 1, {32, 32}, 1)}};
}

std::vector<float> randn(size_t n, uint32_t seed, float scale) {
    std::mt19937 g(seed);
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = d(g);
    return v;
}

// One VQ on a runtime of `backend`, weights from a checkpoint or random.
struct Handle {
    dimoo_runtime *rt = nullptr;
    dimoo_vq *vq = nullptr;
    ~Handle() {
        dimoo_vq_destroy(vq);
        dimoo_runtime_destroy(rt);
    }
};

// Random weights of fan-in scale (norm gains around 1), deterministic per name order.
std::map<std::string, std::vector<float>> random_weights(const dimoo_vq_config &c) {
    dimoo::vq::Model shape(c);
    std::map<std::string, std::vector<float>> w;
    uint32_t seed = 7;
    for (const auto &name : shape.weight_names()) {
        auto s = shape.weight_shape(name);
        size_t n = 1;
        for (auto d : s) n *= size_t(d);
        const float fan_in = s.size() > 1 ? float(n / size_t(s[0])) : 1.0f;
        auto v = randn(n, seed++, s.size() > 1 ? 1.0f / std::sqrt(fan_in) : 0.1f);
        if (name.find("norm") != std::string::npos && name.find(".weight") != std::string::npos)
            for (auto &x : v) x += 1.0f;
        w[name] = std::move(v);
    }
    return w;
}

void open_handle(Handle &h, int32_t backend, const dimoo_vq_config &c, const std::map<std::string, StTensor> *st,
                 const std::map<std::string, std::vector<float>> *rnd) {
    char err[512];
    ASSERT_EQ(dimoo_runtime_create(backend, 0, 0, &h.rt, err, sizeof err), DIMOO_OK) << err;
    ASSERT_EQ(dimoo_vq_create(h.rt, &c, &h.vq, err, sizeof err), DIMOO_OK) << err;
    dimoo::vq::Model shape(c);
    for (const auto &name : shape.weight_names()) {
        auto s = shape.weight_shape(name);
        int32_t st_code = 0;
        if (st) {
            auto it = st->find(name);
            ASSERT_NE(it, st->end()) << name;
            st_code = it->second.dtype == "F32" ? DIMOO_F32 : it->second.dtype == "BF16" ? DIMOO_BF16 : DIMOO_F16;
            ASSERT_EQ(dimoo_vq_set_weight(h.vq, name.c_str(), st_code, it->second.shape.data(),
                                          int32_t(it->second.shape.size()), it->second.data.data(),
                                          it->second.data.size()),
                      DIMOO_OK)
                << dimoo_vq_error(h.vq);
        } else {
            const auto &v = rnd->at(name);
            ASSERT_EQ(dimoo_vq_set_weight(h.vq, name.c_str(), DIMOO_F32, s.data(), int32_t(s.size()), v.data(),
                                          v.size() * 4),
                      DIMOO_OK)
                << dimoo_vq_error(h.vq);
        }
    }
    ASSERT_EQ(dimoo_vq_finalize(h.vq), DIMOO_OK) << dimoo_vq_error(h.vq);
}

struct Grid {
    int h, w;
};
const Grid kGrids[] = {{1, 1}, {2, 3}, {5, 4}, {8, 8}, {3, 7}, {9, 2}};

// decode and decode_latent on both, every grid.
void compare(Handle &cpu, Handle &gpu, const dimoo_vq_config &c, const std::string &what) {
    dimoo::vq::Model shape(c);
    const int f = shape.factor(), D = shape.embed_dim();
    uint32_t seed = 100;
    for (const Grid &g : kGrids) {
        SCOPED_TRACE(what + " grid " + std::to_string(g.h) + "x" + std::to_string(g.w));
        const size_t n = size_t(g.h) * g.w, px = n * size_t(f) * f * size_t(c.out_channels);
        std::vector<int32_t> codes(n);
        std::mt19937 r(seed++);
        for (auto &x : codes) x = int32_t(r() % uint32_t(c.num_vq_embeddings));
        std::vector<float> want(px), got(px, std::numeric_limits<float>::quiet_NaN());
        ASSERT_EQ(dimoo_vq_decode(cpu.vq, codes.data(), g.h, g.w, want.data()), DIMOO_OK) << dimoo_vq_error(cpu.vq);
        ASSERT_EQ(dimoo_vq_decode(gpu.vq, codes.data(), g.h, g.w, got.data()), DIMOO_OK) << dimoo_vq_error(gpu.vq);
        EXPECT_TRUE(all_finite(got)) << "NaN-poisoned output not fully overwritten";
        EXPECT_LT(rel_err(got, want), kTol);
        // Twice: the same bits (no races, nothing left from the last call).
        std::vector<float> again(px, std::numeric_limits<float>::quiet_NaN());
        ASSERT_EQ(dimoo_vq_decode(gpu.vq, codes.data(), g.h, g.w, again.data()), DIMOO_OK);
        EXPECT_EQ(std::memcmp(again.data(), got.data(), px * 4), 0);

        auto z = randn(n * size_t(D), seed++, 1.0f);
        std::fill(got.begin(), got.end(), std::numeric_limits<float>::quiet_NaN());
        ASSERT_EQ(dimoo_vq_decode_latent(cpu.vq, z.data(), g.h, g.w, want.data()), DIMOO_OK)
            << dimoo_vq_error(cpu.vq);
        ASSERT_EQ(dimoo_vq_decode_latent(gpu.vq, z.data(), g.h, g.w, got.data()), DIMOO_OK)
            << dimoo_vq_error(gpu.vq);
        EXPECT_TRUE(all_finite(got)) << "NaN-poisoned output not fully overwritten (latent)";
        EXPECT_LT(rel_err(got, want), kTol);
    }
}

// encode_latent and encode on both, images of several grids (in_channels
// channels, values in [-1, 1]): the latents within kTol; the codes equal but
// where a latent sits within rounding of two codebook rows (at most 1% of
// the cells).
void compare_encode(Handle &cpu, Handle &gpu, const dimoo_vq_config &c, const std::string &what) {
    dimoo::vq::Model shape(c);
    const int f = shape.factor(), D = shape.embed_dim();
    uint32_t seed = 300;
    for (const Grid &g : kGrids) {
        SCOPED_TRACE(what + " encode grid " + std::to_string(g.h) + "x" + std::to_string(g.w));
        const int H = g.h * f, W = g.w * f;
        const size_t n = size_t(g.h) * g.w, px = size_t(H) * W * size_t(c.in_channels);
        std::vector<float> pixels(px);
        std::mt19937 r(seed++);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        for (auto &v : pixels) v = u(r);
        std::vector<float> want(n * size_t(D)), got(n * size_t(D), std::numeric_limits<float>::quiet_NaN());
        ASSERT_EQ(dimoo_vq_encode_latent(cpu.vq, pixels.data(), H, W, want.data()), DIMOO_OK)
            << dimoo_vq_error(cpu.vq);
        ASSERT_EQ(dimoo_vq_encode_latent(gpu.vq, pixels.data(), H, W, got.data()), DIMOO_OK)
            << dimoo_vq_error(gpu.vq);
        EXPECT_TRUE(all_finite(got)) << "NaN-poisoned latent not fully overwritten";
        EXPECT_LT(rel_err(got, want), kTol);
        std::vector<int32_t> cw(n), cg(n, -1);
        ASSERT_EQ(dimoo_vq_encode(cpu.vq, pixels.data(), H, W, cw.data()), DIMOO_OK) << dimoo_vq_error(cpu.vq);
        ASSERT_EQ(dimoo_vq_encode(gpu.vq, pixels.data(), H, W, cg.data()), DIMOO_OK) << dimoo_vq_error(gpu.vq);
        size_t same = 0;
        for (size_t i = 0; i < n; i++) same += cw[i] == cg[i];
        EXPECT_GE(double(same), 0.99 * double(n)) << same << " of " << n << " codes equal";
    }
}

// A CPU handle against a handle on `backend` with the same weights: the
// testdata checkpoints, then a random config with shortcut convs (16 -> 24
// -> 8), three levels, attention and 12 channels of latent; decode and encode.
void checkpoints_match(int32_t backend) {
    for (const auto &ck : checkpoints()) {
        std::map<std::string, StTensor> st;
        ASSERT_TRUE(read_safetensors(src(std::string(ck.dir) + "/diffusion_pytorch_model.safetensors"), st))
            << ck.dir;
        Handle cpu, other;
        open_handle(cpu, DIMOO_BACKEND_CPU, ck.cfg, &st, nullptr);
        open_handle(other, backend, ck.cfg, &st, nullptr);
        compare(cpu, other, ck.cfg, ck.dir);
        compare_encode(cpu, other, ck.cfg, ck.dir);
    }
}
void random_matches(int32_t backend) {
    const auto c = vq_config(12, 40, 7, 4, 2, {8, 24, 16}, 1);
    const auto w = random_weights(c);
    Handle cpu, other;
    open_handle(cpu, DIMOO_BACKEND_CPU, c, nullptr, &w);
    open_handle(other, backend, c, nullptr, &w);
    compare(cpu, other, c, "random");
    compare_encode(cpu, other, c, "random");
}

// The harness itself, CPU against CPU on every build: the checkpoints'
// configs above match their tensors, and two CPU handles agree.
TEST(CudaVQ, HarnessCpuAgainstCpu) {
    checkpoints_match(DIMOO_BACKEND_CPU);
    random_matches(DIMOO_BACKEND_CPU);
}

#ifndef DIMOO_WITH_CUDA
TEST(CudaVQ, Skipped) { GTEST_SKIP() << "built without the CUDA backend"; }
#else

TEST(CudaVQ, CheckpointsMatchCpu) {
    SKIP_WITHOUT_GPU();
    checkpoints_match(DIMOO_BACKEND_CUDA);
}

TEST(CudaVQ, RandomWithAttentionMatchesCpu) {
    SKIP_WITHOUT_GPU();
    random_matches(DIMOO_BACKEND_CUDA);
}

TEST(CudaVQ, RefusesBadCodesBeforeRunning) {
    SKIP_WITHOUT_GPU();
    const auto c = vq_config(4, 20, 5, 4, 1, {8, 16}, 1);
    const auto w = random_weights(c);
    Handle gpu;
    open_handle(gpu, DIMOO_BACKEND_CUDA, c, nullptr, &w);
    for (int32_t bad : {-1, 20, 1 << 30}) {
        std::vector<int32_t> codes(6, 3);
        codes[4] = bad;
        std::vector<float> out(6 * 4 * 3, std::numeric_limits<float>::quiet_NaN());
        EXPECT_EQ(dimoo_vq_decode(gpu.vq, codes.data(), 2, 3, out.data()), DIMOO_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(dimoo_vq_error(gpu.vq)).find("outside the codebook"), std::string::npos)
            << dimoo_vq_error(gpu.vq);
        for (float v : out) ASSERT_TRUE(std::isnan(v)) << "output written by a refused call";
    }
    std::vector<int32_t> codes(6, 3);
    std::vector<float> out(6 * 4 * 3);
    EXPECT_EQ(dimoo_vq_decode(gpu.vq, codes.data(), 2, 3, out.data()), DIMOO_OK) << dimoo_vq_error(gpu.vq);
}

TEST(CudaVQ, CancelHonoured) {
    SKIP_WITHOUT_GPU();
    const auto c = vq_config(4, 20, 5, 4, 1, {8, 16}, 1);
    const auto w = random_weights(c);
    // The device decoder itself: a raised flag stops it at the first poll.
    dimoo::vq::Model m(c);
    for (const auto &kv : w) {
        auto s = m.weight_shape(kv.first);
        m.set_weight(kv.first, DIMOO_F32, s, kv.second.data(), kv.second.size() * 4);
    }
    m.finalize();
    auto dev = dimoo::make_cuda_vq(m, 0);
    EXPECT_GT(dev->device_bytes(), 0);
    std::atomic<bool> cancel{true};
    std::vector<int32_t> codes(16, 1);
    std::vector<float> out(16 * 4 * 3);
    try {
        dev->decode(codes.data(), 4, 4, out.data(), cancel);
        ADD_FAILURE() << "not cancelled";
    } catch (const dimoo::Error &e) {
        EXPECT_EQ(e.status(), DIMOO_ERR_CANCELLED) << e.what();
    }
    // And it decodes after, as the CPU does.
    cancel = false;
    std::vector<float> want(out.size());
    ASSERT_NO_THROW(dev->decode(codes.data(), 4, 4, out.data(), cancel));
    std::atomic<bool> no{false};
    m.decode(codes.data(), 4, 4, want.data(), no);
    EXPECT_LT(rel_err(out, want), kTol);

    // Through the C ABI: a cancel from another thread during a large decode
    // ends it with CANCELLED (or it finished first); the handle works after.
    Handle gpu;
    open_handle(gpu, DIMOO_BACKEND_CUDA, c, nullptr, &w);
    std::vector<int32_t> big(256 * 256, 2);
    std::vector<float> img(size_t(512) * 512 * 3);
    std::atomic<bool> stop{false};
    std::thread t([&] {
        while (!stop.load()) {
            dimoo_vq_cancel(gpu.vq);
            std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
    });
    const int32_t st = dimoo_vq_decode(gpu.vq, big.data(), 256, 256, img.data());
    stop = true;
    t.join();
    EXPECT_TRUE(st == DIMOO_ERR_CANCELLED || st == DIMOO_OK) << st << " " << dimoo_vq_error(gpu.vq);
    EXPECT_EQ(dimoo_vq_decode(gpu.vq, codes.data(), 4, 4, out.data()), DIMOO_OK) << dimoo_vq_error(gpu.vq);
    EXPECT_LT(rel_err(out, want), kTol);
}

// aMUSEd's VQ-GAN shape (random weights): decode 32x32 -> 512² on the GPU
// equals the CPU's, and so does the encoder's latent of the decoded picture.
TEST(CudaVQ, AmusedSizeMatchesCpu) {
#ifdef DIMOO_CUDA_EMU
    GTEST_SKIP() << "a 1.9 TFLOP decode: run on a GPU";
#endif
    SKIP_WITHOUT_GPU();
    const auto c = vq_config(64, 8192, 64, 32, 2, {128, 256, 256, 512, 768}, 0);
    const auto w = random_weights(c);
    Handle cpu, gpu;
    open_handle(cpu, DIMOO_BACKEND_CPU, c, nullptr, &w);
    open_handle(gpu, DIMOO_BACKEND_CUDA, c, nullptr, &w);
    const int side = 32;
    std::vector<int32_t> codes(size_t(side) * side);
    std::mt19937 g(1);
    for (auto &x : codes) x = int32_t(g() % 8192);
    const size_t px = size_t(side * 16) * (side * 16) * 3;
    std::vector<float> want(px), got(px, std::numeric_limits<float>::quiet_NaN());
    ASSERT_EQ(dimoo_vq_decode(cpu.vq, codes.data(), side, side, want.data()), DIMOO_OK) << dimoo_vq_error(cpu.vq);
    ASSERT_EQ(dimoo_vq_decode(gpu.vq, codes.data(), side, side, got.data()), DIMOO_OK) << dimoo_vq_error(gpu.vq);
    ASSERT_TRUE(all_finite(got));
    EXPECT_LT(rel_err(got, want), kTol);
    const size_t nz = size_t(side) * side * 64;
    std::vector<float> zw(nz), zg(nz, std::numeric_limits<float>::quiet_NaN());
    ASSERT_EQ(dimoo_vq_encode_latent(cpu.vq, want.data(), side * 16, side * 16, zw.data()), DIMOO_OK);
    ASSERT_EQ(dimoo_vq_encode_latent(gpu.vq, want.data(), side * 16, side * 16, zg.data()), DIMOO_OK)
        << dimoo_vq_error(gpu.vq);
    ASSERT_TRUE(all_finite(zg));
    EXPECT_LT(rel_err(zg, zw), kTol);
}

#endif // DIMOO_WITH_CUDA

} // namespace
