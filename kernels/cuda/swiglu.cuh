// swiglu.cuh - the gated MLP activation in one elementwise pass.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

// gu: bf16 [rows, 2*mlp] (ff_proj outputs, then up_proj outputs, per row);
// out: bf16 [rows, mlp] = silu(gate) * up, computed in fp32.
cudaError_t swiglu_launch(const uint16_t *gu, uint16_t *out, int rows, int mlp, cudaStream_t s);

} // namespace dimoo
