// attention_sm90.cu - flash attention forward with Hopper's wgmma (sm_90a),
// head dim 128. NOT YET RUN ON A GPU: selected only by DIMOO_CUDA_ATTN=sm90
// until a device has checked it against the reference kernel.
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
// Not yet: TMA loads, warp specialization, ping-pong of two warpgroups.
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

// 64 rows x 128 bf16 from global (row stride `stride` elements, rows >= n_rows
// zero) into the swizzled two-block layout at shared address `s`.
__device__ __forceinline__ void load_tile(uint32_t s, const uint16_t *g, int stride, int row0, int n_rows) {
    for (int c = threadIdx.x; c < 64 * 16; c += kThreads) {
        const int r = c >> 4, ch = c & 15, blk = ch >> 3, cc = ch & 7, gr = row0 + r;
        const bool ok = gr < n_rows;
        const uint32_t dst = s + blk * kBlockBytes + sm90::sw128_chunk(r, cc);
        cp_async16(dst, g + size_t(ok ? gr : 0) * stride + ch * 8, ok ? 16 : 0);
    }
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
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
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
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
        if ((j + 1) * kBN > kv_len) {
#pragma unroll
            for (int t = 0; t < 8; t++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (j * kBN + t * 8 + 2 * (lane & 3) + (e & 1) >= kv_len) s[4 * t + e] = -INFINITY;
        }
        float mx[2] = {row_m[0], row_m[1]};
#pragma unroll
        for (int i = 0; i < 32; i++) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
        float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            alpha[r] = exp2f((row_m[r] - mx[r]) * sl2);
            row_m[r] = mx[r];
        }
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const int r = (i >> 1) & 1;
            s[i] = exp2f(s[i] * sl2 - mx[r] * sl2);
            rs[r] += s[i];
        }
#pragma unroll
        for (int r = 0; r < 2; r++) row_l[r] = row_l[r] * alpha[r] + rs[r];
#pragma unroll
        for (int i = 0; i < 64; i++) o[i] *= alpha[(i >> 1) & 1];
        if (j + 1 < nb) cp_async_wait<1>();
        else cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        // P as four k16 A fragments, all written before the fence so the
        // wgmmas issue back to back.
        uint32_t a[kBN / 16][4];
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ks++)
#pragma unroll
            for (int u = 0; u < 4; u++) a[ks][u] = pack_bf16(s[8 * ks + 2 * u], s[8 * ks + 2 * u + 1]);
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

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = row_l[r];
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
#endif // DIMOO_SM90A_KERNEL
}

} // namespace

bool attention_sm90_available() {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major == 9;
}

cudaError_t attention_sm90_launch(const AttnArgs &a, cudaStream_t s) {
    if (a.head_dim != kHD || !attention_sm90_available()) return cudaErrorInvalidValue;
    cudaError_t e = cudaFuncSetAttribute(flash_wgmma_sm90_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (e != cudaSuccess) return e;
    dim3 grid(unsigned((a.max_q + kBM - 1) / kBM), unsigned(a.n_heads), unsigned(a.n_seqs));
    flash_wgmma_sm90_kernel<<<grid, kThreads, kSmem, s>>>(a);
    return cudaGetLastError();
}

} // namespace dimoo
