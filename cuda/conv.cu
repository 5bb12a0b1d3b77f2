// CUDA backend of the conv family. The three matrix passes are implicit GEMMs on the shared tiled main
// loop (common.cuh: 128x128 or 64x64 block tiles, 8-deep k-steps, 8x8 / 4x4 register micro-tiles,
// double-buffered shared memory); only the operand views differ, below. Group g is blockIdx.z (wgrad:
// z = g * splits + split). Index decomposition uses FastDiv (multiply-high), hoisted per thread where the
// tile mapping keeps a coordinate fixed. No atomics anywhere: wgrad's split-K writes partial sums to a
// workspace that a second kernel adds in a fixed order, and the bias gradient is one block per channel.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// Convolution shape plus the divisors the loaders need. Per group: Kg = K/groups output channels,
// Cg = C/groups input channels; weights are (K, Cg, R, S).
struct ConvGeom {
    int N, C, H, W, K, R, S, P, Q, sh, sw, ph, pw, groups;
    int Cg, Kg, RS, HW, PQ, CgRS;
    FastDiv fS, fRS, fQ, fPQ, fW, fHW, fsh, fsw;

    ConvGeom(const Conv2dParams& p, const char* opname)
        : N(p.N), C(p.C), H(p.H), W(p.W), K(p.K), R(p.R), S(p.S), P(p.P), Q(p.Q), sh(p.stride_h),
          sw(p.stride_w), ph(p.pad_h), pw(p.pad_w), groups(p.groups) {
        const int64_t lim = kMaxGemmDim;
        // Loaders index within one image (and GEMM columns over the batch) with 32-bit ints.
        require(static_cast<int64_t>(N) * P * Q <= lim && static_cast<int64_t>(N) * H * W <= lim &&
                    static_cast<int64_t>(C) * H * W <= lim && static_cast<int64_t>(K) * P * Q <= lim &&
                    static_cast<int64_t>(K) * C * R * S <= lim,
                opname, "tensor too large for 32-bit per-image indexing");
        Cg = C / groups;
        Kg = K / groups;
        RS = R * S;
        HW = H * W;
        PQ = P * Q;
        CgRS = Cg * RS;
        fS = FastDiv(S);
        fRS = FastDiv(RS);
        fQ = FastDiv(Q);
        fPQ = FastDiv(PQ);
        fW = FastDiv(W);
        fHW = FastDiv(HW);
        fsh = FastDiv(sh);
        fsw = FastDiv(sw);
    }
};

// ---- forward: y[n,k,p,q] = sum_{c,r,s} w[k,c,r,s] * x[n, c, p*sh-ph+r, q*sw-pw+s] + b[k] ----------
// GEMM per group: M = Kg (output channel), N = batch*P*Q (output pixel), Kr = Cg*R*S (c,r,s).
// A = weights, row-major (Kg x CgRS) slice: k-contiguous. B = im2col of x, gathered on the fly: threads
// walk output pixels (coalesced along q), each thread keeps one pixel per tile, so its image base and
// window origin are computed once.
struct ConvFwd {
    static constexpr bool kAContigK = true, kBContigK = false;
    int M, N;
    ConvGeom g;
    const float* x;
    const float* w;
    const float* b;
    float* y;

    struct Thread {
        int64_t xoff;  // offset of (img, first channel of the group) in x
        int h0, w0;    // window origin of this thread's output pixel (may be negative: padding)
        bool valid;
    };
    template <class Cfg>
    __device__ Thread thread(int z, int, int n0) const {
        Thread t{0, 0, 0, false};
        const int n = n0 + TileMap<Cfg::BN, Cfg::BK, kBContigK>::mn(threadIdx.x, 0);
        if (n < N) {
            int img, pq, p, q;
            g.fPQ.divmod(n, img, pq);
            g.fQ.divmod(pq, p, q);
            t.xoff = (static_cast<int64_t>(img) * g.C + static_cast<int64_t>(z) * g.Cg) * g.HW;
            t.h0 = p * g.sh - g.ph;
            t.w0 = q * g.sw - g.pw;
            t.valid = true;
        }
        return t;
    }
    __device__ void k_range(int, int& kb, int& ke) const {
        kb = 0;
        ke = g.CgRS;
    }
    template <class Cfg, class Th>
    __device__ void fetch_a(const Th&, int k0, int ke, float (&r)[Cfg::kAPerThread]) const {
        using Map = TileMap<Cfg::BM, Cfg::BK, kAContigK>;
        const int m0 = blockIdx.y * Cfg::BM;
        const int k = k0 + Map::k(threadIdx.x, 0);  // fixed per thread (k-contiguous map)
        const int64_t row0 = static_cast<int64_t>(blockIdx.z) * g.Kg;
#pragma unroll
        for (int i = 0; i < Cfg::kAPerThread; ++i) {
            const int m = m0 + Map::mn(threadIdx.x, i);
            r[i] = (m < M && k < ke) ? __ldg(w + (row0 + m) * g.CgRS + k) : 0.0f;
        }
    }
    template <class Cfg, class Th>
    __device__ void fetch_b(const Th& t, int k0, int ke, float (&r)[Cfg::kBPerThread]) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK>;
#pragma unroll
        for (int i = 0; i < Cfg::kBPerThread; ++i) {
            const int k = k0 + Map::k(threadIdx.x, i);
            float v = 0.0f;
            if (t.valid && k < ke) {
                int c, rs, rr, ss;
                g.fRS.divmod(k, c, rs);
                g.fS.divmod(rs, rr, ss);
                const int h = t.h0 + rr, wx = t.w0 + ss;
                if (h >= 0 && h < g.H && wx >= 0 && wx < g.W) v = __ldg(x + t.xoff + (c * g.HW + h * g.W + wx));
            }
            r[i] = v;
        }
    }
    template <class Th>
    __device__ void store(const Th&, int z, int m, int n, float v) const {
        int img, pq;
        g.fPQ.divmod(n, img, pq);
        const int k = z * g.Kg + m;
        if (b != nullptr) v += b[k];
        y[(static_cast<int64_t>(img) * g.K + k) * g.PQ + pq] = v;
    }
};

// ---- backward input: dx[n,c,h,w] = sum_{k,r,s} w[k,c,r,s] * dy[n, k, (h+ph-r)/sh, (w+pw-s)/sw] ------
// over the taps where both divisions are exact and land inside dy (the transposed implicit GEMM).
// GEMM per group: M = Cg (input channel), N = batch*H*W (input pixel), Kr = Kg*R*S (k,r,s).
// A(c, (k,rs)) = w[k, c, rs]: k-contiguous within each run of R*S. B = gather of dy: threads walk input
// pixels (coalesced along w), each thread keeps one pixel per tile.
struct ConvBwdInput {
    static constexpr bool kAContigK = true, kBContigK = false;
    int M, N;
    ConvGeom g;
    const float* dy;
    const float* w;
    float* dx;

    struct Thread {
        int64_t dyoff;  // offset of (img, first output channel of the group) in dy
        int hp, wp;     // h + pad_h, w + pad_w of this thread's input pixel
        bool valid;
    };
    template <class Cfg>
    __device__ Thread thread(int z, int, int n0) const {
        Thread t{0, 0, 0, false};
        const int n = n0 + TileMap<Cfg::BN, Cfg::BK, kBContigK>::mn(threadIdx.x, 0);
        if (n < N) {
            int img, hw, h, wx;
            g.fHW.divmod(n, img, hw);
            g.fW.divmod(hw, h, wx);
            t.dyoff = (static_cast<int64_t>(img) * g.K + static_cast<int64_t>(z) * g.Kg) * g.PQ;
            t.hp = h + g.ph;
            t.wp = wx + g.pw;
            t.valid = true;
        }
        return t;
    }
    __device__ void k_range(int, int& kb, int& ke) const {
        kb = 0;
        ke = g.Kg * g.RS;
    }
    template <class Cfg, class Th>
    __device__ void fetch_a(const Th&, int k0, int ke, float (&r)[Cfg::kAPerThread]) const {
        using Map = TileMap<Cfg::BM, Cfg::BK, kAContigK>;
        const int m0 = blockIdx.y * Cfg::BM;
        const int k = k0 + Map::k(threadIdx.x, 0);  // fixed per thread: decompose once per k-step
        int ko = 0, rs = 0;
        if (k < ke) g.fRS.divmod(k, ko, rs);
        const int64_t base = (static_cast<int64_t>(blockIdx.z) * g.Kg + ko) * g.CgRS + rs;
#pragma unroll
        for (int i = 0; i < Cfg::kAPerThread; ++i) {
            const int m = m0 + Map::mn(threadIdx.x, i);
            r[i] = (m < M && k < ke) ? __ldg(w + base + static_cast<int64_t>(m) * g.RS) : 0.0f;
        }
    }
    template <class Cfg, class Th>
    __device__ void fetch_b(const Th& t, int k0, int ke, float (&r)[Cfg::kBPerThread]) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK>;
#pragma unroll
        for (int i = 0; i < Cfg::kBPerThread; ++i) {
            const int k = k0 + Map::k(threadIdx.x, i);
            float v = 0.0f;
            if (t.valid && k < ke) {
                int ko, rs, rr, ss;
                g.fRS.divmod(k, ko, rs);
                g.fS.divmod(rs, rr, ss);
                const int hs = t.hp - rr, ws = t.wp - ss;  // = p*sh, q*sw when this tap hits dy
                if (hs >= 0 && ws >= 0) {
                    int p, ph_rem, q, pw_rem;
                    g.fsh.divmod(hs, p, ph_rem);
                    g.fsw.divmod(ws, q, pw_rem);
                    if (ph_rem == 0 && pw_rem == 0 && p < g.P && q < g.Q)
                        v = __ldg(dy + t.dyoff + (ko * g.PQ + p * g.Q + q));
                }
            }
            r[i] = v;
        }
    }
    template <class Th>
    __device__ void store(const Th&, int z, int m, int n, float v) const {
        int img, hw;
        g.fHW.divmod(n, img, hw);
        dx[(static_cast<int64_t>(img) * g.C + static_cast<int64_t>(z) * g.Cg + m) * g.HW + hw] = v;
    }
};

// ---- backward weight: dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] * x[n, c, p*sh-ph+r, q*sw-pw+s] ----------
// GEMM per group: M = Kg, N = Cg*R*S, Kr = batch*P*Q, split into `splits` slices (z = g*splits + split)
// whose partial products go to a workspace [splits][K][Cg*R*S] (or straight to dw when splits == 1).
// Both operands are k-contiguous (k walks q): per k-step each thread decomposes its one k = (img,p,q);
// its B columns (c,r,s) are fixed for the whole tile, so their offsets are precomputed in registers.
struct ConvBwdWeight {
    static constexpr bool kAContigK = true, kBContigK = true;
    int M, N, Kr, kchunk, splits;
    ConvGeom g;
    const float* x;
    const float* dy;
    float* out;  // dw or the workspace

    template <int BP>
    struct Thread {
        int grp, split;
        int coff[BP];   // c*H*W of this thread's i-th B column, -1 when the column is outside N
        int roff[BP], soff[BP];
    };
    template <class Cfg>
    __device__ Thread<Cfg::kBPerThread> thread(int z, int, int n0) const {
        Thread<Cfg::kBPerThread> t;
        t.grp = z / splits;
        t.split = z - t.grp * splits;
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK>;
#pragma unroll
        for (int i = 0; i < Cfg::kBPerThread; ++i) {
            const int n = n0 + Map::mn(threadIdx.x, i);
            int c = 0, rs = 0, rr = 0, ss = 0;
            if (n < N) {
                g.fRS.divmod(n, c, rs);
                g.fS.divmod(rs, rr, ss);
            }
            t.coff[i] = n < N ? c * g.HW : -1;
            t.roff[i] = rr;
            t.soff[i] = ss;
        }
        return t;
    }
    __device__ void k_range(int z, int& kb, int& ke) const {
        const int split = z % splits;
        kb = split * kchunk;
        ke = min(Kr, kb + kchunk);
    }
    template <class Cfg, class Th>
    __device__ void fetch_a(const Th& t, int k0, int ke, float (&r)[Cfg::kAPerThread]) const {
        using Map = TileMap<Cfg::BM, Cfg::BK, kAContigK>;
        const int m0 = blockIdx.y * Cfg::BM;
        const int k = k0 + Map::k(threadIdx.x, 0);
        int img = 0, pq = 0;
        if (k < ke) g.fPQ.divmod(k, img, pq);
        const int64_t base = (static_cast<int64_t>(img) * g.K + static_cast<int64_t>(t.grp) * g.Kg) * g.PQ + pq;
#pragma unroll
        for (int i = 0; i < Cfg::kAPerThread; ++i) {
            const int m = m0 + Map::mn(threadIdx.x, i);
            r[i] = (m < M && k < ke) ? __ldg(dy + base + static_cast<int64_t>(m) * g.PQ) : 0.0f;
        }
    }
    template <class Cfg, class Th>
    __device__ void fetch_b(const Th& t, int k0, int ke, float (&r)[Cfg::kBPerThread]) const {
        const int k = k0 + TileMap<Cfg::BN, Cfg::BK, kBContigK>::k(threadIdx.x, 0);
        const bool kvalid = k < ke;
        int img = 0, pq = 0, p = 0, q = 0;
        if (kvalid) {
            g.fPQ.divmod(k, img, pq);
            g.fQ.divmod(pq, p, q);
        }
        const int hb = p * g.sh - g.ph, wb = q * g.sw - g.pw;
        const int64_t base = (static_cast<int64_t>(img) * g.C + static_cast<int64_t>(t.grp) * g.Cg) * g.HW;
#pragma unroll
        for (int i = 0; i < Cfg::kBPerThread; ++i) {
            const int h = hb + t.roff[i], wx = wb + t.soff[i];
            const bool ok = kvalid && t.coff[i] >= 0 && h >= 0 && h < g.H && wx >= 0 && wx < g.W;
            r[i] = ok ? __ldg(x + base + (t.coff[i] + h * g.W + wx)) : 0.0f;
        }
    }
    template <class Th>
    __device__ void store(const Th& t, int, int m, int n, float v) const {
        const int64_t slice = static_cast<int64_t>(g.K) * g.CgRS;
        out[t.split * slice + (static_cast<int64_t>(t.grp) * g.Kg + m) * g.CgRS + n] = v;
    }
};

// Picks 128x128 tiles when they alone fill the GPU, else 64x64; launches over Z = groups slices.
template <class Op>
void launch_conv_gemm(const char* opname, const Op& op, int Z, cudaStream_t s) {
    if (use_big_tiles(op.M, op.N, Z)) {
        gemm_tiled_kernel<GemmBig><<<gemm_grid<GemmBig>(opname, op.M, op.N, Z), 256, 0, s>>>(op);
    } else {
        gemm_tiled_kernel<GemmSmall><<<gemm_grid<GemmSmall>(opname, op.M, op.N, Z), 256, 0, s>>>(op);
    }
    AX_LAUNCH_CHECK(opname);
}

// db[k] = sum over n, p, q of dy[n,k,p,q]: one block per channel; thread t sums pixels t, t+256, ... of
// every image in order, then a fixed-order shared-memory tree. Coalesced along p*Q+q.
constexpr int kBiasThreads = 256;
__global__ void __launch_bounds__(kBiasThreads)
    conv2d_backward_bias_kernel(int N, int K, int PQ, const float* __restrict__ dy, float* __restrict__ db) {
    __shared__ float red[kBiasThreads / 32 + 1];
    const int k = blockIdx.x;
    float s = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float* row = dy + (static_cast<int64_t>(n) * K + k) * PQ;
        for (int i = threadIdx.x; i < PQ; i += kBiasThreads) s += row[i];
    }
    s = block_sum<kBiasThreads>(s, red);
    if (threadIdx.x == 0) db[k] = s;
}

}  // namespace

void conv2d_forward(const Conv2dParams& p, const float* x, const float* w, const float* b, float* y, void* stream) {
    const char* opname = "conv2d_forward";
    if (static_cast<int64_t>(p.N) * p.K * p.P * p.Q == 0) return;
    ConvFwd op{0, 0, ConvGeom(p, opname), x, w, b, y};
    op.M = op.g.Kg;
    op.N = p.N * op.g.PQ;
    launch_conv_gemm(opname, op, p.groups, as_stream(stream));
}

void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w, float* dx, void* stream) {
    const char* opname = "conv2d_backward_input";
    if (static_cast<int64_t>(p.N) * p.C * p.H * p.W == 0) return;
    ConvBwdInput op{0, 0, ConvGeom(p, opname), dy, w, dx};
    op.M = op.g.Cg;
    op.N = p.N * op.g.HW;
    launch_conv_gemm(opname, op, p.groups, as_stream(stream));
}

void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw, void* stream) {
    const char* opname = "conv2d_backward_weight";
    if (static_cast<int64_t>(p.K) * (p.C / p.groups) * p.R * p.S == 0) return;
    ConvBwdWeight op{0, 0, 0, 0, 1, ConvGeom(p, opname), x, dy, dw};
    op.M = op.g.Kg;
    op.N = op.g.CgRS;
    op.Kr = p.N * op.g.PQ;
    const cudaStream_t s = as_stream(stream);
    if (use_big_tiles(op.M, op.N, p.groups)) {
        op.kchunk = op.Kr > 0 ? op.Kr : 1;
        gemm_tiled_kernel<GemmBig><<<gemm_grid<GemmBig>(opname, op.M, op.N, p.groups), 256, 0, s>>>(op);
        AX_LAUNCH_CHECK(opname);
        return;
    }
    int chunk = 0;
    op.splits = choose_split_k(gemm_tiles<GemmSmall>(op.M, op.N) * p.groups, op.Kr, &chunk);
    op.kchunk = chunk;
    require(static_cast<int64_t>(op.splits) * p.groups <= 65535, opname, "too many groups for one launch");
    const int Z = op.splits * p.groups;
    if (op.splits == 1) {
        gemm_tiled_kernel<GemmSmall><<<gemm_grid<GemmSmall>(opname, op.M, op.N, Z), 256, 0, s>>>(op);
        AX_LAUNCH_CHECK(opname);
        return;
    }
    const int64_t total = static_cast<int64_t>(p.K) * op.g.CgRS;
    Tensor ws = workspace(opname, total * op.splits, stream);
    op.out = ws.data<float>();
    gemm_tiled_kernel<GemmSmall><<<gemm_grid<GemmSmall>(opname, op.M, op.N, Z), 256, 0, s>>>(op);
    AX_LAUNCH_CHECK(opname);
    splitk_reduce(opname, total, op.splits, ws.data<float>(), nullptr, 1, dw, stream);
}

void conv2d_backward_bias(const Conv2dParams& p, const float* dy, float* db, void* stream) {
    if (p.K <= 0) return;
    conv2d_backward_bias_kernel<<<p.K, kBiasThreads, 0, as_stream(stream)>>>(p.N, p.K, p.P * p.Q, dy, db);
    AX_LAUNCH_CHECK("conv2d_backward_bias");
}

}  // namespace cuda
}  // namespace ax
