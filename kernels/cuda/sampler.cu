// sampler.cu - the image and text samplers and ML-Cache's row choice on the
// device (see sampler.cuh). Compiled with -fmad=false: every float and
// double operation here rounds on its own, as on the CPU.
//
// Image: one CTA of 256 threads per masked position holds the guided row in
// shared memory (n_codes floats), reduces its max and first index, the
// double sum of float exps, and the Gumbel-max draw in double over every
// code (one Philox block per four codes). Selection: one CTA, a radix select
// of the n_select-th largest (conf, index) key and an ordered compaction.
//
// Text: one CTA per position reads its cond (and uncond) row through the
// row arrays, reduces the max, the first allowed column and the draw, then
// adds the softmax sum in column order (one thread, chunks of exps computed
// by the block), as dimoo::cpu::text_pick does.
#include <cub/block/block_scan.cuh>

#include <cfloat>
#include <cmath>

#include "cuda/sampler.cuh"
#include "sampler_math.h"

namespace dimoo {
namespace {

constexpr int kRowThreads = 256;     // image: per position
constexpr int kTextThreads = 256;    // text: per position
constexpr int kSelectThreads = 1024; // selection, quantile: one CTA

// ---- block reductions (fixed trees: the same bits on every run) ------------

struct ArgMax {
    double v;
    int32_t i;
};

// a beats b: larger value, ties to the smaller index (a first-index argmax).
__device__ __forceinline__ bool beats(const ArgMax &a, const ArgMax &b) {
    return a.v > b.v || (a.v == b.v && a.i < b.i);
}

template <int T, class V, class Op> __device__ V block_reduce(V v, Op op, V *smem) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();  // smem may still be read from a previous reduction
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = smem[0];
    for (int w = 1; w < T / 32; w++) v = op(v, smem[w]);
    return v;
}

template <int T> __device__ ArgMax block_argmax(ArgMax a, ArgMax *smem) {
    for (int o = 16; o > 0; o >>= 1) {
        ArgMax b{__shfl_xor_sync(0xffffffffu, a.v, o), __shfl_xor_sync(0xffffffffu, a.i, o)};
        if (beats(b, a)) a = b;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) smem[warp] = a;
    __syncthreads();
    a = smem[0];
    for (int w = 1; w < T / 32; w++)
        if (beats(smem[w], a)) a = smem[w];
    return a;
}

struct MaxF {
    __device__ float operator()(float a, float b) const { return b > a ? b : a; }
};
struct MinI {
    __device__ int32_t operator()(int32_t a, int32_t b) const { return b < a ? b : a; }
};
struct SumD {
    __device__ double operator()(double a, double b) const { return sm::dadd(a, b); }
};

// ---- image rows ---------------------------------------------------------------

struct RowArgs {
    SampleDeviceArgs a;
    double tau;
};

__global__ void __launch_bounds__(kRowThreads) image_rows_kernel(const RowArgs ra) {
    extern __shared__ float g[];  // the guided row
    __shared__ float redf[kRowThreads / 32];
    __shared__ int32_t redi[kRowThreads / 32];
    __shared__ double redd[kRowThreads / 32];
    __shared__ ArgMax reda[kRowThreads / 32];
    const SampleDeviceArgs &a = ra.a;
    const int32_t i = blockIdx.x, C = a.n_codes, tid = threadIdx.x;
    // Guidance in float, in branch order (w0 l0 first, as the CPU).
    float mx = -INFINITY;
    const float *src[kSampleMaxBranches];  // unrolled, so they stay in registers
#pragma unroll
    for (int b = 0; b < kSampleMaxBranches; b++)
        src[b] = b < a.n_branches ? a.logits[b] + int64_t(a.rows[b] ? a.rows[b][i] : i) * C : nullptr;
    for (int32_t c = tid; c < C; c += kRowThreads) {
        float v = sm::fmul(a.weights[0], src[0][c]);
#pragma unroll
        for (int b = 1; b < kSampleMaxBranches; b++)
            if (b < a.n_branches) v = sm::fadd(v, sm::fmul(a.weights[b], src[b][c]));
        g[c] = v;
        mx = v > mx ? v : mx;
    }
    mx = block_reduce<kRowThreads>(mx, MaxF{}, redf);
    int32_t top = C;
    for (int32_t c = tid; c < C && top == C; c += kRowThreads)
        if (g[c] == mx) top = c;
    top = block_reduce<kRowThreads>(top, MinI{}, redi);
    if (top == C) top = 0;  // no element equals the max (NaN rows): the CPU's scan stops at 0 too
    double sum = 0;
    for (int32_t c = tid; c < C; c += kRowThreads)
        sum = sm::dadd(sum, double(sm::exp_clamped(sm::fmul(sm::fsub(g[c], mx), 1.0f))));
    sum = block_reduce<kRowThreads>(sum, SumD{}, redd);
    int32_t best = top;
    const int32_t pos = a.rng_pos[i];
    if (ra.tau > 0) {
        // Gumbel-max over every code: one Philox block serves four codes.
        ArgMax am{-INFINITY, C};
        for (int32_t j = tid; 4 * j < C; j += kRowThreads) {
            uint32_t w[4];
            sm::philox_block(w, a.seed, a.step, pos, sm::kPurposeSample, j);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                if (4 * j + k >= C) break;
                const ArgMax s{sm::draw_score(g[4 * j + k], ra.tau, w[k]), 4 * j + k};
                if (beats(s, am)) am = s;
            }
        }
        am = block_argmax<kRowThreads>(am, reda);
        if (am.i < C) best = am.i;
    }
    if (tid != 0) return;
    const double dmx = double(mx);
    auto log_prob = [&](int32_t code) {
        return log(fmax(sm::ddiv(exp(sm::dsub(double(g[code]), dmx)), sum), 1e-20));
    };
    if (a.top_logp && !(a.top_logp_valid && a.top_logp_valid[i])) a.top_logp[i] = log_prob(top);
    double cf = log_prob(best);
    if (ra.tau > 0) {
        uint32_t w[4];
        sm::philox_block(w, a.seed, a.step, pos, sm::kPurposeRemask, 0);
        cf = sm::dadd(cf, sm::dmul(ra.tau, sm::gumbel_of(w[0])));
    }
    a.codes[i] = best;
    a.conf[i] = cf;
}

// ---- text rows ----------------------------------------------------------------

constexpr int kTextChunk = 1024; // exps summed in column order by one thread, a chunk at a time

__device__ __forceinline__ double text_logit(const TextSampleDeviceArgs &a, const float *c, const float *u, int32_t j) {
    if (!u) return double(c[j]);
    const double uj = double(u[j]);
    return sm::dadd(uj, sm::dmul(sm::dadd(a.cfg_scale, 1.0), sm::dsub(double(c[j]), uj)));
}

__device__ __forceinline__ bool text_allowed(const TextSampleDeviceArgs &a, int32_t id) {
    return !a.mask || (id < a.mask_len && a.mask[id]);
}

// The draw score of column j (token id v0 + j), as text_pick computes it.
__device__ __forceinline__ double text_score(const TextSampleDeviceArgs &a, double l, int32_t id, int32_t pos) {
    if (!(a.temperature > 0)) return l;
    return sm::dadd(l, sm::dmul(a.temperature, sm::gumbel_at(a.seed, a.step, pos, sm::kPurposeTextSample, id)));
}

__global__ void __launch_bounds__(kTextThreads, 1) text_rows_kernel(const TextSampleDeviceArgs a) {
    __shared__ double e[kTextChunk];
    __shared__ ArgMax reda[kTextThreads / 32];
    __shared__ int32_t redi[kTextThreads / 32];
    const int32_t i = blockIdx.x, tid = threadIdx.x, n = a.n_cols, v0 = a.col_begin;
    const float *c = a.cond + int64_t(a.cond_rows ? a.cond_rows[i] : i) * n;
    const float *u = a.uncond ? a.uncond + int64_t(a.uncond_rows ? a.uncond_rows[i] : i) * n : nullptr;
    const int32_t pos = a.positions[i];
    // Pass 1: the max over every column, and over the allowed ones the
    // first index and the draw. Thread groups of four columns follow the
    // Philox blocks of the token ids (id >> 2).
    ArgMax best{-INFINITY, n}, top{-INFINITY, n};
    int32_t first = n;
    const int32_t g0 = v0 >> 2, g1 = (v0 + n - 1) >> 2;
    for (int32_t gi = g0 + tid; gi <= g1; gi += kTextThreads) {
        uint32_t w[4] = {0, 0, 0, 0};
        if (a.temperature > 0) sm::philox_block(w, a.seed, a.step, pos, sm::kPurposeTextSample, gi);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int32_t j = 4 * gi + k - v0;
            if (j < 0 || j >= n) continue;
            const double l = text_logit(a, c, u, j);
            const ArgMax t{l, j};
            if (beats(t, top)) top = t;
            if (!text_allowed(a, v0 + j)) continue;
            if (first == n) first = j;  // j increases along a thread's loop
            const ArgMax s{a.temperature > 0 ? sm::dadd(l, sm::dmul(a.temperature, sm::gumbel_of(w[k]))) : l, j};
            if (beats(s, best)) best = s;
        }
    }
    top = block_argmax<kTextThreads>(top, reda);
    best = block_argmax<kTextThreads>(best, reda);
    first = block_reduce<kTextThreads>(first, MinI{}, redi);
    // NaN never beats anything, so mx is the largest non-NaN logit (-inf if
    // none), as the CPU's std::max scan.
    const double mx = top.v;
    // Pass 2: the softmax sum in column order, as the CPU adds it: the block
    // computes a chunk of exps, thread 0 adds them one by one (the rows stay
    // in L2 from pass 1).
    double sum = 0;
    for (int32_t c0 = 0; c0 < n; c0 += kTextChunk) {
        const int32_t m = n - c0 < kTextChunk ? n - c0 : kTextChunk;
        for (int32_t k = tid; k < m; k += kTextThreads) e[k] = exp(sm::dsub(text_logit(a, c, u, c0 + k), mx));
        __syncthreads();
        if (tid == 0)
            for (int32_t k = 0; k < m; k++) sum = sm::dadd(sum, e[k]);
        __syncthreads();
    }
    if (tid != 0) return;
    // The CPU scans the allowed columns keeping the first one and then only
    // strictly larger scores: its pick is the first allowed column when that
    // one's score is NaN, else the first of the largest non-NaN scores.
    int32_t j = 0;  // nothing allowed in the range: column 0, as the CPU
    if (first < n) j = isnan(text_score(a, text_logit(a, c, u, first), v0 + first, pos)) ? first : best.i;
    a.tokens[i] = v0 + j;
    a.conf[i] = sm::ddiv(exp(sm::dsub(text_logit(a, c, u, j), mx)), sum);
}

// ---- selection ----------------------------------------------------------------

using sm::key_float;
using sm::order_key;

struct Select {
    uint64_t key;    // the k-th largest key
    int32_t take;    // how many of the keys equal to it are among the k
    int32_t equal;   // how many keys equal it
};

// The k-th largest (1 <= k <= n) of key(0..n-1): a radix select, eight bits
// a pass from the top, in one CTA of T threads.
template <int T, class Key> __device__ Select radix_select(Key key, int32_t n, int32_t k) {
    __shared__ uint32_t hist[256];
    __shared__ uint64_t s_prefix;
    __shared__ int32_t s_rem, s_equal;
    uint64_t prefix = 0, mask = 0;
    int32_t rem = k;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += T) hist[b] = 0;
        __syncthreads();
        for (int32_t i = threadIdx.x; i < n; i += T) {
            const uint64_t u = key(i);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const int d = sm::radix_pick(hist, rem);
            s_prefix = prefix | (uint64_t(d) << shift);
            s_rem = rem;
            s_equal = hist[d];
        }
        __syncthreads();
        prefix = s_prefix, rem = s_rem;
        mask |= 0xffull << shift;
        __syncthreads();
    }
    return Select{prefix, rem, s_equal};
}

// Calls emit(i, slot) for the k largest keys (ties: the higher indices when
// high_first, else the lower), slot counting them in increasing i.
template <int T, class Key, class Emit>
__device__ void select_largest(Key key, int32_t n, int32_t k, bool high_first, Emit emit) {
    using Scan = cub::BlockScan<int32_t, T>;
    __shared__ typename Scan::TempStorage tmp;
    const Select s = radix_select<T>(key, n, k);
    int32_t eq_base = 0, out_base = 0;
    for (int32_t i0 = 0; i0 < n; i0 += T) {
        const int32_t i = i0 + threadIdx.x;
        const uint64_t u = i < n ? key(i) : 0;
        const int32_t eq = i < n && u == s.key;
        int32_t eo, eq_total;
        Scan(tmp).ExclusiveSum(eq, eo, eq_total);
        __syncthreads();
        eo += eq_base;
        const bool take = eq && sm::take_equal(eo, s.equal, s.take, high_first);
        const int32_t sel = i < n && (u > s.key || take);
        int32_t so, sel_total;
        Scan(tmp).ExclusiveSum(sel, so, sel_total);
        __syncthreads();
        if (sel) emit(i, out_base + so);
        eq_base += eq_total, out_base += sel_total;
    }
}

__global__ void __launch_bounds__(kSelectThreads) image_select_kernel(const SampleDeviceArgs a) {
    const double *conf = a.conf;
    select_largest<kSelectThreads>([&](int32_t i) { return order_key(conf[i]); }, a.n_pos, a.n_select, true,
                                   [&](int32_t i, int32_t slot) {
                                       a.sel[slot] = i;
                                       a.sel_codes[slot] = a.codes[i];
                                       a.sel_conf[slot] = conf[i];
                                   });
}

__global__ void __launch_bounds__(kSelectThreads) text_select_kernel(const TextSampleDeviceArgs a) {
    const double *conf = a.conf;
    // Go sorts by confidence, stable, descending: ties go to the earlier.
    select_largest<kSelectThreads>([&](int32_t i) { return order_key(conf[i]); }, a.n_pos, a.n_select, false,
                                   [&](int32_t i, int32_t slot) {
                                       a.sel_pos[slot] = a.positions[i];
                                       a.sel_tokens[slot] = a.tokens[i];
                                   });
}

// ---- ML-Cache -----------------------------------------------------------------

__global__ void __launch_bounds__(kSelectThreads)
    cache_select_kernel(const float *row_max, int32_t n, float qf, int32_t *to_compute, int32_t *n_compute,
                        float *threshold) {
    using Scan = cub::BlockScan<int32_t, kSelectThreads>;
    __shared__ typename Scan::TempStorage tmp;
    // quantileInto: rank = q (n - 1) in float32; the lo-th and hi-th smallest.
    const float rank = sm::fmul(qf, float(n - 1));
    const int32_t lo = int32_t(rank), hi = lo + 1 < n ? lo + 1 : n - 1;
    auto key = [&](int32_t i) { return order_key(row_max[i]); };
    const float a = key_float(radix_select<kSelectThreads>(key, n, n - lo).key);
    const float b = hi > lo ? key_float(radix_select<kSelectThreads>(key, n, n - hi).key) : a;
    const float w = sm::fsub(rank, float(lo));
    const float thr = w < 0.5f ? sm::fadd(a, sm::fmul(w, sm::fsub(b, a)))
                               : sm::fsub(b, sm::fmul(sm::fsub(b, a), sm::fsub(1.0f, w)));
    int32_t base = 0;
    for (int32_t i0 = 0; i0 < n; i0 += kSelectThreads) {
        const int32_t i = i0 + threadIdx.x;
        const int32_t in = i < n && row_max[i] <= thr;
        int32_t off, total;
        Scan(tmp).ExclusiveSum(in, off, total);
        __syncthreads();
        if (in) to_compute[base + off] = i;
        base += total;
    }
    if (threadIdx.x == 0) {
        *n_compute = base;
        if (threshold) *threshold = thr;
    }
}

}  // namespace

cudaError_t cuda_sample_image(const SampleDeviceArgs &a, cudaStream_t stream) {
    if (a.n_pos < 0 || a.n_branches < 1 || a.n_branches > kSampleMaxBranches || a.n_codes < 1 ||
        a.n_select < 0 || a.n_select > a.n_pos || !(a.temperature >= 0) || !a.rng_pos || !a.codes || !a.conf ||
        (a.n_select > 0 && (!a.sel || !a.sel_codes || !a.sel_conf)) || (a.top_logp_valid && !a.top_logp))
        return cudaErrorInvalidValue;
    for (int b = 0; b < a.n_branches; b++)
        if (!a.logits[b]) return cudaErrorInvalidValue;
    if (a.n_pos == 0) return cudaSuccess;
    const size_t smem = size_t(a.n_codes) * sizeof(float);
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(image_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
        if (e != cudaSuccess) return e;
    }
    image_rows_kernel<<<a.n_pos, kRowThreads, smem, stream>>>(RowArgs{a, double(a.temperature)});
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (a.n_select > 0) {
        image_select_kernel<<<1, kSelectThreads, 0, stream>>>(a);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
        const size_t m = size_t(a.n_select);
        if (a.host_sel && (e = cudaMemcpyAsync(a.host_sel, a.sel, m * 4, cudaMemcpyDeviceToHost, stream))) return e;
        if (a.host_codes && (e = cudaMemcpyAsync(a.host_codes, a.sel_codes, m * 4, cudaMemcpyDeviceToHost, stream)))
            return e;
        if (a.host_conf && (e = cudaMemcpyAsync(a.host_conf, a.sel_conf, m * 8, cudaMemcpyDeviceToHost, stream)))
            return e;
    } else {
        const size_t n = size_t(a.n_pos);
        if (a.host_codes && (e = cudaMemcpyAsync(a.host_codes, a.codes, n * 4, cudaMemcpyDeviceToHost, stream)))
            return e;
        if (a.host_conf && (e = cudaMemcpyAsync(a.host_conf, a.conf, n * 8, cudaMemcpyDeviceToHost, stream))) return e;
    }
    return cudaSuccess;
}

cudaError_t cuda_sample_text(const TextSampleDeviceArgs &a, cudaStream_t stream) {
    if (a.n_pos < 0 || a.n_cols < 1 || a.col_begin < 0 || a.n_select < 0 || a.n_select > a.n_pos ||
        !(a.temperature >= 0) || !std::isfinite(a.temperature) || !std::isfinite(a.cfg_scale) || !a.cond || !a.positions ||
        !a.tokens || !a.conf || (a.n_select > 0 && (!a.sel_pos || !a.sel_tokens)) || (a.mask && a.mask_len < 1))
        return cudaErrorInvalidValue;
    if (a.n_pos == 0) return cudaSuccess;
    text_rows_kernel<<<a.n_pos, kTextThreads, 0, stream>>>(a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (a.n_select > 0) {
        text_select_kernel<<<1, kSelectThreads, 0, stream>>>(a);
        if ((e = cudaGetLastError()) != cudaSuccess) return e;
        const size_t m = size_t(a.n_select);
        if (a.host_sel_pos && (e = cudaMemcpyAsync(a.host_sel_pos, a.sel_pos, m * 4, cudaMemcpyDeviceToHost, stream)))
            return e;
        if (a.host_tokens && (e = cudaMemcpyAsync(a.host_tokens, a.sel_tokens, m * 4, cudaMemcpyDeviceToHost, stream)))
            return e;
    } else if (a.host_tokens) {
        if ((e = cudaMemcpyAsync(a.host_tokens, a.tokens, size_t(a.n_pos) * 4, cudaMemcpyDeviceToHost, stream)))
            return e;
    }
    if (a.host_all_tokens)
        e = cudaMemcpyAsync(a.host_all_tokens, a.tokens, size_t(a.n_pos) * 4, cudaMemcpyDeviceToHost, stream);
    return e;
}

cudaError_t cuda_cache_select(const float *row_max, int32_t n, double q, int32_t *to_compute, int32_t *n_compute,
                              float *threshold, cudaStream_t stream) {
    if (n < 1 || !row_max || !to_compute || !n_compute || !(q >= 0 && q <= 1)) return cudaErrorInvalidValue;
    cache_select_kernel<<<1, kSelectThreads, 0, stream>>>(row_max, n, float(q), to_compute, n_compute, threshold);
    return cudaGetLastError();
}

}  // namespace dimoo
