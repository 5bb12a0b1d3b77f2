// STUB (replaced in this session): cpu backend of the lrn family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cpu {

void lrn_forward(const LrnParams& p, const float* x, float* y, float* scale) { throw std::runtime_error("lrn_forward: not implemented yet"); }
void lrn_backward(const LrnParams& p, const float* dy, const float* x, const float* y, const float* scale, float* dx) { throw std::runtime_error("lrn_backward: not implemented yet"); }

}  // namespace cpu
}  // namespace ax
