// cub/block/block_scan.cuh (host emulation; see emu.h) - cub::BlockScan's
// sums over the block's threads in linear order. As with CUB, the caller
// must __syncthreads before reusing the TempStorage.
#pragma once

#include "../../cuda_runtime.h"

namespace cub {

template <class T, int BLOCK_DIM_X, int = 0, int BLOCK_DIM_Y = 1, int BLOCK_DIM_Z = 1> class BlockScan {
    static constexpr int N = BLOCK_DIM_X * BLOCK_DIM_Y * BLOCK_DIM_Z;

public:
    struct TempStorage {
        T v[N];
    };
    explicit BlockScan(TempStorage &s) : s_(s) {}

    void ExclusiveSum(T in, T &out, T &aggregate) { scan(in, out, aggregate, false); }
    void ExclusiveSum(T in, T &out) {
        T a;
        scan(in, out, a, false);
    }
    void InclusiveSum(T in, T &out, T &aggregate) { scan(in, out, aggregate, true); }
    void InclusiveSum(T in, T &out) {
        T a;
        scan(in, out, a, true);
    }

private:
    void scan(T in, T &out, T &aggregate, bool inclusive) {
        const int t = int(threadIdx.x + threadIdx.y * BLOCK_DIM_X + threadIdx.z * BLOCK_DIM_X * BLOCK_DIM_Y);
        s_.v[t] = in;
        __syncthreads();
        T run = T(0), all = T(0);
        for (int i = 0; i < N; i++) {
            if (i < t || (inclusive && i == t)) run = run + s_.v[i];
            all = all + s_.v[i];
        }
        out = run;
        aggregate = all;
    }
    TempStorage &s_;
};

} // namespace cub
