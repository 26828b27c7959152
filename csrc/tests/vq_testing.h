// vq_testing.h - what the VQ-VAE GPU tests (test_cuda_vq.cpp) and their host
// emulation (emu/test_vq_emu.cpp) share: configs and comparisons.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "dimoo.h"

namespace dimoo::test {

// A group-norm VQModel config: latent channels, codebook rows and width
// (0: latent), groups, resnets per stage, block_out_channels, mid attention.
inline dimoo_vq_config vq_config(int lat, int E, int D, int groups, int lp, std::vector<int> ch, int attn) {
    dimoo_vq_config c{};
    c.in_channels = 3, c.out_channels = 3, c.latent_channels = lat, c.num_vq_embeddings = E;
    c.vq_embed_dim = D, c.norm_num_groups = groups, c.layers_per_block = lp, c.n_levels = int(ch.size());
    for (size_t i = 0; i < ch.size(); i++) c.block_out_channels[i] = ch[i];
    c.mid_block_add_attention = attn;
    c.norm_type = DIMOO_VQ_NORM_GROUP;
    return c;
}

// ||got - want|| / ||want||.
inline double rel_err(const std::vector<float> &got, const std::vector<float> &want) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); i++) {
        const double d = double(got[i]) - double(want[i]);
        num += d * d;
        den += double(want[i]) * want[i];
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

inline bool all_finite(const std::vector<float> &v) {
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
}

} // namespace dimoo::test
