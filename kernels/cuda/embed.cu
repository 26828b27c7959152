// embed.cu - embedding gather into the fp32 residual stream. One block per
// row; bf16 pairs widened to fp32 (exact), so the result equals the CPU's.
#include <cuda_bf16.h>

#include "cuda/embed.cuh"

namespace dimoo {
namespace {

__global__ void embed_kernel(const __nv_bfloat16 *__restrict__ wte, const int32_t *__restrict__ tok,
                             float *__restrict__ x, int d) {
    const size_t r = blockIdx.x;
    const __nv_bfloat16 *src = wte + size_t(tok[r]) * d;
    float *dst = x + r * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = __bfloat162float(src[c]);
}

} // namespace

cudaError_t embed_launch(const uint16_t *wte, const int32_t *tok, float *x, int rows, int d, cudaStream_t s) {
    if (rows == 0) return cudaSuccess;
    embed_kernel<<<rows, 256, 0, s>>>(reinterpret_cast<const __nv_bfloat16 *>(wte), tok, x, d);
    return cudaGetLastError();
}

} // namespace dimoo
