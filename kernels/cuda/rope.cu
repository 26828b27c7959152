// rope.cu - "rotate half" RoPE in fp32 on bf16 inputs: pairs (i, i + hd/2)
// of each head turn by the table's angle for the row's position. One block
// per row; Q rows stay in batch order, K/V rows land at their position.
#include <cuda_bf16.h>

#include "cuda/rope.cuh"

namespace dimoo {
namespace {

__global__ void rope_kv_kernel(RopeArgs a) {
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
    // Pairs of Q then pairs of K: (head, i) -> elements head*hd + i and + half.
    const int q_pairs = a.d / 2, k_pairs = a.kv / 2;
    for (int t = threadIdx.x; t < q_pairs + k_pairs; t += blockDim.x) {
        const bool is_q = t < q_pairs;
        const int u = is_q ? t : t - q_pairs;
        const int h = u / half, i = u % half, e = h * a.head_dim + i;
        const __nv_bfloat16 *in = is_q ? src : src + a.d;
        const float x0 = __bfloat162float(in[e]), x1 = __bfloat162float(in[e + half]);
        const float c = cs[i], s = sn[i];
        __nv_bfloat16 *out = is_q ? q : k;
        out[e] = __float2bfloat16_rn(x0 * c - x1 * s);
        out[e + half] = __float2bfloat16_rn(x1 * c + x0 * s);
    }
    const __nv_bfloat16 *vin = src + a.d + a.kv;
    for (int t = threadIdx.x; t < a.kv; t += blockDim.x) v[t] = vin[t];
}

} // namespace

cudaError_t rope_kv_launch(const RopeArgs &a, cudaStream_t s) {
    if (a.rows == 0) return cudaSuccess;
    if (a.head_dim % 2 || a.d % a.head_dim || a.kv % a.head_dim) return cudaErrorInvalidValue;
    rope_kv_kernel<<<a.rows, 256, 0, s>>>(a);
    return cudaGetLastError();
}

} // namespace dimoo
