// STUB (replaced in this session): cpu backend of the conv family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cpu {

void conv2d_forward(const Conv2dParams& p, const float* x, const float* w, const float* b , float* y) { throw std::runtime_error("conv2d_forward: not implemented yet"); }
void conv2d_backward_input(const Conv2dParams& p, const float* dy, const float* w, float* dx) { throw std::runtime_error("conv2d_backward_input: not implemented yet"); }
void conv2d_backward_weight(const Conv2dParams& p, const float* x, const float* dy, float* dw) { throw std::runtime_error("conv2d_backward_weight: not implemented yet"); }
void conv2d_backward_bias(const Conv2dParams& p, const float* dy, float* db) { throw std::runtime_error("conv2d_backward_bias: not implemented yet"); }

}  // namespace cpu
}  // namespace ax
