"""Softmax + cross-entropy on the fc8 logits (batch 128 x 1000 classes), forward and backward, and the plain
softmax used at inference, against PyTorch on the same inputs.

Our forward writes the per-sample loss, the probabilities (kept for the backward) and the label's rank (for top-1
and top-5); PyTorch's F.cross_entropy(reduction='none') writes the loss and keeps log-probabilities. Its backward is
timed through autograd of the mean loss (the same 1/N scale as ours). Memory-bound and tiny (512 KB): these rows
mostly measure launch and latency.
"""
from __future__ import annotations

import numpy as np

import harness as H
from harness import f64


def softmax_cases(ctx: H.Context):
    ops = H.ax.ops
    N, C = ctx.batch, ctx.cfg["num_classes"]
    scale = 1.0 / N
    nc = N * C

    def setup(ctx):
        rng = ctx.rng(800)
        logits = H.randn(rng, (N, C), 3.0)
        labels = rng.integers(0, C, N).astype(np.int32)
        st = {"logits": logits, "labels": labels, "lt": ctx.dev(logits), "labt": ctx.dev(labels), "picks": ctx.picks(N)}
        _, st["probst"], _ = ops.softmax_cross_entropy_forward(st["lt"], st["labt"])
        st["probs"] = st["probst"].numpy()
        return st

    def fwd_validate(ctx, st):
        pk = st["picks"]
        loss, probs, rank = (t.numpy()[pk] for t in ops.softmax_cross_entropy_forward(st["lt"], st["labt"]))
        rl, rp, rr = ctx.ref.softmax_cross_entropy_forward(f64(st["logits"][pk]), st["labels"][pk])
        return {"loss": loss, "probs": probs, "rank": rank}, {"loss": rl, "probs": rp, "rank": rr}

    def bwd_validate(ctx, st):
        pk = st["picks"]
        d = ops.softmax_cross_entropy_backward(st["probst"], st["labt"], scale).numpy()[pk]
        return {"dlogits": d}, {"dlogits": ctx.ref.softmax_cross_entropy_backward(f64(st["probs"][pk]),
                                                                                 st["labels"][pk], scale)}

    def sm_validate(ctx, st):
        pk = st["picks"]
        return ({"probs": ops.softmax_forward(st["lt"]).numpy()[pk]},
                {"probs": ctx.ref.softmax_forward(f64(st["logits"][pk]))})

    def torch_setup(ctx, st):
        t = ctx.torch
        logits = ctx.tdev(st["logits"]).requires_grad_(True)
        labels = ctx.tdev(st["labels"]).long()
        F = t.nn.functional
        return {"logits": logits, "labels": labels, "F": F, "torch": t, "loss": F.cross_entropy(logits, labels)}

    def torch_fwd(ts):
        with ts["torch"].no_grad():
            return ts["F"].cross_entropy(ts["logits"], ts["labels"], reduction="none")

    def torch_bwd(ts):
        return ts["torch"].autograd.grad(ts["loss"], ts["logits"], retain_graph=True)[0]

    def torch_sm(ts):
        with ts["torch"].no_grad():
            return ts["torch"].softmax(ts["logits"], 1)

    sh = f"{N}x{C}"
    return [
        H.Case("softmax", "softmax_cross_entropy", "forward", sh, setup=setup, validate=fwd_validate,
               run=lambda st: ops.softmax_cross_entropy_forward(st["lt"], st["labt"]), tol=H.TOL_REDUCTION,
               bytes=4 * (2 * nc + 4 * N), torch_setup=torch_setup, torch_run=torch_fwd,
               torch_outputs=lambda ctx, st, ts: {"loss": H.to_np(torch_fwd(ts))[st["picks"]]}),
        H.Case("softmax", "softmax_cross_entropy", "backward", sh, setup=setup, validate=bwd_validate,
               run=lambda st: ops.softmax_cross_entropy_backward(st["probst"], st["labt"], scale), tol=H.TOL_REDUCTION,
               bytes=4 * (2 * nc + N), torch_setup=torch_setup, torch_run=torch_bwd,
               torch_outputs=lambda ctx, st, ts: {"dlogits": H.to_np(torch_bwd(ts))[st["picks"]]},
               note="PyTorch: autograd of the mean loss"),
        H.Case("softmax", "softmax", "forward", sh, setup=setup, validate=sm_validate,
               run=lambda st: ops.softmax_forward(st["lt"]), tol=H.TOL_REDUCTION, bytes=4 * 2 * nc,
               torch_setup=torch_setup, torch_run=torch_sm,
               torch_outputs=lambda ctx, st, ts: {"probs": H.to_np(torch_sm(ts))[st["picks"]]}),
    ]


def main(argv=None):
    return H.script_main("softmax", "Softmax and cross-entropy", softmax_cases, argv)


if __name__ == "__main__":
    main()
