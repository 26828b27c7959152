// attention.cuh - non-causal multi-head attention of a batch of sequences:
// each sequence's q_len query rows (compact rows under ML-Cache USE) against
// its kv_len cached keys/values, per-sequence lengths, grouped K/V heads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/plan.h"

namespace dimoo {

struct AttnArgs {
    const uint16_t *q; // bf16 [M, q_stride], head h at columns h*head_dim
    int q_stride;
    uint16_t *o;       // bf16 [M, o_stride]
    int o_stride;
    const cuda::AttnSeq *seqs; // device array of n_seqs
    int n_seqs;
    int max_q;         // largest q_len (sizes the grid)
    int layer;         // K/V of layer `layer` (AttnSeq::layer_stride)
    int n_heads, n_kv_heads, head_dim;
    int kv_stride;     // row stride of K/V in elements (kv_dim)
    float scale;       // softmax scale, 1/sqrt(head_dim)
    // The same n_seqs sequences in host memory: needed by Sm90Tma, whose
    // tensor maps are encoded on the host per launch (others ignore it).
    const cuda::AttnSeq *host_seqs = nullptr;
};

enum class AttnImpl {
    Reference, // one warp per query row, any head_dim <= 256: slow, simple, the device-side check
    Sm80,      // flash attention with mma.sync m16n8k16 (head_dim 32, 64, 128), sm_80 and later
    Sm90,      // flash attention with wgmma (head_dim 128, sm_90a), chosen by DIMOO_CUDA_ATTN=sm90
    Sm90Pipe,  // the same in FA3's order (S_j and P_{j-1} V_{j-1} under the softmax), DIMOO_CUDA_ATTN=sm90p
    Sm90Pipe2, // the same with two warpgroups (128 query rows) sharing each K/V tile (DIMOO_CUDA_ATTN=sm90p2)
    Sm90Wide,  // two warpgroups and 128-key blocks (DIMOO_CUDA_ATTN=sm90w): the default on sm_90
               // once its start-up check passes (see attention_default_impl)
    Sm90Tma,   // warp-specialized: a TMA producer warp and two consumer warpgroups, mbarrier
               // pipeline, 128-key blocks (DIMOO_CUDA_ATTN=sm90t); needs AttnArgs::host_seqs
    Sm90TmaPingPong, // the same, the two consumers taking turns at the tensor cores (DIMOO_CUDA_ATTN=sm90tp)
    Sm90TmaPersistent,         // sm90t on a persistent grid, one CTA per SM looping over tiles (sm90ts)
    Sm90TmaPingPongPersistent, // sm90tp on a persistent grid (sm90tps)
    Sm90TmaWide,               // sm90tps with 176-key blocks, FA3's head-dim-128 configuration (sm90tw)
};

// The kernels whose tensor maps are encoded on the host at each launch
// (they need AttnArgs::host_seqs, and a captured graph holds the addresses).
inline bool attention_uses_tma(AttnImpl i) {
    return i == AttnImpl::Sm90Tma || i == AttnImpl::Sm90TmaPingPong || i == AttnImpl::Sm90TmaPersistent ||
           i == AttnImpl::Sm90TmaPingPongPersistent || i == AttnImpl::Sm90TmaWide;
}

// Which implementation the forward uses: DIMOO_CUDA_ATTN (a name of
// attention_impl_name) in the environment; else, on an sm_90 device at head
// dim 128, Sm90Wide once it has passed a start-up check against the
// reference kernel on the device; else Sm80 where the head dim has a flash
// instantiation.
AttnImpl attention_default_impl(int head_dim);
// "ref", "sm80", ... as DIMOO_CUDA_ATTN spells them.
const char *attention_impl_name(AttnImpl impl);
// The kernel spelled `name` into *out when it runs here at head_dim; false
// (and *out unchanged) otherwise.
bool attention_impl_by_name(const char *name, int head_dim, AttnImpl *out);
bool attention_supported(AttnImpl impl, int head_dim);
cudaError_t attention_launch(const AttnArgs &a, AttnImpl impl, cudaStream_t s);

// attention_sm90.cu: whether the current device runs the sm_90a code, and its launcher.
bool attention_sm90_available();
cudaError_t attention_sm90_launch(const AttnArgs &a, cudaStream_t s, AttnImpl impl);

// Flash kernel tile sizes (for tests and the benchmark's FLOP count).
constexpr int kAttnBlockM = 64, kAttnBlockN = 64;

} // namespace dimoo
