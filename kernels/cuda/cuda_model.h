// cuda_model.h - what the CUDA benchmark needs from the CUDA backend beyond
// the Backend interface.
#pragma once

#include <cstdint>

#include "backend.h"

namespace dimoo {

// Fills every weight of a CUDA model with uniform random values on the
// device (matrices in +-sqrt(3/K), so activations keep their scale; norm
// weights near 1) and marks them present; the caller still finalizes
// through the C ABI or Model::finalize. Throws if m is not a CUDA model.
void cuda_fill_random_weights(Model &m, uint64_t seed);

} // namespace dimoo
