// Vectorisation helpers of the CPU backend's memory-bound kernels.
//
// An x86-64 build targets SSE2 only. The elementwise kernels are written as plain loops over [begin, end) ranges
// (each load unconditional, each select a compare and a blend, so the vectoriser takes them) and cloned for
// AVX-512 and AVX2 with target_clones: the dynamic loader picks the widest clone the CPU runs, once. Each element's
// formula is the same in every clone and the files holding these kernels are compiled with -ffp-contract=off (no
// multiply-add is fused, AVX-512 has FMA), so every clone gives the same bits as the scalar loop. Ranges keep
// each kernel splittable across threads later without changing a bit: no element depends on another.
#pragma once
#include <cstdint>

#include "ops.h"
#include "parallel.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(AX_NO_CLONES)
#define AX_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define AX_SIMD_CLONES
#endif

namespace ax {
namespace cpu {

// The memory-bound kernels over element ranges [begin, end) of flat buffers (the whole op is {0, n}). No element
// depends on another, so any split of the range across threads gives the same bits.
// Elements per chunk when an elementwise op is split over the CPU pool (parallel.h): 256 KB of floats, enough that a
// chunk's work dwarfs waking a thread.
constexpr int64_t kElementwiseGrain = int64_t{1} << 16;

void relu_forward_range(int64_t begin, int64_t end, const float* x, float* y);
void relu_backward_range(int64_t begin, int64_t end, const float* dy, const float* y, float* dx);
// dx = dx where y > 0, else 0, in place: a gradient passed back through the ReLU whose output is y (the fused forms).
void relu_mask_range(int64_t begin, int64_t end, const float* y, float* dx);
void dropout_forward_range(int64_t begin, int64_t end, const float* x, float p, uint64_t seed, uint64_t offset,
                           float* y, uint8_t* mask);
void dropout_backward_range(int64_t begin, int64_t end, const float* dy, const uint8_t* mask, float p, float* dx);
void sgd_update_range(int64_t begin, int64_t end, float* w, const float* dw, float* v, float lr, float momentum,
                      float weight_decay);
void add_range(int64_t begin, int64_t end, const float* a, const float* b, float* y);
// Max-pool backward over planes (n, c) in [begin, end) of N*C: each plane of dx written in full.
void maxpool_backward_planes(const PoolParams& p, int64_t begin, int64_t end, const float* dy, const int32_t* argmax,
                             float* dx);
// Max-pool forward over planes [begin, end) of N*C.
void maxpool_forward_planes(const PoolParams& p, int64_t begin, int64_t end, const float* x, float* y,
                            int32_t* argmax);

}  // namespace cpu
}  // namespace ax
