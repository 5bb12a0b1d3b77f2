// STUB (replaced in this session): cpu backend of the augment family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cpu {

void augment_batch(const AugmentParams& p, const uint8_t* images, const int32_t* offsets, const uint8_t* flips, const float* light, const float* mean, float* out) { throw std::runtime_error("augment_batch: not implemented yet"); }

}  // namespace cpu
}  // namespace ax
