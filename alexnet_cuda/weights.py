"""Weights in and out: weights-only files, a PyTorch-style state_dict in safetensors, and fine-tuning sources.

    python -m alexnet_cuda.weights export CKPT OUT.safetensors   # PyTorch-style keys (features.0.weight, ...)
    python -m alexnet_cuda.weights export CKPT OUT.npz           # weights only: parameters, no momentum
    python -m alexnet_cuda.weights show FILE                     # what a weights file holds, checked

CKPT may be a checkpoint, a run folder (its newest good checkpoint), a weights-only .npz or a .safetensors.

Weights-only .npz: the parameters under the checkpoint's member names ('net/conv1.t0.weight', ...) and a JSON
'__meta__' (format 'alexnet_cuda-weights', the network config, the class names when known); no momentum, step or
seed. `Net.load_weights` loads the parameters and zeroes the momentum.

The PyTorch form is the same network on one device, written with grouped convolutions: each layer's tower
halves are concatenated along the output dimension (`merge_towers`, which benchmarks/bench_train_step.py uses
for its PyTorch model too), and the layers are named as in this nn.Sequential (LRN and pooling have no
parameters, so only the conv and linear indices matter):

    features:   0 conv1   1 ReLU  2 LRN  3 MaxPool  4 conv2 (groups=T)  5 ReLU  6 LRN  7 MaxPool
                8 conv3   9 ReLU  10 conv4 (groups=T)  11 ReLU  12 conv5 (groups=T)  13 ReLU  14 MaxPool
    classifier: 0 fc6  1 ReLU  2 Dropout  3 fc7  4 ReLU  5 Dropout  6 fc8

A layer that reads both towers (conv3, fc6..fc8: 'cross' in Net.layers()) is an ordinary layer; the others are
grouped convolutions with groups = towers. LRN normalises each group's channels separately (reshape to
(N*T, C/T, H, W) around torch's LocalResponseNorm, whose alpha is ours times the size). Layers removed by
drop_layers have no entries.

Every file is read as hostile input. Safetensors: the 8-byte little-endian header length is bounded
(MAX_HEADER_BYTES) and within the file, the header is a JSON object without duplicate keys, every tensor has
exactly dtype 'F32' (nothing else is accepted), a shape of at most 8 non-negative integers and data offsets
that lie in the data area, match the shape's size, do not overlap and leave no gap or trailing byte; values
must be finite. Any problem is a ValueError of one line naming the file and the tensor."""
import json
import math
import os
import struct
import sys

import numpy as np

from .checkpoint import (MAX_CHECKPOINT_BYTES, CheckpointError, _as_float32, _read_zip, atomic_write,
                         load_checkpoint, open_regular_file)

WEIGHTS_FORMAT = "alexnet_cuda-weights"
WEIGHTS_VERSION = 1
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# Our layer -> the PyTorch-style module holding its merged weight and bias (see the module docstring).
TORCH_NAMES = {"conv1": "features.0", "conv2": "features.4", "conv3": "features.8", "conv4": "features.10",
               "conv5": "features.12", "fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
MAX_HEADER_BYTES = 16 * 2 ** 20  # a header of the paper's net is under 2 KB
SAFETENSORS_META = "alexnet_cuda"  # __metadata__ key holding our config and classes as JSON


# ---- towers <-> one device ----------------------------------------------------------------------------

def _present(cfg, sd):
    return [name for name in LAYERS if f"{name}.t0.weight" in sd]


def merge_towers(cfg, sd):
    """Our tower parameters concatenated along the output dimension: {'conv1.weight': ..., 'fc8.bias': ...},
    the merged single-device layers (grouped where a layer reads its own tower only)."""
    T = cfg["towers"]
    out = {}
    for name in _present(cfg, sd):
        for kind in ("weight", "bias"):
            out[f"{name}.{kind}"] = np.concatenate([np.asarray(sd[f"{name}.t{t}.{kind}"]) for t in range(T)], 0)
    return out


def split_towers(cfg, merged, what="weights"):
    """The inverse of merge_towers: each merged layer cut into `towers` equal parts along its outputs."""
    T = cfg["towers"]
    out = {}
    for key, a in merged.items():
        if a.ndim == 0 or a.shape[0] % T:
            raise ValueError(f"{what}: '{key}' has shape {a.shape}; its first dimension must divide into {T} towers")
        name, kind = key.rsplit(".", 1)
        per = a.shape[0] // T
        for t in range(T):
            out[f"{name}.t{t}.{kind}"] = np.ascontiguousarray(a[t * per:(t + 1) * per])
    return out


def to_torch_state_dict(cfg, sd):
    """Our state (tower keys) -> a PyTorch-style state_dict of NumPy float32 arrays ('features.0.weight', ...)."""
    merged = merge_towers(cfg, sd)
    return {f"{TORCH_NAMES[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}": np.ascontiguousarray(v, np.float32)
            for k, v in merged.items()}


def from_torch_state_dict(cfg, tensors, what="weights"):
    """A PyTorch-style state_dict (names as TORCH_NAMES) -> our tower parameter keys. Unknown names are refused."""
    back = {v: k for k, v in TORCH_NAMES.items()}
    merged = {}
    for key, a in tensors.items():
        mod, _, kind = key.rpartition(".")
        if mod not in back or kind not in ("weight", "bias"):
            raise ValueError(f"{what}: unexpected tensor '{key}' (expected {', '.join(TORCH_NAMES.values())} "
                             ".weight/.bias)"[:300])
        merged[f"{back[mod]}.{kind}"] = a
    return split_towers(cfg, merged, what)


# ---- safetensors ----------------------------------------------------------------------------------------

def write_safetensors(path, tensors, metadata=None):
    """tensors: {name: float32 array}; metadata: {str: str}. Atomic write, little-endian float32 data."""
    header, blobs, pos = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [pos, pos + a.nbytes]}
        blobs.append(a)
        pos += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the reference implementation writes

    def write(f):
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for a in blobs:
            f.write(a.tobytes())

    atomic_write(path, write)
    return path


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}"[:120])
        d[k] = v
    return d


def read_safetensors(path):
    """-> ({name: float32 array}, metadata {str: str}), every byte checked (see the module docstring)."""
    try:
        f = open_regular_file(path, "safetensors file")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(f"{path} has {size} bytes, more than the {MAX_CHECKPOINT_BYTES} a weights file may")
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header length {n} is over the limit of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} runs past the end of the file ({size} bytes)")
        text = f.read(n)
        try:
            header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON "
                                  f"({' '.join(str(e).split())[:120]})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: safetensors header must be a JSON object")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CheckpointError(f"{path}: safetensors '__metadata__' must map strings to strings")
        data_len = size - 8 - n
        spans = []
        for name, e in header.items():
            where = f"{path}: tensor '{name[:80]}'"
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                raise CheckpointError(f"{where} must have exactly dtype, shape and data_offsets")
            if e["dtype"] != "F32":
                raise CheckpointError(f"{where} has dtype {str(e['dtype'])[:20]!r}; only F32 (float32) is read")
            shape = e["shape"]
            if not isinstance(shape, list) or len(shape) > 8 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 40 for d in shape):
                raise CheckpointError(f"{where} has an invalid shape {str(shape)[:60]}")
            off = e["data_offsets"]
            if not (isinstance(off, list) and len(off) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) for x in off)):
                raise CheckpointError(f"{where} has invalid data_offsets {str(off)[:60]}")
            begin, end = off
            if not 0 <= begin <= end <= data_len:
                raise CheckpointError(f"{where} has data_offsets [{begin}, {end}] outside the data area of "
                                      f"{data_len} bytes")
            if end - begin != 4 * math.prod(shape):
                raise CheckpointError(f"{where} of shape {tuple(shape)} needs {4 * math.prod(shape)} bytes but its "
                                      f"data_offsets span {end - begin}")
            spans.append((begin, end, name))
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin < pos:
                raise CheckpointError(f"{path}: tensor '{name[:80]}' overlaps another tensor's data")
            if begin > pos:
                raise CheckpointError(f"{path}: {begin - pos} byte(s) before tensor '{name[:80]}' belong to no tensor")
            pos = end
        if pos != data_len:
            raise CheckpointError(f"{path}: {data_len - pos} byte(s) after the last tensor belong to no tensor")
        blob = f.read(data_len)
        if len(blob) != data_len:
            raise CheckpointError(f"{path} is truncated")
    out = {}
    for begin, end, name in spans:
        a = np.frombuffer(blob, dtype="<f4", count=(end - begin) // 4, offset=begin)
        a = a.reshape(header[name]["shape"])
        out[name] = _as_float32(path, name, a)
    return out, meta


# ---- weights-only .npz --------------------------------------------------------------------------------------

def save_weights(path, weights, config, classes=None):
    """A weights-only .npz: parameters (no momentum) plus the config and, when known, the class names."""
    from .checkpoint import _jsonable

    payload = {"net/" + k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()
               if not k.startswith(("momentum/", "meta/"))}
    doc = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "config": _jsonable(config)}
    if classes is not None:
        doc["classes"] = list(classes)
    payload["__meta__"] = np.frombuffer(json.dumps(doc).encode("utf-8"), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **payload))
    return path


def _checked_config(path, cfg):
    from .config import alexnet_config

    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: metadata 'config' must be an object")
    try:
        return alexnet_config(**cfg)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: metadata 'config': {e}") from None


def _checked_classes(path, classes, cfg):
    if classes is None:
        return None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise CheckpointError(f"{path}: metadata 'classes' must be a list of distinct names")
    if cfg is not None and len(classes) != cfg["num_classes"]:
        raise CheckpointError(f"{path}: metadata 'classes' names {len(classes)} classes for {cfg['num_classes']} outputs")
    return classes


def _check_shapes(path, cfg, weights):
    """The parameters must be exactly those the config implies, with its shapes (no C++ net is built)."""
    from .net import Net

    try:
        shapes = Net(cfg, devices="cpu").parameter_shapes()  # the C++ layer table is the one source of shapes
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its network config cannot be built ({e})") from None
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise CheckpointError(f"{path}: unexpected parameter '{extra[0][:80]}' for its network config")
    missing = [k for k in shapes if k not in weights]
    if missing:
        raise CheckpointError(f"{path}: missing parameter '{missing[0]}'")
    for k, s in shapes.items():
        if weights[k].shape != s:
            raise CheckpointError(f"{path}: parameter '{k}' has shape {weights[k].shape}, its config implies {s}")


def load_weights_file(path, warn=None):
    """Any weights source -> (weights {our parameter key: float32 array}, config or None, classes or None).

    A checkpoint (or run folder), a weights-only .npz, or a .safetensors file (PyTorch-style keys; its config
    and classes are known when alexnet_cuda wrote it, else None and the caller supplies the config). Everything
    is checked; the shapes against the config whenever the config is known."""
    if os.path.isdir(path) or not str(path).endswith(".safetensors"):
        if os.path.isdir(path):
            meta, state, _ = load_checkpoint(path, warn=warn)
            return {k: v for k, v in state.items() if not k.startswith(("momentum/", "meta/"))}, \
                meta["config"], meta["classes"]
        arrays = _read_zip(path)
        raw = arrays.pop("__meta__")
        try:
            doc = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: metadata is not valid JSON ({' '.join(str(e).split())[:120]})") from None
        if isinstance(doc, dict) and doc.get("format") != WEIGHTS_FORMAT:
            meta, state, _ = load_checkpoint(path)  # a full checkpoint: checked by its own rules
            return {k: v for k, v in state.items() if not k.startswith(("momentum/", "meta/"))}, \
                meta["config"], meta["classes"]
        if not isinstance(doc, dict) or doc.get("version") != WEIGHTS_VERSION:
            raise CheckpointError(f"{path}: weights file version {doc.get('version') if isinstance(doc, dict) else None!r}"
                                  f", this code reads {WEIGHTS_VERSION}")
        unknown = set(doc) - {"format", "version", "config", "classes"}
        if unknown:
            raise CheckpointError(f"{path}: metadata has unknown key(s) {sorted(unknown)[:5]}")
        cfg = _checked_config(path, doc.get("config"))
        classes = _checked_classes(path, doc.get("classes"), cfg)
        weights = {}
        for key, a in arrays.items():
            name = key[4:]
            if name.startswith(("momentum/", "meta/")):
                raise CheckpointError(f"{path}: a weights-only file holds no '{name}'")
            if a.ndim not in (1, 2, 4):
                raise CheckpointError(f"{path}: array '{key}' has {a.ndim} dimension(s); parameters have 1, 2 or 4")
            weights[name] = _as_float32(path, key, a)
        _check_shapes(path, cfg, weights)
        return weights, cfg, classes
    tensors, meta = read_safetensors(path)
    cfg = classes = None
    if SAFETENSORS_META in meta:
        try:
            doc = json.loads(meta[SAFETENSORS_META])
        except (ValueError, RecursionError):
            raise CheckpointError(f"{path}: metadata '{SAFETENSORS_META}' is not valid JSON") from None
        if not isinstance(doc, dict) or set(doc) - {"config", "classes"}:
            raise CheckpointError(f"{path}: metadata '{SAFETENSORS_META}' must be an object with config and classes")
        cfg = _checked_config(path, doc.get("config"))
        classes = _checked_classes(path, doc.get("classes"), cfg)
    return tensors, cfg, classes


def resolve_torch(path, tensors, cfg):
    """A safetensors file's PyTorch-style tensors -> our keys for `cfg`, shapes checked."""
    try:
        weights = from_torch_state_dict(cfg, tensors, what=str(path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    _check_shapes(path, cfg, weights)
    return weights


def load_weights_for(path, cfg=None, warn=None):
    """(weights in our keys, config, classes) from any source; `cfg` is needed for a foreign safetensors."""
    weights, file_cfg, classes = load_weights_file(path, warn)
    use = file_cfg or cfg
    if use is None:
        raise ValueError(f"{path} carries no network config; give one (e.g. --net/--set)")
    if str(path).endswith(".safetensors") and not os.path.isdir(path):
        weights = resolve_torch(path, weights, use)
    return weights, use, classes


def load_finetune_source(path, fallback_cfg, warn=None):
    """(weights in our keys, the source's config or None, its classes or None) for train --finetune. A
    safetensors file without our metadata is read with `fallback_cfg` (the run's --net/--set) and the class
    count of its fc8 ('classifier.6.weight')."""
    weights, cfg, classes = load_weights_file(path, warn)
    if str(path).endswith(".safetensors") and not os.path.isdir(path):
        use = cfg
        if use is None:
            from .config import alexnet_config

            fc8 = weights.get(f"{TORCH_NAMES['fc8']}.weight")
            n = int(fc8.shape[0]) if fc8 is not None and fc8.ndim == 2 else fallback_cfg["num_classes"]
            try:
                use = alexnet_config(**{**fallback_cfg, "num_classes": n})
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
        weights = resolve_torch(path, weights, use)
    return weights, cfg, classes


def export_weights(src, out, warn=None):
    """Write the parameters of `src` (checkpoint, run folder, weights file) to `out`: .safetensors
    (PyTorch-style keys, config and classes in the metadata) or .npz (weights only)."""
    weights, cfg, classes = load_weights_for(src, warn=warn)
    if str(out).endswith(".safetensors"):
        doc = {"config": json.loads(json.dumps(cfg))}
        if classes is not None:
            doc["classes"] = classes
        write_safetensors(out, to_torch_state_dict(cfg, weights), {SAFETENSORS_META: json.dumps(doc),
                                                                    "format": "pt"})
    elif str(out).endswith(".npz"):
        save_weights(out, weights, cfg, classes)
    else:
        raise ValueError(f"export: {out} must end in .safetensors or .npz")
    return cfg, classes


def main(argv=None):
    from .cli import run_main

    return run_main("alexnet_cuda.weights", _main, argv)


def _main(argv):
    from .cli import OneLineParser

    p = OneLineParser(prog="python -m alexnet_cuda.weights", description="Export or inspect weights (see the "
                      "module docstring for the PyTorch-style layout).")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write SRC's parameters to OUT (.safetensors or weights-only .npz)")
    e.add_argument("src", metavar="SRC", help="checkpoint, run folder, weights .npz or .safetensors")
    e.add_argument("out", metavar="OUT", help="OUT.safetensors (PyTorch-style keys) or OUT.npz (weights only)")
    s = sub.add_parser("show", help="check a weights source and list its tensors")
    s.add_argument("src", metavar="SRC")
    a = p.parse_args(argv)
    warn = lambda m: print(f"alexnet_cuda.weights: {m}", file=sys.stderr)  # noqa: E731
    if a.cmd == "export":
        cfg, classes = export_weights(a.src, a.out, warn)
        print(f"wrote {a.out} ({cfg['num_classes']} classes, {cfg['towers']} tower(s))")
        return 0
    weights, cfg, classes = load_weights_file(a.src, warn)
    for k in sorted(weights):
        print(f"{k}\t{'x'.join(map(str, weights[k].shape))}")
    print(f"{len(weights)} tensors, {sum(w.size for w in weights.values())} parameters; config "
          f"{'known' if cfg else 'not in the file'}; classes {'known' if classes else 'not in the file'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
