// rmsnorm.cuh - launcher for the RMSNorm kernel (device pointers, a stream).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

// x, w, out: device pointers of `dtype` (dimoo_dtype). Returns the launch error.
cudaError_t rmsnorm_launch(int32_t dtype, const void *x, const void *w, void *out, int rows, int cols, float eps,
                           cudaStream_t stream);

} // namespace dimoo
