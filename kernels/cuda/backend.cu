// backend.cu - the CUDA backend: device selection, one cuBLASLt handle per
// runtime, and the single-kernel entry points. The transformer forward on
// the GPU is the work of "CUDA backend, part 1"; until it lands, creating a
// model on this backend is reported as unsupported.
#include <cublasLt.h>

#include <string>

#include "backend.h"
#include "cuda/cuda_common.cuh"
#include "cuda/rmsnorm.cuh"

namespace dimoo {

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

namespace {

class CudaBackend : public Backend {
public:
    explicit CudaBackend(int device) : device_(device) {
        int n = cuda_device_count();
        if (n == 0) fail(DIMOO_ERR_UNSUPPORTED, "no CUDA device is available (no GPU or no driver)");
        if (device < 0 || device >= n)
            fail(DIMOO_ERR_INVALID_ARGUMENT,
                 "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) + " visible)");
        DIMOO_CUDA(cudaSetDevice(device));
        DIMOO_CUDA(cudaGetDeviceProperties(&prop_, device));
        cublasStatus_t st = cublasLtCreate(&lt_);
        if (st != CUBLAS_STATUS_SUCCESS)
            fail(DIMOO_ERR_DEVICE, "cublasLtCreate failed with status " + std::to_string(int(st)));
        DIMOO_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }

    ~CudaBackend() override {
        if (stream_) cudaStreamDestroy(stream_);
        if (lt_) cublasLtDestroy(lt_);
    }

    std::string describe() const override {
        char buf[256];
        std::snprintf(buf, sizeof buf, "cuda:%d %s (sm_%d%d, %.1f GiB, %d SMs)", device_, prop_.name, prop_.major,
                      prop_.minor, double(prop_.totalGlobalMem) / (1024.0 * 1024 * 1024), prop_.multiProcessorCount);
        return buf;
    }

    void rmsnorm(int32_t dtype, const void *x, const void *w, void *out, int rows, int cols, float eps) override {
        DIMOO_CUDA(cudaSetDevice(device_));
        const size_t es = dtype_size(dtype), nx = size_t(rows) * cols * es, nw = size_t(cols) * es;
        DeviceBuffer dx(nx), dw(nw), dout(nx);
        DIMOO_CUDA(cudaMemcpyAsync(dx.get(), x, nx, cudaMemcpyHostToDevice, stream_));
        DIMOO_CUDA(cudaMemcpyAsync(dw.get(), w, nw, cudaMemcpyHostToDevice, stream_));
        DIMOO_CUDA(rmsnorm_launch(dtype, dx.get(), dw.get(), dout.get(), rows, cols, eps, stream_));
        DIMOO_CUDA(cudaMemcpyAsync(out, dout.get(), nx, cudaMemcpyDeviceToHost, stream_));
        DIMOO_CUDA(cudaStreamSynchronize(stream_));
    }

    std::unique_ptr<Model> create_model(const ModelShape &) override {
        fail(DIMOO_ERR_UNSUPPORTED, "the transformer forward is not implemented on the CUDA backend yet; use the CPU backend");
    }

private:
    int device_;
    cudaDeviceProp prop_{};
    cublasLtHandle_t lt_ = nullptr;
    cudaStream_t stream_ = nullptr;
};

} // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

} // namespace dimoo
