// test_cuda_forward.cpp - the CUDA forward against the CPU backend through
// the C ABI, on every checkpoint in testdata/ and the shipped small model:
// cache modes NONE, STORE and USE, several sequences batched in one call,
// random lengths (1 .. ~600, most not multiples of 64), chosen output rows
// and column ranges, row maxima, NaN-poisoned outputs. The weights are
// computed in bf16 on the GPU whatever the checkpoint's dtype, so the bound
// is bf16's: ||gpu - cpu|| / ||cpu|| <= 2e-2 per forward. Skips without a GPU.
#include <gtest/gtest.h>

#ifndef DIMOO_WITH_CUDA
TEST(CudaForward, Skipped) { GTEST_SKIP() << "built without the CUDA backend"; }
#else

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "common.h"
#include "dimoo.h"

namespace {

// ---- a minimal safetensors reader (header JSON: name -> dtype, shape, offsets)

struct StTensor {
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> data;
};

struct Json { // just enough JSON for safetensors headers and config.json
    std::string s;
    size_t i = 0;
    void ws() {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\t' || s[i] == '\r')) i++;
    }
    std::string str() {
        ws();
        std::string o;
        i++; // "
        while (s[i] != '"') {
            if (s[i] == '\\') i++;
            o += s[i++];
        }
        i++;
        return o;
    }
    double num() {
        ws();
        size_t n = 0;
        double v = std::stod(s.substr(i, 40), &n);
        i += n;
        return v;
    }
    void skip() { // any value
        ws();
        if (s[i] == '"') str();
        else if (s[i] == '{') obj([&](const std::string &) { skip(); });
        else if (s[i] == '[') arr([&] { skip(); });
        else while (i < s.size() && s[i] != ',' && s[i] != '}' && s[i] != ']') i++;
    }
    template <class F> void obj(F f) {
        ws();
        i++; // {
        ws();
        if (s[i] == '}') {
            i++;
            return;
        }
        for (;;) {
            std::string k = str();
            ws();
            i++; // :
            f(k);
            ws();
            if (s[i++] == '}') return;
        }
    }
    template <class F> void arr(F f) {
        ws();
        i++; // [
        ws();
        if (s[i] == ']') {
            i++;
            return;
        }
        for (;;) {
            f();
            ws();
            if (s[i++] == ']') return;
        }
    }
};

bool read_file(const std::string &path, std::string &out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    out.assign(std::istreambuf_iterator<char>(f), {});
    return true;
}

void read_safetensors(const std::string &path, std::map<std::string, StTensor> &out) {
    std::string raw;
    ASSERT_TRUE(read_file(path, raw)) << path;
    uint64_t hl = 0;
    std::memcpy(&hl, raw.data(), 8);
    Json j{raw.substr(8, hl)};
    const size_t base = 8 + hl;
    j.obj([&](const std::string &name) {
        if (name == "__metadata__") {
            j.skip();
            return;
        }
        StTensor t;
        size_t b = 0, e = 0;
        j.obj([&](const std::string &k) {
            if (k == "dtype") t.dtype = j.str();
            else if (k == "shape") j.arr([&] { t.shape.push_back(int64_t(j.num())); });
            else if (k == "data_offsets") {
                int n = 0;
                j.arr([&] { (n++ == 0 ? b : e) = size_t(j.num()); });
            } else j.skip();
        });
        t.data.assign(raw.begin() + long(base + b), raw.begin() + long(base + e));
        out[name] = std::move(t);
    });
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

void load_pair(const std::string &dir, Pair &p) {
    ASSERT_TRUE(load_config(dir, p.cfg)) << dir;
    std::map<std::string, StTensor> ts;
    std::string idx;
    if (read_file(dir + "/model.safetensors.index.json", idx)) {
        for (int s = 1; s <= 16; s++) { // shards are named model-0000s-of-0000n
            char name[64];
            for (int n = 1; n <= 16; n++) {
                std::snprintf(name, sizeof name, "/model-%05d-of-%05d.safetensors", s, n);
                std::ifstream f(dir + name);
                if (f) read_safetensors(dir + name, ts);
            }
        }
    } else {
        read_safetensors(dir + "/model.safetensors", ts);
    }
    ASSERT_FALSE(ts.empty()) << dir;
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

void run_both(Pair &p, dimoo_ctx *ctx[2], std::vector<Req> &reqs, bool twice = false) {
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
        EXPECT_LT(rel_err(r.logits[1], r.logits[0]), 2e-2);
        if (r.want_max) EXPECT_LT(rel_err(r.rmax[1], r.rmax[0]), 2e-2);
    }
}

void check_model(const std::string &dir, int max_t) {
    if (dimoo::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    Pair p;
    load_pair(dir, p);
    if (::testing::Test::HasFatalFailure()) return;
    max_t = std::min(max_t, p.cfg.max_sequence_length);
    const unsigned seed = std::random_device{}(); // fresh inputs every run; the seed reproduces a failure
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
        run_both(p, ctx, r, /*twice=*/true);
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
    run_both(p, ctx, store);
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
        if (k == 1) r.out.assign(r.compute.begin(), r.compute.begin() + long(std::max<size_t>(1, r.compute.size() / 2)));
    }
    run_both(p, ctx, use);
    for (int b = 0; b < 2; b++) dimoo_ctx_destroy(ctx[b]);
}

std::string src(const char *rel) { return std::string(DIMOO_SOURCE_DIR) + "/" + rel; }

TEST(CudaForward, SmallF32) { check_model(src("testdata/small-f32"), 600); }
TEST(CudaForward, SmallBF16) { check_model(src("testdata/small-bf16"), 600); }
TEST(CudaForward, SmallGqaF16) { check_model(src("testdata/small-gqa-f16"), 600); }
TEST(CudaForward, OfficialSmall) { check_model(src("testdata/official-small/checkpoint"), 600); }
TEST(CudaForward, ShippedSmallModel) { check_model(src("models/dimoo-small"), 512); }

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
    read_safetensors(src("models/dimoo-small/model.safetensors"), ts);
    ASSERT_TRUE(ts.count("model.transformer.wte.weight"));
    const auto &w = ts["model.transformer.wte.weight"];
    ASSERT_EQ(w.shape.size(), 2u);
    size_t n = 1;
    for (auto s : w.shape) n *= size_t(s);
    EXPECT_EQ(w.data.size(), n * (w.dtype == "F32" ? 4 : 2));
}

} // namespace

#endif // DIMOO_WITH_CUDA
