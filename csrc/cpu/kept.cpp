// Kept logits in host memory and the decode steps over them (see kept.h).
// Compiled with -ffp-contract=off: every float and double operation rounds
// as written, as in Go and on the device (sampler_math.h's helpers).
#include "kept.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <numeric>

#include "sampler.h"
#include "sampler_math.h"

namespace dimoo::cpu {

namespace {
float *zeroed_floats(size_t n) {
    auto *p = static_cast<float *>(std::calloc(std::max<size_t>(n, 1), sizeof(float)));
    if (!p) throw std::bad_alloc();
    return p;
}
} // namespace

HostKept::HostKept(int n_seqs, int max_tokens, int keep_rows, int keep_cols, int vocab)
    : n_seqs_(n_seqs), max_tokens_(max_tokens), rows_(keep_rows), cols_(keep_cols) {
    n_logits_ = size_t(n_seqs) * keep_rows * keep_cols;
    n_scratch_ = size_t(max_tokens) * (size_t(keep_cols) + 1);
    logits_.reset(zeroed_floats(n_logits_));
    scratch_.reset(zeroed_floats(n_scratch_));
    max_.resize(size_t(n_seqs) * max_tokens);
    top_.resize(size_t(n_seqs) * max_tokens);
    mask_.resize(size_t(vocab));
}

int64_t HostKept::bytes_for(int n_seqs, int max_tokens, int keep_rows, int keep_cols, int vocab) {
    const size_t rows = size_t(n_seqs) * keep_rows * keep_cols, scratch = size_t(max_tokens) * (size_t(keep_cols) + 1);
    return int64_t((rows + scratch + size_t(n_seqs) * max_tokens) * sizeof(float) +
                   size_t(n_seqs) * max_tokens * sizeof(double) + size_t(vocab));
}

int64_t HostKept::bytes() const {
    return int64_t((n_logits_ + n_scratch_ + max_.size()) * sizeof(float) + top_.size() * sizeof(double) +
                   mask_.size());
}

void HostKept::write(int seq, const int32_t *slots, int n, int n_cols, const float *rows, const float *row_max) {
    float *base = logits_.get() + size_t(seq) * rows_ * cols_;
    float *mx = max_.data() + size_t(seq) * max_tokens_;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        const float *src = rows + size_t(i) * n_cols;
        std::memcpy(base + size_t(slots[i]) * n_cols, src, size_t(n_cols) * sizeof(float));
        if (row_max) {
            mx[slots[i]] = row_max[i];
        } else {
            float m = src[0];
            for (int c = 1; c < n_cols; c++) m = std::max(m, src[c]);
            mx[slots[i]] = m;
        }
    }
}

void HostKept::image_step(const ImageStepCall &c) {
    const dimoo_image_step_args &a = *c.a;
    const int n = a.n_pos;
    if (n == 0) return;
    dimoo_sample_args s{};
    s.n_pos = n;
    s.n_branches = a.n_branches;
    s.n_codes = c.n_codes;
    s.step = a.step;
    s.seed = a.seed;
    s.temperature = a.temperature;
    for (int b = 0; b < a.n_branches; b++) {
        s.weights[b] = a.weights[b];
        s.logits[b] = seq_rows(a.seqs[b]);
        s.rows[b] = c.slots[b];
        s.n_rows[b] = std::min<int64_t>(max_tokens_, int64_t(rows_) * cols_ / c.n_codes);
    }
    std::vector<int32_t> rng(n), codes(n), sel(a.n_select);
    std::vector<double> conf(n), top(n);
    std::vector<uint8_t> valid(n, 0);
    for (int i = 0; i < n; i++) {
        rng[i] = a.offsets[0] + a.masked[i];
        if (c.top_valid && c.top_valid[i]) {
            valid[i] = 1;
            top[i] = top_[size_t(c.top_index[i])];
        }
    }
    s.rng_pos = rng.data();
    s.out_codes = codes.data();
    s.out_conf = conf.data();
    s.n_select = a.n_select;
    s.out_selected = a.n_select ? sel.data() : nullptr;
    s.top_logp = top.data();
    s.top_logp_valid = valid.data();
    sample_image(s);
    for (int i = 0; i < n; i++) top_[size_t(c.top_index[i])] = top[i];
    if (a.n_select == 0) {
        std::copy(codes.begin(), codes.end(), a.out_codes);
        if (a.out_conf) std::copy(conf.begin(), conf.end(), a.out_conf);
        return;
    }
    for (int j = 0; j < a.n_select; j++) {
        a.out_selected[j] = sel[j];
        a.out_codes[j] = codes[size_t(sel[j])];
        if (a.out_conf) a.out_conf[j] = conf[size_t(sel[j])];
    }
}

int32_t text_pick(const float *cond, const float *uncond, int n_cols, int vocab_begin, double cfg_scale,
                  double temperature, uint64_t seed, int32_t step, int32_t pos, const uint8_t *mask, int mask_len,
                  double *conf) {
    using sm::dadd;
    using sm::dmul;
    using sm::dsub;
    const double g = dadd(cfg_scale, 1.0);
    auto logit = [&](int v) {
        const double cv = double(cond[v]);
        if (!uncond) return cv;
        const double uv = double(uncond[v]);
        return dadd(uv, dmul(g, dsub(cv, uv)));
    };
    int best = -1;
    double best_score = -INFINITY, mx = -INFINITY;
    for (int v = 0; v < n_cols; v++) {
        const double l = logit(v);
        mx = std::max(mx, l);
        const int id = vocab_begin + v;
        if (mask && (id >= mask_len || !mask[id])) continue;
        double score = l;
        if (temperature > 0)
            score = dadd(score, dmul(temperature, sm::gumbel_at(seed, step, pos, sm::kPurposeTextSample, id)));
        if (best < 0 || score > best_score) best = v, best_score = score;
    }
    if (best < 0) best = 0; // nothing allowed: api.cpp refuses an empty mask, so never reached
    double sum = 0;
    for (int v = 0; v < n_cols; v++) sum = dadd(sum, std::exp(dsub(logit(v), mx)));
    *conf = std::exp(dsub(logit(best), mx)) / sum;
    return vocab_begin + best;
}

void HostKept::text_step(const TextStepCall &c) {
    const dimoo_text_step_args &a = *c.a;
    const int n = a.n_pos, C = c.n_cols;
    std::vector<int32_t> tok(n);
    std::vector<double> conf(n);
    const float *cb = seq_rows(a.seq);
    const float *ub = a.uncond_seq >= 0 ? seq_rows(a.uncond_seq) : nullptr;
    const uint8_t *mask = a.use_mask ? mask_.data() : nullptr;
    const int mask_len = mask_len_;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        const float *cr = cb + size_t(c.slots[i]) * C;
        const float *ur = ub ? ub + size_t(c.uncond_slots[i]) * C : nullptr;
        tok[i] = text_pick(cr, ur, C, c.vocab_begin, a.cfg_scale, a.temperature, a.seed, a.step, a.positions[i], mask,
                           mask_len, &conf[i]);
    }
    if (a.out_all_tokens) std::copy(tok.begin(), tok.end(), a.out_all_tokens);
    // The n_select most confident, ties to the earlier position.
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int x, int y) { return conf[x] > conf[y]; });
    order.resize(a.n_select);
    std::sort(order.begin(), order.end());
    for (int j = 0; j < a.n_select; j++) {
        a.out_positions[j] = a.positions[order[j]];
        a.out_tokens[j] = tok[order[j]];
    }
}

void HostKept::set_token_mask(const uint8_t *allowed, int n) {
    // api.cpp keeps n within the embedding rows this store was sized for.
    n = std::min(n, int(mask_.size()));
    std::copy(allowed, allowed + n, mask_.begin());
    mask_len_ = n;
}

float quantile_f32(std::vector<float> &v, double q) {
    using sm::fadd;
    using sm::fmul;
    using sm::fsub;
    const int n = int(v.size());
    const float rank = fmul(float(q), float(n - 1));
    const int lo = int(rank), hi = std::min(lo + 1, n - 1);
    std::nth_element(v.begin(), v.begin() + lo, v.end());
    const float a = v[lo];
    const float b = hi > lo ? *std::min_element(v.begin() + lo + 1, v.end()) : a;
    const float w = fsub(rank, float(lo));
    if (w < 0.5f) return fadd(a, fmul(w, fsub(b, a)));
    return fsub(b, fmul(fsub(b, a), fsub(1.0f, w)));
}

int HostKept::cache_select(int seq, const int32_t *slots, int n, double q, int32_t *out) {
    const float *mx = max_.data() + size_t(seq) * max_tokens_;
    std::vector<float> v(n);
    for (int i = 0; i < n; i++) v[i] = mx[slots[i]];
    const float thr = quantile_f32(v, q);
    int k = 0;
    for (int p = 0; p < n; p++)
        if (mx[slots[p]] <= thr) out[k++] = p;
    return k;
}

} // namespace dimoo::cpu
