// CPU backend of the dropout family: element i's draw is philox_u32(seed, offset + i), the same counter the
// CUDA kernels use, so both backends produce identical masks.
//
// The forward draws a chunk of counters with Philox4x32-10 in vector registers, each 32-bit word in the low half
// of a 64-bit lane so that one pmuludq / vpmuludq gives the full 32x32->64 product (AVX-512: 8 counters per
// register, AVX2: 4, SSE2: 2; the widest the CPU has, chosen once), then selects branch-free over the chunk in a
// loop cloned per ISA (simd.h). Every path computes exactly philox.h's words, so masks never depend on the ISA.
#include <cstring>

#include "ops.h"
#include "philox.h"
#include "simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AX_DROPOUT_X86 1
#endif

namespace ax {
namespace cpu {

namespace {

constexpr int kChunk = 1024;  // draws per chunk: a 4 KB stack buffer the select loop reads back from L1

// The ten rounds' keys, as philox.h bumps them.
struct PhiloxKeys {
    uint32_t k0[10], k1[10];
    explicit PhiloxKeys(uint64_t seed) {
        uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
        for (int r = 0; r < 10; ++r) {
            k0[r] = a; k1[r] = b;
            a += 0x9E3779B9u;
            b += 0xBB67AE85u;
        }
    }
};

using DrawFn = void (*)(const PhiloxKeys& k, uint64_t ctr0, int64_t n, uint32_t* draws);

// draws[j] = philox_u32(seed, ctr0 + j), one counter at a time (the tails, and CPUs without SSE2 paths).
void draws_scalar(const PhiloxKeys& k, uint64_t ctr0, int64_t n, uint32_t* draws) {
    const uint64_t seed = (static_cast<uint64_t>(k.k1[0]) << 32) | k.k0[0];
    for (int64_t j = 0; j < n; ++j) draws[j] = philox_u32(seed, ctr0 + static_cast<uint64_t>(j));
}

#ifdef AX_DROPOUT_X86
// U independent groups of lanes, each holding (c0, c1, c2, c3) in the low 32 bits of its 64-bit lanes, go through
// the ten rounds together, so the multiplies of one group hide the latency of another's. The high halves carry
// garbage that no result reads: a word only reaches a multiply (which reads its low 32 bits), an xor into such a
// word, or the final truncation. n0 = hi(M1*c2) ^ c1 ^ k0, n1 = lo(M1*c2), n2 = hi(M0*c0) ^ c3 ^ k1,
// n3 = lo(M0*c0).
#define AX_PHILOX_ROUNDS(U, MUL, SRL, XOR3, SET1)                                                   \
    for (int r = 0; r < 10; ++r) {                                                                  \
        const auto kk0 = SET1(static_cast<long long>(k.k0[r])), kk1 = SET1(static_cast<long long>(k.k1[r])); \
        for (int u = 0; u < U; ++u) {                                                               \
            const auto p0 = MUL(c0[u], m0), p1 = MUL(c2[u], m1);                                   \
            c0[u] = XOR3(SRL(p1, 32), c1[u], kk0);                                                  \
            c2[u] = XOR3(SRL(p0, 32), c3[u], kk1);                                                  \
            c1[u] = p1;                                                                             \
            c3[u] = p0;                                                                             \
        }                                                                                           \
    }

__attribute__((target("avx512f"))) inline __m512i xor3_512(__m512i a, __m512i b, __m512i c) {
    return _mm512_ternarylogic_epi64(a, b, c, 0x96);
}
__attribute__((target("avx2"))) inline __m256i xor3_256(__m256i a, __m256i b, __m256i c) {
    return _mm256_xor_si256(_mm256_xor_si256(a, b), c);
}
inline __m128i xor3_128(__m128i a, __m128i b, __m128i c) { return _mm_xor_si128(_mm_xor_si128(a, b), c); }

__attribute__((target("avx512f"))) void draws_avx512(const PhiloxKeys& k, uint64_t ctr0, int64_t n, uint32_t* draws) {
    constexpr int U = 4, L = 8;
    const __m512i m0 = _mm512_set1_epi64(0xD2511F53), m1 = _mm512_set1_epi64(0xCD9E8D57);
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    int64_t j = 0;
    for (; j + U * L <= n; j += U * L) {
        __m512i c0[U], c1[U], c2[U], c3[U];
        for (int u = 0; u < U; ++u) {
            c0[u] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(ctr0 + j + u * L)), lane);
            c1[u] = _mm512_srli_epi64(c0[u], 32);
            c2[u] = c3[u] = _mm512_setzero_si512();
        }
        AX_PHILOX_ROUNDS(U, _mm512_mul_epu32, _mm512_srli_epi64, xor3_512, _mm512_set1_epi64)
        for (int u = 0; u < U; ++u)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(draws + j + u * L), _mm512_cvtepi64_epi32(c0[u]));
    }
    draws_scalar(k, ctr0 + j, n - j, draws + j);
}

__attribute__((target("avx2"))) void draws_avx2(const PhiloxKeys& k, uint64_t ctr0, int64_t n, uint32_t* draws) {
    constexpr int U = 2, L = 4;
    const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
    const __m256i lane = _mm256_set_epi64x(3, 2, 1, 0), even = _mm256_set_epi32(7, 5, 3, 1, 6, 4, 2, 0);
    int64_t j = 0;
    for (; j + U * L <= n; j += U * L) {
        __m256i c0[U], c1[U], c2[U], c3[U];
        for (int u = 0; u < U; ++u) {
            c0[u] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(ctr0 + j + u * L)), lane);
            c1[u] = _mm256_srli_epi64(c0[u], 32);
            c2[u] = c3[u] = _mm256_setzero_si256();
        }
        AX_PHILOX_ROUNDS(U, _mm256_mul_epu32, _mm256_srli_epi64, xor3_256, _mm256_set1_epi64x)
        for (int u = 0; u < U; ++u)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(draws + j + u * L),
                             _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c0[u], even)));
    }
    draws_scalar(k, ctr0 + j, n - j, draws + j);
}

void draws_sse2(const PhiloxKeys& k, uint64_t ctr0, int64_t n, uint32_t* draws) {
    constexpr int U = 2, L = 2;
    const __m128i m0 = _mm_set1_epi64x(0xD2511F53), m1 = _mm_set1_epi64x(0xCD9E8D57);
    const __m128i lane = _mm_set_epi64x(1, 0);
    int64_t j = 0;
    for (; j + U * L <= n; j += U * L) {
        __m128i c0[U], c1[U], c2[U], c3[U];
        for (int u = 0; u < U; ++u) {
            c0[u] = _mm_add_epi64(_mm_set1_epi64x(static_cast<long long>(ctr0 + j + u * L)), lane);
            c1[u] = _mm_srli_epi64(c0[u], 32);
            c2[u] = c3[u] = _mm_setzero_si128();
        }
        AX_PHILOX_ROUNDS(U, _mm_mul_epu32, _mm_srli_epi64, xor3_128, _mm_set1_epi64x)
        for (int u = 0; u < U; ++u)
            _mm_storel_epi64(reinterpret_cast<__m128i*>(draws + j + u * L),
                             _mm_shuffle_epi32(c0[u], _MM_SHUFFLE(3, 1, 2, 0)));
    }
    draws_scalar(k, ctr0 + j, n - j, draws + j);
}
#undef AX_PHILOX_ROUNDS
#endif

DrawFn pick_draws() {
#ifdef AX_DROPOUT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return draws_avx512;
    if (__builtin_cpu_supports("avx2")) return draws_avx2;
    return draws_sse2;
#else
    return draws_scalar;
#endif
}

// keep (0 or 1) ? v : +0.0f, as an integer AND of v's bits: the vectoriser widens the byte or word condition
// into a lane mask instead of branching on it (a branch on a random mask mispredicts half the time).
inline __attribute__((always_inline)) float select_bits(uint32_t keep, float v) {
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    b &= 0u - keep;
    float r;
    std::memcpy(&r, &b, sizeof r);
    return r;
}

// mask[j] = draws[j] >= threshold; y[j] = mask ? x[j] * keep_scale : 0 (0 even where x is NaN).
AX_SIMD_CLONES
void select_chunk(int64_t n, const uint32_t* __restrict draws, uint32_t threshold, float keep_scale,
                  const float* __restrict x, float* __restrict y, uint8_t* __restrict mask) {
    for (int64_t j = 0; j < n; ++j) {
        const uint32_t keep = draws[j] >= threshold ? 1u : 0u;
        mask[j] = static_cast<uint8_t>(keep);
        y[j] = select_bits(keep, x[j] * keep_scale);
    }
}

}  // namespace

// mask[i] = draw >= threshold(p); y = x * mask / (1 - p).
void dropout_forward_range(int64_t begin, int64_t end, const float* x, float p, uint64_t seed, uint64_t offset,
                           float* y, uint8_t* mask) {
    static const DrawFn draws_fn = pick_draws();
    const uint32_t threshold = dropout_threshold(p);
    const float keep_scale = 1.0f / (1.0f - p);
    const PhiloxKeys keys(seed);
    alignas(64) uint32_t draws[kChunk];
    for (int64_t i = begin; i < end; i += kChunk) {
        const int64_t n = end - i < kChunk ? end - i : kChunk;
        draws_fn(keys, offset + static_cast<uint64_t>(i), n, draws);
        select_chunk(n, draws, threshold, keep_scale, x + i, y + i, mask + i);
    }
}

// dx = dy * mask / (1 - p); any nonzero mask byte keeps (the op layer checks for 0/1 unless told not to).
AX_SIMD_CLONES
void dropout_backward_range(int64_t begin, int64_t end, const float* __restrict dy, const uint8_t* __restrict mask,
                            float p, float* __restrict dx) {
    const float keep_scale = 1.0f / (1.0f - p);
    for (int64_t i = begin; i < end; ++i) dx[i] = select_bits(mask[i] != 0, dy[i] * keep_scale);
}

// Both split over the CPU pool (parallel.h) in chunks of whole kChunk draw blocks: each element's draw depends only
// on its counter, so any split gives the same bits.
void dropout_forward(int64_t n, const float* x, float p, uint64_t seed, uint64_t offset, float* y, uint8_t* mask) {
    parallel_for(0, n, kElementwiseGrain, [&](int64_t lo, int64_t hi) {
        dropout_forward_range(lo, hi, x, p, seed, offset, y, mask);
    });
}

// dx = dy * mask / (1 - p), then (relu_y given) through the ReLU below, as relu_backward: 0 where relu_y <= 0.
void dropout_backward(int64_t n, const float* dy, const uint8_t* mask, float p, const float* relu_y, float* dx) {
    parallel_for(0, n, kElementwiseGrain, [&](int64_t lo, int64_t hi) {
        dropout_backward_range(lo, hi, dy, mask, p, dx);
        if (relu_y) relu_mask_range(lo, hi, relu_y, dx);
    });
}

}  // namespace cpu
}  // namespace ax
