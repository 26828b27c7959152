// attention.cu - non-causal attention, two implementations behind one
// launcher:
//  * flash_sm80: FlashAttention-2 style forward. A CTA of 4 warps owns 64
//    query rows of one (sequence, head); each warp owns 16 rows. K/V tiles of
//    64 rows stream through shared memory with cp.async, double-buffered; Q K^T
//    and P V run on mma.sync m16n8k16 (bf16 in, fp32 accumulate) with operands
//    from ldmatrix; the softmax is online (running max and sum per row, exp2
//    with the scale folded in). Tails: out-of-range Q/K/V rows are zero-filled
//    by cp.async, scores of keys >= kv_len are set to -inf, rows >= q_len are
//    not written. Shared rows are padded by 16 bytes so ldmatrix's 8 row
//    addresses fall in distinct banks.
//  * reference: one warp per query row, online softmax over the keys one at
//    a time. Slow and plain: the on-device check of the flash kernel, and the
//    path for head dims the flash kernel is not instantiated for.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cuda/attention.cuh"
#include "cuda/ptx_sm80.cuh"
#include "cuda/random.cuh"

namespace dimoo {
namespace {

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); // .x (low half) = lo
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// ---- flash attention, sm_80 instruction set -------------------------------

constexpr int kBM = kAttnBlockM, kBN = kAttnBlockN, kWarps = 4, kThreads = kWarps * 32;

template <int HD> struct FlashSmem {
    static constexpr int LD = HD + 8; // padded row, in elements (16 bytes of padding)
    static constexpr int Q = kBM * LD, KV = kBN * LD;
    static constexpr size_t bytes = size_t(Q + 4 * KV) * 2; // Q, K x2, V x2
};
static_assert(FlashSmem<128>::bytes <= 227 * 1024, "flash tiles exceed shared memory");
static_assert(kBM == kWarps * 16, "each warp owns 16 query rows");
static_assert(kBN % 16 == 0, "K/V tile must be a multiple of the mma k");

// rows x HD bf16 from global (row stride `stride` elements) into padded
// shared rows; global rows >= n_rows become zeros.
template <int ROWS, int HD>
__device__ __forceinline__ void load_tile(uint16_t *s, const uint16_t *g, int stride, int row0, int n_rows) {
    constexpr int CPR = HD / 8, LD = FlashSmem<HD>::LD; // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CPR; c += kThreads) {
        const int r = c / CPR, cc = (c % CPR) * 8, gr = row0 + r;
        const bool ok = gr < n_rows;
        cp_async16(s + r * LD + cc, g + size_t(ok ? gr : 0) * stride + cc, ok ? 16 : 0);
    }
}

template <int HD> __global__ void __launch_bounds__(kThreads) flash_sm80_kernel(AttnArgs p) {
    using S = FlashSmem<HD>;
    constexpr int LD = S::LD;
    extern __shared__ __align__(16) uint16_t smem[];
    uint16_t *sQ = smem, *sK = smem + S::Q, *sV = sK + 2 * S::KV;

    const cuda::AttnSeq sd = p.seqs[blockIdx.z];
    const int m0 = blockIdx.x * kBM;
    if (m0 >= sd.q_len) return; // whole CTA: shorter sequence than the grid
    const int h = blockIdx.y, kvh = h / (p.n_heads / p.n_kv_heads);
    const uint16_t *Qg = p.q + size_t(sd.q_begin) * p.q_stride + h * HD;
    const size_t kv_off = size_t(p.layer) * sd.layer_stride + size_t(kvh) * HD;
    const uint16_t *Kg = sd.k + kv_off, *Vg = sd.v + kv_off;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kv_len = sd.kv_len, nb = (kv_len + kBN - 1) / kBN;

    // Groups in flight, in order: [Q, K0], [V0], then per block [K_j+1], [V_j+1].
    load_tile<kBM, HD>(sQ, Qg, p.q_stride, m0, sd.q_len);
    load_tile<kBN, HD>(sK, Kg, p.kv_stride, 0, kv_len);
    cp_async_commit();
    load_tile<kBN, HD>(sV, Vg, p.kv_stride, 0, kv_len);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // This warp's 16 Q rows as A fragments, one per k16 step of the head dim.
    uint32_t qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++)
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 + (lane >> 4) * 8);

    // Accumulators: o[t] is the 16x8 tile of head-dim columns 8t..8t+7;
    // elements 0,1 belong to row lane/4, elements 2,3 to row lane/4 + 8.
    float o[HD / 8][4];
#pragma unroll
    for (int t = 0; t < HD / 8; t++) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
    float row_m[2] = {-INFINITY, -INFINITY}, row_l[2] = {0.f, 0.f};
    const float sl2 = p.scale * 1.4426950408889634f; // scores in log2 units

    for (int j = 0; j < nb; j++) {
        const uint16_t *k_s = sK + (j & 1) * S::KV, *v_s = sV + (j & 1) * S::KV;
        // S = Q K_j^T for this warp's 16 rows and the block's 64 keys.
        float s[kBN / 8][4];
#pragma unroll
        for (int t = 0; t < kBN / 8; t++) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int t = 0; t < kBN / 16; t++) {
                // Matrices: keys 16t..+7 / dims 16kk..+7, same keys / dims +8,
                // keys +8 / dims 16kk..+7, keys +8 / dims +8.
                uint32_t b[4];
                ldmatrix_x4(b, k_s + (t * 16 + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                mma_bf16(s[2 * t], qf[kk], b[0], b[1]);
                mma_bf16(s[2 * t + 1], qf[kk], b[2], b[3]);
            }
        }
        if (j + 1 < nb) { // next K streams in during the softmax and P V
            load_tile<kBN, HD>(sK + ((j + 1) & 1) * S::KV, Kg, p.kv_stride, (j + 1) * kBN, kv_len);
            cp_async_commit();
        }
        // Keys past the end (only in the last block) never get weight.
        if ((j + 1) * kBN > kv_len) {
#pragma unroll
            for (int t = 0; t < kBN / 8; t++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (j * kBN + t * 8 + 2 * (lane & 3) + (e & 1) >= kv_len) s[t][e] = -INFINITY;
        }
        // Online softmax. A row's 64 scores sit in the 4 lanes of a quad.
        float mx[2] = {row_m[0], row_m[1]};
#pragma unroll
        for (int t = 0; t < kBN / 8; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], s[t][e]);
        float alpha[2], rs[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            // Every block holds at least one valid key, so mx is finite here;
            // the first block gives alpha = exp2(-inf) = 0.
            alpha[r] = exp2f((row_m[r] - mx[r]) * sl2);
            row_m[r] = mx[r];
        }
#pragma unroll
        for (int t = 0; t < kBN / 8; t++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float pv = exp2f(s[t][e] * sl2 - mx[e >> 1] * sl2);
                s[t][e] = pv;
                rs[e >> 1] += pv;
            }
#pragma unroll
        for (int r = 0; r < 2; r++) row_l[r] = row_l[r] * alpha[r] + rs[r]; // partial (this lane's columns)
#pragma unroll
        for (int t = 0; t < HD / 8; t++) {
            o[t][0] *= alpha[0];
            o[t][1] *= alpha[0];
            o[t][2] *= alpha[1];
            o[t][3] *= alpha[1];
        }
        // V_j must have landed.
        if (j + 1 < nb) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncthreads();
        // O += P V_j; P's accumulator layout is the A fragment layout once
        // two adjacent 8-key tiles are packed to bf16 pairs.
#pragma unroll
        for (int ks = 0; ks < kBN / 16; ks++) {
            uint32_t a[4];
            a[0] = pack_bf16(s[2 * ks][0], s[2 * ks][1]);
            a[1] = pack_bf16(s[2 * ks][2], s[2 * ks][3]);
            a[2] = pack_bf16(s[2 * ks + 1][0], s[2 * ks + 1][1]);
            a[3] = pack_bf16(s[2 * ks + 1][2], s[2 * ks + 1][3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                // Matrices (transposed): keys 16ks..+7 / dims 16dp..+7, keys +8 /
                // same dims, keys 16ks..+7 / dims +8, keys +8 / dims +8.
                uint32_t b[4];
                ldmatrix_x4_trans(b, v_s + (ks * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + dp * 16 +
                                         (lane >> 4) * 8);
                mma_bf16(o[2 * dp], a, b[0], b[1]);
                mma_bf16(o[2 * dp + 1], a, b[2], b[3]);
            }
        }
        if (j + 1 < nb) {
            // The buffer V_j+1 goes to held V_j-1, read before this block's
            // first barrier; K_j+1 is the older group, so waiting for all but
            // the newest leaves it complete for the next block.
            load_tile<kBN, HD>(sV + ((j + 1) & 1) * S::KV, Vg, p.kv_stride, (j + 1) * kBN, kv_len);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
        }
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = row_l[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l > 0.f ? 1.f / l : 0.f;
    }
    const int r0 = m0 + warp * 16 + (lane >> 2), r1 = r0 + 8;
    __nv_bfloat16 *Og = reinterpret_cast<__nv_bfloat16 *>(p.o) + size_t(sd.q_begin) * p.o_stride + h * HD;
#pragma unroll
    for (int t = 0; t < HD / 8; t++) {
        const int c = t * 8 + 2 * (lane & 3);
        if (r0 < sd.q_len)
            *reinterpret_cast<__nv_bfloat162 *>(Og + size_t(r0) * p.o_stride + c) =
                __floats2bfloat162_rn(o[t][0] * inv[0], o[t][1] * inv[0]);
        if (r1 < sd.q_len)
            *reinterpret_cast<__nv_bfloat162 *>(Og + size_t(r1) * p.o_stride + c) =
                __floats2bfloat162_rn(o[t][2] * inv[1], o[t][3] * inv[1]);
    }
}

template <int HD> cudaError_t launch_flash(const AttnArgs &a, cudaStream_t s) {
    constexpr size_t smem = FlashSmem<HD>::bytes;
    // Above 48 KB a kernel must opt in; cheap, so done on every launch.
    cudaError_t e = cudaFuncSetAttribute(flash_sm80_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    dim3 grid(unsigned((a.max_q + kBM - 1) / kBM), unsigned(a.n_heads), unsigned(a.n_seqs));
    flash_sm80_kernel<HD><<<grid, kThreads, smem, s>>>(a);
    return cudaGetLastError();
}

// ---- reference: a warp per query row --------------------------------------

constexpr int kRefMaxPerLane = 8; // head_dim <= 256

__global__ void attention_ref_kernel(AttnArgs p) {
    const cuda::AttnSeq sd = p.seqs[blockIdx.z];
    const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= sd.q_len) return;
    const int h = blockIdx.y, kvh = h / (p.n_heads / p.n_kv_heads), hd = p.head_dim;
    const __nv_bfloat16 *q =
        reinterpret_cast<const __nv_bfloat16 *>(p.q) + size_t(sd.q_begin + row) * p.q_stride + size_t(h) * hd;
    const size_t kv_off = size_t(p.layer) * sd.layer_stride + size_t(kvh) * hd;
    const __nv_bfloat16 *K = reinterpret_cast<const __nv_bfloat16 *>(sd.k) + kv_off;
    const __nv_bfloat16 *V = reinterpret_cast<const __nv_bfloat16 *>(sd.v) + kv_off;
    float qv[kRefMaxPerLane], acc[kRefMaxPerLane];
#pragma unroll
    for (int u = 0; u < kRefMaxPerLane; u++) {
        const int c = lane + 32 * u;
        qv[u] = c < hd ? __bfloat162float(q[c]) : 0.f;
        acc[u] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = 0; j < sd.kv_len; j++) {
        const __nv_bfloat16 *kj = K + size_t(j) * p.kv_stride, *vj = V + size_t(j) * p.kv_stride;
        float dot = 0.f;
#pragma unroll
        for (int u = 0; u < kRefMaxPerLane; u++) {
            const int c = lane + 32 * u;
            if (c < hd) dot += qv[u] * __bfloat162float(kj[c]);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        const float sc = dot * p.scale, mn = fmaxf(m, sc);
        const float c0 = expf(m - mn), pj = expf(sc - mn);
        l = l * c0 + pj;
#pragma unroll
        for (int u = 0; u < kRefMaxPerLane; u++) {
            const int c = lane + 32 * u;
            acc[u] = acc[u] * c0 + (c < hd ? pj * __bfloat162float(vj[c]) : 0.f);
        }
        m = mn;
    }
    __nv_bfloat16 *o =
        reinterpret_cast<__nv_bfloat16 *>(p.o) + size_t(sd.q_begin + row) * p.o_stride + size_t(h) * hd;
#pragma unroll
    for (int u = 0; u < kRefMaxPerLane; u++) {
        const int c = lane + 32 * u;
        if (c < hd) o[c] = __float2bfloat16_rn(l > 0.f ? acc[u] / l : 0.f);
    }
}

} // namespace

namespace {
constexpr AttnImpl kAllImpls[] = {AttnImpl::Reference,        AttnImpl::Sm80,
                                  AttnImpl::Sm90,             AttnImpl::Sm90Pipe,
                                  AttnImpl::Sm90Pipe2,        AttnImpl::Sm90Wide,
                                  AttnImpl::Sm90Tma,          AttnImpl::Sm90TmaPingPong,
                                  AttnImpl::Sm90TmaPersistent, AttnImpl::Sm90TmaPingPongPersistent,
                                  AttnImpl::Sm90TmaWide};
// The wgmma kernels of attention_sm90.cu (head dim 128, an sm_90 device).
bool is_sm90(AttnImpl i) { return i != AttnImpl::Reference && i != AttnImpl::Sm80; }
} // namespace

bool attention_supported(AttnImpl impl, int head_dim) {
    if (impl == AttnImpl::Reference) return head_dim > 0 && head_dim <= 32 * kRefMaxPerLane;
    if (is_sm90(impl))
        return head_dim == 128 && attention_sm90_available();
    return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

namespace {

// A small problem through `impl` and through the reference kernel on the
// current device: two sequences (130 queries and keys; 5 queries against 70
// keys, the ML-Cache shape), two query heads sharing one K/V head, head dim
// 128. True when both outputs are finite and agree to bf16 rounding.
bool attention_selfcheck(AttnImpl impl) {
    const int hd = 128, H = 2, Hkv = 1, d = H * hd, kv = Hkv * hd, maxkv = 130, M = 135;
    const cuda::AttnSeq host_seqs[2] = {{0, 130, 130, 0, nullptr, nullptr, 0}, {130, 5, 70, 0, nullptr, nullptr, 0}};
    const size_t nq = size_t(M) * d, nkv = size_t(2) * maxkv * kv;
    void *mem = nullptr;
    const size_t bytes = (nq * 3 + nkv * 2) * 2 + sizeof host_seqs;
    if (cudaMalloc(&mem, bytes) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    uint16_t *q = static_cast<uint16_t *>(mem), *o1 = q + nq, *o2 = o1 + nq, *k = o2 + nq, *v = k + nkv;
    auto *seqs = reinterpret_cast<cuda::AttnSeq *>(v + nkv);
    cuda::AttnSeq hs[2] = {host_seqs[0], host_seqs[1]};
    for (int i = 0; i < 2; i++) hs[i].k = k + size_t(i) * maxkv * kv, hs[i].v = v + size_t(i) * maxkv * kv;
    std::vector<uint16_t> a(nq), b(nq);
    bool ok = fill_uniform_bf16_launch(q, nq, 71, -2, 2, nullptr) == cudaSuccess &&
              fill_uniform_bf16_launch(k, nkv, 72, -2, 2, nullptr) == cudaSuccess &&
              fill_uniform_bf16_launch(v, nkv, 73, -1, 1, nullptr) == cudaSuccess &&
              cudaMemcpy(seqs, hs, sizeof hs, cudaMemcpyHostToDevice) == cudaSuccess &&
              cudaMemset(o1, 0xff, nq * 4) == cudaSuccess; // both outputs NaN until written
    const AttnArgs args1{q, d, o1, d, seqs, 2, 130, 0, H, Hkv, hd, kv, 1.f / std::sqrt(float(hd)), hs};
    AttnArgs args2 = args1;
    args2.o = o2;
    ok = ok && attention_launch(args1, impl, nullptr) == cudaSuccess &&
         attention_launch(args2, AttnImpl::Reference, nullptr) == cudaSuccess &&
         cudaMemcpy(a.data(), o1, nq * 2, cudaMemcpyDeviceToHost) == cudaSuccess &&
         cudaMemcpy(b.data(), o2, nq * 2, cudaMemcpyDeviceToHost) == cudaSuccess;
    cudaGetLastError();
    cudaFree(mem);
    if (!ok) return false;
    double num = 0, den = 0;
    for (size_t i = 0; i < nq; i++) {
        float x, y;
        const uint32_t ux = uint32_t(a[i]) << 16, uy = uint32_t(b[i]) << 16;
        std::memcpy(&x, &ux, 4);
        std::memcpy(&y, &uy, 4);
        if (!std::isfinite(x) || !std::isfinite(y)) return false;
        num += double(x - y) * (x - y);
        den += double(y) * y;
    }
    return num <= 1e-4 * den; // relative L2 error 1e-2
}

} // namespace

const char *attention_impl_name(AttnImpl impl) {
    switch (impl) {
    case AttnImpl::Reference: return "ref";
    case AttnImpl::Sm80: return "sm80";
    case AttnImpl::Sm90: return "sm90";
    case AttnImpl::Sm90Pipe: return "sm90p";
    case AttnImpl::Sm90Pipe2: return "sm90p2";
    case AttnImpl::Sm90Wide: return "sm90w";
    case AttnImpl::Sm90Tma: return "sm90t";
    case AttnImpl::Sm90TmaPingPong: return "sm90tp";
    case AttnImpl::Sm90TmaPersistent: return "sm90ts";
    case AttnImpl::Sm90TmaPingPongPersistent: return "sm90tps";
    case AttnImpl::Sm90TmaWide: return "sm90tw";
    }
    return "?";
}

bool attention_impl_by_name(const char *name, int head_dim, AttnImpl *out) {
    for (AttnImpl i : kAllImpls)
        if (name && std::strcmp(name, attention_impl_name(i)) == 0 && attention_supported(i, head_dim)) {
            *out = i;
            return true;
        }
    return false;
}

AttnImpl attention_default_impl(int head_dim) {
    const char *env = std::getenv("DIMOO_CUDA_ATTN");
    // A kernel named by DIMOO_CUDA_ATTN that runs here; else the fallback below.
    AttnImpl named = AttnImpl::Sm80;
    if (env && attention_impl_by_name(env, head_dim, &named)) return named;
    // On sm_90 the wide pipelined wgmma kernel (FA3's tile shape: two
    // warpgroups, 128-key blocks), once it has agreed with the reference
    // kernel on this device (checked once per process). Which sm_90 kernel is
    // fastest is for dimoo_bench_cuda on the device to say.
    if (!env && attention_supported(AttnImpl::Sm90Wide, head_dim)) {
        static std::once_flag once;
        static bool sm90_ok = false;
        std::call_once(once, [] {
            sm90_ok = attention_selfcheck(AttnImpl::Sm90Wide);
            if (!sm90_ok)
                std::fprintf(stderr, "dimoo: the sm_90a attention kernel disagreed with the reference kernel on this "
                                     "device; using the sm_80 kernel\n");
        });
        if (sm90_ok) return AttnImpl::Sm90Wide;
    }
    return attention_supported(AttnImpl::Sm80, head_dim) ? AttnImpl::Sm80 : AttnImpl::Reference;
}

cudaError_t attention_launch(const AttnArgs &a, AttnImpl impl, cudaStream_t s) {
    if (a.max_q == 0 || a.n_seqs == 0) return cudaSuccess;
    if (a.n_kv_heads <= 0 || a.n_heads % a.n_kv_heads) return cudaErrorInvalidValue;
    if (!attention_supported(impl, a.head_dim)) return cudaErrorInvalidValue;
    if (impl == AttnImpl::Reference) {
        dim3 grid(unsigned((a.max_q + 3) / 4), unsigned(a.n_heads), unsigned(a.n_seqs));
        attention_ref_kernel<<<grid, 128, 0, s>>>(a);
        return cudaGetLastError();
    }
    // 16-byte cp.async needs 16-byte aligned rows.
    if (a.q_stride % 8 || a.kv_stride % 8 || (reinterpret_cast<uintptr_t>(a.q) & 15)) return cudaErrorInvalidValue;
    if (is_sm90(impl))
        return attention_sm90_launch(a, s, impl);
    switch (a.head_dim) {
    case 32: return launch_flash<32>(a, s);
    case 64: return launch_flash<64>(a, s);
    case 128: return launch_flash<128>(a, s);
    }
    return cudaErrorInvalidValue;
}

} // namespace dimoo
