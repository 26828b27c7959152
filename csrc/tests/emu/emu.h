// emu.h - the core of dimoo's host emulation of CUDA, for running the CUDA
// backend's own code (kernels/cuda/*.cu) on machines without a GPU (CMake
// option DIMOO_CUDA_EMU; see README.md here).
//
// A kernel launch is queued on its stream (cuda_runtime.cpp); when it runs, its
// blocks run one after another on the thread that waits for it.
// Inside a block every CUDA thread is a fiber with its own stack, switched
// cooperatively at the only points where CUDA threads can observe each
// other: __syncthreads, and the warp collectives (shuffles, ldmatrix, mma),
// which exchange values through per-lane slots between two warp barriers.
// So block-level shared memory, barriers and warp data flow behave as on a
// GPU, and missing barriers show: DIMOO_EMU_SCHEDULE=reverse (or random)
// runs the threads between two barriers in another order, and a kernel whose
// result depends on that order has a race. A barrier some threads never
// reach is reported as a deadlock (the process aborts with the kernel's
// block and the threads stuck).
//
// What it is not: a model of timing, memory coherence between blocks that
// run concurrently on a GPU, or of the instructions' rounding (host floats;
// no FMA contraction unless the compiler adds it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA C++ qualifiers -----------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One block at a time runs, so a function-static variable is the block's shared memory.
#define __shared__ static
#define __constant__ static
#define __grid_constant__

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 {
    unsigned x, y, z;
};

typedef struct CUstream_st *cudaStream_t;

namespace emu {

// The running thread's coordinates (set by the scheduler at every switch).
extern uint3 g_thread, g_block;
extern dim3 g_block_dim, g_grid_dim;

} // namespace emu

#define threadIdx (::emu::g_thread)
#define blockIdx (::emu::g_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
constexpr int warpSize = 32;

namespace emu {

// ---- inside a kernel ---------------------------------------------------------

void block_sync();           // __syncthreads
void warp_sync();            // __syncwarp: the lanes of this thread's warp
void warpgroup_sync();       // the 128 threads of this thread's warpgroup (wgmma's collectives)
unsigned lane_id();
unsigned thread_linear();    // threadIdx as one index, as the scheduler counts threads
unsigned long block_epoch(); // changes at every block start
// This lane's 64-byte exchange slot, and another lane's of the same warp.
void *lane_slot();
void *lane_slot_of(unsigned lane);
// Dynamic shared memory of the running block (poisoned with 0xff bytes at block start).
void *dyn_smem();
size_t dyn_smem_size();

// State a CUDA thread keeps for the length of one block (the PTX emulation's
// queues of copies and wgmmas): one T per thread, fresh at every block start.
template <class T> T &block_thread_state() {
    static std::vector<std::pair<unsigned long, T>> all(1024, {~0ul, T{}});
    auto &e = all[thread_linear()];
    if (e.first != block_epoch()) e = {block_epoch(), T{}};
    return e.second;
}

// One T per block (the emulated mbarriers), fresh at every block start.
template <class T> T &block_state() {
    static std::pair<unsigned long, T> s{~0ul, T{}};
    if (s.first != block_epoch()) s = {block_epoch(), T{}};
    return s.second;
}

// Named barriers (bar.sync / bar.arrive id, n): barrier `id` (1-15) opens
// when n threads have arrived; sync waits for that, arrive does not.
void named_barrier_sync(unsigned id, unsigned n);
void named_barrier_arrive(unsigned id, unsigned n);

// A thread polling for something another thread will do (an mbarrier
// phase): passes the turn on. Every live thread polling or waiting without
// anyone making progress is a deadlock.
void spin_wait();
// Something another thread may be polling for has happened.
void progress();

// The asynchronous proxy of sm_90 (tma.cpp): mbarriers in shared memory and
// TMA tile loads through a tensor map (cuda.h). Shared addresses are offsets
// into the block's dynamic shared memory, as in cuda/ptx_sm90.cuh.
void mbar_init(uint32_t bar, uint32_t count);
// mbarrier.arrive with expect_tx(tx_bytes) first (0: a plain arrive).
void mbar_arrive(uint32_t bar, uint32_t tx_bytes);
// mbarrier.try_wait.parity: whether the phase of that parity has completed.
bool mbar_try_wait(uint32_t bar, uint32_t parity);
// cp.async.bulk.tensor.{rank}d.shared.global.mbarrier::complete_tx::bytes.
void tma_load(uint32_t dst, const void *tensor_map, uint32_t bar, const int *coords, int rank);
// Proxies: shared bytes written through the generic proxy (cp.async) are
// not visible to the async proxy (wgmma) until the writing thread runs
// fence.proxy.async. The emulation remembers the writer of each such byte
// until its fence, and a wgmma operand read of one aborts.
void generic_smem_write(const void *p, size_t n);
void proxy_fence();
void check_async_read(uint32_t offset);

template <class T> T shfl_exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 64, "shuffle of a value larger than a lane slot");
    std::memcpy(lane_slot(), &v, sizeof(T));
    warp_sync();
    T r;
    std::memcpy(&r, lane_slot_of(src_lane & 31), sizeof(T));
    warp_sync(); // nobody overwrites a slot before everyone read it
    return r;
}

// ---- launching ---------------------------------------------------------------

// The order threads take turns between barriers: DIMOO_EMU_SCHEDULE
// (forward, reverse, random) at start; tests may change it.
enum class Schedule { Forward, Reverse, Random };
void set_schedule(Schedule s);
Schedule schedule();

// A stream operation: run now, or recorded while the stream is being captured.
void submit(cudaStream_t s, std::function<void()> op);
// Runs every block of the grid; body runs once per CUDA thread.
void run_grid(const void *kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()> &body);
// Launch checks (block size, shared memory opt-in); records the error and returns false on failure.
bool check_launch(const void *kernel, dim3 grid, dim3 block, size_t smem);

// A kernel's pointer argument must be null or point into a device
// allocation or pinned host memory: a GPU faults on any other host address.
bool kernel_pointer_ok(const void *p);
void report_kernel_pointer(const void *kernel, int arg, const void *p);
template <class T> bool kernel_arg_ok(const void *kernel, int i, const T &a) {
    if constexpr (std::is_pointer_v<T> && !std::is_function_v<std::remove_pointer_t<T>>) {
        if (kernel_pointer_ok(a)) return true;
        report_kernel_pointer(kernel, i, a);
        return false;
    } else {
        (void)kernel, (void)i, (void)a;
        return true;
    }
}
template <class Tuple, size_t... I>
bool kernel_args_ok(const void *kernel, const Tuple &t, std::index_sequence<I...>) {
    return (kernel_arg_ok(kernel, int(I), std::get<I>(t)) && ...);
}

template <class... P> struct Launcher {
    void (*k)(P...);
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    template <class... A> void operator()(A &&...a) const {
        if (!check_launch(reinterpret_cast<const void *>(k), grid, block, smem)) return;
        // Arguments are copied at launch, as the CUDA runtime copies them.
        auto args = std::make_shared<std::tuple<std::decay_t<P>...>>(std::forward<A>(a)...);
        if (!kernel_args_ok(reinterpret_cast<const void *>(k), *args, std::index_sequence_for<P...>{})) return;
        auto kk = k;
        const dim3 g = grid, b = block;
        const size_t sm = smem;
        submit(stream, [kk, args, g, b, sm] {
            run_grid(reinterpret_cast<const void *>(kk), g, b, sm, [&] { std::apply(kk, *args); });
        });
    }
};

template <class... P>
Launcher<P...> launch(void (*k)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
    return Launcher<P...>{k, grid, block, smem, stream};
}

} // namespace emu
