// rmsnorm.cuh - launcher for the RMSNorm kernel (device pointers, a stream).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

// The forward's norm: fp32 residual rows in, bf16 out, fp32 weights. Output
// row i reads input row rows_idx[i] (a device array) or row i when rows_idx
// is null, so the final norm gathers the LM head's rows in the same pass.
cudaError_t rmsnorm_f32_bf16_launch(const float *x, const int32_t *rows_idx, const float *w, uint16_t *out,
                                    int rows, int cols, float eps, cudaStream_t stream);

} // namespace dimoo
