// STUB (replaced in this session): cpu backend of the softmax family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cpu {

void softmax_cross_entropy_forward(const SoftmaxParams& p, const float* logits, const int32_t* labels, float* loss, float* probs, int32_t* rank) { throw std::runtime_error("softmax_cross_entropy_forward: not implemented yet"); }
void softmax_cross_entropy_backward(const SoftmaxParams& p, const float* probs, const int32_t* labels, float scale, float* dlogits) { throw std::runtime_error("softmax_cross_entropy_backward: not implemented yet"); }
void softmax_forward(const SoftmaxParams& p, const float* logits, float* probs) { throw std::runtime_error("softmax_forward: not implemented yet"); }

}  // namespace cpu
}  // namespace ax
