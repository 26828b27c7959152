// kept.h - context-resident logits in host memory (ABI 4): the CPU backend's
// store of kept rows, and its image and text decode steps and ML-Cache
// selection over them. The CUDA backend keeps the same state on the device
// and must make the same decisions; its tests compare with this one.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "../backend.h"

namespace dimoo::cpu {

class HostKept {
public:
    // keep_rows x keep_cols floats of rows and max_tokens row maxima per
    // seq; the top-log-probability store has n_seqs * max_tokens doubles;
    // a token mask of up to vocab ids; the scratch of one forward's kept
    // rows (max_tokens x keep_cols floats and their maxima). All of it
    // allocated here (bytes() is final), the large parts as untouched pages.
    HostKept(int n_seqs, int max_tokens, int keep_rows, int keep_cols, int vocab);
    static int64_t bytes_for(int n_seqs, int max_tokens, int keep_rows, int keep_cols, int vocab);
    float *scratch_rows() { return scratch_.get(); }
    float *scratch_max() { return scratch_.get() + size_t(max_tokens_) * cols_; }

    // Rows of one seq are stored at a stride of their column count (all
    // kept rows of a seq share one column range).
    void write(int seq, const int32_t *slots, int n, int n_cols, const float *rows, const float *row_max);
    // The storage of a seq's slots 0.. at a stride of n_cols, and their maxima:
    // a forward whose rows go to slots 0, 1, ... in order writes there.
    float *slot_rows(int seq) { return logits_.get() + size_t(seq) * rows_ * cols_; }
    float *slot_max(int seq) { return max_.data() + size_t(seq) * max_tokens_; }
    void image_step(const ImageStepCall &c);
    void text_step(const TextStepCall &c);
    void set_token_mask(const uint8_t *allowed, int n);
    int cache_select(int seq, const int32_t *slots, int n, double q, int32_t *out);
    int64_t bytes() const;

private:
    const float *seq_rows(int seq) const { return logits_.get() + size_t(seq) * rows_ * cols_; }
    struct Free {
        void operator()(float *p) const { std::free(p); }
    };
    int n_seqs_, max_tokens_, rows_, cols_;
    // [n_seqs][rows][<= cols], from calloc: large blocks come as untouched
    // zero pages, so memory is committed only as rows are written.
    std::unique_ptr<float[], Free> logits_, scratch_;
    size_t n_logits_ = 0, n_scratch_ = 0;
    int mask_len_ = 0;
    std::vector<float> max_;    // [n_seqs][max_tokens]
    std::vector<double> top_;   // [n_seqs * max_tokens]
    std::vector<uint8_t> mask_;
};

// The understanding sampler of dimoo_text_step on host rows: cond and
// uncond (null: no guidance) rows of n_cols floats, column 0 = token id
// vocab_begin. Returns the token and sets *conf. Shared with the tests.
int32_t text_pick(const float *cond, const float *uncond, int n_cols, int vocab_begin, double cfg_scale,
                  double temperature, uint64_t seed, int32_t step, int32_t pos, const uint8_t *mask, int mask_len,
                  double *conf);

// torch.quantile's linear interpolation in float32 (ML-Cache's threshold);
// v is reordered.
float quantile_f32(std::vector<float> &v, double q);

} // namespace dimoo::cpu
