// CPU backend of overlapping max-pooling: one (n, c) plane at a time, output pixels in row-major order, each
// window scanned row-major over its in-bounds part (padding is -inf, so it never wins).
#include <algorithm>
#include <cstring>
#include <string>

#include "ops.h"
#include "simd.h"

namespace ax {
namespace cpu {

// y = max over the window; argmax = h*W+w of the first maximum in row-major window order. Planes [begin, end).
void maxpool_forward_planes(const PoolParams& p, int64_t begin, int64_t end, const float* x, float* y,
                            int32_t* argmax) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    for (int64_t plane = begin; plane < end; ++plane) {
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

// Planes split over the CPU pool (each output plane is written by one chunk alone).
void maxpool_forward(const PoolParams& p, const float* x, float* y, int32_t* argmax) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    parallel_for(0, static_cast<int64_t>(p.N) * p.C, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, HW)),
                 [&](int64_t lo, int64_t hi) { maxpool_forward_planes(p, lo, hi, x, y, argmax); });
}

namespace {

[[noreturn]] void bad_argmax(int32_t a, int pp, int q) {
    throw ValueError("maxpool_backward: argument 'argmax' holds " + std::to_string(a) + " at output (" +
                     std::to_string(pp) + ", " + std::to_string(q) +
                     "), outside that output's window; pass the argmax from maxpool_forward");
}

}  // namespace

// Planes [begin, end) of dx: zeroed, then each output's dy added to its argmax element, outputs taken in
// row-major (p, q) order: for every input element that is the same sum, in the same order, as gathering over the
// windows that chose it. An argmax outside its own window (not from maxpool_forward with these settings) raises
// instead of writing out of bounds; the check is two unsigned compares, no division and no branch but the throw.
void maxpool_backward_planes(const PoolParams& p, int64_t begin, int64_t end, const float* dy, const int32_t* argmax,
                             float* dx) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    // h = a / W without a division: a (< 2^31) times 1/W in double is within one of the quotient, and the two
    // corrections make it exact (floor, so a negative a gets a negative row, which no window holds).
    const double inv_w = 1.0 / p.W;
    std::memset(dx + begin * HW, 0, sizeof(float) * static_cast<size_t>((end - begin) * HW));
    for (int64_t plane = begin; plane < end; ++plane) {
        const float* dyp = dy + plane * PQ;
        const int32_t* ap = argmax + plane * PQ;
        float* dxp = dx + plane * HW;
        for (int pp = 0; pp < p.P; ++pp) {
            const int h0 = pp * p.stride_h - p.pad_h;
            const int hs = std::max(h0, 0), he = std::min(h0 + p.window_h, p.H);
            for (int q = 0; q < p.Q; ++q) {
                const int w0 = q * p.stride_w - p.pad_w;
                const int ws = std::max(w0, 0), we = std::min(w0 + p.window_w, p.W);
                const int64_t a = ap[pp * p.Q + q];
                int64_t h = static_cast<int64_t>(static_cast<double>(a) * inv_w);
                h -= h * p.W > a;
                h += (h + 1) * p.W <= a;
                const int64_t w = a - h * p.W;
                // In the window's clipped rows and columns (so also inside the plane), as unsigned compares.
                const bool inside = (static_cast<uint64_t>(h - hs) < static_cast<uint64_t>(he - hs)) &
                                    (static_cast<uint64_t>(w - ws) < static_cast<uint64_t>(we - ws));
                if (!inside) bad_argmax(static_cast<int32_t>(a), pp, q);
                dxp[a] += dyp[pp * p.Q + q];
            }
        }
    }
}

// Planes split over the CPU pool (each plane of dx is written by one chunk alone); then (relu_y given) through
// the ReLU below, as relu_backward: 0 where relu_y <= 0.
void maxpool_backward(const PoolParams& p, const float* dy, const int32_t* argmax, const float* relu_y, float* dx) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    parallel_for(0, static_cast<int64_t>(p.N) * p.C, std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, HW)),
                 [&](int64_t lo, int64_t hi) {
                     maxpool_backward_planes(p, lo, hi, dy, argmax, dx);
                     if (relu_y) relu_mask_range(lo * HW, hi * HW, relu_y, dx);
                 });
}

}  // namespace cpu
}  // namespace ax
