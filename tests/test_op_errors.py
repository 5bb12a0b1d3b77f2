"""Bad input to every op raises ValueError or TypeError whose message names the op and the offending argument;
nothing aborts the interpreter (an abort would take the whole test run down with it)."""
import numpy as np
import pytest

import alexnet_cuda as ax
from conftest import devices

ops = ax.ops


def t(shape, dtype=np.float32, device="cpu", fill=0.5):
    return ax.from_numpy(np.full(shape, fill, dtype=dtype), device)


X = lambda: t((2, 6, 9, 9))            # noqa: E731  a valid NCHW input
W = lambda: t((8, 3, 3, 3))            # noqa: E731  a valid grouped (groups=2) conv weight
DY = lambda: t((2, 8, 7, 7))           # noqa: E731  conv output gradient for X, W, groups=2
LOGITS = lambda: t((3, 5))             # noqa: E731
LABELS = lambda: ax.from_numpy(np.array([0, 4, 2], np.int32))  # noqa: E731


def pool_argmax():
    return ops.maxpool_forward(X(), 3, 2, 0)[1]


CASES = [
    # (id, call, exception, regex that must appear in the message)
    # conv2d_forward
    ("conv_fwd_x_rank", lambda: ops.conv2d_forward(t((6, 9, 9)), W(), groups=2), ValueError, r"conv2d_forward.*'x'.*4-D"),
    ("conv_fwd_w_rank", lambda: ops.conv2d_forward(X(), t((8, 27)), groups=2), ValueError, r"conv2d_forward.*'w'"),
    ("conv_fwd_x_dtype", lambda: ops.conv2d_forward(t((2, 6, 9, 9), np.int32), W(), groups=2), TypeError,
     r"conv2d_forward.*'x'.*float32"),
    ("conv_fwd_w_dtype", lambda: ops.conv2d_forward(X(), t((8, 3, 3, 3), np.uint8), groups=2), TypeError,
     r"conv2d_forward.*'w'"),
    ("conv_fwd_group_mismatch", lambda: ops.conv2d_forward(X(), W(), groups=4), ValueError, r"conv2d_forward.*'groups'"),
    ("conv_fwd_groups_not_dividing_k", lambda: ops.conv2d_forward(X(), t((7, 2, 3, 3)), groups=3), ValueError,
     r"conv2d_forward.*'groups'"),
    ("conv_fwd_channel_mismatch", lambda: ops.conv2d_forward(X(), t((8, 4, 3, 3)), groups=2), ValueError,
     r"conv2d_forward.*'w'.*channels"),
    ("conv_fwd_groups_zero", lambda: ops.conv2d_forward(X(), W(), groups=0), ValueError, r"conv2d_forward.*'groups'"),
    ("conv_fwd_bias_shape", lambda: ops.conv2d_forward(X(), W(), t((7,)), groups=2), ValueError, r"conv2d_forward.*'b'"),
    ("conv_fwd_bias_dtype", lambda: ops.conv2d_forward(X(), W(), t((8,), np.int32), groups=2), TypeError,
     r"conv2d_forward.*'b'"),
    ("conv_fwd_window_too_large", lambda: ops.conv2d_forward(t((1, 1, 4, 4)), t((1, 1, 7, 7)), padding=1), ValueError,
     r"conv2d_forward.*window.*larger"),
    ("conv_fwd_stride_zero", lambda: ops.conv2d_forward(X(), W(), stride=0, groups=2), ValueError,
     r"conv2d_forward.*'stride'"),
    ("conv_fwd_padding_negative", lambda: ops.conv2d_forward(X(), W(), padding=(0, -1), groups=2), ValueError,
     r"conv2d_forward.*'padding'"),
    ("conv_fwd_stride_type", lambda: ops.conv2d_forward(X(), W(), stride="2", groups=2), TypeError,
     r"conv2d_forward.*'stride'"),
    ("conv_fwd_padding_triple", lambda: ops.conv2d_forward(X(), W(), padding=(1, 1, 1), groups=2), TypeError,
     r"conv2d_forward.*'padding'"),
    # conv2d_backward_input / weight / bias
    ("conv_bwd_in_dy_shape", lambda: ops.conv2d_backward_input(t((2, 8, 6, 7)), W(), (9, 9), groups=2), ValueError,
     r"conv2d_backward_input.*'dy'"),
    ("conv_bwd_in_dy_rank", lambda: ops.conv2d_backward_input(t((2, 8, 49)), W(), (9, 9), groups=2), ValueError,
     r"conv2d_backward_input.*'dy'"),
    ("conv_bwd_in_w_dtype", lambda: ops.conv2d_backward_input(DY(), t((8, 3, 3, 3), np.int32), (9, 9), groups=2),
     TypeError, r"conv2d_backward_input.*'w'"),
    ("conv_bwd_in_groups", lambda: ops.conv2d_backward_input(DY(), W(), (9, 9), groups=3), ValueError,
     r"conv2d_backward_input.*'groups'"),
    ("conv_bwd_in_hw", lambda: ops.conv2d_backward_input(DY(), W(), (0, 9), groups=2), ValueError,
     r"conv2d_backward_input.*'H'"),
    ("conv_bwd_in_hw_type", lambda: ops.conv2d_backward_input(DY(), W(), "9x9", groups=2), TypeError,
     r"conv2d_backward_input.*'input_hw'"),
    ("conv_bwd_w_dy_shape", lambda: ops.conv2d_backward_weight(X(), t((2, 8, 7, 6)), 3, groups=2), ValueError,
     r"conv2d_backward_weight.*'dy'"),
    ("conv_bwd_w_groups", lambda: ops.conv2d_backward_weight(X(), DY(), 3, groups=4), ValueError,
     r"conv2d_backward_weight.*'groups'"),
    ("conv_bwd_w_x_dtype", lambda: ops.conv2d_backward_weight(t((2, 6, 9, 9), np.uint8), DY(), 3, groups=2),
     TypeError, r"conv2d_backward_weight.*'x'"),
    ("conv_bwd_w_kernel_zero", lambda: ops.conv2d_backward_weight(X(), DY(), 0, groups=2), ValueError,
     r"conv2d_backward_weight.*'R'"),
    ("conv_bwd_bias_rank", lambda: ops.conv2d_backward_bias(t((2, 8))), ValueError, r"conv2d_backward_bias.*'dy'"),
    ("conv_bwd_bias_dtype", lambda: ops.conv2d_backward_bias(t((2, 8, 7, 7), np.int32)), TypeError,
     r"conv2d_backward_bias.*'dy'"),
    # linear
    ("linear_fwd_features", lambda: ops.linear_forward(t((2, 5)), t((3, 4))), ValueError, r"linear_forward.*'w'"),
    ("linear_fwd_x_rank", lambda: ops.linear_forward(t((2, 5, 1)), t((3, 5))), ValueError, r"linear_forward.*'x'"),
    ("linear_fwd_x_dtype", lambda: ops.linear_forward(t((2, 5), np.int32), t((3, 5))), TypeError,
     r"linear_forward.*'x'"),
    ("linear_fwd_bias", lambda: ops.linear_forward(t((2, 5)), t((3, 5)), t((4,))), ValueError, r"linear_forward.*'b'"),
    ("linear_bwd_in_features", lambda: ops.linear_backward_input(t((2, 4)), t((3, 5))), ValueError,
     r"linear_backward_input.*'dy'"),
    ("linear_bwd_in_w_rank", lambda: ops.linear_backward_input(t((2, 3)), t((3,))), ValueError,
     r"linear_backward_input.*'w'"),
    ("linear_bwd_w_batch", lambda: ops.linear_backward_weight(t((2, 5)), t((3, 3))), ValueError,
     r"linear_backward_weight.*'dy'"),
    ("linear_bwd_w_dtype", lambda: ops.linear_backward_weight(t((2, 5)), t((2, 3), np.uint8)), TypeError,
     r"linear_backward_weight.*'dy'"),
    ("linear_bwd_bias_rank", lambda: ops.linear_backward_bias(t((3,))), ValueError, r"linear_backward_bias.*'dy'"),
    # relu
    ("relu_fwd_dtype", lambda: ops.relu_forward(t((3, 4), np.uint8)), TypeError, r"relu_forward.*'x'"),
    ("relu_bwd_shape", lambda: ops.relu_backward(t((3, 4)), t((4, 3))), ValueError, r"relu_backward.*'y'"),
    ("relu_bwd_dtype", lambda: ops.relu_backward(t((3, 4), np.int32), t((3, 4))), TypeError, r"relu_backward.*'dy'"),
    # lrn
    ("lrn_even_size", lambda: ops.lrn_forward(X(), 4), ValueError, r"lrn_forward.*'size'"),
    ("lrn_zero_size", lambda: ops.lrn_forward(X(), 0), ValueError, r"lrn_forward.*'size'"),
    ("lrn_rank", lambda: ops.lrn_forward(t((6, 9, 9))), ValueError, r"lrn_forward.*'x'"),
    ("lrn_dtype", lambda: ops.lrn_forward(t((2, 6, 9, 9), np.int32)), TypeError, r"lrn_forward.*'x'"),
    ("lrn_k", lambda: ops.lrn_forward(X(), 5, 0.0), ValueError, r"lrn_forward.*'k'"),
    ("lrn_alpha", lambda: ops.lrn_forward(X(), 5, 2.0, -1.0), ValueError, r"lrn_forward.*'alpha'"),
    ("lrn_beta_nan", lambda: ops.lrn_forward(X(), 5, 2.0, 1e-4, float("nan")), ValueError, r"lrn_forward.*'beta'"),
    ("lrn_bwd_even", lambda: ops.lrn_backward(X(), X(), X(), X(), 2), ValueError, r"lrn_backward.*'size'"),
    ("lrn_bwd_scale_shape", lambda: ops.lrn_backward(X(), X(), X(), t((2, 6, 9, 8))), ValueError,
     r"lrn_backward.*'scale'"),
    ("lrn_bwd_dy_dtype", lambda: ops.lrn_backward(t((2, 6, 9, 9), np.uint8), X(), X(), X()), TypeError,
     r"lrn_backward.*'dy'"),
    # max-pooling
    ("pool_window_too_large", lambda: ops.maxpool_forward(t((1, 1, 4, 4)), 5, 1, 0), ValueError,
     r"maxpool_forward.*window.*larger"),
    ("pool_window_too_large_padded", lambda: ops.maxpool_forward(t((1, 1, 2, 9)), (5, 3), 1, (1, 1)), ValueError,
     r"maxpool_forward.*window.*larger"),
    ("pool_padding_ge_window", lambda: ops.maxpool_forward(X(), 2, 2, 2), ValueError, r"maxpool_forward.*'padding'"),
    ("pool_rank", lambda: ops.maxpool_forward(t((6, 9, 9))), ValueError, r"maxpool_forward.*'x'"),
    ("pool_dtype", lambda: ops.maxpool_forward(t((2, 6, 9, 9), np.int32)), TypeError, r"maxpool_forward.*'x'"),
    ("pool_stride_zero", lambda: ops.maxpool_forward(X(), 3, 0), ValueError, r"maxpool_forward.*'stride'"),
    ("pool_window_type", lambda: ops.maxpool_forward(X(), 3.0), TypeError, r"maxpool_forward.*'window'"),
    ("pool_bwd_argmax_dtype", lambda: ops.maxpool_backward(t((2, 6, 4, 4)), t((2, 6, 4, 4)), (9, 9)), TypeError,
     r"maxpool_backward.*'argmax'"),
    ("pool_bwd_dy_shape", lambda: ops.maxpool_backward(t((2, 6, 4, 3)), pool_argmax(), (9, 9)), ValueError,
     r"maxpool_backward.*'dy'"),
    ("pool_bwd_argmax_shape", lambda: ops.maxpool_backward(t((2, 6, 4, 4)), t((2, 6, 4, 3), np.int32), (9, 9)),
     ValueError, r"maxpool_backward.*'argmax'"),
    ("pool_bwd_padding_type", lambda: ops.maxpool_backward(t((2, 6, 4, 4)), pool_argmax(), (9, 9), 3, 2, "x"), TypeError,
     r"maxpool_backward.*'padding'"),
    # dropout
    ("dropout_p_one", lambda: ops.dropout_forward(X(), 1.0), ValueError, r"dropout_forward.*'p'"),
    ("dropout_p_negative", lambda: ops.dropout_forward(X(), -0.1), ValueError, r"dropout_forward.*'p'"),
    ("dropout_p_nan", lambda: ops.dropout_forward(X(), float("nan")), ValueError, r"dropout_forward.*'p'"),
    ("dropout_dtype", lambda: ops.dropout_forward(t((3, 4), np.int32)), TypeError, r"dropout_forward.*'x'"),
    ("dropout_bwd_mask_dtype", lambda: ops.dropout_backward(t((3, 4)), t((3, 4))), TypeError,
     r"dropout_backward.*'mask'"),
    ("dropout_bwd_mask_shape", lambda: ops.dropout_backward(t((3, 4)), t((4, 3), np.uint8)), ValueError,
     r"dropout_backward.*'mask'"),
    ("dropout_bwd_p", lambda: ops.dropout_backward(t((3, 4)), t((3, 4), np.uint8), 1.5), ValueError,
     r"dropout_backward.*'p'"),
    # softmax / cross-entropy
    ("xent_label_high", lambda: ops.softmax_cross_entropy_forward(LOGITS(), ax.from_numpy(np.array([0, 5, 1], np.int32))),
     ValueError, r"softmax_cross_entropy_forward.*'labels'"),
    ("xent_label_negative",
     lambda: ops.softmax_cross_entropy_forward(LOGITS(), ax.from_numpy(np.array([0, -1, 1], np.int32))), ValueError,
     r"softmax_cross_entropy_forward.*'labels'"),
    ("xent_label_dtype", lambda: ops.softmax_cross_entropy_forward(LOGITS(), t((3,))), TypeError,
     r"softmax_cross_entropy_forward.*'labels'"),
    ("xent_label_shape", lambda: ops.softmax_cross_entropy_forward(LOGITS(), t((4,), np.int32)), ValueError,
     r"softmax_cross_entropy_forward.*'labels'"),
    ("xent_logits_rank", lambda: ops.softmax_cross_entropy_forward(t((15,)), LABELS()), ValueError,
     r"softmax_cross_entropy_forward.*'logits'"),
    ("xent_logits_dtype", lambda: ops.softmax_cross_entropy_forward(t((3, 5), np.int32), LABELS()), TypeError,
     r"softmax_cross_entropy_forward.*'logits'"),
    ("xent_bwd_label_high",
     lambda: ops.softmax_cross_entropy_backward(LOGITS(), ax.from_numpy(np.array([0, 9, 1], np.int32)), 1.0),
     ValueError, r"softmax_cross_entropy_backward.*'labels'"),
    ("xent_bwd_scale_inf", lambda: ops.softmax_cross_entropy_backward(LOGITS(), LABELS(), float("inf")), ValueError,
     r"softmax_cross_entropy_backward.*'scale'"),
    ("softmax_rank", lambda: ops.softmax_forward(t((2, 3, 4))), ValueError, r"softmax_forward.*'logits'"),
    ("softmax_dtype", lambda: ops.softmax_forward(t((2, 3), np.uint8)), TypeError, r"softmax_forward.*'logits'"),
    # the fused ReLU arguments
    ("relu_flag_type", lambda: ops.conv2d_forward(X(), t((4, 6, 3, 3)), relu=1), TypeError, r"conv2d_forward.*'relu'"),
    ("relu_y_shape", lambda: ops.conv2d_backward_input(t((2, 4, 7, 7)), t((4, 6, 3, 3)), (9, 9),
                                                       relu_y=t((2, 6, 9, 8))),
     ValueError, r"conv2d_backward_input.*'relu_y'"),
    ("relu_y_dtype", lambda: ops.dropout_backward(t((3, 4)), t((3, 4), np.uint8, fill=1), relu_y=t((3, 4), np.int32)),
     TypeError, r"dropout_backward.*'relu_y'"),
    # sgd
    ("sgd_dw_shape", lambda: ops.sgd_update(t((3, 4)), t((4, 3)), t((3, 4)), 0.01), ValueError, r"sgd_update.*'dw'"),
    ("sgd_v_shape", lambda: ops.sgd_update(t((3, 4)), t((3, 4)), t((12,)), 0.01), ValueError, r"sgd_update.*'v'"),
    ("sgd_w_dtype", lambda: ops.sgd_update(t((3, 4), np.int32), t((3, 4)), t((3, 4)), 0.01), TypeError,
     r"sgd_update.*'w'"),
    ("sgd_momentum", lambda: ops.sgd_update(t((3, 4)), t((3, 4)), t((3, 4)), 0.01, 1.0), ValueError,
     r"sgd_update.*'momentum'"),
    ("sgd_lr", lambda: ops.sgd_update(t((3, 4)), t((3, 4)), t((3, 4)), -0.01), ValueError, r"sgd_update.*'lr'"),
    ("sgd_weight_decay", lambda: ops.sgd_update(t((3, 4)), t((3, 4)), t((3, 4)), 0.01, 0.9, float("nan")),
     ValueError, r"sgd_update.*'weight_decay'"),
    ("sgd_multi_dw_shape", lambda: ops.sgd_update_multi([(t((3,)), t((3,)), t((3,)), 0.0), (t((3, 4)), t((4, 3)),
                                                          t((3, 4)), 0.0)], 0.01), ValueError,
     r"sgd_update_multi.*'params\[1\]\.dw'"),
    ("sgd_multi_not_tuple", lambda: ops.sgd_update_multi([t((3,))], 0.01), TypeError,
     r"sgd_update_multi.*'params\[0\]'"),
    ("sgd_multi_decay", lambda: ops.sgd_update_multi([(t((3,)), t((3,)), t((3,)), -1.0)], 0.01), ValueError,
     r"sgd_update_multi.*'params\[0\]\.weight_decay'"),
    ("sgd_multi_momentum", lambda: ops.sgd_update_multi([(t((3,)), t((3,)), t((3,)), 0.0)], 0.01, 1.0), ValueError,
     r"sgd_update_multi.*'momentum'"),
    ("sgd_multi_alias", lambda: (lambda w: ops.sgd_update_multi([(w, t((3,)), t((3,)), 0.0), (w, t((3,)), t((3,)),
                                                                 0.0)], 0.01))(t((3,))), ValueError,
     r"sgd_update_multi.*'params'.*overlap"),
    # plumbing
    ("concat_empty", lambda: ops.concat_channels([]), ValueError, r"concat_channels.*'xs'"),
    ("concat_spatial_mismatch", lambda: ops.concat_channels([t((2, 3, 4, 4)), t((2, 3, 4, 5))]), ValueError,
     r"concat_channels.*'xs'"),
    ("concat_rank_mismatch", lambda: ops.concat_channels([t((2, 3, 4, 4)), t((2, 3))]), ValueError,
     r"concat_channels.*'xs'"),
    ("concat_3d", lambda: ops.concat_channels([t((2, 3, 4))]), ValueError, r"concat_channels.*'xs'"),
    ("concat_dtype", lambda: ops.concat_channels([t((2, 3)), t((2, 3), np.int32)]), TypeError,
     r"concat_channels.*'xs'"),
    ("slice_range", lambda: ops.slice_channels(X(), 4, 7), ValueError, r"slice_channels.*channel range"),
    ("slice_empty", lambda: ops.slice_channels(X(), 3, 3), ValueError, r"slice_channels.*channel range"),
    ("slice_rank", lambda: ops.slice_channels(t((2, 3, 4)), 0, 1), ValueError, r"slice_channels.*'x'"),
    ("add_shape", lambda: ops.add(t((3, 4)), t((4, 3))), ValueError, r"add: argument 'b'"),
    ("add_dtype", lambda: ops.add(t((3, 4)), t((3, 4), np.int32)), TypeError, r"add: argument 'b'"),
]


def _augment_args(**over):
    N, H, W = 2, 8, 8
    args = dict(images=ax.from_numpy(np.zeros((N, H, W, 3), np.uint8)),
                offsets=ax.from_numpy(np.zeros((N, 2), np.int32)),
                flips=ax.from_numpy(np.zeros((N,), np.uint8)),
                light=ax.from_numpy(np.zeros((N, 3), np.float32)),
                mean=ax.from_numpy(np.zeros((3, H, W), np.float32)), crop=5)
    args.update(over)
    return args


CASES += [
    ("augment_images_dtype", lambda: ops.augment_batch(**_augment_args(images=t((2, 8, 8, 3)))), TypeError,
     r"augment_batch.*'images'"),
    ("augment_images_channels", lambda: ops.augment_batch(**_augment_args(images=t((2, 8, 8, 4), np.uint8))),
     ValueError, r"augment_batch.*'images'"),
    ("augment_offsets_outside",
     lambda: ops.augment_batch(**_augment_args(offsets=ax.from_numpy(np.array([[0, 0], [4, 0]], np.int32)))),
     ValueError, r"augment_batch.*'offsets'"),
    ("augment_offsets_negative",
     lambda: ops.augment_batch(**_augment_args(offsets=ax.from_numpy(np.array([[0, -1], [0, 0]], np.int32)))),
     ValueError, r"augment_batch.*'offsets'"),
    ("augment_crop", lambda: ops.augment_batch(**_augment_args(crop=9)), ValueError, r"augment_batch.*'crop'"),
    ("augment_mean_shape", lambda: ops.augment_batch(**_augment_args(mean=t((3, 8, 7)))), ValueError,
     r"augment_batch.*'mean'"),
    ("augment_light_dtype", lambda: ops.augment_batch(**_augment_args(light=t((2, 3), np.int32))), TypeError,
     r"augment_batch.*'light'"),
    ("augment_flips_shape", lambda: ops.augment_batch(**_augment_args(flips=t((3,), np.uint8))), ValueError,
     r"augment_batch.*'flips'"),
    # from_numpy
    ("from_numpy_non_contiguous", lambda: ax.from_numpy(np.zeros((4, 6), np.float32)[:, ::2]), ValueError,
     r"from_numpy.*'array'.*contiguous"),
    ("from_numpy_fortran", lambda: ax.from_numpy(np.asfortranarray(np.zeros((4, 6), np.float32))), ValueError,
     r"from_numpy.*'array'.*contiguous"),
    ("from_numpy_float64", lambda: ax.from_numpy(np.zeros((4, 6))), TypeError, r"from_numpy.*'array'.*float64"),
    ("from_numpy_bad_device", lambda: ax.from_numpy(np.zeros(3, np.float32), "gpu7"), ValueError,
     r"from_numpy.*'device'"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_op_and_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


@pytest.mark.parametrize("device", devices())
def test_maxpool_backward_rejects_argmax_outside_its_window(device):
    """The CPU backend checks argmax values as it scatters (an out-of-window index would write out of bounds);
    for CUDA tensors the op checks them on the host first (the gather would silently drop the gradient)."""
    am = pool_argmax().numpy()
    for bad in (-1, 81, 80):  # negative, past the plane, inside the plane but outside window (0, 0)
        a = am.copy()
        a[1, 2, 0, 0] = bad
        with pytest.raises(ValueError, match=r"maxpool_backward: argument 'argmax'.*outside"):
            ops.maxpool_backward(t((2, 6, 4, 4), device=device), ax.from_numpy(a, device), (9, 9))
    with pytest.raises(TypeError, match="maxpool_backward: argument 'check_argmax'"):
        ops.maxpool_backward(t((2, 6, 4, 4)), ax.from_numpy(am), (9, 9), check_argmax="no")


def test_errors_leave_the_library_usable():
    for _, call, exc, _ in CASES:
        with pytest.raises(exc):
            call()
    y = ops.conv2d_forward(X(), W(), groups=2)
    assert np.allclose(y.numpy(), 0.25 * 27)


@pytest.mark.cuda
@pytest.mark.parametrize("op,call", [
    ("conv2d_forward", lambda: ops.conv2d_forward(X(), t((8, 3, 3, 3), device="cuda:0"), groups=2)),
    ("conv2d_backward_weight", lambda: ops.conv2d_backward_weight(X(), t((2, 8, 7, 7), device="cuda:0"), 3, groups=2)),
    ("linear_forward", lambda: ops.linear_forward(t((2, 5)), t((3, 5)), t((3,), device="cuda:0"))),
    ("relu_backward", lambda: ops.relu_backward(t((3, 4), device="cuda:0"), t((3, 4)))),
    ("lrn_backward", lambda: ops.lrn_backward(X(), X(), t((2, 6, 9, 9), device="cuda:0"), X())),
    ("maxpool_backward", lambda: ops.maxpool_backward(t((2, 6, 4, 4), device="cuda:0"), pool_argmax(), (9, 9))),
    ("dropout_backward", lambda: ops.dropout_backward(t((3, 4)), t((3, 4), np.uint8, "cuda:0"))),
    ("softmax_cross_entropy_forward", lambda: ops.softmax_cross_entropy_forward(LOGITS(), LABELS().to("cuda:0"))),
    ("sgd_update", lambda: ops.sgd_update(t((3, 4)), t((3, 4), device="cuda:0"), t((3, 4)), 0.01)),
    ("sgd_update_multi", lambda: ops.sgd_update_multi([(t((3,)), t((3,)), t((3,)), 0.0),
                                                      (t((3,), device="cuda:0"), t((3,)), t((3,)), 0.0)], 0.01)),
    ("concat_channels", lambda: ops.concat_channels([t((2, 3)), t((2, 3), device="cuda:0")])),
    ("add", lambda: ops.add(t((3, 4)), t((3, 4), device="cuda:0"))),
    ("augment_batch", lambda: ops.augment_batch(**_augment_args(mean=t((3, 8, 8), device="cuda:0")))),
])
def test_tensors_on_different_devices_are_rejected(op, call):
    with pytest.raises(ValueError, match=rf"{op}.*(is on|device)"):
        call()


# ---- issue 10: hostile sizes, contents and arrays -------------------------------------------------------
# The calls that used to crash the interpreter (int32 overflow in size arithmetic, an unchecked array
# cast) each run in a child process, so a regression fails one test instead of killing the test run.

_CHILD_PRELUDE = """
import numpy as np, alexnet_cuda as ax
ops = ax.ops
t = lambda shape, dt=np.float32: ax.from_numpy(np.ones(shape, dt))
def expect(exc, call):
    try:
        r = call()
    except exc as e:
        print("RAISED", type(e).__name__, str(e).replace(chr(10), " "))
    else:
        print("RETURNED", r)
"""

CHILD_CASES = [
    # (id, code calling expect(...), regex the child's one line of output must match)
    ("conv_bwd_input_hw_2e30", "expect(ValueError, lambda: ops.conv2d_backward_input(t((1, 1, 1, 1)), t((1, 1, 1, 1)), "
     "(2**30, 2**30)))", r"RAISED ValueError conv2d_backward_input: .*'input_hw'.*2\^31"),
    ("maxpool_bwd_input_hw_2e30", "expect(ValueError, lambda: ops.maxpool_backward(t((1, 1, 1, 1)), "
     "t((1, 1, 1, 1), np.int32), (2**30, 2**30), 1, 1, 0))", r"RAISED ValueError maxpool_backward: .*'input_hw'.*2\^31"),
    ("maxpool_fwd_window_2e30", "expect(ValueError, lambda: ops.maxpool_forward(t((1, 1, 4, 4)), 2**30, 1, 2**30 - 1))",
     r"RAISED ValueError maxpool_forward: argument 'padding'.*2\^31"),
    ("maxpool_fwd_window_2e30_no_pad", "expect(ValueError, lambda: ops.maxpool_forward(t((1, 1, 4, 4)), 2**30, 1, 0))",
     r"RAISED ValueError maxpool_forward: window 1073741824 is larger"),
    ("augment_x0_wraps", "expect(ValueError, lambda: ops.augment_batch(t((1, 8, 8, 3), np.uint8), "
     "ax.from_numpy(np.array([[0, 2**31 - 1]], np.int32)), t((1,), np.uint8), t((1, 3)), t((3, 8, 8)), 4))",
     r"RAISED ValueError augment_batch: argument 'offsets' row 0 = \(0, 2147483647\)"),
    ("conv_padding_wraps", "expect(ValueError, lambda: ops.conv2d_forward(t((1, 1, 4, 4)), t((1, 1, 1, 1)), t((1,)), "
     "padding=2**31 - 1))", r"RAISED ValueError conv2d_forward: argument 'padding'.*beyond 2\^31-1"),
    ("conv_output_too_large", "expect(ValueError, lambda: ops.conv2d_forward(t((1, 1, 1, 1)), t((1, 1, 1, 1)), "
     "padding=2**29))", r"RAISED ValueError conv2d_forward: arguments 'x', 'w', 'stride', 'padding' give output 'y' the shape "
     r"\(1, 1, 1073741825, 1073741825\) with 2\^31 or more elements"),
    ("empty_batch_huge_plane", "expect(ValueError, lambda: ops.conv2d_backward_weight("
     "ax.from_numpy(np.zeros((0, 1, 1, 1), np.float32)), ax.from_numpy(np.zeros((0, 1, 2**31 - 1, 4), "
     "np.float32)), 1, padding=2**30 - 1))", r"RAISED ValueError conv2d_backward_weight: argument 'dy' has shape "
     r"\(0, 1, 2147483647, 4\) with 2\^31 or more elements \(zero-size dimensions counted as 1\)"),
    ("empty_dim_next_to_huge_one", "expect(ValueError, lambda: ops.relu_forward(ax.from_numpy(np.zeros((0, 2**31, 5), "
     "np.float32))))", r"RAISED ValueError relu_forward: argument 'x' has shape \(0, 2147483648, 5\) with 2\^31"),
    ("int_arg_beyond_int32", "expect(ValueError, lambda: ops.conv2d_forward(t((1, 1, 4, 4)), t((1, 1, 1, 1)), "
     "stride=2**31))", r"RAISED ValueError conv2d_forward: argument 'stride' is 2147483648, outside the int32 range"),
    ("int_arg_beyond_int64", "expect(ValueError, lambda: ops.slice_channels(t((1, 2)), 0, 2**64))",
     r"RAISED ValueError slice_channels: argument 'c1' is 18446744073709551616"),
]
for _dt in ("'<U3'", "'S3'", "[('a', '<f4'), ('b', '<i8')]", "object"):
    _name = _dt.strip(chr(39))[:6]
    # Through the Python front (which checks entries itself) and straight into the core, whose own checks
    # are what keeps a crafted checkpoint from reaching memory as the wrong type.
    CHILD_CASES.append((
        f"load_state_dict_dtype_{_name}",
        "net = ax.Net(ax.tiny_config(), devices='cpu', seed=0)\n"
        "sd = net.state_dict(); k = 'conv1.t0.weight'\n"
        f"sd[k] = np.zeros(sd[k].shape, {_dt})\n"
        "expect(TypeError, lambda: net.load_state_dict(sd))",
        r"RAISED TypeError load_state_dict: .*'conv1.t0.weight' has dtype "))
    CHILD_CASES.append((
        f"core_load_state_dtype_{_name}",
        "net = ax.Net(ax.tiny_config(), devices='cpu', seed=0)\n"
        "sd = dict(net._net.state()); k = 'conv1.t0.weight'\n"
        f"sd[k] = np.zeros(sd[k].shape, {_dt})\n"
        "expect(TypeError, lambda: net._net.load_state(sd))",
        r"RAISED TypeError load_state_dict: entry 'conv1.t0.weight' has dtype .*expected a floating-point array"))


def _run_child(code):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _CHILD_PRELUDE + code], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.strip(), p.stderr.strip()[-2000:]


@pytest.mark.parametrize("code,pattern", [c[1:] for c in CHILD_CASES], ids=[c[0] for c in CHILD_CASES])
def test_issue10_reproducers_raise_in_a_child_process(code, pattern):
    import re

    rc, out, err = _run_child(code)
    assert rc == 0, f"the child died (exit status {rc}): {err}"
    assert re.match(pattern, out) and "\n" not in out, out


def test_conv_stride_near_int32_max_matches_reference(tmp_path):
    """A stride of 2^31-1 is valid (one output column); the CPU conv's window arithmetic used to overflow."""
    import alexnet_cuda.reference as ref

    code = ("x = np.random.default_rng(0).standard_normal((2, 3, 5, 6)).astype(np.float32)\n"
            "w = np.random.default_rng(1).standard_normal((4, 3, 2, 3)).astype(np.float32)\n"
            "y = ops.conv2d_forward(ax.from_numpy(x), ax.from_numpy(w), stride=(2**31 - 1, 2**31 - 1), padding=1)\n"
            f"np.save({str(tmp_path / 'y.npy')!r}, y.numpy())")
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _CHILD_PRELUDE + code], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    y = np.load(tmp_path / "y.npy")
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 6)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((4, 3, 2, 3)).astype(np.float32)
    want = ref.conv2d_forward(x, w, stride=2**31 - 1, padding=1)
    assert y.shape == want.shape == (2, 4, 1, 1)
    assert np.linalg.norm(y - want) <= 1e-4 * np.linalg.norm(want)


ISSUE10_CASES = [
    ("pool_empty_plane", lambda: ops.maxpool_forward(t((1, 1, 0, 0)), 2, 1, 1), ValueError,
     r"maxpool_forward: argument 'x' must have H, W .*>= 1"),
    ("pool_empty_width", lambda: ops.maxpool_forward(t((2, 3, 4, 0)), 1, 1, 0), ValueError,
     r"maxpool_forward: argument 'x'"),
    ("dropout_mask_not_0_or_1", lambda: ops.dropout_backward(t((3,)), ax.from_numpy(np.array([1, 7, 0], np.uint8))),
     ValueError, r"dropout_backward: argument 'mask' holds 7 at flat index 1"),
    ("dropout_seed_negative", lambda: ops.dropout_forward(t((3,)), 0.5, -1), ValueError,
     r"dropout_forward: argument 'seed' is -1"),
    ("dropout_p_str", lambda: ops.dropout_forward(t((3,)), "0.5"), TypeError, r"dropout_forward: argument 'p'"),
    ("lrn_k_complex", lambda: ops.lrn_forward(X(), 5, 1j), TypeError, r"lrn_forward: argument 'k'"),
    ("op_given_numpy_array", lambda: ops.relu_forward(np.ones(3, np.float32)), TypeError,
     r"relu_forward: argument 'x' must be an alexnet_cuda Tensor"),
    ("groups_bool", lambda: ops.conv2d_forward(X(), W(), groups=True), TypeError, r"conv2d_forward: argument 'groups'"),
    ("concat_not_a_list", lambda: ops.concat_channels(X()), TypeError, r"concat_channels: argument 'xs'"),
    ("from_numpy_list", lambda: ax.from_numpy([1.0, 2.0]), TypeError, r"from_numpy: argument 'array'"),
    ("from_numpy_big_endian", lambda: ax.from_numpy(np.zeros(3, ">f4")), TypeError, r"from_numpy: argument 'array'"),
    ("from_numpy_structured", lambda: ax.from_numpy(np.zeros(3, [("a", "<f4")])), TypeError,
     r"from_numpy: argument 'array'"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in ISSUE10_CASES], ids=[c[0] for c in ISSUE10_CASES])
def test_issue10_bad_values_raise(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def _tiny_net():
    return ax.Net(ax.tiny_config(), devices="cpu", seed=0)


def _net_batch(net, n=2):
    c = net.config
    return np.zeros((n, c["in_channels"], c["input_size"], c["input_size"]), np.float32)


@pytest.mark.parametrize("labels,exc,pattern", [
    (np.array([0, 2**32 + 1], np.int64), ValueError, r"train_step: argument 'labels' holds 4294967297 at 1"),
    (np.array([0, 2**64 - 1], np.uint64), ValueError, r"train_step: argument 'labels' holds 18446744073709551615"),
    (np.array([0, -1], np.int8), ValueError, r"train_step: argument 'labels' holds -1 at 1"),
    (np.array([0, 10], np.int32), ValueError, r"train_step: argument 'labels' holds 10 at 1, outside \[0, 10\)"),
    (np.array([0.0, 1.0]), TypeError, r"train_step: argument 'labels' must hold integers"),
])
def test_net_labels_are_range_checked_in_their_own_dtype(labels, exc, pattern):
    net = _tiny_net()
    assert net.config["num_classes"] == 10
    before = net.state_dict()
    with pytest.raises(exc, match=pattern):
        net.train_step(_net_batch(net), labels, 0.01)
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was trained


def _core_net(**over):
    """The C++ Net built from a config dict directly (the Python front validates configs too; this checks
    that the core does not rely on it)."""
    cfg = dict(ax.tiny_config())
    cfg.update(over)
    return ax._C.Net(cfg, ["cpu", "cpu"], False, 0)


def test_net_rejects_non_finite_init_std_and_config_floats():
    for key, value in (("init_std", float("nan")), ("init_std", float("inf")), ("momentum", float("nan")),
                       ("weight_decay", float("inf")), ("lrn_k", float("nan")), ("init_std", 1e300)):
        with pytest.raises(ValueError, match=rf"Net: .*{key}.*finite"):
            _core_net(**{key: value})
    with pytest.raises(ValueError, match=r"Net: init_std must be finite and >= 0, got -1"):
        _core_net(init_std=-1.0)


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda s: np.full(s, 1e300), ValueError, r"holds 1e\+300 at flat index 0, which is not a finite float32"),
    (lambda s: np.full(s, np.nan, np.float32), ValueError, r"holds nan at flat index 0"),
    (lambda s: np.zeros(s, np.complex64), TypeError, r"has dtype complex64"),
    (lambda s: np.zeros(s, bool), TypeError, r"has dtype bool"),
    (lambda s: np.zeros(s, np.int32), TypeError, r"has dtype int32"),
    (lambda s: np.zeros(s[:-1], np.float32), ValueError, r"has shape .*, the net has"),
    (lambda s: [[0.0]], TypeError, r"must be a numpy.ndarray"),
])
def test_core_load_state_rejects_bad_arrays_before_reading_them(make, exc, pattern):
    net = _tiny_net()
    sd = dict(net._net.state())
    before = sd["conv1.t0.weight"].copy()
    sd["conv1.t0.weight"] = make(before.shape)
    with pytest.raises(exc, match=r"load_state_dict: entry 'conv1.t0.weight' " + pattern):
        net._net.load_state(sd)
    assert np.array_equal(dict(net._net.state())["conv1.t0.weight"], before)  # nothing was loaded
    sd = dict(net._net.state())
    sd[7] = sd.pop("conv1.t0.weight")
    with pytest.raises(TypeError, match=r"load_state_dict: key 7 is not a str"):
        net._net.load_state(sd)


def test_core_load_state_converts_other_float_dtypes_exactly():
    net = _tiny_net()
    sd = dict(net._net.state())
    rng = np.random.default_rng(5)
    w = rng.standard_normal(sd["conv1.t0.weight"].shape)  # float64
    b = rng.standard_normal(sd["conv1.t0.bias"].shape).astype(">f2")  # half, other byte order
    sd["conv1.t0.weight"], sd["conv1.t0.bias"] = w, b
    net._net.load_state(sd)
    got = dict(net._net.state())
    assert np.array_equal(got["conv1.t0.weight"], w.astype(np.float32))
    assert np.array_equal(got["conv1.t0.bias"], b.astype(np.float32))


def test_net_config_sizes_step_and_seed_are_range_checked():
    with pytest.raises(ValueError, match=r"Net: argument 'config\['input_size'\]' is 1099511627776, outside the int32"):
        _core_net(input_size=2**40)
    with pytest.raises(ValueError, match=r"Net: conv1 convolution: the padded input .* beyond 2\^31-1"):
        _core_net(conv1=dict(kernel=5, stride=1, padding=2**31 - 1))
    with pytest.raises(ValueError, match=r"Net: .*fc6 weight.*2\^31 or more elements"):
        _core_net(fc=[2**30, 2])
    with pytest.raises(ValueError, match=r"Net: argument 'seed' is -1"):
        ax._C.Net(dict(ax.tiny_config()), ["cpu", "cpu"], False, -1)
    net = _tiny_net()
    with pytest.raises(ValueError, match=r"Net: argument 'step' must be >= 0"):
        net._net.step = -1
    with pytest.raises(ValueError, match=r"Net: argument 'seed' is 18446744073709551616"):
        net._net.seed = 2**64
