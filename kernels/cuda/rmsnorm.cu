// rmsnorm.cu - the forward's RMSNorm over the rows of the fp32 residual
// stream: out = x / sqrt(mean(x^2) + eps) * w in fp32, written as bf16.
// One block per row; the row is read twice (sum of squares, then scale),
// which stays in L1/L2 for the model's widths (<= 16 KiB).
#include <cuda_bf16.h>

#include "cuda/rmsnorm.cuh"

namespace dimoo {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block's kThreads threads, returned to every thread: a
// warp reduction, then across warps through shared memory.
__device__ __forceinline__ float block_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __shared__ float partial[kThreads / 32];
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
        if (threadIdx.x == 0) partial[0] = w;
    }
    __syncthreads();
    return partial[0];
}

// fp32 rows (optionally gathered) to bf16, as the forward needs.
__global__ void rmsnorm_f32_bf16_kernel(const float *__restrict__ x, const int32_t *__restrict__ idx,
                                        const float *__restrict__ w, __nv_bfloat16 *__restrict__ out, int cols,
                                        float eps) {
    const size_t row = idx ? size_t(idx[blockIdx.x]) : size_t(blockIdx.x);
    const float *xr = x + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += kThreads) ss += xr[c] * xr[c];
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / float(cols) + eps);
    __nv_bfloat16 *orow = out + size_t(blockIdx.x) * cols;
    for (int c = threadIdx.x; c < cols; c += kThreads) orow[c] = __float2bfloat16_rn(xr[c] * inv * w[c]);
}

} // namespace

cudaError_t rmsnorm_f32_bf16_launch(const float *x, const int32_t *rows_idx, const float *w, uint16_t *out,
                                    int rows, int cols, float eps, cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;
    rmsnorm_f32_bf16_kernel<<<rows, kThreads, 0, stream>>>(x, rows_idx, w, reinterpret_cast<__nv_bfloat16 *>(out),
                                                           cols, eps);
    return cudaGetLastError();
}

} // namespace dimoo
