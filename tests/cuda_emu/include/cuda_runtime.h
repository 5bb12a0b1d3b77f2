// CPU emulation of the slice of the CUDA runtime and device language that cuda/*.cu use, so the kernels'
// logic (indexing, bounds, barriers, warp shuffles, determinism) runs under g++ without a GPU.
// Each launch runs its blocks one after another; a block's threads are fibers on one OS thread
// (emu.cpp), switched only at __syncthreads and warp shuffles, which are real barriers here. `static`
// stands in for __shared__ (blocks never overlap); build.py re-poisons every __shared__ array with 0xFF
// bytes (NaN) when a block first reaches its declaration. Device memory is host memory.
// What this cannot show: real-GPU memory ordering, timing, occupancy, register limits, the GPU's math
// library accuracy or nvcc's own FMA contraction choices. See tests/cuda_emu/README.md.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline float2 make_float2(float a, float b) { return float2{a, b}; }

namespace emu {
// Coordinates of the fiber that runs right now (set by the scheduler before each resume).
extern dim3 threadIdx_, blockIdx_, blockDim_, gridDim_;
}  // namespace emu
#define threadIdx (::emu::threadIdx_)
#define blockIdx (::emu::blockIdx_)
#define blockDim (::emu::blockDim_)
#define gridDim (::emu::gridDim_)
#define warpSize 32

// CUDA's device-side integer min/max overloads (float versions come from <cmath> as fminf/fmaxf).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

template <class T>
inline T __ldg(const T* p) { return *p; }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
// Round-to-nearest intrinsics: `volatile` forces the rounding, so a build with -ffp-contract=fast -mfma
// (nvcc's default contraction, approximated) cannot fuse them into an FMA, exactly as on the GPU.
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

// ---- runtime API (synchronous: every "async" call completes before it returns) ----------------------
#define CUDART_VERSION 13000  // the toolkit the real build targets (nvcc 13)
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100,
    cudaErrorPeerAccessAlreadyEnabled = 704,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount, major, minor;
    size_t totalGlobalMem;
};

namespace emu {
extern cudaError_t last_error;
}  // namespace emu

inline cudaError_t cudaGetLastError() {
    const cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        default: return "emulated CUDA error";
    }
}
// Exact-size blocks (no slack), so AddressSanitizer sees every byte past the end of a buffer.
inline cudaError_t cudaMalloc(void** p, size_t n) {
    if (posix_memalign(p, 256, n ? n : 1) != 0) return cudaErrorMemoryAllocation;
    return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaFree(void* p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemset(void* p, int v, size_t n) { memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { memcpy(d, s, n); return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
    memcpy(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyPeerAsync(void* d, int, const void* s, int, size_t n, cudaStream_t = nullptr) {
    memcpy(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaDeviceCanAccessPeer(int* c, int, int) { *c = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceEnablePeerAccess(int, unsigned) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    memset(p, 0, sizeof *p);
    strcpy(p->name, "CPU fiber emulator");
    p->multiProcessorCount = 132;
    p->major = 9;
    p->minor = 0;
    p->totalGlobalMem = size_t(16) << 30;
    return cudaSuccess;
}

// ---- launches and barriers (emu.cpp) ------------------------------------------------------------------
namespace emu {

enum class Order { forward, reverse, shuffle };
// Order of the fibers within each scheduling round (between barriers) and of the blocks of a launch.
// Different orders expose missing barriers in either direction and races between blocks; results must
// not depend on it (the tests compare checksums).
void configure(Order order, uint64_t seed);
struct Stats {
    long long launches = 0, blocks = 0, threads = 0, barriers = 0, shuffles = 0;
};
const Stats& stats();
// Every launch statement that ran (file and line of the `<<<`...`>>>`, as rewritten), with its count.
struct LaunchSite {
    const char* file;
    int line;
    const char* kernel;
    long long launches;
};
const std::vector<LaunchSite>& launch_sites();

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Runs one launch: every block of `grid`, each as blockDim fibers calling kernel(ctx).
void launch(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
            void (*kernel)(void*), void* ctx);
void sync_threads(const char* file, int line);
uint64_t shuffle_exchange(uint64_t bits, int lane_mask, const char* file, int line);

// Bumped at the start of every block; __shared__ arrays compare their own copy against it.
extern uint64_t block_epoch;
inline void shared_block_init(void* p, size_t n, uint64_t& seen) {
    if (seen != block_epoch) {  // first thread of this block to reach the declaration
        seen = block_epoch;
        memset(p, 0xFF, n);  // NaN for float, -1 for int: a read-before-write shows
    }
}

// `kernel<<<cfg>>>(args)` becomes `::emu::Cfg(cfg).at(...).run(<lambda calling kernel>, args)` (build.py).
struct Cfg {
    dim3 grid, block;
    size_t smem;
    const char *name = "", *file = "";
    int line = 0;
    Cfg(dim3 g, dim3 b, size_t shared_bytes = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(shared_bytes) {}
    Cfg& at(const char* kernel_name, const char* f, int l) {
        name = kernel_name;
        file = f;
        line = l;
        return *this;
    }
    template <class F, class... Args>
    void run(F kernel, Args... args) {
        auto bound = [&]() { kernel(args...); };  // `kernel` takes them by value: a copy per thread
        using B = decltype(bound);
        launch(name, file, line, grid, block, smem, [](void* p) { (*static_cast<B*>(p))(); }, &bound);
    }
};

}  // namespace emu

#define __syncthreads() ::emu::sync_threads(__FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask, ...) ::emu::shfl_xor_impl((mask), (v), (lane_mask), __FILE__, __LINE__, ##__VA_ARGS__)

namespace emu {
template <class T>
inline T shfl_xor_impl(unsigned mask, T v, int lane_mask, const char* file, int line, int width = 32) {
    static_assert(sizeof(T) <= 8, "emu: shuffle of a type wider than 8 bytes");
    if (mask != 0xffffffffu || width != 32 || lane_mask < 0 || lane_mask > 31)
        fail("%s:%d: only full-warp __shfl_xor_sync (mask 0xffffffff, width 32, lane mask 0..31) is emulated", file,
             line);
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = shuffle_exchange(bits, lane_mask, file, line);
    T r;
    memcpy(&r, &bits, sizeof(T));
    return r;
}
}  // namespace emu
