"""The whole training step: images/s of net.train_step at batch 128 with both towers on one GPU
(devices=("cuda:0", "cuda:0")), against a PyTorch model of the identical network in eager mode and, where it works,
under torch.compile; peak GPU memory of each.

The PyTorch model is the merged single-device form of the two towers (the weights are copied from our net, tower
halves concatenated): conv1 3->96; conv2, conv4, conv5 with groups=2; conv3 and fc6..fc8 reading both towers; LRN
applied to each tower's channels separately (PyTorch's LocalResponseNorm divides alpha by n, so it gets alpha*n);
the same inverted dropout; float32 with TF32 off; SGD with momentum 0.9 and weight decay 5e-4 (PyTorch's fused
SGD, whose momentum formula is equivalent to the paper's up to the learning-rate scaling of v). Both sides take a
float32 NumPy batch per step (host-to-device copy included), return the loss and top-1/top-5 hits to the host (a
synchronization per step), and are timed by the host clock per step, median over the timed steps.

Validation before timing: our net's inference logits on a few images match a float64 forward built from
alexnet_cuda.reference ops with our net's weights (tower by tower, exactly as ALEXNET.md describes), and so do the
PyTorch model's (which shows the comparison model is the same network).

The training step itself is cross-checked where torch is present: one step with dropout off from the same weights,
ours and PyTorch's, must change every parameter alike (rel 1e-2, see TOL_UPDATE; from zero momentum both SGD
formulas give w - lr (dw + wd w)). That step runs in a separate net that is freed before the timed one is built.

Peak memory: ours is alexnet_cuda.cuda_allocator_stats()['peak_bytes_in_use'] (bytes held by live tensors; the
library has no peak reset, so run_all runs this script in a fresh process; the check net above holds no more than
the timed one, having no dropout masks, and is freed first), PyTorch's is torch.cuda.max_memory_allocated() after a
reset; neither counts the CUDA context or the allocators' cached free blocks.

--cuda-graph on times our steps replayed as one CUDA graph (Net.set_cuda_graph; the warm-up then takes at least 3
steps: two eager, one captured); the row's "cuda_graph" says which mode ran and how many timed steps were graphs.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import numpy as np

import harness as H
from harness import ax, f64

# Our tower parameters concatenated along the output dimension (the merged single-device layers): the same
# mapping `python -m alexnet_cuda.weights export` uses for PyTorch-style files.
from alexnet_cuda.weights import merge_towers as merged_weights  # noqa: E402

LR = 0.01
TOL_FORWARD = H.TOL_REDUCTION
# A whole backward pass on each side, compared with each other. Looser than an op's tolerance because float32
# rounding flips the odd ReLU or max-pool decision that sits on its kink (a pre-activation within ~1e-6 of zero,
# two window values within ~1e-6 of each other), which moves one full-size term of a gradient sum; at batch 128
# that leaves ~1e-3 relative differences. A wrong backward (a missing term, a mis-wired tower) is off by far more.
TOL_UPDATE = 1e-2


# ---------------------------------------------------------------------------------------------------
# The same network three ways: ours (ax.Net), the float64 reference, and PyTorch


def reference_forward(R, cfg: dict, sd: dict, x: np.ndarray) -> np.ndarray:
    """Inference logits (no dropout) of the two-tower net from reference ops and our net's tower weights."""
    T, n = cfg["towers"], x.shape[0]
    pool_w = 3 if cfg["overlap_pool"] else 2
    c1 = cfg["conv1"]

    def wb(name, t):
        return f64(sd[f"{name}.t{t}.weight"]), f64(sd[f"{name}.t{t}.bias"])

    def lrn(a):
        if not cfg["lrn"]:
            return a
        return R.lrn_forward(a, cfg["lrn_size"], cfg["lrn_k"], cfg["lrn_alpha"], cfg["lrn_beta"])[0]

    def pool(a):
        return R.maxpool_forward(a, pool_w, 2, 0)[0]

    def conv(a, name, t, stride=1, pad=1):
        return R.relu_forward(R.conv2d_forward(a, *wb(name, t), stride, pad, 1))

    x = f64(x)
    h = [pool(lrn(conv(x, "conv1", t, c1["stride"], c1["padding"]))) for t in range(T)]
    h = [pool(lrn(conv(h[t], "conv2", t, 1, 2))) for t in range(T)]
    both = np.concatenate(h, 1)  # conv3 reads both towers
    h = [conv(both, "conv3", t) for t in range(T)]
    h = [conv(h[t], "conv4", t) for t in range(T)]
    h = [pool(conv(h[t], "conv5", t)) for t in range(T)]
    flat = np.concatenate([a.reshape(n, -1) for a in h], 1)
    for name in ("fc6", "fc7"):
        flat = np.concatenate([R.relu_forward(R.linear_forward(flat, *wb(name, t))) for t in range(T)], 1)
    return np.concatenate([R.linear_forward(flat, *wb("fc8", t)) for t in range(T)], 1)


def torch_model(torch, cfg: dict):
    """The identical network in PyTorch (merged towers, see the module docstring)."""
    nn, F = torch.nn, torch.nn.functional
    if cfg["drop_layers"]:
        raise ValueError("the PyTorch model covers the full net only (drop_layers must be empty)")
    T, ch, c1, fc = cfg["towers"], cfg["channels"], cfg["conv1"], cfg["fc"]
    shapes = H.layer_shapes(cfg, 1)
    feats = shapes["fcs"][0]["I"]

    class AlexNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(cfg["in_channels"], ch[0], c1["kernel"], c1["stride"], c1["padding"])
            self.conv2 = nn.Conv2d(ch[0], ch[1], 5, 1, 2, groups=T)
            self.conv3 = nn.Conv2d(ch[1], ch[2], 3, 1, 1)
            self.conv4 = nn.Conv2d(ch[2], ch[3], 3, 1, 1, groups=T)
            self.conv5 = nn.Conv2d(ch[3], ch[4], 3, 1, 1, groups=T)
            self.fc6 = nn.Linear(feats, fc[0])
            self.fc7 = nn.Linear(fc[0], fc[1])
            self.fc8 = nn.Linear(fc[1], cfg["num_classes"])
            self.lrn = (nn.LocalResponseNorm(cfg["lrn_size"], cfg["lrn_alpha"] * cfg["lrn_size"], cfg["lrn_beta"],
                                             cfg["lrn_k"]) if cfg["lrn"] else None)
            self.pool = nn.MaxPool2d(3 if cfg["overlap_pool"] else 2, 2)
            self.drop = nn.Dropout(cfg["dropout"])

        def tower_lrn(self, x):  # each tower normalizes over its own channels
            if self.lrn is None:
                return x
            n, c, h, w = x.shape
            return self.lrn(x.reshape(n * T, c // T, h, w)).reshape(n, c, h, w)

        def forward(self, x):
            x = self.pool(self.tower_lrn(F.relu(self.conv1(x))))
            x = self.pool(self.tower_lrn(F.relu(self.conv2(x))))
            x = F.relu(self.conv4(F.relu(self.conv3(x))))
            x = self.pool(F.relu(self.conv5(x))).flatten(1)
            x = self.drop(F.relu(self.fc6(x)))
            x = self.drop(F.relu(self.fc7(x)))
            return self.fc8(x)

    return AlexNet()


def load_weights(torch, model, merged: dict):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(merged[name]))


def param_groups(model, cfg):
    """Weights decay by weight_decay, biases by bias_weight_decay, as our net does."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg["weight_decay"]},
            {"params": [p for p in params if p.dim() == 1], "weight_decay": cfg["bias_weight_decay"]}]


def torch_sgd(torch, model, cfg):
    kw = dict(lr=LR, momentum=cfg["momentum"])
    try:
        return torch.optim.SGD(param_groups(model, cfg), fused=True, **kw), "fused"
    except Exception:
        return torch.optim.SGD(param_groups(model, cfg), foreach=True, **kw), "foreach"


def make_torch_step(torch, model, opt, device):
    F = torch.nn.functional

    def step(images, labels):
        x = torch.from_numpy(images).to(device)
        y = torch.from_numpy(labels).to(device).long()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits = out.detach().topk(5, 1).indices == y[:, None]
        loss_v, top1, top5 = torch.stack([loss.detach(), hits[:, 0].sum().float(), hits.any(1).sum().float()]).tolist()
        return dict(loss=loss_v, top1=int(top1), top5=int(top5))

    return step


def update_check(ctx: H.Context, images: np.ndarray, labels: np.ndarray) -> dict:
    """One training step with dropout off, ours against PyTorch's from the same weights: the parameter changes
    must agree (from zero momentum both SGD formulas give w - lr (dw + wd w)). This checks our whole backward
    pass and that the PyTorch model is the same network, training included."""
    torch, dev = ctx.torch, ctx.device
    cfg = ax.alexnet_config(**{**ctx.cfg, "dropout": 0.0})
    net = ax.Net(cfg, devices=(dev, dev), seed=ctx.seed)
    before = merged_weights(cfg, net.state_dict())
    net.train_step(images, labels, LR)
    after = merged_weights(cfg, net.state_dict())
    del net
    model = torch_model(torch, cfg).to(ctx.torch_device)
    load_weights(torch, model, before)
    opt = torch.optim.SGD(param_groups(model, cfg), lr=LR, momentum=cfg["momentum"])
    make_torch_step(torch, model, opt, ctx.torch_device)(images, labels)
    theirs = {n: H.to_np(p) - before[n] for n, p in model.named_parameters()}
    ours = {n: after[n] - before[n] for n in theirs}
    del model, opt
    return H.compare(ours, theirs, TOL_UPDATE)


def timed_steps(step, batches, warmup: int, steps: int):
    """Host clock around each synchronous step; returns (per-step ms, last step's stats)."""
    out = None
    for i in range(warmup):
        out = step(*batches[i % len(batches)])
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        out = step(*batches[i % len(batches)])
        times.append((time.perf_counter() - t0) * 1e3)
    return times, out


# ---------------------------------------------------------------------------------------------------


def run(ctx: H.Context, steps: int, warmup: int, compile_: bool, log=print):
    cfg, N, dev = ctx.cfg, ctx.batch, ctx.device
    shape = f"{N}x{cfg['in_channels']}x{cfg['input_size']}x{cfg['input_size']}, 2 towers on {dev}"
    flops = H.step_flops_per_image(cfg)["train"] * N
    row = H.new_row("train_step", "train_step", "vs PyTorch eager", shape, tol=TOL_FORWARD, flops=flops)
    rows = [row]
    if not hasattr(ax, "Net"):
        row["status"] = "skipped: alexnet_cuda.Net is not in this build (the net lands on main separately)"
        return rows
    if ctx.ref is None:
        row["status"] = f"not validated: reference unavailable ({ctx.ref_error}); no time reported"
        return rows
    rng = ctx.rng(900)
    S, C, K = cfg["input_size"], cfg["in_channels"], cfg["num_classes"]
    batches = [(H.randn(rng, (N, C, S, S), 50.0), rng.integers(0, K, N).astype(np.int32)) for _ in range(3)]
    n_val = min(N, 2)
    x_val = batches[0][0][:n_val]

    peak_before = ax.cuda_allocator_stats()["peak_bytes_in_use"]
    # First, in its own net (freed before the timed one is built, so the timed net's peak is not inflated):
    update_checked = False
    if ctx.torch is not None:
        try:
            upd = update_check(ctx, *batches[1])
        except Exception as e:
            upd = dict(ok=False, rel_err=math.nan, detail=f"error: {H._error_text(e)}")
        row["update_rel_err"] = upd["rel_err"]
        log(f"  validation: one step's parameter changes (dropout off) vs PyTorch's: max rel_err {upd['rel_err']:.2e}")
        if not upd["ok"]:
            row["validated"] = False
            row["status"] = (f"FAILED validation (parameter update vs PyTorch: {upd['detail']}; tol {TOL_UPDATE:g}): "
                             "no time reported")
            return rows
        update_checked = True
        if ctx.is_cuda:
            ax.cuda_empty_cache()
    else:
        ctx.notes.append("training step not cross-checked against PyTorch (torch unavailable): forward validated only")
    try:
        net = ax.Net(cfg, devices=(dev, dev), seed=ctx.seed)
        sd = net.state_dict()
        ref_logits = reference_forward(ctx.ref, cfg, sd, x_val)
        ours = H.compare({"logits": net.forward(x_val)}, {"logits": ref_logits}, TOL_FORWARD)
    except Exception as e:
        row["status"] = f"error: {H._error_text(e)}"
        return rows
    row["rel_err"], row["validated"] = ours["rel_err"], ours["ok"]
    row["check"] = "inference logits vs reference forward" + (
        "; one step's parameter update vs PyTorch (dropout off)" if update_checked else "")
    log(f"  validation: our logits on {n_val} images vs the float64 reference: rel_err {ours['rel_err']:.2e}")
    if not ours["ok"]:
        row["status"] = f"FAILED validation (logits rel {ours['rel_err']:.2e}; tol {TOL_FORWARD:g}): no time reported"
        return rows
    try:
        mode = getattr(ctx, "cuda_graph", "off")
        if ctx.is_cuda and mode != "off":
            net.set_cuda_graph(mode)
            warmup = max(warmup, 3)  # two eager steps, then the capture: the timed steps replay
        times, last = timed_steps(functools.partial(net.train_step, lr=LR), batches, warmup, steps)
        if ctx.is_cuda and mode != "off":
            row["cuda_graph"] = f"{mode}: {net.graph_stats()['replays']} graph steps of {warmup + steps}"
    except Exception as e:
        row["status"] = f"error in train_step: {H._error_text(e)}"
        return rows
    if not math.isfinite(last["loss"]):
        row["status"] = f"FAILED: train_step loss is {last['loss']}"
        return rows
    row.update(status="ok", our_ms=statistics.median(times), our_ms_min=min(times), last_loss=last["loss"])
    row["images_per_s"] = N / row["our_ms"] * 1e3
    if ctx.is_cuda:
        peak = ax.cuda_allocator_stats()["peak_bytes_in_use"]
        row["peak_bytes"] = peak
        if peak_before > 0:
            ctx.notes.append("our peak memory includes allocations made in this process before the net "
                             "(run bench_train_step.py alone, as run_all does, for the net's own peak)")
    if ctx.timing_claims:
        log(f"  ours: {row['our_ms']:.2f} ms/step, {row['images_per_s']:.0f} images/s (loss {last['loss']:.4f})")
    del net
    if ctx.is_cuda:
        ax.cuda_empty_cache()

    torch = ctx.torch
    if torch is None:
        row["torch_status"] = "torch not importable"
        H.derive(ctx, row)
        return rows
    merged = merged_weights(cfg, sd)
    modes = [("eager", row)]
    if compile_:
        crow = H.new_row("train_step", "train_step", "vs torch.compile", shape, tol=TOL_FORWARD, flops=flops)
        for k in ("validated", "rel_err", "check", "status", "our_ms", "our_ms_min", "images_per_s", "peak_bytes",
                  "last_loss"):
            if k in row:
                crow[k] = row[k]
        rows.append(crow)
        modes.append(("compile", crow))
    for mode, r in modes:
        try:
            torch_run(ctx, r, mode, merged, batches, x_val, ref_logits, steps, warmup, log)
        except Exception as e:
            r["torch_status"] = f"error ({mode}): {H._error_text(e)}"
            log(f"  PyTorch {mode}: {r['torch_status']}")
        H.derive(ctx, r)
        if r.get("torch_ms"):
            r["torch_images_per_s"] = N / r["torch_ms"] * 1e3
    return rows


def torch_run(ctx, row, mode, merged, batches, x_val, ref_logits, steps, warmup, log):
    torch, dev = ctx.torch, ctx.torch_device
    if ctx.is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if mode == "compile":
        torch._dynamo.reset()
    model = torch_model(torch, ctx.cfg).to(dev)
    load_weights(torch, model, merged)
    model.eval()
    with torch.no_grad():
        logits = H.to_np(model(torch.from_numpy(x_val).to(dev)))
    check = H.compare({"logits": logits}, {"logits": ref_logits}, TOL_FORWARD)
    row["torch_rel_err"] = check["rel_err"]
    if not check["ok"]:
        row["torch_status"] = f"PyTorch model's logits disagree with the reference (rel {check['rel_err']:.2e})"
        log("  " + row["torch_status"])
        return
    model.train()
    run_model = torch.compile(model) if mode == "compile" else model
    opt, kind = torch_sgd(torch, model, ctx.cfg)
    t0 = time.perf_counter()
    warm = max(warmup, 3 if mode == "compile" else 1)  # compiling happens in the first steps
    times, last = timed_steps(make_torch_step(torch, run_model, opt, dev), batches, warm, steps)
    row.update(torch_ms=statistics.median(times), torch_status="ok", torch_optimizer=f"SGD ({kind})",
               torch_last_loss=last["loss"], torch_total_s=time.perf_counter() - t0)
    if ctx.is_cuda:
        row["torch_peak_bytes"] = torch.cuda.max_memory_allocated()
    timing = f"; {row['torch_ms']:.2f} ms/step (loss {last['loss']:.4f})" if ctx.timing_claims else ""
    log(f"  PyTorch {mode}: logits rel_err {check['rel_err']:.2e}{timing}")
    del model, run_model, opt


def markdown_section(doc: dict) -> str:
    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    if not rows or doc["mode"] == "smoke":
        return ""
    r0 = rows[0]
    ceiling = doc["ceilings"].get("compute_GFLOPs")

    def line(name, ms, peak):
        rate = r0["flops"] / ms / 1e6
        pct = f"{100 * rate / ceiling:.1f}" if ceiling else "–"
        mem = f"{peak / 2**30:.2f} GiB" if peak else "–"
        return f"| {name} | {ms:.2f} | {doc['batch'] / ms * 1e3:.0f} | {rate:.0f} | {pct} | {mem} |"

    out = ["### Training step", "",
           "| implementation | ms/step | images/s | GFLOP/s | % of ceiling | peak GPU memory |",
           "|---|---|---|---|---|---|",
           line("alexnet_cuda (both towers on one GPU)", r0["our_ms"], r0.get("peak_bytes"))]
    for r in rows:
        name = "PyTorch eager" if "eager" in r["pass_"] else "PyTorch, torch.compile"
        if r.get("torch_ms"):
            out.append(line(name, r["torch_ms"], r.get("torch_peak_bytes")))
        elif r.get("torch_status"):
            out.append(f"| {name} | {r['torch_status']} | | | | |")
    return "\n".join(out)


def main(argv=None):
    p = H.arg_parser("Training step: alexnet_cuda vs PyTorch")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; 2 in smoke mode)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="off",
                   help="our steps as a captured CUDA graph (Net.set_cuda_graph; default off: eager steps)")
    args = p.parse_args(argv)
    ctx = H.make_context(args)
    ctx.cuda_graph = args.cuda_graph
    steps = args.steps or (2 if ctx.smoke else 20)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if ctx.smoke else 3)
    compile_ = not args.no_compile and not ctx.smoke and ctx.torch is not None and ctx.is_cuda
    print(f"Training step: device {ctx.device} ({ctx.device_info.get('name')}), config {ctx.config_name}, "
          f"batch {ctx.batch}")
    rows = run(ctx, steps, warmup, compile_)
    doc = H.document(ctx, "train_step", rows, {"steps": steps, "warmup_steps": warmup})
    doc["timing"].update(method="host clock per synchronous step (median), H2D copy of the batch included",
                         reps=steps, warmup=warmup)
    section = markdown_section(doc)
    if section:
        doc["markdown_sections"] = [section]
    doc["written"] = H.write_results(doc, H.default_out(args), "train_step", "Training step", plot=not args.no_plot)
    return doc


if __name__ == "__main__":
    main()
