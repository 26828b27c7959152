// cuda_runtime.cpp - the emulated CUDA runtime (see cuda_runtime.h): device
// allocations tracked (copies outside them are errors), streams that queue
// their work until something waits for it (or record it while captured),
// graphs that replay a record.
#include "cuda_runtime.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

struct CUstream_st {
    bool capturing = false;
    bool invalidated = false;
    bool blocking = true; // waits for the legacy default stream, and it for this one
    std::vector<std::function<void()>> record;
    std::deque<std::function<void()>> pending; // queued, not yet run (emu::g_queue_mutex)
};
struct CUevent_st {
    std::chrono::steady_clock::time_point t{};
    bool recorded = false;
    cudaStream_t stream = nullptr; // where it was last recorded
};
struct CUgraph_st {
    std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
    std::vector<std::function<void()>> ops;
};

namespace emu {
namespace {

std::mutex g_mem_mutex;
std::map<uintptr_t, size_t> g_allocs; // device allocations: start -> bytes
size_t g_live = 0;
std::map<uintptr_t, size_t> g_pinned; // cudaHostAlloc'd host memory: start -> bytes
std::map<const void *, int> g_max_dyn_smem;
std::mutex g_queue_mutex;           // every stream's pending queue, and g_streams
std::recursive_mutex g_run_mutex;   // held while queued work runs
std::set<cudaStream_t> g_streams;   // live streams (the null stream is g_null_stream)
CUstream_st g_null_stream;

bool eager_streams() {
    static const bool e = [] {
        const char *v = std::getenv("DIMOO_EMU_STREAMS");
        return v && std::string(v) == "eager";
    }();
    return e;
}
thread_local cudaError_t g_last = cudaSuccess;
int g_device = 0;

size_t total_bytes() {
    static const size_t t = [] {
        const char *e = std::getenv("DIMOO_EMU_DEVICE_MIB");
        const long mib = e ? std::atol(e) : 16384;
        return size_t(mib > 0 ? mib : 16384) << 20;
    }();
    return t;
}

// The emulated device: an sm_80 unless DIMOO_EMU_SM says 90 (then the
// sm_90a kernels run too, through the emulated wgmma), or 75, 86 or 89 (what
// the library does on a device it has no code for, or one with less shared
// memory). Read at every query, so a test may change it.
int sm() {
    const char *e = std::getenv("DIMOO_EMU_SM");
    const int v = e ? std::atoi(e) : 80;
    return v == 75 || v == 86 || v == 89 || v == 90 ? v : 80;
}
size_t smem_optin() {
    switch (sm()) {
    case 90: return 227 * 1024;
    case 86:
    case 89: return 99 * 1024;
    case 75: return 64 * 1024;
    default: return 163 * 1024;
    }
}

// How many SMs the emulated device reports: 1 unless DIMOO_EMU_SMS says
// otherwise (a persistent grid then splits its tiles unevenly over them).
int sm_count() {
    const char *e = std::getenv("DIMOO_EMU_SMS");
    const int v = e ? std::atoi(e) : 1;
    return v >= 1 && v <= 1024 ? v : 1;
}

cudaError_t set(cudaError_t e) {
    if (e != cudaSuccess) g_last = e;
    return e;
}

// Whether [p, p + n) lies in one of the allocations (start -> bytes) of m.
bool in_one(const std::map<uintptr_t, size_t> &m, const void *p, size_t n) {
    std::lock_guard<std::mutex> l(g_mem_mutex);
    const uintptr_t u = reinterpret_cast<uintptr_t>(p);
    auto it = m.upper_bound(u);
    if (it == m.begin()) return false;
    --it;
    return u >= it->first && u + n <= it->first + it->second;
}
bool in_device(const void *p, size_t n) { return in_one(g_allocs, p, n); }

cudaError_t check_copy(void *d, const void *s, size_t n, cudaMemcpyKind k) {
    if (n == 0) return cudaSuccess;
    if (!d || !s) return cudaErrorInvalidValue;
    const bool dd = k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice;
    const bool sd = k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice;
    if ((dd && !in_device(d, n)) || (sd && !in_device(s, n))) {
        std::fprintf(stderr, "dimoo emu: a %zu-byte copy (kind %d) reaches outside a device allocation\n", n, int(k));
        return cudaErrorInvalidValue;
    }
    return cudaSuccess;
}

} // namespace

void flush_stream(cudaStream_t s);
void flush_blocking();
void flush_all();

// Work is queued per stream and runs only when the host waits for it (a
// stream or device synchronize, an event synchronize, a synchronous copy,
// cudaFree), so a host that reads a result before it waits sees the value from
// before the work, as it may on a GPU. The legacy default stream (null)
// orders itself with the blocking streams, not with cudaStreamNonBlocking
// ones: cudaMemcpy does not wait for a non-blocking stream's kernels.
// DIMOO_EMU_STREAMS=eager runs every operation at once (to tell a queueing
// problem from a kernel one).
void submit(cudaStream_t s, std::function<void()> op) {
    if (s && s->capturing) {
        s->record.push_back(std::move(op));
        return;
    }
    if (eager_streams()) {
        op();
        return;
    }
    // The legacy default stream waits for the blocking streams' earlier
    // work, and they for its: run that now (earlier than a GPU may, which is
    // one order a GPU may also take).
    if (!s) flush_blocking();
    else if (s->blocking) flush_stream(&g_null_stream);
    std::lock_guard<std::mutex> l(g_queue_mutex);
    (s ? s : &g_null_stream)->pending.push_back(std::move(op));
}

void flush_stream(cudaStream_t s) {
    // One flush at a time: the emulated device runs one operation at a time.
    std::lock_guard<std::recursive_mutex> run(g_run_mutex);
    for (;;) {
        std::function<void()> op;
        {
            std::lock_guard<std::mutex> l(g_queue_mutex);
            if (s->pending.empty()) return;
            op = std::move(s->pending.front());
            s->pending.pop_front();
        }
        op();
    }
}

void flush_blocking() {
    std::vector<cudaStream_t> ss;
    {
        std::lock_guard<std::mutex> l(g_queue_mutex);
        for (cudaStream_t s : g_streams)
            if (s->blocking) ss.push_back(s);
    }
    for (cudaStream_t s : ss) flush_stream(s);
    flush_stream(&g_null_stream);
}

void flush_all() {
    std::vector<cudaStream_t> ss;
    {
        std::lock_guard<std::mutex> l(g_queue_mutex);
        ss.assign(g_streams.begin(), g_streams.end());
    }
    for (cudaStream_t s : ss) flush_stream(s);
    flush_stream(&g_null_stream);
}

bool in_pinned(const void *p, size_t n) { return in_one(g_pinned, p, n); }

bool kernel_pointer_ok(const void *p) { return !p || in_device(p, 0) || in_pinned(p, 0); }

void report_kernel_pointer(const void *kernel, int arg, const void *p) {
    std::fprintf(stderr,
                 "dimoo emu: kernel %p argument %d (%p) points neither into a device allocation nor into pinned "
                 "host memory\n",
                 kernel, arg, p);
    set(cudaErrorInvalidValue);
}

bool check_launch(const void *kernel, dim3 grid, dim3 block, size_t smem) {
    const size_t threads = size_t(block.x) * block.y * block.z;
    cudaError_t e = cudaSuccess;
    if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535)
        e = cudaErrorInvalidConfiguration;
    if (smem > 48 * 1024) {
        std::lock_guard<std::mutex> l(g_mem_mutex);
        auto it = g_max_dyn_smem.find(kernel);
        if (it == g_max_dyn_smem.end() || size_t(it->second) < smem) e = cudaErrorInvalidValue; // no opt-in
    }
    if (smem > smem_optin()) e = cudaErrorInvalidValue;
    if (e != cudaSuccess) {
        std::fprintf(stderr, "dimoo emu: launch refused (grid %u,%u,%u block %u,%u,%u smem %zu)\n", grid.x, grid.y,
                     grid.z, block.x, block.y, block.z, smem);
        set(e);
        return false;
    }
    return true;
}

cudaError_t func_set_max_dynamic_smem(const void *kernel, int bytes) {
    if (bytes < 0 || size_t(bytes) > smem_optin()) return set(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> l(g_mem_mutex);
    g_max_dyn_smem[kernel] = bytes;
    return cudaSuccess;
}

bool is_device_range(const void *p, size_t n) { return in_device(p, n); }
size_t live_device_bytes() {
    std::lock_guard<std::mutex> l(g_mem_mutex);
    return g_live;
}

} // namespace emu

using emu::set;

cudaError_t cudaGetLastError() {
    const cudaError_t e = emu::g_last;
    emu::g_last = cudaSuccess;
    return e;
}
cudaError_t cudaPeekAtLastError() { return emu::g_last; }
const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    default: return "cudaErrorEmulated";
    }
}
const char *cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
    if (d != 0) return set(cudaErrorInvalidDevice);
    emu::g_device = d;
    return cudaSuccess;
}
cudaError_t cudaGetDevice(int *d) {
    *d = emu::g_device;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d) {
    if (d != 0) return set(cudaErrorInvalidDevice);
    std::memset(p, 0, sizeof *p);
    std::snprintf(p->name, sizeof p->name, "dimoo host emulation");
    p->totalGlobalMem = emu::total_bytes();
    p->sharedMemPerBlock = 48 * 1024;
    p->sharedMemPerBlockOptin = emu::smem_optin();
    p->major = emu::sm() / 10;
    p->minor = emu::sm() % 10;
    p->multiProcessorCount = emu::sm_count();
    p->maxThreadsPerBlock = 1024;
    p->warpSize_ = 32;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d) {
    if (d != 0) return set(cudaErrorInvalidDevice);
    switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = emu::sm_count(); break;
    case cudaDevAttrComputeCapabilityMajor: *v = emu::sm() / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *v = emu::sm() % 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(emu::smem_optin()); break;
    default: return set(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
    emu::flush_all();
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b) {
    *total_b = emu::total_bytes();
    *free_b = *total_b - emu::live_device_bytes();
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t n) {
    *p = nullptr;
    if (n == 0) return cudaSuccess;
    {
        std::lock_guard<std::mutex> l(emu::g_mem_mutex);
        if (emu::g_live + n > emu::total_bytes()) return set(cudaErrorMemoryAllocation);
    }
    // Exactly n bytes, so that AddressSanitizer builds see a kernel overrun.
    void *m = nullptr;
    if (posix_memalign(&m, 256, n) != 0) return set(cudaErrorMemoryAllocation);
    std::memset(m, 0xff, n); // never-written memory reads as NaN
    std::lock_guard<std::mutex> l(emu::g_mem_mutex);
    emu::g_allocs[reinterpret_cast<uintptr_t>(m)] = n;
    emu::g_live += n;
    *p = m;
    return cudaSuccess;
}
cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    emu::flush_all(); // cudaFree waits for the device
    {
        std::lock_guard<std::mutex> l(emu::g_mem_mutex);
        auto it = emu::g_allocs.find(reinterpret_cast<uintptr_t>(p));
        if (it == emu::g_allocs.end()) {
            std::fprintf(stderr, "dimoo emu: cudaFree of a pointer that is not a device allocation\n");
            return set(cudaErrorInvalidDevicePointer);
        }
        emu::g_live -= it->second;
        emu::g_allocs.erase(it);
    }
    std::free(p);
    return cudaSuccess;
}
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned) {
    *p = std::malloc(n ? n : 1);
    if (!*p) return set(cudaErrorMemoryAllocation);
    std::lock_guard<std::mutex> l(emu::g_mem_mutex);
    emu::g_pinned[reinterpret_cast<uintptr_t>(*p)] = n;
    return cudaSuccess;
}
cudaError_t cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }
cudaError_t cudaFreeHost(void *p) {
    if (!p) return cudaSuccess;
    emu::flush_all();
    {
        std::lock_guard<std::mutex> l(emu::g_mem_mutex);
        if (!emu::g_pinned.erase(reinterpret_cast<uintptr_t>(p))) {
            std::fprintf(stderr, "dimoo emu: cudaFreeHost of a pointer that cudaHostAlloc did not return\n");
            return set(cudaErrorInvalidValue);
        }
    }
    std::free(p);
    return cudaSuccess;
}
// On the legacy default stream: after the blocking streams' earlier work,
// not after a non-blocking stream's.
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k) {
    if (cudaError_t e = emu::check_copy(d, s, n, k)) return set(e);
    emu::flush_blocking();
    if (n) std::memmove(d, s, n);
    return cudaSuccess;
}
// As the runtime does with pageable host memory: a copy from it takes the
// bytes at the call (the caller may reuse them on return), a copy to it
// returns when done; pinned memory is read or written when the copy runs.
cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    if (cudaError_t e = emu::check_copy(d, s, n, k)) return set(e);
    if (!n) return cudaSuccess;
    const bool capturing = st && st->capturing;
    if (k == cudaMemcpyHostToDevice && !emu::in_pinned(s, n) && !capturing) {
        auto bytes = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t *>(s),
                                                            static_cast<const uint8_t *>(s) + n);
        emu::submit(st, [d, bytes] { std::memcpy(d, bytes->data(), bytes->size()); });
        return cudaSuccess;
    }
    // Pinned host memory may be read (H2D) or written (D2H) by the copy at
    // any moment until the host waits: a host write to it in between is a
    // race, so it aborts when the copy runs and finds the bytes changed.
    const void *host = k == cudaMemcpyHostToDevice ? s : k == cudaMemcpyDeviceToHost ? d : nullptr;
    if (host && emu::in_pinned(host, n) && !capturing) {
        auto before = std::make_shared<std::vector<uint8_t>>(static_cast<const uint8_t *>(host),
                                                             static_cast<const uint8_t *>(host) + n);
        emu::submit(st, [d, s, n, host, before] {
            if (std::memcmp(host, before->data(), n) != 0) {
                std::fprintf(stderr, "dimoo emu: the host wrote pinned memory (%p, %zu bytes) that a queued "
                                     "cudaMemcpyAsync had not yet copied (a race on a GPU)\n", host, n);
                std::abort();
            }
            std::memmove(d, s, n);
        });
        return cudaSuccess;
    }
    emu::submit(st, [d, s, n] { std::memmove(d, s, n); });
    if (k == cudaMemcpyDeviceToHost && !emu::in_pinned(d, n) && !capturing) {
        if (st) emu::flush_stream(st);
        else emu::flush_blocking();
    }
    return cudaSuccess;
}
cudaError_t cudaMemset(void *d, int v, size_t n) {
    if (n && !emu::in_device(d, n)) return set(cudaErrorInvalidValue);
    emu::flush_blocking();
    if (n) std::memset(d, v, n);
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *d, int v, size_t n, cudaStream_t st) {
    if (n && !emu::in_device(d, n)) return set(cudaErrorInvalidValue);
    if (n) emu::submit(st, [d, v, n] { std::memset(d, v, n); });
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) {
    *s = new CUstream_st;
    std::lock_guard<std::mutex> l(emu::g_queue_mutex);
    emu::g_streams.insert(*s);
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags) {
    cudaStreamCreate(s);
    (*s)->blocking = !(flags & cudaStreamNonBlocking);
    return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (!s) return set(cudaErrorInvalidResourceHandle);
    emu::flush_stream(s); // its work still completes
    {
        std::lock_guard<std::mutex> l(emu::g_queue_mutex);
        emu::g_streams.erase(s);
    }
    delete s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (s && s->capturing) { // not allowed while capturing; the capture is lost
        s->invalidated = true;
        return set(cudaErrorStreamCaptureUnsupported);
    }
    if (s) emu::flush_stream(s);
    else emu::flush_blocking();
    return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (!s || s->capturing) return set(cudaErrorInvalidValue);
    s->capturing = true;
    s->invalidated = false;
    s->record.clear();
    return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    *g = nullptr;
    if (!s || !s->capturing) return set(cudaErrorInvalidValue);
    s->capturing = false;
    if (s->invalidated) {
        s->record.clear();
        return set(cudaErrorStreamCaptureInvalidated);
    }
    *g = new CUgraph_st{std::move(s->record)};
    s->record.clear();
    return cudaSuccess;
}
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *st) {
    *st = s && s->capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long) {
    if (!g) return set(cudaErrorInvalidValue);
    *e = new CUgraphExec_st{g->ops};
    return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) {
    if (!e) return set(cudaErrorInvalidValue);
    for (auto &op : e->ops) emu::submit(s, op);
    return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
    delete g;
    return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
    delete e;
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *e) {
    *e = new CUevent_st;
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    if (!e) return set(cudaErrorInvalidValue);
    cudaEventSynchronize(e); // a queued record must not outlive it
    delete e;
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    if (!e) return set(cudaErrorInvalidValue);
    e->stream = s;
    e->recorded = false;
    emu::submit(s, [e] {
        e->t = std::chrono::steady_clock::now();
        e->recorded = true;
    });
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t e) {
    if (!e) return set(cudaErrorInvalidValue);
    if (e->recorded) return cudaSuccess; // (its stream may be gone since)
    if (e->stream) emu::flush_stream(e->stream);
    else emu::flush_blocking();
    return cudaSuccess;
}
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    if (!a || !b || !a->recorded || !b->recorded) return set(cudaErrorInvalidValue);
    *ms = std::chrono::duration<float, std::milli>(b->t - a->t).count();
    return cudaSuccess;
}
