// gemm.h - the CPU backend's matrix multiply: fp32 activations times weights
// stored (out_features, in_features) in F32, F16 or BF16.
#pragma once

#include <cstdint>

namespace dimoo::cpu {

// C[m*ldc + n] (= or +=) sum_k A[m*lda + k] * W[n*ldw + k]   for m < M, n < N
//
// A: fp32 activations, row-major (M, K). W: weights (N, K) row-major in dtype
// wdt (DIMOO_F32, DIMOO_F16 or DIMOO_BF16). C: fp32 (M, N). accumulate=false
// overwrites C (never reads it), true adds to it. M == 0 or N == 0 is a no-op;
// K == 0 zeroes C (or leaves it as is when accumulating). C must not overlap A
// or W. Bad arguments throw dimoo::Error(DIMOO_ERR_INVALID_ARGUMENT).
//
// Multithreaded with OpenMP over omp_get_max_threads() threads; safe to call
// concurrently from several host threads (no shared mutable state).
void gemm_nt(int M, int N, int K, const float *A, int lda, const void *W, int32_t wdt, int ldw,
             float *C, int ldc, bool accumulate);

// Naive single-threaded reference (double accumulation), for tests.
void gemm_nt_ref(int M, int N, int K, const float *A, int lda, const void *W, int32_t wdt, int ldw,
                 float *C, int ldc, bool accumulate);

// The instruction set gemm_nt was compiled for: "avx512", "avx2" or "portable".
const char *gemm_isa();

} // namespace dimoo::cpu
