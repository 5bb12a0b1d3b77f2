// CUDA backend of SGD with momentum and weight decay, in place, elementwise (grid-stride, float4 when
// aligned). Rounded intrinsics keep nvcc from contracting into FMAs, so the result equals the CPU's
// left-to-right float evaluation bit for bit.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// v = momentum*v - (weight_decay*lr)*w - lr*dw; w = w + v.
__device__ __forceinline__ void sgd1(float& w, float g, float& v, float lr, float momentum, float wd_lr) {
    v = __fsub_rn(__fsub_rn(__fmul_rn(momentum, v), __fmul_rn(wd_lr, w)), __fmul_rn(lr, g));
    w = __fadd_rn(w, v);
}

__global__ void __launch_bounds__(kThreads1d)
    sgd_update_kernel(int64_t n, bool vec, float* __restrict__ w, const float* __restrict__ dw, float* __restrict__ v,
                      float lr, float momentum, float wd_lr) {
    const int64_t n4 = vec ? n / 4 : 0, tid = global_thread_id(), nt = global_thread_count();
    for (int64_t i = tid; i < n4; i += nt) {
        float4 wv = reinterpret_cast<float4*>(w)[i];
        float4 vv = reinterpret_cast<float4*>(v)[i];
        const float4 g = reinterpret_cast<const float4*>(dw)[i];
        sgd1(wv.x, g.x, vv.x, lr, momentum, wd_lr);
        sgd1(wv.y, g.y, vv.y, lr, momentum, wd_lr);
        sgd1(wv.z, g.z, vv.z, lr, momentum, wd_lr);
        sgd1(wv.w, g.w, vv.w, lr, momentum, wd_lr);
        reinterpret_cast<float4*>(w)[i] = wv;
        reinterpret_cast<float4*>(v)[i] = vv;
    }
    for (int64_t i = n4 * 4 + tid; i < n; i += nt) {
        float wi = w[i], vi = v[i];
        sgd1(wi, dw[i], vi, lr, momentum, wd_lr);
        w[i] = wi;
        v[i] = vi;
    }
}

}  // namespace

void sgd_update(int64_t n, float* w, const float* dw, float* v, float lr, float momentum, float weight_decay,
                void* stream) {
    if (n <= 0) return;
    const float wd_lr = weight_decay * lr;  // the CPU's left-to-right weight_decay*lr*w rounds this product first
    const bool vec = aligned16(w) && aligned16(dw) && aligned16(v);
    sgd_update_kernel<<<grid_1d(vec ? (n + 3) / 4 : n), kThreads1d, 0, as_stream(stream)>>>(n, vec, w, dw, v, lr,
                                                                                           momentum, wd_lr);
    AX_LAUNCH_CHECK("sgd_update");
}

}  // namespace cuda
}  // namespace ax
