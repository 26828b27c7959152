// Fused image-code sampling on the CPU (dimoo_sample_image).
#pragma once

#include <cstdint>

#include "dimoo.h"

namespace dimoo::cpu {

// One sampling step over host logits; arguments already validated.
void sample_image(const dimoo_sample_args &a);

// Tests: use the AVX-512 kernels or the portable ones (not thread-safe with
// sampling in flight). Returns false when asked for AVX-512 without it.
bool set_avx512(bool on);

// Gumbel noise as dimoo_sample_image draws it (tests compare with Go and
// Python): -log(-log(u)), u from word index & 3 of Philox4x32-10 on
// (pos, index >> 2, step, purpose).
double gumbel_noise(uint64_t seed, int32_t step, int32_t pos, int32_t purpose, int32_t index);

}  // namespace dimoo::cpu
