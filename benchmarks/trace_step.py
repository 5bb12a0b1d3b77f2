"""Trace training steps of the two-tower net: how much the towers overlapped, and how much of each step the
input path left exposed.

    python benchmarks/trace_step.py                         # paper net, batch 128, both towers on cuda:0
    python benchmarks/trace_step.py --devices cuda:0,cuda:1  # the paper's placement, one tower per GPU
    python benchmarks/trace_step.py --input float           # the float32 path (host-augmented batches)
    python benchmarks/trace_step.py --smoke --out /tmp/t     # tiny net on two CPU workers (CI)

By default the steps take the training loop's input path (--input staged): uint8 source images written
into the net's staging slots (Net.staging_slot; here a copy from a pool of random batches, standing in for
the loader's gather from the shards) and stepped on with Net.train_step_staged, each step filling and
uploading the next batch from its prefetch callback. For each traced step it prints the step's wall time,
the towers' busy time and overlap, and the input path: per kind (stage: the host filling the next slot;
upload: the host-to-device copies on the upload streams; augment: augment_batch on the devices) how long
it was busy and how long of that no tower computed anything else ("exposed": what the input path adds to
the step; the issue-11 target is under 1 ms). The first line printed carries the worst step's figure.

Writes <gpu>_<date>_trace.json (Chrome trace of the last traced step: open it in Perfetto) and
<gpu>_<date>_trace_summary.json (the figures of every traced step, bytes per cross-tower edge, the commit)
under benchmarks/results/ (or --out). The steps traced follow warm-up steps, so they allocate from the cache.
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


class StagedFeed:
    """Batches for train_step_staged: uint8 (n, S, S, 3) sources with random crops, flips, lighting and
    labels, copied from a pool of `pool` batches into each slot the net hands out."""

    def __init__(self, net, cfg, batch, S, rng, pool=2):
        self.net, self.n, self.S = net, batch, S
        c = cfg["input_size"]
        self.pool = []
        for _ in range(pool):
            self.pool.append((rng.integers(0, 256, (batch, S, S, 3), dtype=np.uint8),
                              rng.integers(0, S - c + 1, (batch, 2)).astype(np.int32),
                              rng.integers(0, 2, batch).astype(np.uint8),
                              rng.normal(0, 5, (batch, 3)).astype(np.float32),
                              rng.integers(0, cfg["num_classes"], batch).astype(np.int32)))
        self.k = 0

    def fill(self):
        slot = self.net.staging_slot(self.n, self.S, self.S)
        src = self.pool[self.k % len(self.pool)]
        self.k += 1
        for name, a in zip(("images", "offsets", "flips", "light", "labels"), src):
            np.copyto(getattr(slot, name), a)
        return slot

    def step(self, lr):
        first = self.fill() if self.k == 0 else None
        return self.net.train_step_staged(first, lr, prefetch=self.fill)


def step_figures(stats):
    ov, inp = stats["overlap"], stats["input"]
    return {
        "step_wall_ms": stats["wall_us"] / 1000.0,
        "busy_ms_per_tower": {str(t): v / 1000.0 for t, v in ov["busy_us"].items()},
        "union_busy_ms": ov["union_us"] / 1000.0,
        "overlap": ov["overlap"],
        "input_busy_ms": {k: v / 1000.0 for k, v in inp["busy_us"].items()},
        "input_exposed_ms": {k: v / 1000.0 for k, v in inp["exposed_us"].items()},
        "input_exposed_total_ms": inp["exposed_total_us"] / 1000.0,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default=None, help="scheduler placement (default cuda:0,cuda:0; --smoke: cpu,cpu)")
    p.add_argument("--device", dest="devices", help=argparse.SUPPRESS)  # the same option, as in every tool
    p.add_argument("--batch", type=int, default=None, help="images per step (default 128; --smoke: 16)")
    p.add_argument("--input", choices=("staged", "float"), default="staged",
                   help="staged: uint8 batches in the net's staging slots, augmented on the devices (the training "
                        "loop's CUDA path; default); float: host-augmented float32 batches (train_step)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps traced after the warm-up (default 3)")
    p.add_argument("--smoke", action="store_true", help="tiny net on two CPU workers; writes only under --out")
    p.add_argument("--out", default=None, help="folder for the results (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.smoke:
        cfg, devices, batch = ax.tiny_config(), args.devices or "cpu,cpu", args.batch or 16
    else:
        cfg, devices, batch = ax.alexnet_config(), args.devices or "cuda:0,cuda:0", args.batch or 128
    out = Path(args.out) if args.out else (None if args.smoke else harness.RESULTS_DIR)

    net = ax.Net(cfg, devices=devices.split(","), seed=0)
    rng = np.random.default_rng(0)
    if args.input == "staged":
        # The stored images are 256x256 for the paper's 224 crops; the tiny net crops from 8 pixels more.
        S = cfg["input_size"] + (32 if cfg["input_size"] >= 224 else 8)
        net.set_input_mean((rng.random((3, S, S)) * 255).astype(np.float32))
        feed = StagedFeed(net, cfg, batch, S, rng)
        step = feed.step
    else:
        x = rng.standard_normal((batch, 3, cfg["input_size"], cfg["input_size"])).astype(np.float32)
        y = rng.integers(0, cfg["num_classes"], batch).astype(np.int32)

        def step(lr):
            return net.train_step(x, y, lr)
    for _ in range(args.warmup):
        step(0.01)
    net.set_tracing(True)
    steps = []
    for _ in range(args.steps):
        step(0.01)
        stats = net.last_step_stats()
        steps.append(step_figures(stats))
    net.set_tracing(False)
    dev0 = net.devices[0]
    if dev0.startswith("cuda"):
        name = ax.cuda_device_properties(int(dev0.split(":")[1]))["name"]
    else:
        name = "cpu"
    last = steps[-1]
    worst = max(s["input_exposed_total_ms"] for s in steps)
    summary = {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": harness.git_commit(), "device": name, "devices": net.devices, "executors": net.executors(),
        "batch": batch, "config": "tiny" if args.smoke else "paper", "input": args.input,
        **last,
        "steps": steps,
        "input_exposed_ms_worst": worst,
        "edge_bytes": stats["edge_bytes"],
        "ops_traced": len(stats["timeline"]),
    }
    print(f"{name} {net.devices} batch {batch} ({args.input} input): input path not overlapped with the towers' "
          f"compute: worst {worst:.3f} ms per step over {len(steps)} traced steps; step {last['step_wall_ms']:.2f} "
          f"ms, towers overlap {last['overlap']:.1%}")
    for k, s in enumerate(steps):
        kinds = ", ".join(f"{kind} {s['input_exposed_ms'][kind]:.3f}/{s['input_busy_ms'][kind]:.3f}"
                          for kind in ("stage", "upload", "augment"))
        print(f"  step {k}: wall {s['step_wall_ms']:.2f} ms, towers busy "
              + ", ".join(f"{v:.2f}" for v in s["busy_ms_per_tower"].values())
              + f" ms (union {s['union_busy_ms']:.2f}, overlap {s['overlap']:.1%}); input exposed "
              f"{s['input_exposed_total_ms']:.3f} ms (exposed/busy ms: {kinds})")
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
