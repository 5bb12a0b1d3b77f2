// CPU backend of overlapping max-pooling: one (n, c) plane at a time, output pixels in row-major order, each
// window scanned row-major over its in-bounds part (padding is -inf, so it never wins).
#include <algorithm>
#include <cstring>
#include <string>

#include "ops.h"

namespace ax {
namespace cpu {

// y = max over the window; argmax = h*W+w of the first maximum in row-major window order.
void maxpool_forward(const PoolParams& p, const float* x, float* y, int32_t* argmax) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    for (int64_t plane = 0; plane < static_cast<int64_t>(p.N) * p.C; ++plane) {
        const float* xp = x + plane * HW;
        float* yp = y + plane * PQ;
        int32_t* ap = argmax + plane * PQ;
        for (int pp = 0; pp < p.P; ++pp) {
            const int h0 = pp * p.stride_h - p.pad_h;
            const int hs = std::max(h0, 0), he = std::min(h0 + p.window_h, p.H);
            for (int q = 0; q < p.Q; ++q) {
                const int w0 = q * p.stride_w - p.pad_w;
                const int ws = std::max(w0, 0), we = std::min(w0 + p.window_w, p.W);
                int32_t best_i = hs * p.W + ws;
                float best = xp[best_i];
                for (int h = hs; h < he; ++h)
                    for (int w = ws; w < we; ++w) {
                        const float v = xp[h * p.W + w];
                        if (v > best) {
                            best = v;
                            best_i = h * p.W + w;
                        }
                    }
                yp[pp * p.Q + q] = best;
                ap[pp * p.Q + q] = best_i;
            }
        }
    }
}

// dx = 0, then each output's dy added to its argmax element, outputs taken in row-major (p, q) order: for every
// input element that is the same sum, in the same order, as gathering over the windows that chose it.
// An argmax outside its own window (not from maxpool_forward with these settings) raises instead of
// writing out of bounds.
void maxpool_backward(const PoolParams& p, const float* dy, const int32_t* argmax, const float* relu_y, float* dx) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    std::memset(dx, 0, sizeof(float) * static_cast<size_t>(HW * p.N * p.C));
    for (int64_t plane = 0; plane < static_cast<int64_t>(p.N) * p.C; ++plane) {
        const float* dyp = dy + plane * PQ;
        const int32_t* ap = argmax + plane * PQ;
        float* dxp = dx + plane * HW;
        for (int pp = 0; pp < p.P; ++pp)
            for (int q = 0; q < p.Q; ++q) {
                const int32_t a = ap[pp * p.Q + q];
                const int h = a >= 0 ? a / p.W : -1, w = a >= 0 ? a % p.W : -1;
                const int h0 = pp * p.stride_h - p.pad_h, w0 = q * p.stride_w - p.pad_w;
                if (a < 0 || a >= HW || h < h0 || h >= h0 + p.window_h || w < w0 || w >= w0 + p.window_w)
                    throw ValueError("maxpool_backward: argument 'argmax' holds " + std::to_string(a) +
                                     " at output (" + std::to_string(pp) + ", " + std::to_string(q) +
                                     "), outside that output's window; pass the argmax from maxpool_forward");
                dxp[a] += dyp[pp * p.Q + q];
            }
    }
    if (relu_y)  // through the ReLU below, as relu_backward
        for (int64_t i = 0; i < HW * p.N * p.C; ++i) dx[i] = relu_y[i] > 0.0f ? dx[i] : 0.0f;
}

}  // namespace cpu
}  // namespace ax
