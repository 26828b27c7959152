// swiglu.cu - out = silu(g) * u with g, u the two halves of the fused
// ff_proj|up_proj GEMM's output row. fp32 arithmetic as the CPU backend
// (g / (1 + exp(-g)) * u), one rounding to bf16 at the end.
#include <cuda_bf16.h>

#include "cuda/swiglu.cuh"

namespace dimoo {
namespace {

__global__ void swiglu_kernel(const __nv_bfloat16 *__restrict__ gu, __nv_bfloat16 *__restrict__ out, int mlp,
                              size_t n) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const size_t r = i / mlp, c = i % mlp;
        const float g = __bfloat162float(gu[r * 2 * mlp + c]);
        const float u = __bfloat162float(gu[r * 2 * mlp + mlp + c]);
        out[i] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
    }
}

} // namespace

cudaError_t swiglu_launch(const uint16_t *gu, uint16_t *out, int rows, int mlp, cudaStream_t s) {
    const size_t n = size_t(rows) * mlp;
    if (n == 0) return cudaSuccess;
    const int threads = 256;
    const size_t blocks = (n + threads - 1) / threads;
    swiglu_kernel<<<unsigned(blocks < 65536 * 8 ? blocks : 65536 * 8), threads, 0, s>>>(
        reinterpret_cast<const __nv_bfloat16 *>(gu), reinterpret_cast<__nv_bfloat16 *>(out), mlp, n);
    return cudaGetLastError();
}

} // namespace dimoo
