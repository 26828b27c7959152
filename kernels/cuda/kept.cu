// kept.cu - kept-logit bookkeeping on the device (see kept.cuh): one block
// per row copies it into its slot and, when no maximum is given, reduces it
// (reduce.cuh's block_max_thread0, the same tree as rowmax.cu).
#include "cuda/kept.cuh"
#include "cuda/reduce.cuh"

#include <cmath>

namespace dimoo {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) kept_scatter_kernel(const float *__restrict__ src, int ld_src,
                                                                 const float *__restrict__ src_max, int n_cols,
                                                                 const int32_t *__restrict__ slots,
                                                                 float *__restrict__ dst, float *__restrict__ dst_max) {
    const int i = blockIdx.x;
    const int32_t s = slots[i];
    const float *r = src + size_t(i) * size_t(ld_src);
    float *o = dst + size_t(s) * size_t(n_cols);
    float m = -INFINITY;
    for (int c = threadIdx.x; c < n_cols; c += kThreads) {
        const float v = r[c];
        o[c] = v;
        m = fmaxf(m, v);
    }
    if (src_max) {
        if (threadIdx.x == 0) dst_max[s] = src_max[i];
        return;
    }
    m = block_max_thread0<kThreads>(m);
    if (threadIdx.x == 0) dst_max[s] = m;
}

__global__ void gather_f32_kernel(const float *__restrict__ src, const int32_t *__restrict__ idx, int n,
                                  float *__restrict__ dst) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[idx[i]];
}

} // namespace

cudaError_t kept_scatter_launch(const float *src, int ld_src, const float *src_max, int n, int n_cols,
                                const int32_t *slots, float *dst, float *dst_max, cudaStream_t s) {
    if (n < 0 || n_cols < 1 || ld_src < n_cols) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    if (!src || !slots || !dst || !dst_max) return cudaErrorInvalidValue;
    kept_scatter_kernel<<<n, kThreads, 0, s>>>(src, ld_src, src_max, n_cols, slots, dst, dst_max);
    return cudaGetLastError();
}

cudaError_t gather_f32_launch(const float *src, const int32_t *idx, int n, float *dst, cudaStream_t s) {
    if (n < 0) return cudaErrorInvalidValue;
    if (n == 0) return cudaSuccess;
    if (!src || !idx || !dst) return cudaErrorInvalidValue;
    gather_f32_kernel<<<(n + 255) / 256, 256, 0, s>>>(src, idx, n, dst);
    return cudaGetLastError();
}

} // namespace dimoo
