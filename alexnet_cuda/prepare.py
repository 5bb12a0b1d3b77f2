"""Prepare an image tree for training: python -m alexnet_cuda.prepare SRC DST [--size 256] ...

SRC is an ImageFolder tree: SRC/train/<class>/<image> (every class folder is a class, sorted by name,
empty ones included so labels stay aligned) and optionally SRC/val/, either with the same class folders
or flat (ILSVRC-2012's 50,000 validation JPEGs) plus --val-labels FILE (one label per line for the
images in sorted file-name order: a 1-based index into the sorted class list, or a class name).

Every image is decoded, its shorter side rescaled to --size and its central size x size patch cropped
(the paper's preprocessing). DST receives:

    train_00000.npy, ...          uint8 (N, size, size, 3) shards, RGB, channels last
    train_00000_labels.npy, ...   int32 (N,) labels (index into classes.json)
    train_00000_stats.npz, ...    per-shard sums (float64) for the mean/PCA, and the files it skipped;
                                  a shard is finished when this file exists (resuming skips it)
    val_00000.npy, ...            the same for the validation split
    classes.json                  the class names (folder names), index = label
    mean.npy                      float32 (3, size, size) mean training image, pixel units 0..255
    meta.json                     sizes, counts, shard list, the RGB PCA (see below), format version
    report.json                   unreadable files (split, path, error), empty classes, ignored files
    COMPLETE                      written last: the preparation is finished

PCA (meta.json "pca"): over every pixel of every training image after preprocessing, in pixel units
0..255, with the population covariance C = E[(x - mu)(x - mu)^T] of the RGB values x:
    eigenvalues   lambda_i of C, descending, units (0..255 pixel value)^2 (variances)
    eigenvectors  3x3, column i is p_i (unit length; row = R, G, B), sign chosen so its sum is >= 0
    std           sqrt(lambda_i), units 0..255 pixel values (the standard deviation along p_i)
The mean and covariance are exact: each shard sums the integer pixel values (and their products) in
float64, which is exact below 2**53, and the shard sums are combined as Python integers.

Interrupted runs resume: rerun the same command and finished shards are kept. A finished DST is never
overwritten unless --force is given. Unreadable or corrupt files are skipped, counted, and listed in
report.json and in the summary line; they never stop the run.

Hostile trees:
- Walking never loops and never leaves SRC: a symlink is followed only if it resolves inside SRC (a class
  folder, or SRC/train itself, that links outside is an error; a file or folder inside a class that links
  outside is skipped and listed in report.json), unless --follow-external-symlinks asks for it. A folder
  reached a second time (a symlink loop, or two links to it) is skipped and listed. FIFOs, devices and
  sockets are skipped and listed, never opened.
- Memory per image is bounded: an image over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS,
  ~89 million pixels) is refused as unreadable; one so elongated that rescaling its shorter side would make
  the intermediate image more than MAX_RESIZE_FACTOR (16) times size x size pixels is resampled straight
  from the source region that maps to the central crop (PIL's resize box), so a 1x8000 PNG costs kilobytes,
  not gigabytes (pixels may then differ by one level from the full-resize path that normal images take).
- --size is at most MAX_SIZE (2048) and a shard at most MAX_SHARD_BYTES (1 GiB: shard size x size^2 x 3),
  both said in the error.
- A decoding worker that dies (killed by a signal, e.g. the out-of-memory killer) stops the run with an
  error (finished shards are kept), never a hang.
"""
import hashlib
import io
import json
import os
import re
import signal
import stat
import sys
import time
import warnings

import numpy as np

from .checkpoint import fsync_dir, open_regular_file
from .cli import CliError, OneLineParser, nonneg_int, positive_int, run_main
from .progress import progress_bar

FORMAT = "alexnet_cuda-prepared"
VERSION = 1
COMPLETE = "COMPLETE"
PLAN = "plan.json"
SPLITS = ("train", "val")
MAX_SIZE = 2048
MAX_SHARD_BYTES = 2 ** 30
MAX_RESIZE_FACTOR = 16
EXTERNAL_FLAG = "--follow-external-symlinks"
_OURS = re.compile(r"^((train|val)_\d{5,}(_labels\.npy|_stats\.npz|\.npy)|plan\.json|meta\.json|classes\.json|"
                   r"mean\.npy|report\.json|COMPLETE)(\.tmp)?$")


# ---- images ------------------------------------------------------------------------------------------

def load_image(path, size):
    """Decode an image file to RGB, rescale its shorter side to `size` (bilinear, antialiased) and crop the
    central size x size patch: uint8 (size, size, 3). Raises on an unreadable or corrupt file, on a path that
    is not a regular file (never blocking on a FIFO) and on an image over PIL's decompression-bomb limit."""
    from PIL import Image

    with open_regular_file(path, "image") as f, warnings.catch_warnings():
        # Above MAX_IMAGE_PIXELS PIL only warns (up to twice that): refuse instead of decoding it.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(f) as im:
            # JPEG: let the decoder downscale by a power of two while staying >= size on both sides (fast).
            im.draft("RGB", (size, size))
            im = im.convert("RGB")
            return resize_center_crop(im, size)


def resize_center_crop(im, size):
    """PIL RGB image -> uint8 (size, size, 3): shorter side to `size`, then the central square."""
    from PIL import Image

    w, h = im.size
    if w < 1 or h < 1:
        raise ValueError(f"empty image ({w}x{h})")
    scale = size / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    left, top = (nw - size) // 2, (nh - size) // 2
    if (nw, nh) != (w, h) and nw * nh > MAX_RESIZE_FACTOR * size * size:
        # Extreme aspect ratio: resample only the source region that maps to the central crop, so memory
        # stays size x size (the full intermediate of a 1x8000 image at 256 would be 256 x 2,048,000).
        box = (left * w / nw, top * h / nh, (left + size) * w / nw, (top + size) * h / nh)
        im = im.resize((size, size), Image.BILINEAR, box=box)
    else:
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.BILINEAR)
        im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise ValueError(f"decoded to an unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ---- scanning the source tree ------------------------------------------------------------------------

class _Walker:
    """Lists a split's files without loops and without leaving SRC (unless follow_external): every symlink
    is resolved and checked, every folder is entered once (by device and inode), and only regular files
    are listed. What it skips goes to `ignored` as {"path", "reason"} for report.json."""

    def __init__(self, src, follow_external=False):
        self.src = src
        self.real = os.path.realpath(src)
        self.follow_external = follow_external
        self.visited = set()
        self.ignored = []

    def rel(self, path):
        return os.path.relpath(path, self.src)

    def outside(self, path):
        """The resolved target if `path` resolves outside SRC (and that is not allowed), else None."""
        real = os.path.realpath(path)
        if self.follow_external or os.path.commonpath([self.real, real]) == self.real:
            return None
        return real

    def skip(self, path, reason):
        self.ignored.append({"path": self.rel(path), "reason": reason})

    def files_under(self, folder):
        """Every non-hidden regular file below `folder`, sorted as os.walk lists them (a folder's files,
        then its subfolders in name order), as paths relative to SRC; hidden files go to `ignored`."""
        files = []
        stack = [folder]
        while stack:
            d = stack.pop()
            try:
                st = os.stat(d)
            except OSError as e:
                self.skip(d, f"unreadable folder ({e.strerror})")
                continue
            key = (st.st_dev, st.st_ino)
            if key in self.visited:
                self.skip(d, "folder already visited (a symlink loop or a second link to it)")
                continue
            self.visited.add(key)
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError as e:
                self.skip(d, f"unreadable folder ({e.strerror})")
                continue
            subdirs = []
            for e in entries:
                kind = self.kind(e)
                if kind == "dir":
                    if not e.name.startswith("."):
                        subdirs.append(e.path)
                elif e.name.startswith("."):
                    self.skip(e.path, "hidden file")
                elif kind == "file":
                    files.append(self.rel(e.path))
                elif kind is not None:
                    self.skip(e.path, kind)
            stack.extend(reversed(subdirs))
        return files

    def kind(self, entry):
        """'dir', 'file', None (skipped and already reported) or the reason to skip it."""
        path = entry.path
        if entry.is_symlink():
            if not os.path.exists(path):
                return "broken symlink"
            real = self.outside(path)
            if real is not None:
                if not entry.name.startswith("."):
                    self.skip(path, f"symlink leaving the source tree (to {real}; {EXTERNAL_FLAG} follows it)")
                return None
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            return f"unreadable ({e.strerror})"
        if stat.S_ISDIR(mode):
            return "dir"
        if stat.S_ISREG(mode):
            return "file"
        return "not a regular file"

    def folder(self, path, what):
        """A class or split folder must stay inside SRC (else an error naming the flag)."""
        if os.path.islink(path):
            real = self.outside(path)
            if real is not None:
                raise ValueError(f"{what} {path} is a symlink to {real}, outside the source tree {self.src}; "
                                 f"pass {EXTERNAL_FLAG} to follow it")
        return path


def _subdirs(folder):
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _loose_files(folder):
    return sorted(e.name for e in os.scandir(folder) if not e.is_dir() and not e.name.startswith("."))


def _open_text(path, what):
    return io.TextIOWrapper(open_regular_file(path, what), encoding="utf-8")


def read_label_file(path, count, classes, label_order=None):
    """Labels for `count` images (sorted file-name order): one per line, an integer (1-based, into
    `label_order` if given, else into the sorted class list) or a class name."""
    order = label_order if label_order is not None else classes
    index = {c: i for i, c in enumerate(classes)}
    labels = []
    with _open_text(path, "label file") as f:
        for lineno, line in enumerate(f, 1):
            token = line.strip()
            if not token:
                continue
            token = token.split()[0]
            if re.fullmatch(r"[+-]?\d+", token):
                k = int(token)
                if not 1 <= k <= len(order):
                    raise ValueError(f"{path}:{lineno}: label {k} is outside 1..{len(order)}")
                name = order[k - 1]
                if name not in index:
                    raise ValueError(f"{path}:{lineno}: label {k} names class {name!r}, which is not a "
                                     "training class folder")
                labels.append(index[name])
            elif token in index:
                labels.append(index[token])
            else:
                raise ValueError(f"{path}:{lineno}: {token!r} is neither a 1-based class index nor a class name")
    if len(labels) != count:
        raise ValueError(f"{path} has {len(labels)} labels but the validation folder has {count} files")
    return labels


def scan_source(src, train_dir="train", val_dir="val", val_labels=None, val_label_order=None,
                follow_external=False):
    """-> classes, {split: [(relative path, label)]}, report dict (empty classes, ignored files)."""
    if not os.path.isdir(src):
        raise ValueError(f"source folder {src} does not exist")
    walker = _Walker(src, follow_external)
    tdir = os.path.join(src, train_dir)
    if not os.path.isdir(tdir):
        raise ValueError(f"{tdir} not found: SRC must hold {train_dir}/<class>/<image> (an ImageFolder tree)")
    walker.folder(tdir, "the training folder")
    classes = _subdirs(tdir)
    if not classes:
        raise ValueError(f"{tdir} has no class folders: expected {train_dir}/<class>/<image>")
    report = {"empty_classes": [], "ignored": []}
    for name in _loose_files(tdir):
        report["ignored"].append({"path": os.path.join(train_dir, name), "reason": "not in a class folder"})
    splits = {"train": []}
    for label, c in enumerate(classes):
        files = walker.files_under(walker.folder(os.path.join(tdir, c), "class folder"))
        if not files:
            report["empty_classes"].append(c)
        splits["train"] += [(f, label) for f in files]

    vdir = os.path.join(src, val_dir)
    walker.visited = set()  # a folder may serve both splits; loops are per split
    if not os.path.isdir(vdir):
        if val_labels:
            raise ValueError(f"--val-labels given but {vdir} does not exist")
        report["ignored"] += walker.ignored
        return classes, splits, report
    walker.folder(vdir, "the validation folder")
    index = {c: i for i, c in enumerate(classes)}
    vclasses = _subdirs(vdir)
    loose = _loose_files(vdir)
    if vclasses:
        if val_labels:
            raise ValueError(f"{vdir} has class folders, so --val-labels does not apply")
        unknown = [c for c in vclasses if c not in index]
        if unknown:
            raise ValueError(f"{vdir} has class folder(s) not among the training classes: {', '.join(unknown[:5])}")
        splits["val"] = []
        for c in vclasses:
            files = walker.files_under(walker.folder(os.path.join(vdir, c), "class folder"))
            splits["val"] += [(f, index[c]) for f in files]
        for name in loose:
            report["ignored"].append({"path": os.path.join(val_dir, name), "reason": "not in a class folder"})
    elif loose:
        if not val_labels:
            raise ValueError(f"{vdir} holds images without class folders: give their labels with --val-labels FILE")
        order = None
        if val_label_order:
            with _open_text(val_label_order, "label order file") as f:
                order = [line.split()[0] for line in f if line.strip()]
        labels = read_label_file(val_labels, len(loose), classes, order)
        # The labels count every loose entry; entries that are no image file are dropped with their label.
        splits["val"] = []
        wanted = set(loose)
        entries = sorted((e for e in os.scandir(vdir) if e.name in wanted), key=lambda e: e.name)
        for e, lab in zip(entries, labels):
            kind = walker.kind(e)
            if kind == "file":
                splits["val"].append((os.path.join(val_dir, e.name), lab))
            elif kind is not None:
                walker.skip(e.path, kind)
    elif val_labels:
        raise ValueError(f"--val-labels given but {vdir} is empty")
    report["ignored"] += walker.ignored
    return classes, splits, report


# ---- shards --------------------------------------------------------------------------------------------

def shard_names(split, k):
    base = f"{split}_{k:05d}"
    return base + ".npy", base + "_labels.npy", base + "_stats.npz"


def _fsync_write(path, write):
    """Write through a temporary name, fsync, rename: a file under its final name is always whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_progress_queue = None


def _init_worker(queue):
    global _progress_queue
    _progress_queue = queue
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool


def process_shard(task, tick=None):
    """Decode one shard's images and write its files; the stats file goes last and marks it finished."""
    src, dst, split, k, items, size = task
    if tick is None and _progress_queue is not None:
        tick = _progress_queue.put
    images = np.empty((len(items), size, size, 3), np.uint8)
    labels = np.empty(len(items), np.int32)
    stats = split == "train"
    img_sum = np.zeros((size, size, 3), np.float64) if stats else None
    pix_sum = np.zeros(3, np.float64)
    pix_outer = np.zeros((3, 3), np.float64)
    failures = []
    n = pending = 0
    for rel, label in items:
        try:
            img = load_image(os.path.join(src, rel), size)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a skipped, reported file
            failures.append({"split": split, "path": rel, "label": int(label),
                             "error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]})
        else:
            images[n] = img
            labels[n] = label
            if stats:
                x = img.astype(np.float64)
                img_sum += x
                flat = x.reshape(-1, 3)
                pix_sum += flat.sum(0)
                pix_outer += flat.T @ flat
            n += 1
        pending += 1
        if tick is not None and pending >= 16:
            tick(pending)
            pending = 0
    if tick is not None and pending:
        tick(pending)
    img_name, lab_name, stats_name = (os.path.join(dst, f) for f in shard_names(split, k))
    _fsync_write(img_name, lambda f: np.save(f, images[:n]))
    _fsync_write(lab_name, lambda f: np.save(f, labels[:n]))
    arrays = {"count": np.int64(n), "pix_sum": pix_sum, "pix_outer": pix_outer,
              "failures": np.frombuffer(json.dumps(failures).encode(), np.uint8)}
    if stats:
        arrays["img_sum"] = img_sum.transpose(2, 0, 1).copy()
    _fsync_write(stats_name, lambda f: np.savez(f, **arrays))
    return split, k, n, failures


def load_shard_stats(dst, split, k):
    """The finished shard's stats dict, or None if the shard is not (wholly) finished."""
    img_name, lab_name, stats_name = (os.path.join(dst, f) for f in shard_names(split, k))
    if not (os.path.exists(stats_name) and os.path.exists(img_name) and os.path.exists(lab_name)):
        return None
    try:
        with np.load(stats_name, allow_pickle=False) as z:
            out = {key: z[key] for key in z.files}
        out["failures"] = json.loads(out["failures"].tobytes().decode())
        out["count"] = int(out["count"])
        return out
    except Exception:  # noqa: BLE001 - a damaged stats file means: do the shard again
        return None


# ---- the whole run -------------------------------------------------------------------------------------

def _digest(items):
    h = hashlib.sha256()
    for rel, label in items:
        h.update(f"{rel}\0{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _make_plan(classes, splits, size, shard_size):
    return {"format": FORMAT, "version": VERSION, "size": size, "shard_size": shard_size, "classes": classes,
            "splits": {s: {"count": len(items), "shards": -(-len(items) // shard_size), "digest": _digest(items)}
                       for s, items in splits.items()}}


def _plan_difference(old, new):
    for key in ("format", "version", "size", "shard_size"):
        if old.get(key) != new.get(key):
            return f"{key} {old.get(key)} -> {new.get(key)}"
    if old.get("classes") != new.get("classes"):
        return "the class folders changed"
    if old.get("splits") != new.get("splits"):
        return "the source files changed"
    return None


def _clear_ours(dst):
    for name in os.listdir(dst):
        if _OURS.match(name):
            os.remove(os.path.join(dst, name))


class PixelTotals:
    """Exact running sums over the training shards: image count, per-position pixel sums, and the RGB
    sums and products. Shard sums are integer-valued float64 (exact); the totals are integers."""

    def __init__(self, size):
        self.size = size
        self.images = 0
        self.img_sum = np.zeros((3, size, size), np.int64)
        self.pix_sum = [0, 0, 0]
        self.pix_outer = [[0] * 3 for _ in range(3)]

    def add(self, stats):
        """Fold one shard's stats in (and drop its big per-position array from the dict)."""
        img_sum = stats.pop("img_sum", None)
        if stats["count"] == 0:
            return
        self.images += stats["count"]
        self.img_sum += img_sum.astype(np.int64)
        for i in range(3):
            self.pix_sum[i] += int(stats["pix_sum"][i])
            for j in range(3):
                self.pix_outer[i][j] += int(stats["pix_outer"][i][j])

    def mean_and_pca(self):
        n_img, size = self.images, self.size
        if n_img == 0:
            raise ValueError("no readable training images")
        mean = (self.img_sum / n_img).astype(np.float32)
        n_pix = n_img * size * size
        s, q = self.pix_sum, self.pix_outer
        # cov_ij = (n * sum x_i x_j - sum x_i * sum x_j) / n^2, the numerator in exact integers.
        cov = np.array([[(n_pix * q[i][j] - s[i] * s[j]) / (n_pix * n_pix) for j in range(3)] for i in range(3)],
                       np.float64)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1]
        evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
        evecs = evecs * np.where(evecs.sum(0) < 0, -1.0, 1.0)
        pca = {"eigenvalues": evals.tolist(), "eigenvectors": evecs.tolist(), "std": np.sqrt(evals).tolist(),
               "pixel_mean": [v / n_pix for v in s], "covariance": cov.tolist(), "pixels": n_pix,
               "units": "pixel values 0..255; eigenvalues are variances (pixel^2), std = sqrt(eigenvalues); "
                        "eigenvectors[:, i] (column i, rows R,G,B) is p_i"}
        return mean, pca


def prepare(src, dst, size=256, shard_size=1024, workers=None, val_labels=None, val_label_order=None,
            train_dir="train", val_dir="val", force=False, progress=True, log=print, follow_external_symlinks=False):
    """Prepare SRC into DST (see the module docstring); returns the summary dict. ValueError on bad input."""
    if size < 1 or shard_size < 1:
        raise ValueError("size and shard size must be positive")
    if size > MAX_SIZE:
        raise ValueError(f"--size {size} is above the limit of {MAX_SIZE} (the paper uses 256)")
    if shard_size * size * size * 3 > MAX_SHARD_BYTES:
        raise ValueError(f"--shard-size {shard_size} at --size {size} makes shards of {shard_size * size * size * 3} "
                         f"bytes, above the limit of {MAX_SHARD_BYTES}: use --shard-size "
                         f"{max(1, MAX_SHARD_BYTES // (size * size * 3))} or less")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if not os.path.isdir(src):
        raise ValueError(f"source folder {src} does not exist")
    if os.path.commonpath([src, dst]) == src:
        raise ValueError(f"destination {dst} is inside the source tree {src}; choose a folder outside it")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"destination {dst} exists and is not a folder")
    if os.path.exists(os.path.join(dst, COMPLETE)) and not force:
        raise ValueError(f"{dst} already holds a finished preparation; use --force to overwrite it")
    if os.path.isdir(dst) and not force and not os.path.exists(os.path.join(dst, PLAN)):
        if any(not n.startswith(".") for n in os.listdir(dst)):
            raise ValueError(f"{dst} is not empty and holds no preparation; choose a new folder (or --force)")

    classes, splits, report = scan_source(src, train_dir, val_dir, val_labels, val_label_order,
                                          follow_external_symlinks)
    plan = _make_plan(classes, splits, size, shard_size)
    os.makedirs(dst, exist_ok=True)
    plan_path = os.path.join(dst, PLAN)
    if force:
        _clear_ours(dst)
    elif os.path.exists(plan_path):
        try:
            with open(plan_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        diff = _plan_difference(old, plan)
        if diff:
            raise ValueError(f"{dst} holds an unfinished preparation with other settings ({diff}); "
                             "use --force to start over")
    for name in os.listdir(dst):  # leftovers of an interrupted write
        if name.endswith(".tmp") and _OURS.match(name):
            os.remove(os.path.join(dst, name))
    _fsync_write(plan_path, lambda f: f.write(json.dumps(plan, indent=1).encode()))

    tasks, done = [], {}
    totals = PixelTotals(size)
    for split, items in splits.items():
        for k in range(plan["splits"][split]["shards"]):
            st = load_shard_stats(dst, split, k)
            if st is not None:
                if split == "train":
                    totals.add(st)
                done[(split, k)] = st
            else:
                tasks.append((src, dst, split, k, items[k * shard_size:(k + 1) * shard_size], size))
    total = sum(len(t[4]) for t in tasks)
    if done:
        log(f"resuming: {len(done)} finished shard(s) kept, {len(tasks)} to do")
    t0 = time.monotonic()
    bar = progress_bar(total, desc="prepare", unit="img", disable=not progress or total == 0)
    failed_so_far = sum(len(s["failures"]) for s in done.values())

    def finished(result):
        nonlocal failed_so_far
        split, k, n, failures = result
        failed_so_far += len(failures)
        st = load_shard_stats(dst, split, k)
        if st is None:
            raise OSError(f"shard {split} {k} was written but cannot be read back")
        if split == "train":
            totals.add(st)
        done[(split, k)] = st
        if failed_so_far:
            bar.set_postfix_str(f"unreadable {failed_so_far}")

    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                finished(process_shard(task, tick=bar.update))
        else:
            _run_pool(tasks, workers, bar, finished)
    except KeyboardInterrupt:
        bar.close()
        raise CliError(f"interrupted: {len(done)} finished shard(s) are kept in {dst}; rerun the same "
                       "command to continue", code=130) from None
    bar.close()

    # Combine: counts, failures, mean image, PCA.
    counts, shard_list, failures = {}, {}, []
    for split in splits:
        shard_list[split] = []
        counts[split] = 0
        for k in range(plan["splits"][split]["shards"]):
            st = done[(split, k)]
            img_name, lab_name, _ = shard_names(split, k)
            shard_list[split].append({"images": img_name, "labels": lab_name, "count": st["count"]})
            counts[split] += st["count"]
            failures += st["failures"]
    mean, pca = totals.mean_and_pca()
    present = set()
    for split in splits:
        for k in range(plan["splits"][split]["shards"]):
            if split == "train" and done[(split, k)]["count"]:
                labs = np.load(os.path.join(dst, shard_names(split, k)[1]))
                present.update(np.unique(labs).tolist())
    no_images = [c for i, c in enumerate(classes) if i not in present]
    report.update({"skipped": failures, "skipped_count": len(failures),
                   "classes_without_training_images": no_images, "counts": counts})
    meta = {"format": FORMAT, "version": VERSION, "size": size, "layout": "NHWC uint8 RGB", "num_classes": len(classes),
            "counts": counts, "shards": shard_list, "mean": "mean.npy", "mean_units": "pixel values 0..255",
            "pca": pca, "source": src, "resize": "shorter side to size (bilinear), central crop",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def write_json(name, obj):
        _fsync_write(os.path.join(dst, name), lambda f: f.write(json.dumps(obj, indent=1).encode()))

    _fsync_write(os.path.join(dst, "mean.npy"), lambda f: np.save(f, mean))
    write_json("classes.json", classes)
    write_json("report.json", report)
    write_json("meta.json", meta)
    summary = {"counts": counts, "classes": len(classes), "skipped": len(failures),
               "empty_classes": report["empty_classes"], "no_training_images": no_images,
               "external_links": sum(i["reason"].startswith("symlink leaving") for i in report["ignored"]),
               "revisited": sum(i["reason"].startswith("folder already visited") for i in report["ignored"]),
               "seconds": round(time.monotonic() - t0, 1)}
    write_json(COMPLETE, summary)
    fsync_dir(dst)
    return summary


def _run_pool(tasks, workers, bar, finished):
    """The shards on a process pool. concurrent.futures, not multiprocessing.Pool: when a worker dies (the
    OOM killer, a SIGKILL) Pool silently replaces it and waits forever for the lost task, while
    ProcessPoolExecutor fails every pending task with BrokenProcessPool, which is reported here."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context()
    ticks = ctx.Queue()
    ex = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker, initargs=(ticks,))

    def drain():
        try:
            while True:
                bar.update(ticks.get_nowait())
        except (queue_mod.Empty, OSError, ValueError):
            pass

    try:
        pending = {ex.submit(process_shard, t): t for t in tasks}
        while pending:
            done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                split, k = pending.pop(fut)[2:4]
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    raise CliError(f"a decoding worker process died (killed by a signal, e.g. the out-of-memory "
                                   f"killer); {len(pending) + 1} shard(s) from {split} shard {k} on are not finished, "
                                   "the finished ones are kept: rerun the same command, with fewer --workers if "
                                   "memory is short") from None
                finished(result)
        drain()
        ex.shutdown(wait=True)
    except BaseException:
        # Stop at once: the workers ignore SIGINT, and shutdown() alone would let each finish its shard.
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            try:
                proc.terminate()
            except (OSError, ValueError, AttributeError):
                pass
        for proc in procs:
            try:
                proc.join(5)
            except (OSError, ValueError, AssertionError, AttributeError):
                pass
        raise
    finally:
        ticks.close()
        ticks.join_thread()


def summary_line(dst, s):
    counts = ", ".join(f"{n} {split}" for split, n in s["counts"].items())
    parts = [f"prepared {dst}: {counts} images, {s['classes']} classes"]
    parts.append(f"skipped {s['skipped']} unreadable file(s)" + (" (listed in report.json)" if s["skipped"] else ""))
    if s["empty_classes"]:
        names = ", ".join(s["empty_classes"][:5]) + (" ..." if len(s["empty_classes"]) > 5 else "")
        parts.append(f"{len(s['empty_classes'])} empty class folder(s) kept: {names}")
    if s.get("external_links"):
        parts.append(f"ignored {s['external_links']} symlink(s) leading out of the source tree ({EXTERNAL_FLAG} "
                     "follows them)")
    if s.get("revisited"):
        parts.append(f"skipped {s['revisited']} folder(s) reached a second time (symlink loops)")
    extra = [c for c in s["no_training_images"] if c not in s["empty_classes"]]
    if extra:
        parts.append(f"{len(extra)} class(es) with no readable training image: {', '.join(extra[:5])}")
    return "; ".join(parts)


def main(argv=None):
    return run_main("alexnet_cuda.prepare", _main, argv)


def _main(argv):
    p = OneLineParser(prog="python -m alexnet_cuda.prepare",
                      description="Rescale an ImageFolder tree (SRC/train/<class>/*, optional SRC/val) into "
                                  "uint8 shards, class list, mean image and RGB PCA for training.")
    p.add_argument("src", metavar="SRC", help="source tree with train/<class>/<image> (and optionally val/)")
    p.add_argument("dst", metavar="DST", help="output folder")
    p.add_argument("--size", type=positive_int, default=256, help="shorter side rescaled to this, then the "
                   f"central SIZE x SIZE crop is kept (default 256, at most {MAX_SIZE})")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard file (default 1024)")
    p.add_argument("--workers", type=nonneg_int, default=None,
                   help="decoding processes (default min(8, CPUs); 0 or 1 = in this process)")
    p.add_argument("--val-labels", metavar="FILE", help="labels of a flat validation folder: one per line, in "
                   "sorted file-name order, a 1-based index into the sorted class list or a class name")
    p.add_argument("--val-label-order", metavar="FILE", help="class names (one per line) that the integer "
                   "--val-labels index into, 1-based, instead of the sorted class list. ILSVRC-2012's "
                   "ILSVRC2012_validation_ground_truth.txt counts in the devkit's ILSVRC2012_ID order "
                   "(meta.mat), which is not the sorted wnid order: pass the wnids in that order here")
    p.add_argument("--train-dir", default="train", help="name of the training folder in SRC (default train)")
    p.add_argument("--val-dir", default="val", help="name of the validation folder in SRC (default val)")
    p.add_argument("--force", action="store_true", help="overwrite a finished (or different) preparation in DST")
    p.add_argument(EXTERNAL_FLAG, action="store_true", help="follow symlinks that lead out of SRC (by default "
                   "they are skipped and listed in report.json; a class folder linking out is an error)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    s = prepare(a.src, a.dst, size=a.size, shard_size=a.shard_size, workers=a.workers, val_labels=a.val_labels,
                val_label_order=a.val_label_order, train_dir=a.train_dir, val_dir=a.val_dir, force=a.force,
                progress=not a.no_progress, log=lambda m: print(m, file=sys.stderr),
                follow_external_symlinks=a.follow_external_symlinks)
    print(summary_line(a.dst, s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
