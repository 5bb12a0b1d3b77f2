// CPU backend of the cross-tower plumbing: channel insert/extract as one contiguous copy per image, and add.
#include <cstring>

#include "ops.h"
#include "simd.h"

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

// a, b and y may alias (y = a + a, or in place), so no __restrict: each element is read before it is written,
// which the vectoriser's run-time overlap check keeps true for exact aliasing too.
AX_SIMD_CLONES
void add_range(int64_t begin, int64_t end, const float* a, const float* b, float* y) {
    for (int64_t i = begin; i < end; ++i) y[i] = a[i] + b[i];
}

void add(int64_t n, const float* a, const float* b, float* y) {
    parallel_for(0, n, kElementwiseGrain, [&](int64_t lo, int64_t hi) { add_range(lo, hi, a, b, y); });
}

}  // namespace cpu
}  // namespace ax
