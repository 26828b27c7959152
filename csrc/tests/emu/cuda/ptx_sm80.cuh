// cuda/ptx_sm80.cuh (host emulation; shadows kernels/cuda/ptx_sm80.cuh in
// DIMOO_CUDA_EMU builds; see ../emu.h) - cp.async, ldmatrix and mma.sync
// with the PTX ISA's semantics:
//  * cp.async copies are queued per thread and land only at the
//    cp.async.wait_group that completes their group, so reading a tile
//    before waiting for it reads the old contents, as a GPU may;
//  * ldmatrix and mma.sync are warp collectives: each lane publishes its
//    addresses or fragments, then computes its own result from the others'
//    (fragment layouts of m8n8.x4 and m16n8k16 .row.col, bf16 in, fp32 out).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "../cuda_bf16.h"

namespace dimoo {
namespace ptx_emu {

struct Copy {
    void *dst;
    const void *src;
    int n;
    int group; // -1: not yet committed
};
struct Queue {
    int next_group = 0;
    std::vector<Copy> q;
};
inline Queue &queue() { return emu::block_thread_state<Queue>(); } // a new block: nothing in flight
inline float bf(uint16_t h) { return __bfloat162float(__nv_bfloat16{h}); }

} // namespace ptx_emu

__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
    ptx_emu::queue().q.push_back({dst, src, src_bytes, -1});
}
__device__ __forceinline__ void cp_async_commit() {
    ptx_emu::Queue &q = ptx_emu::queue();
    for (auto &c : q.q)
        if (c.group < 0) c.group = q.next_group;
    q.next_group++;
}
// All committed groups but the N most recent are complete.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    ptx_emu::Queue &q = ptx_emu::queue();
    const int done_below = q.next_group - N;
    std::vector<ptx_emu::Copy> keep;
    for (auto &c : q.q) {
        if (c.group >= 0 && c.group < done_below) {
            std::memset(c.dst, 0, 16); // bytes past src_bytes are zeros
            if (c.n) std::memcpy(c.dst, c.src, size_t(c.n));
            emu::generic_smem_write(c.dst, 16);
        } else {
            keep.push_back(c);
        }
    }
    q.q.swap(keep);
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    const unsigned lane = emu::lane_id();
    std::memcpy(emu::lane_slot(), &p, sizeof p);
    emu::warp_sync();
    for (int j = 0; j < 4; j++) {
        const uint16_t *row;
        std::memcpy(&row, emu::lane_slot_of(j * 8 + lane / 4), sizeof row);
        uint16_t v[2] = {row[2 * (lane % 4)], row[2 * (lane % 4) + 1]};
        std::memcpy(&r[j], v, 4);
    }
    emu::warp_sync();
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
    const unsigned lane = emu::lane_id();
    std::memcpy(emu::lane_slot(), &p, sizeof p);
    emu::warp_sync();
    for (int j = 0; j < 4; j++) {
        uint16_t v[2];
        for (int h = 0; h < 2; h++) {
            const uint16_t *row;
            std::memcpy(&row, emu::lane_slot_of(j * 8 + 2 * (lane % 4) + h), sizeof row);
            v[h] = row[lane / 4];
        }
        std::memcpy(&r[j], v, 4);
    }
    emu::warp_sync();
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const unsigned lane = emu::lane_id();
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    std::memcpy(emu::lane_slot(), mine, sizeof mine);
    emu::warp_sync();
    auto reg = [](unsigned l, int i) {
        uint32_t v[6];
        std::memcpy(v, emu::lane_slot_of(l), sizeof v);
        return v[i];
    };
    auto half = [](uint32_t v, int h) { return ptx_emu::bf(uint16_t(h ? v >> 16 : v & 0xffffu)); };
    // A(r, k): lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8), half k & 1.
    auto A = [&](int r, int k) { return half(reg(unsigned((r % 8) * 4 + (k % 8) / 2), (r >= 8) + 2 * (k >= 8)), k & 1); };
    // B(k, n): lane n * 4 + (k % 8) / 2, register 4 + (k >= 8), half k & 1.
    auto B = [&](int k, int n) { return half(reg(unsigned(n * 4 + (k % 8) / 2), 4 + (k >= 8)), k & 1); };
    const int g = int(lane / 4), t = int(lane % 4);
    float out[4];
    for (int e = 0; e < 4; e++) {
        const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
        float s = 0.f;
        for (int k = 0; k < 16; k++) s += A(row, k) * B(k, col);
        out[e] = d[e] + s;
    }
    emu::warp_sync();
    for (int e = 0; e < 4; e++) d[e] = out[e];
}

} // namespace dimoo
