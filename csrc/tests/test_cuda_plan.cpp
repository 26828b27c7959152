// test_cuda_plan.cpp - the host side of the CUDA forward, on the CPU: the
// batch plan (rows, positions, K/V destinations, LM-head rows) and the RoPE
// table. Runs on every machine; no GPU involved.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda/plan.h"
#include "cuda/sm90_layout.h"

#include <set>

namespace {

using dimoo::cuda::BatchPlan;
using dimoo::cuda::make_plan;

TEST(CudaPlan, BatchesSequencesAndMapsOutputs) {
    const int kv = 16, L = 3, maxT = 10;
    std::vector<uint16_t> ks(100), vs(100), kc(2 * L * maxT * kv), vc(2 * L * maxT * kv);
    std::vector<int32_t> t0 = {5, 6, 7, 8}, t1 = {1, 2, 3, 4, 5, 6};
    std::vector<int32_t> comp = {1, 4, 5}, outp = {4, 5}, outp0 = {3, 0};
    std::vector<float> logits(1);
    dimoo_forward_args a[2] = {};
    a[0].seq = 1; // NONE, all rows, two chosen outputs (any order)
    a[0].n_tokens = 4;
    a[0].tokens = t0.data();
    a[0].n_out = 2;
    a[0].out_positions = outp0.data();
    a[0].logits = logits.data();
    a[1].seq = 0; // USE on compute rows 1, 4, 5; outputs map to compact rows
    a[1].n_tokens = 6;
    a[1].tokens = t1.data();
    a[1].cache_mode = DIMOO_CACHE_USE;
    a[1].n_compute = 3;
    a[1].compute = comp.data();
    a[1].n_out = 2;
    a[1].out_positions = outp.data();
    a[1].logits = logits.data();
    BatchPlan p = make_plan(a, 2, kv, L, maxT, ks.data(), vs.data(), kc.data(), vc.data());
    EXPECT_EQ(p.M, 7);
    EXPECT_EQ(p.max_q, 4);
    EXPECT_EQ(p.tok, (std::vector<int32_t>{5, 6, 7, 8, 2, 5, 6}));
    EXPECT_EQ(p.pos, (std::vector<int32_t>{0, 1, 2, 3, 1, 4, 5}));
    EXPECT_EQ(p.seq_of, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1}));
    ASSERT_EQ(p.seqs.size(), 2u);
    EXPECT_EQ(p.seqs[0].q_begin, 0);
    EXPECT_EQ(p.seqs[0].q_len, 4);
    EXPECT_EQ(p.seqs[0].kv_len, 4);
    EXPECT_EQ(p.seqs[0].k, ks.data()); // scratch rows of this batch slice
    EXPECT_EQ(p.seqs[0].layer_stride, 0);
    EXPECT_EQ(p.seqs[1].q_begin, 4);
    EXPECT_EQ(p.seqs[1].q_len, 3);
    EXPECT_EQ(p.seqs[1].kv_len, 6);
    EXPECT_EQ(p.seqs[1].k, kc.data()); // seq 0's cache
    EXPECT_EQ(p.seqs[1].v, vc.data());
    EXPECT_EQ(p.seqs[1].layer_stride, maxT * kv);
    EXPECT_EQ(p.out_rows, (std::vector<int32_t>{3, 0, 5, 6}));
    EXPECT_EQ(p.out_begin, (std::vector<int32_t>{0, 2}));
    EXPECT_EQ(p.out_count, (std::vector<int32_t>{2, 2}));
}

TEST(CudaPlan, ScratchRowsFollowTheBatchAndCacheRowsTheSeq) {
    const int kv = 8, L = 2, maxT = 5;
    std::vector<uint16_t> ks(64), vs(64), kc(4 * L * maxT * kv), vc(4 * L * maxT * kv);
    std::vector<int32_t> t = {1, 2, 3};
    dimoo_forward_args a[3] = {};
    for (int i = 0; i < 3; i++) {
        a[i].seq = 3 - i;
        a[i].n_tokens = 3 - i;
        a[i].tokens = t.data();
    }
    a[1].cache_mode = DIMOO_CACHE_STORE;
    BatchPlan p = make_plan(a, 3, kv, L, maxT, ks.data(), vs.data(), kc.data(), vc.data());
    EXPECT_EQ(p.M, 6);
    EXPECT_TRUE(p.out_rows.empty()); // no logits requested
    EXPECT_EQ(p.seqs[0].k, ks.data());
    EXPECT_EQ(p.seqs[2].k, ks.data() + 5 * kv); // after 3 + 2 rows
    EXPECT_EQ(p.seqs[1].k, kc.data() + 2 * L * maxT * kv); // seq 2
    EXPECT_EQ(dimoo::cuda::attn_q_tiles(p.seqs, 64), 1);
    EXPECT_EQ(dimoo::cuda::ceil_div(4228, 64), 67);
    EXPECT_EQ(dimoo::cuda::ceil_div(128, 64), 2);
}

// ABI 4: rows kept in the context go through the head even without a host
// buffer; an argument with neither gets none.
TEST(CudaPlan, KeptRowsGoThroughTheHead) {
    const int kv = 8, L = 1, maxT = 8;
    std::vector<uint16_t> ks(64), vs(64);
    std::vector<int32_t> t = {1, 2, 3, 4, 5}, outp = {1, 3};
    dimoo_forward_args a[3] = {};
    for (int i = 0; i < 3; i++) {
        a[i].seq = i;
        a[i].n_tokens = 5;
        a[i].tokens = t.data();
    }
    a[0].keep = 1; // every row, kept only
    a[1].keep = 1; // two rows, kept only
    a[1].n_out = 2;
    a[1].out_positions = outp.data();
    BatchPlan p = make_plan(a, 3, kv, L, maxT, ks.data(), vs.data(), nullptr, nullptr);
    EXPECT_EQ(p.out_rows, (std::vector<int32_t>{0, 1, 2, 3, 4, 6, 8}));
    EXPECT_EQ(p.out_begin, (std::vector<int32_t>{0, 5, 7}));
    EXPECT_EQ(p.out_count, (std::vector<int32_t>{5, 2, 0}));
}

TEST(CudaPlan, RopeTableMatchesFloat64) {
    const int T = 4228, hd = 128, half = hd / 2;
    const auto t = dimoo::cuda::rope_table(T, hd, 500000.f);
    ASSERT_EQ(t.size(), size_t(2) * T * half);
    double worst = 0;
    for (int p : {0, 1, 2, 1000, 4227})
        for (int i = 0; i < half; i++) {
            const double th = double(p) * std::pow(500000.0, -2.0 * i / hd);
            worst = std::max(worst, std::fabs(t[size_t(p) * half + i] - std::cos(th)));
            worst = std::max(worst, std::fabs(t[size_t(T) * half + size_t(p) * half + i] - std::sin(th)));
        }
    // fp32 angles of up to ~4228 rad: an absolute error of a few ulps of the angle.
    EXPECT_LT(worst, 2e-3);
    EXPECT_EQ(t[0], 1.f);
    EXPECT_EQ(t[size_t(T) * half], 0.f);
}

// The wgmma kernel's tile layout: the hand-written chunk placement is the
// hardware's 128-byte swizzle of the row-major offset, a bijection on the
// tile, and any 8 consecutive rows of one chunk column hit 8 different
// 16-byte bank groups (why the layout is swizzled).
TEST(CudaPlan, Sm90SwizzleAndDescriptor) {
    using namespace dimoo::sm90;
    std::set<uint32_t> seen;
    for (int r = 0; r < 64; r++)
        for (int c = 0; c < 8; c++) {
            const uint32_t o = sw128_chunk(r, c);
            EXPECT_EQ(o, swizzle128(uint32_t(r) * 128 + uint32_t(c) * 16)) << r << "," << c;
            EXPECT_LT(o, 64u * 128);
            EXPECT_EQ(o / 128, uint32_t(r)); // stays in its row
            seen.insert(o);
        }
    EXPECT_EQ(seen.size(), 64u * 8);
    for (int r0 = 0; r0 < 64; r0 += 8)
        for (int c = 0; c < 8; c++) {
            std::set<uint32_t> banks;
            for (int r = r0; r < r0 + 8; r++) banks.insert(sw128_chunk(r, c) % 128);
            EXPECT_EQ(banks.size(), 8u);
        }
    const uint64_t d = desc_sw128(0x1400, 16, 1024);
    EXPECT_EQ(d & 0x3FFF, 0x140u);
    EXPECT_EQ((d >> 16) & 0x3FFF, 1u);
    EXPECT_EQ((d >> 32) & 0x3FFF, 64u);
    EXPECT_EQ(d >> 62, 1u);
    EXPECT_EQ((d >> 46) & 0xFFFF, 0u); // base offset 0, reserved bits clear
    EXPECT_EQ(desc_sw128(0x1400 + 32, 16, 1024) - d, 2u); // a k16 step: +32 bytes
    EXPECT_EQ((desc_sw128(0, 8192, 1024) >> 16) & 0x3FFF, 512u); // V: 8 KB between 64-column blocks
}

// A layout in CuTe's notation: thread coordinates (4, 8, 4) and value
// coordinates (2, 2, n) with their strides into a column-major M x K (or
// M x N) tile, M = 64. The strides below are CUTLASS 4.2's (GMMA CLayout_64xN
// and ALayout_64x16 in cute/atom/mma_traits_sm90_gmma.hpp): an account of
// the fragments written by other people than ours.
struct CuteLayout {
    int ts[3], tst[3], vs[3], vst[3];
    int operator()(int t, int v) const {
        const int t0 = t % ts[0], t1 = (t / ts[0]) % ts[1], t2 = t / (ts[0] * ts[1]);
        const int v0 = v % vs[0], v1 = (v / vs[0]) % vs[1], v2 = v / (vs[0] * vs[1]);
        return t0 * tst[0] + t1 * tst[1] + t2 * tst[2] + v0 * vst[0] + v1 * vst[1] + v2 * vst[2];
    }
};

TEST(CudaPlan, Sm90FragmentsMatchCute) {
    using namespace dimoo::sm90;
    for (int n : {64, 128}) {
        const CuteLayout c{{4, 8, 4}, {128, 1, 16}, {2, 2, n / 8}, {64, 8, 512}};
        std::set<int> seen;
        for (int t = 0; t < 128; t++)
            for (int v = 0; v < n / 2; v++) {
                const int idx = c(t, v);
                EXPECT_EQ(acc_row(t, v), idx % 64) << "N " << n << " t " << t << " v " << v;
                EXPECT_EQ(acc_col(t, v), idx / 64) << "N " << n << " t " << t << " v " << v;
                seen.insert(idx);
            }
        EXPECT_EQ(seen.size(), size_t(64 * n));
    }
    // Register A: value v of the fragment is half v % 2 of register v / 2.
    const CuteLayout a{{4, 8, 4}, {128, 1, 16}, {2, 2, 2}, {64, 8, 512}};
    for (int t = 0; t < 128; t++)
        for (int v = 0; v < 8; v++) {
            const int idx = a(t, v);
            EXPECT_EQ(areg_row(t, v / 2), idx % 64) << "t " << t << " v " << v;
            EXPECT_EQ(areg_col(t, v / 2, v % 2), idx / 64) << "t " << t << " v " << v;
        }
    // pack_p: accumulator values 8 ks + 2 u + h (16 columns from 16 ks) are
    // register u, half h of the A fragment for keys 16 ks ... 16 ks + 15.
    for (int t = 0; t < 128; t++)
        for (int ks = 0; ks < 8; ks++)
            for (int u = 0; u < 4; u++)
                for (int h = 0; h < 2; h++) {
                    const int v = 8 * ks + 2 * u + h;
                    EXPECT_EQ(acc_row(t, v), areg_row(t, u));
                    EXPECT_EQ(acc_col(t, v) - 16 * ks, areg_col(t, u, h));
                }
}

} // namespace
