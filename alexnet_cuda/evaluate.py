"""Evaluate a checkpoint: python -m alexnet_cuda.evaluate CKPT [--data DST] [--split val]

Prints top-1 and top-5 error with the center crop and with the paper's ten crops (four corners, center
and their mirrors; softmax outputs averaged). CKPT may be a checkpoint file or a run folder (its newest
checkpoint that loads; damaged newer ones are skipped with a note on stderr). The checkpoint is fully
checked before use (see alexnet_cuda.checkpoint): a damaged or crafted file is one line on stderr and exit
status 1. The data folder defaults to the one the checkpoint was trained on; the mean image and crop size
come from the checkpoint."""
import os
import sys

import numpy as np

from .checkpoint import CheckpointError, load_checkpoint
from .cli import OneLineParser, default_devices, nonneg_int, parse_devices, positive_int, run_main
from .progress import progress_bar


def net_class():
    import alexnet_cuda as ax

    net = getattr(ax, "Net", None)
    if net is None:
        raise ValueError("this build of alexnet_cuda has no Net (rebuild the extension from a tree that has csrc/net)")
    return net


def net_config(meta_config):
    """The checkpoint's (JSON) network config as a full config dict (tuples restored, keys checked)."""
    from .config import alexnet_config

    return alexnet_config(**meta_config)


def build_net(cfg, devices, seed):
    return net_class()(cfg, devices=devices, seed=int(seed))


def net_from_checkpoint(path, devices=None, warn=None):
    """(net with the checkpoint's parameters, meta, extra arrays). devices: a --devices string or None
    (None: the best this machine has). warn: told about damaged checkpoints skipped in a run folder.
    CheckpointError (naming the file) if the file, its metadata or its arrays do not pass the checks."""
    meta, state, extra = load_checkpoint(path, warn=warn)
    cfg = net_config(meta["config"])
    dev = parse_devices(devices, cfg["towers"]) if devices else default_devices(cfg["towers"])
    net = build_net(cfg, dev, meta["train"]["seed"])
    try:
        net.load_state_dict(state)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{meta['path']}: {e}") from None
    return net, meta, extra


def open_data(meta, data_arg=None, log=None):
    """The prepared data for a checkpoint: --data if given, else the folder it was trained on (the demo
    set is regenerated if its cache is gone). Its classes must match the checkpoint's."""
    from .data import PreparedData

    info = meta["data"]
    root = data_arg or info["root"]
    if not data_arg and info.get("demo") and not os.path.isdir(root):
        from .synthetic import ensure_demo_data

        root = ensure_demo_data(**info["demo"], log=log or (lambda m: print(m, file=sys.stderr)))
    data = PreparedData(root)
    if data.classes != list(meta["classes"]):
        raise ValueError(f"{root} has other classes than the checkpoint ({data.num_classes} vs {len(meta['classes'])})")
    if data.size != int(info["size"]):
        raise ValueError(f"{root} stores {data.size}x{data.size} images; the checkpoint was trained on "
                         f"{info['size']}x{info['size']}")
    return data


def evaluate_center(net, loader, bar=None, interrupted=None):
    """Center-crop loss and errors over an EvalLoader: dict(loss, top1_err, top5_err, n)."""
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    for x, y in loader:
        r = net.evaluate(x, y)
        k = int(r["n"])
        loss_sum += float(r["loss"]) * k
        top1 += int(r["top1"])
        top5 += int(r["top5"])
        n += k
        if bar is not None:
            bar.update(1)
        if interrupted is not None and interrupted():
            raise KeyboardInterrupt
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"loss": loss_sum / n, "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n, "n": n}


def evaluate_ten_crop(net, loader, bar=None):
    """Ten-crop errors over an EvalLoader in 'raw' mode (softmax averaged over the views)."""
    from .data import average_ten_crops, topk_hits

    top1 = top5 = n = 0
    for imgs, y in loader:
        probs = average_ten_crops([net.forward(view, probs=True) for view in loader.augment.ten_crops(imgs)])
        top1 += topk_hits(probs, y, 1)
        top5 += topk_hits(probs, y, 5)
        n += len(y)
        if bar is not None:
            bar.update(1)
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n, "n": n}


def _note(message):
    print(f"alexnet_cuda.evaluate: {message}", file=sys.stderr)


def main(argv=None):
    return run_main("alexnet_cuda.evaluate", _main, argv)


def _main(argv):
    from .data import EvalLoader

    p = OneLineParser(prog="python -m alexnet_cuda.evaluate",
                      description="Top-1/top-5 error of a checkpoint, center crop and ten crops.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("--data", help="prepared folder (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--devices", help="cpu, cuda:N, or one per tower (default: a GPU per tower, else cuda:0 for both, else cpu,cpu)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per forward pass (default 128)")
    p.add_argument("--limit", type=nonneg_int, default=None, help="evaluate only the first N images")
    p.add_argument("--no-ten-crop", action="store_true", help="center crop only")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not os.path.exists(a.checkpoint):
        raise ValueError(f"checkpoint {a.checkpoint} does not exist")
    net, meta, extra = net_from_checkpoint(a.checkpoint, a.devices, warn=_note)
    data = open_data(meta, a.data)
    crop = int(meta["crop"])
    if "mean" in extra:
        data.mean = np.ascontiguousarray(extra["mean"], np.float32)  # the exact mean the net was trained with
    limit = a.limit if a.limit else None
    state = meta.get("state", {})
    center_loader = EvalLoader(data, a.batch_size, crop, split=a.split, mode="center", limit=limit)
    print(f"checkpoint {meta['path']} (epoch {state.get('epoch', '?')}, step {meta.get('step', '?')}), "
          f"{a.split}: {center_loader.n} images, crop {crop} of {data.size}")
    bar = progress_bar(len(center_loader) * (1 if a.no_ten_crop else 2), desc="evaluate", unit="batch",
                       disable=a.no_progress)
    try:
        c = evaluate_center(net, center_loader, bar)
        t = None
        if not a.no_ten_crop:
            t = evaluate_ten_crop(net, EvalLoader(data, a.batch_size, crop, split=a.split, mode="raw", limit=limit), bar)
    finally:
        bar.close()
    print(f"center crop: top-1 error {100 * c['top1_err']:.2f}%, top-5 error {100 * c['top5_err']:.2f}% "
          f"(loss {c['loss']:.4f})")
    if t is not None:
        print(f"10 crops:    top-1 error {100 * t['top1_err']:.2f}%, top-5 error {100 * t['top5_err']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
