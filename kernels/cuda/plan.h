// plan.h - host-side bookkeeping of one batched CUDA forward, plain C++ so
// the CPU tests check it without a GPU: which rows run through the network
// (all M = sum(R_i) of them as one batch), where each sequence's K/V live,
// which rows go to the LM head, the RoPE table, and the attention tiling.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dimoo.h"

namespace dimoo {
namespace cuda {

// One sequence as the attention and RoPE kernels see it (copied to the
// device as is: keep it POD and 8-byte aligned).
struct AttnSeq {
    int32_t q_begin;      // first row of this sequence in the batch's M rows
    int32_t q_len;        // rows of queries (T, or n_compute under USE)
    int32_t kv_len;       // keys/values (always n_tokens)
    int32_t pad_;
    uint16_t *k;          // bf16 K rows of layer 0 (row stride kv_dim); row = position
    uint16_t *v;
    int64_t layer_stride; // elements between layers (0: one scratch buffer reused)
};

// Query tiles of the flash kernel along the rows of one sequence.
inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
inline int attn_q_tiles(const std::vector<AttnSeq> &s, int block_m) {
    int mx = 0;
    for (const auto &q : s) mx = std::max(mx, q.q_len);
    return ceil_div(mx, block_m);
}

struct BatchPlan {
    int M = 0;                             // rows through the network
    std::vector<int32_t> tok, pos, seq_of; // per row: token id, position, index into seqs
    std::vector<AttnSeq> seqs;             // one per forward argument, in order
    // LM head: per argument, the rows (indices into M) whose logits it wants
    // (for the caller's buffer, the context's kept logits or both), and where
    // they start in the concatenated output rows.
    std::vector<int32_t> out_rows;
    std::vector<int32_t> out_begin, out_count;
    int max_q = 0;
};

// k_scratch/v_scratch: [M_max, kv_dim] buffers used under cache mode NONE
// (row = q_begin + position); k_cache/v_cache: [n_seqs][n_layers][max_tokens]
// rows of kv_dim (null without a cache).
inline BatchPlan make_plan(const dimoo_forward_args *args, int n, int kv_dim, int n_layers, int max_tokens,
                           uint16_t *k_scratch, uint16_t *v_scratch, uint16_t *k_cache, uint16_t *v_cache) {
    BatchPlan p;
    for (int i = 0; i < n; i++) {
        const dimoo_forward_args &a = args[i];
        AttnSeq s{};
        s.q_begin = p.M;
        s.kv_len = a.n_tokens;
        const bool use = a.cache_mode == DIMOO_CACHE_USE;
        s.q_len = use ? a.n_compute : a.n_tokens;
        for (int r = 0; r < s.q_len; r++) {
            const int position = use ? a.compute[r] : r;
            p.tok.push_back(a.tokens[position]);
            p.pos.push_back(position);
            p.seq_of.push_back(i);
        }
        if (a.cache_mode == DIMOO_CACHE_NONE) {
            // Positions 0..T-1 of this sequence sit at its own rows of the scratch.
            s.k = k_scratch + int64_t(s.q_begin) * kv_dim;
            s.v = v_scratch + int64_t(s.q_begin) * kv_dim;
            s.layer_stride = 0;
        } else {
            const int64_t per_seq = int64_t(n_layers) * max_tokens * kv_dim;
            s.k = k_cache + a.seq * per_seq;
            s.v = v_cache + a.seq * per_seq;
            s.layer_stride = int64_t(max_tokens) * kv_dim;
        }
        p.out_begin.push_back(int32_t(p.out_rows.size()));
        if (a.logits || a.keep) {
            if (a.out_positions) {
                for (int o = 0; o < a.n_out; o++) {
                    int r = a.out_positions[o];
                    if (use) r = int(std::lower_bound(a.compute, a.compute + a.n_compute, r) - a.compute);
                    p.out_rows.push_back(s.q_begin + r);
                }
            } else {
                for (int r = 0; r < s.q_len; r++) p.out_rows.push_back(s.q_begin + r);
            }
        }
        p.out_count.push_back(int32_t(p.out_rows.size()) - p.out_begin.back());
        p.max_q = std::max(p.max_q, s.q_len);
        p.M += s.q_len;
        p.seqs.push_back(s);
    }
    return p;
}

// RoPE table as the CPU backend computes it (fp32 throughout, std::pow and
// std::cos/sin): inv_freq_i = 1 / theta^(2i/hd), angle = float(pos) * inv_freq_i.
// Layout [max_tokens][hd/2] for cos, then the same for sin.
inline std::vector<float> rope_table(int max_tokens, int head_dim, float theta) {
    const int half = head_dim / 2;
    std::vector<float> t(size_t(2) * max_tokens * half);
    std::vector<float> inv(half);
    for (int i = 0; i < half; i++) inv[i] = 1.0f / std::pow(theta, float(2 * i) / float(head_dim));
    float *c = t.data(), *s = t.data() + size_t(max_tokens) * half;
    for (int p = 0; p < max_tokens; p++)
        for (int i = 0; i < half; i++) {
            const float a = float(p) * inv[i];
            c[size_t(p) * half + i] = std::cos(a);
            s[size_t(p) * half + i] = std::sin(a);
        }
    return t;
}

} // namespace cuda
} // namespace dimoo
