// CPU backend of the sgd family: one flat in-place pass over the parameter, its gradient and its momentum.
#include "ops.h"

namespace ax {
namespace cpu {

// v = momentum*v - weight_decay*lr*w - lr*dw; w = w + v (ALEXNET.md), evaluated left to right as written.
void sgd_update(int64_t n, float* __restrict w, const float* __restrict dw, float* __restrict v, float lr,
                float momentum, float weight_decay) {
    const float decay = weight_decay * lr;
    for (int64_t i = 0; i < n; ++i) {
        const float vi = momentum * v[i] - decay * w[i] - lr * dw[i];
        v[i] = vi;
        w[i] = w[i] + vi;
    }
}

void sgd_update_multi(int count, const SgdSegment* segs, float lr, float momentum) {
    for (int i = 0; i < count; ++i)
        sgd_update(segs[i].n, segs[i].w, segs[i].dw, segs[i].v, lr, momentum, segs[i].weight_decay);
}

}  // namespace cpu
}  // namespace ax
