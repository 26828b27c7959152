// dimoo_cuda_sampler_bench - times the CUDA samplers (kernels/cuda/sampler.cu)
// at the model's shapes on random device logits: microseconds per call
// (CUDA events, median of 20 after 3 warm-ups) and the logits read per
// second. Usage: dimoo_cuda_sampler_bench (needs a CUDA device).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/sampler.cuh"

namespace {

#define CHECK(call)                                                                         \
    do {                                                                                    \
        cudaError_t e_ = (call);                                                            \
        if (e_ != cudaSuccess) {                                                            \
            std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_));                \
            return 1;                                                                       \
        }                                                                                   \
    } while (0)

template <class T> T *dev(size_t n) {
    T *p = nullptr;
    if (cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)) != cudaSuccess) return nullptr;
    return p;
}

std::vector<float> random_logits(size_t n, float scale, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = nd(rng);
    return v;
}

// Median microseconds of fn over 20 timed calls after 3 warm-ups.
template <class F> double time_us(F fn, cudaStream_t s) {
    cudaEvent_t a, b;
    cudaEventCreate(&a), cudaEventCreate(&b);
    for (int q = 0; q < 3; q++) fn();
    std::vector<float> ms;
    for (int q = 0; q < 20; q++) {
        cudaEventRecord(a, s);
        fn();
        cudaEventRecord(b, s);
        cudaEventSynchronize(b);
        float t = 0;
        cudaEventElapsedTime(&t, a, b);
        ms.push_back(t);
    }
    cudaEventDestroy(a), cudaEventDestroy(b);
    std::sort(ms.begin(), ms.end());
    return 1000.0 * ms[ms.size() / 2];
}

int image(int n, int C, int nb, float scale, float tau, int m, cudaStream_t s) {
    const std::vector<float> h = random_logits(size_t(n) * C, scale, 1);
    dimoo::SampleDeviceArgs a;
    a.n_pos = n, a.n_branches = nb, a.n_codes = C, a.step = 1, a.seed = 7, a.temperature = tau, a.n_select = m;
    for (int b = 0; b < nb; b++) {
        float *p = dev<float>(h.size());
        if (!p) return 1;
        CHECK(cudaMemcpy(p, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
        a.logits[b] = p, a.weights[b] = b == 0 ? 4.0f : -3.0f;
    }
    std::vector<int32_t> pos(n);
    for (int i = 0; i < n; i++) pos[i] = 100 + i;
    int32_t *dpos = dev<int32_t>(n);
    CHECK(cudaMemcpy(dpos, pos.data(), n * 4, cudaMemcpyHostToDevice));
    a.rng_pos = dpos, a.codes = dev<int32_t>(n), a.conf = dev<double>(n);
    a.sel = dev<int32_t>(m), a.sel_codes = dev<int32_t>(m), a.sel_conf = dev<double>(m);
    int32_t *hs, *hc;
    double *hf;
    CHECK(cudaMallocHost(&hs, std::max(n, 1) * 4));
    CHECK(cudaMallocHost(&hc, std::max(n, 1) * 4));
    CHECK(cudaMallocHost(&hf, std::max(n, 1) * 8));
    a.host_sel = hs, a.host_codes = hc, a.host_conf = hf;
    cudaError_t err = cudaSuccess;
    const double us = time_us([&] { err = err ? err : dimoo::cuda_sample_image(a, s); }, s);
    CHECK(err);
    CHECK(cudaStreamSynchronize(s));
    const double gb = double(n) * C * nb * 4 / 1e9;
    std::printf("image  n_pos=%5d codes=%d branches=%d std=%-5g tau=%-4g n_select=%-4d %9.1f us  %7.1f GB/s\n", n, C,
                nb, scale, tau, m, us, gb / (us * 1e-6));
    for (int b = 0; b < nb; b++) cudaFree(const_cast<float *>(a.logits[b]));
    cudaFree(dpos), cudaFree(a.codes), cudaFree(a.conf), cudaFree(a.sel), cudaFree(a.sel_codes), cudaFree(a.sel_conf);
    cudaFreeHost(hs), cudaFreeHost(hc), cudaFreeHost(hf);
    return 0;
}

int text(int n, int cols, double tau, double cfg, int m, cudaStream_t s) {
    const std::vector<float> h = random_logits(size_t(n) * cols, 3.0f, 2);
    dimoo::TextSampleDeviceArgs a;
    a.n_pos = n, a.n_cols = cols, a.step = 1, a.seed = 7, a.temperature = tau, a.cfg_scale = cfg, a.n_select = m;
    float *c = dev<float>(h.size()), *u = dev<float>(h.size());
    CHECK(cudaMemcpy(c, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(u, h.data(), h.size() * 4, cudaMemcpyHostToDevice));
    a.cond = c, a.uncond = cfg > 0 ? u : nullptr;
    std::vector<int32_t> pos(n);
    for (int i = 0; i < n; i++) pos[i] = 1000 + i;
    int32_t *dpos = dev<int32_t>(n);
    CHECK(cudaMemcpy(dpos, pos.data(), n * 4, cudaMemcpyHostToDevice));
    a.positions = dpos, a.tokens = dev<int32_t>(n), a.conf = dev<double>(n);
    a.sel_pos = dev<int32_t>(m), a.sel_tokens = dev<int32_t>(m);
    cudaError_t err = cudaSuccess;
    const double us = time_us([&] { err = err ? err : dimoo::cuda_sample_text(a, s); }, s);
    CHECK(err);
    const double gb = double(n) * cols * (cfg > 0 ? 2 : 1) * 4 / 1e9;
    std::printf("text   n_pos=%5d cols=%d tau=%-4g cfg=%-4g n_select=%-4d %9.1f us  %7.1f GB/s "
                "(rows read twice, sum in column order)\n",
                n, cols, tau, cfg, m, us, gb / (us * 1e-6));
    cudaFree(c), cudaFree(u), cudaFree(dpos), cudaFree(a.tokens), cudaFree(a.conf), cudaFree(a.sel_pos);
    cudaFree(a.sel_tokens);
    return 0;
}

int cache_select(int n, cudaStream_t s) {
    const std::vector<float> h = random_logits(n, 2.0f, 3);
    float *mx = dev<float>(n);
    int32_t *list = dev<int32_t>(n), *cnt = dev<int32_t>(1);
    CHECK(cudaMemcpy(mx, h.data(), n * 4, cudaMemcpyHostToDevice));
    cudaError_t err = cudaSuccess;
    const double us =
        time_us([&] { err = err ? err : dimoo::cuda_cache_select(mx, n, 0.1, list, cnt, nullptr, s); }, s);
    CHECK(err);
    std::printf("cache_select n=%d %9.1f us\n", n, us);
    cudaFree(mx), cudaFree(list), cudaFree(cnt);
    return 0;
}

}  // namespace

int main() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        std::fprintf(stderr, "no CUDA device\n");
        return 2;
    }
    cudaStream_t s;
    CHECK(cudaStreamCreate(&s));
    int rc = 0;
    // 1024^2 (4096 codes to place) and 512^2 (1024), CFG's two branches.
    for (int pos : {4096, 1024}) {
        for (float scale : {0.05f, 3.0f}) {
            rc |= image(pos, 8192, 2, scale, 1.0f, pos / 32, s);
            rc |= image(pos, 8192, 2, scale, 1.0f, 0, s);
        }
        rc |= image(pos, 8192, 2, 1.0f, 0.0f, pos / 32, s);
    }
    rc |= text(32, 126464, 0.0, 0.0, 2, s);
    rc |= text(32, 126464, 1.0, 1.0, 2, s);
    // A whole LLaDA block: the softmax sum adds its columns in order (one
    // thread a row, as the CPU), so this is the case that shows its cost.
    rc |= text(256, 126464, 1.0, 1.0, 8, s);
    rc |= cache_select(4228, s);
    rc |= cache_select(1156, s);
    return rc;
}
