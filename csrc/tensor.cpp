// Tensors, devices and the caching allocator (CUDA memory pooled per device and stream, so a training
// step after the first never calls cudaMalloc).
#include "tensor.h"

#include "checked.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>  // madvise
#endif

#ifdef ALEXNET_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ax {

size_t dtype_size(DType t) {
    switch (t) {
        case DType::f32: return 4;
        case DType::u8: return 1;
        case DType::i32: return 4;
    }
    return 0;
}

const char* dtype_name(DType t) {
    switch (t) {
        case DType::f32: return "float32";
        case DType::u8: return "uint8";
        case DType::i32: return "int32";
    }
    return "?";
}

std::string Device::str() const { return type == CPU ? std::string("cpu") : "cuda:" + std::to_string(index); }

Device Device::parse(const std::string& s, const char* op, const char* arg) {
    auto bad = [&](const std::string& why) {
        return ValueError(std::string(op) + ": argument '" + arg + "': " + why);
    };
    if (s == "cpu") return Device{CPU, 0};
    int index = -1;
    if (s == "cuda") {
        index = 0;
    } else if (s.rfind("cuda:", 0) == 0 && s.size() > 5) {
        const std::string num = s.substr(5);
        for (char c : num)
            if (c < '0' || c > '9') throw bad("unknown device '" + s + "' (expected 'cpu', 'cuda' or 'cuda:N')");
        index = std::stoi(num);
    } else {
        throw bad("unknown device '" + s + "' (expected 'cpu', 'cuda' or 'cuda:N')");
    }
    if (!built_with_cuda()) throw bad("device '" + s + "' requested but alexnet_cuda was built without CUDA");
    if (!cuda_available()) throw bad("device '" + s + "' requested but CUDA is unavailable: " + cuda_unavailable_reason());
    const int n = cuda_device_count();
    if (index >= n)
        throw bad("device '" + s + "' does not exist (" + std::to_string(n) + " CUDA device" + (n == 1 ? "" : "s") +
                  " present)");
    return Device{CUDA, index};
}

bool arch_list_covers(const std::string& list, int cc) {
    size_t pos = 0;
    while (pos <= list.size()) {
        size_t end = list.find_first_of(",;", pos);
        if (end == std::string::npos) end = list.size();
        std::string e = list.substr(pos, end - pos);
        pos = end + 1;
        if (e.empty()) continue;
        size_t i = 0;
        int v = 0;
        while (i < e.size() && e[i] >= '0' && e[i] <= '9' && v < 100000) v = v * 10 + (e[i++] - '0');
        if (i == 0) return true;  // "native", "all", "all-major": CMake chose for this machine; trust it
        std::string rest = e.substr(i);
        const bool specific = !rest.empty() && (rest[0] == 'a' || rest[0] == 'f');  // sm_90a: that chip only
        if (specific) rest = rest.substr(1);
        const bool sass = rest != "-virtual", ptx = rest != "-real";
        // SASS runs on the same major version at an equal or higher minor; PTX is compiled by the driver for
        // any equal or newer GPU.
        if (sass && (specific ? v == cc : (v / 10 == cc / 10 && v <= cc))) return true;
        if (ptx && !specific && v <= cc) return true;
    }
    return false;
}

// ------------------------------------------------------------------------------------------------------
// CUDA runtime helpers

#ifdef ALEXNET_WITH_CUDA
void cuda_check(int err, const char* op) {
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear a sticky-free error so the next op starts clean
        std::string hint;
#ifdef ALEXNET_CUDA_ARCHS_BUILT
        if (err == cudaErrorNoKernelImageForDevice)
            hint = std::string(" (this build's architectures: ") + ALEXNET_CUDA_ARCHS_BUILT +
                   "; rebuild with ALEXNET_CUDA_ARCHS=<your GPU's compute capability, e.g. 86>)";
#endif
        throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(static_cast<cudaError_t>(err)) + hint);
    }
}
bool built_with_cuda() { return true; }

static int probe_device_count(std::string* reason) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        if (reason) {
            if (e == cudaErrorNoDevice) *reason = "no CUDA device is present";
            else if (e == cudaErrorInsufficientDriver)
                // The static runtime says this both when libcuda is absent and when it is too old.
                *reason = "no NVIDIA driver found, or one older than this build's CUDA " + std::to_string(CUDART_VERSION / 1000) +
                          " runtime needs (" + std::string(cudaGetErrorString(e)) + ")";
            else *reason = std::string("the CUDA runtime could not start: ") + cudaGetErrorString(e);
        }
        return 0;
    }
    if (n == 0 && reason) *reason = "no CUDA device is present";
    return n;
}
// "" when this build holds code device `index` can run, else why not and how to rebuild. Without this check
// cuda_available() says True on a GPU the build has no code for, and the first kernel fails instead.
static std::string missing_kernel_image(int index) {
#ifdef ALEXNET_CUDA_ARCHS_BUILT
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, index) != cudaSuccess) {
        cudaGetLastError();
        return "";
    }
    const int cc = p.major * 10 + p.minor;
    if (arch_list_covers(ALEXNET_CUDA_ARCHS_BUILT, cc)) return "";
    return std::string("this build has no kernel image for ") + p.name + " (compute capability " +
           std::to_string(p.major) + "." + std::to_string(p.minor) + "; built for " + ALEXNET_CUDA_ARCHS_BUILT +
           "): rebuild with ALEXNET_CUDA_ARCHS=" + std::to_string(cc) + " pip install -e .";
#else
    (void)index;
    return "";
#endif
}
int cuda_device_count() {
    static int n = probe_device_count(nullptr);
    return n;
}
bool cuda_available() {
    static bool ok = cuda_device_count() > 0 && missing_kernel_image(0).empty();
    return ok;
}
std::string cuda_unavailable_reason() {
    std::string reason;
    if (probe_device_count(&reason) > 0) return missing_kernel_image(0);
    return reason;
}
void cuda_synchronize(Device d) {
    if (!d.is_cuda()) return;
    DeviceGuard g(d);
    cuda_check(cudaDeviceSynchronize(), "synchronize");
}
DeviceGuard::DeviceGuard(Device d) {
    if (!d.is_cuda()) return;
    int cur = 0;
    cuda_check(cudaGetDevice(&cur), "set_device");
    if (cur != d.index) {
        cuda_check(cudaSetDevice(d.index), "set_device");
        prev = cur;
    }
}
DeviceGuard::~DeviceGuard() {
    if (prev >= 0) cudaSetDevice(prev);
}
#else
void cuda_check(int err, const char* op) {
    if (err != 0) throw std::runtime_error(std::string(op) + ": CUDA error " + std::to_string(err));
}
bool built_with_cuda() { return false; }
int cuda_device_count() { return 0; }
bool cuda_available() { return false; }
std::string cuda_unavailable_reason() { return "alexnet_cuda was built without CUDA (no nvcc at build time)"; }
void cuda_synchronize(Device) {}
DeviceGuard::DeviceGuard(Device) {}
DeviceGuard::~DeviceGuard() {}
#endif

static thread_local void* tls_streams[64] = {};
void* current_stream(int device_index) {
    return (device_index >= 0 && device_index < 64) ? tls_streams[device_index] : nullptr;
}
void set_current_stream(int device_index, void* stream) {
    if (device_index >= 0 && device_index < 64) tls_streams[device_index] = stream;
}

// ------------------------------------------------------------------------------------------------------
// Allocator

namespace {
std::atomic<bool> g_poison{false};

// Sizes are rounded so that blocks recur: 512 B granules below 1 MiB, 2 MiB granules above.
size_t round_block(size_t bytes) {
    if (bytes == 0) bytes = 1;
    const size_t small = 512, large = size_t(2) << 20;
    return bytes < (size_t(1) << 20) ? (bytes + small - 1) / small * small : (bytes + large - 1) / large * large;
}

struct GraphPoolState {
    int device = 0;
    std::map<std::pair<void*, size_t>, std::vector<void*>> free_blocks;  // (stream, rounded size) -> blocks
    std::map<void*, size_t> owned;                                       // every block of the pool -> rounded size
};

struct CudaPool {
    std::mutex m;
    std::map<void*, GraphPoolState*> graph_owner;  // blocks of a CUDA graph's private pool
    // (device, stream, rounded size) -> free blocks. A block is reused only on the stream that freed it,
    // so a later kernel on another stream can never overwrite memory still being read.
    std::map<std::tuple<int, void*, size_t>, std::vector<void*>> free_blocks;
    std::map<void*, std::pair<int, size_t>> all_blocks;  // ptr -> (device, rounded size)
    std::map<void*, size_t> direct_blocks;               // ptr -> exact size, when caching is off
    AllocatorStats stats;
};

// ALEXNET_NO_CUDA_MEMORY_CACHING=1 gives every tensor its own cudaMalloc of its exact size and frees it with
// cudaFree: compute-sanitizer's memcheck sees only cudaMalloc boundaries, so an overrun into the rounded-up
// tail of a cached block, or into a recycled block, is invisible to it with the cache on.
bool caching_disabled() {
    static const bool off = [] {
        const char* v = std::getenv("ALEXNET_NO_CUDA_MEMORY_CACHING");
        return v && *v && std::string(v) != "0";
    }();
    return off;
}
CudaPool& pool() {
    static CudaPool* p = new CudaPool();  // leaked on purpose: outlives tensors freed at interpreter exit
    return *p;
}
thread_local GraphPoolState* t_capture_pool = nullptr;  // the pool this thread is capturing into

// The CPU pool: (rounded size) -> its size class: the free blocks, and the trim generation in which a tensor of
// that size was last asked for. The rounding is the CUDA pool's, so a size that recurs (every activation and
// gradient of a step) finds its block again; LIFO within a size hands out the block freed last, the one most
// likely still in cache. Trimming goes by size class, not by block: the two towers' workers interleave their
// allocations differently from step to step, so a size may need one more block now and then; a size still asked
// for keeps all its blocks, and only sizes nothing asked for lately are given back.
struct SizeClass {
    std::vector<void*> blocks;
    uint64_t last_asked = 0;
};
struct CpuPool {
    std::mutex m;
    std::map<size_t, SizeClass> classes;
    AllocatorStats stats;
    uint64_t generation = 0;
};
CpuPool& cpu_pool() {
    static CpuPool* p = new CpuPool();  // leaked on purpose, as pool()
    return *p;
}
bool cpu_caching_disabled() {
    static const bool off = [] {
        const char* v = std::getenv("ALEXNET_NO_CPU_MEMORY_CACHING");
        return v && *v && std::string(v) != "0";
    }();
    return off;
}

// A fresh block from the system. Blocks of 2 MiB and more are 2 MiB aligned and marked for transparent huge
// pages where the kernel offers them, so first touching them faults once per 2 MiB instead of once per 4 KiB.
void* system_alloc(size_t rounded) {
    const size_t huge = size_t(2) << 20;
    if (rounded >= huge) {
        void* p = std::aligned_alloc(huge, rounded);
#ifdef MADV_HUGEPAGE
        if (p) madvise(p, rounded, MADV_HUGEPAGE);
#endif
        return p;
    }
    return std::aligned_alloc(64, rounded);
}

// Frees the blocks of every size class last asked for before generation `older_than` (UINT64_MAX: all).
void cpu_release_locked(CpuPool& p, uint64_t older_than) {
    for (auto it = p.classes.begin(); it != p.classes.end();) {
        SizeClass& c = it->second;
        if (c.last_asked < older_than) {
            for (void* ptr : c.blocks) std::free(ptr);
            p.stats.bytes_cached -= static_cast<int64_t>(it->first * c.blocks.size());
            c.blocks.clear();
        }
        it = c.blocks.empty() && c.last_asked < older_than ? p.classes.erase(it) : std::next(it);
    }
}
}  // namespace

void set_poison_allocations(bool on) { g_poison = on; }
bool poison_allocations() { return g_poison; }

#ifdef ALEXNET_WITH_CUDA
static void release_cached_locked(CudaPool& p, int device) {
    for (auto it = p.free_blocks.begin(); it != p.free_blocks.end();) {
        if (device >= 0 && std::get<0>(it->first) != device) { ++it; continue; }
        for (void* ptr : it->second) {
            auto b = p.all_blocks.find(ptr);
            p.stats.bytes_cached -= static_cast<int64_t>(b->second.second);
            p.all_blocks.erase(b);
            cudaFree(ptr);
        }
        it = p.free_blocks.erase(it);
    }
}
#endif

Storage::Storage(size_t nbytes, Device dev) : bytes(nbytes), device(dev) {
    if (dev.is_cpu()) {
        CpuPool& p = cpu_pool();
        if (cpu_caching_disabled()) {
            const size_t rounded = (std::max<size_t>(nbytes, 1) + 63) / 64 * 64;
            ptr = std::aligned_alloc(64, rounded);
            if (!ptr) throw std::bad_alloc();
            std::lock_guard<std::mutex> lock(p.m);
            p.stats.device_mallocs++;
            p.stats.bytes_in_use += static_cast<int64_t>(rounded);
            p.stats.peak_bytes_in_use = std::max(p.stats.peak_bytes_in_use, p.stats.bytes_in_use);
        } else {
            // A multiple of the block's alignment, as aligned_alloc requires (round_block's granules are, unless
            // a build patches it to exact sizes, as the CUDA emulator's does).
            const size_t align = round_block(nbytes) >= (size_t(2) << 20) ? (size_t(2) << 20) : 64;
            const size_t rounded = (round_block(nbytes) + align - 1) / align * align;
            std::lock_guard<std::mutex> lock(p.m);
            SizeClass& c = p.classes[rounded];
            c.last_asked = p.generation;
            if (!c.blocks.empty()) {
                ptr = c.blocks.back();
                c.blocks.pop_back();
                p.stats.bytes_cached -= static_cast<int64_t>(rounded);
            } else {
                ptr = system_alloc(rounded);
                if (!ptr) {  // give the cache back and try once more before reporting
                    cpu_release_locked(p, UINT64_MAX);
                    ptr = system_alloc(rounded);
                }
                if (!ptr) throw std::bad_alloc();
                p.stats.device_mallocs++;
            }
            block = rounded;
            p.stats.bytes_in_use += static_cast<int64_t>(rounded);
            p.stats.peak_bytes_in_use = std::max(p.stats.peak_bytes_in_use, p.stats.bytes_in_use);
        }
        if (g_poison) std::memset(ptr, 0xFF, nbytes);
        return;
    }
#ifdef ALEXNET_WITH_CUDA
    stream = current_stream(dev.index);
    CudaPool& p = pool();
    if (caching_disabled()) {
        DeviceGuard g(dev);
        const size_t exact = std::max<size_t>(nbytes, 1);
        cudaError_t e = cudaMalloc(&ptr, exact);
        if (e != cudaSuccess) {
            cudaGetLastError();
            throw std::runtime_error("alloc: CUDA error: " + std::string(cudaGetErrorString(e)) + " (asked for " +
                                     std::to_string(nbytes) + " bytes on " + dev.str() + ", caching off)");
        }
        std::lock_guard<std::mutex> lock(p.m);
        p.direct_blocks[ptr] = exact;
        p.stats.device_mallocs++;
        p.stats.bytes_in_use += static_cast<int64_t>(exact);
        p.stats.peak_bytes_in_use = std::max(p.stats.peak_bytes_in_use, p.stats.bytes_in_use);
    } else {
        const size_t rounded = round_block(nbytes);
        std::lock_guard<std::mutex> lock(p.m);
        GraphPoolState* gp = t_capture_pool && t_capture_pool->device == dev.index ? t_capture_pool : nullptr;
        auto it = p.free_blocks.find({dev.index, stream, rounded});
        if (gp) {
            auto own = gp->free_blocks.find({stream, rounded});
            if (own != gp->free_blocks.end() && !own->second.empty()) {
                ptr = own->second.back();
                own->second.pop_back();
            } else if (it != p.free_blocks.end() && !it->second.empty()) {
                ptr = it->second.back();
                it->second.pop_back();
                p.graph_owner[ptr] = gp;
                gp->owned[ptr] = rounded;
            } else {
                throw std::runtime_error("alloc: no cached block of " + std::to_string(rounded) + " bytes on " +
                                         dev.str() + " while capturing a CUDA graph (cudaMalloc is not allowed then)");
            }
            p.stats.bytes_cached -= static_cast<int64_t>(rounded);
        } else if (it != p.free_blocks.end() && !it->second.empty()) {
            ptr = it->second.back();
            it->second.pop_back();
            p.stats.bytes_cached -= static_cast<int64_t>(rounded);
        } else {
            DeviceGuard g(dev);
            cudaError_t e = cudaMalloc(&ptr, rounded);
            if (e == cudaErrorMemoryAllocation) {
                cudaGetLastError();
                cudaDeviceSynchronize();
                release_cached_locked(p, dev.index);
                e = cudaMalloc(&ptr, rounded);
            }
            if (e != cudaSuccess) {
                cudaGetLastError();
                throw std::runtime_error("alloc: CUDA error: " + std::string(cudaGetErrorString(e)) + " (asked for " +
                                         std::to_string(nbytes) + " bytes on " + dev.str() + ")");
            }
            p.stats.device_mallocs++;
            p.all_blocks[ptr] = {dev.index, rounded};
        }
        p.stats.bytes_in_use += static_cast<int64_t>(rounded);
        p.stats.peak_bytes_in_use = std::max(p.stats.peak_bytes_in_use, p.stats.bytes_in_use);
    }
    if (g_poison) {
        DeviceGuard g(dev);
        cuda_check(cudaMemsetAsync(ptr, 0xFF, nbytes, static_cast<cudaStream_t>(stream)), "alloc");
    }
#else
    throw std::runtime_error("alloc: alexnet_cuda was built without CUDA");
#endif
}

Storage::~Storage() {
    if (!ptr) return;
    if (device.is_cpu()) {
        CpuPool& p = cpu_pool();
        std::lock_guard<std::mutex> lock(p.m);
        if (block == 0) {
            p.stats.bytes_in_use -= static_cast<int64_t>((std::max<size_t>(bytes, 1) + 63) / 64 * 64);
            std::free(ptr);
            return;
        }
        auto it = p.classes.find(block);
        if (it == p.classes.end()) it = p.classes.emplace(block, SizeClass{{}, p.generation}).first;  // trimmed meanwhile
        it->second.blocks.push_back(ptr);
        p.stats.bytes_in_use -= static_cast<int64_t>(block);
        p.stats.bytes_cached += static_cast<int64_t>(block);
        return;
    }
#ifdef ALEXNET_WITH_CUDA
    CudaPool& p = pool();
    std::lock_guard<std::mutex> lock(p.m);
    auto b = p.all_blocks.find(ptr);
    if (b == p.all_blocks.end()) {
        auto d = p.direct_blocks.find(ptr);
        if (d == p.direct_blocks.end()) return;
        p.stats.bytes_in_use -= static_cast<int64_t>(d->second);
        p.direct_blocks.erase(d);
        DeviceGuard g(device);
        cudaFree(ptr);  // waits for the work still using the block, so no later kernel can see it reused
        return;
    }
    const size_t rounded = b->second.second;
    auto o = p.graph_owner.find(ptr);
    GraphPoolState* gp = o != p.graph_owner.end() ? o->second : nullptr;
    if (!gp && t_capture_pool && t_capture_pool->device == device.index) {
        gp = t_capture_pool;  // freed during a capture: a captured kernel may have used it
        p.graph_owner[ptr] = gp;
        gp->owned[ptr] = rounded;
    }
    if (gp) gp->free_blocks[{stream, rounded}].push_back(ptr);
    else p.free_blocks[{device.index, stream, rounded}].push_back(ptr);
    p.stats.bytes_in_use -= static_cast<int64_t>(rounded);
    p.stats.bytes_cached += static_cast<int64_t>(rounded);
#endif
}

bool cuda_caching_enabled() { return !caching_disabled(); }

struct GraphMemoryPool::State : GraphPoolState {};

GraphMemoryPool::GraphMemoryPool(Device d) : st_(new State) {
    if (!d.is_cuda()) throw ValueError("GraphMemoryPool: a CUDA device is needed, got " + d.str());
    if (caching_disabled()) throw ValueError("GraphMemoryPool: the CUDA caching allocator is off");
    st_->device = d.index;
}

GraphMemoryPool::~GraphMemoryPool() {
    CudaPool& p = pool();
    {
        std::lock_guard<std::mutex> lock(p.m);
        if (t_capture_pool == st_) t_capture_pool = nullptr;
        for (auto& kv : st_->free_blocks)
            for (void* ptr : kv.second) p.free_blocks[{st_->device, kv.first.first, kv.first.second}].push_back(ptr);
        for (auto& kv : st_->owned) p.graph_owner.erase(kv.first);
    }
    delete st_;
}

void GraphMemoryPool::begin_capture() { t_capture_pool = st_; }
void GraphMemoryPool::end_capture() {
    if (t_capture_pool == st_) t_capture_pool = nullptr;
}
int64_t GraphMemoryPool::bytes() const {
    CudaPool& p = pool();
    std::lock_guard<std::mutex> lock(p.m);
    int64_t n = 0;
    for (auto& kv : st_->owned) n += static_cast<int64_t>(kv.second);
    return n;
}

AllocatorStats cuda_allocator_stats() {
    CudaPool& p = pool();
    std::lock_guard<std::mutex> lock(p.m);
    return p.stats;
}

void cuda_empty_cache() {
#ifdef ALEXNET_WITH_CUDA
    if (!cuda_available()) return;
    CudaPool& p = pool();
    std::lock_guard<std::mutex> lock(p.m);
    cudaDeviceSynchronize();
    release_cached_locked(p, -1);
#endif
}

void cuda_reset_peak_stats() {
    CudaPool& p = pool();
    std::lock_guard<std::mutex> lock(p.m);
    p.stats.peak_bytes_in_use = p.stats.bytes_in_use;
}

AllocatorStats cpu_allocator_stats() {
    CpuPool& p = cpu_pool();
    std::lock_guard<std::mutex> lock(p.m);
    return p.stats;
}

void cpu_empty_cache() {
    CpuPool& p = cpu_pool();
    std::lock_guard<std::mutex> lock(p.m);
    cpu_release_locked(p, UINT64_MAX);
}

void cpu_reset_peak_stats() {
    CpuPool& p = cpu_pool();
    std::lock_guard<std::mutex> lock(p.m);
    p.stats.peak_bytes_in_use = p.stats.bytes_in_use;
}

void cpu_trim_cache() {
    CpuPool& p = cpu_pool();
    std::lock_guard<std::mutex> lock(p.m);
    // Sizes asked for in the current generation or the one before keep their blocks.
    if (p.generation >= 1) cpu_release_locked(p, p.generation - 1);
    p.generation++;
}

bool cpu_caching_enabled() { return !cpu_caching_disabled(); }

DeviceProperties cuda_device_properties(int index) {
    DeviceProperties d;
#ifdef ALEXNET_WITH_CUDA
    if (index < 0 || index >= cuda_device_count())
        throw ValueError("cuda_device_properties: argument 'index': no CUDA device " + std::to_string(index));
    cudaDeviceProp p{};
    cuda_check(cudaGetDeviceProperties(&p, index), "cuda_device_properties");
    d.name = p.name;
    d.sm_count = p.multiProcessorCount;
    d.major = p.major;
    d.minor = p.minor;
    d.total_memory = static_cast<int64_t>(p.totalGlobalMem);
#else
    throw ValueError("cuda_device_properties: alexnet_cuda was built without CUDA");
#endif
    return d;
}

// ------------------------------------------------------------------------------------------------------
// Tensor

int64_t Tensor::numel() const {
    int64_t n = 1;
    for (int64_t s : shape_) n *= s;
    return n;
}

std::string Tensor::shape_str() const {
    std::ostringstream o;
    o << "(";
    for (size_t i = 0; i < shape_.size(); ++i) o << (i ? ", " : "") << shape_[i];
    if (shape_.size() == 1) o << ",";
    o << ")";
    return o.str();
}

Tensor Tensor::empty(const std::vector<int64_t>& shape, DType dtype, Device device) {
    Tensor t;
    const size_t bytes = checked::nbytes("empty", "shape", shape, dtype_size(dtype));
    t.shape_ = shape;
    t.dtype_ = dtype;
    try {
        t.storage_ = std::make_shared<Storage>(bytes, device);
    } catch (const std::bad_alloc&) {
        throw OutOfMemory("cannot allocate " + std::to_string(bytes) + " bytes for a " + dtype_name(dtype) + " tensor of shape " +
                          checked::shape_str(shape) + " on " + device.str());
    }
    return t;
}

Tensor Tensor::zeros(const std::vector<int64_t>& shape, DType dtype, Device device) {
    Tensor t = empty(shape, dtype, device);
    t.fill_zero();
    return t;
}

Tensor Tensor::view(const std::vector<int64_t>& shape) const {
    if (checked::numel("view", "shape", shape) != numel())
        throw ValueError("view: shape " + checked::shape_str(shape) + " has a different number of elements than " +
                         shape_str());
    Tensor t = *this;
    t.shape_ = shape;
    return t;
}

void Tensor::fill_zero() {
    if (nbytes() == 0) return;
    if (device().is_cpu()) {
        std::memset(raw(), 0, nbytes());
        return;
    }
#ifdef ALEXNET_WITH_CUDA
    DeviceGuard g(device());
    cuda_check(cudaMemsetAsync(raw(), 0, nbytes(), static_cast<cudaStream_t>(current_stream(device().index))), "zeros");
#endif
}

Tensor Tensor::to(Device d) const {
    if (!defined()) throw ValueError("to: tensor is undefined");
    Tensor t;
    {
        DeviceGuard g(d);
        t = empty(shape_, dtype_, d);
    }
    t.copy_from(*this);
    return t;
}

void Tensor::copy_from(const Tensor& src) {
    if (src.shape_ != shape_ || src.dtype_ != dtype_)
        throw ValueError("copy: source " + src.shape_str() + " " + dtype_name(src.dtype_) + " does not match destination " +
                         shape_str() + " " + dtype_name(dtype_));
    const size_t n = nbytes();
    if (n == 0) return;
    const Device sd = src.device(), dd = device();
    if (sd.is_cpu() && dd.is_cpu()) {
        std::memcpy(raw(), src.raw(), n);
        return;
    }
#ifdef ALEXNET_WITH_CUDA
    if (dd.is_cuda() && sd.is_cpu()) {
        DeviceGuard g(dd);
        auto s = static_cast<cudaStream_t>(current_stream(dd.index));
        cuda_check(cudaMemcpyAsync(raw(), src.raw(), n, cudaMemcpyHostToDevice, s), "copy");
        cuda_check(cudaStreamSynchronize(s), "copy");  // the host buffer may go away after we return
    } else if (dd.is_cpu() && sd.is_cuda()) {
        DeviceGuard g(sd);
        auto s = static_cast<cudaStream_t>(current_stream(sd.index));
        cuda_check(cudaMemcpyAsync(raw(), src.raw(), n, cudaMemcpyDeviceToHost, s), "copy");
        cuda_check(cudaStreamSynchronize(s), "copy");
    } else if (sd.index == dd.index) {
        DeviceGuard g(dd);
        cuda_check(cudaMemcpyAsync(raw(), src.raw(), n, cudaMemcpyDeviceToDevice,
                                   static_cast<cudaStream_t>(current_stream(dd.index))),
                   "copy");
    } else {
        int can = 0;
        cuda_check(cudaDeviceCanAccessPeer(&can, dd.index, sd.index), "copy");
        DeviceGuard g(dd);
        auto s = static_cast<cudaStream_t>(current_stream(dd.index));
        if (can) {
            static std::mutex m;
            static std::map<std::pair<int, int>, bool> enabled;
            {
                std::lock_guard<std::mutex> lock(m);
                if (!enabled[{dd.index, sd.index}]) {
                    cudaError_t e = cudaDeviceEnablePeerAccess(sd.index, 0);
                    if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) cuda_check(e, "copy");
                    cudaGetLastError();
                    enabled[{dd.index, sd.index}] = true;
                }
            }
            cuda_check(cudaMemcpyPeerAsync(raw(), dd.index, src.raw(), sd.index, n, s), "copy");
        } else {
            // No peer path: stage through the host. The device-to-host leg must run on a stream of the
            // source device, and that stream (this thread's current one there, usually the legacy default
            // stream) is not ordered after whoever produced `src`: a non-blocking stream of another tower
            // may still be writing it. As in the branches above, the caller orders the copy by ordering the
            // destination's current stream `s` after the producer (Scheduler::transfer waits on the
            // producer's event there), so an event recorded on `s` and waited for on the source side
            // carries that ordering across devices without copy_from having to know the producing stream.
            cudaEvent_t ready = nullptr;
            cuda_check(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "copy");
            struct EventGuard {
                cudaEvent_t e;
                ~EventGuard() { cudaEventDestroy(e); }  // safe once waited on: CUDA frees it when it completes
            } ready_guard{ready};
            cuda_check(cudaEventRecord(ready, s), "copy");
            Tensor host = empty(shape_, dtype_, Device{});
            {
                DeviceGuard gs(sd);
                auto ss = static_cast<cudaStream_t>(current_stream(sd.index));
                cuda_check(cudaStreamWaitEvent(ss, ready, 0), "copy");
                cuda_check(cudaMemcpyAsync(host.raw(), src.raw(), n, cudaMemcpyDeviceToHost, ss), "copy");
                cuda_check(cudaStreamSynchronize(ss), "copy");
            }
            cuda_check(cudaMemcpyAsync(raw(), host.raw(), n, cudaMemcpyHostToDevice, s), "copy");
            cuda_check(cudaStreamSynchronize(s), "copy");  // the host buffer goes away when we return
        }
    }
#else
    throw std::runtime_error("copy: alexnet_cuda was built without CUDA");
#endif
}

}  // namespace ax
