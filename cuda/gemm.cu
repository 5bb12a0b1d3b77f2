// CUDA backend of the linear family: one strided SGEMM view (StridedGemm) on the shared tiled main loop
// (common.cuh) serves y = x W^T + b, dx = dy W and dW = dy^T x through strides and two contiguity flags;
// deterministic split-K (partials in a workspace, summed in fixed order) when there are too few tiles.
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
template <bool kAK, bool kBK>
struct StridedGemm {
    static constexpr bool kAContigK = kAK, kBContigK = kBK, kTab = false;
    static constexpr int kLut = 0;
    using Entry = NoEntry;
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

    // One operand's per-thread state: the address of its first element at k = 0, the step between its
    // elements (along mn when k-contiguous, along k otherwise) and how many of them lie inside M / N: a prefix
    // (k-contiguous: the rows mn, mn + kStep, ... grow with i; otherwise the thread's one column is in or out).
    struct Side {
        const float* p;
        int step;  // 32-bit, so that the next element's address is one IMAD.WIDE (run_gemm checks it fits)
        int kt;    // k of element 0 at k0 = 0
        int n;     // elements 0 .. n-1 are inside M / N
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
        return s;
    }
    // Element i of the tile at k0: not ok outside M / N and, when kCheck, where its k is outside
    // [kb, ke). Element i is at k0 + kt (k-contiguous) or k0 + kt + i * Map::kStep.
    template <int E, bool kContig, bool kCheck, class Put>
    __device__ static void load(const Side& s, int64_t sk, int kstep, int k0, int kb, int ke, Put& put) {
        const float* p = s.p + k0 * sk;
        const int n = static_cast<int>(opaque(static_cast<unsigned>(s.n)));
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const int k = k0 + s.kt + (kContig ? 0 : kstep * i);
            put(i, p, i < n && (!kCheck || (k >= kb && k < ke)));
            p += s.step;
        }
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry*, int k0, int kb, int ke, Put& put) const {
        load<Cfg::kAPerThread, kAK, kCheck>(t.a, sak, TileMap<Cfg::BM, Cfg::BK, kAK, Cfg::kThreads>::kStep, k0, kb,
                                            ke, put);
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry*, int k0, int kb, int ke, Put& put) const {
        load<Cfg::kBPerThread, kBK, kCheck>(t.b, sbk, TileMap<Cfg::BN, Cfg::BK, kBK, Cfg::kThreads>::kStep, k0, kb,
                                            ke, put);
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
        t.a = side<Cfg, kAK, Cfg::BM>(A, sam, sak, m0, M);
        t.b = side<Cfg, kBK, Cfg::BN>(B, sbn, sbk, n0, N);
        return t;
    }
    __device__ Entry entry(int, int, int) const { return {0}; }
    __device__ void k_range(int z, int& kb, int& ke) const {
        kb = z * kchunk;
        ke = min(K, kb + kchunk);
    }
};

// Runs an M x N x K product on tile Cfg with split-K as choose_split_k<Cfg> says, and reduces the partials.
template <class Cfg, bool kAK, bool kBK>
void run_tiles(const char* opname, StridedGemm<kAK, kBK> g, float* out, const float* bias, cudaStream_t s,
               bool relu) {
    int chunk = 0;
    const int splits = choose_split_k<Cfg>(gemm_tiles<Cfg>(g.M, g.N), g.K, &chunk);
    g.kchunk = chunk;
    if (splits == 1) {
        g.C = out;
        g.bias = bias;
        g.relu = relu ? 1 : 0;
        gemm_tiled_kernel<Cfg><<<gemm_grid<Cfg>(opname, g.M, g.N, 1), Cfg::kThreads, 0, s>>>(g);
        AX_LAUNCH_CHECK(opname);
        return;
    }
    const int64_t mn = static_cast<int64_t>(g.M) * g.N;
    Tensor ws = workspace(opname, mn * splits, s);
    g.C = ws.data<float>();
    g.bias = nullptr;
    g.relu = 0;
    gemm_tiled_kernel<Cfg><<<gemm_grid<Cfg>(opname, g.M, g.N, splits), Cfg::kThreads, 0, s>>>(g);
    AX_LAUNCH_CHECK(opname);
    splitk_reduce(opname, mn, splits, ws.data<float>(), bias, g.N, out, s, relu);
}

// Picks the tile shape (split_tile: 128x128, or 64x64 for M not a multiple of 128) and runs it.
template <bool kAK, bool kBK>
void run_gemm(const char* opname, StridedGemm<kAK, kBK> g, float* out, const float* bias, void* stream,
              bool relu = false) {
    static_assert(std::has_unique_object_representations_v<StridedGemm<kAK, kBK>>, "StridedGemm: no padding bytes");
    if (static_cast<int64_t>(g.M) * g.N == 0) return;
    require(g.K <= kMaxGemmDim, opname, "reduction too long for one launch");
    // The loaders step from one of a thread's elements to the next by at most 16 rows in 32-bit ints.
    const int64_t stride = std::max(std::max(g.sam, g.sak), std::max(g.sbk, g.sbn));
    require(16 * stride <= 0x7fffffffll, opname, "feature dimension too large for one launch");
    const cudaStream_t s = as_stream(stream);
    if (split_tile(g.M, g.N, 1, false, Tile::Small) == Tile::Big) {
        run_tiles<GemmBig>(opname, g, out, bias, s, relu);
    } else {
        run_tiles<GemmSmall>(opname, g, out, bias, s, relu);
    }
}

// db[o] = sum over n of dy[n, o]: block = 32 columns x 8 row-lanes; lane r sums rows r, r+8, ... in order,
// then lane 0 adds the 8 partials in order. Coalesced along o, deterministic, no atomics.
__global__ void __launch_bounds__(256)
    linear_backward_bias_kernel(int N, int O, const float* __restrict__ dy, float* __restrict__ db) {
    __shared__ float part[8][33];
    const int o = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (o < O)
        for (int n = threadIdx.y; n < N; n += 8) s += dy[static_cast<int64_t>(n) * O + o];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && o < O) {
        float t = part[0][threadIdx.x];
#pragma unroll
        for (int r = 1; r < 8; ++r) t += part[r][threadIdx.x];
        db[o] = t;
    }
}

}  // namespace

// y (N x O) = x (N x I) W^T: A = x (k = i contiguous), B(k=i, n=o) = W[o*I + i] (k contiguous).
void linear_forward(const LinearParams& p, const float* x, const float* w, const float* b, float* y, void* stream) {
    StridedGemm<true, true> g{};
    g.M = p.N; g.N = p.O; g.K = p.I;
    g.A = x; g.sam = p.I; g.sak = 1;
    g.B = w; g.sbk = 1; g.sbn = p.I;
    run_gemm("linear_forward", g, y, b, stream, p.relu);
}

// dx (N x I) = dy (N x O) W (O x I): A = dy (k = o contiguous), B(k=o, n=i) = W[o*I + i] (n contiguous).
void linear_backward_input(const LinearParams& p, const float* dy, const float* w, float* dx, void* stream) {
    StridedGemm<true, false> g{};
    g.M = p.N; g.N = p.I; g.K = p.O;
    g.A = dy; g.sam = p.O; g.sak = 1;
    g.B = w; g.sbk = p.I; g.sbn = 1;
    run_gemm("linear_backward_input", g, dx, nullptr, stream);
}

// dW (O x I) = dy^T (O x N) x (N x I): A(m=o, k=n) = dy[n*O + o] (m contiguous), B(k=n, n=i) = x[n*I + i].
void linear_backward_weight(const LinearParams& p, const float* x, const float* dy, float* dw, void* stream) {
    StridedGemm<false, false> g{};
    g.M = p.O; g.N = p.I; g.K = p.N;
    g.A = dy; g.sam = 1; g.sak = p.O;
    g.B = x; g.sbk = p.I; g.sbn = 1;
    run_gemm("linear_backward_weight", g, dw, nullptr, stream);
}

void linear_backward_bias(const LinearParams& p, const float* dy, float* db, void* stream) {
    if (p.O <= 0) return;
    const dim3 block(32, 8), grid((p.O + 31) / 32);
    linear_backward_bias_kernel<<<grid, block, 0, as_stream(stream)>>>(p.N, p.O, dy, db);
    AX_LAUNCH_CHECK("linear_backward_bias");
}

}  // namespace cuda
}  // namespace ax
