// cuda/ptx_sm90.cuh (host emulation; shadows kernels/cuda/ptx_sm90.cuh in
// DIMOO_CUDA_EMU builds; see ../emu.h) - the sm_90a PTX of the wgmma
// attention kernel:
//  * shared addresses are offsets into the block's dynamic shared memory
//    (the window starts 1024-byte aligned, at 0);
//  * cp.async is the queued copy of ptx_sm80.cuh, landing at its wait;
//  * wgmma reads its shared operands through the matrix descriptor as the
//    PTX ISA defines it for the 128-byte swizzle (start, LBO, SBO; the
//    address bits 4-6 XOR bits 7-9), K-major or MN-major, and A from
//    registers in the m16n8k16 fragment layout per warp; the accumulators
//    of thread (warp w, lane) are rows 16w + lane/4 (+8), columns
//    8i + 2 (lane % 4) (+1). A wgmma runs when the wait_group that
//    completes it is reached (operands read then; register A at issue).
//    A descriptor reaching outside the shared memory aborts.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/sm90_layout.h"
#include "ptx_sm80.cuh"

namespace dimoo {
namespace sm90 {
namespace emu_detail {


// The 128-byte swizzle is a function of the shared address itself.
inline uint32_t swizzled(uint32_t addr) { return addr ^ ((addr & 0x380u) >> 3); }

inline uint16_t load_shared(uint32_t addr) {
    const uint32_t a = swizzled(addr);
    const size_t limit = ::emu::dyn_smem_size();
    if (size_t(a) + 2 > limit) {
        std::fprintf(stderr, "dimoo emu: a wgmma operand reads shared byte %u of %zu\n", a, limit);
        std::abort();
    }
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char *>(::emu::dyn_smem()) + a, 2);
    return v;
}

struct Desc {
    uint32_t start, lbo, sbo;
};
inline Desc decode(uint64_t d) {
    if ((d >> 62) != 1 || ((d >> 49) & 7) != 0) {
        std::fprintf(stderr, "dimoo emu: wgmma descriptor %#llx is not a 128-byte swizzle with base offset 0\n",
                     static_cast<unsigned long long>(d));
        std::abort();
    }
    return Desc{uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4};
}
// The shared address (before the swizzle) of element (mn, k) of a K-major
// operand: rows of 128 bytes along k, 8-row groups SBO apart.
inline uint32_t kmajor_addr(const Desc &d, int mn, int k) {
    return d.start + uint32_t(mn / 8) * d.sbo + uint32_t(mn % 8) * 128 + uint32_t(k) * 2;
}
// Of element (k, mn) of an MN-major operand: rows of 64 elements along mn,
// 64-wide blocks LBO apart, 8-row (k) groups SBO apart.
inline uint32_t mnmajor_addr(const Desc &d, int k, int mn) {
    return d.start + uint32_t(mn / 64) * d.lbo + uint32_t(k / 8) * d.sbo + uint32_t(k % 8) * 128 + uint32_t(mn % 64) * 2;
}
inline float kmajor(const Desc &d, int mn, int k) { return ptx_emu::bf(load_shared(kmajor_addr(d, mn, k))); }
inline float mnmajor(const Desc &d, int k, int mn) { return ptx_emu::bf(load_shared(mnmajor_addr(d, k, mn))); }

} // namespace emu_detail

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return uint32_t(static_cast<const unsigned char *>(p) - static_cast<const unsigned char *>(::emu::dyn_smem()));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    dimoo::cp_async16(static_cast<unsigned char *>(::emu::dyn_smem()) + dst, src, src_bytes);
}
using dimoo::cp_async_commit;
using dimoo::cp_async_wait;
__device__ __forceinline__ void fence_proxy_async() { ::emu::proxy_fence(); }
template <int N> __device__ __forceinline__ void fence_regs(float (&)[N]) {} // compiler ordering only
__device__ __forceinline__ void wgmma_fence();

// The asynchronous proxy (mbarriers, TMA): ../tma.cpp.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) { ::emu::mbar_init(bar, count); }
__device__ __forceinline__ void fence_mbar_init() {}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) { ::emu::mbar_arrive(bar, bytes); }
__device__ __forceinline__ void mbar_arrive(uint32_t bar) { ::emu::mbar_arrive(bar, 0); }
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    while (!::emu::mbar_try_wait(bar, parity)) ::emu::spin_wait();
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const void *map, uint32_t bar, int c0, int c1) {
    const int c[2] = {c0, c1};
    ::emu::tma_load(dst, map, bar, c, 2);
}
__device__ __forceinline__ void named_bar_sync(int id, int n) { ::emu::named_barrier_sync(unsigned(id), unsigned(n)); }
__device__ __forceinline__ void named_bar_arrive(int id, int n) { ::emu::named_barrier_arrive(unsigned(id), unsigned(n)); }
// Register reallocation only moves registers between warpgroups: nothing to emulate.
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {}
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {}

namespace emu_detail {

// An issued wgmma, run when a wgmma.wait_group completes its group: the
// accumulators (registers the kernel must leave alone until then) are
// written at that point, and the shared operands are read then, so a kernel
// that overwrites an operand or reads the accumulators too early computes
// something else.
struct Mma {
    bool is_o;
    int n8; // S: columns / 8
    float *acc;
    uint64_t da, db;
    uint32_t a[4]; // register A (wgmma_o), read at issue
    bool accumulate;
    int group;
};
struct MmaQueue {
    int next_group = 0;
    std::vector<Mma> q;
    bool fenced = false; // a wgmma.fence since the last commit
};
inline MmaQueue &mma_queue() { return ::emu::block_thread_state<MmaQueue>(); }

// Every 16-byte chunk a wgmma's shared operand covers must be visible to
// the async proxy (checked once per wgmma, by its warpgroup's first thread).
inline void check_kmajor(const Desc &d, int rows) {
    for (int mn = 0; mn < rows; mn++)
        for (int k = 0; k < 16; k += 8) ::emu::check_async_read(swizzled(kmajor_addr(d, mn, k)));
}
inline void check_mnmajor(const Desc &d, int cols) {
    for (int k = 0; k < 16; k++)
        for (int mn = 0; mn < cols; mn += 8) ::emu::check_async_read(swizzled(mnmajor_addr(d, k, mn)));
}

// S[64 x N] (+)= A B^T, A and B K-major in shared memory (k16); N = 8 * n8.
inline void run_s(const Mma &m) {
    const Desc A = decode(m.da), B = decode(m.db);
    const int t = int(::emu::thread_linear() % 128);
    if (t == 0) check_kmajor(A, 64), check_kmajor(B, 8 * m.n8);
    float *s = m.acc;
    for (int j = 0; j < m.n8; j++)
        for (int e = 0; e < 4; e++) {
            const int row = acc_row(t, 4 * j + e), col = acc_col(t, 4 * j + e);
            float v = 0.f;
            for (int k = 0; k < 16; k++) v += kmajor(A, row, k) * kmajor(B, col, k);
            s[4 * j + e] = m.accumulate ? s[4 * j + e] + v : v;
        }
}

// O[64 x 128] += P V: P from registers (per warp, the m16n8k16 A layout), V
// MN-major in shared memory. A warp collective: every lane runs it in the
// same wait.
inline void run_o(const Mma &m) {
    const Desc B = decode(m.db);
    const int t = int(::emu::thread_linear() % 128), w = t / 32;
    if (t == 0) check_mnmajor(B, 128);
    std::memcpy(::emu::lane_slot(), m.a, 16);
    ::emu::warp_sync();
    // This warp's 16 x 16 block of A, gathered from the lanes' registers
    // through the fragment layout (sm90_layout.h).
    float A[16][16];
    for (int lane = 0; lane < 32; lane++) {
        uint32_t v[4];
        std::memcpy(v, ::emu::lane_slot_of(unsigned(lane)), 16);
        for (int u = 0; u < 4; u++)
            for (int h = 0; h < 2; h++)
                A[areg_row(32 * w + lane, u) - 16 * w][areg_col(32 * w + lane, u, h)] =
                    ptx_emu::bf(uint16_t(h ? v[u] >> 16 : v[u] & 0xffffu));
    }
    float out[64];
    for (int i = 0; i < 64; i++) {
        const int row = acc_row(t, i) - 16 * w, col = acc_col(t, i);
        float v = 0.f;
        for (int k = 0; k < 16; k++) v += A[row][k] * mnmajor(B, k, col);
        out[i] = m.acc[i] + v;
    }
    ::emu::warp_sync();
    std::memcpy(m.acc, out, sizeof out);
}

} // namespace emu_detail

namespace emu_detail {
// The kernels' rule (stricter than the ISA's, which lets wgmmas of one
// shape chain on their accumulators unfenced): every batch of wgmmas
// starts with a wgmma.fence, after the registers it reads were written.
inline MmaQueue &issue_queue() {
    MmaQueue &q = mma_queue();
    if (!q.fenced) {
        std::fprintf(stderr, "dimoo emu: a wgmma issued with no wgmma.fence since the last commit_group\n");
        std::abort();
    }
    return q;
}
} // namespace emu_detail

__device__ __forceinline__ void wgmma_fence() { emu_detail::mma_queue().fenced = true; }
__device__ __forceinline__ void wgmma_s(float (&s)[32], uint64_t da, uint64_t db, int accumulate) {
    emu_detail::issue_queue().q.push_back({false, 8, s, da, db, {0, 0, 0, 0}, accumulate != 0, -1});
}
__device__ __forceinline__ void wgmma_s128(float (&s)[64], uint64_t da, uint64_t db, int accumulate) {
    emu_detail::issue_queue().q.push_back({false, 16, s, da, db, {0, 0, 0, 0}, accumulate != 0, -1});
}
__device__ __forceinline__ void wgmma_s176(float (&s)[88], uint64_t da, uint64_t db, int accumulate) {
    emu_detail::issue_queue().q.push_back({false, 22, s, da, db, {0, 0, 0, 0}, accumulate != 0, -1});
}
__device__ __forceinline__ void wgmma_o(float (&o)[64], const uint32_t (&a)[4], uint64_t db) {
    emu_detail::issue_queue().q.push_back({true, 16, o, 0, db, {a[0], a[1], a[2], a[3]}, true, -1});
}
__device__ __forceinline__ void wgmma_commit() {
    emu_detail::MmaQueue &q = emu_detail::mma_queue();
    q.fenced = false;
    for (auto &m : q.q)
        if (m.group < 0) m.group = q.next_group;
    q.next_group++;
}
// Every committed group but the N most recent completes, in issue order. A
// wgmma is one operation of the whole warpgroup, so it completes for every
// thread at once: the warpgroup meets, runs its parts, and meets again
// before anyone goes on.
template <int N> __device__ __forceinline__ void wgmma_wait() {
    emu_detail::MmaQueue &q = emu_detail::mma_queue();
    const int done_below = q.next_group - N;
    std::vector<emu_detail::Mma> keep, run;
    for (auto &m : q.q) (m.group >= 0 && m.group < done_below ? run : keep).push_back(m);
    q.q.swap(keep);
    ::emu::warpgroup_sync();
    for (const auto &m : run) m.is_o ? emu_detail::run_o(m) : emu_detail::run_s(m);
    ::emu::warpgroup_sync();
}

} // namespace sm90
} // namespace dimoo
