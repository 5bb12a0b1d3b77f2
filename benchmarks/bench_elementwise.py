"""Elementwise kernels at AlexNet's batch-128 shapes: ReLU forward/backward at every site (sites that share a shape
share a row), dropout forward/backward after fc6/fc7, and the SGD update (momentum, weight decay) over all 61 M
parameters, one sgd_update_multi call (one launch) over every tensor as the net makes it. All memory-bound: GB/s counts the fewest bytes
each must move (ReLU fwd 8 B/element, bwd 12; dropout 4+4+1 both ways; SGD reads w, dw, v and writes w, v: 20 B).

PyTorch's side: torch.relu, aten.threshold_backward, aten.native_dropout(+_backward) and torch.optim.SGD
(fused where available, else foreach). PyTorch's dropout draws other random numbers and its SGD uses an
equivalent but different momentum formula, so those two are timed but not value-checked.
"""
from __future__ import annotations

import numpy as np

import harness as H
from harness import f64

DROPOUT_SEED, DROPOUT_OFFSET, LR, MOMENTUM, WEIGHT_DECAY = 1234, 4321, 0.01, 0.9, 0.0005


def relu_sites(ctx: H.Context):
    """Unique activation shapes that ReLU runs on, with the layers that produce them."""
    s = ctx.shapes()
    sites = {}
    for L in s["convs"]:
        sites.setdefault((L["N"], L["K"], L["P"], L["Q"]), []).append(L["name"])
    for f in s["fcs"][:2]:
        sites.setdefault((f["N"], f["O"]), []).append(f["name"])
    return sites


def relu_cases(ctx: H.Context, shape, names, salt):
    ops = H.ax.ops
    n = int(np.prod(shape))
    op = f"relu ({', '.join(names)})"

    def setup(ctx):
        rng = ctx.rng(300 + salt)
        x, dy = H.randn(rng, shape), H.randn(rng, shape)
        y = np.maximum(H.randn(rng, shape), 0)  # a forward output: about half zeros
        return {"x": x, "dy": dy, "y": y, "xt": ctx.dev(x), "dyt": ctx.dev(dy), "yt": ctx.dev(y),
                "picks": ctx.picks(shape[0])}

    def torch_setup(ctx, st):
        return {k: ctx.tdev(st[k]) for k in ("x", "dy", "y")} | {"aten": ctx.torch.ops.aten, "torch": ctx.torch}

    def fwd_validate(ctx, st):
        pk = st["picks"]
        return {"y": ops.relu_forward(st["xt"]).numpy()[pk]}, {"y": ctx.ref.relu_forward(f64(st["x"][pk]))}

    def bwd_validate(ctx, st):
        pk = st["picks"]
        return ({"dx": ops.relu_backward(st["dyt"], st["yt"]).numpy()[pk]},
                {"dx": ctx.ref.relu_backward(f64(st["dy"][pk]), f64(st["y"][pk]))})

    def bwd_torch(ts):
        return ts["aten"].threshold_backward(ts["dy"], ts["y"], 0)

    return [
        H.Case("elementwise", op, "forward", H.shape_str(shape), setup=setup, validate=fwd_validate,
               run=lambda st: ops.relu_forward(st["xt"]), tol=H.TOL_ELEMENTWISE, bytes=8 * n,
               torch_setup=torch_setup, torch_run=lambda ts: ts["torch"].relu(ts["x"]),
               torch_outputs=lambda ctx, st, ts: {"y": H.to_np(ts["torch"].relu(ts["x"]))[st["picks"]]}),
        H.Case("elementwise", op, "backward", H.shape_str(shape), setup=setup, validate=bwd_validate,
               run=lambda st: ops.relu_backward(st["dyt"], st["yt"]), tol=H.TOL_ELEMENTWISE, bytes=12 * n,
               torch_setup=torch_setup, torch_run=bwd_torch,
               torch_outputs=lambda ctx, st, ts: {"dx": H.to_np(bwd_torch(ts))[st["picks"]]}),
    ]


def dropout_cases(ctx: H.Context):
    ops = H.ax.ops
    s = ctx.shapes()["fcs"]
    shape = (s[0]["N"], s[0]["O"])
    if (s[1]["N"], s[1]["O"]) != shape:  # only the paper's equal fc6/fc7 widths share a row
        shape = (s[0]["N"], max(s[0]["O"], s[1]["O"]))
    n, per = int(np.prod(shape)), shape[1]
    p = float(ctx.cfg["dropout"]) or 0.5

    def setup(ctx):
        rng = ctx.rng(400)
        x, dy = H.randn(rng, shape), H.randn(rng, shape)
        st = {"x": x, "dy": dy, "xt": ctx.dev(x), "dyt": ctx.dev(dy), "picks": ctx.picks(shape[0])}
        _, mask_t = ops.dropout_forward(st["xt"], p, DROPOUT_SEED, DROPOUT_OFFSET)
        st["maskt"], st["mask"] = mask_t, mask_t.numpy()
        return st

    def fwd_validate(ctx, st):
        ours_y, ours_m, ref_y, ref_m = [], [], [], []
        y, m = (t.numpy() for t in ops.dropout_forward(st["xt"], p, DROPOUT_SEED, DROPOUT_OFFSET))
        for i in st["picks"]:  # element j of sample i draws philox(seed, offset + i*per + j)
            ry, rm = ctx.ref.dropout_forward(f64(st["x"][i:i + 1]), p, DROPOUT_SEED, DROPOUT_OFFSET + i * per)
            ours_y.append(y[i:i + 1]), ours_m.append(m[i:i + 1]), ref_y.append(ry), ref_m.append(np.asarray(rm))
        return ({"y": np.concatenate(ours_y), "mask": np.concatenate(ours_m)},
                {"y": np.concatenate(ref_y), "mask": np.concatenate(ref_m)})

    def bwd_validate(ctx, st):
        pk = st["picks"]
        return ({"dx": ops.dropout_backward(st["dyt"], st["maskt"], p).numpy()[pk]},
                {"dx": ctx.ref.dropout_backward(f64(st["dy"][pk]), st["mask"][pk], p)})

    def torch_setup(ctx, st):
        t = ctx.torch
        return {"x": ctx.tdev(st["x"]), "dy": ctx.tdev(st["dy"]), "mask": ctx.tdev(st["mask"]).bool(), "torch": t}

    def bwd_torch(ts):
        return ts["torch"].ops.aten.native_dropout_backward(ts["dy"], ts["mask"], 1.0 / (1.0 - p))

    sh = H.shape_str(shape)
    return [
        H.Case("elementwise", "dropout (fc6, fc7)", "forward", sh, setup=setup, validate=fwd_validate,
               run=lambda st: ops.dropout_forward(st["xt"], p, DROPOUT_SEED, DROPOUT_OFFSET), tol=H.TOL_ELEMENTWISE,
               bytes=9 * n, torch_setup=torch_setup, torch_run=lambda ts: ts["torch"].native_dropout(ts["x"], p, True),
               note="PyTorch draws other random numbers: timed, not value-checked"),
        H.Case("elementwise", "dropout (fc6, fc7)", "backward", sh, setup=setup, validate=bwd_validate,
               # the mask came from dropout_forward: time the kernel, not the host-side 0/1 check
               run=lambda st: ops.dropout_backward(st["dyt"], st["maskt"], p, check_mask=False),
               tol=H.TOL_ELEMENTWISE, bytes=9 * n,
               torch_setup=torch_setup, torch_run=bwd_torch,
               torch_outputs=lambda ctx, st, ts: {"dx": H.to_np(bwd_torch(ts))[st["picks"]]}),
    ]


def check_indices(n: int, chunk: int = 1 << 16) -> np.ndarray:
    """All of a small tensor; the first, middle and last `chunk` elements of a large one."""
    if n <= 3 * chunk:
        return np.arange(n)
    mid = n // 2 - chunk // 2
    return np.concatenate([np.arange(chunk), np.arange(mid, mid + chunk), np.arange(n - chunk, n)])


def reference_sgd(ref, w, dw, v, lr, momentum, wd):
    """The reference's sgd_update may update in place (returning None) or return (w, v): accept either."""
    w, v = f64(w).copy(), f64(v).copy()
    out = ref.sgd_update(w, f64(dw), v, lr, momentum, wd)
    return (w, v) if out is None else (np.asarray(out[0]), np.asarray(out[1]))


def sgd_case(ctx: H.Context):
    ops = H.ax.ops
    shapes = H.parameter_shapes(ctx.cfg)
    total = sum(int(np.prod(s)) for _, s in shapes)

    def setup(ctx):
        rng = ctx.rng(500)
        st = {"params": []}
        for name, shape in shapes:
            w, dw, v = H.randn(rng, shape, 0.01), H.randn(rng, shape, 0.01), H.randn(rng, shape, 1e-4)
            st["params"].append(dict(name=name, w=w, dw=dw, v=v, wt=ctx.dev(w), dwt=ctx.dev(dw), vt=ctx.dev(v)))
        return st

    def run(st):  # one launch over every tensor, as the net's update of a device makes it
        ops.sgd_update_multi([(q["wt"], q["dwt"], q["vt"], WEIGHT_DECAY) for q in st["params"]], LR, MOMENTUM)

    def validate(ctx, st):
        run(st)  # once, from the known starting values
        ours, ref = {}, {}
        for q in st["params"]:
            idx = check_indices(q["w"].size)
            w1, v1 = q["wt"].numpy().ravel()[idx], q["vt"].numpy().ravel()[idx]
            rw, rv = reference_sgd(ctx.ref, q["w"].ravel()[idx], q["dw"].ravel()[idx], q["v"].ravel()[idx], LR,
                                   MOMENTUM, WEIGHT_DECAY)
            ours[q["name"] + ".w"], ours[q["name"] + ".v"] = w1, v1
            ref[q["name"] + ".w"], ref[q["name"] + ".v"] = rw, rv
        return ours, ref

    def torch_setup(ctx, st):
        t = ctx.torch
        params = []
        for q in st["params"]:
            w = t.nn.Parameter(ctx.tdev(q["w"]))
            w.grad = ctx.tdev(q["dw"])
            params.append(w)
        kw = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        try:
            opt = t.optim.SGD(params, fused=True, **kw)
            opt.step()
        except Exception:
            opt = t.optim.SGD(params, foreach=True, **kw)
            opt.step()  # creates the momentum buffers before timing
        return {"opt": opt, "params": params}

    return [H.Case("elementwise", "sgd_update_multi (all params)", "update",
                   f"{len(shapes)} tensors, {total / 1e6:.2f} M params", setup=setup, validate=validate, run=run,
                   tol=H.TOL_ELEMENTWISE, bytes=20 * total, torch_setup=torch_setup,
                   torch_run=lambda ts: ts["opt"].step(),
                   note="PyTorch: torch.optim.SGD (fused, else foreach); equivalent formula, not value-checked")]


def elementwise_cases(ctx: H.Context):
    cases = []
    for i, (shape, names) in enumerate(relu_sites(ctx).items()):
        cases += relu_cases(ctx, shape, names, i)
    return cases + dropout_cases(ctx) + sgd_case(ctx)


def main(argv=None):
    return H.script_main("elementwise", "Elementwise kernels (ReLU, dropout, SGD)", elementwise_cases, argv)


if __name__ == "__main__":
    main()
