// reduce.cuh - block reductions shared by kernels that must agree bit for
// bit (the row maxima of rowmax.cu and of the kept-logit scatter).
#pragma once

#include <cuda_runtime.h>

namespace dimoo {

// The maximum of m over a block of `Threads` threads (a multiple of 32), in
// thread 0 only: a warp shuffle tree, then the warps' maxima in order.
template <int Threads> __device__ __forceinline__ float block_max_thread0(float m) {
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __shared__ float part[Threads / 32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = m;
    __syncthreads();
    float v = part[0];
    if (threadIdx.x == 0)
        for (int w = 1; w < Threads / 32; w++) v = fmaxf(v, part[w]);
    return v;
}

} // namespace dimoo
