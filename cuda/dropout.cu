// CUDA backend of inverted dropout: one thread per element (grid-stride); element i keeps iff
// philox_u32(seed, offset + i) >= threshold, so the mask is independent of the launch shape and equal to
// the CPU backend's. y = x * scale with scale = 1.0f / (1.0f - p) rounded once on the host, like the CPU.
#include "common.cuh"
#include "philox.h"

namespace ax {
namespace cuda {
namespace {

__global__ void __launch_bounds__(kThreads1d)
    dropout_forward_kernel(int64_t n, const float* __restrict__ x, uint64_t seed, const uint64_t* __restrict__ seed_dev,
                           uint64_t offset, uint32_t threshold, float scale, float* __restrict__ y,
                           uint8_t* __restrict__ mask) {
    if (seed_dev) seed = *seed_dev;  // a CUDA graph's launch: the step's seed, read when it runs
    for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
        const bool keep = philox_u32(seed, offset + static_cast<uint64_t>(i)) >= threshold;
        y[i] = keep ? __fmul_rn(x[i], scale) : 0.0f;
        mask[i] = keep ? 1 : 0;
    }
}

__global__ void __launch_bounds__(kThreads1d) dropout_backward_kernel(int64_t n, const float* __restrict__ dy,
                                                                      const uint8_t* __restrict__ mask, float scale,
                                                                      const float* __restrict__ relu_y,
                                                                      float* __restrict__ dx) {
    for (int64_t i = global_thread_id(); i < n; i += global_thread_count())
        dx[i] = relu_grad_epilogue(mask[i] ? __fmul_rn(dy[i], scale) : 0.0f, relu_y, i);
}

}  // namespace

namespace {
void dropout_forward_launch(int64_t n, const float* x, float p, uint64_t seed, const uint64_t* seed_dev, uint64_t offset,
                            float* y, uint8_t* mask, void* stream) {
    if (n <= 0) return;
    const float scale = 1.0f / (1.0f - p);
    dropout_forward_kernel<<<grid_1d(n), kThreads1d, 0, as_stream(stream)>>>(n, x, seed, seed_dev, offset,
                                                                             dropout_threshold(p), scale, y, mask);
    AX_LAUNCH_CHECK("dropout_forward");
}
}  // namespace

void dropout_forward(int64_t n, const float* x, float p, uint64_t seed, uint64_t offset, float* y, uint8_t* mask,
                     void* stream) {
    dropout_forward_launch(n, x, p, seed, nullptr, offset, y, mask, stream);
}

void dropout_forward_device_seed(int64_t n, const float* x, float p, const uint64_t* seed_dev, uint64_t offset, float* y,
                                 uint8_t* mask, void* stream) {
    dropout_forward_launch(n, x, p, 0, seed_dev, offset, y, mask, stream);
}

void dropout_backward(int64_t n, const float* dy, const uint8_t* mask, float p, const float* relu_y, float* dx,
                      void* stream) {
    if (n <= 0) return;
    const float scale = 1.0f / (1.0f - p);
    dropout_backward_kernel<<<grid_1d(n), kThreads1d, 0, as_stream(stream)>>>(n, dy, mask, scale, relu_y, dx);
    AX_LAUNCH_CHECK("dropout_backward");
}

}  // namespace cuda
}  // namespace ax
