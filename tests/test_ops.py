"""Every op, forward and backward, on every backend, against the float64 NumPy reference on fresh random inputs.

Outputs are poisoned (NaN) before each op runs (conftest's autouse fixture), so an unwritten element fails.
Tolerances (DESIGN.md): relative error ||out - ref|| / ||ref|| below 1e-5 for elementwise ops and 1e-4 for
reductions and convolutions; integer outputs (argmax, masks, ranks) exact.
"""
import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import reference as ref
from conftest import devices

ELEMENTWISE = 1e-5
REDUCTION = 1e-4

ops = ax.ops


def dev(a, device):
    return ax.from_numpy(np.ascontiguousarray(a), device)


def randn(rng, shape, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def check(out, expect, tol, what=""):
    """Relative error of a backend result against the reference; NaN/Inf never pass."""
    got = out.numpy() if isinstance(out, ax.Tensor) else np.asarray(out)
    expect = np.asarray(expect, np.float64)
    assert got.shape == expect.shape, f"{what}: shape {got.shape} != {expect.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite output (unwritten or overflowed elements)"
    norm = np.linalg.norm(expect)
    assert norm > 0, f"{what}: degenerate reference (all zeros); the test inputs are wrong"
    err = np.linalg.norm(got.astype(np.float64) - expect) / norm
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol}"


def check_exact(out, expect, what=""):
    got = out.numpy() if isinstance(out, ax.Tensor) else np.asarray(out)
    assert got.shape == np.shape(expect), f"{what}: shape {got.shape} != {np.shape(expect)}"
    mismatches = int(np.count_nonzero(got != expect))
    assert mismatches == 0, f"{what}: {mismatches} of {got.size} elements differ"


# ---- convolution ----------------------------------------------------------------------------------

CONV_CASES = {  # N, C, H, W, K, R, S, stride, padding, groups
    "alexnet_conv1": (1, 3, 224, 224, 96, 11, 11, 4, 2, 1),
    "alexnet_conv1_n2": (2, 3, 224, 224, 96, 11, 11, 4, 2, 1),
    "alexnet_conv2": (2, 96, 27, 27, 256, 5, 5, 1, 2, 2),
    "alexnet_conv3": (2, 256, 13, 13, 384, 3, 3, 1, 1, 1),
    "alexnet_conv4": (1, 384, 13, 13, 384, 3, 3, 1, 1, 2),
    "alexnet_conv5": (2, 384, 13, 13, 256, 3, 3, 1, 1, 2),
    "odd_7x5_c3_k5": (2, 3, 7, 5, 5, 3, 2, 1, 0, 1),
    "odd_groups3_stride3": (3, 6, 11, 8, 9, 3, 3, 3, 0, 3),
    "odd_rect_stride_pad": (2, 4, 9, 13, 6, 4, 3, (2, 3), (1, 2), 2),
    "odd_1x1_image": (2, 4, 1, 1, 6, 1, 1, 1, 0, 2),
    "odd_1x1_image_padded": (1, 2, 1, 1, 3, 3, 3, 1, 1, 1),
    "odd_1x1_kernel": (2, 5, 6, 7, 3, 1, 1, 1, 0, 1),
    "odd_1x1_kernel_strided": (1, 4, 7, 7, 4, 1, 1, 2, 1, 2),
    "odd_kernel_equals_input": (2, 3, 5, 4, 7, 5, 4, 1, 0, 1),
    "odd_many_outputs": (1, 2, 20, 37, 33, 2, 5, 1, 2, 1),
    "odd_17_wide_window": (1, 2, 5, 20, 3, 1, 17, 1, (0, 3), 1),  # wider than the tap mask: the (r, s) checks
    "odd_channel_inner_groups": (2, 32, 9, 7, 64, 3, 3, 1, 1, 2),  # Cg = Kg = 16 per group: tap-major loaders
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(CONV_CASES.values()), ids=list(CONV_CASES))
def test_conv2d(device, case, rng):
    N, C, H, W, K, R, S, stride, padding, groups = case
    x, w, b = randn(rng, (N, C, H, W)), randn(rng, (K, C // groups, R, S), 0.1), randn(rng, (K,))
    y_ref = ref.conv2d_forward(x, w, b, stride, padding, groups)
    y = ops.conv2d_forward(dev(x, device), dev(w, device), dev(b, device), stride=stride, padding=padding,
                           groups=groups)
    check(y, y_ref, REDUCTION, "conv2d_forward")
    check(ops.conv2d_forward(dev(x, device), dev(w, device), None, stride, padding, groups),
          ref.conv2d_forward(x, w, None, stride, padding, groups), REDUCTION, "conv2d_forward without bias")

    dy = randn(rng, y_ref.shape)
    check(ops.conv2d_backward_input(dev(dy, device), dev(w, device), (H, W), stride, padding, groups),
          ref.conv2d_backward_input(dy, w, (H, W), stride, padding, groups), REDUCTION, "conv2d_backward_input")
    check(ops.conv2d_backward_weight(dev(x, device), dev(dy, device), (R, S), stride, padding, groups),
          ref.conv2d_backward_weight(x, dy, (R, S), stride, padding, groups), REDUCTION, "conv2d_backward_weight")
    check(ops.conv2d_backward_bias(dev(dy, device)), ref.conv2d_backward_bias(dy), REDUCTION, "conv2d_backward_bias")


# ---- linear ---------------------------------------------------------------------------------------

LINEAR_CASES = {  # N, in, out
    "alexnet_fc6": (2, 9216, 4096),
    "alexnet_fc7_tower": (3, 4096, 2048),
    "alexnet_fc8_tower": (2, 4096, 500),
    "odd_3x7x5": (3, 7, 5),
    "odd_1x1x1": (1, 1, 1),
    "odd_wide_batch": (37, 13, 3),
    "odd_narrow": (5, 300, 2),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(LINEAR_CASES.values()), ids=list(LINEAR_CASES))
def test_linear(device, case, rng):
    N, I, O = case
    x, w, b = randn(rng, (N, I)), randn(rng, (O, I), 0.01), randn(rng, (O,))
    xd, wd = dev(x, device), dev(w, device)
    check(ops.linear_forward(xd, wd, dev(b, device)), ref.linear_forward(x, w, b), REDUCTION, "linear_forward")
    check(ops.linear_forward(xd, wd), ref.linear_forward(x, w), REDUCTION, "linear_forward without bias")
    dy = randn(rng, (N, O))
    dyd = dev(dy, device)
    check(ops.linear_backward_input(dyd, wd), ref.linear_backward_input(dy, w), REDUCTION, "linear_backward_input")
    check(ops.linear_backward_weight(xd, dyd), ref.linear_backward_weight(x, dy), REDUCTION, "linear_backward_weight")
    check(ops.linear_backward_bias(dyd), ref.linear_backward_bias(dy), REDUCTION, "linear_backward_bias")


# ---- relu -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(2, 96, 55, 55), (3, 7, 5), (1,), (2, 4096), (5, 1, 1, 3)])
def test_relu(device, shape, rng):
    x = randn(rng, shape)
    x.reshape(-1)[0] = 1.5  # at least one positive element, whatever the draw
    y = ops.relu_forward(dev(x, device))
    check(y, ref.relu_forward(x), ELEMENTWISE, "relu_forward")
    dy = randn(rng, shape)
    check(ops.relu_backward(dev(dy, device), y), ref.relu_backward(dy, ref.relu_forward(x)), ELEMENTWISE,
          "relu_backward")


# ---- LRN ------------------------------------------------------------------------------------------

LRN_CASES = {  # shape, size, k, alpha, beta
    "alexnet_lrn1": ((2, 96, 55, 55), 5, 2.0, 1e-4, 0.75),
    "alexnet_lrn2_tower": ((2, 128, 27, 27), 5, 2.0, 1e-4, 0.75),
    "strong_alpha": ((2, 16, 7, 5), 5, 2.0, 0.05, 0.75),
    "window_wider_than_channels": ((2, 3, 4, 6), 5, 1.0, 0.2, 0.75),
    "other_beta_size3": ((3, 7, 5, 3), 3, 1.0, 0.3, 0.6),
    "size1_1x1": ((4, 5, 1, 1), 1, 1.5, 0.5, 1.0),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(LRN_CASES.values()), ids=list(LRN_CASES))
def test_lrn(device, case, rng):
    shape, size, k, alpha, beta = case
    x = randn(rng, shape, 3.0)  # large enough that the normalization is far from a no-op
    y_ref, scale_ref = ref.lrn_forward(x, size, k, alpha, beta)
    y, scale = ops.lrn_forward(dev(x, device), size, k, alpha, beta)
    check(y, y_ref, ELEMENTWISE, "lrn_forward y")
    check(scale, scale_ref, REDUCTION, "lrn_forward scale")
    dy = randn(rng, shape)
    dx = ops.lrn_backward(dev(dy, device), dev(x, device), y, scale, size, k, alpha, beta)
    dx_ref = ref.lrn_backward(dy, x, y_ref, scale_ref, size, k, alpha, beta)
    check(dx, dx_ref, REDUCTION, "lrn_backward")
    # the cross-channel term must matter at this alpha, or the check above could not see it
    if alpha >= 0.05:
        assert np.linalg.norm(dx_ref - dy * scale_ref ** -beta) > 1e-2 * np.linalg.norm(dx_ref)


# ---- max-pooling ----------------------------------------------------------------------------------

POOL_CASES = {  # shape, window, stride, padding
    "alexnet_pool1": ((2, 96, 55, 55), 3, 2, 0),
    "alexnet_pool2": ((2, 256, 27, 27), 3, 2, 0),
    "alexnet_pool5": ((2, 256, 13, 13), 3, 2, 0),
    "non_overlapping": ((2, 8, 13, 13), 2, 2, 0),
    "odd_rect_window_padded": ((2, 3, 7, 5), (3, 2), (2, 1), (1, 1)),
    "stride_beyond_window": ((1, 4, 11, 10), 2, 3, 1),
    "whole_image": ((3, 2, 5, 4), (5, 4), 1, 0),
    "one_pixel": ((2, 3, 1, 1), 1, 1, 0),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(POOL_CASES.values()), ids=list(POOL_CASES))
def test_maxpool_distinct_values(device, case, rng):
    shape, window, stride, padding = case
    x = randn(rng, shape)  # continuous draws: distinct values, negatives next to the (-inf) padding
    y_ref, am_ref = ref.maxpool_forward(x, window, stride, padding)
    y, am = ops.maxpool_forward(dev(x, device), window, stride, padding)
    check(y, y_ref, ELEMENTWISE, "maxpool_forward y")
    assert am.dtype == "int32"
    check_exact(am, am_ref, "maxpool_forward argmax")
    dy = randn(rng, y_ref.shape)
    check(ops.maxpool_backward(dev(dy, device), am, shape[2:], window, stride, padding),
          ref.maxpool_backward(dy, am_ref, shape[2:], window, stride, padding), ELEMENTWISE, "maxpool_backward")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", [POOL_CASES[k] for k in ("alexnet_pool2", "odd_rect_window_padded", "whole_image")],
                         ids=["alexnet_pool2", "odd_rect_window_padded", "whole_image"])
def test_maxpool_ties_first_maximum_wins(device, case, rng):
    shape, window, stride, padding = case
    x = rng.integers(-3, 2, shape).astype(np.float32)  # few distinct values: ties everywhere
    y_ref, am_ref = ref.maxpool_forward(x, window, stride, padding)
    y, am = ops.maxpool_forward(dev(x, device), window, stride, padding)
    check_exact(y, y_ref.astype(np.float32), "maxpool_forward y")
    check_exact(am, am_ref, "maxpool_forward argmax")
    dy = randn(rng, y_ref.shape)
    check(ops.maxpool_backward(dev(dy, device), am, shape[2:], window, stride, padding),
          ref.maxpool_backward(dy, am_ref, shape[2:], window, stride, padding), ELEMENTWISE, "maxpool_backward")


# ---- dropout --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout(device, p, rng):
    shape = (7, 1031)
    seed = int(rng.integers(0, 2**63))
    offset = 2**32 - 3000 + int(rng.integers(0, 100))  # the element counters cross into the high word
    x = randn(rng, shape)
    y_ref, mask_ref = ref.dropout_forward(x, p, seed, offset)
    y, mask = ops.dropout_forward(dev(x, device), p, seed, offset)
    assert mask.dtype == "uint8"
    check_exact(mask, mask_ref, "dropout mask")
    check(y, y_ref, ELEMENTWISE, "dropout_forward")
    dy = randn(rng, shape)
    check(ops.dropout_backward(dev(dy, device), mask, p), ref.dropout_backward(dy, mask_ref, p), ELEMENTWISE,
          "dropout_backward")


@pytest.mark.parametrize("device", devices())
def test_dropout_mask_depends_only_on_seed_and_counter(device, rng):
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40))
    x = randn(rng, (4096,))
    _, whole = ops.dropout_forward(dev(x, device), 0.5, seed, offset)
    _, tail = ops.dropout_forward(dev(x[1000:], device), 0.5, seed, offset + 1000)
    check_exact(tail, whole.numpy()[1000:], "mask of a shifted slice")
    _, other = ops.dropout_forward(dev(x, device), 0.5, seed + 1, offset)
    assert np.count_nonzero(other.numpy() != whole.numpy()) > 1000  # a different seed draws a different mask


@pytest.mark.cuda
def test_dropout_cpu_and_cuda_masks_are_identical(rng):
    seed, offset = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**40))
    x = randn(rng, (3, 2048, 5))
    for p in (0.2, 0.5):
        y_cpu, m_cpu = ops.dropout_forward(dev(x, "cpu"), p, seed, offset)
        y_gpu, m_gpu = ops.dropout_forward(dev(x, "cuda:0"), p, seed, offset)
        check_exact(m_gpu, m_cpu.numpy(), "CUDA vs CPU dropout mask")
        check(y_gpu, y_cpu.numpy(), ELEMENTWISE, "CUDA vs CPU dropout output")


# ---- softmax / cross-entropy ----------------------------------------------------------------------

SOFTMAX_CASES = {"alexnet_batch": (8, 1000), "odd": (5, 7), "one_class": (3, 1), "one_sample": (1, 13)}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", list(SOFTMAX_CASES.values()), ids=list(SOFTMAX_CASES))
def test_softmax_cross_entropy(device, case, rng):
    N, C = case
    logits = randn(rng, (N, C), 4.0) + np.float32(50.0)  # an offset the stable form must absorb
    labels = rng.integers(0, C, N).astype(np.int32)
    loss_ref, probs_ref, rank_ref = ref.softmax_cross_entropy_forward(logits, labels)
    loss, probs, rank = ops.softmax_cross_entropy_forward(dev(logits, device), dev(labels, device))
    if C > 1:  # with one class the loss is exactly 0 and has no relative error to speak of
        check(loss, loss_ref, REDUCTION, "softmax_cross_entropy_forward loss")
    else:
        check_exact(loss, np.zeros(N, np.float32), "one-class loss")
    check(probs, probs_ref, REDUCTION, "softmax_cross_entropy_forward probs")
    assert rank.dtype == "int32"
    check_exact(rank, rank_ref, "softmax_cross_entropy_forward rank")
    check(ops.softmax_forward(dev(logits, device)), ref.softmax_forward(logits), REDUCTION, "softmax_forward")
    scale = 1.0 / N
    dl = ops.softmax_cross_entropy_backward(probs, dev(labels, device), scale)
    if C > 1:
        check(dl, ref.softmax_cross_entropy_backward(probs.numpy(), labels, scale), ELEMENTWISE,
              "softmax_cross_entropy_backward")
    else:
        check_exact(dl, np.zeros((N, 1), np.float32), "one-class gradient")


@pytest.mark.parametrize("device", devices())
def test_softmax_rank_with_ties(device, rng):
    N, C = 64, 40
    logits = rng.integers(0, 3, (N, C)).astype(np.float32)  # every label ties with many classes
    labels = rng.integers(0, C, N).astype(np.int32)
    _, _, rank_ref = ref.softmax_cross_entropy_forward(logits, labels)
    _, _, rank = ops.softmax_cross_entropy_forward(dev(logits, device), dev(labels, device))
    check_exact(rank, rank_ref, "rank with ties")


@pytest.mark.parametrize("device", devices())
def test_softmax_huge_logits_stay_finite(device):
    logits = np.array([[1000.0, 0.0, -1000.0], [-5e4, -5e4, -5e4], [80.0, 90.0, 100.0]], np.float32)
    labels = np.array([1, 2, 2], np.int32)
    loss_ref, probs_ref, rank_ref = ref.softmax_cross_entropy_forward(logits, labels)
    loss, probs, rank = ops.softmax_cross_entropy_forward(dev(logits, device), dev(labels, device))
    check(loss, loss_ref, REDUCTION, "loss")
    check(probs, probs_ref, REDUCTION, "probs")
    check_exact(rank, rank_ref, "rank")


# ---- fused ReLU (issue 11: the ReLU in the GEMM epilogues and the neighbouring backward ops) -------------

@pytest.mark.parametrize("device", devices())
def test_fused_relu_forward_equals_relu_after_the_op(device, rng):
    x, w, b = randn(rng, (2, 6, 9, 8)), randn(rng, (8, 3, 3, 3), 0.3), randn(rng, (8,))
    y = ops.conv2d_forward(dev(x, device), dev(w, device), dev(b, device), stride=(2, 1), padding=1, groups=2)
    yr = ops.conv2d_forward(dev(x, device), dev(w, device), dev(b, device), stride=(2, 1), padding=1, groups=2,
                            relu=True)
    check(yr, ref.conv2d_forward(x, w, b, (2, 1), 1, 2, relu=True), REDUCTION, "conv2d_forward relu")
    check_exact(yr, ops.relu_forward(y).numpy(), "conv2d_forward relu vs relu_forward")
    for N, I, O in ((3, 7, 5), (5, 1000, 7)):  # the second takes split-K: the ReLU runs in the reduction
        xl, wl, bl = randn(rng, (N, I)), randn(rng, (O, I), 0.1), randn(rng, (O,))
        yl = ops.linear_forward(dev(xl, device), dev(wl, device), dev(bl, device))
        ylr = ops.linear_forward(dev(xl, device), dev(wl, device), dev(bl, device), relu=True)
        check(ylr, ref.linear_forward(xl, wl, bl, relu=True), REDUCTION, "linear_forward relu")
        check_exact(ylr, ops.relu_forward(yl).numpy(), "linear_forward relu vs relu_forward")


@pytest.mark.parametrize("device", devices())
def test_relu_backward_folded_into_the_neighbouring_backward(device, rng):
    # conv grad-input through the ReLU whose output the layer read
    dy, w, a = randn(rng, (2, 8, 5, 8)), randn(rng, (8, 3, 3, 3), 0.3), randn(rng, (2, 6, 9, 8))
    dx = ops.conv2d_backward_input(dev(dy, device), dev(w, device), (9, 8), (2, 1), 1, 2)
    dxr = ops.conv2d_backward_input(dev(dy, device), dev(w, device), (9, 8), (2, 1), 1, 2, relu_y=dev(a, device))
    check(dxr, ref.conv2d_backward_input(dy, w, (9, 8), (2, 1), 1, 2, relu_y=a), REDUCTION,
          "conv2d_backward_input relu_y")
    check_exact(dxr, ops.relu_backward(dx, dev(a, device)).numpy(), "conv2d_backward_input relu_y vs relu_backward")
    # LRN backward, x being the ReLU's output (negatives present so the mask matters)
    x, g = randn(rng, (2, 7, 5, 4)), randn(rng, (2, 7, 5, 4))
    y, sc = ops.lrn_forward(dev(x, device), 5, 2.0, 1e-2, 0.75)
    d = ops.lrn_backward(dev(g, device), dev(x, device), y, sc, 5, 2.0, 1e-2, 0.75)
    dr = ops.lrn_backward(dev(g, device), dev(x, device), y, sc, 5, 2.0, 1e-2, 0.75, relu=True)
    check(dr, ref.lrn_backward(g, x, None, None, 5, 2.0, 1e-2, 0.75, relu=True), REDUCTION, "lrn_backward relu")
    check_exact(dr, ops.relu_backward(d, dev(x, device)).numpy(), "lrn_backward relu vs relu_backward")
    # max-pool backward through the ReLU whose output was pooled
    yp, arg = ops.maxpool_forward(dev(x, device), 3, 2)
    gp = randn(rng, tuple(yp.shape))
    dp = ops.maxpool_backward(dev(gp, device), arg, (5, 4), 3, 2, check_argmax=False)
    dpr = ops.maxpool_backward(dev(gp, device), arg, (5, 4), 3, 2, check_argmax=False, relu_y=dev(x, device))
    check(dpr, ref.maxpool_backward(gp, arg.numpy(), (5, 4), 3, 2, relu_y=x), ELEMENTWISE, "maxpool_backward relu_y")
    check_exact(dpr, ops.relu_backward(dp, dev(x, device)).numpy(), "maxpool_backward relu_y vs relu_backward")
    # dropout backward through the ReLU before the dropout
    h, gh = randn(rng, (4, 33)), randn(rng, (4, 33))
    _, mask = ops.dropout_forward(dev(h, device), 0.5, 7, 0)
    dd = ops.dropout_backward(dev(gh, device), mask, 0.5)
    ddr = ops.dropout_backward(dev(gh, device), mask, 0.5, relu_y=dev(h, device))
    check(ddr, ref.dropout_backward(gh, mask.numpy(), 0.5, relu_y=h), ELEMENTWISE, "dropout_backward relu_y")
    check_exact(ddr, ops.relu_backward(dd, dev(h, device)).numpy(), "dropout_backward relu_y vs relu_backward")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape,window,stride,padding", [((2, 7, 9, 10), 3, 2, 1), ((1, 48, 55, 55), 3, 2, 0),
                                                         ((1, 3, 70, 70), 2, 2, 0)])
def test_lrn_maxpool_forward_equals_the_two_ops(device, shape, window, stride, padding, rng):
    x = randn(rng, shape)
    y, scale, pool_y, argmax = ops.lrn_maxpool_forward(dev(x, device), 5, 2.0, 1e-2, 0.75, window, stride, padding)
    y_ref, scale_ref = ref.lrn_forward(x, 5, 2.0, 1e-2, 0.75)
    check(y, y_ref, ELEMENTWISE, "lrn_maxpool_forward y")
    check(scale, scale_ref, REDUCTION, "lrn_maxpool_forward scale")
    y1, scale1 = ops.lrn_forward(dev(x, device), 5, 2.0, 1e-2, 0.75)
    p1, a1 = ops.maxpool_forward(y1, window, stride, padding)
    for got, want, what in ((y, y1, "y"), (scale, scale1, "scale"), (pool_y, p1, "pool_y"), (argmax, a1, "argmax")):
        check_exact(got, want.numpy(), f"lrn_maxpool_forward {what} vs lrn_forward + maxpool_forward")
    pr, ar = ref.maxpool_forward(y1.numpy(), window, stride, padding)
    check_exact(argmax, ar, "lrn_maxpool_forward argmax vs the reference pool of its y")


# ---- sgd ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(96, 3, 11, 11), (4096,), (3, 5)])
def test_sgd_update_in_place(device, shape, rng):
    w, dw, v = randn(rng, shape, 0.01), randn(rng, shape, 0.1), randn(rng, shape, 0.001)
    lr, momentum, weight_decay = 0.01, 0.9, 0.0005
    w_ref, v_ref = ref.sgd_update(w, dw, v, lr, momentum, weight_decay)
    wd, vd = dev(w, device), dev(v, device)
    assert ops.sgd_update(wd, dev(dw, device), vd, lr, momentum, weight_decay) is None
    check(vd, v_ref, ELEMENTWISE, "sgd_update v")
    check(wd, w_ref, ELEMENTWISE, "sgd_update w")
    # a second step continues from the updated state
    w_ref, v_ref = ref.sgd_update(w_ref, dw, v_ref, 0.001, 0.5, 0.01)
    ops.sgd_update(wd, dev(dw, device), vd, 0.001, 0.5, 0.01)
    check(vd, v_ref, ELEMENTWISE, "sgd_update v, step 2")
    check(wd, w_ref, ELEMENTWISE, "sgd_update w, step 2")


@pytest.mark.parametrize("device", devices())
def test_sgd_update_multi_equals_one_update_per_tensor(device, rng):
    shapes = [(96, 3, 11, 11), (96,), (3, 5), (1,), (4097,)]
    decays = [0.0005, 0.0, 0.001, 0.0, 0.0005]
    lr, momentum = 0.013, 0.9
    ws = [randn(rng, s, 0.01) for s in shapes]
    dws = [randn(rng, s, 0.1) for s in shapes]
    vs = [randn(rng, s, 0.001) for s in shapes]
    multi = [(dev(w, device), dev(g, device), dev(v, device), wd) for w, g, v, wd in zip(ws, dws, vs, decays)]
    assert ops.sgd_update_multi(multi, lr, momentum) is None
    for (wm, _, vm, wd), w, g, v in zip(multi, ws, dws, vs):
        w_ref, v_ref = ref.sgd_update(w, g, v, lr, momentum, wd)
        check(vm, v_ref, ELEMENTWISE, "sgd_update_multi v")
        check(wm, w_ref, ELEMENTWISE, "sgd_update_multi w")
        # the same bits as the single-tensor op on the same backend
        w1, v1 = dev(w, device), dev(v, device)
        ops.sgd_update(w1, dev(g, device), v1, lr, momentum, wd)
        check_exact(wm, w1.numpy(), "sgd_update_multi w vs sgd_update")
        check_exact(vm, v1.numpy(), "sgd_update_multi v vs sgd_update")


# ---- cross-tower plumbing -------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shapes", [[(2, 128, 13, 13), (2, 128, 13, 13)], [(3, 1, 2, 5), (3, 4, 2, 5), (3, 2, 2, 5)],
                                    [(4, 2048), (4, 2048)], [(2, 3), (2, 1)]])
def test_concat_and_slice_channels(device, shapes, rng):
    xs = [randn(rng, s) for s in shapes]
    cat = ops.concat_channels([dev(x, device) for x in xs])
    check_exact(cat, ref.concat_channels(xs).astype(np.float32), "concat_channels")
    c0 = 0
    for x in xs:
        c1 = c0 + x.shape[1]
        check_exact(ops.slice_channels(cat, c0, c1), x, f"slice_channels [{c0}, {c1})")
        c0 = c1
    if cat.shape[1] > 2:  # a slice that straddles two parts
        check_exact(ops.slice_channels(cat, 1, cat.shape[1] - 1),
                    ref.slice_channels(cat.numpy(), 1, cat.shape[1] - 1).astype(np.float32), "straddling slice")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("count,parts,shape", [(2, 2, (2, 256, 13, 13)), (2, 2, (3, 4096)), (3, 3, (2, 6, 3, 5)),
                                               (1, 2, (2, 4)), (2, 1, (3, 7, 1, 1))])
def test_split_sum_channels(device, count, parts, shape, rng):
    xs = [randn(rng, shape) for _ in range(count)]
    ys = ops.split_sum_channels([dev(x, device) for x in xs], parts)
    want = ref.split_sum_channels(xs, parts)
    assert len(ys) == parts
    per = shape[1] // parts
    for u, (y, w) in enumerate(zip(ys, want)):
        check(y, w, ELEMENTWISE, f"split_sum_channels slice {u}")
        # the contract: slice_channels, then add in list order, bit for bit
        acc = ops.slice_channels(dev(xs[0], device), u * per, (u + 1) * per)
        for x in xs[1:]:
            acc = ops.add(acc, ops.slice_channels(dev(x, device), u * per, (u + 1) * per))
        check_exact(y, acc.numpy(), f"split_sum_channels slice {u} vs slice_channels + add")


def test_split_sum_channels_rejects_bad_arguments(rng):
    a, b = ax.from_numpy(randn(rng, (2, 6))), ax.from_numpy(randn(rng, (2, 4)))
    with pytest.raises(ValueError, match=r"split_sum_channels: argument 'parts' \(4\) does not divide the 6"):
        ops.split_sum_channels([a], 4)
    with pytest.raises(ValueError, match="split_sum_channels: argument 'xs' must have shape"):
        ops.split_sum_channels([a, b], 2)
    with pytest.raises(ValueError, match="split_sum_channels: argument 'xs' is empty"):
        ops.split_sum_channels([], 2)
    with pytest.raises(ValueError, match="split_sum_channels: argument 'parts' must be >= 1"):
        ops.split_sum_channels([a], 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(2, 256, 13, 13), (7, 5), (1,)])
def test_add(device, shape, rng):
    a, b = randn(rng, shape), randn(rng, shape)
    check(ops.add(dev(a, device), dev(b, device)), ref.add(a, b), ELEMENTWISE, "add")


# ---- augmentation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("N,H,W,crop", [(2, 256, 256, 224), (4, 9, 7, 5), (2, 3, 3, 3), (3, 6, 8, 1)])
def test_augment_batch(device, N, H, W, crop, rng):
    images = rng.integers(0, 256, (N, H, W, 3)).astype(np.uint8)
    offsets = np.stack([rng.integers(0, H - crop + 1, N), rng.integers(0, W - crop + 1, N)], 1).astype(np.int32)
    offsets[0] = (H - crop, W - crop)  # the far corner
    flips = (np.arange(N) % 2).astype(np.uint8)
    light = randn(rng, (N, 3), 10.0)
    mean = rng.uniform(0, 255, (3, H, W)).astype(np.float32)
    out = ops.augment_batch(dev(images, device), dev(offsets, device), dev(flips, device), dev(light, device),
                            dev(mean, device), crop)
    check(out, ref.augment_batch(images, offsets, flips, light, mean, crop), ELEMENTWISE, "augment_batch")


# ---- determinism and thread safety (the two towers run ops on two CPU worker threads) ----------------

def test_cpu_ops_are_deterministic_and_thread_safe(rng):
    from concurrent.futures import ThreadPoolExecutor

    x, w = dev(randn(rng, (2, 48, 27, 27)), "cpu"), dev(randn(rng, (128, 24, 5, 5), 0.1), "cpu")
    dy = dev(randn(rng, (2, 128, 27, 27)), "cpu")
    fx, fw, fdy = dev(randn(rng, (3, 600)), "cpu"), dev(randn(rng, (500, 600), 0.01), "cpu"), dev(randn(rng, (3, 500)), "cpu")

    def work():
        y = ops.conv2d_forward(x, w, None, 1, 2, 2)
        dx = ops.conv2d_backward_input(dy, w, (27, 27), 1, 2, 2)
        dw = ops.conv2d_backward_weight(x, dy, 5, 1, 2, 2)
        n, _ = ops.lrn_forward(y)
        p, a = ops.maxpool_forward(n)
        fy = ops.linear_forward(fx, fw)
        fdw = ops.linear_backward_weight(fx, fdy)
        return [t.numpy() for t in (y, dx, dw, n, p, a, fy, fdw)]

    first = work()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: work(), range(4)))
    for r in results:
        for got, want in zip(r, first):
            assert np.array_equal(got, want)  # bit for bit, whatever ran beside it
