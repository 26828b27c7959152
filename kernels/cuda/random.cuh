// random.cuh - device-side random fills (benchmark weights of the real shape
// are generated on the GPU: 16 GB would not travel to the device machine).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

// Uniform in [lo, hi), a counter hash of (seed, index): the same on every run.
cudaError_t fill_uniform_bf16_launch(uint16_t *p, size_t n, uint64_t seed, float lo, float hi, cudaStream_t s);
cudaError_t fill_uniform_f32_launch(float *p, size_t n, uint64_t seed, float lo, float hi, cudaStream_t s);

} // namespace dimoo
