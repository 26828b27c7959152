/*
 * dimoo.h - the C ABI of libdimoo, the Lumina-DiMOO inference engine.
 *
 * The only public header. C only, no pointer into caller memory is kept after
 * a call returns, and nothing aborts: every fallible call returns a
 * dimoo_status, and the message for a failure is read back from the handle the
 * call was made on (dimoo_*_error). Calls that create a handle take a caller
 * buffer for the message instead, since there is no handle yet.
 *
 * Handles:
 *   dimoo_runtime  a backend on one device (the CPU, or one CUDA GPU)
 *   dimoo_model    transformer weights placed on a runtime; read-only once
 *                  finalized, shared by any number of contexts
 *   dimoo_ctx      one request's execution context: scratch memory sized at
 *                  creation, per-sequence K/V caches (ML-Cache), and on CUDA
 *                  its own stream. A context is used by one thread at a time.
 *
 * Thread safety: a runtime and a finalized model may be used from many
 * threads. Calls that change a model (set_weight, finalize) and calls on one
 * context must not run concurrently with each other; dimoo_ctx_cancel may be
 * called from any thread at any time.
 *
 * Versioning: DIMOO_ABI_VERSION changes whenever a function signature, a
 * struct layout or an enum value changes. Bindings check dimoo_abi_version()
 * at load and mirror struct layouts checked with dimoo_struct_size/offset.
 */
#ifndef DIMOO_H
#define DIMOO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DIMOO_API __declspec(dllexport)
#else
#define DIMOO_API __attribute__((visibility("default")))
#endif

#define DIMOO_ABI_VERSION 1

/* ---- status codes --------------------------------------------------------- */

typedef enum dimoo_status {
    DIMOO_OK = 0,
    DIMOO_ERR_INVALID_ARGUMENT = 1,   /* a caller mistake: bad id, size, pointer */
    DIMOO_ERR_OUT_OF_MEMORY = 2,      /* host allocation failed */
    DIMOO_ERR_DEVICE_OUT_OF_MEMORY = 3,
    DIMOO_ERR_BAD_WEIGHTS = 4,        /* tensor missing, wrong shape or dtype */
    DIMOO_ERR_UNSUPPORTED = 5,        /* backend or feature not built/available */
    DIMOO_ERR_DEVICE = 6,             /* any other CUDA/driver error */
    DIMOO_ERR_CANCELLED = 7,          /* dimoo_ctx_cancel was called */
    DIMOO_ERR_INTERNAL = 8            /* a bug in dimoo */
} dimoo_status;

typedef enum dimoo_dtype {
    DIMOO_F32 = 0,
    DIMOO_F16 = 1,
    DIMOO_BF16 = 2
} dimoo_dtype;

typedef enum dimoo_backend {
    DIMOO_BACKEND_CPU = 0,
    DIMOO_BACKEND_CUDA = 1
} dimoo_backend;

/* Cache modes of a forward (ML-Cache, see dimoo_forward_args). */
typedef enum dimoo_cache_mode {
    DIMOO_CACHE_NONE = 0,  /* plain forward over all positions, cache untouched */
    DIMOO_CACHE_STORE = 1, /* forward over all positions, keep every layer's K/V */
    DIMOO_CACHE_USE = 2    /* run only `compute` positions; other K/V from cache */
} dimoo_cache_mode;

/* ---- library ---------------------------------------------------------------- */

DIMOO_API int32_t dimoo_abi_version(void);
DIMOO_API const char *dimoo_version(void);
/* Static name of a status code ("invalid argument", ...). */
DIMOO_API const char *dimoo_status_string(int32_t status);
/* 1 when the backend was compiled into this library, else 0. */
DIMOO_API int32_t dimoo_backend_built(int32_t backend);
/* Number of devices the backend can use now (CPU: 1; CUDA: visible GPUs, 0
 * when none or when not built). Never fails. */
DIMOO_API int32_t dimoo_device_count(int32_t backend);
/* Layout of the structs below, for bindings that mirror them without a C
 * compiler. -1 for an unknown struct or field. */
DIMOO_API int64_t dimoo_struct_size(const char *struct_name);
DIMOO_API int64_t dimoo_struct_offset(const char *struct_name, const char *field);

/* ---- runtime ---------------------------------------------------------------- */

typedef struct dimoo_runtime dimoo_runtime;

/* n_threads: CPU worker threads (0 = all cores); ignored by CUDA. */
DIMOO_API int32_t dimoo_runtime_create(int32_t backend, int32_t device, int32_t n_threads,
                                       dimoo_runtime **out, char *err, size_t err_len);
DIMOO_API void dimoo_runtime_destroy(dimoo_runtime *rt);
DIMOO_API const char *dimoo_runtime_error(const dimoo_runtime *rt);
/* One line naming the backend and device, e.g. "cpu: 2 threads, avx2". */
DIMOO_API int32_t dimoo_runtime_describe(dimoo_runtime *rt, char *buf, size_t len);

/* ---- single kernels (tests and benchmarks; not the hot path) ----------------- */

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows x cols, all of `dtype`,
 * host pointers. On CUDA the data is copied to the device, the kernel runs,
 * and the result is copied back. */
DIMOO_API int32_t dimoo_op_rmsnorm(dimoo_runtime *rt, int32_t dtype, const void *x, const void *w,
                                   void *out, int32_t rows, int32_t cols, float eps);

/* ---- model ------------------------------------------------------------------ */

typedef struct dimoo_model dimoo_model;

/* The LLaDA config fields the forward needs (config.json names). */
typedef struct dimoo_model_config {
    int32_t d_model;
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t mlp_hidden_size;
    int32_t vocab_size;      /* token ids must be < vocab_size */
    int32_t embedding_size;  /* rows of wte and of the output head (>= vocab_size) */
    int32_t max_sequence_length;
    float rope_theta;
    float rms_norm_eps;
} dimoo_model_config;

/* The runtime must outlive the model. */
DIMOO_API int32_t dimoo_model_create(dimoo_runtime *rt, const dimoo_model_config *cfg,
                                     dimoo_model **out, char *err, size_t err_len);
DIMOO_API void dimoo_model_destroy(dimoo_model *m);
DIMOO_API const char *dimoo_model_error(const dimoo_model *m);
/* Copy one checkpoint tensor (Hugging Face name, row-major, shape as stored)
 * into the model. The data is read during the call only. */
DIMOO_API int32_t dimoo_model_set_weight(dimoo_model *m, const char *name, int32_t dtype,
                                         const int64_t *shape, int32_t ndim, const void *data,
                                         uint64_t nbytes);
/* Check that every tensor is present and prepare for inference. */
DIMOO_API int32_t dimoo_model_finalize(dimoo_model *m);
/* Bytes the model's weights occupy on its device. */
DIMOO_API int64_t dimoo_model_weight_bytes(const dimoo_model *m);

/* ---- context and forward ---------------------------------------------------- */

typedef struct dimoo_ctx dimoo_ctx;

enum { DIMOO_CTX_KV_CACHE = 1 }; /* allocate per-sequence, per-layer K/V caches */

typedef struct dimoo_ctx_params {
    int32_t n_seqs;     /* sequence slots (e.g. 2 for cond + uncond) */
    int32_t max_tokens; /* longest sequence a forward will see */
    int32_t flags;      /* DIMOO_CTX_* */
} dimoo_ctx_params;

/* The model must outlive the context. */
DIMOO_API int32_t dimoo_ctx_create(dimoo_model *m, const dimoo_ctx_params *p, dimoo_ctx **out,
                                   char *err, size_t err_len);
DIMOO_API void dimoo_ctx_destroy(dimoo_ctx *c);
DIMOO_API const char *dimoo_ctx_error(const dimoo_ctx *c);
/* Ask a running forward to stop between layers (DIMOO_ERR_CANCELLED). Any
 * thread. The flag is cleared when the next forward starts. */
DIMOO_API void dimoo_ctx_cancel(dimoo_ctx *c);
/* Bytes of scratch and cache memory the context holds. */
DIMOO_API int64_t dimoo_ctx_bytes(const dimoo_ctx *c);

/* One sequence's forward.
 *
 * tokens: n_tokens ids, every one < vocab_size.
 * cache_mode NONE/STORE run every position. USE runs only the n_compute
 *   positions in `compute` (strictly increasing, < n_tokens) as queries; their
 *   K/V replace the cached rows, attention runs over all n_tokens keys. USE
 *   needs a context made with DIMOO_CTX_KV_CACHE and an earlier STORE on the
 *   same seq with the same n_tokens.
 * Logits: if `logits` is NULL none are computed. Rows are `out_positions`
 *   (n_out of them; NULL with n_out == 0 means every position, in order; under
 *   USE each must be one of `compute`), columns are [vocab_begin, vocab_end)
 *   of the output head (vocab_end == 0 means embedding_size). `logits` holds
 *   rows x columns floats, row-major. */
typedef struct dimoo_forward_args {
    int32_t seq;
    int32_t n_tokens;
    const int32_t *tokens;
    int32_t cache_mode;
    int32_t n_compute;
    const int32_t *compute;
    int32_t n_out;
    const int32_t *out_positions;
    int32_t vocab_begin;
    int32_t vocab_end;
    float *logits;
} dimoo_forward_args;

/* Runs n_args forwards, one per distinct seq; a backend may batch them
 * (different lengths allowed). */
DIMOO_API int32_t dimoo_forward(dimoo_ctx *c, const dimoo_forward_args *args, int32_t n_args);

#ifdef __cplusplus
}
#endif

#endif /* DIMOO_H */
