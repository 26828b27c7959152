// test_emu.cpp - the host emulation of CUDA itself (emu.h), in
// DIMOO_CUDA_EMU builds: barriers, shuffles, ldmatrix + mma.sync against a
// plain matrix product, cp.async landing only at its wait, races showing as
// schedule-dependent results, deadlocks reported, graph capture and replay,
// and the runtime's refusals (copies outside an allocation, launches beyond
// the limits). The CUDA tests' results on the emulation mean something only
// if these hold.
#include <gtest/gtest.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include <cuda.h>

#include "cuda/ptx_sm80.cuh"
#include "cuda/ptx_sm90.cuh"

namespace {

struct ScheduleGuard {
    emu::Schedule saved = emu::schedule();
    ~ScheduleGuard() { emu::set_schedule(saved); }
};
// Runs f once in each schedule (forward, reverse, random), restoring the setting after.
template <class F> void in_every_schedule(F f) {
    ScheduleGuard g;
    for (auto s : {emu::Schedule::Forward, emu::Schedule::Reverse, emu::Schedule::Random}) {
        emu::set_schedule(s);
        f();
    }
}

template <class T> struct Dev {
    T *p = nullptr;
    size_t n;
    explicit Dev(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&p, n * sizeof(T)), cudaSuccess); }
    ~Dev() { cudaFree(p); }
    std::vector<T> get() const {
        std::vector<T> h(n);
        EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
        return h;
    }
};

// ---- kernels -------------------------------------------------------------------

// Block sum of threadIdx.x: warp butterflies, then the warps' partials.
__global__ void block_sum(int *out) {
    int v = int(threadIdx.x);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __shared__ int part[32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0;
        for (unsigned w = 0; w < blockDim.x / 32; w++) s += part[w];
        out[blockIdx.x] = s;
    }
}

// Each thread writes its slot and reads its neighbour's, with or without the barrier between.
__global__ void neighbour(int *out, bool barrier) {
    __shared__ int s[64];
    s[threadIdx.x] = int(threadIdx.x) + 1000 * int(blockIdx.x);
    if (barrier) __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// Half a warp at __syncwarp, the other half at __syncthreads: never meets.
__global__ void divergent_barriers() {
    if (threadIdx.x < 16) __syncwarp();
    else __syncthreads();
}

// D (16x8, fp32) = A (16x16 row-major) B, with B given as Bt (8x16: n rows of k)
// through ldmatrix, and E (16x8) = A V with V (16x8, k rows of n) through ldmatrix.trans.
__global__ void mma_tile(const uint16_t *a, const uint16_t *bt, const uint16_t *v, float *d, float *e) {
    __shared__ uint16_t sa[16 * 16], sb[8 * 16], sv[16 * 8];
    const int lane = int(threadIdx.x);
    for (int i = lane; i < 256; i += 32) sa[i] = a[i];
    for (int i = lane; i < 128; i += 32) sb[i] = bt[i], sv[i] = v[i];
    __syncwarp();
    uint32_t af[4], bf[4], vf[4];
    // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
    dimoo::ldmatrix_x4(af, sa + ((lane & 7) + ((lane >> 3) & 1) * 8) * 16 + (lane >> 4) * 8);
    // B: (n 0-7, k 0-7), (n 0-7, k 8-15); lanes 16-31 repeat them.
    dimoo::ldmatrix_x4(bf, sb + (lane & 7) * 16 + ((lane >> 3) & 1) * 8);
    // V transposed: (k 0-7, n 0-7), (k 8-15, n 0-7); lanes 16-31 repeat them.
    dimoo::ldmatrix_x4_trans(vf, sv + ((lane & 7) + ((lane >> 3) & 1) * 8) * 8);
    float acc[4] = {0, 0, 0, 0}, acc2[4] = {0, 0, 0, 0};
    dimoo::mma_bf16(acc, af, bf[0], bf[1]);
    dimoo::mma_bf16(acc2, af, vf[0], vf[1]);
    const int g = lane >> 2, t = lane & 3;
    for (int k = 0; k < 4; k++) {
        const int row = g + (k >= 2 ? 8 : 0), col = 2 * t + (k & 1);
        d[row * 8 + col] = acc[k];
        e[row * 8 + col] = acc2[k];
    }
}

// TMA: thread 0 loads one box (64 columns x 8 rows of bf16, 128-byte
// swizzled) at (c0, c1) onto an mbarrier announcing `tx` bytes; every
// thread then reads its elements of the box (after the mbarrier's phase when
// `wait`) and writes them out unswizzled.
__global__ void tma_box(const __grid_constant__ CUtensorMap map, int c0, int c1, uint32_t tx, bool wait,
                        uint16_t *out) {
    const uint32_t bar = 1024; // the box fills bytes 0-1023
    if (threadIdx.x == 0) {
        dimoo::sm90::mbar_init(bar, 1);
        dimoo::sm90::fence_mbar_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        dimoo::sm90::mbar_arrive_expect_tx(bar, tx);
        dimoo::sm90::tma_load_2d(0, &map, bar, c0, c1);
    }
    if (wait) dimoo::sm90::mbar_wait(bar, 0);
    const auto *smem = static_cast<const unsigned char *>(emu::dyn_smem());
    for (unsigned i = threadIdx.x; i < 64 * 8; i += blockDim.x) {
        uint16_t v;
        std::memcpy(&v, smem + dimoo::sm90::emu_detail::swizzled(i * 2), 2);
        out[i] = v;
    }
}

// Two warps taking turns through named barriers 1 and 2 (the ping-pong of
// the TMA attention kernel): each turn, lane 0 of the warp whose turn it is
// appends its warp number.
__global__ void turns(int *log) {
    __shared__ int n;
    if (threadIdx.x == 0) n = 0;
    __syncthreads();
    const int w = int(threadIdx.x / 32);
    if (w == 1) dimoo::sm90::named_bar_arrive(1, 64);
    for (int k = 0; k < 3; k++) {
        dimoo::sm90::named_bar_sync(1 + w, 64);
        if (threadIdx.x % 32 == 0) log[n++] = w;
        if (!(k == 2 && w == 1)) dimoo::sm90::named_bar_arrive(2 - w, 64);
    }
}

// One warpgroup: a 64 x 128 bf16 tile into shared memory with cp.async,
// then S = A A^T (k16) with wgmma. `proxy_fence`: fence.proxy.async after
// the copies land; `wgmma_fence`: wgmma.fence before the wgmma.
__global__ void cp_async_then_wgmma(const uint16_t *src, float *out, bool proxy_fence, bool wgmma_fence) {
    for (int c = int(threadIdx.x); c < 64 * 16; c += 128) {
        const int r = c / 16, ch = c % 16;
        const uint32_t dst = uint32_t((ch / 8) * 8192) + dimoo::sm90::sw128_chunk(r, ch % 8);
        dimoo::sm90::cp_async16(dst, src + r * 128 + ch * 8, 16);
    }
    dimoo::sm90::cp_async_commit();
    dimoo::sm90::cp_async_wait<0>();
    if (proxy_fence) dimoo::sm90::fence_proxy_async();
    __syncthreads();
    float s[32] = {};
    if (wgmma_fence) dimoo::sm90::wgmma_fence();
    const uint64_t d = dimoo::sm90::desc_sw128(0, 16, 1024);
    dimoo::sm90::wgmma_s(s, d, d, 0);
    dimoo::sm90::wgmma_commit();
    dimoo::sm90::wgmma_wait<0>();
    out[threadIdx.x] = s[0];
}

// cp.async: before the wait the destination holds what it held; after, the source.
__global__ void cp_async_probe(const uint32_t *src, uint32_t *out) {
    __shared__ uint32_t s[8];
    s[threadIdx.x * 4] = 7; // threads 0 and 1 each own 16 bytes
    dimoo::cp_async16(&s[threadIdx.x * 4], src + threadIdx.x * 4, threadIdx.x == 0 ? 16 : 0);
    dimoo::cp_async_commit();
    out[threadIdx.x * 2] = s[threadIdx.x * 4];
    dimoo::cp_async_wait<0>();
    out[threadIdx.x * 2 + 1] = s[threadIdx.x * 4];
}

__global__ void add_one(int *p) { p[threadIdx.x] += 1; }
__global__ void write_past(int *p, int n) { p[n + int(threadIdx.x)] = 1; }
__global__ void big_smem(int *p) { p[0] = 1; }

float bf16(uint16_t h) { return __bfloat162float(__nv_bfloat16{h}); }

// ---- tests ---------------------------------------------------------------------

TEST(CudaEmu, ShuffleReductionInEverySchedule) {
    in_every_schedule([] {
        Dev<int> out(3);
        emu::launch(block_sum, 3, 256)(out.p);
        ASSERT_EQ(cudaGetLastError(), cudaSuccess);
        for (int v : out.get()) EXPECT_EQ(v, 255 * 256 / 2);
    });
}

TEST(CudaEmu, MissingBarrierShowsAsScheduleDependence) {
    ScheduleGuard g;
    std::vector<int> with[2], without[2];
    for (int k = 0; k < 2; k++) {
        emu::set_schedule(k ? emu::Schedule::Reverse : emu::Schedule::Forward);
        Dev<int> a(128), b(128);
        emu::launch(neighbour, 2, 64)(a.p, true);
        emu::launch(neighbour, 2, 64)(b.p, false);
        with[k] = a.get();
        without[k] = b.get();
    }
    EXPECT_EQ(with[0], with[1]);
    for (int t = 0; t < 64; t++) EXPECT_EQ(with[0][64 + t], 1000 + (t + 1) % 64);
    EXPECT_NE(without[0], without[1]) << "a race went unseen";
}

TEST(CudaEmuDeathTest, DivergentBarriersAreADeadlock) {
    EXPECT_DEATH(
        {
            emu::launch(divergent_barriers, 1, 32)();
            cudaDeviceSynchronize();
        },
        "deadlock");
}

TEST(CudaEmu, LdmatrixAndMmaAreAMatrixProduct) {
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    auto rnd = [&](size_t n) {
        std::vector<uint16_t> v(n);
        for (auto &x : v) x = __float2bfloat16_rn(nd(rng)).__x;
        return v;
    };
    const auto a = rnd(256), bt = rnd(128), v = rnd(128);
    Dev<uint16_t> da(256), db(128), dv(128);
    Dev<float> dd(128), de(128);
    cudaMemcpy(da.p, a.data(), 512, cudaMemcpyHostToDevice);
    cudaMemcpy(db.p, bt.data(), 256, cudaMemcpyHostToDevice);
    cudaMemcpy(dv.p, v.data(), 256, cudaMemcpyHostToDevice);
    emu::launch(mma_tile, 1, 32)(da.p, db.p, dv.p, dd.p, de.p);
    const auto d = dd.get(), e = de.get();
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 8; j++) {
            double s = 0, s2 = 0;
            for (int k = 0; k < 16; k++) {
                s += double(bf16(a[i * 16 + k])) * bf16(bt[j * 16 + k]);
                s2 += double(bf16(a[i * 16 + k])) * bf16(v[k * 8 + j]);
            }
            EXPECT_NEAR(d[i * 8 + j], s, 1e-4) << i << "," << j;
            EXPECT_NEAR(e[i * 8 + j], s2, 1e-4) << i << "," << j;
        }
}

TEST(CudaEmu, CpAsyncLandsAtItsWait) {
    const uint32_t src[8] = {11, 12, 13, 14, 21, 22, 23, 24};
    Dev<uint32_t> ds(8), out(4);
    cudaMemcpy(ds.p, src, 32, cudaMemcpyHostToDevice);
    emu::launch(cp_async_probe, 1, 2)(ds.p, out.p);
    const auto o = out.get();
    EXPECT_EQ(o[0], 7u);  // before the wait: the old contents
    EXPECT_EQ(o[1], 11u); // after: the source
    EXPECT_EQ(o[2], 7u);
    EXPECT_EQ(o[3], 0u); // src_bytes 0: zeros
}

TEST(CudaEmu, GraphsReplayWhatWasCaptured) {
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreate(&s), cudaSuccess);
    Dev<int> d(32);
    ASSERT_EQ(cudaMemsetAsync(d.p, 0, 32 * 4, s), cudaSuccess);
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), cudaSuccess);
    emu::launch(add_one, 1, 32, 0, s)(d.p);
    emu::launch(add_one, 1, 32, 0, s)(d.p);
    cudaGraph_t graph;
    ASSERT_EQ(cudaStreamEndCapture(s, &graph), cudaSuccess);
    EXPECT_EQ(d.get()[5], 0) << "captured work ran at capture";
    cudaGraphExec_t exec;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0ULL), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, s), cudaSuccess);
    EXPECT_EQ(d.get()[5], 4);
    // Synchronizing a capturing stream is refused and spoils the capture.
    ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed), cudaSuccess);
    EXPECT_NE(cudaStreamSynchronize(s), cudaSuccess);
    cudaGraph_t bad;
    EXPECT_NE(cudaStreamEndCapture(s, &bad), cudaSuccess);
    EXPECT_EQ(bad, nullptr);
    cudaGetLastError();
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(s);
}

// Work runs when the host waits for it, so a result read too early shows.
TEST(CudaEmu, StreamWorkRunsWhenTheHostWaits) {
    cudaStream_t s;
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    Dev<int> d(32);
    int *pin = nullptr;
    ASSERT_EQ(cudaHostAlloc(&pin, 32 * 4, cudaHostAllocDefault), cudaSuccess);
    std::fill(pin, pin + 32, 7);
    ASSERT_EQ(cudaMemsetAsync(d.p, 0, 32 * 4, s), cudaSuccess);
    emu::launch(add_one, 1, 32, 0, s)(d.p);
    ASSERT_EQ(cudaMemcpyAsync(pin, d.p, 32 * 4, cudaMemcpyDeviceToHost, s), cudaSuccess);
    EXPECT_EQ(pin[5], 7) << "a copy into pinned memory landed before anything waited for it";
    EXPECT_EQ(d.get()[5], -1) << "cudaMemcpy waited for a non-blocking stream";
    ASSERT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    EXPECT_EQ(pin[5], 1);
    EXPECT_EQ(d.get()[5], 1);

    // From pageable memory the bytes are taken at the call; into pageable
    // memory the call returns when the copy is done.
    std::vector<int> h(32, 3);
    ASSERT_EQ(cudaMemcpyAsync(d.p, h.data(), 32 * 4, cudaMemcpyHostToDevice, s), cudaSuccess);
    h.assign(32, 9);
    emu::launch(add_one, 1, 32, 0, s)(d.p);
    ASSERT_EQ(cudaMemcpyAsync(h.data(), d.p, 32 * 4, cudaMemcpyDeviceToHost, s), cudaSuccess);
    EXPECT_EQ(h[31], 4);

    // A blocking stream's work is waited for by the legacy default stream.
    cudaStream_t b;
    ASSERT_EQ(cudaStreamCreate(&b), cudaSuccess);
    emu::launch(add_one, 1, 32, 0, b)(d.p);
    EXPECT_EQ(d.get()[0], 5);
    // An event waits for what its stream held when it was recorded.
    cudaEvent_t e;
    ASSERT_EQ(cudaEventCreate(&e), cudaSuccess);
    emu::launch(add_one, 1, 32, 0, s)(d.p);
    ASSERT_EQ(cudaEventRecord(e, s), cudaSuccess);
    ASSERT_EQ(cudaEventSynchronize(e), cudaSuccess);
    EXPECT_EQ(d.get()[0], 6);
    cudaEventDestroy(e);
    cudaStreamDestroy(b);
    cudaStreamDestroy(s);
    cudaFreeHost(pin);
}

// A GPU faults on a host address; mapped pinned memory it may read.
TEST(CudaEmu, KernelsTakeNoPageableHostPointers) {
    std::vector<int> h(32, 0);
    emu::launch(add_one, 1, 32)(h.data());
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(h[3], 0) << "the refused launch ran";
    int *pin = nullptr;
    ASSERT_EQ(cudaHostAlloc(&pin, 32 * 4, cudaHostAllocDefault), cudaSuccess);
    std::fill(pin, pin + 32, 0);
    emu::launch(add_one, 1, 32)(pin);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(pin[3], 1);
    cudaFreeHost(pin);
}

TEST(CudaEmu, RuntimeRefusesWhatAGpuRefuses) {
    Dev<int> d(16);
    std::vector<int> h(32);
    EXPECT_EQ(cudaMemcpy(d.p, h.data(), 32 * 4, cudaMemcpyHostToDevice), cudaErrorInvalidValue);
    EXPECT_EQ(cudaMemcpy(h.data(), d.p + 8, 9 * 4, cudaMemcpyDeviceToHost), cudaErrorInvalidValue);
    EXPECT_EQ(cudaMemcpy(h.data(), d.p + 8, 8 * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(h[0], -1) << "device memory starts as 0xff bytes";
    cudaGetLastError();
    emu::launch(add_one, 1, 2048)(d.p); // more than 1024 threads
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
    emu::launch(big_smem, 1, 32, 64 * 1024)(d.p); // > 48 KB without opting in
    EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
    ASSERT_EQ(cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024), cudaSuccess);
    emu::launch(big_smem, 1, 32, 64 * 1024)(d.p);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    void *p = nullptr;
    EXPECT_EQ(cudaMalloc(&p, total_b), cudaErrorMemoryAllocation);
    cudaGetLastError();
}

// A 20 x 100 bf16 tensor (row stride 128 elements) as 64 x 8 boxes.
struct TmaFixture {
    std::vector<uint16_t> host = std::vector<uint16_t>(20 * 128);
    Dev<uint16_t> dev{20 * 128};
    CUtensorMap map{};
    TmaFixture() {
        for (size_t i = 0; i < host.size(); i++) host[i] = uint16_t(i + 1);
        cudaMemcpy(dev.p, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
        EXPECT_EQ(encode(dev.p, 100, 20, 256, 64, 8, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_SUCCESS);
    }
    CUresult encode(void *p, uint64_t cols, uint64_t rows, uint64_t stride, uint32_t bc, uint32_t br,
                    CUtensorMapSwizzle sw) {
        const cuuint64_t dim[2] = {cols, rows}, st[1] = {stride};
        const cuuint32_t box[2] = {bc, br}, es[2] = {1, 1};
        return cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p, dim, st, box, es,
                                      CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    }
    std::vector<uint16_t> run(int c0, int c1, uint32_t tx, bool wait) {
        Dev<uint16_t> out(64 * 8);
        emu::launch(tma_box, 1, 64, 2048)(map, c0, c1, tx, wait, out.p);
        EXPECT_EQ(cudaGetLastError(), cudaSuccess);
        return out.get();
    }
};

TEST(CudaEmu, NamedBarriersOrderTurns) {
    in_every_schedule([] {
        Dev<int> log(6);
        emu::launch(turns, 1, 64)(log.p);
        ASSERT_EQ(cudaGetLastError(), cudaSuccess);
        EXPECT_EQ(log.get(), (std::vector<int>{0, 1, 0, 1, 0, 1}));
    });
}

// The emulated wgmma's reading of a descriptor against CUTLASS 4.2's
// canonical 128-byte-swizzle layouts (cute/atom/mma_traits_sm90_gmma.hpp,
// in bf16 elements, T = 8 per 16 bytes):
//   K-major:  ((8, m), (T, 2)) : ((8T, SBO), (1, T))
//   MN-major: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO))
// for the descriptors the attention kernels build: Q/K tiles (K-major,
// 64-column blocks of ROWS rows, k16 steps +32 bytes) and V (MN-major,
// 64-column blocks BN rows apart, 16 keys per step).
TEST(CudaEmu, WgmmaDescriptorsReadCuteCanonicalLayouts) {
    namespace e = dimoo::sm90::emu_detail;
    using dimoo::sm90::desc_sw128;
    for (int rows : {64, 128})
        for (int kk = 0; kk < 8; kk++) {
            const uint32_t base = 4096, start = base + (kk >> 2) * (rows * 128) + (kk & 3) * 32;
            const e::Desc d = e::decode(desc_sw128(start, 16, 1024));
            for (int mn = 0; mn < rows; mn++)
                for (int k = 0; k < 16; k++) {
                    // CuTe's canonical offset (elements), then where the tile's element (mn, 16 kk + k) lives.
                    const uint32_t cute = start + 2 * uint32_t((mn % 8) * 64 + (mn / 8) * (1024 / 2) + (k % 8) + (k / 8) * 8);
                    const int col = 16 * kk + k;
                    const uint32_t data = base + (col / 64) * (rows * 128) + mn * 128 + (col % 64) * 2;
                    ASSERT_EQ(e::kmajor_addr(d, mn, k), cute) << rows << " " << kk << " " << mn << " " << k;
                    ASSERT_EQ(cute, data);
                }
        }
    for (int bn : {64, 128})
        for (int ks = 0; ks < bn / 16; ks++) {
            const uint32_t base = 8192, start = base + ks * 16 * 128, lbo = bn * 128;
            const e::Desc d = e::decode(desc_sw128(start, lbo, 1024));
            for (int k = 0; k < 16; k++)
                for (int n = 0; n < 128; n++) {
                    const uint32_t cute =
                        start + 2 * uint32_t((n % 8) + ((n / 8) % 8) * 8 + (n / 64) * (lbo / 2) + (k % 8) * 64 + (k / 8) * (1024 / 2));
                    const int key = 16 * ks + k;
                    const uint32_t data = base + (n / 64) * (bn * 128) + key * 128 + (n % 64) * 2;
                    ASSERT_EQ(e::mnmajor_addr(d, k, n), cute) << bn << " " << ks << " " << k << " " << n;
                    ASSERT_EQ(cute, data);
                }
        }
}

TEST(CudaEmu, TmaLoadsTheBoxWithZerosOutside) {
    in_every_schedule([] {
        TmaFixture f;
        // Columns 64-127 (100 and on outside), rows 16-23 (20 and on outside).
        const auto got = f.run(64, 16, 1024, true);
        for (int r = 0; r < 8; r++)
            for (int c = 0; c < 64; c++) {
                const int gr = 16 + r, gc = 64 + c;
                const uint16_t want = gr < 20 && gc < 100 ? f.host[size_t(gr) * 128 + gc] : 0;
                ASSERT_EQ(got[size_t(r) * 64 + c], want) << "row " << r << " col " << c;
            }
    });
}

TEST(CudaEmu, TmaLandsNoEarlierThanItsMbarrierSays) {
    ScheduleGuard g;
    emu::set_schedule(emu::Schedule::Forward);
    TmaFixture f;
    const auto got = f.run(0, 0, 1024, false); // reads without waiting
    EXPECT_EQ(got[0], 0xffff) << "read before the phase completed, yet the data was there";
}

TEST(CudaEmu, TensorMapEncodeRefusesWhatTheDriverRefuses) {
    TmaFixture f;
    EXPECT_EQ(f.encode(f.dev.p + 1, 100, 20, 256, 64, 8, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE)
        << "address not 16-byte aligned";
    EXPECT_EQ(f.encode(f.dev.p, 100, 20, 200, 64, 8, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE)
        << "row stride smaller than a row";
    EXPECT_EQ(f.encode(f.dev.p, 100, 20, 264, 64, 8, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE)
        << "row stride not a multiple of 16 bytes";
    EXPECT_EQ(f.encode(f.dev.p, 100, 20, 256, 128, 8, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE)
        << "inner box wider than the 128-byte swizzle";
    EXPECT_EQ(f.encode(f.dev.p, 100, 20, 256, 64, 257, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_ERROR_INVALID_VALUE)
        << "box of more than 256 rows";
    EXPECT_EQ(f.encode(f.dev.p, 100, 20, 256, 64, 8, CU_TENSOR_MAP_SWIZZLE_128B), CUDA_SUCCESS);
    void *fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    ASSERT_EQ(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q),
              cudaSuccess);
    EXPECT_EQ(q, cudaDriverEntryPointSuccess);
    EXPECT_EQ(fn, reinterpret_cast<void *>(&cuTensorMapEncodeTiled));
}

TEST(CudaEmuDeathTest, WgmmaNeedsTheProxyFenceAndItsOwnFence) {
    Dev<uint16_t> src(64 * 128);
    cudaMemset(src.p, 0, 64 * 128 * 2);
    Dev<float> out(128);
    emu::launch(cp_async_then_wgmma, 1, 128, 16384)(src.p, out.p, true, true);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess);
    EXPECT_EQ(out.get()[0], 0.f);
    EXPECT_DEATH(
        {
            emu::launch(cp_async_then_wgmma, 1, 128, 16384)(src.p, out.p, false, true);
            cudaDeviceSynchronize();
        },
        "generic proxy");
    EXPECT_DEATH(
        {
            emu::launch(cp_async_then_wgmma, 1, 128, 16384)(src.p, out.p, true, false);
            cudaDeviceSynchronize();
        },
        "no wgmma.fence");
}

// Pinned staging rewritten before its queued copy ran: the copy would read
// either version on a GPU.
TEST(CudaEmuDeathTest, PinnedStagingRewrittenBeforeItsCopyAborts) {
    EXPECT_DEATH(
        {
            Dev<int> d(32);
            int *pin = nullptr;
            cudaHostAlloc(&pin, 32 * 4, cudaHostAllocDefault);
            std::fill(pin, pin + 32, 1);
            cudaStream_t s;
            cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
            cudaMemcpyAsync(d.p, pin, 32 * 4, cudaMemcpyHostToDevice, s);
            pin[7] = 2;
            cudaStreamSynchronize(s);
        },
        "had not yet copied");
}

TEST(CudaEmuDeathTest, TmaBytesBeyondTheAnnouncedAbort) {
    TmaFixture f;
    EXPECT_DEATH(f.run(0, 0, 512, true), "more TMA bytes");
}

#if defined(__SANITIZE_ADDRESS__)
// Under AddressSanitizer a kernel writing past its allocation stops the run.
TEST(CudaEmuDeathTest, OverrunCaughtUnderAddressSanitizer) {
    EXPECT_DEATH(
        {
            Dev<int> d(100);
            emu::launch(write_past, 1, 32)(d.p, 100);
            cudaDeviceSynchronize();
        },
        "AddressSanitizer");
}
#endif

} // namespace
