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
//    8i + 2 (lane % 4) (+1). It runs at issue; fence, commit and wait are
//    no-ops. A descriptor reaching outside the shared memory aborts.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "ptx_sm80.cuh"

namespace dimoo {
namespace sm90 {
namespace emu_detail {


inline uint16_t load_shared(uint32_t addr) {
    // The swizzle is a function of the address itself.
    const uint32_t a = addr ^ ((addr & 0x380u) >> 3);
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
// Element (mn, k) of a K-major operand: rows of 128 bytes along k, 8-row groups SBO apart.
inline float kmajor(const Desc &d, int mn, int k) {
    return ptx_emu::bf(load_shared(d.start + uint32_t(mn / 8) * d.sbo + uint32_t(mn % 8) * 128 + uint32_t(k) * 2));
}
// Element (k, mn) of an MN-major operand: rows of 64 elements along mn, 64-wide
// blocks LBO apart, 8-row (k) groups SBO apart.
inline float mnmajor(const Desc &d, int k, int mn) {
    return ptx_emu::bf(load_shared(d.start + uint32_t(mn / 64) * d.lbo + uint32_t(k / 8) * d.sbo +
                                   uint32_t(k % 8) * 128 + uint32_t(mn % 64) * 2));
}

} // namespace emu_detail

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return uint32_t(static_cast<const unsigned char *>(p) - static_cast<const unsigned char *>(::emu::dyn_smem()));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    dimoo::cp_async16(static_cast<unsigned char *>(::emu::dyn_smem()) + dst, src, src_bytes);
}
using dimoo::cp_async_commit;
using dimoo::cp_async_wait;
__device__ __forceinline__ void fence_proxy_async() {}
__device__ __forceinline__ void wgmma_fence() {}
__device__ __forceinline__ void wgmma_commit() {}
template <int N> __device__ __forceinline__ void wgmma_wait() {}

// S[64 x 64] (+)= A B^T, A and B K-major in shared memory (k16).
__device__ __forceinline__ void wgmma_s(float (&s)[32], uint64_t da, uint64_t db, int accumulate) {
    const emu_detail::Desc A = emu_detail::decode(da), B = emu_detail::decode(db);
    const int t = int(::emu::thread_linear() % 128), w = t / 32, lane = t % 32;
    for (int j = 0; j < 8; j++)
        for (int e = 0; e < 4; e++) {
            const int row = 16 * w + lane / 4 + 8 * (e / 2), col = 8 * j + 2 * (lane % 4) + (e % 2);
            float v = 0.f;
            for (int k = 0; k < 16; k++) v += emu_detail::kmajor(A, row, k) * emu_detail::kmajor(B, col, k);
            s[4 * j + e] = accumulate ? s[4 * j + e] + v : v;
        }
}

// O[64 x 128] += P V: P from registers (per warp, the m16n8k16 A layout), V
// MN-major in shared memory.
__device__ __forceinline__ void wgmma_o(float (&o)[64], const uint32_t (&a)[4], uint64_t db) {
    const emu_detail::Desc B = emu_detail::decode(db);
    const unsigned lane = ::emu::lane_id();
    std::memcpy(::emu::lane_slot(), a, 16);
    ::emu::warp_sync();
    auto A = [](int r, int k) {
        uint32_t v[4];
        std::memcpy(v, ::emu::lane_slot_of(unsigned((r % 8) * 4 + (k % 8) / 2)), 16);
        const uint32_t x = v[(r >= 8) + 2 * (k >= 8)];
        return ptx_emu::bf(uint16_t((k & 1) ? x >> 16 : x & 0xffffu));
    };
    float out[64];
    for (int i = 0; i < 16; i++)
        for (int e = 0; e < 4; e++) {
            const int row = int(lane / 4) + 8 * (e / 2), col = 8 * i + 2 * int(lane % 4) + (e % 2);
            float v = 0.f;
            for (int k = 0; k < 16; k++) v += A(row, k) * emu_detail::mnmajor(B, k, col);
            out[4 * i + e] = o[4 * i + e] + v;
        }
    ::emu::warp_sync();
    std::memcpy(o, out, sizeof out);
}

} // namespace sm90
} // namespace dimoo
