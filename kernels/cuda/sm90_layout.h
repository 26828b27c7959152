// sm90_layout.h - the shared-memory layout maths of the wgmma attention
// kernel, host-compilable so the CPU tests check it: the 128-byte swizzle
// (CUTLASS's Swizzle<3,4,3>: address bits 4-6 XOR bits 7-9) and the wgmma
// shared-memory matrix descriptor.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DIMOO_HD __host__ __device__ __forceinline__
#else
#define DIMOO_HD inline
#endif

namespace dimoo {
namespace sm90 {

// The swizzle as the hardware applies it to a byte offset from a
// 1024-byte aligned base.
DIMOO_HD uint32_t swizzle128(uint32_t offset) { return offset ^ ((offset & 0x380u) >> 3); }

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` in a block of
// 128-byte rows: what swizzle128 makes of the plain row-major offset.
DIMOO_HD uint32_t sw128_chunk(int row, int chunk) {
    return uint32_t(row) * 128u + (uint32_t(chunk ^ (row & 7)) << 4);
}

// wgmma shared-memory descriptor: start address (bits 0-13, >> 4), leading
// byte offset (16-29, >> 4), stride byte offset (32-45, >> 4), base offset
// 0 (tiles 1024-byte aligned), layout SWIZZLE_128B (bits 62-63 = 1).
DIMOO_HD uint64_t desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    uint64_t d = 0;
    d |= uint64_t((smem_addr & 0x3FFFFu) >> 4);
    d |= uint64_t((lbo_bytes >> 4) & 0x3FFFu) << 16;
    d |= uint64_t((sbo_bytes >> 4) & 0x3FFFu) << 32;
    d |= uint64_t(1) << 62;
    return d;
}

// The register fragments of wgmma m64nNk16 (bf16 in, fp32 out), per thread
// t of the warpgroup (0-127). Accumulator value v (0 to N/2 - 1, v = 4j + e)
// sits at row acc_row, column acc_col; of the register-sourced A (64 x 16),
// half h of 32-bit register u (0-3) is element (areg_row, areg_col). With
// these, the accumulator of S restricted to 16 columns is the A fragment of
// P for those 16 keys (pack_p in attention_sm90.cu).
DIMOO_HD int acc_row(int t, int v) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((v % 4) / 2); }
DIMOO_HD int acc_col(int t, int v) { return 8 * (v / 4) + 2 * (t % 4) + v % 2; }
DIMOO_HD int areg_row(int t, int u) { return 16 * (t / 32) + (t % 32) / 4 + 8 * (u & 1); }
DIMOO_HD int areg_col(int t, int u, int h) { return 2 * (t % 4) + h + 8 * (u >> 1); }

} // namespace sm90
} // namespace dimoo
