"""Classify images with a checkpoint: python -m alexnet_cuda.predict CKPT IMAGE... [--top 5]

Each image is preprocessed like the training data (shorter side rescaled to the stored size, central
square, mean image subtracted) and its central crop x crop patch is classified (--ten-crop: the paper's
ten views, softmax averaged). Prints the top classes with their probabilities per image. An unreadable
image, or a path that is not a regular file (a FIFO or device is refused, never read from), is reported on
stderr and the others are still classified; the exit status is then 1. The checkpoint is fully checked
first (alexnet_cuda.checkpoint): its class list must name exactly as many classes as the net has outputs."""
import os
import sys

import numpy as np

from .cli import OneLineParser, positive_int, run_main


def main(argv=None):
    return run_main("alexnet_cuda.predict", _main, argv)


def _main(argv):
    from .data import Augmenter, average_ten_crops
    from .evaluate import net_from_checkpoint
    from .prepare import load_image

    p = OneLineParser(prog="python -m alexnet_cuda.predict", description="Top classes of images under a checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--ten-crop", action="store_true", help="average the ten views (corners, center, mirrored)")
    p.add_argument("--devices", help="cpu, cuda:N, or one per tower (default: a GPU per tower, else cuda:0 for both, else cpu,cpu)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    a = p.parse_args(argv)
    if not os.path.exists(a.checkpoint):
        raise ValueError(f"checkpoint {a.checkpoint} does not exist")
    net, meta, extra = net_from_checkpoint(
        a.checkpoint, a.devices, warn=lambda m: print(f"alexnet_cuda.predict: {m}", file=sys.stderr))
    classes = list(meta["classes"])
    if len(classes) != net.config["num_classes"]:  # checked on load; never print misaligned names
        raise ValueError(f"{meta['path']}: names {len(classes)} classes for {net.config['num_classes']} outputs")
    size, crop = int(meta["data"]["size"]), int(meta["crop"])
    if "mean" not in extra:
        raise ValueError(f"{a.checkpoint} holds no mean image")
    augment = Augmenter(extra["mean"], crop)
    top = min(a.top, len(classes))
    failed = 0
    for start in range(0, len(a.images), a.batch_size):
        paths, imgs = [], []
        for path in a.images[start:start + a.batch_size]:
            try:
                imgs.append(load_image(path, size))
                paths.append(path)
            except Exception as e:  # noqa: BLE001 - one bad file is reported, the rest go on
                failed += 1
                print(f"alexnet_cuda.predict: error: cannot read {path}: {' '.join(str(e).split()) or type(e).__name__}",
                      file=sys.stderr)
        if not imgs:
            continue
        batch = np.stack(imgs)
        if a.ten_crop:
            probs = average_ten_crops([net.forward(v, probs=True) for v in augment.ten_crops(batch)])
        else:
            probs = np.asarray(net.forward(augment.center(batch), probs=True), np.float64)
        for path, pr in zip(paths, probs):
            print(f"{path}:")
            for c in np.argsort(-pr, kind="stable")[:top]:
                print(f"  {100 * pr[c]:6.2f}%  {classes[c]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
