// cuda_runtime.h (host emulation) - just enough of the CUDA runtime for
// kernels/cuda/vq.cu to compile and run on the host, for test_vq_emu.cpp in
// builds without CUDA: "device" memory is host memory, streams run
// synchronously, a kernel launch runs every block and thread on the host
// (sequentially; kernels with __syncthreads on one std::thread per block
// thread with a barrier). Not a CUDA implementation: it checks the decoder's
// walk, indexing and GEMM parameters, not device behaviour.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__ static

enum cudaError_t { cudaSuccess = 0, cudaErrorMemoryAllocation = 2 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
typedef void *cudaStream_t;
constexpr unsigned cudaStreamNonBlocking = 1, cudaHostAllocDefault = 0;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx(0, 0, 0);
inline thread_local dim3 blockIdx(0, 0, 0);
inline dim3 blockDim, gridDim;

template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

inline double atomicAdd(double *p, double v) { // only ever one block at a time
    static std::mutex m;
    std::lock_guard<std::mutex> l(m);
    double o = *p;
    *p += v;
    return o;
}

namespace vqemu {

inline std::size_t &live_bytes() {
    static std::size_t b = 0;
    return b;
}

// A reusable barrier for the threads of one block.
class Barrier {
public:
    explicit Barrier(unsigned n) : n_(n) {}
    void wait() {
        std::unique_lock<std::mutex> l(m_);
        const unsigned gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            gen_++;
            cv_.notify_all();
        } else {
            cv_.wait(l, [&] { return gen != gen_; });
        }
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_, count_ = 0, gen_ = 0;
};
inline Barrier *&barrier() {
    static Barrier *b = nullptr;
    return b;
}

template <bool Sync, class F> struct Launch {
    dim3 g, b;
    F k;
    template <class... A> void operator()(A... a) const {
        gridDim = g, blockDim = b;
        if (!Sync) {
            for (unsigned by = 0; by < g.y; by++)
                for (unsigned bx = 0; bx < g.x; bx++)
                    for (unsigned t = 0; t < b.x; t++) {
                        blockIdx = dim3(bx, by, 0);
                        threadIdx = dim3(t, 0, 0);
                        k(a...);
                    }
            return;
        }
        // One thread per block thread; every block in turn, a barrier between blocks.
        Barrier bar(b.x);
        barrier() = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < b.x; t++)
            ts.emplace_back([&, t] {
                threadIdx = dim3(t, 0, 0);
                for (unsigned by = 0; by < g.y; by++)
                    for (unsigned bx = 0; bx < g.x; bx++) {
                        blockIdx = dim3(bx, by, 0);
                        k(a...);
                        bar.wait();
                    }
            });
        for (auto &t : ts) t.join();
        barrier() = nullptr;
    }
};
template <bool Sync, class F> Launch<Sync, F> launch(dim3 g, dim3 b, F k) { return Launch<Sync, F>{g, b, k}; }

} // namespace vqemu

inline void __syncthreads() { vqemu::barrier()->wait(); }

#define VQ_LAUNCH(k, grid, block, stream) ::vqemu::launch<false>(dim3(grid), dim3(block), &k)
#define VQ_LAUNCH_SYNC(k, grid, block, stream) ::vqemu::launch<true>(dim3(grid), dim3(block), &k)

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char *cudaGetErrorName(cudaError_t) { return "cudaErrorEmulated"; }
inline const char *cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaMalloc(void **p, std::size_t n) {
    // NaN-filled, so reading what was never written shows.
    float *f = static_cast<float *>(std::malloc((n + 3) / 4 * 4));
    if (!f) return cudaErrorMemoryAllocation;
    for (std::size_t i = 0; i < (n + 3) / 4; i++) f[i] = std::nanf("");
    *p = f;
    return cudaSuccess;
}
inline cudaError_t cudaFree(void *p) {
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaHostAlloc(void **p, std::size_t n, unsigned) {
    *p = std::malloc(n);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
inline cudaError_t cudaFreeHost(void *p) {
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(std::size_t *free_b, std::size_t *total_b) {
    *free_b = std::size_t(8) << 30;
    *total_b = std::size_t(8) << 30;
    return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned) {
    static int dummy;
    *s = &dummy;
    return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaMemcpy(void *d, const void *s, std::size_t n, cudaMemcpyKind) {
    std::memmove(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, std::size_t n, cudaMemcpyKind k, cudaStream_t) {
    return cudaMemcpy(d, s, n, k);
}
inline cudaError_t cudaMemsetAsync(void *d, int v, std::size_t n, cudaStream_t) {
    std::memset(d, v, n);
    return cudaSuccess;
}
