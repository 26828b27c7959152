// test_cuda_forward.cpp - the CUDA forward against the CPU backend through
// the C ABI, on every checkpoint in testdata/ and the shipped small model:
// cache modes NONE, STORE and USE, several sequences batched in one call,
// random lengths (1 .. ~600, most not multiples of 64), chosen output rows
// and column ranges, row maxima, NaN-poisoned outputs. The weights are
// computed in bf16 on the GPU whatever the checkpoint's dtype, so the bound
// is bf16's: ||gpu - cpu|| / ||cpu|| <= 2e-2 per forward (more for the two
// checkpoints whose bf16 forward is measured to be further off; see below). ABI 4: forwards
// with kept logits and the decode steps over them through the C ABI, each
// backend against the CPU statements over its own rows (the CPU backend runs
// it alone without a GPU); CUDA graphs against the eager forward, bitwise.
// Skips without a GPU.
#include <gtest/gtest.h>

#ifndef DIMOO_WITH_CUDA
TEST(CudaForward, Skipped) { GTEST_SKIP() << "built without the CUDA backend"; }
#else

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "common.h"
#include "cpu/kept.h"
#include "cuda/cuda_model.h"
#include "dimoo.h"
#include "source_dir.h"
#include "test_checkpoint.h"
#include "test_tensors.h"

namespace {

using dimoo::test::Json;
using dimoo::test::read_file;
using dimoo::test::StTensor;

void load_safetensors(const std::string &path, std::map<std::string, StTensor> &out) {
    ASSERT_TRUE(dimoo::test::read_safetensors(path, out)) << path;
}

bool load_config(const std::string &dir, dimoo_model_config &c) {
    std::string raw;
    if (!read_file(dir + "/config.json", raw)) return false;
    c = dimoo_model_config{};
    c.rope_theta = 10000.f;
    c.rms_norm_eps = 1e-5f;
    Json j{raw};
    j.obj([&](const std::string &k) {
        j.ws();
        if (j.s[j.i] == '"' || j.s[j.i] == '{' || j.s[j.i] == '[' || j.s[j.i] == 't' || j.s[j.i] == 'f' ||
            j.s[j.i] == 'n') {
            j.skip();
            return;
        }
        const double v = j.num();
        if (k == "d_model") c.d_model = int32_t(v);
        else if (k == "n_layers") c.n_layers = int32_t(v);
        else if (k == "n_heads") c.n_heads = int32_t(v);
        else if (k == "n_kv_heads") c.n_kv_heads = int32_t(v);
        else if (k == "mlp_hidden_size") c.mlp_hidden_size = int32_t(v);
        else if (k == "vocab_size") c.vocab_size = int32_t(v);
        else if (k == "embedding_size") c.embedding_size = int32_t(v);
        else if (k == "max_sequence_length") c.max_sequence_length = int32_t(v);
        else if (k == "rope_theta") c.rope_theta = float(v);
        else if (k == "rms_norm_eps") c.rms_norm_eps = float(v);
    });
    if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
    if (c.embedding_size == 0) c.embedding_size = c.vocab_size;
    return c.d_model > 0;
}

// Both backends with the same checkpoint loaded.
struct Pair {
    dimoo_runtime *rt[2] = {};
    dimoo_model *m[2] = {};
    dimoo_model_config cfg{};
    ~Pair() {
        for (int i = 0; i < 2; i++) {
            dimoo_model_destroy(m[i]);
            dimoo_runtime_destroy(rt[i]);
        }
    }
};

// Every tensor of a checkpoint folder, sharded or not.
void read_checkpoint(const std::string &dir, std::map<std::string, StTensor> &ts) {
    std::string idx;
    if (read_file(dir + "/model.safetensors.index.json", idx)) {
        for (int s = 1; s <= 16; s++) { // shards are named model-0000s-of-0000n
            char name[64];
            for (int n = 1; n <= 16; n++) {
                std::snprintf(name, sizeof name, "/model-%05d-of-%05d.safetensors", s, n);
                std::ifstream f(dir + name);
                if (f) load_safetensors(dir + name, ts);
            }
        }
    } else {
        load_safetensors(dir + "/model.safetensors", ts);
    }
    ASSERT_FALSE(ts.empty()) << dir;
}

// Both backends loaded with the tensors ts under p.cfg.
void load_tensors(const std::map<std::string, StTensor> &ts, Pair &p) {
    char err[256];
    for (int b = 0; b < 2; b++) {
        ASSERT_EQ(dimoo_runtime_create(b == 0 ? DIMOO_BACKEND_CPU : DIMOO_BACKEND_CUDA, 0, 0, &p.rt[b], err, sizeof err),
                  DIMOO_OK)
            << err;
        ASSERT_EQ(dimoo_model_create(p.rt[b], &p.cfg, &p.m[b], err, sizeof err), DIMOO_OK) << err;
        for (auto &[name, t] : ts) {
            if (name.rfind("model.transformer.", 0) != 0) continue;
            const int32_t dt = t.dtype == "F32" ? DIMOO_F32 : t.dtype == "F16" ? DIMOO_F16 : DIMOO_BF16;
            ASSERT_EQ(dimoo_model_set_weight(p.m[b], name.c_str(), dt, t.shape.data(), int32_t(t.shape.size()),
                                             t.data.data(), t.data.size()),
                      DIMOO_OK)
                << dimoo_model_error(p.m[b]);
        }
        ASSERT_EQ(dimoo_model_finalize(p.m[b]), DIMOO_OK) << dimoo_model_error(p.m[b]);
    }
}

void load_pair(const std::string &dir, Pair &p) {
    ASSERT_TRUE(load_config(dir, p.cfg)) << dir;
    std::map<std::string, StTensor> ts;
    read_checkpoint(dir, ts);
    if (::testing::Test::HasFatalFailure()) return;
    load_tensors(ts, p);
}

// Random bf16 weights for p.cfg (matrices N(0, 1/fan_in), norms 1 + N(0, 0.1)).
void random_pair(Pair &p, uint32_t seed) {
    std::map<std::string, StTensor> ts;
    std::mt19937 rng(seed);
    for (const auto &[name, shape] : dimoo::test::checkpoint_tensors(p.cfg)) {
        StTensor t;
        t.dtype = "BF16";
        t.shape = shape;
        size_t n = 1;
        for (auto d : shape) n *= size_t(d);
        const bool norm = shape.size() == 1;
        std::normal_distribution<float> nd(norm ? 1.0f : 0.0f, norm ? 0.1f : 1.0f / std::sqrt(float(shape.back())));
        t.data.resize(n * 2);
        for (size_t i = 0; i < n; i++) {
            const uint16_t h = dimoo::f32_to_bf16(nd(rng));
            std::memcpy(&t.data[i * 2], &h, 2);
        }
        ts[name] = std::move(t);
    }
    load_tensors(ts, p);
}

double rel_err(const std::vector<float> &a, const std::vector<float> &ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        if (std::isnan(a[i])) return INFINITY;
        num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
        den += double(ref[i]) * ref[i];
    }
    return std::sqrt(num / std::max(den, 1e-300));
}

// One request as both backends see it; outputs start as NaN.
struct Req {
    int seq, mode;
    std::vector<int32_t> tokens, compute, out;
    int vb = 0, ve = 0;
    bool want_max = true;
    std::vector<float> logits[2], rmax[2];
};

void run_both(Pair &p, dimoo_ctx *ctx[2], std::vector<Req> &reqs, double bound, bool twice = false) {
    for (int b = 0; b < 2; b++) {
        std::vector<dimoo_forward_args> args;
        for (auto &r : reqs) {
            const int rows = r.out.empty() ? (r.mode == DIMOO_CACHE_USE ? int(r.compute.size()) : int(r.tokens.size()))
                                           : int(r.out.size());
            const int cols = (r.ve == 0 ? p.cfg.embedding_size : r.ve) - r.vb;
            r.logits[b].assign(size_t(rows) * cols, NAN);
            r.rmax[b].assign(size_t(rows), NAN);
            dimoo_forward_args a{};
            a.seq = r.seq;
            a.n_tokens = int32_t(r.tokens.size());
            a.tokens = r.tokens.data();
            a.cache_mode = r.mode;
            if (r.mode == DIMOO_CACHE_USE) {
                a.n_compute = int32_t(r.compute.size());
                a.compute = r.compute.data();
            }
            a.n_out = int32_t(r.out.size());
            a.out_positions = r.out.empty() ? nullptr : r.out.data();
            a.vocab_begin = r.vb;
            a.vocab_end = r.ve;
            a.logits = r.logits[b].data();
            a.row_max = r.want_max ? r.rmax[b].data() : nullptr;
            args.push_back(a);
        }
        ASSERT_EQ(dimoo_forward(ctx[b], args.data(), int32_t(args.size())), DIMOO_OK) << dimoo_ctx_error(ctx[b]);
    }
    if (twice) { // the GPU forward again on the same input: bitwise the same, or something races
        std::vector<std::vector<float>> first;
        for (auto &r : reqs) first.push_back(r.logits[1]);
        std::vector<dimoo_forward_args> args;
        for (auto &r : reqs) {
            dimoo_forward_args a{};
            a.seq = r.seq;
            a.n_tokens = int32_t(r.tokens.size());
            a.tokens = r.tokens.data();
            a.cache_mode = r.mode;
            a.n_out = int32_t(r.out.size());
            a.out_positions = r.out.empty() ? nullptr : r.out.data();
            a.vocab_begin = r.vb;
            a.vocab_end = r.ve;
            std::fill(r.logits[1].begin(), r.logits[1].end(), NAN);
            a.logits = r.logits[1].data();
            args.push_back(a);
        }
        ASSERT_EQ(dimoo_forward(ctx[1], args.data(), int32_t(args.size())), DIMOO_OK) << dimoo_ctx_error(ctx[1]);
        for (size_t i = 0; i < reqs.size(); i++)
            EXPECT_EQ(std::memcmp(first[i].data(), reqs[i].logits[1].data(), first[i].size() * 4), 0)
                << "two GPU forwards on the same input differ";
    }
    for (auto &r : reqs) {
        SCOPED_TRACE("seq " + std::to_string(r.seq) + " mode " + std::to_string(r.mode) + " T " +
                     std::to_string(r.tokens.size()));
        EXPECT_LT(rel_err(r.logits[1], r.logits[0]), bound);
        if (r.want_max) EXPECT_LT(rel_err(r.rmax[1], r.rmax[0]), bound);
    }
}

void check_pair(Pair &p, int max_t, double bound);

void check_model(const std::string &dir, int max_t, double bound = 2e-2) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    Pair p;
    load_pair(dir, p);
    if (::testing::Test::HasFatalFailure()) return;
    check_pair(p, max_t, bound);
}

void check_pair(Pair &p, int max_t, double bound) {
    max_t = std::min(max_t, p.cfg.max_sequence_length);
    // Fresh inputs every run; DIMOO_TEST_SEED=<the traced seed> reproduces a failure.
    const char *fixed = std::getenv("DIMOO_TEST_SEED");
    const unsigned seed = fixed ? unsigned(std::strtoul(fixed, nullptr, 10)) : std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    std::mt19937 rng(seed);
    dimoo_ctx *ctx[2] = {};
    dimoo_ctx_params cp{3, max_t, DIMOO_CTX_KV_CACHE};
    char err[256];
    for (int b = 0; b < 2; b++) ASSERT_EQ(dimoo_ctx_create(p.m[b], &cp, &ctx[b], err, sizeof err), DIMOO_OK) << err;
    auto tokens = [&](int T) {
        std::vector<int32_t> t(T);
        for (auto &x : t) x = int32_t(rng() % p.cfg.vocab_size);
        return t;
    };
    std::uniform_int_distribution<int> len(1, max_t);
    for (int T : {1, 7, 64, 65, 129, len(rng)}) { // one sequence, all rows and columns
        std::vector<Req> r(1);
        r[0] = Req{0, DIMOO_CACHE_NONE, tokens(T), {}, {}};
        run_both(p, ctx, r, bound, /*twice=*/true);
    }
    // Three sequences in one call: STORE, NONE and STORE, random lengths,
    // chosen rows and a column range on one.
    std::vector<Req> store(3);
    for (int s = 0; s < 3; s++) {
        store[s] = Req{s, s == 1 ? DIMOO_CACHE_NONE : DIMOO_CACHE_STORE, tokens(len(rng)), {}, {}};
    }
    for (int i = 0; i < int(store[1].tokens.size()); i += 3) store[1].out.push_back(i);
    store[1].vb = p.cfg.embedding_size / 3;
    store[1].ve = p.cfg.embedding_size - 5;
    run_both(p, ctx, store, bound);
    // USE on seqs 0 and 2: about 10% of the positions, changed tokens there.
    std::vector<Req> use(2);
    for (int k = 0; k < 2; k++) {
        Req &r = use[k];
        r.seq = k * 2;
        r.mode = DIMOO_CACHE_USE;
        r.tokens = store[size_t(k * 2)].tokens;
        for (int i = 0; i < int(r.tokens.size()); i++)
            if (rng() % 10 == 0 || i == 0) {
                r.compute.push_back(i);
                r.tokens[size_t(i)] = int32_t(rng() % p.cfg.vocab_size);
            }
        // Under USE only computed positions have logits: all of them, or some.
        if (k == 0) r.out = r.compute;
        else r.out.assign(r.compute.begin(), r.compute.begin() + long(std::max<size_t>(1, r.compute.size() / 2)));
    }
    run_both(p, ctx, use, bound);
    for (int b = 0; b < 2; b++) dimoo_ctx_destroy(ctx[b]);
}

std::string src(const char *rel) { return dimoo::test::source_path(rel); }

TEST(CudaForward, SmallF32) { check_model(src("testdata/small-f32"), 600); }
TEST(CudaForward, SmallBF16) { check_model(src("testdata/small-bf16"), 600); }
TEST(CudaForward, SmallGqaF16) { check_model(src("testdata/small-gqa-f16"), 600); }
// A correct bf16 forward is this far from float64 (PyTorch, the GPU's
// rounding pattern: scripts/bf16_forward_error.py --seeds 1000 --lengths
// 1,7,64, and 200 draws at 129, 300, 512). Short sequences vary the most,
// and these tests draw fresh tokens every run, so the bounds sit above the
// largest draw: small-f32/bf16/gqa-f16 at most 0.8% (bound 2e-2); the
// official code's random small checkpoint 5.0% (T = 7; 3.8% at T >= 64;
// bound 7e-2); the shipped model 6.3% (T = 7, 3000 draws; 5.0% at T = 1;
// bound 8e-2). The earlier bounds (5e-2, 3.5e-2), set from 8 draws, failed
// now and then: 3.7e-2 at T = 1 on the shipped model is a correct forward.
TEST(CudaForward, OfficialSmall) { check_model(src("testdata/official-small/checkpoint"), 600, 7e-2); }
// Two layers of two heads of 128 (the model's head dim), small elsewhere.
dimoo_model_config hd128_config(int kv_heads, int max_seq) {
    dimoo_model_config c{};
    c.d_model = 256;
    c.n_heads = 2;
    c.n_kv_heads = kv_heads;
    c.n_layers = 2;
    c.mlp_hidden_size = 512;
    c.vocab_size = c.embedding_size = 640;
    c.max_sequence_length = max_seq;
    c.rope_theta = 500000.f;
    c.rms_norm_eps = 1e-5f;
    return c;
}

// Head dim 128, the real model's, which the sm_90a attention kernels serve
// (DIMOO_CUDA_ATTN=sm90|sm90p; device-check runs this file under each):
// random bf16 weights, two heads of 128, grouped K/V in a second config.
TEST(CudaForward, RandomHeadDim128) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    for (int kv_heads : {2, 1}) {
        SCOPED_TRACE("kv heads " + std::to_string(kv_heads));
        Pair p;
        p.cfg = hd128_config(kv_heads, 1024);
        random_pair(p, 17 + uint32_t(kv_heads));
        if (::testing::Test::HasFatalFailure()) return;
        check_pair(p, 300, 2e-2);
    }
}

// Lengths up to 5000 (random each run, and 1, 7, 64, 65, 129): the forward
// with the image-sized attention and K/V tails, batched, STORE and USE.
TEST(CudaForward, RandomLongSequences) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
#ifdef DIMOO_CUDA_EMU
    GTEST_SKIP() << "minutes of emulated attention: run on a GPU";
#else
    Pair p;
    p.cfg = hd128_config(2, 5000);
    random_pair(p, 23);
    if (::testing::Test::HasFatalFailure()) return;
    check_pair(p, 5000, 2e-2);
#endif
}

TEST(CudaForward, ShippedSmallModel) { check_model(src("models/dimoo-small"), 512, 8e-2); }

// ---- kept logits through the C ABI (ABI 4) ----------------------------------------
//
// On each backend: forwards with keep (NONE and STORE over chosen rows,
// every row in order, then USE on a compute subset, which scatters rows to
// their old slots), with host copies of the same rows, then dimoo_image_step,
// dimoo_text_step and dimoo_cache_select. A backend's decisions must equal
// the CPU statements (cpu::HostKept) over the rows it returned: the CUDA
// forward's logits differ from the CPU's by bf16 rounding, so the two
// backends are compared on logits (2e-2), and on decisions at the Ctx level
// (test_cuda_sampler.cpp). A keep-only forward (no host copy) must leave the
// same rows as the same forward with one. Outputs start poisoned. Without a
// GPU the CPU backend runs it alone (the harness's own check).

void load_one(const std::string &dir, int32_t backend, dimoo_runtime **rt, dimoo_model **m, dimoo_model_config &cfg) {
    ASSERT_TRUE(load_config(dir, cfg)) << dir;
    std::map<std::string, StTensor> ts;
    read_checkpoint(dir, ts);
    if (::testing::Test::HasFatalFailure()) return;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(backend, 0, 0, rt, err, sizeof err), DIMOO_OK) << err;
    ASSERT_EQ(dimoo_model_create(*rt, &cfg, m, err, sizeof err), DIMOO_OK) << err;
    for (auto &[name, t] : ts) {
        if (name.rfind("model.transformer.", 0) != 0) continue;
        const int32_t dt = t.dtype == "F32" ? DIMOO_F32 : t.dtype == "F16" ? DIMOO_F16 : DIMOO_BF16;
        ASSERT_EQ(dimoo_model_set_weight(*m, name.c_str(), dt, t.shape.data(), int32_t(t.shape.size()), t.data.data(),
                                         t.data.size()),
                  DIMOO_OK)
            << dimoo_model_error(*m);
    }
    ASSERT_EQ(dimoo_model_finalize(*m), DIMOO_OK) << dimoo_model_error(*m);
}

constexpr int kKeptSeqs = 3, kKeptMaxT = 200, kKeptRows = 180, kKeptCols = 1000;

// What a seq's kept rows hold, by position, from the host copies.
struct Mirror {
    int vb = 0, ve = 0;
    std::map<int, std::vector<float>> rows;
};

struct KeptFwd {
    int seq, mode;
    std::vector<int32_t> tokens, compute, out;
    int vb, ve;
    bool host = true, want_max = true;
    std::vector<float> logits, rmax; // host copies
};

// A decision, for the comparison with the statement.
struct Decision {
    std::string what;
    std::vector<int32_t> ints;
    std::vector<double> conf;
};

class AbiKept {
public:
    AbiKept(dimoo_model *m, dimoo_model_config cfg) : cfg_(cfg) {
        dimoo_ctx_params p{};
        p.n_seqs = kKeptSeqs, p.max_tokens = kKeptMaxT, p.flags = DIMOO_CTX_KV_CACHE, p.keep_rows = kKeptRows;
        p.keep_cols = kKeptCols;
        char err[256];
        EXPECT_EQ(dimoo_ctx_create(m, &p, &ctx_, err, sizeof err), DIMOO_OK) << err;
        EXPECT_GE(dimoo_ctx_bytes(ctx_), int64_t(kKeptSeqs) * kKeptRows * kKeptCols * 4);
    }
    ~AbiKept() { dimoo_ctx_destroy(ctx_); }

    void forward(std::vector<KeptFwd> &f) {
        std::vector<dimoo_forward_args> args;
        for (auto &r : f) {
            const int rows = r.out.empty() ? int(r.mode == DIMOO_CACHE_USE ? r.compute.size() : r.tokens.size())
                                           : int(r.out.size());
            r.logits.assign(size_t(rows) * (r.ve - r.vb), NAN);
            r.rmax.assign(size_t(rows), NAN);
            dimoo_forward_args a{};
            a.seq = r.seq, a.n_tokens = int32_t(r.tokens.size()), a.tokens = r.tokens.data(), a.cache_mode = r.mode;
            if (r.mode == DIMOO_CACHE_USE) a.n_compute = int32_t(r.compute.size()), a.compute = r.compute.data();
            a.n_out = int32_t(r.out.size()), a.out_positions = r.out.empty() ? nullptr : r.out.data();
            a.vocab_begin = r.vb, a.vocab_end = r.ve, a.keep = 1;
            a.logits = r.host ? r.logits.data() : nullptr;
            a.row_max = r.host && r.want_max ? r.rmax.data() : nullptr;
            args.push_back(a);
        }
        ASSERT_EQ(dimoo_forward(ctx_, args.data(), int32_t(args.size())), DIMOO_OK) << dimoo_ctx_error(ctx_);
        for (auto &r : f) {
            if (!r.host) continue; // a keep-only repeat of a forward: the rows must be the same
            const int cols = r.ve - r.vb, rows = int(r.rmax.size());
            Mirror &mi = mirror_[r.seq];
            if (r.mode != DIMOO_CACHE_USE || mi.vb != r.vb || mi.ve != r.ve) mi.rows.clear();
            mi.vb = r.vb, mi.ve = r.ve;
            for (int j = 0; j < rows; j++) {
                const int pos = r.out.empty() ? (r.mode == DIMOO_CACHE_USE ? r.compute[j] : j) : r.out[j];
                std::vector<float> row(r.logits.begin() + long(j) * cols, r.logits.begin() + long(j + 1) * cols);
                for (float v : row) ASSERT_FALSE(std::isnan(v)) << "logits not written, seq " << r.seq << " row " << j;
                if (r.want_max) ASSERT_EQ(r.rmax[j], *std::max_element(row.begin(), row.end())) << "row max, row " << j;
                mi.rows[pos] = std::move(row);
            }
        }
    }

    // The statement over the mirrored rows (slot = position).
    std::unique_ptr<dimoo::cpu::HostKept> reference() const {
        auto ref = std::make_unique<dimoo::cpu::HostKept>(kKeptSeqs, kKeptMaxT, kKeptMaxT, kKeptCols, 1 << 18);
        for (int s = 0; s < kKeptSeqs; s++) {
            const Mirror &mi = mirror_[s];
            for (auto &[pos, row] : mi.rows) {
                const int32_t slot = pos;
                ref->write(s, &slot, 1, int(row.size()), row.data(), nullptr);
            }
        }
        if (!mask_.empty()) ref->set_token_mask(mask_.data(), int(mask_.size()));
        return ref;
    }

    void mask(const std::vector<uint8_t> &m) {
        ASSERT_EQ(dimoo_ctx_set_token_mask(ctx_, m.data(), int32_t(m.size())), DIMOO_OK) << dimoo_ctx_error(ctx_);
        mask_ = m;
    }

    // dimoo_image_step over seqs 0..nb-1 at the given offsets; checks it
    // against the statement and returns the decision.
    Decision image(int nb, const int *offsets, const std::vector<int32_t> &masked, float tau, int m, int step) {
        Decision d;
        d.what = "image nb=" + std::to_string(nb) + " tau=" + std::to_string(tau) + " n_select=" + std::to_string(m);
        dimoo_image_step_args a{};
        a.n_branches = nb;
        for (int b = 0; b < nb; b++) a.seqs[b] = b, a.offsets[b] = offsets[b], a.weights[b] = b == 0 ? 1.0f + 1.2f * (nb - 1) : -1.2f;
        a.n_pos = int32_t(masked.size()), a.masked = masked.data(), a.step = step, a.seed = 777 + uint64_t(step);
        a.temperature = tau, a.n_select = m;
        const int len = m ? m : a.n_pos;
        std::vector<int32_t> sel(std::max(m, 1), -7), codes(len, -7), rsel(std::max(m, 1), -9), rcodes(len, -9);
        std::vector<double> conf(len, NAN), rconf(len, NAN);
        a.out_selected = m ? sel.data() : nullptr, a.out_codes = codes.data(), a.out_conf = conf.data();
        EXPECT_EQ(dimoo_image_step(ctx_, &a), DIMOO_OK) << dimoo_ctx_error(ctx_);
        // The statement: slots are positions there.
        auto ref = reference();
        dimoo_image_step_args ra = a;
        ra.out_selected = m ? rsel.data() : nullptr, ra.out_codes = rcodes.data(), ra.out_conf = rconf.data();
        dimoo::ImageStepCall c{};
        c.a = &ra;
        c.n_codes = mirror_[0].ve - mirror_[0].vb;
        std::vector<std::vector<int32_t>> slots(nb, std::vector<int32_t>(masked.size()));
        std::vector<int32_t> index(masked.size());
        for (int b = 0; b < nb; b++) {
            for (size_t i = 0; i < masked.size(); i++) slots[b][i] = offsets[b] + masked[i];
            c.slots[b] = slots[b].data();
        }
        for (size_t i = 0; i < masked.size(); i++) index[i] = offsets[0] + masked[i];
        c.top_index = index.data();
        ref->image_step(c);
        if (m) d.ints.assign(sel.begin(), sel.end());
        d.ints.insert(d.ints.end(), codes.begin(), codes.end());
        d.conf = conf;
        std::vector<int32_t> want;
        if (m) want.assign(rsel.begin(), rsel.end());
        want.insert(want.end(), rcodes.begin(), rcodes.end());
        EXPECT_EQ(d.ints, want) << d.what;
        for (int i = 0; i < len; i++)
            EXPECT_NEAR(conf[i], rconf[i], 1e-12 * std::max(1.0, std::fabs(rconf[i]))) << d.what << " at " << i;
        return d;
    }

    Decision text(bool guided, double cfg, double tau, bool use_mask, int m, bool all, const std::vector<int32_t> &pos,
                  int step) {
        Decision d;
        d.what = "text guided=" + std::to_string(guided) + " mask=" + std::to_string(use_mask) + " tau=" +
                 std::to_string(tau) + " n_select=" + std::to_string(m);
        dimoo_text_step_args a{};
        a.seq = 0, a.uncond_seq = guided ? 1 : -1, a.cfg_scale = cfg, a.temperature = tau, a.step = step;
        a.seed = 4242 + uint64_t(step), a.use_mask = use_mask, a.n_pos = int32_t(pos.size()), a.positions = pos.data();
        a.n_select = m;
        std::vector<int32_t> op(std::max(m, 1), -7), ot(std::max(m, 1), -7), at(pos.size(), -7);
        std::vector<int32_t> rop(std::max(m, 1), -9), rot(std::max(m, 1), -9), rat(pos.size(), -9);
        a.out_positions = op.data(), a.out_tokens = ot.data(), a.out_all_tokens = all ? at.data() : nullptr;
        EXPECT_EQ(dimoo_text_step(ctx_, &a), DIMOO_OK) << dimoo_ctx_error(ctx_);
        auto ref = reference();
        dimoo_text_step_args ra = a;
        ra.out_positions = rop.data(), ra.out_tokens = rot.data(), ra.out_all_tokens = all ? rat.data() : nullptr;
        dimoo::TextStepCall c{};
        c.a = &ra, c.n_cols = mirror_[0].ve - mirror_[0].vb, c.vocab_begin = mirror_[0].vb, c.slots = pos.data();
        c.uncond_slots = guided ? pos.data() : nullptr;
        ref->text_step(c);
        d.ints.assign(op.begin(), op.begin() + m);
        d.ints.insert(d.ints.end(), ot.begin(), ot.begin() + m);
        if (all) d.ints.insert(d.ints.end(), at.begin(), at.end());
        std::vector<int32_t> want(rop.begin(), rop.begin() + m);
        want.insert(want.end(), rot.begin(), rot.begin() + m);
        if (all) want.insert(want.end(), rat.begin(), rat.end());
        EXPECT_EQ(d.ints, want) << d.what;
        return d;
    }

    Decision cache(int seq, int n, double q) {
        Decision d;
        d.what = "cache seq=" + std::to_string(seq) + " n=" + std::to_string(n) + " q=" + std::to_string(q);
        std::vector<int32_t> out(n, -7), rout(n, -9), slots(n);
        int32_t k = -1;
        EXPECT_EQ(dimoo_cache_select(ctx_, seq, n, q, out.data(), &k), DIMOO_OK) << dimoo_ctx_error(ctx_);
        for (int p = 0; p < n; p++) slots[p] = p;
        const int rk = reference()->cache_select(seq, slots.data(), n, q, rout.data());
        EXPECT_EQ(k, rk) << d.what;
        d.ints.assign(out.begin(), out.begin() + std::max(k, 0));
        EXPECT_EQ(d.ints, std::vector<int32_t>(rout.begin(), rout.begin() + rk)) << d.what;
        return d;
    }

    dimoo_ctx *ctx_ = nullptr;

private:
    dimoo_model_config cfg_;
    Mirror mirror_[kKeptSeqs];
    std::vector<uint8_t> mask_;
};

// The scenario on one backend; host logits of every forward go to `logits`
// (for the comparison across backends), decisions to `dec`.
void kept_scenario(dimoo_model *m, const dimoo_model_config &cfg, std::vector<std::vector<float>> &logits,
                   std::vector<Decision> &dec) {
    AbiKept k(m, cfg);
    std::mt19937 rng(606);
    auto toks = [&](int T) {
        std::vector<int32_t> t(T);
        for (auto &x : t) x = int32_t(rng() % unsigned(cfg.vocab_size));
        return t;
    };
    auto range = [](int a, int b) {
        std::vector<int32_t> v;
        for (int p = a; p < b; p++) v.push_back(p);
        return v;
    };
    auto subset = [&](int a, int b, int percent) {
        std::vector<int32_t> v;
        for (int p = a; p < b; p++)
            if (int(rng() % 100) < percent) v.push_back(p);
        if (v.empty()) v.push_back(a);
        return v;
    };
    const int ib = cfg.vocab_size - 512, ie = cfg.vocab_size; // "image codes": the last 512 ids
    const int offsets[3] = {20, 0, 10}, T[3] = {150, 120, 130};
    std::vector<int32_t> tok[3] = {toks(T[0]), toks(T[1]), toks(T[2])};
    auto record = [&](std::vector<KeptFwd> &f) {
        for (auto &r : f)
            if (r.host) logits.push_back(r.logits);
    };
    // 1: STORE over the answer rows, NONE over every row (in order, no row
    // max asked), STORE over the answer rows.
    std::vector<KeptFwd> f1 = {
        {0, DIMOO_CACHE_STORE, tok[0], {}, range(20, 120), ib, ie},
        {1, DIMOO_CACHE_NONE, tok[1], {}, {}, ib, ie, true, false},
        {2, DIMOO_CACHE_STORE, tok[2], {}, range(10, 110), ib, ie},
    };
    k.forward(f1);
    if (::testing::Test::HasFatalFailure()) return;
    record(f1);
    const std::vector<int32_t> masked = subset(0, 100, 40);
    int step = 0;
    for (int nb = 1; nb <= 3; nb++)
        for (float tau : {0.0f, 1.0f})
            for (int ms : {0, int(masked.size()) / 3 + 1}) dec.push_back(k.image(nb, offsets, masked, tau, ms, step++));
    // 1 again, keep only: the same rows, so the same decisions.
    for (auto &r : f1) r.host = false;
    k.forward(f1);
    const Decision again = k.image(3, offsets, masked, 1.0f, int(masked.size()) / 3 + 1, step - 1);
    EXPECT_EQ(again.ints, dec.back().ints) << "a keep-only forward kept other rows";
    // 2: ML-Cache USE on seqs 0 and 2 with changed tokens at the computed
    // positions; their answer rows are kept (at their old, scattered slots).
    std::vector<KeptFwd> f2;
    for (int s : {0, 2}) {
        KeptFwd r{s, DIMOO_CACHE_USE, tok[s], subset(0, T[s], 20), {}, ib, ie};
        for (int p : r.compute) r.tokens[size_t(p)] = int32_t(rng() % unsigned(cfg.vocab_size));
        for (int p : r.compute)
            if (p >= offsets[s] && p < offsets[s] + 100) r.out.push_back(p);
        if (r.out.empty()) {
            r.compute.insert(std::lower_bound(r.compute.begin(), r.compute.end(), offsets[s] + 3), offsets[s] + 3);
            r.compute.erase(std::unique(r.compute.begin(), r.compute.end()), r.compute.end());
            r.out.push_back(offsets[s] + 3);
        }
        f2.push_back(r);
    }
    k.forward(f2);
    if (::testing::Test::HasFatalFailure()) return;
    record(f2);
    for (int nb : {2, 3})
        for (int ms : {0, int(masked.size()) / 2}) dec.push_back(k.image(nb, offsets, masked, 1.0f, ms, step++));
    for (int n : {120, 64, 1})
        for (double q : {0.1, 0.5, 0.9}) dec.push_back(k.cache(1, n, q));
    // 3: text rows over ids [0, vocab) of seqs 0 and 1, every position.
    std::vector<KeptFwd> f3 = {
        {0, DIMOO_CACHE_NONE, tok[0], {}, {}, 0, cfg.vocab_size},
        {1, DIMOO_CACHE_NONE, tok[1], {}, {}, 0, cfg.vocab_size},
    };
    k.forward(f3);
    if (::testing::Test::HasFatalFailure()) return;
    record(f3);
    std::vector<uint8_t> mask(900);
    for (auto &v : mask) v = rng() % 2;
    k.mask(mask);
    const std::vector<int32_t> pos = subset(0, 120, 50);
    for (bool guided : {false, true})
        for (bool use_mask : {false, true})
            for (double tau : {0.0, 1.0})
                for (int ms : {0, 4})
                    dec.push_back(k.text(guided, guided ? 0.7 : 0.0, tau, use_mask, ms, ms == 0 || use_mask, pos, step++));
    for (double q : {0.2, 0.8}) dec.push_back(k.cache(0, 150, q));
}

void check_kept(const std::string &dir) {
    const bool gpu = dimoo::cuda_device_count() > 0;
    std::vector<std::vector<float>> logits[2];
    std::vector<Decision> dec[2];
    for (int b = 0; b < (gpu ? 2 : 1); b++) {
        SCOPED_TRACE(b == 0 ? "cpu" : "cuda");
        dimoo_runtime *rt = nullptr;
        dimoo_model *m = nullptr;
        dimoo_model_config cfg{};
        load_one(dir, b == 0 ? DIMOO_BACKEND_CPU : DIMOO_BACKEND_CUDA, &rt, &m, cfg);
        if (!::testing::Test::HasFatalFailure()) kept_scenario(m, cfg, logits[b], dec[b]);
        dimoo_model_destroy(m);
        dimoo_runtime_destroy(rt);
        if (::testing::Test::HasFatalFailure()) return;
    }
    if (!gpu) GTEST_SKIP() << "no CUDA device: the CPU backend ran the scenario alone";
    ASSERT_EQ(logits[0].size(), logits[1].size());
    for (size_t i = 0; i < logits[0].size(); i++) EXPECT_LT(rel_err(logits[1][i], logits[0][i]), 2e-2) << "forward " << i;
    // Decisions on slightly different logits: reported, not required equal.
    size_t same = 0;
    for (size_t i = 0; i < dec[0].size(); i++) same += dec[0][i].ints == dec[1][i].ints;
    std::printf("kept steps: %zu of %zu decisions identical on the CPU and CUDA forwards' logits\n", same, dec[0].size());
}

TEST(CudaForward, KeptStepsSmallBF16) { check_kept(src("testdata/small-bf16")); }

// ---- CUDA graphs ---------------------------------------------------------------------
//
// The same forward sequence on two CUDA contexts, one made with
// DIMOO_CUDA_GRAPHS=0: logits and row maxima bitwise equal, the kept rows too
// (an image step over them decides the same, bit for bit); the graph context
// captured and replayed, and no capture failed.

std::unique_ptr<dimoo::Model> cuda_model(dimoo::Backend &be, const std::string &dir, dimoo_model_config &cfg) {
    EXPECT_TRUE(load_config(dir, cfg)) << dir;
    std::map<std::string, StTensor> ts;
    read_checkpoint(dir, ts);
    const dimoo::ModelShape shape(cfg);
    auto m = be.create_model(shape);
    for (auto &[name, t] : ts) {
        if (name.rfind("model.transformer.", 0) != 0) continue;
        const int32_t dt = t.dtype == "F32" ? DIMOO_F32 : t.dtype == "F16" ? DIMOO_F16 : DIMOO_BF16;
        m->set_weight(shape.parse_name(name), dt, t.data.data(), t.data.size());
    }
    m->finalize();
    return m;
}

// Two contexts of m: ctx[0] with CUDA graphs off (DIMOO_CUDA_GRAPHS=0 at
// its creation), ctx[1] with them on; the variable is restored after.
void contexts_without_and_with_graphs(dimoo::Model &m, const dimoo_ctx_params &p, std::unique_ptr<dimoo::Ctx> (&ctx)[2]) {
    const char *was = std::getenv("DIMOO_CUDA_GRAPHS");
    const std::string saved = was ? was : "";
    setenv("DIMOO_CUDA_GRAPHS", "0", 1);
    ctx[0] = m.create_ctx(p);
    unsetenv("DIMOO_CUDA_GRAPHS");
    ctx[1] = m.create_ctx(p);
    if (was) setenv("DIMOO_CUDA_GRAPHS", saved.c_str(), 1);
}

TEST(CudaForward, GraphsEqualEagerBitwise) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    auto be = dimoo::make_cuda_backend(0);
    dimoo_model_config cfg{};
    auto m = cuda_model(*be, src("testdata/small-gqa-f16"), cfg);
    const int maxT = 128;
    dimoo_ctx_params p{};
    p.n_seqs = 2, p.max_tokens = maxT, p.flags = DIMOO_CTX_KV_CACHE, p.keep_rows = maxT, p.keep_cols = cfg.embedding_size;
    std::unique_ptr<dimoo::Ctx> ctx[2]; // 0: graphs off, 1: on
    contexts_without_and_with_graphs(*m, p, ctx);
    std::mt19937 rng(77);
    const int T[2] = {97, 64};
    std::vector<int32_t> tok[2];
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < T[s]; i++) tok[s].push_back(int32_t(rng() % unsigned(cfg.vocab_size)));
    std::atomic<bool> cancel{false};
    int forwards = 0;
    // mode, then per seq the compute positions (USE) and the slots of the kept rows.
    auto both = [&](int mode, bool keep, int vb, int ve) {
        std::vector<int32_t> comp[2], slots[2];
        std::vector<int32_t> toks[2] = {tok[0], tok[1]};
        for (int s = 0; s < 2; s++) {
            if (mode == DIMOO_CACHE_USE) {
                for (int i = 0; i < T[s]; i++)
                    if (int(comp[s].size()) < 9 + 4 * (1 - s) && rng() % 5 == 0) comp[s].push_back(i);
                while (int(comp[s].size()) < 9 + 4 * (1 - s)) { // fixed counts: the same graph key every step
                    const int extra = int(rng() % unsigned(T[s]));
                    if (!std::binary_search(comp[s].begin(), comp[s].end(), extra))
                        comp[s].insert(std::lower_bound(comp[s].begin(), comp[s].end(), extra), extra);
                }
                for (int i : comp[s]) toks[s][size_t(i)] = int32_t(rng() % unsigned(cfg.vocab_size));
                slots[s] = comp[s]; // slot = position: scattered
            } else {
                for (int i = 0; i < T[s]; i++) slots[s].push_back(i); // in order
            }
        }
        std::vector<float> lg[2][2], mx[2][2];
        for (int c = 0; c < 2; c++) {
            dimoo_forward_args a[2] = {};
            const int32_t *ks[2] = {};
            for (int s = 0; s < 2; s++) {
                const int rows = mode == DIMOO_CACHE_USE ? int(comp[s].size()) : T[s];
                lg[c][s].assign(size_t(rows) * (ve - vb), NAN);
                mx[c][s].assign(size_t(rows), NAN);
                a[s].seq = s, a[s].n_tokens = T[s], a[s].tokens = toks[s].data(), a[s].cache_mode = mode;
                if (mode == DIMOO_CACHE_USE) {
                    a[s].n_compute = int32_t(comp[s].size()), a[s].compute = comp[s].data();
                    a[s].n_out = a[s].n_compute, a[s].out_positions = comp[s].data();
                }
                a[s].vocab_begin = vb, a[s].vocab_end = ve, a[s].logits = lg[c][s].data(), a[s].row_max = mx[c][s].data();
                a[s].keep = keep;
                ks[s] = keep ? slots[s].data() : nullptr;
            }
            ctx[c]->forward(a, 2, cancel, ks);
        }
        for (int s = 0; s < 2; s++) {
            ASSERT_EQ(0, std::memcmp(lg[0][s].data(), lg[1][s].data(), lg[0][s].size() * 4))
                << "forward " << forwards << " seq " << s << ": logits differ with graphs";
            ASSERT_EQ(0, std::memcmp(mx[0][s].data(), mx[1][s].data(), mx[0][s].size() * 4));
            for (float v : lg[1][s]) ASSERT_FALSE(std::isnan(v));
        }
        forwards++;
    };
    for (int rep = 0; rep < 3; rep++) both(DIMOO_CACHE_NONE, false, 0, 0 + cfg.embedding_size);
    both(DIMOO_CACHE_STORE, true, 100, 400);
    for (int rep = 0; rep < 4; rep++) both(DIMOO_CACHE_USE, true, 100, 400);
    if (::testing::Test::HasFatalFailure()) return;
    // The kept rows: an image step over them, every position, on both.
    std::vector<int32_t> masked;
    for (int i = 0; i < 60; i++) masked.push_back(i);
    std::vector<int32_t> out[2];
    std::vector<double> conf[2];
    for (int c = 0; c < 2; c++) {
        dimoo_image_step_args a{};
        a.n_branches = 2, a.seqs[0] = 0, a.seqs[1] = 1, a.offsets[0] = 30, a.offsets[1] = 0;
        a.weights[0] = 2.0f, a.weights[1] = -1.0f, a.n_pos = 60, a.masked = masked.data(), a.step = 3, a.seed = 5;
        a.temperature = 1.0f;
        out[c].assign(60, -1), conf[c].assign(60, NAN);
        a.out_codes = out[c].data(), a.out_conf = conf[c].data();
        dimoo::ImageStepCall call{};
        call.a = &a;
        call.n_codes = 300;
        std::vector<int32_t> s0(60), s1(60), index(60);
        for (int i = 0; i < 60; i++) s0[i] = 30 + i, s1[i] = i, index[i] = 30 + i;
        call.slots[0] = s0.data(), call.slots[1] = s1.data(), call.top_index = index.data();
        ctx[c]->image_step(call);
    }
    EXPECT_EQ(out[0], out[1]);
    EXPECT_EQ(0, std::memcmp(conf[0].data(), conf[1].data(), 60 * 8));
    const dimoo::CudaGraphStats off = dimoo::cuda_graph_stats(*ctx[0]), on = dimoo::cuda_graph_stats(*ctx[1]);
    EXPECT_FALSE(off.enabled);
    EXPECT_EQ(off.captured + off.replayed, 0);
    EXPECT_TRUE(on.enabled);
    EXPECT_EQ(on.failed, 0);
    EXPECT_EQ(on.captured, 2); // NONE x3 and USE x4 repeat; STORE does not
    EXPECT_EQ(on.replayed, 2 + 3); // from the second of each on
    EXPECT_EQ(on.held, 2);
}

// DIMOO_CUDA_GEMM_TUNE: timing cuBLASLt's candidates at a shape's first run
// leaves the forward's results as they were. The accumulating projections
// (x += ...) are timed into a scratch buffer: timed in place, each timed
// run would add the product to the residual stream once more. Two contexts,
// the second tuning every shape; the same STORE then USE forwards on both.
// The host emulation's candidates compute alike, so there the logits are
// bitwise equal; on a GPU another candidate may sum in another order.
TEST(CudaForward, GemmTuningLeavesTheForward) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    auto be = dimoo::make_cuda_backend(0);
    dimoo_model_config cfg{};
    auto m = cuda_model(*be, src("testdata/small-gqa-f16"), cfg);
    dimoo_ctx_params p{};
    p.n_seqs = 2, p.max_tokens = 128, p.flags = DIMOO_CTX_KV_CACHE;
    std::unique_ptr<dimoo::Ctx> ctx[2];
    {
        const char *was = std::getenv("DIMOO_CUDA_GEMM_TUNE");
        const std::string saved = was ? was : "";
        unsetenv("DIMOO_CUDA_GEMM_TUNE");
        ctx[0] = m->create_ctx(p);
        setenv("DIMOO_CUDA_GEMM_TUNE", "1", 1);
        ctx[1] = m->create_ctx(p);
        if (was) setenv("DIMOO_CUDA_GEMM_TUNE", saved.c_str(), 1);
        else unsetenv("DIMOO_CUDA_GEMM_TUNE");
    }
    std::mt19937 rng(5);
    const int T[2] = {97, 64};
    std::vector<int32_t> tok[2], comp = {3, 17, 40, 41, 60};
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < T[s]; i++) tok[s].push_back(int32_t(rng() % unsigned(cfg.vocab_size)));
    std::atomic<bool> cancel{false};
    for (int mode : {DIMOO_CACHE_STORE, DIMOO_CACHE_USE}) {
        std::vector<float> lg[2][2];
        for (int c = 0; c < 2; c++) {
            dimoo_forward_args a[2] = {};
            for (int s = 0; s < 2; s++) {
                a[s].seq = s, a[s].n_tokens = T[s], a[s].tokens = tok[s].data(), a[s].cache_mode = mode;
                if (mode == DIMOO_CACHE_USE) {
                    a[s].n_compute = a[s].n_out = int32_t(comp.size());
                    a[s].compute = a[s].out_positions = comp.data();
                }
                const int rows = mode == DIMOO_CACHE_USE ? int(comp.size()) : T[s];
                lg[c][s].assign(size_t(rows) * cfg.embedding_size, NAN);
                a[s].vocab_begin = 0, a[s].vocab_end = cfg.embedding_size, a[s].logits = lg[c][s].data();
            }
            ctx[c]->forward(a, 2, cancel, nullptr);
        }
        for (int s = 0; s < 2; s++) {
            SCOPED_TRACE("mode " + std::to_string(mode) + " seq " + std::to_string(s));
            for (float v : lg[1][s]) ASSERT_TRUE(std::isfinite(v));
#ifdef DIMOO_CUDA_EMU
            EXPECT_EQ(0, std::memcmp(lg[0][s].data(), lg[1][s].data(), lg[0][s].size() * 4));
#else
            EXPECT_LT(rel_err(lg[1][s], lg[0][s]), 1e-2);
#endif
        }
    }
    const dimoo::CudaGemmStats off = dimoo::cuda_gemm_stats(*ctx[0]), on = dimoo::cuda_gemm_stats(*ctx[1]);
    EXPECT_EQ(off.tuned, 0);
    // The STORE and USE forwards' four projections each; the head is never
    // tuned (its row count changes at every decode step).
    EXPECT_EQ(on.tuned, 8);
}

// A replayed layer stack reads the K/V of the cache slots its call names:
// USE forwards on slots (0, 1), then (1, 2), then (0, 1) again, each twice
// (same shapes, so a graph is captured and replayed), with graphs and
// without, bitwise. At head dim 128 on an sm_90 with DIMOO_CUDA_ATTN=sm90t
// (or the other TMA kernels), the attention kernel's tensor maps hold the slots' addresses:
// the graph key must tell the slots apart there.
TEST(CudaForward, GraphsFollowTheCacheSlots) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    auto be = dimoo::make_cuda_backend(0);
    dimoo_model_config cfg{};
    cfg.d_model = 256, cfg.n_heads = 2, cfg.n_kv_heads = 2, cfg.n_layers = 2, cfg.mlp_hidden_size = 512;
    cfg.vocab_size = cfg.embedding_size = 640, cfg.max_sequence_length = 1024;
    cfg.rope_theta = 500000.f, cfg.rms_norm_eps = 1e-5f;
    const dimoo::ModelShape shape(cfg);
    auto m = be->create_model(shape);
    std::mt19937 rng(91);
    for (const auto &[name, dims] : dimoo::test::checkpoint_tensors(cfg)) {
        if (name.rfind("model.transformer.", 0) != 0) continue;
        size_t n = 1;
        for (auto d : dims) n *= size_t(d);
        const bool norm = dims.size() == 1;
        std::normal_distribution<float> nd(norm ? 1.0f : 0.0f, norm ? 0.1f : 1.0f / std::sqrt(float(dims.back())));
        std::vector<uint16_t> w(n);
        for (auto &x : w) x = dimoo::f32_to_bf16(nd(rng));
        m->set_weight(shape.parse_name(name), DIMOO_BF16, w.data(), n * 2);
    }
    m->finalize();
    const int T = 150, n_comp = 20;
    dimoo_ctx_params p{};
    p.n_seqs = 3, p.max_tokens = T, p.flags = DIMOO_CTX_KV_CACHE;
    std::unique_ptr<dimoo::Ctx> ctx[2]; // 0: graphs off, 1: on
    contexts_without_and_with_graphs(*m, p, ctx);
    std::atomic<bool> cancel{false};
    // Each slot's cache from a different prompt.
    std::vector<int32_t> tok[3];
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < T; i++) tok[s].push_back(int32_t(rng() % unsigned(cfg.vocab_size)));
        for (int c = 0; c < 2; c++) {
            dimoo_forward_args a{};
            a.seq = s, a.n_tokens = T, a.tokens = tok[s].data(), a.cache_mode = DIMOO_CACHE_STORE;
            ctx[c]->forward(&a, 1, cancel, nullptr);
        }
    }
    std::vector<int32_t> comp;
    for (int i = 0; i < n_comp; i++) comp.push_back(i * 7);
    const int pairs[6][2] = {{0, 1}, {0, 1}, {1, 2}, {1, 2}, {0, 1}, {0, 1}};
    for (int f = 0; f < 6; f++) {
        std::vector<float> lg[2][2];
        for (int c = 0; c < 2; c++) {
            dimoo_forward_args a[2] = {};
            for (int b = 0; b < 2; b++) {
                const int s = pairs[f][b];
                lg[c][b].assign(size_t(n_comp) * cfg.vocab_size, NAN);
                a[b].seq = s, a[b].n_tokens = T, a[b].tokens = tok[s].data(), a[b].cache_mode = DIMOO_CACHE_USE;
                a[b].n_compute = n_comp, a[b].compute = comp.data(), a[b].n_out = n_comp, a[b].out_positions = comp.data();
                a[b].vocab_begin = 0, a[b].vocab_end = cfg.vocab_size, a[b].logits = lg[c][b].data();
            }
            ctx[c]->forward(a, 2, cancel, nullptr);
        }
        for (int b = 0; b < 2; b++) {
            for (float v : lg[1][b]) ASSERT_FALSE(std::isnan(v));
            ASSERT_EQ(0, std::memcmp(lg[0][b].data(), lg[1][b].data(), lg[0][b].size() * 4))
                << "forward " << f << " (slots " << pairs[f][0] << ", " << pairs[f][1] << ") branch " << b;
        }
    }
    const dimoo::CudaGraphStats on = dimoo::cuda_graph_stats(*ctx[1]);
    EXPECT_EQ(on.failed, 0);
    EXPECT_GE(on.replayed, 2); // the USE shape repeats: replays happened
}

// Weights or a context larger than the card are refused before anything is
// uploaded or allocated, with the sizes in the message.
TEST(CudaForward, RefusesWhatDoesNotFit) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    dimoo_runtime *rt = nullptr;
    char err[256];
    ASSERT_EQ(dimoo_runtime_create(DIMOO_BACKEND_CUDA, 0, 0, &rt, err, sizeof err), DIMOO_OK) << err;
    dimoo_model_config c{};
    c.d_model = 8192;
    c.n_layers = 400; // about 780 GB in bf16
    c.n_heads = c.n_kv_heads = 64;
    c.mlp_hidden_size = 28672;
    c.vocab_size = c.embedding_size = 1000;
    c.max_sequence_length = 1 << 24;
    c.rope_theta = 10000.f;
    c.rms_norm_eps = 1e-5f;
    dimoo_model *m = nullptr;
    EXPECT_EQ(dimoo_model_create(rt, &c, &m, err, sizeof err), DIMOO_ERR_DEVICE_OUT_OF_MEMORY);
    EXPECT_NE(std::string(err).find("MiB"), std::string::npos) << err;
    // A small model, then a context of 64 x 16M tokens with caches.
    c.d_model = 64;
    c.n_layers = 1;
    c.n_heads = c.n_kv_heads = 1;
    c.mlp_hidden_size = 64;
    ASSERT_EQ(dimoo_model_create(rt, &c, &m, err, sizeof err), DIMOO_OK) << err;
    const int64_t d = 64;
    for (const char *n : {"model.transformer.wte.weight", "model.transformer.ff_out.weight"}) {
        std::vector<float> w(1000 * 64, 0.01f);
        const int64_t shape[2] = {1000, d};
        ASSERT_EQ(dimoo_model_set_weight(m, n, DIMOO_F32, shape, 2, w.data(), w.size() * 4), DIMOO_OK);
    }
    std::vector<float> w(64 * 64, 0.01f);
    const int64_t sq[2] = {d, d}, v1[1] = {d};
    for (const char *n : {"q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"})
        ASSERT_EQ(dimoo_model_set_weight(m, (std::string("model.transformer.blocks.0.") + n + ".weight").c_str(),
                                         DIMOO_F32, sq, 2, w.data(), w.size() * 4),
                  DIMOO_OK)
            << dimoo_model_error(m);
    for (const char *n : {"model.transformer.blocks.0.attn_norm.weight", "model.transformer.blocks.0.ff_norm.weight",
                          "model.transformer.ln_f.weight"})
        ASSERT_EQ(dimoo_model_set_weight(m, n, DIMOO_F32, v1, 1, w.data(), 64 * 4), DIMOO_OK);
    ASSERT_EQ(dimoo_model_finalize(m), DIMOO_OK) << dimoo_model_error(m);
    dimoo_ctx *ctx = nullptr;
    dimoo_ctx_params p{64, 1 << 24, DIMOO_CTX_KV_CACHE};
    EXPECT_EQ(dimoo_ctx_create(m, &p, &ctx, err, sizeof err), DIMOO_ERR_DEVICE_OUT_OF_MEMORY);
    EXPECT_NE(std::string(err).find("MiB"), std::string::npos) << err;
    dimoo_model_destroy(m);
    dimoo_runtime_destroy(rt);
}

// The CPU-side half runs everywhere: the test reader parses the checkpoints
// the GPU tests use.
TEST(CudaForward, ReaderParsesCheckpoints) {
    dimoo_model_config c{};
    ASSERT_TRUE(load_config(src("testdata/small-gqa-f16"), c));
    EXPECT_EQ(c.d_model, 128);
    EXPECT_EQ(c.n_kv_heads, 2);
    EXPECT_EQ(c.embedding_size, 512);
    std::map<std::string, StTensor> ts;
    std::string idx;
    ASSERT_TRUE(read_file(src("models/dimoo-small/config.json"), idx));
    load_safetensors(src("models/dimoo-small/model.safetensors"), ts);
    ASSERT_TRUE(ts.count("model.transformer.wte.weight"));
    const auto &w = ts["model.transformer.wte.weight"];
    ASSERT_EQ(w.shape.size(), 2u);
    size_t n = 1;
    for (auto s : w.shape) n *= size_t(s);
    EXPECT_EQ(w.data.size(), n * (w.dtype == "F32" ? 4 : 2));
}

} // namespace

#endif // DIMOO_WITH_CUDA
