// CUDA backend of overlapping max-pooling (NCHW). Forward: one thread per output of every plane. Backward: planes
// (n, c) over blockIdx.y, input pixels over x threads. The backward is a gather, not a scatter: each input element
// visits the windows that contain it in row-major (p, q) order and adds dy where argmax points at it,
// the same additions in the same order as the CPU's scatter, with no atomics.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// y = max over the window, argmax = flat h*W+w of the first maximum in row-major window order
// (maxpool_window, common.cuh). One thread per output over all planes (grid-stride), so that small planes (pool5's
// 6x6) still fill every block; the plane and position come from two divisions per output (the op is memory-bound).
__global__ void __launch_bounds__(kThreads1d)
    maxpool_forward_kernel(int64_t total, PoolParams p, const float* __restrict__ x, float* __restrict__ y,
                           int32_t* __restrict__ argmax) {
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q;
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    for (int64_t i = global_thread_id(); i < total; i += global_thread_count()) {
        const int64_t pl = i / PQ;
        const int o = static_cast<int>(i - pl * PQ);
        const int op = o / p.Q, oq = o - op * p.Q;
        float best;
        int arg;
        maxpool_window(x + pl * HW, p, op, oq, best, arg);
        y[i] = best;
        argmax[i] = arg;
    }
}

// dx[h, w] = sum over windows (p, q) containing (h, w), row-major, of dy[p, q] where argmax[p, q] == h*W+w.
// Window p covers rows p*sh - ph .. p*sh - ph + wh - 1, so p runs from ceil((h+ph-wh+1)/sh) (or 0) to
// min(P-1, floor((h+ph)/sh)); likewise q. relu_y (nullable): also through the ReLU whose output x was.
__global__ void __launch_bounds__(kThreads1d)
    maxpool_backward_kernel(int64_t planes, PoolParams p, const float* __restrict__ dy,
                            const int32_t* __restrict__ argmax, const float* __restrict__ relu_y,
                            float* __restrict__ dx) {
    const int PQ = p.P * p.Q;
    const int HW = p.H * p.W;
    for (int64_t pl = blockIdx.y; pl < planes; pl += gridDim.y) {
        const float* dyp = dy + pl * PQ;
        const int32_t* ap = argmax + pl * PQ;
        for (int64_t i = global_thread_id(); i < HW; i += global_thread_count()) {
            const int h = static_cast<int>(i) / p.W, w = static_cast<int>(i) - h * p.W;
            const int hp = h + p.pad_h, wp = w + p.pad_w;
            const int p0 = hp < p.window_h ? 0 : (hp - p.window_h) / p.stride_h + 1;
            const int p1 = min(p.P - 1, hp / p.stride_h);
            const int q0 = wp < p.window_w ? 0 : (wp - p.window_w) / p.stride_w + 1;
            const int q1 = min(p.Q - 1, wp / p.stride_w);
            float acc = 0.0f;
            for (int op = p0; op <= p1; ++op)
                for (int oq = q0; oq <= q1; ++oq) {
                    const int o = op * p.Q + oq;
                    if (ap[o] == static_cast<int>(i)) acc = __fadd_rn(acc, dyp[o]);
                }
            dx[pl * HW + i] = relu_grad_epilogue(acc, relu_y, pl * HW + i);
        }
    }
}

}  // namespace

void maxpool_forward(const PoolParams& p, const float* x, float* y, int32_t* argmax, void* stream) {
    const int64_t planes = static_cast<int64_t>(p.N) * p.C, PQ = static_cast<int64_t>(p.P) * p.Q;
    if (planes * PQ == 0) return;
    require(static_cast<int64_t>(p.H) * p.W <= 0x7fffffff, "maxpool_forward", "image plane too large for int32 argmax");
    maxpool_forward_kernel<<<grid_1d(planes * PQ), kThreads1d, 0, as_stream(stream)>>>(planes * PQ, p, x, y, argmax);
    AX_LAUNCH_CHECK("maxpool_forward");
}

void maxpool_backward(const PoolParams& p, const float* dy, const int32_t* argmax, const float* relu_y, float* dx,
                      void* stream) {
    const int64_t planes = static_cast<int64_t>(p.N) * p.C, HW = static_cast<int64_t>(p.H) * p.W;
    if (planes * HW == 0) return;
    require(HW <= 0x7fffffff, "maxpool_backward", "image plane too large for int32 argmax");
    maxpool_backward_kernel<<<plane_grid(planes, HW), kThreads1d, 0, as_stream(stream)>>>(planes, p, dy, argmax,
                                                                                           relu_y, dx);
    AX_LAUNCH_CHECK("maxpool_backward");
}

}  // namespace cuda
}  // namespace ax
