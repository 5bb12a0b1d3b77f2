// CPU backend of overlapping max-pooling: one (n, c) plane at a time, output pixels in row-major order, each
// window scanned row-major over its in-bounds part (padding is -inf, so it never wins).
#include <algorithm>
#include <cstring>
#include <string>

#include "ops.h"
#include "simd.h"

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

namespace {

[[noreturn]] void bad_argmax(int32_t a, int pp, int q) {
    throw ValueError("maxpool_backward: argument 'argmax' holds " + std::to_string(a) + " at output (" +
                     std::to_string(pp) + ", " + std::to_string(q) +
                     "), outside that output's window; pass the argmax from maxpool_forward");
}

}  // namespace

// Planes [begin, end) of dx: each plane zeroed, then each output's dy added to its argmax element, outputs taken
// in row-major (p, q) order: for every input element that is the same sum, in the same order, as gathering over
// the windows that chose it. A plane at a time, so its dx is zeroed and scattered into while it sits in L1
// instead of a whole-tensor memset read back from memory. The window check needs no division: an argmax is in
// its window exactly when, for one in-bounds row h of the window, a - h*W falls in the window's in-bounds
// columns (W > 0 makes that row unique). An argmax outside its own window (not from maxpool_forward with these
// settings) raises instead of writing out of bounds.
void maxpool_backward_planes(const PoolParams& p, int64_t begin, int64_t end, const float* dy, const int32_t* argmax,
                             float* dx) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    for (int64_t plane = begin; plane < end; ++plane) {
        const float* dyp = dy + plane * PQ;
        const int32_t* ap = argmax + plane * PQ;
        float* dxp = dx + plane * HW;
        std::memset(dxp, 0, sizeof(float) * static_cast<size_t>(HW));
        for (int pp = 0; pp < p.P; ++pp) {
            const int h0 = pp * p.stride_h - p.pad_h;
            const int hs = std::max(h0, 0), he = std::min(h0 + p.window_h, p.H);
            for (int q = 0; q < p.Q; ++q) {
                const int w0 = q * p.stride_w - p.pad_w;
                const int ws = std::max(w0, 0), we = std::min(w0 + p.window_w, p.W);
                const int32_t a = ap[pp * p.Q + q];
                bool inside = false;
                for (int h = hs; h < he; ++h) {
                    const int64_t col = static_cast<int64_t>(a) - static_cast<int64_t>(h) * p.W;
                    inside |= col >= ws && col < we;
                }
                if (!inside) bad_argmax(a, pp, q);
                dxp[a] += dyp[pp * p.Q + q];
            }
        }
    }
}

void maxpool_backward(const PoolParams& p, const float* dy, const int32_t* argmax, float* dx) {
    maxpool_backward_planes(p, 0, static_cast<int64_t>(p.N) * p.C, dy, argmax, dx);
}

}  // namespace cpu
}  // namespace ax
