"""NumPy float64 reference of every op, forward and backward: the oracle the tests compare both backends with.

Signatures and semantics follow ``alexnet_cuda.ops`` (contracts in csrc/ops.h). Inputs may be any numeric
arrays; float results come back as float64, integer results (pooling argmax, softmax rank) as int32 and
dropout masks as uint8. Stride, padding, window, kernel and input_hw arguments take an int or a pair.

Written to be read, not to be fast: convolution is an explicit im2col followed by one matrix product per group.
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward_bias",
    "linear_forward", "linear_backward_input", "linear_backward_weight", "linear_backward_bias",
    "relu_forward", "relu_backward", "lrn_forward", "lrn_backward", "lrn_maxpool_forward", "maxpool_forward",
    "maxpool_backward",
    "philox4x32_10", "philox_u32", "dropout_threshold", "dropout_mask", "dropout_forward", "dropout_backward",
    "softmax_forward", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward", "sgd_update",
    "sgd_update_multi",
    "concat_channels", "slice_channels", "add", "augment_batch",
]


def _pair(v):
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def _f64(a):
    return np.asarray(a, dtype=np.float64)


# ---- convolution: x (N,C,H,W), w (K,C/groups,R,S), y (N,K,P,Q) ------------------------------------------

def _out_size(size, window, stride, pad):
    return (size + 2 * pad - window) // stride + 1


def _im2col(x, kernel, stride, padding, groups):
    """Columns of a grouped convolution: (N, groups, P*Q, C/groups*R*S), column order (c, r, s)."""
    (R, S), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = sliding_window_view(xp, (R, S), axis=(2, 3))[:, :, ::sh, ::sw]  # (N, C, P, Q, R, S)
    P, Q = win.shape[2], win.shape[3]
    win = win.reshape(N, groups, C // groups, P, Q, R, S)
    return win.transpose(0, 1, 3, 4, 2, 5, 6).reshape(N, groups, P * Q, (C // groups) * R * S), P, Q


def conv2d_forward(x, w, b=None, stride=1, padding=0, groups=1, relu=False):
    x, w = _f64(x), _f64(w)
    N = x.shape[0]
    K, Cg, R, S = w.shape
    cols, P, Q = _im2col(x, (R, S), stride, padding, groups)
    wmat = w.reshape(groups, K // groups, Cg * R * S)
    y = cols @ wmat.transpose(0, 2, 1)  # (N, G, PQ, K/G)
    y = y.transpose(0, 1, 3, 2).reshape(N, K, P, Q)
    if b is not None:
        y = y + _f64(b)[None, :, None, None]
    return relu_forward(y) if relu else y


def conv2d_backward_input(dy, w, input_hw, stride=1, padding=0, groups=1, relu_y=None):
    dy, w = _f64(dy), _f64(w)
    (H, W), (sh, sw), (ph, pw) = _pair(input_hw), _pair(stride), _pair(padding)
    N, K, P, Q = dy.shape
    _, Cg, R, S = w.shape
    G = groups
    dyg = dy.reshape(N, G, K // G, P * Q).transpose(0, 1, 3, 2)  # (N, G, PQ, K/G)
    dcols = dyg @ w.reshape(G, K // G, Cg * R * S)  # (N, G, PQ, Cg*R*S)
    dcols = dcols.reshape(N, G, P, Q, Cg, R, S).transpose(0, 1, 4, 5, 6, 2, 3).reshape(N, G * Cg, R, S, P, Q)
    # col2im: window offset (r, s) of output (p, q) reads padded input (r + p*sh, s + q*sw).
    dxp = np.zeros((N, G * Cg, H + 2 * ph, W + 2 * pw))
    for r in range(R):
        for s in range(S):
            dxp[:, :, r:r + sh * P:sh, s:s + sw * Q:sw] += dcols[:, :, r, s]
    dx = dxp[:, :, ph:ph + H, pw:pw + W].copy()
    return dx if relu_y is None else relu_backward(dx, relu_y)


def conv2d_backward_weight(x, dy, kernel, stride=1, padding=0, groups=1):
    x, dy = _f64(x), _f64(dy)
    R, S = _pair(kernel)
    N, K, P, Q = dy.shape
    G = groups
    cols, _, _ = _im2col(x, (R, S), stride, padding, G)  # (N, G, PQ, Cg*R*S)
    Cg = x.shape[1] // G
    dyg = dy.reshape(N, G, K // G, P * Q)
    # dw_g = sum over images and output pixels of dy_g (K/G, PQ) @ cols_g (PQ, Cg*R*S).
    dw = np.einsum("ngkp,ngpc->gkc", dyg, cols, optimize=True)
    return dw.reshape(K, Cg, R, S)


def conv2d_backward_bias(dy):
    return _f64(dy).sum(axis=(0, 2, 3))


# ---- linear: x (N,I), w (O,I), y = x w^T + b ----------------------------------------------------------

def linear_forward(x, w, b=None, relu=False):
    y = _f64(x) @ _f64(w).T
    y = y if b is None else y + _f64(b)[None, :]
    return relu_forward(y) if relu else y


def linear_backward_input(dy, w):
    return _f64(dy) @ _f64(w)


def linear_backward_weight(x, dy):
    return _f64(dy).T @ _f64(x)


def linear_backward_bias(dy):
    return _f64(dy).sum(axis=0)


# ---- relu -------------------------------------------------------------------------------------------

def relu_forward(x):
    return np.maximum(_f64(x), 0.0)


def relu_backward(dy, y):
    return np.where(_f64(y) > 0, _f64(dy), 0.0)


# ---- local response normalization across channels -----------------------------------------------------

def _channel_window_sum(a, size):
    """out[:, c] = sum of a[:, j] for j in [c - size//2, c + size//2] clipped to the channels."""
    half = size // 2
    C = a.shape[1]
    padded = np.pad(a, ((0, 0), (half, half), (0, 0), (0, 0)))
    return sum(padded[:, j:j + C] for j in range(size))


def lrn_forward(x, size=5, k=2.0, alpha=1e-4, beta=0.75):
    """Returns (y, scale): scale = k + alpha * (window sum of x^2), y = x * scale^-beta."""
    x = _f64(x)
    scale = k + alpha * _channel_window_sum(x * x, size)
    return x * scale ** (-beta), scale


def lrn_backward(dy, x, y, scale, size=5, k=2.0, alpha=1e-4, beta=0.75, relu=False):
    """dx = dy scale^-beta - 2 alpha beta x * windowsum(dy y / scale).

    y and scale are accepted for parity with the op; the reference recomputes both from x in float64.
    """
    dy, x = _f64(dy), _f64(x)
    y, scale = lrn_forward(x, size, k, alpha, beta)
    dx = dy * scale ** (-beta) - 2.0 * alpha * beta * x * _channel_window_sum(dy * y / scale, size)
    return relu_backward(dx, x) if relu else dx


# ---- max-pooling ----------------------------------------------------------------------------------

def maxpool_forward(x, window=3, stride=2, padding=0):
    """Returns (y, argmax int32 = h*W+w). Padding is -inf (never chosen); ties go to the first maximum in
    row-major window order."""
    x = _f64(x)
    (wh, ww), (sh, sw), (ph, pw) = _pair(window), _pair(stride), _pair(padding)
    N, C, H, W = x.shape
    P, Q = _out_size(H, wh, sh, ph), _out_size(W, ww, sw, pw)
    best = np.full((N, C, P, Q), -np.inf)
    idx = np.full((N, C, P, Q), -1, dtype=np.int64)
    for i in range(wh):  # window offsets in row-major order; strict '>' keeps the first maximum
        h = np.arange(P) * sh - ph + i
        for j in range(ww):
            w = np.arange(Q) * sw - pw + j
            valid = ((h >= 0) & (h < H))[:, None] & ((w >= 0) & (w < W))[None, :]
            v = x[:, :, np.clip(h, 0, H - 1)][:, :, :, np.clip(w, 0, W - 1)]
            take = valid & ((idx < 0) | (v > best))
            best = np.where(take, v, best)
            idx = np.where(take, h[:, None] * W + w[None, :], idx)
    return best, idx.astype(np.int32)


def lrn_maxpool_forward(x, size=5, k=2.0, alpha=1e-4, beta=0.75, window=3, stride=2, padding=0):
    """(y, scale, pool_y, argmax): lrn_forward(x), then maxpool_forward of its y."""
    y, scale = lrn_forward(x, size, k, alpha, beta)
    pool_y, argmax = maxpool_forward(y, window, stride, padding)
    return y, scale, pool_y, argmax


def maxpool_backward(dy, argmax, input_hw, window=3, stride=2, padding=0, relu_y=None):
    """dx: each input element receives the sum of dy over the outputs whose argmax it is."""
    dy = _f64(dy)
    H, W = _pair(input_hw)
    N, C, P, Q = dy.shape
    dx = np.zeros((N * C, H * W))
    rows = np.repeat(np.arange(N * C), P * Q)
    np.add.at(dx, (rows, np.asarray(argmax).reshape(-1).astype(np.int64)), dy.reshape(-1))
    dx = dx.reshape(N, C, H, W)
    return dx if relu_y is None else relu_backward(dx, relu_y)


# ---- dropout: Philox4x32-10 counter-based RNG ----------------------------------------------------------

_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 words: counter = (c0, c1, c2, c3) arrays (broadcast
    together), key = (k0, k1). Returns the four output words as uint32 arrays."""
    c = [np.asarray(v, dtype=np.uint64) & _MASK32 for v in counter]
    c = list(np.broadcast_arrays(*c))
    k0, k1 = (np.uint64(int(v) & 0xFFFFFFFF) for v in key)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # < 2^64: exact in uint64
        p1 = np.uint64(0xCD9E8D57) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(0x9E3779B9)) & _MASK32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _MASK32
    return [v.astype(np.uint32) for v in c]


def philox_u32(seed, counter):
    """First word of Philox4x32-10 at counter (ctr_lo, ctr_hi, 0, 0) under key (seed_lo, seed_hi), as
    csrc/philox.h; counter is an integer or a uint64 array."""
    ctr = np.asarray(counter, dtype=np.uint64)
    seed = int(seed) % 2**64
    return philox4x32_10((ctr & _MASK32, ctr >> np.uint64(32), 0, 0), (seed & 0xFFFFFFFF, seed >> 32))[0]


def dropout_threshold(p):
    """The uint32 threshold of ops.cpp: floor(float32(p) * 2^32), saturated at 2^32 - 1."""
    t = float(np.float32(p)) * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def dropout_mask(shape, p, seed, offset=0):
    """uint8 mask: element i (flat, row-major) is kept iff philox_u32(seed, offset + i) >= threshold(p)."""
    n = int(np.prod(shape, dtype=np.int64))
    counters = np.arange(n, dtype=np.uint64) + np.uint64(int(offset) % 2**64)  # wraps mod 2^64 like C++
    return (philox_u32(seed, counters) >= np.uint64(dropout_threshold(p))).astype(np.uint8).reshape(shape)


def dropout_forward(x, p=0.5, seed=0, offset=0):
    """Inverted dropout: returns (y, mask) with y = x * mask / (1 - p)."""
    x = _f64(x)
    mask = dropout_mask(x.shape, p, seed, offset)
    return x * mask / (1.0 - p), mask


def dropout_backward(dy, mask, p=0.5, relu_y=None):
    dx = _f64(dy) * np.asarray(mask) / (1.0 - p)
    return dx if relu_y is None else relu_backward(dx, relu_y)


# ---- softmax and cross-entropy: logits (N, classes), int labels (N,) ------------------------------------

def softmax_forward(logits):
    z = _f64(logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy_forward(logits, labels):
    """Returns (loss per sample = -log softmax[label], probs, rank int32). rank counts the classes whose
    logit beats the label's, ties going to the lower class index; top-k is a hit iff rank < k."""
    z = _f64(logits)
    labels = np.asarray(labels).astype(np.int64)
    n = np.arange(z.shape[0])
    m = z.max(axis=1, keepdims=True)
    sum_exp = np.exp(z - m).sum(axis=1)
    probs = np.exp(z - m) / sum_exp[:, None]
    loss = np.log(sum_exp) - (z[n, labels] - m[:, 0])
    zl = z[n, labels][:, None]
    classes = np.arange(z.shape[1])[None, :]
    rank = ((z > zl) | ((z == zl) & (classes < labels[:, None]))).sum(axis=1)
    return loss, probs, rank.astype(np.int32)


def softmax_cross_entropy_backward(probs, labels, scale):
    """dlogits = (probs - onehot(labels)) * scale."""
    d = _f64(probs).copy()
    d[np.arange(d.shape[0]), np.asarray(labels).astype(np.int64)] -= 1.0
    return d * scale


# ---- SGD with momentum and weight decay (ALEXNET.md) ----------------------------------------------------

def sgd_update(w, dw, v, lr, momentum=0.9, weight_decay=0.0005):
    """Returns the new (w, v): v = momentum v - weight_decay lr w - lr dw; w = w + v."""
    w, dw, v = _f64(w), _f64(dw), _f64(v)
    v = momentum * v - weight_decay * lr * w - lr * dw
    return w + v, v


def sgd_update_multi(params, lr, momentum=0.9):
    """sgd_update of every (w, dw, v, weight_decay) in params: returns (w0, v0, w1, v1, ...), the new values."""
    out = []
    for w, dw, v, wd in params:
        out += list(sgd_update(w, dw, v, lr, momentum, wd))
    return tuple(out)


# ---- cross-tower plumbing -------------------------------------------------------------------------

def concat_channels(xs):
    return np.concatenate([_f64(x) for x in xs], axis=1)


def slice_channels(x, c0, c1):
    return _f64(x)[:, c0:c1].copy()


def add(a, b):
    return _f64(a) + _f64(b)


def split_sum_channels(xs, parts):
    """Slice u of every x (the channels cut into `parts` equal slices), summed over the xs."""
    per = xs[0].shape[1] // parts
    return [sum(_f64(x)[:, u * per:(u + 1) * per] for x in xs) for u in range(parts)]


# ---- augmentation ---------------------------------------------------------------------------------

def augment_batch(images, offsets, flips, light, mean, crop):
    """uint8 images (N,H,W,3) -> (N,3,crop,crop): crop at offsets (y0, x0), mirror where flips is set, subtract
    the mean image (3,H,W) at the same source pixels, add the per-image lighting light (N,3)."""
    images, mean, light = np.asarray(images), _f64(mean), _f64(light)
    out = np.empty((images.shape[0], 3, crop, crop))
    for n in range(images.shape[0]):
        y0, x0 = (int(v) for v in offsets[n])
        patch = images[n, y0:y0 + crop, x0:x0 + crop, :].astype(np.float64).transpose(2, 0, 1)
        patch = patch - mean[:, y0:y0 + crop, x0:x0 + crop]
        if flips[n]:
            patch = patch[:, :, ::-1]
        out[n] = patch + light[n][:, None, None]
    return out
