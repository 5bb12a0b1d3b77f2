// CPU backend of the cross-tower plumbing: channel insert/extract as one contiguous copy per image, and add.
#include <cstring>

#include "ops.h"

namespace ax {
namespace cpu {

// whole (N, Cw, inner)[:, c0:c0+Cp] = part (N, Cp, inner): per image the channel block is contiguous.
void insert_channels(int N, int Cp, int Cw, int c0, int64_t inner, const float* part, float* whole) {
    const size_t block = sizeof(float) * static_cast<size_t>(Cp) * inner;
    for (int n = 0; n < N; ++n)
        std::memcpy(whole + (static_cast<int64_t>(n) * Cw + c0) * inner, part + static_cast<int64_t>(n) * Cp * inner,
                    block);
}

// part (N, Cp, inner) = whole (N, Cw, inner)[:, c0:c0+Cp].
void extract_channels(int N, int Cp, int Cw, int c0, int64_t inner, const float* whole, float* part) {
    const size_t block = sizeof(float) * static_cast<size_t>(Cp) * inner;
    for (int n = 0; n < N; ++n)
        std::memcpy(part + static_cast<int64_t>(n) * Cp * inner, whole + (static_cast<int64_t>(n) * Cw + c0) * inner,
                    block);
}

void add(int64_t n, const float* a, const float* b, float* y) {
    // a, b and y may alias (y = a + a, or in place), so no __restrict here.
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

}  // namespace cpu
}  // namespace ax
