// rope.cuh - RoPE on Q and K fused with the K/V write: Q goes to its compact
// row, K (after RoPE) and V to the row of their position in the sequence's
// K/V buffer (scratch or ML-Cache), which is the whole "scatter" of USE.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/plan.h"

namespace dimoo {

struct RopeArgs {
    const uint16_t *qkv; // bf16 [rows, d + 2*kv]: q | k | v of each row
    uint16_t *q;         // bf16 [rows, d]
    const float *table;  // fp32 cos [max_tokens][hd/2] then sin, see cuda::rope_table
    int max_tokens;
    const int32_t *pos;  // [rows] positions
    const int32_t *seq;  // [rows] index into seqs
    const cuda::AttnSeq *seqs;
    int layer;
    int rows, d, kv, head_dim;
};

cudaError_t rope_kv_launch(const RopeArgs &a, cudaStream_t s);

} // namespace dimoo
