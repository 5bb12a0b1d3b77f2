// The CPU backend's one float32 GEMM, shared by convolution (implicit im2col) and the linear layers.
// Internal to csrc/cpu/; not part of the op contract.
//
// Summation order, the same on every path: K is cut into blocks of kGemmKC (256) from k = 0; within a
// block each C element is one chain of fused multiply-adds in increasing k, starting from 0; the block's
// sum is then added to C (to the old C first when accumulating). Nothing depends on the tiling, the
// thread count or the ISA's vector width, so the result is the same bits for any thread count, and the
// AVX-512 and AVX2 kernels give the same bits. The portable kernel uses a fused multiply-add where the
// compiler has a fast one (__FP_FAST_FMAF: aarch64, ...) and so matches them there too; on an x86-64
// CPU without AVX2 it multiplies and adds separately (other bits, same tolerance).
#pragma once
#include <cstdint>
#include <string>

namespace ax {
namespace cpu {

constexpr int kGemmKC = 256;

// C (M x N) = op(A) (M x K) * op(B) (K x N), plus the old C when `accumulate`.
// Row-major storage: A is (M x K) with row stride lda, or (K x M) when trans_a; B is (K x N) with row
// stride ldb, or (N x K) when trans_b; C is (M x N) with row stride ldc.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
          float* C, int64_t ldc, bool accumulate);

// The general form behind gemm and the convolutions. Offsets are in floats.
struct GemmA {  // A(i, k) = p[i * rs + (koff ? koff[k] : k * cs)]
    const float* p;
    int64_t rs, cs;
    const int64_t* koff;  // nullable; K entries
};
// Dense (row_off null): B(k, j) = p[k * rs + j * cs].
// Gather (implicit im2col): B(k, j) = p[row_off[k] + col_off[j]] when 0 <= row_h[k] + col_h[j] < H and
// 0 <= row_w[k] + col_w[j] < W, else 0. The col_* tables have N entries plus padding to a multiple of 32
// whose col_h is far out of range (conv_gather_pad), so lanes past N read as 0.
struct GemmB {
    const float* p;
    int64_t rs, cs;
    const int32_t *row_off, *row_h, *row_w;  // K entries
    const int32_t *col_off, *col_h, *col_w;  // N entries, padded
    int H, W;
};
// C(i, j) = p[i * rs + (col_off ? col_off[j] : j * cs)]; col_off, if given, strictly increasing.
struct GemmC {
    float* p;
    int64_t rs, cs;
    const int64_t* col_off;  // nullable; N entries
};
void gemm_general(int M, int N, int K, const GemmA& a, const GemmB& b, const GemmC& c, bool accumulate);

constexpr int kGatherPad = 32;         // the col_* tables are padded to a multiple of this
constexpr int32_t kGatherOff = -(1 << 29);  // col_h of a padding lane: out of range for any row_h

// Instruction set of the micro-kernel: "avx512", "avx2" or "generic". The automatic choice is the best the
// CPU supports, unless ALEXNET_CPU_ISA names another one it supports. set_isa throws ValueError for a name
// that is unknown or not supported here.
std::string gemm_isa();
void set_gemm_isa(const std::string& name);
bool gemm_isa_supported(const std::string& name);

}  // namespace cpu
}  // namespace ax
