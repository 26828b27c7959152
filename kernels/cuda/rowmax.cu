// rowmax.cu - one block per row, a max reduction through warp shuffles.
// fmaxf drops NaN like the CPU's `r[j] > m ? r[j] : m` only when m is not
// NaN; logits are finite, so the two agree.
#include "cuda/rowmax.cuh"

#include <cmath>

namespace dimoo {
namespace {

constexpr int kThreads = 256;

__global__ void rowmax_kernel(const float *__restrict__ x, int cols, int ld, float *__restrict__ out) {
    const float *r = x + size_t(blockIdx.x) * ld;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += kThreads) m = fmaxf(m, r[c]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __shared__ float part[kThreads / 32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float v = part[0];
        for (int w = 1; w < kThreads / 32; w++) v = fmaxf(v, part[w]);
        out[blockIdx.x] = v;
    }
}

} // namespace

cudaError_t rowmax_launch(const float *x, int rows, int cols, int ld, float *out, cudaStream_t s) {
    if (rows == 0) return cudaSuccess;
    rowmax_kernel<<<rows, kThreads, 0, s>>>(x, cols, ld, out);
    return cudaGetLastError();
}

} // namespace dimoo
