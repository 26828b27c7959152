// cuda_common.cuh - turning CUDA errors into dimoo::Error, never aborts.
#pragma once

#include <cuda_runtime.h>

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

} // namespace dimoo
