// Checked size arithmetic: the one place where shape, element and byte counts are computed. Everything is
// 64-bit and overflow-checked; a result outside what the kernels can index raises ValueError naming the op
// and the argument it came from, so no size ever wraps on its way to an allocation or a kernel.
//
// The limits, by name:
// - kMaxElements = 2^31 - 1: every tensor an op reads or writes holds fewer than 2^31 elements, counting a
//   zero-size dimension as 1 (so a huge iteration space cannot hide behind an empty channel axis). The
//   CUDA kernels index elements, planes and GEMM rows/columns with 32-bit ints, and pooling stores its
//   argmax as int32.
// - kMaxExtent = 2^31 - 1: every dimension, and every padded extent H + 2*pad, fits an int32, so window
//   arithmetic (p*stride - pad + r, h + pad, ...) in either backend cannot overflow.
// Tensor::empty itself accepts anything whose byte count fits in 63 bits; the op limit is stricter.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "tensor.h"

namespace ax {
namespace checked {

constexpr int64_t kMaxElements = 0x7fffffff;
constexpr int64_t kMaxExtent = 0x7fffffff;

// "op: argument 'arg' " (or "op: " when arg is empty): the prefix every message here starts with.
inline std::string where(const char* op, const char* arg) {
    std::string s(op);
    s += ": ";
    if (arg && *arg) s += std::string("argument '") + arg + "' ";
    return s;
}

inline std::string shape_str(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

// a * b and a + b, or ValueError naming op/arg when the exact result does not fit in int64.
inline int64_t mul(const char* op, const char* arg, int64_t a, int64_t b) {
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        throw ValueError(where(op, arg) + "gives a size that overflows 64 bits (" + std::to_string(a) + " * " +
                         std::to_string(b) + ")");
    return r;
}
inline int64_t add(const char* op, const char* arg, int64_t a, int64_t b) {
    int64_t r;
    if (__builtin_add_overflow(a, b, &r))
        throw ValueError(where(op, arg) + "gives a size that overflows 64 bits (" + std::to_string(a) + " + " +
                         std::to_string(b) + ")");
    return r;
}

// Product of the dimensions (all >= 0), overflow-checked.
inline int64_t numel(const char* op, const char* arg, const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) {
        if (d < 0) throw ValueError(where(op, arg) + "has a negative dimension in shape " + shape_str(shape));
        n = mul(op, arg, n, d);
    }
    return n;
}

// numel * itemsize as a byte count, overflow-checked (and kept below 2^63 so it is a valid size_t and ptrdiff_t).
inline size_t nbytes(const char* op, const char* arg, const std::vector<int64_t>& shape, size_t itemsize) {
    return static_cast<size_t>(mul(op, arg, numel(op, arg, shape), static_cast<int64_t>(itemsize)));
}

// The op limit: fewer than 2^31 elements, zero-size dimensions counted as 1. `arg` names the argument the
// shape belongs to, or (for an output, with `output` naming it) the arguments that set its size.
inline void check_elements(const char* op, const char* arg, const std::vector<int64_t>& shape,
                           const char* output = nullptr) {
    int64_t n = 1;
    bool over = false;
    for (int64_t d : shape) {
        if (d < 0) throw ValueError(where(op, arg) + "has a negative dimension in shape " + shape_str(shape));
        if (__builtin_mul_overflow(n, d > 0 ? d : 1, &n) || n > kMaxElements) {
            over = true;
            break;
        }
    }
    if (!over) return;
    const std::string tail = " with 2^31 or more elements (zero-size dimensions counted as 1); the kernels index "
                             "elements with 32-bit integers";
    if (output) {  // `arg` lists the arguments, quoted: "'input_hw'" or "'x', 'w', 'stride', 'padding'"
        const bool many = std::string(arg).find(',') != std::string::npos;
        throw ValueError(std::string(op) + ": argument" + (many ? "s " : " ") + arg + (many ? " give" : " gives") +
                         " output '" + output + "' the shape " + shape_str(shape) + tail);
    }
    throw ValueError(where(op, arg) + "has shape " + shape_str(shape) + tail);
}

// An int64 dimension or count that must fit an int32 (kMaxExtent).
inline int to_int(const char* op, const char* arg, int64_t v) {
    if (v < 0 || v > kMaxExtent)
        throw ValueError(where(op, arg) + "has a size " + std::to_string(v) + " outside [0, 2^31-1]");
    return static_cast<int>(v);
}

// Output extent of a sliding window over `in` padded by `pad` on both sides (stride >= 1, window >= 1,
// pad >= 0, in >= 0 checked by the caller): (in + 2 pad - window) / stride + 1, all in 64 bits. Raises
// when the padded extent does not fit an int32 (naming `pad_arg`) or the window does not fit it.
inline int window_out(const char* op, const char* what, const char* pad_arg, int64_t in, int64_t window,
                      int64_t stride, int64_t pad) {
    const int64_t padded = add(op, pad_arg, in, mul(op, pad_arg, 2, pad));
    if (padded > kMaxExtent)
        throw ValueError(where(op, pad_arg) + "makes the padded input " + what + " " + std::to_string(in) + " + 2*" +
                         std::to_string(pad) + " = " + std::to_string(padded) + ", beyond 2^31-1");
    if (padded < window)
        throw ValueError(std::string(op) + ": window " + std::to_string(window) + " is larger than the padded input " +
                         what + " " + std::to_string(in) + " + 2*" + std::to_string(pad));
    return static_cast<int>((padded - window) / stride + 1);
}

}  // namespace checked
}  // namespace ax
