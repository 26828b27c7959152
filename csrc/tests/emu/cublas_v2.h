// cublas_v2.h (host emulation, see cuda_runtime.h here): cublasSgemm with
// cuBLAS's column-major semantics, a plain triple loop in double.
#pragma once

#include "cuda_runtime.h"

enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_ALLOC_FAILED = 3, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0 };
typedef struct vqemu_blas *cublasHandle_t;

inline cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = reinterpret_cast<cublasHandle_t>(new int(0));
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
    delete reinterpret_cast<int *>(h);
    return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t, cudaStream_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }

// C (m x n, ldc) = alpha op(A) op(B) + beta C, column-major; op(A) m x k, op(B) k x n.
inline cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float *alpha, const float *A, int lda, const float *B, int ldb,
                                  const float *beta, float *C, int ldc) {
    if (m < 0 || n < 0 || k < 0 || ldc < std::max(1, m) || lda < std::max(1, ta == CUBLAS_OP_N ? m : k) ||
        ldb < std::max(1, tb == CUBLAS_OP_N ? k : n))
        return CUBLAS_STATUS_INVALID_VALUE;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double s = 0;
            for (int p = 0; p < k; p++) {
                const float a = ta == CUBLAS_OP_N ? A[i + int64_t(p) * lda] : A[p + int64_t(i) * lda];
                const float b = tb == CUBLAS_OP_N ? B[p + int64_t(j) * ldb] : B[j + int64_t(p) * ldb];
                s += double(a) * b;
            }
            float &c = C[i + int64_t(j) * ldc];
            c = float(*alpha * s + (*beta == 0.0f ? 0.0 : double(*beta) * c)); // beta 0: C not read
        }
    return CUBLAS_STATUS_SUCCESS;
}
