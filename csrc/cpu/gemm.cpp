// CPU backend of the gemm family: the shared blocked GEMM (gemm_kernel.h) and the linear layers on top of it.
//
// Structure (after BLIS): loops pc (K by KC) > jc (N by NC) > ic (M by MR) > jr (N by NR). Per K block the
// rows' A strips (MR x KC, k-major) are packed once; per (pc, jc) the B block (KC x NC) is packed into NR-wide
// k-major panels that stay in L2 (straight from the image for convolutions: the gather packers); the
// micro-kernel keeps its MR x NR tile of C in registers for the whole KC block and adds it to C once.
// Micro-kernels, chosen at run time: AVX-512 12x32 (24 zmm accumulators; 8x32 or 4x32 when M is small),
// AVX2 6x16 (12 ymm), a portable 4x16. They are compiled with function target attributes, so the build
// still targets (and runs on) any x86-64. Threads split C into rectangles of whole tiles, never K
// (gemm_kernel.h: the bits do not depend on the thread count). Pack buffers are per thread, grown once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AX_X86 1
#else
#define AX_X86 0
#endif

#include "gemm_kernel.h"
#include "ops.h"
#include "parallel.h"
#include "tensor.h"

namespace ax {
namespace cpu {

namespace {

constexpr int KC = kGemmKC;
constexpr int NC = 512;  // B block KC x NC = 512 KiB: half of a Zen 4/5 core's L2
constexpr int MAX_MR = 12, MAX_NR = 32;

// ---- per-thread scratch, grown once --------------------------------------------------------------------

struct Scratch {
    float* p = nullptr;
    size_t n = 0;
    ~Scratch() { std::free(p); }
    float* get(size_t want) {
        if (want > n) {
            std::free(p);
            const size_t bytes = (want * sizeof(float) + 63) / 64 * 64;
            p = static_cast<float*>(std::aligned_alloc(64, bytes));
            if (!p) {
                n = 0;
                throw std::bad_alloc();
            }
            n = want;
        }
        return p;
    }
};
thread_local Scratch t_apack, t_bpack;

// ---- micro-kernels ---------------------------------------------------------------------------------------
// tile (MR x NR at c, row stride ldc) = [tile +] sum over k < kc of a[k][:] (x) b[k][:], the sum being one
// fused multiply-add chain from 0 per element. a: packed MR-wide strip, b: packed NR-wide panel (k-major).

#if AX_X86
// MR rows of 32 columns; 12 for most shapes, 8 or 4 where M is small (the same arithmetic per element, so the
// same bits whichever MR runs).
template <int MR>
__attribute__((target("avx512f,fma"))) void kernel_avx512(int kc, const float* __restrict a,
                                                          const float* __restrict b, float* c, int64_t ldc,
                                                          bool add) {
    __m512 c0[MR], c1[MR];
    // C is in L3 between K blocks (each block re-reads it): fetch the tile while the block computes.
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 31), _MM_HINT_T0);
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
    for (int k = 0; k < kc; ++k) {
        const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
            const __m512 ai = _mm512_set1_ps(a[i]);
            c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
        }
        a += MR;
        b += 32;
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
        float* row = c + i * ldc;
        if (add) {
            c0[i] = _mm512_add_ps(_mm512_loadu_ps(row), c0[i]);
            c1[i] = _mm512_add_ps(_mm512_loadu_ps(row + 16), c1[i]);
        }
        _mm512_storeu_ps(row, c0[i]);
        _mm512_storeu_ps(row + 16, c1[i]);
    }
}

__attribute__((target("avx2,fma"))) void kernel_avx2(int kc, const float* __restrict a, const float* __restrict b,
                                                     float* c, int64_t ldc, bool add) {
    __m256 c0[6], c1[6];
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 15), _MM_HINT_T0);
    }
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int k = 0; k < kc; ++k) {
        const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
        for (int i = 0; i < 6; ++i) {
            const __m256 ai = _mm256_broadcast_ss(a + i);
            c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
        }
        a += 6;
        b += 16;
    }
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
        float* row = c + i * ldc;
        if (add) {
            c0[i] = _mm256_add_ps(_mm256_loadu_ps(row), c0[i]);
            c1[i] = _mm256_add_ps(_mm256_loadu_ps(row + 8), c1[i]);
        }
        _mm256_storeu_ps(row, c0[i]);
        _mm256_storeu_ps(row + 8, c1[i]);
    }
}
#endif

inline float madd(float a, float b, float c) {
#ifdef __FP_FAST_FMAF
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
}

void kernel_generic(int kc, const float* __restrict a, const float* __restrict b, float* c, int64_t ldc, bool add) {
    constexpr int MR = 4, NR = 16;
    float acc[MR][NR] = {};
    for (int k = 0; k < kc; ++k) {
        for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) acc[i][j] = madd(a[i], b[j], acc[i][j]);
        a += MR;
        b += NR;
    }
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) c[i * ldc + j] = add ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

// ---- packing -------------------------------------------------------------------------------------------

// A[i0:i0+mr, k0:k0+kc] into an MR-wide k-major strip, rows past mr zero. k outermost: the writes are
// contiguous (row-by-row strided writes ran at ~10 cycles an element).
void pack_a(const GemmA& A, int MR, int i0, int mr, int k0, int kc, float* __restrict dst) {
    const float* rows[MAX_MR];
    for (int i = 0; i < mr; ++i) rows[i] = A.p + (i0 + i) * A.rs;
    for (int k = 0; k < kc; ++k) {
        const int64_t off = A.koff ? A.koff[k0 + k] : static_cast<int64_t>(k0 + k) * A.cs;
        float* __restrict d = dst + k * MR;
        int i = 0;
        for (; i < mr; ++i) d[i] = rows[i][off];
        for (; i < MR; ++i) d[i] = 0.0f;
    }
}

// Dense B[k0:k0+kc, j0:j0+nc] into NR-wide panels (each kc x NR, k-major), the last one zero-padded.
void pack_b_dense(const GemmB& B, int NR, int k0, int kc, int j0, int nc, float* __restrict dst) {
    if (B.cs == 1) {
        // Row by row: each row's nc floats are one contiguous read (the prefetcher streams it; panel by panel,
        // every 128-byte piece was a fresh miss a row stride away, which held the fc layers to ~5 GB/s).
        const int full = nc / NR * NR;
        for (int k = 0; k < kc; ++k) {
            const float* __restrict src = B.p + (k0 + k) * B.rs + j0;
            float* __restrict dk = dst + k * NR;
            for (int jp = 0; jp < full; jp += NR)
                std::memcpy(dk + static_cast<int64_t>(jp) * kc, src + jp, sizeof(float) * NR);
            if (full < nc) {
                float* __restrict d = dk + static_cast<int64_t>(full) * kc;
                const int nr = nc - full;
                for (int j = 0; j < nr; ++j) d[j] = src[full + j];
                for (int j = nr; j < NR; ++j) d[j] = 0.0f;
            }
        }
        return;
    }
    for (int jp = 0; jp < nc; jp += NR) {
        const int nr = std::min(NR, nc - jp);
        float* __restrict d = dst + static_cast<int64_t>(jp) * kc;
        const float* base = B.p + k0 * B.rs + (j0 + jp) * B.cs;
        if (B.cs == 1) {
            for (int k = 0; k < kc; ++k) {
                const float* __restrict src = base + k * B.rs;
                float* __restrict dk = d + k * NR;
                if (nr == NR) {
                    std::memcpy(dk, src, sizeof(float) * NR);
                } else {
                    for (int j = 0; j < nr; ++j) dk[j] = src[j];
                    for (int j = nr; j < NR; ++j) dk[j] = 0.0f;
                }
            }
        } else {
            for (int j = 0; j < NR; ++j) {
                if (j >= nr) {
                    for (int k = 0; k < kc; ++k) d[k * NR + j] = 0.0f;
                    continue;
                }
                const float* src = base + j * B.cs;
                for (int k = 0; k < kc; ++k) d[k * NR + j] = src[k * B.rs];
            }
        }
    }
}

// Gather B (implicit im2col) into panels; the padded col tables make lanes past N read 0.
void pack_b_gather_generic(const GemmB& B, int NR, int k0, int kc, int j0, int nc, float* __restrict dst) {
    for (int jp = 0; jp < nc; jp += NR) {
        float* __restrict d = dst + static_cast<int64_t>(jp) * kc;
        const int32_t* co = B.col_off + j0 + jp;
        const int32_t* ch = B.col_h + j0 + jp;
        const int32_t* cw = B.col_w + j0 + jp;
        for (int k = 0; k < kc; ++k) {
            const int64_t ro = B.row_off[k0 + k];
            const int32_t rh = B.row_h[k0 + k], rw = B.row_w[k0 + k];
            for (int j = 0; j < NR; ++j) {
                const int64_t h = static_cast<int64_t>(rh) + ch[j], w = static_cast<int64_t>(rw) + cw[j];
                const bool ok = h >= 0 && h < B.H && w >= 0 && w < B.W;
                d[k * NR + j] = ok ? B.p[ro + co[j]] : 0.0f;
            }
        }
    }
}

#if AX_X86
// The vector packers load each group of lanes whose col_off values are consecutive (a stretch of one image
// row, for a stride-1 gather) with one masked contiguous load: the gather instruction costs about two cycles
// an element on Zen 4/5, a masked load a fraction of that. Masked-off lanes are never accessed, so
// addresses outside x are harmless; they are formed in integer arithmetic. Up to half the lanes' worth of
// stretches (grad-weight's 3-wide window taps give 6 in 16 lanes) still beats the gather; more: the gather.
constexpr int kMaxRuns512 = 8, kMaxRuns256 = 4;

struct Runs {
    int n = 0;
    uint32_t mask[16];
    int64_t base[16];  // col_off of the run's lane t is base + t
};

// Stretches of consecutive col_off among the lanes of one vector; padding lanes (never valid) join any run.
inline void find_runs(const int32_t* co, const int32_t* ch, int lanes, Runs* r) {
    r->n = 0;
    for (int t = 0; t < lanes; ++t) {
        if (ch[t] == kGatherOff) continue;
        if (r->n > 0 && co[t] == r->base[r->n - 1] + t) {
            r->mask[r->n - 1] |= 1u << t;
        } else {
            if (r->n == 16) return;
            r->mask[r->n] = 1u << t;
            r->base[r->n] = static_cast<int64_t>(co[t]) - t;
            ++r->n;
        }
    }
}

inline const float* at(const float* p, int64_t off) {
    return reinterpret_cast<const float*>(reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(off) * sizeof(float));
}

__attribute__((target("avx512f"))) void pack_b_gather_avx512(const GemmB& B, int NR, int k0, int kc, int j0,
                                                              int nc, float* __restrict dst) {
    const __m512i H = _mm512_set1_epi32(B.H), W = _mm512_set1_epi32(B.W);
    Runs runs;
    for (int jp = 0; jp < nc; jp += NR) {
        float* __restrict d = dst + static_cast<int64_t>(jp) * kc;
        for (int v = 0; v < NR; v += 16) {
            const int32_t* cop = B.col_off + j0 + jp + v;
            const __m512i co = _mm512_loadu_si512(cop);
            const __m512i ch = _mm512_loadu_si512(B.col_h + j0 + jp + v);
            const __m512i cw = _mm512_loadu_si512(B.col_w + j0 + jp + v);
            find_runs(cop, B.col_h + j0 + jp + v, 16, &runs);
            if (runs.n <= kMaxRuns512) {
                for (int k = 0; k < kc; ++k) {
                    const __m512i h = _mm512_add_epi32(ch, _mm512_set1_epi32(B.row_h[k0 + k]));
                    const __m512i w = _mm512_add_epi32(cw, _mm512_set1_epi32(B.row_w[k0 + k]));
                    const __mmask16 m = _mm512_cmplt_epu32_mask(h, H) & _mm512_cmplt_epu32_mask(w, W);
                    const int64_t ro = B.row_off[k0 + k];
                    __m512 x = _mm512_setzero_ps();
                    for (int r = 0; r < runs.n; ++r)
                        x = _mm512_mask_loadu_ps(x, m & static_cast<__mmask16>(runs.mask[r]), at(B.p, ro + runs.base[r]));
                    _mm512_store_ps(d + k * NR + v, x);
                }
                continue;
            }
            for (int k = 0; k < kc; ++k) {
                const __m512i h = _mm512_add_epi32(ch, _mm512_set1_epi32(B.row_h[k0 + k]));
                const __m512i w = _mm512_add_epi32(cw, _mm512_set1_epi32(B.row_w[k0 + k]));
                const __mmask16 m = _mm512_cmplt_epu32_mask(h, H) & _mm512_cmplt_epu32_mask(w, W);
                const __m512i idx = _mm512_add_epi32(co, _mm512_set1_epi32(B.row_off[k0 + k]));
                _mm512_store_ps(d + k * NR + v, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, B.p, 4));
            }
        }
    }
}

__attribute__((target("avx2"))) void pack_b_gather_avx2(const GemmB& B, int NR, int k0, int kc, int j0, int nc,
                                                         float* __restrict dst) {
    const __m256i H = _mm256_set1_epi32(B.H), W = _mm256_set1_epi32(B.W), neg1 = _mm256_set1_epi32(-1);
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    Runs runs;
    __m256i run_mask[kMaxRuns256];
    for (int jp = 0; jp < nc; jp += NR) {
        float* __restrict d = dst + static_cast<int64_t>(jp) * kc;
        for (int v = 0; v < NR; v += 8) {
            const int32_t* cop = B.col_off + j0 + jp + v;
            const __m256i co = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(cop));
            const __m256i ch = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B.col_h + j0 + jp + v));
            const __m256i cw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(B.col_w + j0 + jp + v));
            find_runs(cop, B.col_h + j0 + jp + v, 8, &runs);
            const bool use_runs = runs.n <= kMaxRuns256;
            if (use_runs)
                for (int r = 0; r < runs.n; ++r) {
                    const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(runs.mask[r])), lane_bit);
                    run_mask[r] = _mm256_cmpeq_epi32(bits, lane_bit);
                }
            for (int k = 0; k < kc; ++k) {
                const __m256i h = _mm256_add_epi32(ch, _mm256_set1_epi32(B.row_h[k0 + k]));
                const __m256i w = _mm256_add_epi32(cw, _mm256_set1_epi32(B.row_w[k0 + k]));
                const __m256i ok = _mm256_and_si256(
                    _mm256_and_si256(_mm256_cmpgt_epi32(h, neg1), _mm256_cmpgt_epi32(H, h)),
                    _mm256_and_si256(_mm256_cmpgt_epi32(w, neg1), _mm256_cmpgt_epi32(W, w)));
                __m256 x;
                if (use_runs) {
                    const int64_t ro = B.row_off[k0 + k];
                    x = _mm256_setzero_ps();
                    for (int r = 0; r < runs.n; ++r)
                        x = _mm256_or_ps(x, _mm256_maskload_ps(at(B.p, ro + runs.base[r]),
                                                               _mm256_and_si256(ok, run_mask[r])));
                } else {
                    const __m256i idx = _mm256_add_epi32(co, _mm256_set1_epi32(B.row_off[k0 + k]));
                    x = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), B.p, idx, _mm256_castsi256_ps(ok), 4);
                }
                _mm256_store_ps(d + k * NR + v, x);
            }
        }
    }
}
#endif

#if AX_X86
// Dense B whose columns are contiguous (B(k, j) = p[j * cs + k], e.g. W^T in linear_forward) into NR-wide
// panels by 8x8 register transposes: the scalar loop writes each panel row a float at a time, 4x slower than
// the GEMM that reads it. Edge rows and the k tail are scalar.
__attribute__((target("avx2"))) void pack_bt_avx2(const GemmB& B, int NR, int k0, int kc, int j0, int nc,
                                                   float* __restrict dst) {
    const int k8 = kc / 8 * 8;
    for (int jp = 0; jp < nc; jp += NR) {
        const int nr = std::min(NR, nc - jp);
        float* __restrict d = dst + static_cast<int64_t>(jp) * kc;
        for (int jb = 0; jb < NR; jb += 8) {
            const float* src[8];
            int live = 0;
            for (int r = 0; r < 8; ++r) {
                src[r] = jb + r < nr ? B.p + (j0 + jp + jb + r) * B.cs + k0 * B.rs : nullptr;
                live += src[r] != nullptr;
            }
            if (live < 8) {  // the matrix edge: scalar, zero-padded
                for (int k = 0; k < kc; ++k)
                    for (int r = 0; r < 8; ++r) d[k * NR + jb + r] = src[r] ? src[r][k] : 0.0f;
                continue;
            }
            for (int k = 0; k < k8; k += 8) {
                __m256 r0 = _mm256_loadu_ps(src[0] + k), r1 = _mm256_loadu_ps(src[1] + k);
                __m256 r2 = _mm256_loadu_ps(src[2] + k), r3 = _mm256_loadu_ps(src[3] + k);
                __m256 r4 = _mm256_loadu_ps(src[4] + k), r5 = _mm256_loadu_ps(src[5] + k);
                __m256 r6 = _mm256_loadu_ps(src[6] + k), r7 = _mm256_loadu_ps(src[7] + k);
                const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
                const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
                const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
                const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
                const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                float* o = d + k * NR + jb;
                _mm256_storeu_ps(o + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
                _mm256_storeu_ps(o + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
                _mm256_storeu_ps(o + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
                _mm256_storeu_ps(o + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
                _mm256_storeu_ps(o + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
                _mm256_storeu_ps(o + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
                _mm256_storeu_ps(o + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
                _mm256_storeu_ps(o + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
            }
            for (int k = k8; k < kc; ++k)
                for (int r = 0; r < 8; ++r) d[k * NR + jb + r] = src[r][k];
        }
    }
}
#endif

// ---- instruction set selection ----------------------------------------------------------------------------

enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"generic", "avx2", "avx512"};

struct Kernel {
    int MR, NR;
    void (*micro)(int, const float*, const float*, float*, int64_t, bool);
    void (*gather)(const GemmB&, int, int, int, int, int, float*);
    void (*pack_bt)(const GemmB&, int, int, int, int, int, float*);  // dense B with rs == 1 (nullable)
};

bool supported(Isa isa) {
#if AX_X86
    __builtin_cpu_init();
    if (isa == kAvx512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return isa == kGeneric;
}

Isa best_isa() {
    if (const char* s = std::getenv("ALEXNET_CPU_ISA"))
        for (int i = 0; i < 3; ++i)
            if (std::strcmp(s, kIsaNames[i]) == 0 && supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
    if (supported(kAvx512)) return kAvx512;
    if (supported(kAvx2)) return kAvx2;
    return kGeneric;
}

std::atomic<int> g_isa{-1};

Isa current_isa() {
    int v = g_isa.load(std::memory_order_relaxed);
    if (v < 0) {
        v = best_isa();
        g_isa.store(v);
    }
    return static_cast<Isa>(v);
}

// The kernel for an M-row problem: AVX-512 takes the row count that pads M least (12 unless 8 or 4 saves
// more than their extra B loads cost).
Kernel kernel_for(Isa isa, int M) {
#if AX_X86
    if (isa == kAvx512) {
        const double r12 = (M + 11) / 12 * 12, r8 = (M + 7) / 8 * 8 * 1.04, r4 = (M + 3) / 4 * 4 * 1.2;
        if (r4 < r8 && r4 < r12) return {4, 32, kernel_avx512<4>, pack_b_gather_avx512, pack_bt_avx2};
        if (r8 < r12) return {8, 32, kernel_avx512<8>, pack_b_gather_avx512, pack_bt_avx2};
        return {12, 32, kernel_avx512<12>, pack_b_gather_avx512, pack_bt_avx2};
    }
    if (isa == kAvx2) return {6, 16, kernel_avx2, pack_b_gather_avx2, pack_bt_avx2};
#endif
    (void)isa;
    (void)M;
    return {4, 16, kernel_generic, pack_b_gather_generic, nullptr};
}

// ---- the driver ----------------------------------------------------------------------------------------

inline float* c_at(const GemmC& C, int i, int j) {
    return C.p + i * C.rs + (C.col_off ? C.col_off[j] : j * C.cs);
}

// Writes a tile computed into tmp (NR-wide rows) to C: C = [C +] tmp, over the valid mr x nr part, in runs of
// contiguous columns.
void store_tile(const GemmC& C, int i0, int j0, int mr, int nr, int NR, const float* tmp, bool add) {
    int64_t run_off[MAX_NR];
    int run_start[MAX_NR + 1], runs = 0;
    for (int jj = 0; jj < nr; ++jj) {
        const int64_t off = C.col_off ? C.col_off[j0 + jj] : static_cast<int64_t>(j0 + jj) * C.cs;
        const bool extends = runs > 0 && (C.col_off || C.cs == 1) &&
                             off == run_off[runs - 1] + (jj - run_start[runs - 1]);
        if (!extends) {
            run_off[runs] = off;
            run_start[runs++] = jj;
        }
    }
    run_start[runs] = nr;
    for (int i = 0; i < mr; ++i) {
        float* row = C.p + (i0 + i) * C.rs;
        const float* src = tmp + i * NR;
        for (int r = 0; r < runs; ++r) {
            const int lo = run_start[r], len = run_start[r + 1] - lo;
            if (C.col_off || C.cs == 1) {
                float* __restrict d = row + run_off[r];
                const float* __restrict s = src + lo;
                if (add)
                    for (int t = 0; t < len; ++t) d[t] += s[t];
                else
                    for (int t = 0; t < len; ++t) d[t] = s[t];
            } else {
                float* d = row + run_off[r];
                for (int t = 0; t < len; ++t) d[t * C.cs] = add ? d[t * C.cs] + src[lo + t] : src[lo + t];
            }
        }
    }
}

// C rows [m0, m1) x columns [n0, n1) (tile-aligned except at the matrix edge), the whole K. K blocks outermost:
// A's block (the rows' MR-wide strips, KC deep) is packed once per K block and reused by every N block.
void gemm_rect(const Kernel& kn, int m0, int m1, int n0, int n1, int K, const GemmA& A, const GemmB& B,
               const GemmC& C, bool accumulate) {
    const int MR = kn.MR, NR = kn.NR;
    const int kc_max = std::min(KC, K);
    const int nc_max = (std::min(NC, n1 - n0) + NR - 1) / NR * NR;
    const int strips = (m1 - m0 + MR - 1) / MR;
    float* bpack = t_bpack.get(static_cast<size_t>(kc_max) * nc_max);
    float* apack = t_apack.get(static_cast<size_t>(kc_max) * MR * strips);
    alignas(64) float tmp[MAX_MR * MAX_NR];
    for (int pc = 0; pc < K; pc += KC) {
        const int kc = std::min(KC, K - pc);
        const bool add = accumulate || pc > 0;
        for (int s = 0; s < strips; ++s) {
            const int ic = m0 + s * MR;
            pack_a(A, MR, ic, std::min(MR, m1 - ic), pc, kc, apack + static_cast<int64_t>(s) * MR * kc);
        }
        for (int jc = n0; jc < n1; jc += NC) {
            const int nc = std::min(NC, n1 - jc);
            if (B.row_off)
                kn.gather(B, NR, pc, kc, jc, nc, bpack);
            else
                (B.rs == 1 && B.cs != 1 && kn.pack_bt ? kn.pack_bt : pack_b_dense)(B, NR, pc, kc, jc, nc, bpack);
            for (int s = 0; s < strips; ++s) {
                const int ic = m0 + s * MR;
                const int mr = std::min(MR, m1 - ic);
                const float* ap = apack + static_cast<int64_t>(s) * MR * kc;
                for (int jr = 0; jr < nc; jr += NR) {
                    const int j = jc + jr, nr = std::min(NR, nc - jr);
                    const float* bp = bpack + static_cast<int64_t>(jr) * kc;
                    // Straight into C when the tile is whole and its columns are contiguous; else through tmp
                    // (the same arithmetic: tmp = the block's sum, then C = [C +] tmp).
                    const bool direct = mr == MR && nr == NR &&
                                        (C.col_off ? C.col_off[j + NR - 1] - C.col_off[j] == NR - 1 : C.cs == 1);
                    if (direct) {
                        kn.micro(kc, ap, bp, c_at(C, ic, j), C.rs, add);
                    } else {
                        kn.micro(kc, ap, bp, tmp, NR, false);
                        store_tile(C, ic, j, mr, nr, NR, tmp, add);
                    }
                }
            }
        }
    }
}

// Splits C's tiles (mt strips x nt panels) into at most `threads` rectangles, minimising the largest one's cost
// per k: its tiles' multiply-adds plus packing its share of B (every thread of a column range packs that
// range's B panels, so splitting M repeats B's packing) and of A. Costs in cycles per k, roughly, for a
// 12x32 tile at one FMA a cycle.
void split(int mt, int nt, int threads, int MR, int NR, bool gather, int* tm, int* tn) {
    const double tile = MR * NR / 16.0, panel = NR * (gather ? 0.5 : 0.25), strip = MR * 1.0;
    double best = -1;
    *tm = *tn = 1;
    for (int a = 1; a <= threads && a <= mt; ++a)
        for (int b = 1; a * b <= threads && b <= nt; ++b) {
            const double ms = (mt + a - 1) / a, ns = (nt + b - 1) / b;
            const double cost = ms * ns * tile + ns * panel + ms * strip;
            if (best < 0 || cost < best) {
                best = cost;
                *tm = a;
                *tn = b;
            }
        }
}

}  // namespace

std::string gemm_isa() { return kIsaNames[current_isa()]; }

bool gemm_isa_supported(const std::string& name) {
    for (int i = 0; i < 3; ++i)
        if (name == kIsaNames[i]) return supported(static_cast<Isa>(i));
    return false;
}

void set_gemm_isa(const std::string& name) {
    if (name == "auto") {
        g_isa.store(-1);
        return;
    }
    for (int i = 0; i < 3; ++i)
        if (name == kIsaNames[i]) {
            if (!supported(static_cast<Isa>(i)))
                throw ValueError("set_cpu_isa: argument 'isa' is '" + name + "', which this CPU does not support");
            g_isa.store(i);
            return;
        }
    throw ValueError("set_cpu_isa: argument 'isa' must be 'auto', 'avx512', 'avx2' or 'generic', got '" + name + "'");
}

void gemm_general(int M, int N, int K, const GemmA& A, const GemmB& B, const GemmC& C, bool accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        if (!accumulate)
            for (int i = 0; i < M; ++i)
                for (int j = 0; j < N; ++j) *c_at(C, i, j) = 0.0f;
        return;
    }
    const Kernel kn = kernel_for(current_isa(), M);
    const int mt = (M + kn.MR - 1) / kn.MR, nt = (N + kn.NR - 1) / kn.NR;
    // A thread is worth waking for about a million multiply-adds.
    const int64_t work = static_cast<int64_t>(M) * N * K;
    const int threads = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, work >> 20)));
    int tm = 1, tn = 1;
    if (threads > 1) split(mt, nt, threads, kn.MR, kn.NR, B.row_off != nullptr, &tm, &tn);
    parallel_for(0, static_cast<int64_t>(tm) * tn, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
            const int im = static_cast<int>(r / tn), in = static_cast<int>(r % tn);
            const int m0 = static_cast<int>(static_cast<int64_t>(mt) * im / tm) * kn.MR;
            const int m1 = std::min(M, static_cast<int>(static_cast<int64_t>(mt) * (im + 1) / tm) * kn.MR);
            const int n0 = static_cast<int>(static_cast<int64_t>(nt) * in / tn) * kn.NR;
            const int n1 = std::min(N, static_cast<int>(static_cast<int64_t>(nt) * (in + 1) / tn) * kn.NR);
            if (m0 < m1 && n0 < n1) gemm_rect(kn, m0, m1, n0, n1, K, A, B, C, accumulate);
        }
    });
}

void gemm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate) {
    int64_t rs_a = trans_a ? 1 : lda, cs_a = trans_a ? lda : 1;
    int64_t rs_b = trans_b ? 1 : ldb, cs_b = trans_b ? ldb : 1;
    int64_t rs_c = ldc, cs_c = 1;
    // The vectorized dimension is N; when N is narrow and M is not, compute C^T = B^T A^T instead
    // (the same sums in the same order, so the same bits).
    if (N < 16 && M > N) {
        std::swap(M, N);
        std::swap(A, B);
        std::swap(rs_a, cs_b);
        std::swap(cs_a, rs_b);
        std::swap(rs_c, cs_c);
    }
    GemmA ga{A, rs_a, cs_a, nullptr};
    GemmB gb{B, rs_b, cs_b, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0};
    GemmC gc{C, rs_c, cs_c, nullptr};
    gemm_general(M, N, K, ga, gb, gc, accumulate);
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

// dw (O,I) = dy^T (O,N) x (N,I): summed over the batch (gemm_kernel.h's order).
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
