// CPU backend of LRN across channels: per image, plane-at-a-time loops (channel window outer, the H*W plane
// inner and contiguous, so they vectorize); each window sum runs over j = c-n/2 .. c+n/2 in increasing j.
// Threads (parallel.h) split the (n, c) planes (forward) or the images (backward); every element is computed by
// one thread in the same order whatever the split, so the bits do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "parallel.h"
#include "simd.h"

namespace ax {
namespace cpu {

namespace {

// dst[i] = x[i] * scale[i]^-beta; beta = 0.75 (the paper's) as x / sqrt(s * sqrt(s)), which vectorizes.
void apply_power(int64_t n, const float* __restrict x, const float* __restrict scale, float beta,
                 float* __restrict dst) {
    if (beta == 0.75f) {
        for (int64_t i = 0; i < n; ++i) dst[i] = x[i] / std::sqrt(scale[i] * std::sqrt(scale[i]));
    } else {
        for (int64_t i = 0; i < n; ++i) dst[i] = x[i] * std::pow(scale[i], -beta);
    }
}

// acc (HW) = sum over channels j in [lo, hi] of src[j] (each plane HW long), added in increasing j.
void window_sum(const float* src, int lo, int hi, int64_t HW, bool square, float* __restrict acc) {
    for (int64_t i = 0; i < HW; ++i) acc[i] = 0.0f;
    for (int j = lo; j <= hi; ++j) {
        const float* __restrict s = src + j * HW;
        if (square)
            for (int64_t i = 0; i < HW; ++i) acc[i] += s[i] * s[i];
        else
            for (int64_t i = 0; i < HW; ++i) acc[i] += s[i];
    }
}

}  // namespace

namespace {

// Planes [begin, end) of the N*C (n, c) planes.
void lrn_forward_planes(const LrnParams& p, int64_t begin, int64_t end, const float* x, float* y, float* scale) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    const int half = p.size / 2;
    for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / p.C;
        const int c = static_cast<int>(plane % p.C);
        const float* xn = x + n * p.C * HW;
        const int64_t off = plane * HW;
        float* __restrict sc = scale + off;
        window_sum(xn, std::max(0, c - half), std::min(p.C - 1, c + half), HW, true, sc);
        for (int64_t i = 0; i < HW; ++i) sc[i] = p.k + p.alpha * sc[i];
        apply_power(HW, x + off, sc, p.beta, y + off);
    }
}

// A chunk of about 64K window-sum terms: worth a thread's wake-up.
int64_t plane_grain(const LrnParams& p) {
    return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, static_cast<int64_t>(p.H) * p.W * p.size));
}

}  // namespace

// scale = k + alpha * sum_{window} x^2; y = x * scale^-beta.
void lrn_forward(const LrnParams& p, const float* x, float* y, float* scale) {
    parallel_for(0, static_cast<int64_t>(p.N) * p.C, plane_grain(p),
                 [&](int64_t lo, int64_t hi) { lrn_forward_planes(p, lo, hi, x, y, scale); });
}

// dx_i = dy_i * scale_i^-beta - 2*alpha*beta * x_i * sum_{c in window(i)} dy_c * y_c / scale_c
// (the window is symmetric, so the channels whose window holds i are exactly i's own window).
void lrn_backward(const LrnParams& p, const float* dy, const float* x, const float* y, const float* scale,
                  float* dx) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    const int half = p.size / 2;
    const float coef = 2.0f * p.alpha * p.beta;
    // Images split over the pool (an image's channel windows need t over all its channels). Scratch reused
    // across calls, per thread (the pool's threads and the towers' workers run LRN at once), so a training step
    // does not fault in fresh pages for it every time. Every element is written before it is read.
    parallel_for(0, p.N, 1, [&](int64_t n_lo, int64_t n_hi) {
        thread_local std::vector<float> t, acc;
        if (t.size() < static_cast<size_t>(p.C) * HW) t.resize(static_cast<size_t>(p.C) * HW);
        if (acc.size() < static_cast<size_t>(HW)) acc.resize(static_cast<size_t>(HW));
        for (int64_t n = n_lo; n < n_hi; ++n) {
            const int64_t base = static_cast<int64_t>(n) * p.C * HW;
            {
                const float* __restrict dyn = dy + base;
                const float* __restrict yn = y + base;
                const float* __restrict sn = scale + base;
                float* __restrict tn = t.data();
                for (int64_t i = 0; i < p.C * HW; ++i) tn[i] = dyn[i] * yn[i] / sn[i];
            }
            for (int c = 0; c < p.C; ++c) {
                const int64_t off = base + static_cast<int64_t>(c) * HW;
                window_sum(t.data(), std::max(0, c - half), std::min(p.C - 1, c + half), HW, false, acc.data());
                float* __restrict dxc = dx + off;
                apply_power(HW, dy + off, scale + off, p.beta, dxc);
                const float* __restrict xc = x + off;
                const float* __restrict ac = acc.data();
                for (int64_t i = 0; i < HW; ++i) dxc[i] -= coef * xc[i] * ac[i];
                if (p.relu)  // through the ReLU that made x, as relu_backward(dx, x)
                    for (int64_t i = 0; i < HW; ++i) dxc[i] = xc[i] > 0.0f ? dxc[i] : 0.0f;
            }
        }
    });
}

// The two ops in turn, an image at a time per thread (its LRN output is still in cache for the pool): the same
// bits as the two ops apart, as the CUDA backend's fused kernel gives the same bits as its own two kernels.
void lrn_maxpool_forward(const LrnParams& lp, const PoolParams& pp, const float* x, float* y, float* scale,
                         float* pool_y, int32_t* argmax) {
    parallel_for(0, lp.N, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t n = lo; n < hi; ++n) {
            lrn_forward_planes(lp, n * lp.C, (n + 1) * lp.C, x, y, scale);
            maxpool_forward_planes(pp, n * pp.C, (n + 1) * pp.C, y, pool_y, argmax);
        }
    });
}

}  // namespace cpu
}  // namespace ax
