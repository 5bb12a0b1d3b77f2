// The op layer: validates every argument (errors name the op and the argument), allocates outputs on the
// inputs' device and dispatches to the CPU or CUDA backend on the thread's current stream.
#include "ops.h"

#include <cmath>
#include <sstream>
#include <string>

namespace ax {

uint32_t dropout_threshold(float p) {
    const double t = static_cast<double>(p) * 4294967296.0;
    return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

namespace {

std::string arg_prefix(const char* op, const char* arg) { return std::string(op) + ": argument '" + arg + "' "; }

void check_tensor(const char* op, const char* arg, const Tensor& t, DType dtype, int dims, const char* layout) {
    if (!t.defined()) throw ValueError(arg_prefix(op, arg) + "is an undefined tensor");
    if (t.dtype() != dtype)
        throw TypeError(arg_prefix(op, arg) + "must be " + dtype_name(dtype) + ", got " + dtype_name(t.dtype()));
    if (dims >= 0 && t.dim() != dims)
        throw ValueError(arg_prefix(op, arg) + "must be " + std::to_string(dims) + "-D " + layout + ", got shape " +
                         t.shape_str());
}

void check_same_device(const char* op, const char* arg0, const Tensor& t0, const char* arg, const Tensor& t) {
    if (t.device() != t0.device())
        throw ValueError(arg_prefix(op, arg) + "is on " + t.device().str() + " but '" + arg0 + "' is on " +
                         t0.device().str() + "; all tensors of one op must be on one device");
}

void check_shape(const char* op, const char* arg, const Tensor& t, const std::vector<int64_t>& want) {
    if (t.shape() != want) {
        std::ostringstream o;
        o << "(";
        for (size_t i = 0; i < want.size(); ++i) o << (i ? ", " : "") << want[i];
        o << (want.size() == 1 ? ",)" : ")");
        throw ValueError(arg_prefix(op, arg) + "must have shape " + o.str() + ", got " + t.shape_str());
    }
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

int to_int(const char* op, const char* arg, int64_t v) {
    if (v > 0x7fffffff) throw ValueError(arg_prefix(op, arg) + "has a dimension too large for this library (> 2^31)");
    return static_cast<int>(v);
}

// Output size of a sliding window; raises when the window does not fit the padded input.
int window_out(const char* op, const char* what, int in, int window, int stride, int pad) {
    if (in + 2 * pad < window)
        throw ValueError(std::string(op) + ": window " + std::to_string(window) + " is larger than the padded input " +
                         what + " " + std::to_string(in) + " + 2*" + std::to_string(pad));
    return (in + 2 * pad - window) / stride + 1;
}

Tensor new_like_device(const std::vector<int64_t>& shape, DType dt, const Tensor& like) {
    DeviceGuard g(like.device());
    return Tensor::empty(shape, dt, like.device());
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

static Conv2dParams conv_params(const char* op, int N, int C, int H, int W, int K, int Cg, int R, int S, int sh,
                                int sw, int ph, int pw, int groups) {
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
    p.N = N; p.C = C; p.H = H; p.W = W; p.K = K; p.R = R; p.S = S;
    p.stride_h = sh; p.stride_w = sw; p.pad_h = ph; p.pad_w = pw; p.groups = groups;
    p.P = window_out(op, "height", H, R, sh, ph);
    p.Q = window_out(op, "width", W, S, sw, pw);
    return p;
}

Tensor conv2d_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, int sh, int sw, int ph, int pw,
                      int groups) {
    const char* op = "conv2d_forward";
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "w", w, DType::f32, 4, "(K, C/groups, R, S)");
    check_same_device(op, "x", x, "w", w);
    auto p = conv_params(op, to_int(op, "x", x.size(0)), to_int(op, "x", x.size(1)), to_int(op, "x", x.size(2)),
                         to_int(op, "x", x.size(3)), to_int(op, "w", w.size(0)), to_int(op, "w", w.size(1)),
                         to_int(op, "w", w.size(2)), to_int(op, "w", w.size(3)), sh, sw, ph, pw, groups);
    const float* bp = nullptr;
    if (b) {
        check_tensor(op, "b", *b, DType::f32, 1, "(K,)");
        check_same_device(op, "x", x, "b", *b);
        check_shape(op, "b", *b, {p.K});
        bp = b->data<float>();
    }
    Tensor y = new_like_device({p.N, p.K, p.P, p.Q}, DType::f32, x);
    AX_DISPATCH(x.device(), conv2d_forward, p, x.data<float>(), w.data<float>(), bp, y.data<float>());
    return y;
}

Tensor conv2d_backward_input(const Tensor& dy, const Tensor& w, int H, int W, int sh, int sw, int ph, int pw,
                             int groups) {
    const char* op = "conv2d_backward_input";
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, K, P, Q)");
    check_tensor(op, "w", w, DType::f32, 4, "(K, C/groups, R, S)");
    check_same_device(op, "dy", dy, "w", w);
    check_positive(op, "H", H);
    check_positive(op, "W", W);
    check_positive(op, "groups", groups);
    const int K = to_int(op, "w", w.size(0)), Cg = to_int(op, "w", w.size(1));
    auto p = conv_params(op, to_int(op, "dy", dy.size(0)), Cg * groups, H, W, K, Cg, to_int(op, "w", w.size(2)),
                         to_int(op, "w", w.size(3)), sh, sw, ph, pw, groups);
    check_shape(op, "dy", dy, {p.N, p.K, p.P, p.Q});
    Tensor dx = new_like_device({p.N, p.C, p.H, p.W}, DType::f32, dy);
    AX_DISPATCH(dy.device(), conv2d_backward_input, p, dy.data<float>(), w.data<float>(), dx.data<float>());
    return dx;
}

Tensor conv2d_backward_weight(const Tensor& x, const Tensor& dy, int R, int S, int sh, int sw, int ph, int pw,
                              int groups) {
    const char* op = "conv2d_backward_weight";
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, K, P, Q)");
    check_same_device(op, "x", x, "dy", dy);
    check_positive(op, "R", R);
    check_positive(op, "S", S);
    check_positive(op, "groups", groups);
    const int C = to_int(op, "x", x.size(1));
    if (C % groups != 0)
        throw ValueError(arg_prefix(op, "groups") + "does not divide the " + std::to_string(C) + " input channels");
    auto p = conv_params(op, to_int(op, "x", x.size(0)), C, to_int(op, "x", x.size(2)), to_int(op, "x", x.size(3)),
                         to_int(op, "dy", dy.size(1)), C / groups, R, S, sh, sw, ph, pw, groups);
    check_shape(op, "dy", dy, {p.N, p.K, p.P, p.Q});
    Tensor dw = new_like_device({p.K, p.C / groups, p.R, p.S}, DType::f32, x);
    AX_DISPATCH(x.device(), conv2d_backward_weight, p, x.data<float>(), dy.data<float>(), dw.data<float>());
    return dw;
}

Tensor conv2d_backward_bias(const Tensor& dy) {
    const char* op = "conv2d_backward_bias";
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, K, P, Q)");
    Conv2dParams p{};
    p.N = to_int(op, "dy", dy.size(0)); p.K = to_int(op, "dy", dy.size(1));
    p.P = to_int(op, "dy", dy.size(2)); p.Q = to_int(op, "dy", dy.size(3));
    Tensor db = new_like_device({p.K}, DType::f32, dy);
    AX_DISPATCH(dy.device(), conv2d_backward_bias, p, dy.data<float>(), db.data<float>());
    return db;
}

// ---- linear ---------------------------------------------------------------------------------------

Tensor linear_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b) {
    const char* op = "linear_forward";
    check_tensor(op, "x", x, DType::f32, 2, "(N, in)");
    check_tensor(op, "w", w, DType::f32, 2, "(out, in)");
    check_same_device(op, "x", x, "w", w);
    LinearParams p{to_int(op, "x", x.size(0)), to_int(op, "x", x.size(1)), to_int(op, "w", w.size(0))};
    if (w.size(1) != p.I)
        throw ValueError(arg_prefix(op, "w") + "has " + std::to_string(w.size(1)) + " input features but x has " +
                         std::to_string(p.I));
    const float* bp = nullptr;
    if (b) {
        check_tensor(op, "b", *b, DType::f32, 1, "(out,)");
        check_same_device(op, "x", x, "b", *b);
        check_shape(op, "b", *b, {p.O});
        bp = b->data<float>();
    }
    Tensor y = new_like_device({p.N, p.O}, DType::f32, x);
    AX_DISPATCH(x.device(), linear_forward, p, x.data<float>(), w.data<float>(), bp, y.data<float>());
    return y;
}

Tensor linear_backward_input(const Tensor& dy, const Tensor& w) {
    const char* op = "linear_backward_input";
    check_tensor(op, "dy", dy, DType::f32, 2, "(N, out)");
    check_tensor(op, "w", w, DType::f32, 2, "(out, in)");
    check_same_device(op, "dy", dy, "w", w);
    LinearParams p{to_int(op, "dy", dy.size(0)), to_int(op, "w", w.size(1)), to_int(op, "w", w.size(0))};
    if (dy.size(1) != p.O)
        throw ValueError(arg_prefix(op, "dy") + "has " + std::to_string(dy.size(1)) + " features but w has " +
                         std::to_string(p.O) + " outputs");
    Tensor dx = new_like_device({p.N, p.I}, DType::f32, dy);
    AX_DISPATCH(dy.device(), linear_backward_input, p, dy.data<float>(), w.data<float>(), dx.data<float>());
    return dx;
}

Tensor linear_backward_weight(const Tensor& x, const Tensor& dy) {
    const char* op = "linear_backward_weight";
    check_tensor(op, "x", x, DType::f32, 2, "(N, in)");
    check_tensor(op, "dy", dy, DType::f32, 2, "(N, out)");
    check_same_device(op, "x", x, "dy", dy);
    LinearParams p{to_int(op, "x", x.size(0)), to_int(op, "x", x.size(1)), to_int(op, "dy", dy.size(1))};
    if (dy.size(0) != p.N)
        throw ValueError(arg_prefix(op, "dy") + "has batch " + std::to_string(dy.size(0)) + " but x has " +
                         std::to_string(p.N));
    Tensor dw = new_like_device({p.O, p.I}, DType::f32, x);
    AX_DISPATCH(x.device(), linear_backward_weight, p, x.data<float>(), dy.data<float>(), dw.data<float>());
    return dw;
}

Tensor linear_backward_bias(const Tensor& dy) {
    const char* op = "linear_backward_bias";
    check_tensor(op, "dy", dy, DType::f32, 2, "(N, out)");
    LinearParams p{to_int(op, "dy", dy.size(0)), 0, to_int(op, "dy", dy.size(1))};
    Tensor db = new_like_device({p.O}, DType::f32, dy);
    AX_DISPATCH(dy.device(), linear_backward_bias, p, dy.data<float>(), db.data<float>());
    return db;
}

// ---- relu -----------------------------------------------------------------------------------------

Tensor relu_forward(const Tensor& x) {
    const char* op = "relu_forward";
    check_tensor(op, "x", x, DType::f32, -1, "");
    Tensor y = new_like_device(x.shape(), DType::f32, x);
    AX_DISPATCH(x.device(), relu_forward, x.numel(), x.data<float>(), y.data<float>());
    return y;
}

Tensor relu_backward(const Tensor& dy, const Tensor& y) {
    const char* op = "relu_backward";
    check_tensor(op, "dy", dy, DType::f32, -1, "");
    check_tensor(op, "y", y, DType::f32, -1, "");
    check_same_device(op, "dy", dy, "y", y);
    check_shape(op, "y", y, dy.shape());
    Tensor dx = new_like_device(dy.shape(), DType::f32, dy);
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
    return LrnParams{to_int(op, "x", x.size(0)), to_int(op, "x", x.size(1)), to_int(op, "x", x.size(2)),
                     to_int(op, "x", x.size(3)), size, k, alpha, beta};
}

std::pair<Tensor, Tensor> lrn_forward(const Tensor& x, int size, float k, float alpha, float beta) {
    const char* op = "lrn_forward";
    auto p = lrn_params(op, x, size, k, alpha, beta);
    Tensor y = new_like_device(x.shape(), DType::f32, x);
    Tensor scale = new_like_device(x.shape(), DType::f32, x);
    AX_DISPATCH(x.device(), lrn_forward, p, x.data<float>(), y.data<float>(), scale.data<float>());
    return {y, scale};
}

Tensor lrn_backward(const Tensor& dy, const Tensor& x, const Tensor& y, const Tensor& scale, int size, float k,
                    float alpha, float beta) {
    const char* op = "lrn_backward";
    auto p = lrn_params(op, x, size, k, alpha, beta);
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "y", y, DType::f32, 4, "(N, C, H, W)");
    check_tensor(op, "scale", scale, DType::f32, 4, "(N, C, H, W)");
    check_same_device(op, "x", x, "dy", dy);
    check_same_device(op, "x", x, "y", y);
    check_same_device(op, "x", x, "scale", scale);
    check_shape(op, "dy", dy, x.shape());
    check_shape(op, "y", y, x.shape());
    check_shape(op, "scale", scale, x.shape());
    Tensor dx = new_like_device(x.shape(), DType::f32, x);
    AX_DISPATCH(x.device(), lrn_backward, p, dy.data<float>(), x.data<float>(), y.data<float>(), scale.data<float>(),
                dx.data<float>());
    return dx;
}

// ---- max-pooling ----------------------------------------------------------------------------------

static PoolParams pool_params(const char* op, int N, int C, int H, int W, int wh, int ww, int sh, int sw, int ph,
                              int pw) {
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
    p.N = N; p.C = C; p.H = H; p.W = W;
    p.window_h = wh; p.window_w = ww; p.stride_h = sh; p.stride_w = sw; p.pad_h = ph; p.pad_w = pw;
    p.P = window_out(op, "height", H, wh, sh, ph);
    p.Q = window_out(op, "width", W, ww, sw, pw);
    return p;
}

std::pair<Tensor, Tensor> maxpool_forward(const Tensor& x, int wh, int ww, int sh, int sw, int ph, int pw) {
    const char* op = "maxpool_forward";
    check_tensor(op, "x", x, DType::f32, 4, "(N, C, H, W)");
    auto p = pool_params(op, to_int(op, "x", x.size(0)), to_int(op, "x", x.size(1)), to_int(op, "x", x.size(2)),
                         to_int(op, "x", x.size(3)), wh, ww, sh, sw, ph, pw);
    Tensor y = new_like_device({p.N, p.C, p.P, p.Q}, DType::f32, x);
    Tensor am = new_like_device({p.N, p.C, p.P, p.Q}, DType::i32, x);
    AX_DISPATCH(x.device(), maxpool_forward, p, x.data<float>(), y.data<float>(), am.data<int32_t>());
    return {y, am};
}

Tensor maxpool_backward(const Tensor& dy, const Tensor& argmax, int H, int W, int wh, int ww, int sh, int sw, int ph,
                        int pw) {
    const char* op = "maxpool_backward";
    check_tensor(op, "dy", dy, DType::f32, 4, "(N, C, P, Q)");
    check_tensor(op, "argmax", argmax, DType::i32, 4, "(N, C, P, Q)");
    check_same_device(op, "dy", dy, "argmax", argmax);
    check_positive(op, "H", H);
    check_positive(op, "W", W);
    auto p = pool_params(op, to_int(op, "dy", dy.size(0)), to_int(op, "dy", dy.size(1)), H, W, wh, ww, sh, sw, ph, pw);
    check_shape(op, "dy", dy, {p.N, p.C, p.P, p.Q});
    check_shape(op, "argmax", argmax, dy.shape());
    Tensor dx = new_like_device({p.N, p.C, p.H, p.W}, DType::f32, dy);
    AX_DISPATCH(dy.device(), maxpool_backward, p, dy.data<float>(), argmax.data<int32_t>(), dx.data<float>());
    return dx;
}

// ---- dropout --------------------------------------------------------------------------------------

static void check_p(const char* op, float p) {
    if (!(p >= 0.0f && p < 1.0f)) throw ValueError(arg_prefix(op, "p") + "must be in [0, 1), got " + std::to_string(p));
}

std::pair<Tensor, Tensor> dropout_forward(const Tensor& x, float p, uint64_t seed, uint64_t offset) {
    const char* op = "dropout_forward";
    check_tensor(op, "x", x, DType::f32, -1, "");
    check_p(op, p);
    Tensor y = new_like_device(x.shape(), DType::f32, x);
    Tensor mask = new_like_device(x.shape(), DType::u8, x);
    AX_DISPATCH(x.device(), dropout_forward, x.numel(), x.data<float>(), p, seed, offset, y.data<float>(),
                mask.data<uint8_t>());
    return {y, mask};
}

Tensor dropout_backward(const Tensor& dy, const Tensor& mask, float p) {
    const char* op = "dropout_backward";
    check_tensor(op, "dy", dy, DType::f32, -1, "");
    check_tensor(op, "mask", mask, DType::u8, -1, "");
    check_same_device(op, "dy", dy, "mask", mask);
    check_shape(op, "mask", mask, dy.shape());
    check_p(op, p);
    Tensor dx = new_like_device(dy.shape(), DType::f32, dy);
    AX_DISPATCH(dy.device(), dropout_backward, dy.numel(), dy.data<float>(), mask.data<uint8_t>(), p,
                dx.data<float>());
    return dx;
}

// ---- softmax / cross-entropy ----------------------------------------------------------------------

static SoftmaxParams softmax_params(const char* op, const Tensor& logits, const Tensor* labels, bool check_range = true) {
    check_tensor(op, "logits", logits, DType::f32, 2, "(N, classes)");
    SoftmaxParams p{to_int(op, "logits", logits.size(0)), to_int(op, "logits", logits.size(1))};
    if (p.C < 1) throw ValueError(arg_prefix(op, "logits") + "has no classes");
    if (labels) {
        check_tensor(op, "labels", *labels, DType::i32, 1, "(N,)");
        check_same_device(op, "logits", logits, "labels", *labels);
        check_shape(op, "labels", *labels, {p.N});
        if (!check_range) return p;
        // Labels are small: check their range on the host so a bad one is an error, not a silent NaN.
        Tensor host = labels->device().is_cpu() ? *labels : labels->to(Device{});
        const int32_t* l = host.data<int32_t>();
        for (int i = 0; i < p.N; ++i)
            if (l[i] < 0 || l[i] >= p.C)
                throw ValueError(arg_prefix(op, "labels") + "holds " + std::to_string(l[i]) + " at " + std::to_string(i) +
                                 ", outside [0, " + std::to_string(p.C) + ")");
    }
    return p;
}

SoftmaxXent softmax_cross_entropy_forward(const Tensor& logits, const Tensor& labels, bool check_labels) {
    const char* op = "softmax_cross_entropy_forward";
    auto p = softmax_params(op, logits, &labels, check_labels);
    SoftmaxXent r;
    r.loss = new_like_device({p.N}, DType::f32, logits);
    r.probs = new_like_device({p.N, p.C}, DType::f32, logits);
    r.rank = new_like_device({p.N}, DType::i32, logits);
    AX_DISPATCH(logits.device(), softmax_cross_entropy_forward, p, logits.data<float>(), labels.data<int32_t>(),
                r.loss.data<float>(), r.probs.data<float>(), r.rank.data<int32_t>());
    return r;
}

Tensor softmax_cross_entropy_backward(const Tensor& probs, const Tensor& labels, float scale, bool check_labels) {
    const char* op = "softmax_cross_entropy_backward";
    auto p = softmax_params(op, probs, &labels, check_labels);
    check_finite(op, "scale", scale);
    Tensor d = new_like_device({p.N, p.C}, DType::f32, probs);
    AX_DISPATCH(probs.device(), softmax_cross_entropy_backward, p, probs.data<float>(), labels.data<int32_t>(), scale,
                d.data<float>());
    return d;
}

Tensor softmax_forward(const Tensor& logits) {
    const char* op = "softmax_forward";
    auto p = softmax_params(op, logits, nullptr);
    Tensor probs = new_like_device({p.N, p.C}, DType::f32, logits);
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
    AX_DISPATCH(w.device(), sgd_update, w.numel(), w.data<float>(), dw.data<float>(), v.data<float>(), lr, momentum,
                weight_decay);
}

// ---- cross-tower plumbing -------------------------------------------------------------------------

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
        C += x.size(1);
    }
    std::vector<int64_t> shape = x0.shape();
    shape[1] = C;
    Tensor y = new_like_device(shape, DType::f32, x0);
    int c0 = 0;
    const int N = to_int(op, "xs", x0.size(0));
    for (const Tensor& x : xs) {
        const int Cp = to_int(op, "xs", x.size(1));
        AX_DISPATCH(x0.device(), insert_channels, N, Cp, static_cast<int>(C), c0, inner_size(x0), x.data<float>(),
                    y.data<float>());
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
    Tensor y = new_like_device(shape, DType::f32, x);
    AX_DISPATCH(x.device(), extract_channels, to_int(op, "x", x.size(0)), c1 - c0, to_int(op, "x", x.size(1)), c0,
                inner_size(x), x.data<float>(), y.data<float>());
    return y;
}

Tensor add(const Tensor& a, const Tensor& b) {
    const char* op = "add";
    check_tensor(op, "a", a, DType::f32, -1, "");
    check_tensor(op, "b", b, DType::f32, -1, "");
    check_same_device(op, "a", a, "b", b);
    check_shape(op, "b", b, a.shape());
    Tensor y = new_like_device(a.shape(), DType::f32, a);
    AX_DISPATCH(a.device(), add, a.numel(), a.data<float>(), b.data<float>(), y.data<float>());
    return y;
}

// ---- augmentation ---------------------------------------------------------------------------------

Tensor augment_batch(const Tensor& images, const Tensor& offsets, const Tensor& flips, const Tensor& light,
                     const Tensor& mean, int crop) {
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
    AugmentParams p{to_int(op, "images", images.size(0)), to_int(op, "images", images.size(1)),
                    to_int(op, "images", images.size(2)), crop};
    check_shape(op, "offsets", offsets, {p.N, 2});
    check_shape(op, "flips", flips, {p.N});
    check_shape(op, "light", light, {p.N, 3});
    check_shape(op, "mean", mean, {3, p.H, p.W});
    if (crop < 1 || crop > p.H || crop > p.W)
        throw ValueError(arg_prefix(op, "crop") + "must be in [1, min(H, W)], got " + std::to_string(crop));
    Tensor off = offsets.device().is_cpu() ? offsets : offsets.to(Device{});
    for (int n = 0; n < p.N; ++n) {
        const int y0 = off.data<int32_t>()[2 * n], x0 = off.data<int32_t>()[2 * n + 1];
        if (y0 < 0 || x0 < 0 || y0 + crop > p.H || x0 + crop > p.W)
            throw ValueError(arg_prefix(op, "offsets") + "row " + std::to_string(n) + " puts the crop outside the image");
    }
    Tensor out = new_like_device({p.N, 3, crop, crop}, DType::f32, images);
    AX_DISPATCH(images.device(), augment_batch, p, images.data<uint8_t>(), offsets.data<int32_t>(),
                flips.data<uint8_t>(), light.data<float>(), mean.data<float>(), out.data<float>());
    return out;
}

}  // namespace ops
}  // namespace ax
