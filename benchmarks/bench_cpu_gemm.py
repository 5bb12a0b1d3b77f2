"""The CPU backend's GEMM and convolutions alone: GFLOP/s of a square GEMM and of every conv pass at AlexNet's
shapes, optionally next to PyTorch CPU (oneDNN/MKL) at the same thread count.

    python benchmarks/bench_cpu_gemm.py [--threads 1] [--net tiny|paper] [--batch 32] [--gemm 1024] [--reps 7]
                                        [--isa auto|avx512|avx2|generic] [--torch] [--only gemm|conv]

Prints one line per case: median milliseconds over --reps runs (after one warm-up), GFLOP/s, and with --torch
PyTorch's median and the ratio torch/ours (above 1: we are faster). Shapes are the merged single-device ones of
harness.layer_shapes (groups = towers for conv2, conv4 and conv5). The machine is whatever runs this: quote the
CPU model (printed first) with the figures. Nothing is written to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CLOCK = time.perf_counter


def median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append((CLOCK() - t0) * 1e3)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--net", choices=("tiny", "paper"), default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--gemm", type=int, default=1024, help="square GEMM size (0: skip)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch CPU (must be importable)")
    ap.add_argument("--only", choices=("gemm", "conv", "fc"), default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the calling thread's CPU time instead of the wall clock: steadier on a shared "
                         "machine, meaningful at --threads 1 only")
    a = ap.parse_args(argv)
    if a.cpu_time:
        global CLOCK
        CLOCK = time.thread_time
    ax = H.ax
    C = ax._C
    if a.threads < 1:
        print(f"bench_cpu_gemm: --threads must be >= 1, got {a.threads}", file=sys.stderr)
        return 2
    if hasattr(C, "_cpu_set_threads"):  # (absent in builds before the thread pool: then timed as they are)
        C._cpu_set_threads(a.threads)
    if hasattr(C, "_cpu_set_isa") and a.isa != "auto":
        try:
            C._cpu_set_isa(a.isa)
        except ValueError as e:
            print(f"bench_cpu_gemm: {e}", file=sys.stderr)
            return 2
    isa = C._cpu_isa() if hasattr(C, "_cpu_isa") else "unknown"
    torch = None
    if a.torch:
        try:
            import torch  # noqa: F811
        except ImportError as e:
            print(f"bench_cpu_gemm: --torch needs PyTorch: {e}", file=sys.stderr)
            return 2
        torch.set_num_threads(a.threads)
    print(f"# {cpu_model()}, {os.cpu_count()} logical CPUs; threads={a.threads} isa={isa}"
          + (" (thread CPU time)" if a.cpu_time else "")
          + (f" torch {torch.__version__}" if torch else ""))
    rng = np.random.default_rng(0)
    ops = ax.ops

    def report(name, flops, ours, theirs=None):
        line = f"{name:34s} {ours:9.3f} ms {flops / ours / 1e6:8.1f} GFLOP/s"
        if theirs is not None:
            line += f"   torch {theirs:9.3f} ms {flops / theirs / 1e6:8.1f} GFLOP/s  ratio {theirs / ours:5.2f}"
        print(line, flush=True)

    if a.gemm and a.only != "conv":
        n = a.gemm
        A = rng.standard_normal((n, n), dtype=np.float32)
        B = rng.standard_normal((n, n), dtype=np.float32)
        At, Bt = ax.from_numpy(A, "cpu"), ax.from_numpy(B, "cpu")
        ours = median_ms(lambda: ops.linear_backward_input(At, Bt), a.reps)  # (n,n) @ (n,n), no transposes
        theirs = None
        if torch:
            TA, TB = torch.from_numpy(A), torch.from_numpy(B)
            theirs = median_ms(lambda: TA @ TB, a.reps)
        report(f"gemm {n}^3 (NN)", 2 * n ** 3, ours, theirs)

    if a.only == "gemm":
        return 0
    shapes = H.layer_shapes(H.net_config(a.net), a.batch)
    for L in shapes["fcs"] if a.only in (None, "fc") else []:
        N, I, O = L["N"], L["I"], L["O"]
        x = rng.standard_normal((N, I), dtype=np.float32)
        w = rng.standard_normal((O, I), dtype=np.float32) * np.float32(0.01)
        dy = rng.standard_normal((N, O), dtype=np.float32)
        xt, wt, dyt = (ax.from_numpy(v, "cpu") for v in (x, w, dy))
        cases = {"fwd": lambda: ops.linear_forward(xt, wt), "bwd_input": lambda: ops.linear_backward_input(dyt, wt),
                 "bwd_weight": lambda: ops.linear_backward_weight(xt, dyt)}
        tcases = {}
        if torch:
            tx, tw, tdy = (torch.from_numpy(v) for v in (x, w, dy))
            tcases = {"fwd": lambda: tx @ tw.T, "bwd_input": lambda: tdy @ tw, "bwd_weight": lambda: tdy.T @ tx}
        for kind, fn in cases.items():
            ours = median_ms(fn, a.reps)
            theirs = median_ms(tcases[kind], a.reps) if torch else None
            report(f"{a.net} b{a.batch} {L['name']} {kind}", 2 * N * I * O, ours, theirs)
    for L in shapes["convs"] if a.only in (None, "conv") else []:
        flops = H.conv_flops(L)
        x = rng.standard_normal((L["N"], L["C"], L["H"], L["W"]), dtype=np.float32)
        w = (rng.standard_normal((L["K"], L["C"] // L["groups"], L["R"], L["S"]), dtype=np.float32) * 0.05)
        dy = rng.standard_normal((L["N"], L["K"], L["P"], L["Q"]), dtype=np.float32)
        xt, wt, dyt = (ax.from_numpy(v, "cpu") for v in (x, w, dy))
        s, p, g = L["stride"], L["pad"], L["groups"]
        cases = {
            "fwd": lambda: ops.conv2d_forward(xt, wt, None, stride=s, padding=p, groups=g),
            "bwd_input": lambda: ops.conv2d_backward_input(dyt, wt, (L["H"], L["W"]), stride=s, padding=p, groups=g),
            "bwd_weight": lambda: ops.conv2d_backward_weight(xt, dyt, (L["R"], L["S"]), stride=s, padding=p, groups=g),
        }
        tcases = {}
        if torch:
            F = torch.nn.functional
            tx, tw, tdy = (torch.from_numpy(v) for v in (x, w, dy))
            tcases = {
                "fwd": lambda: F.conv2d(tx, tw, None, s, p, 1, g),
                "bwd_input": lambda: torch.nn.grad.conv2d_input(tuple(x.shape), tw, tdy, s, p, 1, g),
                "bwd_weight": lambda: torch.nn.grad.conv2d_weight(tx, tuple(w.shape), tdy, s, p, 1, g),
            }
        for kind, fn in cases.items():
            ours = median_ms(fn, a.reps)
            theirs = median_ms(tcases[kind], a.reps) if torch else None
            report(f"{a.net} b{a.batch} {L['name']} {kind}", flops, ours, theirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
