// random.cu - splitmix64 of (seed, index) to a uniform float; grid-stride.
#include <cuda_bf16.h>

#include "cuda/random.cuh"

namespace dimoo {
namespace {

__device__ __forceinline__ float uniform01(uint64_t seed, size_t i) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull * (uint64_t(i) + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return float(z >> 40) * (1.0f / 16777216.0f);
}

template <class T> __global__ void fill_kernel(T *p, size_t n, uint64_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float v = lo + (hi - lo) * uniform01(seed, i);
        if constexpr (sizeof(T) == 2) p[i] = __float2bfloat16_rn(v);
        else p[i] = v;
    }
}

template <class T> cudaError_t fill(T *p, size_t n, uint64_t seed, float lo, float hi, cudaStream_t s) {
    if (n == 0) return cudaSuccess;
    const size_t blocks = std::min<size_t>((n + 255) / 256, 65536);
    fill_kernel<T><<<unsigned(blocks), 256, 0, s>>>(p, n, seed, lo, hi);
    return cudaGetLastError();
}

} // namespace

cudaError_t fill_uniform_bf16_launch(uint16_t *p, size_t n, uint64_t seed, float lo, float hi, cudaStream_t s) {
    return fill(reinterpret_cast<__nv_bfloat16 *>(p), n, seed, lo, hi, s);
}
cudaError_t fill_uniform_f32_launch(float *p, size_t n, uint64_t seed, float lo, float hi, cudaStream_t s) {
    return fill(p, n, seed, lo, hi, s);
}

} // namespace dimoo
