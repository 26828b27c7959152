// cuda_common.cuh - turning CUDA errors into dimoo::Error, never aborts.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace dimoo {

inline void cuda_check(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return;
    // Clear the sticky-free error so the next call on this thread starts clean.
    cudaGetLastError();
    const dimoo_status st = e == cudaErrorMemoryAllocation ? DIMOO_ERR_DEVICE_OUT_OF_MEMORY : DIMOO_ERR_DEVICE;
    fail(st, std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

#define DIMOO_CUDA(call) ::dimoo::cuda_check((call), #call)

// Whether p is a multiple of `bytes` (a power of two): the test the
// elementwise kernels' wide paths (vector loads) are chosen by.
__host__ __device__ __forceinline__ bool is_aligned(const void *p, unsigned bytes) {
    return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Device allocations are carved at this alignment.
constexpr size_t kDeviceAlign = 256;
inline size_t align_up(size_t v) { return (v + kDeviceAlign - 1) / kDeviceAlign * kDeviceAlign; }
inline std::string mib(size_t b) { return std::to_string(b >> 20) + " MiB"; }

// Refuses an allocation the device cannot hold, with the numbers, keeping
// 256 MiB free for cuBLAS, the CUDA context's own allocations and
// fragmentation.
inline void check_device_room(int device, size_t need, const std::string &what) {
    constexpr size_t kReserve = size_t(256) << 20;
    size_t free_b = 0, total_b = 0;
    DIMOO_CUDA(cudaMemGetInfo(&free_b, &total_b));
    if (need + kReserve > free_b)
        fail(DIMOO_ERR_DEVICE_OUT_OF_MEMORY, what + " needs " + mib(need) + " of device memory but cuda:" +
                                                 std::to_string(device) + " has " + mib(free_b) + " free of " +
                                                 mib(total_b));
}

// A device buffer that frees itself; allocation failure is an error, not an abort.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes) {
        if (bytes) DIMOO_CUDA(cudaMalloc(&p_, bytes));
        n_ = bytes;
    }
    ~DeviceBuffer() {
        if (p_) cudaFree(p_);
    }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    void *get() const { return p_; }
    size_t size() const { return n_; }

private:
    void *p_ = nullptr;
    size_t n_ = 0;
};

// Page-locked host memory that frees itself: staging for asynchronous
// copies the device reads or writes after the call that enqueued them.
class PinnedBuffer {
public:
    PinnedBuffer() = default;
    explicit PinnedBuffer(size_t bytes) {
        if (!bytes) return;
        const cudaError_t e = cudaHostAlloc(&p_, bytes, cudaHostAllocDefault);
        if (e == cudaErrorMemoryAllocation) {
            cudaGetLastError();
            p_ = nullptr;
            fail(DIMOO_ERR_OUT_OF_MEMORY, "cudaHostAlloc of " + std::to_string(bytes) + " bytes of pinned host memory failed");
        }
        cuda_check(e, "cudaHostAlloc");
        n_ = bytes;
    }
    ~PinnedBuffer() {
        if (p_) cudaFreeHost(p_);
    }
    PinnedBuffer(const PinnedBuffer &) = delete;
    PinnedBuffer &operator=(const PinnedBuffer &) = delete;
    void *get() const { return p_; }
    size_t size() const { return n_; }

private:
    void *p_ = nullptr;
    size_t n_ = 0;
};

} // namespace dimoo
