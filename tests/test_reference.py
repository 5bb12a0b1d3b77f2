"""The NumPy oracle checked on its own: forwards against naive loops written straight from the definitions,
backwards against central finite differences in float64, Philox against published known-answer vectors and an
independent scalar implementation."""
import numpy as np
import pytest

from alexnet_cuda import reference as ref


def numgrad(f, x, eps=1e-6):
    """Central-difference gradient of the scalar f at every element of x (float64)."""
    x = x.astype(np.float64).copy()
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def assert_close(a, b, tol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)
    assert err < tol, f"relative error {err:.3e}"


# ---- convolution ----------------------------------------------------------------------------------

def naive_conv(x, w, b, stride, padding, groups):
    (sh, sw), (ph, pw) = ref._pair(stride), ref._pair(padding)
    N, C, H, W = x.shape
    K, Cg, R, S = w.shape
    P, Q = (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1
    y = np.zeros((N, K, P, Q))
    Kg = K // groups
    for n in range(N):
        for k in range(K):
            g = k // Kg
            for p in range(P):
                for q in range(Q):
                    acc = b[k] if b is not None else 0.0
                    for c in range(Cg):
                        for r in range(R):
                            for s in range(S):
                                h, ww = p * sh - ph + r, q * sw - pw + s
                                if 0 <= h < H and 0 <= ww < W:
                                    acc += x[n, g * Cg + c, h, ww] * w[k, c, r, s]
                    y[n, k, p, q] = acc
    return y


CONV_CASES = [  # N, C, H, W, K, R, S, stride, padding, groups
    (2, 3, 7, 5, 5, 3, 2, 1, 0, 1),
    (1, 4, 6, 7, 6, 3, 3, (2, 3), (1, 2), 2),
    (2, 6, 5, 5, 9, 2, 3, 3, 1, 3),
    (1, 2, 1, 1, 4, 1, 1, 1, 0, 2),
    (1, 2, 3, 3, 2, 3, 3, 1, 1, 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_matches_naive_loops(rng, case):
    N, C, H, W, K, R, S, st, pad, g = case
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C // g, R, S)), rng.standard_normal(K)
    assert_close(ref.conv2d_forward(x, w, b, st, pad, g), naive_conv(x, w, b, st, pad, g), 1e-12)
    assert_close(ref.conv2d_forward(x, w, None, st, pad, g), naive_conv(x, w, None, st, pad, g), 1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_backward_matches_finite_differences(rng, case):
    N, C, H, W, K, R, S, st, pad, g = case
    x, w, b = rng.standard_normal((N, C, H, W)), rng.standard_normal((K, C // g, R, S)), rng.standard_normal(K)
    dy = rng.standard_normal(ref.conv2d_forward(x, w, b, st, pad, g).shape)
    loss = lambda x_, w_, b_: float((ref.conv2d_forward(x_, w_, b_, st, pad, g) * dy).sum())
    assert_close(ref.conv2d_backward_input(dy, w, (H, W), st, pad, g), numgrad(lambda v: loss(v, w, b), x))
    assert_close(ref.conv2d_backward_weight(x, dy, (R, S), st, pad, g), numgrad(lambda v: loss(x, v, b), w))
    assert_close(ref.conv2d_backward_bias(dy), numgrad(lambda v: loss(x, w, v), b))


# ---- linear, relu --------------------------------------------------------------------------------

@pytest.mark.parametrize("N,I,O", [(3, 7, 5), (1, 1, 1), (4, 2, 9)])
def test_linear_backward_matches_finite_differences(rng, N, I, O):
    x, w, b = rng.standard_normal((N, I)), rng.standard_normal((O, I)), rng.standard_normal(O)
    assert_close(ref.linear_forward(x, w, b), np.array([[x[n] @ w[o] + b[o] for o in range(O)] for n in range(N)]))
    dy = rng.standard_normal((N, O))
    loss = lambda x_, w_, b_: float((ref.linear_forward(x_, w_, b_) * dy).sum())
    assert_close(ref.linear_backward_input(dy, w), numgrad(lambda v: loss(v, w, b), x))
    assert_close(ref.linear_backward_weight(x, dy), numgrad(lambda v: loss(x, v, b), w))
    assert_close(ref.linear_backward_bias(dy), numgrad(lambda v: loss(x, w, v), b))


def test_relu_backward_matches_finite_differences(rng):
    x = rng.uniform(0.1, 1.0, (3, 4, 5)) * rng.choice([-1.0, 1.0], (3, 4, 5))  # away from the kink at 0
    dy = rng.standard_normal(x.shape)
    y = ref.relu_forward(x)
    assert np.array_equal(y, np.where(x > 0, x, 0.0))
    assert_close(ref.relu_backward(dy, y), numgrad(lambda v: float((ref.relu_forward(v) * dy).sum()), x))


# ---- LRN ------------------------------------------------------------------------------------------

LRN_CASES = [(5, 2.0, 1e-4, 0.75), (5, 2.0, 0.3, 0.75), (3, 1.0, 0.5, 0.6), (1, 1.5, 0.2, 1.0), (7, 2.0, 0.1, 0.75)]


@pytest.mark.parametrize("size,k,alpha,beta", LRN_CASES)
def test_lrn_forward_matches_definition(rng, size, k, alpha, beta):
    x = rng.standard_normal((2, 6, 3, 2)) * 2
    y, scale = ref.lrn_forward(x, size, k, alpha, beta)
    C = x.shape[1]
    for c in range(C):
        lo, hi = max(0, c - size // 2), min(C - 1, c + size // 2)
        s = k + alpha * (x[:, lo:hi + 1] ** 2).sum(axis=1)
        assert_close(scale[:, c], s, 1e-13)
        assert_close(y[:, c], x[:, c] / s ** beta, 1e-13)


@pytest.mark.parametrize("size,k,alpha,beta", LRN_CASES)
def test_lrn_backward_matches_finite_differences(rng, size, k, alpha, beta):
    x = rng.standard_normal((2, 6, 3, 2)) * 2
    dy = rng.standard_normal(x.shape)
    y, scale = ref.lrn_forward(x, size, k, alpha, beta)
    num = numgrad(lambda v: float((ref.lrn_forward(v, size, k, alpha, beta)[0] * dy).sum()), x)
    assert_close(ref.lrn_backward(dy, x, y, scale, size, k, alpha, beta), num)


# ---- max-pooling ----------------------------------------------------------------------------------

def naive_maxpool(x, window, stride, padding):
    (wh, ww), (sh, sw), (ph, pw) = ref._pair(window), ref._pair(stride), ref._pair(padding)
    N, C, H, W = x.shape
    P, Q = (H + 2 * ph - wh) // sh + 1, (W + 2 * pw - ww) // sw + 1
    y, a = np.zeros((N, C, P, Q)), np.zeros((N, C, P, Q), np.int32)
    for n in range(N):
        for c in range(C):
            for p in range(P):
                for q in range(Q):
                    best, arg = None, None
                    for i in range(wh):
                        for j in range(ww):
                            h, w = p * sh - ph + i, q * sw - pw + j
                            if 0 <= h < H and 0 <= w < W and (best is None or x[n, c, h, w] > best):
                                best, arg = x[n, c, h, w], h * W + w
                    y[n, c, p, q], a[n, c, p, q] = best, arg
    return y, a


POOL_CASES = [((9, 9), 3, 2, 0), ((7, 5), (3, 2), (2, 1), (1, 1)), ((6, 6), 2, 3, 1), ((1, 1), 1, 1, 0), ((5, 4), (5, 4), 1, 0)]


@pytest.mark.parametrize("hw,window,stride,padding", POOL_CASES)
def test_maxpool_forward_matches_naive_loops_with_ties(rng, hw, window, stride, padding):
    x = rng.integers(-2, 3, (2, 3) + hw).astype(np.float64)  # many ties: the first maximum must win
    y, a = ref.maxpool_forward(x, window, stride, padding)
    yn, an = naive_maxpool(x, window, stride, padding)
    assert np.array_equal(y, yn) and np.array_equal(a, an) and a.dtype == np.int32


@pytest.mark.parametrize("hw,window,stride,padding", POOL_CASES)
def test_maxpool_backward_matches_finite_differences(rng, hw, window, stride, padding):
    x = rng.permutation(2 * 3 * hw[0] * hw[1]).reshape((2, 3) + hw) * 0.1  # distinct values: argmax is stable
    y, a = ref.maxpool_forward(x, window, stride, padding)
    dy = rng.standard_normal(y.shape)
    num = numgrad(lambda v: float((ref.maxpool_forward(v, window, stride, padding)[0] * dy).sum()), x)
    assert_close(ref.maxpool_backward(dy, a, hw, window, stride, padding), num)


# ---- softmax / cross-entropy ----------------------------------------------------------------------

def test_softmax_cross_entropy_matches_definition_and_finite_differences(rng):
    z = rng.standard_normal((4, 7)) * 3
    labels = rng.integers(0, 7, 4)
    loss, probs, rank = ref.softmax_cross_entropy_forward(z, labels)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert_close(probs, p, 1e-13)
    assert_close(ref.softmax_forward(z), p, 1e-13)
    assert_close(loss, -np.log(p[np.arange(4), labels]), 1e-12)
    scale = 0.25
    num = numgrad(lambda v: scale * float(ref.softmax_cross_entropy_forward(v, labels)[0].sum()), z)
    assert_close(ref.softmax_cross_entropy_backward(probs, labels, scale), num)


def test_softmax_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-5e4, -5e4, -5e4]])
    loss, probs, _ = ref.softmax_cross_entropy_forward(z, np.array([1, 2]))
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(probs))
    assert_close(loss, [1000.0, np.log(3.0)], 1e-12)


def test_rank_counts_better_classes_with_ties_to_lower_index(rng):
    z = rng.integers(0, 4, (50, 9)).astype(np.float64)  # lots of ties
    labels = rng.integers(0, 9, 50)
    _, _, rank = ref.softmax_cross_entropy_forward(z, labels)
    for n in range(50):
        # position of the label in a stable sort by descending logit (ties keep class order)
        order = sorted(range(9), key=lambda c: (-z[n, c], c))
        assert rank[n] == order.index(labels[n])
    assert rank.dtype == np.int32


# ---- Philox / dropout -----------------------------------------------------------------------------

# Random123's published known-answer vectors for philox4x32_10: (counter, key) -> output.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_philox_known_answer_vectors(ctr, key, expected):
    out = ref.philox4x32_10(ctr, key)
    assert tuple(int(v) for v in out) == expected


def philox_scalar(seed, counter):
    """Philox4x32-10, first word, written with Python integers (independent of the vectorized version)."""
    c = [counter & 0xFFFFFFFF, counter >> 32, 0, 0]
    k = [seed & 0xFFFFFFFF, seed >> 32]
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
    return c[0]


def test_philox_u32_matches_scalar_implementation(rng):
    seeds = [0, 1, 2**32 - 1, 2**32, 2**64 - 1] + [int(s) for s in rng.integers(0, 2**63, 5)]
    counters = np.array([0, 1, 2**32 - 1, 2**32, 2**64 - 1] + [int(c) for c in rng.integers(0, 2**63, 20)],
                        dtype=np.uint64)
    for seed in seeds:
        got = ref.philox_u32(seed, counters)
        assert got.dtype == np.uint32
        assert [int(v) for v in got] == [philox_scalar(seed, int(c)) for c in counters]


def test_dropout_threshold_and_mask_statistics(rng):
    assert ref.dropout_threshold(0.0) == 0
    assert ref.dropout_threshold(0.5) == 2**31
    assert ref.dropout_threshold(np.nextafter(np.float32(1), np.float32(0))) == 2**32 - 256
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40))
    for p in (0.1, 0.5, 0.9):
        mask = ref.dropout_mask((200, 500), p, seed, offset)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert abs(mask.mean() - (1 - p)) < 0.01  # 100k draws: 5+ standard deviations
    # element i depends only on offset + i
    whole = ref.dropout_mask((1000,), 0.5, seed, offset)
    assert np.array_equal(whole[300:], ref.dropout_mask((700,), 0.5, seed, offset + 300))
    x = rng.standard_normal((10, 30))
    y, m = ref.dropout_forward(x, 0.25, seed, offset)
    assert np.array_equal(m, ref.dropout_mask(x.shape, 0.25, seed, offset))
    assert_close(y, x * m / 0.75, 1e-15)
    assert_close(ref.dropout_backward(x, m, 0.25), x * m / 0.75, 1e-15)


# ---- sgd, plumbing, augmentation ------------------------------------------------------------------

def test_sgd_update_follows_the_paper():
    w, dw, v = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([0.1, -0.3])
    new_w, new_v = ref.sgd_update(w, dw, v, lr=0.01, momentum=0.9, weight_decay=0.0005)
    expect_v = np.array([0.9 * 0.1 - 0.0005 * 0.01 * 1.0 - 0.01 * 0.5, 0.9 * -0.3 + 0.0005 * 0.01 * 2.0 - 0.01 * 0.25])
    assert_close(new_v, expect_v, 1e-15)
    assert_close(new_w, w + expect_v, 1e-15)


def test_concat_slice_add(rng):
    a, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 2, 4, 5))
    cat = ref.concat_channels([a, b])
    assert cat.shape == (2, 5, 4, 5)
    assert np.array_equal(ref.slice_channels(cat, 0, 3), a) and np.array_equal(ref.slice_channels(cat, 3, 5), b)
    assert np.array_equal(ref.add(a, a), 2 * a)


def test_augment_batch_matches_per_pixel_definition(rng):
    N, H, W, crop = 3, 9, 7, 5
    images = rng.integers(0, 256, (N, H, W, 3)).astype(np.uint8)
    offsets = np.array([[0, 0], [4, 2], [2, 1]], np.int32)
    flips = np.array([0, 1, 1], np.uint8)
    light, mean = rng.standard_normal((N, 3)), rng.uniform(0, 255, (3, H, W))
    out = ref.augment_batch(images, offsets, flips, light, mean, crop)
    for n in range(N):
        y0, x0 = offsets[n]
        for c in range(3):
            for y in range(crop):
                for x in range(crop):
                    xs = x0 + (crop - 1 - x if flips[n] else x)
                    want = float(images[n, y0 + y, xs, c]) - mean[c, y0 + y, xs] + light[n, c]
                    assert out[n, c, y, x] == pytest.approx(want, abs=1e-12)
