// Shared pieces of the CUDA backend: error checks that name the op, launch-size helpers, exact fast
// integer division for index decomposition, deterministic block reductions, and the one tiled GEMM
// main loop that every matrix-shaped kernel (linear and the three convolution passes) instantiates.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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
// n / d == (n * m) >> (31 + l) == umulhi(2n, m) >> l (2n < 2^32). Index decomposition in the GEMM loaders runs
// this instead of IDIV: three instructions and no branch, d = 1 included (m = 2^31, l = 0), so the gather-table
// code in the GEMM main loop needs no test of d.
struct FastDiv {
    int d = 1;
    uint32_t mul = 0x80000000u, shr = 0;
    FastDiv() = default;
    explicit FastDiv(int divisor) : d(divisor) {
        if (d < 1) throw std::invalid_argument("FastDiv: divisor must be >= 1");
        int l = 0;
        while ((1ll << l) < d) ++l;
        mul = static_cast<uint32_t>(((1ull << (31 + l)) + static_cast<uint64_t>(d) - 1) / static_cast<uint64_t>(d));
        shr = static_cast<uint32_t>(l);
    }
    __host__ __device__ __forceinline__ int div(int n) const {
        const uint32_t n2 = static_cast<uint32_t>(n) << 1;
#ifdef __CUDA_ARCH__
        return static_cast<int>(__umulhi(n2, mul) >> shr);
#else
        return static_cast<int>((static_cast<uint64_t>(n2) * mul >> 32) >> shr);
#endif
    }
    // q = n / d, r = n % d for 0 <= n < 2^31.
    __host__ __device__ __forceinline__ void divmod(int n, int& q, int& r) const {
        q = div(n);
        r = n - q * d;
    }
};

// ---- register pressure -----------------------------------------------------------------------------------
// An opaque copy of v: nothing derived from it can be hoisted out of the loop it is called in. The GEMM
// loaders test their row/column masks bit by bit at each copy (one instruction per copy) through it, instead
// of the compiler keeping one precomputed predicate per element alive across the multiply, which spills at
// the 128-register cap.
__device__ __forceinline__ unsigned opaque(unsigned v) {
#ifdef __CUDA_ARCH__
    asm volatile("" : "+r"(v));
#endif
    return v;
}

// An opaque copy of a pointer: the compiler cannot split base + offset apart again and rebuild the address of
// every gathered element from a 64-bit integer offset (four instructions); p + int offset is one IMAD.WIDE.
__device__ __forceinline__ const float* opaque_ptr(const float* p) {
#ifdef __CUDA_ARCH__
    asm volatile("" : "+l"(p));
#endif
    return p;
}

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

// ---- asynchronous global -> shared copies (cp.async, sm_80+) ----------------------------------------
// cp_async4(dst, src, ok) copies one float to shared memory without a register, or writes 0 when !ok (src
// is then not read, so it may point anywhere); cp_async16(dst, src, bytes) copies the first `bytes` (0, 4, 8, 12
// or 16) of four floats and zero-fills the rest, dst and src 16-byte aligned (src not read when bytes is 0: it
// may point anywhere then, aligned); cp_async_commit closes a group of this thread's copies and
// cp_async_wait<N> waits until at most N of its groups are still in flight. A barrier is still needed
// before other threads read what the copies wrote. Below sm_80 the copy is an ordinary load and store;
// the CPU emulator (tests/cuda_emu) defers each group to the wait, as a GPU may.
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool ok) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async16(float* dst, const float* src, int bytes) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#elif defined(AX_EMU_CP_ASYNC)
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool ok) { ::emu::cp_async4(dst, src, ok); }
__device__ __forceinline__ void cp_async16(float* dst, const float* src, int bytes) {
    ::emu::cp_async16(dst, src, bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    ::emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool ok) { *dst = ok ? __ldg(src) : 0.0f; }
__device__ __forceinline__ void cp_async16(float* dst, const float* src, int bytes) {
#pragma unroll
    for (int j = 0; j < 4; ++j) dst[j] = 4 * j < bytes ? __ldg(src + j) : 0.0f;
}
__device__ __forceinline__ void cp_async_commit() {}
template <int N>
__device__ __forceinline__ void cp_async_wait() {}
#endif

// ---- the tiled GEMM main loop ------------------------------------------------------------------------
// C (M x N) = A (M x Kr) * B (Kr x N) for each z = blockIdx.z, where A, B, C are *views* supplied by an
// Op: plain strided matrices (linear) or implicit im2col views (convolutions). Block tile BM x BN x 16,
// (BM/TM) x (BN/8) threads, each owning a TM x 8 register micro-tile (GemmCfg::row: 4x4 pieces strided by
// BM/2 rows and BN/2 columns, so shared-memory reads are float4 and broadcast-friendly). Shared tiles are
// stored k-major (As[k][m], Bs[k][n]) in an S-stage ring filled by cp.async: tile j+S-1 is copied while
// tile j is multiplied, with no register staging and one barrier per k-step; the loop is unrolled S times
// so that stage and table-slot indices are constants. The k-range [kb, ke) is walked from ke - nt*16
// (nt = ceil((ke-kb)/16)): the first tile is the only partial one, so the loop's copies check no k bound.
// Rows >= M and columns >= N only feed accumulators the epilogue never stores, but their copies are still
// switched off (src may lie outside the tensor). Every store is bounds-checked: any M, N, Kr.
// What the loop costs besides its FFMA (benchmarks/model.py reads it from the SASS): per k-step the float4
// reads of the micro-tile, per copy an address (one IMAD.WIDE: loaders keep opaque base pointers and 32-bit
// offsets) and one predicate (a compare against a prefix count, or one AND with a tap mask), per gather-table
// entry one shared load (half an LDS.128 for the 8-byte tap-mask entries), and the table entries of a tile.
//
// Gather tables: an Op with kTab = true gets, for every k of the tile it fetches, an Entry that it
// computed once per k for the whole block (run by threads 0..15 for the tile after the one being fetched, S
// slots in shared memory, a thread's entries consecutive: TabSlot). The implicit-GEMM loaders decompose
// k = (c, r, s) or (img, p, q) there instead of per element, so their inner loop is an address add, a
// compare or AND, and the copy. Before the loop entry(k, kb, ke) builds them; in the loop entry_loop, from
// a per-block lookup table where the Op has one (kLut).
//
// Op interface (all __device__ const; `Th` is whatever thread<Cfg>() returns: per-thread register state):
//   int M, N;                                  GEMM size of one z slice
//   static constexpr bool kAContigK, kBContigK true: neighbouring threads fetch neighbouring k
//                                              (the operand is contiguous along k); false: along m / n
//   static constexpr bool kTab; struct Entry;  the gather table (Entry unused when kTab is false)
//   Entry entry(int k, int kb, int ke)         the table entry of k; k outside [kb, ke) gets one whose
//                                              loads all fail their bounds checks
//   static constexpr int kLut;                 > 0: entries are built in the loop from a per-block lookup
//   Entry lut_entry(int i)                     table of kLut Entries (lut_entry(i), filled before the loop);
//                                              an Op with kTab false reads that table itself: its fetches get
//                                              it as `tab`
//   Entry entry_loop(int k, const Entry* lut)  by entry_loop, which need not check k: the loop builds entries
//                                              of k < kb never and uses none of k >= ke (the tiles past the
//                                              end are not fetched); entry_loop(k) == entry(k) for k in range
//   template <class Cfg> Th thread(int z, int m0, int n0) const;   per-thread precomputation for the
//                                              tile at (m0, n0) (pointers, masks of rows/columns < M/N)
//   void k_range(int z, int& kb, int& ke)      the reduction range of slice z (split-K)
//   template <class Cfg, bool kCheck, class Th, class Put>
//   void fetch_a(const Th&, const Entry* tab, int k0, int kb, int ke, Put& put)
//   ... fetch_b likewise
//       for each of the thread's elements i of the tile starting at k0 (see TileMap; tab[TabSlot::of(i)]
//       is the entry of k0 + i), put(i, src, ok): ok false where m >= M / n >= N and, when kCheck, where k is
//       outside [kb, ke) (src is then not read); without kCheck the whole tile lies inside [kb, ke)
//   template <class Th> void store(const Th&, int z, int m, int n, float v)   called for m < M, n < N only

// A spatial coordinate that fails every bounds check it is added to (table entries of k outside the
// range, columns outside N); two of them still sum below 2^31.
constexpr int kGatherInvalid = 1 << 29;

// Entry type of the ops without a gather table.
struct NoEntry {
    int unused;
};

template <int BM_, int BN_, int TM_ = 8, int S_ = (BM_ * BN_ >= 128 * 128 ? 2 : 3)>
struct GemmCfg {
    // 16-deep k-steps: the per-step costs (barrier, wait, stage rotation, the gather-table entries) are paid
    // once per 16 x 64 FFMA instead of once per 8 x 64. 128x128 keeps two stages (three would need 50 KB of
    // static shared memory); the smaller tiles keep three.
    static constexpr int BM = BM_, BN = BN_, BK = 16, TM = TM_, TN = 8, kStages = S_;
    static constexpr int kThreads = (BM / TM) * (BN / TN);
    // Blocks per SM the register budget must allow (__launch_bounds__): 16 warps per SM, which caps the
    // micro-tile at 128 registers and hides one block's barrier stalls behind the others.
    static constexpr int kMinBlocks = 512 / kThreads;
    static constexpr int kAPerThread = BM * BK / kThreads, kBPerThread = BN * BK / kThreads;
    // +4 floats per shared row: the k-contiguous fetch pattern stores k-rows x few columns per warp, which
    // this padding spreads over the banks; rows stay 16-byte aligned for float4 reads.
    static constexpr int APitch = BM + 4, BPitch = BN + 4;
    // Main-loop instructions per 100 FFMA (the loads, gathers and bookkeeping around them), as the SASS of
    // the convolutions' loops shows them (benchmarks/model.py): what one FFMA of this tile costs in issue
    // slots, relative to the others, when tile_cost compares tiles.
    static constexpr int kLoopCost = BM == 128 ? 116 : (TM == 6 ? 123 : (BN == 128 ? 118 : 121));
    static_assert(((TM == 8 && (BM == 64 || BM == 128)) || (TM == 6 && (BM == 48 || BM == 96))) &&
                      (BN == 64 || BN == 128) && BM <= BN && (kStages == 2 || kStages == 3),
                  "GemmCfg: tiles are 128x128, 64x128, 64x64 (8x8 micro-tiles) or 48x128, 48x64, 96x128 (6x8)");
    // Row of the block tile that a thread in row-group ty holds as its i-th micro-tile row. 8 rows: two
    // pieces of 4 strided by BM/2 (float4 reads); 6 rows (BM = 48 or 96): 4 in the first two thirds of the tile,
    // 2 in the last third (a float4 and a float2 read).
    __host__ __device__ static constexpr int row(int i, int ty) {
        return TM == 8 ? (i / 4) * (BM / 2) + ty * 4 + (i % 4)
                       : (i < 4 ? ty * 4 + i : BM / 3 * 2 + ty * 2 + (i - 4));
    }
};

// Which element of a (BMN x BK) operand tile thread t of T fetches as its i-th element. k-contiguous: the
// 8 threads t..t+7 walk k (so k = t % 8 is fixed per thread, mn = t/8 + (T/8) i); mn-contiguous: threads
// walk mn (mn = t % BMN fixed per thread, k = t / BMN + (T/BMN) i). Both cover the tile exactly once.
template <int BMN, int BK, bool kContigK, int T>
struct TileMap {
    static_assert(kContigK ? (T % BK == 0 && BMN % (T / BK) == 0) : (T % BMN == 0 && BK % (T / BMN) == 0),
                  "TileMap: tile must divide the block");
    __device__ __forceinline__ static int mn(int t, int i) { return kContigK ? t / BK + (T / BK) * i : t % BMN; }
    __device__ __forceinline__ static int k(int t, int i) { return kContigK ? t % BK : t / BMN + (T / BMN) * i; }
    // Distance in mn (k-contiguous) or k (mn-contiguous) between a thread's consecutive elements.
    static constexpr int kStep = kContigK ? T / BK : T / BMN;
};

// Where the gather table keeps the entry of k0 + i: grouped by the k's one thread of the mn-contiguous B
// operand fetches (k = kt + kStep j lies at kt * (BK / kStep) + j), so a thread's entries are consecutive and
// an Op with 8-byte entries reads two per 16-byte load. (B of every gather op is mn-contiguous.)
template <class Cfg>
struct TabSlot {
    static constexpr int kStep = Cfg::kThreads / Cfg::BN < 1 ? 1 : Cfg::kThreads / Cfg::BN;
    static constexpr int kPer = Cfg::BK / kStep;  // entries per k-lane
    static_assert(Cfg::BK % kStep == 0 && kPer % 2 == 0, "TabSlot: k-lanes of an even number of entries");
    __host__ __device__ static constexpr int of(int i) { return (i % kStep) * kPer + i / kStep; }
};

// The sink an Op's fetch writes to: it collects the thread's sources in runs of kRun and copies element i
// to d + i * kStep in the shared stage when a run is complete. Issuing copies back to back, after their
// addresses are known, keeps the compiler's padding between address arithmetic and a cp.async to one run;
// runs of at most 8 keep the sources of a 16-element operand from holding 32 registers at once.
template <int E, int kStep>
struct TilePut {
    static constexpr int kRun = E < 8 ? E : 8;
    float* d;
    const float* src[kRun];
    bool ok[kRun];
    __device__ __forceinline__ void operator()(int i, const float* s, bool o) {
        src[i % kRun] = s;
        ok[i % kRun] = o;
        if (i % kRun == kRun - 1 || i == E - 1) {
            const int base = i - i % kRun;
#pragma unroll
            for (int r = 0; r < kRun; ++r)
                if (base + r <= i) cp_async4(d + (base + r) * kStep, src[r], ok[r]);
        }
    }
};

// Issues this thread's copies of the A and B tiles at k0 into the stage at dA / dB.
template <class Cfg, bool kCheck, class Op, class Th>
__device__ __forceinline__ void fetch_tile(const Op& op, const Th& th, const typename Op::Entry* tab, int k0, int kb,
                                           int ke, float* dA, float* dB) {
    using MapA = TileMap<Cfg::BM, Cfg::BK, Op::kAContigK, Cfg::kThreads>;
    using MapB = TileMap<Cfg::BN, Cfg::BK, Op::kBContigK, Cfg::kThreads>;
    TilePut<Cfg::kAPerThread, Op::kAContigK ? MapA::kStep : MapA::kStep * Cfg::APitch> pa{dA};
    TilePut<Cfg::kBPerThread, Op::kBContigK ? MapB::kStep : MapB::kStep * Cfg::BPitch> pb{dB};
    // B first: the compiler pads every switch from shared loads (B's gather table) to cp.async with three
    // no-op instructions, and A's copies, which read no table, then follow B's without one.
    op.template fetch_b<Cfg, kCheck>(th, tab, k0, kb, ke, pb);
    op.template fetch_a<Cfg, kCheck>(th, tab, k0, kb, ke, pa);
}

template <class Cfg, class Op>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks) gemm_tiled_kernel(const Op op) {
    constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN, T = Cfg::kThreads;
    constexpr int S = Cfg::kStages, L = S - 1;  // L: tiles in flight ahead of the one being multiplied
    using Entry = typename Op::Entry;
    __shared__ __align__(16) float As[S][BK][Cfg::APitch];
    __shared__ __align__(16) float Bs[S][BK][Cfg::BPitch];
    __shared__ __align__(16) Entry tab[S][Op::kTab ? BK : 1];
    __shared__ __align__(16) Entry lut[Op::kLut > 0 ? Op::kLut : 1];

    const int t = threadIdx.x;
    const int tx = t % (BN / TN), ty = t / (BN / TN);
    const int z = blockIdx.z;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    using MapA = TileMap<BM, BK, Op::kAContigK, T>;
    using MapB = TileMap<BN, BK, Op::kBContigK, T>;
    constexpr int kAStage = BK * Cfg::APitch, kBStage = BK * Cfg::BPitch;

    const auto th = op.template thread<Cfg>(z, m0, n0);
    int kb = 0, ke = 0;
    op.k_range(z, kb, ke);

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    if (kb < ke) {
        const int nt = (ke - kb + BK - 1) / BK;
        int k0 = ke - nt * BK;  // the partial tile first: every tile the loop fetches is whole
        float* const dA = &As[0][MapA::k(t, 0)][MapA::mn(t, 0)];  // this thread's element 0 in stage 0
        float* const dB = &Bs[0][MapB::k(t, 0)][MapB::mn(t, 0)];
        // Tile i's table entries live in slot i % S. Before the loop: tiles 0..L; in step j, tile j + L + 1's
        // entries go to the slot of tile j + L + 1 - S, which was fetched in step j + 1 - S, before step j's barrier.
        if constexpr (Op::kLut > 0) {
            for (int i = t; i < Op::kLut; i += T) lut[i] = op.lut_entry(i);
        }
        if (Op::kTab && t < BK) {
#pragma unroll
            for (int i = 0; i <= L; ++i) tab[i][TabSlot<Cfg>::of(t)] = op.entry(k0 + i * BK + t, kb, ke);
        }
        if (Op::kTab || Op::kLut > 0) __syncthreads();
        // An Op without a gather table that has a lookup table gets the lookup table in its place.
        const auto tab_of = [&](int slot) -> const Entry* { return Op::kTab ? tab[slot] : lut; };
        fetch_tile<Cfg, true>(op, th, tab_of(0), k0, kb, ke, dA, dB);
        cp_async_commit();
        if constexpr (L == 2) {
            if (nt > 1) {
                fetch_tile<Cfg, false>(op, th, tab_of(1), k0 + BK, kb, ke, dA + kAStage, dB + kBStage);
            }
            cp_async_commit();
        }

        // Step j (tile j in stage j % S, j = jj + U): the loop is unrolled S times, so every stage and table slot
        // is a constant and no index rotates.
        auto step = [&](int j, int k0j, auto U) {
            constexpr int u = decltype(U)::value, sc = u, sn = (u + L) % S;
            cp_async_wait<L - 1>();  // this thread's copies of tile j have landed (later ones may be in flight)
            __syncthreads();         // everyone's have; stage sn (tile j - 1) and table slot (u + L + 1) % S are free
            if (j + L < nt) {
                fetch_tile<Cfg, false>(op, th, tab_of(sn), k0j + L * BK, kb, ke, dA + sn * kAStage,
                                       dB + sn * kBStage);
            }
            cp_async_commit();  // possibly empty: keeps one group per step for the wait above
            if (Op::kTab && t < BK) {
                Entry& e = tab[(u + L + 1) % S][TabSlot<Cfg>::of(t)];
                if constexpr (Op::kLut > 0) {
                    e = op.entry_loop(k0j + (L + 1) * BK + t, lut);
                } else {
                    e = op.entry(k0j + (L + 1) * BK + t, kb, ke);
                }
            }
            const float* const as = &As[sc][0][0];
            const float* const bs = &Bs[sc][0][0];
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                float a[TM], b[TN];
                const float4 v = *reinterpret_cast<const float4*>(as + kk * Cfg::APitch + Cfg::row(0, ty));
                a[0] = v.x; a[1] = v.y; a[2] = v.z; a[3] = v.w;
                if constexpr (TM == 8) {
                    const float4 v2 = *reinterpret_cast<const float4*>(as + kk * Cfg::APitch + Cfg::row(4, ty));
                    a[4] = v2.x; a[5] = v2.y; a[6] = v2.z; a[7] = v2.w;
                } else {
                    const float2 v2 = *reinterpret_cast<const float2*>(as + kk * Cfg::APitch + Cfg::row(4, ty));
                    a[4] = v2.x; a[5] = v2.y;
                }
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float4 u4 = *reinterpret_cast<const float4*>(bs + kk * Cfg::BPitch + h * (BN / 2) + tx * 4);
                    b[4 * h] = u4.x; b[4 * h + 1] = u4.y; b[4 * h + 2] = u4.z; b[4 * h + 3] = u4.w;
                }
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int jj = 0; jj < TN; ++jj) acc[i][jj] = fmaf(a[i], b[jj], acc[i][jj]);
            }
        };
        for (int j = 0; j < nt; j += S, k0 += S * BK) {
            step(j, k0, std::integral_constant<int, 0>{});
            if (j + 1 < nt) step(j + 1, k0 + BK, std::integral_constant<int, 1>{});
            if constexpr (S == 3) {
                if (j + 2 < nt) step(j + 2, k0 + 2 * BK, std::integral_constant<int, 2>{});
            }
        }
        cp_async_wait<0>();
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + Cfg::row(i, ty);
        if (m >= op.M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + (j / 4) * (BN / 2) + tx * 4 + (j % 4);
            if (n < op.N) op.store(th, z, m, n, acc[i][j]);
        }
    }
}

// Both towers' problems of one pass in one launch, when they share a device and a stream: slices z in
// [0, zper) are tower 0's op (slice z), [zper, 2 zper) tower 1's (slice z - zper). The two ops have the same
// geometry and differ only in their pointers, so the gather table and the fetches (which read the
// per-thread state and the geometry) are tower 0's code; thread() and store() pick the tower. A launch twice
// as large fills the tail round of one tower with the other's blocks. Each output element's k-sum runs in
// the same order as in a launch of its own tower (the tile shape never changes that order, and the pair
// keeps the single launch's split-K), so the results are bit for bit those of two launches.
template <class Op>
struct TowerPair {
    static constexpr bool kAContigK = Op::kAContigK, kBContigK = Op::kBContigK, kTab = Op::kTab;
    static constexpr int kLut = Op::kLut;
    using Entry = typename Op::Entry;
    int M, N, zper;
    Op op0, op1;

    __device__ Entry entry(int k, int kb, int ke) const { return op0.entry(k, kb, ke); }
    __device__ Entry lut_entry(int i) const { return op0.lut_entry(i); }
    __device__ Entry entry_loop(int k, const Entry* lut) const { return op0.entry_loop(k, lut); }
    template <class Cfg>
    __device__ auto thread(int z, int m0, int n0) const {
        return z < zper ? op0.template thread<Cfg>(z, m0, n0) : op1.template thread<Cfg>(z - zper, m0, n0);
    }
    __device__ void k_range(int z, int& kb, int& ke) const { op0.k_range(z < zper ? z : z - zper, kb, ke); }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_a(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        op0.template fetch_a<Cfg, kCheck>(t, tab, k0, kb, ke, put);
    }
    template <class Cfg, bool kCheck, class Th, class Put>
    __device__ void fetch_b(const Th& t, const Entry* tab, int k0, int kb, int ke, Put& put) const {
        op0.template fetch_b<Cfg, kCheck>(t, tab, k0, kb, ke, put);
    }
    template <class Th>
    __device__ void store(const Th& t, int z, int m, int n, float v) const {
        if (z < zper) op0.store(t, z, m, n, v);
        else op1.store(t, z - zper, m, n, v);
    }
};

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

using GemmBig = GemmCfg<128, 128>;       // 256 threads: for problems with enough tiles to fill the GPU
using GemmWide = GemmCfg<64, 128>;       // 128 threads: M = 64, 192, or when 128x128 tiles round badly
using GemmNarrow = GemmCfg<48, 128, 6>;  // 128 threads, 6x8 micro-tiles: M = 48, 96 (k-contiguous A only)
// 256 threads, 6x8 micro-tiles: two towers of M = 48 that read the same B, stacked (conv.cu TowerStack)
using GemmStack = GemmCfg<96, 128, 6>;
using GemmSmall = GemmCfg<64, 64>;       // 64 threads: the linear layers' small or odd M, with split-K

enum class Tile { Big, Wide, Narrow, Small };

// Blocks that keep an H100 (132 SMs) busy: a fixed number, so results do not depend on the GPU model.
constexpr int64_t kTargetBlocks = 264;

// True when the 128x128 tile already gives enough blocks without split-K and does not waste most of M.
inline bool use_big_tiles(int M, int N, int Z) { return M > 64 && N > 64 && gemm_tiles<GemmBig>(M, N) * Z >= kTargetBlocks; }

// True when 48-row tiles pad M less than 64-row ones (M = 48, 96, 40, ...).
inline bool narrow_fits(int M) { return (M + 47) / 48 * 48 < (M + 63) / 64 * 64; }

// Relative time of an M x N (x Z) GEMM on tile Cfg, for choosing between tiles: the busiest of 132 SMs runs
// ceil(blocks / 132) blocks in rounds of up to kMinBlocks (what the registers allow); a round issues at full
// rate once 16 warps are resident, else in proportion to its warps; each block costs its BM x BN FFMA at
// kLoopCost issue slots per 100.
template <class Cfg>
inline int64_t tile_cost(int M, int N, int Z) {
    const int64_t per_sm = (gemm_tiles<Cfg>(M, N) * Z + 131) / 132;
    const int64_t full = per_sm / Cfg::kMinBlocks, rest = per_sm % Cfg::kMinBlocks;
    const int64_t slow = 16 / (Cfg::kThreads / 32);  // a round of fewer blocks costs this many
    const int64_t rounds = full * Cfg::kMinBlocks + (rest > 0 ? (rest > slow ? rest : slow) : 0);
    return rounds * Cfg::BM * Cfg::BN * Cfg::kLoopCost;
}

// Forward and grad-input convolutions (no split-K): the cheapest of 128x128, 64x128 and 48x128 by tile_cost
// (128x128 only for M > 64, N > 64); a tie goes to the larger tile.
inline Tile conv_tile(int M, int N, int Z) {
    const int64_t big = M > 64 && N > 64 ? tile_cost<GemmBig>(M, N, Z) : INT64_MAX;
    const int64_t wide = tile_cost<GemmWide>(M, N, Z), narrow = tile_cost<GemmNarrow>(M, N, Z);
    if (big <= wide && big <= narrow) return Tile::Big;
    return wide <= narrow ? Tile::Wide : Tile::Narrow;
}

// Split-K GEMMs (weight gradients, linear layers): 128x128 without split-K when that gives enough blocks;
// else split-K on 48x128 tiles where they fit M better (narrow_ok: an op whose A is k-contiguous), on
// 128x128 tiles when M is a multiple of 128, and on `other` (64x128 or 64x64) otherwise.
inline Tile split_tile(int M, int N, int Z, bool narrow_ok, Tile other) {
    if (use_big_tiles(M, N, Z)) return Tile::Big;
    if (narrow_ok && narrow_fits(M)) return Tile::Narrow;
    if (M % 128 == 0) return Tile::Big;
    return other;
}

// Split-K on tile Cfg: how many slices the reduction of length Kr is cut into so that `blocks` tiles become
// at most one round of the GPU (132 x kMinBlocks blocks), each slice at least 128 long and a multiple of
// the 16-deep k-step; only when the tiles alone fill under half of it. Returns the slice length in *chunk;
// the slice count is ceil(Kr / chunk). Depends only on the shape: deterministic.
template <class Cfg>
inline int choose_split_k(int64_t blocks, int Kr, int* chunk) {
    constexpr int64_t target = 132 * Cfg::kMinBlocks;
    int splits = 1;
    if (blocks < target / 2 && Kr > 256) {
        // Rounded down: one more block than the GPU holds at once would cost a whole extra round.
        const int64_t want = target / blocks;
        const int64_t most = Kr / 128;
        splits = static_cast<int>(want < most ? want : most);
        if (splits > 256) splits = 256;
        if (splits < 1) splits = 1;
    }
    int c = (Kr + splits - 1) / splits;
    c = (c + Cfg::BK - 1) / Cfg::BK * Cfg::BK;
    if (c < Cfg::BK) c = Cfg::BK;
    *chunk = c;
    return Kr > 0 ? (Kr + c - 1) / c : 1;
}

// The ReLU of a fused forward epilogue: exactly relu_forward_kernel's (relu.cu), so fused and unfused agree bit
// for bit.
__device__ __forceinline__ float relu_epilogue(float v) { return v > 0.0f ? v : 0.0f; }

// The max-pool window of output (op, oq) over the plane xp (H x W, row-major): the maximum over its in-bounds
// elements (padding never wins, and every window has one) and the flat h*W+w of the first maximum in row-major
// window order (strict >). Shared by maxpool_forward_kernel (pool.cu) and the fused LRN + pool (lrn.cu), which
// reads the plane from shared memory, so both give the same bits.
__device__ __forceinline__ void maxpool_window(const float* xp, const PoolParams& p, int op, int oq, float& best,
                                               int& arg) {
    const int hs = op * p.stride_h - p.pad_h, ws = oq * p.stride_w - p.pad_w;
    best = 0.0f;
    arg = -1;
    for (int r = 0; r < p.window_h; ++r) {
        const int h = hs + r;
        if (h < 0 || h >= p.H) continue;
        for (int s = 0; s < p.window_w; ++s) {
            const int w = ws + s;
            if (w < 0 || w >= p.W) continue;
            const float v = xp[h * p.W + w];
            if (arg < 0 || v > best) {
                best = v;
                arg = h * p.W + w;
            }
        }
    }
}

// A gradient passed back through a ReLU whose output was y, as relu_backward_kernel does; relu_y null: unchanged.
__device__ __forceinline__ float relu_grad_epilogue(float g, const float* relu_y, int64_t i) {
    return relu_y == nullptr || relu_y[i] > 0.0f ? g : 0.0f;
}

// a[i] for a run-time i < N without indexing the array dynamically: kernel parameter arrays indexed at run time
// are copied to local memory (a stack frame); this unrolls into selects.
template <class T, int N>
__device__ __forceinline__ T pick(const T (&a)[N], int i) {
    T v = a[0];
#pragma unroll
    for (int k = 1; k < N; ++k) v = i == k ? a[k] : v;
    return v;
}

// The fixed-order second pass of a split reduction (split-K, the conv bias gradient's slices): one segment's
// out[i] = sum over s < splits of parts[s * n + i] (+ bias[i % bias_period]) (then the ReLU when relu). Each
// element's slices are added in ascending order by one thread (lanes 1), or, where the output has too few elements
// to fill the GPU with a thread each (split_reduce_lanes), by kReduceLanes warps: warp l adds slices l*c .. l*c+c-1
// (c = ceil(splits / kReduceLanes)) in order, then the warps' sums are added in warp order. The order depends only
// on (n, splits): deterministic, and the same for a tower alone and for both towers' segments in one launch.
constexpr int kReduceLanes = 8;
constexpr int64_t kReduceSmall = 65536;  // below this many elements (half the GPU's thread slots) use lanes
struct SplitSeg {
    const float* parts;
    const float* bias;  // nullable
    float* out;
    int64_t n;
    int splits, bias_period;
    int relu, lanes;    // lanes: 1 or kReduceLanes (split_reduce_lanes)
    int first_block, unused;
};
constexpr int kMaxSplitSegs = 4;
struct SplitSegs {
    SplitSeg seg[kMaxSplitSegs];
    int count, unused;  // no padding bytes (tests/cuda_emu reads the struct's words as possible pointers)
};

inline int split_reduce_lanes(int64_t n, int splits) {
    return n < kReduceSmall && splits >= kReduceLanes ? kReduceLanes : 1;
}

__device__ __forceinline__ float split_epilogue(const SplitSeg& g, int64_t i, float s) {
    if (g.bias != nullptr) s += g.bias[i % g.bias_period];
    return g.relu ? relu_epilogue(s) : s;
}

// Every segment's blocks in one grid: block b belongs to the last segment whose first_block <= b; 256 output
// elements per block (lanes 1) or 32 (lanes kReduceLanes). (A template only so that every .cu may instantiate it.)
template <int kUnused = 0>
__global__ void __launch_bounds__(256) split_reduce_kernel(SplitSegs segs) {
    __shared__ float red[kReduceLanes][33];
    int j = 0;
    while (j + 1 < segs.count && static_cast<int>(blockIdx.x) >= segs.seg[j + 1].first_block) ++j;
    const SplitSeg& g = segs.seg[j];
    const int64_t b = static_cast<int64_t>(blockIdx.x) - g.first_block;
    const float* __restrict__ parts = g.parts;
    if (g.lanes == 1) {
        const int64_t i = b * 256 + threadIdx.x;
        if (i < g.n) {
            float s = parts[i];
            for (int k = 1; k < g.splits; ++k) s += parts[static_cast<int64_t>(k) * g.n + i];
            g.out[i] = split_epilogue(g, i, s);
        }
        return;  // the whole block: lanes is the segment's
    }
    const int e = threadIdx.x & 31, lane = threadIdx.x >> 5;
    const int64_t i = b * 32 + e;
    const int c = (g.splits + kReduceLanes - 1) / kReduceLanes;
    const int s0 = lane * c, s1 = min(g.splits, s0 + c);
    float s = 0.0f;
    if (i < g.n && s0 < s1) {
        s = parts[static_cast<int64_t>(s0) * g.n + i];
        for (int k = s0 + 1; k < s1; ++k) s += parts[static_cast<int64_t>(k) * g.n + i];
    }
    red[lane][e] = s;
    __syncthreads();
    if (lane == 0 && i < g.n) {
        float t = red[0][e];
        for (int l = 1; l < kReduceLanes && l * c < g.splits; ++l) t += red[l][e];
        g.out[i] = split_epilogue(g, i, t);
    }
}

// One segment: n outputs from `splits` slices of n at parts.
inline SplitSeg split_seg(int64_t n, int splits, const float* parts, float* out, const float* bias = nullptr,
                          int bias_period = 1, bool relu = false) {
    SplitSeg g{};
    g.parts = parts;
    g.bias = bias;
    g.out = out;
    g.n = n;
    g.splits = splits;
    g.bias_period = bias_period;
    g.relu = relu ? 1 : 0;
    g.lanes = split_reduce_lanes(n, splits);
    return g;
}

// Up to kMaxSplitSegs segments (empty ones dropped) in one launch.
template <int kUnused = 0>
void split_reduce(const char* opname, const SplitSeg* segs, int count, void* stream) {
    SplitSegs all{};
    int blocks = 0;
    for (int j = 0; j < count; ++j) {
        if (segs[j].n <= 0) continue;
        require(all.count < kMaxSplitSegs, opname, "too many reductions for one launch");
        SplitSeg g = segs[j];
        g.first_block = blocks;
        const int64_t per = g.lanes == 1 ? 256 : 32;
        const int64_t nb = (g.n + per - 1) / per;
        require(blocks + nb < 0x7fffffff, opname, "reduction too large for one launch");
        blocks += static_cast<int>(nb);
        all.seg[all.count++] = g;
    }
    if (all.count == 0) return;
    split_reduce_kernel<><<<blocks, 256, 0, as_stream(stream)>>>(all);
    AX_LAUNCH_CHECK(opname);
}

template <int kUnused = 0>
void splitk_reduce(const char* opname, int64_t n, int splits, const float* parts, const float* bias,
                          int bias_period, float* out, void* stream, bool relu = false) {
    const SplitSeg g = split_seg(n, splits, parts, out, bias, bias_period, relu);
    split_reduce(opname, &g, 1, stream);
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
