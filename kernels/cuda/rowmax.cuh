// rowmax.cuh - the largest value of each row of an fp32 matrix (ML-Cache's
// max-logit selection reads it instead of the logits).
#pragma once

#include <cuda_runtime.h>

namespace dimoo {

// x: fp32 [rows, cols] with row stride ld; out: fp32 [rows].
cudaError_t rowmax_launch(const float *x, int rows, int cols, int ld, float *out, cudaStream_t s);

} // namespace dimoo
