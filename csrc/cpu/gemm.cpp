// CPU backend of the gemm family: the shared blocked GEMM (gemm_kernel.h) and the linear layers on top of it.
#include <algorithm>
#include <memory>

#include "gemm_kernel.h"
#include "ops.h"

namespace ax {
namespace cpu {

namespace {

// Register tile MR x NR (4 x 8 floats: 32 accumulators fit the 16 SSE or AVX registers without spilling),
// K blocked by KC so a packed A strip (MR x KC) stays in L1, N blocked by NC so the packed B block
// (KC x NC) stays in L2.
constexpr int MR = 4;
constexpr int NR = 8;
constexpr int KC = 256;
constexpr int NC = 512;

// An x86-64 build targets SSE2 only; an AVX2 clone of the micro-kernel is chosen at load time where the
// CPU has it. No FMA in either clone, so both round every product and sum identically.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define AX_GEMM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define AX_GEMM_CLONES
#endif

// C tile (mr x nr, strides rs_c/cs_c) = [C +] sum_k ap[k][:] (x) bp[k][:]. ap is a packed MR-wide A strip
// (k-major), bp a packed NR-wide B panel (k-major); the j loop is the contiguous, vectorized one.
AX_GEMM_CLONES
void micro_kernel(int kc, const float* __restrict ap, const float* __restrict bp, float* __restrict c, int64_t rs_c,
                  int64_t cs_c, int mr, int nr, bool load) {
    float acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = (load && i < mr && j < nr) ? c[i * rs_c + j * cs_c] : 0.0f;
    for (int k = 0; k < kc; ++k) {
        const float* __restrict b = bp + k * NR;
        for (int i = 0; i < MR; ++i) {
            const float a = ap[k * MR + i];
            for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
        }
    }
    for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nr; ++j) c[i * rs_c + j * cs_c] = acc[i][j];
}

// Packs B[k0:k0+kc, j0:j0+nc] into NR-wide panels, each kc x NR k-major, zero-padding the last panel.
// The loop order follows whichever source stride is contiguous.
void pack_b(int kc, int nc, const float* B, int64_t rs_b, int64_t cs_b, float* __restrict dst) {
    for (int jp = 0; jp < nc; jp += NR) {
        const int nr = std::min(NR, nc - jp);
        float* __restrict d = dst + static_cast<int64_t>(jp) * kc;
        if (cs_b == 1) {
            for (int k = 0; k < kc; ++k) {
                const float* src = B + k * rs_b + jp;
                for (int j = 0; j < NR; ++j) d[k * NR + j] = j < nr ? src[j] : 0.0f;
            }
        } else {
            for (int j = 0; j < NR; ++j) {
                if (j >= nr) {
                    for (int k = 0; k < kc; ++k) d[k * NR + j] = 0.0f;
                    continue;
                }
                const float* src = B + (jp + j) * cs_b;
                for (int k = 0; k < kc; ++k) d[k * NR + j] = src[k * rs_b];
            }
        }
    }
}

// Packs A[i0:i0+mr, k0:k0+kc] into an MR-wide k-major strip, zero-padding missing rows.
void pack_a(int mr, int kc, const float* A, int64_t rs_a, int64_t cs_a, float* __restrict dst) {
    for (int i = 0; i < MR; ++i) {
        if (i >= mr) {
            for (int k = 0; k < kc; ++k) dst[k * MR + i] = 0.0f;
            continue;
        }
        const float* src = A + i * rs_a;
        for (int k = 0; k < kc; ++k) dst[k * MR + i] = src[k * cs_a];
    }
}

// Blocked GEMM on strided views: loops jc (NC) > pc (KC) > ic (MR) > jr (NR). The pc blocks run in
// increasing k and each continues from the partial sums already in C, so every element is one sequential
// sum over k.
void gemm_strided(int M, int N, int K, const float* A, int64_t rs_a, int64_t cs_a, const float* B, int64_t rs_b,
                  int64_t cs_b, float* C, int64_t rs_c, int64_t cs_c, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (int i = 0; i < M; ++i)
                for (int j = 0; j < N; ++j) C[i * rs_c + j * cs_c] = 0.0f;
        return;
    }
    // Sized to this problem (tiny GEMMs are common in small nets) and left uninitialized: packing writes
    // every element that is read.
    const int kc_max = std::min(KC, K), nc_max = (std::min(NC, N) + NR - 1) / NR * NR;
    std::unique_ptr<float[]> bpack(new float[static_cast<size_t>(kc_max) * nc_max]);
    std::unique_ptr<float[]> apack(new float[static_cast<size_t>(kc_max) * MR]);
    for (int jc = 0; jc < N; jc += NC) {
        const int nc = std::min(NC, N - jc);
        for (int pc = 0; pc < K; pc += KC) {
            const int kc = std::min(KC, K - pc);
            pack_b(kc, nc, B + pc * rs_b + jc * cs_b, rs_b, cs_b, bpack.get());
            for (int ic = 0; ic < M; ic += MR) {
                const int mr = std::min(MR, M - ic);
                pack_a(mr, kc, A + ic * rs_a + pc * cs_a, rs_a, cs_a, apack.get());
                for (int jr = 0; jr < nc; jr += NR)
                    micro_kernel(kc, apack.get(), bpack.get() + static_cast<int64_t>(jr) * kc,
                                 C + ic * rs_c + (jc + jr) * cs_c, rs_c, cs_c, mr, std::min(NR, nc - jr),
                                 accumulate || pc > 0);
            }
        }
    }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
    int64_t rs_a = trans_a ? 1 : lda, cs_a = trans_a ? lda : 1;
    int64_t rs_b = trans_b ? 1 : ldb, cs_b = trans_b ? ldb : 1;
    int64_t rs_c = ldc, cs_c = 1;
    // The vectorized dimension is N; when N is narrow and M is not, compute C^T = B^T A^T instead
    // (same sums in the same order, so the same bits).
    if (N < 4 * NR && M > N) {
        std::swap(M, N);
        std::swap(A, B);
        std::swap(rs_a, cs_b);
        std::swap(cs_a, rs_b);
        std::swap(rs_c, cs_c);
    }
    gemm_strided(M, N, K, A, rs_a, cs_a, B, rs_b, cs_b, C, rs_c, cs_c, accumulate);
}

// y (N,O) = x (N,I) W^T + b: the GEMM with B = W^T read through trans_b, then the bias row added, then (p.relu)
// relu_forward.
void linear_forward(const LinearParams& p, const float* x, const float* w, const float* b, float* y) {
    gemm(false, true, p.N, p.O, p.I, x, p.I, w, p.I, y, p.O, false);
    if (b)
        for (int n = 0; n < p.N; ++n) {
            float* __restrict row = y + static_cast<int64_t>(n) * p.O;
            for (int o = 0; o < p.O; ++o) row[o] += b[o];
        }
    if (p.relu)  // in place, as relu_forward writes it
        for (int64_t i = 0; i < static_cast<int64_t>(p.N) * p.O; ++i) y[i] = y[i] < 0.0f ? 0.0f : y[i];
}

// dx (N,I) = dy (N,O) W (O,I).
void linear_backward_input(const LinearParams& p, const float* dy, const float* w, float* dx) {
    gemm(false, false, p.N, p.I, p.O, dy, p.O, w, p.I, dx, p.I, false);
}

// dw (O,I) = dy^T (O,N) x (N,I): summed over the batch in increasing n.
void linear_backward_weight(const LinearParams& p, const float* x, const float* dy, float* dw) {
    gemm(true, false, p.O, p.I, p.N, dy, p.O, x, p.I, dw, p.I, false);
}

// db (O) = sum over n of dy, rows added in increasing n (the o loop vectorizes).
void linear_backward_bias(const LinearParams& p, const float* dy, float* db) {
    for (int o = 0; o < p.O; ++o) db[o] = 0.0f;
    for (int n = 0; n < p.N; ++n) {
        const float* __restrict row = dy + static_cast<int64_t>(n) * p.O;
        for (int o = 0; o < p.O; ++o) db[o] += row[o];
    }
}

}  // namespace cpu
}  // namespace ax
