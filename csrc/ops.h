// The one list of ops: each op's contract (layouts, shapes, what is accumulated), its Tensor-level entry
// point (validates, then dispatches by device), and the two backends' raw entry points.
//
// Layouts: activations NCHW, conv weights KCRS (K out-channels, C/groups in-channels, R x S window),
// linear weights (out, in) so y = x W^T + b. All float32 unless stated; every tensor contiguous.
// Nothing accumulates into its output: every output is written in full (the tests poison outputs with
// NaN first). Reductions run in a fixed order, so results are deterministic on each backend.
//
// Sizes (checked.h, the one place size arithmetic is done): every tensor an op reads or writes holds fewer
// than 2^31 elements (zero-size dimensions counted as 1), every padded extent H + 2*pad is below 2^31, and
// all of it is computed in overflow-checked 64-bit arithmetic, because the CUDA kernels index with int32.
// A size beyond that raises ValueError naming the op and the argument, before anything is allocated.
// Empty batches (N = 0) are allowed: empty outputs launch nothing, weight and bias gradients come out zero;
// a zero-size spatial or channel dimension is rejected where it would leave nothing to compute from
// (conv x's C, H, W and w's dims; linear w's dims; pooling's H, W, since an empty plane has no maximum).
// Failure to allocate an output raises MemoryError naming the op.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "tensor.h"

namespace ax {

// ---- parameter structs (one per kernel family; plain data, passed to both backends) ----------------

struct Conv2dParams {
    int N, C, H, W;          // input
    int K, R, S;             // output channels, window
    int P, Q;                // output height, width
    int stride_h, stride_w, pad_h, pad_w;
    int groups;              // C and K are both divisible by groups; weight is (K, C/groups, R, S)
    bool relu = false;       // forward only: y = max(conv + b, 0), the ReLU fused into the GEMM's epilogue
};

struct LinearParams {
    int N, I, O;        // batch, in features, out features
    bool relu = false;  // forward only: y = max(x W^T + b, 0), the ReLU fused into the GEMM's epilogue
};

struct LrnParams {
    int N, C, H, W;
    int size;        // n, odd: the window is c-size/2 .. c+size/2 clipped to [0, C)
    float k, alpha, beta;  // b = a / (k + alpha * sum a^2)^beta  (alpha multiplies the plain sum)
    bool relu = false;     // backward only: dx also through the ReLU that made x (zero where x <= 0)
};

struct PoolParams {
    int N, C, H, W;
    int P, Q;
    int window_h, window_w, stride_h, stride_w, pad_h, pad_w;
};

struct SoftmaxParams {
    int N, C;
};

// One parameter tensor of a multi-tensor SGD update (sgd_update_multi): n elements at w, dw, v, each updated as
// sgd_update(n, w, dw, v, lr, momentum, weight_decay) would.
struct SgdSegment {
    float* w;
    const float* dw;
    float* v;
    int64_t n;
    float weight_decay;
};

struct AugmentParams {
    int N, H, W;     // source images (N, H, W, 3) uint8, HWC as decoded
    int crop;        // output (N, 3, crop, crop) float32
};

// The most parts (or towers) one launch of the CUDA plumbing kernels takes (concat_channels, split_sum_channels,
// the softmax over logit parts); the op layer falls back to one launch per part beyond it.
constexpr int kPlumbingMaxParts = 8;

// Counter-based RNG shared by both backends (philox.h): dropout keeps element i when
// philox_u32(seed, offset + i) >= keep_threshold(p).
uint32_t dropout_threshold(float p);

// ---- Tensor-level ops (validate arguments, allocate outputs, dispatch) ---------------------------

namespace ops {

// y (N,K,P,Q) = conv(x (N,C,H,W), w (K,C/groups,R,S)) + b (K), P = (H + 2 pad_h - R) / stride_h + 1.
// relu: y = relu_forward(conv + b) in the same kernel, the same bits as the two ops one after the other.
Tensor conv2d_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, int stride_h, int stride_w,
                      int pad_h, int pad_w, int groups, bool relu = false);
// dx (N,C,H,W) from dy (N,K,P,Q); H, W are the forward input's size (stride can make them ambiguous).
// relu_y (N,C,H,W), when given, is the output of the ReLU that made x: dx is also passed back through it in the
// same kernel (zero where relu_y <= 0), the same bits as relu_backward(dx, relu_y) after the op. The same
// argument of lrn_backward (a flag: its x is that output), maxpool_backward and dropout_backward does the same.
Tensor conv2d_backward_input(const Tensor& dy, const Tensor& w, int H, int W, int stride_h, int stride_w, int pad_h,
                             int pad_w, int groups, const std::optional<Tensor>& relu_y = std::nullopt);
// dw (K,C/groups,R,S) = sum over N,P,Q.
Tensor conv2d_backward_weight(const Tensor& x, const Tensor& dy, int R, int S, int stride_h, int stride_w, int pad_h,
                              int pad_w, int groups);
// db (K) = sum of dy over N,P,Q.
Tensor conv2d_backward_bias(const Tensor& dy);
// The three passes for both towers at once (index i: tower i): each tower's arguments are checked as the single
// form checks them, and both towers must have the same shapes and device. On CUDA one launch covers both
// (blockIdx.z picks the tower) so that their blocks fill the GPU together; the outputs equal two single calls
// bit for bit (each element's k-sum keeps its order; the weight gradient keeps one tower's split-K). The CPU
// backend runs the single form twice. relu (both towers) and relu_y (per tower) as in the single forms.
using TensorPair = std::array<Tensor, 2>;
TensorPair conv2d_forward_pair(const TensorPair& x, const TensorPair& w, const std::array<std::optional<Tensor>, 2>& b,
                               int stride_h, int stride_w, int pad_h, int pad_w, int groups, bool relu = false);
TensorPair conv2d_backward_input_pair(const TensorPair& dy, const TensorPair& w, int H, int W, int stride_h,
                                      int stride_w, int pad_h, int pad_w, int groups,
                                      const std::array<std::optional<Tensor>, 2>& relu_y = {});
TensorPair conv2d_backward_weight_pair(const TensorPair& x, const TensorPair& dy, int R, int S, int stride_h,
                                       int stride_w, int pad_h, int pad_w, int groups);
// conv2d_backward_weight_pair and each tower's conv2d_backward_bias(dy[i]), the same bits as those calls. On CUDA
// the bias gradient's first pass is one launch for both towers, and its slice sums run in the weight gradient's
// split-K reduce launch (three launches for the four gradients).
struct WeightBiasPair {
    TensorPair dw, db;
};
WeightBiasPair conv2d_backward_weight_bias_pair(const TensorPair& x, const TensorPair& dy, int R, int S, int stride_h,
                                                int stride_w, int pad_h, int pad_w, int groups);

// y (N,O) = x (N,I) W^T (O,I) + b (O); relu as for conv2d_forward.
Tensor linear_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool relu = false);
Tensor linear_backward_input(const Tensor& dy, const Tensor& w);   // (N,I) = dy W
Tensor linear_backward_weight(const Tensor& x, const Tensor& dy);  // (O,I) = dy^T x
Tensor linear_backward_bias(const Tensor& dy);                     // (O) = sum over N
// Both towers at once, as the conv pairs: each tower checked as the single form, one shape and device; on CUDA one
// launch per pass (and one split-K reduce) for both, the same bits as two single calls. The weight and bias
// gradients come together (the bias one launch for both towers). The CPU backend runs the single forms.
TensorPair linear_forward_pair(const TensorPair& x, const TensorPair& w, const std::array<std::optional<Tensor>, 2>& b,
                               bool relu = false);
TensorPair linear_backward_input_pair(const TensorPair& dy, const TensorPair& w);
WeightBiasPair linear_backward_weight_bias_pair(const TensorPair& x, const TensorPair& dy);

Tensor relu_forward(const Tensor& x);
Tensor relu_backward(const Tensor& dy, const Tensor& y);  // dy where y > 0, else 0

// Returns (y, scale) with scale = k + alpha * sum a^2 over the window, kept for the backward.
std::pair<Tensor, Tensor> lrn_forward(const Tensor& x, int size, float k, float alpha, float beta);
Tensor lrn_backward(const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& scale, int size, float k,
                    float alpha, float beta, bool relu = false);

// Returns (y, argmax) with argmax int32 (N,C,P,Q): the flat index h*W+w of the chosen input element.
// Padding counts as -inf. Tie rule: the first maximum in row-major window order wins. A window that
// covers only padding is impossible (pad < window is enforced).
std::pair<Tensor, Tensor> maxpool_forward(const Tensor& x, int window_h, int window_w, int stride_h, int stride_w,
                                          int pad_h, int pad_w);
// dx (N,C,H,W): each input element gathers dy from the windows whose argmax it is (no atomics).
// Every argmax must lie in its own output's window (as maxpool_forward makes them), else ValueError: the CPU
// backend checks as it scatters; for CUDA tensors the argmax is copied to the host and checked first unless
// check_argmax = false (the Net's own argmax; Python: check_argmax=False), since the CUDA gather would
// silently drop the gradient of an argmax outside its window.
Tensor maxpool_backward(const Tensor& dy, const Tensor& argmax, int H, int W, int window_h, int window_w,
                        int stride_h, int stride_w, int pad_h, int pad_w, bool check_argmax = true,
                        const std::optional<Tensor>& relu_y = std::nullopt);

// LRN followed by max-pooling of its output, in one kernel on CUDA where a plane fits the block's shared
// memory (conv1's and conv2's in AlexNet): lrn_forward's (y, scale), which LRN's backward needs, and
// maxpool_forward(y)'s (pool_y, argmax), the same bits as the two ops one after the other.
struct LrnPool {
    Tensor y, scale, pool_y, argmax;
};
LrnPool lrn_maxpool_forward(const Tensor& x, int size, float k, float alpha, float beta, int window_h, int window_w,
                            int stride_h, int stride_w, int pad_h, int pad_w);

// Inverted dropout: returns (y, mask uint8); y = x * mask / (1 - p). Element i's draw is
// philox(seed, offset + i), so any backend, any launch shape, draws the same mask.
// `seed_device` (CUDA only; nullptr: use `seed`): a device address holding the seed, read when the kernel runs,
// so that a captured CUDA graph draws each replay's mask from the seed stored there for that step.
std::pair<Tensor, Tensor> dropout_forward(const Tensor& x, float p, uint64_t seed, uint64_t offset,
                                          const uint64_t* seed_device = nullptr);
// Contract (validated, not guessed): the mask holds only 0 and 1, as dropout_forward makes it; any other
// byte raises ValueError naming 'mask'. The check reads the mask on the host (a device mask is copied and
// the stream synchronized), so callers passing a mask straight from dropout_forward may skip it with
// check_mask = false (the Net does; Python: check_mask=False); unchecked, both backends keep where the byte is nonzero.
Tensor dropout_backward(const Tensor& dy, const Tensor& mask, float p, bool check_mask = true,
                        const std::optional<Tensor>& relu_y = std::nullopt);

// Softmax + cross-entropy on logits (N,C) and int32 labels (N). Returns (loss (N) per sample,
// probs (N,C), rank int32 (N)): rank = number of classes whose logit beats the label's (ties go to the
// lower class index), so top-k is a hit iff rank < k.
struct SoftmaxXent {
    Tensor loss, probs, rank;
};
// `check_labels` copies the labels to the host to range-check them; the Net checks them before upload.
SoftmaxXent softmax_cross_entropy_forward(const Tensor& logits, const Tensor& labels, bool check_labels = true);
// dlogits = (probs - onehot(labels)) * scale (scale = 1/N for a mean loss).
Tensor softmax_cross_entropy_backward(const Tensor& probs, const Tensor& labels, float scale, bool check_labels = true);
Tensor softmax_forward(const Tensor& logits);
// The loss with the logits given as parts along the classes (the towers' fc8 outputs, read where they lie, never
// concatenated) and dlogits returned cut into `parts` equal slices along the classes (one per tower): the same
// bits as the two ops above on concat_channels(logit_parts), and as slice_channels of their dlogits.
SoftmaxXent softmax_cross_entropy_forward_parts(const std::vector<Tensor>& logit_parts, const Tensor& labels,
                                                bool check_labels = true);
std::vector<Tensor> softmax_cross_entropy_backward_parts(const Tensor& probs, const Tensor& labels, float scale,
                                                         int parts, bool check_labels = true);

// In place, exactly as ALEXNET.md: v = momentum*v - weight_decay*lr*w - lr*dw; w = w + v.
void sgd_update(Tensor& w, const Tensor& dw, Tensor& v, float lr, float momentum, float weight_decay);

// sgd_update of every (w, dw, v, weight_decay) in `params` with one lr and momentum, in one launch on CUDA (the
// Net's whole update of a device); the same bits as one sgd_update per tensor. All tensors on one device;
// each entry is checked as sgd_update checks its arguments (errors name 'params[i].w' etc.).
struct SgdParam {
    Tensor* w;
    const Tensor* dw;
    Tensor* v;
    float weight_decay;
};
// `lr_device` (CUDA only; nullptr: use `lr`): a device address holding the learning rate, read when the kernel
// runs (a captured CUDA graph's update takes each replay's rate from there); `lr` is still range-checked.
void sgd_update_multi(const std::vector<SgdParam>& params, float lr, float momentum, const float* lr_device = nullptr);

// Cross-tower plumbing. Channel concat/slice of NCHW (or (N,C) 2-D) tensors; elementwise add. concat_channels is
// one launch on CUDA for up to kPlumbingMaxParts parts.
Tensor concat_channels(const std::vector<Tensor>& xs);
Tensor slice_channels(const Tensor& x, int c0, int c1);
Tensor add(const Tensor& a, const Tensor& b);
// The backward of a cross-tower gather: xs (every tower's gradient of the gathered input, all one shape (N, C, ...)),
// each cut into `parts` equal channel slices; returns ys[u] = xs[0] slice u + xs[1] slice u + ..., added left to
// right: the same bits as slice_channels and add one after the other. One launch on CUDA (up to
// kPlumbingMaxParts inputs and parts).
std::vector<Tensor> split_sum_channels(const std::vector<Tensor>& xs, int parts);

// Offsets are checked (in 64 bits, so y0 + crop cannot wrap) to keep every crop inside its image.
// Random crop, mirror, PCA lighting and mean subtraction of a uint8 batch (N,H,W,3) into float32
// (N,3,crop,crop): out[n,c,y,x] = img[n, y0+y, xs, c] - mean[c, y0+y, xs] + light[n,c] with
// xs = x0 + (flip ? crop-1-x : x); offsets int32 (N,2) = (y0, x0), flips uint8 (N), light float32 (N,3),
// mean float32 (3,H,W). `host_offsets`, when given, is a host copy of `offsets` that the range check reads, so
// device offsets need no device-to-host copy (which would synchronize the stream).
Tensor augment_batch(const Tensor& images, const Tensor& offsets, const Tensor& flips, const Tensor& light,
                     const Tensor& mean, int crop, const int32_t* host_offsets = nullptr);

}  // namespace ops

// ---- backends: raw pointers, shapes in the params structs, outputs written in full -------------------

#define AX_BACKEND_DECLS(EXTRA)                                                                               \
    void conv2d_forward(const Conv2dParams& p, const float* x, const float* w, const float* b /*nullable*/,  \
                        float* y EXTRA);                                                                      \
    void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w,                       \
                               const float* relu_y /*nullable*/, float* dx EXTRA);                            \
    void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw EXTRA);    \
    void conv2d_backward_bias(const Conv2dParams& p, const float* dy, float* db EXTRA);                     \
    void linear_forward(const LinearParams& p, const float* x, const float* w, const float* b, float* y EXTRA); \
    void linear_backward_input(const LinearParams& p, const float* dy, const float* w, float* dx EXTRA);     \
    void linear_backward_weight(const LinearParams& p, const float* x, const float* dy, float* dw EXTRA);    \
    void linear_backward_bias(const LinearParams& p, const float* dy, float* db EXTRA);                     \
    void relu_forward(int64_t n, const float* x, float* y EXTRA);                                            \
    void relu_backward(int64_t n, const float* dy, const float* y, float* dx EXTRA);                         \
    void lrn_forward(const LrnParams& p, const float* x, float* y, float* scale EXTRA);                     \
    void lrn_backward(const LrnParams& p, const float* dy, const float* x, const float* y, const float* scale, \
                      float* dx EXTRA);                                                                       \
    void maxpool_forward(const PoolParams& p, const float* x, float* y, int32_t* argmax EXTRA);             \
    void lrn_maxpool_forward(const LrnParams& lp, const PoolParams& pp, const float* x, float* y, float* scale, \
                             float* pool_y, int32_t* argmax EXTRA);                                          \
    void maxpool_backward(const PoolParams& p, const float* dy, const int32_t* argmax,                      \
                          const float* relu_y /*nullable*/, float* dx EXTRA);                                 \
    void dropout_forward(int64_t n, const float* x, float p, uint64_t seed, uint64_t offset, float* y,       \
                         uint8_t* mask EXTRA);                                                                \
    void dropout_backward(int64_t n, const float* dy, const uint8_t* mask, float p,                         \
                          const float* relu_y /*nullable*/, float* dx EXTRA);                                 \
    void softmax_cross_entropy_forward(const SoftmaxParams& p, const float* logits, const int32_t* labels,   \
                                       float* loss, float* probs, int32_t* rank EXTRA);                     \
    void softmax_cross_entropy_backward(const SoftmaxParams& p, const float* probs, const int32_t* labels,   \
                                        float scale, float* dlogits EXTRA);                                 \
    void softmax_forward(const SoftmaxParams& p, const float* logits, float* probs EXTRA);                  \
    void sgd_update(int64_t n, float* w, const float* dw, float* v, float lr, float momentum,               \
                    float weight_decay EXTRA);                                                               \
    void sgd_update_multi(int count, const SgdSegment* segs, float lr, float momentum EXTRA);               \
    /* whole (N, Cw, inner)[:, c0:c0+Cp] = part (N, Cp, inner), and the reverse */                          \
    void insert_channels(int N, int Cp, int Cw, int c0, int64_t inner, const float* part, float* whole EXTRA); \
    void extract_channels(int N, int Cp, int Cw, int c0, int64_t inner, const float* whole, float* part EXTRA); \
    void add(int64_t n, const float* a, const float* b, float* y EXTRA);                                     \
    void augment_batch(const AugmentParams& p, const uint8_t* images, const int32_t* offsets,               \
                       const uint8_t* flips, const float* light, const float* mean, float* out EXTRA);

namespace cpu {
AX_BACKEND_DECLS()
}  // namespace cpu

#ifdef ALEXNET_WITH_CUDA
namespace cuda {
// Every launcher takes the stream last (a cudaStream_t) and checks the launch, naming the op.
#define AX_STREAM_ARG , void* stream
AX_BACKEND_DECLS(AX_STREAM_ARG)
#undef AX_STREAM_ARG
// Both towers' pass in one launch (the ops::*_pair contract): index i of each array is tower i; p is both's.
void conv2d_forward_pair(const Conv2dParams& p, const float* const x[2], const float* const w[2],
                         const float* const b[2] /*entries nullable*/, float* const y[2], void* stream);
void conv2d_backward_input_pair(const Conv2dParams& p, const float* const dy[2], const float* const w[2],
                                const float* const relu_y[2] /*entries nullable*/, float* const dx[2], void* stream);
void conv2d_backward_weight_pair(const Conv2dParams& p, const float* const x[2], const float* const dy[2],
                                 float* const dw[2], void* stream);
// The same launches with one argument read from device memory when the kernel runs instead of passed by
// value, so a CUDA graph that captured the launch once replays it with each step's value (Net's graph path).
void sgd_update_multi_device_lr(int count, const SgdSegment* segs, const float* lr_dev, float momentum, void* stream);
void dropout_forward_device_seed(int64_t n, const float* x, float p, const uint64_t* seed_dev, uint64_t offset, float* y,
                                 uint8_t* mask, void* stream);
void conv2d_backward_weight_bias_pair(const Conv2dParams& p, const float* const x[2], const float* const dy[2],
                                      float* const dw[2], float* const db[2], void* stream);
void linear_forward_pair(const LinearParams& p, const float* const x[2], const float* const w[2],
                         const float* const b[2] /*entries nullable*/, float* const y[2], void* stream);
void linear_backward_input_pair(const LinearParams& p, const float* const dy[2], const float* const w[2],
                                float* const dx[2], void* stream);
void linear_backward_weight_bias_pair(const LinearParams& p, const float* const x[2], const float* const dy[2],
                                      float* const dw[2], float* const db[2], void* stream);
// The plumbing in one launch (count, parts <= kPlumbingMaxParts): whole (N, sum Cp, inner) = the parts side by
// side; ys[u] (N, C/parts, inner) = sum over t of xs[t] (N, C, inner)[:, u*C/parts ...] in t order.
void concat_channels(int N, int count, const float* const* parts, const int* Cp, int64_t inner, float* whole,
                     void* stream);
void split_sum_channels(int N, int count, const float* const* xs, int C, int parts, int64_t inner, float* const* ys,
                        void* stream);
// Softmax + cross-entropy over logits given as `parts` pieces of Cp[u] classes each (p.C their sum), and its
// backward writing dlogits as `parts` equal slices: the same bits as the whole-tensor forms.
void softmax_cross_entropy_forward_parts(const SoftmaxParams& p, int parts, const float* const* logits, const int* Cp,
                                         const int32_t* labels, float* loss, float* probs, int32_t* rank,
                                         void* stream);
void softmax_cross_entropy_backward_parts(const SoftmaxParams& p, int parts, const float* probs,
                                          const int32_t* labels, float scale, float* const* dlogits, void* stream);
}  // namespace cuda
#endif

}  // namespace ax
