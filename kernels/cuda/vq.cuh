// vq.cuh - the VQ-VAE decoder on a CUDA device (backend.h's VqDevice).
// The host CPU network (csrc/vq) is the reference; the device runs the same
// ops in the same order on the same zero-bordered channels-last fp32
// activations, with fp32 GEMMs (cuBLAS, TF32 off).
#pragma once

#include <memory>

#include "backend.h"
#include "vq/vq.h"

namespace dimoo {

// Copies m's decoder weights and codebook to `device` (checked against its
// free memory first: DEVICE_OUT_OF_MEMORY). m must be finalized.
std::unique_ptr<VqDevice> make_cuda_vq(const vq::Model &m, int device);

} // namespace dimoo
