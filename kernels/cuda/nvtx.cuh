// nvtx.cuh - NVTX3 ranges around the CUDA backend's stages (forward: embed,
// each layer's attention and MLP, head; decode steps), for Nsight Systems.
// Header-only NVTX3 C API: every call is a no-op until a profiler injects
// itself, so the ranges cost nothing in production. Compiled in only when
// CMake found nvtx3/nvToolsExt.h (DIMOO_WITH_NVTX); otherwise empty.
#pragma once

#include <cuda_runtime.h>

#if defined(DIMOO_WITH_NVTX)
#include <nvtx3/nvToolsExt.h>
#include <nvtx3/nvToolsExtCudaRt.h>
#endif

namespace dimoo {

// One range on the calling thread, pushed at construction and popped at
// destruction. The name must outlive the object (string literals, or names
// built once per context).
class NvtxRange {
public:
#if defined(DIMOO_WITH_NVTX)
    explicit NvtxRange(const char *name) { nvtxRangePushA(name); }
    ~NvtxRange() { nvtxRangePop(); }
#else
    explicit NvtxRange(const char *) {}
#endif
    NvtxRange(const NvtxRange &) = delete;
    NvtxRange &operator=(const NvtxRange &) = delete;
};

// Names a stream in the profiler's timeline.
inline void nvtx_name_stream(cudaStream_t s, const char *name) {
#if defined(DIMOO_WITH_NVTX)
    nvtxNameCudaStreamA(s, name);
#else
    (void)s, (void)name;
#endif
}

constexpr bool kNvtxBuilt =
#if defined(DIMOO_WITH_NVTX)
    true;
#else
    false;
#endif

} // namespace dimoo
