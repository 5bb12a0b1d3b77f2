// CPU backend of the relu family: branch-free elementwise loops over [begin, end), cloned per vector ISA
// (simd.h). Both loads are unconditional, so a select is a compare and a blend, never a branch.
#include "ops.h"
#include "simd.h"

namespace ax {
namespace cpu {

// y = max(0, x); written as "x < 0 ? 0 : x" so a NaN input stays visible downstream.
AX_SIMD_CLONES
void relu_forward_range(int64_t begin, int64_t end, const float* __restrict x, float* __restrict y) {
    for (int64_t i = begin; i < end; ++i) {
        const float v = x[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

// dx = dy where the forward output was positive, else 0 (a NaN y gives 0, as "y > 0" is false).
AX_SIMD_CLONES
void relu_backward_range(int64_t begin, int64_t end, const float* __restrict dy, const float* __restrict y,
                         float* __restrict dx) {
    for (int64_t i = begin; i < end; ++i) {
        const float g = dy[i];
        dx[i] = y[i] > 0.0f ? g : 0.0f;
    }
}

AX_SIMD_CLONES
void relu_mask_range(int64_t begin, int64_t end, const float* __restrict y, float* __restrict dx) {
    for (int64_t i = begin; i < end; ++i) {
        const float g = dx[i];
        dx[i] = y[i] > 0.0f ? g : 0.0f;
    }
}

// Split over the CPU pool (parallel.h); no element depends on another, so any split gives the same bits.
void relu_forward(int64_t n, const float* x, float* y) {
    parallel_for(0, n, kElementwiseGrain, [&](int64_t lo, int64_t hi) { relu_forward_range(lo, hi, x, y); });
}

void relu_backward(int64_t n, const float* dy, const float* y, float* dx) {
    parallel_for(0, n, kElementwiseGrain, [&](int64_t lo, int64_t hi) { relu_backward_range(lo, hi, dy, y, dx); });
}

}  // namespace cpu
}  // namespace ax
