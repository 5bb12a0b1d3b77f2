// CUDA backend of SGD with momentum and weight decay, in place, elementwise (grid-stride, float4 when
// aligned), one tensor per launch or many (sgd_update_multi). Rounded intrinsics keep nvcc from contracting
// into FMAs, so the result equals the CPU's left-to-right float evaluation bit for bit.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// v = momentum*v - (weight_decay*lr)*w - lr*dw; w = w + v.
__device__ __forceinline__ void sgd1(float& w, float g, float& v, float lr, float momentum, float wd_lr) {
    v = __fsub_rn(__fsub_rn(__fmul_rn(momentum, v), __fmul_rn(wd_lr, w)), __fmul_rn(lr, g));
    w = __fadd_rn(w, v);
}

// Thread tid of nt updates elements tid, tid + nt, ... of one tensor: float4 while vec (16-byte aligned), then
// the tail one by one.
__device__ __forceinline__ void sgd_span(int64_t n, bool vec, float* __restrict__ w, const float* __restrict__ dw,
                                         float* __restrict__ v, float lr, float momentum, float wd_lr, int64_t tid,
                                         int64_t nt) {
    const int64_t n4 = vec ? n / 4 : 0;
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

__global__ void __launch_bounds__(kThreads1d)
    sgd_update_kernel(int64_t n, bool vec, float* __restrict__ w, const float* __restrict__ dw, float* __restrict__ v,
                      float lr, float momentum, float wd_lr) {
    sgd_span(n, vec, w, dw, v, lr, momentum, wd_lr, global_thread_id(), global_thread_count());
}

// Multi-tensor SGD: up to kSgdMaxSegs tensors per launch, passed by value (kernel parameters, no table to
// upload). Segment i owns blocks [block0[i], block0[i + 1]) and strides over its tensor with them, float4 when
// its three pointers are aligned; each element gets sgd1 exactly as sgd_update_kernel gives it.
constexpr int kSgdMaxSegs = 40;
struct SgdTable {
    float* w[kSgdMaxSegs];
    const float* dw[kSgdMaxSegs];
    float* v[kSgdMaxSegs];
    int64_t n[kSgdMaxSegs];
    float wd_lr[kSgdMaxSegs];
    float wd[kSgdMaxSegs];
    bool vec[kSgdMaxSegs];
    int block0[kSgdMaxSegs + 1];
    int count;
    // Non-null: the learning rate is read here when the kernel runs (a CUDA graph replays one launch with the
    // step's rate), and wd_lr is formed from it as the host forms it from lr.
    const float* lr_dev;
};

__global__ void __launch_bounds__(kThreads1d) sgd_update_multi_kernel(const SgdTable t, float lr, float momentum) {
    const int b = blockIdx.x;
    int lo = 0, hi = t.count - 1;  // the segment whose block range holds b
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (t.block0[mid] <= b) lo = mid;
        else hi = mid - 1;
    }
    const int i = lo;
    float* __restrict__ w = t.w[i];
    const float* __restrict__ dw = t.dw[i];
    float* __restrict__ v = t.v[i];
    const int64_t n = t.n[i];
    float wd_lr = t.wd_lr[i];
    if (t.lr_dev) {
        lr = *t.lr_dev;
        wd_lr = __fmul_rn(t.wd[i], lr);
    }
    const int64_t tid = static_cast<int64_t>(b - t.block0[i]) * blockDim.x + threadIdx.x;
    const int64_t nt = static_cast<int64_t>(t.block0[i + 1] - t.block0[i]) * blockDim.x;
    sgd_span(n, t.vec[i], w, dw, v, lr, momentum, wd_lr, tid, nt);
}

}  // namespace

namespace {
void sgd_multi_launch(int count, const SgdSegment* segs, float lr, const float* lr_dev, float momentum, void* stream) {
    for (int first = 0; first < count; first += kSgdMaxSegs) {
        SgdTable t{};
        t.count = count - first < kSgdMaxSegs ? count - first : kSgdMaxSegs;
        int64_t blocks = 0;
        for (int i = 0; i < t.count; ++i) {
            const SgdSegment& g = segs[first + i];
            t.w[i] = g.w;
            t.dw[i] = g.dw;
            t.v[i] = g.v;
            t.n[i] = g.n;
            t.wd_lr[i] = g.weight_decay * lr;  // rounded first, as sgd_update and the CPU's left-to-right product
            t.wd[i] = g.weight_decay;
            t.vec[i] = aligned16(g.w) && aligned16(g.dw) && aligned16(g.v);
            t.block0[i] = static_cast<int>(blocks);
            blocks += grid_1d(t.vec[i] ? (g.n + 3) / 4 : g.n);  // at least one block, even for n == 0
        }
        t.block0[t.count] = static_cast<int>(blocks);
        t.lr_dev = lr_dev;
        sgd_update_multi_kernel<<<static_cast<unsigned>(blocks), kThreads1d, 0, as_stream(stream)>>>(t, lr, momentum);
        AX_LAUNCH_CHECK("sgd_update_multi");
    }
}
}  // namespace

void sgd_update_multi(int count, const SgdSegment* segs, float lr, float momentum, void* stream) {
    sgd_multi_launch(count, segs, lr, nullptr, momentum, stream);
}

void sgd_update_multi_device_lr(int count, const SgdSegment* segs, const float* lr_dev, float momentum, void* stream) {
    sgd_multi_launch(count, segs, 0.f, lr_dev, momentum, stream);
}

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
