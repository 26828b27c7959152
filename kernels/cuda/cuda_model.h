// cuda_model.h - what the CUDA benchmark and tests need from the CUDA
// backend beyond the Backend interface.
#pragma once

#include <cstdint>

#include "backend.h"

namespace dimoo {

// Fills every weight of a CUDA model with uniform random values on the
// device (matrices in +-sqrt(3/K), so activations keep their scale; norm
// weights near 1) and marks them present; the caller still finalizes
// through the C ABI or Model::finalize. Throws if m is not a CUDA model.
void cuda_fill_random_weights(Model &m, uint64_t seed);

// A CUDA context's graph cache (the layer stack captured per shape key, see
// backend.cu): whether graphs are on (DIMOO_CUDA_GRAPHS=0 at creation turns
// them off), graphs captured, forwards whose layer stack ran from a graph
// (the one that captured it included), captures that failed (the forward then
// ran without one, and the context stopped capturing), graphs held now.
// Throws if c is not a CUDA context.
struct CudaGraphStats {
    bool enabled = false;
    int64_t captured = 0, replayed = 0, failed = 0, held = 0;
};
CudaGraphStats cuda_graph_stats(const Ctx &c);

// A CUDA context's GEMM tuning (DIMOO_CUDA_GEMM_TUNE=N at creation, see
// gemm.cuh): GEMM shapes whose cuBLASLt candidates were timed, and of those
// the shapes where a candidate other than the heuristic's first won.
struct CudaGemmStats {
    int tuned = 0, changed = 0;
};
CudaGemmStats cuda_gemm_stats(const Ctx &c);

} // namespace dimoo
