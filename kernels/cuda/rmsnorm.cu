// rmsnorm.cu - the forward's RMSNorm over the rows of the fp32 residual
// stream: out = x / sqrt(mean(x^2) + eps) * w in fp32, written as bf16.
// One block per row. Rows of up to 8192 values (cols % 4 == 0, aligned: the
// model's) are read once, 16 bytes a load, and held in registers between the
// sum of squares and the scaling; other rows are read twice, a value at a
// time (the second read hits L1/L2).
#include <cuda_bf16.h>

#include <cstring>

#include "cuda/cuda_common.cuh"
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

// The same with V float4 per thread held in registers (cols4 = cols / 4 <=
// V * kThreads): one read of the row, 8-byte stores of 4 bf16.
template <int V>
__global__ void rmsnorm_f32_bf16_vec_kernel(const float4 *__restrict__ x, const int32_t *__restrict__ idx,
                                            const float4 *__restrict__ w, uint2 *__restrict__ out, int cols4,
                                            float eps) {
    const size_t row = idx ? size_t(idx[blockIdx.x]) : size_t(blockIdx.x);
    const float4 *xr = x + row * cols4;
    float4 v[V];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < V; j++) {
        const int c = threadIdx.x + j * kThreads;
        v[j] = c < cols4 ? xr[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / float(4 * cols4) + eps);
    uint2 *orow = out + size_t(blockIdx.x) * cols4;
#pragma unroll
    for (int j = 0; j < V; j++) {
        const int c = threadIdx.x + j * kThreads;
        if (c >= cols4) break;
        const float4 g = w[c];
        const __nv_bfloat162 h[2] = {__floats2bfloat162_rn(v[j].x * inv * g.x, v[j].y * inv * g.y),
                                     __floats2bfloat162_rn(v[j].z * inv * g.z, v[j].w * inv * g.w)};
        uint2 o; // one 8-byte store (memcpy: register moves)
        memcpy(&o, h, 8);
        orow[c] = o;
    }
}


} // namespace

cudaError_t rmsnorm_f32_bf16_launch(const float *x, const int32_t *rows_idx, const float *w, uint16_t *out,
                                    int rows, int cols, float eps, cudaStream_t stream) {
    if (rows <= 0 || cols <= 0) return cudaSuccess;
    const int cols4 = cols / 4;
    if (cols % 4 == 0 && cols4 <= 8 * kThreads && is_aligned(x, 16) && is_aligned(w, 16) && is_aligned(out, 8)) {
        const auto *x4 = reinterpret_cast<const float4 *>(x);
        const auto *w4 = reinterpret_cast<const float4 *>(w);
        auto *o2 = reinterpret_cast<uint2 *>(out);
        if (cols4 <= kThreads)
            rmsnorm_f32_bf16_vec_kernel<1><<<rows, kThreads, 0, stream>>>(x4, rows_idx, w4, o2, cols4, eps);
        else if (cols4 <= 2 * kThreads)
            rmsnorm_f32_bf16_vec_kernel<2><<<rows, kThreads, 0, stream>>>(x4, rows_idx, w4, o2, cols4, eps);
        else if (cols4 <= 4 * kThreads)
            rmsnorm_f32_bf16_vec_kernel<4><<<rows, kThreads, 0, stream>>>(x4, rows_idx, w4, o2, cols4, eps);
        else
            rmsnorm_f32_bf16_vec_kernel<8><<<rows, kThreads, 0, stream>>>(x4, rows_idx, w4, o2, cols4, eps);
    } else {
        rmsnorm_f32_bf16_kernel<<<rows, kThreads, 0, stream>>>(x, rows_idx, w,
                                                               reinterpret_cast<__nv_bfloat16 *>(out), cols, eps);
    }
    return cudaGetLastError();
}

} // namespace dimoo
