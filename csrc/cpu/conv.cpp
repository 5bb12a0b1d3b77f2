// CPU backend of the conv family: im2col per (image, group) + the shared GEMM (gemm_kernel.h).
// Layouts: x NCHW, w KCRS (C = C/groups per group), col (Cg*R*S, P*Q) row-major with row (c*R + r)*S + s.
#include <algorithm>
#include <cstring>
#include <memory>

#include "gemm_kernel.h"
#include "ops.h"

namespace ax {
namespace cpu {

namespace {

struct ConvDims {
    int Cg, Kg;        // channels per group (in, out)
    int64_t HW, PQ;    // input and output plane sizes
    int64_t CRS;       // rows of col = Cg*R*S (= columns of one group's weight matrix)
    bool direct;       // 1x1, stride 1, no padding: col is the input itself, no copy needed
};

ConvDims dims(const Conv2dParams& p) {
    ConvDims d;
    d.Cg = p.C / p.groups;
    d.Kg = p.K / p.groups;
    d.HW = static_cast<int64_t>(p.H) * p.W;
    d.PQ = static_cast<int64_t>(p.P) * p.Q;
    d.CRS = static_cast<int64_t>(d.Cg) * p.R * p.S;
    d.direct = p.R == 1 && p.S == 1 && p.stride_h == 1 && p.stride_w == 1 && p.pad_h == 0 && p.pad_w == 0;
    return d;
}

// Output columns q whose input column q*stride - pad + s lies in [0, W): [lo, hi).
// In 64 bits: -off + stride - 1 overflows an int for a stride near 2^31 (a valid stride: it just gives Q = 1).
inline void valid_range(int Q, int W, int stride, int pad, int s, int* lo, int* hi) {
    const int64_t off = static_cast<int64_t>(s) - pad;  // input column of q = 0
    const int64_t l = off >= 0 ? 0 : (-off + stride - 1) / stride;
    const int64_t h = (W - 1 - off) < 0 ? 0 : (W - 1 - off) / stride + 1;
    *lo = static_cast<int>(std::min<int64_t>(l, Q));
    *hi = static_cast<int>(std::max<int64_t>(*lo, std::min<int64_t>(h, Q)));
}

// col (Cg*R*S, P*Q) from one group of one image xg (Cg, H, W); padding reads as 0.
void im2col(const Conv2dParams& p, int Cg, const float* xg, float* col) {
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q;
    for (int c = 0; c < Cg; ++c) {
        const float* xc = xg + static_cast<int64_t>(c) * p.H * p.W;
        for (int r = 0; r < p.R; ++r)
            for (int s = 0; s < p.S; ++s) {
                float* __restrict dst = col + ((static_cast<int64_t>(c) * p.R + r) * p.S + s) * PQ;
                int qlo, qhi;
                valid_range(p.Q, p.W, p.stride_w, p.pad_w, s, &qlo, &qhi);
                for (int pp = 0; pp < p.P; ++pp) {
                    float* __restrict drow = dst + static_cast<int64_t>(pp) * p.Q;
                    const int h = pp * p.stride_h - p.pad_h + r;
                    if (h < 0 || h >= p.H) {
                        for (int q = 0; q < p.Q; ++q) drow[q] = 0.0f;
                        continue;
                    }
                    const float* __restrict src = xc + static_cast<int64_t>(h) * p.W;
                    const int off = s - p.pad_w;
                    for (int q = 0; q < qlo; ++q) drow[q] = 0.0f;
                    if (p.stride_w == 1)
                        for (int q = qlo; q < qhi; ++q) drow[q] = src[q + off];
                    else
                        for (int q = qlo; q < qhi; ++q) drow[q] = src[q * p.stride_w + off];
                    for (int q = qhi; q < p.Q; ++q) drow[q] = 0.0f;
                }
            }
    }
}

// dxg (Cg, H, W) += col scattered back (the adjoint of im2col), rows in increasing (c, r, s, p, q): a fixed
// order, so each input element sums its window contributions deterministically.
void col2im(const Conv2dParams& p, int Cg, const float* col, float* dxg) {
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q;
    for (int c = 0; c < Cg; ++c) {
        float* xc = dxg + static_cast<int64_t>(c) * p.H * p.W;
        for (int r = 0; r < p.R; ++r)
            for (int s = 0; s < p.S; ++s) {
                const float* __restrict srcrow = col + ((static_cast<int64_t>(c) * p.R + r) * p.S + s) * PQ;
                int qlo, qhi;
                valid_range(p.Q, p.W, p.stride_w, p.pad_w, s, &qlo, &qhi);
                for (int pp = 0; pp < p.P; ++pp) {
                    const int h = pp * p.stride_h - p.pad_h + r;
                    if (h < 0 || h >= p.H) continue;
                    const float* __restrict src = srcrow + static_cast<int64_t>(pp) * p.Q;
                    float* __restrict dst = xc + static_cast<int64_t>(h) * p.W;
                    const int off = s - p.pad_w;
                    if (p.stride_w == 1)
                        for (int q = qlo; q < qhi; ++q) dst[q + off] += src[q];
                    else
                        for (int q = qlo; q < qhi; ++q) dst[q * p.stride_w + off] += src[q];
                }
            }
    }
}

// Scratch memory for one op call, uninitialized (im2col and the GEMM write all of it before reading).
struct Buffer {
    std::unique_ptr<float[]> p;
    explicit Buffer(int64_t n) : p(n > 0 ? new float[static_cast<size_t>(n)] : nullptr) {}
    float* get() { return p.get(); }
};

}  // namespace

// Per image and group: y_g (Kg, PQ) = w_g (Kg, Cg*R*S) col (Cg*R*S, PQ), then + b, then (p.relu) relu_forward.
void conv2d_forward(const Conv2dParams& p, const float* x, const float* w, const float* b, float* y) {
    const ConvDims d = dims(p);
    Buffer col(d.direct ? 0 : d.CRS * d.PQ);
    for (int n = 0; n < p.N; ++n)
        for (int g = 0; g < p.groups; ++g) {
            const float* xg = x + (static_cast<int64_t>(n) * p.C + static_cast<int64_t>(g) * d.Cg) * d.HW;
            float* yg = y + (static_cast<int64_t>(n) * p.K + static_cast<int64_t>(g) * d.Kg) * d.PQ;
            const float* bmat = xg;
            if (!d.direct) {
                im2col(p, d.Cg, xg, col.get());
                bmat = col.get();
            }
            gemm(false, false, d.Kg, static_cast<int>(d.PQ), static_cast<int>(d.CRS), w + g * d.Kg * d.CRS, d.CRS,
                 bmat, d.PQ, yg, d.PQ, false);
            if (b)
                for (int k = 0; k < d.Kg; ++k) {
                    const float bias = b[g * d.Kg + k];
                    float* __restrict row = yg + k * d.PQ;
                    for (int64_t i = 0; i < d.PQ; ++i) row[i] += bias;
                }
            if (p.relu)  // in place, as relu_forward writes it
                for (int64_t i = 0; i < d.Kg * d.PQ; ++i) yg[i] = yg[i] < 0.0f ? 0.0f : yg[i];
        }
}

// Per image and group: col (Cg*R*S, PQ) = w_g^T dy_g, then col2im into a zeroed dx_g.
void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w, const float* relu_y, float* dx) {
    const ConvDims d = dims(p);
    Buffer col(d.direct ? 0 : d.CRS * d.PQ);
    for (int n = 0; n < p.N; ++n)
        for (int g = 0; g < p.groups; ++g) {
            const float* dyg = dy + (static_cast<int64_t>(n) * p.K + static_cast<int64_t>(g) * d.Kg) * d.PQ;
            float* dxg = dx + (static_cast<int64_t>(n) * p.C + static_cast<int64_t>(g) * d.Cg) * d.HW;
            const float* wg = w + g * d.Kg * d.CRS;
            if (d.direct) {
                gemm(true, false, static_cast<int>(d.CRS), static_cast<int>(d.PQ), d.Kg, wg, d.CRS, dyg, d.PQ, dxg,
                     d.PQ, false);
                continue;
            }
            gemm(true, false, static_cast<int>(d.CRS), static_cast<int>(d.PQ), d.Kg, wg, d.CRS, dyg, d.PQ, col.get(),
                 d.PQ, false);
            std::memset(dxg, 0, sizeof(float) * static_cast<size_t>(d.Cg * d.HW));
            col2im(p, d.Cg, col.get(), dxg);
        }
    const int64_t n = static_cast<int64_t>(p.N) * p.C * p.H * p.W;
    if (relu_y)  // through the ReLU below, as relu_backward
        for (int64_t i = 0; i < n; ++i) dx[i] = relu_y[i] > 0.0f ? dx[i] : 0.0f;
}

// Per group: dw_g (Kg, Cg*R*S) = sum over images n = 0, 1, ... of dy_g(n) col(n)^T. Each image's product is
// a fresh GEMM added to the running total in increasing n (shorter float sums than one long chain).
void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw) {
    const ConvDims d = dims(p);
    Buffer col(d.direct ? 0 : d.CRS * d.PQ);
    Buffer part(p.N > 1 ? d.Kg * d.CRS : 0);
    for (int g = 0; g < p.groups; ++g) {
        float* dwg = dw + g * d.Kg * d.CRS;
        if (p.N == 0) std::memset(dwg, 0, sizeof(float) * static_cast<size_t>(d.Kg * d.CRS));
        for (int n = 0; n < p.N; ++n) {
            const float* xg = x + (static_cast<int64_t>(n) * p.C + static_cast<int64_t>(g) * d.Cg) * d.HW;
            const float* dyg = dy + (static_cast<int64_t>(n) * p.K + static_cast<int64_t>(g) * d.Kg) * d.PQ;
            const float* bmat = xg;
            if (!d.direct) {
                im2col(p, d.Cg, xg, col.get());
                bmat = col.get();
            }
            float* target = n == 0 ? dwg : part.get();
            gemm(false, true, d.Kg, static_cast<int>(d.CRS), static_cast<int>(d.PQ), dyg, d.PQ, bmat, d.PQ, target,
                 d.CRS, false);
            if (n > 0) {
                const float* __restrict src = part.get();
                float* __restrict dst = dwg;
                for (int64_t i = 0; i < d.Kg * d.CRS; ++i) dst[i] += src[i];
            }
        }
    }
}

// db[k] = sum over n, p, q of dy, in a double accumulator (order n, then p*Q+q).
void conv2d_backward_bias(const Conv2dParams& p, const float* dy, float* db) {
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q;
    for (int k = 0; k < p.K; ++k) {
        double acc = 0.0;
        for (int n = 0; n < p.N; ++n) {
            const float* plane = dy + (static_cast<int64_t>(n) * p.K + k) * PQ;
            for (int64_t i = 0; i < PQ; ++i) acc += plane[i];
        }
        db[k] = static_cast<float>(acc);
    }
}

}  // namespace cpu
}  // namespace ax
