"""Trace one training step of the two-tower net and report how much the towers overlapped.

    python benchmarks/trace_step.py                         # paper net, batch 128, both towers on cuda:0
    python benchmarks/trace_step.py --devices cuda:0,cuda:1  # the paper's placement, one tower per GPU
    python benchmarks/trace_step.py --smoke --out /tmp/t     # tiny net on two CPU workers (CI)

Writes <gpu>_<date>_trace.json (Chrome trace: open it in Perfetto) and <gpu>_<date>_trace_summary.json
(busy time per tower, their union, the overlap fraction, bytes per cross-tower edge, the commit) under
benchmarks/results/ (or --out). The step traced follows warm-up steps, so it allocates from the cache.
"""
import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import numpy as np

import harness  # noqa: F401  (puts the in-tree build first on sys.path)
import alexnet_cuda as ax
from alexnet_cuda.net import write_chrome_trace


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default=None, help="scheduler placement (default cuda:0,cuda:0; --smoke: cpu,cpu)")
    p.add_argument("--device", dest="devices", help=argparse.SUPPRESS)  # the same option, as in every tool
    p.add_argument("--batch", type=int, default=None, help="images per step (default 128; --smoke: 16)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny net on two CPU workers; writes only under --out")
    p.add_argument("--out", default=None, help="folder for the results (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.smoke:
        cfg, devices, batch = ax.tiny_config(), args.devices or "cpu,cpu", args.batch or 16
    else:
        cfg, devices, batch = ax.alexnet_config(), args.devices or "cuda:0,cuda:0", args.batch or 128
    out = Path(args.out) if args.out else (None if args.smoke else harness.RESULTS_DIR)

    net = ax.Net(cfg, devices=devices.split(","), seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, cfg["input_size"], cfg["input_size"])).astype(np.float32)
    y = rng.integers(0, cfg["num_classes"], batch).astype(np.int32)
    for _ in range(args.warmup):
        net.train_step(x, y, 0.01)
    net.set_tracing(True)
    net.train_step(x, y, 0.01)
    stats = net.last_step_stats()
    ov = stats["overlap"]
    dev0 = net.devices[0]
    if dev0.startswith("cuda"):
        name = ax.cuda_device_properties(int(dev0.split(":")[1]))["name"]
    else:
        name = "cpu"
    summary = {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": harness.git_commit(), "device": name, "devices": net.devices, "executors": net.executors(),
        "batch": batch, "config": "tiny" if args.smoke else "paper",
        "step_wall_ms": stats["wall_us"] / 1000.0,
        "busy_ms_per_tower": {str(t): v / 1000.0 for t, v in ov["busy_us"].items()},
        "union_busy_ms": ov["union_us"] / 1000.0,
        "overlap": ov["overlap"],
        "edge_bytes": stats["edge_bytes"],
        "ops_traced": len(stats["timeline"]),
    }
    print(f"{name} {net.devices} batch {batch}: step {summary['step_wall_ms']:.2f} ms, towers busy "
          + ", ".join(f"{v:.2f}" for v in summary["busy_ms_per_tower"].values())
          + f" ms, union {summary['union_busy_ms']:.2f} ms, overlap {ov['overlap']:.1%}")
    for edge, b in sorted(stats["edge_bytes"].items()):
        print(f"  {edge:14s} {b / 2**20:9.2f} MiB")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{harness.slug(name)}_{_dt.date.today().isoformat()}_trace"
        write_chrome_trace(stats["timeline"], str(out / f"{stem}.json"), net.executors())
        (out / f"{stem}_summary.json").write_text(json.dumps(summary, indent=1))
        print(f"wrote {out / (stem + '.json')} and {stem}_summary.json")
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
