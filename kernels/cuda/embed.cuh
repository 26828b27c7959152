// embed.cuh - embedding gather: x[r] = float(wte[tok[r]]).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

// wte: bf16 [embedding_size, d]; tok: device [rows]; x: fp32 [rows, d].
cudaError_t embed_launch(const uint16_t *wte, const int32_t *tok, float *x, int rows, int d, cudaStream_t s);

} // namespace dimoo
