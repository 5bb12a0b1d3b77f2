// CUDA backend of the conv family. The three matrix passes are implicit GEMMs on the shared tiled main
// loop (common.cuh: 128x128, 64x128 or 48x128 block tiles, 16-deep k-steps, 8x8 or 6x8 register micro-tiles, a
// 2- or 3-stage cp.async shared-memory ring); only the operand views differ, below. Forward and grad-input walk
// their reduction channel-inner (tap by tap: ConvTap) where the channel count allows, reading a
// reordered copy of the weights, and channel-major (ConvFwd, ConvBwdInput) elsewhere. Group g is blockIdx.z (wgrad:
// z = g * splits + split). Index decomposition uses FastDiv (multiply-high), once per thread for what the
// tile mapping keeps fixed and once per k per block in the gather tables (common.cuh) for the rest. No
// atomics anywhere: wgrad's split-K writes partial sums to a workspace that a second kernel adds in a
// fixed order, and the bias gradient sums fixed slices per block, then the slices in order.
#include <type_traits>

#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// Convolution shape plus the divisors the loaders need. Per group: Kg = K/groups output channels,
// Cg = C/groups input channels; weights are (K, Cg, R, S).
struct ConvGeom {
    int N, C, H, W, K, R, S, P, Q, sh, sw, ph, pw, groups;
    int Cg, Kg, RS, HW, PQ, CgRS;
    int unused;  // an odd number of words in all, as the ops' parameter structs need for no padding bytes
    FastDiv fS, fRS, fQ, fPQ, fW, fHW, fsh, fsw;

    ConvGeom(const Conv2dParams& p, const char* opname)
        : N(p.N), C(p.C), H(p.H), W(p.W), K(p.K), R(p.R), S(p.S), P(p.P), Q(p.Q), sh(p.stride_h),
          sw(p.stride_w), ph(p.pad_h), pw(p.pad_w), groups(p.groups) {
        const int64_t lim = kMaxGemmDim;
        // Loaders index x and dy (the whole batch: the weight gradient's table) and GEMM columns with 32-bit ints.
        require(static_cast<int64_t>(N) * P * Q <= lim && static_cast<int64_t>(N) * H * W <= lim &&
                    static_cast<int64_t>(N) * C * H * W <= lim && static_cast<int64_t>(N) * K * P * Q <= lim &&
                    static_cast<int64_t>(K) * C * R * S <= lim,
                opname, "tensor too large for 32-bit indexing");
        Cg = C / groups;
        Kg = K / groups;
        RS = R * S;
        HW = H * W;
        PQ = P * Q;
        CgRS = Cg * RS;
        unused = 0;
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

// Per-thread state of the k-contiguous weight-like operand A(m, k) = base[m * mstride + off(k)]: rows
// m0 + t/8 + (T/8) i, the thread's k fixed at k0 + t % 8. Shared by the three conv ops.
template <class Cfg>
struct RowsA {
    static constexpr int kN = Cfg::kAPerThread;
    const float* p;   // base + (m0 + t/8) * mstride
    int step;         // (T/8) * mstride: from one of the thread's rows to the next
    int kt;           // t % 8
    int rows;         // the thread's rows < M are its first `rows` (m + (T/8) i grows with i)
};
template <class Cfg>
__device__ __forceinline__ RowsA<Cfg> rows_a(const float* base, int64_t mstride, int m0, int M) {
    using Map = TileMap<Cfg::BM, Cfg::BK, true, Cfg::kThreads>;
    RowsA<Cfg> a;
    const int m = m0 + Map::mn(threadIdx.x, 0);
    a.p = opaque_ptr(base + m * mstride);  // kept in two registers, not rebuilt from its parts at every use
    a.step = static_cast<int>(Map::kStep * mstride);
    a.kt = Map::k(threadIdx.x, 0);
    const int left = M - m;  // rows m, m + kStep, ... below M: ceil(left / kStep) of them, at most kN
    a.rows = left <= 0 ? 0 : min(RowsA<Cfg>::kN, (left + Map::kStep - 1) / Map::kStep);
    return a;
}
// Element i = A(row i, k) with the k's offset `koff` (from the table or k itself); zero outside M and,
// when kCheck, for k = k0 + t%8 outside [kb, ke). The first kCount of the thread's rows (TowerStack: half of them);
// kAllRows: the caller knows that all of them lie below M (TowerStack), so no row is checked.
template <class Cfg, bool kCheck, int kCount = RowsA<Cfg>::kN, bool kAllRows = false, class KOff, class Put>
__device__ __forceinline__ void put_rows_a(const RowsA<Cfg>& a, KOff koff, int k0, int kb, int ke, Put& put) {
    const int k = k0 + a.kt;
    const bool kok = !kCheck || (k >= kb && k < ke);
    const float* p = a.p + koff;
    const int rows = static_cast<int>(opaque(static_cast<unsigned>(a.rows)));
    // Opaque: a 32-bit step, so that a TowerPair, which picks one of two, still chains by IMAD.WIDE, not 64-bit adds.
    const int step = static_cast<int>(opaque(static_cast<unsigned>(a.step)));
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
        // Per row one compare and one IMAD.WIDE (the pointers chain).
        const bool ok = kAllRows || i < rows;
        put(i, p, kCheck ? ok && kok : ok);
        p += step;
    }
}

// True when 0 <= base + d < lim (one unsigned compare; base + d never overflows: both are > -2^30).
__device__ __forceinline__ bool inside(int base, int d, int lim) {
    return static_cast<unsigned>(base) + static_cast<unsigned>(d) < static_cast<unsigned>(lim);
}

// Window taps as bits (ops with kMask: windows of at most kMaskSide x kMaskSide). A window's *missing* mask has bit r
// (r < 15) set when row r of the window lies outside the image and bit 16 + s when column s does, and bits 15 and 31
// always; tap (r, s) has the key bit r | bit 16 + s, and lies inside exactly when missing & key == 0. One side of a
// load holds the mask (the thread's output or input pixel; the weight gradient's table entry, per pixel of the
// reduction), the other the key (the table entry, per tap; the weight gradient's thread, per column), so a load's
// bounds check is one AND. kTapNever (bit 15) is the key of nothing: every mask fails it; kTapMissingAll the mask of
// a window with no tap inside (or a pixel outside the GEMM).
constexpr int kMaskSide = 15;
constexpr unsigned kTapNever = 1u << 15, kTapMissingAll = 0xffffffffu;
__host__ __device__ __forceinline__ unsigned tap_key(int r, int s) { return (1u << r) | (1u << (16 + s)); }
__host__ __device__ inline bool mask_fits(int R, int S) { return R <= kMaskSide && S <= kMaskSide; }

// The gather-table entry of the tap-mask ops: an offset and a key (or, for the weight gradient, a missing mask).
struct TapEntry {
    int off;
    unsigned bit;
};
// B's tap-mask gather, elements i and i + 1: one 16-byte load of their two consecutive entries (TabSlot keeps
// a thread's entries consecutive and 16-byte aligned), then per copy an AND and an address add.
template <int kPer, class Put>
__device__ __forceinline__ void put_taps(const float* base, unsigned taps, const TapEntry* e0, Put& put) {
    static_assert(kPer % 2 == 0, "put_taps: an even number of elements");
#pragma unroll
    for (int i = 0; i < kPer; i += 2) {
        const int4 v = reinterpret_cast<const int4*>(e0)[i / 2];
        put(i, base + v.x, (taps & static_cast<unsigned>(v.y)) == 0u);
        put(i + 1, base + v.z, (taps & static_cast<unsigned>(v.w)) == 0u);
    }
}

// Tap rs = (r, s) of the window: its offset from a pixel's base, sign * (r*X + s) = sign * (r*(X - S) + rs) (X the
// width the tap moves in: x's W from an output pixel's window origin, -dy's Q from an input pixel), and its key.
__device__ __forceinline__ TapEntry tap_entry(const ConvGeom& g, int rs, int sign, int X) {
    const int r = g.fS.div(rs);
    return TapEntry{sign * (r * (X - g.S) + rs), tap_key(r, rs - r * g.S)};
}
// The in-loop entry of k = (j, rs) (channel-major, j the channel): j * jstride from one FastDiv, the rest from the
// lookup table of the window's taps.
__device__ __forceinline__ TapEntry channel_tap_entry(const ConvGeom& g, int k, const TapEntry* lut, int jstride) {
    const int j = g.fRS.div(k);
    const TapEntry e = lut[k - j * g.RS];
    return TapEntry{j * jstride + e.off, e.bit};
}

// The low n bits (n in [0, 32]).
__device__ __forceinline__ unsigned low_bits(int n) { return n >= 32 ? 0xffffffffu : (1u << n) - 1u; }

// The missing mask of a window whose rows [r0, r1) and columns [s0, s1) lie inside the image (r1, s1 <= 15).
__device__ __forceinline__ unsigned tap_mask(int r0, int r1, int s0, int s1) {
    if (r0 >= r1 || s0 >= s1) return kTapMissingAll;
    const unsigned rows = low_bits(r1) & ~low_bits(r0), cols = low_bits(s1) & ~low_bits(s0);
    return ~(rows | (cols << 16)) | kTapNever | (kTapNever << 16);
}

// Output pixel n of the forward (n < N): x at (img, the group's first channel, window origin h0, w0) and the taps
// (r, s) of its window that lie outside x as one mask (tap_mask; meaningful for windows that mask_fits).
__device__ __forceinline__ void fwd_pixel(const ConvGeom& g, const float* x, int z, int n, const float*& xb, int& h0,
                                          int& w0, unsigned& taps) {
    int img, pq, p, q;
    g.fPQ.divmod(n, img, pq);
    g.fQ.divmod(pq, p, q);
    h0 = p * g.sh - g.ph;
    w0 = q * g.sw - g.pw;
    taps = mask_fits(g.R, g.S) ? tap_mask(max(0, -h0), min(g.R, g.H - h0), max(0, -w0), min(g.S, g.W - w0))
                               : kTapMissingAll;
    xb = x + ((static_cast<int64_t>(img) * g.C + static_cast<int64_t>(z) * g.Cg) * g.HW +
              static_cast<int64_t>(h0) * g.W + w0);
}

// y[img, k, pq] of GEMM element (m, n) of group z: + bias, then the fused ReLU.
__device__ __forceinline__ void fwd_store(const ConvGeom& g, const float* b, int relu, float* y, int z, int m, int n,
                                          float v) {
    int img, pq;
    g.fPQ.divmod(n, img, pq);
    const int k = z * g.Kg + m;
    if (b != nullptr) v += b[k];
    if (relu != 0) v = relu_epilogue(v);
    y[(static_cast<int64_t>(img) * g.K + k) * g.PQ + pq] = v;
}

// ---- forward: y[n,k,p,q] = sum_{c,r,s} w[k,c,r,s] * x[n, c, p*sh-ph+r, q*sw-pw+s] + b[k] ----------
// GEMM per group: M = Kg (output channel), N = batch*P*Q (output pixel), Kr = Cg*R*S (c,r,s).
// A = weights, row-major (Kg x CgRS) slice: k-contiguous. B = im2col of x, gathered on the fly: threads
// walk output pixels (coalesced along q), each thread keeps one pixel per tile (its window origin and
// image base), and the table gives each k's tap (c*H*W + r*W + s, r, s): a load is two adds, two unsigned
// compares and an address add. kMask (mask_fits): the thread keeps which of its window's taps lie outside x as
// one mask and the table gives each k its tap's key instead of (r, s): the check is one AND.
template <bool kMask>
struct ConvFwd {
    static constexpr bool kAContigK = true, kBContigK = false, kTab = true;
    // Towers that share x stack (TowerStack) with the tap mask only: the kernels built for every architecture stay few.
    static constexpr bool kStacks = kMask;
    struct FullEntry {
        int off, r, s;  // tap offset from the window origin; r, s (kGatherInvalid outside the range)
        int unused;
    };
    // kMask: the tap offset and the tap's key (kTapNever outside the range)
    using Entry = std::conditional_t<kMask, TapEntry, FullEntry>;
    static constexpr int kLut = kMask ? kMaskSide * kMaskSide : 0;  // kMask: (r*W + s, key) of every tap rs
    int M, N;
    ConvGeom g;
    // The epilogue applies the ReLU (Conv2dParams::relu). An int in the 4 bytes before the pointers, so that the
    // struct has no padding: the emulator (tests/cuda_emu) takes every pointer-sized word of a kernel's parameter
    // struct that points into device memory for an operand, and uninitialized padding beside a bool could hold
    // a stale pointer (static_assert below).
    int relu;
    const float* x;
    const float* w;
    const float* b;
    float* y;

    __device__ Entry entry(int k, int kb, int ke) const {
        int c = 0, rs = 0, rr = kGatherInvalid, ss = kGatherInvalid;
        const bool in = k >= kb && k < ke;
        if (in) {
            g.fRS.divmod(k, c, rs);
            g.fS.divmod(rs, rr, ss);
        }
        const int off = in ? c * g.HW + rr * g.W + ss : 0;
        if constexpr (kMask) {
            return Entry{off, in ? tap_key(rr, ss) : kTapNever};
        } else {
            return Entry{off, rr, ss, 0};
        }
    }
    __device__ Entry lut_entry(int rs) const {
        if constexpr (kMask) {
            return rs < g.RS ? tap_entry(g, rs, 1, g.W) : Entry{0, kTapNever};
        } else {
            return entry(0, 0, 0);
        }
    }
    // k = (c, rs)
    __device__ Entry entry_loop(int k, const Entry* lut) const {
        if constexpr (kMask) {
            return channel_tap_entry(g, k, lut, g.HW);
        } else {
            return entry(k, 0, 0);
        }
    }
    template <class Cfg>
    struct Thread {
        RowsA<Cfg> a;
        const float* xb;  // x at (img, first channel of the group, h0, w0); only dereferenced inside x
        int h0, w0;       // window origin of this thread's output pixel (kGatherInvalid outside N)
        unsigned taps;    // kMask: the window's missing mask (tap_mask; every tap missing outside N)
    };
    template <class Cfg>
    __device__ Thread<Cfg> thread(int z, int m0, int n0) const {
        Thread<Cfg> t;
        t.a = rows_a<Cfg>(w + static_cast<int64_t>(z) * g.Kg * g.CgRS, g.CgRS, m0, M);
        t.xb = x;
        t.h0 = t.w0 = kGatherInvalid;
        t.taps = kTapMissingAll;
        const int n = n0 + TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>::mn(threadIdx.x, 0);
        if (n < N) fwd_pixel(g, x, z, n, t.xb, t.h0, t.w0, t.taps);
        return t;
    }
    __device__ void k_range(int, int& kb, int& ke) const {
        kb = 0;
        ke = g.CgRS;
    }
    // A's offset along k of the thread's k in the tile at k0 (every row's: TowerStack reads it once for two towers).
    template <class Cfg, bool kCheck, class Th>
    __device__ int a_koff(const Th& t, const Entry*, int k0) const {
        return k0 + t.a.kt;
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        put_rows_a<Cfg, kCheck>(t.a, a_koff<Cfg, kCheck>(t, tab, k0), k0, kb, ke, put);
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry* tab, int, int, int, Put& put) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>;
        const Entry* e0 = tab + TabSlot<Cfg>::of(Map::k(threadIdx.x, 0));
        if constexpr (kMask) {
            put_taps<Cfg::kBPerThread>(t.xb, t.taps, e0, put);
        } else {
#pragma unroll
            for (int i = 0; i < Cfg::kBPerThread; ++i) {
                const Entry e = e0[i];
                put(i, t.xb + e.off, inside(t.h0, e.r, g.H) & inside(t.w0, e.s, g.W));
            }
        }
    }
    template <class Th>
    __device__ void store(const Th&, int z, int m, int n, float v) const {
        fwd_store(g, b, relu, y, z, m, n, v);
    }
};

// Input pixel n of the grad-input (n < N): (hp, wp) = (h + pad_h, w + pad_w); dy at (img, the group's first channel)
// plus, with unit stride, hp*Q + wp (tap (r, s) then adds -(r*Q + s)); the taps (r, s) whose dy pixel (hp - r, wp - s)
// lies inside dy as a missing mask (unit stride, mask_fits: r in (hp - P, hp], s in (wp - Q, wp] are inside).
template <bool kUnit>
__device__ __forceinline__ void dgrad_pixel(const ConvGeom& g, const float* dy, int z, int n, const float*& dyb,
                                            int& hp, int& wp, unsigned& taps) {
    int img, hw, h, wx;
    g.fHW.divmod(n, img, hw);
    g.fW.divmod(hw, h, wx);
    hp = h + g.ph;
    wp = wx + g.pw;
    taps = mask_fits(g.R, g.S)
               ? tap_mask(max(0, hp - g.P + 1), min(g.R, hp + 1), max(0, wp - g.Q + 1), min(g.S, wp + 1))
               : kTapMissingAll;
    dyb = dy + (static_cast<int64_t>(img) * g.K + static_cast<int64_t>(z) * g.Kg) * g.PQ +
          (kUnit ? static_cast<int64_t>(hp) * g.Q + wp : 0);
}

// dx[img, c, hw] of GEMM element (m, n) of group z, through the ReLU below when relu_y is given.
__device__ __forceinline__ void dgrad_store(const ConvGeom& g, const float* relu_y, float* dx, int z, int m, int n,
                                            float v) {
    int img, hw;
    g.fHW.divmod(n, img, hw);
    const int64_t o = (static_cast<int64_t>(img) * g.C + static_cast<int64_t>(z) * g.Cg + m) * g.HW + hw;
    dx[o] = relu_grad_epilogue(v, relu_y, o);
}

// ---- backward input: dx[n,c,h,w] = sum_{k,r,s} w[k,c,r,s] * dy[n, k, (h+ph-r)/sh, (w+pw-s)/sw] ------
// over the taps where both divisions are exact and land inside dy (the transposed implicit GEMM).
// GEMM per group: M = Cg (input channel), N = batch*H*W (input pixel), Kr = Kg*R*S (k,r,s).
// A(c, (k,rs)) = w[k, c, rs]: k-contiguous within each run of R*S. B = gather of dy: threads walk input
// pixels (coalesced along w), each thread keeps one pixel per tile. The table gives each k = (ko, r, s)
// its weight offset and dy tap. kUnit (stride 1 both ways, every AlexNet layer that needs this pass): the
// tap is dy at (h + ph - r, w + pw - s), so a load is two adds, two compares and an address add; strided,
// the division by the stride stays per element (FastDiv). kMask (kUnit and mask_fits): as in ConvFwd, the
// thread's valid taps in one mask and each entry's tap bit in r.
template <bool kUnit, bool kMask = false>
struct ConvBwdInput {
    static_assert(kUnit || !kMask, "ConvBwdInput: the tap mask needs stride 1");
    static constexpr bool kAContigK = true, kBContigK = false, kTab = true;
    struct FullEntry {
        int aoff;  // ko * Cg*R*S + r*S + s: the weight offset of k (row c adds c*R*S)
        int boff;  // kUnit: ko*P*Q - r*Q - s (from the thread's (h+ph, w+pw) base); else ko*P*Q
        int r, s;  // kUnit: -r, -s; else r, s (kGatherInvalid outside the range, either way failing)
    };
    // kMask: boff and the tap's key (kTapNever outside the range); A's weight offset comes from k itself (a_off)
    using Entry = std::conditional_t<kMask, TapEntry, FullEntry>;
    static constexpr int kLut = kMask ? kMaskSide * kMaskSide : 0;  // kMask: (-(r*Q + s), key) of every tap rs
    int M, N;
    ConvGeom g;
    const float* dy;
    const float* w;
    float* dx;
    const float* relu_y;  // nullable: the epilogue passes dx back through the ReLU whose output x was

    __device__ Entry entry(int k, int kb, int ke) const {
        int ko = 0, rs = 0, rr = 0, ss = 0;
        const bool in = k >= kb && k < ke;
        if (in) {
            g.fRS.divmod(k, ko, rs);
            g.fS.divmod(rs, rr, ss);
        }
        const int boff = in ? (kUnit ? ko * g.PQ - rr * g.Q - ss : ko * g.PQ) : 0;
        if constexpr (kMask) {
            return Entry{boff, in ? tap_key(rr, ss) : kTapNever};
        } else {
            const int bad = kGatherInvalid;
            return Entry{in ? ko * g.CgRS + rs : 0, boff, in ? (kUnit ? -rr : rr) : bad, in ? (kUnit ? -ss : ss) : bad};
        }
    }
    __device__ Entry lut_entry(int rs) const {
        if constexpr (kMask) {
            return rs < g.RS ? tap_entry(g, rs, -1, g.Q) : Entry{0, kTapNever};
        } else {
            return entry(0, 0, 0);
        }
    }
    // k = (ko, rs)
    __device__ Entry entry_loop(int k, const Entry* lut) const {
        if constexpr (kMask) {
            return channel_tap_entry(g, k, lut, g.PQ);
        } else {
            return entry(k, 0, 0);
        }
    }
    // The weight offset of k = (ko, rs): ko * Cg*R*S + rs = k + ko * (Cg - 1) * R*S. With kCheck, k < 0 (the first
    // tile's k below the range, whose copies are all off) divides 0 instead.
    template <bool kCheck>
    __device__ int a_off(int k) const { return k + g.fRS.div(kCheck ? max(k, 0) : k) * (g.CgRS - g.RS); }
    template <class Cfg>
    struct Thread {
        RowsA<Cfg> a;
        const float* dyb;  // kUnit: dy at (img, group's first channel, h+ph, w+pw); else at (img, channel)
        int hp, wp;        // h + pad_h, w + pad_w of this thread's input pixel (kGatherInvalid outside N;
                           // strided: -kGatherInvalid, which no tap reaches)
        unsigned taps;     // kMask: the missing mask of the taps reaching dy (every tap missing outside N)
    };
    template <class Cfg>
    __device__ Thread<Cfg> thread(int z, int m0, int n0) const {
        Thread<Cfg> t;
        t.a = rows_a<Cfg>(w + static_cast<int64_t>(z) * g.Kg * g.CgRS, g.RS, m0, M);
        t.dyb = dy;
        t.hp = t.wp = kUnit ? kGatherInvalid : -kGatherInvalid;
        t.taps = kTapMissingAll;
        const int n = n0 + TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>::mn(threadIdx.x, 0);
        if (n < N) {
            dgrad_pixel<kUnit>(g, dy, z, n, t.dyb, t.hp, t.wp, t.taps);
            }
        return t;
    }
    __device__ void k_range(int, int& kb, int& ke) const {
        kb = 0;
        ke = g.Kg * g.RS;
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        if constexpr (kMask) {
            put_rows_a<Cfg, kCheck>(t.a, a_off<kCheck>(k0 + t.a.kt), k0, kb, ke, put);
        } else {
            put_rows_a<Cfg, kCheck>(t.a, tab[TabSlot<Cfg>::of(t.a.kt)].aoff, k0, kb, ke, put);
        }
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry* tab, int, int, int, Put& put) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>;
        const Entry* e0 = tab + TabSlot<Cfg>::of(Map::k(threadIdx.x, 0));
        if constexpr (kMask) {
            put_taps<Cfg::kBPerThread>(t.dyb, t.taps, e0, put);
        } else {
#pragma unroll
            for (int i = 0; i < Cfg::kBPerThread; ++i) {
                const Entry e = e0[i];
                if (kUnit) {
                    put(i, t.dyb + e.boff, inside(t.hp, e.r, g.P) & inside(t.wp, e.s, g.Q));
                } else {
                    const int hs = t.hp - e.r, ws = t.wp - e.s;  // = p*sh, q*sw when this tap hits dy
                    int p, ph_rem, q, pw_rem;
                    g.fsh.divmod(max(hs, 0), p, ph_rem);
                    g.fsw.divmod(max(ws, 0), q, pw_rem);
                    const bool ok = hs >= 0 && ws >= 0 && ph_rem == 0 && pw_rem == 0 && p < g.P && q < g.Q;
                    put(i, t.dyb + (e.boff + static_cast<int64_t>(p) * g.Q + q), ok);
                }
            }
        }
    }
    template <class Th>
    __device__ void store(const Th&, int z, int m, int n, float v) const {
        dgrad_store(g, relu_y, dx, z, m, n, v);
    }
};

// ---- channel-inner order: forward and grad-input with one bounds check per tap -------------------------------
// The reduction of the forward runs over (c, r, s) and that of the grad-input over (ko, r, s); the ops above walk
// it channel-major (k = c*R*S + rs), so the 16 k's of a tile are 16 different taps, each with its own table entry
// and bounds check per copy. These walk it tap-major, k = rs*J + j (J = Cg forward, Kg grad-input; j the channel),
// which needs J % 16 == 0 (every 16-deep tile then lies inside one tap): all of a thread's B copies of a tile read
// one tap of 16 channels, so one bit of the thread's tap mask checks them all and their addresses step by the
// channel stride (H*W of x, P*Q of dy). A per-block lookup table gives each tile its tap's offset and bit (one
// 8-byte shared load per tile, no per-k gather table), which caps Kr at kTapTiles tiles. A is a copy of the
// weights in that order (conv_weight_order below: rows of Kr = R*S*J, padded with zero rows to a whole number of
// row tiles), so its copies check no row either. A different order of the same sum: within the tolerance of the
// reference, and deterministic (the order depends only on the shape).
constexpr int kTapStep = 16;    // the GEMM's k-step (GemmCfg::BK)
constexpr int kTapTiles = 256;  // lookup-table entries: Kr <= 4096 (AlexNet's largest is conv2's grad-input, 3200)

// A of the channel-inner ops: thread t's rows m0 + t/16 + (T/16) i of the reordered weights, its k at k0 + t % 16.
template <class Cfg>
struct DenseA {
    const float* p;  // reordered weights at (row m0 + t/16, k = t % 16)
    int step;        // (T/16) * Kr: from one of the thread's rows to the next
    int kt;          // t % 16
};
template <class Cfg>
__device__ __forceinline__ DenseA<Cfg> dense_a(const float* rows, int kr, int m0) {
    using Map = TileMap<Cfg::BM, Cfg::BK, true, Cfg::kThreads>;
    DenseA<Cfg> a;
    a.kt = Map::k(threadIdx.x, 0);
    a.p = opaque_ptr(rows + static_cast<int64_t>(m0 + Map::mn(threadIdx.x, 0)) * kr + a.kt);
    a.step = Map::kStep * kr;
    return a;
}
template <class Cfg, bool kCheck, class Put>
__device__ __forceinline__ void put_dense_a(const DenseA<Cfg>& a, int k0, int kb, int ke, Put& put) {
    const int k = k0 + a.kt;
    const bool kok = !kCheck || (k >= kb && k < ke);
    const float* p = a.p + k0;
    const int step = static_cast<int>(opaque(static_cast<unsigned>(a.step)));  // one IMAD.WIDE per row, also in a pair
#pragma unroll
    for (int i = 0; i < Cfg::kAPerThread; ++i) {
        put(i, p, kok);  // rows are padded to the tile: no row check
        p += step;
    }
}

// The lookup-table entry of tile i (k = 16 i .. 16 i + 15: tap rs = 16 i / J, channels j0 = 16 i - rs*J on): the
// offset of (tap, channel j0) from a pixel's base (tap_entry's plus j0 * cstride) and the tap's key; tiles past Kr
// get {0, kTapNever}.
__device__ __forceinline__ TapEntry tap_tile_entry(const ConvGeom& g, const FastDiv& fJ, int kr, int i, int sign, int X,
                                                   int cstride) {
    const int k = i * kTapStep;
    if (k >= kr) return TapEntry{0, kTapNever};
    const int rs = fJ.div(k);
    TapEntry e = tap_entry(g, rs, sign, X);
    e.off += (k - rs * fJ.d) * cstride;
    return e;
}

// B of the channel-inner ops for the tile at k0: element i is channel j0 + kt + kStep*i (kt, kStep: the thread's
// k-lane, TileMap) at the tile's tap, `base + e.off + (kStep*i) * cstride` (base: the pixel's base plus kt*cstride),
// read when the thread's missing mask lacks the tap's key bits (and, with kCheck, its k lies in [kb, ke)).
template <class Cfg, bool kCheck, class Put>
__device__ __forceinline__ void put_tap_channels(const float* base, unsigned taps, int step, const TapEntry* lut,
                                                 int k0, int kb, int ke, Put& put) {
    static_assert(Cfg::BK == kTapStep, "put_tap_channels: one tap per k-step");
    using Map = TileMap<Cfg::BN, Cfg::BK, false, Cfg::kThreads>;
    const TapEntry e = lut[k0 / kTapStep];
    const bool ok = (taps & e.bit) == 0u;
    const float* p = base + e.off;
    step = static_cast<int>(opaque(static_cast<unsigned>(step)));
#pragma unroll
    for (int i = 0; i < Cfg::kBPerThread; ++i) {
        const int k = k0 + Map::k(threadIdx.x, i);
        put(i, p, kCheck ? ok && k >= kb && k < ke : ok);
        p += step;
    }
}

// The thread state of the channel-inner ops.
template <class Cfg>
struct TapThread {
    DenseA<Cfg> a;
    const float* base;  // the pixel's base plus kt*cstride; only dereferenced inside x / dy
    unsigned taps;      // the pixel's missing mask (tap_mask; every tap missing outside N)
    int step;           // kStep * cstride
};

// The channel-inner forward (kDgrad false: mask_fits, Cg % 16 == 0; A = the weights reordered to (Kg rows padded to
// mpad) x (rs, c), B = x at tap rs of the thread's output window, channels c) and grad-input (kDgrad true: stride 1,
// mask_fits, Kg % 16 == 0; A = the weights reordered to (Cg rows padded) x (rs, ko), B = dy at (hp - r, wp - s) of
// the thread's input pixel, channels ko).
template <bool kDgrad>
struct ConvTap {
    static constexpr bool kAContigK = true, kBContigK = false, kTab = false;
    static constexpr int kLut = kTapTiles;
    using Entry = TapEntry;
    int M, N;
    ConvGeom g;
    FastDiv fJ;        // J = Cg (forward) or Kg (grad-input)
    int kr, mpad;      // R*S*J; rows of each group's reordered weights
    int relu, unused;  // forward: the ReLU in the epilogue; 4 bytes so that the struct has no padding (see ConvFwd)
    const float* src;     // x (forward) or dy (grad-input)
    const float* wr;      // conv_weight_order's copy of w
    const float* bias;    // forward, nullable
    const float* relu_y;  // grad-input, nullable: the epilogue passes dx back through the ReLU whose output x was
    float* out;           // y or dx

    __device__ Entry entry(int, int, int) const { return Entry{0, 0u}; }
    __device__ Entry entry_loop(int, const Entry*) const { return Entry{0, 0u}; }
    // forward: tap (r, s) lies r*W + s from the window origin; grad-input: it reads dy -(r*Q + s) from the pixel's
    __device__ Entry lut_entry(int i) const {
        return kDgrad ? tap_tile_entry(g, fJ, kr, i, -1, g.Q, g.PQ) : tap_tile_entry(g, fJ, kr, i, 1, g.W, g.HW);
    }
    template <class Cfg>
    __device__ TapThread<Cfg> thread(int z, int m0, int n0) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>;
        const int cstride = kDgrad ? g.PQ : g.HW;
        TapThread<Cfg> t;
        t.a = dense_a<Cfg>(wr + static_cast<int64_t>(z) * mpad * kr, kr, m0);
        t.base = src;
        t.taps = kTapMissingAll;
        t.step = Map::kStep * cstride;
        int u, v;
        const int n = n0 + Map::mn(threadIdx.x, 0);
        if (n < N) {
            if constexpr (kDgrad) {
                dgrad_pixel<true>(g, src, z, n, t.base, u, v, t.taps);
            } else {
                fwd_pixel(g, src, z, n, t.base, u, v, t.taps);
            }
            t.base += static_cast<int64_t>(Map::k(threadIdx.x, 0)) * cstride;
        }
        return t;
    }
    __device__ void k_range(int, int& kb, int& ke) const {
        kb = 0;
        ke = kr;
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry*, int k0, int kb, int ke, Put& put) const {
        put_dense_a<Cfg, kCheck>(t.a, k0, kb, ke, put);
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry* lut, int k0, int kb, int ke, Put& put) const {
        put_tap_channels<Cfg, kCheck>(t.base, t.taps, t.step, lut, k0, kb, ke, put);
    }
    template <class Th>
    __device__ void store(const Th&, int z, int m, int n, float v) const {
        if constexpr (kDgrad) {
            dgrad_store(g, relu_y, out, z, m, n, v);
        } else {
            fwd_store(g, bias, relu, out, z, m, n, v);
        }
    }
};

// The weights (K, Cg, R, S) of up to two towers in the channel-inner order: out[grp][m][rs][j] = w at (out channel
// grp*Kg + ko, in channel c, rs) with (ko, c) = (m, j) for the forward and (j, m) for the grad-input; rows m in
// [rows, mpad) are zero. A thread per element, coalesced along j; blockIdx.y: the tower.
struct WeightOrder {
    const float* w[2];
    float* out[2];
    int groups, rows, mpad, J, RS, Cg, Kg, dgrad;
};
__global__ void __launch_bounds__(kThreads1d) conv_weight_order_kernel(WeightOrder o) {
    const float* __restrict__ w = pick(o.w, blockIdx.y);
    float* __restrict__ out = pick(o.out, blockIdx.y);
    const int64_t total = static_cast<int64_t>(o.groups) * o.mpad * o.RS * o.J;
    for (int64_t i = global_thread_id(); i < total; i += global_thread_count()) {
        const int j = static_cast<int>(i % o.J);
        const int64_t t = i / o.J;
        const int rs = static_cast<int>(t % o.RS);
        const int64_t gm = t / o.RS;
        const int m = static_cast<int>(gm % o.mpad), grp = static_cast<int>(gm / o.mpad);
        float v = 0.0f;
        if (m < o.rows) {
            const int ko = o.dgrad ? j : m, c = o.dgrad ? m : j;
            v = w[(static_cast<int64_t>(grp) * o.Kg + ko) * o.Cg * o.RS + static_cast<int64_t>(c) * o.RS + rs];
        }
        out[i] = v;
    }
}

// ---- backward weight: dw[k,c,r,s] = sum_{n,p,q} dy[n,k,p,q] * x[n, c, p*sh-ph+r, q*sw-pw+s] ----------
// GEMM per group: M = Kg, N = Cg*R*S, Kr = batch*P*Q, split into `splits` slices (z = g*splits + split)
// whose partial products go to a workspace [splits][K][Cg*R*S] (or straight to dw when splits == 1).
// A = dy is k-contiguous (k walks q); B = im2col of x is read with threads walking its columns (c, r, s),
// coalesced along s, each thread keeping one column per tile (offset c*H*W + r*W + s, and r, s). The table
// gives each k = (img, p, q) its dy offset, its x offset at the window origin and the origin itself.
// kMask (mask_fits and P, Q <= kWgradLutRows, the lookup tables of the in-loop entries): the entry gives the
// x offset and the window's taps inside x as one mask, the thread its column's tap bit: the check is one AND.
constexpr int kWgradLutRows = 64;

template <bool kMask>
struct ConvBwdWeight {
    static constexpr bool kAContigK = true, kBContigK = false, kTab = true;
    static constexpr bool kStacks = kMask;  // as ConvFwd's
    // kMask: per output row p (h0*W, the taps (r, any s) inside x), then per output column q (w0, the taps (any r,
    // s) inside x): an entry in the loop is two divisions, two table reads, and the AND of the two masks.
    static constexpr int kLut = kMask ? 2 * kWgradLutRows : 0;
    struct FullEntry {
        int aoff;    // img * K*P*Q + p*Q + q (32-bit: dy and x hold < 2^31 elements, ConvGeom)
        int boff;    // img * C*H*W + h0*W + w0
        int h0, w0;  // p*sh - ph, q*sw - pw (kGatherInvalid outside the range)
    };
    // kMask: boff and the taps (r, s) of the window at (h0, w0) that lie inside x (0 outside the range), as in
    // ConvFwd's per-thread mask; A's dy offset comes from k itself (a_off).
    using Entry = std::conditional_t<kMask, TapEntry, FullEntry>;
    int M, N, Kr, kchunk, splits;
    ConvGeom g;
    const float* x;
    const float* dy;
    float* out;  // dw or the workspace

    __device__ Entry entry(int k, int kb, int ke) const {
        int img = 0, pq = 0, p = 0, q = 0;
        const bool in = k >= kb && k < ke;
        if (in) {
            g.fPQ.divmod(k, img, pq);
            g.fQ.divmod(pq, p, q);
        }
        const int h0 = p * g.sh - g.ph, w0 = q * g.sw - g.pw;
        const int boff = in ? img * g.C * g.HW + h0 * g.W + w0 : 0;
        if constexpr (kMask) {
            return Entry{boff, in ? tap_mask(max(0, -h0), min(g.R, g.H - h0), max(0, -w0), min(g.S, g.W - w0))
                                  : kTapMissingAll};
        } else {
            const int bad = kGatherInvalid;
            return Entry{in ? img * g.K * g.PQ + pq : 0, boff, in ? h0 : bad, in ? w0 : bad};
        }
    }
    __device__ Entry lut_entry(int i) const {
        if constexpr (kMask) {
            const bool row = i < kWgradLutRows;
            const int j = row ? i : i - kWgradLutRows;
            if (j >= (row ? g.P : g.Q)) return Entry{0, 0u};
            if (row) {
                const int h0 = j * g.sh - g.ph;
                return Entry{h0 * g.W, tap_mask(max(0, -h0), min(g.R, g.H - h0), 0, g.S) & 0xffffu};
            }
            const int w0 = j * g.sw - g.pw;
            return Entry{w0, tap_mask(0, g.R, max(0, -w0), min(g.S, g.W - w0)) & 0xffff0000u};
        } else {
            return entry(0, 0, 0);
        }
    }
    __device__ Entry entry_loop(int k, const Entry* lut) const {
        if constexpr (kMask) {
            const int img = g.fPQ.div(k), pq = k - img * g.PQ;
            const int p = g.fQ.div(pq);
            const Entry r = lut[p], c = lut[kWgradLutRows + pq - p * g.Q];
            return Entry{img * g.C * g.HW + r.off + c.off, r.bit | c.bit};  // a tap is missing if its row or column is
        } else {
            return entry(k, 0, 0);
        }
    }
    // The dy offset of k = (img, pq): img * K*P*Q + pq = k + img * (K - 1) * P*Q. With kCheck, k < 0 (the first
    // tile's k below the range, whose copies are all off) divides 0 instead.
    template <bool kCheck>
    __device__ int a_off(int k) const { return k + g.fPQ.div(kCheck ? max(k, 0) : k) * ((g.K - 1) * g.PQ); }
    template <class Cfg>
    struct Thread {
        RowsA<Cfg> a;
        int split;
        const float* xb;  // x at the group's first channel
        int coff;         // c*H*W + r*W + s of this thread's B column (c, r, s)
        int roff, soff;   // its r, s (kGatherInvalid when the column is outside N)
        unsigned bit;     // kMask: the column's tap key (kTapNever outside N)
    };
    template <class Cfg>
    __device__ Thread<Cfg> thread(int z, int m0, int n0) const {
        Thread<Cfg> t;
        const int grp = z / splits;
        t.split = z - grp * splits;
        t.a = rows_a<Cfg>(dy + static_cast<int64_t>(grp) * g.Kg * g.PQ, g.PQ, m0, M);
        t.xb = x + static_cast<int64_t>(grp) * g.Cg * g.HW;
        const int n = n0 + TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>::mn(threadIdx.x, 0);
        int c = 0, rs = 0, rr = kGatherInvalid, ss = kGatherInvalid;
        if (n < N) {
            g.fRS.divmod(n, c, rs);
            g.fS.divmod(rs, rr, ss);
        }
        t.coff = n < N ? c * g.HW + rr * g.W + ss : 0;
        t.roff = rr;
        t.soff = ss;
        t.bit = kMask && n < N ? tap_key(rr, ss) : kTapNever;
        return t;
    }
    __device__ void k_range(int z, int& kb, int& ke) const {
        const int split = z % splits;
        kb = split * kchunk;
        ke = min(Kr, kb + kchunk);
    }
    template <class Cfg, bool kCheck, class Th>
    __device__ int a_koff(const Th& t, const Entry* tab, int k0) const {
        if constexpr (kMask) {
            return a_off<kCheck>(k0 + t.a.kt);
        } else {
            return tab[TabSlot<Cfg>::of(t.a.kt)].aoff;
        }
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        put_rows_a<Cfg, kCheck>(t.a, a_koff<Cfg, kCheck>(t, tab, k0), k0, kb, ke, put);
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry* tab, int, int, int, Put& put) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK, Cfg::kThreads>;
        const Entry* e0 = tab + TabSlot<Cfg>::of(Map::k(threadIdx.x, 0));
        const float* p = opaque_ptr(t.xb + t.coff);
        if constexpr (kMask) {
            put_taps<Cfg::kBPerThread>(p, t.bit, e0, put);
        } else {
#pragma unroll
            for (int i = 0; i < Cfg::kBPerThread; ++i) {
                const Entry e = e0[i];
                put(i, p + e.boff, inside(e.h0, t.roff, g.H) & inside(e.w0, t.soff, g.W));
            }
        }
    }
    template <class Th>
    __device__ void store(const Th& t, int z, int m, int n, float v) const {
        const int64_t slice = static_cast<int64_t>(g.K) * g.CgRS;
        const int grp = z / splits;
        out[t.split * slice + (static_cast<int64_t>(grp) * g.Kg + m) * g.CgRS + n] = v;
    }
};

// ---- two towers on one B: conv1 of the paper's net, whose towers both read the images --------------------------
// TowerPair runs the towers' GEMMs side by side, each block gathering its own copy of B. When both read the same x
// (the forward and the weight gradient of a layer whose towers share their input), the towers' A rows can be stacked
// instead: one GEMM of M = 2 M0 on one gathered B, rows [0, M0) tower 0's and [M0, 2 M0) tower 1's, on a tile of
// BM = 2 M0 rows (GemmStack: M0 = 48, 256 threads). Per block the B copies per thread halve, and B's gather (a table
// read, an AND and an address per copy) is most of what a 6x8 micro-tile's loop issues besides FFMA. A thread's A
// rows are t/16 + 16 i (TileMap, k-contiguous): with M0 a multiple of 16, its first half lies in tower 0's rows and
// its second half in the same rows of tower 1, so the two halves are two chains of RowsA from one k offset. Each
// output's k-sum runs in the order a launch of its own tower gives it (the tile never changes that order; the
// weight gradient keeps that launch's split-K): bit for bit the single launches.
template <class Op>
struct TowerStack {
    static constexpr bool kAContigK = Op::kAContigK, kBContigK = Op::kBContigK, kTab = Op::kTab;
    static constexpr int kLut = Op::kLut;
    using Entry = typename Op::Entry;
    int M, N;  // M = 2 * op0.M
    Op op0, op1;

    template <class Cfg>
    struct Thread {
        typename Op::template Thread<Cfg> t0;  // tower 0's state: its A rows, and B's (shared)
        RowsA<Cfg> t1a;                        // tower 1's A rows
    };
    __device__ Entry entry(int k, int kb, int ke) const { return op0.entry(k, kb, ke); }
    __device__ Entry lut_entry(int i) const { return op0.lut_entry(i); }
    __device__ Entry entry_loop(int k, const Entry* lut) const { return op0.entry_loop(k, lut); }
    template <class Cfg>
    __device__ Thread<Cfg> thread(int z, int m0, int n0) const {
        static_assert(Op::kAContigK && Cfg::BM % (2 * TileMap<Cfg::BM, Cfg::BK, true, Cfg::kThreads>::kStep) == 0,
                      "TowerStack: each tower's rows a whole number of a thread's row steps");
        return Thread<Cfg>{op0.template thread<Cfg>(z, m0, n0), op1.template thread<Cfg>(z, m0, n0).a};
    }
    __device__ void k_range(int z, int& kb, int& ke) const { op0.k_range(z, kb, ke); }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        constexpr int kHalf = RowsA<Cfg>::kN / 2;
        const int koff = op0.template a_koff<Cfg, kCheck>(t.t0, tab, k0);
        // Every row is inside: each tower's M0 = BM / 2 rows fill its half of the one row tile (launch_stacked).
        put_rows_a<Cfg, kCheck, kHalf, true>(t.t0.a, koff, k0, kb, ke, put);
        const auto second = [&put](int i, const float* src, bool ok) { put(kHalf + i, src, ok); };
        put_rows_a<Cfg, kCheck, kHalf, true>(t.t1a, koff, k0, kb, ke, second);
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        op0.template fetch_b<Cfg, kCheck>(t.t0, tab, k0, kb, ke, put);
    }
    template <class Th>
    __device__ void store(const Th& t, int z, int m, int n, float v) const {
        if (m < op0.M) op0.store(t.t0, z, m, n, v);
        else op1.store(t.t0, z, m - op0.M, n, v);
    }
};

// Forward and grad-input: 128x128, 64x128 or 48x128 tiles (conv_tile); launches over Z = groups slices.
template <class Cfg, class Op>
void launch_tiles(const char* opname, const Op& op, int Z, cudaStream_t s) {
    gemm_tiled_kernel<Cfg><<<gemm_grid<Cfg>(opname, op.M, op.N, Z), Cfg::kThreads, 0, s>>>(op);
    AX_LAUNCH_CHECK(opname);
}
// n = 1 tower's op over zper slices, or both towers' (n = 2) in one launch: tower 1's slices after tower 0's.
template <class Cfg, class Op>
void launch_tower_tiles(const char* opname, const Op* ops, int n, int zper, cudaStream_t s) {
    require(static_cast<int64_t>(zper) * n <= 65535, opname, "too many groups for one launch");
    if (n == 1) {
        launch_tiles<Cfg>(opname, ops[0], zper, s);
    } else {
        launch_tiles<Cfg>(opname, TowerPair<Op>{ops[0].M, ops[0].N, zper, ops[0], ops[1]}, 2 * zper, s);
    }
}
template <class Op>
void launch_conv_gemm(const char* opname, const Op& op, int Z, cudaStream_t s) {
    switch (conv_tile(op.M, op.N, Z)) {
        case Tile::Big: launch_tiles<GemmBig>(opname, op, Z, s); break;
        case Tile::Narrow: launch_tiles<GemmNarrow>(opname, op, Z, s); break;
        default: launch_tiles<GemmWide>(opname, op, Z, s); break;
    }
}

// Both towers' ops stacked on one B over zper slices, when the op stacks (kStacks: the tap-mask forward and weight
// gradient), both towers read the same x and each has GemmStack's half of its rows. False: nothing launched.
template <class Op>
bool launch_stacked(const char* opname, const Op* ops, int n, int zper, cudaStream_t s) {
    if constexpr (Op::kStacks) {
        if (n == 2 && ops[0].x == ops[1].x && 2 * ops[0].M == GemmStack::BM) {
            launch_tiles<GemmStack>(opname, TowerStack<Op>{2 * ops[0].M, ops[0].N, ops[0], ops[1]}, zper, s);
            return true;
        }
    }
    return false;
}

// Weight gradient of n = 1 or 2 towers (ops[i] -> dw[i], the same shapes) on tile Cfg: split-K as
// choose_split_k<Cfg> says for one tower (a pair keeps that split, so its bits are the single launch's), the
// partial sums of `splits` > 1 slices in a workspace that one split_reduce launch adds in slice order for every
// tower, together with the `extra` reductions the caller hands in (the bias gradient's slices). Towers that stack
// (launch_stacked) do so from the 48-row tile, keeping its split.
template <class Cfg, class Op>
void launch_conv_wgrad(const char* opname, Op* ops, int n, const Conv2dParams& p, float* const* dw,
                       const SplitSeg* extra, int nextra, void* stream) {
    int chunk = 0;
    const int splits = choose_split_k<Cfg>(gemm_tiles<Cfg>(ops[0].M, ops[0].N) * p.groups, ops[0].Kr, &chunk);
    const int zper = splits * p.groups;
    const int64_t total = static_cast<int64_t>(p.K) * ops[0].g.CgRS;
    Tensor ws;
    if (splits > 1) ws = workspace(opname, total * splits * n, stream);
    for (int i = 0; i < n; ++i) {
        ops[i].splits = splits;
        ops[i].kchunk = chunk;
        ops[i].out = splits == 1 ? dw[i] : ws.data<float>() + i * total * splits;
    }
    if (!(std::is_same_v<Cfg, GemmNarrow> && launch_stacked(opname, ops, n, zper, as_stream(stream))))
        launch_tower_tiles<Cfg>(opname, ops, n, zper, as_stream(stream));
    SplitSeg segs[kMaxSplitSegs];
    int count = 0;
    if (splits > 1)
        for (int i = 0; i < n; ++i) segs[count++] = split_seg(total, splits, ws.data<float>() + i * total * splits, dw[i]);
    for (int j = 0; j < nextra; ++j) segs[count++] = extra[j];
    split_reduce(opname, segs, count, stream);
}

template <bool kMask>
void conv_wgrad_towers(const Conv2dParams& p, const ConvGeom& g, int n, const float* const* x, const float* const* dy,
                       float* const* dw, void* stream, const SplitSeg* extra, int nextra) {
    const char* opname = "conv2d_backward_weight";
    using Op = ConvBwdWeight<kMask>;
    const int u = n - 1;
    Op ops[2] = {Op{g.Kg, g.CgRS, p.N * g.PQ, 0, 1, g, x[0], dy[0], dw[0]},
                 Op{g.Kg, g.CgRS, p.N * g.PQ, 0, 1, g, x[u], dy[u], dw[u]}};
    switch (split_tile(g.Kg, g.CgRS, p.groups, true, Tile::Wide)) {
        case Tile::Big: launch_conv_wgrad<GemmBig>(opname, ops, n, p, dw, extra, nextra, stream); break;
        case Tile::Narrow: launch_conv_wgrad<GemmNarrow>(opname, ops, n, p, dw, extra, nextra, stream); break;
        default: launch_conv_wgrad<GemmWide>(opname, ops, n, p, dw, extra, nextra, stream); break;
    }
}

// The n towers' weight gradients (x[i], dy[i] -> dw[i]) on the tile split_tile picks for one tower; with the
// tap mask (one AND per copy) when the window fits it (mask_fits) and the output has at most 64 rows and columns.
// `extra`: reductions the caller adds to the weight gradient's split-K reduce launch (the bias's slice sums).
void conv_wgrad(const Conv2dParams& p, int n, const float* const* x, const float* const* dy, float* const* dw,
                void* stream, const SplitSeg* extra = nullptr, int nextra = 0) {
    const char* opname = "conv2d_backward_weight";
    if (static_cast<int64_t>(p.K) * (p.C / p.groups) * p.R * p.S == 0) {
        split_reduce(opname, extra, nextra, stream);
        return;
    }
    const ConvGeom g(p, opname);
    if (mask_fits(g.R, g.S) && g.P <= kWgradLutRows && g.Q <= kWgradLutRows) {
        conv_wgrad_towers<true>(p, g, n, x, dy, dw, stream, extra, nextra);
    } else {
        conv_wgrad_towers<false>(p, g, n, x, dy, dw, stream, extra, nextra);
    }
}

// A pair of ops on one stream: tower 1's slices follow tower 0's in blockIdx.z.
template <class Op>
void launch_conv_pair(const char* opname, const Op& op0, const Op& op1, int groups, cudaStream_t s) {
    require(2 * static_cast<int64_t>(groups) <= 65535, opname, "too many groups for one launch");
    launch_conv_gemm(opname, TowerPair<Op>{op0.M, op0.N, groups, op0, op1}, 2 * groups, s);
}

// db[k] = sum over n, p, q of dy[n,k,p,q], in two fixed-order passes (no atomics). Channel k's N*P*Q values,
// flattened as j = n*PQ + pq, are cut into `splits` equal slices; block (k, s) sums slice s (thread t takes j =
// start + t, t + 256, ..., coalesced along pq) with a fixed-order tree and writes part[s * K + k]; the second pass,
// split_reduce (common.cuh), adds each channel's slices in its fixed order: its own launch for one tower, and for
// both towers of a pair inside the weight gradient's split-K reduce launch (conv2d_backward_weight_bias_pair). One
// block per channel left AlexNet's conv1 with 48 blocks on a 132-SM GPU; the split keeps about kBiasTargetBlocks
// blocks in flight. splits depends only on the shape, so the result is deterministic and a pair's bits are a
// single tower's. With splits == 1 the first kernel writes db itself. blockIdx.z: the tower.
constexpr int kBiasThreads = 256;
constexpr int64_t kBiasTargetBlocks = 1056;  // 132 SMs x 8 blocks of 256 threads: every thread slot busy
constexpr int64_t kBiasMinPerThread = 4;    // a slice gives each thread at least this many values

inline int conv_bias_splits(int K, int64_t per_channel) {
    const int64_t want = (kBiasTargetBlocks + K - 1) / K;
    const int64_t most = (per_channel + kBiasThreads * kBiasMinPerThread - 1) / (kBiasThreads * kBiasMinPerThread);
    const int64_t s = want < most ? want : most;
    return static_cast<int>(s < 1 ? 1 : (s > 65535 ? 65535 : s));
}

struct BiasTowers {
    const float* dy[2];
    float* part[2];
};

__global__ void __launch_bounds__(kBiasThreads)
    conv2d_backward_bias_kernel(int K, int PQ, int64_t per_channel, int64_t chunk, BiasTowers bt) {
    __shared__ float red[kBiasThreads / 32 + 1];
    const int k = blockIdx.x, s = blockIdx.y;
    const float* __restrict__ dy = pick(bt.dy, blockIdx.z);
    const int64_t j0 = static_cast<int64_t>(s) * chunk;
    const int64_t j1 = j0 + chunk < per_channel ? j0 + chunk : per_channel;
    // (n, pq) of j, advanced by the block's stride without a division per element.
    const int step_n = kBiasThreads / PQ, step_pq = kBiasThreads - step_n * PQ;
    const int64_t j = j0 + threadIdx.x;
    int64_t n = j / PQ;
    int pq = static_cast<int>(j - n * PQ);
    float acc = 0.0f;
    for (int64_t i = j; i < j1; i += kBiasThreads) {
        acc += dy[(n * K + k) * PQ + pq];
        n += step_n;
        pq += step_pq;
        if (pq >= PQ) {
            pq -= PQ;
            ++n;
        }
    }
    acc = block_sum<kBiasThreads>(acc, red);
    if (threadIdx.x == 0) pick(bt.part, blockIdx.z)[static_cast<int64_t>(s) * K + k] = acc;
}

// The first pass of n = 1 or 2 towers' bias gradients (dy[i] -> db[i]) in one launch. Returns the slice count;
// when it is above 1 the partial sums lie in ws (tower i's at i * K * splits) and segs[0..n) say how to add them.
int bias_first_pass(const Conv2dParams& p, int n, const float* const* dy, float* const* db, Tensor& ws,
                    SplitSeg* segs, void* stream) {
    const char* opname = "conv2d_backward_bias";
    const int PQ = p.P * p.Q;
    const int64_t per_channel = static_cast<int64_t>(p.N) * PQ;
    const int splits = per_channel > 0 ? conv_bias_splits(p.K, per_channel) : 1;
    const int64_t chunk = (per_channel + splits - 1) / splits;
    BiasTowers bt{};
    if (splits > 1) ws = workspace(opname, static_cast<int64_t>(p.K) * splits * n, stream);
    for (int i = 0; i < n; ++i) {
        bt.dy[i] = dy[i];
        bt.part[i] = splits == 1 ? db[i] : ws.data<float>() + static_cast<int64_t>(i) * p.K * splits;
        if (splits > 1) segs[i] = split_seg(p.K, splits, bt.part[i], db[i]);
    }
    conv2d_backward_bias_kernel<<<dim3(p.K, splits, n), kBiasThreads, 0, as_stream(stream)>>>(
        p.K, PQ > 0 ? PQ : 1, per_channel, chunk, bt);
    AX_LAUNCH_CHECK(opname);
    return splits;
}

// One tower's op (n = 1) or both towers' in one launch (n = 2).
template <class Op>
void launch_towers(const char* opname, const Op* ops, int n, int groups, cudaStream_t s) {
    if (n == 1) {
        launch_conv_gemm(opname, ops[0], groups, s);
    } else {
        launch_conv_pair(opname, ops[0], ops[1], groups, s);
    }
}

// The channel-inner ops (ConvTap) of n towers on tile Cfg: every tower's weights reordered
// and padded to the tile's rows in one launch, then the GEMM (one launch for both towers).
template <class Cfg, class Op>
void launch_tap_tiles(const char* opname, Op* ops, int n, int groups, const float* const* w, bool dgrad,
                      cudaStream_t s) {
    const ConvGeom& g = ops[0].g;
    const int mpad = (ops[0].M + Cfg::BM - 1) / Cfg::BM * Cfg::BM;
    const int64_t per = static_cast<int64_t>(groups) * mpad * ops[0].kr;
    Tensor ws = workspace(opname, per * n, s);
    WeightOrder o{};
    for (int i = 0; i < n; ++i) {
        o.w[i] = w[i];
        o.out[i] = ws.data<float>() + i * per;
        ops[i].wr = o.out[i];
        ops[i].mpad = mpad;
    }
    o.groups = groups;
    o.rows = ops[0].M;
    o.mpad = mpad;
    o.J = ops[0].fJ.d;
    o.RS = g.RS;
    o.Cg = g.Cg;
    o.Kg = g.Kg;
    o.dgrad = dgrad ? 1 : 0;
    conv_weight_order_kernel<<<dim3(grid_1d(per), n), kThreads1d, 0, s>>>(o);
    AX_LAUNCH_CHECK(opname);
    launch_tower_tiles<Cfg>(opname, ops, n, groups, s);
}
// On the tile conv_tile picks, as for the channel-major ops.
template <class Op>
void launch_tap(const char* opname, Op* ops, int n, int groups, const float* const* w, bool dgrad, cudaStream_t s) {
    switch (conv_tile(ops[0].M, ops[0].N, n * groups)) {
        case Tile::Big: launch_tap_tiles<GemmBig>(opname, ops, n, groups, w, dgrad, s); break;
        case Tile::Narrow: launch_tap_tiles<GemmNarrow>(opname, ops, n, groups, w, dgrad, s); break;
        default: launch_tap_tiles<GemmWide>(opname, ops, n, groups, w, dgrad, s); break;
    }
}

// Whether the channel-inner ops apply: a window that mask_fits, J (Cg forward, Kg grad-input) channels a
// multiple of the 16-deep k-step, and Kr = R*S*J within the lookup table.
inline bool tap_major(const ConvGeom& g, int J) {
    return mask_fits(g.R, g.S) && J % kTapStep == 0 &&
           static_cast<int64_t>(g.RS) * J <= static_cast<int64_t>(kTapTiles) * kTapStep;
}

// The channel-inner forward (kDgrad false: src = x, w, bias, out = y) or grad-input (kDgrad true: src = dy, w,
// relu_y, out = dx) of n towers.
template <bool kDgrad>
void conv_tap(const Conv2dParams& p, const ConvGeom& g, int n, const float* const* src, const float* const* w,
              const float* const* side, float* const* out, cudaStream_t s) {
    using Op = ConvTap<kDgrad>;
    static_assert(std::has_unique_object_representations_v<Op>, "ConvTap: no padding bytes");
    const FastDiv fJ(kDgrad ? g.Kg : g.Cg);
    const int M = kDgrad ? g.Cg : g.Kg, N = p.N * (kDgrad ? g.HW : g.PQ), kr = g.RS * fJ.d;
    const int relu = !kDgrad && p.relu ? 1 : 0;
    const auto tower = [&](int i) {
        return Op{M, N, g, fJ, kr, 0, relu, 0, src[i], nullptr, kDgrad ? nullptr : side[i], kDgrad ? side[i] : nullptr,
                  out[i]};
    };
    Op ops[2] = {tower(0), tower(n - 1)};
    launch_tap(kDgrad ? "conv2d_backward_input" : "conv2d_forward", ops, n, p.groups, w, kDgrad, s);
}

template <bool kMask>
void conv_fwd_towers(const Conv2dParams& p, const ConvGeom& g, int n, const float* const* x, const float* const* w,
                     const float* const* b, float* const* y, cudaStream_t s) {
    const int u = n - 1;
    static_assert(std::has_unique_object_representations_v<ConvFwd<kMask>>, "ConvFwd: no padding bytes");
    const int relu = p.relu ? 1 : 0;
    const ConvFwd<kMask> ops[2] = {ConvFwd<kMask>{g.Kg, p.N * g.PQ, g, relu, x[0], w[0], b[0], y[0]},
                                   ConvFwd<kMask>{g.Kg, p.N * g.PQ, g, relu, x[u], w[u], b[u], y[u]}};
    if (!launch_stacked("conv2d_forward", ops, n, p.groups, s)) launch_towers("conv2d_forward", ops, n, p.groups, s);
}

// Forward of n towers: the channel-inner loaders where they apply (tap_major), else the tap-mask loaders when the
// window fits it (mask_fits: at most 15 x 15).
void conv_fwd(const Conv2dParams& p, int n, const float* const* x, const float* const* w, const float* const* b,
              float* const* y, void* stream) {
    if (static_cast<int64_t>(p.N) * p.K * p.P * p.Q == 0) return;
    const ConvGeom g(p, "conv2d_forward");
    if (tap_major(g, g.Cg)) {
        conv_tap<false>(p, g, n, x, w, b, y, as_stream(stream));
    } else if (mask_fits(g.R, g.S)) {
        conv_fwd_towers<true>(p, g, n, x, w, b, y, as_stream(stream));
    } else {
        conv_fwd_towers<false>(p, g, n, x, w, b, y, as_stream(stream));
    }
}

template <bool kUnit, bool kMask>
void conv_dgrad_towers(const Conv2dParams& p, const ConvGeom& g, int n, const float* const* dy,
                       const float* const* w, const float* const* relu_y, float* const* dx, cudaStream_t s) {
    using Op = ConvBwdInput<kUnit, kMask>;
    const int u = n - 1;
    const Op ops[2] = {Op{g.Cg, p.N * g.HW, g, dy[0], w[0], dx[0], relu_y[0]},
                       Op{g.Cg, p.N * g.HW, g, dy[u], w[u], dx[u], relu_y[u]}};
    launch_towers("conv2d_backward_input", ops, n, p.groups, s);
}

// Grad-input of n towers: stride 1 gathers without division, channel-inner where they apply (tap_major), else with
// the tap mask for windows that mask_fits.
void conv_dgrad(const Conv2dParams& p, int n, const float* const* dy, const float* const* w,
                const float* const* relu_y, float* const* dx, void* stream) {
    if (static_cast<int64_t>(p.N) * p.C * p.H * p.W == 0) return;
    const ConvGeom g(p, "conv2d_backward_input");
    const cudaStream_t s = as_stream(stream);
    if (g.sh != 1 || g.sw != 1) {
        conv_dgrad_towers<false, false>(p, g, n, dy, w, relu_y, dx, s);
    } else if (tap_major(g, g.Kg)) {
        conv_tap<true>(p, g, n, dy, w, relu_y, dx, s);
    } else if (mask_fits(g.R, g.S)) {
        conv_dgrad_towers<true, true>(p, g, n, dy, w, relu_y, dx, s);
    } else {
        conv_dgrad_towers<true, false>(p, g, n, dy, w, relu_y, dx, s);
    }
}

}  // namespace

void conv2d_forward(const Conv2dParams& p, const float* x, const float* w, const float* b, float* y, void* stream) {
    conv_fwd(p, 1, &x, &w, &b, &y, stream);
}

void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w, const float* relu_y, float* dx,
                           void* stream) {
    conv_dgrad(p, 1, &dy, &w, &relu_y, &dx, stream);
}

void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw, void* stream) {
    conv_wgrad(p, 1, &x, &dy, &dw, stream);
}

void conv2d_forward_pair(const Conv2dParams& p, const float* const x[2], const float* const w[2],
                         const float* const b[2], float* const y[2], void* stream) {
    conv_fwd(p, 2, x, w, b, y, stream);
}

void conv2d_backward_input_pair(const Conv2dParams& p, const float* const dy[2], const float* const w[2],
                                const float* const relu_y[2], float* const dx[2], void* stream) {
    conv_dgrad(p, 2, dy, w, relu_y, dx, stream);
}

void conv2d_backward_weight_pair(const Conv2dParams& p, const float* const x[2], const float* const dy[2],
                                 float* const dw[2], void* stream) {
    conv_wgrad(p, 2, x, dy, dw, stream);
}

void conv2d_backward_bias(const Conv2dParams& p, const float* dy, float* db, void* stream) {
    if (p.K <= 0) return;
    Tensor ws;
    SplitSeg seg;
    if (bias_first_pass(p, 1, &dy, &db, ws, &seg, stream) > 1) split_reduce("conv2d_backward_bias", &seg, 1, stream);
}

void conv2d_backward_weight_bias_pair(const Conv2dParams& p, const float* const x[2], const float* const dy[2],
                                      float* const dw[2], float* const db[2], void* stream) {
    Tensor ws;
    SplitSeg segs[2];
    const int splits = p.K > 0 ? bias_first_pass(p, 2, dy, db, ws, segs, stream) : 1;
    conv_wgrad(p, 2, x, dy, dw, stream, segs, splits > 1 ? 2 : 0);
}

}  // namespace cuda
}  // namespace ax
