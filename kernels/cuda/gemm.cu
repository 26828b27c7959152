// gemm.cu - cuBLASLt for every projection of the forward. cuBLASLt is
// column-major: W stored [N, K] row-major is a K x N column-major matrix,
// taken transposed (op T); X [M, K] row-major is K x M, taken as is; their
// product is the N x M column-major matrix, which is Y [M, N] row-major. The heuristic's
// candidates (up to 8) are cached per shape and the forward runs its first
// choice; pointer alignment is part of the key because an algorithm may need
// 16-byte aligned operands.
#include "cuda/gemm.cuh"

#include <algorithm>
#include <string>

#include "common.h"
#include "cuda/cuda_common.cuh"

namespace dimoo {
namespace {

void lt_check(cublasStatus_t st, const char *what) {
    if (st == CUBLAS_STATUS_SUCCESS) return;
    fail(st == CUBLAS_STATUS_ALLOC_FAILED ? DIMOO_ERR_DEVICE_OUT_OF_MEMORY : DIMOO_ERR_DEVICE,
         std::string(what) + " failed with cuBLAS status " + std::to_string(int(st)));
}
#define LT(call) lt_check((call), #call)

// Largest power of two (<= 256) dividing the address.
int align_of(const void *p) {
    uintptr_t u = reinterpret_cast<uintptr_t>(p);
    int a = 256;
    while (a > 1 && (u % a)) a >>= 1;
    return a;
}

} // namespace

LtGemm::LtGemm(cudaStream_t stream, size_t workspace_bytes) : stream_(stream), ws_bytes_(workspace_bytes) {
    LT(cublasLtCreate(&lt_));
    if (ws_bytes_) {
        cudaError_t e = cudaMalloc(&ws_, ws_bytes_);
        if (e != cudaSuccess) {
            cublasLtDestroy(lt_);
            cuda_check(e, "cudaMalloc(cuBLASLt workspace)");
        }
    }
}

LtGemm::~LtGemm() {
    for (auto &kv : plans_) {
        Plan &p = kv.second;
        if (p.a) cublasLtMatrixLayoutDestroy(p.a);
        if (p.b) cublasLtMatrixLayoutDestroy(p.b);
        if (p.c) cublasLtMatrixLayoutDestroy(p.c);
        if (p.desc) cublasLtMatmulDescDestroy(p.desc);
    }
    if (ws_) cudaFree(ws_);
    if (lt_) cublasLtDestroy(lt_);
}

LtGemm::Plan &LtGemm::plan(const Key &k) {
    auto it = plans_.find(k);
    if (it != plans_.end()) return it->second;
    const auto [M, N, K, ldx, ldw, ldy, ydt, acc, align] = k;
    (void)acc;
    Plan p;
    const cudaDataType_t yt = ydt == DIMOO_F32 ? CUDA_R_32F : CUDA_R_16BF;
    try {
        LT(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        LT(cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        LT(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, K, N, ldw));
        LT(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, K, M, ldx));
        LT(cublasLtMatrixLayoutCreate(&p.c, yt, N, M, ldy));
        cublasLtMatmulPreference_t pref = nullptr;
        LT(cublasLtMatmulPreferenceCreate(&pref));
        uint64_t ws = ws_bytes_;
        uint32_t al = uint32_t(align);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al, sizeof al);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al, sizeof al);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al, sizeof al);
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al, sizeof al);
        cublasLtMatmulHeuristicResult_t res[kMaxAlgos]{};
        int n = 0;
        cublasStatus_t st =
            cublasLtMatmulAlgoGetHeuristic(lt_, p.desc, p.a, p.b, p.c, p.c, pref, kMaxAlgos, res, &n);
        cublasLtMatmulPreferenceDestroy(pref);
        LT(st);
        if (n == 0)
            fail(DIMOO_ERR_DEVICE, "cuBLASLt has no algorithm for a " + std::to_string(M) + "x" + std::to_string(N) +
                                       "x" + std::to_string(K) + " bf16 GEMM");
        for (int i = 0; i < n && i < kMaxAlgos; i++)
            if (res[i].state == CUBLAS_STATUS_SUCCESS) p.algo[p.n_algos++] = res[i].algo;
        if (p.n_algos == 0) fail(DIMOO_ERR_DEVICE, "cuBLASLt's heuristic returned no usable algorithm");
    } catch (...) {
        if (p.a) cublasLtMatrixLayoutDestroy(p.a);
        if (p.b) cublasLtMatrixLayoutDestroy(p.b);
        if (p.c) cublasLtMatrixLayoutDestroy(p.c);
        if (p.desc) cublasLtMatmulDescDestroy(p.desc);
        throw;
    }
    return plans_.emplace(k, p).first->second;
}

LtGemm::Key LtGemm::key(int M, int N, int K, const uint16_t *X, int ldx, const uint16_t *W, int ldw, void *Y,
                        int ldy, int32_t y_dtype, bool accumulate) const {
    int align = align_of(X);
    align = std::min(align, align_of(W));
    align = std::min(align, align_of(Y));
    // Leading dimensions step the pointer too.
    const int es = y_dtype == DIMOO_F32 ? 4 : 2;
    align = std::min(align, align_of(reinterpret_cast<const void *>(uintptr_t(ldx) * 2)));
    align = std::min(align, align_of(reinterpret_cast<const void *>(uintptr_t(ldw) * 2)));
    align = std::min(align, align_of(reinterpret_cast<const void *>(uintptr_t(ldy) * es)));
    return Key{M, N, K, ldx, ldw, ldy, y_dtype, accumulate, align};
}

int LtGemm::algo_count(int M, int N, int K, const uint16_t *X, int ldx, const uint16_t *W, int ldw, void *Y, int ldy,
                       int32_t y_dtype, bool accumulate) {
    if (M == 0 || N == 0) return 0;
    return plan(key(M, N, K, X, ldx, W, ldw, Y, ldy, y_dtype, accumulate)).n_algos;
}

void LtGemm::set_tuning(int min_rows, void *scratch, size_t scratch_bytes) {
    tune_min_rows_ = min_rows > 0 ? min_rows : 0;
    scratch_ = scratch;
    scratch_bytes_ = scratch ? scratch_bytes : 0;
}

void LtGemm::tune(Plan &p, int M, const uint16_t *X, const uint16_t *W, void *Y, int ldy, int32_t y_dtype,
                  bool accumulate) {
    // Not while a graph is being captured (the events and the wait below
    // would break it): the shape is timed at its next eager run.
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &cs) != cudaSuccess || cs != cudaStreamCaptureStatusNone) return;
    p.tuned = true;
    if (p.n_algos < 2) return;
    void *out = Y;
    if (accumulate) {
        const size_t need = size_t(M) * size_t(ldy) * (y_dtype == DIMOO_F32 ? 4 : 2);
        if (need > scratch_bytes_) return;
        out = scratch_;
    }
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    cuda_check(cudaEventCreate(&e0), "cudaEventCreate");
    if (const cudaError_t err = cudaEventCreate(&e1); err != cudaSuccess) {
        cudaEventDestroy(e0);
        cuda_check(err, "cudaEventCreate");
    }
    const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
    float best = 0.f;
    int best_i = -1;
    for (int i = 0; i < p.n_algos; i++) {
        auto mm = [&] {
            return cublasLtMatmul(lt_, p.desc, &alpha, W, p.a, X, p.b, &beta, out, p.c, out, p.c, &p.algo[i], ws_,
                                  ws_bytes_, stream_);
        };
        // A candidate that does not run here is passed over.
        bool ok = mm() == CUBLAS_STATUS_SUCCESS && cudaEventRecord(e0, stream_) == cudaSuccess;
        for (int r = 0; ok && r < 3; r++) ok = mm() == CUBLAS_STATUS_SUCCESS;
        float ms = 0.f;
        ok = ok && cudaEventRecord(e1, stream_) == cudaSuccess && cudaEventSynchronize(e1) == cudaSuccess &&
             cudaEventElapsedTime(&ms, e0, e1) == cudaSuccess;
        if (ok && (best_i < 0 || ms < best)) best = ms, best_i = i;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cuda_check(cudaGetLastError(), "timing cuBLASLt candidates");
    tuned_++;
    if (best_i > 0) {
        std::swap(p.algo[0], p.algo[best_i]);
        changed_++;
    }
}

void LtGemm::run(int M, int N, int K, const uint16_t *X, int ldx, const uint16_t *W, int ldw, void *Y, int ldy,
                 int32_t y_dtype, bool accumulate, int algo) {
    if (M == 0 || N == 0) return;
    Plan &p = plan(key(M, N, K, X, ldx, W, ldw, Y, ldy, y_dtype, accumulate));
    if (algo == kUntuned) algo = 0;
    else if (tune_min_rows_ > 0 && !p.tuned && M >= tune_min_rows_)
        tune(p, M, X, W, Y, ldy, y_dtype, accumulate);
    if (algo < 0 || algo >= p.n_algos) fail(DIMOO_ERR_INTERNAL, "no cuBLASLt candidate " + std::to_string(algo));
    const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
    LT(cublasLtMatmul(lt_, p.desc, &alpha, W, p.a, X, p.b, &beta, Y, p.c, Y, p.c, &p.algo[algo], ws_, ws_bytes_,
                      stream_));
}

} // namespace dimoo
