// cublas_v2.h (host emulation; see emu.h) - the cuBLAS calls dimoo uses:
// column-major SGEMM, run on the handle's stream (so graph capture records
// it), every operand checked to lie inside one device allocation.
#pragma once

#include "cuda_runtime.h"
#include "library_types.h"

enum cublasStatus_t {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_ALLOC_FAILED = 3,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3 };
enum cublasComputeType_t { CUBLAS_COMPUTE_32F = 68, CUBLAS_COMPUTE_32F_FAST_TF32 = 77 };
typedef struct EmuCublas *cublasHandle_t;

cublasStatus_t cublasCreate(cublasHandle_t *h);
cublasStatus_t cublasDestroy(cublasHandle_t h);
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s);
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m);
// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major; op(A) m x k, op(B) k x n.
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc);

namespace emu {
// The GEMM behind both APIs. Element types: CUDA_R_32F or CUDA_R_16BF.
// Column-major; A stored rows_a x cols_a (lda), op(A) is m x k.
struct GemmOperand {
    const void *p;
    cudaDataType_t t;
    int ld;
    bool trans;
};
cublasStatus_t gemm(cudaStream_t s, int m, int n, int k, float alpha, GemmOperand A, GemmOperand B, float beta,
                    const void *C, cudaDataType_t ct, int ldc, void *D, cudaDataType_t dt, int ldd);
} // namespace emu
