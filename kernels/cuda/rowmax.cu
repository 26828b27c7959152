// rowmax.cu - one block per row, a max reduction through warp shuffles.
// fmaxf drops NaN like the CPU's `r[j] > m ? r[j] : m` only when m is not
// NaN; logits are finite, so the two agree.
#include "cuda/rowmax.cuh"
#include "cuda/reduce.cuh"

#include <cmath>

namespace dimoo {
namespace {

constexpr int kThreads = 256;

__global__ void rowmax_kernel(const float *__restrict__ x, int cols, int ld, float *__restrict__ out) {
    const float *r = x + size_t(blockIdx.x) * ld;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += kThreads) m = fmaxf(m, r[c]);
    m = block_max_thread0<kThreads>(m);
    if (threadIdx.x == 0) out[blockIdx.x] = m;
}

} // namespace

cudaError_t rowmax_launch(const float *x, int rows, int cols, int ld, float *out, cudaStream_t s) {
    if (rows == 0) return cudaSuccess;
    rowmax_kernel<<<rows, kThreads, 0, s>>>(x, cols, ld, out);
    return cudaGetLastError();
}

} // namespace dimoo
