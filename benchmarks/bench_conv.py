"""Convolutions conv1..conv5 at AlexNet's batch-128 shapes: forward, grad-input, grad-weight and grad-bias,
against PyTorch/cuDNN on the same inputs.

Shapes are the single-GPU equivalent of the paper's two towers, merged: conv1 3->96 (both towers read the whole
image, so one 96-filter conv is exactly the two 48-filter ones), conv2/conv4/conv5 with groups=2 (each tower sees
only its own half of the channels), conv3 ungrouped (it reads both towers). conv1's grad-input is not needed in
training (its input is the image) but is measured anyway.

Validation: forward and grad-input on the first, middle and last samples of the full-batch output; grad-weight and
grad-bias (sums over the batch) on a full-batch run whose dy is zero outside those samples, so the kernel
configuration that is timed is the one checked.
"""
from __future__ import annotations

import numpy as np

import harness as H
from harness import f64, masked_batch


def layer_cases(ctx: H.Context, L: dict, salt: int):
    ops = H.ax.ops
    N, C, Hh, W, K, R, S = (L[k] for k in ("N", "C", "H", "W", "K", "R", "S"))
    s, p, g = L["stride"], L["pad"], L["groups"]
    xshape, wshape, yshape = (N, C, Hh, W), (K, C // g, R, S), (N, K, L["P"], L["Q"])
    geom = f"{C}->{K} {R}x{S}/{s} p{p} g{g}"
    flops = H.conv_flops(L)

    def setup(ctx, need):
        rng = ctx.rng(100 + salt)
        makers = {"x": lambda: H.randn(rng, xshape), "w": lambda: H.randn(rng, wshape, 1 / np.sqrt(wshape[1] * R * S)),
                  "b": lambda: H.randn(rng, (K,)), "dy": lambda: H.randn(rng, yshape)}
        st = {"picks": ctx.picks(N), "need": need}
        for n in need:
            st[n] = makers[n]()
            st[n + "t"] = ctx.dev(st[n])
        return st

    def torch_setup(ctx, st):
        ts = {n: ctx.tdev(st[n]) for n in st["need"]}
        ts["F"], ts["grad"] = ctx.torch.nn.functional, ctx.torch.nn.grad
        return ts

    # forward
    def fwd(st):
        return ops.conv2d_forward(st["xt"], st["wt"], st["bt"], s, p, g)

    def fwd_validate(ctx, st):
        pk = st["picks"]
        return ({"y": fwd(st).numpy()[pk]},
                {"y": ctx.ref.conv2d_forward(f64(st["x"][pk]), f64(st["w"]), f64(st["b"]), s, p, g)})

    def fwd_torch(ts):
        return ts["F"].conv2d(ts["x"], ts["w"], ts["b"], s, p, 1, g)

    # grad-input
    def dgrad(st):
        return ops.conv2d_backward_input(st["dyt"], st["wt"], (Hh, W), s, p, g)

    def dgrad_validate(ctx, st):
        pk = st["picks"]
        return ({"dx": dgrad(st).numpy()[pk]},
                {"dx": ctx.ref.conv2d_backward_input(f64(st["dy"][pk]), f64(st["w"]), (Hh, W), s, p, g)})

    def dgrad_torch(ts):
        return ts["grad"].conv2d_input(xshape, ts["w"], ts["dy"], s, p, 1, g)

    # grad-weight: validated on a full-batch dy that is zero outside the picked samples
    def wgrad(st, dyt=None):
        return ops.conv2d_backward_weight(st["xt"], st["dyt"] if dyt is None else dyt, (R, S), s, p, g)

    def wgrad_validate(ctx, st):
        pk = st["picks"]
        st["dy_val"] = masked_batch(st["dy"], pk)
        return ({"dw": wgrad(st, ctx.dev(st["dy_val"])).numpy()},
                {"dw": ctx.ref.conv2d_backward_weight(f64(st["x"][pk]), f64(st["dy"][pk]), (R, S), s, p, g)})

    def wgrad_torch(ts, dy=None):
        return ts["grad"].conv2d_weight(ts["x"], wshape, ts["dy"] if dy is None else dy, s, p, 1, g)

    # grad-bias: memory-bound, reads dy once
    def bgrad_validate(ctx, st):
        pk = st["picks"]
        st["dy_val"] = masked_batch(st["dy"], pk)
        return ({"db": ops.conv2d_backward_bias(ctx.dev(st["dy_val"])).numpy()},
                {"db": ctx.ref.conv2d_backward_bias(f64(st["dy"][pk]))})

    name = L["name"]
    return [
        H.Case("conv", name, "forward", H.shape_str(xshape) + " " + geom,
               setup=lambda ctx: setup(ctx, ("x", "w", "b")), validate=fwd_validate, run=fwd,
               tol=H.TOL_REDUCTION, flops=flops, torch_setup=torch_setup, torch_run=fwd_torch,
               torch_outputs=lambda ctx, st, ts: {"y": H.to_np(fwd_torch(ts))[st["picks"]]}),
        H.Case("conv", name, "grad-input", H.shape_str(yshape) + " " + geom,
               setup=lambda ctx: setup(ctx, ("w", "dy")), validate=dgrad_validate, run=dgrad,
               tol=H.TOL_REDUCTION, flops=flops, torch_setup=torch_setup, torch_run=dgrad_torch,
               torch_outputs=lambda ctx, st, ts: {"dx": H.to_np(dgrad_torch(ts))[st["picks"]]},
               note="not needed in training (conv1's input is the image)" if name == "conv1" else ""),
        H.Case("conv", name, "grad-weight", H.shape_str(xshape) + " " + geom,
               setup=lambda ctx: setup(ctx, ("x", "dy")), validate=wgrad_validate, run=wgrad,
               tol=H.TOL_REDUCTION, flops=flops, torch_setup=torch_setup, torch_run=wgrad_torch,
               torch_outputs=lambda ctx, st, ts: {"dw": H.to_np(wgrad_torch(ts, ctx.tdev(st["dy_val"])))}),
        H.Case("conv", name, "grad-bias", H.shape_str(yshape),
               setup=lambda ctx: setup(ctx, ("dy",)), validate=bgrad_validate,
               run=lambda st: ops.conv2d_backward_bias(st["dyt"]),
               tol=H.TOL_REDUCTION, bytes=4 * (int(np.prod(yshape)) + K), torch_setup=torch_setup,
               torch_run=lambda ts: ts["dy"].sum((0, 2, 3)),
               torch_outputs=lambda ctx, st, ts: {"db": H.to_np(ctx.tdev(st["dy_val"]).sum((0, 2, 3)))}),
    ]


def conv_cases(ctx: H.Context):
    return [c for i, L in enumerate(ctx.shapes()["convs"]) for c in layer_cases(ctx, L, i)]


def main(argv=None):
    return H.script_main("conv", "Convolutions (conv1..conv5)", conv_cases, argv)


if __name__ == "__main__":
    main()
