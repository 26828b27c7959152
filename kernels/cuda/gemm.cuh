// gemm.cuh - the projections through cuBLASLt: Y[M,N] (+)= X[M,K] W[N,K]^T,
// bf16 operands (row-major, weights as stored by the checkpoint), fp32
// accumulation, Y in bf16 or fp32. One instance per context: it owns the
// handle, the workspace and a cache of per-shape plans.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

namespace dimoo {

class LtGemm {
public:
    LtGemm(cudaStream_t stream, size_t workspace_bytes); // throws dimoo::Error
    ~LtGemm();
    LtGemm(const LtGemm &) = delete;
    LtGemm &operator=(const LtGemm &) = delete;

    // y_dtype: DIMOO_BF16 or DIMOO_F32. accumulate: Y += X W^T (beta = 1),
    // the residual add of the O and down projections. Throws on failure.
    // algo: which of the heuristic's candidates for this shape (0: its
    // first choice, or the fastest once tuned; see algo_count). kUntuned:
    // candidate 0, and never tune the shape for this call (the head, whose
    // row count changes at every decode step: each new count would be timed).
    void run(int M, int N, int K, const uint16_t *X, int ldx, const uint16_t *W, int ldw, void *Y, int ldy,
             int32_t y_dtype, bool accumulate, int algo = 0);
    // How many candidates the heuristic returned for this shape (up to
    // kMaxAlgos): the benchmark times each against the first choice.
    int algo_count(int M, int N, int K, const uint16_t *X, int ldx, const uint16_t *W, int ldw, void *Y, int ldy,
                   int32_t y_dtype, bool accumulate);
    static constexpr int kMaxAlgos = 8, kUntuned = -1;
    size_t workspace_bytes() const { return ws_bytes_; }

    // Timing the candidates (off unless set): the first eager run of a shape
    // with at least min_rows rows (0: never) runs each candidate on the
    // call's own operands and makes the fastest the shape's choice. A
    // non-accumulating GEMM is timed in place (the real run then writes Y
    // again); an accumulating one writes `scratch` (bytes long, free at that
    // moment) instead of Y, so the residual stream is not added to twice.
    // Shapes it cannot time (scratch too small, a stream being captured)
    // keep the heuristic's first choice.
    void set_tuning(int min_rows, void *scratch, size_t scratch_bytes);
    int tuned_shapes() const { return tuned_; }   // shapes whose candidates were timed
    int tuned_changed() const { return changed_; } // ... of which a later candidate won

private:
    struct Plan {
        cublasLtMatmulDesc_t desc = nullptr;
        cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
        cublasLtMatmulAlgo_t algo[kMaxAlgos]{};
        int n_algos = 0;
        bool tuned = false;
    };
    // M, N, K, ldx, ldw, ldy, dtype, accumulate, and the alignment class of the pointers.
    using Key = std::tuple<int, int, int, int, int, int, int, bool, int>;
    Plan &plan(const Key &k);
    Key key(int M, int N, int K, const uint16_t *X, int ldx, const uint16_t *W, int ldw, void *Y, int ldy,
            int32_t y_dtype, bool accumulate) const;
    void tune(Plan &p, int M, const uint16_t *X, const uint16_t *W, void *Y, int ldy, int32_t y_dtype, bool accumulate);

    cudaStream_t stream_;
    cublasLtHandle_t lt_ = nullptr;
    void *ws_ = nullptr;
    size_t ws_bytes_;
    std::map<Key, Plan> plans_;
    int tune_min_rows_ = 0;
    void *scratch_ = nullptr;
    size_t scratch_bytes_ = 0;
    int tuned_ = 0, changed_ = 0;
};

} // namespace dimoo
