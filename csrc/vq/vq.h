// vq.h - the VQ-VAE (diffusers VQModel) on the CPU: its building blocks
// (ops.cpp) and the encoder/decoder network with its weight registry
// (vq_model.cpp). vq_api.cpp puts the C ABI in front of it.
//
// Activations are channels-last fp32 (pixel-major rows of C floats) with a
// zero border, see below. Convolutions are GEMMs (cpu/gemm.h): 3x3 ones as
// Winograd F(4x4, 3x3) on output grids of 64x64 and more, F(2x2, 3x3)
// below (or, with few channels, nine GEMMs over shifted views of the input);
// nearest x2 upsampling + 3x3 as F(4x4, 3x3) reading the input through the
// upsampling on the same grids, else four 2x2 sub-pixel convs; only the
// encoder's stride-2 convs gather patches. Weights are converted to fp32
// when set.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace dimoo::vq {

// ---- building blocks (ops.cpp) -------------------------------------------------
//
// Activations are "padded": an H x W image of C channels is stored as
// (H + 2) x (W + 2) rows of C floats whose one-pixel border is zero, pixel
// (y, x) at row (y + 1) * (W + 2) + x + 1, so a 3x3 convolution's taps are
// the input itself shifted by whole rows. Every op returns its output with
// the border zeroed again.

inline size_t padded_rows(int H, int W) { return size_t(H + 2) * size_t(W + 2); }

struct ScratchPool;
// Gives an activation back to the Scratch it came from (or frees it).
struct ActivationDeleter {
    std::shared_ptr<ScratchPool> pool; // null: not pooled
    size_t capacity = 0;               // floats the block holds
    void operator()(float *p) const noexcept;
};
using Activation = std::unique_ptr<float[], ActivationDeleter>;

// n floats, uninitialised, for an activation: OUT_OF_MEMORY, with the numbers,
// when the host cannot hold them (host_memory.h), rather than the OOM killer.
// Under a Scratch (on this thread) it may be a block released earlier.
Activation activation(size_t n);

// While a Scratch lives, the activations this thread releases are kept for
// its later activation() calls instead of going back to the system. A decode
// frees and allocates hundreds of MB per layer, each block large enough for
// malloc to map it fresh, so every page of it faulted again: about a
// quarter of a 512x512 decode's time on a 2-core VM. A request takes the
// smallest free block of 1 to 2 times its size; when none fits, the free
// blocks are released and a new one is made. The rest go back to the system
// when the outermost Scratch and every activation taken under it are gone; a
// Scratch made under another shares its pool. Make it before the activations
// it should serve, so they are released (into it) first.
class Scratch {
public:
    Scratch();
    ~Scratch();
    Scratch(const Scratch &) = delete;
    Scratch &operator=(const Scratch &) = delete;

private:
    bool owner_ = false;
};

// Tests: blocks a Scratch hands out again are first filled with NaN, so an
// op that reads an activation before writing it shows.
void set_scratch_poison(bool on);

// Tests and benchmarks: the Winograd tile of the 3x3 convs (stride 1, and
// the upsampling ones) with 8 or more channels in and out: 2 (F(2x2, 3x3),
// and sub-pixel convs for upsampling), 4 (F(4x4, 3x3)), or 0, the default
// (4 on output grids of 64x64 and more, else 2).
void set_winograd_tile(int tile);

// Zero the border rows/columns of a padded H x W x C buffer.
void zero_border(float *p, int H, int W, int C);
// Compact (H*W, C) -> padded, and back.
void pad(const float *x, int H, int W, int C, float *p);
void unpad(const float *p, int H, int W, int C, float *x);

// A 2D convolution, k = 1 or 3. Weights are stored (cout, k, k, cin): tap
// (ky, kx) is the (cout, cin) matrix at column (ky * k + kx) * cin.
struct Conv2d {
    int cin = 0, cout = 0, k = 1;
    std::vector<float> w;
    std::vector<float> b; // cout
    // For ConvMode::Up (prepare_upsample): nearest x2 then a 3x3 conv is, per
    // output parity (py, px), a 2x2 conv on the input; up holds those 16
    // (cout, cin) matrices, [(py * 2 + px) * 4 + dy * 2 + dx].
    std::vector<float> up;
};

// Fills c.up from c.w (a 3x3 conv).
void prepare_upsample(Conv2d &c);

enum class ConvMode {
    Same, // stride 1, zero padding k/2: (H, W) -> (H, W)
    Down, // 3x3 stride 2 after zero-padding one row at the bottom and one column
          // at the right (diffusers' Downsample2D with padding=0):
          // (H, W) -> ((H - 2) / 2 + 1, (W - 2) / 2 + 1), (H/2, W/2) for even sides
    Up,   // nearest x2 upsampling, then stride 1 pad 1: (H, W) -> (2H, 2W);
          // needs prepare_upsample
};

// Output size of conv2d for an input of H x W.
void conv_out_size(ConvMode mode, int H, int W, int *Ho, int *Wo);

// out = conv(x) + bias, both padded; with accumulate the result is added to
// out instead (Same mode only). out must not overlap x.
void conv2d(const Conv2d &c, const float *x, int H, int W, float *out, ConvMode mode, bool accumulate);

struct GroupNorm {
    int c = 0, groups = 1;
    float eps = 1e-6f;
    std::vector<float> gamma, beta; // c
};

// out = GroupNorm(x) over the H x W pixels, optionally followed by SiLU; both
// padded, out may equal x (in place).
void group_norm(const GroupNorm &g, const float *x, int H, int W, float *out, bool silu);

// x * sigmoid(x), elementwise, in place (any layout).
void silu_inplace(float *x, int64_t n);

// A dense layer: w (out, in), b (out).
struct Linear {
    int in = 0, out = 0;
    std::vector<float> w, b;
};

// diffusers' Attention as the VAE mid block uses it: group norm, one head of
// all channels, q/k/v/out projections with bias, residual connection.
struct Attention {
    GroupNorm norm;
    Linear q, k, v, o;
};

// out = x + o(softmax(q k^T / sqrt(c)) v), q/k/v of GroupNorm(x), over the
// n pixels; compact (n, c) rows, out must not overlap x.
void attention(const Attention &a, const float *x, int n, float *out);

// ---- the network (vq_model.cpp) ------------------------------------------------

struct Resnet {
    GroupNorm norm1, norm2;
    Conv2d conv1, conv2;
    bool has_shortcut = false;
    Conv2d shortcut; // 1x1, when cin != cout
};

struct MidBlock {
    Resnet r0, r1;
    bool has_attn = false;
    Attention attn;
};

struct Stage { // a DownEncoderBlock2D or UpDecoderBlock2D
    std::vector<Resnet> resnets;
    bool has_resample = false;
    Conv2d resample; // the downsampler's or upsampler's 3x3 conv
};

class Model {
public:
    // Validates the config (INVALID_ARGUMENT, UNSUPPORTED for spatial norm)
    // and lays out the weight slots.
    explicit Model(const dimoo_vq_config &cfg);
    Model(const Model &) = delete; // the slots point into the model
    Model &operator=(const Model &) = delete;

    // One checkpoint tensor by its diffusers name. BAD_WEIGHTS for an unknown
    // name, a wrong shape or byte count, or an unknown dtype.
    void set_weight(const std::string &name, int32_t dtype, const std::vector<int64_t> &shape, const void *data,
                    uint64_t nbytes);
    // BAD_WEIGHTS naming (up to five of) the missing tensors.
    void finalize();
    bool finalized() const { return finalized_; }
    int64_t weight_bytes() const;

    const dimoo_vq_config &config() const { return cfg_; }
    int factor() const { return 1 << (cfg_.n_levels - 1); }
    int embed_dim() const { return cfg_.vq_embed_dim; }

    // Decoder: z (h*w, vq_embed_dim) -> post_quant_conv -> decoder ->
    // out (h*f*w*f, out_channels), raw (unclamped). Arguments are checked by
    // the caller; `cancel` is polled between layers (CANCELLED).
    void decode_latent(const float *z, int h, int w, float *out, const std::atomic<bool> &cancel) const;
    // codes (h*w, each in [0, num_vq_embeddings)) -> codebook rows -> decode_latent.
    void decode(const int32_t *codes, int h, int w, float *out, const std::atomic<bool> &cancel) const;
    // Encoder: pixels (H*W, in_channels) -> encoder -> quant_conv ->
    // latent (H/f*W/f, vq_embed_dim).
    void encode_latent(const float *pixels, int H, int W, float *latent, const std::atomic<bool> &cancel) const;
    // encode_latent, then the nearest codebook row per cell (Euclidean; ties
    // go to the lowest index).
    void encode(const float *pixels, int H, int W, int32_t *codes, const std::atomic<bool> &cancel) const;
    // The nearest-row search alone, for n latent vectors.
    void quantize(const float *latent, int n, int32_t *codes) const;

    // Names of every weight the config implies, in checkpoint order.
    std::vector<std::string> weight_names() const;
    std::vector<int64_t> weight_shape(const std::string &name) const;

    // The decoder's weights, for a backend copying them to its device
    // (backend.h's VqDevice); valid once finalized.
    const std::vector<float> &codebook() const { return codebook_; }
    const Conv2d &post_quant_conv() const { return post_quant_conv_; }
    const Conv2d &dec_conv_in() const { return dec_in_; }
    const MidBlock &dec_mid() const { return dec_mid_; }
    const std::vector<Stage> &dec_up() const { return dec_up_; }
    const GroupNorm &dec_norm_out() const { return dec_norm_out_; }
    const Conv2d &dec_conv_out() const { return dec_out_; }
    // The encoder's, likewise.
    const Conv2d &enc_conv_in() const { return enc_in_; }
    const std::vector<Stage> &enc_down() const { return enc_down_; }
    const MidBlock &enc_mid() const { return enc_mid_; }
    const GroupNorm &enc_norm_out() const { return enc_norm_out_; }
    const Conv2d &enc_conv_out() const { return enc_out_; }
    const Conv2d &quant_conv() const { return quant_conv_; }

private:
    struct Slot {
        std::vector<int64_t> shape;
        std::vector<float> *dst;
        bool conv; // (cout, cin, k, k) stored as (cout, k, k, cin)
        bool present = false;
    };

    void add_conv(const std::string &name, Conv2d &c, int cin, int cout, int k);
    void add_norm(const std::string &name, GroupNorm &g, int c);
    void add_linear(const std::string &name, Linear &l, int in, int out);
    void add_resnet(const std::string &name, Resnet &r, int cin, int cout);
    void add_mid(const std::string &name, MidBlock &m, int c);

    using Buf = Activation; // uninitialised when made
    Buf run_resnet(const Resnet &r, const float *x, int H, int W) const;
    Buf run_mid(const MidBlock &m, Buf x, int H, int W, const std::atomic<bool> &cancel) const;

    dimoo_vq_config cfg_;
    bool finalized_ = false;

    // encoder
    Conv2d enc_in_;
    std::vector<Stage> enc_down_;
    MidBlock enc_mid_;
    GroupNorm enc_norm_out_;
    Conv2d enc_out_;
    Conv2d quant_conv_;
    // quantizer
    std::vector<float> codebook_; // (num_vq_embeddings, vq_embed_dim)
    // decoder
    Conv2d post_quant_conv_;
    Conv2d dec_in_;
    MidBlock dec_mid_;
    std::vector<Stage> dec_up_;
    GroupNorm dec_norm_out_;
    Conv2d dec_out_;

    std::vector<float> code_sq_; // squared norm of each codebook row
    float code_sq_max_ = 0;

    std::vector<std::string> order_; // slot names in registration order
    std::map<std::string, Slot> slots_;
};

} // namespace dimoo::vq
