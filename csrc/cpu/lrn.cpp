// CPU backend of LRN across channels: per image, plane-at-a-time loops (channel window outer, the H*W plane
// inner and contiguous, so they vectorize); each window sum runs over j = c-n/2 .. c+n/2 in increasing j.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

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

// scale = k + alpha * sum_{window} x^2; y = x * scale^-beta.
void lrn_forward(const LrnParams& p, const float* x, float* y, float* scale) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    const int half = p.size / 2;
    for (int n = 0; n < p.N; ++n) {
        const float* xn = x + static_cast<int64_t>(n) * p.C * HW;
        for (int c = 0; c < p.C; ++c) {
            const int64_t off = (static_cast<int64_t>(n) * p.C + c) * HW;
            float* __restrict sc = scale + off;
            window_sum(xn, std::max(0, c - half), std::min(p.C - 1, c + half), HW, true, sc);
            for (int64_t i = 0; i < HW; ++i) sc[i] = p.k + p.alpha * sc[i];
            apply_power(HW, x + off, sc, p.beta, y + off);
        }
    }
}

// dx_i = dy_i * scale_i^-beta - 2*alpha*beta * x_i * sum_{c in window(i)} dy_c * y_c / scale_c
// (the window is symmetric, so the channels whose window holds i are exactly i's own window).
void lrn_backward(const LrnParams& p, const float* dy, const float* x, const float* y, const float* scale,
                  float* dx) {
    const int64_t HW = static_cast<int64_t>(p.H) * p.W;
    const int half = p.size / 2;
    const float coef = 2.0f * p.alpha * p.beta;
    // Scratch reused across calls (per thread: the towers' workers run LRN at once), so a training step does
    // not fault in fresh pages for it every time. Every element is written before it is read.
    thread_local std::vector<float> t, acc;
    if (t.size() < static_cast<size_t>(p.C) * HW) t.resize(static_cast<size_t>(p.C) * HW);
    if (acc.size() < static_cast<size_t>(HW)) acc.resize(static_cast<size_t>(HW));
    for (int n = 0; n < p.N; ++n) {
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
}

// The two ops in turn: the CUDA backend's fused kernel gives the same bits as its own two kernels.
void lrn_maxpool_forward(const LrnParams& lp, const PoolParams& pp, const float* x, float* y, float* scale,
                         float* pool_y, int32_t* argmax) {
    lrn_forward(lp, x, y, scale);
    maxpool_forward(pp, y, pool_y, argmax);
}

}  // namespace cpu
}  // namespace ax
