// CUDA backend of the cross-tower plumbing: channel insert/extract (a strided block copy) and add.
// Grid-stride, float4 when pointers and every row boundary are 16-byte aligned.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

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

void add(int64_t n, const float* a, const float* b, float* y, void* stream) {
    if (n <= 0) return;
    const bool vec = aligned16(a) && aligned16(b) && aligned16(y);
    add_kernel<<<grid_1d(vec ? (n + 3) / 4 : n), kThreads1d, 0, as_stream(stream)>>>(n, vec, a, b, y);
    AX_LAUNCH_CHECK("add");
}

}  // namespace cuda
}  // namespace ax
