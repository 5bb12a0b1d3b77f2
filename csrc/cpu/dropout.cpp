// STUB (replaced in this session): cpu backend of the dropout family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cpu {

void dropout_forward(int64_t n, const float* x, float p, uint64_t seed, uint64_t offset, float* y, uint8_t* mask) { throw std::runtime_error("dropout_forward: not implemented yet"); }
void dropout_backward(int64_t n, const float* dy, const uint8_t* mask, float p, float* dx) { throw std::runtime_error("dropout_backward: not implemented yet"); }

}  // namespace cpu
}  // namespace ax
