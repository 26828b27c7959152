// swiglu.cu - out = silu(g) * u with g, u the two halves of the fused
// ff_proj|up_proj GEMM's output row. fp32 arithmetic as the CPU backend
// (g / (1 + exp(-g)) * u), one rounding to bf16 at the end.
//
// One block per row, so no thread divides an element index into (row,
// column). Where the row width allows (mlp % 8 == 0, 16-byte aligned
// pointers: the model's rows always) each thread moves 8 values per load
// and store; otherwise one at a time. Both compute each element the same
// way, so they agree bit for bit.
#include <cuda_bf16.h>

#include <cstring>

#include "cuda/cuda_common.cuh"
#include "cuda/swiglu.cuh"

namespace dimoo {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

__global__ void swiglu_kernel(const __nv_bfloat16 *__restrict__ gu, __nv_bfloat16 *__restrict__ out, int mlp) {
    const __nv_bfloat16 *g = gu + size_t(blockIdx.x) * 2 * mlp, *u = g + mlp;
    __nv_bfloat16 *o = out + size_t(blockIdx.x) * mlp;
    for (int c = threadIdx.x; c < mlp; c += kThreads)
        o[c] = __float2bfloat16_rn(silu_mul(__bfloat162float(g[c]), __bfloat162float(u[c])));
}

// 8 bf16 = one 16-byte load of the gates, one of the ups, one store: moved
// as uint4 (a struct of bf16 pairs is copied 4 bytes at a time), viewed as
// pairs through memcpy (register moves, no aliasing question).
struct Bf16x8 {
    __nv_bfloat162 h[4];
};

__global__ void swiglu_vec8_kernel(const uint4 *__restrict__ gu, uint4 *__restrict__ out, int mlp8) {
    const uint4 *g = gu + size_t(blockIdx.x) * 2 * mlp8, *u = g + mlp8;
    uint4 *o = out + size_t(blockIdx.x) * mlp8;
    for (int c = threadIdx.x; c < mlp8; c += kThreads) {
        const uint4 graw = g[c], uraw = u[c];
        Bf16x8 gv, uv, ov;
        memcpy(&gv, &graw, 16);
        memcpy(&uv, &uraw, 16);
#pragma unroll
        for (int j = 0; j < 4; j++)
            ov.h[j] = __floats2bfloat162_rn(silu_mul(__low2float(gv.h[j]), __low2float(uv.h[j])),
                                            silu_mul(__high2float(gv.h[j]), __high2float(uv.h[j])));
        uint4 oraw;
        memcpy(&oraw, &ov, 16);
        o[c] = oraw;
    }
}

} // namespace

cudaError_t swiglu_launch(const uint16_t *gu, uint16_t *out, int rows, int mlp, cudaStream_t s) {
    if (rows <= 0 || mlp <= 0) return cudaSuccess;
    if (mlp % 8 == 0 && is_aligned(gu, 16) && is_aligned(out, 16))
        swiglu_vec8_kernel<<<unsigned(rows), kThreads, 0, s>>>(reinterpret_cast<const uint4 *>(gu),
                                                               reinterpret_cast<uint4 *>(out), mlp / 8);
    else
        swiglu_kernel<<<unsigned(rows), kThreads, 0, s>>>(reinterpret_cast<const __nv_bfloat16 *>(gu),
                                                          reinterpret_cast<__nv_bfloat16 *>(out), mlp);
    return cudaGetLastError();
}

} // namespace dimoo
