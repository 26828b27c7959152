// ops.cpp - the VQ-VAE's building blocks on the CPU, on zero-bordered
// channels-last activations: convolutions as Winograd or shifted GEMMs (nearest x2
// upsampling folded into four 2x2 sub-pixel convolutions; diffusers'
// asymmetric stride-2 convolution through gathered patches), GroupNorm
// (+SiLU), and the single-head mid-block attention. fp32, OpenMP.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "cpu/gemm.h"
#include "vecmath.h"
#include "host_memory.h"
#include "vq/vq.h"

namespace dimoo::vq {

namespace {
std::atomic<bool> scratch_poison{false};
std::atomic<int> winograd_tile{0};
} // namespace

void set_scratch_poison(bool on) { scratch_poison.store(on); }

void set_winograd_tile(int tile) {
    DIMOO_CHECK_ARG(tile == 0 || tile == 2 || tile == 4, "set_winograd_tile: 0, 2 or 4");
    winograd_tile.store(tile);
}

// The blocks a Scratch keeps: released ones wait in `free` for a request
// they can serve.
struct ScratchPool {
    std::mutex mu;
    std::vector<std::pair<size_t, float *>> free; // (capacity, block)

    ~ScratchPool() {
        for (auto &b : free) delete[] b.second;
    }
    // The smallest free block of n to 2n floats, or null. A larger one stays
    // for a larger request: taking it would leave that one to a new block.
    float *take(size_t n, size_t *capacity) {
        std::lock_guard<std::mutex> lock(mu);
        size_t best = free.size();
        for (size_t i = 0; i < free.size(); i++)
            if (free[i].first >= n && free[i].first / 2 <= n && (best == free.size() || free[i].first < free[best].first))
                best = i;
        if (best == free.size()) {
            // A new block is about to be made: the free ones go back to the
            // system first, so they do not pile up as the sizes change.
            for (auto &b : free) delete[] b.second;
            free.clear();
            return nullptr;
        }
        float *p = free[best].second;
        *capacity = free[best].first;
        free[best] = free.back();
        free.pop_back();
        if (scratch_poison.load(std::memory_order_relaxed))
            std::fill(p, p + *capacity, std::numeric_limits<float>::quiet_NaN());
        return p;
    }
    void give(float *p, size_t capacity) noexcept {
        std::lock_guard<std::mutex> lock(mu);
        try {
            free.emplace_back(capacity, p);
        } catch (...) {
            delete[] p;
        }
    }
};

namespace {
thread_local std::shared_ptr<ScratchPool> current_pool;
} // namespace

void ActivationDeleter::operator()(float *p) const noexcept {
    if (pool) pool->give(p, capacity);
    else delete[] p;
}

Scratch::Scratch() {
    if (!current_pool) {
        current_pool = std::make_shared<ScratchPool>();
        owner_ = true;
    }
}

Scratch::~Scratch() {
    if (owner_) current_pool.reset();
}

Activation activation(size_t n) {
    const std::shared_ptr<ScratchPool> &pool = current_pool;
    if (pool) {
        size_t capacity = 0;
        if (float *p = pool->take(n, &capacity)) return Activation(p, ActivationDeleter{pool, capacity});
    }
    return Activation(host_floats(n, "the VQ-VAE's activations").release(), ActivationDeleter{pool, n});
}

namespace {

using Buf = Activation;

// Rows of a GEMM's output kept per block, so the nine taps of a 3x3 conv
// accumulate into a block while it is in cache (this many floats of output).
constexpr int64_t kBlockFloats = int64_t(1) << 18;
// Floats of stride-2 patches gathered per GEMM call (16 MB).
constexpr int64_t kPatchFloats = int64_t(1) << 22;

// Convolutions with fewer channels in or out (the image ones) take the
// shifted-GEMM path: Winograd's transforms would cost more than they save.
constexpr int kWinogradMinChannels = 8;
// F(4x4, 3x3) from this many output tiles of 4x4 up (a 64x64 grid): below
// it, making its transformed kernel (36 cout x cin floats per call) costs more
// than the GEMMs save. Measured on a 2-core AVX2 VM, decoder stacks of one
// width: 0.65x at 64 tiles (768 channels), 1.09x at 256 (512), 1.4x at 1024
// (256) and 1.3-1.5x at 4096 (128) against F(2x2, 3x3).
constexpr int64_t kWinograd4MinTiles = 256;

int64_t block_rows(int cout, int64_t total) {
    return std::min<int64_t>(total, std::max<int64_t>(256, kBlockFloats / std::max(cout, 1)));
}

inline float silu1(float v) { return v / (1.0f + exp_clamped(-v)); }

// Rows [0, rows) of out: set to (or, accumulating, add) the bias.
void bias_rows(float *out, int64_t rows, int n, const std::vector<float> &b, bool accumulate) {
    const float *bp = b.data();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *o = out + r * n;
        if (accumulate) {
#pragma omp simd
            for (int j = 0; j < n; j++) o[j] += bp[j];
        } else {
            std::memcpy(o, bp, sizeof(float) * size_t(n));
        }
    }
}

void gemm(int64_t M, int N, int K, const float *A, int lda, const float *W, int ldw, float *C, int ldc) {
    cpu::gemm_nt(int(M), N, K, A, lda, W, DIMOO_F32, ldw, C, ldc, true);
}

// A^T M A + bias of one F(2x2, 3x3) tile: m is its value in the first of 16
// planes (plane floats apart), y gets its 2x2 outputs, row by row, cout each.
// Base pointers and fixed offsets, so the loop vectorises over channels.
void wino2_output(const float *__restrict m, size_t plane, const float *__restrict bias, int cout,
                  float *__restrict y) {
#pragma omp simd
    for (int j = 0; j < cout; j++) {
        float v[16];
        for (int e = 0; e < 16; e++) v[e] = m[size_t(e) * plane + size_t(j)];
        float s[2][4];
        for (int q = 0; q < 4; q++) {
            s[0][q] = v[q] + v[4 + q] + v[8 + q];
            s[1][q] = v[4 + q] - v[8 + q] - v[12 + q];
        }
        for (int r = 0; r < 2; r++) {
            y[size_t(2 * r) * cout + j] = s[r][0] + s[r][1] + s[r][2] + bias[j];
            y[size_t(2 * r + 1) * cout + j] = s[r][1] - s[r][2] - s[r][3] + bias[j];
        }
    }
}

// A tile's n x n outputs (y, row by row, cout each) into the output pixels
// that exist, from (y0, x0) (unpadded coordinates), set or added.
void put_tile(const float *y, int n, int y0, int x0, int H, int W, int cout, float *out, bool accumulate) {
    const int Wp = W + 2;
    for (int r = 0; r < n && y0 + r < H; r++)
        for (int q = 0; q < n && x0 + q < W; q++) {
            const float *__restrict src = y + size_t(r * n + q) * cout;
            float *__restrict dst = out + (int64_t(y0 + r + 1) * Wp + x0 + q + 1) * cout;
            if (accumulate) {
#pragma omp simd
                for (int j = 0; j < cout; j++) dst[j] += src[j];
            } else {
                std::memcpy(dst, src, sizeof(float) * size_t(cout));
            }
        }
}

// The rest of a Winograd F(n x n, 3x3) conv for tiles [t0, t0 + nt) of its
// H x W output, tx tiles a row, once V holds their transformed patches: the
// (n + 2)^2 GEMMs V x U into M (planes of T tiles), then each tile's output
// transform (y: n * n * cout floats per thread) into the pixels that exist.
template <int n, void (*output)(const float *, size_t, const float *, int, float *)>
void winograd_finish(const Conv2d &c, const float *U, const float *V, float *M, float *ybuf, int64_t t0, int64_t nt,
                     int64_t T, int tx, int H, int W, float *out, bool accumulate) {
    const int cin = c.cin, cout = c.cout;
    const size_t oc = size_t(cout) * cin;
    for (int e = 0; e < (n + 2) * (n + 2); e++)
        cpu::gemm_nt(int(nt), cout, cin, V + size_t(e) * T * cin, cin, U + size_t(e) * oc, DIMOO_F32, cin,
                     M + size_t(e) * T * cout, cout, false);
    const float *bias = c.b.data();
    const size_t plane = size_t(T) * cout;
#pragma omp parallel
    {
        float *y = ybuf + size_t(omp_get_thread_num()) * n * n * cout;
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nt; k++) {
            output(M + size_t(k) * cout, plane, bias, cout, y);
            const int y0 = int((t0 + k) / tx) * n, x0 = int((t0 + k) % tx) * n; // output coords
            put_tile(y, n, y0, x0, H, W, cout, out, accumulate);
        }
    }
}

// Winograd F(2x2, 3x3): the 3x3 stride-1 conv over 2x2 output tiles, each
// read as a 4x4 input patch (stride 2). With V = B^T d B per patch and
// U = G g G^T per (cout, cin) kernel, the 16 elementwise products summed over
// cin are 16 GEMMs, and Y = A^T M A + bias gives the tile. 16 multiplies per
// 4 outputs instead of 36. Tiles are processed in chunks so V and M stay a
// few MB; partial tiles of odd sides read zeros and write only what exists.
void conv_winograd(const Conv2d &c, const float *x, int H, int W, float *out, bool accumulate) {
    const int cin = c.cin, cout = c.cout, Wp = W + 2;
    const int tx = (W + 1) / 2, ty = (H + 1) / 2;
    const int64_t tiles = int64_t(tx) * ty;
    // U[xi][o][i], xi = 4 * row + col of the 4x4 transformed kernel.
    Buf U(activation(size_t(16) * cout * cin));
    const size_t oc = size_t(cout) * cin;
#pragma omp parallel for schedule(static)
    for (int o = 0; o < cout; o++)
        for (int i = 0; i < cin; i++) {
            float g[3][3], t[4][3];
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) g[ky][kx] = c.w[((size_t(o) * 3 + ky) * 3 + kx) * cin + i];
            for (int kx = 0; kx < 3; kx++) { // t = G g
                t[0][kx] = g[0][kx];
                t[1][kx] = 0.5f * (g[0][kx] + g[1][kx] + g[2][kx]);
                t[2][kx] = 0.5f * (g[0][kx] - g[1][kx] + g[2][kx]);
                t[3][kx] = g[2][kx];
            }
            const size_t at = size_t(o) * cin + i;
            for (int r = 0; r < 4; r++) { // U = t G^T
                U[(r * 4 + 0) * oc + at] = t[r][0];
                U[(r * 4 + 1) * oc + at] = 0.5f * (t[r][0] + t[r][1] + t[r][2]);
                U[(r * 4 + 2) * oc + at] = 0.5f * (t[r][0] - t[r][1] + t[r][2]);
                U[(r * 4 + 3) * oc + at] = t[r][2];
            }
        }
    const int64_t T = std::min<int64_t>(tiles, std::max<int64_t>(64, (int64_t(1) << 19) / (cin + cout)));
    Buf V(activation(size_t(16) * T * cin)), M(activation(size_t(16) * T * cout));
    Buf ybuf(activation(size_t(omp_get_max_threads()) * 4 * cout)); // per thread, made here: nothing throws inside OpenMP
    std::vector<float> zeros(static_cast<size_t>(cin), 0.0f);
    for (int64_t t0 = 0; t0 < tiles; t0 += T) {
        const int64_t nt = std::min(T, tiles - t0);
        // V = B^T d B, per tile, vectorised over channels.
#pragma omp parallel for schedule(static)
        for (int64_t k = 0; k < nt; k++) {
            const int y0 = int((t0 + k) / tx) * 2, x0 = int((t0 + k) % tx) * 2; // padded coords of the patch
            const float *d[4][4];
            for (int r = 0; r < 4; r++)
                for (int q = 0; q < 4; q++)
                    d[r][q] = (y0 + r < H + 2 && x0 + q < Wp) ? x + (int64_t(y0 + r) * Wp + x0 + q) * cin
                                                              : zeros.data();
            float *v[16];
            for (int e = 0; e < 16; e++) v[e] = V.get() + (size_t(e) * T + k) * cin;
#pragma omp simd
            for (int i = 0; i < cin; i++) {
                float b[4][4];
                for (int q = 0; q < 4; q++) { // B^T d, column q
                    b[0][q] = d[0][q][i] - d[2][q][i];
                    b[1][q] = d[1][q][i] + d[2][q][i];
                    b[2][q] = d[2][q][i] - d[1][q][i];
                    b[3][q] = d[1][q][i] - d[3][q][i];
                }
                for (int r = 0; r < 4; r++) { // (B^T d) B, row r
                    v[r * 4 + 0][i] = b[r][0] - b[r][2];
                    v[r * 4 + 1][i] = b[r][1] + b[r][2];
                    v[r * 4 + 2][i] = b[r][2] - b[r][1];
                    v[r * 4 + 3][i] = b[r][1] - b[r][3];
                }
            }
        }
        winograd_finish<2, wino2_output>(c, U.get(), V.get(), M.get(), ybuf.get(), t0, nt, T, tx, H, W, out,
                                         accumulate);
    }
}

// Winograd F(4x4, 3x3) (Lavin and Gray's points 0, 1, -1, 2, -2): 4x4 output
// tiles from 6x6 input patches (stride 4), 36 multiplies per 16 outputs
// where F(2x2, 3x3) takes 64, so 36 GEMMs of a quarter the rows. Its larger
// transform coefficients cost precision: about 2e-6 relative against a
// float64 convolution, 5 to 7 times F(2x2, 3x3)'s. Same layout and chunking.
namespace wino4 {

// G g: 3 kernel taps to 6.
inline void g(const float k[3], float u[6]) {
    u[0] = 0.25f * k[0];
    u[1] = -(k[0] + k[1] + k[2]) / 6.0f;
    u[2] = -(k[0] - k[1] + k[2]) / 6.0f;
    u[3] = k[0] / 24.0f + k[1] / 12.0f + k[2] / 6.0f;
    u[4] = k[0] / 24.0f - k[1] / 12.0f + k[2] / 6.0f;
    u[5] = k[2];
}

} // namespace wino4

// B^T d B of one 6x6 patch: pixel (r, q)'s cin channels at p + ro[r] + co[q];
// v gets the 36 transformed values of each channel, plane floats apart.
// Written out in scalars (no arrays): so GCC vectorises it over channels.
#define DIMOO_WINO4_BT(d0, d1, d2, d3, d4, d5, b0, b1, b2, b3, b4, b5)                                            \
    const float b0 = 4.0f * (d0) - 5.0f * (d2) + (d4);                                                        \
    const float b1 = (d3) + (d4) - 4.0f * ((d1) + (d2));                                                      \
    const float b2 = (d4) - (d3) + 4.0f * ((d1) - (d2));                                                      \
    const float b3 = (d4) - (d2) + 2.0f * ((d3) - (d1));                                                      \
    const float b4 = (d4) - (d2) + 2.0f * ((d1) - (d3));                                                      \
    const float b5 = 4.0f * (d1) - 5.0f * (d3) + (d5);
#define DIMOO_WINO4_AT(m0, m1, m2, m3, m4, m5, y0, y1, y2, y3)                                                    \
    const float y0 = (m0) + ((m1) + (m2)) + ((m3) + (m4));                                                    \
    const float y1 = ((m1) - (m2)) + 2.0f * ((m3) - (m4));                                                    \
    const float y2 = ((m1) + (m2)) + 4.0f * ((m3) + (m4));                                                    \
    const float y3 = ((m1) - (m2)) + 8.0f * ((m3) - (m4)) + (m5);

void wino4_input(const float *__restrict p, const size_t ro[6], const size_t co[6], int cin, float *__restrict v,
                 size_t plane) {
    const float *__restrict p0 = p + ro[0], *__restrict p1 = p + ro[1], *__restrict p2 = p + ro[2];
    const float *__restrict p3 = p + ro[3], *__restrict p4 = p + ro[4], *__restrict p5 = p + ro[5];
    const size_t c0 = co[0], c1 = co[1], c2 = co[2], c3 = co[3], c4 = co[4], c5 = co[5];
#define DIMOO_COL(q, o)                                                                                             \
    DIMOO_WINO4_BT(p0[(o) + i], p1[(o) + i], p2[(o) + i], p3[(o) + i], p4[(o) + i], p5[(o) + i], b0##q, b1##q, b2##q, \
                   b3##q, b4##q, b5##q)
#define DIMOO_ROW(r)                                                                                                \
    {                                                                                                               \
        DIMOO_WINO4_BT(b##r##0, b##r##1, b##r##2, b##r##3, b##r##4, b##r##5, t0, t1, t2, t3, t4, t5)                \
        v[(6 * r + 0) * plane + i] = t0;                                                                            \
        v[(6 * r + 1) * plane + i] = t1;                                                                            \
        v[(6 * r + 2) * plane + i] = t2;                                                                            \
        v[(6 * r + 3) * plane + i] = t3;                                                                            \
        v[(6 * r + 4) * plane + i] = t4;                                                                            \
        v[(6 * r + 5) * plane + i] = t5;                                                                            \
    }
#pragma omp simd
    for (size_t i = 0; i < size_t(cin); i++) {
        DIMOO_COL(0, c0)
        DIMOO_COL(1, c1)
        DIMOO_COL(2, c2)
        DIMOO_COL(3, c3)
        DIMOO_COL(4, c4)
        DIMOO_COL(5, c5)
        DIMOO_ROW(0)
        DIMOO_ROW(1)
        DIMOO_ROW(2)
        DIMOO_ROW(3)
        DIMOO_ROW(4)
        DIMOO_ROW(5)
    }
#undef DIMOO_COL
#undef DIMOO_ROW
}

// A^T M A + bias of one tile: m is its value in the first of 36 planes
// (plane floats apart); y gets its 4x4 outputs, row by row, cout each.
void wino4_output(const float *__restrict m, size_t plane, const float *__restrict bias, int cout,
                  float *__restrict y) {
    const size_t n = size_t(cout);
#define DIMOO_M(r, q) m[(6 * (r) + (q)) * plane + j]
#define DIMOO_COL(q) DIMOO_WINO4_AT(DIMOO_M(0, q), DIMOO_M(1, q), DIMOO_M(2, q), DIMOO_M(3, q), DIMOO_M(4, q), DIMOO_M(5, q), \
                                    s0##q, s1##q, s2##q, s3##q)
#define DIMOO_ROW(r)                                                                                                \
    {                                                                                                               \
        DIMOO_WINO4_AT(s##r##0, s##r##1, s##r##2, s##r##3, s##r##4, s##r##5, t0, t1, t2, t3)                        \
        y[(4 * r + 0) * n + j] = t0 + bias[j];                                                                      \
        y[(4 * r + 1) * n + j] = t1 + bias[j];                                                                      \
        y[(4 * r + 2) * n + j] = t2 + bias[j];                                                                      \
        y[(4 * r + 3) * n + j] = t3 + bias[j];                                                                      \
    }
#pragma omp simd
    for (size_t j = 0; j < n; j++) {
        DIMOO_COL(0)
        DIMOO_COL(1)
        DIMOO_COL(2)
        DIMOO_COL(3)
        DIMOO_COL(4)
        DIMOO_COL(5)
        DIMOO_ROW(0)
        DIMOO_ROW(1)
        DIMOO_ROW(2)
        DIMOO_ROW(3)
    }
#undef DIMOO_M
#undef DIMOO_COL
#undef DIMOO_ROW
}
#undef DIMOO_WINO4_BT
#undef DIMOO_WINO4_AT

// With up, the input is H x W and the output (2H) x (2W): the conv of its
// nearest x2 upsampling, read in place. A patch's padded rows 4t .. 4t + 5 of
// the upsampled image are the input's padded rows 2t + {0, 1, 1, 2, 2, 3}
// (likewise columns), so no upsampled copy is made.
void conv_winograd4(const Conv2d &c, const float *x, int H, int W, float *out, bool accumulate, bool up) {
    const int cin = c.cin, cout = c.cout, Wp = W + 2;
    const int Ho = up ? 2 * H : H, Wo = up ? 2 * W : W;
    const int tx = (Wo + 3) / 4, ty = (Ho + 3) / 4;
    // A patch's rows (and columns) as the input's, counted from its first,
    // and how far apart the first rows (columns) of neighbouring tiles are.
    static constexpr int kSame[6] = {0, 1, 2, 3, 4, 5}, kUp[6] = {0, 1, 1, 2, 2, 3};
    const int *step = up ? kUp : kSame;
    const int stride = up ? 2 : 4;
    size_t ro[6], co[6];
    for (int r = 0; r < 6; r++) ro[r] = size_t(step[r]) * Wp * cin, co[r] = size_t(step[r]) * cin;
    const int64_t tiles = int64_t(tx) * ty;
    // U[xi][o][i], xi = 6 * row + col of the 6x6 transformed kernel.
    Buf U(activation(size_t(36) * cout * cin));
    const size_t oc = size_t(cout) * cin;
#pragma omp parallel for schedule(static)
    for (int o = 0; o < cout; o++)
        for (int i = 0; i < cin; i++) {
            float t[6][3]; // G g, column by column
            for (int kx = 0; kx < 3; kx++) {
                float k[3], u[6];
                for (int ky = 0; ky < 3; ky++) k[ky] = c.w[((size_t(o) * 3 + ky) * 3 + kx) * cin + i];
                wino4::g(k, u);
                for (int r = 0; r < 6; r++) t[r][kx] = u[r];
            }
            const size_t at = size_t(o) * cin + i;
            for (int r = 0; r < 6; r++) { // (G g) G^T, row by row
                float u[6];
                wino4::g(t[r], u);
                for (int q = 0; q < 6; q++) U[(r * 6 + q) * oc + at] = u[q];
            }
        }
    const int64_t T = std::min<int64_t>(tiles, std::max<int64_t>(64, (int64_t(1) << 18) / (cin + cout)));
    Buf V(activation(size_t(36) * T * cin)), M(activation(size_t(36) * T * cout));
    // Per thread, made here (nothing may throw inside OpenMP): a patch, a tile's outputs.
    const size_t nth = size_t(omp_get_max_threads());
    Buf patches(activation(nth * 36 * cin)), ybuf(activation(nth * 16 * cout));
    size_t patch_ro[6], patch_co[6]; // a copied patch: 6 x 6 pixels of cin
    for (int r = 0; r < 6; r++) patch_ro[r] = size_t(6 * r) * cin, patch_co[r] = size_t(r) * cin;
    for (int64_t t0 = 0; t0 < tiles; t0 += T) {
        const int64_t nt = std::min(T, tiles - t0);
        // V = B^T d B, per tile; tiles reaching past the border from a
        // zero-filled copy of their patch.
        const size_t vplane = size_t(T) * cin;
#pragma omp parallel
        {
            float *patch = patches.get() + size_t(omp_get_thread_num()) * 36 * cin;
#pragma omp for schedule(static)
            for (int64_t k = 0; k < nt; k++) {
                // The input's padded coords of the patch's first pixel.
                const int y0 = int((t0 + k) / tx) * stride, x0 = int((t0 + k) % tx) * stride;
                const float *p = x + (int64_t(y0) * Wp + x0) * cin;
                if (y0 + step[5] >= H + 2 || x0 + step[5] >= Wp) {
                    for (int r = 0; r < 6; r++)
                        for (int q = 0; q < 6; q++) {
                            float *dst = patch + size_t(r * 6 + q) * cin;
                            if (y0 + step[r] < H + 2 && x0 + step[q] < Wp)
                                std::memcpy(dst, p + ro[r] + co[q], sizeof(float) * size_t(cin));
                            else
                                std::fill(dst, dst + cin, 0.0f);
                        }
                    wino4_input(patch, patch_ro, patch_co, cin, V.get() + size_t(k) * cin, vplane);
                } else {
                    wino4_input(p, ro, co, cin, V.get() + size_t(k) * cin, vplane);
                }
            }
        }
        winograd_finish<4, wino4_output>(c, U.get(), V.get(), M.get(), ybuf.get(), t0, nt, T, tx, Ho, Wo, out,
                                         accumulate);
    }
}

// Whether a 3x3 conv with an H x W output takes F(4x4, 3x3) (set_winograd_tile).
bool use_winograd4(const Conv2d &c, int H, int W) {
    if (c.k != 3 || c.cin < kWinogradMinChannels || c.cout < kWinogradMinChannels) return false;
    const int tile = winograd_tile.load(std::memory_order_relaxed);
    return tile == 4 || (tile == 0 && int64_t((H + 3) / 4) * ((W + 3) / 4) >= kWinograd4MinTiles);
}

// 3x3 stride 1 (or 1x1): nine (one) accumulating GEMMs per block of rows. The
// output pixel at padded row q + (W + 3) reads tap (ky, kx) at input row
// q + ky * (W + 2) + kx; the rows q that land on the border are zeroed after.
void conv_same(const Conv2d &c, const float *x, int H, int W, float *out, bool accumulate) {
    const int cin = c.cin, cout = c.cout, Wp = W + 2;
    if (c.k == 1) {
        const int64_t M = int64_t(padded_rows(H, W));
        bias_rows(out, M, cout, c.b, accumulate);
        gemm(M, cout, cin, x, cin, c.w.data(), cin, out, cout);
        zero_border(out, H, W, cout);
        return;
    }
    if (cin >= kWinogradMinChannels && cout >= kWinogradMinChannels) { // both write interior pixels only
        if (use_winograd4(c, H, W)) conv_winograd4(c, x, H, W, out, accumulate, false);
        else conv_winograd(c, x, H, W, out, accumulate);
        zero_border(out, H, W, cout);
        return;
    }
    const int64_t M = int64_t(H - 1) * Wp + W; // q in [0, M): first to last pixel
    float *o = out + int64_t(Wp + 1) * cout;
    bias_rows(o, M, cout, c.b, accumulate);
    const int64_t blk = block_rows(cout, M);
    for (int64_t q0 = 0; q0 < M; q0 += blk) {
        const int64_t rows = std::min(blk, M - q0);
        for (int ky = 0; ky < 3; ky++)
            for (int kx = 0; kx < 3; kx++)
                gemm(rows, cout, cin, x + (q0 + int64_t(ky) * Wp + kx) * cin, cin,
                     c.w.data() + size_t(ky * 3 + kx) * cin, 9 * cin, o + q0 * cout, cout);
    }
    zero_border(out, H, W, cout);
}

// Nearest x2 then 3x3: output pixel (2i + py, 2j + px) is a 2x2 conv of the
// input around (i, j) with the combined weights of prepare_upsample. Each
// parity's GEMM output goes to a block buffer, then to its pixels.
void conv_up(const Conv2d &c, const float *x, int H, int W, float *out) {
    const int cin = c.cin, cout = c.cout, Wp = W + 2, Wo = 2 * W + 2;
    DIMOO_CHECK_ARG(c.k == 3 && c.up.size() == size_t(16) * cout * cin, "conv2d Up: weights not prepared");
    const int64_t M = int64_t(H - 1) * Wp + W;
    const int64_t blk = block_rows(cout, M);
    Buf tmp(activation(size_t(blk) * cout));
    for (int64_t q0 = 0; q0 < M; q0 += blk) {
        const int64_t rows = std::min(blk, M - q0);
        for (int py = 0; py < 2; py++)
            for (int px = 0; px < 2; px++) {
                bias_rows(tmp.get(), rows, cout, c.b, false);
                for (int dy = 0; dy < 2; dy++)
                    for (int dx = 0; dx < 2; dx++) {
                        const float *w = c.up.data() + size_t((py * 2 + px) * 4 + dy * 2 + dx) * cout * cin;
                        gemm(rows, cout, cin, x + (q0 + int64_t(py + dy) * Wp + (px + dx)) * cin, cin, w, cin,
                             tmp.get(), cout);
                    }
#pragma omp parallel for schedule(static)
                for (int64_t r = 0; r < rows; r++) {
                    const int64_t q = q0 + r;
                    const int i = int(q / Wp), j = int(q % Wp);
                    if (j >= W) continue; // a border row of the input grid
                    std::memcpy(out + (int64_t(2 * i + py + 1) * Wo + (2 * j + px + 1)) * cout,
                                tmp.get() + r * cout, sizeof(float) * size_t(cout));
                }
            }
    }
    zero_border(out, 2 * H, 2 * W, cout);
}

// 3x3 stride 2, padding one row/column at the bottom/right only: output (y, x)
// reads input (2y + ky, 2x + kx), i.e. padded row (2y + ky + 1, 2x + kx + 1).
void conv_down(const Conv2d &c, const float *x, int H, int W, float *out) {
    const int cin = c.cin, cout = c.cout, Wp = W + 2, K = 9 * cin;
    int Ho = 0, Wo = 0;
    conv_out_size(ConvMode::Down, H, W, &Ho, &Wo);
    const int64_t M = int64_t(Ho) * Wo;
    const int64_t chunk = std::min<int64_t>(M, std::max<int64_t>(64, kPatchFloats / K));
    Buf col(activation(size_t(chunk) * K)), tmp(activation(size_t(chunk) * cout));
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t rows = std::min(chunk, M - m0);
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int oy = int((m0 + r) / Wo), ox = int((m0 + r) % Wo);
            float *dst = col.get() + r * K;
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++, dst += cin)
                    std::memcpy(dst, x + (int64_t(2 * oy + ky + 1) * Wp + (2 * ox + kx + 1)) * cin,
                                sizeof(float) * size_t(cin));
        }
        bias_rows(tmp.get(), rows, cout, c.b, false);
        gemm(rows, cout, K, col.get(), K, c.w.data(), K, tmp.get(), cout);
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int oy = int((m0 + r) / Wo), ox = int((m0 + r) % Wo);
            std::memcpy(out + (int64_t(oy + 1) * (Wo + 2) + ox + 1) * cout, tmp.get() + r * cout,
                        sizeof(float) * size_t(cout));
        }
    }
    zero_border(out, Ho, Wo, cout);
}

} // namespace

void zero_border(float *p, int H, int W, int C) {
    const int64_t Wp = W + 2;
    const size_t row = sizeof(float) * size_t(Wp) * C;
    std::memset(p, 0, row);
    std::memset(p + (int64_t(H) + 1) * Wp * C, 0, row);
#pragma omp parallel for schedule(static)
    for (int y = 1; y <= H; y++) {
        std::memset(p + int64_t(y) * Wp * C, 0, sizeof(float) * size_t(C));
        std::memset(p + (int64_t(y) * Wp + W + 1) * C, 0, sizeof(float) * size_t(C));
    }
}

void pad(const float *x, int H, int W, int C, float *p) {
    const int64_t Wp = W + 2;
#pragma omp parallel for schedule(static)
    for (int y = 0; y < H; y++)
        std::memcpy(p + (int64_t(y + 1) * Wp + 1) * C, x + int64_t(y) * W * C, sizeof(float) * size_t(W) * C);
    zero_border(p, H, W, C);
}

void unpad(const float *p, int H, int W, int C, float *x) {
    const int64_t Wp = W + 2;
#pragma omp parallel for schedule(static)
    for (int y = 0; y < H; y++)
        std::memcpy(x + int64_t(y) * W * C, p + (int64_t(y + 1) * Wp + 1) * C, sizeof(float) * size_t(W) * C);
}

void prepare_upsample(Conv2d &c) {
    DIMOO_CHECK_ARG(c.k == 3, "prepare_upsample: needs a 3x3 conv");
    const int cin = c.cin, cout = c.cout;
    // Kernel rows (or columns) that parity p's tap d sums: p=0: {0}, {1,2};
    // p=1: {0,1}, {2}.
    auto in_tap = [](int p, int d, int k) { return p == 0 ? (d == 0 ? k == 0 : k >= 1) : (d == 0 ? k <= 1 : k == 2); };
    c.up.assign(size_t(16) * cout * cin, 0.0f);
    for (int py = 0; py < 2; py++)
        for (int px = 0; px < 2; px++)
            for (int dy = 0; dy < 2; dy++)
                for (int dx = 0; dx < 2; dx++) {
                    float *dst = c.up.data() + size_t((py * 2 + px) * 4 + dy * 2 + dx) * cout * cin;
                    for (int o = 0; o < cout; o++)
                        for (int i = 0; i < cin; i++) {
                            double s = 0;
                            for (int ky = 0; ky < 3; ky++)
                                for (int kx = 0; kx < 3; kx++)
                                    if (in_tap(py, dy, ky) && in_tap(px, dx, kx))
                                        s += c.w[((size_t(o) * 3 + ky) * 3 + kx) * cin + i];
                            dst[size_t(o) * cin + i] = float(s);
                        }
                }
}

void conv_out_size(ConvMode mode, int H, int W, int *Ho, int *Wo) {
    switch (mode) {
    case ConvMode::Same: *Ho = H, *Wo = W; break;
    case ConvMode::Down: *Ho = (H - 2) / 2 + 1, *Wo = (W - 2) / 2 + 1; break;
    case ConvMode::Up: *Ho = 2 * H, *Wo = 2 * W; break;
    }
}

void conv2d(const Conv2d &c, const float *x, int H, int W, float *out, ConvMode mode, bool accumulate) {
    if (H <= 0 || W <= 0) return;
    switch (mode) {
    case ConvMode::Same: conv_same(c, x, H, W, out, accumulate); return;
    case ConvMode::Up:
        DIMOO_CHECK_ARG(!accumulate, "conv2d Up: accumulate is not supported");
        if (use_winograd4(c, 2 * H, 2 * W)) {
            conv_winograd4(c, x, H, W, out, false, true);
            zero_border(out, 2 * H, 2 * W, c.cout);
        } else {
            conv_up(c, x, H, W, out);
        }
        return;
    case ConvMode::Down:
        DIMOO_CHECK_ARG(!accumulate && c.k == 3 && H >= 2 && W >= 2, "conv2d Down: needs a 3x3 conv, H, W >= 2");
        conv_down(c, x, H, W, out);
        return;
    }
}

void silu_inplace(float *x, int64_t n) {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] = silu1(x[i]);
}

void group_norm(const GroupNorm &g, const float *x, int H, int W, float *out, bool silu) {
    const int C = g.c, G = g.groups, cg = C / G;
    const int64_t n = int64_t(padded_rows(H, W)); // the zero border adds nothing to the sums
    // Per-channel sums: fp32 over blocks of rows, fp64 across blocks and threads.
    std::vector<double> s1(static_cast<size_t>(C), 0.0), s2(static_cast<size_t>(C), 0.0);
    constexpr int64_t kBlock = 32;
#pragma omp parallel
    {
        std::vector<double> t1(static_cast<size_t>(C), 0.0), t2(static_cast<size_t>(C), 0.0);
        std::vector<float> f1(static_cast<size_t>(C)), f2(static_cast<size_t>(C));
#pragma omp for schedule(static)
        for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
            std::fill(f1.begin(), f1.end(), 0.0f);
            std::fill(f2.begin(), f2.end(), 0.0f);
            const int64_t b1 = std::min(n, b0 + kBlock);
            float *a1 = f1.data(), *a2 = f2.data();
            for (int64_t r = b0; r < b1; r++) {
                const float *xr = x + r * C;
#pragma omp simd
                for (int c = 0; c < C; c++) {
                    a1[c] += xr[c];
                    a2[c] += xr[c] * xr[c];
                }
            }
            for (int c = 0; c < C; c++) {
                t1[size_t(c)] += a1[c];
                t2[size_t(c)] += a2[c];
            }
        }
#pragma omp critical
        for (int c = 0; c < C; c++) {
            s1[size_t(c)] += t1[size_t(c)];
            s2[size_t(c)] += t2[size_t(c)];
        }
    }
    std::vector<float> scale(static_cast<size_t>(C)), shift(static_cast<size_t>(C));
    const double count = double(H) * double(W) * cg;
    for (int gi = 0; gi < G; gi++) {
        double m = 0, q = 0;
        for (int c = gi * cg; c < (gi + 1) * cg; c++) m += s1[size_t(c)], q += s2[size_t(c)];
        m /= count;
        const double var = std::max(0.0, q / count - m * m);
        const double rstd = 1.0 / std::sqrt(var + double(g.eps));
        for (int c = gi * cg; c < (gi + 1) * cg; c++) {
            scale[size_t(c)] = float(double(g.gamma[size_t(c)]) * rstd);
            shift[size_t(c)] = float(double(g.beta[size_t(c)]) - m * double(g.gamma[size_t(c)]) * rstd);
        }
    }
    const float *a = scale.data(), *b = shift.data();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * C;
        float *o = out + r * C;
        if (silu) {
#pragma omp simd
            for (int c = 0; c < C; c++) o[c] = silu1(xr[c] * a[c] + b[c]);
        } else {
#pragma omp simd
            for (int c = 0; c < C; c++) o[c] = xr[c] * a[c] + b[c];
        }
    }
    zero_border(out, H, W, C);
}

namespace {

// out (n, l.out) = x (n, l.in) W^T + b.
void linear(const Linear &l, const float *x, int n, float *out) {
    bias_rows(out, n, l.out, l.b, false);
    gemm(n, l.out, l.in, x, l.in, l.w.data(), l.in, out, l.out);
}

} // namespace

void attention(const Attention &a, const float *x, int n, float *out) {
    const int C = a.norm.c;
    const size_t nc = size_t(n) * size_t(C);
    Buf h(activation(nc)), q(activation(nc)), k(activation(nc)), v(activation(nc));
    // GroupNorm over the n pixels as a 1 x n image (its border is scratch).
    {
        Buf xp(activation(padded_rows(1, n) * size_t(C)));
        pad(x, 1, n, C, xp.get());
        group_norm(a.norm, xp.get(), 1, n, xp.get(), false);
        unpad(xp.get(), 1, n, C, h.get());
    }
    linear(a.q, h.get(), n, q.get());
    linear(a.k, h.get(), n, k.get());
    linear(a.v, h.get(), n, v.get());
    // v^T (C, n): the GEMM takes its right operand as rows of the output's columns.
    float *vt = h.get(); // h is no longer needed
#pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++)
        for (int i = 0; i < n; i++) vt[size_t(c) * size_t(n) + size_t(i)] = v[size_t(i) * size_t(C) + size_t(c)];
    // out = x + b_o, the projection accumulates into it below.
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++)
        for (int c = 0; c < C; c++) out[size_t(i) * C + c] = x[size_t(i) * C + c] + a.o.b[size_t(c)];
    const float scale = 1.0f / std::sqrt(float(C));
    const int block = int(std::max<int64_t>(1, std::min<int64_t>(n, kPatchFloats / std::max(n, 1))));
    Buf s(activation(size_t(block) * size_t(n))), o(activation(size_t(block) * size_t(C)));
    for (int q0 = 0; q0 < n; q0 += block) {
        const int rows = std::min(block, n - q0);
        cpu::gemm_nt(rows, n, C, q.get() + size_t(q0) * C, C, k.get(), DIMOO_F32, C, s.get(), n, false);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; r++) {
            float *sr = s.get() + size_t(r) * size_t(n);
            float mx = sr[0];
            for (int j = 1; j < n; j++) mx = std::max(mx, sr[j]);
            double sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < n; j++) {
                sr[j] = exp_clamped((sr[j] - mx) * scale);
                sum += sr[j];
            }
            const float inv = float(1.0 / sum);
#pragma omp simd
            for (int j = 0; j < n; j++) sr[j] *= inv;
        }
        cpu::gemm_nt(rows, C, n, s.get(), n, vt, DIMOO_F32, n, o.get(), C, false);
        cpu::gemm_nt(rows, C, C, o.get(), C, a.o.w.data(), DIMOO_F32, C, out + size_t(q0) * C, C, true);
    }
}

} // namespace dimoo::vq
