"""Every benchmark in one run: the kernel families (conv, gemm, elementwise, LRN/pooling, softmax, augment), the data
loader and the whole training step, with the ceilings measured once. Writes the combined JSON, the README-ready
markdown table and a bar chart to benchmarks/results/<gpu>_<date>.{json,md,png}.

    python benchmarks/run_all.py                 # on a GPU machine (pip install torch for the comparison)
    python benchmarks/run_all.py --smoke         # CPU backend, tiny shapes: validation only, writes nothing

On a GPU the training step runs in a fresh process, so that its peak-memory figure is the net's alone (the
library's allocator keeps a process-wide peak with no reset).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile

import harness as H
import bench_conv
import bench_elementwise
import bench_gemm
import bench_loader
import bench_lrn_pool
import bench_softmax
import bench_train_step

FAMILIES = {
    "conv": bench_conv.conv_cases,
    "gemm": bench_gemm.gemm_cases,
    "elementwise": bench_elementwise.elementwise_cases,
    "lrn_pool": bench_lrn_pool.lrn_pool_cases,
    "softmax": bench_softmax.softmax_cases,
}


def train_step_in_subprocess(args, ctx) -> dict:
    with tempfile.TemporaryDirectory(prefix="alexnet_bench_step_") as out:
        cmd = [sys.executable, os.path.join(H.BENCH_DIR, "bench_train_step.py"), "--out", out, "--no-plot",
               "--devices", ctx.device, "--batch", str(ctx.batch), "--config", ctx.config_name, "--seed", str(ctx.seed)]
        for flag, value in (("--steps", args.steps), ("--warmup-steps", args.warmup_steps)):
            if value is not None:
                cmd += [flag, str(value)]
        for flag, on in (("--no-torch", args.no_torch), ("--no-compile", args.no_compile)):
            if on:
                cmd.append(flag)
        print("running the training step in a fresh process: " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, timeout=3600)
        found = glob.glob(os.path.join(out, "*.json"))
        if proc.returncode != 0 or not found:
            row = H.new_row("train_step", "train_step", "vs PyTorch eager", f"batch {ctx.batch}")
            row["status"] = f"error: bench_train_step.py exited with {proc.returncode}"
            return {"rows": [row], "notes": [], "markdown_sections": []}
        with open(found[0]) as f:
            return json.load(f)


def main(argv=None):
    p = H.arg_parser("All alexnet_cuda benchmarks")
    p.add_argument("--families", default=",".join(list(FAMILIES) + ["loader", "train_step"]),
                   help="comma-separated subset of: " + ", ".join(list(FAMILIES) + ["loader", "train_step"]))
    p.add_argument("--data", default=None, help="prepared folder for the loader benchmark")
    p.add_argument("--batches", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--in-process", action="store_true", help="run the training step in this process, even on a GPU")
    args = p.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES) - {"loader", "train_step"}
    if unknown:
        raise SystemExit(f"unknown families: {sorted(unknown)}")
    ctx = H.make_context(args)
    print(f"alexnet_cuda benchmarks: device {ctx.device} ({ctx.device_info.get('name')}), config {ctx.config_name}, "
          f"batch {ctx.batch}, torch {'yes' if ctx.torch is not None else 'no'}")
    rows, sections = [], []
    for name in families:
        if name in FAMILIES:
            print(f"[{name}]", flush=True)
            rows += H.run_cases(ctx, FAMILIES[name](ctx))
    if "loader" in families:
        print("[loader]", flush=True)
        size, crop = (40, 32) if ctx.config_name == "tiny" else (256, 224)
        loader = H.run_cases(ctx, [bench_loader.augment_case(ctx, size, crop)]) + bench_loader.loader_rows(ctx, args)
        rows += loader
        section = bench_loader.markdown_section({"rows": loader, "mode": "smoke" if ctx.smoke else "full"})
        if section:
            sections.append(section)
    if "train_step" in families:
        print("[train_step]", flush=True)
        if ctx.is_cuda and not args.in_process:
            sub = train_step_in_subprocess(args, ctx)
            step_rows = sub["rows"]
            for r in step_rows:
                H.derive(ctx, r)  # against this run's ceilings
            ctx.notes += [n for n in sub.get("notes", []) if n not in ctx.notes]
        else:
            steps = args.steps or (2 if ctx.smoke else 20)
            warmup = args.warmup_steps if args.warmup_steps is not None else (1 if ctx.smoke else 3)
            compile_ = not args.no_compile and not ctx.smoke and ctx.torch is not None and ctx.is_cuda
            step_rows = bench_train_step.run(ctx, steps, warmup, compile_)
        rows += step_rows
        tmp_doc = H.document(ctx, "train_step", step_rows)
        section = bench_train_step.markdown_section(tmp_doc)
        if section:
            sections.append(section)
    doc = H.document(ctx, "all", rows, {"families": families})
    if sections:
        doc["markdown_sections"] = sections
    doc["written"] = H.write_results(doc, H.default_out(args), None, "alexnet_cuda benchmarks", plot=not args.no_plot)
    return doc


if __name__ == "__main__":
    main()
