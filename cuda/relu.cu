// CUDA backend of the relu family: grid-stride elementwise kernels, float4 when every pointer is 16-byte
// aligned (then a scalar tail), scalar otherwise.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

__device__ __forceinline__ float relu1(float v) { return v > 0.0f ? v : 0.0f; }
__device__ __forceinline__ float relu_grad1(float g, float y) { return y > 0.0f ? g : 0.0f; }

// y = max(x, 0); layout-free (flat), float4 body + scalar tail.
__global__ void __launch_bounds__(kThreads1d)
    relu_forward_kernel(int64_t n, bool vec, const float* __restrict__ x, float* __restrict__ y) {
    const int64_t n4 = vec ? n / 4 : 0, tid = global_thread_id(), nt = global_thread_count();
    for (int64_t i = tid; i < n4; i += nt) {
        float4 v = reinterpret_cast<const float4*>(x)[i];
        v.x = relu1(v.x); v.y = relu1(v.y); v.z = relu1(v.z); v.w = relu1(v.w);
        reinterpret_cast<float4*>(y)[i] = v;
    }
    for (int64_t i = n4 * 4 + tid; i < n; i += nt) y[i] = relu1(x[i]);
}

// dx = dy where y > 0, else 0; flat, float4 body + scalar tail.
__global__ void __launch_bounds__(kThreads1d) relu_backward_kernel(int64_t n, bool vec, const float* __restrict__ dy,
                                                                   const float* __restrict__ y,
                                                                   float* __restrict__ dx) {
    const int64_t n4 = vec ? n / 4 : 0, tid = global_thread_id(), nt = global_thread_count();
    for (int64_t i = tid; i < n4; i += nt) {
        const float4 g = reinterpret_cast<const float4*>(dy)[i];
        const float4 v = reinterpret_cast<const float4*>(y)[i];
        float4 o;
        o.x = relu_grad1(g.x, v.x); o.y = relu_grad1(g.y, v.y); o.z = relu_grad1(g.z, v.z); o.w = relu_grad1(g.w, v.w);
        reinterpret_cast<float4*>(dx)[i] = o;
    }
    for (int64_t i = n4 * 4 + tid; i < n; i += nt) dx[i] = relu_grad1(dy[i], y[i]);
}

}  // namespace

void relu_forward(int64_t n, const float* x, float* y, void* stream) {
    if (n <= 0) return;
    const bool vec = aligned16(x) && aligned16(y);
    relu_forward_kernel<<<grid_1d(vec ? (n + 3) / 4 : n), kThreads1d, 0, as_stream(stream)>>>(n, vec, x, y);
    AX_LAUNCH_CHECK("relu_forward");
}

void relu_backward(int64_t n, const float* dy, const float* y, float* dx, void* stream) {
    if (n <= 0) return;
    const bool vec = aligned16(dy) && aligned16(y) && aligned16(dx);
    relu_backward_kernel<<<grid_1d(vec ? (n + 3) / 4 : n), kThreads1d, 0, as_stream(stream)>>>(n, vec, dy, y, dx);
    AX_LAUNCH_CHECK("relu_backward");
}

}  // namespace cuda
}  // namespace ax
