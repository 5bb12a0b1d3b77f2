// CPU backend of augment_batch: gathers each output plane row by row from the HWC uint8 source (crop, optional
// mirror), subtracts the (3,H,W) mean image and adds the per-image PCA lighting offset.
#include "ops.h"

namespace ax {
namespace cpu {

// out[n,c,y,x] = img[n, y0+y, xs, c] - mean[c, y0+y, xs] + light[n,c], xs = x0 + (flip ? crop-1-x : x).
void augment_batch(const AugmentParams& p, const uint8_t* images, const int32_t* offsets, const uint8_t* flips,
                   const float* light, const float* mean, float* out) {
    const int64_t plane = static_cast<int64_t>(p.crop) * p.crop;
    for (int n = 0; n < p.N; ++n) {
        const int y0 = offsets[2 * n], x0 = offsets[2 * n + 1];
        const bool flip = flips[n] != 0;
        const uint8_t* img = images + static_cast<int64_t>(n) * p.H * p.W * 3;
        for (int c = 0; c < 3; ++c) {
            const float l = light[3 * n + c];
            const float* mc = mean + static_cast<int64_t>(c) * p.H * p.W;
            float* o = out + (static_cast<int64_t>(n) * 3 + c) * plane;
            for (int y = 0; y < p.crop; ++y) {
                const int64_t srow = static_cast<int64_t>(y0 + y) * p.W;
                float* __restrict orow = o + static_cast<int64_t>(y) * p.crop;
                for (int x = 0; x < p.crop; ++x) {
                    const int64_t xs = x0 + (flip ? p.crop - 1 - x : x);
                    orow[x] = (static_cast<float>(img[(srow + xs) * 3 + c]) - mc[srow + xs]) + l;
                }
            }
        }
    }
}

}  // namespace cpu
}  // namespace ax
