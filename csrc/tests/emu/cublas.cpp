// cublas.cpp - the emulated cuBLAS and cuBLASLt (see cublasLt.h): one
// column-major GEMM in fp32 (as cuBLAS accumulates), its operands unpacked
// to float rows first so the dot products vectorize; run on the caller's
// stream so a captured stream records it.
#include "cublasLt.h"

#include <cstdio>
#include <cstring>
#include <vector>

#include "cuda_bf16.h"

struct EmuCublas {
    cudaStream_t stream = nullptr;
};
struct EmuLt {};
struct EmuLtDesc {
    cublasOperation_t ta = CUBLAS_OP_N, tb = CUBLAS_OP_N;
};
struct EmuLtLayout {
    cudaDataType_t t;
    uint64_t rows, cols;
    int64_t ld;
};
struct EmuLtPref {};

namespace emu {
namespace {

size_t esize(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : t == CUDA_R_16BF ? 2 : 0; }

float load(const void *p, cudaDataType_t t, size_t i) {
    if (t == CUDA_R_32F) return static_cast<const float *>(p)[i];
    return __bfloat162float(static_cast<const __nv_bfloat16 *>(p)[i]);
}

// The stored matrix (rows x cols, column-major, ld) lies in one device allocation.
bool operand_ok(const void *p, cudaDataType_t t, int rows, int cols, int ld, const char *what) {
    if (rows == 0 || cols == 0) return true;
    const size_t n = (size_t(ld) * size_t(cols - 1) + size_t(rows)) * esize(t);
    if (p && is_device_range(p, n)) return true;
    std::fprintf(stderr, "dimoo emu: GEMM operand %s (%d x %d, ld %d) is not inside one device allocation\n", what,
                 rows, cols, ld);
    return false;
}

} // namespace

cublasStatus_t gemm(cudaStream_t s, int m, int n, int k, float alpha, GemmOperand A, GemmOperand B, float beta,
                    const void *C, cudaDataType_t ct, int ldc, void *D, cudaDataType_t dt, int ldd) {
    if (m < 0 || n < 0 || k < 0 || !esize(A.t) || !esize(B.t) || !esize(dt) || (beta != 0 && !esize(ct)))
        return CUBLAS_STATUS_INVALID_VALUE;
    const int ar = A.trans ? k : m, ac = A.trans ? m : k, br = B.trans ? n : k, bc = B.trans ? k : n;
    if (A.ld < (ar > 1 ? ar : 1) || B.ld < (br > 1 ? br : 1) || ldd < (m > 1 ? m : 1) ||
        (beta != 0 && ldc < (m > 1 ? m : 1)))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!operand_ok(A.p, A.t, ar, ac, A.ld, "A") || !operand_ok(B.p, B.t, br, bc, B.ld, "B") ||
        !operand_ok(D, dt, m, n, ldd, "D") || (beta != 0 && !operand_ok(C, ct, m, n, ldc, "C")))
        return CUBLAS_STATUS_INVALID_VALUE;
    submit(s, [=] {
        // a[i][p] = op(A)(i, p), b[j][p] = op(B)(p, j): rows of k floats.
        std::vector<float> a(size_t(m) * k), b(size_t(n) * k);
        for (int i = 0; i < m; i++)
            for (int p = 0; p < k; p++)
                a[size_t(i) * k + p] = load(A.p, A.t, A.trans ? size_t(p) + size_t(i) * A.ld : size_t(i) + size_t(p) * A.ld);
        for (int j = 0; j < n; j++)
            for (int p = 0; p < k; p++)
                b[size_t(j) * k + p] = load(B.p, B.t, B.trans ? size_t(j) + size_t(p) * B.ld : size_t(p) + size_t(j) * B.ld);
#pragma omp parallel for schedule(static)
        for (int j = 0; j < n; j++) {
            const float *bj = b.data() + size_t(j) * k;
            for (int i = 0; i < m; i++) {
                const float *ai = a.data() + size_t(i) * k;
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int p = 0;
                for (; p + 8 <= k; p += 8)
                    for (int u = 0; u < 8; u++) acc[u] += ai[p + u] * bj[p + u];
                for (; p < k; p++) acc[0] += ai[p] * bj[p];
                float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
                float v = alpha * sum;
                if (beta != 0) v += beta * load(C, ct, size_t(i) + size_t(j) * ldc); // beta 0: C is not read
                const size_t o = size_t(i) + size_t(j) * ldd;
                if (dt == CUDA_R_32F) static_cast<float *>(D)[o] = v;
                else static_cast<__nv_bfloat16 *>(D)[o] = __float2bfloat16_rn(v);
            }
        }
    });
    return CUBLAS_STATUS_SUCCESS;
}

} // namespace emu

// ---- cuBLAS ---------------------------------------------------------------------

cublasStatus_t cublasCreate(cublasHandle_t *h) {
    *h = new EmuCublas;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, const float *B, int ldb, const float *beta,
                           float *C, int ldc) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    return emu::gemm(h->stream, m, n, k, *alpha, {A, CUDA_R_32F, lda, ta == CUBLAS_OP_T},
                     {B, CUDA_R_32F, ldb, tb == CUBLAS_OP_T}, *beta, C, CUDA_R_32F, ldc, C, CUDA_R_32F, ldc);
}

// ---- cuBLASLt -------------------------------------------------------------------

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    *h = new EmuLt;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t ct, cudaDataType_t scale) {
    if (ct != CUBLAS_COMPUTE_32F || scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *d = new EmuLtDesc;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a,
                                              const void *buf, size_t n) {
    if (a != CUBLASLT_MATMUL_DESC_TRANSA && a != CUBLASLT_MATMUL_DESC_TRANSB) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (n != sizeof(cublasOperation_t)) return CUBLAS_STATUS_INVALID_VALUE;
    std::memcpy(a == CUBLASLT_MATMUL_DESC_TRANSA ? &d->ta : &d->tb, buf, n);
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t t, uint64_t rows, uint64_t cols,
                                          int64_t ld) {
    if (ld < int64_t(rows)) return CUBLAS_STATUS_INVALID_VALUE;
    *l = new EmuLtLayout{t, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) {
    *p = new EmuLtPref;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) {
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t, cublasLtMatmulPreferenceAttributes_t,
                                                    const void *, size_t) {
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t a,
                                              cublasLtMatrixLayout_t b, cublasLtMatrixLayout_t c,
                                              cublasLtMatrixLayout_t dd, cublasLtMatmulPreference_t, int requested,
                                              cublasLtMatmulHeuristicResult_t *res, int *returned) {
    *returned = 0;
    if (requested < 1 || !d || !a || !b || !c || !dd) return CUBLAS_STATUS_INVALID_VALUE;
    // Shapes must chain: op(A) m x k, op(B) k x n, C and D m x n.
    const uint64_t m = d->ta == CUBLAS_OP_T ? a->cols : a->rows, k = d->ta == CUBLAS_OP_T ? a->rows : a->cols;
    const uint64_t kb = d->tb == CUBLAS_OP_T ? b->cols : b->rows, n = d->tb == CUBLAS_OP_T ? b->rows : b->cols;
    if (k != kb || c->rows != m || c->cols != n || dd->rows != m || dd->cols != n) return CUBLAS_STATUS_INVALID_VALUE;
    // Two candidates (one computation here), so callers' choice among them runs.
    const int n_algos = requested < 2 ? requested : 2;
    for (int i = 0; i < n_algos; i++) {
        std::memset(&res[i], 0, sizeof res[i]);
        res[i].algo.data[0] = uint64_t(i + 1);
    }
    *returned = n_algos;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t ad, const void *B, cublasLtMatrixLayout_t bd, const void *beta,
                              const void *C, cublasLtMatrixLayout_t cd, void *D, cublasLtMatrixLayout_t dd,
                              const cublasLtMatmulAlgo_t *algo, void *, size_t, cudaStream_t s) {
    if (!h || !d || !algo || algo->data[0] < 1 || algo->data[0] > 2) return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta = d->ta == CUBLAS_OP_T, tb = d->tb == CUBLAS_OP_T;
    const int m = int(ta ? ad->cols : ad->rows), k = int(ta ? ad->rows : ad->cols);
    const int n = int(tb ? bd->rows : bd->cols);
    if (int(tb ? bd->cols : bd->rows) != k || int(dd->rows) != m || int(dd->cols) != n || int(cd->rows) != m ||
        int(cd->cols) != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    const float al = *static_cast<const float *>(alpha), be = *static_cast<const float *>(beta);
    return emu::gemm(s, m, n, k, al, {A, ad->t, int(ad->ld), ta}, {B, bd->t, int(bd->ld), tb}, be, C, cd->t,
                     int(cd->ld), D, dd->t, int(dd->ld));
}
