// vq_api.cpp - the extern "C" surface of the VQ-VAE (dimoo_vq_*). Like
// api.cpp, every function catches everything: dimoo::Error becomes its status,
// std::bad_alloc OUT_OF_MEMORY, anything else INTERNAL, each with a message
// stored on the handle.
#include <omp.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "backend.h"
#include "common.h"
#include "guard.h"
#include "dimoo.h"
#include "vq/vq.h"

namespace dimoo {
// Defined in api.cpp, which owns struct dimoo_runtime.
int32_t runtime_backend_id(const dimoo_runtime *rt);
int32_t runtime_threads(const dimoo_runtime *rt);
Backend *runtime_backend(dimoo_runtime *rt);
} // namespace dimoo

struct dimoo_vq {
    dimoo_runtime *rt = nullptr;
    int32_t n_threads = 0; // 0: every core
    std::unique_ptr<dimoo::vq::Model> impl;
    // The decoder on the runtime's device (made at finalize), or null: the
    // host CPU decodes.
    std::unique_ptr<dimoo::VqDevice> dev;
    bool ready = false; // finalized, and the device decoder (if any) made
    std::atomic<bool> cancel{false};
    std::string err;
};

namespace {

using dimoo::copy_err;
using dimoo::guard;

// Sets the calling thread's OpenMP team size for the scope of a call.
class ThreadScope {
public:
    explicit ThreadScope(int n) : saved_(omp_get_max_threads()) {
        if (n > 0) omp_set_num_threads(n);
    }
    ~ThreadScope() { omp_set_num_threads(saved_); }
    ThreadScope(const ThreadScope &) = delete;
    ThreadScope &operator=(const ThreadScope &) = delete;

private:
    int saved_;
};

// Sides and buffer of an encode/decode call; `who` starts the messages.
constexpr int64_t kMaxSide = 1 << 15;
constexpr int64_t kMaxPixels = int64_t(1) << 28;

void check_ready(const dimoo_vq *vq) { DIMOO_CHECK_ARG(vq->ready, "the VQ model is not finalized"); }

// h x w grid decoding to (h*f) x (w*f) pixels.
void check_grid(const dimoo_vq *vq, const char *who, int32_t h, int32_t w) {
    const int64_t f = vq->impl->factor();
    DIMOO_CHECK_ARG(h > 0 && w > 0, std::string(who) + ": grid " + std::to_string(h) + "x" + std::to_string(w) +
                                         " must have positive sides");
    DIMOO_CHECK_ARG(int64_t(h) * f <= kMaxSide && int64_t(w) * f <= kMaxSide &&
                        int64_t(h) * f * int64_t(w) * f <= kMaxPixels,
                    std::string(who) + ": grid " + std::to_string(h) + "x" + std::to_string(w) +
                        " decodes to an image larger than the supported 2^28 pixels (sides <= 32768)");
}

// H x W image encoding to (H/f) x (W/f) cells.
void check_image(const dimoo_vq *vq, const char *who, int32_t H, int32_t W) {
    const int32_t f = vq->impl->factor();
    const std::string size = std::to_string(H) + "x" + std::to_string(W);
    DIMOO_CHECK_ARG(H > 0 && W > 0, std::string(who) + ": image " + size + " must have positive sides");
    DIMOO_CHECK_ARG(H % f == 0 && W % f == 0, std::string(who) + ": image " + size +
                                                  " (height x width) is not a multiple of the downsampling factor " +
                                                  std::to_string(f) + " in both sides");
    DIMOO_CHECK_ARG(H <= kMaxSide && W <= kMaxSide && int64_t(H) * W <= kMaxPixels,
                    std::string(who) + ": image " + size + " is larger than the supported 2^28 pixels (sides <= 32768)");
}

} // namespace

extern "C" {

int32_t dimoo_vq_create(dimoo_runtime *rt, const dimoo_vq_config *cfg, dimoo_vq **out, char *err, size_t err_len) {
    std::string msg;
    int32_t st = guard(&msg, [&] {
        DIMOO_CHECK_ARG(rt && cfg && out, "NULL argument");
        *out = nullptr;
        auto vq = std::make_unique<dimoo_vq>();
        vq->rt = rt;
        vq->n_threads = dimoo::runtime_backend_id(rt) == DIMOO_BACKEND_CPU ? dimoo::runtime_threads(rt) : 0;
        vq->impl = std::make_unique<dimoo::vq::Model>(*cfg);
        *out = vq.release();
    });
    copy_err(msg, err, err_len);
    return st;
}

void dimoo_vq_destroy(dimoo_vq *vq) { delete vq; }

const char *dimoo_vq_error(const dimoo_vq *vq) { return vq ? vq->err.c_str() : "vq is NULL"; }

int32_t dimoo_vq_set_weight(dimoo_vq *vq, const char *name, int32_t dtype, const int64_t *shape, int32_t ndim,
                            const void *data, uint64_t nbytes) {
    if (!vq) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&vq->err, [&] {
        DIMOO_CHECK_ARG(name && (shape || ndim == 0) && data, "NULL argument");
        DIMOO_CHECK_ARG(ndim >= 0 && ndim <= 8, std::string(name) + ": ndim " + std::to_string(ndim) + " out of range");
        std::vector<int64_t> got(shape, shape + ndim);
        vq->impl->set_weight(name, dtype, got, data, nbytes);
    });
}

int32_t dimoo_vq_finalize(dimoo_vq *vq) {
    if (!vq) return DIMOO_ERR_INVALID_ARGUMENT;
    return guard(&vq->err, [&] {
        if (vq->ready) return;
        vq->impl->finalize(); // a no-op when an earlier call got this far
        // A device that cannot take the decoder (DEVICE_OUT_OF_MEMORY, ...)
        // fails the call and leaves the handle unfinalized; a retry tries
        // the device again.
        if (dimoo::Backend *be = dimoo::runtime_backend(vq->rt)) vq->dev = be->create_vq(*vq->impl);
        vq->ready = true;
    });
}

int64_t dimoo_vq_weight_bytes(const dimoo_vq *vq) { return vq ? vq->impl->weight_bytes() : 0; }

void dimoo_vq_cancel(dimoo_vq *vq) {
    if (vq) vq->cancel.store(true);
}

int32_t dimoo_vq_decode(dimoo_vq *vq, const int32_t *codes, int32_t h, int32_t w, float *out) {
    if (!vq) return DIMOO_ERR_INVALID_ARGUMENT;
    vq->cancel.store(false);
    return guard(&vq->err, [&] {
        check_ready(vq);
        DIMOO_CHECK_ARG(codes && out, "decode: NULL buffer");
        check_grid(vq, "decode", h, w);
        const int32_t n = vq->impl->config().num_vq_embeddings;
        for (int64_t i = 0; i < int64_t(h) * w; i++)
            if (codes[i] < 0 || codes[i] >= n)
                dimoo::fail(DIMOO_ERR_INVALID_ARGUMENT,
                            "decode: code " + std::to_string(codes[i]) + " at row " + std::to_string(i / w) +
                                ", column " + std::to_string(i % w) + " is outside the codebook [0, " +
                                std::to_string(n) + ")");
        if (vq->dev) return vq->dev->decode(codes, h, w, out, vq->cancel);
        ThreadScope ts(vq->n_threads);
        vq->impl->decode(codes, h, w, out, vq->cancel);
    });
}

int32_t dimoo_vq_decode_latent(dimoo_vq *vq, const float *latent, int32_t h, int32_t w, float *out) {
    if (!vq) return DIMOO_ERR_INVALID_ARGUMENT;
    vq->cancel.store(false);
    return guard(&vq->err, [&] {
        check_ready(vq);
        DIMOO_CHECK_ARG(latent && out, "decode_latent: NULL buffer");
        check_grid(vq, "decode_latent", h, w);
        if (vq->dev) return vq->dev->decode_latent(latent, h, w, out, vq->cancel);
        ThreadScope ts(vq->n_threads);
        vq->impl->decode_latent(latent, h, w, out, vq->cancel);
    });
}

int32_t dimoo_vq_encode(dimoo_vq *vq, const float *pixels, int32_t H, int32_t W, int32_t *codes) {
    if (!vq) return DIMOO_ERR_INVALID_ARGUMENT;
    vq->cancel.store(false);
    return guard(&vq->err, [&] {
        check_ready(vq);
        DIMOO_CHECK_ARG(pixels && codes, "encode: NULL buffer");
        check_image(vq, "encode", H, W);
        if (vq->dev) return vq->dev->encode(pixels, H, W, codes, vq->cancel);
        ThreadScope ts(vq->n_threads);
        vq->impl->encode(pixels, H, W, codes, vq->cancel);
    });
}

int32_t dimoo_vq_encode_latent(dimoo_vq *vq, const float *pixels, int32_t H, int32_t W, float *latent) {
    if (!vq) return DIMOO_ERR_INVALID_ARGUMENT;
    vq->cancel.store(false);
    return guard(&vq->err, [&] {
        check_ready(vq);
        DIMOO_CHECK_ARG(pixels && latent, "encode_latent: NULL buffer");
        check_image(vq, "encode_latent", H, W);
        if (vq->dev) return vq->dev->encode_latent(pixels, H, W, latent, vq->cancel);
        ThreadScope ts(vq->n_threads);
        vq->impl->encode_latent(pixels, H, W, latent, vq->cancel);
    });
}

} // extern "C"
