// bf16.h - the CPU backend's bf16 path: weights packed once into panels of
// bf16 pairs, activations rounded to bf16 where the official model computes
// in bf16, products accumulated in fp32 (VDPBF16PS where the CPU has it).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "line_vector.h"

namespace dimoo::cpu {

// Kernel sets, best last. Chosen at run time: the best the CPU supports,
// lowered by DIMOO_CPU_KERNELS=avx512bf16|avx512|avx2|portable (tests force
// each one). Avx2: AVX2 and FMA (most laptop and AMD Zen 1-3 CPUs). Amx:
// the bf16 tiles on Intel AMX (TDPBF16PS, Linux, once the kernel grants the
// process the tile state), AVX-512 BF16 for what is left over.
enum class Kernels : int { Portable = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Amx = 4 };
Kernels best_kernels();          // this CPU, capped by DIMOO_CPU_KERNELS
bool kernels_supported(Kernels k);
const char *kernels_name(Kernels k);

constexpr int kPanel = 32; // output columns per packed panel
constexpr int kTileRows = 12; // rows of A per micro-tile

// An (N, K) matrix in bf16 pairs: element (n, k) sits in panel n / 32 at
//   data[((panel * Kp + k / 2) * 32 + n % 32) * 2 + k % 2],   Kp = ceil(K / 2),
// zero past N and K. One panel is a (Kp x 32) array of pairs, so a kernel
// reads 32 output columns x 2 k per 128-byte line.
struct PackedMatrix {
    int N = 0, K = 0, Kp = 0, panels = 0;
    RawLineVector<uint16_t> data; // line-aligned: AMX reads 64-byte halves of its 128-byte lines
    size_t bytes() const { return data.size() * sizeof(uint16_t); }
    const uint16_t *panel(int p) const { return data.data() + size_t(p) * size_t(Kp) * 64; }
};
// W: (N, K) row-major in dtype (F32, F16, BF16), rounded to bf16 when wider.
void pack_matrix(const void *W, int32_t dtype, int N, int K, PackedMatrix &out);
// The inverse: W (N, K) bf16 row-major, exactly the bf16 values packed.
void unpack_matrix(const PackedMatrix &p, uint16_t *W);

// n floats to bf16 (round to nearest even), then zeros up to n_pad.
void round_bf16(const float *src, int n, uint16_t *dst, int n_pad);

// C[r][c - c0] (= or +=) sum_k A[r][k] * B[k][c]   for r < rows, c0 <= c < c1 <= 32.
// A: bf16 pairs (k = 2i, 2i+1 in A[r * lda + i]), kp pairs. B: one panel,
// pair i of column c at B[i * pstride + 2c] (pstride in uint16, 64 for a
// PackedMatrix panel). fp32 accumulation; any number of rows.
void tile(Kernels ks, int rows, int kp, const uint32_t *A, size_t lda, const uint16_t *B, size_t pstride,
          float *C, size_t ldc, int c0, int c1, bool accumulate);

// One product of a GEMM team: C[M x (n1 - n0)] (= or +=) A * W[n0:n1]^T.
struct GemmJob {
    const PackedMatrix *W;
    float *C;
    size_t ldc;
    int n0, n1; // output columns of W (rows of the weight)
    bool accumulate;
};
// Runs the jobs over the shared A (M rows of bf16 pairs, lda pairs per row)
// on the calling OpenMP team: every thread calls it; tiles are handed out
// dynamically (a slow thread takes fewer); ends with the team's barrier.
// Outside a parallel region it runs on the calling thread.
void gemm_team(Kernels ks, int M, const uint32_t *A, size_t lda, const GemmJob *jobs, int n_jobs);
// On AMX the team hands out row blocks that fit L2 over groups of panels
// (bf16.cpp, team_tasks). Off: the panel-major order, the same bits; for
// benchmarks that time the two in one process (dimoo_cpupeak --gemm).
void set_gemm_blocking(bool on);

// Scratch floats per thread for flash_attention_team.
size_t flash_scratch_floats(int head_dim);

// K and V of one sequence, packed for attention: per KV head, K as a
// PackedMatrix of (keys, head_dim) and V as pairs of consecutive keys:
//   V(t, c) at v[h * vstride + (t / 2) * 2 * head_dim + 2c + t % 2],
// keys padded to packed_kv_tpad(T) with zeros.
struct PackedKV {
    int T = 0, Tpad = 0, head_dim = 0, n_kv = 0;
    size_t kstride = 0, vstride = 0; // uint16 per KV head
    uint16_t *k = nullptr, *v = nullptr;
};
constexpr int kKeyBlock = 128;       // keys per flash-attention step
int packed_kv_tpad(int T);           // T rounded up to kKeyBlock: the packed K/V length
size_t packed_kv_elems(int T, int head_dim); // uint16 per KV head, for K or for V
// Packs rows 0..T-1 of K and V (fp32, row stride ld, head h at column h * head_dim)
// on the calling team (work-shared, ends with a barrier).
void pack_kv_team(const float *K, const float *V, size_t ld, PackedKV &kv);
// One key's K and V rows (fp32, head h at h * head_dim) into kv at
// position pos: what pack_kv_team writes for that key. Kept caches are
// updated so, row by row.
void pack_kv_row(const float *k, const float *v, int pos, const PackedKV &kv);
// Zeros keys kv.T .. kv.Tpad - 1 (packed K/V kept across forwards of other
// lengths: attention reads whole key blocks). Work-shared, ends with a barrier.
void zero_kv_tail_team(const PackedKV &kv);

// Bidirectional attention of `rows` queries over all kv.T keys, tiled
// flash-style (online softmax): per (head, block of queries) S = Q K^T on
// the packed kernels, running max and sum, P rounded to bf16, O += P V.
// q: bf16 pairs, row stride ldq pairs, head h at pair h * head_dim / 2.
// out: bf16, row stride ldo (uint16), head h at column h * head_dim.
// scratch: flash_scratch_floats() per thread of the team. Work-shared.
void flash_attention_team(Kernels ks, const uint32_t *q, size_t ldq, int rows, int n_heads, const PackedKV &kv,
                          uint16_t *out, size_t ldo, float *scratch);

// ---- the fp32 counterpart, for fp32 checkpoints -------------------------------------------------
// Same structure with fp32 everywhere (no rounding): weights in panels of 32
// rows, k-major, element (n, k) at data[(panel * K + k) * 32 + n % 32].
struct PackedMatrixF32 {
    int N = 0, K = 0, panels = 0;
    RawLineVector<float> data;
    size_t bytes() const { return data.size() * sizeof(float); }
    const float *panel(int p) const { return data.data() + size_t(p) * size_t(K) * 32; }
};
void pack_matrix_f32(const void *W, int32_t dtype, int N, int K, PackedMatrixF32 &out);
// The inverse: W (N, K) fp32 row-major.
void unpack_matrix_f32(const PackedMatrixF32 &p, float *W);

// As tile(), fp32: C[r][c - c0] (= or +=) sum_k A[r * lda + k] * B[k * pstride + c].
void tile_f32(Kernels ks, int rows, int K, const float *A, size_t lda, const float *B, size_t pstride, float *C,
              size_t ldc, int c0, int c1, bool accumulate);

struct GemmJobF32 {
    const PackedMatrixF32 *W;
    float *C;
    size_t ldc;
    int n0, n1;
    bool accumulate;
};
void gemm_team_f32(Kernels ks, int M, const float *A, size_t lda, const GemmJobF32 *jobs, int n_jobs);

// K packed per KV head as a PackedMatrixF32 of (keys, head_dim), keys padded
// to packed_kv_tpad(T); V read in place (row stride ldv, head h at h * head_dim;
// up to 31 floats past the last row are read and ignored).
struct PackedKVF32 {
    int T = 0, Tpad = 0, head_dim = 0, n_kv = 0;
    size_t kstride = 0; // floats per KV head
    float *k = nullptr;
    const float *v = nullptr;
    size_t ldv = 0;
};
size_t packed_k_f32_elems(int T, int head_dim);
void pack_k_f32_team(const float *K, size_t ld, PackedKVF32 &kv);
// q: fp32 rows (stride ldq, head h at h * head_dim); out: fp32 (stride ldo).
void flash_attention_f32_team(Kernels ks, const float *q, size_t ldq, int rows, int n_heads, const PackedKVF32 &kv,
                              float *out, size_t ldo, float *scratch);

// Benchmark hook: while on, the bf16 forward adds the wall time of its
// stages (measured by thread 0 between the team's barriers) to a global
// tally that stage_times_take() returns and resets.
struct StageTimes {
    double gemm = 0, attention = 0, rest = 0;
};
enum class Stage { Gemm, Attention, Rest };
void stage_timing(bool on);
bool stage_timing_on();
void stage_time_add(Stage s, double seconds);
StageTimes stage_times_take();

} // namespace dimoo::cpu
