"""The CPU backend's vectorised memory-bound kernels (csrc/cpu/simd.h) give exactly the bits of their per-element
formula, evaluated here in float32 NumPy one operation at a time (no fused multiply-add), at lengths that leave
every kind of vector tail, on fresh random inputs with NaN, infinities and signed zeros mixed in."""
import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import reference as ref

ops = ax.ops
f32 = np.float32
# Lengths around the vector widths (4, 8, 16 floats), the dropout draw groups (32) and chunk (1024).
LENGTHS = [1, 3, 7, 15, 16, 17, 31, 33, 63, 65, 1023, 1025, 4099]


def hostile(rng, n):
    """Random floats with the specials a select must pass through untouched."""
    x = rng.standard_normal(n).astype(f32)
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45], f32)
    idx = rng.choice(n, size=min(n, len(specials) * 2), replace=False)
    x[idx] = np.resize(specials, len(idx))
    return x


def same_bits(out, expect, what):
    out = np.asarray(out.numpy() if hasattr(out, "numpy") else out)
    assert out.dtype == expect.dtype and out.shape == expect.shape, what
    bad = np.flatnonzero(out.view(np.uint32 if out.dtype == f32 else np.uint8) !=
                         expect.view(np.uint32 if expect.dtype == f32 else np.uint8))
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[0]}: {out[bad[0]]!r} vs {expect[bad[0]]!r}"


@pytest.mark.parametrize("n", LENGTHS)
def test_relu_bits(n, rng):
    x, dy, y = hostile(rng, n), hostile(rng, n), hostile(rng, n)
    same_bits(ops.relu_forward(ax.from_numpy(x)), np.where(x < 0, f32(0), x), "relu_forward")
    same_bits(ops.relu_backward(ax.from_numpy(dy), ax.from_numpy(y)), np.where(y > 0, dy, f32(0)), "relu_backward")


@pytest.mark.parametrize("n", LENGTHS)
def test_dropout_bits(n, rng):
    x, dy = hostile(rng, n), hostile(rng, n)
    p = float(rng.choice([0.0, 0.1, 0.5, 0.9]))
    seed = int(rng.integers(0, 2**63))
    scale = f32(1) / (f32(1) - f32(p))
    # Offsets that carry into the counter's high word inside the range (the vector lanes add in 64 bits).
    for offset in (0, int(rng.integers(0, 2**40)), 2**32 - n // 2 - 1, 2**64 - n // 2 - 1):
        y, mask = ops.dropout_forward(ax.from_numpy(x), p, seed, offset)
        mask_ref = ref.dropout_mask((n,), p, seed, offset)
        same_bits(mask, mask_ref, f"dropout mask (p={p}, offset={offset})")
        same_bits(y, np.where(mask_ref == 1, x * scale, f32(0)), "dropout_forward")
        same_bits(ops.dropout_backward(ax.from_numpy(dy), mask, p), np.where(mask_ref == 1, dy * scale, f32(0)),
                  "dropout_backward")


@pytest.mark.parametrize("n", LENGTHS)
def test_sgd_bits(n, rng):
    w, dw, v = (rng.standard_normal(n).astype(f32) for _ in range(3))
    lr, momentum, wd = f32(rng.uniform(0, 0.1)), f32(rng.uniform(0, 0.99)), f32(rng.uniform(0, 0.01))
    wt, vt = ax.from_numpy(w), ax.from_numpy(v)
    ops.sgd_update(wt, ax.from_numpy(dw), vt, float(lr), float(momentum), float(wd))
    v_ref = momentum * v - (wd * lr) * w - lr * dw  # float32, left to right, each product rounded
    same_bits(vt, v_ref, "sgd_update v")
    same_bits(wt, w + v_ref, "sgd_update w")


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_add_bits_and_aliasing(n, rng):
    a, b = hostile(rng, n), hostile(rng, n)
    at = ax.from_numpy(a)
    same_bits(ops.add(at, ax.from_numpy(b)), a + b, "add")
    same_bits(ops.add(at, at), a + a, "add, both inputs one tensor")


@pytest.mark.parametrize("H,W,window,stride,pad", [(5, 5, 3, 2, 1), (9, 7, 3, 2, 0), (2, 2, 3, 2, 1), (1, 4, 2, 1, 1)])
def test_maxpool_backward_accepts_exactly_the_window(H, W, window, stride, pad, rng):
    """Every argmax value, in range or not, is accepted exactly when (a // W, a % W) lies in that output's
    clipped window, the rule the division-free check must keep; accepted ones land on their element."""
    x = rng.standard_normal((1, 1, H, W)).astype(f32)
    _, am = ops.maxpool_forward(ax.from_numpy(x), window, stride, pad)
    am = am.numpy()
    P, Q = am.shape[2:]
    dy = rng.standard_normal((1, 1, P, Q)).astype(f32)
    for pp in range(P):
        for q in range(Q):
            h0, w0 = pp * stride - pad, q * stride - pad
            for a in range(-W - 2, H * W + W + 2):
                h, w = divmod(a, W)
                inside = 0 <= a < H * W and h0 <= h < h0 + window and w0 <= w < w0 + window
                bad = am.copy()
                bad[0, 0, pp, q] = a
                if inside:
                    dx = ops.maxpool_backward(ax.from_numpy(dy), ax.from_numpy(bad), (H, W), window, stride, pad)
                    expect = np.zeros(H * W, f32)
                    for i, v in zip(bad.ravel(), dy.ravel()):  # outputs in row-major order, as the contract says
                        expect[i] += v
                    same_bits(dx, expect.reshape(1, 1, H, W), f"maxpool_backward argmax {a} at ({pp}, {q})")
                else:
                    with pytest.raises(ValueError, match=r"maxpool_backward: argument 'argmax'.*outside"):
                        ops.maxpool_backward(ax.from_numpy(dy), ax.from_numpy(bad), (H, W), window, stride, pad)
