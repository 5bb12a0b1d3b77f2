// Device-tagged dense tensors (row-major, contiguous) and the caching allocator behind them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ax {

enum class DType : uint8_t { f32, u8, i32 };
size_t dtype_size(DType t);
const char* dtype_name(DType t);

struct Device {
    enum Type : uint8_t { CPU, CUDA };
    Type type = CPU;
    int index = 0;
    bool is_cpu() const { return type == CPU; }
    bool is_cuda() const { return type == CUDA; }
    std::string str() const;
    bool operator==(const Device& o) const { return type == o.type && (type == CPU || index == o.index); }
    bool operator!=(const Device& o) const { return !(*this == o); }
    // Parses "cpu", "cuda" (= "cuda:0") or "cuda:N"; unknown names raise ValueError naming `op` and `arg`.
    // A CUDA device is checked against the devices present (and against a build without CUDA).
    static Device parse(const std::string& s, const char* op = "device", const char* arg = "device");
};

// Thrown for bad arguments; bindings map it to Python's ValueError.
struct ValueError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};
// Thrown for a wrong dtype or object kind; bindings map it to Python's TypeError.
struct TypeError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// Thrown when an allocation fails; bindings map it to Python's MemoryError (with the op and the size).
struct OutOfMemory : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// One allocation; returned to the caching allocator's pool (keyed by device and stream, or by size on the CPU)
// when freed.
struct Storage {
    void* ptr = nullptr;
    size_t bytes = 0;
    Device device;
    void* stream = nullptr;  // cudaStream_t the block belongs to (CUDA only)
    size_t block = 0;        // CPU: the pooled block's rounded size; 0 for an uncached allocation
    Storage(size_t bytes, Device device);
    ~Storage();
    Storage(const Storage&) = delete;
    Storage& operator=(const Storage&) = delete;
};

class Tensor {
public:
    Tensor() = default;
    // Element and byte counts are overflow-checked (ValueError); a failed allocation raises OutOfMemory.
    static Tensor empty(const std::vector<int64_t>& shape, DType dtype, Device device);
    static Tensor zeros(const std::vector<int64_t>& shape, DType dtype, Device device);

    bool defined() const { return static_cast<bool>(storage_); }
    const std::vector<int64_t>& shape() const { return shape_; }
    int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
    int64_t size(int64_t i) const { return shape_.at(i < 0 ? i + dim() : i); }
    int64_t numel() const;  // shape_ passed empty()'s checked product, so this cannot overflow
    size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
    DType dtype() const { return dtype_; }
    Device device() const { return storage_ ? storage_->device : Device{}; }
    void* raw() const { return storage_ ? storage_->ptr : nullptr; }
    template <typename T> T* data() const { return static_cast<T*>(raw()); }
    std::string shape_str() const;

    // Same storage, new shape with the same element count.
    Tensor view(const std::vector<int64_t>& shape) const;
    // A copy on `device` (peer copy between GPUs, staged through the host where peers cannot see each other).
    Tensor to(Device device) const;
    // Copies `src` (same shape and dtype, any device) into this tensor. A copy into a CUDA tensor runs after
    // whatever the destination device's current stream is ordered after, also when staged through the host
    // from another device: to copy a tensor another stream produces, make that stream wait on it first.
    void copy_from(const Tensor& src);
    void fill_zero();

private:
    std::shared_ptr<Storage> storage_;
    std::vector<int64_t> shape_;
    DType dtype_ = DType::f32;
};

// --- allocator -------------------------------------------------------------------------------------
// Newly allocated memory is filled with 0xFF bytes (a NaN in float32) while poisoning is on; the tests
// turn it on so that an output element a kernel never writes fails the comparison.
void set_poison_allocations(bool on);
bool poison_allocations();

struct AllocatorStats {
    int64_t device_mallocs = 0;     // cudaMalloc calls so far
    int64_t bytes_in_use = 0;       // bytes held by live tensors (all CUDA devices)
    int64_t bytes_cached = 0;       // bytes held in free pools
    int64_t peak_bytes_in_use = 0;
};
AllocatorStats cuda_allocator_stats();
void cuda_empty_cache();
void cuda_reset_peak_stats();  // peak_bytes_in_use := bytes_in_use

// The CPU caching allocator: freed blocks are kept in free lists by rounded size and handed to the next tensor of
// that size, so a steady-state training step asks the system for no memory (a fresh 151 MB fc6 gradient every
// step cost ~130 ms of page faults). device_mallocs counts the system allocations (aligned_alloc).
// ALEXNET_NO_CPU_MEMORY_CACHING=1 gives every tensor its own allocation of its exact size, freed at once (for
// memory checkers, as ALEXNET_NO_CUDA_MEMORY_CACHING for CUDA). A reused block holds a previous tensor's bytes:
// every op writes its outputs in full and Tensor::zeros clears its memory, so nothing reads them (the tests poison
// every allocation, reused or not, with NaN to keep it so).
AllocatorStats cpu_allocator_stats();
void cpu_empty_cache();      // every cached block back to the system
void cpu_reset_peak_stats();
// Gives back to the system the cached blocks of every size that no allocation asked for since the call before
// the previous one, so the cache holds what recent work needs, not every size ever used. Net calls it after
// every step: the sizes of another batch size or a freed net go after two steps without them; a size still in
// use keeps its blocks (however many the towers' interleaving needed at once), so a steady state allocates nothing.
void cpu_trim_cache();
bool cpu_caching_enabled();

// The CUDA caching allocator is on (ALEXNET_NO_CUDA_MEMORY_CACHING unset): a CUDA graph needs it (below).
bool cuda_caching_enabled();

// A private pool of CUDA memory for a captured CUDA graph, whose kernels keep the addresses they were captured
// with. Between begin_capture and end_capture every allocation on the pool's device made by the calling thread is
// the pool's (taken from the pool's free blocks, else from the shared cache; never cudaMalloc, which is illegal
// during a capture: a miss throws), and so is every block that thread frees on that device meanwhile (the graph
// may have read it). A pool block freed at any time returns to the pool, never to the shared cache, so no other
// tensor is ever given memory the graph's replays read or write. Destroy the pool only after the graph and its
// last replay are done: its free blocks then go back to the shared cache, and its blocks still held by tensors go
// there when those are freed.
class GraphMemoryPool {
public:
    explicit GraphMemoryPool(Device d);
    ~GraphMemoryPool();
    GraphMemoryPool(const GraphMemoryPool&) = delete;
    GraphMemoryPool& operator=(const GraphMemoryPool&) = delete;
    void begin_capture();
    void end_capture();
    int64_t bytes() const;  // held by the pool (free or in use)
    struct State;

private:
    State* st_;
};

struct DeviceProperties {
    std::string name;
    int sm_count = 0, major = 0, minor = 0;
    int64_t total_memory = 0;
};
DeviceProperties cuda_device_properties(int index);

// --- CUDA runtime helpers (valid in builds without CUDA: they answer "no") --------------------------
bool built_with_cuda();
bool cuda_available();
std::string cuda_unavailable_reason();  // "" when available
int cuda_device_count();
// Whether a CMake architecture list ("75;80-real;90a-real", or comma-separated) holds code that a GPU of
// compute capability `cc` (e.g. 86) can run: SASS of its major version at an equal or lower minor, or PTX of
// an equal or lower version.
bool arch_list_covers(const std::string& list, int cc);
// Thread-local current stream per device (nullptr = legacy default stream); ops launch on it.
void* current_stream(int device_index);
void set_current_stream(int device_index, void* stream);
struct StreamGuard {
    int device; void* prev;
    StreamGuard(int device, void* stream) : device(device), prev(current_stream(device)) { set_current_stream(device, stream); }
    ~StreamGuard() { set_current_stream(device, prev); }
};
// Makes `device` current for the calling thread (no-op for CPU); restores the previous one on exit.
struct DeviceGuard {
    int prev = -1;
    explicit DeviceGuard(Device d);
    ~DeviceGuard();
};
void cuda_check(int err, const char* op);  // throws std::runtime_error("op: CUDA error ...") if err != 0
void cuda_synchronize(Device d);

}  // namespace ax
