// The two-tower AlexNet: layer table, parameter init, and the issue order of a training step.
#include "net.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <set>
#include <sstream>

#include "checked.h"
#include "philox.h"

#ifdef ALEXNET_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace ax {

namespace {

uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t hash_name(const std::string& s) {
    uint64_t h = 1469598103934665603ull;  // FNV-1a
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

[[noreturn]] void config_error(const std::string& msg) { throw ValueError("Net: " + msg); }

// In 64 bits, so a padding or input size near 2^31 cannot wrap to a window that seems to fit.
int out_size(const std::string& layer, const char* what, int in, int k, int s, int p) {
    const int64_t padded = static_cast<int64_t>(in) + 2 * static_cast<int64_t>(p);
    if (padded > checked::kMaxExtent)
        config_error(layer + " " + what + ": the padded input " + std::to_string(in) + " + 2*" + std::to_string(p) +
                     " is beyond 2^31-1");
    if (padded < k)
        config_error("input too small: " + layer + " " + what + " window " + std::to_string(k) + " does not fit its " +
                     std::to_string(in) + "x" + std::to_string(in) + " input (padding " + std::to_string(p) +
                     "); raise input_size or shrink the layers");
    return static_cast<int>((padded - k) / s + 1);
}

// A size of the layer table, computed in checked 64-bit arithmetic and kept within an int32.
int net_size(const std::string& what, int64_t v) {
    if (v > checked::kMaxExtent) config_error(what + " is " + std::to_string(v) + ", beyond 2^31-1");
    return static_cast<int>(v);
}

}  // namespace

Net::Net(const NetConfig& cfg, const std::vector<Device>& devices, bool shared, uint64_t seed)
    : cfg_(cfg), devices_(devices), seed_(seed) {
    if (cfg_.towers < 1) config_error("towers must be >= 1, got " + std::to_string(cfg_.towers));
    if (static_cast<int>(devices_.size()) != cfg_.towers)
        config_error("devices names " + std::to_string(devices_.size()) + " device(s) for " +
                     std::to_string(cfg_.towers) + " tower(s)");
    for (const Device& d : devices_)
        if (d.type != devices_[0].type)
            config_error("towers must all be on CPU or all on CUDA devices, got " + devices_[0].str() + " and " + d.str());
    build_layers();
    sched_ = std::make_unique<Scheduler>(devices_, shared);
    init_params();
}

void Net::build_layers() {
    const int T = cfg_.towers;
    if (cfg_.channels.size() != 5) config_error("channels must list 5 conv widths (conv1..conv5)");
    if (cfg_.fc.size() != 2) config_error("fc must list 2 widths (fc6, fc7)");
    auto divisible = [&](const std::string& what, int v) {
        if (v < 1) config_error(what + " must be >= 1, got " + std::to_string(v));
        if (v % T != 0)
            config_error(what + " (" + std::to_string(v) + ") is not divisible by the " + std::to_string(T) + " towers");
    };
    static const char* conv_names[5] = {"conv1", "conv2", "conv3", "conv4", "conv5"};
    for (int i = 0; i < 5; ++i) divisible(std::string("width of ") + conv_names[i], cfg_.channels[i]);
    divisible("width of fc6", cfg_.fc[0]);
    divisible("width of fc7", cfg_.fc[1]);
    divisible("num_classes", cfg_.num_classes);
    if (cfg_.in_channels < 1) config_error("in_channels must be >= 1");
    if (cfg_.input_size < 1) config_error("input_size must be >= 1");
    if (!(cfg_.dropout >= 0.f && cfg_.dropout < 1.f)) config_error("dropout must be in [0, 1)");
    // Every float of the config is checked here, so a NaN or inf never reaches the weights or an op.
    if (!(std::isfinite(cfg_.init_std) && cfg_.init_std >= 0.f))
        config_error("init_std must be finite and >= 0, got " + std::to_string(cfg_.init_std));
    if (!(cfg_.momentum >= 0.f && cfg_.momentum < 1.f)) config_error("momentum must be in [0, 1)");
    if (!(std::isfinite(cfg_.weight_decay) && cfg_.weight_decay >= 0.f))
        config_error("weight_decay must be finite and >= 0");
    if (!(std::isfinite(cfg_.bias_weight_decay) && cfg_.bias_weight_decay >= 0.f))
        config_error("bias_weight_decay must be finite and >= 0");
    if (cfg_.lrn) {
        if (!(std::isfinite(cfg_.lrn_k) && cfg_.lrn_k > 0.f)) config_error("lrn_k must be finite and > 0");
        if (!(std::isfinite(cfg_.lrn_alpha) && cfg_.lrn_alpha >= 0.f)) config_error("lrn_alpha must be finite and >= 0");
        if (!(std::isfinite(cfg_.lrn_beta) && cfg_.lrn_beta >= 0.f)) config_error("lrn_beta must be finite and >= 0");
    }
    if (cfg_.lrn && (cfg_.lrn_size < 1 || cfg_.lrn_size % 2 == 0)) config_error("lrn_size must be a positive odd number");
    if (cfg_.conv1_kernel < 1 || cfg_.conv1_stride < 1 || cfg_.conv1_padding < 0)
        config_error("conv1 needs kernel >= 1, stride >= 1, padding >= 0");
    std::set<std::string> drop(cfg_.drop_layers.begin(), cfg_.drop_layers.end());
    for (const auto& d : drop)
        if (d != "conv2" && d != "conv3" && d != "conv4")
            config_error("drop_layers may name conv2, conv3 or conv4 (the middle conv layers), got '" + d + "'");

    const int pool_w = cfg_.overlap_pool ? 3 : 2, pool_s = 2;
    // The paper's table: (kernel, pad, cross-tower input, LRN, pool, bias init) for conv1..conv5.
    struct Row { int k, pad, stride; bool cross, lrn, pool; float bias; };
    const Row rows[5] = {{cfg_.conv1_kernel, cfg_.conv1_padding, cfg_.conv1_stride, false, true, true, 0.f},
                         {5, 2, 1, false, true, true, 1.f},
                         {3, 1, 1, true, false, false, 0.f},
                         {3, 1, 1, false, false, false, 1.f},
                         {3, 1, 1, false, false, true, 1.f}};
    int hw = cfg_.input_size, c_own = cfg_.in_channels;  // what the next layer sees in each tower
    bool pending_cross = false;
    for (int i = 0; i < 5; ++i) {
        if (drop.count(conv_names[i])) {
            // A removed layer takes its convolution, ReLU and LRN with it; its cross-tower input moves to the
            // next layer. Its pooling stays, as a second pool of the layer below, so the layers above see the
            // same sizes (without it, dropping conv2 makes fc6 read 43,264 inputs instead of 9,216).
            pending_cross = pending_cross || rows[i].cross;
            if (rows[i].pool && !layers_.empty()) {
                LayerSpec& below = layers_.back();
                below.pool_extra = true;
                below.pool_mid_hw = below.pooled_hw;
                below.pooled_hw = out_size(conv_names[i], "max-pooling (kept from the removed layer)", hw, pool_w,
                                           pool_s, 0);
                hw = below.pooled_hw;
            }
            continue;
        }
        LayerSpec L;
        L.name = conv_names[i];
        L.conv = true;
        L.cross = (rows[i].cross || pending_cross) && T > 1 && i > 0;
        pending_cross = false;
        L.in_c = L.cross ? net_size(L.name + " input channels", static_cast<int64_t>(c_own) * T) : c_own;
        L.out_c = cfg_.channels[i] / T;
        L.kernel = rows[i].k; L.pad = rows[i].pad; L.stride = rows[i].stride;
        L.in_hw = hw;
        L.out_hw = out_size(L.name, "convolution", hw, L.kernel, L.stride, L.pad);
        L.lrn = rows[i].lrn && cfg_.lrn;
        L.pool = rows[i].pool;
        L.pooled_hw = L.pool ? out_size(L.name, "max-pooling", L.out_hw, pool_w, pool_s, 0) : L.out_hw;
        L.bias_init = rows[i].bias;
        hw = L.pooled_hw;
        c_own = L.out_c;
        layers_.push_back(L);
    }
    int features_own = net_size("the features entering fc6", checked::mul("Net", "config", static_cast<int64_t>(c_own) * hw, hw));
    const int fc_out[3] = {cfg_.fc[0] / T, cfg_.fc[1] / T, cfg_.num_classes / T};
    static const char* fc_names[3] = {"fc6", "fc7", "fc8"};
    for (int i = 0; i < 3; ++i) {
        LayerSpec L;
        L.name = fc_names[i];
        L.conv = false;
        L.cross = T > 1;
        L.in_c = net_size(std::string(fc_names[i]) + " input features", static_cast<int64_t>(features_own) * T);
        L.out_c = fc_out[i];
        L.relu = i < 2;
        L.dropout = i < 2 && cfg_.dropout > 0.f;
        L.bias_init = i < 2 ? 1.f : 0.f;
        features_own = L.out_c;
        layers_.push_back(L);
    }
    for (size_t i = 0; i < layers_.size(); ++i) {
        layers_[i].index = static_cast<int>(i);
        // The op limit on each weight (checked.h), here rather than at the first step, before any allocation.
        const LayerSpec& L = layers_[i];
        const std::vector<int64_t> wshape = L.conv ? std::vector<int64_t>{L.out_c, L.in_c, L.kernel, L.kernel}
                                                   : std::vector<int64_t>{L.out_c, L.in_c};
        checked::check_elements("Net", "config", wshape, (L.name + " weight").c_str());
    }
}

void Net::init_params() {
    const int T = cfg_.towers;
    params_.assign(T, std::vector<Params>(layers_.size()));
    st_.assign(T, std::vector<LayerState>(layers_.size()));
    for (int t = 0; t < T; ++t) {
        for (size_t l = 0; l < layers_.size(); ++l) {
            const LayerSpec& L = layers_[l];
            std::vector<int64_t> wshape = L.conv ? std::vector<int64_t>{L.out_c, L.in_c, L.kernel, L.kernel}
                                                 : std::vector<int64_t>{L.out_c, L.in_c};
            const std::string base = L.name + ".t" + std::to_string(t);
            // Weights ~ N(0, init_std^2) by Box-Muller on Philox draws keyed by (seed, parameter name):
            // the same numbers on every backend and device placement.
            Tensor w = Tensor::empty(wshape, DType::f32, Device{});
            const uint64_t key = splitmix64(seed_ ^ hash_name(base + ".weight"));
            float* wp = w.data<float>();
            for (int64_t i = 0; i < w.numel(); ++i) {
                const double u1 = (static_cast<double>(philox_u32(key, 2 * i)) + 1.0) / 4294967296.0;
                const double u2 = static_cast<double>(philox_u32(key, 2 * i + 1)) / 4294967296.0;
                wp[i] = static_cast<float>(cfg_.init_std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
            }
            Tensor b = Tensor::empty({L.out_c}, DType::f32, Device{});
            for (int64_t i = 0; i < b.numel(); ++i) b.data<float>()[i] = L.bias_init;
            Params& p = params_[t][l];
            const Device d = devices_[t];
            DeviceGuard g(d);
            p.w = w.to(d);
            p.b = b.to(d);
            p.vw = Tensor::zeros(wshape, DType::f32, d);
            p.vb = Tensor::zeros({L.out_c}, DType::f32, d);
        }
    }
    for (const Device& d : devices_) cuda_synchronize(d);
}

std::pair<uint64_t, uint64_t> Net::dropout_key(int64_t at_step, int layer, int tower) const {
    // Keyed by (seed, step) in the Philox key and (layer, tower) in the counter's high bits, so no two
    // masks of a run share a draw and a resumed run redraws exactly the masks it would have drawn.
    const uint64_t seed = splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(at_step)));
    const uint64_t offset = (static_cast<uint64_t>(layer) * 64 + static_cast<uint64_t>(tower)) << 40;
    return {seed, offset};
}

std::string Net::edge_name(int l) const {
    return (l > 0 ? layers_[l - 1].name : std::string("input")) + "->" + layers_[l].name;
}

std::vector<Tensor> Net::upload_images(const float* images, int n) {
    const int S = cfg_.input_size, C = cfg_.in_channels;
    Tensor host = Tensor::empty({n, C, S, S}, DType::f32, Device{});
    std::memcpy(host.raw(), images, host.nbytes());
    std::vector<Tensor> per_tower(cfg_.towers);
    std::map<std::string, Tensor> per_device;
    for (int t = 0; t < cfg_.towers; ++t) {
        const Device d = devices_[t];
        auto it = per_device.find(d.str());
        if (it == per_device.end()) it = per_device.emplace(d.str(), d.is_cpu() ? host : host.to(d)).first;
        per_tower[t] = it->second;
    }
    return per_tower;
}

// ---- the uint8 input path ----------------------------------------------------------------------------

namespace {
// Two slots serve a loop (the one a step reads, the one the next batch is filled into while it runs); a
// third lets a caller hold a slot of its own while both of those are busy.
constexpr size_t kStagingSlots = 3;
size_t align_up(size_t v) { return (v + 255) & ~size_t(255); }
}  // namespace

// The CUDA graph of a training step (the CUDA graph path, at the end of this file).
namespace {
constexpr int kGraphWarmup = 2;        // eager steps with the same shapes before a capture (warm allocator cache)
constexpr int kGraphMaxFailures = 2;   // failed captures of one shape before it stays eager
constexpr size_t kGraphParamBytes = 16;  // the pinned / device block: dropout seed (u64) at 0, lr (f32) at 8
}  // namespace

struct Net::CudaGraphStep {
    std::string key;
    int n = 0;
    Device dev;
    std::unique_ptr<GraphMemoryPool> pool;  // first: destroyed last, after every tensor below
    Tensor images, labels;                  // float32 path inputs
    HostSlot::DeviceInput u8;                        // uint8 path inputs
    Tensor params;                          // device copy of the pinned block's first kGraphParamBytes
    void* pinned = nullptr;                 // the step's seed and lr, then the loss and ranks read back
    std::map<std::string, int64_t> edges;   // the cross-tower bytes the captured step counted
#ifdef ALEXNET_WITH_CUDA
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
#endif
    float* loss() const { return reinterpret_cast<float*>(static_cast<char*>(pinned) + kGraphParamBytes); }
    int32_t* rank() const {
        return reinterpret_cast<int32_t*>(static_cast<char*>(pinned) + kGraphParamBytes + align_up(4 * size_t(n)));
    }
    ~CudaGraphStep() {
#ifdef ALEXNET_WITH_CUDA
        DeviceGuard g(dev);
        if (exec) cudaGraphExecDestroy(exec);
        if (graph) cudaGraphDestroy(graph);
        if (pinned) cudaFreeHost(pinned);
#endif
    }
};

void Net::CudaGraphStepDeleter::operator()(CudaGraphStep* g) const { delete g; }

Net::HostSlot::~HostSlot() {
#ifdef ALEXNET_WITH_CUDA
    if (pinned) cudaFreeHost(pinned);  // waits for any copy still reading it
#endif
}

Net::PinnedMetrics::~PinnedMetrics() {
#ifdef ALEXNET_WITH_CUDA
    if (p) cudaFreeHost(p);
#endif
}

void Net::set_input_mean(const float* mean, int H, int W) {
    if (H < 1 || W < 1) throw ValueError("set_input_mean: argument 'mean' must have shape (3, H, W) with H, W >= 1");
    for (int64_t i = 0; i < int64_t(3) * H * W; ++i)
        if (!std::isfinite(mean[i]))
            throw ValueError("set_input_mean: argument 'mean' holds a non-finite value at flat index " + std::to_string(i));
    Tensor host = Tensor::empty({3, H, W}, DType::f32, Device{});
    std::memcpy(host.raw(), mean, host.nbytes());
    mean_dev_.clear();
    for (const Device& d : devices_)
        if (!mean_dev_.count(d.str())) mean_dev_[d.str()] = d.is_cpu() ? host : host.to(d);
    mean_host_ = host;
    if (prefetched_) prefetched_->use = HostSlot::Use::free;  // staged against the old mean's size
    prefetched_ = nullptr;
    graph_drop();  // a uint8-path graph reads the old mean's memory
}

// Everything the step will need to be true of a batch, checked on the host before anything is issued.
void Net::check_u8(const char* op, const std::string& arg, const U8Batch& b) const {
    const std::string pre = std::string(op) + ": argument '";
    const int crop = cfg_.input_size, n = b.n, H = b.H, W = b.W;
    if (n < 1) throw ValueError(pre + arg + "images' holds no images");
    if (cfg_.in_channels != 3)
        throw ValueError(std::string(op) + ": the uint8 path makes 3-channel images; this net takes " +
                         std::to_string(cfg_.in_channels));
    if (!has_input_mean()) throw ValueError(std::string(op) + ": no mean image: call set_input_mean first");
    if (H != mean_host_.size(1) || W != mean_host_.size(2))
        throw ValueError(pre + arg + "images' holds " + std::to_string(H) + "x" + std::to_string(W) +
                         " images; the mean image is " + std::to_string(mean_host_.size(1)) + "x" +
                         std::to_string(mean_host_.size(2)));
    if (crop > H || crop > W)
        throw ValueError(std::string(op) + ": the net's " + std::to_string(crop) + "x" + std::to_string(crop) +
                         " input does not fit the " + std::to_string(H) + "x" + std::to_string(W) + " images");
    checked::check_elements(op, (arg + "images").c_str(), {n, H, W, 3});
    for (int i = 0; i < n; ++i) {
        const int64_t y0 = b.offsets[2 * i], x0 = b.offsets[2 * i + 1];
        if (y0 < 0 || x0 < 0 || y0 + crop > H || x0 + crop > W)
            throw ValueError(pre + arg + "offsets' row " + std::to_string(i) + " = (" + std::to_string(y0) + ", " +
                             std::to_string(x0) + ") puts the " + std::to_string(crop) + "x" + std::to_string(crop) +
                             " crop outside the " + std::to_string(H) + "x" + std::to_string(W) + " image");
        if (b.flips[i] > 1)
            throw ValueError(pre + arg + "flips' holds " + std::to_string(b.flips[i]) + " at " + std::to_string(i) +
                             "; expected 0 or 1");
    }
    for (int i = 0; i < 3 * n; ++i)
        if (!std::isfinite(b.light[i]))
            throw ValueError(pre + arg + "light' holds a non-finite value at flat index " + std::to_string(i));
    for (int i = 0; i < n; ++i)
        if (b.labels[i] < 0 || b.labels[i] >= cfg_.num_classes)
            throw ValueError(pre + arg + "labels' holds " + std::to_string(b.labels[i]) + " at " + std::to_string(i) +
                             ", outside [0, " + std::to_string(cfg_.num_classes) + ")");
}

// A slot of the ring for a batch of n (H, W, 3) images, in this order of preference: a free slot of that
// shape, a free slot reshaped, a new slot, a slot handed out before and never used (its earlier hand-out
// is void: its generation changes). Never the slot a step reads nor the prefetched one. Before the caller
// may write it, any upload still reading it is waited for (none in steady state: every step ends drained).
Net::StagingSlot Net::staging_slot(int n, int H, int W) {
    const char* op = "staging_slot";
    if (n < 1) throw ValueError("staging_slot: argument 'n' must be >= 1, got " + std::to_string(n));
    if (H < 1 || W < 1)
        throw ValueError("staging_slot: arguments 'height' and 'width' must be >= 1, got " + std::to_string(H) + "x" +
                         std::to_string(W));
    checked::check_elements(op, "images", {n, H, W, 3});
    if (has_input_mean() && (H != mean_host_.size(1) || W != mean_host_.size(2)))
        throw ValueError("staging_slot: a batch of " + std::to_string(H) + "x" + std::to_string(W) +
                         " images does not match the mean image (" + std::to_string(mean_host_.size(1)) + "x" +
                         std::to_string(mean_host_.size(2)) + ") the net subtracts");
    using Use = HostSlot::Use;
    auto pick = [&](bool want_free, bool same_shape) -> int {
        for (size_t k = 0; k < slots_.size(); ++k) {
            const size_t i = (next_slot_ + k) % slots_.size();
            const HostSlot& sl = *slots_[i];
            if ((want_free ? sl.use == Use::free : sl.use == Use::handed) &&
                (!same_shape || (sl.n == n && sl.H == H && sl.W == W)))
                return static_cast<int>(i);
        }
        return -1;
    };
    int i = pick(true, true);
    if (i < 0) i = pick(true, false);
    if (i < 0 && slots_.size() < kStagingSlots) {
        slots_.push_back(std::make_shared<HostSlot>());
        i = static_cast<int>(slots_.size()) - 1;
    }
    if (i < 0) i = pick(false, true);
    if (i < 0) i = pick(false, false);
    if (i < 0) throw std::logic_error("staging_slot: every slot of the ring is in use");  // cannot happen: 3 > 2 busy
    next_slot_ = (static_cast<size_t>(i) + 1) % kStagingSlots;
    std::shared_ptr<HostSlot>& owner = slots_[i];
    if (owner->upload_in_flight)
        for (auto& kv : owner->uploaded) kv.second->synchronize();
    owner->uploaded.clear();
    owner->upload_in_flight = false;
    if (owner->n != n || owner->H != H || owner->W != W) {
        // A new shape (rare, not per step): fresh buffers; views of the old ones keep them alive.
        owner = std::make_shared<HostSlot>();
        HostSlot& slot = *owner;
        const size_t img_bytes = static_cast<size_t>(n) * H * W * 3;
        if (devices_[0].is_cpu()) {
            slot.images = Tensor::empty({n, H, W, 3}, DType::u8, Device{});
            slot.offsets = Tensor::empty({n, 2}, DType::i32, Device{});
            slot.flips = Tensor::empty({n}, DType::u8, Device{});
            slot.light = Tensor::empty({n, 3}, DType::f32, Device{});
            slot.labels = Tensor::empty({n}, DType::i32, Device{});
            slot.img = slot.images.data<uint8_t>();
            slot.off = slot.offsets.data<int32_t>();
            slot.flip = slot.flips.data<uint8_t>();
            slot.lig = slot.light.data<float>();
            slot.lab = slot.labels.data<int32_t>();
        } else {
#ifdef ALEXNET_WITH_CUDA
            const size_t total = align_up(img_bytes) + align_up(8 * size_t(n)) + align_up(size_t(n)) +
                                 align_up(12 * size_t(n)) + 4 * size_t(n);
            DeviceGuard g(devices_[0]);
            if (cudaHostAlloc(&slot.pinned, total, cudaHostAllocDefault) != cudaSuccess) {
                cudaGetLastError();
                slot.pinned = nullptr;
                throw OutOfMemory("staging_slot: cannot pin " + std::to_string(total) + " bytes of host memory");
            }
            auto* p = static_cast<uint8_t*>(slot.pinned);
            slot.img = p;
            slot.off = reinterpret_cast<int32_t*>(p + align_up(img_bytes));
            slot.flip = p + align_up(img_bytes) + align_up(8 * size_t(n));
            slot.lig = reinterpret_cast<float*>(slot.flip + align_up(size_t(n)));
            slot.lab = reinterpret_cast<int32_t*>(reinterpret_cast<uint8_t*>(slot.lig) + align_up(12 * size_t(n)));
#endif
        }
        slot.n = n; slot.H = H; slot.W = W;
    }
    HostSlot& slot = *owner;
    slot.use = Use::handed;
    slot.generation = ++handed_;
    StagingSlot s;
    s.slot = owner;
    s.generation = slot.generation;
    s.n = n; s.H = H; s.W = W;
    s.images = slot.img;
    s.offsets = slot.off;
    s.flips = slot.flip;
    s.light = slot.lig;
    s.labels = slot.lab;
    return s;
}

Net::HostSlot& Net::claim_slot(const char* op, const std::string& arg, const StagingSlot& s) {
    const std::string pre = std::string(op) + ": argument '" + arg + "' ";
    const bool mine = s.slot && std::any_of(slots_.begin(), slots_.end(),
                                            [&](const std::shared_ptr<HostSlot>& o) { return o == s.slot; });
    if (!mine)
        throw ValueError(pre + "is not a slot of this net's staging ring (from another net, or replaced by a "
                               "hand-out for another batch shape): take one from staging_slot");
    HostSlot& slot = *s.slot;
    if (slot.generation != s.generation)
        throw ValueError(pre + "was handed out again since it was filled (each staging_slot call voids the "
                               "earlier hand-out of that slot)");
    if (slot.use != HostSlot::Use::handed)
        throw ValueError(pre + "was already used by a step or a prefetch: fill a new one from staging_slot");
    U8Batch b;
    b.images = slot.img;
    b.n = slot.n; b.H = slot.H; b.W = slot.W;
    b.offsets = slot.off;
    b.flips = slot.flip;
    b.light = slot.lig;
    b.labels = slot.lab;
    // The shape the net takes now (the mean image may have changed since the hand-out) and every value.
    check_u8(op, arg + ".", b);
    return slot;
}

void Net::copy_into(const StagingSlot& s, const U8Batch& b) const {
    std::memcpy(s.images, b.images, static_cast<size_t>(b.n) * b.H * b.W * 3);
    std::memcpy(s.offsets, b.offsets, sizeof(int32_t) * 2 * b.n);
    std::memcpy(s.flips, b.flips, static_cast<size_t>(b.n));
    std::memcpy(s.light, b.light, sizeof(float) * 3 * b.n);
    std::memcpy(s.labels, b.labels, sizeof(int32_t) * b.n);
}

void Net::mark_drained() {
    for (auto& s : slots_) s->upload_in_flight = false;
}

// CUDA, per device: five asynchronous copies from the pinned slot on the device's upload stream into the
// slot's device buffers (allocated there once per batch shape), and an event after them. The CPU reads
// the host slot itself: nothing to upload.
void Net::issue_upload_u8(HostSlot& slot) {
#ifdef ALEXNET_WITH_CUDA
    std::set<std::string> done;
    for (int t = 0; t < cfg_.towers; ++t) {
        const Device d = devices_[t];
        if (d.is_cpu() || !done.insert(d.str()).second) continue;
        HostSlot::DeviceInput* di = &slot.dev[d.str()];
        HostSlot* sl = &slot;
        sched_->upload(t, "input.upload", [di, sl, d] {
            const int n = sl->n, H = sl->H, W = sl->W;
            if (!di->images.defined() || di->images.shape() != std::vector<int64_t>{n, H, W, 3}) {
                di->images = Tensor::empty({n, H, W, 3}, DType::u8, d);
                di->offsets = Tensor::empty({n, 2}, DType::i32, d);
                di->flips = Tensor::empty({n}, DType::u8, d);
                di->light = Tensor::empty({n, 3}, DType::f32, d);
                di->labels = Tensor::empty({n}, DType::i32, d);
            }
            auto s = static_cast<cudaStream_t>(current_stream(d.index));
            const char* op = "train_step_u8";
            auto up = [&](const Tensor& dst, const void* src) {
                cuda_check(cudaMemcpyAsync(dst.raw(), src, dst.nbytes(), cudaMemcpyHostToDevice, s), op);
            };
            up(di->images, sl->img);
            up(di->offsets, sl->off);
            up(di->flips, sl->flip);
            up(di->light, sl->lig);
            up(di->labels, sl->lab);
        });
        slot.uploaded[d.str()] = sched_->upload_done(t);
        slot.upload_in_flight = true;
    }
#else
    (void)slot;
#endif
}

// Per device: augment_batch on the first tower there, after waiting for the slot's upload; the other
// towers on that device wait for that tower and share the result.
Tensor Net::issue_augment_u8(HostSlot& slot) {
    const int T = cfg_.towers, crop = cfg_.input_size;
    input_.assign(T, Tensor());
    std::map<std::string, int> first;  // device -> the tower that augments for it
    for (int t = 0; t < T; ++t) {
        const Device d = devices_[t];
        auto it = first.find(d.str());
        if (it != first.end()) {
            const int t0 = it->second;
            sched_->order(t0, t);
            sched_->run(t, "input.share", [this, t, t0] { input_[t] = input_[t0]; });
            continue;
        }
        first.emplace(d.str(), t);
        const Tensor* mean = &mean_dev_.at(d.str());
        HostSlot* sl = &slot;
        if (d.is_cpu()) {
            // The step reads the host slot itself (labels too) until it ends drained.
            sched_->run(t, "input.augment", [this, t, mean, sl, crop] {
                input_[t] = ops::augment_batch(sl->images, sl->offsets, sl->flips, sl->light, *mean, crop);
            });
            continue;
        }
        sched_->wait(t, slot.uploaded.at(d.str()));
        HostSlot::DeviceInput* di = &slot.dev.at(d.str());
        sched_->run(t, "input.augment", [this, t, di, mean, sl, crop] {
            // The offsets were range-checked on the host; the slot's copy spares a device-to-host read.
            input_[t] = ops::augment_batch(di->images, di->offsets, di->flips, di->light, *mean, crop, sl->off);
        });
    }
    // Tower 0, the first on its device, augments there: its stream (where the loss runs) waited for the upload.
    return devices_[0].is_cpu() ? slot.labels : slot.dev.at(devices_[0].str()).labels;
}

// The copying form of the staged step: each batch is copied into a staging slot (the prefetch while the
// step computes, as train_step_staged's callback), then stepped on from there.
StepResult Net::train_step_u8(const U8Batch* batch, float lr, const U8Batch* prefetch) {
    const char* op = "train_step_u8";
    if (!(lr >= 0 && std::isfinite(lr))) throw ValueError("train_step_u8: argument 'lr' must be finite and >= 0");
    if (batch) check_u8(op, "", *batch);
    else if (!prefetched_) throw ValueError("train_step_u8: no prefetched batch: the previous step passed no 'prefetch'");
    if (prefetch) check_u8(op, "prefetch.", *prefetch);
    std::optional<StagingSlot> cur;
    if (batch) {
        cur = staging_slot(batch->n, batch->H, batch->W);
        copy_into(*cur, *batch);
    }
    PrefetchFn fn;
    if (prefetch)
        fn = [this, prefetch]() -> std::optional<StagingSlot> {
            StagingSlot s = staging_slot(prefetch->n, prefetch->H, prefetch->W);
            copy_into(s, *prefetch);
            return s;
        };
    return train_step_staged(cur ? &*cur : nullptr, lr, fn);
}

StepResult Net::train_step_staged(const StagingSlot* slot, float lr, const PrefetchFn& prefetch) {
    const char* op = "train_step_staged";
    using Use = HostSlot::Use;
    if (!(lr >= 0 && std::isfinite(lr))) throw ValueError("train_step_staged: argument 'lr' must be finite and >= 0");
    if (!slot && !prefetched_)
        throw ValueError("train_step_staged: no prefetched batch: the previous step passed no 'prefetch'");
    HostSlot* cur = slot ? &claim_slot(op, "slot", *slot) : prefetched_;
    if (slot && prefetched_) prefetched_->use = Use::free;  // a stale prefetch, not stepped on
    prefetched_ = nullptr;
    cur->use = Use::stepping;
    const int n = cur->n;
    HostSlot* next = nullptr;
    std::exception_ptr prefetch_error;
    host_timeline_.clear();
    const auto t0 = std::chrono::steady_clock::now();
    auto since = [&t0] {
        return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    };
    // The next batch: filled by the host (the caller's callback) and uploaded on the upload streams while the
    // devices compute everything issued before it.
    auto issue_prefetch = [&] {
        if (!prefetch) return;
        const double a = since();
        try {
            std::optional<StagingSlot> s = prefetch();
            if (s) {
                HostSlot& sl = claim_slot(op, "prefetch", *s);
                sl.use = Use::prefetched;
                next = &sl;
                issue_upload_u8(sl);
            }
        } catch (...) {
            prefetch_error = std::current_exception();
            if (next) next->use = Use::free;
            next = nullptr;
        }
        if (trace) host_timeline_.push_back({"input.stage", -1, "host", a, since()});
    };
    // A CUDA graph of the step (graph_enabled: one device, after the warm-up): the uploaded slot is copied into
    // the graph's input buffers on tower 0's stream, and the graph reads the loss and ranks back itself.
    bool graphed = false;
    if (graph_enabled()) {
        const Tensor& mean = mean_dev_.at(devices_[0].str());
        const std::string key = "uint8 n=" + std::to_string(n) + " " + std::to_string(cur->H) + "x" +
                                std::to_string(cur->W) + " mean@" + std::to_string(reinterpret_cast<uintptr_t>(mean.raw())) +
                                graph_key_suffix();
        if (graph_wanted(key)) {
            const Device d = devices_[0];
            auto make = [&](CudaGraphStep& g) {
                g.u8.images = Tensor::empty({n, cur->H, cur->W, 3}, DType::u8, d);
                g.u8.offsets = Tensor::empty({n, 2}, DType::i32, d);
                g.u8.flips = Tensor::empty({n}, DType::u8, d);
                g.u8.light = Tensor::empty({n, 3}, DType::f32, d);
                g.u8.labels = Tensor::empty({n}, DType::i32, d);
            };
            // As issue_augment_u8 on one device, from the graph's input buffers. The host offsets (this batch's,
            // range-checked) serve the op's own check when it is captured; the kernel reads the device copy.
            auto inputs = [&](CudaGraphStep& g) {
                const int T = cfg_.towers, crop = cfg_.input_size;
                input_.assign(T, Tensor());
                auto* di = &g.u8;
                const Tensor* m = &mean;
                const int32_t* host_off = cur->off;
                sched_->run(0, "input.augment", [this, di, m, crop, host_off] {
                    input_[0] = ops::augment_batch(di->images, di->offsets, di->flips, di->light, *m, crop, host_off);
                });
                for (int t = 1; t < T; ++t) {
                    sched_->order(0, t);
                    sched_->run(t, "input.share", [this, t] { input_[t] = input_[0]; });
                }
                return g.u8.labels;
            };
            graphed = graph_ || graph_capture(key, n, make, inputs);
        }
    }
    try {
        if (graphed) {
            CudaGraphStep* g = graph_.get();
            const Device d = devices_[0];
            run_step([&] {
                if (slot) issue_upload_u8(*cur);
                sched_->wait(0, cur->uploaded.at(d.str()));
                auto* src = &cur->dev.at(d.str());
                sched_->run(0, "input.graph_copy", [g, src] {
                    g->u8.images.copy_from(src->images);
                    g->u8.offsets.copy_from(src->offsets);
                    g->u8.flips.copy_from(src->flips);
                    g->u8.light.copy_from(src->light);
                    g->u8.labels.copy_from(src->labels);
                });
                graph_launch(lr);
                issue_prefetch();
            });
        } else {
            run_step([&] {
                if (slot) issue_upload_u8(*cur);
                const Tensor dev_labels = issue_augment_u8(*cur);
                issue_forward(/*train=*/true);
                issue_loss(dev_labels, loss_scale(n), /*backward=*/true);
                issue_metrics_readback(n);
                issue_backward(lr);
                issue_prefetch();
            });
        }
    } catch (...) {
        cur->use = Use::free;
        if (next) next->use = Use::free;
        mark_drained();
        throw;
    }
    cur->use = Use::free;
    mark_drained();
    prefetched_ = next;
    StepResult r;
    if (graphed) {
        r = graph_finish(n);
    } else {
        if (dp.defer_sgd) grads_pending_ = true;
        else step += 1;
        graph_eager_step_done();
        r = summarize_staged(n);
    }
    if (prefetch_error) std::rethrow_exception(prefetch_error);
    return r;
}

// CUDA: the step's loss and ranks go to pinned host memory on tower 0's stream, right after the loss, so
// reading them needs no copy after the step (the step's one wait covers them). Pinned once per batch size.
void Net::issue_metrics_readback(int n) {
#ifdef ALEXNET_WITH_CUDA
    if (devices_[0].is_cpu()) return;
    if (metrics_.n != n) {
        if (metrics_.p) cudaFreeHost(metrics_.p);
        metrics_.p = nullptr;
        metrics_.n = 0;
        DeviceGuard g(devices_[0]);
        if (cudaHostAlloc(&metrics_.p, 8 * size_t(n), cudaHostAllocDefault) != cudaSuccess) {
            cudaGetLastError();
            metrics_.p = nullptr;
            throw OutOfMemory("train_step_u8: cannot pin " + std::to_string(8 * size_t(n)) + " bytes of host memory");
        }
        metrics_.n = n;
    }
    const Device d = devices_[0];
    sched_->run(0, "metrics.readback", [this, n, d] {
        auto s = static_cast<cudaStream_t>(current_stream(d.index));
        auto* p = static_cast<uint8_t*>(metrics_.p);
        cuda_check(cudaMemcpyAsync(p, loss_.raw(), 4 * size_t(n), cudaMemcpyDeviceToHost, s), "train_step_u8");
        cuda_check(cudaMemcpyAsync(p + 4 * size_t(n), rank_.raw(), 4 * size_t(n), cudaMemcpyDeviceToHost, s),
                   "train_step_u8");
    });
#else
    (void)n;
#endif
}

namespace {
StepResult summarize_host(const float* loss, const int32_t* rank, int n) {
    StepResult r;
    r.n = n;
    double sum = 0;  // in sample order, so the mean is deterministic
    for (int i = 0; i < n; ++i) {
        sum += loss[i];
        r.top1 += rank[i] < 1;
        r.top5 += rank[i] < 5;
    }
    r.loss = sum / n;
    return r;
}
}  // namespace

StepResult Net::summarize_staged(int n) const {
    if (devices_[0].is_cpu()) return summarize(n);
    const float* loss = static_cast<const float*>(metrics_.p);
    return summarize_host(loss, reinterpret_cast<const int32_t*>(static_cast<const uint8_t*>(metrics_.p) + 4 * size_t(n)), n);
}

void Net::issue_forward(bool train) {
    grads_pending_ = false;  // the layer state holding them is about to be replaced
    const int T = cfg_.towers;
    const int pool_w = cfg_.overlap_pool ? 3 : 2;
    for (size_t l = 0; l < layers_.size(); ++l) {
        const LayerSpec& L = layers_[l];
        // Inputs: the image, the own tower's previous output, or every tower's (a cross-tower edge).
        for (int t = 0; t < T; ++t) {
            LayerState& s = st_[t][l];
            s = LayerState();
            if (l == 0) {
                // Read when the op runs: on the uint8 path an earlier op of the step makes it.
                sched_->run(t, L.name + ".input", [this, &s, t] { s.in = input_[t]; });
            } else if (!L.cross) {
                LayerState& prev = st_[t][l - 1];
                sched_->run(t, L.name + ".input", [&s, &prev, &L] {
                    s.in = L.conv ? prev.out : prev.out.view({prev.out.size(0), L.in_c});
                });
            } else {
                s.recv.resize(T);
                for (int u = 0; u < T; ++u) sched_->transfer(u, t, &st_[u][l - 1].out, &s.recv[u], edge_name(l));
                if (pair_towers() && t > 0) {
                    // Every tower gathers the same tensor: on one device and stream tower 0's serves them all.
                    LayerState* s0 = &st_[0][l];
                    sched_->run(t, L.name + ".gather", [&s, s0] { s.in = s0->in; });
                    continue;
                }
                sched_->run(t, L.name + ".gather", [&s, &L] {
                    std::vector<Tensor> parts;
                    for (const Tensor& r : s.recv) parts.push_back(L.conv ? r : r.view({r.size(0), r.numel() / r.size(0)}));
                    s.in = ops::concat_channels(parts);
                });
            }
        }
        for (int t = 0; t < T; ++t) {
            LayerState& s = st_[t][l];
            Params& p = params_[t][l];
            // The ReLU runs in the GEMM's epilogue (the same bits as relu_forward after it); z is not kept.
            if (L.conv && pair_towers()) {
                // Both towers' forward in one launch, in tower 0's slot (tower 1's input is issued above).
                if (t == 0)
                    sched_->run(0, L.name + ".fprop", [this, l, &L] {
                        LayerState &s0 = st_[0][l], &s1 = st_[1][l];
                        const Params &p0 = params_[0][l], &p1 = params_[1][l];
                        const auto r = ops::conv2d_forward_pair({s0.in, s1.in}, {p0.w, p1.w}, {p0.b, p1.b}, L.stride,
                                                                L.stride, L.pad, L.pad, 1, L.relu);
                        s0.a = r[0];
                        s1.a = r[1];
                    });
            } else if (L.conv) {
                sched_->run(t, L.name + ".fprop", [&s, &p, &L] {
                    s.a = ops::conv2d_forward(s.in, p.w, p.b, L.stride, L.stride, L.pad, L.pad, 1, L.relu);
                });
            } else if (pair_towers()) {
                if (t == 0)
                    sched_->run(0, L.name + ".fprop", [this, l, &L] {
                        LayerState &s0 = st_[0][l], &s1 = st_[1][l];
                        const Params &p0 = params_[0][l], &p1 = params_[1][l];
                        const auto r = ops::linear_forward_pair({s0.in, s1.in}, {p0.w, p1.w}, {p0.b, p1.b}, L.relu);
                        s0.a = r[0];
                        s1.a = r[1];
                    });
            } else {
                sched_->run(t, L.name + ".fprop", [&s, &p, &L] { s.a = ops::linear_forward(s.in, p.w, p.b, L.relu); });
            }
            Tensor* cur = &s.a;
            if (L.lrn && L.pool) {
                // LRN and the max-pool of its output in one op (one kernel on CUDA), the same bits as the two.
                const NetConfig* c = &cfg_;
                sched_->run(t, L.name + ".lrn_pool", [&s, c, pool_w] {
                    auto r = ops::lrn_maxpool_forward(s.a, c->lrn_size, c->lrn_k, c->lrn_alpha, c->lrn_beta, pool_w,
                                                      pool_w, 2, 2, 0, 0);
                    s.lrn_y = r.y;
                    s.lrn_scale = r.scale;
                    s.pool_y = r.pool_y;
                    s.pool_arg = r.argmax;
                });
                cur = &s.pool_y;
            } else if (L.lrn) {
                const NetConfig* c = &cfg_;
                sched_->run(t, L.name + ".lrn", [&s, c] {
                    auto r = ops::lrn_forward(s.a, c->lrn_size, c->lrn_k, c->lrn_alpha, c->lrn_beta);
                    s.lrn_y = r.first;
                    s.lrn_scale = r.second;
                });
                cur = &s.lrn_y;
            }
            if (L.pool && !L.lrn) {
                sched_->run(t, L.name + ".pool", [&s, cur, pool_w] {
                    auto r = ops::maxpool_forward(*cur, pool_w, pool_w, 2, 2, 0, 0);
                    s.pool_y = r.first;
                    s.pool_arg = r.second;
                });
                cur = &s.pool_y;
            }
            if (L.pool_extra) {
                sched_->run(t, L.name + ".pool_extra", [&s, cur, pool_w] {
                    auto r = ops::maxpool_forward(*cur, pool_w, pool_w, 2, 2, 0, 0);
                    s.pool2_y = r.first;
                    s.pool2_arg = r.second;
                });
                cur = &s.pool2_y;
            }
            if (L.dropout && train) {
                const float p_drop = cfg_.dropout;
                const auto key = dropout_key(step, L.index, t);
                const uint64_t base = static_cast<uint64_t>(dp.sample_base);
                const uint64_t* seed_dev = graph_seed_dev_;  // set while a CUDA graph captures the step
                sched_->run(t, L.name + ".dropout", [&s, cur, p_drop, key, base, seed_dev] {
                    // Element i of sample j is counter j * features + i, so with sample_base the global sample's.
                    const uint64_t off = key.second + base * static_cast<uint64_t>(cur->numel() / cur->size(0));
                    auto r = ops::dropout_forward(*cur, p_drop, key.first, off, seed_dev);
                    s.out = r.first;
                    s.drop_mask = r.second;
                });
            } else {
                sched_->run(t, L.name + ".output", [&s, cur] { s.out = *cur; });
            }
        }
    }
    // The logits: each tower's slice of fc8, brought to tower 0 (the loss reads the slices in place; forward()
    // concatenates them).
    const int last = static_cast<int>(layers_.size()) - 1;
    logits_recv_.assign(T, Tensor());
    for (int u = 0; u < T; ++u) sched_->transfer(u, 0, &st_[u][last].out, &logits_recv_[u], "fc8->loss");
}

void Net::issue_loss(const Tensor& labels, float scale, bool backward) {
    sched_->run(0, "softmax_xent.fprop", [this, labels] {
        auto r = ops::softmax_cross_entropy_forward_parts(logits_recv_, labels, /*check_labels=*/false);
        loss_ = r.loss;
        probs_ = r.probs;
        rank_ = r.rank;
    });
    if (!backward) return;
    const int T = cfg_.towers;
    const int last = static_cast<int>(layers_.size()) - 1;
    dlogits_part_.assign(T, Tensor());
    dlogits_recv_.assign(T, Tensor());
    // dlogits comes out as each tower's slice of the classes (the fc8 split), written where the slices are sent from.
    sched_->run(0, "softmax_xent.bprop", [this, labels, scale, T] {
        const auto d = ops::softmax_cross_entropy_backward_parts(probs_, labels, scale, T, /*check_labels=*/false);
        for (int u = 0; u < T; ++u) dlogits_part_[u] = d[u];  // element-wise: the copies below hold their addresses
    });
    for (int u = 0; u < T; ++u) {
        sched_->transfer(0, u, &dlogits_part_[u], &dlogits_recv_[u], "fc8->loss");
        LayerState* s = &st_[u][last];
        sched_->run(u, "fc8.d_out", [this, s, u] { s->d_out = dlogits_recv_[u]; });
    }
}

bool Net::relu_in_dgrad(int l) const {
    if (l < 0 || l + 1 >= static_cast<int>(layers_.size())) return false;
    const LayerSpec& L = layers_[l];
    const LayerSpec& up = layers_[l + 1];
    // The layer above's grad-input is this layer's whole d_out (no gather, no dropout, pool or LRN between).
    return L.conv && L.relu && !L.lrn && !L.pool && !L.pool_extra && !L.dropout && up.conv && !up.cross;
}

// The update: one sgd_update_multi per device over every parameter of its towers (one launch on CUDA), after all
// of those towers' gradients (and their reads of the weights) are issued; the same bits as one update per
// tensor. Issued on the device's first tower, which the others order themselves before.
void Net::issue_sgd(float lr) {
    const float momentum = cfg_.momentum, wd = cfg_.weight_decay, bias_wd = cfg_.bias_weight_decay;
    const int T = cfg_.towers;
    std::vector<std::vector<int>> groups;
    for (int t = 0; t < T; ++t) {
        auto g = std::find_if(groups.begin(), groups.end(),
                              [&](const std::vector<int>& v) { return devices_[v[0]] == devices_[t]; });
        if (g == groups.end()) groups.push_back({t});
        else g->push_back(t);
    }
    for (const std::vector<int>& towers : groups) {
        for (size_t i = 1; i < towers.size(); ++i) sched_->order(towers[i], towers[0]);
        const float* lr_dev = graph_lr_dev_;  // set while a CUDA graph captures the step
        sched_->run(towers[0], "sgd", [this, towers, lr, momentum, wd, bias_wd, lr_dev] {
            std::vector<ops::SgdParam> ps;
            for (int t : towers)
                for (size_t l = 0; l < layers_.size(); ++l) {
                    Params& p = params_[t][l];
                    LayerState& s = st_[t][l];
                    ps.push_back({&p.w, &s.dw, &p.vw, wd});
                    ps.push_back({&p.b, &s.db, &p.vb, bias_wd});
                }
            ops::sgd_update_multi(ps, lr, momentum, lr_dev);
        });
    }
}

float Net::loss_scale(int n) const {
    return 1.0f / static_cast<float>(dp.mean_over > 0 ? dp.mean_over : n);
}

void Net::issue_backward(float lr) {
    const int T = cfg_.towers;
    const int pool_w = cfg_.overlap_pool ? 3 : 2;
    for (int l = static_cast<int>(layers_.size()) - 1; l >= 0; --l) {
        const LayerSpec& L = layers_[l];
        const float p_drop = cfg_.dropout;
        const NetConfig* c = &cfg_;
        // d_out -> dz, undoing the layer's epilogue in reverse: dropout, pool, LRN, ReLU.
        auto epilogue = [&](int t) {
            LayerState& s = st_[t][l];
            // The ReLU's backward runs inside the op next to it in the forward (LRN, else the pool, else dropout), or
            // in the grad-input epilogue of the layer above (relu_in_dgrad); only where neither exists on its own.
            const bool relu_above = relu_in_dgrad(l);
            sched_->run(t, L.name + ".bprop_epilogue", [&s, &L, p_drop, pool_w, c, relu_above] {
                Tensor g = s.d_out;
                const bool drop = s.drop_mask.defined();
                enum { kAlone, kDrop, kPool2, kPool, kLrn } at = kAlone;
                if (L.lrn) at = kLrn;
                else if (L.pool) at = kPool;
                else if (L.pool_extra) at = kPool2;
                else if (drop) at = kDrop;
                const bool relu_here = L.relu && !relu_above;
                auto ry = [&](int where) {
                    return relu_here && at == where ? std::optional<Tensor>(s.a) : std::nullopt;
                };
                if (drop) g = ops::dropout_backward(g, s.drop_mask, p_drop, /*check_mask=*/false, ry(kDrop));
                if (L.pool_extra)
                    g = ops::maxpool_backward(g, s.pool2_arg, L.pool_mid_hw, L.pool_mid_hw, pool_w, pool_w, 2, 2, 0, 0,
                                              /*check_argmax=*/false, ry(kPool2));
                if (L.pool)
                    g = ops::maxpool_backward(g, s.pool_arg, L.out_hw, L.out_hw, pool_w, pool_w, 2, 2, 0, 0,
                                              /*check_argmax=*/false, ry(kPool));
                if (L.lrn)
                    g = ops::lrn_backward(g, s.a, s.lrn_y, s.lrn_scale, c->lrn_size, c->lrn_k, c->lrn_alpha,
                                          c->lrn_beta, relu_here);
                if (relu_here && at == kAlone) g = ops::relu_backward(g, s.a);
                s.d_out = g;  // now the gradient w.r.t. the pre-activation z
            });
        };
        auto grads = [&](int t) {
            LayerState& s = st_[t][l];
            Params& p = params_[t][l];
            if (L.conv) {
                sched_->run(t, L.name + ".wgrad", [&s, &L] {
                    s.dw = ops::conv2d_backward_weight(s.in, s.d_out, L.kernel, L.kernel, L.stride, L.stride, L.pad, L.pad, 1);
                    s.db = ops::conv2d_backward_bias(s.d_out);
                });
                if (l > 0) {
                    // The layer below's ReLU backward in this grad-input's epilogue, where nothing lies between.
                    const Tensor* relu_y = relu_in_dgrad(l - 1) ? &st_[t][l - 1].a : nullptr;
                    sched_->run(t, L.name + ".dgrad", [&s, &p, &L, relu_y] {
                        s.d_in = ops::conv2d_backward_input(s.d_out, p.w, L.in_hw, L.in_hw, L.stride, L.stride, L.pad,
                                                            L.pad, 1,
                                                            relu_y ? std::optional<Tensor>(*relu_y) : std::nullopt);
                    });
                }
            } else {
                sched_->run(t, L.name + ".wgrad", [&s] {
                    s.dw = ops::linear_backward_weight(s.in, s.d_out);
                    s.db = ops::linear_backward_bias(s.d_out);
                });
                if (l > 0) sched_->run(t, L.name + ".dgrad", [&s, &p] { s.d_in = ops::linear_backward_input(s.d_out, p.w); });
            }
        };
        // The layer's gradients are final: hand them to a data-parallel hook (the update follows the whole pass).
        auto finish = [&](int t) {
            LayerState& s = st_[t][l];
            if (dp.grad_ready) {
                // On the device's upload stream after an event on this tower's (the CPU: the tower's worker), so
                // an all-reduce the hook issues overlaps the rest of this tower's backward pass.
                sched_->upload_wait(t, sched_->record(t));
                const int dev = devices_[t].is_cpu() ? -1 : devices_[t].index;
                sched_->upload(t, L.name + ".grad_ready", [this, &s, l, t, dev] {
                    dp.grad_ready(l, t, s.dw, s.db, dev < 0 ? 0 : reinterpret_cast<uintptr_t>(current_stream(dev)));
                });
            }
        };
        if (!L.conv && pair_towers()) {
            // Both towers' gradients in one launch per pass (one for both biases), in tower 0's slot.
            for (int t = 0; t < T; ++t) epilogue(t);
            LayerState &s0 = st_[0][l], &s1 = st_[1][l];
            sched_->run(0, L.name + ".wgrad", [&s0, &s1] {
                const auto r = ops::linear_backward_weight_bias_pair({s0.in, s1.in}, {s0.d_out, s1.d_out});
                s0.dw = r.dw[0];
                s1.dw = r.dw[1];
                s0.db = r.db[0];
                s1.db = r.db[1];
            });
            if (l > 0)
                sched_->run(0, L.name + ".dgrad", [this, &s0, &s1, l] {
                    const auto r = ops::linear_backward_input_pair({s0.d_out, s1.d_out}, {params_[0][l].w, params_[1][l].w});
                    s0.d_in = r[0];
                    s1.d_in = r[1];
                });
            for (int t = 0; t < T; ++t) finish(t);
        } else if (L.conv && pair_towers()) {
            // Both towers' gradients in one launch per pass, in tower 0's slot, after both epilogues.
            for (int t = 0; t < T; ++t) epilogue(t);
            LayerState &s0 = st_[0][l], &s1 = st_[1][l];
            sched_->run(0, L.name + ".wgrad", [&s0, &s1, &L] {
                // The bias gradients' slice sums ride in the weight gradients' split-K reduce (the same bits).
                const auto r = ops::conv2d_backward_weight_bias_pair({s0.in, s1.in}, {s0.d_out, s1.d_out}, L.kernel,
                                                                     L.kernel, L.stride, L.stride, L.pad, L.pad, 1);
                s0.dw = r.dw[0];
                s1.dw = r.dw[1];
                s0.db = r.db[0];
                s1.db = r.db[1];
            });
            if (l > 0) {
                // The layer below's ReLU backward in the grad-input's epilogue, as in grads().
                const bool relu_below = relu_in_dgrad(l - 1);
                sched_->run(0, L.name + ".dgrad", [this, &s0, &s1, l, &L, relu_below] {
                    std::array<std::optional<Tensor>, 2> relu_y;
                    if (relu_below) relu_y = {st_[0][l - 1].a, st_[1][l - 1].a};
                    const auto r = ops::conv2d_backward_input_pair({s0.d_out, s1.d_out}, {params_[0][l].w, params_[1][l].w},
                                                                   L.in_hw, L.in_hw, L.stride, L.stride, L.pad, L.pad, 1,
                                                                   relu_y);
                    s0.d_in = r[0];
                    s1.d_in = r[1];
                });
            }
            for (int t = 0; t < T; ++t) finish(t);
        } else {
            for (int t = 0; t < T; ++t) {
                epilogue(t);
                grads(t);
                finish(t);
            }
        }
        if (l == 0) break;
        // d_in -> the previous layer's d_out: own tower, or a slice back to every source tower, summed there
        // in tower order (the same order whatever the placement, so results match bit for bit).
        if (!L.cross) {
            for (int t = 0; t < T; ++t) {
                LayerState& s = st_[t][l];
                LayerState& prev = st_[t][l - 1];
                sched_->run(t, L.name + ".d_in", [&s, &prev] { prev.d_out = s.d_in.view(prev.out.shape()); });
            }
            continue;
        }
        const int per = L.in_c / T;
        if (pair_towers()) {
            // One device and stream: every tower's slices summed in one op (one launch), in tower 0's slot; the
            // edge counts the bytes the slices' copies carry on other placements.
            const std::string edge = edge_name(l);
            sched_->run(0, L.name + ".d_in.sum", [this, l, T, edge] {
                std::vector<Tensor> d_in;
                for (int t = 0; t < T; ++t) d_in.push_back(st_[t][l].d_in);
                const auto r = ops::split_sum_channels(d_in, T);
                for (int u = 0; u < T; ++u) st_[u][l - 1].d_out = r[u].view(st_[u][l - 1].out.shape());
                sched_->count_edge(edge, static_cast<int64_t>(T) * (T - 1) * r[0].nbytes());
            });
            continue;
        }
        for (int u = 0; u < T; ++u) st_[u][l - 1].d_out_recv.assign(T, Tensor());
        for (int t = 0; t < T; ++t) {
            LayerState& s = st_[t][l];
            s.d_in_part.assign(T, Tensor());
            for (int u = 0; u < T; ++u) {
                sched_->run(t, L.name + ".d_in.split", [&s, u, per] {
                    s.d_in_part[u] = ops::slice_channels(s.d_in, u * per, (u + 1) * per);
                });
                sched_->transfer(t, u, &s.d_in_part[u], &st_[u][l - 1].d_out_recv[t], edge_name(l));
            }
        }
        for (int u = 0; u < T; ++u) {
            LayerState& prev = st_[u][l - 1];
            sched_->run(u, L.name + ".d_in.sum", [&prev] {
                Tensor acc = prev.d_out_recv[0];
                for (size_t t = 1; t < prev.d_out_recv.size(); ++t) acc = ops::add(acc, prev.d_out_recv[t]);
                prev.d_out = acc.view(prev.out.shape());
            });
        }
    }
    if (!dp.defer_sgd) issue_sgd(lr);
}

void Net::check_labels(const char* op, const int32_t* labels, int n) const {
    for (int i = 0; i < n; ++i)
        if (labels[i] < 0 || labels[i] >= cfg_.num_classes)
            throw ValueError(std::string(op) + ": argument 'labels' holds " + std::to_string(labels[i]) + " at " +
                             std::to_string(i) + ", outside [0, " + std::to_string(cfg_.num_classes) + ")");
}

Tensor Net::upload_labels(const char* op, const int32_t* labels, int n) const {
    check_labels(op, labels, n);
    Tensor host = Tensor::empty({n}, DType::i32, Device{});
    std::memcpy(host.raw(), labels, sizeof(int32_t) * n);
    return devices_[0].is_cpu() ? host : host.to(devices_[0]);
}

void Net::run_step(const std::function<void()>& issue) {
    sched_->begin_step(trace);
    try {
        issue();
    } catch (...) {
        // Drain what was already issued before reporting, so no stream or worker still uses the buffers.
        try { sched_->finish_step(); } catch (...) {}
        throw;
    }
    sched_->finish_step();
    cpu_trim_cache();  // what this step and the last did not use goes back to the system
}


StepResult Net::summarize(int n) const {
    Tensor loss = loss_.to(Device{}), rank = rank_.to(Device{});
    return summarize_host(loss.data<float>(), rank.data<int32_t>(), n);
}

StepResult Net::train_step(const float* images, const int32_t* labels, int n, float lr) {
    if (n < 1) throw ValueError("train_step: argument 'images' holds no images");
    if (!(lr >= 0 && std::isfinite(lr))) throw ValueError("train_step: argument 'lr' must be finite and >= 0");
    if (graph_enabled()) {
        const std::string key = "float32 n=" + std::to_string(n) + graph_key_suffix();
        if (graph_wanted(key)) {
            check_labels("train_step", labels, n);
            const int C = cfg_.in_channels, S = cfg_.input_size;
            auto make = [&](CudaGraphStep& g) {
                g.images = Tensor::empty({n, C, S, S}, DType::f32, g.dev);
                g.labels = Tensor::empty({n}, DType::i32, g.dev);
            };
            auto inputs = [&](CudaGraphStep& g) {
                input_.assign(cfg_.towers, g.images);
                return g.labels;
            };
            if (graph_ || graph_capture(key, n, make, inputs)) {
                // Into the graph's input buffers, synchronously: the previous step (the graph's last use) is done.
                Tensor hi = Tensor::empty({n, C, S, S}, DType::f32, Device{}), hl = Tensor::empty({n}, DType::i32, Device{});
                std::memcpy(hi.raw(), images, hi.nbytes());
                std::memcpy(hl.raw(), labels, hl.nbytes());
                graph_->images.copy_from(hi);
                graph_->labels.copy_from(hl);
                run_step([&] { graph_launch(lr); });
                return graph_finish(n);
            }
        }
    }
    Tensor dev_labels = upload_labels("train_step", labels, n);
    input_ = upload_images(images, n);
    run_step([&] {
        issue_forward(/*train=*/true);
        issue_loss(dev_labels, loss_scale(n), /*backward=*/true);
        issue_backward(lr);
    });
    if (dp.defer_sgd) grads_pending_ = true;
    else step += 1;
    graph_eager_step_done();
    return summarize(n);
}

Tensor Net::forward(const float* images, int n, bool probs) {
    if (n < 1) throw ValueError("forward: argument 'images' holds no images");
    input_ = upload_images(images, n);
    run_step([&] {
        issue_forward(/*train=*/false);
        sched_->run(0, "logits.gather", [this] {
            logits_ = logits_recv_.size() == 1 ? logits_recv_[0] : ops::concat_channels(logits_recv_);
        });
        if (probs) sched_->run(0, "softmax.fprop", [this] { probs_ = ops::softmax_forward(logits_); });
    });
    return (probs ? probs_ : logits_).to(Device{});
}

Tensor Net::features(const float* images, int n, const std::string& layer) {
    int l = -1;
    std::string names;
    for (size_t i = 0; i < layers_.size(); ++i) {
        if (layers_[i].name == layer) l = static_cast<int>(i);
        names += (i ? ", " : "") + layers_[i].name;
    }
    if (l < 0) throw ValueError("features: argument 'layer': no layer '" + layer + "' in this net (" + names + ")");
    if (n < 1) throw ValueError("features: argument 'images' holds no images");
    input_ = upload_images(images, n);
    run_step([&] { issue_forward(/*train=*/false); });
    std::vector<Tensor> parts;
    for (int t = 0; t < cfg_.towers; ++t) parts.push_back(st_[t][l].out.to(Device{}));
    return parts.size() == 1 ? parts[0] : ops::concat_channels(parts);
}

StepResult Net::evaluate(const float* images, const int32_t* labels, int n) {
    if (n < 1) throw ValueError("evaluate: argument 'images' holds no images");
    Tensor dev_labels = upload_labels("evaluate", labels, n);
    input_ = upload_images(images, n);
    run_step([&] {
        issue_forward(/*train=*/false);
        issue_loss(dev_labels, 1.0f, /*backward=*/false);
    });
    return summarize(n);
}

void Net::apply_sgd(float lr) {
    if (!(lr >= 0 && std::isfinite(lr))) throw ValueError("apply_sgd: argument 'lr' must be finite and >= 0");
    if (!grads_pending_)
        throw ValueError("apply_sgd: no gradients to apply: take a step with defer_sgd set first (each once)");
    grads_pending_ = false;
    run_step([&] { issue_sgd(lr); });
    step += 1;
}

std::vector<std::pair<std::string, Tensor>> Net::grads() const {
    if (!grads_pending_) throw ValueError("grads: no gradients: take a step with defer_sgd set first");
    std::vector<std::pair<std::string, Tensor>> out;
    for (size_t l = 0; l < layers_.size(); ++l)
        for (int t = 0; t < cfg_.towers; ++t) {
            const std::string base = layers_[l].name + ".t" + std::to_string(t);
            out.push_back({base + ".weight", st_[t][l].dw});
            out.push_back({base + ".bias", st_[t][l].db});
        }
    return out;
}

std::vector<std::pair<std::string, Tensor>> Net::state() const {
    std::vector<std::pair<std::string, Tensor>> out, mom;
    for (size_t l = 0; l < layers_.size(); ++l)
        for (int t = 0; t < cfg_.towers; ++t) {
            const std::string base = layers_[l].name + ".t" + std::to_string(t);
            const Params& p = params_[t][l];
            out.push_back({base + ".weight", p.w});
            out.push_back({base + ".bias", p.b});
            mom.push_back({"momentum/" + base + ".weight", p.vw});
            mom.push_back({"momentum/" + base + ".bias", p.vb});
        }
    out.insert(out.end(), mom.begin(), mom.end());
    return out;
}

void Net::load_state(const std::map<std::string, Tensor>& host) {
    auto mine = state();
    std::set<std::string> known;
    for (auto& kv : mine) {
        known.insert(kv.first);
        auto it = host.find(kv.first);
        if (it == host.end()) throw ValueError("load_state_dict: missing '" + kv.first + "'");
        if (it->second.shape() != kv.second.shape())
            throw ValueError("load_state_dict: '" + kv.first + "' has shape " + it->second.shape_str() + ", the net has " +
                             kv.second.shape_str());
    }
    for (auto& kv : host)
        if (!known.count(kv.first)) throw ValueError("load_state_dict: unexpected entry '" + kv.first + "'");
    for (auto& kv : mine) {
        Tensor dst = kv.second;
        DeviceGuard g(dst.device());
        dst.copy_from(host.at(kv.first));
    }
    for (const Device& d : devices_) cuda_synchronize(d);
}

// ---- CUDA graph path -----------------------------------------------------------------------------------
// A training step's device work captured once and replayed: the eager issue code runs unchanged under stream
// capture (tower 0's stream is the origin; the other tower's stream joins through the scheduler's own event
// wait and is joined back at the end), so the graph holds the same kernels with the same arguments in the same
// order as an eager step. Three things differ, none of them in the arithmetic: the dropout seed and the learning
// rate are read by their kernels from a device block the graph's first node fills from pinned memory; the
// inputs come from the graph's own device buffers, filled before each launch; the loss and ranks are copied
// into pinned memory by the graph's last nodes.


bool Net::cuda_graph_supported(std::string* why) const {
    auto no = [&](const std::string& w) {
        if (why) *why = w;
        return false;
    };
    if (!devices_[0].is_cuda()) return no("the towers are on the CPU");
    for (const Device& d : devices_)
        if (d != devices_[0])
            return no("the towers are on two devices (" + devices_[0].str() + ", " + d.str() +
                      "): cross-device copies may be staged through the host, which a capture cannot hold");
    if (!cuda_caching_enabled()) return no("the CUDA caching allocator is off (ALEXNET_NO_CUDA_MEMORY_CACHING)");
    return true;
}

void Net::set_cuda_graph(const std::string& mode) {
    if (mode != "auto" && mode != "on" && mode != "off")
        throw ValueError("set_cuda_graph: argument 'mode' must be 'auto', 'on' or 'off', got '" + mode + "'");
    std::string why;
    if (mode == "on" && !cuda_graph_supported(&why))
        throw ValueError("set_cuda_graph: argument 'mode' is 'on' but this placement cannot be captured: " + why);
    graph_mode_ = mode;
    if (mode == "off") graph_drop();
}

bool Net::graph_enabled() const {
    return graph_mode_ != "off" && cuda_graph_supported() && !trace && !dp.defer_sgd && !dp.grad_ready;
}

std::string Net::graph_key_suffix() const {
    // Baked into the captured launches: the loss gradient's 1/mean_over and the dropout counters' sample_base.
    return " mean_over=" + std::to_string(dp.mean_over) + " sample_base=" + std::to_string(dp.sample_base);
}

bool Net::graph_wanted(const std::string& key) {
    if (key != graph_key_) {
        graph_drop();
        graph_key_ = key;
        graph_warm_ = 0;
        graph_key_failures_ = 0;
    }
    if (graph_) return true;
    return graph_warm_ >= kGraphWarmup && graph_key_failures_ < kGraphMaxFailures;
}

void Net::graph_eager_step_done() {
    graph_stats_.last_step_graph = false;
    if (graph_enabled()) ++graph_warm_;
}

void Net::graph_drop() { graph_.reset(); }

bool Net::graph_capture(const std::string& key, int n, const std::function<void(CudaGraphStep&)>& make_inputs,
                        const std::function<Tensor(CudaGraphStep&)>& issue_inputs) {
#ifdef ALEXNET_WITH_CUDA
    std::unique_ptr<CudaGraphStep, CudaGraphStepDeleter> g(new CudaGraphStep);
    g->key = key;
    g->n = n;
    g->dev = devices_[0];
    DeviceGuard dg(g->dev);
    // Everything the graph keeps is allocated before the capture (no cudaMalloc or cudaHostAlloc during one).
    g->pool = std::make_unique<GraphMemoryPool>(g->dev);
    make_inputs(*g);
    g->params = Tensor::empty({static_cast<int64_t>(kGraphParamBytes)}, DType::u8, g->dev);
    const size_t pinned_bytes = kGraphParamBytes + 2 * align_up(4 * size_t(n));
    if (cudaHostAlloc(&g->pinned, pinned_bytes, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        g->pinned = nullptr;
        throw OutOfMemory("train_step: cannot pin " + std::to_string(pinned_bytes) + " bytes of host memory");
    }
    std::memset(g->pinned, 0, pinned_bytes);
    // The buffers were made on this thread's current stream (and poisoned there in the tests): done before the
    // graph's streams use them.
    cuda_synchronize(g->dev);
    auto origin = static_cast<cudaStream_t>(sched_->stream(0));
    const int T = cfg_.towers;
    bool capturing = false;
    sched_->begin_step(false);
    try {
        cuda_check(cudaStreamBeginCapture(origin, cudaStreamCaptureModeGlobal), "train_step (CUDA graph capture)");
        capturing = true;
        g->pool->begin_capture();
        graph_seed_dev_ = reinterpret_cast<const uint64_t*>(g->params.raw());
        graph_lr_dev_ = reinterpret_cast<const float*>(static_cast<const char*>(g->params.raw()) + 8);
        CudaGraphStep* gp = g.get();
        sched_->run(0, "graph.params", [gp] {
            cuda_check(cudaMemcpyAsync(gp->params.raw(), gp->pinned, kGraphParamBytes, cudaMemcpyHostToDevice,
                                       static_cast<cudaStream_t>(current_stream(gp->dev.index))),
                       "train_step (CUDA graph)");
        });
        for (int t = 1; t < T; ++t) sched_->order(0, t);  // the other towers' streams join the capture
        const Tensor labels = issue_inputs(*g);
        issue_forward(/*train=*/true);
        issue_loss(labels, loss_scale(n), /*backward=*/true);
        issue_backward(0.f);  // a placeholder: the captured update reads each step's rate from the block
        sched_->run(0, "graph.readback", [this, gp] {
            auto st = static_cast<cudaStream_t>(current_stream(gp->dev.index));
            cuda_check(cudaMemcpyAsync(gp->loss(), loss_.raw(), loss_.nbytes(), cudaMemcpyDeviceToHost, st),
                       "train_step (CUDA graph)");
            cuda_check(cudaMemcpyAsync(gp->rank(), rank_.raw(), rank_.nbytes(), cudaMemcpyDeviceToHost, st),
                       "train_step (CUDA graph)");
        });
        for (int t = 1; t < T; ++t) sched_->order(t, 0);  // and are joined back
        g->pool->end_capture();
        graph_seed_dev_ = nullptr;
        graph_lr_dev_ = nullptr;
        capturing = false;
        cuda_check(cudaStreamEndCapture(origin, &g->graph), "train_step (CUDA graph capture)");
        cuda_check(cudaGraphInstantiate(&g->exec, g->graph, 0), "train_step (CUDA graph instantiate)");
        g->edges = sched_->edge_bytes();
        sched_->finish_step();  // nothing ran: the streams only leave the step
    } catch (const std::exception& e) {
        g->pool->end_capture();
        graph_seed_dev_ = nullptr;
        graph_lr_dev_ = nullptr;
        if (capturing) {
            try {
                for (int t = 1; t < T; ++t) sched_->order(t, 0);
            } catch (...) {
            }
            cudaGraph_t dead = nullptr;
            cudaStreamEndCapture(origin, &dead);
            if (dead) cudaGraphDestroy(dead);
        }
        cudaGetLastError();
        try {
            sched_->finish_step();
        } catch (...) {
        }
        ++graph_stats_.failures;
        ++graph_key_failures_;
        graph_stats_.last_failure = e.what();
        return false;  // this step runs eagerly; g (its pool, its buffers) goes
    }
    ++graph_stats_.captures;
    graph_ = std::move(g);
    return true;
#else
    (void)key, (void)n, (void)make_inputs, (void)issue_inputs;
    return false;
#endif
}

void Net::graph_launch(float lr) {
    CudaGraphStep* g = graph_.get();
    // The step's dropout seed (the same for every layer and tower: they differ in the counter) and rate, read by
    // the graph's first node; the previous launch is done with the block (every step ends drained).
    const uint64_t seed = dropout_key(step, 0, 0).first;
    std::memcpy(g->pinned, &seed, sizeof seed);
    std::memcpy(static_cast<char*>(g->pinned) + 8, &lr, sizeof lr);
#ifdef ALEXNET_WITH_CUDA
    sched_->run(0, "graph.launch", [g] {
        cuda_check(cudaGraphLaunch(g->exec, static_cast<cudaStream_t>(current_stream(g->dev.index))), "train_step");
    });
#endif
}

StepResult Net::graph_finish(int n) {
    sched_->set_edge_bytes(graph_->edges);
    step += 1;
    ++graph_stats_.replays;
    graph_stats_.last_step_graph = true;
    return summarize_host(graph_->loss(), graph_->rank(), n);
}

}  // namespace ax
