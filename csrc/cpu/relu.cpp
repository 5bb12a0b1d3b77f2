// CPU backend of the relu family: flat elementwise loops over the contiguous buffer (they vectorize).
#include "ops.h"

namespace ax {
namespace cpu {

// y = max(0, x); written as "x < 0 ? 0 : x" so a NaN input stays visible downstream.
void relu_forward(int64_t n, const float* __restrict x, float* __restrict y) {
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] < 0.0f ? 0.0f : x[i];
}

// dx = dy where the forward output was positive, else 0.
void relu_backward(int64_t n, const float* __restrict dy, const float* __restrict y, float* __restrict dx) {
    for (int64_t i = 0; i < n; ++i) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

}  // namespace cpu
}  // namespace ax
