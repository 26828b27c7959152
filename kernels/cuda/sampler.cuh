// sampler.cuh - the image and text samplers on the device, over logits that
// stay on the device; only the chosen (position, code) pairs come back.
//
// The image sampler makes the CPU sampler's decisions (csrc/cpu/sampler.cpp):
// the same float guidance, float exps and Philox/Gumbel arithmetic
// (csrc/sampler_math.h, shared bit for bit), the draw in double; the softmax
// sum is a double sum in another order (~1e-16 relative), and the
// confidence's exp/log are CUDA's (within an ulp of libm). It draws every
// position in full (no pruning).
//
// The text sampler makes dimoo::cpu::text_pick's decisions (csrc/cpu/kept.cpp,
// dimoo_text_step): the same double guidance, Philox/Gumbel noise and
// first-on-ties draw (also the CPU scan's NaN behaviour), and the softmax sum
// in the CPU's order (column by column, one thread); only exp is CUDA's
// (within an ulp of libm), so the confidences may differ from the CPU's in
// their last bits.
//
// The C ABI's dimoo_image_step / dimoo_text_step / dimoo_cache_select on a
// CUDA context (kernels/cuda/backend.cu) call these over the context's kept
// logits, reading rows through slot arrays; only the decisions come back.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dimoo {

constexpr int kSampleMaxBranches = 4;

// One image sampling step. Device pointers unless marked host.
struct SampleDeviceArgs {
    int32_t n_pos = 0;
    int32_t n_branches = 0;
    int32_t n_codes = 0;
    int32_t step = 0;
    uint64_t seed = 0;
    float temperature = 0;
    float weights[kSampleMaxBranches] = {};
    const float *logits[kSampleMaxBranches] = {};  // rows of n_codes floats
    const int32_t *rows[kSampleMaxBranches] = {};  // [n_pos] row of each position, or null: row i
    const int32_t *rng_pos = nullptr;              // [n_pos] Philox position of each
    int32_t n_select = 0;                          // 0: every position's code and conf
    double *top_logp = nullptr;                    // [n_pos] or null (ML-Cache)
    const uint8_t *top_logp_valid = nullptr;       // [n_pos] or null: rows whose top_logp is current
    int32_t *codes = nullptr;                      // [n_pos] work: every position's code
    double *conf = nullptr;                        // [n_pos] work: every position's confidence
    int32_t *sel = nullptr;                        // [n_select] selected indices, increasing
    int32_t *sel_codes = nullptr;                  // [n_select] their codes
    double *sel_conf = nullptr;                    // [n_select] their confidences
    // Host copies (pinned memory for an asynchronous copy), each optional:
    // n_select > 0: sel, sel_codes, sel_conf; n_select 0: codes and conf of
    // every position (host_sel unused). Valid once the stream gets there.
    int32_t *host_sel = nullptr;
    int32_t *host_codes = nullptr;
    double *host_conf = nullptr;
};

// Enqueues the step on the stream. Returns the first CUDA error, or
// cudaErrorInvalidValue for arguments out of range.
cudaError_t cuda_sample_image(const SampleDeviceArgs &a, cudaStream_t stream);

// One text (understanding) sampling step, as dimoo::cpu::text_pick
// (dimoo_text_step): per position l = u + (cfg + 1)(c - u) in double (l = c
// without guidance), token = argmax over allowed ids of l + tau G(seed,
// step, position, 3, token) (first on ties), confidence softmax(l)[token]
// over every column; the n_select most confident (ties: earlier first).
struct TextSampleDeviceArgs {
    int32_t n_pos = 0;
    int32_t n_cols = 0;      // columns of a logits row
    int32_t col_begin = 0;   // token id of column 0
    int32_t step = 0;
    uint64_t seed = 0;
    double temperature = 0;
    double cfg_scale = 0;    // any finite value; guidance is on when uncond is not null
    const float *cond = nullptr;    // rows of n_cols floats
    const float *uncond = nullptr;  // rows of n_cols floats, or null: no guidance
    const int32_t *cond_rows = nullptr;    // [n_pos] row of cond for position i, or null: row i
    const int32_t *uncond_rows = nullptr;  // [n_pos] the same for uncond
    // Token mask: only ids v < mask_len with mask[v] != 0 may be drawn (null:
    // every id). When no column is allowed, column 0 is taken (as the CPU).
    const uint8_t *mask = nullptr;
    int32_t mask_len = 0;
    const int32_t *positions = nullptr;  // [n_pos] sequence positions (Philox position)
    int32_t n_select = 0;                // 0: every position's token and conf
    int32_t *tokens = nullptr;           // [n_pos] work
    double *conf = nullptr;              // [n_pos] work
    int32_t *sel_pos = nullptr;          // [n_select] chosen sequence positions, increasing
    int32_t *sel_tokens = nullptr;       // [n_select] their tokens
    int32_t *host_sel_pos = nullptr;     // host copies, optional (n_select 0: host_tokens gets
    int32_t *host_tokens = nullptr;      //   every token, host_sel_pos unused)
    int32_t *host_all_tokens = nullptr;  // host copy of every position's token, any n_select
};

cudaError_t cuda_sample_text(const TextSampleDeviceArgs &a, cudaStream_t stream);

// ML-Cache's choice of the rows to recompute (dimoo/sampler_image.go): the
// threshold thr = quantile(row_max, q) by numpy's linear interpolation in
// float32, then to_compute = the p with row_max[p] <= thr, increasing, and
// *n_compute their count. threshold (device, optional) receives thr.
cudaError_t cuda_cache_select(const float *row_max, int32_t n, double q, int32_t *to_compute, int32_t *n_compute,
                              float *threshold, cudaStream_t stream);

}  // namespace dimoo
