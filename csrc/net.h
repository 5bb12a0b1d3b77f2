// The 2012 two-tower AlexNet: its layer table (placement as data), parameters, and one whole training
// step (forward, backward, SGD) issued through the Scheduler.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ops.h"
#include "scheduler.h"
#include "tensor.h"

namespace ax {

struct NetConfig {
    int input_size = 224, in_channels = 3, num_classes = 1000, towers = 2;
    int conv1_kernel = 11, conv1_stride = 4, conv1_padding = 2;
    std::vector<int> channels{96, 256, 384, 384, 256};
    std::vector<int> fc{4096, 4096};
    bool lrn = true;
    int lrn_size = 5;
    float lrn_k = 2.f, lrn_alpha = 1e-4f, lrn_beta = 0.75f;
    bool overlap_pool = true;
    float dropout = 0.5f;
    std::vector<std::string> drop_layers;
    float momentum = 0.9f, weight_decay = 0.0005f, init_std = 0.01f;
    // Weight decay of the biases: none, as in Krizhevsky's cuda-convnet (the paper's rule names the weights).
    float bias_weight_decay = 0.f;
};

// One row of the layer table. `cross` marks a layer whose input is gathered from every tower (a
// cross-tower edge); every other layer reads only its own tower's previous output.
struct LayerSpec {
    std::string name;
    bool conv = true;
    bool cross = false;
    int in_c = 0;      // channels (conv) or features (fc) the layer reads in each tower, after gathering
    int out_c = 0;     // channels / features each tower produces
    int kernel = 1, stride = 1, pad = 0;
    int in_hw = 1, out_hw = 1, pooled_hw = 1;  // conv: input, conv output, after pooling
    bool relu = true, lrn = false, pool = false, dropout = false;
    // A second max-pool after `pool`: the pooling of a removed conv layer (the conv2 ablation), kept so that
    // removing a layer removes only its convolution. Runs out_hw -> pool_mid_hw -> pooled_hw.
    bool pool_extra = false;
    int pool_mid_hw = 0;
    float bias_init = 0.f;
    int index = 0;  // position in the table (dropout RNG key)
};

struct StepResult {
    double loss = 0;   // mean over the batch
    int64_t top1 = 0, top5 = 0, n = 0;
};

class Net {
public:
    // `devices`: one per tower; `shared`: one executor runs every tower in turn.
    Net(const NetConfig& cfg, const std::vector<Device>& devices, bool shared, uint64_t seed);

    StepResult train_step(const float* images, const int32_t* labels, int n, float lr);
    // The uint8 input path: source images uint8 (n, H, W, 3) as the prepared shards hold them, with each
    // image's crop offsets int32 (n, 2) = (y0, x0), flips uint8 (n), lighting float32 (n, 3) and labels.
    // They are copied into a ring of reused host buffers (pinned on CUDA), uploaded on each device's upload
    // stream and augmented on the device by ops::augment_batch (an input_size crop minus the mean image of
    // set_input_mean); towers on one device share the result. The same step as train_step on the batch
    // ops::augment_batch makes on the CPU, bit for bit.
    struct U8Batch {
        const uint8_t* images = nullptr;
        int n = 0, H = 0, W = 0;
        const int32_t* offsets = nullptr;
        const uint8_t* flips = nullptr;
        const float* light = nullptr;
        const int32_t* labels = nullptr;
    };
    // Steps on `batch`, or with batch == nullptr on the one the previous call prefetched. `prefetch`, the
    // next batch, is staged and its upload issued while this step runs, so the next call (batch == nullptr)
    // finds it on the device. Both are checked before anything runs.
    // Implemented on the zero-copy path below: each batch is copied into a staging slot first.
    StepResult train_step_u8(const U8Batch* batch, float lr, const U8Batch* prefetch = nullptr);
    bool has_prefetched() const { return prefetched_ != nullptr; }

    // One staging buffer of the uint8 path's ring: pinned memory on CUDA (one cudaHostAlloc block), host
    // tensors on the CPU, and the device buffers its uploads fill.
    struct HostSlot {
        enum class Use { free, handed, prefetched, stepping };
        int n = 0, H = 0, W = 0;
        Use use = Use::free;
        uint64_t generation = 0;         // which hand-out the slot's contents belong to
        bool upload_in_flight = false;   // uploads issued since the last drained step (see `uploaded`)
        void* pinned = nullptr;          // CUDA: one cudaHostAlloc block holding the parts
        Tensor images, offsets, flips, light, labels;  // CPU: the parts as host tensors
        uint8_t* img = nullptr;
        int32_t* off = nullptr;
        int32_t* lab = nullptr;
        uint8_t* flip = nullptr;
        float* lig = nullptr;
        struct DeviceInput {
            Tensor images, offsets, flips, light, labels;
        };
        std::map<std::string, DeviceInput> dev;                  // by device name
        std::map<std::string, std::shared_ptr<Event>> uploaded;  // by device name: its last upload
        ~HostSlot();
    };
    // The zero-copy input path. staging_slot hands out a slot of the ring for a batch of n uint8 (H, W, 3)
    // images: the caller writes the batch straight into its parts (images (n, H, W, 3), offsets (n, 2),
    // flips (n), light (n, 3), labels (n): the slot's own memory, pinned on CUDA) and passes it to
    // train_step_staged, which uploads it from there without another host copy. A slot is never handed out
    // while a step reads it, while it waits as the prefetched batch, or while an upload from it may still
    // run (its events are waited for first); `slot` keeps the memory alive for views that outlive the ring.
    struct StagingSlot {
        std::shared_ptr<HostSlot> slot;
        uint64_t generation = 0;
        int n = 0, H = 0, W = 0;
        uint8_t* images = nullptr;
        int32_t* offsets = nullptr;
        uint8_t* flips = nullptr;
        float* light = nullptr;
        int32_t* labels = nullptr;
    };
    StagingSlot staging_slot(int n, int H, int W);
    // train_step_u8 on a filled slot (nullptr: the batch the previous step prefetched). `prefetch`, when
    // set, is called once the whole step is issued, while the devices compute it: it may fill a slot (the
    // host staging of the next batch, overlapped with this step) and return it, or return nothing; the
    // slot's upload is then issued on the upload streams within this step, and the next call (slot ==
    // nullptr) steps on it. An exception from `prefetch`, or a refused prefetch slot, is raised after the
    // step has completed and been counted. Slots are checked (this ring's, handed out for this use, the
    // shape the net takes now, every value in range) before they are used: ValueError otherwise.
    using PrefetchFn = std::function<std::optional<StagingSlot>()>;
    StepResult train_step_staged(const StagingSlot* slot, float lr, const PrefetchFn& prefetch = {});
    // The host-side entries of the last staged step's timeline (the prefetch callback: "input.stage"), with
    // times from the step's start like the scheduler's; filled when `trace` is on.
    const std::vector<TimelineEntry>& host_timeline() const { return host_timeline_; }
    // The mean image float32 (3, H, W) the uint8 path subtracts; copied to every tower device.
    void set_input_mean(const float* mean, int H, int W);
    bool has_input_mean() const { return mean_host_.defined(); }
    // Inference (no dropout). Returns logits or probabilities (n, num_classes) on the host.
    Tensor forward(const float* images, int n, bool probs);
    StepResult evaluate(const float* images, const int32_t* labels, int n);
    // Inference (no dropout); the output of layer `layer` (after its ReLU, LRN and pooling) with every tower's
    // part concatenated along channels/features in tower order: (n, C, H, W) or (n, F), on the host.
    Tensor features(const float* images, int n, const std::string& layer);

    std::vector<std::pair<std::string, Tensor>> state() const;  // parameters then momentum, on their devices
    void load_state(const std::map<std::string, Tensor>& host_tensors);  // names and shapes checked

    // The (seed, offset) of the dropout mask of `layer` in `tower` at `step`: mask element i keeps its
    // unit iff philox_u32(seed, offset + i) >= dropout_threshold(p), as ops::dropout_forward draws it.
    std::pair<uint64_t, uint64_t> dropout_key(int64_t step, int layer, int tower) const;

    // Data-parallel training across processes (alexnet_cuda.distributed). With defer_sgd, train_step and
    // train_step_u8 run the forward and backward passes only: the step count stays, and every parameter's
    // gradient is left in grads() for the caller to all-reduce; apply_sgd(lr) then updates every parameter
    // from those gradients and counts the step. mean_over (0: the batch's own n) is the count the loss
    // gradient is averaged over: the global batch, so that the sum over ranks is its mean. sample_base, the
    // global index of this process's first sample, shifts the dropout counters so each sample draws the
    // mask it would draw in one process taking the whole global batch. grad_ready(layer, tower, dw, db, stream)
    // is called when that layer's gradients on that tower are computed (CPU: on the tower's worker; CUDA: when
    // issued, on the device's upload stream, which waits for them; the step ends when that stream is done). The defaults leave the single-process step unchanged.
    struct DataParallel {
        bool defer_sgd = false;
        int64_t mean_over = 0;
        int64_t sample_base = 0;
        // (layer, tower, dw, db, stream): on CUDA the device's upload stream, where work issued then runs after
        // the gradients are made without holding up the tower's own stream; 0 on the CPU.
        std::function<void(int, int, const Tensor&, const Tensor&, uintptr_t)> grad_ready;
    };
    DataParallel dp;
    void apply_sgd(float lr);
    // The gradients of the last deferred step, named as state(): (name, gradient on the parameter's device).
    std::vector<std::pair<std::string, Tensor>> grads() const;

    const NetConfig& config() const { return cfg_; }
    const std::vector<LayerSpec>& layers() const { return layers_; }
    const Scheduler& scheduler() const { return *sched_; }
    std::vector<Device> devices() const { return devices_; }
    // Two towers on one CUDA device and one executor: each conv and fc pass runs as one launch for both towers
    // (ops::conv2d_*_pair, ops::linear_*_pair), so that their blocks fill the GPU together; the cross-tower
    // plumbing reads the other tower's tensors in place (one gather per layer, one split_sum_channels per d_in).
    bool pair_towers() const {
        return cfg_.towers == 2 && sched_->shared() && devices_[0] == devices_[1] && devices_[0].is_cuda();
    }
    // CUDA graphs. With the mode "on" (or "auto" where the placement allows it: every tower on one CUDA device,
    // one shared stream or a stream per tower, with the caching allocator on), train_step and train_step_u8 run
    // a step's device work as one CUDA graph: after two eager warm-up steps with the same shapes the next step
    // is captured (and launched), and later steps of those shapes replay it. The learning rate and the dropout
    // seed of the step reach the graph through a pinned block copied in by the graph's first node; the inputs
    // are copied into the graph's own device buffers before the launch; the loss and ranks come back through
    // pinned memory; memory the graph uses is its private pool (GraphMemoryPool). Bit for bit the eager step.
    // Steps stay eager while traced, with defer_sgd or grad_ready set, and for a capture that failed; a change
    // of batch shape, input path or mean image drops the graph (and warms up again). "on" for a placement that
    // cannot be captured (CPU, towers on two devices) raises ValueError; "off" is the default.
    void set_cuda_graph(const std::string& mode);
    std::string cuda_graph() const { return graph_mode_; }
    bool cuda_graph_supported(std::string* why = nullptr) const;
    struct GraphStats {
        int64_t captures = 0, replays = 0, failures = 0;  // replays: steps run by a graph (the captured one too)
        bool last_step_graph = false;                       // the last training step ran as a graph
        std::string last_failure;                           // why the last capture failed
    };
    const GraphStats& graph_stats() const { return graph_stats_; }
    int64_t step = 0;
    uint64_t seed() const { return seed_; }
    void set_seed(uint64_t s) { seed_ = s; }  // keys the dropout masks from now on (init is done)
    bool trace = false;

private:
    struct Params {
        Tensor w, b, vw, vb;
    };
    // Everything one tower keeps for one layer during a step (held until the step ends, so no buffer is
    // reused while another stream may still read it).
    struct LayerState {
        std::vector<Tensor> recv;  // the inputs gathered from each tower (cross layers), on this device
        Tensor in, a, lrn_y, lrn_scale, pool_y, pool_arg, pool2_y, pool2_arg, drop_mask, out;
        Tensor flat_in;                  // fc input as (N, features)
        std::vector<Tensor> d_in_part;   // slices of d_in for each source tower, moved to that tower
        std::vector<Tensor> d_out_recv;  // d_out contributions received from each consuming tower
        Tensor d_out, d_in, dw, db;
    };
    void build_layers();
    void init_params();
    // Issues the forward of the whole net on the images input_[tower] holds when conv1 starts; with
    // `train`, dropout is on and state is kept for backward.
    void issue_forward(bool train);
    void check_u8(const char* op, const std::string& arg, const U8Batch& b) const;
    // The slot a StagingSlot names, checked for `op` (argument `arg`): this ring's, as handed out, unused.
    HostSlot& claim_slot(const char* op, const std::string& arg, const StagingSlot& s);
    void copy_into(const StagingSlot& s, const U8Batch& b) const;
    // Every slot's uploads are complete (after a drained step).
    void mark_drained();
    // CUDA: the loss and ranks copied into pinned memory on tower 0's stream (read by summarize_staged).
    void issue_metrics_readback(int n);
    StepResult summarize_staged(int n) const;
    void issue_upload_u8(HostSlot& slot);
    // Issues the augmentation (after the upload's event); returns the labels on tower 0's device.
    Tensor issue_augment_u8(HostSlot& slot);
    void check_labels(const char* op, const int32_t* labels, int n) const;
    void issue_loss(const Tensor& labels, float scale, bool backward);
    void issue_backward(float lr);
    // True when layer l's ReLU backward runs in the epilogue of layer l+1's grad-input (nothing between them).
    bool relu_in_dgrad(int l) const;
    void issue_sgd(float lr);         // every parameter's update from st_'s gradients: one op per device
    float loss_scale(int n) const;    // the loss gradient's 1/n (1/mean_over with dp)
    bool grads_pending_ = false;      // a deferred step's gradients await apply_sgd
    std::vector<Tensor> upload_images(const float* images, int n);
    Tensor upload_labels(const char* op, const int32_t* labels, int n) const;  // range-checked on the host
    // Begins a step, issues it, waits for every tower; on an error drains the towers, then rethrows.
    void run_step(const std::function<void()>& issue);
    StepResult summarize(int n) const;  // mean loss and top-1/top-5 hits of the last loss computation
    std::string edge_name(int layer) const;

    // ---- CUDA graphs (net.cpp, "CUDA graph path") ----
    struct CudaGraphStep;
    struct CudaGraphStepDeleter {
        void operator()(CudaGraphStep* g) const;
    };
    std::string graph_mode_ = "off";
    std::unique_ptr<CudaGraphStep, CudaGraphStepDeleter> graph_;
    std::string graph_key_;     // the shapes and inputs of the last training step
    int graph_warm_ = 0;        // eager steps in a row with graph_key_
    int graph_key_failures_ = 0;  // failed captures with graph_key_
    GraphStats graph_stats_;
    const uint64_t* graph_seed_dev_ = nullptr;  // while capturing: the step's dropout seed in device memory
    const float* graph_lr_dev_ = nullptr;       // while capturing: the step's learning rate in device memory
    // Whether this step should run as a graph: the graph for `key` exists, or it is time to capture it.
    bool graph_wanted(const std::string& key);
    // Captures the step (issue_inputs sets input_ and returns the labels on tower 0's device from the graph's
    // input buffers), instantiates it; false (the capture abandoned, nothing run) if that failed.
    // make_inputs allocates the graph's input buffers (before the capture); issue_inputs, captured, sets input_ from
    // them and returns the labels on tower 0's device.
    bool graph_capture(const std::string& key, int n, const std::function<void(CudaGraphStep&)>& make_inputs,
                       const std::function<Tensor(CudaGraphStep&)>& issue_inputs);
    void graph_launch(float lr);  // on tower 0's stream, after writing the step's lr and seed to the pinned block
    StepResult graph_finish(int n);  // counts the step; the result from the pinned read-back
    bool graph_enabled() const;      // mode, placement and this step's settings allow a graph
    std::string graph_key_suffix() const;
    void graph_eager_step_done();
    void graph_drop();

    NetConfig cfg_;
    std::vector<Device> devices_;
    uint64_t seed_;
    std::vector<LayerSpec> layers_;
    std::vector<std::vector<Params>> params_;     // [tower][layer]
    std::vector<std::vector<LayerState>> st_;     // [tower][layer]
    std::vector<Tensor> logits_recv_;             // fc8 slices gathered on tower 0 (read in place by the loss)
    Tensor logits_, loss_, probs_, rank_;
    std::vector<Tensor> dlogits_part_, dlogits_recv_;
    std::vector<Tensor> input_;                   // conv1's input per tower in the step being issued
    std::vector<std::shared_ptr<HostSlot>> slots_;  // the uint8 path's staging ring
    size_t next_slot_ = 0;
    uint64_t handed_ = 0;                          // hand-outs so far (each slot's generation)
    HostSlot* prefetched_ = nullptr;               // staged and uploading for the next call
    struct PinnedMetrics {                         // CUDA: loss (n float32) then ranks (n int32)
        void* p = nullptr;
        int n = 0;
        ~PinnedMetrics();
    } metrics_;
    std::vector<TimelineEntry> host_timeline_;
    std::map<std::string, Tensor> mean_dev_;       // the mean image by device name
    Tensor mean_host_;
    std::unique_ptr<Scheduler> sched_;  // last: destroyed first, so no stream outlives what it reads
};

}  // namespace ax
