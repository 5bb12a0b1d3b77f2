"""Local response normalization and overlapping max-pooling at AlexNet's batch-128 shapes, forward and backward,
against PyTorch on the same inputs.

LRN runs after conv1 and conv2. In the two-tower net each tower normalizes over its own 48/128 channels; here it
runs once over the merged 96/256 channels (the same bytes and arithmetic; only the two tower-edge windows
differ). PyTorch's LocalResponseNorm divides alpha by the window size, so it is given alpha*n. Its backward is
timed through autograd (PyTorch has no dedicated LRN backward kernel). Pooling (3/2 windows, or 2/2 in the
no-overlap ablation config) runs after LRN1, LRN2 and conv5; PyTorch's indices use our flat h*W+w convention
and are checked exactly. All memory-bound: LRN forward reads x and writes y and scale (12 B/element), backward
reads dy, x, y, scale and writes dx (20 B); pooling forward reads x and writes y and argmax, backward reads dy
and argmax and writes dx. The fused lrn_maxpool_forward the net runs after conv1 and conv2 reads x and writes y,
scale, the pooled y and argmax (12 B per input element + 8 per output).
"""
from __future__ import annotations

import numpy as np

import harness as H
from harness import f64


def lrn_cases(ctx: H.Context, site: dict, salt: int):
    ops = H.ax.ops
    shape = site["shape"]
    n = int(np.prod(shape))
    cfg = ctx.cfg
    size, k, alpha, beta = cfg["lrn_size"], cfg["lrn_k"], cfg["lrn_alpha"], cfg["lrn_beta"]
    hyper = (size, k, alpha, beta)

    def setup(ctx):
        rng = ctx.rng(600 + salt)
        x = np.abs(H.randn(rng, shape, 5.0))  # LRN sees ReLU outputs: non-negative, large enough to matter
        dy = H.randn(rng, shape)
        st = {"x": x, "dy": dy, "xt": ctx.dev(x), "dyt": ctx.dev(dy), "picks": ctx.picks(shape[0])}
        st["yt"], st["scalet"] = ops.lrn_forward(st["xt"], *hyper)
        return st

    def fwd_validate(ctx, st):
        pk = st["picks"]
        y, scale = (t.numpy()[pk] for t in ops.lrn_forward(st["xt"], *hyper))
        ry, rs = ctx.ref.lrn_forward(f64(st["x"][pk]), *hyper)
        return {"y": y, "scale": scale}, {"y": ry, "scale": rs}

    def bwd_validate(ctx, st):
        pk = st["picks"]
        dx = ops.lrn_backward(st["dyt"], st["xt"], st["yt"], st["scalet"], *hyper).numpy()[pk]
        x = f64(st["x"][pk])
        ry, rs = ctx.ref.lrn_forward(x, *hyper)
        return {"dx": dx}, {"dx": ctx.ref.lrn_backward(f64(st["dy"][pk]), x, ry, rs, *hyper)}

    def torch_setup(ctx, st):
        t = ctx.torch
        x = ctx.tdev(st["x"]).requires_grad_(True)
        F = t.nn.functional
        fwd = lambda: F.local_response_norm(x, size=size, alpha=alpha * size, beta=beta, k=k)  # noqa: E731
        return {"x": x, "dy": ctx.tdev(st["dy"]), "fwd": fwd, "y": fwd(), "torch": t}

    def torch_fwd(ts):
        with ts["torch"].no_grad():
            return ts["fwd"]()

    def torch_bwd(ts):
        return ts["torch"].autograd.grad(ts["y"], ts["x"], ts["dy"], retain_graph=True)[0]

    sh = H.shape_str(shape)
    op = f"{site['name']} (size {size})"
    return [
        H.Case("lrn_pool", op, "forward", sh, setup=setup, validate=fwd_validate,
               run=lambda st: ops.lrn_forward(st["xt"], *hyper), tol=H.TOL_REDUCTION, bytes=12 * n,
               torch_setup=torch_setup, torch_run=torch_fwd,
               torch_outputs=lambda ctx, st, ts: {"y": H.to_np(torch_fwd(ts))[st["picks"]]}),
        H.Case("lrn_pool", op, "backward", sh, setup=setup, validate=bwd_validate,
               run=lambda st: ops.lrn_backward(st["dyt"], st["xt"], st["yt"], st["scalet"], *hyper),
               tol=H.TOL_REDUCTION, bytes=20 * n, torch_setup=torch_setup, torch_run=torch_bwd,
               torch_outputs=lambda ctx, st, ts: {"dx": H.to_np(torch_bwd(ts))[st["picks"]]},
               note="PyTorch: autograd through its composite LRN"),
    ]


def pool_cases(ctx: H.Context, site: dict, salt: int):
    ops = H.ax.ops
    shape, w, s, P = site["shape"], site["window"], site["stride"], site["out"]
    N, C, Hh, W = shape
    oshape = (N, C, P, P)
    n_in, n_out = int(np.prod(shape)), int(np.prod(oshape))

    def setup(ctx):
        rng = ctx.rng(700 + salt)
        x, dy = H.randn(rng, shape), H.randn(rng, oshape)
        st = {"x": x, "dy": dy, "xt": ctx.dev(x), "dyt": ctx.dev(dy), "picks": ctx.picks(N)}
        _, st["argmaxt"] = ops.maxpool_forward(st["xt"], w, s, 0)
        st["argmax"] = st["argmaxt"].numpy()
        return st

    def fwd_validate(ctx, st):
        pk = st["picks"]
        y, am = (t.numpy()[pk] for t in ops.maxpool_forward(st["xt"], w, s, 0))
        ry, ram = ctx.ref.maxpool_forward(f64(st["x"][pk]), w, s, 0)
        return {"y": y, "argmax": am}, {"y": ry, "argmax": ram}

    def bwd_validate(ctx, st):
        pk = st["picks"]
        dx = ops.maxpool_backward(st["dyt"], st["argmaxt"], (Hh, W), w, s, 0).numpy()[pk]
        return {"dx": dx}, {"dx": ctx.ref.maxpool_backward(f64(st["dy"][pk]), st["argmax"][pk], (Hh, W), w, s, 0)}

    def torch_setup(ctx, st):
        t = ctx.torch
        return {"x": ctx.tdev(st["x"]), "dy": ctx.tdev(st["dy"]), "idx": ctx.tdev(st["argmax"]).long(), "torch": t}

    def torch_fwd(ts):
        return ts["torch"].nn.functional.max_pool2d(ts["x"], w, s, 0, return_indices=True)

    def torch_bwd(ts):
        return ts["torch"].ops.aten.max_pool2d_with_indices_backward(ts["dy"], ts["x"], [w, w], [s, s], [0, 0], [1, 1],
                                                                     False, ts["idx"])

    def torch_fwd_out(ctx, st, ts):
        y, idx = torch_fwd(ts)
        return {"y": H.to_np(y)[st["picks"]], "argmax": H.to_np(idx)[st["picks"]]}

    op = f"maxpool {w}/{s} ({site['name']})"
    return [
        H.Case("lrn_pool", op, "forward", H.shape_str(shape), setup=setup, validate=fwd_validate,
               run=lambda st: ops.maxpool_forward(st["xt"], w, s, 0), tol=H.TOL_ELEMENTWISE,
               bytes=4 * n_in + 8 * n_out, torch_setup=torch_setup, torch_run=torch_fwd, torch_outputs=torch_fwd_out),
        H.Case("lrn_pool", op, "backward", H.shape_str(oshape), setup=setup, validate=bwd_validate,
               # the argmax is maxpool_forward's: time the kernel, not the host-side window check
               run=lambda st: ops.maxpool_backward(st["dyt"], st["argmaxt"], (Hh, W), w, s, 0, check_argmax=False),
               tol=H.TOL_ELEMENTWISE,
               bytes=8 * n_out + 4 * n_in, torch_setup=torch_setup, torch_run=torch_bwd,
               torch_outputs=lambda ctx, st, ts: {"dx": H.to_np(torch_bwd(ts))[st["picks"]]}),
    ]


def fused_cases(ctx: H.Context, site: dict, pool: dict, salt: int):
    """lrn_maxpool_forward, what the net runs where a pool follows LRN: x in; y, scale, pool_y, argmax out."""
    ops = H.ax.ops
    shape, w, s = site["shape"], pool["window"], pool["stride"]
    n = int(np.prod(shape))
    n_out = shape[0] * shape[1] * pool["out"] ** 2
    cfg = ctx.cfg
    hyper = (cfg["lrn_size"], cfg["lrn_k"], cfg["lrn_alpha"], cfg["lrn_beta"])

    def setup(ctx):
        rng = ctx.rng(800 + salt)
        x = np.abs(H.randn(rng, shape, 5.0))
        return {"x": x, "xt": ctx.dev(x), "picks": ctx.picks(shape[0])}

    def validate(ctx, st):
        pk = st["picks"]
        y, scale, py, _ = (t.numpy()[pk] for t in ops.lrn_maxpool_forward(st["xt"], *hyper, w, s, 0))
        ry, rs = ctx.ref.lrn_forward(f64(st["x"][pk]), *hyper)
        rpy, _ = ctx.ref.maxpool_forward(ry, w, s, 0)
        return {"y": y, "scale": scale, "pool_y": py}, {"y": ry, "scale": rs, "pool_y": rpy}

    return [H.Case("lrn_pool", f"lrn+maxpool {w}/{s} ({site['name']})", "forward", H.shape_str(shape), setup=setup,
                   validate=validate, run=lambda st: ops.lrn_maxpool_forward(st["xt"], *hyper, w, s, 0),
                   tol=H.TOL_REDUCTION, bytes=12 * n + 8 * n_out,
                   note="the fused kernel (no PyTorch counterpart: compare with its LRN + max-pool rows)")]


def lrn_pool_cases(ctx: H.Context):
    s = ctx.shapes()
    cases = []
    for i, site in enumerate(s["lrns"]):
        cases += lrn_cases(ctx, site, i)
    for i, site in enumerate(s["pools"]):
        cases += pool_cases(ctx, site, i)
    pools = {p["name"][-1]: p for p in s["pools"]}
    for i, site in enumerate(s["lrns"]):
        if site["name"][-1] in pools:
            cases += fused_cases(ctx, site, pools[site["name"][-1]], i)
    return cases


def main(argv=None):
    return H.script_main("lrn_pool", "LRN and max-pooling", lrn_pool_cases, argv)


if __name__ == "__main__":
    main()
