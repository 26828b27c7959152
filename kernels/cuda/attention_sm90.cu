// attention_sm90.cu - flash attention forward with Hopper's wgmma (sm_90a),
// head dim 128. NOT YET RUN ON A GPU (all pass the float64 comparison on
// the host emulation of csrc/tests/emu, DIMOO_EMU_SM=90): the forward uses
// sm90w on sm_90 only after a start-up check against the reference kernel
// on the device; the benchmark is to pick the fastest.
//
// Same algorithm and pipeline as flash_sm80 in attention.cu (one CTA = one
// warpgroup of 128 threads owns 64 query rows of one (sequence, head); K/V
// tiles of 64 rows, double-buffered with cp.async; online softmax with exp2),
// with the products on the tensor cores' asynchronous path:
//   S = Q K^T : wgmma m64n64k16, A = Q and B = K both from shared memory,
//               K-major (the head dim is contiguous in both);
//   O += P V  : wgmma m64n128k16, A = P from registers (the S accumulator
//               layout packed to bf16 pairs), B = V from shared memory,
//               MN-major (V's head dim is contiguous: transposed B).
// Shared tiles use the 128-byte swizzle: each 64-column block of a tile is
// rows of 128 bytes, 16-byte chunk c of row r stored at chunk c ^ (r % 8),
// blocks 1024-byte aligned. Descriptors: K-major LBO 16 B (unused), SBO
// 1024 B (8 rows), +32 B per k16 step; MN-major (V) LBO = the 64-column
// block stride (8 KB), SBO 1024 B (8 keys), +2 KB per 16 keys.
// flash_wgmma_sm90_pipe_kernel keeps the tiles and orders the work as FA3
// does within one warpgroup (S_j issued before O's rescale, the softmax of
// S_j under P_{j-1} V_j), descriptors computed before each wgmma_fence and
// registers pinned (fence_regs) so ptxas does not serialize the wgmmas.
// flash_tma_sm90_kernel (below) adds TMA loads, warp specialization and
// (sm90tp) ping-pong of its two consumer warpgroups, (sm90ts, sm90tps) a
// persistent grid, and (sm90tw) FA3's 176-key blocks on top of all that.
// Not yet: O stored by TMA.
#include <cuda.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstring>

#include "cuda/attention.cuh"
#include "cuda/ptx_sm90.cuh"
#include "cuda/sm90_layout.h"

namespace dimoo {
namespace {

constexpr int kBM = 64, kBN = 64, kHD = 128, kThreads = 128;
constexpr int kBlockBytes = 64 * 128;               // [64 rows][64 cols] bf16
constexpr int kTileBytes = 2 * kBlockBytes;         // a 64 x 128 tile: two column blocks
constexpr int kSmem = kTileBytes * 5 + 1024;        // Q, K x2, V x2, alignment slack
static_assert(kSmem <= 227 * 1024, "wgmma attention tiles exceed shared memory");
static_assert(kBN == 64 && kBM == 64 && kHD == 128, "the wgmma shapes below are written for these tiles");

// The kernel's body exists in the sm_90a device pass, and in the tests'
// host emulation of CUDA (csrc/tests/emu), which has its own ptx_sm90.cuh.
#if (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)) || defined(DIMOO_CUDA_EMU)
#define DIMOO_SM90A_KERNEL 1
#endif

#ifdef DIMOO_SM90A_KERNEL
using namespace sm90;

__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    return sm90::desc_sw128(addr, lbo_bytes, sbo_bytes);
}

// ROWS rows x 128 bf16 from global (row stride `stride` elements, rows >=
// n_rows zero) into the swizzled two-block layout at shared address `s`: two
// 64-column blocks of ROWS rows of 128 bytes.
template <int NT = kThreads, int ROWS = 64>
__device__ __forceinline__ void load_tile(uint32_t s, const uint16_t *g, int stride, int row0, int n_rows) {
    for (int c = threadIdx.x; c < ROWS * 16; c += NT) {
        const int r = c >> 4, ch = c & 15, blk = ch >> 3, cc = ch & 7, gr = row0 + r;
        const bool ok = gr < n_rows;
        const uint32_t dst = s + blk * (ROWS * 128) + sm90::sw128_chunk(r, cc);
        cp_async16(dst, g + size_t(ok ? gr : 0) * stride + ch * 8, ok ? 16 : 0);
    }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// ---- the pipelined variants (FA3-style overlap within each warpgroup) ---------

struct RowState {
    float m[2], l[2]; // running max (raw scores) and partial sum of this lane's columns, rows r0 and r0 + 8
};

// The eight k16 descriptors of a K-major ROWS x 128 tile at shared address t
// (two 64-column blocks of ROWS rows): computed before a wgmma_fence, so the
// wgmmas of a stage issue back to back (ptxas serializes a stage with other
// instructions defining its inputs).
template <int ROWS> __device__ __forceinline__ void tile_descs(uint64_t (&d)[kHD / 16], uint32_t t) {
#pragma unroll
    for (int kk = 0; kk < kHD / 16; kk++) d[kk] = make_desc(t + (kk >> 2) * (ROWS * 128) + (kk & 3) * 32, 16, 1024);
}

// Online softmax of a block of BN keys (block j) in place: s becomes P
// (fp32), alpha the factor the running output must be scaled by.
template <int BN>
__device__ __forceinline__ void softmax_block(float (&s)[BN / 2], RowState &st, float (&alpha)[2], int j, int kv_len,
                                              int lane, float sl2) {
    if ((j + 1) * BN > kv_len) {
#pragma unroll
        for (int t = 0; t < BN / 8; t++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (j * BN + t * 8 + 2 * (lane & 3) + (e & 1) >= kv_len) s[4 * t + e] = -INFINITY;
    }
    float mx[2] = {st.m[0], st.m[1]}, rs[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < BN / 2; i++) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
#pragma unroll
    for (int r = 0; r < 2; r++) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        alpha[r] = exp2f((st.m[r] - mx[r]) * sl2);
        st.m[r] = mx[r];
    }
#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        const int r = (i >> 1) & 1;
        s[i] = exp2f(s[i] * sl2 - mx[r] * sl2);
        rs[r] += s[i];
    }
#pragma unroll
    for (int r = 0; r < 2; r++) st.l[r] = st.l[r] * alpha[r] + rs[r];
}

// P (fp32, the S accumulator layout) as the bf16 A fragments of P V.
template <int BN> __device__ __forceinline__ void pack_p(uint32_t (&a)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
    for (int ks = 0; ks < BN / 16; ks++)
#pragma unroll
        for (int u = 0; u < 4; u++) a[ks][u] = pack_bf16(s[8 * ks + 2 * u], s[8 * ks + 2 * u + 1]);
}

// O += P V for the V tile of BN keys at shared address v (MN-major: 16 keys
// per k16 step, 64-column blocks BN * 128 bytes apart).
template <int BN>
__device__ __forceinline__ void issue_pv(float (&o)[64], const uint32_t (&a)[BN / 16][4], uint32_t v) {
    uint64_t d[BN / 16];
#pragma unroll
    for (int ks = 0; ks < BN / 16; ks++) d[ks] = make_desc(v + ks * 16 * 128, BN * 128, 1024);
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < BN / 16; ks++) wgmma_o(o, a[ks], d[ks]);
    wgmma_commit();
    fence_regs(o);
}

template <int BN>
__device__ __forceinline__ void issue_s(float (&s)[BN / 2], const uint64_t (&dq)[kHD / 16], uint32_t k_tile) {
    uint64_t dk[kHD / 16];
    tile_descs<BN>(dk, k_tile);
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHD / 16; kk++) {
        if constexpr (BN == 64) wgmma_s(s, dq[kk], dk[kk], kk > 0);
        else if constexpr (BN == 128) wgmma_s128(s, dq[kk], dk[kk], kk > 0);
        else wgmma_s176(s, dq[kk], dk[kk], kk > 0);
    }
    wgmma_commit();
    fence_regs(s);
}

// Normalizes O by the row sums and writes rows below q_len as bf16.
__device__ __forceinline__ void store_o(const AttnArgs &p, const cuda::AttnSeq &sd, int m0, int h, int warp, int lane,
                                        const float (&o)[64], const RowState &st) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = st.l[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l > 0.f ? 1.f / l : 0.f;
    }
    const int r0 = m0 + warp * 16 + (lane >> 2), r1 = r0 + 8;
    __nv_bfloat16 *Og = reinterpret_cast<__nv_bfloat16 *>(p.o) + size_t(sd.q_begin) * p.o_stride + h * kHD;
#pragma unroll
    for (int t = 0; t < 16; t++) {
        const int c = t * 8 + 2 * (lane & 3);
        if (r0 < sd.q_len)
            *reinterpret_cast<__nv_bfloat162 *>(Og + size_t(r0) * p.o_stride + c) =
                __floats2bfloat162_rn(o[4 * t] * inv[0], o[4 * t + 1] * inv[0]);
        if (r1 < sd.q_len)
            *reinterpret_cast<__nv_bfloat162 *>(Og + size_t(r1) * p.o_stride + c) =
                __floats2bfloat162_rn(o[4 * t + 2] * inv[1], o[4 * t + 3] * inv[1]);
    }
}
#endif // DIMOO_SM90A_KERNEL

__global__ void __launch_bounds__(kThreads, 1) flash_wgmma_sm90_kernel(AttnArgs p) {
#ifdef DIMOO_SM90A_KERNEL
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    // Swizzled tiles need 1024-byte aligned bases.
    const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t sQ = base, sK = base + kTileBytes, sV = base + 3 * kTileBytes;

    const cuda::AttnSeq sd = p.seqs[blockIdx.z];
    const int m0 = blockIdx.x * kBM;
    if (m0 >= sd.q_len) return;
    const int h = blockIdx.y, kvh = h / (p.n_heads / p.n_kv_heads);
    const uint16_t *Qg = p.q + size_t(sd.q_begin + m0) * p.q_stride + h * kHD;
    const size_t kv_off = size_t(p.layer) * sd.layer_stride + size_t(kvh) * kHD;
    const uint16_t *Kg = sd.k + kv_off, *Vg = sd.v + kv_off;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kv_len = sd.kv_len, nb = (kv_len + kBN - 1) / kBN;

    load_tile(sQ, Qg, p.q_stride, 0, sd.q_len - m0);
    load_tile(sK, Kg, p.kv_stride, 0, kv_len);
    cp_async_commit();
    load_tile(sV, Vg, p.kv_stride, 0, kv_len);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.f;
    RowState st{{-INFINITY, -INFINITY}, {0.f, 0.f}};
    const float sl2 = p.scale * 1.4426950408889634f;

    for (int j = 0; j < nb; j++) {
        const uint32_t k_s = sK + (j & 1) * kTileBytes, v_s = sV + (j & 1) * kTileBytes;
        float s[32];
#pragma unroll
        for (int i = 0; i < 32; i++) s[i] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kHD / 16; kk++) {
            const uint32_t off = (kk >> 2) * kBlockBytes + (kk & 3) * 32;
            wgmma_s(s, make_desc(sQ + off, 16, 1024), make_desc(k_s + off, 16, 1024), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        if (j + 1 < nb) {
            load_tile(sK + ((j + 1) & 1) * kTileBytes, Kg, p.kv_stride, (j + 1) * kBN, kv_len);
            cp_async_commit();
        }
        float alpha[2];
        softmax_block<kBN>(s, st, alpha, j, kv_len, lane, sl2);
#pragma unroll
        for (int i = 0; i < 64; i++) o[i] *= alpha[(i >> 1) & 1];
        if (j + 1 < nb) cp_async_wait<1>();
        else cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        // P as four k16 A fragments, all written before the fence so the
        // wgmmas issue back to back.
        uint32_t a[kBN / 16][4];
        pack_p<kBN>(a, s);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ks++) wgmma_o(o, a[ks], make_desc(v_s + ks * 16 * 128, kBlockBytes, 1024));
        wgmma_commit();
        wgmma_wait<0>();
        if (j + 1 < nb) {
            load_tile(sV + ((j + 1) & 1) * kTileBytes, Vg, p.kv_stride, (j + 1) * kBN, kv_len);
            cp_async_commit();
            cp_async_wait<1>();
            fence_proxy_async();
            __syncthreads();
        }
    }

    store_o(p, sd, m0, h, warp, lane, o, st);
#endif // DIMOO_SM90A_KERNEL
}


// The pipelined variants: the FA3 order within each warpgroup. Per block
// j >= 1: S_j = Q K_j^T is issued, O is rescaled under it, O += P_{j-1} V_{j-1}
// is issued, and the softmax of S_j runs while that product is still on the
// tensor cores (wait_group 1, then 0). The loads of K_{j+1} and V_j go out at
// the start of block j and are waited for at the start of block j + 1. WG
// warpgroups per CTA (1 or 2), each with its own 64 query rows and the same
// K/V tiles (with two, a tile is loaded once for 128 rows, and one
// warpgroup's softmax can run under the other's products); BN keys per block
// (64, or 128: half the blocks, barriers and waits per key).
template <int WG, int BN> constexpr int pipe_smem() { return WG * kTileBytes + 4 * BN * 256 + 1024; }

template <int WG, int BN>
__global__ void __launch_bounds__(WG * kThreads, 1) flash_wgmma_sm90_pipe_kernel(AttnArgs p) {
#ifdef DIMOO_SM90A_KERNEL
    constexpr int NT = WG * kThreads, KV_TILE = BN * 256; // BN rows x 128 bf16
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t sK = base + WG * kTileBytes, sV = sK + 2 * KV_TILE;
    const cuda::AttnSeq sd = p.seqs[blockIdx.z];
    const int m0 = blockIdx.x * (WG * kBM);
    if (m0 >= sd.q_len) return;
    const int h = blockIdx.y, kvh = h / (p.n_heads / p.n_kv_heads);
    const size_t kv_off = size_t(p.layer) * sd.layer_stride + size_t(kvh) * kHD;
    const uint16_t *Kg = sd.k + kv_off, *Vg = sd.v + kv_off;
    const int kv_len = sd.kv_len, nb = (kv_len + BN - 1) / BN;
    const int wg = threadIdx.x / kThreads, warp = (threadIdx.x % kThreads) >> 5, lane = threadIdx.x & 31;
    const uint32_t sQ = base + wg * kTileBytes; // this warpgroup's 64 query rows
    const float sl2 = p.scale * 1.4426950408889634f;

    // Groups: [Q, K_0], [K_1, V_0]. Rows past q_len load as zeros (a
    // warpgroup with none still takes part in the barriers).
    for (int w = 0; w < WG; w++)
        load_tile<NT>(base + w * kTileBytes, p.q + size_t(sd.q_begin + m0 + w * kBM) * p.q_stride + h * kHD, p.q_stride,
                      0, sd.q_len - m0 - w * kBM);
    load_tile<NT, BN>(sK, Kg, p.kv_stride, 0, kv_len);
    cp_async_commit();
    if (nb > 1) load_tile<NT, BN>(sK + KV_TILE, Kg, p.kv_stride, BN, kv_len);
    load_tile<NT, BN>(sV, Vg, p.kv_stride, 0, kv_len);
    cp_async_commit();
    cp_async_wait<1>();
    fence_proxy_async();
    __syncthreads();

    uint64_t dq[kHD / 16];
    tile_descs<kBM>(dq, sQ);
    float s[BN / 2], o[64], alpha[2];
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.f;
    RowState st{{-INFINITY, -INFINITY}, {0.f, 0.f}};
    issue_s<BN>(s, dq, sK);
    wgmma_wait<0>();
    fence_regs(s);
    softmax_block<BN>(s, st, alpha, 0, kv_len, lane, sl2);
    pack_p<BN>(pa, s);

    for (int j = 1; j < nb; j++) {
        cp_async_wait<0>(); // K_j and V_{j-1}
        fence_proxy_async();
        __syncthreads();
        // K_{j+1} into K_{j-1}'s buffer, V_j into V_{j-2}'s: both read by
        // products every thread waited for in block j - 1.
        if (j + 1 < nb) load_tile<NT, BN>(sK + ((j + 1) & 1) * KV_TILE, Kg, p.kv_stride, (j + 1) * BN, kv_len);
        load_tile<NT, BN>(sV + (j & 1) * KV_TILE, Vg, p.kv_stride, j * BN, kv_len);
        cp_async_commit();
        issue_s<BN>(s, dq, sK + (j & 1) * KV_TILE);
#pragma unroll
        for (int i = 0; i < 64; i++) o[i] *= alpha[(i >> 1) & 1];
        issue_pv<BN>(o, pa, sV + ((j - 1) & 1) * KV_TILE);
        wgmma_wait<1>(); // S_j
        fence_regs(s);
        softmax_block<BN>(s, st, alpha, j, kv_len, lane, sl2);
        wgmma_wait<0>(); // P_{j-1} V_{j-1}: its A registers may now be rewritten
        fence_regs(o);
        pack_p<BN>(pa, s);
    }
    cp_async_wait<0>(); // V_{nb-1}
    fence_proxy_async();
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] *= alpha[(i >> 1) & 1];
    issue_pv<BN>(o, pa, sV + ((nb - 1) & 1) * KV_TILE);
    wgmma_wait<0>();
    fence_regs(o);
    store_o(p, sd, m0 + wg * kBM, h, warp, lane, o, st);
#endif // DIMOO_SM90A_KERNEL
}

template <int WG, int BN> cudaError_t launch_pipe(const AttnArgs &a, cudaStream_t s) {
    constexpr int smem = pipe_smem<WG, BN>();
    static_assert(smem <= 227 * 1024, "wgmma attention tiles exceed shared memory");
    cudaError_t e = cudaFuncSetAttribute(flash_wgmma_sm90_pipe_kernel<WG, BN>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    dim3 grid(unsigned((a.max_q + WG * kBM - 1) / (WG * kBM)), unsigned(a.n_heads), unsigned(a.n_seqs));
    flash_wgmma_sm90_pipe_kernel<WG, BN><<<grid, WG * kThreads, smem, s>>>(a);
    return cudaGetLastError();
}

// ---- the warp-specialized kernel: TMA producer, two consumer warpgroups -----
//
// Three warpgroups per CTA (384 threads). Warpgroup 0 is the producer: it
// gives most of its registers away (setmaxnreg) and one thread issues every
// load as a TMA copy (the two 64-column halves of each tile, 128-byte
// swizzled by the tensor map, rows past the sequence's end zero-filled),
// each stage's bytes announced on a "full" mbarrier. Warpgroups 1 and 2 are
// the consumers, 64 query rows each, with the sm90w kernel's FA3 order per
// warpgroup (S_j issued, O rescaled, P_{j-1} V_{j-1} issued, the softmax of
// S_j under it); a consumer warp hands a K or V stage back on its "empty"
// mbarrier once its wgmmas reading it have completed. No __syncthreads after
// the split: the producer and the consumers meet only at mbarriers.
// PINGPONG: the consumers take turns issuing their products (named
// barriers 1 and 2, FA3's ping-pong), so that one warpgroup's softmax runs
// while the other's GEMMs hold the tensor cores; the first turn is
// consumer 0's.
// Tensor maps are per sequence (Q rows q_begin.., K/V of the layer), so a
// tile never reads another sequence's rows: up to kTmaSeqs sequences per
// launch, more in further launches.
// Tiles: (sequence, head, 128 query rows), numbered sequence by sequence,
// head by head, the query blocks of a head next to each other (CTAs working
// at the same time share K/V in L2). A CTA takes tiles blockIdx.x,
// blockIdx.x + gridDim.x, ...: one tile each when the grid has one CTA per
// tile; a persistent grid (one CTA per SM, sm90ts/sm90tps) loops, and its
// producer loads the next tile's Q and K/V while the consumers still finish
// and store the current one. The mbarrier phases run on across tiles.
constexpr int kTmaSeqs = 4;
struct TmaParams {
    CUtensorMap q[kTmaSeqs], k[kTmaSeqs], v[kTmaSeqs];
    AttnArgs a;
    int seq0;                 // first sequence of this launch
    int n_tiles;              // tiles of this launch
    int tile_end[kTmaSeqs];   // tiles of sequences 0..z of the launch
    int m_blocks[kTmaSeqs];   // 128-row query blocks of sequence z
};

struct TmaTile {
    int z, h, m0;
};

#ifdef DIMOO_SM90A_KERNEL
__device__ __forceinline__ TmaTile tma_tile(const TmaParams &p, int t) {
    int z = 0;
    while (z + 1 < kTmaSeqs && t >= p.tile_end[z]) z++;
    const int r = t - (z > 0 ? p.tile_end[z - 1] : 0);
    return {z, r / p.m_blocks[z], (r % p.m_blocks[z]) * (2 * kBM)};
}
#endif

template <int BN, int STAGES> struct TmaLayout {
    static constexpr int kKvTile = BN * 256;              // BN rows x 128 bf16
    static constexpr int kK = 2 * kTileBytes;             // after the two Q tiles
    static constexpr int kV = kK + STAGES * kKvTile;
    static constexpr int kBar = kV + STAGES * kKvTile;    // mbarriers, 8 bytes each
    static constexpr int kBytes = kBar + 8 * (2 + 4 * STAGES) + 1024; // + alignment slack
};

template <int BN, int STAGES, bool PINGPONG>
__global__ void __launch_bounds__(3 * kThreads, 1) flash_tma_sm90_kernel(const __grid_constant__ TmaParams p) {
#ifdef DIMOO_SM90A_KERNEL
    using L = TmaLayout<BN, STAGES>;
    extern __shared__ __align__(1024) uint8_t smem_raw[];
    const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t q_full = base + L::kBar, q_empty = q_full + 8, k_full = q_empty + 8, v_full = k_full + 8 * STAGES,
                   k_empty = v_full + 8 * STAGES, v_empty = k_empty + 8 * STAGES;
    const int group = p.a.n_heads / p.a.n_kv_heads;
    const int wg = threadIdx.x / kThreads, tid = threadIdx.x % kThreads, warp = tid >> 5, lane = threadIdx.x & 31;
    // Block g of the CTA's K/V stream (counted over all its tiles) sits in
    // stage g % STAGES; its barriers' phase there is (g / STAGES) & 1.
    auto stage = [](int g) { return g % STAGES; };
    auto phase = [](int g) { return uint32_t((g / STAGES) & 1); };

    if (threadIdx.x == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, 8); // one arrival per consumer warp
        for (int st = 0; st < STAGES; st++) {
            mbar_init(k_full + 8 * st, 1);
            mbar_init(v_full + 8 * st, 1);
            mbar_init(k_empty + 8 * st, 8);
            mbar_init(v_empty + 8 * st, 8);
        }
        fence_mbar_init();
    }
    __syncthreads();

    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (tid != 0) return;
        int g = 0, n = 0; // K/V blocks and tiles loaded so far
        for (int t = int(blockIdx.x); t < p.n_tiles; t += int(gridDim.x), n++) {
            const TmaTile tl = tma_tile(p, t);
            const int nb = (p.a.seqs[p.seq0 + tl.z].kv_len + BN - 1) / BN, kvh = tl.h / group;
            const void *qm = &p.q[tl.z], *km = &p.k[tl.z], *vm = &p.v[tl.z];
            // The previous tile's Q handed back (a fresh mbarrier passes parity 1 at once).
            mbar_wait(q_empty, uint32_t(n & 1) ^ 1);
            mbar_arrive_expect_tx(q_full, 2 * kTileBytes);
            for (int w = 0; w < 2; w++)
                for (int half = 0; half < 2; half++)
                    tma_load_2d(base + w * kTileBytes + half * kBlockBytes, qm, q_full, tl.h * kHD + half * 64,
                                tl.m0 + w * kBM);
            for (int j = 0; j < nb; j++, g++) {
                // Stage st's previous tiles (block g - STAGES) handed back.
                const int st = stage(g);
                const uint32_t ks = base + L::kK + st * L::kKvTile, vs = base + L::kV + st * L::kKvTile;
                mbar_wait(k_empty + 8 * st, phase(g) ^ 1);
                mbar_arrive_expect_tx(k_full + 8 * st, L::kKvTile);
                for (int half = 0; half < 2; half++)
                    tma_load_2d(ks + half * (BN * 128), km, k_full + 8 * st, kvh * kHD + half * 64, j * BN);
                mbar_wait(v_empty + 8 * st, phase(g) ^ 1);
                mbar_arrive_expect_tx(v_full + 8 * st, L::kKvTile);
                for (int half = 0; half < 2; half++)
                    tma_load_2d(vs + half * (BN * 128), vm, v_full + 8 * st, kvh * kHD + half * 64, j * BN);
            }
        }
        return;
    }

    setmaxnreg_inc<240>();
    const int cw = wg - 1; // query rows m0 + 64 cw
    const uint32_t sK = base + L::kK, sV = base + L::kV;
    const float sl2 = p.a.scale * 1.4426950408889634f;
    auto release = [&](uint32_t bar) {
        if (lane == 0) mbar_arrive(bar);
    };
    // Turns: wait for this consumer's barrier (opened by the other's 128
    // arrivals and this one's 128), issue, then open the other's. Consumer
    // 1 opens consumer 0's first turn, and skips its arrival after its last
    // turn of its last tile, so each barrier gets as many arrivals as syncs.
    // Both consumers take nb + 1 turns per tile, so the turns alternate
    // across tiles too.
    auto turn_begin = [&] {
        if constexpr (PINGPONG) named_bar_sync(1 + cw, 2 * kThreads);
    };
    auto turn_end = [&](bool last) {
        if constexpr (PINGPONG)
            if (!(last && cw == 1)) named_bar_arrive(2 - cw, 2 * kThreads);
    };
    if constexpr (PINGPONG)
        if (cw == 1 && int(blockIdx.x) < p.n_tiles) named_bar_arrive(1, 2 * kThreads);
    uint64_t dq[kHD / 16];
    tile_descs<kBM>(dq, base + cw * kTileBytes);
    float s[BN / 2], o[64], alpha[2];
    uint32_t pa[BN / 16][4];

    int g = 0, n = 0; // K/V blocks and tiles consumed so far
    for (int t = int(blockIdx.x); t < p.n_tiles; t += int(gridDim.x), n++) {
        const TmaTile tl = tma_tile(p, t);
        const cuda::AttnSeq sd = p.a.seqs[p.seq0 + tl.z];
        const int kv_len = sd.kv_len, nb = (kv_len + BN - 1) / BN;
        const bool last_tile = t + int(gridDim.x) >= p.n_tiles;
#pragma unroll
        for (int i = 0; i < 64; i++) o[i] = 0.f;
        RowState rs{{-INFINITY, -INFINITY}, {0.f, 0.f}};

        mbar_wait(q_full, uint32_t(n & 1));
        mbar_wait(k_full + 8 * stage(g), phase(g));
        turn_begin();
        issue_s<BN>(s, dq, sK + stage(g) * L::kKvTile);
        turn_end(false);
        wgmma_wait<0>();
        fence_regs(s);
        release(k_empty + 8 * stage(g));
        softmax_block<BN>(s, rs, alpha, 0, kv_len, lane, sl2);
        pack_p<BN>(pa, s);

        for (int j = 1; j < nb; j++) {
            const int gj = g + j, gp = gj - 1;
            mbar_wait(k_full + 8 * stage(gj), phase(gj));
            mbar_wait(v_full + 8 * stage(gp), phase(gp));
            turn_begin();
            issue_s<BN>(s, dq, sK + stage(gj) * L::kKvTile);
#pragma unroll
            for (int i = 0; i < 64; i++) o[i] *= alpha[(i >> 1) & 1];
            issue_pv<BN>(o, pa, sV + stage(gp) * L::kKvTile);
            turn_end(false);
            wgmma_wait<1>(); // S_j
            fence_regs(s);
            release(k_empty + 8 * stage(gj));
            softmax_block<BN>(s, rs, alpha, j, kv_len, lane, sl2);
            wgmma_wait<0>(); // P_{j-1} V_{j-1}
            fence_regs(o);
            release(v_empty + 8 * stage(gp));
            pack_p<BN>(pa, s);
        }
        // Every product reading Q has completed: the producer may load the next tile's.
        release(q_empty);
        const int gl = g + nb - 1;
        mbar_wait(v_full + 8 * stage(gl), phase(gl));
#pragma unroll
        for (int i = 0; i < 64; i++) o[i] *= alpha[(i >> 1) & 1];
        turn_begin();
        issue_pv<BN>(o, pa, sV + stage(gl) * L::kKvTile);
        turn_end(last_tile);
        wgmma_wait<0>();
        fence_regs(o);
        release(v_empty + 8 * stage(gl));
        store_o(p.a, sd, tl.m0 + cw * kBM, tl.h, warp, lane, o, rs);
        g += nb;
    }
#endif // DIMOO_SM90A_KERNEL
}

// cuTensorMapEncodeTiled from the driver, through the runtime (no link
// against libcuda), looked up once.
using EncodeTiled = decltype(&cuTensorMapEncodeTiled);
EncodeTiled encode_tiled() {
    static const EncodeTiled fn = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q{};
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
                cudaSuccess ||
            q != cudaDriverEntryPointSuccess)
            return EncodeTiled(nullptr);
        return reinterpret_cast<EncodeTiled>(f);
    }();
    return fn;
}

// `rows` rows of `cols` bf16 (row stride `stride` elements) at `ptr`, read
// as boxes of 64 columns x box_rows rows, 128-byte swizzled: what load_tile
// writes with cp.async, rows past the end as zeros.
bool encode_rows(CUtensorMap *m, const uint16_t *ptr, int cols, int rows, int stride, int box_rows) {
    const EncodeTiled f = encode_tiled();
    if (!f) return false;
    const cuuint64_t dim[2] = {cuuint64_t(cols), cuuint64_t(rows > 0 ? rows : 1)};
    const cuuint64_t strides[1] = {cuuint64_t(stride) * 2};
    const cuuint32_t box[2] = {64, cuuint32_t(box_rows)}, elem[2] = {1, 1};
    return f(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t *>(ptr), dim, strides, box, elem,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// PERSISTENT: one CTA per SM (the tiles' shared memory allows one), each
// looping over its tiles; else one CTA per tile.
template <int BN, int STAGES, bool PINGPONG, bool PERSISTENT>
cudaError_t launch_tma(const AttnArgs &a, cudaStream_t s) {
    using L = TmaLayout<BN, STAGES>;
    static_assert(L::kBytes <= 227 * 1024, "TMA attention tiles exceed shared memory");
    static_assert(2 * L::kBytes > 228 * 1024, "a persistent grid of one CTA per SM assumes two do not fit");
    // The maps are built on the host from the sequences' lengths and addresses.
    if (!a.host_seqs) return cudaErrorInvalidValue;
    auto kernel = flash_tma_sm90_kernel<BN, STAGES, PINGPONG>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes);
    if (e != cudaSuccess) return e;
    int sms = 0;
    if (PERSISTENT) {
        int dev = 0;
        if ((e = cudaGetDevice(&dev)) != cudaSuccess ||
            (e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
            return e;
    }
    for (int s0 = 0; s0 < a.n_seqs; s0 += kTmaSeqs) {
        TmaParams p{};
        p.a = a;
        p.seq0 = s0;
        const int n = a.n_seqs - s0 < kTmaSeqs ? a.n_seqs - s0 : kTmaSeqs;
        for (int i = 0; i < kTmaSeqs; i++) p.m_blocks[i] = 1; // never a divisor of 0
        for (int i = 0; i < n; i++) {
            const cuda::AttnSeq &sd = a.host_seqs[s0 + i];
            if (sd.kv_len < 1 || sd.q_len < 0) return cudaErrorInvalidValue;
            const int mb = (sd.q_len + 2 * kBM - 1) / (2 * kBM);
            if (mb > 0) p.m_blocks[i] = mb;
            p.n_tiles += mb * a.n_heads;
            p.tile_end[i] = p.n_tiles; // a sequence without query rows owns no tiles
            const size_t kv_off = size_t(a.layer) * size_t(sd.layer_stride);
            if (!encode_rows(&p.q[i], a.q + size_t(sd.q_begin) * a.q_stride, a.n_heads * kHD, sd.q_len, a.q_stride,
                             kBM) ||
                !encode_rows(&p.k[i], sd.k + kv_off, a.n_kv_heads * kHD, sd.kv_len, a.kv_stride, BN) ||
                !encode_rows(&p.v[i], sd.v + kv_off, a.n_kv_heads * kHD, sd.kv_len, a.kv_stride, BN))
                return cudaErrorInvalidValue;
        }
        for (int i = n; i < kTmaSeqs; i++) p.tile_end[i] = p.n_tiles;
        if (p.n_tiles == 0) continue;
        const int grid = PERSISTENT && sms < p.n_tiles ? sms : p.n_tiles;
        kernel<<<unsigned(grid), 3 * kThreads, L::kBytes, s>>>(p);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
    }
    return cudaSuccess;
}

} // namespace

bool attention_sm90_available() {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major == 9;
}

cudaError_t attention_sm90_launch(const AttnArgs &a, cudaStream_t s, AttnImpl impl) {
    if (a.head_dim != kHD || !attention_sm90_available()) return cudaErrorInvalidValue;
    switch (impl) {
    case AttnImpl::Sm90: {
        cudaError_t e = cudaFuncSetAttribute(flash_wgmma_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        if (e != cudaSuccess) return e;
        dim3 grid(unsigned((a.max_q + kBM - 1) / kBM), unsigned(a.n_heads), unsigned(a.n_seqs));
        flash_wgmma_sm90_kernel<<<grid, kThreads, kSmem, s>>>(a);
        return cudaGetLastError();
    }
    case AttnImpl::Sm90Pipe: return launch_pipe<1, 64>(a, s);
    case AttnImpl::Sm90Pipe2: return launch_pipe<2, 64>(a, s);
    case AttnImpl::Sm90Wide: return launch_pipe<2, 128>(a, s);
    case AttnImpl::Sm90Tma: return launch_tma<128, 2, false, false>(a, s);
    case AttnImpl::Sm90TmaPingPong: return launch_tma<128, 2, true, false>(a, s);
    case AttnImpl::Sm90TmaPersistent: return launch_tma<128, 2, false, true>(a, s);
    case AttnImpl::Sm90TmaPingPongPersistent: return launch_tma<128, 2, true, true>(a, s);
    case AttnImpl::Sm90TmaWide: return launch_tma<176, 2, true, true>(a, s);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace dimoo
