// gemm.cpp - C = A * W^T on the CPU, fp32 accumulate, W in F32/F16/BF16.
//
// Packed path (M > 8, or > 24 when K > 512):
//   W is consumed in panels of NR output features by up to KC input features,
//   converted to fp32 and transposed into a contiguous (kb x NR) block, so the
//   micro-kernel reads NR consecutive weights per k. Per k the kernel
//   broadcasts MR activations and does MR x NR/VL vector FMAs into register
//   accumulators. Per thread the loops are
//     k blocks (KC) > m blocks (MC) > its panels > MR row tiles,
//   so the packed panel stays in L1 and the A block in L2. When A's rows are
//   far apart (lda well above the k block) the A block is first copied into a
//   contiguous buffer (fewer TLB misses, no cache-set aliasing), and the next
//   panel's W rows are prefetched while the current one is in use. Threads
//   form a tm x tn grid over (row tiles, panels) chosen to balance FMAs and
//   packing; each thread packs only its own panels: no synchronisation.
// Small-M path (decode-like):
//   no packing; each thread takes a range of W rows and computes dot products
//   with vector accumulators over k, converting W on the fly. It reads W once,
//   which is what bounds it.
//
// The vector layer below is AVX-512, AVX2+FMA or plain C++ (which GCC
// vectorizes); define DIMOO_GEMM_PORTABLE to force the plain C++ one.

#include "cpu/gemm.h"

#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "common.h"

#if !defined(DIMOO_GEMM_PORTABLE) && defined(__AVX512F__)
#define DIMOO_GEMM_AVX512 1
#elif !defined(DIMOO_GEMM_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
#define DIMOO_GEMM_AVX2 1
#endif
#if defined(DIMOO_GEMM_AVX512) || defined(DIMOO_GEMM_AVX2)
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's intrinsic headers self-initialise placeholder operands
// (`__m512 __Y = __Y;`), which -Wall flags once inlined here.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#endif

namespace dimoo::cpu {
namespace {

// ---- vector layer --------------------------------------------------------------------------

#if defined(DIMOO_GEMM_AVX512)

constexpr int VL = 16;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vload_bf16(const uint16_t *p) {
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
inline vf vload_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)));
}

// r[i] element j  ->  r[j] element i.
inline void transpose(vf r[VL]) {
    vf t[16], u[16];
    for (int i = 0; i < 16; i += 2) { // within 128-bit lanes: a0 b0 a1 b1 / a2 b2 a3 b3
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 16; g += 4) { // u[g + c], lane l = rows g..g+3 at column 4l + c
        const __m512d t0 = _mm512_castps_pd(t[g]), t1 = _mm512_castps_pd(t[g + 1]);
        const __m512d t2 = _mm512_castps_pd(t[g + 2]), t3 = _mm512_castps_pd(t[g + 3]);
        u[g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; ++c) { // 4x4 transpose of 128-bit lanes among u[c], u[4+c], u[8+c], u[12+c]
        const vf v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);     // u0.l0 u0.l1 u1.l0 u1.l1
        const vf v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xee);     // u0.l2 u0.l3 u1.l2 u1.l3
        const vf v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
        const vf v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);      // lanes l0 of u0..u3
        r[4 + c] = _mm512_shuffle_f32x4(v0, v2, 0xdd);  // l1
        r[8 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);  // l2
        r[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xdd); // l3
    }
}

constexpr int MR = 8;      // rows of A per micro-tile (16 accumulators of 32)
constexpr int kDotMB = 4;  // rows of A per small-M dot tile

#elif defined(DIMOO_GEMM_AVX2)

constexpr int VL = 8;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline vf vload_bf16(const uint16_t *p) {
    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
inline vf vload_f16(const uint16_t *p) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
#else
    alignas(32) float t[VL];
    for (int i = 0; i < VL; ++i) t[i] = f16_to_f32(p[i]);
    return _mm256_load_ps(t);
#endif
}

inline void transpose(vf r[VL]) {
    vf t[8], s[8];
    for (int i = 0; i < 8; i += 2) { // per 128-bit half: a0 b0 a1 b1 / a2 b2 a3 b3
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int g = 0; g < 8; g += 4) { // s[g + c], half h = rows g..g+3 at column 4h + c
        s[g + 0] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
        s[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xee);
        s[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        s[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xee);
    }
    for (int c = 0; c < 4; ++c) {
        r[c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(s[c], s[4 + c], 0x31);
    }
}

constexpr int MR = 6;     // 12 accumulators of 16 registers
constexpr int kDotMB = 2;

#else // portable C++; GCC vectorizes the fixed-length loops

constexpr int VL = 8;
struct vf {
    float x[VL];
};
inline vf vzero() {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = 0.0f;
    return r;
}
inline vf vload(const float *p) {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = p[i];
    return r;
}
inline void vstore(float *p, vf v) {
    for (int i = 0; i < VL; ++i) p[i] = v.x[i];
}
inline vf vset1(float x) {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = x;
    return r;
}
inline vf vfma(vf a, vf b, vf c) {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = a.x[i] * b.x[i] + c.x[i];
    return r;
}
inline vf vadd(vf a, vf b) {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = a.x[i] + b.x[i];
    return r;
}
inline float vsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; ++i) s += v.x[i];
    return s;
}
inline vf vload_bf16(const uint16_t *p) {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = bf16_to_f32(p[i]);
    return r;
}
inline vf vload_f16(const uint16_t *p) {
    vf r;
    for (int i = 0; i < VL; ++i) r.x[i] = f16_to_f32(p[i]);
    return r;
}
inline void transpose(vf r[VL]) {
    for (int i = 0; i < VL; ++i)
        for (int j = 0; j < i; ++j) std::swap(r[i].x[j], r[j].x[i]);
}

constexpr int MR = 4;
constexpr int kDotMB = 2;

#endif

// First n (< VL) floats of p, the rest zero.
inline vf vload_part(const float *p, int n) {
    alignas(64) float t[VL] = {};
    for (int i = 0; i < n; ++i) t[i] = p[i];
    return vload(t);
}

// VL weights starting at element i of W, as fp32.
template <int DT> inline vf wload(const void *W, size_t i) {
    if constexpr (DT == DIMOO_F32) return vload(static_cast<const float *>(W) + i);
    else if constexpr (DT == DIMOO_BF16) return vload_bf16(static_cast<const uint16_t *>(W) + i);
    else return vload_f16(static_cast<const uint16_t *>(W) + i);
}
// The first n (< VL) of them, the rest zero.
template <int DT> inline vf wload_part(const void *W, size_t i, int n) {
    alignas(64) float t[VL] = {};
    for (int j = 0; j < n; ++j) t[j] = load_as_f32(W, DT, i + size_t(j));
    return vload(t);
}

inline void prefetch_l1_write(const void *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 1, 3);
#else
    (void)p;
#endif
}
inline void prefetch_l2(const void *p) {
#if defined(__GNUC__)
    __builtin_prefetch(p, 0, 2);
#else
    (void)p;
#endif
}

// ---- tuning ------------------------------------------------------------------------------

constexpr int NV = 2;            // vectors per micro-tile row
constexpr int NR = NV * VL;      // W rows (output features) per packed panel
constexpr int KC = 256;          // k block: a packed panel is KC * NR floats (L1)
constexpr int MC = MR * 64;      // m block: A block of MC * KC floats (L2)
constexpr int kApad = 16;        // row padding of the copied A block (floats)
constexpr int kFarRows = 64;     // rows "far apart": leading dimension > k block + this
// M up to this takes the unpacked dot-product path: 8, or 24 when K > 512
// (far-apart W rows make packing dearer). Measured crossovers on AVX-512.
inline bool use_dot_path(int M, int K) { return M <= 8 || (M <= 24 && K > 512); }
constexpr int kDotNB = 4;        // W rows per dot tile
constexpr double kMacsPerThread = 65536.0; // least work worth a thread

// ---- packed path -------------------------------------------------------------------------

// Rows n0 .. n0+nrows of W (nrows <= NR), columns k0 .. k0+kb, as fp32 into
// out[k * NR + j]; rows j >= nrows are zero.
template <int DT>
void pack_panel(const void *W, size_t ldw, int n0, int nrows, int k0, int kb, float *out) {
    for (int jb = 0; jb < NR; jb += VL) {
        int kk = 0;
        if (jb + VL <= nrows) { // whole VL x VL blocks, branch-free so r[] stays in registers
            const size_t row0 = size_t(n0 + jb) * ldw + size_t(k0);
            for (; kk + VL <= kb; kk += VL) {
                vf r[VL];
                for (int i = 0; i < VL; ++i) r[i] = wload<DT>(W, row0 + size_t(i) * ldw + size_t(kk));
                transpose(r);
                for (int t = 0; t < VL; ++t) vstore(out + size_t(kk + t) * NR + jb, r[t]);
            }
        }
        for (; kk < kb; kk += VL) { // ragged edges: rows past nrows are zero, k tail zero-filled
            const int kn = std::min(VL, kb - kk);
            vf r[VL];
            for (int i = 0; i < VL; ++i) {
                const int j = jb + i;
                if (j >= nrows) {
                    r[i] = vzero();
                } else {
                    const size_t at = size_t(n0 + j) * ldw + size_t(k0 + kk);
                    r[i] = kn == VL ? wload<DT>(W, at) : wload_part<DT>(W, at, kn);
                }
            }
            transpose(r);
            for (int t = 0; t < kn; ++t) vstore(out + size_t(kk + t) * NR + jb, r[t]);
        }
    }
}

// C[R x ncols] (= or +=) A[R x kb] * panel, with R rows, ncols <= NR columns.
template <int R>
void micro(int kb, const float *A, size_t lda, const float *P, float *C, size_t ldc, int ncols,
           bool addc) {
    vf acc[R][NV];
    for (int m = 0; m < R; ++m)
        for (int v = 0; v < NV; ++v) acc[m][v] = vzero();
    const float *a[R];
    for (int m = 0; m < R; ++m) a[m] = A + size_t(m) * lda;
    for (int m = 0; m < R; ++m) // the C tile is needed at the end; start fetching it now
        for (int j = 0; j < ncols; j += 16) prefetch_l1_write(C + size_t(m) * ldc + size_t(j));
    for (int k = 0; k < kb; ++k) {
        vf b[NV];
        for (int v = 0; v < NV; ++v) b[v] = vload(P + size_t(k) * NR + v * VL);
        for (int m = 0; m < R; ++m) {
            const vf x = vset1(a[m][k]);
            for (int v = 0; v < NV; ++v) acc[m][v] = vfma(x, b[v], acc[m][v]);
        }
    }
    if (ncols == NR) {
        for (int m = 0; m < R; ++m) {
            float *c = C + size_t(m) * ldc;
            for (int v = 0; v < NV; ++v) {
                vf r = acc[m][v];
                if (addc) r = vadd(r, vload(c + v * VL));
                vstore(c + v * VL, r);
            }
        }
    } else {
        alignas(64) float t[NR];
        for (int m = 0; m < R; ++m) {
            float *c = C + size_t(m) * ldc;
            for (int v = 0; v < NV; ++v) vstore(t + v * VL, acc[m][v]);
            if (addc)
                for (int j = 0; j < ncols; ++j) c[j] += t[j];
            else
                for (int j = 0; j < ncols; ++j) c[j] = t[j];
        }
    }
}

template <int R = MR>
inline void micro_rows(int rows, int kb, const float *A, size_t lda, const float *P, float *C,
                       size_t ldc, int ncols, bool addc) {
    if constexpr (R >= 1) {
        if (rows == R) micro<R>(kb, A, lda, P, C, ldc, ncols, addc);
        else micro_rows<R - 1>(rows, kb, A, lda, P, C, ldc, ncols, addc);
    }
}

struct Grid {
    int tm, tn;
};

// Threads as tm x tn over (row tiles, panels): least modelled time per thread,
// counting a panel's packing per k like about one micro-tile, once per m block.
Grid choose_grid(int T, int M, int mtiles, int panels) {
    Grid best{1, 1};
    double best_cost = -1.0;
    for (int tn = std::min(T, panels); tn >= 1; --tn) {
        const int tm = std::min(T / tn, mtiles);
        const int pp = (panels + tn - 1) / tn;
        const int mt = (mtiles + tm - 1) / tm;
        const int rows = std::min(M, mt * MR);
        const int mblocks = (rows + MC - 1) / MC;
        const double cost = double(pp) * (double(mt) + double(mblocks));
        if (best_cost < 0.0 || cost < best_cost) {
            best_cost = cost;
            best = Grid{tm, tn};
        }
    }
    return best;
}

inline int split(int n, int parts, int i) { return int((long long)n * i / parts); }

// Prefetches lines [from, to) of the W block rows n0.., columns k0 .. k0+kb,
// counted row by row, lines_per_row per row (the last one at the row's end).
template <int DT>
inline void prefetch_w_lines(const void *W, size_t ldw, int n0, int k0, int kb, int lines_per_row,
                             int from, int to) {
    constexpr size_t esz = DT == DIMOO_F32 ? 4 : 2;
    const char *w = static_cast<const char *>(W);
    const size_t last = size_t(kb) * esz - 1;
    for (int i = from; i < to; ++i) {
        const int r = i / lines_per_row, l = i % lines_per_row;
        prefetch_l2(w + (size_t(n0 + r) * ldw + size_t(k0)) * esz + std::min(size_t(l) * 64, last));
    }
}

struct PackedJob {
    int M, N, K;
    const float *A;
    size_t lda;
    const void *W;
    size_t ldw;
    float *C;
    size_t ldc;
    bool accumulate;
    int kstep;    // k block length, <= KC
    bool copy_a;  // copy A blocks into a contiguous buffer
};

// One thread's share: rows [m0, m1), panels [p0, p1). wbuf: KC * NR floats;
// abuf: MC * (kstep + kApad) floats when copy_a.
template <int DT>
void packed_thread(const PackedJob &j, int m0, int m1, int p0, int p1, float *wbuf, float *abuf) {
    constexpr size_t esz = DT == DIMOO_F32 ? 4 : 2;
    for (int k0 = 0; k0 < j.K; k0 += j.kstep) {
        const int kb = std::min(j.kstep, j.K - k0);
        const bool addc = j.accumulate || k0 > 0;
        const bool prefetch_w = j.ldw > size_t(kb) + kFarRows;
        const int lines_per_row = int((size_t(kb) * esz + 63) / 64) + 1;
        for (int mc0 = m0; mc0 < m1; mc0 += MC) {
            const int mc1 = std::min(m1, mc0 + MC);
            const float *ab = j.A + size_t(mc0) * j.lda + size_t(k0);
            size_t lab = j.lda;
            if (j.copy_a) {
                lab = size_t(kb) + kApad;
                for (int m = mc0; m < mc1; ++m)
                    std::memcpy(abuf + size_t(m - mc0) * lab, j.A + size_t(m) * j.lda + size_t(k0),
                                size_t(kb) * sizeof(float));
                ab = abuf;
            }
            const int calls = (mc1 - mc0 + MR - 1) / MR;
            for (int p = p0; p < p1; ++p) {
                const int n0 = p * NR;
                const int ncols = std::min(NR, j.N - n0);
                pack_panel<DT>(j.W, j.ldw, n0, ncols, k0, kb, wbuf);
                // Prefetch the next panel's W rows, spread over this panel's tiles.
                const int next_rows = prefetch_w && p + 1 < p1 ? std::min(NR, j.N - n0 - NR) : 0;
                const int lines = next_rows * lines_per_row;
                int done = 0, call = 0;
                for (int m = mc0; m < mc1; m += MR) {
                    if (lines > 0) {
                        const int upto = int((long long)lines * (++call) / calls);
                        prefetch_w_lines<DT>(j.W, j.ldw, n0 + NR, k0, kb, lines_per_row, done, upto);
                        done = upto;
                    }
                    micro_rows(std::min(MR, mc1 - m), kb, ab + size_t(m - mc0) * lab, lab, wbuf,
                               j.C + size_t(m) * j.ldc + size_t(n0), j.ldc, ncols, addc);
                }
            }
        }
    }
}

struct FreeDeleter {
    void operator()(float *p) const { std::free(p); }
};

template <int DT>
void gemm_packed(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw,
                 float *C, size_t ldc, bool accumulate, int nt) {
    const int mtiles = (M + MR - 1) / MR;
    const int panels = (N + NR - 1) / NR;
    nt = std::min(nt, mtiles * panels);
    const int nkb = (K + KC - 1) / KC; // k blocks of equal length, rounded up to VL
    const int kstep = std::min(KC, ((K + nkb - 1) / nkb + VL - 1) / VL * VL);
    const PackedJob job{M, N, K, A, lda, W, ldw, C, ldc, accumulate, kstep,
                        lda > size_t(kstep) + kFarRows};
    // Per thread: one packed W panel, plus an A block when copying. The slot
    // is rounded up to 16 floats, so every slot stays 64-byte aligned and
    // the size is a multiple of the alignment, as aligned_alloc requires
    // (with AVX2's 8-float vectors the A block need not be).
    const size_t wslot = size_t(KC) * NR;
    const size_t aslot = job.copy_a ? size_t(std::min(MC, M)) * size_t(kstep + kApad) : 0;
    const size_t slot = (wslot + aslot + 15) / 16 * 16;
    std::unique_ptr<float, FreeDeleter> bufs(
        static_cast<float *>(std::aligned_alloc(64, slot * sizeof(float) * size_t(nt))));
    if (!bufs) fail(DIMOO_ERR_OUT_OF_MEMORY, "gemm_nt: cannot allocate packing buffers");
    float *base = bufs.get();
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int T = omp_get_num_threads();
        const int tid = omp_get_thread_num();
        const Grid g = choose_grid(T, M, mtiles, panels);
        if (tid < g.tm * g.tn) {
            const int im = tid / g.tn, in = tid % g.tn;
            const int m0 = split(mtiles, g.tm, im) * MR;
            const int m1 = std::min(M, split(mtiles, g.tm, im + 1) * MR);
            const int p0 = split(panels, g.tn, in), p1 = split(panels, g.tn, in + 1);
            float *w = base + slot * size_t(tid);
            if (m0 < m1 && p0 < p1) packed_thread<DT>(job, m0, m1, p0, p1, w, w + wslot);
        }
    }
}

// ---- small-M path ------------------------------------------------------------------------

// C[MB x NB] (= or +=) A[MB x K] * W[NB x K]^T, whole K in vector accumulators.
template <int DT, int MB, int NB>
void dot_tile(int K, const float *A, size_t lda, const void *W, size_t w0, size_t ldw, float *C,
              size_t ldc, bool accumulate) {
    vf acc[MB][NB];
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j) acc[m][j] = vzero();
    int k = 0;
    for (; k + VL <= K; k += VL) {
        vf w[NB];
        for (int j = 0; j < NB; ++j) w[j] = wload<DT>(W, w0 + size_t(j) * ldw + size_t(k));
        for (int m = 0; m < MB; ++m) {
            const vf a = vload(A + size_t(m) * lda + size_t(k));
            for (int j = 0; j < NB; ++j) acc[m][j] = vfma(a, w[j], acc[m][j]);
        }
    }
    if (k < K) {
        const int n = K - k;
        vf w[NB];
        for (int j = 0; j < NB; ++j) w[j] = wload_part<DT>(W, w0 + size_t(j) * ldw + size_t(k), n);
        for (int m = 0; m < MB; ++m) {
            const vf a = vload_part(A + size_t(m) * lda + size_t(k), n);
            for (int j = 0; j < NB; ++j) acc[m][j] = vfma(a, w[j], acc[m][j]);
        }
    }
    for (int m = 0; m < MB; ++m)
        for (int j = 0; j < NB; ++j) {
            const float s = vsum(acc[m][j]);
            float &c = C[size_t(m) * ldc + size_t(j)];
            c = accumulate ? c + s : s;
        }
}

template <int DT, int MB = kDotMB>
inline void dot_rows(int rows, int nb, int K, const float *A, size_t lda, const void *W, size_t w0,
                     size_t ldw, float *C, size_t ldc, bool accumulate) {
    if constexpr (MB >= 1) {
        if (rows == MB) {
            if (nb == kDotNB) {
                dot_tile<DT, MB, kDotNB>(K, A, lda, W, w0, ldw, C, ldc, accumulate);
            } else {
                for (int j = 0; j < nb; ++j)
                    dot_tile<DT, MB, 1>(K, A, lda, W, w0 + size_t(j) * ldw, ldw, C + j, ldc,
                                        accumulate);
            }
        } else {
            dot_rows<DT, MB - 1>(rows, nb, K, A, lda, W, w0, ldw, C, ldc, accumulate);
        }
    }
}

template <int DT>
void gemm_small(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw,
                float *C, size_t ldc, bool accumulate, int nt) {
    const int nblocks = (N + kDotNB - 1) / kDotNB;
    nt = std::min(nt, nblocks);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        const int T = omp_get_num_threads();
        const int tid = omp_get_thread_num();
        const int b0 = split(nblocks, T, tid), b1 = split(nblocks, T, tid + 1);
        for (int b = b0; b < b1; ++b) {
            const int n = b * kDotNB;
            const int nb = std::min(kDotNB, N - n);
            for (int m = 0; m < M; m += kDotMB)
                dot_rows<DT>(std::min(kDotMB, M - m), nb, K, A + size_t(m) * lda, lda, W,
                             size_t(n) * ldw, ldw, C + size_t(m) * ldc + size_t(n), ldc,
                             accumulate);
        }
    }
}

template <int DT>
void gemm_dispatch(int M, int N, int K, const float *A, size_t lda, const void *W, size_t ldw,
                   float *C, size_t ldc, bool accumulate) {
    const double macs = double(M) * double(N) * double(K);
    const int maxt = std::max(1, omp_get_max_threads());
    const int nt = int(std::max(1.0, std::min(double(maxt), macs / kMacsPerThread)));
    if (use_dot_path(M, K)) gemm_small<DT>(M, N, K, A, lda, W, ldw, C, ldc, accumulate, nt);
    else gemm_packed<DT>(M, N, K, A, lda, W, ldw, C, ldc, accumulate, nt);
}

void check_args(int M, int N, int K, const float *A, int lda, const void *W, int32_t wdt, int ldw,
                const float *C, int ldc) {
    DIMOO_CHECK_ARG(M >= 0 && N >= 0 && K >= 0, "gemm_nt: negative dimension");
    DIMOO_CHECK_ARG(wdt == DIMOO_F32 || wdt == DIMOO_F16 || wdt == DIMOO_BF16,
                    "gemm_nt: weight dtype must be F32, F16 or BF16");
    if (M == 0 || N == 0) return;
    DIMOO_CHECK_ARG(C != nullptr && ldc >= N, "gemm_nt: bad C or ldc");
    if (K == 0) return;
    DIMOO_CHECK_ARG(A != nullptr && lda >= K, "gemm_nt: bad A or lda");
    DIMOO_CHECK_ARG(W != nullptr && ldw >= K, "gemm_nt: bad W or ldw");
}

void zero_or_keep(int M, int N, float *C, int ldc, bool accumulate) {
    if (accumulate) return;
    for (int m = 0; m < M; ++m) std::fill_n(C + size_t(m) * size_t(ldc), N, 0.0f);
}

} // namespace

void gemm_nt(int M, int N, int K, const float *A, int lda, const void *W, int32_t wdt, int ldw,
             float *C, int ldc, bool accumulate) {
    check_args(M, N, K, A, lda, W, wdt, ldw, C, ldc);
    if (M == 0 || N == 0) return;
    if (K == 0) return zero_or_keep(M, N, C, ldc, accumulate);
    switch (wdt) {
    case DIMOO_F32:
        gemm_dispatch<DIMOO_F32>(M, N, K, A, lda, W, ldw, C, ldc, accumulate);
        break;
    case DIMOO_F16:
        gemm_dispatch<DIMOO_F16>(M, N, K, A, lda, W, ldw, C, ldc, accumulate);
        break;
    default:
        gemm_dispatch<DIMOO_BF16>(M, N, K, A, lda, W, ldw, C, ldc, accumulate);
        break;
    }
}

void gemm_nt_ref(int M, int N, int K, const float *A, int lda, const void *W, int32_t wdt, int ldw,
                 float *C, int ldc, bool accumulate) {
    check_args(M, N, K, A, lda, W, wdt, ldw, C, ldc);
    for (int m = 0; m < M; ++m) {
        for (int n = 0; n < N; ++n) {
            double s = 0.0;
            for (int k = 0; k < K; ++k)
                s += double(A[size_t(m) * size_t(lda) + size_t(k)]) *
                     double(load_as_f32(W, wdt, size_t(n) * size_t(ldw) + size_t(k)));
            float &c = C[size_t(m) * size_t(ldc) + size_t(n)];
            c = accumulate ? float(double(c) + s) : float(s);
        }
    }
}

const char *gemm_isa() {
#if defined(DIMOO_GEMM_AVX512)
    return "avx512";
#elif defined(DIMOO_GEMM_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}

} // namespace dimoo::cpu
