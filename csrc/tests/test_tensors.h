// test_tensors.h - the checkpoint tensors a config implies (Hugging Face
// names, shapes as stored), for tests that build random models through the
// C ABI.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "dimoo.h"

namespace dimoo::test {

using TensorList = std::vector<std::pair<std::string, std::vector<int64_t>>>;

inline TensorList checkpoint_tensors(const dimoo_model_config &c) {
    const int64_t d = c.d_model, kv = d / c.n_heads * c.n_kv_heads, mlp = c.mlp_hidden_size, e = c.embedding_size;
    TensorList t = {{"model.transformer.wte.weight", {e, d}},
                    {"model.transformer.ln_f.weight", {d}},
                    {"model.transformer.ff_out.weight", {e, d}}};
    for (int l = 0; l < c.n_layers; l++) {
        const std::string p = "model.transformer.blocks." + std::to_string(l) + ".";
        t.push_back({p + "attn_norm.weight", {d}});
        t.push_back({p + "q_proj.weight", {d, d}});
        t.push_back({p + "k_proj.weight", {kv, d}});
        t.push_back({p + "v_proj.weight", {kv, d}});
        t.push_back({p + "attn_out.weight", {d, d}});
        t.push_back({p + "ff_norm.weight", {d}});
        t.push_back({p + "ff_proj.weight", {mlp, d}});
        t.push_back({p + "up_proj.weight", {mlp, d}});
        t.push_back({p + "ff_out.weight", {d, mlp}});
    }
    return t;
}

} // namespace dimoo::test
