// CUDA backend of softmax and softmax + cross-entropy on (N, C) logits, whole or as the towers' parts along the
// classes. One block per row, as wide as the row needs (softmax_threads: up to 1024 threads, one class each at
// AlexNet's 1000, so 128 rows keep about 95% of the GPU's thread slots busy where 256-thread blocks kept 24%):
// threads stride over classes (coalesced), then deterministic block reductions (max, sum of exp, rank count); the
// backward is elementwise over rows (blockIdx.y) x classes (x threads) x output slices (blockIdx.z), so each
// tower's slice of dlogits is written where it is used.
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// Threads of a row's block: the smallest of 256, 512, 1024 that gives every class a thread (1024 beyond). A
// function of C alone, so the whole and the parts kernels of one C reduce in the same order (the same bits).
inline int softmax_threads(int C) { return C <= 256 ? 256 : (C <= 512 ? 512 : 1024); }

// The logits of a row: whole (count 1) or the towers' parts side by side along the classes, read in place.
struct LogitParts {
    const float* p[kPlumbingMaxParts];
    int C[kPlumbingMaxParts];
    int count, unused;  // no padding bytes (tests/cuda_emu reads the struct's words as possible pointers)
};

// Visits this thread's classes j = threadIdx.x, + kThreads, ... < C in order with their logit: the same classes per
// thread whatever the parts, so the reductions below add in the same order (the same bits). The part holding j is
// tracked by subtraction, without a division per element.
struct LogitCursor {
    int u, jj, Cu;      // part, index in it, its classes
    const float* x;     // the row in part u
    __device__ void seek(const LogitParts& lp, int64_t row) {
        while (u < lp.count - 1 && jj >= Cu) {
            jj -= Cu;
            ++u;
            Cu = pick(lp.C, u);
            x = pick(lp.p, u) + row * Cu;
        }
    }
    __device__ LogitCursor(const LogitParts& lp, int64_t row, int j) : u(0), jj(j), Cu(lp.C[0]), x(lp.p[0] + row * Cu) {
        seek(lp, row);
    }
};

template <int kThreads, class F>
__device__ __forceinline__ void for_each_logit(const LogitParts& lp, int64_t row, int C, F&& f) {
    LogitCursor c(lp, row, threadIdx.x);
    for (int j = threadIdx.x; j < C; j += kThreads) {
        f(j, c.x[c.jj]);
        c.jj += kThreads;
        c.seek(lp, row);
    }
}

// probs = exp(x - max) / sum exp(x - max). With kXent also loss = log(sum) - (x[label] - max) and
// rank = #{j : x[j] > x[label]} + #{j < label : x[j] == x[label]}.
template <int kThreads, bool kXent>
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(int C, LogitParts lp, const int32_t* __restrict__ labels, float* __restrict__ loss,
                        float* __restrict__ probs, int32_t* __restrict__ rank) {
    __shared__ float redf[kThreads / 32 + 1];
    __shared__ int redi[kThreads / 32 + 1];
    const int64_t row = blockIdx.x;
    float* pr = probs + row * C;

    float m = -INFINITY;
    for_each_logit<kThreads>(lp, row, C, [&](int, float v) { m = fmaxf(m, v); });
    m = block_max<kThreads>(m, redf);

    float s = 0.0f;
    for_each_logit<kThreads>(lp, row, C, [&](int j, float v) {
        const float e = expf(v - m);
        pr[j] = e;  // each thread rescales exactly the entries it wrote: no barrier needed
        s += e;
    });
    s = block_sum<kThreads>(s, redf);
    for (int j = threadIdx.x; j < C; j += kThreads) pr[j] = pr[j] / s;

    if (kXent) {
        const int label = labels[row];
        const LogitCursor cl(lp, row, label);
        const float xl = cl.x[cl.jj];
        int cnt = 0;
        for_each_logit<kThreads>(lp, row, C,
                                 [&](int j, float v) { cnt += (v > xl || (v == xl && j < label)) ? 1 : 0; });
        cnt = block_sum_int<kThreads>(cnt, redi);
        if (threadIdx.x == 0) {
            loss[row] = logf(s) - (xl - m);
            rank[row] = cnt;
        }
    }
}

// dlogits[n, j] = (probs[n, j] - (j == label[n])) * scale, written to slice u = blockIdx.z (columns u*per ...).
struct SliceOut {
    float* d[kPlumbingMaxParts];
};
__global__ void __launch_bounds__(kThreads1d)
    softmax_xent_backward_kernel(int N, int C, int per, const float* __restrict__ probs,
                                 const int32_t* __restrict__ labels, float scale, SliceOut out) {
    const int u = blockIdx.z;
    float* __restrict__ d = pick(out.d, u);
    for (int n = blockIdx.y; n < N; n += gridDim.y) {
        const int label = labels[n] - u * per;
        const float* __restrict__ pr = probs + static_cast<int64_t>(n) * C + static_cast<int64_t>(u) * per;
        const int64_t base = static_cast<int64_t>(n) * per;
        for (int64_t j = global_thread_id(); j < per; j += global_thread_count()) {
            const float onehot = j == label ? 1.0f : 0.0f;
            d[base + j] = __fmul_rn(__fsub_rn(pr[j], onehot), scale);
        }
    }
}

LogitParts whole_logits(const float* logits, int C) {
    LogitParts lp{};
    lp.p[0] = logits;
    lp.C[0] = C;
    lp.count = 1;
    return lp;
}

// Forward rows: one block per row (p.N >= 1), of softmax_threads(p.C) threads.
template <bool kXent>
void launch_rows(const char* opname, const SoftmaxParams& p, const LogitParts& lp, const int32_t* labels,
                 float* loss, float* probs, int32_t* rank, void* stream) {
    const cudaStream_t s = as_stream(stream);
    const int threads = softmax_threads(p.C);
    if (threads == 256) {
        softmax_rows_kernel<256, kXent><<<p.N, 256, 0, s>>>(p.C, lp, labels, loss, probs, rank);
    } else if (threads == 512) {
        softmax_rows_kernel<512, kXent><<<p.N, 512, 0, s>>>(p.C, lp, labels, loss, probs, rank);
    } else {
        softmax_rows_kernel<1024, kXent><<<p.N, 1024, 0, s>>>(p.C, lp, labels, loss, probs, rank);
    }
    AX_LAUNCH_CHECK(opname);
}

void launch_xent_backward(const SoftmaxParams& p, int parts, const float* probs, const int32_t* labels, float scale,
                          const SliceOut& out, void* stream) {
    const int per = p.C / parts;
    dim3 grid = plane_grid(p.N, per);
    grid.z = static_cast<unsigned>(parts);
    softmax_xent_backward_kernel<<<grid, kThreads1d, 0, as_stream(stream)>>>(p.N, p.C, per, probs, labels, scale,
                                                                             out);
    AX_LAUNCH_CHECK("softmax_cross_entropy_backward");
}

}  // namespace

void softmax_cross_entropy_forward(const SoftmaxParams& p, const float* logits, const int32_t* labels, float* loss,
                                   float* probs, int32_t* rank, void* stream) {
    if (p.N <= 0 || p.C <= 0) return;
    launch_rows<true>("softmax_cross_entropy_forward", p, whole_logits(logits, p.C), labels, loss, probs, rank, stream);
}

void softmax_cross_entropy_forward_parts(const SoftmaxParams& p, int parts, const float* const* logits, const int* Cp,
                                         const int32_t* labels, float* loss, float* probs, int32_t* rank,
                                         void* stream) {
    require(parts >= 1 && parts <= kPlumbingMaxParts, "softmax_cross_entropy_forward", "1 to 8 logit parts");
    if (p.N <= 0 || p.C <= 0) return;
    LogitParts lp{};
    for (int u = 0; u < parts; ++u) {
        lp.p[u] = logits[u];
        lp.C[u] = Cp[u];
    }
    lp.count = parts;
    launch_rows<true>("softmax_cross_entropy_forward", p, lp, labels, loss, probs, rank, stream);
}

void softmax_cross_entropy_backward(const SoftmaxParams& p, const float* probs, const int32_t* labels, float scale,
                                    float* dlogits, void* stream) {
    if (p.N <= 0 || p.C <= 0) return;
    SliceOut out{};
    out.d[0] = dlogits;
    launch_xent_backward(p, 1, probs, labels, scale, out, stream);
}

void softmax_cross_entropy_backward_parts(const SoftmaxParams& p, int parts, const float* probs,
                                          const int32_t* labels, float scale, float* const* dlogits, void* stream) {
    require(parts >= 1 && parts <= kPlumbingMaxParts && p.C % parts == 0, "softmax_cross_entropy_backward",
            "1 to 8 equal slices of the classes");
    if (p.N <= 0 || p.C <= 0) return;
    SliceOut out{};
    for (int u = 0; u < parts; ++u) out.d[u] = dlogits[u];
    launch_xent_backward(p, parts, probs, labels, scale, out, stream);
}

void softmax_forward(const SoftmaxParams& p, const float* logits, float* probs, void* stream) {
    if (p.N <= 0 || p.C <= 0) return;
    launch_rows<false>("softmax_forward", p, whole_logits(logits, p.C), nullptr, nullptr, probs, nullptr, stream);
}

}  // namespace cuda
}  // namespace ax
