// bf16.cpp - packed bf16 GEMM tiles, the GEMM team loop, K/V packing and
// flash-style attention on top of them.
//
// Micro-kernel: up to 12 rows of A times one 32-column panel, 24 fp32
// accumulators (12 rows x 2 vectors of 16) held in registers over all of k.
// Per pair of k it loads the panel's 128-byte line once and broadcasts each
// row's (a_k, a_k+1) pair:
//   avx512bf16  VDPBF16PS: acc += a_k * b_k + a_k+1 * b_k+1 per lane
//   avx512      the same products widened to fp32, two FMAs (exact products,
//               so both agree up to the order of fp32 additions)
//   avx2        k in chunks: the chunk's pairs of A and of the panel widened
//               to fp32 in L1 (odd k before even, the order VDPBF16PS adds
//               them), then the fp32 tile's 6 rows x 16 columns FMA kernel;
//               the same products added in the same order as avx512
//   portable    plain C++ over 32 columns
//   amx         32 rows x the panel as four 16 x 16 tiles of TDPBF16PS, 16 k
//               pairs per step (AVX-512 BF16 for the pairs left over)
// The kernel sets are compiled with target attributes and picked at run
// time, so the library needs no AVX-512 to load.
#include "cpu/bf16.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "common.h"
#include "vecmath.h"

#if defined(__x86_64__) || defined(__i386__)
#define DIMOO_X86 1
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif
#if defined(DIMOO_X86) && defined(__linux__)
#define DIMOO_AMX 1 // the kernel must grant the tile state: Linux only
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dimoo::cpu {

// ---- kernel selection ------------------------------------------------------------------------

#if defined(DIMOO_AMX)
// Linux hands out AMX's 8 KiB of tile state only to processes that ask
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, Linux 5.16 and later); a
// tile instruction before that is SIGILL. The permission is process-wide.
bool amx_permitted() {
    static const bool ok = [] {
        unsigned a, b, c, d;
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
        if (!(d & (1u << 22)) || !(d & (1u << 24))) return false; // AMX-BF16, AMX-TILE
        constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023, kXtileData = 18;
        if (syscall(SYS_arch_prctl, kReqPerm, kXtileData) != 0) return false;
        unsigned long perm = 0;
        return syscall(SYS_arch_prctl, kGetPerm, &perm) == 0 && (perm & (1ul << kXtileData));
    }();
    return ok;
}
#endif

bool kernels_supported(Kernels k) {
    switch (k) {
    case Kernels::Portable: return true;
#if defined(DIMOO_X86)
    case Kernels::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Kernels::Avx512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Kernels::Avx512Bf16: return kernels_supported(Kernels::Avx512) && __builtin_cpu_supports("avx512bf16");
#if defined(DIMOO_AMX)
    case Kernels::Amx: return kernels_supported(Kernels::Avx512Bf16) && amx_permitted();
#endif
#endif
    default: return false;
    }
}

Kernels best_kernels() {
    Kernels k = Kernels::Portable;
    for (Kernels c : {Kernels::Amx, Kernels::Avx512Bf16, Kernels::Avx512, Kernels::Avx2})
        if (kernels_supported(c)) {
            k = c;
            break;
        }
    if (const char *e = std::getenv("DIMOO_CPU_KERNELS")) {
        const std::string s(e);
        for (Kernels cap : {Kernels::Portable, Kernels::Avx2, Kernels::Avx512, Kernels::Avx512Bf16})
            if (s == kernels_name(cap) && k > cap) k = cap;
    }
    return k;
}

const char *kernels_name(Kernels k) {
    switch (k) {
    case Kernels::Amx: return "amx";
    case Kernels::Avx512Bf16: return "avx512bf16";
    case Kernels::Avx512: return "avx512";
    case Kernels::Avx2: return "avx2";
    default: return "portable";
    }
}

// ---- packing ------------------------------------------------------------------------------------

void round_bf16(const float *src, int n, uint16_t *dst, int n_pad) {
    for (int i = 0; i < n; ++i) {
        // Round to nearest even (finite inputs; NaN handling of f32_to_bf16
        // is not needed on activations and would stop vectorisation).
        uint32_t u;
        std::memcpy(&u, src + i, 4);
        u += 0x7fffu + ((u >> 16) & 1u);
        dst[i] = uint16_t(u >> 16);
    }
    for (int i = n; i < n_pad; ++i) dst[i] = 0;
}

void pack_matrix(const void *W, int32_t dtype, int N, int K, PackedMatrix &out) {
    out.N = N;
    out.K = K;
    out.Kp = (K + 1) / 2;
    out.panels = (N + kPanel - 1) / kPanel;
    // Unwritten by resize: each panel's task zeroes the panel first when
    // its loop leaves part of it (rows past N, the odd k's pair) unwritten.
    const size_t panel_elems = size_t(unsigned(out.Kp)) * 64; // unsigned: no "negative size" for GCC
    out.data.clear();
    out.data.resize(size_t(out.panels) * panel_elems);
    const bool raw = dtype == DIMOO_BF16;
    if (raw && K % 2 == 0) {
        // A bf16 pair (k = 2i, 2i + 1) is one 32-bit word in the row and in
        // the panel: the panel is the transpose of 32 rows of Kp words,
        // done in blocks of 64 words a row so the block stays in L1.
        const auto *W16 = static_cast<const uint16_t *>(W);
#pragma omp parallel for schedule(dynamic, 1)
        for (int p = 0; p < out.panels; ++p) {
            uint16_t *dst = out.data.data() + size_t(p) * panel_elems;
            const int rows = std::min(kPanel, N - p * kPanel);
            if (rows < kPanel) std::fill_n(dst, panel_elems, uint16_t(0));
            for (int i0 = 0; i0 < out.Kp; i0 += 64) {
                const int i1 = std::min(out.Kp, i0 + 64);
                for (int j = 0; j < rows; ++j) {
                    const uint16_t *src = W16 + size_t(p * kPanel + j) * size_t(K);
                    for (int i = i0; i < i1; ++i) std::memcpy(dst + (size_t(i) * kPanel + size_t(j)) * 2, src + 2 * size_t(i), 4);
                }
            }
        }
        return;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (int p = 0; p < out.panels; ++p) {
        uint16_t *dst = out.data.data() + size_t(p) * panel_elems;
        if (N - p * kPanel < kPanel || K % 2) std::fill_n(dst, panel_elems, uint16_t(0));
        for (int j = 0; j < kPanel && p * kPanel + j < N; ++j) {
            const size_t row = size_t(p * kPanel + j) * size_t(K);
            for (int k = 0; k < K; ++k) {
                const uint16_t h = raw ? static_cast<const uint16_t *>(W)[row + size_t(k)]
                                       : f32_to_bf16(load_as_f32(W, dtype, row + size_t(k)));
                dst[(size_t(k / 2) * kPanel + size_t(j)) * 2 + size_t(k % 2)] = h;
            }
        }
    }
}

void unpack_matrix(const PackedMatrix &p, uint16_t *W) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int q = 0; q < p.panels; ++q) {
        const uint16_t *src = p.panel(q);
        for (int j = 0; j < kPanel && q * kPanel + j < p.N; ++j) {
            uint16_t *row = W + size_t(q * kPanel + j) * size_t(p.K);
            for (int k = 0; k < p.K; ++k) row[k] = src[(size_t(k / 2) * kPanel + size_t(j)) * 2 + size_t(k % 2)];
        }
    }
}

namespace {

// ---- micro-kernels --------------------------------------------------------------------------

// Accumulator rows in and out of C for the column range [c0, c1) of a panel.
inline void read_row(const float *c, int c0, int c1, bool accumulate, float *t) {
    for (int j = 0; j < kPanel; ++j) t[j] = accumulate && j >= c0 && j < c1 ? c[j - c0] : 0.0f;
}
inline void write_row(const float *t, int c0, int c1, float *c) {
    for (int j = c0; j < c1; ++j) c[j - c0] = t[j];
}

using MicroFn = void (*)(int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C, size_t ldc,
                         int c0, int c1, bool accumulate);

template <int R>
void micro_portable(int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C, size_t ldc,
                    int c0, int c1, bool accumulate) {
    alignas(64) float acc[R][kPanel];
    for (int m = 0; m < R; ++m) read_row(C + size_t(m) * ldc, c0, c1, accumulate, acc[m]);
    for (int k = 0; k < kp; ++k) {
        alignas(64) float b0[kPanel], b1[kPanel];
        const uint16_t *b = B + size_t(k) * ps;
        for (int j = 0; j < kPanel; ++j) {
            b0[j] = bf16_to_f32(b[2 * j]);
            b1[j] = bf16_to_f32(b[2 * j + 1]);
        }
        for (int m = 0; m < R; ++m) {
            const uint32_t a = A[size_t(m) * lda + size_t(k)];
            const float a0 = bf16_to_f32(uint16_t(a & 0xffffu)), a1 = bf16_to_f32(uint16_t(a >> 16));
            // Odd k first, as VDPBF16PS adds them (products are exact).
            for (int j = 0; j < kPanel; ++j) acc[m][j] = (acc[m][j] + a1 * b1[j]) + a0 * b0[j];
        }
    }
    for (int m = 0; m < R; ++m) write_row(acc[m], c0, c1, C + size_t(m) * ldc);
}

#if defined(DIMOO_X86)
#define DIMOO_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define DIMOO_TBF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

template <int R>
DIMOO_T512 inline void load_acc(__m512 (&acc)[R][2], const float *C, size_t ldc, int c0, int c1, bool accumulate) {
    for (int m = 0; m < R; ++m) {
        const float *c = C + size_t(m) * ldc;
        if (!accumulate) {
            acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        } else if (c0 == 0 && c1 == kPanel) {
            acc[m][0] = _mm512_loadu_ps(c);
            acc[m][1] = _mm512_loadu_ps(c + 16);
        } else {
            alignas(64) float t[kPanel];
            read_row(c, c0, c1, true, t);
            acc[m][0] = _mm512_load_ps(t);
            acc[m][1] = _mm512_load_ps(t + 16);
        }
    }
}

template <int R>
DIMOO_T512 inline void store_acc(__m512 (&acc)[R][2], float *C, size_t ldc, int c0, int c1) {
    for (int m = 0; m < R; ++m) {
        float *c = C + size_t(m) * ldc;
        if (c0 == 0 && c1 == kPanel) {
            _mm512_storeu_ps(c, acc[m][0]);
            _mm512_storeu_ps(c + 16, acc[m][1]);
        } else {
            alignas(64) float t[kPanel];
            _mm512_store_ps(t, acc[m][0]);
            _mm512_store_ps(t + 16, acc[m][1]);
            write_row(t, c0, c1, c);
        }
    }
}

template <int R>
DIMOO_TBF16 void micro_bf16(int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C,
                            size_t ldc, int c0, int c1, bool accumulate) {
    __m512 acc[R][2];
    load_acc<R>(acc, C, ldc, c0, c1, accumulate);
    for (int k = 0; k < kp; ++k) {
        const uint16_t *b = B + size_t(k) * ps;
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 32);
        for (int m = 0; m < R; ++m) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(int(A[size_t(m) * lda + size_t(k)]));
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, b0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, b1);
        }
    }
    store_acc<R>(acc, C, ldc, c0, c1);
}

template <int R>
DIMOO_T512 void micro_avx512(int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C,
                             size_t ldc, int c0, int c1, bool accumulate) {
    __m512 acc[R][2];
    load_acc<R>(acc, C, ldc, c0, c1, accumulate);
    const __m512i hi = _mm512_set1_epi32(int(0xffff0000u));
    for (int k = 0; k < kp; ++k) {
        const uint16_t *b = B + size_t(k) * ps;
        const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 32);
        // Even k is the low half of each 32-bit lane, odd k the high half.
        const __m512 e0 = _mm512_castsi512_ps(_mm512_slli_epi32(b0, 16));
        const __m512 o0 = _mm512_castsi512_ps(_mm512_and_si512(b0, hi));
        const __m512 e1 = _mm512_castsi512_ps(_mm512_slli_epi32(b1, 16));
        const __m512 o1 = _mm512_castsi512_ps(_mm512_and_si512(b1, hi));
        for (int m = 0; m < R; ++m) {
            const uint32_t a = A[size_t(m) * lda + size_t(k)];
            const __m512 ae = _mm512_castsi512_ps(_mm512_set1_epi32(int(a << 16)));
            const __m512 ao = _mm512_castsi512_ps(_mm512_set1_epi32(int(a & 0xffff0000u)));
            // Odd k first, as VDPBF16PS adds them.
            acc[m][0] = _mm512_fmadd_ps(ae, e0, _mm512_fmadd_ps(ao, o0, acc[m][0]));
            acc[m][1] = _mm512_fmadd_ps(ae, e1, _mm512_fmadd_ps(ao, o1, acc[m][1]));
        }
    }
    store_acc<R>(acc, C, ldc, c0, c1);
}
#endif

#define DIMOO_MICRO_TABLE(fn)                                                                                        \
    const MicroFn fn##_table[kTileRows + 1] = {nullptr,   fn<1>,  fn<2>,  fn<3>, fn<4>,  fn<5>, fn<6>,           \
                                               fn<7>,     fn<8>,  fn<9>,  fn<10>, fn<11>, fn<12>};
// fp32 tiles: per k one 32-float panel row, one broadcast per row of A.
using MicroF32Fn = void (*)(int K, const float *A, size_t lda, const float *B, size_t ps, float *C, size_t ldc,
                            int c0, int c1, bool accumulate);

template <int R>
void micro_f32_portable(int K, const float *A, size_t lda, const float *B, size_t ps, float *C, size_t ldc, int c0,
                        int c1, bool accumulate) {
    alignas(64) float acc[R][kPanel];
    for (int m = 0; m < R; ++m) read_row(C + size_t(m) * ldc, c0, c1, accumulate, acc[m]);
    for (int k = 0; k < K; ++k) {
        const float *b = B + size_t(k) * ps;
        for (int m = 0; m < R; ++m) {
            const float a = A[size_t(m) * lda + size_t(k)];
            for (int j = 0; j < kPanel; ++j) acc[m][j] += a * b[j];
        }
    }
    for (int m = 0; m < R; ++m) write_row(acc[m], c0, c1, C + size_t(m) * ldc);
}

#if defined(DIMOO_X86)
template <int R>
DIMOO_T512 void micro_f32_avx512(int K, const float *A, size_t lda, const float *B, size_t ps, float *C, size_t ldc,
                                 int c0, int c1, bool accumulate) {
    __m512 acc[R][2];
    load_acc<R>(acc, C, ldc, c0, c1, accumulate);
    for (int k = 0; k < K; ++k) {
        const float *b = B + size_t(k) * ps;
        const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        for (int m = 0; m < R; ++m) {
            const __m512 a = _mm512_set1_ps(A[size_t(m) * lda + size_t(k)]);
            acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
        }
    }
    store_acc<R>(acc, C, ldc, c0, c1);
}
#endif

#define DIMOO_MICRO_F32_TABLE(fn)                                                                                    \
    const MicroF32Fn fn##_table[kTileRows + 1] = {nullptr, fn<1>, fn<2>, fn<3>,  fn<4>,  fn<5>, fn<6>,             \
                                                  fn<7>,   fn<8>, fn<9>, fn<10>, fn<11>, fn<12>};
DIMOO_MICRO_F32_TABLE(micro_f32_portable)
#if defined(DIMOO_X86)
DIMOO_MICRO_F32_TABLE(micro_f32_avx512)
#endif

const MicroF32Fn *micro_f32_table(Kernels ks) {
#if defined(DIMOO_X86)
    if (ks >= Kernels::Avx512) return micro_f32_avx512_table;
#endif
    (void)ks;
    return micro_f32_portable_table;
}

DIMOO_MICRO_TABLE(micro_portable)
#if defined(DIMOO_X86)
DIMOO_MICRO_TABLE(micro_bf16)
DIMOO_MICRO_TABLE(micro_avx512)
#endif

const MicroFn *micro_table(Kernels ks) {
#if defined(DIMOO_X86)
    if (ks == Kernels::Avx512Bf16 || ks == Kernels::Amx) return micro_bf16_table;
    if (ks == Kernels::Avx512) return micro_avx512_table;
#endif
    (void)ks;
    return micro_portable_table;
}

#if defined(DIMOO_AMX)
struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");
#endif

// The tile configuration one thread has loaded, tracked through one team
// call. Reading it back (STTILECFG) waits for the tile instructions in
// flight: once per 32-row block of attention's short products it cost
// about 5% of a forward. So a team call reads it once and then follows its
// own loads; no other AMX code runs on the thread in between.
struct TileState {
#if defined(DIMOO_AMX)
    TileConfig cfg;
    bool read = false;
#endif
};

#if defined(DIMOO_AMX)
// ---- AMX ------------------------------------------------------------------------------------------
//
// A block of up to 32 rows of A times one 32-column panel as four 16 x 16
// fp32 accumulator tiles: C0 C1 (rows 0-15, columns 0-15 and 16-31), C2 C3
// (rows 16-31); A4, A5 the two row halves and B6, B7 the two column halves
// of 16 k pairs. The panel's layout (32 columns x 2 k per 128-byte line) is
// already what TDPBF16PS takes for B: a B tile is 16 lines of 64 bytes at a
// stride of the panel's line. A's rows of pairs are A tiles as they lie.
// Each accumulator row depends only on its own row of A, so a row gives the
// same bits whatever rows share its block (ML-Cache rows, batched
// sequences). k pairs past the last multiple of 16 go through the AVX-512
// BF16 kernel on the tile's result.
#define DIMOO_TAMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Tile rows: r0 for the first row half, r1 for the second (16 when the
// block has none, so the common shapes share one configuration). The
// configuration is per thread; it is loaded only when the thread's differs
// (LDTILECFG costs about 100 cycles). st: the thread's state in a team
// call, or null to read the configuration back.
DIMOO_TAMX void amx_configure(int r0, int r1, TileState *st) {
    TileConfig want{};
    want.palette = 1;
    for (int t : {0, 1, 4}) want.rows[t] = uint8_t(r0);
    for (int t : {2, 3, 5}) want.rows[t] = uint8_t(r1);
    for (int t : {6, 7}) want.rows[t] = 16;
    for (int t = 0; t < 8; ++t) want.colsb[t] = 64;
    TileConfig local;
    TileConfig &cur = st ? st->cfg : local;
    if (!st || !st->read) {
        _tile_storeconfig(&cur);
        // GCC does not see the tile configuration instructions touch memory.
        asm volatile("" : : "r"(&cur) : "memory");
        if (st) st->read = true;
    }
    if (std::memcmp(&cur, &want, sizeof want) != 0) {
        asm volatile("" : : "r"(&want) : "memory");
        _tile_loadconfig(&want);
        cur = want;
    }
}

// C (stride ldc floats, 32 columns) = (load ? C : 0) + A B over kp16 pairs
// (a multiple of 16); rows 16.. only when TWO. PREFETCH: for the GEMMs' long
// k loops; attention's 4-step products run 1.05-1.09x faster without (its
// blocks are in L2 anyway, and 64 prefetches a step only take load slots).
template <bool TWO, bool PREFETCH = true>
DIMOO_TAMX void amx_block(int kp16, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C, size_t ldc,
                          bool load) {
    const size_t sa = lda * 4, sb = ps * 2, sc = ldc * 4;
    float *C2 = C + 16 * ldc;
    if (load) {
        _tile_loadd(0, C, sc);
        _tile_loadd(1, C + 16, sc);
        if (TWO) {
            _tile_loadd(2, C2, sc);
            _tile_loadd(3, C2 + 16, sc);
        }
    } else {
        _tile_zero(0);
        _tile_zero(1);
        if (TWO) {
            _tile_zero(2);
            _tile_zero(3);
        }
    }
    for (int k = 0; k < kp16; k += 16) {
        // The next k step's rows of A (16 pairs on) and the panel's lines
        // two steps on into L1: tile loads wait for their lines, and neither
        // the 16 or 32 strided rows of A nor the panel are in L1 otherwise
        // (+9-17% on the model's GEMM shapes here; further ahead gains less).
        if (PREFETCH && k + 16 < kp16)
            for (int i = 0; i < (TWO ? 32 : 16); ++i)
                _mm_prefetch(reinterpret_cast<const char *>(A + size_t(i) * lda + size_t(k + 16)), _MM_HINT_T0);
        if (PREFETCH && k + 32 < kp16)
            for (int i = 0; i < 32; ++i)
                _mm_prefetch(reinterpret_cast<const char *>(B + size_t(k + 32) * ps + size_t(i) * 32), _MM_HINT_T0);
        const uint16_t *b = B + size_t(k) * ps;
        _tile_loadd(6, b, sb);
        _tile_loadd(7, b + 32, sb);
        _tile_loadd(4, A + k, sa);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if (TWO) {
            _tile_loadd(5, A + 16 * lda + k, sa);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, C, sc);
    _tile_stored(1, C + 16, sc);
    if (TWO) {
        _tile_stored(2, C2, sc);
        _tile_stored(3, C2 + 16, sc);
    }
}

// Rows [0, R) (R <= 32) of a block: configured, then the one- or two-half kernel.
template <bool PREFETCH = true>
DIMOO_TAMX void amx_rows(int R, int kp16, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C,
                         size_t ldc, bool load, TileState *st) {
    amx_configure(std::min(R, 16), R > 16 ? R - 16 : 16, st);
    if (R > 16) amx_block<true, PREFETCH>(kp16, A, lda, B, ps, C, ldc, load);
    else amx_block<false, PREFETCH>(kp16, A, lda, B, ps, C, ldc, load);
}

// tile() on AMX: the same contract.
DIMOO_TAMX void tile_amx(int rows, int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps, float *C,
                         size_t ldc, int c0, int c1, bool accumulate, TileState *st) {
    const int kp16 = kp & ~15;
    // Straight into C when the block covers the whole panel and all of k;
    // else through a 32 x 32 buffer that starts as C's columns (or zeros).
    const bool direct = c0 == 0 && c1 == kPanel && kp16 == kp;
    alignas(64) float buf[32 * kPanel];
    for (int r = 0; r < rows; r += 32) {
        const int R = std::min(32, rows - r);
        const uint32_t *a = A + size_t(r) * lda;
        float *c = C + size_t(r) * ldc;
        float *dst = direct ? c : buf;
        const size_t ld = direct ? ldc : kPanel;
        if (!direct)
            for (int m = 0; m < R; ++m) read_row(c + size_t(m) * ldc, c0, c1, accumulate, buf + m * kPanel);
        amx_rows(R, kp16, a, lda, B, ps, dst, ld, accumulate || !direct, st);
        if (direct) continue;
        for (int m = 0; m < R && kp16 < kp; m += kTileRows) {
            const int n = std::min(kTileRows, R - m);
            micro_bf16_table[n](kp - kp16, a + size_t(m) * lda + kp16, lda, B + size_t(kp16) * ps, ps,
                                buf + m * kPanel, kPanel, 0, kPanel, true);
        }
        for (int m = 0; m < R; ++m) write_row(buf + m * kPanel, c0, c1, c + size_t(m) * ldc);
    }
}

// np whole panels at once, kp a multiple of 16: panel p's B at B + p * bstep
// (uint16) and its C at C + p * 32. Attention's products are this short
// (4 k steps), so one call per block of rows instead of one per panel, and
// no software prefetch.
DIMOO_TAMX void panels_amx(int rows, int np, int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps,
                           size_t bstep, float *C, size_t ldc, bool accumulate, TileState *st) {
    for (int r = 0; r < rows; r += 32) {
        const int R = std::min(32, rows - r);
        const uint32_t *a = A + size_t(r) * lda;
        float *c = C + size_t(r) * ldc;
        for (int p = 0; p < np; ++p)
            amx_rows<false>(R, kp, a, lda, B + size_t(p) * bstep, ps, c + p * kPanel, ldc, accumulate, st);
    }
}
#endif

#if defined(DIMOO_X86)
// ---- AVX2 -----------------------------------------------------------------------------------------
//
// 16 ymm registers: accumulators for 6 rows x 16 columns (12), two vectors of
// B and one broadcast of A. The bf16 tile widens a chunk of k to fp32 first
// (A's once per block of rows for all the panels of a call, each panel's
// once per block of rows), so the fp32 and bf16 tiles share one FMA
// kernel; within a pair the odd k comes first,
// as VDPBF16PS adds them, so the products (exact in fp32) are added in the
// AVX-512 kernels' order and give their bits.
#define DIMOO_T256 __attribute__((target("avx2,fma")))

// C[m][0:16] = (load ? C[m][0:16] : 0) + sum_k A[m][k] B[k][0:16] for m < R;
// A's rows lda floats apart, B's rows ps.
template <int R>
DIMOO_T256 void fma_rows_avx2(int K, const float *A, size_t lda, const float *B, size_t ps, float *C, size_t ldc,
                              bool load) {
    // Fully unrolled over the rows, or GCC keeps the accumulators on the stack.
    __m256 acc[R][2];
#pragma GCC unroll 6
    for (int m = 0; m < R; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    if (load)
#pragma GCC unroll 6
        for (int m = 0; m < R; ++m) {
            acc[m][0] = _mm256_loadu_ps(C + size_t(m) * ldc);
            acc[m][1] = _mm256_loadu_ps(C + size_t(m) * ldc + 8);
        }
    for (int k = 0; k < K; ++k) {
        const float *b = B + size_t(k) * ps;
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
        for (int m = 0; m < R; ++m) {
            const __m256 a = _mm256_broadcast_ss(A + size_t(m) * lda + size_t(k));
            acc[m][0] = _mm256_fmadd_ps(a, b0, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(a, b1, acc[m][1]);
        }
    }
#pragma GCC unroll 6
    for (int m = 0; m < R; ++m) {
        _mm256_storeu_ps(C + size_t(m) * ldc, acc[m][0]);
        _mm256_storeu_ps(C + size_t(m) * ldc + 8, acc[m][1]);
    }
}

constexpr int kRowsAvx2 = 6;
using FmaRowsFn = void (*)(int, const float *, size_t, const float *, size_t, float *, size_t, bool);
const FmaRowsFn fma_rows_avx2_table[kRowsAvx2 + 1] = {nullptr,          fma_rows_avx2<1>, fma_rows_avx2<2>,
                                                      fma_rows_avx2<3>, fma_rows_avx2<4>, fma_rows_avx2<5>,
                                                      fma_rows_avx2<6>};

// Rows [r0, r0 + R) of a 32-column result through the kernel, both halves
// or only those that hold a column of [c0, c1).
inline void fma_panel_avx2(int R, int K, const float *A, size_t lda, const float *B, size_t ps, float *C, size_t ldc,
                           int c0, int c1, bool load) {
    for (int h = 0; h < kPanel; h += 16)
        if (c0 < h + 16 && c1 > h) fma_rows_avx2_table[R](K, A, lda, B + h, ps, C + h, ldc, load);
}

// tile_f32() on AVX2: straight into C for whole panels, else through a
// 6 x 32 buffer that starts as C's columns (or zeros).
DIMOO_T256 void tile_f32_avx2(int rows, int K, const float *A, size_t lda, const float *B, size_t ps, float *C,
                              size_t ldc, int c0, int c1, bool accumulate) {
    const bool whole = c0 == 0 && c1 == kPanel;
    alignas(32) float buf[kRowsAvx2 * kPanel];
    for (int r = 0; r < rows; r += kRowsAvx2) {
        const int R = std::min(kRowsAvx2, rows - r);
        float *c = C + size_t(r) * ldc;
        if (whole) {
            fma_panel_avx2(R, K, A + size_t(r) * lda, lda, B, ps, c, ldc, 0, kPanel, accumulate);
            continue;
        }
        for (int m = 0; m < R; ++m) read_row(c + size_t(m) * ldc, c0, c1, accumulate, buf + m * kPanel);
        fma_panel_avx2(R, K, A + size_t(r) * lda, lda, B, ps, buf, kPanel, c0, c1, true);
        for (int m = 0; m < R; ++m) write_row(buf + m * kPanel, c0, c1, c + size_t(m) * ldc);
    }
}

constexpr int kChunkPairs = 64;   // k pairs widened at a time: 16 KiB of the panel's fp32
constexpr int kRowBlockAvx2 = 96; // rows per widened chunk of A

// A panel's pairs [0, np) (lines ps uint16 apart) as fp32 rows of 32
// columns: pair i's odd k at row 2i, its even k at row 2i + 1.
DIMOO_T256 void widen_panel(const uint16_t *B, size_t ps, int np, float *out) {
    const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
    for (int i = 0; i < np; ++i) {
        const uint16_t *b = B + size_t(i) * ps;
        float *o = out + size_t(i) * 2 * kPanel;
        for (int j = 0; j < kPanel; j += 8) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b + 2 * j));
            _mm256_store_ps(o + j, _mm256_castsi256_ps(_mm256_and_si256(w, hi)));
            _mm256_store_ps(o + kPanel + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
    }
}

// R rows of A's pairs [0, np) (rows lda pairs apart) as fp32 rows of 2 np,
// ld floats apart: odd k, then even, per pair.
DIMOO_T256 void widen_rows(int R, const uint32_t *A, size_t lda, int np, float *out, size_t ld) {
    const __m256i hi = _mm256_set1_epi32(int(0xffff0000u));
    for (int m = 0; m < R; ++m) {
        const uint32_t *a = A + size_t(m) * lda;
        float *o = out + size_t(m) * ld;
        int i = 0;
        for (; i + 8 <= np; i += 8) {
            const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a + i));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(w, hi));
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            // Interleave within 128-bit lanes, then put the lanes in order.
            const __m256 lo = _mm256_unpacklo_ps(odd, even), up = _mm256_unpackhi_ps(odd, even);
            _mm256_store_ps(o + 2 * i, _mm256_permute2f128_ps(lo, up, 0x20));
            _mm256_store_ps(o + 2 * i + 8, _mm256_permute2f128_ps(lo, up, 0x31));
        }
        for (; i < np; ++i) {
            o[2 * i] = bf16_to_f32(uint16_t(a[i] >> 16));
            o[2 * i + 1] = bf16_to_f32(uint16_t(a[i] & 0xffffu));
        }
    }
}

// The bf16 tile on AVX2 over np >= 1 consecutive panels, A's chunk widened
// once for all of them: panel i's B at B + i * bstep (uint16); its columns are
// [c_lo, 32) for the first panel, [0, c_hi) for the last, all for the
// others, and column c of panel i sits at C[32 i + c - c_lo]. A partial
// panel collects in a buffer over the chunks.
DIMOO_T256 void panels_avx2(int rows, int np, int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t ps,
                            size_t bstep, float *C, size_t ldc, int c_lo, int c_hi, bool accumulate) {
    alignas(32) float bw[2 * kChunkPairs * kPanel];
    alignas(32) float aw[kRowBlockAvx2 * 2 * kChunkPairs];
    alignas(32) float edge[2][kRowBlockAvx2 * kPanel]; // the first and the last panel, when partial
    const int n_ends = np > 1 ? 2 : 1, ends[2] = {0, np - 1};
    auto c0_of = [&](int i) { return i == 0 ? c_lo : 0; };
    auto c1_of = [&](int i) { return i == np - 1 ? c_hi : kPanel; };
    auto partial = [&](int i) { return c0_of(i) > 0 || c1_of(i) < kPanel; };
    // Row r's column c0 of panel i in C.
    auto at = [&](int i, int r) { return C + size_t(r) * ldc + size_t(i * kPanel + c0_of(i) - c_lo); };
    for (int r0 = 0; r0 < rows; r0 += kRowBlockAvx2) {
        const int nr = std::min(kRowBlockAvx2, rows - r0);
        for (int e = 0; e < n_ends; ++e)
            if (partial(ends[e]))
                for (int m = 0; m < nr; ++m)
                    read_row(at(ends[e], r0 + m), c0_of(ends[e]), c1_of(ends[e]), accumulate, edge[e] + m * kPanel);
        for (int k0 = 0; k0 < kp; k0 += kChunkPairs) {
            const int nk = std::min(kChunkPairs, kp - k0);
            widen_rows(nr, A + size_t(r0) * lda + size_t(k0), lda, nk, aw, 2 * kChunkPairs);
            for (int i = 0; i < np; ++i) {
                const bool part = partial(i);
                // A whole panel's column 0 is its column c0.
                float *dst = part ? edge[i == 0 ? 0 : 1] : at(i, r0);
                const size_t ld = part ? kPanel : ldc;
                widen_panel(B + size_t(i) * bstep + size_t(k0) * ps, ps, nk, bw);
                for (int r = 0; r < nr; r += kRowsAvx2)
                    fma_panel_avx2(std::min(kRowsAvx2, nr - r), 2 * nk, aw + size_t(r) * 2 * kChunkPairs,
                                   2 * kChunkPairs, bw, kPanel, dst + size_t(r) * ld, ld, c0_of(i), c1_of(i),
                                   accumulate || part || k0 > 0);
            }
        }
        for (int e = 0; e < n_ends; ++e)
            if (partial(ends[e]))
                for (int m = 0; m < nr; ++m)
                    write_row(edge[e] + m * kPanel, c0_of(ends[e]), c1_of(ends[e]), at(ends[e], r0 + m));
    }
}
#endif

// tile() with the calling team's tile state (null: none).
void tile_st(Kernels ks, int rows, int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t pstride,
             float *C, size_t ldc, int c0, int c1, bool accumulate, TileState *st) {
#if defined(DIMOO_AMX)
    if (ks == Kernels::Amx && kp >= 16)
        return tile_amx(rows, kp, A, lda, B, pstride, C, ldc, c0, c1, accumulate, st);
#endif
    (void)st;
#if defined(DIMOO_X86)
    if (ks == Kernels::Avx2) return panels_avx2(rows, 1, kp, A, lda, B, pstride, 0, C, ldc, c0, c1, accumulate);
#endif
    const MicroFn *fn = micro_table(ks);
    for (int r = 0; r < rows; r += kTileRows) {
        const int R = std::min(kTileRows, rows - r);
        fn[R](kp, A + size_t(r) * lda, lda, B, pstride, C + size_t(r) * ldc, ldc, c0, c1, accumulate);
    }
}
} // namespace

void tile(Kernels ks, int rows, int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t pstride,
          float *C, size_t ldc, int c0, int c1, bool accumulate) {
    tile_st(ks, rows, kp, A, lda, B, pstride, C, ldc, c0, c1, accumulate, nullptr);
}

void tile_f32(Kernels ks, int rows, int K, const float *A, size_t lda, const float *B, size_t pstride, float *C,
              size_t ldc, int c0, int c1, bool accumulate) {
#if defined(DIMOO_X86)
    if (ks == Kernels::Avx2) return tile_f32_avx2(rows, K, A, lda, B, pstride, C, ldc, c0, c1, accumulate);
#endif
    const MicroF32Fn *fn = micro_f32_table(ks);
    for (int r = 0; r < rows; r += kTileRows) {
        const int R = std::min(kTileRows, rows - r);
        fn[R](K, A + size_t(r) * lda, lda, B, pstride, C + size_t(r) * ldc, ldc, c0, c1, accumulate);
    }
}

void pack_matrix_f32(const void *W, int32_t dtype, int N, int K, PackedMatrixF32 &out) {
    out.N = N;
    out.K = K;
    out.panels = (N + kPanel - 1) / kPanel;
    out.data.clear(); // unwritten by resize, as in pack_matrix
    out.data.resize(size_t(out.panels) * size_t(K) * kPanel);
#pragma omp parallel for schedule(dynamic, 1)
    for (int p = 0; p < out.panels; ++p) {
        float *dst = out.data.data() + size_t(p) * size_t(K) * kPanel;
        if (N - p * kPanel < kPanel) std::fill_n(dst, size_t(K) * kPanel, 0.0f);
        for (int j = 0; j < kPanel && p * kPanel + j < N; ++j) {
            const size_t row = size_t(p * kPanel + j) * size_t(K);
            for (int k = 0; k < K; ++k) dst[size_t(k) * kPanel + size_t(j)] = load_as_f32(W, dtype, row + size_t(k));
        }
    }
}

void unpack_matrix_f32(const PackedMatrixF32 &p, float *W) {
#pragma omp parallel for schedule(dynamic, 1)
    for (int q = 0; q < p.panels; ++q) {
        const float *src = p.panel(q);
        for (int j = 0; j < kPanel && q * kPanel + j < p.N; ++j) {
            float *row = W + size_t(q * kPanel + j) * size_t(p.K);
            for (int k = 0; k < p.K; ++k) row[k] = src[size_t(k) * kPanel + size_t(j)];
        }
    }
}

// ---- GEMM team -----------------------------------------------------------------------------------

namespace {
constexpr int kBlockRows = 8 * kTileRows; // rows of A per task (panel-major order)
constexpr int kColPanels = 32;            // panels per column block (blocked order): 1024 columns

// This core's share of L2 in bytes (a guess of 1 MiB when the system won't say).
size_t l2_bytes() {
    static const size_t v = [] {
        long n = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
        n = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        return n > 0 ? size_t(n) : size_t(1) << 20;
    }();
    return v;
}

// Rows of A per task in the blocked order for rows of row_bytes: on AMX a
// multiple of 32, at most 192, or 0 (the panel-major order) when fewer than
// 96 fit three quarters of L2. On AVX2 always kRowBlockAvx2, whatever k:
// panels_avx2 reads A once per task, a chunk of k at a time, so A need not
// stay in L2, while the panel-major order would widen A again per panel.
int blocked_rows(Kernels ks, size_t row_bytes) {
#if defined(DIMOO_X86)
    if (ks == Kernels::Avx2) return kRowBlockAvx2;
#endif
    const size_t fit = l2_bytes() * 3 / 4 / row_bytes;
    const int mb = int(std::min<size_t>(fit, 192)) / 32 * 32;
    return mb >= 96 ? mb : 0;
}

// Hands out the tiles of the jobs to the team; run(job, first panel, end
// panel, first row, rows) computes rows x the job's columns in those panels
// over all of k (so each output's sums are in the same order whatever the
// schedule).
//
// Blocked order, when a block of Mb > 0 rows of A fits L2 (blocked_rows()):
// per job, column blocks of kColPanels panels; in each, row blocks
// of Mb rows x groups of G panels. A task's row block stays in L2
// over its G panels, and the column block's panels (8 MiB at k = 4096) are
// read again per row block from the shared L3. The panel-major order reads
// the rows of A again per panel instead, 32 columns of work per byte, and
// was 1.08-1.21x slower on AMX at k = 4096 (M = 112-4228, N = 4096-12288;
// medians of `dimoo_cpupeak --gemm`, on 2 cores of a 2 MiB-L2 Xeon).
// Otherwise (AMX with k too long for a row block in L2, e.g. the MLP's
// down projection): job-major, then panel, then row block of kBlockRows.
template <class Job, class Run> void team_tasks(int M, const Job *jobs, int n_jobs, int Mb, Run run) {
    n_jobs = std::min(n_jobs, 7);
    // The panel-major order is the blocked one with one-panel column blocks,
    // kBlockRows-row blocks and one panel per task.
    int CB = kColPanels, G = 8;
    if (Mb == 0) Mb = kBlockRows, CB = 1, G = 1;
    const int mbs = (M + Mb - 1) / Mb;
    auto panels = [&](const Job &g, int &p0, int &p1) {
        p0 = g.n0 / kPanel;
        p1 = (g.n1 + kPanel - 1) / kPanel;
    };
    // Tasks of job j with G panels a task: row blocks x groups per column block.
    auto tasks = [&](int j, int g) {
        int p0, p1;
        panels(jobs[j], p0, p1);
        const int np = p1 - p0;
        return mbs * ((np / CB) * (CB / g) + (np % CB + g - 1) / g);
    };
    auto count = [&](int g) {
        int n = 0;
        for (int j = 0; j < n_jobs; ++j) n += tasks(j, g);
        return n;
    };
    // Panels per task: fewer than 8 when that leaves the team under 4 tasks a thread.
    while (G > 1 && count(G) < 4 * omp_get_num_threads()) G /= 2;
    int first[8] = {0};
    for (int j = 0; j < n_jobs; ++j) first[j + 1] = first[j] + tasks(j, G);
    const int total = first[n_jobs];
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < total; ++t) {
        int j = 0;
        while (t >= first[j + 1]) ++j;
        const Job &g = jobs[j];
        int p0, p1;
        panels(g, p0, p1);
        const int per_cb = mbs * (CB / G); // tasks of a whole column block
        const int local = t - first[j];
        const int cb = local / per_cb, in = local % per_cb;
        const int cb0 = p0 + cb * CB, ng = (std::min(CB, p1 - cb0) + G - 1) / G;
        const int mb = in / ng, grp = in % ng;
        const int r0 = mb * Mb, rows = std::min(Mb, M - r0);
        run(g, cb0 + grp * G, std::min(cb0 + grp * G + G, p1), r0, rows);
    }
}

// Job g's columns in panel p: [c0, c1).
template <class Job> void panel_cols(const Job &g, int p, int &c0, int &c1) {
    c0 = std::max(g.n0, p * kPanel) - p * kPanel;
    c1 = std::min(g.n1, p * kPanel + kPanel) - p * kPanel;
}
} // namespace

void gemm_team_f32(Kernels ks, int M, const float *A, size_t lda, const GemmJobF32 *jobs, int n_jobs) {
    if (M <= 0) return;
    team_tasks(M, jobs, n_jobs, 0, [&](const GemmJobF32 &g, int q0, int q1, int r0, int rows) {
        for (int p = q0; p < q1; ++p) {
            int c0, c1;
            panel_cols(g, p, c0, c1);
            float *C = g.C + size_t(r0) * g.ldc + size_t(p * kPanel + c0 - g.n0);
            tile_f32(ks, rows, g.W->K, A + size_t(r0) * lda, lda, g.W->panel(p), kPanel, C, g.ldc, c0, c1,
                     g.accumulate);
        }
    });
}

namespace {
std::atomic<bool> gemm_blocking{true};
}
void set_gemm_blocking(bool on) { gemm_blocking.store(on, std::memory_order_relaxed); }

void gemm_team(Kernels ks, int M, const uint32_t *A, size_t lda, const GemmJob *jobs, int n_jobs) {
    if (M <= 0 || n_jobs <= 0) return;
    TileState st;
    // The blocked order on AMX and AVX2 only: the AVX-512 kernels are
    // compute-bound (measured the same either way at M = 300 and 1124).
    const bool blocked = (ks == Kernels::Amx || ks == Kernels::Avx2) && gemm_blocking.load(std::memory_order_relaxed);
    const int Mb = blocked ? blocked_rows(ks, size_t(jobs[0].W->Kp) * 4) : 0;
    team_tasks(M, jobs, n_jobs, Mb, [&](const GemmJob &g, int q0, int q1, int r0, int rows) {
        int c0, c1;
#if defined(DIMOO_X86)
        if (ks == Kernels::Avx2) { // the task's panels in one call (one panel: np = 1)
            int e0, e1;
            panel_cols(g, q0, c0, e0);
            panel_cols(g, q1 - 1, e1, c1);
            float *C = g.C + size_t(r0) * g.ldc + size_t(q0 * kPanel + c0 - g.n0);
            return panels_avx2(rows, q1 - q0, g.W->Kp, A + size_t(r0) * lda, lda, g.W->panel(q0), 64,
                               size_t(g.W->Kp) * 64, C, g.ldc, c0, c1, g.accumulate);
        }
#endif
        for (int p = q0; p < q1; ++p) {
            panel_cols(g, p, c0, c1);
            float *C = g.C + size_t(r0) * g.ldc + size_t(p * kPanel + c0 - g.n0);
            tile_st(ks, rows, g.W->Kp, A + size_t(r0) * lda, lda, g.W->panel(p), 64, C, g.ldc, c0, c1,
                    g.accumulate, &st);
        }
    });
}

// ---- attention ------------------------------------------------------------------------------------

namespace {
constexpr int kQBlock = 4 * kTileRows; // queries per task
// On AMX two whole 32-row tile blocks (48 = 32 + 16 would leave half the
// accumulator tiles of every other block idle).
constexpr int kQBlockAmx = 64, kQBlockMax = 64;
constexpr int kKBlock = kKeyBlock;     // keys per step

// One row's online-softmax step over a block of kKBlock scores s (the first
// nk valid): m is the running max of scale * s, l the running sum. On
// return s holds exp(scale * s - m_new) (zero past nk), and corr the factor
// exp(m_old - m_new) that rescales the earlier sum and output.
void softmax_step_portable(float *s, int nk, float scale, float &m, float &l, float &corr) {
    float mx = m;
    for (int j = 0; j < nk; ++j) mx = std::max(mx, s[j] * scale);
    corr = exp_clamped(m - mx);
    float sum = 0.0f;
    for (int j = 0; j < nk; ++j) {
        s[j] = exp_clamped(s[j] * scale - mx);
        sum += s[j];
    }
    for (int j = nk; j < kKBlock; ++j) s[j] = 0.0f;
    m = mx;
    l = l * corr + sum;
}

#if defined(DIMOO_X86)
// exp_clamped's method on 16 lanes: 2^n times a degree-7 polynomial of the
// remainder, 2^n applied by VSCALEFPS.
DIMOO_T512 inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417232e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

// The first `left` of 16 lanes (none when left <= 0).
DIMOO_T512 inline __mmask16 first_lanes(int left) {
    return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// softmax_step_portable on 16 lanes, for the fp32 attention: s becomes the
// exps (zero past nk: those lanes are -inf, whose exp clamps to exp(-87 -
// m) and is then zeroed exactly).
DIMOO_T512 void softmax_step_avx512(float *s, int nk, float scale, float &m, float &l, float &corr) {
    constexpr int NV = kKBlock / 16;
    const __m512 vs = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    __m512 v[NV], mx = _mm512_set1_ps(m);
    for (int i = 0; i < NV; ++i) {
        v[i] = _mm512_mask_mul_ps(ninf, first_lanes(nk - 16 * i), _mm512_loadu_ps(s + 16 * i), vs);
        mx = _mm512_max_ps(mx, v[i]);
    }
    const float mnew = _mm512_reduce_max_ps(mx);
    const __m512 vm = _mm512_set1_ps(mnew);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < NV; ++i) {
        __m512 e = exp16(_mm512_sub_ps(v[i], vm));
        if (nk < kKBlock) e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v[i], ninf, _CMP_NEQ_OQ), e);
        _mm512_storeu_ps(s + 16 * i, e);
        sum = _mm512_add_ps(sum, e);
    }
    corr = exp_clamped(m - mnew);
    m = mnew;
    l = l * corr + _mm512_reduce_add_ps(sum);
}

// 2^f for |f| <= 1/2 as 1 + P1 f + ... + P5 f^5 (relative error under
// 3e-6): the bf16 attention's exps, on AVX-512 and AVX2 alike.
constexpr float kExp2P5 = 1.3333558e-3f, kExp2P4 = 9.6181291e-3f, kExp2P3 = 5.5504109e-2f, kExp2P2 = 0.24022651f,
                kExp2P1 = 0.69314718f;

// 16 floats to bf16, round to nearest even. HW: VCVTNEPS2BF16 (AVX-512
// BF16; written as assembly so that this AVX-512 code can hold it, and run
// only where the set is there); else u + 0x7fff + bit 16 of u, top half
// kept. The same bits for all but subnormals (which the instruction
// flushes, and which the exps below never are).
template <bool HW> DIMOO_T512 inline void store_bf16x16(uint16_t *p, __m512 e) {
    __m256i r;
    if (HW) {
        asm("vcvtneps2bf16 %1, %0" : "=v"(r) : "v"(e));
    } else {
        const __m512i u = _mm512_castps_si512(e);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i up = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
        r = _mm512_cvtepi32_epi16(_mm512_srli_epi32(up, 16));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), r);
}

// The bf16 attention's softmax step on n <= 16 rows at once: S, P and O
// rows kKBlock, kKBlock and hd apart, m and l the rows' running max and
// sum; P gets the exps rounded to bf16 (zeros past nk; HW as in
// store_bf16x16), O is rescaled. In phases that each run all rows (their
// maxima; their exps; their sums and rescaling): one row alone is a chain
// of dependent steps (a reduction, exps of its result, another reduction, a
// scalar exp), while 16 independent ones keep the vector units busy, and
// the rows' new maxima, rescale factors and sums are one vector each. With
// the exps' cheaper polynomial below, 1.2x faster than the row step was.
template <bool HW>
DIMOO_T512 void softmax_rows_bf16(float *S, int n, int nk, float scale, float *m, float *l, uint16_t *P, float *O,
                                  int hd) {
    constexpr int NV = kKBlock / 16;
    alignas(64) float rmax[16], rsum[16], corr[16];
    const bool short_block = nk < kKBlock;
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < n; ++r) {
        const float *s = S + size_t(r) * kKBlock;
        __m512 mx = ninf;
        for (int i = 0; i < NV; ++i)
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, first_lanes(nk - 16 * i), s + 16 * i));
        rmax[r] = _mm512_reduce_max_ps(mx);
    }
    const __mmask16 rows = __mmask16((1u << n) - 1);
    const __m512 mold = _mm512_mask_loadu_ps(_mm512_setzero_ps(), rows, m);
    // scale > 0: the max of scale * s is scale times the max of s, exactly.
    const __m512 mnew = _mm512_max_ps(mold, _mm512_mul_ps(_mm512_maskz_load_ps(rows, rmax), _mm512_set1_ps(scale)));
    _mm512_store_ps(rmax, mnew);
    _mm512_store_ps(corr, exp16(_mm512_sub_ps(mold, mnew)));
    // exp(scale s - m) = 2^t, t = s scale log2(e) - m log2(e): one FMA, then
    // 2^t as 2^round(t) times a degree-5 polynomial of the rest (relative
    // error under 3e-6, far below the bf16 rounding of P that follows); t
    // clamped at -125, so no exp is subnormal.
    const __m512 cs = _mm512_set1_ps(scale * 1.44269504088896341f), lo = _mm512_set1_ps(-125.0f);
    const __m512 p5 = _mm512_set1_ps(kExp2P5), p4 = _mm512_set1_ps(kExp2P4), p3 = _mm512_set1_ps(kExp2P3),
                 p2 = _mm512_set1_ps(kExp2P2), p1 = _mm512_set1_ps(kExp2P1), one = _mm512_set1_ps(1.0f);
    for (int r = 0; r < n; ++r) {
        const float *s = S + size_t(r) * kKBlock;
        uint16_t *p = P + size_t(r) * kKBlock;
        const __m512 vm = _mm512_set1_ps(rmax[r] * 1.44269504088896341f);
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < NV; ++i) {
            const __m512 t = _mm512_max_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * i), cs, vm), lo);
            const __m512 nt = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m512 f = _mm512_sub_ps(t, nt);
            __m512 q = _mm512_fmadd_ps(p5, f, p4);
            q = _mm512_fmadd_ps(q, f, p3);
            q = _mm512_fmadd_ps(q, f, p2);
            q = _mm512_fmadd_ps(q, f, p1);
            q = _mm512_fmadd_ps(q, f, one);
            __m512 e = _mm512_scalef_ps(q, nt);
            if (short_block) e = _mm512_maskz_mov_ps(first_lanes(nk - 16 * i), e);
            store_bf16x16<HW>(p + 16 * i, e);
            sum = _mm512_add_ps(sum, e);
        }
        rsum[r] = _mm512_reduce_add_ps(sum);
    }
    const __m512 vc = _mm512_load_ps(corr);
    const __m512 lold = _mm512_mask_loadu_ps(_mm512_setzero_ps(), rows, l);
    _mm512_mask_storeu_ps(l, rows, _mm512_fmadd_ps(lold, vc, _mm512_maskz_load_ps(rows, rsum)));
    _mm512_mask_storeu_ps(m, rows, mnew);
    for (int r = 0; r < n; ++r) {
        if (corr[r] == 1.0f) continue;
        float *o = O + size_t(r) * hd;
        const __m512 c = _mm512_set1_ps(corr[r]);
        int j = 0;
        for (; j + 16 <= hd; j += 16) _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), c));
        for (; j < hd; ++j) o[j] *= corr[r];
    }
}

#endif

#if defined(DIMOO_X86)
// The first `left` of 8 lanes as a mask (all bits set), and a vector's
// largest element and sum. (Functions, not lambdas: a lambda does not take
// its enclosing function's target.)
DIMOO_T256 inline __m256 first_lanes8(int left) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(left), iota));
}
DIMOO_T256 inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
DIMOO_T256 inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// softmax_rows_bf16 on AVX2, 8 rows at a time: the same phases, the same
// exps (2^t by the degree-5 polynomial; 2^round(t) put in the exponent
// bits, exact as VSCALEFPS for t >= -125), the rescale factors by the
// scalar exp_clamped, and bf16 rounding in software.
DIMOO_T256 void softmax_rows_avx2(float *S, int n, int nk, float scale, float *m, float *l, uint16_t *P, float *O,
                                  int hd) {
    constexpr int NV = kKBlock / 8;
    const bool short_block = nk < kKBlock;
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    float rmax[8], corr[8];
    for (int r = 0; r < n; ++r) {
        const float *s = S + size_t(r) * kKBlock;
        __m256 mx = ninf;
        for (int i = 0; i < NV; ++i) {
            const __m256 v = _mm256_loadu_ps(s + 8 * i);
            mx = _mm256_max_ps(mx, short_block ? _mm256_blendv_ps(ninf, v, first_lanes8(nk - 8 * i)) : v);
        }
        // scale > 0: the max of scale * s is scale times the max of s, exactly.
        rmax[r] = std::max(m[r], hmax8(mx) * scale);
        corr[r] = exp_clamped(m[r] - rmax[r]);
    }
    const __m256 cs = _mm256_set1_ps(scale * 1.44269504088896341f), lo = _mm256_set1_ps(-125.0f);
    const __m256 p5 = _mm256_set1_ps(kExp2P5), p4 = _mm256_set1_ps(kExp2P4), p3 = _mm256_set1_ps(kExp2P3),
                 p2 = _mm256_set1_ps(kExp2P2), p1 = _mm256_set1_ps(kExp2P1), one = _mm256_set1_ps(1.0f);
    const __m256i bias = _mm256_set1_epi32(127), round = _mm256_set1_epi32(0x7fff), bit = _mm256_set1_epi32(1);
    for (int r = 0; r < n; ++r) {
        const float *s = S + size_t(r) * kKBlock;
        uint16_t *p = P + size_t(r) * kKBlock;
        const __m256 vm = _mm256_set1_ps(rmax[r] * 1.44269504088896341f);
        __m256 sum = _mm256_setzero_ps();
        for (int i = 0; i < NV; ++i) {
            const __m256 t = _mm256_max_ps(_mm256_fmsub_ps(_mm256_loadu_ps(s + 8 * i), cs, vm), lo);
            const __m256 nt = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            const __m256 f = _mm256_sub_ps(t, nt);
            __m256 q = _mm256_fmadd_ps(p5, f, p4);
            q = _mm256_fmadd_ps(q, f, p3);
            q = _mm256_fmadd_ps(q, f, p2);
            q = _mm256_fmadd_ps(q, f, p1);
            q = _mm256_fmadd_ps(q, f, one);
            const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nt), bias), 23);
            __m256 e = _mm256_mul_ps(q, _mm256_castsi256_ps(pow2));
            if (short_block) e = _mm256_and_ps(e, first_lanes8(nk - 8 * i));
            sum = _mm256_add_ps(sum, e);
            // bf16, round to nearest even: u + 0x7fff + bit 16 of u, top half kept.
            const __m256i u = _mm256_castps_si256(e);
            const __m256i up = _mm256_srli_epi32(
                _mm256_add_epi32(u, _mm256_add_epi32(round, _mm256_and_si256(_mm256_srli_epi32(u, 16), bit))), 16);
            _mm_storeu_si128(reinterpret_cast<__m128i *>(p + 8 * i),
                             _mm_packus_epi32(_mm256_castsi256_si128(up), _mm256_extracti128_si256(up, 1)));
        }
        l[r] = l[r] * corr[r] + hsum8(sum);
        m[r] = rmax[r];
    }
    for (int r = 0; r < n; ++r) {
        if (corr[r] == 1.0f) continue;
        float *o = O + size_t(r) * hd;
        const __m256 c = _mm256_set1_ps(corr[r]);
        int j = 0;
        for (; j + 8 <= hd; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(o + j), c));
        for (; j < hd; ++j) o[j] *= corr[r];
    }
}

// exp16 on 8 lanes: the same clamp, remainder and polynomial; 2^n put in
// the exponent bits (n in [-126, 127] after the clamp, so 2^n is normal and
// the product is VSCALEFPS's).
DIMOO_T256 inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417232e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

// softmax_step_avx512 on 8 lanes, for the fp32 attention (the portable step's
// sum is one serial chain, and its exps do not vectorize around it): lanes
// past nk are -inf for the max and zero after the exp.
DIMOO_T256 void softmax_step_avx2(float *s, int nk, float scale, float &m, float &l, float &corr) {
    constexpr int NV = kKBlock / 8;
    const __m256 vs = _mm256_set1_ps(scale), ninf = _mm256_set1_ps(-INFINITY);
    __m256 mx = _mm256_set1_ps(m);
    for (int i = 0; i < NV; ++i) {
        __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + 8 * i), vs);
        if (nk < kKBlock) v = _mm256_blendv_ps(ninf, v, first_lanes8(nk - 8 * i));
        mx = _mm256_max_ps(mx, v);
    }
    const float mnew = hmax8(mx);
    const __m256 vm = _mm256_set1_ps(mnew);
    __m256 sum = _mm256_setzero_ps();
    for (int i = 0; i < NV; ++i) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(s + 8 * i), vs), vm));
        if (nk < kKBlock) e = _mm256_and_ps(e, first_lanes8(nk - 8 * i));
        _mm256_storeu_ps(s + 8 * i, e);
        sum = _mm256_add_ps(sum, e);
    }
    corr = exp_clamped(m - mnew);
    m = mnew;
    l = l * corr + hsum8(sum);
}
#endif

using SoftmaxFn = void (*)(float *, int, float, float &, float &, float &);
SoftmaxFn softmax_step(Kernels ks) {
#if defined(DIMOO_X86)
    if (ks >= Kernels::Avx512) return softmax_step_avx512;
    if (ks == Kernels::Avx2) return softmax_step_avx2;
#endif
    (void)ks;
    return softmax_step_portable;
}
} // namespace

int packed_kv_tpad(int T) { return (T + kKBlock - 1) / kKBlock * kKBlock; }

size_t packed_kv_elems(int T, int head_dim) {
    const size_t Tpad = size_t(packed_kv_tpad(T));
    return Tpad * size_t(head_dim) + 64; // + one panel row: partial column panels read past the end
}

namespace {
// Key `key` of KV head h into packed K/V: its K and V rows (head_dim fp32
// each) rounded to bf16, or zeros when k is null. K: pair i at
// (i * 32 + key % 32) * 2 of the key's panel; V: key pair key / 2, column
// c, half key % 2.
void put_key(const float *k, const float *v, int key, int h, const PackedKV &kv) {
    const int hd = kv.head_dim, hp = hd / 2, j = key % kPanel;
    alignas(64) uint16_t row[1024];
    if (k) round_bf16(k, hd, row, hd);
    else std::fill_n(row, hd, uint16_t(0));
    uint16_t *kd = kv.k + size_t(h) * kv.kstride + size_t(key / kPanel) * size_t(hp) * 64;
    for (int i = 0; i < hp; ++i) {
        kd[(size_t(i) * kPanel + size_t(j)) * 2] = row[2 * i];
        kd[(size_t(i) * kPanel + size_t(j)) * 2 + 1] = row[2 * i + 1];
    }
    if (v) round_bf16(v, hd, row, hd);
    uint16_t *vd = kv.v + size_t(h) * kv.vstride + size_t(key / 2) * 2 * size_t(hd) + size_t(key % 2);
    for (int c = 0; c < hd; ++c) vd[2 * c] = row[c];
}
} // namespace

void pack_kv_team(const float *K, const float *V, size_t ld, PackedKV &kv) {
    const int hd = kv.head_dim, kpanels = kv.Tpad / kPanel;
#pragma omp for schedule(static)
    for (int t = 0; t < kv.n_kv * kpanels; ++t) {
        const int h = t / kpanels, p = t % kpanels;
        for (int key = p * kPanel; key < (p + 1) * kPanel; ++key) {
            const size_t at = size_t(key) * ld + size_t(h) * hd;
            if (key < kv.T) put_key(K + at, V + at, key, h, kv);
            else put_key(nullptr, nullptr, key, h, kv);
        }
    }
}

void pack_kv_row(const float *k, const float *v, int pos, const PackedKV &kv) {
    for (int h = 0; h < kv.n_kv; ++h)
        put_key(k + size_t(h) * kv.head_dim, v + size_t(h) * kv.head_dim, pos, h, kv);
}

void zero_kv_tail_team(const PackedKV &kv) {
#pragma omp for schedule(static)
    for (int h = 0; h < kv.n_kv; ++h)
        for (int t = kv.T; t < kv.Tpad; ++t) put_key(nullptr, nullptr, t, h, kv);
}

size_t flash_scratch_floats(int head_dim) {
    // S block, P pairs, O block, running max and sum; 16-float aligned parts.
    return size_t(kQBlockMax) * (kKBlock + kKBlock / 2 + size_t(head_dim) + 2) + 64;
}

void flash_attention_team(Kernels ks, const uint32_t *q, size_t ldq, int rows, int n_heads, const PackedKV &kv,
                          uint16_t *out, size_t ldo, float *scratch) {
    const int hd = kv.head_dim, hp = hd / 2, group = n_heads / kv.n_kv;
    const int qb = ks == Kernels::Amx ? kQBlockAmx : kQBlock;
    const int qblocks = (rows + qb - 1) / qb;
    const int total = n_heads * qblocks;
    const int cpanels = (hd + kPanel - 1) / kPanel;
    const float scale = 1.0f / std::sqrt(float(hd));
    float *S = scratch + size_t(omp_get_thread_num()) * flash_scratch_floats(hd);
    uint32_t *P = reinterpret_cast<uint32_t *>(S + kQBlockMax * kKBlock);
    float *O = S + kQBlockMax * (kKBlock + kKBlock / 2);
    float *mx = O + size_t(kQBlockMax) * hd, *sum = mx + kQBlockMax;
    const SoftmaxFn step = softmax_step(ks);
    TileState st;
    // AMX on whole panels: head_dim a multiple of 32 (so of 16 pairs too).
    const bool amx_whole = ks == Kernels::Amx && hd % kPanel == 0;
    (void)amx_whole;
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < total; ++t) {
        const int h = t / qblocks, r0 = (t % qblocks) * qb, nr = std::min(qb, rows - r0);
        const int kh = h / group;
        const uint32_t *Q = q + size_t(r0) * ldq + size_t(h) * hp;
        const uint16_t *Kh = kv.k + size_t(kh) * kv.kstride, *Vh = kv.v + size_t(kh) * kv.vstride;
        std::fill_n(O, size_t(nr) * hd, 0.0f);
        std::fill_n(mx, nr, -INFINITY);
        std::fill_n(sum, nr, 0.0f);
        for (int j0 = 0; j0 < kv.T; j0 += kKBlock) {
            const int nk = std::min(kKBlock, kv.T - j0);
#if defined(DIMOO_AMX)
            if (amx_whole)
                panels_amx(nr, (nk + kPanel - 1) / kPanel, hp, Q, ldq, Kh + size_t(j0 / kPanel) * size_t(hp) * 64, 64,
                           size_t(hp) * 64, S, kKBlock, false, &st);
            else
#endif
#if defined(DIMOO_X86)
            if (ks == Kernels::Avx2)
                panels_avx2(nr, (nk + kPanel - 1) / kPanel, hp, Q, ldq, Kh + size_t(j0 / kPanel) * size_t(hp) * 64, 64,
                            size_t(hp) * 64, S, kKBlock, 0, kPanel, false);
            else
#endif
            for (int p = 0; p * kPanel < nk; ++p)
                tile_st(ks, nr, hp, Q, ldq, Kh + size_t(j0 / kPanel + p) * size_t(hp) * 64, 64, S + p * kPanel,
                        kKBlock, 0, kPanel, false, &st);
#if defined(DIMOO_X86)
            if (ks >= Kernels::Avx512) {
                const bool hw = ks == Kernels::Avx512Bf16 || ks == Kernels::Amx;
                for (int i = 0; i < nr; i += 16)
                    (hw ? softmax_rows_bf16<true> : softmax_rows_bf16<false>)(
                        S + size_t(i) * kKBlock, std::min(16, nr - i), nk, scale, mx + i, sum + i,
                        reinterpret_cast<uint16_t *>(P + size_t(i) * (kKBlock / 2)), O + size_t(i) * hd, hd);
            } else if (ks == Kernels::Avx2) {
                for (int i = 0; i < nr; i += 8)
                    softmax_rows_avx2(S + size_t(i) * kKBlock, std::min(8, nr - i), nk, scale, mx + i, sum + i,
                                      reinterpret_cast<uint16_t *>(P + size_t(i) * (kKBlock / 2)), O + size_t(i) * hd,
                                      hd);
            } else
#endif
            for (int i = 0; i < nr; ++i) {
                float *s = S + size_t(i) * kKBlock, *o = O + size_t(i) * hd;
                uint16_t *p = reinterpret_cast<uint16_t *>(P + size_t(i) * (kKBlock / 2));
                float corr;
                step(s, nk, scale, mx[i], sum[i], corr);
                round_bf16(s, kKBlock, p, kKBlock);
                if (corr != 1.0f)
                    for (int c = 0; c < hd; ++c) o[c] *= corr;
            }
            const int kp = (nk + 1) / 2;
#if defined(DIMOO_AMX)
            // P is zero past nk and V past T, so a short last block takes all kKBlock keys.
            if (amx_whole)
                panels_amx(nr, cpanels, kKBlock / 2, P, kKBlock / 2, Vh + size_t(j0 / 2) * 2 * size_t(hd), 2 * size_t(hd),
                           64, O, size_t(hd), true, &st);
            else
#endif
#if defined(DIMOO_X86)
            if (ks == Kernels::Avx2)
                panels_avx2(nr, cpanels, kp, P, kKBlock / 2, Vh + size_t(j0 / 2) * 2 * size_t(hd), 2 * size_t(hd), 64,
                            O, size_t(hd), 0, hd - (cpanels - 1) * kPanel, true);
            else
#endif
            for (int c = 0; c < cpanels; ++c)
                tile_st(ks, nr, kp, P, kKBlock / 2, Vh + size_t(j0 / 2) * 2 * size_t(hd) + size_t(c) * 64,
                        2 * size_t(hd), O + c * kPanel, size_t(hd), 0, std::min(kPanel, hd - c * kPanel), true, &st);
        }
        for (int i = 0; i < nr; ++i) {
            float *o = O + size_t(i) * hd;
            const float inv = 1.0f / sum[i];
            for (int c = 0; c < hd; ++c) o[c] *= inv;
            round_bf16(o, hd, out + size_t(r0 + i) * ldo + size_t(h) * hd, hd);
        }
    }
}

size_t packed_k_f32_elems(int T, int head_dim) {
    return size_t((T + kKBlock - 1) / kKBlock * kKBlock) * size_t(head_dim);
}

void pack_k_f32_team(const float *K, size_t ld, PackedKVF32 &kv) {
    const int hd = kv.head_dim, T = kv.T, kpanels = kv.Tpad / kPanel;
#pragma omp for schedule(static)
    for (int t = 0; t < kv.n_kv * kpanels; ++t) {
        const int h = t / kpanels, p = t % kpanels;
        float *kd = kv.k + size_t(h) * kv.kstride + size_t(p) * size_t(hd) * kPanel;
        for (int j = 0; j < kPanel; ++j) {
            const int key = p * kPanel + j;
            const float *src = K + size_t(key) * ld + size_t(h) * hd;
            for (int i = 0; i < hd; ++i) kd[size_t(i) * kPanel + size_t(j)] = key < T ? src[i] : 0.0f;
        }
    }
}

void flash_attention_f32_team(Kernels ks, const float *q, size_t ldq, int rows, int n_heads, const PackedKVF32 &kv,
                              float *out, size_t ldo, float *scratch) {
    const int hd = kv.head_dim, group = n_heads / kv.n_kv;
    const int qblocks = (rows + kQBlock - 1) / kQBlock;
    const int cpanels = (hd + kPanel - 1) / kPanel;
    const float scale = 1.0f / std::sqrt(float(hd));
    float *S = scratch + size_t(omp_get_thread_num()) * flash_scratch_floats(hd);
    float *O = S + kQBlockMax * (kKBlock + kKBlock / 2);
    float *mx = O + size_t(kQBlockMax) * hd, *sum = mx + kQBlockMax;
    const SoftmaxFn step = softmax_step(ks);
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < n_heads * qblocks; ++t) {
        const int h = t / qblocks, r0 = (t % qblocks) * kQBlock, nr = std::min(kQBlock, rows - r0);
        const int kh = h / group;
        const float *Q = q + size_t(r0) * ldq + size_t(h) * hd;
        const float *Kh = kv.k + size_t(kh) * kv.kstride;
        std::fill_n(O, size_t(nr) * hd, 0.0f);
        std::fill_n(mx, nr, -INFINITY);
        std::fill_n(sum, nr, 0.0f);
        for (int j0 = 0; j0 < kv.T; j0 += kKBlock) {
            const int nk = std::min(kKBlock, kv.T - j0);
            for (int p = 0; p * kPanel < nk; ++p)
                tile_f32(ks, nr, hd, Q, ldq, Kh + size_t(j0 / kPanel + p) * size_t(hd) * kPanel, kPanel,
                         S + p * kPanel, kKBlock, 0, kPanel, false);
            for (int i = 0; i < nr; ++i) {
                float corr;
                step(S + size_t(i) * kKBlock, nk, scale, mx[i], sum[i], corr);
                float *o = O + size_t(i) * hd;
                if (corr != 1.0f)
                    for (int c = 0; c < hd; ++c) o[c] *= corr;
            }
            const float *V = kv.v + size_t(j0) * kv.ldv + size_t(kh) * hd;
            for (int c = 0; c < cpanels; ++c)
                tile_f32(ks, nr, nk, S, kKBlock, V + size_t(c) * kPanel, kv.ldv, O + c * kPanel, size_t(hd), 0,
                         std::min(kPanel, hd - c * kPanel), true);
        }
        for (int i = 0; i < nr; ++i) {
            const float *o = O + size_t(i) * hd;
            float *dst = out + size_t(r0 + i) * ldo + size_t(h) * hd;
            const float inv = 1.0f / sum[i];
            for (int c = 0; c < hd; ++c) dst[c] = o[c] * inv;
        }
    }
}

// ---- stage timing ------------------------------------------------------------------------------

namespace {
std::atomic<bool> g_timing{false};
std::mutex g_times_mu;
StageTimes g_times;
} // namespace

void stage_timing(bool on) { g_timing.store(on); }
bool stage_timing_on() { return g_timing.load(std::memory_order_relaxed); }
void stage_time_add(Stage s, double seconds) {
    std::lock_guard<std::mutex> lock(g_times_mu);
    (s == Stage::Gemm ? g_times.gemm : s == Stage::Attention ? g_times.attention : g_times.rest) += seconds;
}
StageTimes stage_times_take() {
    std::lock_guard<std::mutex> lock(g_times_mu);
    const StageTimes t = g_times;
    g_times = StageTimes{};
    return t;
}

} // namespace dimoo::cpu
