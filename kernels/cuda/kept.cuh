// kept.cuh - context-resident ("kept") logits on the device (ABI 4): rows
// scattered into their slots with their maxima, and the maxima gathered back
// through the slots (ML-Cache's selection reads them). A seq's slot storage
// holds its rows at a stride of their column count, as the CPU backend's
// (csrc/cpu/kept.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

// Row i of src (n rows of n_cols floats, row stride ld_src) goes to
// dst + slots[i] * n_cols, and its maximum to dst_max[slots[i]]: src_max[i]
// when src_max is not null, else computed here (fmaxf over the row, as
// rowmax.cu). slots: device [n], distinct.
cudaError_t kept_scatter_launch(const float *src, int ld_src, const float *src_max, int n, int n_cols,
                                const int32_t *slots, float *dst, float *dst_max, cudaStream_t s);

// dst[i] = src[idx[i]] for i < n (device pointers).
cudaError_t gather_f32_launch(const float *src, const int32_t *idx, int n, float *dst, cudaStream_t s);

} // namespace dimoo
