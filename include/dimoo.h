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

/* 2: dimoo_sample_image; 3: its n_select; 4: context-resident logits (keep,
 * keep_cols), dimoo_image_step, dimoo_text_step, dimoo_cache_select,
 * dimoo_ctx_set_token_mask, dimoo_estimate; dimoo_op_rmsnorm removed;
 * 5: dimoo_model_config.precision */
#define DIMOO_ABI_VERSION 5

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

/* The arithmetic of a model's matrices (dimoo_model_config.precision). */
typedef enum dimoo_precision {
    /* As stored. CPU: bf16 checkpoints in bf16, fp32 ones in fp32, fp16 or
     * mixed ones in fp32 through per-call packing. CUDA: bf16. */
    DIMOO_PRECISION_AUTO = 0,
    /* The official model's arithmetic whatever the checkpoint's dtype: the
     * embedding and every matrix rounded to bf16 at load (norm weights stay
     * fp32), products accumulated in fp32. The fast CPU path (AMX, AVX-512
     * BF16); what the CUDA backend always computes. */
    DIMOO_PRECISION_BF16 = 1,
    /* fp32 weights and arithmetic, bf16 and fp16 weights widened exactly: a
     * reference to measure the bf16 path against. CPU only. */
    DIMOO_PRECISION_F32 = 2
} dimoo_precision;

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

/* ---- fused image-code sampling (reference section 3, one step) --------------- */

#define DIMOO_MAX_BRANCHES 4

/* For each of n_pos masked positions i: guided logits
 *   l = sum_b weights[b] * logits[b][row_b(i) * n_codes : ... + n_codes]
 * (row_b(i) = rows[b][i], or i when rows[b] is NULL); the drawn code
 *   code_i = argmax_c (l_c / temperature + G(seed, step, rng_pos[i], 1, c))
 * (argmax l_c at temperature 0, first index on ties) and its keep-masked score
 *   conf_i = log softmax(l)[code_i] + temperature * G(seed, step, rng_pos[i], 2, 0).
 * G is standard Gumbel noise -log(-log(u)) in double precision, u = (w + 0.5) / 2^32
 * with w word (index & 3) of Philox4x32-10 on the counter
 * (pos, index >> 2, step, purpose) under the key (seed low, seed high 32 bits).
 * Host memory; runs on the CPU threads of any runtime. (dimoo_image_step is
 * the same decision over logits a forward left in a context, on the
 * context's device.)
 *
 * n_select = 0 draws every position. n_select = k in 1..n_pos asks only for
 * the k positions that a stable ascending sort by conf puts last (those the
 * image sampler unmasks: the largest by (conf_i, i)); their indices go to
 * out_selected in increasing order, and out_codes/out_conf are exact there.
 * The library may then skip drawing positions that cannot be among them
 * (their out_codes is -1, their out_conf unspecified).
 *
 * top_logp, when not NULL, receives log softmax(l)[argmax l] of every
 * position. Where top_logp_valid (may be NULL) is nonzero the value there is
 * taken as given instead: a caller whose rows did not change since a
 * previous call (ML-Cache) saves reading them when n_select > 0. */
typedef struct dimoo_sample_args {
    int32_t n_pos;
    int32_t n_branches; /* 1 .. DIMOO_MAX_BRANCHES */
    int32_t n_codes;
    int32_t step;
    uint64_t seed;
    float temperature;
    float weights[DIMOO_MAX_BRANCHES];
    const float *logits[DIMOO_MAX_BRANCHES];
    const int32_t *rows[DIMOO_MAX_BRANCHES];
    int64_t n_rows[DIMOO_MAX_BRANCHES]; /* rows in logits[b], for bounds checks */
    const int32_t *rng_pos;             /* [n_pos] */
    int32_t *out_codes;                 /* [n_pos] */
    double *out_conf;                   /* [n_pos] */
    int32_t *out_selected;              /* [n_select], when n_select > 0 */
    int32_t n_select;
    double *top_logp;                   /* [n_pos] or NULL */
    const uint8_t *top_logp_valid;      /* [n_pos] or NULL */
} dimoo_sample_args;

DIMOO_API int32_t dimoo_sample_image(dimoo_runtime *rt, const dimoo_sample_args *args);

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
    int32_t precision;       /* dimoo_precision; 0 (AUTO) in a zeroed config */
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
    /* Context-resident logits (see "kept logits" below): each seq gets
     * keep_rows x keep_cols floats (keep_rows 0 means max_tokens) on the
     * context's device, allocated at creation, which hold kept rows of any
     * width w <= keep_cols: up to min(max_tokens, keep_rows * keep_cols / w)
     * of them. keep_cols 0: none. */
    int32_t keep_rows;
    int32_t keep_cols;
} dimoo_ctx_params;

/* What dimoo_model_weight_bytes and dimoo_ctx_bytes would report for a
 * model of cfg whose matrices are all stored as `dtype` in the checkpoint,
 * placed on `backend` (n_threads as in dimoo_runtime_create), and for a
 * context of params p (NULL: no context; ctx_bytes may then be NULL),
 * without creating either or touching a device: to choose a device, or to
 * refuse a request, before loading gigabytes. Arguments are checked as the
 * create calls check them. */
DIMOO_API int32_t dimoo_estimate(int32_t backend, int32_t n_threads, const dimoo_model_config *cfg, int32_t dtype,
                                 const dimoo_ctx_params *p, int64_t *model_bytes, int64_t *ctx_bytes, char *err,
                                 size_t err_len);

/* The model must outlive the context. */
DIMOO_API int32_t dimoo_ctx_create(dimoo_model *m, const dimoo_ctx_params *p, dimoo_ctx **out,
                                   char *err, size_t err_len);
DIMOO_API void dimoo_ctx_destroy(dimoo_ctx *c);
DIMOO_API const char *dimoo_ctx_error(const dimoo_ctx *c);
/* Ask a running forward to stop between layers (DIMOO_ERR_CANCELLED). Any
 * thread. The flag is cleared when the next forward starts. */
DIMOO_API void dimoo_ctx_cancel(dimoo_ctx *c);
/* Bytes of scratch, cache and kept-logit memory the context holds; all of
 * it is allocated by dimoo_ctx_create. */
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
 *   rows x columns floats, row-major.
 * Kept logits: with keep = 1 the same rows (computed when logits is NULL
 *   too) also go to the seq's context-resident logits, found by position,
 *   with each row's maximum; they stay on the context's device for
 *   dimoo_image_step, dimoo_text_step and dimoo_cache_select. The column
 *   range must be at most keep_cols wide. A NONE or STORE forward with keep
 *   replaces the seq's kept rows by its own; a USE forward replaces the rows
 *   of its positions and keeps the others (ML-Cache's logit cache: rows not
 *   recomputed keep the logits of the step that computed them), unless its
 *   column range differs from theirs. More kept rows in a seq than its
 *   storage holds at their width is DIMOO_ERR_INVALID_ARGUMENT. A failed
 *   forward forgets every kept row of its seqs. */
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
    /* Optional (NULL: none), with logits: the largest logit of each output
     * row over the column range, for ML-Cache's max-logit selection without
     * another pass over the logits. */
    float *row_max;
    int32_t keep; /* 0 or 1: also keep the rows in the context (ABI 4) */
} dimoo_forward_args;

/* Runs n_args forwards, one per distinct seq; a backend may batch them
 * (different lengths allowed), each seq's results bit for bit those of its
 * forward alone. The CPU batches consecutive ones whose rows fit
 * min(n_seqs, 3) x max_tokens together (its contexts hold that many rows);
 * CUDA all of them. */
DIMOO_API int32_t dimoo_forward(dimoo_ctx *c, const dimoo_forward_args *args, int32_t n_args);

/* ---- decode steps over kept logits (ABI 4) ------------------------------------
 *
 * One sampling step as one call on the context, over the logits forwards
 * left there (keep = 1): on a CUDA context they never leave the device and
 * only the decisions come back. The decisions are those of
 * dimoo_sample_image (image) and of the text sampler below, bit for bit, on
 * every backend.
 *
 * dimoo_image_step: branch b's logits at masked position i are the kept row
 * offsets[b] + masked[i] of seq seqs[b] (all branches kept over the same
 * column range, whose width is the code count); the Philox position of i is
 * offsets[0] + masked[i]. Otherwise as dimoo_sample_args: guidance weights,
 * temperature, step and seed; n_select = 0 returns every position's code in
 * out_codes[n_pos] (and out_conf[n_pos] when not NULL); n_select = k returns
 * the k positions the image sampler unmasks: their indices into masked,
 * increasing, in out_selected[k], their codes in out_codes[k] (and
 * out_conf[k]). A row not kept is DIMOO_ERR_INVALID_ARGUMENT.
 * ML-Cache's saving of dimoo_sample_args' top_logp is automatic: the
 * context remembers the guided rows' top log-probabilities and which kept
 * rows they came from. */
typedef struct dimoo_image_step_args {
    int32_t n_branches; /* 1 .. DIMOO_MAX_BRANCHES */
    int32_t seqs[DIMOO_MAX_BRANCHES];
    int32_t offsets[DIMOO_MAX_BRANCHES]; /* position of answer index 0 in each branch */
    float weights[DIMOO_MAX_BRANCHES];
    int32_t n_pos;
    const int32_t *masked;  /* [n_pos] answer-relative, strictly increasing */
    int32_t step;
    uint64_t seed;
    float temperature;
    int32_t n_select;
    int32_t *out_selected;  /* [n_select] */
    int32_t *out_codes;     /* [n_select], or [n_pos] when n_select == 0 */
    double *out_conf;       /* same length as out_codes, or NULL */
} dimoo_image_step_args;

DIMOO_API int32_t dimoo_image_step(dimoo_ctx *c, const dimoo_image_step_args *a);

/* dimoo_text_step: the understanding sampler (LLaDA low-confidence
 * remasking). For each of the n_pos positions p (strictly increasing), over
 * the kept row p of seq (and of uncond_seq, same column range, when >= 0),
 * in double precision:
 *   l_v = c_v                                   (uncond_seq < 0)
 *   l_v = u_v + (cfg_scale + 1) (c_v - u_v)     (guided)
 *   token = argmax over allowed v of l_v + temperature * G(seed, step, p, 3, v)
 *           (first on ties; v is the token id, vocab_begin + column; no
 *           noise at temperature 0)
 *   conf  = exp(l_token - max l) / sum_v exp(l_v - max l)  (all columns)
 * with G the Gumbel noise of dimoo_sample_args. Allowed: every column, or
 * with use_mask the ids dimoo_ctx_set_token_mask marked (ids beyond its
 * length are not allowed). The n_select positions of highest conf (ties:
 * the earlier position) are chosen: out_positions[n_select] gets them
 * increasing, out_tokens[n_select] their tokens. out_all_tokens (NULL or
 * [n_pos]) gets every position's token. */
typedef struct dimoo_text_step_args {
    int32_t seq;
    int32_t uncond_seq; /* -1: no guidance */
    double cfg_scale;
    double temperature;
    int32_t step;
    uint64_t seed;
    int32_t use_mask;
    int32_t n_pos;
    const int32_t *positions; /* [n_pos] */
    int32_t n_select;         /* 0 .. n_pos */
    int32_t *out_positions;   /* [n_select] */
    int32_t *out_tokens;      /* [n_select] */
    int32_t *out_all_tokens;  /* [n_pos] or NULL */
} dimoo_text_step_args;

DIMOO_API int32_t dimoo_text_step(dimoo_ctx *c, const dimoo_text_step_args *a);

/* The tokens dimoo_text_step may draw with use_mask: allowed[v] != 0 for
 * token id v < n. Copied into the context (to its device); replaces the
 * previous mask. */
DIMOO_API int32_t dimoo_ctx_set_token_mask(dimoo_ctx *c, const uint8_t *allowed, int32_t n);

/* ML-Cache's choice of the rows to recompute: over the kept rows 0 ..
 * n_tokens - 1 of seq (all must be kept), the threshold thr = quantile of
 * their row maxima at q (numpy/torch linear interpolation, in float32), and
 * out[0 .. *n_out) = the positions whose row maximum is <= thr, increasing
 * (out has room for n_tokens). */
DIMOO_API int32_t dimoo_cache_select(dimoo_ctx *c, int32_t seq, int32_t n_tokens, double q, int32_t *out,
                                     int32_t *n_out);

/* ---- VQ-VAE ------------------------------------------------------------------
 *
 * The image tokenizer: diffusers' VQModel (the aMUSEd VQ-GAN DiMOO uses, as
 * stored under vqvae/) with DownEncoderBlock2D / UpDecoderBlock2D blocks,
 * GroupNorm (eps 1e-6) and SiLU; the optional mid-block attention is one head
 * of all channels. The downsampling factor is f = 2^(n_levels - 1).
 *
 * Everything is fp32. On a CPU runtime it all runs on the host with the
 * runtime's n_threads. On a CUDA runtime the decoder (dimoo_vq_decode and
 * dimoo_vq_decode_latent) runs on the runtime's GPU: dimoo_vq_finalize
 * copies the decoder's weights and the codebook there (fp32; refused with
 * DIMOO_ERR_DEVICE_OUT_OF_MEMORY when they do not fit), and each decode
 * allocates its activations on the device for the call (checked against the
 * free memory first, DIMOO_ERR_DEVICE_OUT_OF_MEMORY with the sizes). The
 * GPU decode equals the CPU's up to fp32 rounding in another order (fp32
 * GEMMs, no TF32; relative error well under 1e-4). The encoder
 * (dimoo_vq_encode, dimoo_vq_encode_latent) stays on the host CPU, every
 * core, on any runtime other than CPU.
 *
 * Images cross the ABI as float pixels, channels last (HWC): the value of
 * channel c at row y, column x of an H x W image is at (y * W + x) * C + c.
 * The encoder reads in_channels channels with values in [0, 1] (no [-1, 1]
 * normalisation); the decoder writes the network's raw output, out_channels
 * channels, unclamped (DiMOO clamps it to [0, 1]). Code grids are row-major
 * h x w int32. Images may have sides up to 32768 and 2^28 pixels, memory
 * permitting: activations grow with the pixels (a 512 x 512 decode with
 * aMUSEd's config peaks near 1 GB besides the weights, on the host or the
 * device). config.json's
 * scaling_factor and force_upcast change nothing here: VQModel.decode does
 * not scale, and everything is fp32.
 *
 * Thread safety: set_weight and finalize must not run concurrently with any
 * other call on the handle; encode/decode calls on one handle must not run
 * concurrently with each other (they share the cancel flag, and each call is
 * multithreaded already); dimoo_vq_cancel may be called from any thread.
 */

typedef struct dimoo_vq dimoo_vq;

#define DIMOO_VQ_MAX_LEVELS 8

typedef enum dimoo_vq_norm {
    DIMOO_VQ_NORM_GROUP = 0,  /* norm_type "group" */
    DIMOO_VQ_NORM_SPATIAL = 1 /* norm_type "spatial": DIMOO_ERR_UNSUPPORTED */
} dimoo_vq_norm;

/* The VQModel config.json fields that shape the network. */
typedef struct dimoo_vq_config {
    int32_t in_channels;       /* image channels the encoder reads (3) */
    int32_t out_channels;      /* image channels the decoder writes (3) */
    int32_t latent_channels;
    int32_t num_vq_embeddings; /* codebook rows; codes must be < this */
    int32_t vq_embed_dim;      /* codebook row width; 0 means latent_channels */
    int32_t norm_num_groups;   /* divides every block_out_channels entry */
    int32_t layers_per_block;  /* resnets per encoder stage (decoder: + 1) */
    int32_t n_levels;          /* entries of block_out_channels used, 1..8 */
    int32_t block_out_channels[DIMOO_VQ_MAX_LEVELS];
    int32_t mid_block_add_attention; /* 0 or 1 */
    int32_t norm_type;         /* dimoo_vq_norm */
} dimoo_vq_config;

/* The runtime must outlive the VQ model. */
DIMOO_API int32_t dimoo_vq_create(dimoo_runtime *rt, const dimoo_vq_config *cfg, dimoo_vq **out,
                                  char *err, size_t err_len);
DIMOO_API void dimoo_vq_destroy(dimoo_vq *vq);
DIMOO_API const char *dimoo_vq_error(const dimoo_vq *vq);
/* Copy one tensor of diffusion_pytorch_model.safetensors (diffusers name, e.g.
 * "decoder.up_blocks.0.resnets.1.conv1.weight", shape as stored: convolutions
 * (out, in, k, k), linears (out, in)). An unknown name, a shape the config
 * does not imply or a wrong byte count is DIMOO_ERR_BAD_WEIGHTS. */
DIMOO_API int32_t dimoo_vq_set_weight(dimoo_vq *vq, const char *name, int32_t dtype, const int64_t *shape,
                                      int32_t ndim, const void *data, uint64_t nbytes);
/* Check that every tensor is present (BAD_WEIGHTS naming the missing ones).
 * On a CUDA runtime, also copy the decoder to the GPU (see above); a failure
 * there leaves the handle unfinalized, and a later call tries again. */
DIMOO_API int32_t dimoo_vq_finalize(dimoo_vq *vq);
/* Bytes the weights occupy in host memory (fp32; once finalized, plus the
 * upsampling convs' sub-pixel kernels). Not counted: on a CUDA runtime, the
 * device copy finalize makes of the decoder's weights and the codebook
 * (fp32, the upsamplers as their sub-pixel kernels: a little over half the
 * total). */
DIMOO_API int64_t dimoo_vq_weight_bytes(const dimoo_vq *vq);
/* Ask a running encode/decode to stop between layers (DIMOO_ERR_CANCELLED).
 * Any thread. The flag is cleared when the next encode/decode starts. */
DIMOO_API void dimoo_vq_cancel(dimoo_vq *vq);

/* codes: h x w ids, each in [0, num_vq_embeddings). out: (h*f) x (w*f) x
 * out_channels floats, HWC, the raw decoder output. */
DIMOO_API int32_t dimoo_vq_decode(dimoo_vq *vq, const int32_t *codes, int32_t h, int32_t w, float *out);
/* The decoder on a continuous latent: h x w x vq_embed_dim floats (HWC) in
 * place of codebook rows (diffusers' decode with force_not_quantize). */
DIMOO_API int32_t dimoo_vq_decode_latent(dimoo_vq *vq, const float *latent, int32_t h, int32_t w, float *out);
/* pixels: H x W x in_channels floats (HWC) in [0, 1]; H and W multiples of f
 * (else DIMOO_ERR_INVALID_ARGUMENT). codes: (H/f) x (W/f) ids of the nearest
 * codebook rows by Euclidean distance (ties: the lowest id). */
DIMOO_API int32_t dimoo_vq_encode(dimoo_vq *vq, const float *pixels, int32_t H, int32_t W, int32_t *codes);
/* The encoder up to quant_conv: latent gets (H/f) x (W/f) x vq_embed_dim
 * floats (HWC), the vectors dimoo_vq_encode quantizes. */
DIMOO_API int32_t dimoo_vq_encode_latent(dimoo_vq *vq, const float *pixels, int32_t H, int32_t W, float *latent);

#ifdef __cplusplus
}
#endif

#endif /* DIMOO_H */
