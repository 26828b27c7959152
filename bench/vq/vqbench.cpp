// vqbench - the VQ-VAE's decode and encode timed on random weights of a
// given shape (aMUSEd's VQ-GAN by default, the one DiMOO uses), through the
// C ABI.
//
//   build/dimoo_vqbench [--backend cpu|cuda] [--sides 32,64] [--reps 3]
//                       [--threads N] [--channels 128,256,256,512,768]
//                       [--layers-per-block 2] [--latent 64] [--codebook 8192]
//                       [--groups 32] [--mid-attention 0|1] [--no-encode] [--json]
//                       [--winograd-tile 0|2|4]
//
// Per grid side s (codes s x s, an image of 16s x 16s for five levels): one
// untimed decode and encode, then --reps timed ones; the table gives the
// median [min max] in ms and the direct-convolution GFLOP/s (the FLOPs a
// direct convolution of every conv and linear layer takes, counted from the
// weights' shapes; the CPU's Winograd does fewer). On a CUDA runtime the
// decoder runs on the GPU and the encoder on the host (see dimoo.h); the
// same weights are then also loaded on a CPU runtime, which decodes once per
// side as the baseline of the same run (the ratio CPU / CUDA) and as the
// reference of the relative error ||cuda - cpu|| / ||cpu||.
//
// scripts/bench_vq.py runs diffusers' VQModel side by side with this on the
// CPU. The weights are uniform with the variance of N(0, 1/fan_in) (norm
// scales around 1): the speed does not depend on their values.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "dimoo.h"
#include "vq/vq.h"
#include "vq_testing.h" // rel_err, shared with the VQ-VAE tests

namespace {

struct Options {
    std::string backend = "cpu";
    std::vector<int> sides{32};
    int reps = 3, threads = 0;
    std::vector<int> channels{128, 256, 256, 512, 768};
    int layers_per_block = 2, latent = 64, codebook = 8192, groups = 32, mid_attention = 0, winograd_tile = 0;
    bool encode = true, json = false;
};

[[noreturn]] void die(const std::string &msg) {
    std::fprintf(stderr, "dimoo_vqbench: %s\n", msg.c_str());
    std::exit(2);
}

std::vector<int> parse_list(const std::string &flag, const char *s) {
    std::vector<int> v;
    for (const char *p = s; *p;) {
        char *end = nullptr;
        const long x = std::strtol(p, &end, 10);
        if (end == p || x <= 0 || x > 1 << 16) die(flag + ": want positive integers separated by commas");
        v.push_back(int(x));
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') die(flag + ": want positive integers separated by commas");
    }
    if (v.empty()) die(flag + ": empty list");
    return v;
}

int parse_int(const std::string &flag, const char *s, int lo, int hi) {
    char *end = nullptr;
    const long x = std::strtol(s, &end, 10);
    if (end == s || *end || x < lo || x > hi)
        die(flag + ": want an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return int(x);
}

// A splitmix64 stream: a cheap deterministic fill for 146M weights.
uint64_t splitmix(uint64_t &s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [-a, a] with a = sqrt(3) * sd (variance sd^2), plus offset.
void fill(std::vector<float> &v, uint64_t seed, float sd, float offset) {
    const float a = std::sqrt(3.0f) * sd;
    const int64_t n = int64_t(v.size()), chunk = int64_t(1) << 16;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        uint64_t s = seed * 0x100000001B3ull + uint64_t(c0);
        for (int64_t i = c0; i < std::min(n, c0 + chunk); i++) {
            const float u = float(splitmix(s) >> 40) * (1.0f / float(1 << 24)); // [0, 1)
            v[size_t(i)] = offset + a * (2.0f * u - 1.0f);
        }
    }
}

// FLOPs of a direct evaluation: 2 * cout * cin * k * k per output pixel for
// every conv, at the resolution its name implies (decoder up block i at
// 2^i times the grid, its upsampler's conv at twice that; encoder down
// block i at 1/2^i of the image, its downsampler's output at half that),
// plus the mid-block attention's projections and its two N x N products.
struct Flops {
    double decode = 0, encode = 0;
};

int index_after(const std::string &name, const std::string &prefix) {
    return std::atoi(name.c_str() + prefix.size());
}

Flops count_flops(const dimoo::vq::Model &shape, int levels, int side) {
    Flops f;
    const double grid = double(side) * side; // latent pixels
    const int full = side << (levels - 1);  // image side
    for (const auto &name : shape.weight_names()) {
        const auto s = shape.weight_shape(name);
        const bool dec = name.rfind("decoder.", 0) == 0 || name.rfind("post_quant_conv.", 0) == 0;
        const bool enc = name.rfind("encoder.", 0) == 0 || name.rfind("quant_conv.", 0) == 0;
        if (!dec && !enc) continue;
        if (name.find(".weight") == std::string::npos) continue;
        const bool conv = s.size() == 4, linear = s.size() == 2 && name.find("attentions") != std::string::npos;
        if (!conv && !linear) continue;
        double per_px = 2.0 * double(s[0]) * double(s[1]) * (conv ? double(s[2]) * double(s[3]) : 1.0);
        double px = grid; // latent-resolution layers by default
        if (name.rfind("decoder.up_blocks.", 0) == 0) {
            const int i = index_after(name, "decoder.up_blocks.");
            px = grid * double(1 << (2 * i));
            if (name.find("upsamplers") != std::string::npos) px *= 4;
        } else if (name.rfind("decoder.conv_out", 0) == 0) {
            px = double(full) * full;
        } else if (name.rfind("encoder.down_blocks.", 0) == 0) {
            const int i = index_after(name, "encoder.down_blocks.");
            px = double(full >> i) * double(full >> i);
            if (name.find("downsamplers") != std::string::npos) px /= 4;
        } else if (name.rfind("encoder.conv_in", 0) == 0) {
            px = double(full) * full;
        }
        (dec ? f.decode : f.encode) += per_px * px;
        if (linear && name.find("to_q.weight") != std::string::npos) // Q K^T and P V over the grid
            (dec ? f.decode : f.encode) += 4.0 * grid * grid * double(s[0]);
    }
    return f;
}

struct Handle {
    dimoo_runtime *rt = nullptr;
    dimoo_vq *vq = nullptr;
    ~Handle() {
        if (vq) dimoo_vq_destroy(vq);
        if (rt) dimoo_runtime_destroy(rt);
    }
};

void open(Handle &h, int32_t backend, int threads, const dimoo_vq_config &c, const dimoo::vq::Model &shape,
          uint64_t seed) {
    char err[512] = {0};
    if (dimoo_runtime_create(backend, 0, threads, &h.rt, err, sizeof err) != DIMOO_OK)
        die(std::string("runtime: ") + err);
    if (dimoo_vq_create(h.rt, &c, &h.vq, err, sizeof err) != DIMOO_OK) die(std::string("vq_create: ") + err);
    uint64_t k = seed;
    std::vector<float> v;
    for (const auto &name : shape.weight_names()) {
        const auto s = shape.weight_shape(name);
        size_t n = 1;
        for (auto d : s) n *= size_t(d);
        v.resize(n);
        const bool norm_scale = name.find("norm") != std::string::npos && name.find(".weight") != std::string::npos;
        const double fan_in = s.size() > 1 ? double(n) / double(s[0]) : 1.0;
        fill(v, ++k, s.size() > 1 ? float(1.0 / std::sqrt(fan_in)) : 0.1f, norm_scale ? 1.0f : 0.0f);
        if (dimoo_vq_set_weight(h.vq, name.c_str(), DIMOO_F32, s.data(), int32_t(s.size()), v.data(), n * 4) !=
            DIMOO_OK)
            die(name + ": " + dimoo_vq_error(h.vq));
    }
    if (dimoo_vq_finalize(h.vq) != DIMOO_OK) die(std::string("finalize: ") + dimoo_vq_error(h.vq));
}

double ms_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

struct Stat {
    double med = 0, lo = 0, hi = 0;
};

Stat stat(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return {v[v.size() / 2], v.front(), v.back()};
}

void check(dimoo_vq *vq, int32_t st, const char *what) {
    if (st != DIMOO_OK) die(std::string(what) + ": " + dimoo_vq_error(vq));
}

} // namespace

int main(int argc, char **argv) {
    Options o;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) die(a + ": missing value");
            return argv[++i];
        };
        if (a == "--backend") o.backend = next();
        else if (a == "--sides") o.sides = parse_list(a, next());
        else if (a == "--reps") o.reps = parse_int(a, next(), 1, 1000);
        else if (a == "--threads") o.threads = parse_int(a, next(), 0, 4096);
        else if (a == "--channels") o.channels = parse_list(a, next());
        else if (a == "--layers-per-block") o.layers_per_block = parse_int(a, next(), 1, 8);
        else if (a == "--latent") o.latent = parse_int(a, next(), 1, 4096);
        else if (a == "--codebook") o.codebook = parse_int(a, next(), 1, 1 << 20);
        else if (a == "--groups") o.groups = parse_int(a, next(), 1, 4096);
        else if (a == "--mid-attention") o.mid_attention = parse_int(a, next(), 0, 1);
        else if (a == "--no-encode") o.encode = false;
        else if (a == "--winograd-tile") o.winograd_tile = parse_int(a, next(), 0, 4);
        else if (a == "--json") o.json = true;
        else if (a == "-h" || a == "--help") {
            std::printf("usage: dimoo_vqbench [--backend cpu|cuda] [--sides 32,64] [--reps 3] [--threads N]\n"
                        "  [--channels 128,256,256,512,768] [--layers-per-block 2] [--latent 64]\n"
                        "  [--codebook 8192] [--groups 32] [--mid-attention 0|1] [--no-encode] [--json]\n"
                        "  [--winograd-tile 0|2|4]\n");
            return 0;
        } else die("unknown flag " + a + " (--help lists them)");
    }
    if (o.backend != "cpu" && o.backend != "cuda") die("--backend: cpu or cuda");
    if (o.channels.size() > 8) die("--channels: at most 8 levels");
    if (o.winograd_tile == 1 || o.winograd_tile == 3) die("--winograd-tile: 0 (by grid size), 2 or 4");
    dimoo::vq::set_winograd_tile(o.winograd_tile); // the CPU's 3x3 convs
    const bool cuda = o.backend == "cuda";

    dimoo_vq_config c{};
    c.in_channels = 3, c.out_channels = 3, c.latent_channels = o.latent, c.num_vq_embeddings = o.codebook;
    c.vq_embed_dim = o.latent, c.norm_num_groups = o.groups, c.layers_per_block = o.layers_per_block;
    c.n_levels = int32_t(o.channels.size());
    for (size_t i = 0; i < o.channels.size(); i++) c.block_out_channels[i] = o.channels[i];
    c.mid_block_add_attention = o.mid_attention;
    c.norm_type = DIMOO_VQ_NORM_GROUP;
    const int factor = 1 << (c.n_levels - 1);

    std::unique_ptr<dimoo::vq::Model> shape;
    try {
        shape = std::make_unique<dimoo::vq::Model>(c);
    } catch (const std::exception &e) {
        die(std::string("config: ") + e.what());
    }
    int64_t params = 0;
    for (const auto &name : shape->weight_names()) {
        int64_t n = 1;
        for (auto d : shape->weight_shape(name)) n *= d;
        params += n;
    }
    Handle h, ref;
    open(h, cuda ? DIMOO_BACKEND_CUDA : DIMOO_BACKEND_CPU, o.threads, c, *shape, 1);
    if (cuda) open(ref, DIMOO_BACKEND_CPU, o.threads, c, *shape, 1);
    const int threads = o.threads > 0 ? o.threads : omp_get_max_threads();
    char device[256] = {0};
    dimoo_runtime_describe(h.rt, device, sizeof device);
    std::fprintf(stderr, "VQ-VAE %.1f M params, %d levels; %s\n", double(params) / 1e6, c.n_levels, device);

    if (o.json) std::printf("{\"backend\":\"%s\",\"params\":%lld,\"threads\":%d,\"cases\":[", o.backend.c_str(),
                            (long long)params, threads);
    else
        std::printf("%-6s %-11s %-7s %22s %10s %s\n", "op", "grid", "image", "ms median [min max]", "GFLOP/s",
                    cuda ? "CPU ms, CPU/CUDA, rel err" : "");
    bool first = true;
    for (int side : o.sides) {
        const int img = side * factor;
        const Flops fl = count_flops(*shape, c.n_levels, side);
        std::vector<int32_t> codes(size_t(side) * side);
        uint64_t s = uint64_t(side);
        for (auto &x : codes) x = int32_t(splitmix(s) % uint64_t(o.codebook));
        std::vector<float> pix(size_t(img) * img * 3);
        for (int op = 0; op < (o.encode ? 2 : 1); op++) {
            const bool dec = op == 0;
            std::vector<int32_t> back(codes.size());
            auto run = [&](dimoo_vq *vq) {
                if (dec) check(vq, dimoo_vq_decode(vq, codes.data(), side, side, pix.data()), "decode");
                else check(vq, dimoo_vq_encode(vq, pix.data(), img, img, back.data()), "encode");
            };
            if (!dec) // encode a picture in [0, 1]: the decoded one, squashed
                for (auto &v : pix) v = std::min(1.0f, std::max(0.0f, 0.5f + 0.1f * v));
            run(h.vq); // warm-up (and the GPU's workspace)
            std::vector<double> t;
            for (int r = 0; r < o.reps; r++) {
                const auto t0 = std::chrono::steady_clock::now();
                run(h.vq);
                t.push_back(ms_since(t0));
            }
            const Stat st = stat(t);
            const double flops = dec ? fl.decode : fl.encode;
            double cpu_ms = 0, err = -1;
            if (cuda && dec) { // the CPU decode of the same codes, once
                std::vector<float> got = pix;
                const auto t0 = std::chrono::steady_clock::now();
                run(ref.vq);
                cpu_ms = ms_since(t0);
                err = dimoo::test::rel_err(got, pix);
            }
            const char *name = dec ? "decode" : "encode";
            if (o.json) {
                std::printf("%s{\"op\":\"%s\",\"grid\":%d,\"image\":%d,\"ms\":{\"median\":%.3f,\"min\":%.3f,"
                            "\"max\":%.3f},\"gflop\":%.3f,\"gflops\":%.2f",
                            first ? "" : ",", name, side, img, st.med, st.lo, st.hi, flops / 1e9,
                            flops / st.med / 1e6);
                if (cpu_ms > 0) std::printf(",\"cpu_ms\":%.3f,\"rel_err\":%.3e", cpu_ms, err);
                std::printf("}");
            } else {
                char grid[32], image[32], ms[64];
                std::snprintf(grid, sizeof grid, "%dx%d", side, side);
                std::snprintf(image, sizeof image, "%d²", img);
                std::snprintf(ms, sizeof ms, "%.1f [%.1f %.1f]", st.med, st.lo, st.hi);
                std::printf("%-6s %-11s %-8s %22s %10.1f", name, grid, image, ms, flops / st.med / 1e6);
                if (cpu_ms > 0) std::printf("   %.1f, %.1fx, %.2e", cpu_ms, cpu_ms / st.med, err);
                std::printf("\n");
            }
            std::fflush(stdout);
            first = false;
        }
    }
    if (o.json) std::printf("]}\n");
    return 0;
}
