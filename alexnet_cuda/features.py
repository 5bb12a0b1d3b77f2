"""Activations of any named layer, and the paper's Figure 3 (conv1's filters), from a trained net.

    python -m alexnet_cuda.features CKPT IMAGE|FOLDER... --layer fc7 --out feats.npz
    python -m alexnet_cuda.features CKPT --filters conv1.png

`FeatureExtractor` asks the net itself (`Net.features`: the C++ forward pass on the net's devices, no
dropout, as at inference) for the output a layer passes on (after its ReLU, LRN and pooling), with the
towers' halves concatenated in tower order: conv1..conv5 give (N, C, H, W), fc6 and fc7 (N, width), fc8 the
logits (tests/test_features.py checks fc8 against Net.forward and every layer against the reference).

The images of the CLI are preprocessed as `predict` does (shorter side to the checkpoint's stored size,
central square, mean image subtracted, the central crop). The .npz holds 'features' (N, ...) float32 and
'paths' (the image files, in order); unreadable files are reported on stderr and left out (exit status 1).

--filters writes Figure 3: every conv1 filter as a small RGB tile (each scaled to the full 0..255 range on
its own, as the paper shows them), one block per tower (the paper's top half is GPU 1, the bottom GPU 2)."""
import io
import os
import sys

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")


class FeatureExtractor:
    """extractor(images float32 (N, C, S, S), layers=("fc7",)) -> {layer: float32 array}, from the net's
    current parameters on its own devices (Net.features: the C++ forward pass, no dropout)."""

    def __init__(self, net):
        self.net = net
        self.names = [L["name"] for L in net.layers()]

    def __call__(self, images, layers=("fc7",)):
        if isinstance(layers, str):
            layers = (layers,)
        unknown = [n for n in layers if n not in self.names]
        if unknown:
            raise ValueError(f"features: unknown layer {unknown[0]!r} (this net has {', '.join(self.names)})")
        x = np.asarray(images)
        S, C = self.net.config["input_size"], self.net.config["in_channels"]
        if x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (C, S, S) or x.shape[0] < 1:
            raise ValueError(f"features: argument 'images' must be float32 (N, {C}, {S}, {S}), got {x.dtype} {x.shape}")
        return {n: self.net.features(x, n) for n in layers}


def layer_activations(net, images, layers=("fc7",)):
    """One-off helper: FeatureExtractor(net)(images, layers)."""
    return FeatureExtractor(net)(images, layers)


def image_batches(files, size, batch_size, prog, errors):
    """Yields (paths, uint8 images (n, size, size, 3)) for each batch of `files` that could be read; a file that
    cannot is reported on stderr as one line and appended to `errors` as {path, error}, and the rest go on."""
    from .prepare import load_image

    for start in range(0, len(files), batch_size):
        paths, imgs = [], []
        for path in files[start:start + batch_size]:
            try:
                imgs.append(load_image(path, size))
                paths.append(path)
            except Exception as e:  # noqa: BLE001 - one bad file is reported, the rest go on
                msg = " ".join(str(e).split()) or type(e).__name__
                errors.append({"path": path, "error": msg})
                print(f"{prog}: error: cannot read {path}: {msg}", file=sys.stderr)
        if imgs:
            yield paths, np.stack(imgs)


def image_files(paths):
    """Files named on the command line, with folders expanded to the image files under them (sorted, hidden
    entries skipped, symlinked folders not entered)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [os.path.join(root, f) for f in files
                          if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
            if not found:
                raise ValueError(f"{p} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            out += sorted(found)
        else:
            out.append(p)
    return out


def filter_image(conv1_weights, towers, scale=4, per_row=16, gap=2):
    """Figure 3 as a uint8 (H, W, 3) array: the conv1 filters (out, in, k, k), each min-max scaled to 0..255
    by itself, `per_row` to a row, one block of rows per tower with a wider gap between the towers."""
    w = np.asarray(conv1_weights, np.float64)
    n, cin, k, _ = w.shape
    if cin != 3:  # not RGB: show the mean over the input channels as grey
        w = np.repeat(w.mean(axis=1, keepdims=True), 3, axis=1)
    per_tower = n // towers
    rows = -(-per_tower // per_row)
    cols = min(per_row, per_tower)
    tile = k * scale
    H = towers * rows * (tile + gap) + (towers - 1) * 3 * gap + gap
    W = cols * (tile + gap) + gap
    img = np.full((H, W, 3), 255, np.uint8)
    for t in range(towers):
        y0 = t * (rows * (tile + gap) + 3 * gap)
        for i in range(per_tower):
            f = w[t * per_tower + i].transpose(1, 2, 0)
            lo, hi = f.min(), f.max()
            f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
            f = np.kron(np.rint(255 * f), np.ones((scale, scale, 1))).astype(np.uint8)
            r, cl = divmod(i, per_row)
            y, x = y0 + gap + r * (tile + gap), gap + cl * (tile + gap)
            img[y:y + tile, x:x + tile] = f
    return img


def write_png(path, array):
    from PIL import Image

    from .checkpoint import atomic_write

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv=None):
    from .cli import run_main

    return run_main("alexnet_cuda.features", _main, argv)


def _main(argv):
    from .checkpoint import atomic_write
    from .cli import OneLineParser, add_devices_argument, positive_int
    from .data import Augmenter
    from .evaluate import net_from_checkpoint

    p = OneLineParser(prog="python -m alexnet_cuda.features",
                      description="A layer's activations for image files, or conv1's filters as a PNG (Figure 3).")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file, or a run folder (its newest checkpoint)")
    p.add_argument("images", metavar="IMAGE|FOLDER", nargs="*", help="image files, or folders of them")
    p.add_argument("--layer", default="fc7", help="conv1..conv5, fc6, fc7 or fc8 (default fc7)")
    p.add_argument("--out", help="the .npz to write ('features', 'paths'); needed with images")
    p.add_argument("--filters", metavar="PNG", help="write conv1's filters, one block per tower (Figure 3)")
    p.add_argument("--scale", type=positive_int, default=4, help="pixels per filter weight in --filters (default 4)")
    add_devices_argument(p)
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    a = p.parse_args(argv)
    if not a.images and not a.filters:
        raise ValueError("give image files or folders (with --out), or --filters PNG")
    if a.images and not a.out:
        raise ValueError("--out FILE.npz is needed to write the features")
    if not os.path.exists(a.checkpoint):
        raise ValueError(f"checkpoint {a.checkpoint} does not exist")
    net, meta, extra = net_from_checkpoint(
        a.checkpoint, a.devices, warn=lambda m: print(f"alexnet_cuda.features: {m}", file=sys.stderr))
    if a.filters:
        w = net.weights()
        conv1 = np.concatenate([w[f"conv1.t{t}.weight"] for t in range(net.config["towers"])], 0)
        write_png(a.filters, filter_image(conv1, net.config["towers"], scale=a.scale))
        print(f"wrote {a.filters}: {conv1.shape[0]} conv1 filters of {conv1.shape[2]}x{conv1.shape[3]}, "
              f"{net.config['towers']} tower(s)")
    if not a.images:
        return 0
    ext = FeatureExtractor(net)
    if a.layer not in ext.names:
        raise ValueError(f"--layer {a.layer!r}: this net has {', '.join(ext.names)}")
    size, crop = int(meta["data"]["size"]), int(meta["crop"])
    augment = Augmenter(extra["mean"], crop)
    feats, paths, errors = [], [], []
    for ok, batch in image_batches(image_files(a.images), size, a.batch_size, "alexnet_cuda.features", errors):
        feats.append(ext(augment.center(batch), (a.layer,))[a.layer])
        paths += ok
    if not feats:
        raise ValueError("no image could be read")
    out = np.concatenate(feats, 0)
    atomic_write(a.out, lambda f: np.savez(f, features=out, paths=np.array(paths)))
    print(f"wrote {a.out}: {a.layer} of {len(paths)} image(s), shape {out.shape}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
