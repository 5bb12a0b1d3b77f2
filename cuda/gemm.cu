// CUDA backend of the linear family: one strided SGEMM view (StridedGemm) on the shared tiled main loop
// (common.cuh) serves y = x W^T + b, dx = dy W and dW = dy^T x through strides and two contiguity flags (and a
// third: 16-byte copies of the operands contiguous along m / n where alignment allows); deterministic split-K
// (partials in a workspace, summed in fixed order) when there are too few tiles.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// C (M x N, row-major, leading dim N) = A (M x K) * B (K x N) with A(m,k) = A[m*sam + k*sak] and
// B(k,n) = B[k*sbk + n*sbn]. Slice z of a split-K run covers k in [z*kchunk, min(K, (z+1)*kchunk)) and
// writes its partial product to C + z*M*N; without split-K the bias (per column n, nullable) and the forward's
// ReLU (relu) are applied in the epilogue, with split-K in the reduction kernel.
struct StridedGemmArgs {
    int M, N, K, kchunk;
    const float* A;
    const float* B;
    float* C;
    const float* bias;
    int64_t sam, sak, sbk, sbn;
    // The epilogue applies the ReLU after the bias (LinearParams::relu; not with split-K). Two ints, so that the
    // struct has no padding: the emulator (tests/cuda_emu) reads every pointer-sized word of a kernel's parameter
    // struct as a possible operand, and padding bytes beside a bool could hold a stale pointer.
    int relu, unused;
};

// Where a thread's 16-byte copies of an mn-contiguous (BMN x BK) operand tile go: chunk mn(t) .. mn(t) + 3 of k-rows
// k(t) + kStep i (BMN / 4 neighbouring threads copy one k-row's BMN contiguous floats).
template <class Cfg, int BMN>
struct VecMap {
    static constexpr int kChunks = BMN / 4;                 // per k-row
    static constexpr int kStep = Cfg::kThreads / kChunks;   // k-rows between a thread's chunks
    static constexpr int E = Cfg::BK / kStep;               // chunks per thread
    static_assert(Cfg::kThreads % kChunks == 0 && Cfg::BK % kStep == 0, "VecMap: tile must divide the block");
    __device__ __forceinline__ static int mn(int t) { return 4 * (t % kChunks); }
    __device__ __forceinline__ static int k(int t) { return t / kChunks; }
};

// kV: the mn-contiguous operands (dx = dy W's B; dW = dy^T x's A and B) are copied 16 bytes at a time (cp_async16),
// a quarter of the copies, addresses and predicates of the 4-byte path; run_gemm takes it where every such operand
// is 16-byte aligned with its k stride and mn extent multiples of 4, so a chunk is wholly inside M / N or outside.
template <bool kAK, bool kBK, bool kV = false>
struct StridedGemm : StridedGemmArgs {
    static_assert(!kV || !(kAK && kBK), "StridedGemm: 16-byte copies need an mn-contiguous operand");
    static constexpr bool kAContigK = kAK, kBContigK = kBK, kTab = false;
    static constexpr int kLut = 0;
    using Entry = NoEntry;

    // One operand's per-thread state: the address of its first element at k = 0, the step between its
    // elements (along mn when k-contiguous, along k otherwise) and how many of them lie inside M / N: a prefix
    // (k-contiguous: the rows mn, mn + kStep, ... grow with i; otherwise the thread's one column is in or out).
    struct Side {
        const float* p;
        int step;  // 32-bit, so that the next element's address is one IMAD.WIDE (run_gemm checks it fits)
        int kt;    // k of element 0 at k0 = 0
        int n;     // elements 0 .. n-1 are inside M / N; 16-byte copies: the bytes of a chunk inside N (16 or 0)
        int off;   // 16-byte copies: the thread's chunk 0 in the stage, from where fetch_tile's put has element 0
    };
    template <class Cfg, bool kContig, int BMN>
    __device__ static Side side(const float* base, int64_t smn, int64_t sk, int mn0, int lim) {
        using Map = TileMap<BMN, Cfg::BK, kContig, Cfg::kThreads>;
        constexpr int E = BMN * Cfg::BK / Cfg::kThreads;
        Side s;
        const int mn = mn0 + Map::mn(threadIdx.x, 0);
        s.kt = Map::k(threadIdx.x, 0);
        s.p = opaque_ptr(base + mn * smn + s.kt * sk);  // kept in two registers, not rebuilt at every use
        s.step = static_cast<int>(Map::kStep * (kContig ? smn : sk));
        const int left = lim - mn;
        s.n = left <= 0 ? 0 : (kContig ? min(E, (left + Map::kStep - 1) / Map::kStep) : E);
        s.off = 0;
        return s;
    }
    template <class Cfg, int BMN, int Pitch>
    __device__ static Side side_vec(const float* base, int64_t sk, int mn0, int lim) {
        using Map = TileMap<BMN, Cfg::BK, false, Cfg::kThreads>;  // the 4-byte map, which put.d follows
        using V = VecMap<Cfg, BMN>;
        const int t = threadIdx.x;
        Side s;
        const int mn = mn0 + V::mn(t);
        s.kt = V::k(t);
        s.p = opaque_ptr(base + mn + s.kt * sk);  // the mn stride is 1 (run_gemm checks it)
        s.step = static_cast<int>(V::kStep * sk);
        s.n = mn < lim ? 16 : 0;
        s.off = (V::k(t) - Map::k(t, 0)) * Pitch + V::mn(t) - Map::mn(t, 0);
        return s;
    }
    // Chunk i of the tile at k0 (k-row k0 + kt + i * V::kStep): 16 bytes, or none (zero-filled) outside N and, when
    // kCheck, outside [kb, ke). The put is bypassed (it copies 4 bytes); its d locates the stage.
    template <class Cfg, int BMN, int Pitch, bool kCheck, class Put>
    __device__ static void load_vec(const Side& s, int sk, int k0, int kb, int ke, Put& put) {
        using V = VecMap<Cfg, BMN>;
        const int ks = static_cast<int>(opaque(static_cast<unsigned>(sk)));
        const float* p = s.p + static_cast<int64_t>(k0) * ks;
        const int bytes = static_cast<int>(opaque(static_cast<unsigned>(s.n)));
        const int step = static_cast<int>(opaque(static_cast<unsigned>(s.step)));
        float* const d = put.d + s.off;
#pragma unroll
        for (int i = 0; i < V::E; ++i) {
            const int k = k0 + s.kt + V::kStep * i;
            cp_async16(d + i * V::kStep * Pitch, p + static_cast<int64_t>(step) * i,
                       !kCheck || (k >= kb && k < ke) ? bytes : 0);
        }
    }
    // Element i of the tile at k0: not ok outside M / N and, when kCheck, where its k is outside
    // [kb, ke). Element i is at k0 + kt (k-contiguous) or k0 + kt + i * Map::kStep. Its address is one IMAD.WIDE
    // from the tile's base (s.step * i + p, 32 x 32 -> 64 bits), not a chain of 64-bit adds (two instructions
    // each); the thread's column of an mn-contiguous operand is in or out for all of its elements, so one
    // predicate serves them all.
    template <int E, bool kContig, bool kCheck, class Put>
    __device__ static void load(const Side& s, int sk, int kstep, int k0, int kb, int ke, Put& put) {
        // k-contiguous: the k stride is 1 (run_gemm checks it); otherwise a 32-bit register (run_gemm checks that
        // it fits) rather than the 64-bit parameter: either way the tile's base is one IMAD.WIDE, not a 64-bit product.
        const int ks = kContig ? 1 : static_cast<int>(opaque(static_cast<unsigned>(sk)));
        const float* p = s.p + static_cast<int64_t>(k0) * ks;
        const int n = static_cast<int>(opaque(static_cast<unsigned>(s.n)));
        const int step = static_cast<int>(opaque(static_cast<unsigned>(s.step)));
        const bool in = n > 0;
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const int k = k0 + s.kt + (kContig ? 0 : kstep * i);
            put(i, p + static_cast<int64_t>(step) * i, (kContig ? i < n : in) && (!kCheck || (k >= kb && k < ke)));
        }
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry*, int k0, int kb, int ke, Put& put) const {
        if constexpr (kV && !kAK) {
            load_vec<Cfg, Cfg::BM, Cfg::APitch, kCheck>(t.a, static_cast<int>(sak), k0, kb, ke, put);
        } else {
            load<Cfg::kAPerThread, kAK, kCheck>(t.a, static_cast<int>(sak),
                                                TileMap<Cfg::BM, Cfg::BK, kAK, Cfg::kThreads>::kStep, k0, kb, ke, put);
        }
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry*, int k0, int kb, int ke, Put& put) const {
        if constexpr (kV && !kBK) {
            load_vec<Cfg, Cfg::BN, Cfg::BPitch, kCheck>(t.b, static_cast<int>(sbk), k0, kb, ke, put);
        } else {
            load<Cfg::kBPerThread, kBK, kCheck>(t.b, static_cast<int>(sbk),
                                                TileMap<Cfg::BN, Cfg::BK, kBK, Cfg::kThreads>::kStep, k0, kb, ke, put);
        }
    }
    template <class Th>
    __device__ void store(const Th&, int z, int m, int n, float v) const {
        if (bias != nullptr) v += bias[n];
        if (relu != 0) v = relu_epilogue(v);
        C[(static_cast<int64_t>(z) * M + m) * N + n] = v;
    }

    template <class Cfg>
    struct Thread {
        Side a, b;
    };
    template <class Cfg>
    __device__ Thread<Cfg> thread(int, int m0, int n0) const {
        Thread<Cfg> t;
        if constexpr (kV && !kAK) {
            t.a = side_vec<Cfg, Cfg::BM, Cfg::APitch>(A, sak, m0, M);
        } else {
            t.a = side<Cfg, kAK, Cfg::BM>(A, sam, sak, m0, M);
        }
        if constexpr (kV && !kBK) {
            t.b = side_vec<Cfg, Cfg::BN, Cfg::BPitch>(B, sbk, n0, N);
        } else {
            t.b = side<Cfg, kBK, Cfg::BN>(B, sbn, sbk, n0, N);
        }
        return t;
    }
    __device__ Entry entry(int, int, int) const { return {0}; }
    __device__ void k_range(int z, int& kb, int& ke) const {
        kb = z * kchunk;
        ke = min(K, kb + kchunk);
    }
};

// Runs n = 1 or 2 towers' M x N x K products (g[i] -> out[i], the same shapes) on tile Cfg with split-K as
// choose_split_k<Cfg> says for one tower, and reduces every tower's partials in one split_reduce launch. A pair is
// one launch (TowerPair: tower 1's slices follow tower 0's in blockIdx.z) that keeps one tower's tile and split, so
// its bits are the single launches'.
template <class Cfg, class Op>
void run_tiles(const char* opname, Op* g, int n, float* const* out, const float* const* bias, cudaStream_t s,
               bool relu) {
    int chunk = 0;
    const int splits = choose_split_k<Cfg>(gemm_tiles<Cfg>(g[0].M, g[0].N), g[0].K, &chunk);
    require(static_cast<int64_t>(splits) * n <= 65535, opname, "too many slices for one launch");
    const int64_t mn = static_cast<int64_t>(g[0].M) * g[0].N;
    Tensor ws;
    if (splits > 1) ws = workspace(opname, mn * splits * n, s);
    for (int i = 0; i < n; ++i) {
        g[i].kchunk = chunk;
        g[i].C = splits == 1 ? out[i] : ws.data<float>() + i * mn * splits;
        g[i].bias = splits == 1 ? bias[i] : nullptr;
        g[i].relu = splits == 1 && relu ? 1 : 0;
    }
    if (n == 1) {
        gemm_tiled_kernel<Cfg><<<gemm_grid<Cfg>(opname, g[0].M, g[0].N, splits), Cfg::kThreads, 0, s>>>(g[0]);
    } else {
        using Pair = TowerPair<Op>;
        gemm_tiled_kernel<Cfg><<<gemm_grid<Cfg>(opname, g[0].M, g[0].N, 2 * splits), Cfg::kThreads, 0, s>>>(
            Pair{g[0].M, g[0].N, splits, g[0], g[1]});
    }
    AX_LAUNCH_CHECK(opname);
    if (splits == 1) return;
    SplitSeg segs[2];
    for (int i = 0; i < n; ++i)
        segs[i] = split_seg(mn, splits, ws.data<float>() + i * mn * splits, out[i], bias[i], g[0].N, relu);
    split_reduce(opname, segs, n, s);
}

// Picks the tile shape (split_tile: 128x128, or 64x64 for M not a multiple of 128) and runs it.
template <class Op>
void run_shape(const char* opname, Op* g, int n, float* const* out, const float* const* bias, cudaStream_t s,
               bool relu) {
    if (split_tile(g[0].M, g[0].N, 1, false, Tile::Small) == Tile::Big) {
        run_tiles<GemmBig>(opname, g, n, out, bias, s, relu);
    } else {
        run_tiles<GemmSmall>(opname, g, n, out, bias, s, relu);
    }
}

// Checks the problem and runs it with 16-byte copies of the mn-contiguous operands where every tower's allow them
// (16-byte aligned, k stride and mn extent multiples of 4), else with 4-byte copies. Both give the same bits: the
// copies only fill the shared tiles, and the multiply and its order are the same.
template <bool kAK, bool kBK>
void run_gemm(const char* opname, StridedGemm<kAK, kBK>* g, int n, float* const* out, const float* const* bias,
              void* stream, bool relu = false) {
    static_assert(std::has_unique_object_representations_v<StridedGemmArgs> &&
                      sizeof(StridedGemm<kAK, kBK>) == sizeof(StridedGemmArgs),
                  "StridedGemm: no padding bytes");
    if (static_cast<int64_t>(g[0].M) * g[0].N == 0) return;
    require(g[0].K <= kMaxGemmDim, opname, "reduction too long for one launch");
    // The loaders step from one of a thread's elements to the next by at most 16 rows in 32-bit ints.
    for (int i = 0; i < n; ++i) {
        const int64_t stride = std::max(std::max(g[i].sam, g[i].sak), std::max(g[i].sbk, g[i].sbn));
        require(16 * stride <= 0x7fffffffll, opname, "feature dimension too large for one launch");
        // The loaders take the stride of a contiguous direction to be 1 (one IMAD.WIDE per tile base).
        require((kAK ? g[i].sak : g[i].sam) == 1 && (kBK ? g[i].sbk : g[i].sbn) == 1, opname,
                "operand not contiguous along its contiguous direction");
    }
    const cudaStream_t s = as_stream(stream);
    if constexpr (!(kAK && kBK)) {
        bool vec = true;
        for (int i = 0; i < n; ++i) {
            if (!kAK) vec = vec && aligned16(g[i].A) && g[i].sak % 4 == 0 && g[i].M % 4 == 0;
            if (!kBK) vec = vec && aligned16(g[i].B) && g[i].sbk % 4 == 0 && g[i].N % 4 == 0;
        }
        if (vec) {
            StridedGemm<kAK, kBK, true> gv[2] = {};
            for (int i = 0; i < n; ++i) static_cast<StridedGemmArgs&>(gv[i]) = g[i];
            run_shape(opname, gv, n, out, bias, s, relu);
            return;
        }
    }
    run_shape(opname, g, n, out, bias, s, relu);
}

// db[o] = sum over n of dy[n, o]: block = 8 columns x 128 row-lanes (a 32-byte sector per row, fully used); lane r
// sums rows r, r + 128, ... in order, then the 128 lanes' sums are added by a fixed halving tree. Narrow blocks of
// many lanes fill the GPU where a wide block per 32 columns did not (fc8: 500 columns, 128 rows). Deterministic, no
// atomics. blockIdx.y: the tower (dy and db of a pair).
constexpr int kBiasCols = 8, kBiasLanes = 128;
struct BiasPtrs {
    const float* dy[2];
    float* db[2];
};
__global__ void __launch_bounds__(kBiasCols * kBiasLanes) linear_backward_bias_kernel(int N, int O, BiasPtrs bp) {
    __shared__ float part[kBiasLanes][kBiasCols + 1];
    const float* __restrict__ dy = pick(bp.dy, blockIdx.y);
    float* __restrict__ db = pick(bp.db, blockIdx.y);
    const int o = blockIdx.x * kBiasCols + threadIdx.x;
    float s = 0.0f;
    if (o < O)
        for (int n = threadIdx.y; n < N; n += kBiasLanes) s += dy[static_cast<int64_t>(n) * O + o];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
#pragma unroll
    for (int h = kBiasLanes / 2; h > 0; h /= 2) {
        if (static_cast<int>(threadIdx.y) < h) part[threadIdx.y][threadIdx.x] += part[threadIdx.y + h][threadIdx.x];
        __syncthreads();
    }
    if (threadIdx.y == 0 && o < O) db[o] = part[0][threadIdx.x];
}

// The linear passes of n = 1 or 2 towers (index i: tower i; the pair forms are one launch for both).
// y (N x O) = x (N x I) W^T: A = x (k = i contiguous), B(k=i, n=o) = W[o*I + i] (k contiguous).
void linear_fwd(const LinearParams& p, int n, const float* const* x, const float* const* w, const float* const* b,
                float* const* y, void* stream) {
    StridedGemm<true, true> g[2] = {};
    for (int i = 0; i < n; ++i) {
        g[i].M = p.N; g[i].N = p.O; g[i].K = p.I;
        g[i].A = x[i]; g[i].sam = p.I; g[i].sak = 1;
        g[i].B = w[i]; g[i].sbk = 1; g[i].sbn = p.I;
    }
    run_gemm("linear_forward", g, n, y, b, stream, p.relu);
}

// dx (N x I) = dy (N x O) W (O x I): A = dy (k = o contiguous), B(k=o, n=i) = W[o*I + i] (n contiguous).
void linear_dgrad(const LinearParams& p, int n, const float* const* dy, const float* const* w, float* const* dx,
                  void* stream) {
    StridedGemm<true, false> g[2] = {};
    for (int i = 0; i < n; ++i) {
        g[i].M = p.N; g[i].N = p.I; g[i].K = p.O;
        g[i].A = dy[i]; g[i].sam = p.O; g[i].sak = 1;
        g[i].B = w[i]; g[i].sbk = p.I; g[i].sbn = 1;
    }
    const float* none[2] = {nullptr, nullptr};
    run_gemm("linear_backward_input", g, n, dx, none, stream);
}

// dW (O x I) = dy^T (O x N) x (N x I): A(m=o, k=n) = dy[n*O + o] (m contiguous), B(k=n, n=i) = x[n*I + i].
void linear_wgrad(const LinearParams& p, int n, const float* const* x, const float* const* dy, float* const* dw,
                  void* stream) {
    StridedGemm<false, false> g[2] = {};
    for (int i = 0; i < n; ++i) {
        g[i].M = p.O; g[i].N = p.I; g[i].K = p.N;
        g[i].A = dy[i]; g[i].sam = 1; g[i].sak = p.O;
        g[i].B = x[i]; g[i].sbk = p.I; g[i].sbn = 1;
    }
    const float* none[2] = {nullptr, nullptr};
    run_gemm("linear_backward_weight", g, n, dw, none, stream);
}

void linear_bgrad(const LinearParams& p, int n, const float* const* dy, float* const* db, void* stream) {
    if (p.O <= 0) return;
    BiasPtrs bp{};
    for (int i = 0; i < n; ++i) {
        bp.dy[i] = dy[i];
        bp.db[i] = db[i];
    }
    const dim3 block(kBiasCols, kBiasLanes), grid((p.O + kBiasCols - 1) / kBiasCols, n);
    linear_backward_bias_kernel<<<grid, block, 0, as_stream(stream)>>>(p.N, p.O, bp);
    AX_LAUNCH_CHECK("linear_backward_bias");
}

}  // namespace

void linear_forward(const LinearParams& p, const float* x, const float* w, const float* b, float* y, void* stream) {
    linear_fwd(p, 1, &x, &w, &b, &y, stream);
}
void linear_backward_input(const LinearParams& p, const float* dy, const float* w, float* dx, void* stream) {
    linear_dgrad(p, 1, &dy, &w, &dx, stream);
}
void linear_backward_weight(const LinearParams& p, const float* x, const float* dy, float* dw, void* stream) {
    linear_wgrad(p, 1, &x, &dy, &dw, stream);
}
void linear_backward_bias(const LinearParams& p, const float* dy, float* db, void* stream) {
    linear_bgrad(p, 1, &dy, &db, stream);
}

void linear_forward_pair(const LinearParams& p, const float* const x[2], const float* const w[2],
                         const float* const b[2], float* const y[2], void* stream) {
    linear_fwd(p, 2, x, w, b, y, stream);
}
void linear_backward_input_pair(const LinearParams& p, const float* const dy[2], const float* const w[2],
                                float* const dx[2], void* stream) {
    linear_dgrad(p, 2, dy, w, dx, stream);
}
void linear_backward_weight_bias_pair(const LinearParams& p, const float* const x[2], const float* const dy[2],
                                      float* const dw[2], float* const db[2], void* stream) {
    linear_wgrad(p, 2, x, dy, dw, stream);
    linear_bgrad(p, 2, dy, db, stream);
}

}  // namespace cuda
}  // namespace ax
