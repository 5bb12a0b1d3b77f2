// CUDA backend of batch augmentation: uint8 (N, H, W, 3) HWC images -> float32 (N, 3, crop, crop) NCHW.
// Output planes (n, c) over blockIdx.y, output pixels over x threads (coalesced writes; the strided
// uint8 reads hit the same cache lines across the three channel planes).
#include "common.cuh"

namespace ax {
namespace cuda {
namespace {

// out[n,c,y,x] = (img[n, y0+y, xs, c] - mean[c, y0+y, xs]) + light[n,c], xs = x0 + (flip ? crop-1-x : x).
__global__ void __launch_bounds__(kThreads1d)
    augment_batch_kernel(AugmentParams p, const uint8_t* __restrict__ images, const int32_t* __restrict__ offsets,
                         const uint8_t* __restrict__ flips, const float* __restrict__ light,
                         const float* __restrict__ mean, float* __restrict__ out) {
    const int planes = p.N * 3, area = p.crop * p.crop;  // both < 2^31: checked by the launcher
    for (int pl = blockIdx.y; pl < planes; pl += gridDim.y) {
        const int n = pl / 3, c = pl - n * 3;
        const int y0 = offsets[2 * n], x0 = offsets[2 * n + 1];
        const bool flip = flips[n] != 0;
        const float l = light[3 * n + c];
        const uint8_t* img = images + static_cast<int64_t>(n) * p.H * p.W * 3;
        const float* mc = mean + static_cast<int64_t>(c) * p.H * p.W;
        float* o = out + static_cast<int64_t>(pl) * area;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < area; i += gridDim.x * blockDim.x) {
            const int y = i / p.crop, x = i - y * p.crop;
            const int ys = y0 + y, xs = x0 + (flip ? p.crop - 1 - x : x);
            const int64_t pix = static_cast<int64_t>(ys) * p.W + xs;
            const float v = static_cast<float>(img[pix * 3 + c]);
            o[i] = __fadd_rn(__fsub_rn(v, mc[pix]), l);
        }
    }
}

}  // namespace

void augment_batch(const AugmentParams& p, const uint8_t* images, const int32_t* offsets, const uint8_t* flips,
                   const float* light, const float* mean, float* out, void* stream) {
    const int64_t planes = static_cast<int64_t>(p.N) * 3, area = static_cast<int64_t>(p.crop) * p.crop;
    if (planes * area == 0) return;
    require(planes <= 0x7fffffff && area <= 0x7fffffff, "augment_batch", "batch or crop too large");
    augment_batch_kernel<<<plane_grid(planes, area), kThreads1d, 0, as_stream(stream)>>>(p, images, offsets, flips,
                                                                                       light, mean, out);
    AX_LAUNCH_CHECK("augment_batch");
}

}  // namespace cuda
}  // namespace ax
