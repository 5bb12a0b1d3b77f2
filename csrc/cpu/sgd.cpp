// CPU backend of the sgd family: one flat in-place pass over the parameter, its gradient and its momentum, over
// [begin, end), cloned per vector ISA (simd.h; no fused multiply-add, so every clone rounds as the scalar loop).
#include "ops.h"
#include "simd.h"

namespace ax {
namespace cpu {

// v = momentum*v - weight_decay*lr*w - lr*dw; w = w + v (ALEXNET.md), evaluated left to right as written.
AX_SIMD_CLONES
void sgd_update_range(int64_t begin, int64_t end, float* __restrict w, const float* __restrict dw,
                      float* __restrict v, float lr, float momentum, float weight_decay) {
    const float decay = weight_decay * lr;
    for (int64_t i = begin; i < end; ++i) {
        const float wi = w[i];
        const float vi = momentum * v[i] - decay * wi - lr * dw[i];
        v[i] = vi;
        w[i] = wi + vi;
    }
}

void sgd_update(int64_t n, float* w, const float* dw, float* v, float lr, float momentum, float weight_decay) {
    parallel_for(0, n, kElementwiseGrain, [&](int64_t lo, int64_t hi) {
        sgd_update_range(lo, hi, w, dw, v, lr, momentum, weight_decay);
    });
}

// Every segment in table order, each as sgd_update (the same bits as one call per tensor).
void sgd_update_multi(int count, const SgdSegment* segs, float lr, float momentum) {
    for (int i = 0; i < count; ++i)
        sgd_update(segs[i].n, segs[i].w, segs[i].dw, segs[i].v, lr, momentum, segs[i].weight_decay);
}

}  // namespace cpu
}  // namespace ax
