"""Shared benchmark machinery: timing, the GPU's measured ceilings, validation against the float64 reference,
AlexNet's layer shapes, and result writing (terminal table, JSON, markdown, bar chart).

Every kernel-family script builds a list of `Case`s and hands them to `run_cases`; nothing here knows about a
particular op. Timing uses CUDA events from PyTorch where torch is importable (our ops launch on the legacy
default stream, which is torch's current stream by default, so events recorded there bracket our kernels),
with the L2 cache flushed by a large memset before every timed run (which also keeps the GPU busy while the
host submits the op, so launch latency does not leak into short kernels). Without torch the GPU is timed by
the host clock around a synchronize, and the ceilings are not measured. PyTorch is a benchmark dependency
only, never the library's.

Smoke mode (--smoke) runs the CPU backend on the tiny config: correctness validation only, no timing claims,
and nothing is written unless --out names a folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Prefer the in-tree build (python setup.py build_ext --inplace) when there is one, so `python
# benchmarks/x.py` from a checkout measures that checkout.
if any((REPO / "alexnet_cuda").glob("_C*.so")) and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import alexnet_cuda as ax  # noqa: E402

try:  # config.py is pure Python and always present; fall back to a local copy of the two configs if not
    from alexnet_cuda.config import alexnet_config, tiny_config  # noqa: E402
except ImportError:  # pragma: no cover
    alexnet_config = tiny_config = None

# DESIGN.md tolerances (relative error against the float64 reference).
TOL_ELEMENTWISE = 1e-5
TOL_REDUCTION = 1e-4


# ---------------------------------------------------------------------------------------------------
# Optional imports


def optional_torch(disabled: bool = False):
    """torch, configured for a fair float32 comparison (TF32 off, cuDNN autotuning on), or None."""
    if disabled or os.environ.get("ALEXNET_BENCH_NO_TORCH"):
        return None
    try:
        import torch
    except Exception:  # ImportError, or a broken install
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape during warm-up
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:
        pass
    return torch


def reference_module():
    """alexnet_cuda.reference (the NumPy float64 oracle), or raise ImportError with a readable reason."""
    import importlib

    return importlib.import_module("alexnet_cuda.reference")


# ---------------------------------------------------------------------------------------------------
# AlexNet's shapes


def net_config(name: str) -> dict:
    if alexnet_config is None:
        raise RuntimeError("alexnet_cuda.config is missing")
    return alexnet_config() if name == "paper" else tiny_config()


def layer_shapes(cfg: dict, batch: int) -> dict:
    """Every layer's shapes for `cfg` at `batch`, merged over the towers as one GPU runs the paper's net:
    conv1 3->96 (each tower sees the whole image, so merging is exact), conv2/4/5 with groups=towers (each
    tower sees only its own half), conv3 and the fc layers ungrouped (they read both towers)."""
    N, T = batch, cfg["towers"]
    ch, c1 = cfg["channels"], cfg["conv1"]
    pool_w, pool_s = (3, 2) if cfg["overlap_pool"] else (2, 2)
    spec = [  # name, out channels, kernel, stride, pad, groups, lrn after, pool after
        ("conv1", ch[0], c1["kernel"], c1["stride"], c1["padding"], 1, cfg["lrn"], True),
        ("conv2", ch[1], 5, 1, 2, T, cfg["lrn"], True),
        ("conv3", ch[2], 3, 1, 1, 1, False, False),
        ("conv4", ch[3], 3, 1, 1, T, False, False),
        ("conv5", ch[4], 3, 1, 1, T, False, True),
    ]
    C, H = cfg["in_channels"], cfg["input_size"]
    convs, lrns, pools = [], [], []
    for name, K, R, s, p, g, lrn, pool in spec:
        P = (H + 2 * p - R) // s + 1
        convs.append(dict(name=name, N=N, C=C, H=H, W=H, K=K, R=R, S=R, stride=s, pad=p, groups=g, P=P, Q=P))
        if lrn:
            lrns.append(dict(name=f"lrn{name[-1]}", shape=(N, K, P, P), towers=T))
        C, H = K, P
        if pool:
            Po = (H - pool_w) // pool_s + 1
            pools.append(dict(name=f"pool{name[-1]}", shape=(N, C, H, H), window=pool_w, stride=pool_s, out=Po))
            H = Po
    feats = C * H * H
    fcs = []
    for name, out_features in (("fc6", cfg["fc"][0]), ("fc7", cfg["fc"][1]), ("fc8", cfg["num_classes"])):
        fcs.append(dict(name=name, N=N, I=feats, O=out_features))
        feats = out_features
    return dict(convs=convs, lrns=lrns, pools=pools, fcs=fcs, classes=cfg["num_classes"], towers=T)


def conv_flops(L: dict) -> int:
    """2 * multiply-adds of one conv pass (forward, grad-input and grad-weight all do the same count)."""
    return 2 * L["N"] * L["K"] * L["P"] * L["Q"] * (L["C"] // L["groups"]) * L["R"] * L["S"]


def step_flops_per_image(cfg: dict) -> dict:
    """Forward FLOPs of one image (conv + fc multiply-adds x2) and a training step's (3x: forward, grad-input,
    grad-weight)."""
    s = layer_shapes(cfg, 1)
    fwd = sum(conv_flops(L) for L in s["convs"]) + sum(2 * f["I"] * f["O"] for f in s["fcs"])
    return dict(forward=fwd, train=3 * fwd)


def parameter_shapes(cfg: dict) -> List[tuple]:
    """(name, shape) of every parameter tensor of the merged single-device net (weights and biases)."""
    s = layer_shapes(cfg, 1)
    out = []
    for L in s["convs"]:
        out += [(f"{L['name']}.weight", (L["K"], L["C"] // L["groups"], L["R"], L["S"])),
                (f"{L['name']}.bias", (L["K"],))]
    for f in s["fcs"]:
        out += [(f"{f['name']}.weight", (f["O"], f["I"])), (f"{f['name']}.bias", (f["O"],))]
    return out


def shape_str(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


# ---------------------------------------------------------------------------------------------------
# Timers


class CpuTimer:
    """Host clock around each call (the CPU backend is synchronous)."""

    method = "host clock (perf_counter), CPU backend"

    def time(self, fn: Callable[[], Any], warmup: int, reps: int) -> List[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


class CudaEventTimer:
    """torch.cuda.Event pairs on the current (legacy default) stream around each call, each call preceded by
    a memset of a buffer several times the L2 size so that neither input nor weights are served from cache."""

    def __init__(self, torch, device: str, flush_bytes: int):
        self.torch = torch
        self.device = device
        self.flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)
        self.method = f"CUDA events (torch), median, L2 flushed by a {flush_bytes >> 20} MiB memset before each run"

    def time(self, fn, warmup, reps):
        torch = self.torch
        for _ in range(warmup):
            fn()
        ax.synchronize(self.device)
        torch.cuda.synchronize()
        stream = torch.cuda.current_stream()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()
            starts[i].record(stream)
            fn()
            ends[i].record(stream)
        ax.synchronize(self.device)
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


class CudaWallTimer:
    """Without torch: host clock around call + synchronize, after flushing L2 through one of our own ops.
    Includes launch latency, so short kernels read slow; labelled as such."""

    def __init__(self, device: str, flush_bytes: int):
        self.device = device
        self.flush_bytes = flush_bytes
        self.flush = None  # allocated on first use, so scripts that never time through it do not hold it
        self.method = "host clock around call + synchronize (torch unavailable: includes launch latency)"

    def time(self, fn, warmup, reps):
        if self.flush is None:
            self.flush = ax.from_numpy(np.zeros(self.flush_bytes // 4, np.float32), self.device)
        for _ in range(warmup):
            fn()
        ax.synchronize(self.device)
        out = []
        for _ in range(reps):
            ax.ops.relu_forward(self.flush)  # streams the buffer through L2
            ax.synchronize(self.device)
            t0 = time.perf_counter()
            fn()
            ax.synchronize(self.device)
            out.append((time.perf_counter() - t0) * 1e3)
        return out


# ---------------------------------------------------------------------------------------------------
# Context


@dataclasses.dataclass
class Context:
    smoke: bool
    device: str  # "cpu" or "cuda:N": where our ops run
    batch: int
    cfg: dict
    config_name: str
    warmup: int
    reps: int
    torch: Any = None  # the torch module, or None
    torch_device: str = "cpu"
    timer: Any = None
    ceilings: dict = dataclasses.field(default_factory=dict)
    device_info: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    only: Optional[str] = None
    notes: List[str] = dataclasses.field(default_factory=list)
    ref: Any = None  # alexnet_cuda.reference, or None with ref_error saying why
    ref_error: str = ""

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def timing_claims(self) -> bool:
        return not self.smoke

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def shapes(self) -> dict:
        return layer_shapes(self.cfg, self.batch)

    def picks(self, n: int) -> List[int]:
        """Samples checked against the reference: first, middle and last, so batch indexing is covered."""
        return sorted({0, n // 2, n - 1})

    # moving data around
    def dev(self, a: np.ndarray):
        return ax.from_numpy(np.ascontiguousarray(a), self.device)

    def tdev(self, a: np.ndarray):
        t = self.torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.torch_device)

    def sync(self):
        if self.is_cuda:
            ax.synchronize(self.device)
            if self.torch is not None:
                self.torch.cuda.synchronize()


def randn(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def f64(a) -> np.ndarray:
    """Reference inputs go in as float64."""
    return np.asarray(a, np.float64)


def to_np(t) -> np.ndarray:
    """A torch tensor as NumPy, wherever it lives."""
    return t.detach().cpu().numpy()


def masked_batch(a: np.ndarray, picks) -> np.ndarray:
    """`a` with every sample outside `picks` zeroed: a batch-reducing op (grad-weight, grad-bias) over it
    equals the op over a[picks], so the full-batch kernel is checked against a small reference."""
    m = np.zeros_like(a)
    m[picks] = a[picks]
    return m


# ---------------------------------------------------------------------------------------------------
# Ceilings


def _median_ms(timer, fn, warmup=3, reps=10) -> float:
    return statistics.median(timer.time(fn, warmup, reps))


def measure_ceilings(ctx: Context) -> dict:
    """This GPU's measured ceilings, in the same run: device-to-device copy bandwidth (GB/s, bytes read +
    written), a float32 FMA-bound kernel (GFLOP/s; built with torch's jiterator) and SGEMM with TF32 off
    (GFLOP/s). CPU runs measure NumPy's copy and SGEMM instead; smoke runs measure nothing."""
    c: Dict[str, Any] = {}
    if ctx.smoke:
        return c
    if not ctx.is_cuda:
        a = np.ones(1 << 26, np.float32)
        b = np.empty_like(a)
        ms = _median_ms(CpuTimer(), lambda: np.copyto(b, a), 1, 5)
        c["copy_GBps"] = 2 * a.nbytes / ms / 1e6
        c["copy_label"] = "NumPy copy of 256 MiB"
        m = randn(np.random.default_rng(0), (1024, 1024))
        ms = _median_ms(CpuTimer(), lambda: m @ m, 1, 5)
        c["sgemm_GFLOPs"] = 2 * 1024**3 / ms / 1e6
        c["compute_GFLOPs"], c["compute_label"] = c["sgemm_GFLOPs"], "NumPy SGEMM 1024^3"
        return c
    torch = ctx.torch
    if torch is None:
        ctx.notes.append("ceilings not measured: torch is not importable (install torch for the comparison)")
        return c
    timer = ctx.timer
    n = 1 << 28  # 1 GiB of float32, far beyond any L2
    buf = {"src": torch.ones(n, dtype=torch.float32, device=ctx.torch_device)}
    buf["dst"] = torch.empty_like(buf["src"])
    ms = _median_ms(timer, lambda: buf["dst"].copy_(buf["src"]))
    c["copy_GBps"] = 2 * n * 4 / ms / 1e6
    c["copy_label"] = "torch device-to-device copy of 1 GiB (read + write)"
    buf.clear()
    try:
        c["fma_GFLOPs"] = _fma_ceiling(torch, timer, ctx.torch_device)
        c["fma_label"] = "float32 FMA chains (torch jiterator kernel, 4 chains x 512 FMA per element)"
    except Exception as e:  # jiterator is a private API; fall back to SGEMM
        c["fma_error"] = f"{type(e).__name__}: {e}"[:300]
    m = 8192
    buf = {"a": torch.randn(m, m, device=ctx.torch_device), "b": torch.randn(m, m, device=ctx.torch_device)}
    ms = _median_ms(timer, lambda: torch.mm(buf["a"], buf["b"]), 2, 5)
    c["sgemm_GFLOPs"] = 2 * m**3 / ms / 1e6
    c["sgemm_label"] = "torch SGEMM 8192^3, TF32 off (cuBLAS)"
    buf.clear()
    if "fma_GFLOPs" in c:
        c["compute_GFLOPs"], c["compute_label"] = c["fma_GFLOPs"], "FMA ceiling"
    else:
        c["compute_GFLOPs"], c["compute_label"] = c["sgemm_GFLOPs"], "SGEMM ceiling"
    torch.cuda.empty_cache()
    return c


_FMA_CODE = """
template <typename T> T fma_chains(T x, T a, T b) {
  T y0 = x, y1 = x + T(1), y2 = x - T(1), y3 = x * T(0.5);
  #pragma unroll 8
  for (int i = 0; i < 512; ++i) {
    y0 = y0 * a + b; y1 = y1 * a + b; y2 = y2 * a + b; y3 = y3 * a + b;
  }
  return y0 + y1 + y2 + y3;
}
"""


def _fma_ceiling(torch, timer, device) -> float:
    fn = torch.cuda.jiterator._create_jit_fn(_FMA_CODE, a=0.999, b=0.001)
    x = torch.rand(1 << 24, device=device)
    y = fn(x, a=0.999, b=0.001)  # compile once, and check it computes something finite
    if not bool(torch.isfinite(y).all()):
        raise RuntimeError("FMA kernel produced non-finite values")
    ms = _median_ms(timer, lambda: fn(x, a=0.999, b=0.001), 2, 10)
    return x.numel() * 4 * 512 * 2 / ms / 1e6


# ---------------------------------------------------------------------------------------------------
# Validation


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape {ours.shape} != reference {ref.shape}")
    if not np.isfinite(ours).all():
        return math.nan
    den = np.linalg.norm(ref)
    num = np.linalg.norm(ours - ref)
    return float(num / den) if den > 0 else float(num)


def compare(ours: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], tol: float) -> dict:
    """Float outputs by relative error (NaN/Inf fail), integer outputs exactly. Keys of `ours` must be in
    `ref`. Returns {ok, rel_err (max over float outputs), mismatches (integer elements), detail}."""
    worst, mismatches, detail = 0.0, 0, []
    for k, o in ours.items():
        r = ref[k]
        o = np.asarray(o)
        if np.issubdtype(o.dtype, np.floating) or np.issubdtype(np.asarray(r).dtype, np.floating):
            e = rel_err(o, r)
            worst = e if (math.isnan(e) or math.isnan(worst)) else max(worst, e)
            detail.append(f"{k}: rel {e:.2e}")
        else:
            if o.shape != np.shape(r):
                raise ValueError(f"{k}: shape {o.shape} != reference {np.shape(r)}")
            bad = int(np.count_nonzero(o.astype(np.int64) != np.asarray(r).astype(np.int64)))
            mismatches += bad
            detail.append(f"{k}: {bad} mismatches")
    ok = (not math.isnan(worst)) and worst <= tol and mismatches == 0
    return dict(ok=ok, rel_err=worst, mismatches=mismatches, detail="; ".join(detail))


# ---------------------------------------------------------------------------------------------------
# Cases and rows


@dataclasses.dataclass
class Case:
    """One op and pass at one shape. `setup` builds the state (NumPy inputs and device tensors); `validate`
    runs our op on the device and returns (ours, ref) dicts of NumPy arrays on the checked slice; `run` is the
    timed call. The torch_* hooks are the same op through PyTorch: `torch_setup` builds its state from ours,
    `torch_outputs` returns a dict (a subset of ref's keys) on the same slice, or None when it cannot be
    compared value for value (e.g. dropout's different RNG). Give `flops` for compute ops, `bytes` (the fewest
    each must move) for memory ops."""

    family: str
    op: str
    pass_: str
    shape: str
    setup: Callable[[Context], dict]
    validate: Callable[[Context, dict], tuple]
    run: Callable[[dict], Any]
    tol: float
    flops: Optional[float] = None
    bytes: Optional[float] = None
    torch_setup: Optional[Callable[[Context, dict], dict]] = None
    torch_run: Optional[Callable[[dict], Any]] = None
    torch_outputs: Optional[Callable[[Context, dict, dict], Optional[dict]]] = None
    note: str = ""


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:240]


def new_row(family, op, pass_, shape, note="", tol=None, flops=None, bytes=None) -> Dict[str, Any]:
    """One result row; every script's rows carry these keys (the table and JSON read them)."""
    return dict(family=family, op=op, pass_=pass_, shape=shape, note=note, tol=tol, flops=flops, bytes=bytes,
                validated=False, rel_err=None, status="", our_ms=None, torch_ms=None, torch_status="", ratio=None,
                metric=None, achieved=None, pct_ceiling=None, torch_achieved=None, torch_pct_ceiling=None,
                torch_rel_err=None)


def run_case(ctx: Context, case: Case) -> dict:
    row = new_row(case.family, case.op, case.pass_, case.shape, case.note, case.tol, case.flops, case.bytes)
    if ctx.ref is None:
        row["status"] = f"not validated: reference unavailable ({ctx.ref_error}); no time reported"
        return row
    try:
        state = case.setup(ctx)
    except Exception as e:
        row["status"] = f"setup error: {_error_text(e)}"
        return row
    try:
        ax.set_poison_allocations(True)  # an output element the kernel never writes reads as NaN
        ours, ref = case.validate(ctx, state)
        res = compare(ours, ref, case.tol)
    except Exception as e:
        row["status"] = f"error: {_error_text(e)}"
        return row
    finally:
        ax.set_poison_allocations(False)
    row["rel_err"], row["validated"] = res["rel_err"], res["ok"]
    row["check"] = res["detail"]
    if not res["ok"]:
        row["status"] = f"FAILED validation ({res['detail']}; tol {case.tol:g}): no time reported"
        return row
    state["_ref"] = ref
    try:
        times = ctx.timer.time(lambda: case.run(state), ctx.warmup, ctx.reps)
        row["our_ms"] = statistics.median(times)
        row["our_ms_min"] = min(times)
        row["status"] = "ok"
    except Exception as e:
        row["status"] = f"timing error: {_error_text(e)}"
        return row
    if ctx.torch is not None and case.torch_setup is not None:
        try:
            tstate = case.torch_setup(ctx, state)
            touts = case.torch_outputs(ctx, state, tstate) if case.torch_outputs else None
            if touts is None:
                row["torch_status"] = "not value-checked"
            else:
                tres = compare(touts, {k: ref[k] for k in touts}, case.tol)
                row["torch_rel_err"] = tres["rel_err"]
                if not tres["ok"]:
                    row["torch_status"] = f"PyTorch output disagrees with the reference ({tres['detail']})"
                    raise _Skip()
                row["torch_status"] = "ok"
            times = ctx.timer.time(lambda: case.torch_run(tstate), ctx.warmup, ctx.reps)
            row["torch_ms"] = statistics.median(times)
        except _Skip:
            pass
        except Exception as e:
            row["torch_status"] = f"error: {_error_text(e)}"
    derive(ctx, row)
    return row


class _Skip(Exception):
    pass


def derive(ctx: Context, row: dict) -> None:
    """Achieved rate, fraction of the measured ceiling, and torch/ours ratio."""
    if row["our_ms"] is None:
        return
    if row["flops"]:
        row["metric"], amount, ceiling = "GFLOP/s", row["flops"], ctx.ceilings.get("compute_GFLOPs")
    elif row["bytes"]:
        row["metric"], amount, ceiling = "GB/s", row["bytes"], ctx.ceilings.get("copy_GBps")
    else:
        amount = ceiling = None
    if amount:
        row["achieved"] = amount / row["our_ms"] / 1e6
        if ceiling:
            row["pct_ceiling"] = 100.0 * row["achieved"] / ceiling
        if row["torch_ms"]:
            row["torch_achieved"] = amount / row["torch_ms"] / 1e6
            if ceiling:
                row["torch_pct_ceiling"] = 100.0 * row["torch_achieved"] / ceiling
    if row["torch_ms"]:
        row["ratio"] = row["torch_ms"] / row["our_ms"]


def run_cases(ctx: Context, cases: List[Case], log: Callable[[str], None] = print) -> List[dict]:
    rows = []
    for case in cases:
        if ctx.only and ctx.only not in f"{case.family} {case.op} {case.pass_}":
            continue
        row = run_case(ctx, case)
        rows.append(row)
        log(_progress_line(ctx, row))
        if ctx.is_cuda:  # hand both allocators' cached blocks back, so case after case does not pile them up
            ax.cuda_empty_cache()
            if ctx.torch is not None:
                ctx.torch.cuda.empty_cache()
    return rows


def _progress_line(ctx, row) -> str:
    s = f"  {row['op']:<22} {row['pass_']:<12} {row['shape']:<26} "
    if row["status"] != "ok":
        return s + row["status"]
    s += f"rel_err {row['rel_err']:.1e} ok"
    if ctx.timing_claims:
        s += f"  ours {row['our_ms']:.4f} ms"
        if row["torch_ms"]:
            s += f"  torch {row['torch_ms']:.4f} ms  ratio {row['ratio']:.2f}"
    if row["torch_status"] == "ok":
        s += f"  [torch rel_err {row['torch_rel_err']:.1e} ok]"
    elif row["torch_status"]:
        s += f"  [torch: {row['torch_status']}]"
    return s


# ---------------------------------------------------------------------------------------------------
# Context from the command line


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="CPU backend, tiny config, batch 4: correctness only, no timing claims, writes only with --out")
    # --devices is the spelling every tool documents (train, evaluate, predict); --device is the same option.
    p.add_argument("--devices", dest="device", default=None, help="cuda:N (default when a GPU is present) or cpu: "
                   "both towers run on it")
    p.add_argument("--device", dest="device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; 2 in smoke mode)")
    p.add_argument("--config", choices=("paper", "tiny"), default=None,
                   help="network shapes (default paper; tiny in smoke)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per op (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; smoke: none)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--only", default=None, help="run only cases whose 'family op pass' contains this text")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_context(args, need_ceilings: bool = True) -> Context:
    smoke = args.smoke
    device = args.device or ("cpu" if smoke or not ax.cuda_available() else "cuda:0")
    if smoke and device != "cpu":
        raise SystemExit("--smoke runs the CPU backend; drop --devices or use --devices cpu")
    if not smoke and device == "cpu" and args.device is None:
        raise SystemExit(f"no GPU to benchmark ({ax.cuda_unavailable_reason()}); use --smoke, or --devices cpu "
                         "to time the CPU backend")
    config_name = args.config or ("tiny" if smoke else "paper")
    ctx = Context(
        smoke=smoke, device=device, batch=args.batch or (4 if smoke else 128), cfg=net_config(config_name),
        config_name=config_name, warmup=args.warmup if args.warmup is not None else (1 if smoke else 5),
        reps=args.reps or (2 if smoke else 30), seed=args.seed, only=args.only,
    )
    ctx.torch = optional_torch(args.no_torch)
    if ctx.torch is not None and device.startswith("cuda"):
        if not ctx.torch.cuda.is_available():
            ctx.notes.append("torch is importable but sees no GPU: no PyTorch comparison")
            ctx.torch = None
        else:
            ctx.torch_device = device
            ctx.torch.cuda.set_device(device)  # events and the flush then live on the benchmarked GPU
    try:
        ctx.ref = reference_module()
    except Exception as e:
        ctx.ref, ctx.ref_error = None, _error_text(e)
    if ctx.is_cuda:
        flush = 256 << 20
        if ctx.torch is not None:
            l2 = getattr(ctx.torch.cuda.get_device_properties(ctx.torch_device), "L2_cache_size", 0) or 0
            flush = max(flush, 4 * l2)
            ctx.timer = CudaEventTimer(ctx.torch, ctx.torch_device, flush)
        else:
            ctx.timer = CudaWallTimer(device, flush)
    else:
        ctx.timer = CpuTimer()
    ctx.device_info = device_info(ctx)
    if need_ceilings:
        ctx.ceilings = measure_ceilings(ctx)
    if ctx.smoke:
        ctx.notes.append("smoke run: CPU backend on tiny shapes; validation only, times are not measurements")
    return ctx


def device_info(ctx: Context) -> dict:
    info: Dict[str, Any] = dict(device=ctx.device, host=platform.node(), python=platform.python_version(),
                                numpy=np.__version__, built_with_cuda=ax.built_with_cuda())
    if ctx.torch is not None:
        info["torch"] = ctx.torch.__version__
    if ctx.is_cuda:
        if ctx.torch is not None:
            p = ctx.torch.cuda.get_device_properties(ctx.torch_device)
            info.update(name=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                        memory_GiB=round(p.total_memory / 2**30, 1),
                        L2_MiB=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                        cudnn=ctx.torch.backends.cudnn.version(), cuda=ctx.torch.version.cuda)
        smi = _nvidia_smi()
        if smi:
            info["nvidia_smi"] = smi
            info.setdefault("name", smi.get("name", "unknown GPU"))
        info.setdefault("name", f"{ctx.device} (unknown GPU)")
    else:
        info["name"] = "cpu-" + (platform.processor() or platform.machine())
        info["cpu_count"] = os.cpu_count()
    return info


def _nvidia_smi() -> dict:
    q = "name,driver_version,clocks.max.sm,clocks.max.memory,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
    except Exception:
        return {}
    if not out:
        return {}
    return dict(zip(q.split(","), (v.strip() for v in out[0].split(",")), strict=False))


def git_commit() -> str:
    """HEAD of the checkout measured, with -dirty when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except Exception:
        return os.environ.get("ALEXNET_COMMIT", "unknown (not a git checkout)")


# ---------------------------------------------------------------------------------------------------
# Results


def document(ctx: Context, script: str, rows: List[dict], extra: Optional[dict] = None) -> dict:
    doc = dict(
        schema=1, script=script, mode="smoke" if ctx.smoke else "full",
        created=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), commit=git_commit(),
        device=ctx.device_info, config=ctx.config_name, batch=ctx.batch,
        timing=dict(method=ctx.timer.method if ctx.timer else None, warmup=ctx.warmup, reps=ctx.reps,
                    statistic="median"),
        torch=None if ctx.torch is None else dict(
            version=ctx.torch.__version__, cudnn_allow_tf32=False, matmul_allow_tf32=False, cudnn_benchmark=True),
        ceilings=ctx.ceilings, notes=list(ctx.notes), rows=rows,
    )
    if extra:
        doc.update(extra)
    return doc


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table_rows(doc: dict) -> List[List[str]]:
    """The README table: op, pass, shape, our ms, PyTorch ms, ratio, GFLOP/s or GB/s, % of ceiling."""
    claims = doc["mode"] != "smoke"
    out = []
    for r in doc["rows"]:
        if r["status"] != "ok":
            ours = "FAILED" if "FAILED" in r["status"] else ("n/a" if "unavailable" in r["status"] else "error")
            out.append([r["op"], r["pass_"], r["shape"], ours, "", "", "", ""])
            continue
        if not claims:
            out.append([r["op"], r["pass_"], r["shape"], "(smoke)", "(smoke)" if r["torch_status"] == "ok" else "", "",
                        "", ""])
            continue
        torch_cell = _fmt(r["torch_ms"], ".3f") if r["torch_ms"] else ("n/a" if not r["torch_status"] else "—")
        rate = f"{r['achieved']:.0f} {r['metric']}" if r["achieved"] else ""
        out.append([r["op"], r["pass_"], r["shape"], _fmt(r["our_ms"], ".3f"), torch_cell,
                    _fmt(r["ratio"], ".2f"), rate, _fmt(r["pct_ceiling"], ".1f")])
    return out


HEADER = ["op", "pass", "shape", "our ms", "PyTorch ms", "ratio (torch/ours)", "GFLOP/s or GB/s", "% of ceiling"]


def markdown(doc: dict, title: str) -> str:
    dev = doc["device"]
    c = doc["ceilings"]
    lines = [f"## {title}", "",
             f"GPU/device: **{dev.get('name')}** ({doc['device'].get('device')}); date {doc['created'][:10]}; "
             f"commit `{doc['commit']}`; config {doc['config']}, batch {doc['batch']}; mode {doc['mode']}.", "",
             f"Timing: {doc['timing']['method']}; {doc['timing']['reps']} runs after {doc['timing']['warmup']} "
             "warm-up.",
             ""]
    if c:
        parts = []
        if "copy_GBps" in c:
            parts.append(f"bandwidth {c['copy_GBps']:.0f} GB/s ({c['copy_label']})")
        if "fma_GFLOPs" in c:
            parts.append(f"FMA {c['fma_GFLOPs']:.0f} GFLOP/s ({c['fma_label']})")
        if "sgemm_GFLOPs" in c:
            parts.append(f"SGEMM {c['sgemm_GFLOPs']:.0f} GFLOP/s ({c.get('sgemm_label', c.get('compute_label'))})")
        lines += ["Ceilings measured in this run: " + "; ".join(parts) + f". Compute ops are shown against the "
                  f"{c.get('compute_label', 'compute')}, memory ops against the copy bandwidth.", ""]
    if doc.get("torch"):
        gpu = " (cuDNN autotuning on)" if str(dev.get("device", "")).startswith("cuda") else ""
        lines += [f"PyTorch {doc['torch']['version']}, float32, TF32 off{gpu}; ratio = PyTorch time / our time "
                  "(above 1: ours is faster).", ""]
    rows = table_rows(doc)
    if rows:
        lines.append("| " + " | ".join(HEADER) + " |")
        lines.append("|" + "---|" * len(HEADER))
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
    for extra in doc.get("markdown_sections", []):
        lines += [extra, ""]
    failed = [r for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        lines.append("Not reported:")
        lines += [f"- {r['op']} {r['pass_']} {r['shape']}: {r['status']}" for r in failed]
        lines.append("")
    for n in doc["notes"]:
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def terminal_table(doc: dict) -> str:
    rows = [HEADER] + table_rows(doc)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def bar_chart(doc: dict, path: Path, title: str) -> Optional[str]:
    """Horizontal bars of our time and PyTorch's per row (log scale). Returns a notice when skipped."""
    rows = [r for r in doc["rows"] if r.get("our_ms")]
    if not rows:
        return "bar chart skipped: no timed rows"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "bar chart skipped: matplotlib is not installed (pip install matplotlib)"
    labels = [f"{r['op']} {r['pass_']}" for r in rows]
    y = np.arange(len(rows))
    fig, axes = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    axes.barh(y - 0.2, [r["our_ms"] for r in rows], height=0.4, label="alexnet_cuda")
    axes.barh(y + 0.2, [r["torch_ms"] or 0 for r in rows], height=0.4, label="PyTorch")
    axes.set_yticks(y, labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("median ms (lower is better)")
    axes.set_title(title, fontsize=9)
    axes.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "device"


def write_results(doc: dict, out_dir: Optional[str], stem: Optional[str], title: str, plot: bool = True) -> dict:
    """Prints the table; writes <gpu>_<date>[_<stem>].json/.md/.png under out_dir (none when out_dir is None)."""
    print()
    print(f"{title} — {doc['device'].get('name')} — commit {doc['commit']} — mode {doc['mode']}")
    print(terminal_table(doc))
    for n in doc["notes"]:
        print(f"note: {n}")
    written = {}
    if out_dir is None:
        return written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{slug(doc['device'].get('name', 'device'))}_{doc['created'][:10]}" + (f"_{stem}" if stem else "")
    if plot and doc["mode"] != "smoke":
        p = out / f"{base}.png"
        notice = bar_chart(doc, p, f"{title}: {doc['device'].get('name')} {doc['created'][:10]}")
        if notice:
            print(notice)
            doc["notes"].append(notice)
        else:
            written["png"] = str(p)
    p = out / f"{base}.json"
    p.write_text(json.dumps(doc, indent=1, default=_json_default))
    written["json"] = str(p)
    p = out / f"{base}.md"
    p.write_text(markdown(doc, title))
    written["md"] = str(p)
    for path in written.values():
        print(f"wrote {path}")
    return written


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def default_out(args) -> Optional[str]:
    if args.out:
        return args.out
    return None if args.smoke else str(RESULTS_DIR)


def script_main(name: str, title: str, build_cases: Callable[[Context], List[Case]], argv=None) -> dict:
    """The whole of a kernel-family script: parse, build the context, validate and time every case, write."""
    args = arg_parser(title).parse_args(argv)
    ctx = make_context(args)
    print(f"{title}: device {ctx.device} ({ctx.device_info.get('name')}), config {ctx.config_name}, batch {ctx.batch}")
    rows = run_cases(ctx, build_cases(ctx))
    doc = document(ctx, name, rows)
    doc["written"] = write_results(doc, default_out(args), name, title, plot=not args.no_plot)
    return doc
