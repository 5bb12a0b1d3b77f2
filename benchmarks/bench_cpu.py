"""The CPU backend against PyTorch CPU at matched threads: every op at AlexNet's layer shapes and the whole training
step, in one run, interleaved, medians, ratio = PyTorch time / our time (above 1: we are faster).

Ops (paper config, batch 16 unless --op-config/--op-batch say otherwise; merged tower shapes as the other scripts:
conv2/4/5 grouped, LRN over the merged channels): conv forward, grad-input, grad-weight and bias gradient per layer;
fc forward, grad-input, grad-weight, bias gradient; ReLU forward/backward at every distinct activation shape; LRN
forward/backward; max-pool forward/backward; dropout forward/backward (fc6); softmax + cross-entropy
forward/backward; SGD over every parameter tensor (one call each, as the net makes them).

Training step: tiny config at batch 32 and 64, paper config at batch 8 and 16: our Net.train_step against the same
network in PyTorch eager (bench_train_step.torch_model, weights copied from ours), both taking a float32 NumPy batch
and returning the loss to the host, SGD with momentum and weight decay, dropout on.

Threads: for each count T in --threads (default 1,2) PyTorch runs with torch.set_num_threads(T). Ours: the library's
thread pool set to T (_C._cpu_set_threads, csrc/cpu/parallel.h), and the training step on devices "cpu" (one worker,
every op split over the T threads).

Timing: host clock (perf_counter) per call, both sides synchronous. For every case the two sides alternate call by
call (which goes first alternates too), after warm-up calls of each, so drifting load on a shared machine hits both
alike; the statistic is the median. Machines with other work on them still give noisy numbers: run it on a quiet one.

Checks before timing, where torch is importable: each op's output against PyTorch's on the same inputs (relative
error, 1e-4; not dropout, whose random numbers differ, nor SGD, whose momentum formula differs), and each training
configuration's inference logits. A failed check is reported in the row and the case still timed.

Results: printed, and written as JSON and text to --out (default benchmarks/results/cpu_<date>_<commit>.json and
.txt) with the CPU model (/proc/cpuinfo or lscpu), its vector extensions, the commit (-dirty when tracked files
differ), versions and thread settings. Without torch the script says so and times our side alone. --smoke runs tiny
shapes with one timed call each (a test of the script, not a measurement) and writes only where --out says.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import harness as H
from harness import ax

NO_TORCH = ("PyTorch is not importable here: timing our side only (no ratios); pip install torch for the "
            "comparison")
TOL = 1e-4
LR = 0.01


# ---------------------------------------------------------------------------------------------------
# The machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except Exception:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("sse2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl") if f in have]
    except OSError:
        pass
    return []


def optional_torch(disabled: bool):
    if disabled or os.environ.get("ALEXNET_BENCH_NO_TORCH"):
        return None
    try:
        import torch
    except Exception:
        return None
    return torch


def set_threads(torch, T: int) -> str:
    """Applies T threads to both sides; returns how ours was set."""
    if torch is not None:
        torch.set_num_threads(T)
    ax._C._cpu_set_threads(T)
    return f"_cpu_set_threads({T})"


# ---------------------------------------------------------------------------------------------------
# Cases


class Case:
    """One op or step: ours and theirs as zero-argument callables, a check, and the work it does."""

    def __init__(self, family, op, pass_, shape, ours, theirs=None, check=None, flops=None, bytes_=None):
        self.family, self.op, self.pass_, self.shape = family, op, pass_, shape
        self.ours, self.theirs, self.check = ours, theirs, check
        self.flops, self.bytes = flops, bytes_


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (d if d > 0 else 1.0))


def op_cases(cfg: dict, batch: int, rng, torch) -> list:
    ops, F = ax.ops, (torch.nn.functional if torch else None)
    s = H.layer_shapes(cfg, batch)
    cases = []

    def both(a):
        a = np.ascontiguousarray(a, np.float32)
        return ax.from_numpy(a), (torch.from_numpy(a.copy()) if torch else None)

    def tnp(t):
        return t.detach().numpy()

    for L in s["convs"]:
        N, C, Hh, K, R, st, pad, g, P = L["N"], L["C"], L["H"], L["K"], L["R"], L["stride"], L["pad"], L["groups"], L["P"]
        x, tx = both(rng.standard_normal((N, C, Hh, Hh)))
        w, tw = both(0.05 * rng.standard_normal((K, C // g, R, R)))
        b, tb = both(rng.standard_normal(K))
        dy, tdy = both(rng.standard_normal((N, K, P, P)))
        fl, shp = H.conv_flops(L), f"{N}x{C}x{Hh}x{Hh} * {K}x{C // g}x{R}x{R} /{st} p{pad} g{g}"
        name = L["name"]
        fwd = (lambda x=x, w=w, b=b, st=st, pad=pad, g=g: ops.conv2d_forward(x, w, b, stride=st, padding=pad, groups=g))
        bin_ = (lambda dy=dy, w=w, Hh=Hh, st=st, pad=pad, g=g:
                ops.conv2d_backward_input(dy, w, (Hh, Hh), stride=st, padding=pad, groups=g))
        bw = (lambda x=x, dy=dy, R=R, st=st, pad=pad, g=g:
              ops.conv2d_backward_weight(x, dy, R, stride=st, padding=pad, groups=g))
        bb = (lambda dy=dy: ops.conv2d_backward_bias(dy))
        t_fwd = t_bin = t_bw = t_bb = None
        if torch:
            t_fwd = (lambda tx=tx, tw=tw, tb=tb, st=st, pad=pad, g=g: F.conv2d(tx, tw, tb, st, pad, 1, g))
            t_bin = (lambda tx=tx, tw=tw, tdy=tdy, st=st, pad=pad, g=g:
                     torch.nn.grad.conv2d_input(tx.shape, tw, tdy, st, pad, groups=g))
            t_bw = (lambda tx=tx, tw=tw, tdy=tdy, st=st, pad=pad, g=g:
                    torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, st, pad, groups=g))
            t_bb = (lambda tdy=tdy: tdy.sum((0, 2, 3)))
        for pass_, o, t, flops, by in (("forward", fwd, t_fwd, fl, None), ("grad-input", bin_, t_bin, fl, None),
                                       ("grad-weight", bw, t_bw, fl, None), ("grad-bias", bb, t_bb, None, 4 * N * K * P * P)):
            chk = (lambda o=o, t=t: rel_err(o().numpy(), tnp(t()))) if torch else None
            cases.append(Case("conv", name, pass_, shp, o, t, chk, flops, by))

    for f in s["fcs"]:
        N, I, O = f["N"], f["I"], f["O"]
        x, tx = both(rng.standard_normal((N, I)))
        w, tw = both(0.01 * rng.standard_normal((O, I)))
        b, tb = both(rng.standard_normal(O))
        dy, tdy = both(rng.standard_normal((N, O)))
        fl, shp = 2 * N * I * O, f"{N}x{I} * {O}x{I}"
        pairs = [("forward", lambda x=x, w=w, b=b: ops.linear_forward(x, w, b),
                  (lambda tx=tx, tw=tw, tb=tb: F.linear(tx, tw, tb)) if torch else None, fl, None),
                 ("grad-input", lambda dy=dy, w=w: ops.linear_backward_input(dy, w),
                  (lambda tdy=tdy, tw=tw: tdy @ tw) if torch else None, fl, None),
                 ("grad-weight", lambda x=x, dy=dy: ops.linear_backward_weight(x, dy),
                  (lambda tdy=tdy, tx=tx: tdy.t() @ tx) if torch else None, fl, None),
                 ("grad-bias", lambda dy=dy: ops.linear_backward_bias(dy),
                  (lambda tdy=tdy: tdy.sum(0)) if torch else None, None, 4 * N * O)]
        for pass_, o, t, flops, by in pairs:
            chk = (lambda o=o, t=t: rel_err(o().numpy(), tnp(t()))) if torch else None
            cases.append(Case("fc", f["name"], pass_, shp, o, t, chk, flops, by))

    shapes = {}
    for L in s["convs"]:
        shapes.setdefault((L["N"], L["K"], L["P"], L["Q"]), []).append(L["name"])
    for f in s["fcs"][:2]:
        shapes.setdefault((f["N"], f["O"]), []).append(f["name"])
    for shape, names in shapes.items():
        n = int(np.prod(shape))
        x, tx = both(rng.standard_normal(shape))
        dy, tdy = both(rng.standard_normal(shape))
        y, ty = both(np.maximum(rng.standard_normal(shape), 0))
        op = f"relu ({', '.join(names)})"
        cases.append(Case("relu", op, "forward", H.shape_str(shape), lambda x=x: ops.relu_forward(x),
                          (lambda tx=tx: torch.relu(tx)) if torch else None,
                          (lambda x=x, tx=tx: rel_err(ops.relu_forward(x).numpy(), tnp(torch.relu(tx)))) if torch else None,
                          bytes_=8 * n))
        tb = (lambda tdy=tdy, ty=ty: torch.ops.aten.threshold_backward(tdy, ty, 0)) if torch else None
        cases.append(Case("relu", op, "backward", H.shape_str(shape), lambda dy=dy, y=y: ops.relu_backward(dy, y), tb,
                          (lambda dy=dy, y=y, tb=tb: rel_err(ops.relu_backward(dy, y).numpy(), tnp(tb()))) if torch else None,
                          bytes_=12 * n))

    for L in s["lrns"]:
        shape, n = L["shape"], int(np.prod(L["shape"]))
        size, k, alpha, beta = cfg["lrn_size"], cfg["lrn_k"], cfg["lrn_alpha"], cfg["lrn_beta"]
        x, tx = both(rng.standard_normal(shape))
        dy, tdy = both(rng.standard_normal(shape))
        yy, sc = ops.lrn_forward(x, size, k, alpha, beta)
        fwd = lambda x=x: ops.lrn_forward(x, size, k, alpha, beta)  # noqa: E731
        bwd = lambda dy=dy, x=x, yy=yy, sc=sc: ops.lrn_backward(dy, x, yy, sc, size, k, alpha, beta)  # noqa: E731
        t_fwd = t_bwd = None
        if torch:
            t_fwd = lambda tx=tx: F.local_response_norm(tx, size, alpha * size, beta, k)  # noqa: E731
            txg = tx.clone().requires_grad_(True)
            tyg = F.local_response_norm(txg, size, alpha * size, beta, k)
            t_bwd = lambda tyg=tyg, txg=txg, tdy=tdy: torch.autograd.grad(tyg, txg, tdy, retain_graph=True)[0]  # noqa: E731
        cases.append(Case("lrn", L["name"], "forward", H.shape_str(shape), fwd, t_fwd,
                          (lambda fwd=fwd, t_fwd=t_fwd: rel_err(fwd()[0].numpy(), tnp(t_fwd()))) if torch else None,
                          bytes_=12 * n))
        cases.append(Case("lrn", L["name"], "backward", H.shape_str(shape), bwd, t_bwd,
                          (lambda bwd=bwd, t_bwd=t_bwd: rel_err(bwd().numpy(), tnp(t_bwd()))) if torch else None,
                          bytes_=20 * n))

    for L in s["pools"]:
        shape, win, st, Po = L["shape"], L["window"], L["stride"], L["out"]
        N, C, Hh = shape[0], shape[1], shape[2]
        x, tx = both(rng.standard_normal(shape))
        dy, tdy = both(rng.standard_normal((N, C, Po, Po)))
        _, am = ops.maxpool_forward(x, win, st, 0)
        fwd = lambda x=x, win=win, st=st: ops.maxpool_forward(x, win, st, 0)  # noqa: E731
        bwd = (lambda dy=dy, am=am, Hh=Hh, win=win, st=st:
               ops.maxpool_backward(dy, am, (Hh, Hh), win, st, 0, check_argmax=False))
        t_fwd = t_bwd = None
        if torch:
            t_fwd = lambda tx=tx, win=win, st=st: F.max_pool2d(tx, win, st, return_indices=True)  # noqa: E731
            tidx = t_fwd()[1]
            t_bwd = (lambda tdy=tdy, tx=tx, tidx=tidx, win=win, st=st: torch.ops.aten.max_pool2d_with_indices_backward(
                tdy, tx, [win, win], [st, st], [0, 0], [1, 1], False, tidx))
        n_in, n_out = int(np.prod(shape)), N * C * Po * Po
        cases.append(Case("pool", L["name"], "forward", H.shape_str(shape), fwd, t_fwd,
                          (lambda fwd=fwd, t_fwd=t_fwd: rel_err(fwd()[0].numpy(), tnp(t_fwd()[0]))) if torch else None,
                          bytes_=4 * n_in + 8 * n_out))
        cases.append(Case("pool", L["name"], "backward", H.shape_str(shape), bwd, t_bwd,
                          (lambda bwd=bwd, t_bwd=t_bwd: rel_err(bwd().numpy(), tnp(t_bwd()))) if torch else None,
                          bytes_=4 * n_in + 8 * n_out))

    f6 = s["fcs"][0]
    shape, p = (f6["N"], f6["O"]), float(cfg["dropout"]) or 0.5
    n = int(np.prod(shape))
    x, tx = both(rng.standard_normal(shape))
    dy, tdy = both(rng.standard_normal(shape))
    _, mask = ops.dropout_forward(x, p, 1, 2)
    tmask = torch.ops.aten.native_dropout(tx, p, True)[1] if torch else None
    cases.append(Case("dropout", "dropout (fc6)", "forward", H.shape_str(shape),
                      lambda x=x: ops.dropout_forward(x, p, 1, 2),
                      (lambda tx=tx: torch.ops.aten.native_dropout(tx, p, True)) if torch else None, bytes_=9 * n))
    cases.append(Case("dropout", "dropout (fc6)", "backward", H.shape_str(shape),
                      lambda dy=dy, mask=mask: ops.dropout_backward(dy, mask, p, check_mask=False),
                      (lambda tdy=tdy, tmask=tmask: torch.ops.aten.native_dropout_backward(tdy, tmask, 1 / (1 - p)))
                      if torch else None, bytes_=9 * n))

    N, Cc = batch, s["classes"]
    logits, tlogits = both(rng.standard_normal((N, Cc)))
    labels_np = rng.integers(0, Cc, N).astype(np.int32)
    labels, tlabels = ax.from_numpy(labels_np), (torch.from_numpy(labels_np.astype(np.int64)) if torch else None)
    probs = ops.softmax_cross_entropy_forward(logits, labels)[1]
    fwd = lambda: ops.softmax_cross_entropy_forward(logits, labels)  # noqa: E731
    bwd = lambda: ops.softmax_cross_entropy_backward(probs, labels, 1.0 / N)  # noqa: E731
    t_fwd = t_bwd = None
    if torch:
        t_fwd = lambda: F.cross_entropy(tlogits, tlabels)  # noqa: E731
        tlg = tlogits.clone().requires_grad_(True)
        tloss = F.cross_entropy(tlg, tlabels)
        t_bwd = lambda: torch.autograd.grad(tloss, tlg, retain_graph=True)[0]  # noqa: E731
    cases.append(Case("softmax", "softmax-xent", "forward", f"{N}x{Cc}", fwd, t_fwd,
                      (lambda: rel_err(fwd()[0].numpy().mean(), tnp(t_fwd()))) if torch else None, bytes_=8 * N * Cc))
    cases.append(Case("softmax", "softmax-xent", "backward", f"{N}x{Cc}", bwd, t_bwd,
                      (lambda: rel_err(bwd().numpy(), tnp(t_bwd()))) if torch else None, bytes_=8 * N * Cc))

    params = H.parameter_shapes(cfg)
    ws, dws, vs = [], [], []
    tparams = []
    for _, shape in params:
        w_np = 0.01 * rng.standard_normal(shape).astype(np.float32)
        dw_np = rng.standard_normal(shape).astype(np.float32)
        ws.append(ax.from_numpy(w_np)); dws.append(ax.from_numpy(dw_np)); vs.append(ax.from_numpy(np.zeros(shape, np.float32)))
        if torch:
            tp = torch.nn.Parameter(torch.from_numpy(w_np.copy()))
            tp.grad = torch.from_numpy(dw_np.copy())
            tparams.append(tp)
    n_par = sum(int(np.prod(sh)) for _, sh in params)

    def sgd():
        for w, dw, v in zip(ws, dws, vs):
            ops.sgd_update(w, dw, v, LR, 0.9, 0.0005)

    t_sgd = None
    if torch:
        try:
            opt = torch.optim.SGD(tparams, lr=LR, momentum=0.9, weight_decay=0.0005, fused=True)
            opt.step()
        except Exception:
            opt = torch.optim.SGD(tparams, lr=LR, momentum=0.9, weight_decay=0.0005, foreach=True)
        t_sgd = opt.step
    cases.append(Case("sgd", f"sgd ({len(params)} tensors)", "update", f"{n_par} params", sgd, t_sgd, bytes_=20 * n_par))
    return cases


def step_case(cfg_name: str, batch: int, T: int, rng, torch, reps_note: list):
    """Builds our net and PyTorch's for one configuration; returns (Case, cleanup)."""
    import bench_train_step as BT

    cfg = H.net_config(cfg_name)
    # One "cpu" worker whose ops split over the T threads of the library's pool (what a user gets by default).
    devices = "cpu"
    net = ax.Net(cfg, devices=devices, seed=0)
    S, C, K = cfg["input_size"], cfg["in_channels"], cfg["num_classes"]
    batches = [(H.randn(rng, (batch, C, S, S), 50.0), rng.integers(0, K, batch).astype(np.int32)) for _ in range(2)]
    it = {"i": 0}

    def ours():
        b = batches[it["i"] % 2]
        it["i"] += 1
        return net.train_step(b[0], b[1], LR)

    theirs = check = None
    if torch:
        model = BT.torch_model(torch, cfg)
        BT.load_weights(torch, model, BT.merged_weights(cfg, net.state_dict()))
        x_val = batches[0][0][:2]

        def check():
            model.eval()
            with torch.no_grad():
                tl = model(torch.from_numpy(x_val)).numpy()
            model.train()
            return rel_err(net.forward(x_val), tl)

        opt, kind = BT.torch_sgd(torch, model, cfg)
        step = BT.make_torch_step(torch, model, opt, "cpu")
        jt = {"i": 0}

        def theirs():
            b = batches[jt["i"] % 2]
            jt["i"] += 1
            return step(*b)

        reps_note.append(f"PyTorch SGD: {kind}")
    shape = f"{cfg_name} config, batch {batch}, ours on devices '{devices}'"
    flops = H.step_flops_per_image(cfg)["train"] * batch
    return Case("train_step", f"train_step {cfg_name} b{batch}", "step", shape, ours, theirs, check, flops, None)


# ---------------------------------------------------------------------------------------------------
# Timing


def time_case(case: Case, warmup: int, reps: int, copy=None):
    """Interleaved: each rep times one call of each side (and of `copy`, the ceiling of a memory-bound case), the
    order rotating; returns (ours ms, theirs ms, copy ms)."""
    sides = [(case.ours, []), *([(case.theirs, [])] if case.theirs else []), *([(copy, [])] if copy else [])]
    for _ in range(warmup):
        for fn, _ in sides:
            fn()
    for r in range(reps):
        k = r % len(sides)
        for fn, out in sides[k:] + sides[:k]:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    times = [out for _, out in sides]
    return times[0], (times[1] if case.theirs else []), (times[-1] if copy else [])


def copier(nbytes: int):
    """A NumPy copy moving `nbytes` (half read, half written): the bandwidth a memory-bound op could reach."""
    a = np.ones(max(nbytes // 8, 1024), np.float32)
    b = np.empty_like(a)
    return lambda: np.copyto(b, a), 8 * a.size


def run_case(case: Case, T: int, warmup: int, reps: int, log) -> dict:
    row = dict(family=case.family, op=case.op, pass_=case.pass_, shape=case.shape, threads=T, flops=case.flops,
               bytes=case.bytes, status="ok")
    if case.check:
        try:
            err = case.check()
            row["check_rel_err"] = err
            row["check_ok"] = bool(np.isfinite(err) and err <= TOL)
        except Exception as e:  # noqa: BLE001
            row["check_ok"], row["check_error"] = False, f"{type(e).__name__}: {e}"
    copy, copy_bytes = copier(case.bytes) if case.bytes else (None, None)
    try:
        ours, theirs, copies = time_case(case, warmup, reps, copy)
    except Exception as e:  # noqa: BLE001
        row["status"] = f"error: {type(e).__name__}: {e}"
        log(f"  {case.op} {case.pass_}: {row['status']}")
        return row
    row["our_ms"] = statistics.median(ours)
    row["our_ms_all"] = ours
    if theirs:
        row["torch_ms"] = statistics.median(theirs)
        row["torch_ms_all"] = theirs
        row["ratio"] = row["torch_ms"] / row["our_ms"] if row["our_ms"] > 0 else None
    if case.flops:
        row["our_GFLOPs"] = case.flops / row["our_ms"] / 1e6
    if case.bytes:
        row["our_GBs"] = case.bytes / row["our_ms"] / 1e6
        row["copy_GBs"] = copy_bytes / statistics.median(copies) / 1e6
        row["frac_of_copy"] = row["our_GBs"] / row["copy_GBs"]
    log(format_row(row))
    return row


def format_row(r: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    rate = (f"{r['our_GFLOPs']:7.1f} GFLOP/s" + " " * 18 if r.get("our_GFLOPs") else
            f"{r['our_GBs']:7.1f} GB/s ({r['frac_of_copy']:4.2f} of copy)" if r.get("our_GBs") else " " * 33)
    chk = "" if "check_ok" not in r else (" check ok" if r["check_ok"] else
                                          f" CHECK FAILED ({r.get('check_rel_err', r.get('check_error'))})")
    return (f"  T={r['threads']} {r['op'][:26]:26s} {r['pass_']:11s} ours {f(r.get('our_ms'), '9.3f')} ms  "
            f"torch {f(r.get('torch_ms'), '9.3f')} ms  ratio {f(r.get('ratio'), '5.2f')}  {rate}{chk}")


# ---------------------------------------------------------------------------------------------------


def default_out(commit: str) -> Path:
    date = _dt.date.today().isoformat()
    return H.RESULTS_DIR / f"cpu_{date}_{commit[:7] if commit else 'unknown'}.json"


def main(argv=None):
    p = argparse.ArgumentParser(description="CPU backend vs PyTorch CPU at matched threads (ops and training step)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default 1,2)")
    p.add_argument("--op-config", choices=("paper", "tiny"), default="paper")
    p.add_argument("--op-batch", type=int, default=16)
    p.add_argument("--steps", default="tiny:32,tiny:64,paper:8,paper:16",
                   help="training-step cases config:batch, comma-separated ('' for none)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per side (default 7 ops, 5 steps)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side first (default 1 ops, 2 steps)")
    p.add_argument("--no-ops", action="store_true", help="training steps only")
    p.add_argument("--no-torch", action="store_true", help="time our side only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one call each: tests the script, measures nothing")
    p.add_argument("--out", default=None, help="results path (.json; a .txt is written beside it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
        steps = [(c.split(":")[0], int(c.split(":")[1])) for c in args.steps.split(",") if c.strip()]
        if not threads or min(threads) < 1 or any(c not in ("paper", "tiny") for c, _ in steps):
            raise ValueError
    except ValueError:
        print("bench_cpu: --threads takes counts >= 1 and --steps config:batch pairs (config paper or tiny)",
              file=sys.stderr)
        raise SystemExit(2)
    if args.smoke:
        args.op_config, args.op_batch = "tiny", 2
        steps = [("tiny", 2)]
        threads = threads[:1] if len(threads) > 1 else threads
    reps_ops = args.reps or (1 if args.smoke else 7)
    reps_steps = args.reps or (1 if args.smoke else 5)
    warm_ops = args.warmup if args.warmup is not None else (0 if args.smoke else 1)
    warm_steps = args.warmup if args.warmup is not None else (0 if args.smoke else 2)

    torch = optional_torch(args.no_torch)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    commit = H.git_commit()
    machine = dict(cpu_model=cpu_model(), cpu_flags=cpu_flags(), cpu_count=os.cpu_count(), host=platform.node(),
                   python=platform.python_version(), numpy=np.__version__,
                   torch=None if torch is None else torch.__version__,
                   torch_mkldnn=None if torch is None else bool(torch.backends.mkldnn.is_available()),
                   cpu_allocator=ax.cpu_allocator_stats().get("caching") if hasattr(ax, "cpu_allocator_stats") else None)
    log(f"bench_cpu: {machine['cpu_model']} ({machine['cpu_count']} CPUs; {' '.join(machine['cpu_flags'])}), "
        f"commit {commit}")
    if torch is None:
        log(f"bench_cpu: {NO_TORCH}")
    else:
        log(f"bench_cpu: PyTorch {torch.__version__}")
    if args.smoke:
        log("bench_cpu: smoke run: tiny shapes, one call per side; the times are not measurements")
    log("bench_cpu: medians of interleaved calls; on a shared machine the times are noisy")

    rows, notes = [], []
    rng = np.random.default_rng(args.seed)
    for T in threads:
        how = set_threads(torch, T)
        log(f"\n== {T} thread(s): PyTorch torch.set_num_threads({T}); ours: {how}")
        notes.append(f"T={T}: ours {how}")
        if not args.no_ops:
            cases = op_cases(H.net_config(args.op_config), args.op_batch, rng, torch)
            for c in cases:
                rows.append(run_case(c, T, warm_ops, reps_ops, log))
            del cases
            gc.collect()
        for cfg_name, b in steps:
            step_notes = []
            c = step_case(cfg_name, b, T, rng, torch, step_notes)
            rows.append(run_case(c, T, warm_steps, reps_steps, log))
            notes.extend(n for n in step_notes if n not in notes)
            del c
            gc.collect()
    summary = [r for r in rows if r["family"] == "train_step" and r.get("ratio")]
    if summary:
        log("\nTraining step, ratio = PyTorch time / our time:")
        for r in summary:
            log(f"  {r['op']:24s} T={r['threads']}: ours {r['our_ms']:8.1f} ms, PyTorch {r['torch_ms']:8.1f} ms, "
                f"ratio {r['ratio']:.2f}")
    failed = [r for r in rows if r.get("check_ok") is False or r["status"] != "ok"]
    if failed:
        log(f"\n{len(failed)} row(s) failed a check or errored: see check_ok / status")

    doc = dict(schema=1, script="bench_cpu", mode="smoke" if args.smoke else "full",
               created=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), commit=commit, machine=machine,
               threads=threads, op_config=args.op_config, op_batch=args.op_batch, steps=steps,
               timing=dict(method="host clock per call, ours and PyTorch interleaved (order alternating), median",
                           reps_ops=reps_ops, reps_steps=reps_steps, warmup_ops=warm_ops, warmup_steps=warm_steps),
               torch_status="ok" if torch else NO_TORCH, notes=notes, rows=rows, written={})
    out = Path(args.out) if args.out else (None if args.smoke else default_out(commit))
    if out is not None:
        out = out if out.suffix == ".json" else out.with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        doc["written"] = dict(json=str(out), txt=str(out.with_suffix(".txt")))
        out.write_text(json.dumps(doc, indent=1, default=float))
        out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        print(f"bench_cpu: wrote {out} and {out.with_suffix('.txt')}")
    return doc


if __name__ == "__main__":
    main()
