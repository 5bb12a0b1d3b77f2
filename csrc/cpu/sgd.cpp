// STUB (replaced in this session): cpu backend of the sgd family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cpu {

void sgd_update(int64_t n, float* w, const float* dw, float* v, float lr, float momentum, float weight_decay) { throw std::runtime_error("sgd_update: not implemented yet"); }

}  // namespace cpu
}  // namespace ax
