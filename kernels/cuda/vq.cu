// vq.cu - the VQ-VAE on the GPU, op for op the CPU network of
// csrc/vq/vq_model.cpp. Decoder: codebook gather (or the given latent) ->
// post_quant_conv -> decoder.conv_in -> mid block (resnet, attention,
// resnet) -> up blocks (resnets, nearest x2 upsample then 3x3 conv) ->
// conv_norm_out + SiLU -> conv_out. Encoder: conv_in -> down blocks
// (resnets, then a 3x3 stride-2 conv over the input padded right and below,
// as patches and one GEMM) -> mid block -> conv_norm_out + SiLU -> conv_out
// -> quant_conv -> the nearest codebook row per cell (scores by GEMM, the
// candidates within float rounding of the best re-ranked by the exact
// distance in double, as the CPU's Model::quantize).
//
// Activations are the CPU's "padded" layout: (H + 2) x (W + 2) rows of C
// fp32 with a zero border, so a 3x3 "same" conv is nine accumulating GEMMs
// over the input shifted by whole rows (the CPU's shifted-GEMM path), a
// 1x1 conv one GEMM; the rows that land on the border are zeroed after.
// The upsampler (nearest x2, then 3x3) runs as the CPU's four 2x2 sub-pixel
// convs (prepare_upsample's kernels): per output parity, four GEMMs into a
// scratch buffer, then scattered to its pixels. GEMMs are cuBLAS
// SGEMM in fp32 (CUBLAS_DEFAULT_MATH: no TF32), GroupNorm statistics are
// summed in double, the attention's softmax sums in double: the result is
// the CPU's up to fp32 rounding in a different order (relative error
// ~1e-5; the tests allow 1e-4).
//
// Weights are copied to the device once (make_cuda_vq, at dimoo_vq_finalize);
// every decode or encode allocates its activations in one buffer after checking the
// device's free memory, and polls cancel between blocks.
#include "cuda/vq.cuh"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "cuda/cuda_common.cuh"

namespace dimoo {
namespace {

// Attention scores held at once: this many floats (256 MiB), in blocks of query rows.
#ifdef DIMOO_VQ_EMU_SCORE_FLOATS
constexpr int64_t kScoreFloats = DIMOO_VQ_EMU_SCORE_FLOATS; // the host emulation: many blocks
#else
constexpr int64_t kScoreFloats = int64_t(1) << 26;
#endif
// Threads per block (a power of two).
constexpr int kThreads = 256;

void blas_check(cublasStatus_t st, const char *what) {
    if (st == CUBLAS_STATUS_SUCCESS) return;
    fail(st == CUBLAS_STATUS_ALLOC_FAILED ? DIMOO_ERR_DEVICE_OUT_OF_MEMORY : DIMOO_ERR_DEVICE,
         std::string(what) + " failed with cuBLAS status " + std::to_string(int(st)));
}
#define BLAS(call) blas_check((call), #call)

int blocks_for(int64_t n) { return int(std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20)); }

__device__ inline float silu1(float v) { return v / (1.0f + expf(-v)); }

__device__ inline bool on_border(int64_t row, int H, int W) {
    const int64_t Wp = W + 2;
    const int64_t y = row / Wp, x = row % Wp;
    return y == 0 || y == H + 1 || x == 0 || x == W + 1;
}

// ---- kernels (grid-stride over int64 element counts) -------------------------------------

// out[r][j] = (accumulate ? out[r][j] : 0) + b[j], rows [0, rows).
__global__ void k_bias(float *out, int64_t rows, int n, const float *b, bool accumulate) {
    const int64_t total = rows * n;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = b[i % n];
        out[i] = accumulate ? out[i] + v : v;
    }
}

__global__ void k_zero_border(float *p, int H, int W, int C) {
    const int64_t Wp = W + 2;
    const int64_t top = Wp * C, side = int64_t(H) * C; // per border row / per side column
    const int64_t total = 2 * top + 2 * side;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        int64_t at;
        if (i < top) {
            at = i;
        } else if (i < 2 * top) {
            at = (int64_t(H) + 1) * Wp * C + (i - top);
        } else {
            const int64_t j = i - 2 * top;
            const int64_t s = j / side, k = j % side; // s: 0 left, 1 right
            const int64_t y = k / C + 1, c = k % C;
            at = (y * Wp + (s ? W + 1 : 0)) * C + c;
        }
        p[at] = 0.0f;
    }
}

// Compact (H*W, C) -> padded (writes the border too).
__global__ void k_pad(const float *x, int H, int W, int C, float *p) {
    const int64_t Wp = W + 2, total = int64_t(H + 2) * Wp * C;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = i / C, c = i % C;
        const int64_t y = row / Wp, xx = row % Wp;
        p[i] = (y == 0 || y == H + 1 || xx == 0 || xx == W + 1) ? 0.0f : x[((y - 1) * W + xx - 1) * C + c];
    }
}

__global__ void k_unpad(const float *p, int H, int W, int C, float *x) {
    const int64_t Wp = W + 2, total = int64_t(H) * W * C;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t pix = i / C, c = i % C;
        const int64_t y = pix / W, xx = pix % W;
        x[i] = p[((y + 1) * Wp + xx + 1) * C + c];
    }
}

// The encoder's downsampler (pad right and bottom by one, 3x3, stride 2) as
// patches: row (oy, ox) of col holds taps (ky, kx) of cin channels each, read
// from the padded input at (2 oy + ky, 2 ox + kx) (its zero border is the pad).
__global__ void k_im2col_down(const float *x, int W, int cin, int Ho, int Wo, float *col) {
    const int64_t K = 9 * int64_t(cin), total = int64_t(Ho) * Wo * K, Wp = W + 2;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t m = i / K, k = i % K, tap = k / cin, c = k % cin;
        const int64_t oy = m / Wo, ox = m % Wo, ky = tap / 3, kx = tap % 3;
        col[i] = x[((2 * oy + ky + 1) * Wp + 2 * ox + kx + 1) * cin + c];
    }
}

// Codebook rows of the codes into a padded (H, W, D) activation.
__global__ void k_gather(const int32_t *codes, const float *book, int H, int W, int D, float *p) {
    const int64_t Wp = W + 2, total = int64_t(H + 2) * Wp * D;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = i / D, d = i % D;
        const int64_t y = row / Wp, xx = row % Wp;
        p[i] = (y == 0 || y == H + 1 || xx == 0 || xx == W + 1)
                   ? 0.0f
                   : book[int64_t(codes[(y - 1) * W + xx - 1]) * D + d];
    }
}

// Output parity (py, px) of the sub-pixel upsampling conv: row r of tmp
// (r = i * (W + 2) + j, the GEMM's rows over the input) is output pixel
// (2i + py, 2j + px) of the padded (2H, 2W, C) out; rows with j >= W are
// the input's border and dropped.
__global__ void k_scatter_parity(const float *tmp, int64_t M, int H, int W, int C, int py, int px, float *out) {
    const int64_t Wp = W + 2, Wo = 2 * int64_t(W) + 2, total = M * C;
    (void)H;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = i / C, c = i % C;
        const int64_t y = r / Wp, x = r % Wp;
        if (x >= W) continue;
        out[((2 * y + py + 1) * Wo + 2 * x + px + 1) * C + c] = tmp[i];
    }
}

// GroupNorm statistics: stats[2g] += sum, stats[2g + 1] += sum of squares
// of group g over `rows` rows of C (the zero border adds nothing). Grid
// (groups, chunks); each block sums its chunk of rows in double.
__global__ void k_gn_stats(const float *x, int64_t rows, int C, int cg, int64_t chunk_rows, double *stats) {
    const int g = blockIdx.x;
    const int64_t r0 = blockIdx.y * chunk_rows, r1 = min(rows, r0 + chunk_rows);
    double s1 = 0, s2 = 0;
    const int64_t n = (r1 - r0) * cg;
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
        const float v = x[(r0 + e / cg) * C + int64_t(g) * cg + e % cg];
        s1 += v;
        s2 += double(v) * v;
    }
    __shared__ double a[kThreads], b[kThreads];
    a[threadIdx.x] = s1;
    b[threadIdx.x] = s2;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            a[threadIdx.x] += a[threadIdx.x + s];
            b[threadIdx.x] += b[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && n > 0) {
        atomicAdd(stats + 2 * g, a[0]);
        atomicAdd(stats + 2 * g + 1, b[0]);
    }
}

// Per channel: scale = gamma * rstd, shift = beta - mean * gamma * rstd of
// its group, in double and then rounded, as the CPU computes them.
__global__ void k_gn_coeffs(int C, int cg, const double *stats, const float *gamma, const float *beta, float eps,
                            double count, float *scale, float *shift) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int g = c / cg;
    const double m = stats[2 * g] / count;
    const double var = fmax(0.0, stats[2 * g + 1] / count - m * m);
    const double rstd = 1.0 / sqrt(var + double(eps));
    scale[c] = float(double(gamma[c]) * rstd);
    shift[c] = float(double(beta[c]) - m * double(gamma[c]) * rstd);
}

// out = x * scale + shift (then SiLU) per channel; border rows written zero.
// out may equal x.
__global__ void k_gn_apply(const float *x, float *out, int H, int W, int C, const float *scale, const float *shift,
                           bool silu) {
    const int64_t total = int64_t(H + 2) * (W + 2) * C;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t row = i / C;
        const int c = int(i % C);
        if (on_border(row, H, W)) {
            out[i] = 0.0f;
            continue;
        }
        const float v = x[i] * scale[c] + shift[c];
        out[i] = silu ? silu1(v) : v;
    }
}

// x (padded H x W x C) interior += r (compact H*W x C).
__global__ void k_add_compact(const float *r, int H, int W, int C, float *x) {
    const int64_t Wp = W + 2, total = int64_t(H) * W * C;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t pix = i / C, c = i % C;
        const int64_t y = pix / W, xx = pix % W;
        x[((y + 1) * Wp + xx + 1) * C + c] += r[i];
    }
}

// Row softmax of scores s (rows x n) scaled by `scale`, as the CPU: max,
// exp((s - max) * scale), sum in double, times 1 / sum. One block per row.
__global__ void k_softmax(float *s, int n, float scale) {
    float *row = s + int64_t(blockIdx.x) * n;
    __shared__ float mx[kThreads];
    __shared__ double sm[kThreads];
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, row[j]);
    mx[threadIdx.x] = m;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) mx[threadIdx.x] = fmaxf(mx[threadIdx.x], mx[threadIdx.x + k]);
        __syncthreads();
    }
    m = mx[0];
    double sum = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf((row[j] - m) * scale);
        row[j] = e;
        sum += e;
    }
    sm[threadIdx.x] = sum;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sm[threadIdx.x] += sm[threadIdx.x + k];
        __syncthreads();
    }
    const float inv = float(1.0 / sm[0]);
    for (int j = threadIdx.x; j < n; j += blockDim.x) row[j] *= inv;
}

// The nearest codebook row of each latent (one block per row), as the CPU's
// Model::quantize: score_j = |e_j|^2 - 2 z.e_j (s holds z.e_j) ranks the
// rows; those within the float rounding of the best are re-ranked by the
// exact distance in double, ties to the lowest index; a row without any
// candidate (NaN latents) takes the CPU's plain first-minimum scan.
__global__ void k_nearest(const float *z, const float *s, const float *book, const float *code_sq, float code_sq_max,
                          int E, int D, int32_t *codes) {
    const float *x = z + int64_t(blockIdx.x) * D, *sr = s + int64_t(blockIdx.x) * E;
    __shared__ float fmin_[kThreads];
    __shared__ double dbest[kThreads];
    __shared__ int ibest[kThreads];
    __shared__ double xsq_;
    if (threadIdx.x == 0) {
        double q = 0;
        for (int d = 0; d < D; d++) q += double(x[d]) * x[d];
        xsq_ = q;
    }
    float best = INFINITY;
    for (int j = threadIdx.x; j < E; j += blockDim.x) best = fminf(best, code_sq[j] - 2.0f * sr[j]);
    fmin_[threadIdx.x] = best;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) fmin_[threadIdx.x] = fminf(fmin_[threadIdx.x], fmin_[threadIdx.x + k]);
        __syncthreads();
    }
    best = fmin_[0];
    const float tol = 8.0f * float(D) * FLT_EPSILON * (float(xsq_) + code_sq_max) + FLT_MIN;
    double bd = 0;
    int bi = -1;
    for (int j = threadIdx.x; j < E; j += blockDim.x) {
        if (!(code_sq[j] - 2.0f * sr[j] <= best + tol)) continue;
        const float *e = book + int64_t(j) * D;
        double d2 = 0;
        for (int d = 0; d < D; d++) {
            const double t = double(x[d]) - double(e[d]);
            d2 += t * t;
        }
        if (bi < 0 || d2 < bd) bd = d2, bi = j; // j increases: a tie keeps the lower index
    }
    dbest[threadIdx.x] = bd;
    ibest[threadIdx.x] = bi;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) {
            const int oi = ibest[threadIdx.x + k];
            const double od = dbest[threadIdx.x + k];
            const int mi = ibest[threadIdx.x];
            if (oi >= 0 && (mi < 0 || od < dbest[threadIdx.x] || (od == dbest[threadIdx.x] && oi < mi)))
                dbest[threadIdx.x] = od, ibest[threadIdx.x] = oi;
        }
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    int arg = ibest[0];
    if (arg < 0) { // NaN latents: the CPU's plain scan
        arg = 0;
        for (int j = 1; j < E; j++)
            if (code_sq[j] - 2.0f * sr[j] < code_sq[arg] - 2.0f * sr[arg]) arg = j;
    }
    codes[blockIdx.x] = arg;
}

// ---- device weights ------------------------------------------------------------------------

struct DConv {
    int cin = 0, cout = 0, k = 1;
    const float *w = nullptr, *b = nullptr; // w (cout, k, k, cin) as the CPU stores it
    // An upsampler's: the 16 (cout, cin) sub-pixel kernels of prepare_upsample
    // in place of w, [(py * 2 + px) * 4 + dy * 2 + dx].
    const float *up = nullptr;
};
struct DNorm {
    int c = 0, groups = 1;
    float eps = 1e-6f;
    const float *gamma = nullptr, *beta = nullptr;
};
struct DLinear {
    int in = 0, out = 0;
    const float *w = nullptr, *b = nullptr;
};
struct DResnet {
    DNorm norm1, norm2;
    DConv conv1, conv2, shortcut;
    bool has_shortcut = false;
};
struct DMid {
    DResnet r0, r1;
    bool has_attn = false;
    DNorm anorm;
    DLinear q, k, v, o;
};
struct DStage {
    std::vector<DResnet> resnets;
    bool has_up = false;
    DConv up;
};
struct DDownStage {
    std::vector<DResnet> resnets;
    bool has_down = false;
    DConv down; // 3x3, stride 2
};

void check_cancel(const std::atomic<bool> &cancel) {
    if (cancel.load(std::memory_order_relaxed)) fail(DIMOO_ERR_CANCELLED, "cancelled");
}

class CudaVq : public VqDevice {
public:
    CudaVq(const vq::Model &m, int device) : device_(device), cfg_(m.config()) {
        DIMOO_CUDA(cudaSetDevice(device_));
        // Lay out every decoder tensor in one allocation.
        std::vector<std::pair<const std::vector<float> *, size_t>> parts;
        size_t total = 0;
        auto take = [&](const std::vector<float> &v) {
            parts.emplace_back(&v, total);
            total = align_up(total + v.size() * sizeof(float));
        };
        auto conv = [&](const vq::Conv2d &c) { take(c.w), take(c.b); };
        auto norm = [&](const vq::GroupNorm &g) { take(g.gamma), take(g.beta); };
        auto lin = [&](const vq::Linear &l) { take(l.w), take(l.b); };
        auto resnet = [&](const vq::Resnet &r) {
            norm(r.norm1), conv(r.conv1), norm(r.norm2), conv(r.conv2);
            if (r.has_shortcut) conv(r.shortcut);
        };
        // |e_j|^2 of each codebook row, in double rounded to float (the CPU's).
        const int E = m.config().num_vq_embeddings, Dq = m.config().vq_embed_dim;
        code_sq_host_.resize(size_t(E));
        for (int j = 0; j < E; j++) {
            double q = 0;
            for (int d = 0; d < Dq; d++) q += double(m.codebook()[size_t(j) * Dq + d]) * m.codebook()[size_t(j) * Dq + d];
            code_sq_host_[size_t(j)] = float(q);
            code_sq_max_ = std::max(code_sq_max_, float(q));
        }
        take(m.codebook());
        take(code_sq_host_);
        conv(m.post_quant_conv());
        conv(m.dec_conv_in());
        resnet(m.dec_mid().r0);
        if (m.dec_mid().has_attn) {
            const auto &a = m.dec_mid().attn;
            norm(a.norm), lin(a.q), lin(a.k), lin(a.v), lin(a.o);
        }
        resnet(m.dec_mid().r1);
        for (const auto &s : m.dec_up()) {
            for (const auto &r : s.resnets) resnet(r);
            if (s.has_resample) take(s.resample.up), take(s.resample.b);
        }
        norm(m.dec_norm_out());
        conv(m.dec_conv_out());
        auto mid = [&](const vq::MidBlock &b) {
            resnet(b.r0);
            if (b.has_attn) norm(b.attn.norm), lin(b.attn.q), lin(b.attn.k), lin(b.attn.v), lin(b.attn.o);
            resnet(b.r1);
        };
        conv(m.enc_conv_in());
        for (const auto &st : m.enc_down()) {
            for (const auto &r : st.resnets) resnet(r);
            if (st.has_resample) conv(st.resample);
        }
        mid(m.enc_mid());
        norm(m.enc_norm_out());
        conv(m.enc_conv_out());
        conv(m.quant_conv());
        check_device_room(device_, total, "the VQ-VAE's weights in fp32");
        weights_ = std::make_unique<DeviceBuffer>(total);
        bytes_ = int64_t(total);
        char *base = static_cast<char *>(weights_->get());
        for (const auto &p : parts)
            if (!p.first->empty())
                DIMOO_CUDA(cudaMemcpy(base + p.second, p.first->data(), p.first->size() * sizeof(float),
                                      cudaMemcpyHostToDevice));
        // Point the device structs at their tensors, in the same order.
        size_t at = 0;
        auto ptr = [&]() { return reinterpret_cast<const float *>(base + parts[at++].second); };
        auto dconv = [&](const vq::Conv2d &c) {
            DConv d;
            d.cin = c.cin, d.cout = c.cout, d.k = c.k;
            d.w = ptr(), d.b = ptr();
            return d;
        };
        auto dnorm = [&](const vq::GroupNorm &g) {
            DNorm d;
            d.c = g.c, d.groups = g.groups, d.eps = g.eps;
            d.gamma = ptr(), d.beta = ptr();
            return d;
        };
        auto dlin = [&](const vq::Linear &l) {
            DLinear d;
            d.in = l.in, d.out = l.out;
            d.w = ptr(), d.b = ptr();
            return d;
        };
        auto dres = [&](const vq::Resnet &r) {
            DResnet d;
            d.norm1 = dnorm(r.norm1), d.conv1 = dconv(r.conv1), d.norm2 = dnorm(r.norm2), d.conv2 = dconv(r.conv2);
            d.has_shortcut = r.has_shortcut;
            if (r.has_shortcut) d.shortcut = dconv(r.shortcut);
            return d;
        };
        book_ = ptr();
        code_sq_ = ptr();
        post_quant_ = dconv(m.post_quant_conv());
        conv_in_ = dconv(m.dec_conv_in());
        mid_.r0 = dres(m.dec_mid().r0);
        mid_.has_attn = m.dec_mid().has_attn;
        if (mid_.has_attn) {
            const auto &a = m.dec_mid().attn;
            mid_.anorm = dnorm(a.norm);
            mid_.q = dlin(a.q), mid_.k = dlin(a.k), mid_.v = dlin(a.v), mid_.o = dlin(a.o);
        }
        mid_.r1 = dres(m.dec_mid().r1);
        for (const auto &s : m.dec_up()) {
            DStage d;
            for (const auto &r : s.resnets) d.resnets.push_back(dres(r));
            d.has_up = s.has_resample;
            if (s.has_resample) {
                d.up.cin = s.resample.cin, d.up.cout = s.resample.cout, d.up.k = s.resample.k;
                d.up.up = ptr(), d.up.b = ptr();
            }
            up_.push_back(std::move(d));
        }
        norm_out_ = dnorm(m.dec_norm_out());
        conv_out_ = dconv(m.dec_conv_out());
        auto dmid = [&](const vq::MidBlock &b) {
            DMid d;
            d.r0 = dres(b.r0);
            d.has_attn = b.has_attn;
            if (b.has_attn) {
                d.anorm = dnorm(b.attn.norm);
                d.q = dlin(b.attn.q), d.k = dlin(b.attn.k), d.v = dlin(b.attn.v), d.o = dlin(b.attn.o);
            }
            d.r1 = dres(b.r1);
            return d;
        };
        enc_in_ = dconv(m.enc_conv_in());
        for (const auto &st : m.enc_down()) {
            DDownStage d;
            for (const auto &r : st.resnets) d.resnets.push_back(dres(r));
            d.has_down = st.has_resample;
            if (st.has_resample) d.down = dconv(st.resample);
            enc_down_.push_back(std::move(d));
        }
        enc_mid_ = dmid(m.enc_mid());
        enc_norm_out_ = dnorm(m.enc_norm_out());
        enc_out_ = dconv(m.enc_conv_out());
        quant_conv_ = dconv(m.quant_conv());
        DIMOO_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) {
            blas_ = nullptr;
            cudaStreamDestroy(stream_);
            stream_ = nullptr;
            fail(DIMOO_ERR_DEVICE, "cublasCreate failed");
        }
        BLAS(cublasSetStream(blas_, stream_));
        BLAS(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH)); // fp32, no TF32
        DIMOO_CUDA(cudaDeviceSynchronize());
    }

    ~CudaVq() override {
        if (stream_) cudaStreamSynchronize(stream_);
        if (blas_) cublasDestroy(blas_);
        if (stream_) cudaStreamDestroy(stream_);
    }

    int64_t device_bytes() const override { return bytes_; }

    void decode(const int32_t *codes, int h, int w, float *out, const std::atomic<bool> &cancel) override {
        run(codes, nullptr, h, w, out, cancel);
    }
    void decode_latent(const float *z, int h, int w, float *out, const std::atomic<bool> &cancel) override {
        run(nullptr, z, h, w, out, cancel);
    }
    void encode_latent(const float *pixels, int H, int W, float *latent, const std::atomic<bool> &cancel) override {
        encode(pixels, H, W, latent, nullptr, cancel);
    }
    void encode(const float *pixels, int H, int W, int32_t *codes, const std::atomic<bool> &cancel) override {
        encode(pixels, H, W, nullptr, codes, cancel);
    }

private:
    // Waits for the stream on every exit, so buffers freed by an exception
    // are no longer in use.
    struct Drain {
        cudaStream_t s;
        ~Drain() {
            if (cudaStreamSynchronize(s) != cudaSuccess) cudaGetLastError();
        }
    };

    void launch_check(const char *what) { cuda_check(cudaGetLastError(), what); }

    // Y[M, N] (beta: +=) X[M, K] W[N, K]^T, row-major, W with leading dimension ldw.
    void gemm_nt(int64_t M, int N, int K, const float *X, int ldx, const float *W, int ldw, float *Y, int ldy,
                 float beta) {
        const float alpha = 1.0f;
        BLAS(cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, N, int(M), K, &alpha, W, ldw, X, ldx, &beta, Y, ldy));
    }
    // Y[M, N] = X[M, K] V[K, N], row-major.
    void gemm_nn(int64_t M, int N, int K, const float *X, int ldx, const float *V, int ldv, float *Y, int ldy) {
        const float alpha = 1.0f, beta = 0.0f;
        BLAS(cublasSgemm(blas_, CUBLAS_OP_N, CUBLAS_OP_N, N, int(M), K, &alpha, V, ldv, X, ldx, &beta, Y, ldy));
    }

    void zero_border(float *p, int H, int W, int C) {
        k_zero_border<<<blocks_for(2 * int64_t(W + 2) * C + 2 * int64_t(H) * C), kThreads, 0, stream_>>>(p, H, W, C);
        launch_check("zero_border");
    }
    void bias(float *o, int64_t rows, int n, const float *b, bool accumulate) {
        k_bias<<<blocks_for(rows * n), kThreads, 0, stream_>>>(o, rows, n, b, accumulate);
        launch_check("bias");
    }

    // Same-size conv (1x1 or 3x3 pad 1), both padded; out must not overlap x.
    void conv_same(const DConv &c, const float *x, int H, int W, float *out, bool accumulate) {
        const int cin = c.cin, cout = c.cout, Wp = W + 2;
        if (c.k == 1) {
            const int64_t M = int64_t(H + 2) * Wp;
            bias(out, M, cout, c.b, accumulate);
            gemm_nt(M, cout, cin, x, cin, c.w, cin, out, cout, 1.0f);
        } else {
            // Output pixel at padded row q + Wp + 1 reads tap (ky, kx) at row q + ky * Wp + kx.
            const int64_t M = int64_t(H - 1) * Wp + W;
            float *o = out + int64_t(Wp + 1) * cout;
            bias(o, M, cout, c.b, accumulate);
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++)
                    gemm_nt(M, cout, cin, x + (int64_t(ky) * Wp + kx) * cin, cin, c.w + (ky * 3 + kx) * cin, 9 * cin,
                            o, cout, 1.0f);
        }
        zero_border(out, H, W, cout);
    }

    // Nearest x2 then the 3x3 conv, as four 2x2 convs per output parity (the
    // CPU's conv_up): x padded (H, W, cin) -> out padded (2H, 2W, cout); tmp
    // holds ((H - 1) * (W + 2) + W) x cout floats.
    void conv_up(const DConv &c, const float *x, int H, int W, float *out, float *tmp) {
        const int cin = c.cin, cout = c.cout, Wp = W + 2;
        const int64_t M = int64_t(H - 1) * Wp + W;
        for (int py = 0; py < 2; py++)
            for (int px = 0; px < 2; px++) {
                bias(tmp, M, cout, c.b, false);
                for (int dy = 0; dy < 2; dy++)
                    for (int dx = 0; dx < 2; dx++)
                        gemm_nt(M, cout, cin, x + (int64_t(py + dy) * Wp + (px + dx)) * cin, cin,
                                c.up + size_t((py * 2 + px) * 4 + dy * 2 + dx) * cout * cin, cin, tmp, cout, 1.0f);
                k_scatter_parity<<<blocks_for(M * cout), kThreads, 0, stream_>>>(tmp, M, H, W, cout, py, px, out);
                launch_check("scatter parity");
            }
        zero_border(out, 2 * H, 2 * W, cout);
    }

    // The encoder's downsampler: x padded (H, W, cin) -> out padded (H/2, W/2,
    // cout) through patches (col, (H/2)(W/2) x 9 cin) and one GEMM into tmp
    // (compact, (H/2)(W/2) x cout).
    void conv_down(const DConv &c, const float *x, int H, int W, float *out, float *tmp, float *col) {
        const int cin = c.cin, cout = c.cout, Ho = (H - 2) / 2 + 1, Wo = (W - 2) / 2 + 1;
        const int64_t M = int64_t(Ho) * Wo;
        k_im2col_down<<<blocks_for(M * 9 * cin), kThreads, 0, stream_>>>(x, W, cin, Ho, Wo, col);
        launch_check("im2col");
        bias(tmp, M, cout, c.b, false);
        gemm_nt(M, cout, 9 * cin, col, 9 * cin, c.w, 9 * cin, tmp, cout, 1.0f);
        k_pad<<<blocks_for(int64_t(Ho + 2) * (Wo + 2) * cout), kThreads, 0, stream_>>>(tmp, Ho, Wo, cout, out);
        launch_check("pad");
    }

    void group_norm(const DNorm &g, const float *x, int H, int W, float *out, bool silu) {
        const int C = g.c, cg = C / g.groups;
        const int64_t rows = int64_t(H + 2) * (W + 2);
        DIMOO_CUDA(cudaMemsetAsync(stats_, 0, sizeof(double) * 2 * size_t(g.groups), stream_));
        // About 8 blocks per SM in all, at least 64 rows each.
        const int64_t want = std::max<int64_t>(1, 1024 / g.groups);
        const int64_t chunk = std::max<int64_t>(64, (rows + want - 1) / want);
        dim3 grid(unsigned(g.groups), unsigned((rows + chunk - 1) / chunk)); // at most ~1024 chunks
        k_gn_stats<<<grid, kThreads, 0, stream_>>>(x, rows, C, cg, chunk, stats_);
        launch_check("group_norm stats");
        k_gn_coeffs<<<unsigned((C + kThreads - 1) / kThreads), kThreads, 0, stream_>>>(
            C, cg, stats_, g.gamma, g.beta, g.eps, double(H) * double(W) * cg, coef_, coef_ + C);
        launch_check("group_norm coefficients");
        k_gn_apply<<<blocks_for(rows * C), kThreads, 0, stream_>>>(x, out, H, W, C, coef_, coef_ + C, silu);
        launch_check("group_norm apply");
    }

    // Returns the buffer index holding the output; x is buffer xi, the
    // other two (ti, hi) are scratch.
    int resnet(const DResnet &r, int xi, int ti, int hi, int H, int W) {
        float *x = buf_[xi], *t = buf_[ti], *h = buf_[hi];
        const int cout = r.conv1.cout;
        group_norm(r.norm1, x, H, W, t, true);
        conv_same(r.conv1, t, H, W, h, false);
        group_norm(r.norm2, h, H, W, h, true);
        float *out = t; // t is free again
        if (r.has_shortcut) {
            conv_same(r.shortcut, x, H, W, out, false);
        } else {
            DIMOO_CUDA(cudaMemcpyAsync(out, x, sizeof(float) * size_t(H + 2) * (W + 2) * cout,
                                       cudaMemcpyDeviceToDevice, stream_));
        }
        conv_same(r.conv2, h, H, W, out, true);
        return ti;
    }

    // x (padded) += the mid block's attention over its pixels, in place.
    void attention(const DMid &mid_, float *x, int H, int W) {
        const int C = mid_.anorm.c;
        const int64_t n = int64_t(H) * W;
        float *hc = att_, *q = hc + n * C, *k = q + n * C, *v = k + n * C, *r = v + n * C, *s = r + n * C;
        float *o = s + att_block_ * n;
        // GroupNorm of x into the scratch as padded, then compact.
        group_norm(mid_.anorm, x, H, W, gn_, false);
        k_unpad<<<blocks_for(n * C), kThreads, 0, stream_>>>(gn_, H, W, C, hc);
        launch_check("unpad");
        auto linear = [&](const DLinear &l, const float *in, float *dst) {
            bias(dst, n, l.out, l.b, false);
            gemm_nt(n, l.out, l.in, in, l.in, l.w, l.in, dst, l.out, 1.0f);
        };
        linear(mid_.q, hc, q);
        linear(mid_.k, hc, k);
        linear(mid_.v, hc, v);
        bias(r, n, C, mid_.o.b, false);
        const float scale = 1.0f / std::sqrt(float(C));
        for (int64_t q0 = 0; q0 < n; q0 += att_block_) {
            const int64_t rows = std::min<int64_t>(att_block_, n - q0);
            gemm_nt(rows, int(n), C, q + q0 * C, C, k, C, s, int(n), 0.0f);
            k_softmax<<<unsigned(rows), kThreads, 0, stream_>>>(s, int(n), scale);
            launch_check("softmax");
            gemm_nn(rows, C, int(n), s, int(n), v, C, o, C);
            gemm_nt(rows, C, C, o, C, mid_.o.w, C, r + q0 * C, C, 1.0f);
        }
        k_add_compact<<<blocks_for(n * C), kThreads, 0, stream_>>>(r, H, W, C, x);
        launch_check("attention residual");
    }

    static void others(int i, int *a, int *b) { *a = (i + 1) % 3, *b = (i + 2) % 3; }

    // The mid block on buffer x (resnet, attention, resnet); returns the
    // output's buffer.
    int mid_block(const DMid &m, int x, int H, int W, const std::atomic<bool> &cancel) {
        int a, b;
        others(x, &a, &b);
        x = resnet(m.r0, x, a, b, H, W);
        check_cancel(cancel);
        if (m.has_attn) {
            attention(m, buf_[x], H, W);
            check_cancel(cancel);
        }
        others(x, &a, &b);
        x = resnet(m.r1, x, a, b, H, W);
        check_cancel(cancel);
        return x;
    }

    // One call's device memory: the three activation buffers (big floats
    // each), the mid block's attention scratch for an h x w grid, the
    // GroupNorm statistics and coefficients, then `extra` (bytes per area) in
    // order. Sets buf_, att_, gn_, att_block_, stats_, coef_; returns the
    // extra areas.
    std::vector<float *> carve(std::unique_ptr<DeviceBuffer> &mem, int64_t big, const DMid &m, int h, int w,
                               const std::vector<size_t> &extra) {
        int max_c = 0; // the widest GroupNorm
        for (int i = 0; i < cfg_.n_levels; i++) max_c = std::max(max_c, cfg_.block_out_channels[i]);
        const int64_t n = int64_t(h) * w, C = m.has_attn ? m.anorm.c : 0;
        att_block_ = std::max<int64_t>(1, std::min<int64_t>(n, kScoreFloats / n));
        // hc, q, k, v, r (n x C each), scores (block x n), o (block x C), then the padded norm.
        const int64_t att_core = m.has_attn ? 5 * n * C + att_block_ * n + att_block_ * C : 0;
        const int64_t att = m.has_attn ? att_core + int64_t(h + 2) * (w + 2) * C : 0;
        std::vector<size_t> areas(3, size_t(big) * 4);
        areas.push_back(size_t(att) * 4);
        areas.push_back(sizeof(double) * 2 * size_t(cfg_.norm_num_groups));
        areas.push_back(sizeof(float) * 2 * size_t(max_c));
        areas.insert(areas.end(), extra.begin(), extra.end());
        size_t need = 0;
        for (size_t a : areas) need += align_up(a);
        check_device_room(device_, need, "the VQ-VAE's activations for a " + std::to_string(h) + "x" +
                                             std::to_string(w) + " grid");
        mem = std::make_unique<DeviceBuffer>(need);
        std::vector<float *> at;
        char *p = static_cast<char *>(mem->get());
        for (size_t a : areas) {
            at.push_back(reinterpret_cast<float *>(p));
            p += align_up(a);
        }
        for (int i = 0; i < 3; i++) buf_[i] = at[size_t(i)];
        att_ = at[3];
        gn_ = att_ + att_core;
        stats_ = reinterpret_cast<double *>(at[4]);
        coef_ = at[5];
        return std::vector<float *>(at.begin() + 6, at.end());
    }

    void run(const int32_t *codes, const float *z, int h, int w, float *out, const std::atomic<bool> &cancel) {
        DIMOO_CUDA(cudaSetDevice(device_));
        const int L = cfg_.n_levels, D = cfg_.vq_embed_dim, Cl = cfg_.latent_channels;
        const int Cm = cfg_.block_out_channels[L - 1];
        auto padded = [](int H, int W) { return int64_t(H + 2) * (W + 2); };
        // The largest activation of the walk (floats).
        int64_t big = padded(h, w) * std::max({D, Cl, Cm});
        int H = h, W = w;
        for (const DStage &s : up_) {
            for (const DResnet &r : s.resnets) big = std::max(big, padded(H, W) * std::max(r.conv1.cin, r.conv1.cout));
            if (s.has_up) {
                H *= 2, W *= 2;
                big = std::max(big, padded(H, W) * s.up.cout);
            }
        }
        big = std::max(big, padded(H, W) * int64_t(cfg_.out_channels));
        const int Hf = H, Wf = W;
        const int64_t out_n = int64_t(Hf) * Wf * cfg_.out_channels;
        const int64_t n = int64_t(h) * w;
        const int64_t in_n = codes ? n : n * D; // codes (int32) or the latent
        std::unique_ptr<DeviceBuffer> mem;
        auto ext = carve(mem, big, mid_, h, w, {size_t(in_n) * 4, size_t(out_n) * 4});
        Drain drain{stream_};
        void *in = ext[0];
        float *out_d = ext[1];

        // Latent: codebook rows or the given z, padded, in buffer 0.
        H = h, W = w;
        if (codes) {
            DIMOO_CUDA(cudaMemcpyAsync(in, codes, sizeof(int32_t) * size_t(n), cudaMemcpyHostToDevice, stream_));
            k_gather<<<blocks_for(padded(H, W) * D), kThreads, 0, stream_>>>(static_cast<const int32_t *>(in), book_,
                                                                             H, W, D, buf_[0]);
            launch_check("gather");
        } else {
            DIMOO_CUDA(cudaMemcpyAsync(in, z, sizeof(float) * size_t(n) * D, cudaMemcpyHostToDevice, stream_));
            k_pad<<<blocks_for(padded(H, W) * D), kThreads, 0, stream_>>>(static_cast<const float *>(in), H, W, D,
                                                                          buf_[0]);
            launch_check("pad");
        }
        conv_same(post_quant_, buf_[0], H, W, buf_[1], false);
        conv_same(conv_in_, buf_[1], H, W, buf_[2], false);
        check_cancel(cancel);
        int x = mid_block(mid_, 2, H, W, cancel);
        for (const DStage &s : up_) {
            for (const DResnet &r : s.resnets) {
                int a, b;
                others(x, &a, &b);
                x = resnet(r, x, a, b, H, W);
                check_cancel(cancel);
            }
            if (s.has_up) {
                int a, b;
                others(x, &a, &b);
                conv_up(s.up, buf_[x], H, W, buf_[a], buf_[b]); // b: scratch, M x cout <= big
                H *= 2, W *= 2;
                x = a;
                check_cancel(cancel);
            }
        }
        group_norm(norm_out_, buf_[x], H, W, buf_[x], true);
        int a, b;
        others(x, &a, &b);
        (void)b;
        conv_same(conv_out_, buf_[x], H, W, buf_[a], false);
        k_unpad<<<blocks_for(out_n), kThreads, 0, stream_>>>(buf_[a], H, W, cfg_.out_channels, out_d);
        launch_check("unpad");
        DIMOO_CUDA(cudaMemcpyAsync(out, out_d, sizeof(float) * size_t(out_n), cudaMemcpyDeviceToHost, stream_));
        DIMOO_CUDA(cudaStreamSynchronize(stream_));
    }

    // The encoder: pixels (H, W, in_channels) -> conv_in -> down stages ->
    // mid -> norm_out + SiLU -> conv_out -> quant_conv -> latent (H/f, W/f,
    // vq_embed_dim), the CPU's walk op for op.
    // The latent goes to `latent`, or its nearest codebook rows to `codes`.
    void encode(const float *pixels, int H, int W, float *latent, int32_t *codes, const std::atomic<bool> &cancel) {
        DIMOO_CUDA(cudaSetDevice(device_));
        const int L = cfg_.n_levels, D = cfg_.vq_embed_dim, Cl = cfg_.latent_channels, Cin = cfg_.in_channels;
        const int Cm = cfg_.block_out_channels[L - 1];
        auto padded = [](int h, int w) { return int64_t(h + 2) * (w + 2); };
        // The largest activation and the largest patch matrix of the walk.
        int64_t big = padded(H, W) * std::max(Cin, enc_in_.cout), col = 1;
        int h = H, w = W;
        for (const DDownStage &st : enc_down_) {
            for (const DResnet &r : st.resnets) big = std::max(big, padded(h, w) * std::max(r.conv1.cin, r.conv1.cout));
            if (st.has_down) {
                const int ho = (h - 2) / 2 + 1, wo = (w - 2) / 2 + 1;
                col = std::max(col, int64_t(ho) * wo * 9 * st.down.cin);
                big = std::max(big, padded(ho, wo) * st.down.cout);
                h = ho, w = wo;
            }
        }
        big = std::max(big, padded(h, w) * std::max({Cm, Cl, D}));
        const int64_t n = int64_t(h) * w, in_n = int64_t(H) * W * Cin, out_n = n * D;
        // The codebook search's scores in chunks of rows (at most 2^22 floats, as the CPU).
        const int E = cfg_.num_vq_embeddings;
        const int64_t chunk = codes ? std::max<int64_t>(1, std::min<int64_t>(n, (int64_t(1) << 22) / E)) : 0;
        std::unique_ptr<DeviceBuffer> mem;
        auto ext = carve(mem, big, enc_mid_, h, w,
                         {size_t(col) * 4, size_t(in_n) * 4, size_t(out_n) * 4, size_t(chunk) * E * 4, size_t(n) * 4});
        Drain drain{stream_};
        float *cols = ext[0], *in = ext[1], *out_d = ext[2], *scores = ext[3];
        int32_t *codes_d = reinterpret_cast<int32_t *>(ext[4]);

        DIMOO_CUDA(cudaMemcpyAsync(in, pixels, sizeof(float) * size_t(in_n), cudaMemcpyHostToDevice, stream_));
        k_pad<<<blocks_for(padded(H, W) * Cin), kThreads, 0, stream_>>>(in, H, W, Cin, buf_[0]);
        launch_check("pad");
        conv_same(enc_in_, buf_[0], H, W, buf_[1], false);
        check_cancel(cancel);
        int x = 1;
        for (const DDownStage &st : enc_down_) {
            for (const DResnet &r : st.resnets) {
                int a, b;
                others(x, &a, &b);
                x = resnet(r, x, a, b, H, W);
                check_cancel(cancel);
            }
            if (st.has_down) {
                int a, b;
                others(x, &a, &b);
                conv_down(st.down, buf_[x], H, W, buf_[a], buf_[b], cols);
                H = (H - 2) / 2 + 1, W = (W - 2) / 2 + 1;
                x = a;
                check_cancel(cancel);
            }
        }
        x = mid_block(enc_mid_, x, H, W, cancel);
        group_norm(enc_norm_out_, buf_[x], H, W, buf_[x], true);
        int a, b;
        others(x, &a, &b);
        conv_same(enc_out_, buf_[x], H, W, buf_[a], false);
        conv_same(quant_conv_, buf_[a], H, W, buf_[b], false);
        k_unpad<<<blocks_for(out_n), kThreads, 0, stream_>>>(buf_[b], H, W, D, out_d);
        launch_check("unpad");
        if (!codes) {
            DIMOO_CUDA(cudaMemcpyAsync(latent, out_d, sizeof(float) * size_t(out_n), cudaMemcpyDeviceToHost, stream_));
            DIMOO_CUDA(cudaStreamSynchronize(stream_));
            return;
        }
        for (int64_t r0 = 0; r0 < n; r0 += chunk) {
            const int64_t rows = std::min(chunk, n - r0);
            gemm_nt(rows, E, D, out_d + r0 * D, D, book_, D, scores, E, 0.0f);
            k_nearest<<<unsigned(rows), kThreads, 0, stream_>>>(out_d + r0 * D, scores, book_, code_sq_, code_sq_max_,
                                                                E, D, codes_d + r0);
            launch_check("nearest codebook row");
        }
        DIMOO_CUDA(cudaMemcpyAsync(codes, codes_d, sizeof(int32_t) * size_t(n), cudaMemcpyDeviceToHost, stream_));
        DIMOO_CUDA(cudaStreamSynchronize(stream_));
    }

    int device_;
    dimoo_vq_config cfg_;
    std::unique_ptr<DeviceBuffer> weights_;
    int64_t bytes_ = 0;
    const float *book_ = nullptr, *code_sq_ = nullptr;
    std::vector<float> code_sq_host_;
    float code_sq_max_ = 0;
    DConv post_quant_, conv_in_, conv_out_;
    DMid mid_;
    std::vector<DStage> up_;
    DNorm norm_out_;
    // encoder
    DConv enc_in_, enc_out_, quant_conv_;
    std::vector<DDownStage> enc_down_;
    DMid enc_mid_;
    DNorm enc_norm_out_;
    cudaStream_t stream_ = nullptr;
    cublasHandle_t blas_ = nullptr;
    // Per call (valid during run()).
    float *buf_[3] = {};
    float *att_ = nullptr, *gn_ = nullptr;
    double *stats_ = nullptr;
    float *coef_ = nullptr; // GroupNorm scale | shift, per channel
    int64_t att_block_ = 1;
};

} // namespace

std::unique_ptr<VqDevice> make_cuda_vq(const vq::Model &m, int device) {
    DIMOO_CHECK_ARG(m.finalized(), "make_cuda_vq: the VQ model is not finalized");
    return std::make_unique<CudaVq>(m, device);
}

} // namespace dimoo
