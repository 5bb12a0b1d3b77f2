// STUB (replaced in this session): cuda backend of the sgd family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cuda {

void sgd_update(int64_t n, float* w, const float* dw, float* v, float lr, float momentum, float weight_decay, void* stream) { throw std::runtime_error("sgd_update: not implemented yet"); }

}  // namespace cuda
}  // namespace ax
