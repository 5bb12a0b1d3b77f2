// Shared pieces of the CUDA backend: error checks that name the op, launch-size helpers, exact fast
// integer division for index decomposition, deterministic block reductions, and the one tiled GEMM
// main loop that every matrix-shaped kernel (linear and the three convolution passes) instantiates.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace ax {
namespace cuda {

// ---- errors ----------------------------------------------------------------------------------------

// Clears the (non-sticky) error first so the interpreter and the next op start clean.
[[noreturn]] inline void throw_cuda_error(const char* op, cudaError_t e) {
    cudaGetLastError();
    throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(e));
}

#define AX_CUDA_CHECK(op, expr)                                            \
    do {                                                                   \
        const cudaError_t ax_err_ = (expr);                                \
        if (ax_err_ != cudaSuccess) ::ax::cuda::throw_cuda_error(op, ax_err_); \
    } while (0)

// After every <<<...>>>: a bad configuration or a failed launch becomes an exception naming the op.
#define AX_LAUNCH_CHECK(op) AX_CUDA_CHECK(op, cudaGetLastError())

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

inline void require(bool ok, const char* op, const char* what) {
    if (!ok) throw std::runtime_error(std::string(op) + ": " + what);
}

// ---- launch sizes ------------------------------------------------------------------------------------

constexpr int kThreads1d = 256;
// Grid-stride kernels cap the grid; 64 Ki blocks of 256 threads is far beyond what fills an H100.
constexpr int64_t kMaxBlocks1d = 65536;

inline unsigned grid_1d(int64_t n, int threads = kThreads1d) {
    const int64_t b = (n + threads - 1) / threads;
    return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocks1d ? kMaxBlocks1d : b));
}

// Grid for "plane" kernels: blockIdx.y strides over planes (e.g. the N*C images of an NCHW tensor),
// x threads stride over the plane's inner extent; at most about kMaxBlocks1d blocks in all.
inline dim3 plane_grid(int64_t planes, int64_t inner, int threads = kThreads1d) {
    const int64_t gy = planes < 1 ? 1 : (planes < 65535 ? planes : 65535);
    int64_t gx = (inner + threads - 1) / threads;
    const int64_t cap = (kMaxBlocks1d + gy - 1) / gy;
    gx = gx < 1 ? 1 : (gx > cap ? cap : gx);
    return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

__device__ __forceinline__ int64_t global_thread_id() {
    return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_thread_count() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// ---- exact division by a runtime constant (Granlund-Montgomery, as in CUTLASS's FastDivmod) ---------
// For 0 <= n < 2^31 and d >= 1: with l = ceil(log2 d), m = ceil(2^(31+l) / d) < 2^32 and
// n / d == (n * m) >> (31 + l). Index decomposition in the GEMM loaders runs this instead of IDIV.
struct FastDiv {
    int d = 1;
    uint32_t mul = 0, shr = 0;
    FastDiv() = default;
    explicit FastDiv(int divisor) : d(divisor) {
        if (d < 1) throw std::invalid_argument("FastDiv: divisor must be >= 1");
        if (d == 1) return;
        int l = 0;
        while ((1ll << l) < d) ++l;
        const uint64_t p = 31 + l;
        mul = static_cast<uint32_t>(((1ull << p) + static_cast<uint64_t>(d) - 1) / static_cast<uint64_t>(d));
        shr = static_cast<uint32_t>(p - 32);
    }
    __host__ __device__ __forceinline__ int div(int n) const {
        if (d == 1) return n;
#ifdef __CUDA_ARCH__
        return static_cast<int>(__umulhi(static_cast<uint32_t>(n), mul) >> shr);
#else
        return static_cast<int>(((static_cast<uint64_t>(static_cast<uint32_t>(n)) * mul) >> 32) >> shr);
#endif
    }
    // q = n / d, r = n % d for 0 <= n < 2^31.
    __host__ __device__ __forceinline__ void divmod(int n, int& q, int& r) const {
        q = div(n);
        r = n - q * d;
    }
};

// ---- deterministic reductions --------------------------------------------------------------------------
// Butterfly (xor) reductions: a fixed order, and every lane ends with bit-identical results.

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide reduction for a 1-D block of kThreads (a multiple of 32, at most 1024). Every thread must
// call it; every thread gets the result. `red` is __shared__ scratch of at least kThreads/32 + 1 slots,
// free again when this returns (the trailing barrier), so calls may follow one another.
template <int kThreads, class T, class WarpOp>
__device__ __forceinline__ T block_reduce(T v, T* red, T identity, WarpOp warp_op) {
    static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_reduce: bad block size");
    constexpr int kWarps = kThreads / 32;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_op(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < kWarps ? red[lane] : identity;
        w = warp_op(w);
        if (lane == 0) red[kWarps] = w;
    }
    __syncthreads();
    const T r = red[kWarps];
    __syncthreads();
    return r;
}

struct WarpSumF { __device__ float operator()(float v) const { return warp_sum(v); } };
struct WarpMaxF { __device__ float operator()(float v) const { return warp_max(v); } };
struct WarpSumI { __device__ int operator()(int v) const { return warp_sum_int(v); } };

template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* red) {
    return block_reduce<kThreads>(v, red, 0.0f, WarpSumF{});
}
template <int kThreads>
__device__ __forceinline__ float block_max(float v, float* red) {
    return block_reduce<kThreads>(v, red, -INFINITY, WarpMaxF{});
}
template <int kThreads>
__device__ __forceinline__ int block_sum_int(int v, int* red) {
    return block_reduce<kThreads>(v, red, 0, WarpSumI{});
}

// ---- the tiled GEMM main loop ------------------------------------------------------------------------
// C (M x N) = A (M x Kr) * B (Kr x N) for each z = blockIdx.z, where A, B, C are *views* supplied by an
// Op: plain strided matrices (linear) or implicit im2col views (convolutions). Block tile BM x BN x 8,
// 256 threads as 16 x 16, each owning a (BM/16) x (BN/16) register micro-tile made of 4x4 pieces strided
// by 64 rows/columns (so shared-memory reads are float4 and broadcast-friendly). Shared tiles are stored
// k-major (As[k][m], Bs[k][n]), double-buffered; the next tile is fetched into registers while the
// current one is multiplied, so there is one barrier per k-step. Every load is bounds-checked by the Op
// (zero outside), every store by the main loop: any M, N, Kr, no divisibility assumptions.
//
// Op interface (all __device__ const; `Th` is whatever thread<Cfg>() returns: per-thread register state):
//   int M, N;                                  GEMM size of one z slice
//   static constexpr bool kAContigK, kBContigK true: neighbouring threads fetch neighbouring k
//                                              (the operand is contiguous along k); false: along m / n
//   template <class Cfg> Th thread(int z, int m0, int n0) const;   per-thread precomputation for the
//                                              tile at (m0, n0) (e.g. the im2col column this thread reads)
//   void k_range(int z, int& kb, int& ke)      the reduction range of slice z (split-K)
//   template <class Cfg, class Th> void fetch_a(const Th&, int k0, int ke, float (&r)[Cfg::kAPerThread])
//   template <class Cfg, class Th> void fetch_b(const Th&, int k0, int ke, float (&r)[Cfg::kBPerThread])
//       fill the thread's elements of the tile starting at k0 (see TileMap), zero where k >= ke or
//       m >= M / n >= N
//   template <class Th> void store(const Th&, int z, int m, int n, float v)   called for m < M, n < N only

template <int BM_, int BN_>
struct GemmCfg {
    static constexpr int BM = BM_, BN = BN_, BK = 8, kThreads = 256;
    // Blocks per SM the register budget must allow (__launch_bounds__): 2 caps the 8x8 micro-tile at 128
    // registers, so two 128x128 blocks (16 warps) share an SM and hide each other's barrier stalls.
    static constexpr int kMinBlocks = BM * BN >= 128 * 128 ? 2 : 3;
    static constexpr int TM = BM / 16, TN = BN / 16;  // register micro-tile per thread
    static constexpr int kAPerThread = BM * BK / kThreads, kBPerThread = BN * BK / kThreads;
    // +4 floats per shared row: the k-contiguous fetch pattern stores 8 k-rows x 4 columns per warp,
    // which this padding spreads over 32 distinct banks; rows stay 16-byte aligned for float4 reads.
    static constexpr int APitch = BM + 4, BPitch = BN + 4;
    static_assert((BM == 64 || BM == 128) && (BN == 64 || BN == 128), "GemmCfg: tile sides are 64 or 128");
};

// Which element of a (BMN x BK) operand tile thread t fetches as its i-th element. k-contiguous: the 8
// threads t..t+7 walk k (so k = t % 8 is fixed per thread, mn = t/8 + 32 i); mn-contiguous: threads walk
// mn (mn = t % BMN fixed per thread, k = t / BMN + (256/BMN) i). Both cover the tile exactly once.
template <int BMN, int BK, bool kContigK>
struct TileMap {
    static_assert(256 % BMN == 0 && 256 % BK == 0, "TileMap: tile must divide the block");
    __device__ __forceinline__ static int mn(int t, int i) { return kContigK ? t / BK + (256 / BK) * i : t % BMN; }
    __device__ __forceinline__ static int k(int t, int i) { return kContigK ? t % BK : t / BMN + (256 / BMN) * i; }
};

template <class Cfg, class Op>
__global__ void __launch_bounds__(256, Cfg::kMinBlocks) gemm_tiled_kernel(const Op op) {
    constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
    constexpr int AP = Cfg::kAPerThread, BP = Cfg::kBPerThread;
    __shared__ __align__(16) float As[2][BK][Cfg::APitch];
    __shared__ __align__(16) float Bs[2][BK][Cfg::BPitch];

    const int t = threadIdx.x;
    const int tx = t % 16, ty = t / 16;
    const int z = blockIdx.z;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    using MapA = TileMap<BM, BK, Op::kAContigK>;
    using MapB = TileMap<BN, BK, Op::kBContigK>;

    const auto th = op.template thread<Cfg>(z, m0, n0);
    int kb = 0, ke = 0;
    op.k_range(z, kb, ke);

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    if (kb < ke) {
        float ra[AP], rb[BP];
        op.template fetch_a<Cfg>(th, kb, ke, ra);
        op.template fetch_b<Cfg>(th, kb, ke, rb);
#pragma unroll
        for (int i = 0; i < AP; ++i) As[0][MapA::k(t, i)][MapA::mn(t, i)] = ra[i];
#pragma unroll
        for (int i = 0; i < BP; ++i) Bs[0][MapB::k(t, i)][MapB::mn(t, i)] = rb[i];
        __syncthreads();

        int buf = 0;
        for (int k0 = kb; k0 < ke; k0 += BK) {
            const bool more = k0 + BK < ke;
            if (more) {  // global loads for the next step overlap the FMAs below
                op.template fetch_a<Cfg>(th, k0 + BK, ke, ra);
                op.template fetch_b<Cfg>(th, k0 + BK, ke, rb);
            }
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                float a[TM], b[TN];
#pragma unroll
                for (int j = 0; j < TM / 4; ++j) {
                    const float4 v = *reinterpret_cast<const float4*>(&As[buf][kk][j * 64 + ty * 4]);
                    a[4 * j] = v.x; a[4 * j + 1] = v.y; a[4 * j + 2] = v.z; a[4 * j + 3] = v.w;
                }
#pragma unroll
                for (int j = 0; j < TN / 4; ++j) {
                    const float4 v = *reinterpret_cast<const float4*>(&Bs[buf][kk][j * 64 + tx * 4]);
                    b[4 * j] = v.x; b[4 * j + 1] = v.y; b[4 * j + 2] = v.z; b[4 * j + 3] = v.w;
                }
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
            }
            if (more) {  // the other buffer was last read before the previous barrier: safe to fill
#pragma unroll
                for (int i = 0; i < AP; ++i) As[buf ^ 1][MapA::k(t, i)][MapA::mn(t, i)] = ra[i];
#pragma unroll
                for (int i = 0; i < BP; ++i) Bs[buf ^ 1][MapB::k(t, i)][MapB::mn(t, i)] = rb[i];
            }
            __syncthreads();
            buf ^= 1;
        }
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + (i / 4) * 64 + ty * 4 + (i % 4);
        if (m >= op.M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + (j / 4) * 64 + tx * 4 + (j % 4);
            if (n < op.N) op.store(th, z, m, n, acc[i][j]);
        }
    }
}

constexpr int64_t kMaxGemmDim = 0x7fffffffll - 1024;

// Tiles of BM x BN over an M x N problem with Z slices: the grid, checked against CUDA's limits.
template <class Cfg>
inline dim3 gemm_grid(const char* opname, int M, int N, int Z) {
    const int64_t gx = (static_cast<int64_t>(N) + Cfg::BN - 1) / Cfg::BN;
    const int64_t gy = (static_cast<int64_t>(M) + Cfg::BM - 1) / Cfg::BM;
    // Indices run to M, N (and the k-loop to Kr) plus one tile in 32-bit ints: keep them clear of 2^31.
    require(M <= kMaxGemmDim && N <= kMaxGemmDim && gy <= 65535 && Z >= 1 && Z <= 65535, opname,
            "problem too large for one launch");
    return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(Z));
}

template <class Cfg>
inline int64_t gemm_tiles(int M, int N) {
    return ((static_cast<int64_t>(M) + Cfg::BM - 1) / Cfg::BM) * ((static_cast<int64_t>(N) + Cfg::BN - 1) / Cfg::BN);
}

using GemmBig = GemmCfg<128, 128>;    // 8x8 per thread: for problems with enough tiles to fill the GPU
using GemmSmall = GemmCfg<64, 64>;    // 4x4 per thread: small M or few tiles

// Blocks that keep an H100 (132 SMs) busy: a fixed number, so results do not depend on the GPU model.
constexpr int64_t kTargetBlocks = 264;

// True when the 128x128 tile already gives enough blocks without split-K and does not waste most of M.
inline bool use_big_tiles(int M, int N, int Z) { return M > 64 && N > 64 && gemm_tiles<GemmBig>(M, N) * Z >= kTargetBlocks; }

// Split-K: how many slices the reduction of length Kr is cut into so that `blocks` tiles become about
// kTargetBlocks blocks, each slice at least 256 long and a multiple of the 8-deep k-step. Returns the
// slice length in *chunk; the slice count is ceil(Kr / chunk). Depends only on the shape: deterministic.
inline int choose_split_k(int64_t blocks, int Kr, int* chunk) {
    int splits = 1;
    if (blocks < kTargetBlocks / 2 && Kr > 512) {
        const int64_t want = (kTargetBlocks + blocks - 1) / blocks;
        const int64_t most = Kr / 256;
        splits = static_cast<int>(want < most ? want : most);
        if (splits > 64) splits = 64;
        if (splits < 1) splits = 1;
    }
    int c = (Kr + splits - 1) / splits;
    c = (c + 7) / 8 * 8;
    if (c < 8) c = 8;
    *chunk = c;
    return Kr > 0 ? (Kr + c - 1) / c : 1;
}

// out[i] = sum over s of parts[s * n + i] (+ bias[i % bias_period]), s ascending: the fixed-order second
// pass of split-K. Grid-stride over i; coalesced. (A template only so that every .cu may instantiate it.)
template <int kUnused = 0>
__global__ void __launch_bounds__(256)
    splitk_reduce_kernel(int64_t n, int splits, const float* __restrict__ parts, const float* __restrict__ bias,
                         int bias_period, float* __restrict__ out) {
    for (int64_t i = global_thread_id(); i < n; i += global_thread_count()) {
        float s = parts[i];
        for (int k = 1; k < splits; ++k) s += parts[static_cast<int64_t>(k) * n + i];
        if (bias != nullptr) s += bias[i % bias_period];
        out[i] = s;
    }
}

template <int kUnused = 0>
void splitk_reduce(const char* opname, int64_t n, int splits, const float* parts, const float* bias,
                          int bias_period, float* out, void* stream) {
    if (n <= 0) return;
    splitk_reduce_kernel<><<<grid_1d(n), kThreads1d, 0, as_stream(stream)>>>(n, splits, parts, bias, bias_period, out);
    AX_LAUNCH_CHECK(opname);
}

// Scratch for split-K partial sums from the caching allocator, owned by `stream` (so a later reuse of
// the block is ordered after the kernels that read it); released when the returned tensor dies.
inline Tensor workspace(const char* opname, int64_t nfloats, void* stream) {
    int dev = 0;
    AX_CUDA_CHECK(opname, cudaGetDevice(&dev));
    StreamGuard guard(dev, stream);
    return Tensor::empty({nfloats}, DType::f32, Device{Device::CUDA, dev});
}

}  // namespace cuda
}  // namespace ax
