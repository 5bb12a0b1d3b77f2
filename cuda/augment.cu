// STUB (replaced in this session): cuda backend of the augment family.
#include <stdexcept>
#include "ops.h"

namespace ax {
namespace cuda {

void augment_batch(const AugmentParams& p, const uint8_t* images, const int32_t* offsets, const uint8_t* flips, const float* light, const float* mean, float* out, void* stream) { throw std::runtime_error("augment_batch: not implemented yet"); }

}  // namespace cuda
}  // namespace ax
