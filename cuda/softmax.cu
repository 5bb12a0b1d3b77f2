// CUDA backend of softmax and softmax + cross-entropy on (N, C) logits. One 256-thread block per row:
// threads stride over classes (coalesced), then deterministic block reductions (max, sum of exp, rank
// count); the backward is elementwise over rows (blockIdx.y) x classes (x threads).
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

constexpr int kSoftmaxThreads = 256;

// probs = exp(x - max) / sum exp(x - max). With kXent also loss = log(sum) - (x[label] - max) and
// rank = #{j : x[j] > x[label]} + #{j < label : x[j] == x[label]}.
template <bool kXent>
__global__ void __launch_bounds__(kSoftmaxThreads)
    softmax_rows_kernel(int C, const float* __restrict__ logits, const int32_t* __restrict__ labels,
                        float* __restrict__ loss, float* __restrict__ probs, int32_t* __restrict__ rank) {
    __shared__ float redf[kSoftmaxThreads / 32 + 1];
    __shared__ int redi[kSoftmaxThreads / 32 + 1];
    const int64_t row = blockIdx.x;
    const float* x = logits + row * C;
    float* pr = probs + row * C;

    float m = -INFINITY;
    for (int j = threadIdx.x; j < C; j += kSoftmaxThreads) m = fmaxf(m, x[j]);
    m = block_max<kSoftmaxThreads>(m, redf);

    float s = 0.0f;
    for (int j = threadIdx.x; j < C; j += kSoftmaxThreads) {
        const float e = expf(x[j] - m);
        pr[j] = e;  // each thread rescales exactly the entries it wrote: no barrier needed
        s += e;
    }
    s = block_sum<kSoftmaxThreads>(s, redf);
    for (int j = threadIdx.x; j < C; j += kSoftmaxThreads) pr[j] = pr[j] / s;

    if (kXent) {
        const int label = labels[row];
        const float xl = x[label];
        int cnt = 0;
        for (int j = threadIdx.x; j < C; j += kSoftmaxThreads) {
            const float v = x[j];
            cnt += (v > xl || (v == xl && j < label)) ? 1 : 0;
        }
        cnt = block_sum_int<kSoftmaxThreads>(cnt, redi);
        if (threadIdx.x == 0) {
            loss[row] = logf(s) - (xl - m);
            rank[row] = cnt;
        }
    }
}

// dlogits[n, j] = (probs[n, j] - (j == label[n])) * scale.
__global__ void __launch_bounds__(kThreads1d)
    softmax_xent_backward_kernel(int N, int C, const float* __restrict__ probs, const int32_t* __restrict__ labels,
                                 float scale, float* __restrict__ d) {
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const int label = labels[n];
        const int64_t base = static_cast<int64_t>(n) * C;
        for (int64_t j = global_thread_id(); j < C; j += global_thread_count()) {
            const float onehot = j == label ? 1.0f : 0.0f;
            d[base + j] = __fmul_rn(__fsub_rn(probs[base + j], onehot), scale);
        }
    }
}

}  // namespace

void softmax_cross_entropy_forward(const SoftmaxParams& p, const float* logits, const int32_t* labels, float* loss,
                                   float* probs, int32_t* rank, void* stream) {
    if (p.N <= 0 || p.C <= 0) return;
    softmax_rows_kernel<true><<<p.N, kSoftmaxThreads, 0, as_stream(stream)>>>(p.C, logits, labels, loss, probs, rank);
    AX_LAUNCH_CHECK("softmax_cross_entropy_forward");
}

void softmax_cross_entropy_backward(const SoftmaxParams& p, const float* probs, const int32_t* labels, float scale,
                                    float* dlogits, void* stream) {
    if (p.N <= 0 || p.C <= 0) return;
    softmax_xent_backward_kernel<<<plane_grid(p.N, p.C), kThreads1d, 0, as_stream(stream)>>>(p.N, p.C, probs, labels,
                                                                                           scale, dlogits);
    AX_LAUNCH_CHECK("softmax_cross_entropy_backward");
}

void softmax_forward(const SoftmaxParams& p, const float* logits, float* probs, void* stream) {
    if (p.N <= 0 || p.C <= 0) return;
    softmax_rows_kernel<false><<<p.N, kSoftmaxThreads, 0, as_stream(stream)>>>(p.C, logits, nullptr, nullptr, probs,
                                                                              nullptr);
    AX_LAUNCH_CHECK("softmax_forward");
}

}  // namespace cuda
}  // namespace ax
