// The CPU backend's one float32 GEMM, shared by convolution (im2col) and the linear layers.
// Internal to csrc/cpu/; not part of the op contract.
#pragma once
#include <cstdint>

namespace ax {
namespace cpu {

// C (M x N) = op(A) (M x K) * op(B) (K x N), plus the old C when `accumulate`.
// Row-major storage: A is (M x K) with row stride lda, or (K x M) when trans_a; B is (K x N) with row
// stride ldb, or (N x K) when trans_b; C is (M x N) with row stride ldc.
// Every C element is summed over k in increasing order (k = 0 first, then onto the old C when
// accumulating), so the result is deterministic and does not depend on the blocking or the SIMD width.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);

}  // namespace cpu
}  // namespace ax
