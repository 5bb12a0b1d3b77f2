"""Fully-connected layers fc6..fc8 at batch 128 (our GEMM kernels): forward, grad-input, grad-weight and grad-bias,
against PyTorch (cuBLAS, TF32 off) on the same inputs.

Shapes are the merged single-GPU equivalent of the two towers: fc6 9216->4096, fc7 4096->4096, fc8 4096->1000
(each tower computes half of the outputs from both towers' inputs, so the merged layer is exact).
Validation as in bench_conv: per-sample outputs on the first, middle and last samples; grad-weight and grad-bias
on a full-batch dy that is zero outside those samples.
"""
from __future__ import annotations

import numpy as np

import harness as H
from harness import f64, masked_batch


def layer_cases(ctx: H.Context, L: dict, salt: int):
    ops = H.ax.ops
    N, n_in, n_out = L["N"], L["I"], L["O"]
    flops = 2 * N * n_in * n_out
    geom = f"{N}x{n_in} -> {n_out}"

    def setup(ctx, need):
        rng = ctx.rng(200 + salt)
        makers = {"x": lambda: H.randn(rng, (N, n_in)), "w": lambda: H.randn(rng, (n_out, n_in), 1 / np.sqrt(n_in)),
                  "b": lambda: H.randn(rng, (n_out,)), "dy": lambda: H.randn(rng, (N, n_out))}
        st = {"picks": ctx.picks(N), "need": need}
        for n in need:
            st[n] = makers[n]()
            st[n + "t"] = ctx.dev(st[n])
        return st

    def torch_setup(ctx, st):
        ts = {n: ctx.tdev(st[n]) for n in st["need"]}
        ts["F"] = ctx.torch.nn.functional
        return ts

    def fwd(st):
        return ops.linear_forward(st["xt"], st["wt"], st["bt"])

    def fwd_validate(ctx, st):
        pk = st["picks"]
        return {"y": fwd(st).numpy()[pk]}, {"y": ctx.ref.linear_forward(f64(st["x"][pk]), f64(st["w"]), f64(st["b"]))}

    def dgrad(st):
        return ops.linear_backward_input(st["dyt"], st["wt"])

    def dgrad_validate(ctx, st):
        pk = st["picks"]
        return {"dx": dgrad(st).numpy()[pk]}, {"dx": ctx.ref.linear_backward_input(f64(st["dy"][pk]), f64(st["w"]))}

    def wgrad(st, dyt=None):
        return ops.linear_backward_weight(st["xt"], st["dyt"] if dyt is None else dyt)

    def wgrad_validate(ctx, st):
        pk = st["picks"]
        st["dy_val"] = masked_batch(st["dy"], pk)
        return ({"dw": wgrad(st, ctx.dev(st["dy_val"])).numpy()},
                {"dw": ctx.ref.linear_backward_weight(f64(st["x"][pk]), f64(st["dy"][pk]))})

    def bgrad_validate(ctx, st):
        pk = st["picks"]
        st["dy_val"] = masked_batch(st["dy"], pk)
        return ({"db": ops.linear_backward_bias(ctx.dev(st["dy_val"])).numpy()},
                {"db": ctx.ref.linear_backward_bias(f64(st["dy"][pk]))})

    def wgrad_torch(ts, dy=None):
        return (ts["dy"] if dy is None else dy).t().mm(ts["x"])

    name = L["name"]
    return [
        H.Case("gemm", name, "forward", geom, setup=lambda ctx: setup(ctx, ("x", "w", "b")), validate=fwd_validate,
               run=fwd, tol=H.TOL_REDUCTION, flops=flops, torch_setup=torch_setup,
               torch_run=lambda ts: ts["F"].linear(ts["x"], ts["w"], ts["b"]),
               torch_outputs=lambda ctx, st, ts: {
                   "y": H.to_np(ts["F"].linear(ts["x"], ts["w"], ts["b"]))[st["picks"]]}),
        H.Case("gemm", name, "grad-input", geom, setup=lambda ctx: setup(ctx, ("w", "dy")), validate=dgrad_validate,
               run=dgrad, tol=H.TOL_REDUCTION, flops=flops, torch_setup=torch_setup,
               torch_run=lambda ts: ts["dy"].mm(ts["w"]),
               torch_outputs=lambda ctx, st, ts: {"dx": H.to_np(ts["dy"].mm(ts["w"]))[st["picks"]]}),
        H.Case("gemm", name, "grad-weight", geom, setup=lambda ctx: setup(ctx, ("x", "dy")), validate=wgrad_validate,
               run=wgrad, tol=H.TOL_REDUCTION, flops=flops, torch_setup=torch_setup, torch_run=wgrad_torch,
               torch_outputs=lambda ctx, st, ts: {"dw": H.to_np(wgrad_torch(ts, ctx.tdev(st["dy_val"])))}),
        H.Case("gemm", name, "grad-bias", f"{N}x{n_out}", setup=lambda ctx: setup(ctx, ("dy",)),
               validate=bgrad_validate,
               run=lambda st: ops.linear_backward_bias(st["dyt"]), tol=H.TOL_REDUCTION, bytes=4 * (N * n_out + n_out),
               torch_setup=torch_setup, torch_run=lambda ts: ts["dy"].sum(0),
               torch_outputs=lambda ctx, st, ts: {"db": H.to_np(ctx.tdev(st["dy_val"]).sum(0))}),
    ]


def gemm_cases(ctx: H.Context):
    return [c for i, L in enumerate(ctx.shapes()["fcs"]) for c in layer_cases(ctx, L, i)]


def main(argv=None):
    return H.script_main("gemm", "Fully-connected layers (fc6..fc8)", gemm_cases, argv)


if __name__ == "__main__":
    main()
