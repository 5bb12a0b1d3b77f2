"""Classify images with a checkpoint: python -m alexnet_cuda.predict CKPT IMAGE|FOLDER... [--top 5] [--json OUT]

Each image is preprocessed like the training data (shorter side rescaled to the stored size, central
square, mean image subtracted) and its central crop x crop patch is classified (--ten-crop: the paper's
ten views, softmax averaged). Prints the top classes with their probabilities per image. An unreadable
image, or a path that is not a regular file (a FIFO or device is refused, never read from), is reported on
stderr and the others are still classified; the exit status is then 1. The checkpoint is fully checked
first (alexnet_cuda.checkpoint): its class list must name exactly as many classes as the net has outputs.

A folder stands for every image file under it (by suffix: .jpg, .jpeg, .png, ...; sorted, hidden entries
skipped). --json OUT also writes the results as JSON: {"checkpoint": path, "results": [{"path": file,
"top": [{"class": name, "index": i, "prob": p}, ...]}, ...], "errors": [{"path": file, "error": text}]}."""
import json
import os
import sys

import numpy as np

from .cli import OneLineParser, add_devices_argument, positive_int, run_main


def main(argv=None):
    return run_main("alexnet_cuda.predict", _main, argv)


def _main(argv):
    from .checkpoint import atomic_write
    from .data import Augmenter, average_ten_crops
    from .evaluate import net_from_checkpoint
    from .features import image_batches, image_files

    p = OneLineParser(prog="python -m alexnet_cuda.predict", description="Top classes of images under a checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("images", metavar="IMAGE|FOLDER", nargs="+", help="image files, or folders of them")
    p.add_argument("--json", metavar="OUT", help="also write the results to OUT as JSON")
    p.add_argument("--top", type=positive_int, default=5, help="classes shown per image (default 5)")
    p.add_argument("--ten-crop", action="store_true", help="average the ten views (corners, center, mirrored)")
    add_devices_argument(p)
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
    results, errors = [], []
    for paths, batch in image_batches(image_files(a.images), size, a.batch_size, "alexnet_cuda.predict", errors):
        if a.ten_crop:
            probs = average_ten_crops([net.forward(v, probs=True) for v in augment.ten_crops(batch)])
        else:
            probs = np.asarray(net.forward(augment.center(batch), probs=True), np.float64)
        for path, pr in zip(paths, probs):
            print(f"{path}:")
            best = np.argsort(-pr, kind="stable")[:top]
            for c in best:
                print(f"  {100 * pr[c]:6.2f}%  {classes[c]}")
            results.append({"path": path, "top": [{"class": classes[c], "index": int(c), "prob": float(pr[c])}
                                                  for c in best]})
    if a.json:
        doc = {"checkpoint": meta["path"], "ten_crop": bool(a.ten_crop), "results": results, "errors": errors}
        atomic_write(a.json, lambda f: f.write((json.dumps(doc, indent=1) + "\n").encode("utf-8")))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
