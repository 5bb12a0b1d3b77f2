"""Data-parallel scaling on paper: bytes all-reduced per step and the predicted step time against the rank count.

    python benchmarks/scaling.py                  # the tables of docs/SCALING.md (markdown on stdout)
    python benchmarks/scaling.py --step-ms 16.2 --nvlink 450 --ib 50

Inputs: the paper's AlexNet layer table (benchmarks/model.py tower_layers, the same as csrc/net.cpp), the
compute time of one batch-128 step on one GPU (benchmarks/model.py's prediction, --step-ms), split between
forward and each layer's backward in proportion to its FLOPs, and the links: NVLink/NVSwitch inside a node
(--nvlink GB/s per direction per GPU, H100/H200: 450) and InfiniBand between nodes (--ib GB/s per GPU, one NDR
400 Gb/s NIC per GPU: 50), with a per-message latency (--lat-nvlink, --lat-ib, microseconds).

A ring all-reduce of S bytes over p GPUs sends and receives 2(p-1)/p * S per GPU in 2(p-1) steps, so it takes
2(p-1)/p * S / B + 2(p-1) * latency on the slowest link B of the ring (the NIC once the ring leaves a node).
"Overlapped" replays the backward pass layer by layer (fc8 first) and starts each layer's all-reduce when its
gradients exist and the link is free (as alexnet_cuda.distributed issues them: MPI buckets, NCCL calls); the
step ends when the last all-reduce (conv1's) ends. Nothing here is measured.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import tower_layers  # noqa: E402

from alexnet_cuda.config import alexnet_config  # noqa: E402

GPUS_PER_NODE = 8


def layer_table(cfg, batch):
    """Per layer (both towers): parameters, forward and backward FLOPs at `batch` images."""
    T = cfg["towers"]
    rows = []
    for L in tower_layers(cfg):
        if L["conv"]:
            w = L["out_c"] * L["in_c"] * L["k"] ** 2
            fwd = 2 * batch * L["out_c"] * L["out_hw"] ** 2 * L["in_c"] * L["k"] ** 2
        else:
            w = L["out_c"] * L["in_c"]
            fwd = 2 * batch * L["out_c"] * L["in_c"]
        # Backward: grad-weight and grad-input (none for conv1: the image needs no gradient).
        bwd = fwd * (1 if L["name"] == "conv1" else 2)
        rows.append(dict(name=L["name"], params=T * (w + L["out_c"]), fwd=T * fwd, bwd=T * bwd, conv=L["conv"],
                         out=T * L["out_c"] * (L["pooled_hw"] ** 2 if L["conv"] else 1)))
    return rows


def ring(nbytes, p, bw_gbs, lat_us):
    """Seconds for a ring all-reduce of nbytes over p GPUs on links of bw_gbs GB/s."""
    if p <= 1:
        return 0.0
    return 2 * (p - 1) / p * nbytes / (bw_gbs * 1e9) + 2 * (p - 1) * lat_us * 1e-6


def link(p, a):
    """(bandwidth GB/s, latency us) of the slowest hop of a p-GPU ring."""
    return (a.nvlink, a.lat_nvlink) if p <= GPUS_PER_NODE else (a.ib, a.lat_ib)


def step_times(rows, step_ms, per_gpu_batch, p, a, allreduced=None):
    """(no overlap, overlapped) step seconds for plain data parallelism with per_gpu_batch images per GPU."""
    flops = sum(r["fwd"] + r["bwd"] for r in rows)
    scale = step_ms * 1e-3 * per_gpu_batch / 128  # compute time proportional to the batch (optimistic below 128)
    fwd = scale * sum(r["fwd"] for r in rows) / flops
    bw, lat = link(p, a)
    sizes = [4 * r["params"] for r in rows] if allreduced is None else allreduced
    comm_total = sum(ring(s, p, bw, lat) for s in sizes)
    t, link_free = fwd, 0.0
    for r, s in zip(reversed(rows), reversed(sizes)):
        t += scale * r["bwd"] / flops
        link_free = max(link_free, t) + ring(s, p, bw, lat)
    return scale + comm_total, max(t, link_free)


def hybrid_bytes(rows, b, k, cfg):
    """Bytes one GPU receives per step in Krizhevsky's hybrid over a group of k GPUs (b images each):
    conv layers data-parallel, fc6-fc8 split k ways, every GPU's conv5 output gathered by all and the fc
    outputs gathered between the fc layers; the same again backward (the gradients of those activations)."""
    conv5 = [r for r in rows if r["conv"]][-1]["out"]
    fc = [r for r in rows if not r["conv"]]
    B = b * k
    act = (k - 1) * b * conv5 * 4  # all-gather of the conv5 outputs (forward)
    for r in fc:
        act += (k - 1) / k * B * r["out"] * 4  # all-gather of each fc layer's output (fc8: for the softmax)
    return 2 * act


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step-ms", type=float, default=16.2, help="one GPU's batch-128 step (benchmarks/model.py)")
    ap.add_argument("--nvlink", type=float, default=450.0, help="GB/s per direction per GPU inside a node")
    ap.add_argument("--ib", type=float, default=50.0, help="GB/s per GPU between nodes (NDR 400 Gb/s)")
    ap.add_argument("--lat-nvlink", type=float, default=3.0, help="us per ring step inside a node")
    ap.add_argument("--lat-ib", type=float, default=6.0, help="us per ring step between nodes")
    ap.add_argument("--global-batch", type=int, default=1024, help="the strong-scaling table's global batch")
    a = ap.parse_args(argv)
    cfg = alexnet_config()
    rows = layer_table(cfg, 128)
    P = sum(r["params"] for r in rows)
    fcP = sum(r["params"] for r in rows if not r["conv"])
    S = 4 * P
    out = [f"Parameters: {P:,} ({S / 1e6:.1f} MB of float32 gradients per step); fc6-fc8 hold {fcP:,} "
           f"({100 * fcP / P:.1f}%), conv1-conv5 {P - fcP:,} ({4 * (P - fcP) / 1e6:.1f} MB).",
           f"One GPU, batch 128: {a.step_ms:g} ms per step (compute only), {128 / a.step_ms * 1e3:,.0f} images/s.",
           "", "**Weak scaling** (batch 128 per GPU, global batch 128 x p; 8 GPUs per node on NVLink/NVSwitch "
           f"at {a.nvlink:g} GB/s, InfiniBand at {a.ib:g} GB/s per GPU between nodes):", "",
           "| GPUs | slowest link | sent per GPU (MB) | all-reduce (ms) | step, no overlap (ms) "
           "| step, overlapped (ms) | efficiency | images/s |", "|---|---|---|---|---|---|---|---|"]
    for p in (1, 2, 4, 8, 16, 32, 64):
        bw, lat = link(p, a)
        plain, over = step_times(rows, a.step_ms, 128, p, a)
        comm = ring(S, p, bw, lat)
        name = "-" if p == 1 else ("NVLink" if p <= GPUS_PER_NODE else "InfiniBand")
        out.append(f"| {p} | {name} | {2 * (p - 1) / p * S / 1e6:.0f} | {comm * 1e3:.2f} | {plain * 1e3:.1f} | "
                   f"{over * 1e3:.1f} | {a.step_ms * 1e-3 / over:.0%} | {128 * p / over:,.0f} |")
    out += ["", f"**Strong scaling** (global batch {a.global_batch} split over p GPUs; compute taken as proportional "
            "to the per-GPU batch, which flatters small batches):", "",
            "| GPUs | batch per GPU | compute (ms) | all-reduce (ms) | step, overlapped (ms) | speed-up over 8 GPUs |",
            "|---|---|---|---|---|---|"]
    base = None
    for p in (8, 16, 32, 64, 128):
        b = a.global_batch / p
        bw, lat = link(p, a)
        _, over = step_times(rows, a.step_ms, b, p, a)
        base = base or over
        out.append(f"| {p} | {b:g} | {a.step_ms * b / 128:.1f} | {ring(S, p, bw, lat) * 1e3:.2f} | {over * 1e3:.1f} | "
                   f"{base / over:.2f}x |")
    out += ["", "**Hybrid** (Krizhevsky 2014): conv1-conv5 data-parallel, fc6-fc8 split across a group of k GPUs "
            "(batch 128 per GPU). Bytes per GPU per step:", "",
            "| scheme | GPUs | gradients sent (MB) | activations received (MB) | between nodes (MB) | comm (ms) |",
            "|---|---|---|---|---|---|"]
    conv_bytes = 4 * (P - fcP)
    for p in (8, 64):
        nodes = max(1, p // GPUS_PER_NODE)
        # Plain data parallelism.
        bw, lat = link(p, a)
        t_plain = ring(S, p, bw, lat)
        inter = 2 * (p - 1) / p * S if p > GPUS_PER_NODE else 0.0
        out.append(f"| data-parallel | {p} | {2 * (p - 1) / p * S / 1e6:.0f} | 0 | {inter / 1e6:.0f} | "
                   f"{t_plain * 1e3:.2f} |")
        # Hybrid: model-parallel fc inside a node (k = 8, NVLink), data-parallel across nodes: the conv gradients
        # all-reduced over every GPU, each fc shard's gradients over the nodes holding the same shard.
        k = min(p, GPUS_PER_NODE)
        acts = hybrid_bytes(rows, 128, k, cfg)
        grads_intra = 2 * (k - 1) / k * conv_bytes
        t = acts / (a.nvlink * 1e9) + ring(conv_bytes, k, a.nvlink, a.lat_nvlink)
        inter = 0.0
        if nodes > 1:
            inter = 2 * (nodes - 1) / nodes * (conv_bytes / k + 4 * fcP / k)  # reduce-scattered conv grads + the shard
            t += ring(conv_bytes / k + 4 * fcP / k, nodes, a.ib, a.lat_ib)
        out.append(f"| hybrid (fc split over {k}) | {p} | {(grads_intra + inter) / 1e6:.0f} | {acts / 1e6:.0f} | "
                   f"{inter / 1e6:.0f} | {t * 1e3:.2f} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
