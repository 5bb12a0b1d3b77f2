// CPU backend of the conv family: one GEMM per group (and, for a strided grad-input, per stride phase) with the
// batch folded into the GEMM, packing straight from the image (implicit im2col: gemm_kernel.h's gather B), so
// no im2col buffer is ever written.
// Layouts: x NCHW, w KCRS (C = C/groups per group), y NKPQ.
//
//   forward      y_g (Kg, N*P*Q)  = w_g (Kg, Cg*R*S)      x  im2col(x_g)  (Cg*R*S, N*P*Q)
//   grad-input   dx_g (Cg, N*H*W) = w_g^T flipped          x  im2col(dy_g) (Kg*R'*S', N*H*W), a stride-1
//                correlation per stride phase (h % sh, w % sw), so each dx element is one sum, no scatter
//   grad-weight  dw_g (Kg, Cg*R*S) = dy_g (Kg, N*P*Q)      x  im2col(x_g)^T (N*P*Q, Cg*R*S): the whole batch is
//                the GEMM's K, summed in gemm_kernel.h's fixed order (blocks of 256 in increasing n, p, q)
// Two variants where those GEMMs pack badly: a strided forward gathers from a stride-phase copy of the input
// (conv2d_forward_strided), and a grad-input with few input channels (conv1's 3) goes through a per-image
// column buffer and col2im (conv2d_backward_input_col2im).
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_kernel.h"
#include "ops.h"
#include "parallel.h"

namespace ax {
namespace cpu {

namespace {

// Tables describing the gather B and the A/C maps of one GEMM; reused across calls on a thread.
struct Tables {
    std::vector<int32_t> row_off, row_h, row_w, col_off, col_h, col_w;
    std::vector<int64_t> a_koff, c_col;
    void rows(size_t k) {
        row_off.resize(k);
        row_h.resize(k);
        row_w.resize(k);
    }
    // n columns, padded so that padding lanes read as out of range.
    void cols(size_t n) {
        const size_t padded = (n + kGatherPad - 1) / kGatherPad * kGatherPad;
        col_off.assign(padded, 0);
        col_h.assign(padded, kGatherOff);
        col_w.assign(padded, 0);
    }
};
thread_local Tables t_tab;

GemmB gather_b(const float* p, const Tables& t, int H, int W) {
    return GemmB{p, 0, 0, t.row_off.data(), t.row_h.data(), t.row_w.data(),
                 t.col_off.data(), t.col_h.data(), t.col_w.data(), H, W};
}

// (c, r, s) -> (c*H*W + r*W + s, r, s): the window taps of an input image, as rows (forward) or columns
// (grad-weight) of the gather.
void window_taps(const Conv2dParams& p, int Cg, int32_t* off, int32_t* hh, int32_t* ww) {
    int64_t i = 0;
    for (int c = 0; c < Cg; ++c)
        for (int r = 0; r < p.R; ++r)
            for (int s = 0; s < p.S; ++s, ++i) {
                off[i] = static_cast<int32_t>((static_cast<int64_t>(c) * p.H + r) * p.W + s);
                hh[i] = r;
                ww[i] = s;
            }
}

// (n, pp, q) -> (n*C*H*W + h0*W + w0, h0, w0) with h0 = pp*stride - pad: each output position's window
// corner in the input.
void window_corners(const Conv2dParams& p, int32_t* off, int32_t* hh, int32_t* ww) {
    int64_t i = 0;
    const int64_t CHW = static_cast<int64_t>(p.C) * p.H * p.W;
    for (int n = 0; n < p.N; ++n)
        for (int pp = 0; pp < p.P; ++pp)
            for (int q = 0; q < p.Q; ++q, ++i) {
                const int64_t h0 = static_cast<int64_t>(pp) * p.stride_h - p.pad_h;
                const int64_t w0 = static_cast<int64_t>(q) * p.stride_w - p.pad_w;
                // Only valid taps are read, and those lie inside x (< 2^31 elements); the corner itself may
                // lie outside, so clamp what cannot matter instead of overflowing.
                off[i] = static_cast<int32_t>(std::max<int64_t>(INT32_MIN / 2, std::min<int64_t>(INT32_MAX / 2,
                                                                n * CHW + h0 * p.W + w0)));
                hh[i] = static_cast<int32_t>(std::max<int64_t>(-(1 << 28), std::min<int64_t>(1 << 28, h0)));
                ww[i] = static_cast<int32_t>(std::max<int64_t>(-(1 << 28), std::min<int64_t>(1 << 28, w0)));
            }
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

// dx plane of channel c (H, W) = the col rows of c (R*S rows of P*Q) scattered back (the adjoint of im2col),
// added in increasing (r, s, p, q): a fixed order, so each element sums its window contributions
// deterministically.
void col2im_channel(const Conv2dParams& p, const float* colc, float* xc) {
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q;
    std::memset(xc, 0, sizeof(float) * static_cast<size_t>(p.H) * p.W);
    for (int r = 0; r < p.R; ++r)
        for (int s = 0; s < p.S; ++s) {
            const float* __restrict srcrow = colc + (static_cast<int64_t>(r) * p.S + s) * PQ;
            int qlo, qhi;
            valid_range(p.Q, p.W, p.stride_w, p.pad_w, s, &qlo, &qhi);
            for (int pp = 0; pp < p.P; ++pp) {
                const int64_t h = static_cast<int64_t>(pp) * p.stride_h - p.pad_h + r;
                if (h < 0 || h >= p.H) continue;
                const float* __restrict src = srcrow + static_cast<int64_t>(pp) * p.Q;
                float* __restrict dst = xc + h * p.W;
                const int off = s - p.pad_w;
                if (p.stride_w == 1)
                    for (int q = qlo; q < qhi; ++q) dst[q + off] += src[q];
                else
                    for (int q = qlo; q < qhi; ++q) dst[static_cast<int64_t>(q) * p.stride_w + off] += src[q];
            }
        }
}

}  // namespace

thread_local std::vector<float> t_phase;

// Strided forward: the input split by stride phase (space-to-depth), xs[n][c][a][b][i][j] =
// x[n, c, i*sh + a - pad_h, j*sw + b - pad_w] (0 outside x), so tap (r, s) of output (p, q) is
// xs[n][c][r % sh][s % sw][p + r / sh][q + s / sw]: a stride-1 gather whose adjacent outputs are adjacent in
// memory (masked contiguous loads instead of the gather instruction). The same products in the same order
// as the direct gather, so the same bits. Images go in chunks that keep the split copy near 8 MiB.
void conv2d_forward_strided(const Conv2dParams& p, const float* x, const float* w, float* y) {
    const int Cg = p.C / p.groups, Kg = p.K / p.groups;
    const int sh = p.stride_h, sw = p.stride_w;
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q, HW = static_cast<int64_t>(p.H) * p.W;
    const int Hp = p.P + (p.R - 1) / sh, Wp = p.Q + (p.S - 1) / sw;
    const int64_t plane = static_cast<int64_t>(Hp) * Wp, img = static_cast<int64_t>(p.C) * sh * sw * plane;
    const int chunk = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.N, (int64_t{2} << 20) / img)));
    const int CRS = Cg * p.R * p.S;
    if (t_phase.size() < static_cast<size_t>(chunk * img)) t_phase.resize(chunk * img);
    float* xs = t_phase.data();
    Tables& t = t_tab;
    t.rows(CRS);
    int64_t i = 0;
    for (int c = 0; c < Cg; ++c)
        for (int r = 0; r < p.R; ++r)
            for (int ss = 0; ss < p.S; ++ss, ++i) {
                t.row_off[i] = static_cast<int32_t>(((static_cast<int64_t>(c) * sh + r % sh) * sw + ss % sw) * plane +
                                                    static_cast<int64_t>(r / sh) * Wp + ss / sw);
                t.row_h[i] = r / sh;
                t.row_w[i] = ss / sw;
            }
    for (int n0 = 0; n0 < p.N; n0 += chunk) {
        const int nc = std::min(chunk, p.N - n0);
        parallel_for(0, static_cast<int64_t>(nc) * p.C, 1, [&](int64_t lo, int64_t hi) {
            for (int64_t nch = lo; nch < hi; ++nch) {
                const float* xc = x + (static_cast<int64_t>(n0) * p.C + nch) * HW;
                float* dst = xs + nch * sh * sw * plane;
                for (int a = 0; a < sh; ++a)
                    for (int bb = 0; bb < sw; ++bb)
                        for (int ii = 0; ii < Hp; ++ii) {
                            const int64_t h = static_cast<int64_t>(ii) * sh + a - p.pad_h;
                            float* __restrict d = dst + ((static_cast<int64_t>(a) * sw + bb) * Hp + ii) * Wp;
                            if (h < 0 || h >= p.H) {
                                std::memset(d, 0, sizeof(float) * Wp);
                                continue;
                            }
                            // Columns jj reading inside the row: [jlo, jhi), the rest padding.
                            const int64_t off = static_cast<int64_t>(bb) - p.pad_w;
                            const int jlo = static_cast<int>(std::min<int64_t>(Wp, off >= 0 ? 0 : (-off + sw - 1) / sw));
                            const int jhi = static_cast<int>(std::max<int64_t>(
                                jlo, std::min<int64_t>(Wp, p.W - 1 - off < 0 ? 0 : (p.W - 1 - off) / sw + 1)));
                            const float* __restrict src = xc + h * p.W + off;
                            for (int jj = 0; jj < jlo; ++jj) d[jj] = 0.0f;
                            for (int jj = jlo; jj < jhi; ++jj) d[jj] = src[static_cast<int64_t>(jj) * sw];
                            for (int jj = jhi; jj < Wp; ++jj) d[jj] = 0.0f;
                        }
            }
        });
        const int cols = static_cast<int>(nc * PQ);
        t.cols(cols);
        t.c_col.resize(cols);
        int64_t j = 0;
        for (int n = 0; n < nc; ++n)
            for (int pp = 0; pp < p.P; ++pp)
                for (int q = 0; q < p.Q; ++q, ++j) {
                    t.col_off[j] = static_cast<int32_t>(n * img + static_cast<int64_t>(pp) * Wp + q);
                    t.col_h[j] = pp;
                    t.col_w[j] = q;
                    t.c_col[j] = static_cast<int64_t>(n) * p.K * PQ + static_cast<int64_t>(pp) * p.Q + q;
                }
        for (int g = 0; g < p.groups; ++g) {
            const GemmA A{w + static_cast<int64_t>(g) * Kg * CRS, CRS, 1, nullptr};
            const GemmC C{y + (static_cast<int64_t>(n0) * p.K + static_cast<int64_t>(g) * Kg) * PQ, PQ, 1,
                          t.c_col.data()};
            gemm_general(Kg, cols, CRS, A, gather_b(xs + static_cast<int64_t>(g) * Cg * sh * sw * plane, t, Hp, Wp),
                         C, false);
        }
    }
}

void conv2d_forward(const Conv2dParams& p, const float* x, const float* w, const float* b, float* y) {
    const int Cg = p.C / p.groups, Kg = p.K / p.groups;
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    const int CRS = Cg * p.R * p.S;
    const int NPQ = static_cast<int>(p.N * PQ);
    // The split copy is worth it where the phases are few and the image is not tiny (and it must fit int32).
    const int64_t split_img = static_cast<int64_t>(p.C) * p.stride_h * p.stride_w *
                              (p.P + (p.R - 1) / p.stride_h) * (p.Q + (p.S - 1) / p.stride_w);
    if ((p.stride_h > 1 || p.stride_w > 1) && p.stride_h <= 8 && p.stride_w <= 8 && p.N > 0 && PQ >= 64 &&
        split_img < (int64_t{1} << 26)) {
        conv2d_forward_strided(p, x, w, y);
    } else {
        Tables& t = t_tab;
        t.rows(CRS);
        window_taps(p, Cg, t.row_off.data(), t.row_h.data(), t.row_w.data());
        t.cols(NPQ);
        window_corners(p, t.col_off.data(), t.col_h.data(), t.col_w.data());
        t.c_col.resize(NPQ);
        for (int64_t j = 0; j < NPQ; ++j) t.c_col[j] = (j / PQ) * p.K * PQ + j % PQ;
        for (int g = 0; g < p.groups; ++g) {
            const GemmA A{w + static_cast<int64_t>(g) * Kg * CRS, CRS, 1, nullptr};
            const GemmC C{y + static_cast<int64_t>(g) * Kg * PQ, PQ, 1, t.c_col.data()};
            gemm_general(Kg, NPQ, CRS, A, gather_b(x + g * Cg * HW, t, p.H, p.W), C, false);
        }
    }
    // The epilogue: + b, then (p.relu) the ReLU in place, as relu_forward writes it (NaN stays NaN).
    if (b || p.relu)
        parallel_for(0, static_cast<int64_t>(p.N) * p.K, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, PQ)),
                     [&](int64_t lo, int64_t hi) {
                         for (int64_t nk = lo; nk < hi; ++nk) {
                             float* __restrict row = y + nk * PQ;
                             if (b) {
                                 const float bias = b[nk % p.K];
                                 for (int64_t i = 0; i < PQ; ++i) row[i] += bias;
                             }
                             if (p.relu)
                                 for (int64_t i = 0; i < PQ; ++i) row[i] = row[i] < 0.0f ? 0.0f : row[i];
                         }
                     });
}

// Per group and stride phase (a, bb): dx[n, c, a + sh*h', bb + sw*w'] = sum over k and the taps (r, s) with
// r = a + pad_h (mod sh), s = bb + pad_w (mod sw) of w[k, c, r, s] * dy[n, k, h' + dr, w' + ds], where
// dr = (a + pad_h - r) / sh, ds = (bb + pad_w - s) / sw: a stride-1 gather from dy.
// Few input channels (conv1's 3): the phase GEMMs would have M = Cg rows, nearly all padding, so instead per
// image and group col (Cg*R*S, P*Q) = w_g^T dy_g (a GEMM with M = Cg*R*S), then col2im channel by channel.
void conv2d_backward_input_col2im(const Conv2dParams& p, const float* dy, const float* w, float* dx) {
    const int Cg = p.C / p.groups, Kg = p.K / p.groups;
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    const int64_t RS = static_cast<int64_t>(p.R) * p.S, CRS = Cg * RS;
    std::vector<float>& col = t_phase;
    if (col.size() < static_cast<size_t>(CRS * PQ)) col.resize(CRS * PQ);
    for (int n = 0; n < p.N; ++n)
        for (int g = 0; g < p.groups; ++g) {
            const float* dyg = dy + (static_cast<int64_t>(n) * p.K + static_cast<int64_t>(g) * Kg) * PQ;
            float* dxg = dx + (static_cast<int64_t>(n) * p.C + static_cast<int64_t>(g) * Cg) * HW;
            gemm(true, false, static_cast<int>(CRS), static_cast<int>(PQ), Kg, w + g * Kg * CRS, CRS, dyg, PQ,
                 col.data(), PQ, false);
            parallel_for(0, Cg, 1, [&](int64_t lo, int64_t hi) {
                for (int64_t c = lo; c < hi; ++c) col2im_channel(p, col.data() + c * RS * PQ, dxg + c * HW);
            });
        }
}

void conv2d_backward_input_gemm(const Conv2dParams& p, const float* dy, const float* w, float* dx) {
    const int Cg = p.C / p.groups, Kg = p.K / p.groups;
    if (Cg < 8 && static_cast<int64_t>(Cg) * p.R * p.S >= 32 && p.N > 0) {
        conv2d_backward_input_col2im(p, dy, w, dx);
        return;
    }
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    const int64_t RS = static_cast<int64_t>(p.R) * p.S;
    const int sh = p.stride_h, sw = p.stride_w;
    Tables& t = t_tab;
    // Phases beyond the input (a stride larger than H or W) have no elements.
    for (int a = 0; a < std::min(sh, p.H); ++a)
        for (int bb = 0; bb < std::min(sw, p.W); ++bb) {
            const int Ha = (p.H - a + sh - 1) / sh, Wa = (p.W - bb + sw - 1) / sw;
            const int cols = p.N * Ha * Wa;
            // The taps of this phase, in increasing (k, r, s).
            std::vector<int> rr, ss;
            for (int r = 0; r < p.R; ++r)
                if (((static_cast<int64_t>(a) + p.pad_h - r) % sh + sh) % sh == 0) rr.push_back(r);
            for (int s = 0; s < p.S; ++s)
                if (((static_cast<int64_t>(bb) + p.pad_w - s) % sw + sw) % sw == 0) ss.push_back(s);
            const int taps = static_cast<int>(rr.size() * ss.size());
            const int Kk = Kg * taps;
            t.rows(Kk);
            t.a_koff.resize(Kk);
            int64_t i = 0;
            for (int k = 0; k < Kg; ++k)
                for (int r : rr)
                    for (int s : ss) {
                        const int64_t dr = (static_cast<int64_t>(a) + p.pad_h - r) / sh;
                        const int64_t ds = (static_cast<int64_t>(bb) + p.pad_w - s) / sw;
                        // Clamped like window_corners: a tap this far out is never in range.
                        const int64_t drc = std::max<int64_t>(-(1 << 28), std::min<int64_t>(1 << 28, dr));
                        const int64_t dsc = std::max<int64_t>(-(1 << 28), std::min<int64_t>(1 << 28, ds));
                        t.row_off[i] = static_cast<int32_t>(std::max<int64_t>(
                            INT32_MIN / 2, std::min<int64_t>(INT32_MAX / 2, k * PQ + drc * p.Q + dsc)));
                        t.row_h[i] = static_cast<int32_t>(drc);
                        t.row_w[i] = static_cast<int32_t>(dsc);
                        t.a_koff[i] = static_cast<int64_t>(k) * Cg * RS + r * p.S + s;
                        ++i;
                    }
            t.cols(cols);
            t.c_col.resize(cols);
            int64_t j = 0;
            for (int n = 0; n < p.N; ++n)
                for (int h = 0; h < Ha; ++h)
                    for (int ww = 0; ww < Wa; ++ww, ++j) {
                        t.col_off[j] = static_cast<int32_t>(static_cast<int64_t>(n) * p.K * PQ +
                                                            static_cast<int64_t>(h) * p.Q + ww);
                        t.col_h[j] = h;
                        t.col_w[j] = ww;
                        t.c_col[j] = static_cast<int64_t>(n) * p.C * HW +
                                     (static_cast<int64_t>(a) + static_cast<int64_t>(sh) * h) * p.W + bb +
                                     static_cast<int64_t>(sw) * ww;
                    }
            for (int g = 0; g < p.groups; ++g) {
                const GemmA A{w + static_cast<int64_t>(g) * Kg * Cg * RS, RS, 0, t.a_koff.data()};
                const GemmC C{dx + static_cast<int64_t>(g) * Cg * HW, HW, 0, t.c_col.data()};
                gemm_general(Cg, cols, Kk, A, gather_b(dy + static_cast<int64_t>(g) * Kg * PQ, t, p.P, p.Q), C,
                             false);
            }
        }
}

void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w, const float* relu_y, float* dx) {
    conv2d_backward_input_gemm(p, dy, w, dx);
    if (!relu_y) return;
    // Through the ReLU below (whose output relu_y is), as relu_backward: dx where relu_y > 0, else 0.
    parallel_for(0, static_cast<int64_t>(p.N) * p.C * p.H * p.W, 1 << 16, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) dx[i] = relu_y[i] > 0.0f ? dx[i] : 0.0f;
    });
}

// dw_g (Kg, Cg*R*S) = sum over the batch's output positions (n, p, q), in increasing order, of dy_g (x) the
// window at (n, p, q): one GEMM per group with K = N*P*Q.
void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw) {
    const int Cg = p.C / p.groups, Kg = p.K / p.groups;
    const int64_t HW = static_cast<int64_t>(p.H) * p.W, PQ = static_cast<int64_t>(p.P) * p.Q;
    const int CRS = Cg * p.R * p.S;
    const int NPQ = static_cast<int>(p.N * PQ);
    Tables& t = t_tab;
    t.rows(NPQ);
    window_corners(p, t.row_off.data(), t.row_h.data(), t.row_w.data());
    t.cols(CRS);
    window_taps(p, Cg, t.col_off.data(), t.col_h.data(), t.col_w.data());
    t.a_koff.resize(NPQ);
    for (int64_t k = 0; k < NPQ; ++k) t.a_koff[k] = (k / PQ) * p.K * PQ + k % PQ;
    for (int g = 0; g < p.groups; ++g) {
        const GemmA A{dy + static_cast<int64_t>(g) * Kg * PQ, PQ, 0, t.a_koff.data()};
        const GemmC C{dw + static_cast<int64_t>(g) * Kg * CRS, CRS, 1, nullptr};
        gemm_general(Kg, CRS, NPQ, A, gather_b(x + g * Cg * HW, t, p.H, p.W), C, false);
    }
}

// db[k] = sum over n, p, q of dy, in double: per image, eight interleaved partial sums over the plane
// (element i into lane i % 8, lanes then added in order), images added in increasing n. Threads split k.
void conv2d_backward_bias(const Conv2dParams& p, const float* dy, float* db) {
    const int64_t PQ = static_cast<int64_t>(p.P) * p.Q;
    parallel_for(0, p.K, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, PQ * p.N)), [&](int64_t lo, int64_t hi) {
        for (int64_t k = lo; k < hi; ++k) {
            double acc = 0.0;
            for (int n = 0; n < p.N; ++n) {
                const float* __restrict plane = dy + (static_cast<int64_t>(n) * p.K + k) * PQ;
                double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                int64_t i = 0;
                for (; i + 8 <= PQ; i += 8)
                    for (int l = 0; l < 8; ++l) lane[l] += plane[i + l];
                for (int l = 0; i < PQ; ++i, ++l) lane[l] += plane[i];
                double s = 0.0;
                for (int l = 0; l < 8; ++l) s += lane[l];
                acc += s;
            }
            db[k] = static_cast<float>(acc);
        }
    });
}

}  // namespace cpu
}  // namespace ax
