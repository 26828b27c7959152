// rope.cu - "rotate half" RoPE in fp32 on bf16 inputs: pairs (i, i + hd/2)
// of each head turn by the table's angle for the row's position. One block
// per row; Q rows stay in batch order, K/V rows land at their position.
// Where alignment allows (the model's shapes always), each thread turns two
// neighbouring pairs per step and copies V 16 bytes at a time.
#include <cuda_bf16.h>

#include "cuda/cuda_common.cuh"
#include "cuda/rope.cuh"

namespace dimoo {
namespace {


// Rotates the pairs (e, e + half) for i = e % head_dim in [i0, i0 + N) of
// one head: N = 1 a value at a time, N = 2 two neighbours per 4-byte load.
template <int N>
__device__ __forceinline__ void rotate(const __nv_bfloat16 *in, __nv_bfloat16 *out, int e, int half, const float *cs,
                                       const float *sn, int i) {
    if constexpr (N == 1) {
        const float x0 = __bfloat162float(in[e]), x1 = __bfloat162float(in[e + half]);
        const float c = cs[i], s = sn[i];
        out[e] = __float2bfloat16_rn(x0 * c - x1 * s);
        out[e + half] = __float2bfloat16_rn(x1 * c + x0 * s);
    } else {
        const float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(in + e));
        const float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(in + e + half));
        const float2 c = *reinterpret_cast<const float2 *>(cs + i), s = *reinterpret_cast<const float2 *>(sn + i);
        *reinterpret_cast<__nv_bfloat162 *>(out + e) =
            __floats2bfloat162_rn(x0.x * c.x - x1.x * s.x, x0.y * c.y - x1.y * s.y);
        *reinterpret_cast<__nv_bfloat162 *>(out + e + half) =
            __floats2bfloat162_rn(x1.x * c.x + x0.x * s.x, x1.y * c.y + x0.y * s.y);
    }
}

// N: pairs per thread step (2 where every row and the table allow 4-byte
// bf16 pairs and 8-byte float pairs; the launcher checks what it can see,
// the block the cache row). Each element is computed the same way either way.
template <int N> __global__ void rope_kv_kernel(RopeArgs a) {
    const int r = blockIdx.x, half = a.head_dim / 2, width = a.d + 2 * a.kv;
    const int p = a.pos[r];
    const cuda::AttnSeq sq = a.seqs[a.seq[r]];
    const float *cs = a.table + size_t(p) * half;
    const float *sn = a.table + size_t(a.max_tokens) * half + size_t(p) * half;
    const __nv_bfloat16 *src = reinterpret_cast<const __nv_bfloat16 *>(a.qkv) + size_t(r) * width;
    __nv_bfloat16 *q = reinterpret_cast<__nv_bfloat16 *>(a.q) + size_t(r) * a.d;
    const size_t kv_row = size_t(a.layer) * sq.layer_stride + size_t(p) * a.kv;
    __nv_bfloat16 *k = reinterpret_cast<__nv_bfloat16 *>(sq.k) + kv_row;
    __nv_bfloat16 *v = reinterpret_cast<__nv_bfloat16 *>(sq.v) + kv_row;
    const __nv_bfloat16 *vin = src + a.d + a.kv;
    // Pairs of Q then pairs of K: (head, i) -> elements head*hd + i and + half.
    const int q_pairs = a.d / 2, k_pairs = a.kv / 2;
    if (N == 2 && is_aligned(k, 4)) {
        for (int t = 2 * threadIdx.x; t < q_pairs + k_pairs; t += 2 * blockDim.x) {
            const bool is_q = t < q_pairs;
            const int u = is_q ? t : t - q_pairs;
            const int h = u / half, i = u % half;
            rotate<2>(is_q ? src : src + a.d, is_q ? q : k, h * a.head_dim + i, half, cs, sn, i);
        }
    } else {
        for (int t = threadIdx.x; t < q_pairs + k_pairs; t += blockDim.x) {
            const bool is_q = t < q_pairs;
            const int u = is_q ? t : t - q_pairs;
            const int h = u / half, i = u % half;
            rotate<1>(is_q ? src : src + a.d, is_q ? q : k, h * a.head_dim + i, half, cs, sn, i);
        }
    }
    // V: 16 bytes a copy where both rows allow it.
    if (a.kv % 8 == 0 && is_aligned(vin, 16) && is_aligned(v, 16)) {
        const uint4 *vi = reinterpret_cast<const uint4 *>(vin);
        uint4 *vo = reinterpret_cast<uint4 *>(v);
        for (int t = threadIdx.x; t < a.kv / 8; t += blockDim.x) vo[t] = vi[t];
    } else {
        for (int t = threadIdx.x; t < a.kv; t += blockDim.x) v[t] = vin[t];
    }
}

} // namespace

cudaError_t rope_kv_launch(const RopeArgs &a, cudaStream_t s) {
    if (a.rows == 0) return cudaSuccess;
    if (a.head_dim % 2 || a.d % a.head_dim || a.kv % a.head_dim) return cudaErrorInvalidValue;
    // Pairs of pairs need an even half head (so rows, heads and the table's
    // rows split into aligned pairs) and aligned buffers.
    const bool pairs = a.head_dim % 4 == 0 && is_aligned(a.qkv, 4) && is_aligned(a.q, 4) &&
                       is_aligned(a.table, 8);
    if (pairs) rope_kv_kernel<2><<<a.rows, 256, 0, s>>>(a);
    else rope_kv_kernel<1><<<a.rows, 256, 0, s>>>(a);
    return cudaGetLastError();
}

} // namespace dimoo
