// cpupeak - the CPU backend's bf16 forward next to this machine's measured
// peak, stage by stage, on a random DiMOO-architecture model built in memory.
//
//   build/dimoo_cpupeak [--T 64,300,1124,4228] [--reps 3] [--layers 1]
//                       [--d 4096] [--heads 32] [--kv-heads 32] [--mlp 12288]
//                       [--vocab 16384] [--threads 2] [--json] [--serve]
//                       [--dtype bf16|f32] [--baseline KERNELS] [--branch-rows R]
//                       [--gemm M,N,K/...] [--attention]
//
// --dtype f32: fp32 weights, compared with the fp32 FMA peak (with
// DIMOO_CPU_PACKED=0 in the environment: the per-call packing path, whose
// stages are not clocked).
//
// --baseline avx512bf16 (or avx512, portable): a second model of the same
// weights on that kernel set (DIMOO_CPU_KERNELS at its load), its forward
// timed right after each of the best set's; the table gives the speed ratio.
//
// --branch-rows R: then, per T, two sequences (a guidance pair) store their
// K/V, and ML-Cache steps recompute R rows of each (R <= T), as one
// dimoo_forward of both and as one forward each, alternating; the table
// gives the times and their ratio (what sharing the GEMMs saves).
//
// --gemm M,N,K[/M,N,K...]: instead of forwards, the bf16 GEMM team alone
// (C = A W^T, random bf16 A and W, A's rows at the context's stride) per
// shape, in the blocked order (AMX's and AVX2's default) alternating with the
// panel-major one; the table gives GFLOP/s of both, their ratio and the
// blocked order's share of the peak measured around them. The model's
// shapes at T tokens: T,4096,4096 (q, o), T,12288,4096 (gate, up),
// T,4096,12288 (down), rows,8192,4096 (the head on image codes).
//
// --attention: instead of forwards, the bf16 flash attention alone per T
// (T query rows against T keys, --heads heads of d / heads columns, random
// q, K, V packed as the forward packs them); the table gives GFLOP/s (4 T^2
// d per call) and its share of the peak measured around it.
//
// --serve: build the model once, then read one T per line on stdin and answer
// each with one JSON line (scripts/bench_pytorch_cpu.py interleaves these
// with PyTorch's forward, T by T).
//
// Per repetition and T it measures the peaks (a register-only loop of
// VDPBF16PS, or of AMX's TDPBF16PS when the tiles run on AMX, and of fp32
// FMA, on every thread) just before and just after one
// timed forward (after a warm-up) with the backend's stage clock on, and
// takes their mean as the peak of that forward, so every ratio printed comes
// from measurements a few hundred milliseconds apart: other processes on the
// machine move both sides alike. Medians over the repetitions, with the
// smallest and largest value in brackets.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/bf16.h"
#include "dimoo.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__linux__)
#define CPUPEAK_AMX 1
#endif

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
// CPU seconds of the whole process (every thread): on a machine shared with
// other work, throughput per CPU second is what our code controls.
double cpu_now() {
    timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

#if defined(__x86_64__)
// 24 independent accumulators, as many as the GEMM tile keeps.
__attribute__((target("avx512f,avx512bf16"), noinline)) double peak_bf16_thread(long iters) {
    __m512 acc[24];
    for (int i = 0; i < 24; i++) acc[i] = _mm512_set1_ps(float(i));
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3a833a83);
    for (long it = 0; it < iters; it++) {
#pragma GCC unroll 24
        for (int i = 0; i < 24; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    }
    float s = 0;
    for (int i = 0; i < 24; i++) s += _mm512_reduce_add_ps(acc[i]);
    return double(s);
}
__attribute__((target("avx512f"), noinline)) double peak_fma_thread(long iters) {
    __m512 acc[24];
    for (int i = 0; i < 24; i++) acc[i] = _mm512_set1_ps(float(i));
    const __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-9f);
    for (long it = 0; it < iters; it++) {
#pragma GCC unroll 24
        for (int i = 0; i < 24; i++) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    }
    float s = 0;
    for (int i = 0; i < 24; i++) s += _mm512_reduce_add_ps(acc[i]);
    return double(s);
}
// AVX2: 12 accumulators, enough for two FMA pipes of latency 4-5.
__attribute__((target("avx2,fma"), noinline)) double peak_fma_avx2_thread(long iters) {
    __m256 acc[12];
    for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_ps(float(i));
    const __m256 a = _mm256_set1_ps(1.0f), b = _mm256_set1_ps(1e-9f);
    for (long it = 0; it < iters; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    }
    alignas(32) float s[8];
    for (int i = 1; i < 12; i++) acc[0] = _mm256_add_ps(acc[0], acc[i]);
    _mm256_store_ps(s, acc[0]);
    return double(s[0]);
}
#endif

#if defined(CPUPEAK_AMX)
// Four 16 x 16 accumulator tiles, A and B tiles loaded once: TDPBF16PS's
// own rate (the library's tile kernel adds the loads of A and B).
__attribute__((target("amx-tile,amx-bf16"), noinline)) double peak_amx_thread(long iters) {
    struct alignas(64) {
        uint8_t palette, start, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    alignas(64) uint16_t one[16 * 32];
    for (auto &x : one) x = 0x3f80; // bf16 1.0: the accumulators count the products
    alignas(64) float c[256];
    asm volatile("" : : "r"(&cfg) : "memory"); // GCC does not see LDTILECFG read it
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, one, 64);
    _tile_loadd(5, one, 64);
    _tile_loadd(6, one, 64);
    _tile_loadd(7, one, 64);
    for (long it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, 64);
    _tile_release();
    asm volatile("" : : "r"(c) : "memory");
    return double(c[0]);
}
#endif

// GFLOP/s of the loop over `threads` threads, about `seconds` long: fp32
// FMA, or the bf16 products of kernel set ks (AMX tiles or VDPBF16PS; on
// the AVX2 set, whose bf16 products are fp32 FMAs, the AVX2 FMA loop).
double peak(bool bf16, int threads, double seconds, double *per_cpu_s = nullptr,
            dimoo::cpu::Kernels ks = dimoo::cpu::Kernels::Avx512Bf16) {
#if defined(__x86_64__)
    using dimoo::cpu::Kernels;
    using dimoo::cpu::kernels_supported;
    const bool avx2 = !kernels_supported(Kernels::Avx512) && kernels_supported(Kernels::Avx2) &&
                      (!bf16 || ks == Kernels::Avx2);
    if (!avx2 && bf16 && !kernels_supported(Kernels::Avx512Bf16)) return 0;
    if (!avx2 && !kernels_supported(Kernels::Avx512)) return 0;
#if defined(CPUPEAK_AMX)
    const bool amx = bf16 && ks == Kernels::Amx;
#else
    const bool amx = false;
#endif
    const double flops_per_iter = amx    ? 4.0 * 16 * 16 * 32 * 2
                                  : avx2 ? 12.0 * 16.0
                                         : 24.0 * (bf16 ? 64.0 : 32.0);
    long iters = 200000;
    double sink = 0;
    for (;;) {
        const double t0 = now(), c0 = cpu_now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        sink += amx    ? peak_amx_thread(iters)
                : avx2 ? peak_fma_avx2_thread(iters)
                : bf16 ? peak_bf16_thread(iters)
                       : peak_fma_thread(iters);
        const double dt = now() - t0, dc = cpu_now() - c0;
        if (dt > seconds || iters > (1L << 34)) {
            if (sink == 1234.5) std::puts("");
            // GFLOP per CPU second, times the threads: the peak of `threads`
            // cores that are never taken away.
            if (per_cpu_s) *per_cpu_s = flops_per_iter * double(iters) * threads / dc / 1e9 * threads;
            return flops_per_iter * double(iters) * threads / dt / 1e9;
        }
        iters = long(double(iters) * std::min(10.0, 1.3 * seconds / std::max(dt, 1e-4)));
    }
#else
    (void)bf16;
    (void)threads;
    (void)seconds;
    (void)per_cpu_s;
    (void)ks;
    return 0;
#endif
}

struct Opts {
    std::vector<int> T = {64, 300, 1124, 4228};
    int reps = 3, layers = 1, d = 4096, heads = 32, kv_heads = 32, mlp = 12288, vocab = 16384, threads = 2;
    bool json = false, serve = false, f32 = false, attention = false;
    std::string baseline; // a kernel set to time beside the best one
    int branch_rows = 0;  // ML-Cache rows of the guidance-pair table (0: none)
    std::vector<std::vector<int>> gemm; // --gemm shapes (M, N, K)
};

std::vector<int> parse_list(const char *s) {
    std::vector<int> v;
    for (const char *p = s; *p;) {
        v.push_back(std::atoi(p));
        const char *c = std::strchr(p, ',');
        if (!c) break;
        p = c + 1;
    }
    return v;
}

struct Row {
    double tok_s, total_gf, gemm_frac, attn_frac, attn_vs_gemm, rest_share, fwd_frac, peak_bf16, peak_fma, secs;
    double cpu_secs, peak_bf16_cpu, fwd_frac_cpu; // the same per CPU second
    double base_secs, speedup;                     // the --baseline forward, and its time / ours
};

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// "median [min max]" at prec decimals, "-" when empty.
std::string cell(const std::vector<double> &v, int prec) {
    if (v.empty()) return "-";
    char b[96];
    const auto mm = std::minmax_element(v.begin(), v.end());
    std::snprintf(b, sizeof b, "%.*f [%.*f %.*f]", prec, median(v), prec, *mm.first, prec, *mm.second);
    return b;
}

void die(const char *what, const char *msg) {
    std::fprintf(stderr, "cpupeak: %s: %s\n", what, msg);
    std::exit(1);
}

// --gemm: the GEMM team per shape, blocked order against panel-major.
int gemm_bench(const Opts &o) {
    const dimoo::cpu::Kernels ks = dimoo::cpu::best_kernels();
    std::printf("dimoo CPU bf16 GEMM team, C = A W^T: kernels %s, %d threads, %d reps (median [min max])\n",
                dimoo::cpu::kernels_name(ks), o.threads, o.reps);
    std::printf("%6s %6s %6s | %-20s | %-20s | %-18s | %-18s\n", "M", "N", "K", "blocked GFLOP/s",
                "panel-major GFLOP/s", "speed x", "blocked % of peak");
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (const auto &sh : o.gemm) {
        const int M = sh[0], N = sh[1], K = sh[2];
        std::vector<uint16_t> w(size_t(N) * size_t(K));
        for (auto &x : w) x = dimoo::f32_to_bf16(nd(rng) / std::sqrt(float(K)));
        dimoo::cpu::PackedMatrix W;
        dimoo::cpu::pack_matrix(w.data(), DIMOO_BF16, N, K, W);
        w = {};
        // A's rows 64 bytes longer than K, as the context lays them out.
        const size_t lda = size_t(K / 2 + 16);
        std::vector<uint32_t> A(size_t(M) * lda, 0);
        std::vector<float> row(static_cast<size_t>(K));
        for (int r = 0; r < M; r++) {
            for (auto &x : row) x = nd(rng);
            dimoo::cpu::round_bf16(row.data(), K, reinterpret_cast<uint16_t *>(A.data() + size_t(r) * lda), K);
        }
        std::vector<float> C(size_t(M) * size_t(N));
        const dimoo::cpu::GemmJob job{&W, C.data(), size_t(N), 0, N, false};
        // One order's time: a call to warm up (threads, caches: the weights
        // were last read in the other order), then the median of three.
        auto timed = [&](bool blocked) {
            dimoo::cpu::set_gemm_blocking(blocked);
            std::vector<double> t;
            for (int i = 0; i < 4; i++) {
                const double t0 = now();
#pragma omp parallel num_threads(o.threads)
                dimoo::cpu::gemm_team(ks, M, A.data(), lda, &job, 1);
                if (i) t.push_back(now() - t0);
            }
            return median(t);
        };
        const double flop = 2.0 * M * N * K;
        std::vector<double> gb, gp, sp, frac;
        for (int rep = 0; rep < std::max(o.reps, 1); rep++) {
            const double p0 = peak(true, o.threads, 0.2, nullptr, ks);
            // Which order goes first alternates by repetition.
            double tb, tp;
            if (rep % 2) tp = timed(false), tb = timed(true);
            else tb = timed(true), tp = timed(false);
            const double p1 = peak(true, o.threads, 0.2, nullptr, ks);
            gb.push_back(flop / tb / 1e9);
            gp.push_back(flop / tp / 1e9);
            sp.push_back(tp / tb);
            if (p0 + p1 > 0) frac.push_back(100.0 * flop / tb / 1e9 / (0.5 * (p0 + p1)));
        }
        dimoo::cpu::set_gemm_blocking(true);
        std::printf("%6d %6d %6d | %-20s | %-20s | %-18s | %-18s\n", M, N, K, cell(gb, 0).c_str(), cell(gp, 0).c_str(),
                    cell(sp, 2).c_str(), cell(frac, 1).c_str());
    }
    return 0;
}

// --attention: flash_attention_team per T at the model's heads.
int attention_bench(const Opts &o) {
    const dimoo::cpu::Kernels ks = dimoo::cpu::best_kernels();
    const int H = o.heads, kvh = o.kv_heads, hd = o.d / o.heads;
    if (H < 1 || kvh < 1 || H % kvh || o.d % H || hd % 2)
        die("--attention", "want heads | d, kv-heads | heads, even head dim");
    std::printf("dimoo CPU bf16 flash attention: kernels %s, %d threads, heads %d/%d, head dim %d, %d reps "
                "(median [min max])\n",
                dimoo::cpu::kernels_name(ks), o.threads, H, kvh, hd, o.reps);
    std::printf("%6s | %-20s | %-18s\n", "T", "GFLOP/s", "% of peak");
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (const int T : o.T) {
        const size_t dq = size_t(H) * hd, dk = size_t(kvh) * hd;
        std::vector<float> K(size_t(T) * dk), V(size_t(T) * dk), q(dq);
        for (auto &x : K) x = nd(rng);
        for (auto &x : V) x = nd(rng);
        dimoo::LineVector<uint32_t> Q(size_t(T) * dq / 2);
        for (int r = 0; r < T; r++) {
            for (auto &x : q) x = nd(rng);
            dimoo::cpu::round_bf16(q.data(), int(dq), reinterpret_cast<uint16_t *>(Q.data() + size_t(r) * dq / 2),
                                   int(dq));
        }
        dimoo::cpu::PackedKV kv;
        kv.T = T;
        kv.Tpad = dimoo::cpu::packed_kv_tpad(T);
        kv.head_dim = hd;
        kv.n_kv = kvh;
        kv.kstride = kv.vstride = dimoo::cpu::packed_kv_elems(T, hd);
        dimoo::LineVector<uint16_t> kb(kv.kstride * kvh), vb(kv.vstride * kvh), out(size_t(T) * dq);
        dimoo::LineVector<float> scratch(dimoo::cpu::flash_scratch_floats(hd) * size_t(o.threads));
        kv.k = kb.data();
        kv.v = vb.data();
#pragma omp parallel num_threads(o.threads)
        dimoo::cpu::pack_kv_team(K.data(), V.data(), dk, kv);
        const double flop = 4.0 * T * double(T) * double(dq);
        std::vector<double> gf, frac;
        for (int rep = 0; rep <= std::max(o.reps, 1); rep++) { // rep 0 warms up
            const double p0 = rep ? peak(true, o.threads, 0.2, nullptr, ks) : 0;
            const double t0 = now();
#pragma omp parallel num_threads(o.threads)
            dimoo::cpu::flash_attention_team(ks, Q.data(), dq / 2, T, H, kv, out.data(), dq, scratch.data());
            const double t = now() - t0;
            if (!rep) continue;
            const double p1 = peak(true, o.threads, 0.2, nullptr, ks);
            gf.push_back(flop / t / 1e9);
            if (p0 + p1 > 0) frac.push_back(100.0 * flop / t / 1e9 / (0.5 * (p0 + p1)));
        }
        std::printf("%6d | %-20s | %-18s\n", T, cell(gf, 0).c_str(), cell(frac, 1).c_str());
    }
    return 0;
}

} // namespace

int main(int argc, char **argv) {
    Opts o;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) die(a.c_str(), "missing value");
            return argv[++i];
        };
        if (a == "--T") o.T = parse_list(next());
        else if (a == "--reps") o.reps = std::atoi(next());
        else if (a == "--layers") o.layers = std::atoi(next());
        else if (a == "--d") o.d = std::atoi(next());
        else if (a == "--heads") o.heads = std::atoi(next());
        else if (a == "--kv-heads") o.kv_heads = std::atoi(next());
        else if (a == "--mlp") o.mlp = std::atoi(next());
        else if (a == "--vocab") o.vocab = std::atoi(next());
        else if (a == "--threads") o.threads = std::atoi(next());
        else if (a == "--json") o.json = true;
        else if (a == "--serve") o.serve = true;
        else if (a == "--dtype") o.f32 = std::string(next()) == "f32";
        else if (a == "--baseline") o.baseline = next();
        else if (a == "--branch-rows") o.branch_rows = std::atoi(next());
        else if (a == "--attention") o.attention = true;
        else if (a == "--gemm") {
            for (const char *p = next(); *p;) {
                std::vector<int> shape = parse_list(p);
                if (shape.size() < 3 || shape[0] < 1 || shape[1] < 1 || shape[2] < 2 || shape[2] % 2)
                    die("--gemm", "want M,N,K with K even, shapes separated by /");
                shape.resize(3);
                o.gemm.push_back(shape);
                const char *c = std::strchr(p, '/');
                if (!c) break;
                p = c + 1;
            }
        }
        else die(a.c_str(), "unknown flag (see the comment at the top of bench/cpupeak/cpupeak.cpp)");
    }
    if (!o.gemm.empty()) return gemm_bench(o);
    if (o.attention) return attention_bench(o);
    const int maxT = *std::max_element(o.T.begin(), o.T.end());
    dimoo_model_config cfg{};
    cfg.d_model = o.d;
    cfg.n_layers = o.layers;
    cfg.n_heads = o.heads;
    cfg.n_kv_heads = o.kv_heads;
    cfg.mlp_hidden_size = o.mlp;
    cfg.vocab_size = o.vocab;
    cfg.embedding_size = o.vocab;
    cfg.max_sequence_length = std::max(maxT, 64);
    cfg.rope_theta = 500000.f;
    cfg.rms_norm_eps = 1e-5f;
    char err[512];
    dimoo_runtime *rt = nullptr;
    if (dimoo_runtime_create(DIMOO_BACKEND_CPU, 0, o.threads, &rt, err, sizeof err) != DIMOO_OK) die("runtime", err);

    // Random bf16 weights: matrices N(0, 1/fan_in), norms 1 + 0.1 N(0, 1);
    // the same for every model built.
    const int64_t d = o.d, kv = int64_t(o.d) / o.heads * o.kv_heads, mlp = o.mlp, e = o.vocab;
    auto build = [&]() {
        dimoo_model *m = nullptr;
        if (dimoo_model_create(rt, &cfg, &m, err, sizeof err) != DIMOO_OK) die("model", err);
        std::mt19937 rng(1);
        std::normal_distribution<float> nd(0.f, 1.f);
        auto put = [&](const std::string &name, std::vector<int64_t> shape) {
            size_t n = 1;
            for (auto s : shape) n *= size_t(s);
            std::vector<uint16_t> v(o.f32 ? 0 : n);
            std::vector<float> f(o.f32 ? n : 0);
            const float scale = shape.size() == 2 ? 1.f / std::sqrt(float(shape[1])) : 0.1f;
            const bool emb = name.find("wte") != std::string::npos;
            for (size_t i = 0; i < n; i++) {
                const float x = emb ? nd(rng) : nd(rng) * scale + (shape.size() == 1 ? 1.f : 0.f);
                if (o.f32) f[i] = x;
                else v[i] = dimoo::f32_to_bf16(x);
            }
            const void *data = o.f32 ? static_cast<const void *>(f.data()) : v.data();
            if (dimoo_model_set_weight(m, name.c_str(), o.f32 ? DIMOO_F32 : DIMOO_BF16, shape.data(),
                                       int32_t(shape.size()), data, n * (o.f32 ? 4 : 2)) != DIMOO_OK)
                die(name.c_str(), dimoo_model_error(m));
        };
        put("model.transformer.wte.weight", {e, d});
        put("model.transformer.ln_f.weight", {d});
        put("model.transformer.ff_out.weight", {e, d});
        for (int l = 0; l < o.layers; l++) {
            const std::string p = "model.transformer.blocks." + std::to_string(l) + ".";
            put(p + "attn_norm.weight", {d});
            put(p + "q_proj.weight", {d, d});
            put(p + "k_proj.weight", {kv, d});
            put(p + "v_proj.weight", {kv, d});
            put(p + "attn_out.weight", {d, d});
            put(p + "ff_norm.weight", {d});
            put(p + "ff_proj.weight", {mlp, d});
            put(p + "up_proj.weight", {mlp, d});
            put(p + "ff_out.weight", {d, mlp});
        }
        if (dimoo_model_finalize(m) != DIMOO_OK) die("finalize", dimoo_model_error(m));
        return m;
    };
    const dimoo::cpu::Kernels ks = dimoo::cpu::best_kernels();
    dimoo_model *m = build(), *base = nullptr;
    if (!o.baseline.empty()) {
        // The kernel set is read from the environment when a model is finalized.
        const char *prev = std::getenv("DIMOO_CPU_KERNELS");
        const std::string keep = prev ? prev : "";
        setenv("DIMOO_CPU_KERNELS", o.baseline.c_str(), 1);
        base = build();
        if (prev) setenv("DIMOO_CPU_KERNELS", keep.c_str(), 1);
        else unsetenv("DIMOO_CPU_KERNELS");
    }
    // FLOPs: 2 per weight per token in the projections and the head; 4 * T
    // per query token per model column in attention (Q K^T and P V).
    const double layer_params = double(2 * d * d + 2 * kv * d + 3 * mlp * d);
    std::vector<std::vector<Row>> rows(o.T.size());
    std::vector<int32_t> tokens(static_cast<size_t>(cfg.max_sequence_length) + 1); // + 1: the second branch's shift
    for (size_t i = 0; i < tokens.size(); i++) tokens[i] = int32_t((i * 7919) % size_t(o.vocab));
    // A context for one forward of the first T tokens on model mm, all logits out.
    struct Fwd {
        dimoo_ctx *ctx = nullptr;
        std::vector<float> logits;
        dimoo_forward_args a{};
    };
    auto open_fwd = [&](dimoo_model *mm, int T, Fwd &f) {
        dimoo_ctx_params p{1, T, 0};
        if (dimoo_ctx_create(mm, &p, &f.ctx, err, sizeof err) != DIMOO_OK) die("ctx", err);
        f.logits.assign(size_t(T) * size_t(e), 0.f);
        f.a.n_tokens = T;
        f.a.tokens = tokens.data();
        f.a.logits = f.logits.data();
    };
    auto forward = [&](Fwd &f) {
        if (dimoo_forward(f.ctx, &f.a, 1) != DIMOO_OK) die("forward", dimoo_ctx_error(f.ctx));
    };
    // Seconds of one forward of T tokens on the --baseline model (after a warm-up).
    auto time_base = [&](int T) {
        Fwd f;
        open_fwd(base, T, f);
        forward(f);
        const double t0 = now();
        forward(f);
        const double secs = now() - t0;
        dimoo_ctx_destroy(f.ctx);
        return secs;
    };
    auto measure = [&](int T, int rep, bool json) {
            Fwd f;
            open_fwd(m, T, f);
            forward(f); // warm-up
            Row r{};
            double pc0 = 0, pc1 = 0, pf0 = 0, pf1 = 0;
            r.peak_bf16 = peak(true, o.threads, 0.2, &pc0, ks);
            r.peak_fma = peak(false, o.threads, 0.2, &pf0);
            dimoo::cpu::stage_times_take();
            dimoo::cpu::stage_timing(true);
            const double t0 = now(), c0 = cpu_now();
            forward(f);
            r.secs = now() - t0;
            r.cpu_secs = cpu_now() - c0;
            dimoo::cpu::stage_timing(false);
            const dimoo::cpu::StageTimes st = dimoo::cpu::stage_times_take();
            // Peaks again after the forward: the mean of both brackets it.
            r.peak_bf16 = 0.5 * (r.peak_bf16 + peak(true, o.threads, 0.2, &pc1, ks));
            r.peak_bf16_cpu = 0.5 * (pc0 + pc1);
            r.peak_fma = 0.5 * (r.peak_fma + peak(false, o.threads, 0.2, &pf1));
            // The reference: VDPBF16PS or AMX for bf16 weights, fp32 FMA for fp32.
            if (o.f32 || r.peak_bf16_cpu <= 0) r.peak_bf16_cpu = 0.5 * (pf0 + pf1);
            dimoo_ctx_destroy(f.ctx);
            if (base) {
                r.base_secs = time_base(T);
                r.speedup = r.base_secs / r.secs;
            }
            const double peak_ref = r.peak_bf16 > 0 && !o.f32 ? r.peak_bf16 : r.peak_fma;
            const double gemm_flops = 2.0 * T * (layer_params * o.layers + double(e * d));
            const double attn_flops = 4.0 * T * double(T) * double(d) * o.layers;
            // Stage times are 0 on the unclocked per-call path.
            const double gemm_gf = st.gemm > 0 ? gemm_flops / st.gemm / 1e9 : 0;
            const double attn_gf = st.attention > 0 ? attn_flops / st.attention / 1e9 : 0;
            r.tok_s = T / r.secs;
            r.total_gf = (gemm_flops + attn_flops) / r.secs / 1e9;
            r.fwd_frac = r.total_gf / peak_ref;
            // Per CPU second: both threads' CPU time, spinning included.
            r.fwd_frac_cpu = r.peak_bf16_cpu > 0 ? (gemm_flops + attn_flops) / (r.cpu_secs / o.threads) / 1e9 /
                                                       r.peak_bf16_cpu
                                                 : 0;
            r.gemm_frac = gemm_gf / peak_ref;
            r.attn_frac = attn_gf / peak_ref;
            r.attn_vs_gemm = gemm_gf > 0 ? attn_gf / gemm_gf : 0;
            r.rest_share = st.rest / r.secs;
            if (json)
                std::printf("{\"T\": %d, \"rep\": %d, \"seconds\": %.6f, \"tokens_per_s\": %.3f, \"gflops\": %.2f, "
                            "\"gemm_s\": %.6f, \"attention_s\": %.6f, \"rest_s\": %.6f, \"peak_bf16\": %.1f, "
                            "\"peak_fma\": %.1f, \"gemm_gflops\": %.2f, \"attention_gflops\": %.2f, \"cpu_seconds\": %.6f, "
                            "\"peak_bf16_cpu\": %.1f, \"kernels\": \"%s\", \"baseline_seconds\": %.6f}\n",
                            T, rep, r.secs, r.tok_s, r.total_gf, st.gemm, st.attention, st.rest, r.peak_bf16,
                            r.peak_fma, gemm_gf, attn_gf, r.cpu_secs, r.peak_bf16_cpu, dimoo::cpu::kernels_name(ks),
                            r.base_secs);
            std::fflush(stdout);
            return r;
    };
    if (o.serve) {
        int T, n = 0;
        while (std::scanf("%d", &T) == 1) {
            if (T < 1 || T > cfg.max_sequence_length) {
                std::printf("{\"error\": \"T=%d outside 1..%d\"}\n", T, cfg.max_sequence_length);
                std::fflush(stdout);
                continue;
            }
            measure(T, n++, true);
        }
        if (base) dimoo_model_destroy(base);
        dimoo_model_destroy(m);
        dimoo_runtime_destroy(rt);
        return 0;
    }
    for (int rep = 0; rep < o.reps; rep++)
        for (size_t ti = 0; ti < o.T.size(); ti++) rows[ti].push_back(measure(o.T[ti], rep, o.json));
    if (o.json) return 0;
    std::printf("dimoo CPU %s forward vs measured peak: kernels %s, %d threads, d=%d heads=%d/%d mlp=%d "
                "layers=%d vocab=%d, %d reps (median [min max])\n",
                o.f32 ? "fp32" : "bf16", dimoo::cpu::kernels_name(ks), o.threads, o.d, o.heads, o.kv_heads, o.mlp, o.layers, o.vocab,
                o.reps);
    auto cell = [](const std::vector<Row> &v, double Row::*f, double mul) {
        std::vector<double> x;
        for (const auto &r : v) x.push_back(r.*f * mul);
        const auto [lo, hi] = std::minmax_element(x.begin(), x.end());
        char b[64];
        const bool small = median(x) < 10;
        std::snprintf(b, sizeof b, small ? "%.2f [%.2f %.2f]" : "%.0f [%.0f %.0f]", median(x), *lo, *hi);
        return std::string(b);
    };
    std::printf("%6s | %-20s | %-20s | %-18s | %-18s | %-18s | %-18s | %-16s\n", "T",
                o.f32 ? "peak bf16 (fp32 ref)" : "peak bf16 GFLOP/s",
                "fwd GFLOP/s", "fwd % of peak", "GEMMs % of peak", "attn % of peak", "attn % of GEMM",
                "rest % of time");
    for (size_t ti = 0; ti < o.T.size(); ti++) {
        const auto &v = rows[ti];
        std::printf("%6d | %-20s | %-20s | %-18s | %-18s | %-18s | %-18s | %-16s\n", o.T[ti],
                    cell(v, &Row::peak_bf16, 1).c_str(), cell(v, &Row::total_gf, 1).c_str(),
                    cell(v, &Row::fwd_frac, 100).c_str(), cell(v, &Row::gemm_frac, 100).c_str(),
                    cell(v, &Row::attn_frac, 100).c_str(), cell(v, &Row::attn_vs_gemm, 100).c_str(),
                    cell(v, &Row::rest_share, 100).c_str());
    }
    std::printf("%6s | %-20s | %-26s | %-24s\n", "T", "tokens/s", o.f32 ? "peak FMA per CPU-s x thr" : "peak bf16 per CPU-s x thr",
                "fwd % of it (CPU time)");
    for (size_t ti = 0; ti < o.T.size(); ti++)
        std::printf("%6d | %-20s | %-26s | %-24s\n", o.T[ti], cell(rows[ti], &Row::tok_s, 1).c_str(),
                    cell(rows[ti], &Row::peak_bf16_cpu, 1).c_str(), cell(rows[ti], &Row::fwd_frac_cpu, 100).c_str());
    if (o.branch_rows > 0) {
        std::printf("%6s | %-6s | %-20s | %-20s | %-18s\n", "T", "rows", "pair in one call ms", "one call each ms",
                    "speed x");
        for (int T : o.T) {
            const int R = std::min(o.branch_rows, T);
            dimoo_ctx *ctx = nullptr;
            dimoo_ctx_params p{2, T, DIMOO_CTX_KV_CACHE};
            if (dimoo_ctx_create(m, &p, &ctx, err, sizeof err) != DIMOO_OK) die("ctx", err);
            std::vector<int32_t> rows(static_cast<size_t>(R));
            for (int i = 0; i < R; i++) rows[size_t(i)] = int32_t(int64_t(i) * T / R);
            std::vector<float> out(size_t(2) * size_t(R) * size_t(e));
            dimoo_forward_args a[2] = {};
            for (int b = 0; b < 2; b++) {
                a[b].seq = b;
                a[b].n_tokens = T;
                a[b].tokens = tokens.data() + b; // the branches differ
                a[b].cache_mode = DIMOO_CACHE_STORE;
            }
            auto call = [&](dimoo_forward_args *args, int n) {
                if (dimoo_forward(ctx, args, n) != DIMOO_OK) die("forward", dimoo_ctx_error(ctx));
            };
            call(a, 2);
            for (int b = 0; b < 2; b++) {
                a[b].cache_mode = DIMOO_CACHE_USE;
                a[b].n_compute = a[b].n_out = R;
                a[b].compute = a[b].out_positions = rows.data();
                a[b].logits = out.data() + size_t(b) * size_t(R) * size_t(e);
            }
            call(a, 2); // warm-up
            std::vector<Row> v;
            for (int rep = 0; rep < std::max(o.reps, 1); rep++) {
                Row r{};
                double t0 = now();
                call(a, 2);
                r.secs = now() - t0;
                t0 = now();
                call(&a[0], 1);
                call(&a[1], 1);
                r.base_secs = now() - t0;
                r.speedup = r.base_secs / r.secs;
                v.push_back(r);
            }
            std::printf("%6d | %-6d | %-20s | %-20s | %-18s\n", T, R, cell(v, &Row::secs, 1e3).c_str(),
                        cell(v, &Row::base_secs, 1e3).c_str(), cell(v, &Row::speedup, 1).c_str());
            dimoo_ctx_destroy(ctx);
        }
    }
    if (base) {
        std::printf("%6s | %-20s | %-20s | %-24s\n", "T", "fwd ms", ("fwd ms, " + o.baseline).c_str(),
                    ("speed x " + o.baseline).c_str());
        for (size_t ti = 0; ti < o.T.size(); ti++)
            std::printf("%6d | %-20s | %-20s | %-24s\n", o.T[ti], cell(rows[ti], &Row::secs, 1e3).c_str(),
                        cell(rows[ti], &Row::base_secs, 1e3).c_str(), cell(rows[ti], &Row::speedup, 1).c_str());
        dimoo_model_destroy(base);
    }
    dimoo_model_destroy(m);
    dimoo_runtime_destroy(rt);
    return 0;
}
