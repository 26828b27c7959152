// vq_model.cpp - diffusers' VQModel network on the CPU: the config check, the
// weight slots named as the checkpoint names them, and the encoder, the
// decoder and the codebook search built from ops.cpp.
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/gemm.h"
#include "vq/vq.h"

namespace dimoo::vq {
namespace {

constexpr int kMaxChannels = 1 << 16;
constexpr int kMaxCodes = 1 << 24;
constexpr float kNormEps = 1e-6f; // every GroupNorm of diffusers' VAE blocks

std::string shape_str(const std::vector<int64_t> &v) {
    std::string s = "(";
    for (size_t i = 0; i < v.size(); i++) s += (i ? ", " : "") + std::to_string(v[i]);
    return s + ")";
}

void check_cancel(const std::atomic<bool> &cancel) {
    if (cancel.load(std::memory_order_relaxed)) fail(DIMOO_ERR_CANCELLED, "cancelled");
}

} // namespace

// ---- config and weight slots ------------------------------------------------------------

Model::Model(const dimoo_vq_config &c) : cfg_(c) {
    auto in_range = [](int32_t v, int32_t lo, int32_t hi) { return v >= lo && v <= hi; };
    const std::string who = "vq config: ";
    DIMOO_CHECK_ARG(in_range(c.in_channels, 1, kMaxChannels), who + "in_channels must be in [1, 65536]");
    DIMOO_CHECK_ARG(in_range(c.out_channels, 1, kMaxChannels), who + "out_channels must be in [1, 65536]");
    DIMOO_CHECK_ARG(in_range(c.latent_channels, 1, kMaxChannels), who + "latent_channels must be in [1, 65536]");
    DIMOO_CHECK_ARG(in_range(c.num_vq_embeddings, 1, kMaxCodes), who + "num_vq_embeddings must be in [1, 2^24]");
    DIMOO_CHECK_ARG(in_range(c.vq_embed_dim, 0, kMaxChannels),
                    who + "vq_embed_dim must be in [0, 65536] (0: latent_channels)");
    DIMOO_CHECK_ARG(in_range(c.norm_num_groups, 1, kMaxChannels), who + "norm_num_groups must be positive");
    DIMOO_CHECK_ARG(in_range(c.layers_per_block, 1, 64), who + "layers_per_block must be in [1, 64]");
    DIMOO_CHECK_ARG(in_range(c.n_levels, 1, DIMOO_VQ_MAX_LEVELS),
                    who + "n_levels must be in [1, " + std::to_string(DIMOO_VQ_MAX_LEVELS) + "]");
    for (int i = 0; i < c.n_levels; i++) {
        const int32_t ch = c.block_out_channels[i];
        const std::string at = who + "block_out_channels[" + std::to_string(i) + "] = " + std::to_string(ch);
        DIMOO_CHECK_ARG(in_range(ch, 1, kMaxChannels), at + " must be in [1, 65536]");
        DIMOO_CHECK_ARG(ch % c.norm_num_groups == 0,
                        at + " is not a multiple of norm_num_groups " + std::to_string(c.norm_num_groups));
    }
    DIMOO_CHECK_ARG(c.mid_block_add_attention == 0 || c.mid_block_add_attention == 1,
                    who + "mid_block_add_attention must be 0 or 1");
    if (c.norm_type == DIMOO_VQ_NORM_SPATIAL)
        fail(DIMOO_ERR_UNSUPPORTED, who + "norm_type \"spatial\" (SpatialNorm in the decoder) is not implemented");
    DIMOO_CHECK_ARG(c.norm_type == DIMOO_VQ_NORM_GROUP, who + "unknown norm_type " + std::to_string(c.norm_type));
    if (cfg_.vq_embed_dim == 0) cfg_.vq_embed_dim = c.latent_channels;
    for (int i = c.n_levels; i < DIMOO_VQ_MAX_LEVELS; i++) cfg_.block_out_channels[i] = 0;

    const int L = c.n_levels, lp = c.layers_per_block;
    const int32_t *ch = cfg_.block_out_channels;
    // Encoder.
    add_conv("encoder.conv_in", enc_in_, c.in_channels, ch[0], 3);
    enc_down_.resize(size_t(L));
    for (int i = 0; i < L; i++) {
        Stage &s = enc_down_[size_t(i)];
        const std::string p = "encoder.down_blocks." + std::to_string(i);
        const int cin = i == 0 ? ch[0] : ch[i - 1], cout = ch[i];
        s.resnets.resize(size_t(lp));
        for (int j = 0; j < lp; j++)
            add_resnet(p + ".resnets." + std::to_string(j), s.resnets[size_t(j)], j == 0 ? cin : cout, cout);
        s.has_resample = i < L - 1;
        if (s.has_resample) add_conv(p + ".downsamplers.0.conv", s.resample, cout, cout, 3);
    }
    add_mid("encoder.mid_block", enc_mid_, ch[L - 1]);
    add_norm("encoder.conv_norm_out", enc_norm_out_, ch[L - 1]);
    add_conv("encoder.conv_out", enc_out_, ch[L - 1], c.latent_channels, 3);
    add_conv("quant_conv", quant_conv_, c.latent_channels, cfg_.vq_embed_dim, 1);
    // Quantizer.
    {
        Slot s;
        s.shape = {c.num_vq_embeddings, cfg_.vq_embed_dim};
        s.dst = &codebook_;
        s.conv = false;
        order_.push_back("quantize.embedding.weight");
        slots_["quantize.embedding.weight"] = s;
    }
    // Decoder: block_out_channels reversed, layers_per_block + 1 resnets per stage.
    add_conv("post_quant_conv", post_quant_conv_, cfg_.vq_embed_dim, c.latent_channels, 1);
    add_conv("decoder.conv_in", dec_in_, c.latent_channels, ch[L - 1], 3);
    add_mid("decoder.mid_block", dec_mid_, ch[L - 1]);
    dec_up_.resize(size_t(L));
    for (int i = 0; i < L; i++) {
        Stage &s = dec_up_[size_t(i)];
        const std::string p = "decoder.up_blocks." + std::to_string(i);
        const int cin = i == 0 ? ch[L - 1] : ch[L - i], cout = ch[L - 1 - i];
        s.resnets.resize(size_t(lp + 1));
        for (int j = 0; j <= lp; j++)
            add_resnet(p + ".resnets." + std::to_string(j), s.resnets[size_t(j)], j == 0 ? cin : cout, cout);
        s.has_resample = i < L - 1;
        if (s.has_resample) add_conv(p + ".upsamplers.0.conv", s.resample, cout, cout, 3);
    }
    add_norm("decoder.conv_norm_out", dec_norm_out_, ch[0]);
    add_conv("decoder.conv_out", dec_out_, ch[0], c.out_channels, 3);
}

void Model::add_conv(const std::string &name, Conv2d &c, int cin, int cout, int k) {
    c.cin = cin, c.cout = cout, c.k = k;
    Slot w{{cout, cin, k, k}, &c.w, k > 1};
    Slot b{{cout}, &c.b, false};
    order_.push_back(name + ".weight");
    slots_[name + ".weight"] = w;
    order_.push_back(name + ".bias");
    slots_[name + ".bias"] = b;
}

void Model::add_norm(const std::string &name, GroupNorm &g, int c) {
    g.c = c, g.groups = cfg_.norm_num_groups, g.eps = kNormEps;
    order_.push_back(name + ".weight");
    slots_[name + ".weight"] = Slot{{c}, &g.gamma, false};
    order_.push_back(name + ".bias");
    slots_[name + ".bias"] = Slot{{c}, &g.beta, false};
}

void Model::add_linear(const std::string &name, Linear &l, int in, int out) {
    l.in = in, l.out = out;
    order_.push_back(name + ".weight");
    slots_[name + ".weight"] = Slot{{out, in}, &l.w, false};
    order_.push_back(name + ".bias");
    slots_[name + ".bias"] = Slot{{out}, &l.b, false};
}

void Model::add_resnet(const std::string &name, Resnet &r, int cin, int cout) {
    add_norm(name + ".norm1", r.norm1, cin);
    add_conv(name + ".conv1", r.conv1, cin, cout, 3);
    add_norm(name + ".norm2", r.norm2, cout);
    add_conv(name + ".conv2", r.conv2, cout, cout, 3);
    r.has_shortcut = cin != cout;
    if (r.has_shortcut) add_conv(name + ".conv_shortcut", r.shortcut, cin, cout, 1);
}

void Model::add_mid(const std::string &name, MidBlock &m, int c) {
    add_resnet(name + ".resnets.0", m.r0, c, c);
    m.has_attn = cfg_.mid_block_add_attention != 0;
    if (m.has_attn) {
        const std::string a = name + ".attentions.0";
        add_norm(a + ".group_norm", m.attn.norm, c);
        add_linear(a + ".to_q", m.attn.q, c, c);
        add_linear(a + ".to_k", m.attn.k, c, c);
        add_linear(a + ".to_v", m.attn.v, c, c);
        add_linear(a + ".to_out.0", m.attn.o, c, c);
    }
    add_resnet(name + ".resnets.1", m.r1, c, c);
}

std::vector<std::string> Model::weight_names() const { return order_; }

std::vector<int64_t> Model::weight_shape(const std::string &name) const {
    auto it = slots_.find(name);
    return it == slots_.end() ? std::vector<int64_t>{} : it->second.shape;
}

void Model::set_weight(const std::string &name, int32_t dtype, const std::vector<int64_t> &shape, const void *data,
                       uint64_t nbytes) {
    DIMOO_CHECK_ARG(!finalized_, "the VQ model is finalized; weights can no longer change");
    auto it = slots_.find(name);
    if (it == slots_.end())
        fail(DIMOO_ERR_BAD_WEIGHTS, name + ": not a tensor of this VQ model config");
    Slot &s = it->second;
    if (dtype_size(dtype) == 0)
        fail(DIMOO_ERR_BAD_WEIGHTS, name + ": unsupported dtype code " + std::to_string(dtype));
    if (shape != s.shape)
        fail(DIMOO_ERR_BAD_WEIGHTS, name + ": shape " + shape_str(shape) + " but the config implies " +
                                        shape_str(s.shape));
    uint64_t n = 1;
    for (auto d : s.shape) n *= uint64_t(d);
    if (n * dtype_size(dtype) != nbytes)
        fail(DIMOO_ERR_BAD_WEIGHTS, name + ": " + std::to_string(nbytes) + " bytes for " + std::to_string(n) + " " +
                                        dtype_name(dtype) + " values");
    std::vector<float> &dst = *s.dst;
    dst.resize(size_t(n));
    const auto *bytes = static_cast<const uint8_t *>(data);
    // Element i of the tensor as stored (the data may be unaligned).
    auto load = [&](size_t i) -> float {
        if (dtype == DIMOO_F32) {
            float f;
            std::memcpy(&f, bytes + 4 * i, 4);
            return f;
        }
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        return dtype == DIMOO_F16 ? f16_to_f32(h) : bf16_to_f32(h);
    };
    if (!s.conv) {
        for (size_t i = 0; i < size_t(n); i++) dst[i] = load(i);
    } else { // (cout, cin, ky, kx) -> (cout, ky, kx, cin)
        const int64_t co = s.shape[0], ci = s.shape[1], kh = s.shape[2], kw = s.shape[3];
        for (int64_t o = 0; o < co; o++)
            for (int64_t i = 0; i < ci; i++)
                for (int64_t y = 0; y < kh; y++)
                    for (int64_t x = 0; x < kw; x++)
                        dst[size_t(((o * kh + y) * kw + x) * ci + i)] = load(size_t(((o * ci + i) * kh + y) * kw + x));
    }
    s.present = true;
}

void Model::finalize() {
    if (finalized_) return;
    std::string missing;
    int n_missing = 0;
    for (const auto &name : order_)
        if (!slots_.at(name).present && n_missing++ < 5) missing += (missing.empty() ? "" : ", ") + name;
    if (n_missing)
        fail(DIMOO_ERR_BAD_WEIGHTS, std::to_string(n_missing) + " VQ tensor(s) missing: " + missing +
                                        (n_missing > 5 ? ", ..." : ""));
    for (Stage &s : dec_up_)
        if (s.has_resample) prepare_upsample(s.resample);
    const int E = cfg_.num_vq_embeddings, D = cfg_.vq_embed_dim;
    code_sq_.resize(size_t(E));
    code_sq_max_ = 0;
    for (int j = 0; j < E; j++) {
        double s = 0;
        for (int d = 0; d < D; d++) s += double(codebook_[size_t(j) * D + d]) * codebook_[size_t(j) * D + d];
        code_sq_[size_t(j)] = float(s);
        code_sq_max_ = std::max(code_sq_max_, float(s));
    }
    finalized_ = true;
}

int64_t Model::weight_bytes() const {
    int64_t b = 0;
    for (const auto &kv : slots_) b += int64_t(kv.second.dst->size() * sizeof(float));
    for (const Stage &s : dec_up_) b += int64_t(s.resample.up.size() * sizeof(float)); // prepare_upsample's
    return b;
}

// ---- forward -----------------------------------------------------------------------------

Model::Buf Model::run_resnet(const Resnet &r, const float *x, int H, int W) const {
    const size_t rows = padded_rows(H, W);
    const int cin = r.conv1.cin, cout = r.conv1.cout;
    Buf h(activation(rows * cout));
    {
        Buf t(activation(rows * cin));
        group_norm(r.norm1, x, H, W, t.get(), true);
        conv2d(r.conv1, t.get(), H, W, h.get(), ConvMode::Same, false);
    }
    group_norm(r.norm2, h.get(), H, W, h.get(), true);
    Buf out(activation(rows * cout));
    if (r.has_shortcut) {
        conv2d(r.shortcut, x, H, W, out.get(), ConvMode::Same, false);
    } else {
        std::memcpy(out.get(), x, sizeof(float) * rows * cout);
    }
    conv2d(r.conv2, h.get(), H, W, out.get(), ConvMode::Same, true);
    return out;
}

Model::Buf Model::run_mid(const MidBlock &m, Buf x, int H, int W, const std::atomic<bool> &cancel) const {
    x = run_resnet(m.r0, x.get(), H, W);
    check_cancel(cancel);
    if (m.has_attn) {
        const int C = m.attn.norm.c;
        const size_t n = size_t(H) * W;
        Buf a(activation(n * C)), b(activation(n * C));
        unpad(x.get(), H, W, C, a.get());
        attention(m.attn, a.get(), int(n), b.get());
        pad(b.get(), H, W, C, x.get());
        check_cancel(cancel);
    }
    x = run_resnet(m.r1, x.get(), H, W);
    check_cancel(cancel);
    return x;
}

void Model::decode_latent(const float *z, int h, int w, float *out, const std::atomic<bool> &cancel) const {
    const Scratch scratch; // before any activation
    const int L = cfg_.n_levels, D = cfg_.vq_embed_dim;
    int H = h, W = w;
    Buf x;
    {
        Buf zp(activation(padded_rows(H, W) * D));
        pad(z, H, W, D, zp.get());
        Buf q(activation(padded_rows(H, W) * cfg_.latent_channels));
        conv2d(post_quant_conv_, zp.get(), H, W, q.get(), ConvMode::Same, false);
        x = activation(padded_rows(H, W) * cfg_.block_out_channels[L - 1]);
        conv2d(dec_in_, q.get(), H, W, x.get(), ConvMode::Same, false);
    }
    check_cancel(cancel);
    x = run_mid(dec_mid_, std::move(x), H, W, cancel);
    for (const Stage &s : dec_up_) {
        for (const Resnet &r : s.resnets) {
            x = run_resnet(r, x.get(), H, W);
            check_cancel(cancel);
        }
        if (s.has_resample) {
            Buf y(activation(padded_rows(2 * H, 2 * W) * s.resample.cout));
            conv2d(s.resample, x.get(), H, W, y.get(), ConvMode::Up, false);
            x = std::move(y);
            H *= 2, W *= 2;
            check_cancel(cancel);
        }
    }
    group_norm(dec_norm_out_, x.get(), H, W, x.get(), true);
    Buf o(activation(padded_rows(H, W) * cfg_.out_channels));
    conv2d(dec_out_, x.get(), H, W, o.get(), ConvMode::Same, false);
    unpad(o.get(), H, W, cfg_.out_channels, out);
}

void Model::decode(const int32_t *codes, int h, int w, float *out, const std::atomic<bool> &cancel) const {
    const Scratch scratch; // before any activation
    const int D = cfg_.vq_embed_dim;
    const int64_t P = int64_t(h) * w;
    Buf z(activation(size_t(P) * D));
    for (int64_t i = 0; i < P; i++)
        std::memcpy(z.get() + i * D, codebook_.data() + size_t(codes[i]) * D, sizeof(float) * size_t(D));
    decode_latent(z.get(), h, w, out, cancel);
}

void Model::encode_latent(const float *pixels, int H, int W, float *latent, const std::atomic<bool> &cancel) const {
    const Scratch scratch; // before any activation
    const int32_t *ch = cfg_.block_out_channels;
    Buf x(activation(padded_rows(H, W) * ch[0]));
    {
        Buf p(activation(padded_rows(H, W) * cfg_.in_channels));
        pad(pixels, H, W, cfg_.in_channels, p.get());
        conv2d(enc_in_, p.get(), H, W, x.get(), ConvMode::Same, false);
    }
    check_cancel(cancel);
    for (const Stage &s : enc_down_) {
        for (const Resnet &r : s.resnets) {
            x = run_resnet(r, x.get(), H, W);
            check_cancel(cancel);
        }
        if (s.has_resample) {
            int Ho = 0, Wo = 0;
            conv_out_size(ConvMode::Down, H, W, &Ho, &Wo);
            Buf y(activation(padded_rows(Ho, Wo) * s.resample.cout));
            conv2d(s.resample, x.get(), H, W, y.get(), ConvMode::Down, false);
            x = std::move(y);
            H = Ho, W = Wo;
            check_cancel(cancel);
        }
    }
    x = run_mid(enc_mid_, std::move(x), H, W, cancel);
    group_norm(enc_norm_out_, x.get(), H, W, x.get(), true);
    Buf z(activation(padded_rows(H, W) * cfg_.latent_channels));
    conv2d(enc_out_, x.get(), H, W, z.get(), ConvMode::Same, false);
    Buf q(activation(padded_rows(H, W) * cfg_.vq_embed_dim));
    conv2d(quant_conv_, z.get(), H, W, q.get(), ConvMode::Same, false);
    unpad(q.get(), H, W, cfg_.vq_embed_dim, latent);
}

void Model::quantize(const float *latent, int n, int32_t *codes) const {
    const Scratch scratch; // before any activation
    const int E = cfg_.num_vq_embeddings, D = cfg_.vq_embed_dim;
    // score_j = |e_j|^2 - 2 x.e_j ranks rows like |x - e_j|^2. Rows whose float
    // score is within the GEMM's rounding of the best are re-ranked by the exact
    // distance in double, so the result is the true nearest row, lowest index
    // on a tie.
    const int chunk = int(std::max<int64_t>(1, std::min<int64_t>(n, (int64_t(1) << 22) / E)));
    Buf s(activation(size_t(chunk) * E));
    for (int i0 = 0; i0 < n; i0 += chunk) {
        const int rows = std::min(chunk, n - i0);
        cpu::gemm_nt(rows, E, D, latent + size_t(i0) * D, D, codebook_.data(), DIMOO_F32, D, s.get(), E, false);
#pragma omp parallel for schedule(static)
        for (int r = 0; r < rows; r++) {
            const float *x = latent + size_t(i0 + r) * D;
            float *sr = s.get() + size_t(r) * E;
            double xsq = 0;
            for (int d = 0; d < D; d++) xsq += double(x[d]) * x[d];
            float best = std::numeric_limits<float>::infinity();
            for (int j = 0; j < E; j++) {
                sr[j] = code_sq_[size_t(j)] - 2.0f * sr[j];
                best = std::min(best, sr[j]);
            }
            const float tol = 8.0f * float(D) * FLT_EPSILON * (float(xsq) + code_sq_max_) + FLT_MIN;
            int32_t arg = -1;
            double arg_d = 0;
            for (int j = 0; j < E; j++) {
                if (!(sr[j] <= best + tol)) continue;
                const float *e = codebook_.data() + size_t(j) * D;
                double d2 = 0;
                for (int d = 0; d < D; d++) {
                    const double t = double(x[d]) - double(e[d]);
                    d2 += t * t;
                }
                if (arg < 0 || d2 < arg_d) arg = j, arg_d = d2;
            }
            if (arg < 0) { // NaN latents: fall back to a plain scan
                arg = 0;
                for (int j = 1; j < E; j++)
                    if (sr[j] < sr[arg]) arg = j;
            }
            codes[i0 + r] = arg;
        }
    }
}

void Model::encode(const float *pixels, int H, int W, int32_t *codes, const std::atomic<bool> &cancel) const {
    const Scratch scratch; // before any activation
    const int f = factor();
    const int n = (H / f) * (W / f);
    Buf z(activation(size_t(n) * cfg_.vq_embed_dim));
    encode_latent(pixels, H, W, z.get(), cancel);
    quantize(z.get(), n, codes);
}

} // namespace dimoo::vq
