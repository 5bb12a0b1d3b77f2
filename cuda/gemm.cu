// CUDA backend of the linear family: one strided SGEMM view (StridedGemm) on the shared tiled main loop
// (common.cuh) serves y = x W^T + b, dx = dy W and dW = dy^T x through strides and two contiguity flags;
// deterministic split-K (partials in a workspace, summed in fixed order) when there are too few tiles.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// C (M x N, row-major, leading dim N) = A (M x K) * B (K x N) with A(m,k) = A[m*sam + k*sak] and
// B(k,n) = B[k*sbk + n*sbn]. Slice z of a split-K run covers k in [z*kchunk, min(K, (z+1)*kchunk)) and
// writes its partial product to C + z*M*N; without split-K the bias (per column n, nullable) is fused.
template <bool kAK, bool kBK>
struct StridedGemm {
    static constexpr bool kAContigK = kAK, kBContigK = kBK;
    int M, N, K, kchunk;
    const float* A;
    const float* B;
    float* C;
    const float* bias;
    int64_t sam, sak, sbk, sbn;

    struct Thread {};
    template <class Cfg>
    __device__ Thread thread(int, int, int) const { return {}; }
    __device__ void k_range(int z, int& kb, int& ke) const {
        kb = z * kchunk;
        ke = min(K, kb + kchunk);
    }
    template <class Cfg>
    __device__ void fetch_a(const Thread&, int k0, int ke, float (&r)[Cfg::kAPerThread]) const {
        using Map = TileMap<Cfg::BM, Cfg::BK, kAContigK>;
        const int m0 = blockIdx.y * Cfg::BM;
#pragma unroll
        for (int i = 0; i < Cfg::kAPerThread; ++i) {
            const int m = m0 + Map::mn(threadIdx.x, i), k = k0 + Map::k(threadIdx.x, i);
            r[i] = (m < M && k < ke) ? __ldg(A + m * sam + k * sak) : 0.0f;
        }
    }
    template <class Cfg>
    __device__ void fetch_b(const Thread&, int k0, int ke, float (&r)[Cfg::kBPerThread]) const {
        using Map = TileMap<Cfg::BN, Cfg::BK, kBContigK>;
        const int n0 = blockIdx.x * Cfg::BN;
#pragma unroll
        for (int i = 0; i < Cfg::kBPerThread; ++i) {
            const int n = n0 + Map::mn(threadIdx.x, i), k = k0 + Map::k(threadIdx.x, i);
            r[i] = (n < N && k < ke) ? __ldg(B + k * sbk + n * sbn) : 0.0f;
        }
    }
    __device__ void store(const Thread&, int z, int m, int n, float v) const {
        if (bias != nullptr) v += bias[n];
        C[(static_cast<int64_t>(z) * M + m) * N + n] = v;
    }
};

// Picks the tile shape and split-K for an M x N x K product, runs it, and reduces the split partials.
template <bool kAK, bool kBK>
void run_gemm(const char* opname, StridedGemm<kAK, kBK> g, float* out, const float* bias, void* stream) {
    if (static_cast<int64_t>(g.M) * g.N == 0) return;
    require(g.K <= kMaxGemmDim, opname, "reduction too long for one launch");
    const cudaStream_t s = as_stream(stream);
    if (use_big_tiles(g.M, g.N, 1)) {
        g.kchunk = g.K > 0 ? g.K : 1;
        g.C = out;
        g.bias = bias;
        gemm_tiled_kernel<GemmBig><<<gemm_grid<GemmBig>(opname, g.M, g.N, 1), 256, 0, s>>>(g);
        AX_LAUNCH_CHECK(opname);
        return;
    }
    int chunk = 0;
    const int splits = choose_split_k(gemm_tiles<GemmSmall>(g.M, g.N), g.K, &chunk);
    g.kchunk = chunk;
    if (splits == 1) {
        g.C = out;
        g.bias = bias;
        gemm_tiled_kernel<GemmSmall><<<gemm_grid<GemmSmall>(opname, g.M, g.N, 1), 256, 0, s>>>(g);
        AX_LAUNCH_CHECK(opname);
        return;
    }
    const int64_t mn = static_cast<int64_t>(g.M) * g.N;
    Tensor ws = workspace(opname, mn * splits, stream);
    g.C = ws.data<float>();
    g.bias = nullptr;
    gemm_tiled_kernel<GemmSmall><<<gemm_grid<GemmSmall>(opname, g.M, g.N, splits), 256, 0, s>>>(g);
    AX_LAUNCH_CHECK(opname);
    splitk_reduce(opname, mn, splits, ws.data<float>(), bias, g.N, out, stream);
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
    run_gemm("linear_forward", g, y, b, stream);
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
