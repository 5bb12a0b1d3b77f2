// CUDA backend of local response normalization across channels (NCHW). One thread per element: planes
// (n, c) over blockIdx.y, pixels over x threads (coalesced), each thread reading its channel window at
// stride H*W; the backward shares each channel's quotient through shared memory instead
// (lrn_backward_tiled_kernel). Windowed sums run in ascending channel order with rounded intrinsics (no FMA
// contraction), as the CPU evaluates them. lrn_maxpool_forward fuses the forward with the max-pool of its output (a
// block per plane, the plane in shared memory).
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// scale = k + alpha * sum_{j in window(c)} x[j]^2 ; y = x * scale^-beta, at pixel i of the (n, c) plane xc
// (channel j is at offset (j - c) * HW), channels j0..j1. One definition for both forward kernels.
__device__ __forceinline__ float lrn_at(const float* __restrict__ xc, int64_t HW, int c, int j0, int j1, int64_t i,
                                        float k, float alpha, float neg_beta, float& sc) {
    float sum = 0.0f;
    for (int j = j0; j <= j1; ++j) {
        const float v = xc[static_cast<int64_t>(j - c) * HW + i];
        sum = __fadd_rn(sum, __fmul_rn(v, v));
    }
    sc = __fadd_rn(k, __fmul_rn(alpha, sum));
    return __fmul_rn(xc[i], powf(sc, neg_beta));
}

__global__ void __launch_bounds__(kThreads1d)
    lrn_forward_kernel(int64_t planes, int C, int HW, int half, float k, float alpha, float neg_beta,
                       const float* __restrict__ x, float* __restrict__ y, float* __restrict__ scale) {
    for (int64_t pl = blockIdx.y; pl < planes; pl += gridDim.y) {
        const int c = static_cast<int>(pl % C);
        const int j0 = max(0, c - half), j1 = min(C - 1, c + half);
        const float* xc = x + pl * HW;  // this (n, c) plane
        for (int64_t i = global_thread_id(); i < HW; i += global_thread_count()) {
            float sc;
            const float v = lrn_at(xc, HW, c, j0, j1, i, k, alpha, neg_beta, sc);
            const int64_t o = pl * HW + i;
            scale[o] = sc;
            y[o] = v;
        }
    }
}

// LRN and the max-pool of its output in one pass: a block per (n, c) plane (grid-stride over planes) computes the
// plane's LRN as lrn_forward_kernel does, writing y and scale (LRN's backward reads them) and keeping y in shared
// memory, then pools from there as maxpool_forward_kernel does (maxpool_window). Saves re-reading y from memory
// and a launch; planes above kLrnPoolMaxPlane pixels take the two kernels instead.
constexpr int kLrnPoolMaxPlane = 4096;
__global__ void __launch_bounds__(kThreads1d)
    lrn_maxpool_forward_kernel(int64_t planes, int C, int HW, int half, float k, float alpha, float neg_beta,
                               PoolParams pp, const float* __restrict__ x, float* __restrict__ y,
                               float* __restrict__ scale, float* __restrict__ pool_y, int32_t* __restrict__ argmax) {
    __shared__ float tile[kLrnPoolMaxPlane];
    const int PQ = pp.P * pp.Q;
    for (int64_t pl = blockIdx.x; pl < planes; pl += gridDim.x) {
        const int c = static_cast<int>(pl % C);
        const int j0 = max(0, c - half), j1 = min(C - 1, c + half);
        const float* xc = x + pl * HW;
        for (int i = threadIdx.x; i < HW; i += blockDim.x) {
            float sc;
            const float v = lrn_at(xc, HW, c, j0, j1, i, k, alpha, neg_beta, sc);
            const int64_t o = pl * HW + i;
            scale[o] = sc;
            y[o] = v;
            tile[i] = v;
        }
        __syncthreads();  // the plane's y is in the tile
        for (int i = threadIdx.x; i < PQ; i += blockDim.x) {
            const int op = i / pp.Q, oq = i - op * pp.Q;
            float best;
            int arg;
            maxpool_window(tile, pp, op, oq, best, arg);
            pool_y[pl * PQ + i] = best;
            argmax[pl * PQ + i] = arg;
        }
        __syncthreads();  // every window is read before the next plane overwrites the tile
    }
}

// dx at o from acc, its window's sum of dy y / scale (below): one definition for both backward kernels.
__device__ __forceinline__ void lrn_backward_store(int64_t o, float acc, float neg_beta, float coef, bool relu,
                                                   const float* __restrict__ dy, const float* __restrict__ x,
                                                   const float* __restrict__ scale, float* __restrict__ dx) {
    const float direct = __fmul_rn(dy[o], powf(scale[o], neg_beta));
    const float d = __fsub_rn(direct, __fmul_rn(__fmul_rn(coef, x[o]), acc));
    dx[o] = relu ? relu_grad_epilogue(d, x, o) : d;
}

// dx[c] = dy[c] * scale[c]^-beta - (2 alpha beta) * x[c] * sum_{j: c in window(j)} dy[j] y[j] / scale[j];
// the window is symmetric, so {j : c in window(j)} = window(c). relu: also through the ReLU that made x (zero
// where x <= 0), as relu_backward after this kernel would.
__global__ void __launch_bounds__(kThreads1d)
    lrn_backward_kernel(int64_t planes, int C, int HW, int half, float neg_beta, float coef, bool relu,
                        const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ y,
                        const float* __restrict__ scale, float* __restrict__ dx) {
    for (int64_t pl = blockIdx.y; pl < planes; pl += gridDim.y) {
        const int c = static_cast<int>(pl % C);
        const int j0 = max(0, c - half), j1 = min(C - 1, c + half);
        const int64_t base = pl * HW;
        for (int64_t i = global_thread_id(); i < HW; i += global_thread_count()) {
            float acc = 0.0f;
            for (int j = j0; j <= j1; ++j) {
                const int64_t o = base + static_cast<int64_t>(j - c) * HW + i;
                acc = __fadd_rn(acc, __fdiv_rn(__fmul_rn(dy[o], y[o]), scale[o]));
            }
            lrn_backward_store(base + i, acc, neg_beta, coef, relu, dy, x, scale, dx);
        }
    }
}

// The same dx, each dy[j] y[j] / scale[j] computed once: the thread-per-element kernel above computes it for every
// channel of every window that holds j (five divisions per element for AlexNet's size 5, plus the loads), which
// makes it compute-bound. Block: kLrnPix pixels x kLrnLanes channel lanes of one image, a tile of kLrnChunk output
// channels; the quotients of the tile's channels and its halo (half on each side) go to shared memory first, then
// each output sums its window from there, in ascending channel order from 0 as above: the same bits.
constexpr int kLrnPix = 32, kLrnLanes = kThreads1d / kLrnPix, kLrnChunk = 64, kLrnMaxHalf = 16;
__global__ void __launch_bounds__(kThreads1d)
    lrn_backward_tiled_kernel(int64_t tiles, int C, int HW, int half, float neg_beta, float coef, bool relu,
                              const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ y,
                              const float* __restrict__ scale, float* __restrict__ dx) {
    __shared__ float q[kLrnChunk + 2 * kLrnMaxHalf][kLrnPix + 1];
    const int px = threadIdx.x % kLrnPix, lane = threadIdx.x / kLrnPix;
    const int ptiles = (HW + kLrnPix - 1) / kLrnPix, ctiles = (C + kLrnChunk - 1) / kLrnChunk;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const int ct = static_cast<int>(tile % ctiles);
        const int64_t rest = tile / ctiles;
        const int pt = static_cast<int>(rest % ptiles);
        const int64_t n = rest / ptiles;
        const int i = pt * kLrnPix + px;
        const int c0 = ct * kLrnChunk, c1 = min(C, c0 + kLrnChunk);
        const int h0 = max(0, c0 - half), h1 = min(C, c1 + half);
        const int64_t img = n * C * static_cast<int64_t>(HW);
        for (int j = h0 + lane; j < h1; j += kLrnLanes) {
            const int64_t o = img + static_cast<int64_t>(j) * HW + i;
            q[j - h0][px] = i < HW ? __fdiv_rn(__fmul_rn(dy[o], y[o]), scale[o]) : 0.0f;
        }
        __syncthreads();
        if (i < HW) {
            for (int c = c0 + lane; c < c1; c += kLrnLanes) {
                const int j0 = max(0, c - half), j1 = min(C - 1, c + half);
                float acc = 0.0f;
                for (int j = j0; j <= j1; ++j) acc = __fadd_rn(acc, q[j - h0][px]);
                lrn_backward_store(img + static_cast<int64_t>(c) * HW + i, acc, neg_beta, coef, relu, dy, x, scale, dx);
            }
        }
        __syncthreads();  // the tile's quotients are read before the next tile overwrites them
    }
}

}  // namespace

void lrn_forward(const LrnParams& p, const float* x, float* y, float* scale, void* stream) {
    const int64_t planes = static_cast<int64_t>(p.N) * p.C, HW = static_cast<int64_t>(p.H) * p.W;
    if (planes * HW == 0) return;
    require(HW <= 0x7fffffff, "lrn_forward", "image plane too large");
    lrn_forward_kernel<<<plane_grid(planes, HW), kThreads1d, 0, as_stream(stream)>>>(
        planes, p.C, static_cast<int>(HW), p.size / 2, p.k, p.alpha, -p.beta, x, y, scale);
    AX_LAUNCH_CHECK("lrn_forward");
}

void lrn_maxpool_forward(const LrnParams& lp, const PoolParams& pp, const float* x, float* y, float* scale,
                         float* pool_y, int32_t* argmax, void* stream) {
    const int64_t planes = static_cast<int64_t>(lp.N) * lp.C, HW = static_cast<int64_t>(lp.H) * lp.W;
    if (planes * HW == 0) return;
    if (HW > kLrnPoolMaxPlane) {
        lrn_forward(lp, x, y, scale, stream);
        maxpool_forward(pp, y, pool_y, argmax, stream);
        return;
    }
    const unsigned grid = static_cast<unsigned>(planes < kMaxBlocks1d ? planes : kMaxBlocks1d);
    lrn_maxpool_forward_kernel<<<grid, kThreads1d, 0, as_stream(stream)>>>(
        planes, lp.C, static_cast<int>(HW), lp.size / 2, lp.k, lp.alpha, -lp.beta, pp, x, y, scale, pool_y, argmax);
    AX_LAUNCH_CHECK("lrn_maxpool_forward");
}

void lrn_backward(const LrnParams& p, const float* dy, const float* x, const float* y, const float* scale, float* dx,
                  void* stream) {
    const int64_t planes = static_cast<int64_t>(p.N) * p.C, HW = static_cast<int64_t>(p.H) * p.W;
    if (planes * HW == 0) return;
    require(HW <= 0x7fffffff, "lrn_backward", "image plane too large");
    const float coef = 2.0f * p.alpha * p.beta;
    const int half = p.size / 2;
    if (half <= kLrnMaxHalf) {
        const int64_t tiles = static_cast<int64_t>(p.N) * ((HW + kLrnPix - 1) / kLrnPix) *
                              ((p.C + kLrnChunk - 1) / kLrnChunk);
        const unsigned grid = static_cast<unsigned>(tiles < kMaxBlocks1d ? tiles : kMaxBlocks1d);
        lrn_backward_tiled_kernel<<<grid, kThreads1d, 0, as_stream(stream)>>>(
            tiles, p.C, static_cast<int>(HW), half, -p.beta, coef, p.relu, dy, x, y, scale, dx);
    } else {  // windows wider than the shared tile's halo
        lrn_backward_kernel<<<plane_grid(planes, HW), kThreads1d, 0, as_stream(stream)>>>(
            planes, p.C, static_cast<int>(HW), half, -p.beta, coef, p.relu, dy, x, y, scale, dx);
    }
    AX_LAUNCH_CHECK("lrn_backward");
}

}  // namespace cuda
}  // namespace ax
