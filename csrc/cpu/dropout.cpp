// CPU backend of the dropout family: flat loops; element i's draw is philox_u32(seed, offset + i), the same
// counter the CUDA kernels use, so both backends produce identical masks.
#include "ops.h"
#include "philox.h"

namespace ax {
namespace cpu {

// mask[i] = draw >= threshold(p); y = x * mask / (1 - p).
void dropout_forward(int64_t n, const float* __restrict x, float p, uint64_t seed, uint64_t offset,
                     float* __restrict y, uint8_t* __restrict mask) {
    const uint32_t threshold = dropout_threshold(p);
    const float keep_scale = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; ++i) {
        const bool keep = philox_u32(seed, offset + static_cast<uint64_t>(i)) >= threshold;
        mask[i] = keep ? 1 : 0;
        y[i] = keep ? x[i] * keep_scale : 0.0f;
    }
}

// dx = dy * mask / (1 - p).
void dropout_backward(int64_t n, const float* __restrict dy, const uint8_t* __restrict mask, float p,
                      const float* __restrict relu_y, float* __restrict dx) {
    const float keep_scale = 1.0f / (1.0f - p);
    for (int64_t i = 0; i < n; ++i) dx[i] = mask[i] ? dy[i] * keep_scale : 0.0f;
    if (relu_y)  // through the ReLU below, as relu_backward
        for (int64_t i = 0; i < n; ++i) dx[i] = relu_y[i] > 0.0f ? dx[i] : 0.0f;
}

}  // namespace cpu
}  // namespace ax
