// CUDA backend of the cross-tower plumbing: channel insert/extract (a strided block copy), a concat of up to
// kMaxParts parts and the split-and-sum of the towers' gradients in one launch each, and add. Grid-stride, float4
// when pointers and every row boundary are 16-byte aligned.
#include <algorithm>

#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

constexpr int kMaxParts = kPlumbingMaxParts;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float4 add_rn(float4 a, float4 b) {
    return make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z), __fadd_rn(a.w, b.w));
}

// whole[n, c0 + j, :] <-> part[n, j, :] for j < Cp: in units of T (float or float4), each image's slice is
// one contiguous run of `run` units in part and starts at n*wstride + off in whole. kInsert picks the
// direction. Grid: y strides over images, x (threads) strides along the run: contiguous reads and writes,
// no per-element division.
template <class T, bool kInsert>
__global__ void __launch_bounds__(kThreads1d)
    channel_copy_kernel(int N, int64_t run, int64_t wstride, int64_t off, const T* __restrict__ src,
                        T* __restrict__ dst) {
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const int64_t pbase = static_cast<int64_t>(n) * run, wbase = static_cast<int64_t>(n) * wstride + off;
        for (int64_t r = global_thread_id(); r < run; r += global_thread_count()) {
            if (kInsert) dst[wbase + r] = src[pbase + r];
            else dst[pbase + r] = src[wbase + r];
        }
    }
}

// Up to kMaxParts tensors per launch (the towers' halves of one cross-tower edge). Plain arrays in a
// parameter struct: the pointers travel by value; unused slots are null.
struct PartList {
    const float* src[kMaxParts];
    float* dst[kMaxParts];
    int64_t off[kMaxParts];  // concat: part z's start in an image of the whole, in units
    int64_t len[kMaxParts];  // concat: part z's run in units
};

// whole[n, off_z + r] = part_z[n, r] for every part z = blockIdx.z: insert_channels of every part at once.
template <class T>
__global__ void __launch_bounds__(kThreads1d)
    concat_parts_kernel(int N, int64_t wstride, PartList pl, T* __restrict__ whole) {
    const int z = blockIdx.z;
    const T* __restrict__ src = reinterpret_cast<const T*>(pick(pl.src, z));
    const int64_t len = pick(pl.len, z), off = pick(pl.off, z);
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const int64_t pbase = static_cast<int64_t>(n) * len, wbase = static_cast<int64_t>(n) * wstride + off;
        for (int64_t r = global_thread_id(); r < len; r += global_thread_count()) whole[wbase + r] = src[pbase + r];
    }
}

// ys[u][n, r] = xs[0][n, u*run + r] + xs[1][n, u*run + r] + ... (left to right, __fadd_rn) for u = blockIdx.z:
// each tower's slice u of every tower's d_in, summed in tower order (slice_channels, then add, in one kernel).
template <class T>
__global__ void __launch_bounds__(kThreads1d)
    split_sum_kernel(int N, int count, int64_t run, PartList pl) {
    const int u = blockIdx.z;
    const int64_t wstride = run * gridDim.z;
    T* __restrict__ y = reinterpret_cast<T*>(pick(pl.dst, u));
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const int64_t wbase = static_cast<int64_t>(n) * wstride + u * run, pbase = static_cast<int64_t>(n) * run;
        for (int64_t r = global_thread_id(); r < run; r += global_thread_count()) {
            T acc = reinterpret_cast<const T*>(pl.src[0])[wbase + r];
#pragma unroll
            for (int t = 1; t < kMaxParts; ++t)
                if (t < count) acc = add_rn(acc, reinterpret_cast<const T*>(pl.src[t])[wbase + r]);
            y[pbase + r] = acc;
        }
    }
}

template <bool kInsert>
void channel_copy(const char* opname, int N, int Cp, int Cw, int c0, int64_t inner, const float* src, float* dst,
                  void* stream) {
    const int64_t run = static_cast<int64_t>(Cp) * inner;
    if (N <= 0 || run <= 0) return;
    const int64_t wstride = static_cast<int64_t>(Cw) * inner, off = static_cast<int64_t>(c0) * inner;
    const cudaStream_t s = as_stream(stream);
    const bool vec = aligned16(src) && aligned16(dst) && run % 4 == 0 && wstride % 4 == 0 && off % 4 == 0;
    const int64_t units = vec ? run / 4 : run;
    const dim3 grid = plane_grid(N, units);
    if (vec) {
        channel_copy_kernel<float4, kInsert><<<grid, kThreads1d, 0, s>>>(N, units, wstride / 4, off / 4,
                                                                         reinterpret_cast<const float4*>(src),
                                                                         reinterpret_cast<float4*>(dst));
    } else {
        channel_copy_kernel<float, kInsert><<<grid, kThreads1d, 0, s>>>(N, units, wstride, off, src, dst);
    }
    AX_LAUNCH_CHECK(opname);
}

// y = a + b, flat; float4 body + scalar tail.
__global__ void __launch_bounds__(kThreads1d)
    add_kernel(int64_t n, bool vec, const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y) {
    const int64_t n4 = vec ? n / 4 : 0, tid = global_thread_id(), nt = global_thread_count();
    for (int64_t i = tid; i < n4; i += nt) {
        const float4 u = reinterpret_cast<const float4*>(a)[i];
        const float4 v = reinterpret_cast<const float4*>(b)[i];
        reinterpret_cast<float4*>(y)[i] =
            make_float4(__fadd_rn(u.x, v.x), __fadd_rn(u.y, v.y), __fadd_rn(u.z, v.z), __fadd_rn(u.w, v.w));
    }
    for (int64_t i = n4 * 4 + tid; i < n; i += nt) y[i] = __fadd_rn(a[i], b[i]);
}

}  // namespace

void insert_channels(int N, int Cp, int Cw, int c0, int64_t inner, const float* part, float* whole, void* stream) {
    channel_copy<true>("insert_channels", N, Cp, Cw, c0, inner, part, whole, stream);
}

void extract_channels(int N, int Cp, int Cw, int c0, int64_t inner, const float* whole, float* part, void* stream) {
    channel_copy<false>("extract_channels", N, Cp, Cw, c0, inner, whole, part, stream);
}

void concat_channels(int N, int count, const float* const* parts, const int* Cp, int64_t inner, float* whole,
                     void* stream) {
    require(count >= 1 && count <= kMaxParts, "concat_channels", "1 to 8 parts per launch");
    int64_t Cw = 0, longest = 0;
    bool vec = aligned16(whole) && inner % 4 == 0;
    for (int z = 0; z < count; ++z) {
        Cw += Cp[z];
        longest = std::max(longest, static_cast<int64_t>(Cp[z]) * inner);
        vec = vec && aligned16(parts[z]);
    }
    const int64_t wstride = Cw * inner;
    if (N <= 0 || wstride <= 0) return;
    const int u = vec ? 4 : 1;
    PartList pl{};
    int64_t off = 0;
    for (int z = 0; z < count; ++z) {
        pl.src[z] = parts[z];
        pl.off[z] = off / u;
        pl.len[z] = static_cast<int64_t>(Cp[z]) * inner / u;
        off += static_cast<int64_t>(Cp[z]) * inner;
    }
    dim3 grid = plane_grid(N, longest / u);
    grid.z = static_cast<unsigned>(count);
    const cudaStream_t s = as_stream(stream);
    if (vec) {
        concat_parts_kernel<float4><<<grid, kThreads1d, 0, s>>>(N, wstride / 4, pl, reinterpret_cast<float4*>(whole));
    } else {
        concat_parts_kernel<float><<<grid, kThreads1d, 0, s>>>(N, wstride, pl, whole);
    }
    AX_LAUNCH_CHECK("concat_channels");
}

void split_sum_channels(int N, int count, const float* const* xs, int C, int parts, int64_t inner, float* const* ys,
                        void* stream) {
    require(count >= 1 && count <= kMaxParts && parts >= 1 && parts <= kMaxParts && C % parts == 0,
            "split_sum_channels", "1 to 8 inputs and parts, the channels divisible by the parts");
    const int64_t run = static_cast<int64_t>(C / parts) * inner;
    if (N <= 0 || run <= 0) return;
    bool vec = run % 4 == 0;
    PartList pl{};
    for (int t = 0; t < count; ++t) {
        pl.src[t] = xs[t];
        vec = vec && aligned16(xs[t]);
    }
    for (int u = 0; u < parts; ++u) {
        pl.dst[u] = ys[u];
        vec = vec && aligned16(ys[u]);
    }
    const int64_t units = vec ? run / 4 : run;
    dim3 grid = plane_grid(N, units);
    grid.z = static_cast<unsigned>(parts);
    const cudaStream_t s = as_stream(stream);
    if (vec) {
        split_sum_kernel<float4><<<grid, kThreads1d, 0, s>>>(N, count, units, pl);
    } else {
        split_sum_kernel<float><<<grid, kThreads1d, 0, s>>>(N, count, units, pl);
    }
    AX_LAUNCH_CHECK("split_sum_channels");
}

void add(int64_t n, const float* a, const float* b, float* y, void* stream) {
    if (n <= 0) return;
    const bool vec = aligned16(a) && aligned16(b) && aligned16(y);
    add_kernel<<<grid_1d(vec ? (n + 3) / 4 : n), kThreads1d, 0, as_stream(stream)>>>(n, vec, a, b, y);
    AX_LAUNCH_CHECK("add");
}

}  // namespace cuda
}  // namespace ax
