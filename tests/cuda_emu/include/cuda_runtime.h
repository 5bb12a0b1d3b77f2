// CPU emulation of the slice of the CUDA runtime and device language that cuda/*.cu use, so the kernels'
// logic (indexing, bounds, barriers, warp shuffles, determinism) runs under g++ without a GPU.
// Each launch runs its blocks one after another; a block's threads are fibers on one OS thread
// (emu.cpp), switched only at __syncthreads and warp shuffles, which are real barriers here. `static`
// stands in for __shared__ (blocks never overlap); build.py re-poisons every __shared__ array with 0xFF
// bytes (NaN) when a block first reaches its declaration. Device memory is host memory; the runtime API
// (runtime.cpp) emulates two devices without peer access, runs every call when issued and tracks stream
// ordering for a happens-before race check.
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
#include <functional>
#include <string>
#include <type_traits>
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
struct alignas(16) int4 {
    int x, y, z, w;
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

// ---- runtime API (runtime.cpp) -------------------------------------------------------------------------
// Two emulated devices (0 and 1) without peer access: cudaDeviceCanAccessPeer says 0, and enabling peer
// access or copying between them fails (cudaErrorPeerAccessUnsupported), so cross-device copies take the
// code's own host-staged path. The current device is per host thread; each device has its own legacy
// default stream. Every call and launch runs to completion when issued, in issue order: a valid
// serialization of CUDA's stream semantics. Streams and events are real handles (checked on every use);
// vector clocks per stream follow the happens-before edges CUDA guarantees (stream order, event record /
// cudaStreamWaitEvent, each device's legacy default stream, host synchronization), and with race tracking
// on every kernel argument and copy that touches device memory is checked against them (emu::race_reports).
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
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorPeerAccessUnsupported = 217,
    cudaErrorPeerAccessAlreadyEnabled = 704,
    cudaErrorIllegalState = 401,
    // Stream capture (CUDA graphs): an illegal call during a capture returns one of these, as CUDA does.
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureMerge = 902,
    cudaErrorStreamCaptureUnmatched = 903,
    cudaErrorStreamCaptureUnjoined = 904,
    cudaErrorStreamCaptureIsolation = 905,
    cudaErrorStreamCaptureImplicit = 906,
    cudaErrorCapturedEvent = 907,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
#define cudaStreamDefault 0x00u
#define cudaStreamNonBlocking 0x01u
#define cudaEventDefault 0x00u
#define cudaEventBlockingSync 0x01u
#define cudaEventDisableTiming 0x02u
struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount, major, minor;
    size_t totalGlobalMem;
};

namespace emu {
extern cudaError_t last_error;
constexpr int kDeviceCount = 2;
}  // namespace emu

inline cudaError_t cudaGetLastError() {
    const cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu::last_error; }
const char* cudaGetErrorString(cudaError_t e);
// Exact-size blocks (no slack), so AddressSanitizer sees every byte past the end of a buffer.
cudaError_t cudaMalloc(void** p, size_t n);
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFree(void* p);  // synchronizes the memory's device, as CUDA's does
// Page-locked host memory: plain host memory here (never a device pointer), counted in RuntimeStats. Like
// CUDA's, cudaFreeHost synchronizes every device (a copy may still read the buffer).
#define cudaHostAllocDefault 0x00u
cudaError_t cudaHostAlloc(void** p, size_t n, unsigned flags);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaMemset(void* p, int v, size_t n);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s = nullptr);
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t st = nullptr);
cudaError_t cudaMemcpyPeerAsync(void* d, int dd, const void* s, int sd, size_t n, cudaStream_t st = nullptr);
cudaError_t cudaStreamCreate(cudaStream_t* s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamQuery(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t* e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = nullptr);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventQuery(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDeviceCanAccessPeer(int* can, int device, int peer);
cudaError_t cudaDeviceEnablePeerAccess(int peer, unsigned flags);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device);

// CUDA graphs by stream capture. Work issued to a capturing stream is recorded (a closure holding the launch's
// arguments by value), not run; cudaGraphLaunch replays it in the captured order on per-stream agents forked
// from the launch stream, with the captured event records and waits as the edges between them, so the race
// check sees exactly the ordering the graph's dependencies give. Calls CUDA forbids during a capture
// (synchronizing a capturing stream or the device, synchronous copies and allocations in the default global
// mode, waiting on an event from outside the capture, querying an event recorded in one) return CUDA's
// error and invalidate the capture, so code that would break capture on a GPU breaks here too.
typedef struct CUgraph_st* cudaGraph_t;
typedef struct CUgraphExec_st* cudaGraphExec_t;
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2
};
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2
};
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* graph);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus* status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);

namespace emu {
// ---- stream bookkeeping and the happens-before race check (runtime.cpp) ----
// Agent ids: 0 = the host, 1..kDeviceCount = each device's legacy default stream, then created streams
// (never reused).
int stream_begin(cudaStream_t s, const char* what);  // validates s, applies implicit ordering; returns its agent
void stream_end(int agent);                          // advances the agent's clock past the op
int launch_begin(cudaStream_t s, const char* kernel);  // stream_begin for a launch; -1: s is on another device
// Stream capture: whether s is capturing; capture_node records fn (run later on the replay's agent for s's
// part of the graph) and answers the launch's error (a stream of another device, an invalidated capture).
bool is_capturing(cudaStream_t s);
cudaError_t capture_node(cudaStream_t s, const char* what, bool launch, std::function<void(int agent)> fn,
                         std::vector<const void*> device_ptrs);
size_t live_graphs();  // graphs and executable graphs created and not yet destroyed
int agent_device(int agent);
void count_call(int agent);  // the call statistics stream_begin keeps, for a replayed node
enum class Access : uint8_t { read, write, unknown };
struct AccessList {
    struct Item {
        const void* ptr;
        Access kind;
        std::vector<unsigned char> before;  // unknown: the allocation's bytes before the launch
    };
    std::vector<Item> items;
    void add(const void* p, Access k);
    void snapshot();  // unknown items: copy their allocations
    void resolve();   // unknown items: write if the bytes changed, else read
    // Every pointer on the launching agent's device, else an emulator error (no peer access).
    void check_device(int agent, const char* kernel, const char* file, int line) const;
};
bool race_tracking();
void set_race_tracking(bool on);
void record_accesses(int agent, const AccessList& acc, const char* op, const char* file, int line);
const std::vector<std::string>& race_reports();
void clear_race_reports();
bool is_device_pointer(const void* p);
struct RuntimeStats {
    long long streams_created = 0, streams_destroyed = 0, event_records = 0, stream_waits = 0,
              cross_stream_waits = 0, cross_device_waits = 0, stream_syncs = 0, device_syncs = 0,
              elapsed_queries = 0, peer_queries = 0, host_allocs = 0,
              host_frees = 0, event_queries = 0;
    long long captures = 0, graph_nodes = 0, graph_launches = 0, capture_errors = 0;
    long long pinned_copies = 0, pageable_copies = 0;  // host<->device copies, by the host side's memory
    long long calls_default_stream = 0, calls_created_streams = 0;  // launches, copies, memsets, records, waits
    long long calls_per_device[kDeviceCount] = {};                  // the same, by the stream's device
};
const RuntimeStats& runtime_stats();
// Calls that allocate, free or make the host wait, for checks that a steady-state step makes none (or just
// the one it needs). A pageable copy is one whose host side is not cudaHostAlloc memory: CUDA stages it
// through a driver buffer and returns only when the host side is consumed, so it is synchronous too.
struct CallCounters {
    long long device_mallocs = 0, device_frees = 0;  // cudaMalloc, cudaFree
    long long host_allocs = 0, host_frees = 0;       // cudaHostAlloc, cudaFreeHost
    long long pageable_copies = 0;                   // host<->device copies from or to pageable memory
    long long sync_copies = 0;                       // cudaMemcpy, cudaMemset (the host waits for them)
    long long stream_syncs = 0, device_syncs = 0, event_syncs = 0;  // cudaStream/Device/EventSynchronize
    long long event_creates = 0;
    long long syncs() const { return stream_syncs + device_syncs + event_syncs; }
};
const CallCounters& call_counters();
size_t live_events();  // created and not yet destroyed

template <class T>
inline void collect_access(AccessList& acc, const T& arg) {
    if constexpr (std::is_pointer<T>::value) {
        acc.add(static_cast<const void*>(arg),
                std::is_const<typename std::remove_pointer<T>::type>::value ? Access::read : Access::write);
    } else if constexpr (std::is_class<T>::value && std::is_trivially_copyable<T>::value) {
        // A parameter struct (the GEMM operands): its pointer fields are found by value; whether the kernel
        // wrote through one is decided by comparing the allocation's bytes before and after the launch.
        for (size_t o = 0; o + sizeof(void*) <= sizeof(T); o += alignof(void*)) {
            const void* p;
            memcpy(&p, reinterpret_cast<const unsigned char*>(&arg) + o, sizeof p);
            if (is_device_pointer(p)) acc.add(p, Access::unknown);
        }
    }
}
}  // namespace emu

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
// The launches that ran since the last clear_launch_log() (each kernel's grid and block), for checks of which
// tile a launcher picked.
struct LaunchShape {
    const char* kernel;
    dim3 grid, block;
};
const std::vector<LaunchShape>& launch_log();
void clear_launch_log();

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
    cudaStream_t stream;
    const char *name = "", *file = "";
    int line = 0;
    Cfg(dim3 g, dim3 b, size_t shared_bytes = 0, cudaStream_t s = nullptr)
        : grid(g), block(b), smem(shared_bytes), stream(s) {}
    Cfg& at(const char* kernel_name, const char* f, int l) {
        name = kernel_name;
        file = f;
        line = l;
        return *this;
    }
    template <class F, class... Args>
    void run(F kernel, Args... args) {
        if (is_capturing(stream)) {
            // Recorded with its arguments by value; the pointers among them are checked to be live at replay.
            AccessList acc;
            (collect_access(acc, args), ...);
            std::vector<const void*> ptrs;
            for (const auto& it : acc.items) ptrs.push_back(it.ptr);
            const Cfg c = *this;
            const cudaError_t e = capture_node(
                stream, name, true, [c, kernel, args...](int agent) { c.execute(agent, kernel, args...); }, std::move(ptrs));
            if (e != cudaSuccess) last_error = e;
            return;
        }
        const int agent = launch_begin(stream, name);
        if (agent < 0) {  // a stream of another device: the launch fails, as in CUDA
            last_error = cudaErrorInvalidResourceHandle;
            return;
        }
        execute(agent, kernel, args...);
    }
    template <class F, class... Args>
    void execute(int agent, F kernel, Args... args) const {
        auto bound = [&]() { kernel(args...); };  // `kernel` takes them by value: a copy per thread
        using B = decltype(bound);
        AccessList acc;
        (collect_access(acc, args), ...);
        acc.check_device(agent, name, file, line);
        if (!race_tracking()) {
            launch(name, file, line, grid, block, smem, [](void* p) { (*static_cast<B*>(p))(); }, &bound);
        } else {
            acc.snapshot();
            launch(name, file, line, grid, block, smem, [](void* p) { (*static_cast<B*>(p))(); }, &bound);
            acc.resolve();
            record_accesses(agent, acc, name, file, line);
        }
        stream_end(agent);
    }
};

}  // namespace emu

// ---- cp.async (the kernels' cp_async4 / cp_async16 / cp_async_commit / cp_async_wait, common.cuh) ------
// Each thread's copies are queued and performed only when a wait retires their group, in order: a read
// of the destination before the wait (or, from another thread, before the wait and a barrier) sees the
// poisoned or stale shared memory, as it may on a GPU. Keyed by the thread's index in its block (blocks
// run one at a time).
#define AX_EMU_CP_ASYNC 1
namespace emu {
struct AsyncCopy {
    float* dst;
    const float* src;  // nullptr: write 0 (the zero-fill of a copy whose source is outside the operand)
};
struct AsyncQueue {
    std::vector<AsyncCopy> open;                  // issued since the last commit
    std::vector<std::vector<AsyncCopy>> groups;   // committed, oldest first
};
inline AsyncQueue& async_queue() {
    static std::vector<AsyncQueue> queues;
    const size_t i = threadIdx_.x + static_cast<size_t>(blockDim_.x) * (threadIdx_.y + static_cast<size_t>(blockDim_.y) * threadIdx_.z);
    if (queues.size() <= i) queues.resize(i + 1);
    return queues[i];
}
inline void cp_async4(float* dst, const float* src, bool ok) { async_queue().open.push_back({dst, ok ? src : nullptr}); }
// Four floats, the first bytes/4 from src and the rest zero-filled, as cp.async with a source size: the
// alignment the hardware requires is checked (a launcher's misalignment test must have chosen its 4-byte path).
inline void cp_async16(float* dst, const float* src, int bytes) {
    if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0 || (reinterpret_cast<uintptr_t>(src) & 15u) != 0)
        fail("cp_async16: dst %p or src %p not 16-byte aligned", static_cast<void*>(dst),
             static_cast<const void*>(src));
    if (bytes < 0 || bytes > 16 || bytes % 4 != 0) fail("cp_async16: source size %d not 0, 4, 8, 12 or 16", bytes);
    AsyncQueue& q = async_queue();
    for (int j = 0; j < 4; ++j) q.open.push_back({dst + j, 4 * j < bytes ? src + j : nullptr});
}
inline void cp_async_commit() {
    AsyncQueue& q = async_queue();
    q.groups.push_back(std::move(q.open));
    q.open.clear();
}
inline void cp_async_wait(int pending) {
    AsyncQueue& q = async_queue();
    const size_t keep = static_cast<size_t>(pending);
    size_t done = 0;
    for (; q.groups.size() - done > keep; ++done)
        for (const AsyncCopy& c : q.groups[done]) *c.dst = c.src ? *c.src : 0.0f;
    q.groups.erase(q.groups.begin(), q.groups.begin() + static_cast<std::ptrdiff_t>(done));
}
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
