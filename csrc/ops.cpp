// The op layer: validates every argument (errors name the op and the argument), allocates outputs on the
// inputs' device and dispatches to the CPU or CUDA backend on the thread's current stream.
#include "ops.h"

#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>

#include "checked.h"

namespace ax {

uint32_t dropout_threshold(float p) {
    const double t = static_cast<double>(p) * 4294967296.0;
    return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

namespace {

std::string arg_prefix(const char* op, const char* arg) { return std::string(op) + ": argument '" + arg + "' "; }

// Every tensor an op reads passes here: defined, dtype, rank, and the element limit of checked.h (so each
// dimension also fits an int32 and every size derived below is bounded).
void check_tensor(const char* op, const char* arg, const Tensor& t, DType dtype, int dims, const char* layout) {
    if (!t.defined()) throw ValueError(arg_prefix(op, arg) + "is an undefined tensor");
    if (t.dtype() != dtype)
        throw TypeError(arg_prefix(op, arg) + "must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype()));
    if (dims >= 0 && t.dim() != dims)
        throw ValueError(arg_prefix(op, arg) + "must be " + std::to_string(dims) + "-D " + layout + ", got shape " +
                         t.shape_str());
    checked::check_elements(op, arg, t.shape());
}

// Dimensions `dims` of `t` (already checked) must be >= 1; `names` spells them for the message.
void check_nonempty(const char* op, const char* arg, const Tensor& t, std::initializer_list<int> dims,
                    const char* names) {
    for (int d : dims)
        if (t.size(d) < 1)
            throw ValueError(arg_prefix(op, arg) + "must have " + names + " >= 1, got shape " + t.shape_str());
}

void check_same_device(const char* op, const char* arg0, const Tensor& t0, const char* arg, const Tensor& t) {
    if (t.device() != t0.device())
        throw ValueError(arg_prefix(op, arg) + "is on " + t.device().str() + " but '" + arg0 + "' is on " +
                         t0.device().str() + "; all tensors of one op must be on one device");
}

void check_shape(const char* op, const char* arg, const Tensor& t, const std::vector<int64_t>& want) {
    if (t.shape() != want)
        throw ValueError(arg_prefix(op, arg) + "must have shape " + checked::shape_str(want) + ", got " + t.shape_str());
}

void check_positive(const char* op, const char* arg, int v) {
    if (v < 1) throw ValueError(arg_prefix(op, arg) + "must be >= 1, got " + std::to_string(v));
}
void check_nonneg(const char* op, const char* arg, int v) {
    if (v < 0) throw ValueError(arg_prefix(op, arg) + "must be >= 0, got " + std::to_string(v));
}
void check_finite(const char* op, const char* arg, float v) {
    if (!std::isfinite(v)) throw ValueError(arg_prefix(op, arg) + "must be finite");
}

// A dimension of a tensor that passed check_tensor (so it is < 2^31).
int dim_int(const char* op, const char* arg, const Tensor& t, int64_t i) { return checked::to_int(op, arg, t.size(i)); }

// Output `out` of an op: its shape is checked against the element limit first (naming `args`, the arguments
// that set its size), and a failed allocation becomes a MemoryError naming the op.
Tensor new_output(const char* op, const char* out, const char* args, const std::vector<int64_t>& shape, DType dt,
                  const Tensor& like) {
    checked::check_elements(op, args, shape, out);
    DeviceGuard g(like.device());
    try {
        return Tensor::empty(shape, dt, like.device());
    } catch (const OutOfMemory& e) {
        throw OutOfMemory(std::string(op) + ": " + e.what());
    }
}

}  // namespace

#ifdef ALEXNET_WITH_CUDA
#define AX_DISPATCH(dev, name, ...)                                        \
    do {                                                                   \
        if ((dev).is_cpu()) {                                              \
            cpu::name(__VA_ARGS__);                                        \
        } else {                                                           \
            DeviceGuard g_(dev);                                           \
            cuda::name(__VA_ARGS__, current_stream((dev).index));          \
        }                                                                  \
    } while (0)
#else
#define AX_DISPATCH(dev, name, ...)                                                        \
    do {                                                                                   \
        if ((dev).is_cpu()) cpu::name(__VA_ARGS__);                                        \
        else throw std::runtime_error(#name ": alexnet_cuda was built without CUDA");    \
    } while (0)
#endif

namespace ops {

// ---- conv2d ---------------------------------------------------------------------------------------

// All sizes arrive as int64 (from tensors that passed check_tensor, or from int arguments); C, H, W, K,
// R, S >= 1 are checked by the callers. The padded extents and P, Q come from checked::window_out.
static Conv2dParams conv_params(const char* op, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t Cg,
                                int64_t R, int64_t S, int sh, int sw, int ph, int pw, int groups) {
    check_positive(op, "stride", sh);
    check_positive(op, "stride", sw);
    check_nonneg(op, "padding", ph);
    check_nonneg(op, "padding", pw);
    check_positive(op, "groups", groups);
    if (C % groups != 0)
        throw ValueError(arg_prefix(op, "groups") + "(" + std::to_string(groups) + ") does not divide the " +
                         std::to_string(C) + " input channels");
    if (K % groups != 0)
        throw ValueError(arg_prefix(op, "groups") + "(" + std::to_string(groups) + ") does not divide the " +
                         std::to_string(K) + " output channels");
    if (Cg != C / groups)
        throw ValueError(arg_prefix(op, "w") + "has " + std::to_string(Cg) + " input channels per group but x has " +
                         std::to_string(C) + " channels in " + std::to_string(groups) + " group(s)");
    Conv2dParams p{};
    p.N = checked::to_int(op, "x", N); p.C = checked::to_int(op, "x", C);
    p.H = checked::to_int(op, "x", H); p.W = checked::to_int(op, "x", W);
    p.K = checked::to_int(op, "w", K); p.R = checked::to_int(op, "w", R); p.S = checked::to_int(op, "w", S);
    p.stride_h = sh; p.stride_w = sw; p.pad_h = ph; p.pad_w = pw; p.groups = groups;
    p.P = checked::window_out(op, "height", "padding", H, R, sh, ph);
    p.Q = checked::window_out(op, "width", "padding", W, S, sw, pw);
    return p;
}

namespace {

// A checked call of a conv pass: its params, its allocated output and the optional pointer (forward: the bias;
// grad-input: relu_y).
struct ConvCall {
    Conv2dParams p;
    Tensor out;
    const float* opt = nullptr;
};

ConvCall conv_forward_call(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, int sh, int sw, int ph,
                           int pw, int groups, bool relu) {
    const char* op = "conv2d_forward";
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "w", w, DType::f32, 4, "(K, C/groups, R, S)");
    check_same_device(op, "x", x, "w", w);
    check_nonempty(op, "x", x, {1, 2, 3}, "C, H, W");
    check_nonempty(op, "w", w, {0, 1, 2, 3}, "K, C/groups, R, S");
    auto p = conv_params(op, x.size(0), x.size(1), x.size(2), x.size(3), w.size(0), w.size(1), w.size(2), w.size(3),
                         sh, sw, ph, pw, groups);
    p.relu = relu;
    const float* bp = nullptr;
    if (b) {
        check_tensor(op, "b", *b, DType::f32, 1, "(K,)");
        check_same_device(op, "x", x, "b", *b);
        check_shape(op, "b", *b, {p.K});
        bp = b->data<float>();
    }
    Tensor y = new_output(op, "y", "'x', 'w', 'stride', 'padding'", {p.N, p.K, p.P, p.Q}, DType::f32, x);
    return {p, y, bp};
}

// relu_y of the backward ops that take one: float32, the shape of dx, on dx's device; its data or nullptr.
const float* relu_y_arg(const char* op, const std::optional<Tensor>& relu_y, const Tensor& like,
                        const std::vector<int64_t>& shape) {
    if (!relu_y) return nullptr;
    check_tensor(op, "relu_y", *relu_y, DType::f32, -1, "");
    check_same_device(op, "dy", like, "relu_y", *relu_y);
    check_shape(op, "relu_y", *relu_y, shape);
    return relu_y->data<float>();
}

ConvCall conv_backward_input_call(const Tensor& dy, const Tensor& w, int H, int W, int sh, int sw, int ph, int pw,
                                  int groups, const std::optional<Tensor>& relu_y) {
    const char* op = "conv2d_backward_input";
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, K, P, Q)");
    check_tensor(op, "w", w, DType::f32, 4, "(K, C/groups, R, S)");
    check_same_device(op, "dy", dy, "w", w);
    check_nonempty(op, "w", w, {0, 1, 2, 3}, "K, C/groups, R, S");
    check_positive(op, "H", H);
    check_positive(op, "W", W);
    check_positive(op, "groups", groups);
    const int64_t C = checked::mul(op, "groups", w.size(1), groups);
    // dx's size is set by input_hw: check it before the window arithmetic below relies on it.
    checked::check_elements(op, "'input_hw'", {dy.size(0), C, H, W}, "dx");
    auto p = conv_params(op, dy.size(0), C, H, W, w.size(0), w.size(1), w.size(2), w.size(3), sh, sw, ph, pw, groups);
    check_shape(op, "dy", dy, {p.N, p.K, p.P, p.Q});
    const float* ry = relu_y_arg(op, relu_y, dy, {p.N, p.C, p.H, p.W});
    Tensor dx = new_output(op, "dx", "'input_hw'", {p.N, p.C, p.H, p.W}, DType::f32, dy);
    return {p, dx, ry};
}

ConvCall conv_backward_weight_call(const Tensor& x, const Tensor& dy, int R, int S, int sh, int sw, int ph, int pw,
                                   int groups) {
    const char* op = "conv2d_backward_weight";
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, K, P, Q)");
    check_same_device(op, "x", x, "dy", dy);
    check_nonempty(op, "x", x, {1, 2, 3}, "C, H, W");
    check_nonempty(op, "dy", dy, {1}, "K");
    check_positive(op, "R", R);
    check_positive(op, "S", S);
    check_positive(op, "groups", groups);
    const int64_t C = x.size(1);
    if (C % groups != 0)
        throw ValueError(arg_prefix(op, "groups") + "does not divide the " + std::to_string(C) + " input channels");
    auto p = conv_params(op, x.size(0), C, x.size(2), x.size(3), dy.size(1), C / groups, R, S, sh, sw, ph, pw, groups);
    check_shape(op, "dy", dy, {p.N, p.K, p.P, p.Q});
    Tensor dw = new_output(op, "dw", "'dy', 'kernel'", {p.K, p.C / groups, p.R, p.S}, DType::f32, x);
    return {p, dw};
}

// The two towers of a *_pair call: the same device and the same shapes (params), else a ValueError naming
// tower 1's argument `arg`.
void check_pair(const char* op, const char* arg, const Tensor& t0, const Tensor& t1, const ConvCall& c0,
                const ConvCall& c1) {
    if (t0.device() != t1.device())
        throw ValueError(arg_prefix(op, arg) + "tower 1's tensor is on " + t1.device().str() + ", tower 0's on " +
                         t0.device().str() + " (a pair shares one device)");
    // Field by field: Conv2dParams ends in a bool, so memcmp would also compare its padding bytes.
    const Conv2dParams &a = c0.p, &b = c1.p;
    const bool same = a.N == b.N && a.C == b.C && a.H == b.H && a.W == b.W && a.K == b.K && a.R == b.R && a.S == b.S &&
                      a.P == b.P && a.Q == b.Q && a.stride_h == b.stride_h && a.stride_w == b.stride_w &&
                      a.pad_h == b.pad_h && a.pad_w == b.pad_w && a.groups == b.groups && a.relu == b.relu;
    if (!same)
        throw ValueError(arg_prefix(op, arg) + "tower 1's shape " + t1.shape_str() + " differs from tower 0's " +
                         t0.shape_str() + " (a pair has one shape)");
}

}  // namespace

Tensor conv2d_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, int sh, int sw, int ph, int pw,
                      int groups, bool relu) {
    const ConvCall c = conv_forward_call(x, w, b, sh, sw, ph, pw, groups, relu);
    if (c.out.numel() == 0) return c.out;
    AX_DISPATCH(x.device(), conv2d_forward, c.p, x.data<float>(), w.data<float>(), c.opt, c.out.data<float>());
    return c.out;
}

Tensor conv2d_backward_input(const Tensor& dy, const Tensor& w, int H, int W, int sh, int sw, int ph, int pw,
                             int groups, const std::optional<Tensor>& relu_y) {
    const ConvCall c = conv_backward_input_call(dy, w, H, W, sh, sw, ph, pw, groups, relu_y);
    if (c.out.numel() == 0) return c.out;
    AX_DISPATCH(dy.device(), conv2d_backward_input, c.p, dy.data<float>(), w.data<float>(), c.opt,
                c.out.data<float>());
    return c.out;
}

Tensor conv2d_backward_weight(const Tensor& x, const Tensor& dy, int R, int S, int sh, int sw, int ph, int pw,
                              int groups) {
    const ConvCall c = conv_backward_weight_call(x, dy, R, S, sh, sw, ph, pw, groups);
    AX_DISPATCH(x.device(), conv2d_backward_weight, c.p, x.data<float>(), dy.data<float>(), c.out.data<float>());
    return c.out;
}

#ifdef ALEXNET_WITH_CUDA
#define AX_PAIR_CUDA(dev, name, ...)                      \
    do {                                                  \
        DeviceGuard g_(dev);                              \
        cuda::name(__VA_ARGS__, current_stream((dev).index)); \
    } while (0)
#else
#define AX_PAIR_CUDA(dev, name, ...) throw std::runtime_error(#name ": alexnet_cuda was built without CUDA")
#endif

TensorPair conv2d_forward_pair(const TensorPair& x, const TensorPair& w, const std::array<std::optional<Tensor>, 2>& b,
                               int sh, int sw, int ph, int pw, int groups, bool relu) {
    const ConvCall c0 = conv_forward_call(x[0], w[0], b[0], sh, sw, ph, pw, groups, relu);
    const ConvCall c1 = conv_forward_call(x[1], w[1], b[1], sh, sw, ph, pw, groups, relu);
    check_pair("conv2d_forward_pair", "x", x[0], x[1], c0, c1);
    if (c0.out.numel() > 0) {
        if (x[0].device().is_cpu()) {
            cpu::conv2d_forward(c0.p, x[0].data<float>(), w[0].data<float>(), c0.opt, c0.out.data<float>());
            cpu::conv2d_forward(c1.p, x[1].data<float>(), w[1].data<float>(), c1.opt, c1.out.data<float>());
        } else {
            const float* xs[2] = {x[0].data<float>(), x[1].data<float>()};
            const float* ws[2] = {w[0].data<float>(), w[1].data<float>()};
            const float* bs[2] = {c0.opt, c1.opt};
            float* ys[2] = {c0.out.data<float>(), c1.out.data<float>()};
            AX_PAIR_CUDA(x[0].device(), conv2d_forward_pair, c0.p, xs, ws, bs, ys);
        }
    }
    return {c0.out, c1.out};
}

TensorPair conv2d_backward_input_pair(const TensorPair& dy, const TensorPair& w, int H, int W, int sh, int sw, int ph,
                                      int pw, int groups, const std::array<std::optional<Tensor>, 2>& relu_y) {
    const ConvCall c0 = conv_backward_input_call(dy[0], w[0], H, W, sh, sw, ph, pw, groups, relu_y[0]);
    const ConvCall c1 = conv_backward_input_call(dy[1], w[1], H, W, sh, sw, ph, pw, groups, relu_y[1]);
    check_pair("conv2d_backward_input_pair", "dy", dy[0], dy[1], c0, c1);
    if (c0.out.numel() > 0) {
        if (dy[0].device().is_cpu()) {
            cpu::conv2d_backward_input(c0.p, dy[0].data<float>(), w[0].data<float>(), c0.opt, c0.out.data<float>());
            cpu::conv2d_backward_input(c1.p, dy[1].data<float>(), w[1].data<float>(), c1.opt, c1.out.data<float>());
        } else {
            const float* dys[2] = {dy[0].data<float>(), dy[1].data<float>()};
            const float* ws[2] = {w[0].data<float>(), w[1].data<float>()};
            const float* rys[2] = {c0.opt, c1.opt};
            float* dxs[2] = {c0.out.data<float>(), c1.out.data<float>()};
            AX_PAIR_CUDA(dy[0].device(), conv2d_backward_input_pair, c0.p, dys, ws, rys, dxs);
        }
    }
    return {c0.out, c1.out};
}

TensorPair conv2d_backward_weight_pair(const TensorPair& x, const TensorPair& dy, int R, int S, int sh, int sw, int ph,
                                       int pw, int groups) {
    const ConvCall c0 = conv_backward_weight_call(x[0], dy[0], R, S, sh, sw, ph, pw, groups);
    const ConvCall c1 = conv_backward_weight_call(x[1], dy[1], R, S, sh, sw, ph, pw, groups);
    check_pair("conv2d_backward_weight_pair", "x", x[0], x[1], c0, c1);
    if (x[0].device().is_cpu()) {
        cpu::conv2d_backward_weight(c0.p, x[0].data<float>(), dy[0].data<float>(), c0.out.data<float>());
        cpu::conv2d_backward_weight(c1.p, x[1].data<float>(), dy[1].data<float>(), c1.out.data<float>());
    } else {
        const float* xs[2] = {x[0].data<float>(), x[1].data<float>()};
        const float* dys[2] = {dy[0].data<float>(), dy[1].data<float>()};
        float* dws[2] = {c0.out.data<float>(), c1.out.data<float>()};
        AX_PAIR_CUDA(x[0].device(), conv2d_backward_weight_pair, c0.p, xs, dys, dws);
    }
    return {c0.out, c1.out};
}

WeightBiasPair conv2d_backward_weight_bias_pair(const TensorPair& x, const TensorPair& dy, int R, int S, int sh, int sw,
                                                int ph, int pw, int groups) {
    if (x[0].defined() && x[0].device().is_cpu()) {
        const TensorPair dw = conv2d_backward_weight_pair(x, dy, R, S, sh, sw, ph, pw, groups);
        return {dw, {conv2d_backward_bias(dy[0]), conv2d_backward_bias(dy[1])}};
    }
    const ConvCall c0 = conv_backward_weight_call(x[0], dy[0], R, S, sh, sw, ph, pw, groups);
    const ConvCall c1 = conv_backward_weight_call(x[1], dy[1], R, S, sh, sw, ph, pw, groups);
    check_pair("conv2d_backward_weight_bias_pair", "x", x[0], x[1], c0, c1);
    const char* op = "conv2d_backward_bias";
    Tensor db0 = new_output(op, "db", "'dy'", {c0.p.K}, DType::f32, dy[0]);
    Tensor db1 = new_output(op, "db", "'dy'", {c1.p.K}, DType::f32, dy[1]);
    const float* xs[2] = {x[0].data<float>(), x[1].data<float>()};
    const float* dys[2] = {dy[0].data<float>(), dy[1].data<float>()};
    float* dws[2] = {c0.out.data<float>(), c1.out.data<float>()};
    float* dbs[2] = {db0.data<float>(), db1.data<float>()};
    AX_PAIR_CUDA(x[0].device(), conv2d_backward_weight_bias_pair, c0.p, xs, dys, dws, dbs);
    return {{c0.out, c1.out}, {db0, db1}};
}
#undef AX_PAIR_CUDA

Tensor conv2d_backward_bias(const Tensor& dy) {
    const char* op = "conv2d_backward_bias";
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, K, P, Q)");
    Conv2dParams p{};
    p.N = dim_int(op, "dy", dy, 0); p.K = dim_int(op, "dy", dy, 1);
    p.P = dim_int(op, "dy", dy, 2); p.Q = dim_int(op, "dy", dy, 3);
    Tensor db = new_output(op, "db", "'dy'", {p.K}, DType::f32, dy);
    if (db.numel() == 0) return db;  // an empty dy with K > 0 still reaches the backend: db is zeros there
    AX_DISPATCH(dy.device(), conv2d_backward_bias, p, dy.data<float>(), db.data<float>());
    return db;
}

// ---- linear ---------------------------------------------------------------------------------------

// A linear pass's checked arguments: its params and its allocated output (opt: the nullable bias).
struct LinCall {
    LinearParams p;
    Tensor out;
    const float* opt = nullptr;
};

static LinCall linear_forward_call(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool relu) {
    const char* op = "linear_forward";
    check_tensor(op, "x", x, DType::f32, 2, "(N, in)");
    check_tensor(op, "w", w, DType::f32, 2, "(out, in)");
    check_same_device(op, "x", x, "w", w);
    check_nonempty(op, "w", w, {0, 1}, "out, in");
    LinCall c;
    c.p = LinearParams{dim_int(op, "x", x, 0), dim_int(op, "x", x, 1), dim_int(op, "w", w, 0)};
    c.p.relu = relu;
    if (w.size(1) != c.p.I)
        throw ValueError(arg_prefix(op, "w") + "has " + std::to_string(w.size(1)) + " input features but x has " +
                         std::to_string(c.p.I));
    if (b) {
        check_tensor(op, "b", *b, DType::f32, 1, "(out,)");
        check_same_device(op, "x", x, "b", *b);
        check_shape(op, "b", *b, {c.p.O});
        c.opt = b->data<float>();
    }
    c.out = new_output(op, "y", "'x', 'w'", {c.p.N, c.p.O}, DType::f32, x);
    return c;
}

static LinCall linear_backward_input_call(const Tensor& dy, const Tensor& w) {
    const char* op = "linear_backward_input";
    check_tensor(op, "dy", dy, DType::f32, 2, "(N, out)");
    check_tensor(op, "w", w, DType::f32, 2, "(out, in)");
    check_same_device(op, "dy", dy, "w", w);
    check_nonempty(op, "w", w, {0, 1}, "out, in");
    LinCall c;
    c.p = LinearParams{dim_int(op, "dy", dy, 0), dim_int(op, "w", w, 1), dim_int(op, "w", w, 0)};
    if (dy.size(1) != c.p.O)
        throw ValueError(arg_prefix(op, "dy") + "has " + std::to_string(dy.size(1)) + " features but w has " +
                         std::to_string(c.p.O) + " outputs");
    c.out = new_output(op, "dx", "'dy', 'w'", {c.p.N, c.p.I}, DType::f32, dy);
    return c;
}

static LinCall linear_backward_weight_call(const Tensor& x, const Tensor& dy) {
    const char* op = "linear_backward_weight";
    check_tensor(op, "x", x, DType::f32, 2, "(N, in)");
    check_tensor(op, "dy", dy, DType::f32, 2, "(N, out)");
    check_same_device(op, "x", x, "dy", dy);
    check_nonempty(op, "x", x, {1}, "in");
    check_nonempty(op, "dy", dy, {1}, "out");
    LinCall c;
    c.p = LinearParams{dim_int(op, "x", x, 0), dim_int(op, "x", x, 1), dim_int(op, "dy", dy, 1)};
    if (dy.size(0) != c.p.N)
        throw ValueError(arg_prefix(op, "dy") + "has batch " + std::to_string(dy.size(0)) + " but x has " +
                         std::to_string(c.p.N));
    c.out = new_output(op, "dw", "'x', 'dy'", {c.p.O, c.p.I}, DType::f32, x);
    return c;
}

static LinCall linear_backward_bias_call(const Tensor& dy) {
    const char* op = "linear_backward_bias";
    check_tensor(op, "dy", dy, DType::f32, 2, "(N, out)");
    LinCall c;
    c.p = LinearParams{dim_int(op, "dy", dy, 0), 0, dim_int(op, "dy", dy, 1)};
    c.out = new_output(op, "db", "'dy'", {c.p.O}, DType::f32, dy);
    return c;
}

Tensor linear_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, bool relu) {
    const LinCall c = linear_forward_call(x, w, b, relu);
    if (c.out.numel() == 0) return c.out;
    AX_DISPATCH(x.device(), linear_forward, c.p, x.data<float>(), w.data<float>(), c.opt, c.out.data<float>());
    return c.out;
}

Tensor linear_backward_input(const Tensor& dy, const Tensor& w) {
    const LinCall c = linear_backward_input_call(dy, w);
    if (c.out.numel() == 0) return c.out;
    AX_DISPATCH(dy.device(), linear_backward_input, c.p, dy.data<float>(), w.data<float>(), c.out.data<float>());
    return c.out;
}

Tensor linear_backward_weight(const Tensor& x, const Tensor& dy) {
    const LinCall c = linear_backward_weight_call(x, dy);
    AX_DISPATCH(x.device(), linear_backward_weight, c.p, x.data<float>(), dy.data<float>(), c.out.data<float>());
    return c.out;
}

Tensor linear_backward_bias(const Tensor& dy) {
    const LinCall c = linear_backward_bias_call(dy);
    if (c.out.numel() == 0) return c.out;
    AX_DISPATCH(dy.device(), linear_backward_bias, c.p, dy.data<float>(), c.out.data<float>());
    return c.out;
}

// A pair's towers: one device, one shape (the same LinearParams).
static void check_linear_pair(const char* op, const char* arg, const Tensor& t0, const Tensor& t1, const LinCall& c0,
                              const LinCall& c1) {
    if (t0.device() != t1.device())
        throw ValueError(arg_prefix(op, arg) + "tower 1's tensor is on " + t1.device().str() + ", tower 0's on " +
                         t0.device().str() + " (a pair shares one device)");
    const LinearParams &a = c0.p, &b = c1.p;
    if (!(a.N == b.N && a.I == b.I && a.O == b.O && a.relu == b.relu && (c0.opt == nullptr) == (c1.opt == nullptr)))
        throw ValueError(arg_prefix(op, arg) + "tower 1's shape " + t1.shape_str() + " differs from tower 0's " +
                         t0.shape_str() + " (a pair has one shape)");
}

#ifdef ALEXNET_WITH_CUDA
#define AX_LIN_PAIR_CUDA(dev, name, ...)                       \
    do {                                                      \
        DeviceGuard g_(dev);                                  \
        cuda::name(__VA_ARGS__, current_stream((dev).index)); \
    } while (0)
#else
#define AX_LIN_PAIR_CUDA(dev, name, ...) throw std::runtime_error(#name ": alexnet_cuda was built without CUDA")
#endif

TensorPair linear_forward_pair(const TensorPair& x, const TensorPair& w, const std::array<std::optional<Tensor>, 2>& b,
                               bool relu) {
    const LinCall c0 = linear_forward_call(x[0], w[0], b[0], relu), c1 = linear_forward_call(x[1], w[1], b[1], relu);
    check_linear_pair("linear_forward_pair", "x", x[0], x[1], c0, c1);
    if (c0.out.numel() == 0) return {c0.out, c1.out};
    if (x[0].device().is_cpu()) {
        cpu::linear_forward(c0.p, x[0].data<float>(), w[0].data<float>(), c0.opt, c0.out.data<float>());
        cpu::linear_forward(c1.p, x[1].data<float>(), w[1].data<float>(), c1.opt, c1.out.data<float>());
    } else {
        const float* xs[2] = {x[0].data<float>(), x[1].data<float>()};
        const float* ws[2] = {w[0].data<float>(), w[1].data<float>()};
        const float* bs[2] = {c0.opt, c1.opt};
        float* ys[2] = {c0.out.data<float>(), c1.out.data<float>()};
        AX_LIN_PAIR_CUDA(x[0].device(), linear_forward_pair, c0.p, xs, ws, bs, ys);
    }
    return {c0.out, c1.out};
}

TensorPair linear_backward_input_pair(const TensorPair& dy, const TensorPair& w) {
    const LinCall c0 = linear_backward_input_call(dy[0], w[0]), c1 = linear_backward_input_call(dy[1], w[1]);
    check_linear_pair("linear_backward_input_pair", "dy", dy[0], dy[1], c0, c1);
    if (c0.out.numel() == 0) return {c0.out, c1.out};
    if (dy[0].device().is_cpu()) {
        cpu::linear_backward_input(c0.p, dy[0].data<float>(), w[0].data<float>(), c0.out.data<float>());
        cpu::linear_backward_input(c1.p, dy[1].data<float>(), w[1].data<float>(), c1.out.data<float>());
    } else {
        const float* dys[2] = {dy[0].data<float>(), dy[1].data<float>()};
        const float* ws[2] = {w[0].data<float>(), w[1].data<float>()};
        float* dxs[2] = {c0.out.data<float>(), c1.out.data<float>()};
        AX_LIN_PAIR_CUDA(dy[0].device(), linear_backward_input_pair, c0.p, dys, ws, dxs);
    }
    return {c0.out, c1.out};
}

WeightBiasPair linear_backward_weight_bias_pair(const TensorPair& x, const TensorPair& dy) {
    const LinCall c0 = linear_backward_weight_call(x[0], dy[0]), c1 = linear_backward_weight_call(x[1], dy[1]);
    check_linear_pair("linear_backward_weight_bias_pair", "x", x[0], x[1], c0, c1);
    const LinCall b0 = linear_backward_bias_call(dy[0]), b1 = linear_backward_bias_call(dy[1]);
    if (x[0].device().is_cpu()) {
        cpu::linear_backward_weight(c0.p, x[0].data<float>(), dy[0].data<float>(), c0.out.data<float>());
        cpu::linear_backward_weight(c1.p, x[1].data<float>(), dy[1].data<float>(), c1.out.data<float>());
        cpu::linear_backward_bias(b0.p, dy[0].data<float>(), b0.out.data<float>());
        cpu::linear_backward_bias(b1.p, dy[1].data<float>(), b1.out.data<float>());
    } else {
        const float* xs[2] = {x[0].data<float>(), x[1].data<float>()};
        const float* dys[2] = {dy[0].data<float>(), dy[1].data<float>()};
        float* dws[2] = {c0.out.data<float>(), c1.out.data<float>()};
        float* dbs[2] = {b0.out.data<float>(), b1.out.data<float>()};
        AX_LIN_PAIR_CUDA(x[0].device(), linear_backward_weight_bias_pair, c0.p, xs, dys, dws, dbs);
    }
    return {{c0.out, c1.out}, {b0.out, b1.out}};
}
#undef AX_LIN_PAIR_CUDA

// ---- relu -----------------------------------------------------------------------------------------

Tensor relu_forward(const Tensor& x) {
    const char* op = "relu_forward";
    check_tensor(op, "x", x, DType::f32, -1, "");
    Tensor y = new_output(op, "y", "'x'", x.shape(), DType::f32, x);
    if (y.numel() == 0) return y;
    AX_DISPATCH(x.device(), relu_forward, x.numel(), x.data<float>(), y.data<float>());
    return y;
}

Tensor relu_backward(const Tensor& dy, const Tensor& y) {
    const char* op = "relu_backward";
    check_tensor(op, "dy", dy, DType::f32, -1, "");
    check_tensor(op, "y", y, DType::f32, -1, "");
    check_same_device(op, "dy", dy, "y", y);
    check_shape(op, "y", y, dy.shape());
    Tensor dx = new_output(op, "dx", "'dy'", dy.shape(), DType::f32, dy);
    if (dx.numel() == 0) return dx;
    AX_DISPATCH(dy.device(), relu_backward, dy.numel(), dy.data<float>(), y.data<float>(), dx.data<float>());
    return dx;
}

// ---- lrn ------------------------------------------------------------------------------------------

static LrnParams lrn_params(const char* op, const Tensor& x, int size, float k, float alpha, float beta) {
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    if (size < 1 || size % 2 == 0)
        throw ValueError(arg_prefix(op, "size") + "(n) must be a positive odd number, got " + std::to_string(size));
    check_finite(op, "k", k);
    check_finite(op, "alpha", alpha);
    check_finite(op, "beta", beta);
    if (k <= 0) throw ValueError(arg_prefix(op, "k") + "must be > 0");
    if (alpha < 0) throw ValueError(arg_prefix(op, "alpha") + "must be >= 0");
    if (beta < 0) throw ValueError(arg_prefix(op, "beta") + "must be >= 0");
    return LrnParams{dim_int(op, "x", x, 0), dim_int(op, "x", x, 1), dim_int(op, "x", x, 2), dim_int(op, "x", x, 3),
                     size, k, alpha, beta};
}

std::pair<Tensor, Tensor> lrn_forward(const Tensor& x, int size, float k, float alpha, float beta) {
    const char* op = "lrn_forward";
    auto p = lrn_params(op, x, size, k, alpha, beta);
    Tensor y = new_output(op, "y", "'x'", x.shape(), DType::f32, x);
    Tensor scale = new_output(op, "scale", "'x'", x.shape(), DType::f32, x);
    if (y.numel() == 0) return {y, scale};
    AX_DISPATCH(x.device(), lrn_forward, p, x.data<float>(), y.data<float>(), scale.data<float>());
    return {y, scale};
}

Tensor lrn_backward(const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& scale, int size, float k,
                    float alpha, float beta, bool relu) {
    const char* op = "lrn_backward";
    auto p = lrn_params(op, x, size, k, alpha, beta);
    p.relu = relu;
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "y", y, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "scale", scale, DType::f32, 4, "(N, C, H, W)");
    check_same_device(op, "x", x, "dy", dy);
    check_same_device(op, "x", x, "y", y);
    check_same_device(op, "x", x, "scale", scale);
    check_shape(op, "dy", dy, x.shape());
    check_shape(op, "y", y, x.shape());
    check_shape(op, "scale", scale, x.shape());
    Tensor dx = new_output(op, "dx", "'x'", x.shape(), DType::f32, x);
    if (dx.numel() == 0) return dx;
    AX_DISPATCH(x.device(), lrn_backward, p, dy.data<float>(), x.data<float>(), y.data<float>(), scale.data<float>(),
                dx.data<float>());
    return dx;
}

// ---- max-pooling ----------------------------------------------------------------------------------

// H, W >= 1 (checked by the callers): with pad < window that puts at least one real element in every
// window, so no window has to invent a maximum.
static PoolParams pool_params(const char* op, int64_t N, int64_t C, int64_t H, int64_t W, int wh, int ww, int sh,
                              int sw, int ph, int pw) {
    check_positive(op, "window", wh);
    check_positive(op, "window", ww);
    check_positive(op, "stride", sh);
    check_positive(op, "stride", sw);
    check_nonneg(op, "padding", ph);
    check_nonneg(op, "padding", pw);
    if (ph >= wh || pw >= ww)
        throw ValueError(arg_prefix(op, "padding") + "must be smaller than the window (a window of padding only has "
                         "no maximum)");
    PoolParams p{};
    p.N = checked::to_int(op, "x", N); p.C = checked::to_int(op, "x", C);
    p.H = checked::to_int(op, "x", H); p.W = checked::to_int(op, "x", W);
    p.window_h = wh; p.window_w = ww; p.stride_h = sh; p.stride_w = sw; p.pad_h = ph; p.pad_w = pw;
    p.P = checked::window_out(op, "height", "padding", H, wh, sh, ph);
    p.Q = checked::window_out(op, "width", "padding", W, ww, sw, pw);
    return p;
}

std::pair<Tensor, Tensor> maxpool_forward(const Tensor& x, int wh, int ww, int sh, int sw, int ph, int pw) {
    const char* op = "maxpool_forward";
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    check_nonempty(op, "x", x, {2, 3}, "H, W (an empty plane has no maximum)");
    auto p = pool_params(op, x.size(0), x.size(1), x.size(2), x.size(3), wh, ww, sh, sw, ph, pw);
    Tensor y = new_output(op, "y", "'x', 'window', 'stride', 'padding'", {p.N, p.C, p.P, p.Q}, DType::f32, x);
    Tensor am = new_output(op, "argmax", "'x', 'window', 'stride', 'padding'", {p.N, p.C, p.P, p.Q}, DType::i32, x);
    if (y.numel() == 0) return {y, am};
    AX_DISPATCH(x.device(), maxpool_forward, p, x.data<float>(), y.data<float>(), am.data<int32_t>());
    return {y, am};
}

LrnPool lrn_maxpool_forward(const Tensor& x, int size, float k, float alpha, float beta, int wh, int ww, int sh, int sw,
                            int ph, int pw) {
    const char* op = "lrn_maxpool_forward";
    const LrnParams lp = lrn_params(op, x, size, k, alpha, beta);
    check_nonempty(op, "x", x, {2, 3}, "H, W (an empty plane has no maximum)");
    const PoolParams pp = pool_params(op, x.size(0), x.size(1), x.size(2), x.size(3), wh, ww, sh, sw, ph, pw);
    LrnPool r;
    r.y = new_output(op, "y", "'x'", x.shape(), DType::f32, x);
    r.scale = new_output(op, "scale", "'x'", x.shape(), DType::f32, x);
    r.pool_y = new_output(op, "pool_y", "'x', 'window', 'stride', 'padding'", {pp.N, pp.C, pp.P, pp.Q}, DType::f32, x);
    r.argmax = new_output(op, "argmax", "'x', 'window', 'stride', 'padding'", {pp.N, pp.C, pp.P, pp.Q}, DType::i32, x);
    if (r.y.numel() == 0) return r;
    AX_DISPATCH(x.device(), lrn_maxpool_forward, lp, pp, x.data<float>(), r.y.data<float>(), r.scale.data<float>(),
                r.pool_y.data<float>(), r.argmax.data<int32_t>());
    return r;
}

Tensor maxpool_backward(const Tensor& dy, const Tensor& argmax, int H, int W, int wh, int ww, int sh, int sw, int ph,
                        int pw, bool check_argmax, const std::optional<Tensor>& relu_y) {
    const char* op = "maxpool_backward";
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, C, P, Q)");
    check_tensor(op, "argmax", argmax, DType::i32, 4, "(N, C, P, Q)");
    check_same_device(op, "dy", dy, "argmax", argmax);
    check_positive(op, "H", H);
    check_positive(op, "W", W);
    // dx's size is set by input_hw: check it before anything is derived from it.
    checked::check_elements(op, "'input_hw'", {dy.size(0), dy.size(1), H, W}, "dx");
    auto p = pool_params(op, dy.size(0), dy.size(1), H, W, wh, ww, sh, sw, ph, pw);
    check_shape(op, "dy", dy, {p.N, p.C, p.P, p.Q});
    check_shape(op, "argmax", argmax, dy.shape());
    const float* ry = relu_y_arg(op, relu_y, dy, {p.N, p.C, p.H, p.W});
    if (check_argmax && argmax.device().is_cuda() && argmax.numel() > 0) {
        // The CPU backend raises on an argmax outside its window while it scatters; the CUDA kernel gathers and
        // would drop such a gradient without a word, so its argmax is checked here, on the host.
        const Tensor host = argmax.to(Device{});
        const int32_t* a = host.data<int32_t>();
        const int64_t HW = static_cast<int64_t>(p.H) * p.W;
        for (int64_t i = 0; i < host.numel(); ++i) {
            const int pp = static_cast<int>((i / p.Q) % p.P), q = static_cast<int>(i % p.Q);
            const int h0 = pp * p.stride_h - p.pad_h, w0 = q * p.stride_w - p.pad_w;
            const int64_t v = a[i], h = v >= 0 ? v / p.W : -1, w = v >= 0 ? v % p.W : -1;
            if (v < 0 || v >= HW || h < h0 || h >= h0 + p.window_h || w < w0 || w >= w0 + p.window_w)
                throw ValueError(arg_prefix(op, "argmax") + "holds " + std::to_string(v) + " at output (" +
                                 std::to_string(pp) + ", " + std::to_string(q) +
                                 "), outside that output's window; pass the argmax from maxpool_forward");
        }
    }
    Tensor dx = new_output(op, "dx", "'input_hw'", {p.N, p.C, p.H, p.W}, DType::f32, dy);
    if (dx.numel() == 0) return dx;
    AX_DISPATCH(dy.device(), maxpool_backward, p, dy.data<float>(), argmax.data<int32_t>(), ry, dx.data<float>());
    return dx;
}

// ---- dropout --------------------------------------------------------------------------------------

static void check_p(const char* op, float p) {
    if (!(p >= 0.0f && p < 1.0f)) throw ValueError(arg_prefix(op, "p") + "must be in [0, 1), got " + std::to_string(p));
}

std::pair<Tensor, Tensor> dropout_forward(const Tensor& x, float p, uint64_t seed, uint64_t offset,
                                          const uint64_t* seed_device) {
    const char* op = "dropout_forward";
    check_tensor(op, "x", x, DType::f32, -1, "");
    check_p(op, p);
    if (seed_device && !x.device().is_cuda())
        throw ValueError(arg_prefix(op, "seed_device") + "is a device address: CUDA tensors only");
    Tensor y = new_output(op, "y", "'x'", x.shape(), DType::f32, x);
    Tensor mask = new_output(op, "mask", "'x'", x.shape(), DType::u8, x);
    if (y.numel() == 0) return {y, mask};
#ifdef ALEXNET_WITH_CUDA
    if (seed_device) {
        DeviceGuard g(x.device());
        cuda::dropout_forward_device_seed(x.numel(), x.data<float>(), p, seed_device, offset, y.data<float>(),
                                          mask.data<uint8_t>(), current_stream(x.device().index));
        return {y, mask};
    }
#endif
    AX_DISPATCH(x.device(), dropout_forward, x.numel(), x.data<float>(), p, seed, offset, y.data<float>(),
                mask.data<uint8_t>());
    return {y, mask};
}

Tensor dropout_backward(const Tensor& dy, const Tensor& mask, float p, bool check_mask,
                        const std::optional<Tensor>& relu_y) {
    const char* op = "dropout_backward";
    check_tensor(op, "dy", dy, DType::f32, -1, "");
    check_tensor(op, "mask", mask, DType::u8, -1, "");
    check_same_device(op, "dy", dy, "mask", mask);
    check_shape(op, "mask", mask, dy.shape());
    check_p(op, p);
    const float* ry = relu_y_arg(op, relu_y, dy, dy.shape());
    if (check_mask && mask.numel() > 0) {
        // The contract is a 0/1 mask (as dropout_forward makes); any other byte is an error, not a guess.
        Tensor host = mask.device().is_cpu() ? mask : mask.to(Device{});
        const uint8_t* m = host.data<uint8_t>();
        for (int64_t i = 0; i < host.numel(); ++i)
            if (m[i] > 1)
                throw ValueError(arg_prefix(op, "mask") + "holds " + std::to_string(m[i]) + " at flat index " +
                                 std::to_string(i) + "; a dropout mask holds only 0 and 1");
    }
    Tensor dx = new_output(op, "dx", "'dy'", dy.shape(), DType::f32, dy);
    if (dx.numel() == 0) return dx;
    AX_DISPATCH(dy.device(), dropout_backward, dy.numel(), dy.data<float>(), mask.data<uint8_t>(), p, ry,
                dx.data<float>());
    return dx;
}

// ---- softmax / cross-entropy ----------------------------------------------------------------------

// labels int32 (N) on like's device, each in [0, C) when check_range (checked on the host).
static void check_labels_arg(const char* op, const Tensor& labels, const char* like_arg, const Tensor& like, int N, int C,
                             bool check_range) {
    check_tensor(op, "labels", labels, DType::i32, 1, "(N,)");
    check_same_device(op, like_arg, like, "labels", labels);
    check_shape(op, "labels", labels, {N});
    if (!check_range) return;
    // Labels are small: check their range on the host so a bad one is an error, not a silent NaN.
    Tensor host = labels.device().is_cpu() ? labels : labels.to(Device{});
    const int32_t* l = host.data<int32_t>();
    for (int i = 0; i < N; ++i)
        if (l[i] < 0 || l[i] >= C)
            throw ValueError(arg_prefix(op, "labels") + "holds " + std::to_string(l[i]) + " at " + std::to_string(i) +
                             ", outside [0, " + std::to_string(C) + ")");
}

static SoftmaxParams softmax_params(const char* op, const Tensor& logits, const Tensor* labels, bool check_range = true) {
    check_tensor(op, "logits", logits, DType::f32, 2, "(N, classes)");
    SoftmaxParams p{dim_int(op, "logits", logits, 0), dim_int(op, "logits", logits, 1)};
    if (p.C < 1) throw ValueError(arg_prefix(op, "logits") + "has no classes");
    if (labels) check_labels_arg(op, *labels, "logits", logits, p.N, p.C, check_range);
    return p;
}

SoftmaxXent softmax_cross_entropy_forward(const Tensor& logits, const Tensor& labels, bool check_labels) {
    const char* op = "softmax_cross_entropy_forward";
    auto p = softmax_params(op, logits, &labels, check_labels);
    SoftmaxXent r;
    r.loss = new_output(op, "loss", "'logits'", {p.N}, DType::f32, logits);
    r.probs = new_output(op, "probs", "'logits'", {p.N, p.C}, DType::f32, logits);
    r.rank = new_output(op, "rank", "'logits'", {p.N}, DType::i32, logits);
    if (p.N == 0) return r;
    AX_DISPATCH(logits.device(), softmax_cross_entropy_forward, p, logits.data<float>(), labels.data<int32_t>(),
                r.loss.data<float>(), r.probs.data<float>(), r.rank.data<int32_t>());
    return r;
}

Tensor softmax_cross_entropy_backward(const Tensor& probs, const Tensor& labels, float scale, bool check_labels) {
    const char* op = "softmax_cross_entropy_backward";
    auto p = softmax_params(op, probs, &labels, check_labels);
    check_finite(op, "scale", scale);
    Tensor d = new_output(op, "dlogits", "'probs'", {p.N, p.C}, DType::f32, probs);
    if (p.N == 0) return d;
    AX_DISPATCH(probs.device(), softmax_cross_entropy_backward, p, probs.data<float>(), labels.data<int32_t>(), scale,
                d.data<float>());
    return d;
}

#ifdef ALEXNET_WITH_CUDA
#define AX_CUDA_ONLY(dev, name, ...)                          \
    do {                                                      \
        DeviceGuard g_(dev);                                  \
        cuda::name(__VA_ARGS__, current_stream((dev).index)); \
    } while (0)
#else
#define AX_CUDA_ONLY(dev, name, ...) throw std::runtime_error(#name ": alexnet_cuda was built without CUDA")
#endif

SoftmaxXent softmax_cross_entropy_forward_parts(const std::vector<Tensor>& parts, const Tensor& labels,
                                                bool check_labels) {
    const char* op = "softmax_cross_entropy_forward";
    if (parts.empty()) throw ValueError(arg_prefix(op, "logit_parts") + "is empty");
    for (const Tensor& x : parts) {
        check_tensor(op, "logit_parts", x, DType::f32, 2, "(N, classes)");
        check_same_device(op, "logit_parts[0]", parts[0], "logit_parts", x);
        if (x.size(0) != parts[0].size(0))
            throw ValueError(arg_prefix(op, "logit_parts") + "parts differ in their batch: " + parts[0].shape_str() +
                             " vs " + x.shape_str());
    }
    // The CPU backend (and more parts than one launch takes) concatenates: the same bits, by the contract.
    if (parts.size() == 1) return softmax_cross_entropy_forward(parts[0], labels, check_labels);
    if (parts[0].device().is_cpu() || static_cast<int>(parts.size()) > kPlumbingMaxParts)
        return softmax_cross_entropy_forward(concat_channels(parts), labels, check_labels);
    SoftmaxParams p{dim_int(op, "logit_parts", parts[0], 0), 0};
    std::vector<const float*> ptr;
    std::vector<int> Cp;
    int64_t C = 0;
    for (const Tensor& x : parts) {
        C = checked::add(op, "logit_parts", C, x.size(1));
        if (x.size(1) == 0) continue;  // holds no class
        ptr.push_back(x.data<float>());
        Cp.push_back(dim_int(op, "logit_parts", x, 1));
    }
    p.C = checked::to_int(op, "logit_parts", C);
    if (p.C < 1) throw ValueError(arg_prefix(op, "logit_parts") + "has no classes");
    check_labels_arg(op, labels, "logit_parts[0]", parts[0], p.N, p.C, check_labels);
    SoftmaxXent r;
    r.loss = new_output(op, "loss", "'logit_parts'", {p.N}, DType::f32, parts[0]);
    r.probs = new_output(op, "probs", "'logit_parts'", {p.N, p.C}, DType::f32, parts[0]);
    r.rank = new_output(op, "rank", "'logit_parts'", {p.N}, DType::i32, parts[0]);
    if (p.N == 0) return r;
    AX_CUDA_ONLY(parts[0].device(), softmax_cross_entropy_forward_parts, p, static_cast<int>(ptr.size()), ptr.data(),
                 Cp.data(), labels.data<int32_t>(), r.loss.data<float>(), r.probs.data<float>(),
                 r.rank.data<int32_t>());
    return r;
}

std::vector<Tensor> softmax_cross_entropy_backward_parts(const Tensor& probs, const Tensor& labels, float scale,
                                                         int parts, bool check_labels) {
    const char* op = "softmax_cross_entropy_backward";
    auto p = softmax_params(op, probs, &labels, check_labels);
    check_finite(op, "scale", scale);
    check_positive(op, "parts", parts);
    if (p.C % parts != 0)
        throw ValueError(arg_prefix(op, "parts") + "(" + std::to_string(parts) + ") does not divide the " +
                         std::to_string(p.C) + " classes");
    const int per = p.C / parts;
    if (parts == 1 || probs.device().is_cpu() || parts > kPlumbingMaxParts) {
        const Tensor d = softmax_cross_entropy_backward(probs, labels, scale, /*check_labels=*/false);
        if (parts == 1) return {d};
        std::vector<Tensor> out;
        for (int u = 0; u < parts; ++u) out.push_back(slice_channels(d, u * per, (u + 1) * per));
        return out;
    }
    std::vector<Tensor> out;
    std::vector<float*> ptr;
    for (int u = 0; u < parts; ++u) {
        out.push_back(new_output(op, "dlogits", "'probs'", {p.N, per}, DType::f32, probs));
        ptr.push_back(out.back().data<float>());
    }
    if (p.N == 0) return out;
    AX_CUDA_ONLY(probs.device(), softmax_cross_entropy_backward_parts, p, parts, probs.data<float>(),
                 labels.data<int32_t>(), scale, ptr.data());
    return out;
}

Tensor softmax_forward(const Tensor& logits) {
    const char* op = "softmax_forward";
    auto p = softmax_params(op, logits, nullptr);
    Tensor probs = new_output(op, "probs", "'logits'", {p.N, p.C}, DType::f32, logits);
    if (p.N == 0) return probs;
    AX_DISPATCH(logits.device(), softmax_forward, p, logits.data<float>(), probs.data<float>());
    return probs;
}

// ---- sgd ------------------------------------------------------------------------------------------

void sgd_update(Tensor& w, const Tensor& dw, Tensor& v, float lr, float momentum, float weight_decay) {
    const char* op = "sgd_update";
    check_tensor(op, "w", w, DType::f32, -1, "");
    check_tensor(op, "dw", dw, DType::f32, -1, "");
    check_tensor(op, "v", v, DType::f32, -1, "");
    check_same_device(op, "w", w, "dw", dw);
    check_same_device(op, "w", w, "v", v);
    check_shape(op, "dw", dw, w.shape());
    check_shape(op, "v", v, w.shape());
    if (!(lr >= 0 && std::isfinite(lr))) throw ValueError(arg_prefix(op, "lr") + "must be finite and >= 0");
    if (!(momentum >= 0 && momentum < 1)) throw ValueError(arg_prefix(op, "momentum") + "must be in [0, 1)");
    if (!(weight_decay >= 0 && std::isfinite(weight_decay)))
        throw ValueError(arg_prefix(op, "weight_decay") + "must be finite and >= 0");
    if (w.numel() == 0) return;
    AX_DISPATCH(w.device(), sgd_update, w.numel(), w.data<float>(), dw.data<float>(), v.data<float>(), lr, momentum,
                weight_decay);
}

void sgd_update_multi(const std::vector<SgdParam>& params, float lr, float momentum, const float* lr_device) {
    const char* op = "sgd_update_multi";
    if (!(lr >= 0 && std::isfinite(lr))) throw ValueError(arg_prefix(op, "lr") + "must be finite and >= 0");
    if (!(momentum >= 0 && momentum < 1)) throw ValueError(arg_prefix(op, "momentum") + "must be in [0, 1)");
    std::vector<SgdSegment> segs;
    segs.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
        const SgdParam& q = params[i];
        const std::string pre = "params[" + std::to_string(i) + "].";
        const std::string aw = pre + "w", adw = pre + "dw", av = pre + "v", awd = pre + "weight_decay";
        if (q.w == nullptr || q.dw == nullptr || q.v == nullptr)
            throw ValueError(arg_prefix(op, ("params[" + std::to_string(i) + "]").c_str()) + "names no tensor");
        check_tensor(op, aw.c_str(), *q.w, DType::f32, -1, "");
        check_tensor(op, adw.c_str(), *q.dw, DType::f32, -1, "");
        check_tensor(op, av.c_str(), *q.v, DType::f32, -1, "");
        const Tensor& w0 = *params[0].w;
        check_same_device(op, "params[0].w", w0, aw.c_str(), *q.w);
        check_same_device(op, "params[0].w", w0, adw.c_str(), *q.dw);
        check_same_device(op, "params[0].w", w0, av.c_str(), *q.v);
        check_shape(op, adw.c_str(), *q.dw, q.w->shape());
        check_shape(op, av.c_str(), *q.v, q.w->shape());
        if (!(q.weight_decay >= 0 && std::isfinite(q.weight_decay)))
            throw ValueError(arg_prefix(op, awd.c_str()) + "must be finite and >= 0");
        if (q.w->numel() == 0) continue;
        segs.push_back({q.w->data<float>(), q.dw->data<float>(), q.v->data<float>(), q.w->numel(), q.weight_decay});
    }
    // Entries run concurrently on CUDA: none may write what another reads or writes.
    std::vector<std::pair<const char*, const char*>> written;
    for (const SgdSegment& g : segs) {
        written.push_back({reinterpret_cast<const char*>(g.w), reinterpret_cast<const char*>(g.w + g.n)});
        written.push_back({reinterpret_cast<const char*>(g.v), reinterpret_cast<const char*>(g.v + g.n)});
    }
    for (size_t a = 0; a < written.size(); ++a)
        for (size_t b = a + 1; b < written.size(); ++b)
            if (written[a].first < written[b].second && written[b].first < written[a].second)
                throw ValueError(std::string(op) + ": argument 'params': two entries' w or v tensors overlap");
    if (lr_device && !(params.empty() || params[0].w->device().is_cuda()))
        throw ValueError(arg_prefix(op, "lr_device") + "is a device address: CUDA tensors only");
    if (segs.empty()) return;
#ifdef ALEXNET_WITH_CUDA
    if (lr_device) {
        DeviceGuard g(params[0].w->device());
        cuda::sgd_update_multi_device_lr(static_cast<int>(segs.size()), segs.data(), lr_device, momentum,
                                         current_stream(params[0].w->device().index));
        return;
    }
#endif
    AX_DISPATCH(params[0].w->device(), sgd_update_multi, static_cast<int>(segs.size()), segs.data(), lr, momentum);
}

// ---- cross-tower plumbing -------------------------------------------------------------------------

// Product of the dimensions after the channel one (tensors here passed check_tensor, so it is < 2^31).
static int64_t inner_size(const Tensor& t) {
    int64_t n = 1;
    for (int64_t i = 2; i < t.dim(); ++i) n *= t.size(i);
    return n;
}

Tensor concat_channels(const std::vector<Tensor>& xs) {
    const char* op = "concat_channels";
    if (xs.empty()) throw ValueError(arg_prefix(op, "xs") + "is empty");
    const Tensor& x0 = xs[0];
    check_tensor(op, "xs", x0, DType::f32, -1, "");
    if (x0.dim() != 2 && x0.dim() != 4)
        throw ValueError(arg_prefix(op, "xs") + "must hold 2-D (N, C) or 4-D (N, C, H, W) tensors, got " + x0.shape_str());
    int64_t C = 0;
    for (const Tensor& x : xs) {
        check_tensor(op, "xs", x, DType::f32, static_cast<int>(x0.dim()), "like xs[0]");
        check_same_device(op, "xs[0]", x0, "xs", x);
        for (int64_t d = 0; d < x0.dim(); ++d)
            if (d != 1 && x.size(d) != x0.size(d))
                throw ValueError(arg_prefix(op, "xs") + "tensors differ outside the channel dimension: " +
                                 x0.shape_str() + " vs " + x.shape_str());
        C = checked::add(op, "xs", C, x.size(1));
    }
    std::vector<int64_t> shape = x0.shape();
    shape[1] = C;
    Tensor y = new_output(op, "y", "'xs'", shape, DType::f32, x0);
    if (y.numel() == 0) return y;
    int c0 = 0;
    const int N = dim_int(op, "xs", x0, 0), Cw = checked::to_int(op, "xs", C);
    if (x0.device().is_cuda()) {
        // One launch for up to kPlumbingMaxParts parts (those holding channels).
        std::vector<const float*> ptr;
        std::vector<int> Cp;
        for (const Tensor& x : xs)
            if (x.size(1) > 0) {
                ptr.push_back(x.data<float>());
                Cp.push_back(dim_int(op, "xs", x, 1));
            }
        if (static_cast<int>(ptr.size()) <= kPlumbingMaxParts) {
            AX_CUDA_ONLY(x0.device(), concat_channels, N, static_cast<int>(ptr.size()), ptr.data(), Cp.data(),
                         inner_size(x0), y.data<float>());
            return y;
        }
    }
    for (const Tensor& x : xs) {
        const int Cp = dim_int(op, "xs", x, 1);
        if (Cp > 0)
            AX_DISPATCH(x0.device(), insert_channels, N, Cp, Cw, c0, inner_size(x0), x.data<float>(), y.data<float>());
        c0 += Cp;
    }
    return y;
}

Tensor slice_channels(const Tensor& x, int c0, int c1) {
    const char* op = "slice_channels";
    check_tensor(op, "x", x, DType::f32, -1, "");
    if (x.dim() != 2 && x.dim() != 4)
        throw ValueError(arg_prefix(op, "x") + "must be 2-D (N, C) or 4-D (N, C, H, W), got " + x.shape_str());
    if (c0 < 0 || c1 > x.size(1) || c0 >= c1)
        throw ValueError(std::string(op) + ": channel range [" + std::to_string(c0) + ", " + std::to_string(c1) +
                         ") is empty or outside [0, " + std::to_string(x.size(1)) + ")");
    std::vector<int64_t> shape = x.shape();
    shape[1] = c1 - c0;
    Tensor y = new_output(op, "y", "'x'", shape, DType::f32, x);
    if (y.numel() == 0) return y;
    AX_DISPATCH(x.device(), extract_channels, dim_int(op, "x", x, 0), c1 - c0, dim_int(op, "x", x, 1), c0,
                inner_size(x), x.data<float>(), y.data<float>());
    return y;
}

Tensor add(const Tensor& a, const Tensor& b) {
    const char* op = "add";
    check_tensor(op, "a", a, DType::f32, -1, "");
    check_tensor(op, "b", b, DType::f32, -1, "");
    check_same_device(op, "a", a, "b", b);
    check_shape(op, "b", b, a.shape());
    Tensor y = new_output(op, "y", "'a'", a.shape(), DType::f32, a);
    if (y.numel() == 0) return y;
    AX_DISPATCH(a.device(), add, a.numel(), a.data<float>(), b.data<float>(), y.data<float>());
    return y;
}

std::vector<Tensor> split_sum_channels(const std::vector<Tensor>& xs, int parts) {
    const char* op = "split_sum_channels";
    if (xs.empty()) throw ValueError(arg_prefix(op, "xs") + "is empty");
    const Tensor& x0 = xs[0];
    check_tensor(op, "xs", x0, DType::f32, -1, "");
    if (x0.dim() != 2 && x0.dim() != 4)
        throw ValueError(arg_prefix(op, "xs") + "must hold 2-D (N, C) or 4-D (N, C, H, W) tensors, got " + x0.shape_str());
    for (const Tensor& x : xs) {
        check_tensor(op, "xs", x, DType::f32, static_cast<int>(x0.dim()), "like xs[0]");
        check_same_device(op, "xs[0]", x0, "xs", x);
        check_shape(op, "xs", x, x0.shape());
    }
    check_positive(op, "parts", parts);
    const int C = dim_int(op, "xs", x0, 1);
    if (C % parts != 0 || C == 0)
        throw ValueError(arg_prefix(op, "parts") + "(" + std::to_string(parts) + ") does not divide the " +
                         std::to_string(C) + " channels into nonempty slices");
    const int per = C / parts;
    const int count = static_cast<int>(xs.size());
    if (x0.device().is_cpu() || count > kPlumbingMaxParts || parts > kPlumbingMaxParts) {
        // slice_channels, then add in tower order: what the one-launch kernel's bits are defined by.
        std::vector<Tensor> out;
        for (int u = 0; u < parts; ++u) {
            Tensor acc = slice_channels(xs[0], u * per, (u + 1) * per);
            for (int t = 1; t < count; ++t) acc = add(acc, slice_channels(xs[t], u * per, (u + 1) * per));
            out.push_back(acc);
        }
        return out;
    }
    std::vector<int64_t> shape = x0.shape();
    shape[1] = per;
    std::vector<Tensor> out;
    std::vector<const float*> in;
    std::vector<float*> ptr;
    for (const Tensor& x : xs) in.push_back(x.data<float>());
    for (int u = 0; u < parts; ++u) {
        out.push_back(new_output(op, "ys", "'xs'", shape, DType::f32, x0));
        ptr.push_back(out.back().data<float>());
    }
    if (out[0].numel() == 0) return out;
    AX_CUDA_ONLY(x0.device(), split_sum_channels, dim_int(op, "xs", x0, 0), count, in.data(), C, parts,
                 inner_size(x0), ptr.data());
    return out;
}
#undef AX_CUDA_ONLY

// ---- augmentation ---------------------------------------------------------------------------------

Tensor augment_batch(const Tensor& images, const Tensor& offsets, const Tensor& flips, const Tensor& light,
                     const Tensor& mean, int crop, const int32_t* host_offsets) {
    const char* op = "augment_batch";
    check_tensor(op, "images", images, DType::u8, 4, "(N, H, W, 3)");
    check_tensor(op, "offsets", offsets, DType::i32, 2, "(N, 2)");
    check_tensor(op, "flips", flips, DType::u8, 1, "(N,)");
    check_tensor(op, "light", light, DType::f32, 2, "(N, 3)");
    check_tensor(op, "mean", mean, DType::f32, 3, "(3, H, W)");
    check_same_device(op, "images", images, "offsets", offsets);
    check_same_device(op, "images", images, "flips", flips);
    check_same_device(op, "images", images, "light", light);
    check_same_device(op, "images", images, "mean", mean);
    if (images.size(3) != 3) throw ValueError(arg_prefix(op, "images") + "must have 3 channels last, got " + images.shape_str());
    AugmentParams p{dim_int(op, "images", images, 0), dim_int(op, "images", images, 1),
                    dim_int(op, "images", images, 2), crop};
    check_shape(op, "offsets", offsets, {p.N, 2});
    check_shape(op, "flips", flips, {p.N});
    check_shape(op, "light", light, {p.N, 3});
    check_shape(op, "mean", mean, {3, p.H, p.W});
    if (crop < 1 || crop > p.H || crop > p.W)
        throw ValueError(arg_prefix(op, "crop") + "must be in [1, min(H, W)], got " + std::to_string(crop));
    Tensor off;
    if (!host_offsets) {
        off = offsets.device().is_cpu() ? offsets : offsets.to(Device{});
        host_offsets = off.data<int32_t>();
    }
    for (int n = 0; n < p.N; ++n) {
        // In 64 bits: an int32 offset near 2^31 plus the crop must not wrap back inside the image.
        const int64_t y0 = host_offsets[2 * n], x0 = host_offsets[2 * n + 1];
        if (y0 < 0 || x0 < 0 || y0 + crop > p.H || x0 + crop > p.W)
            throw ValueError(arg_prefix(op, "offsets") + "row " + std::to_string(n) + " = (" + std::to_string(y0) +
                             ", " + std::to_string(x0) + ") puts the " + std::to_string(crop) + "x" +
                             std::to_string(crop) + " crop outside the " + std::to_string(p.H) + "x" +
                             std::to_string(p.W) + " image");
    }
    Tensor out = new_output(op, "out", "'images', 'crop'", {p.N, 3, crop, crop}, DType::f32, images);
    if (out.numel() == 0) return out;
    AX_DISPATCH(images.device(), augment_batch, p, images.data<uint8_t>(), offsets.data<int32_t>(),
                flips.data<uint8_t>(), light.data<float>(), mean.data<float>(), out.data<float>());
    return out;
}

}  // namespace ops
}  // namespace ax
