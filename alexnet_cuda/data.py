"""Batches from a prepared folder (python -m alexnet_cuda.prepare): the paper's augmentation for training,
center and ten-crop views for evaluation.

Training batch b of epoch e is a pure function of (seed, e, b): the epoch's order is a permutation drawn
from a Generator keyed by (seed, e), and the batch's crop offsets, flips and PCA-lighting alphas come from
a Generator keyed by (seed, e, b). So a run is repeatable, and resumable exactly from (epoch, batch).

The pixel work (crop, flip, mean subtraction at the source pixel, lighting) is the library op
ax.ops.augment_batch on the CPU (contract in csrc/ops.h): out[n, c, y, x] = img[n, y0+y, xs, c]
- mean[c, y0+y, xs] + light[n, c] with xs = x0 + (flip ? crop-1-x : x). TrainLoader.raw_batch (and
epoch(raw=True)) hands the uint8 images and those parameters instead, for Net.train_step_u8, which runs
the same op on the towers' devices; raw_batch(..., out=slot) writes them straight into a Net staging slot
(page-locked buffers the net uploads from: Net.train_step_staged), so the gather is the only host copy.

PCA lighting (ALEXNET.md): add sum_i p_i * alpha_i * lambda_i to every pixel, alpha_i ~ N(0, pca_std) per
image per use. **choice**: lambda_i is taken as sqrt(eigenvalue_i), the standard deviation of the pixel
values along p_i in 0..255 units (meta.json pca.std), as in Krizhevsky's cuda-convnet code and the usual
reproductions; read literally as the variance it would shift pixels by hundreds of levels. Pass
lighting="eigenvalue" for the literal reading, or pca_std=0 for none.
"""
import collections
import json
import os
import queue
import threading

import numpy as np

ORDER_STREAM = 0  # Generator key (seed, ORDER_STREAM, epoch): the epoch's permutation
AUGMENT_STREAM = 1  # Generator key (seed, AUGMENT_STREAM, epoch, batch): offsets, flips, alphas


class PreparedData:
    """A finished prepared folder: classes, mean image (float32 (3, S, S), 0..255), PCA, splits. What it
    reads is checked (ValueError naming the folder): meta.json's fields, file names that stay in the folder,
    a finite mean image of the right shape, integer labels within the class list."""

    def __init__(self, root):
        from .prepare import COMPLETE, FORMAT, VERSION

        self.root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise ValueError(f"data folder {root} does not exist (make one with python -m alexnet_cuda.prepare)")
        if not os.path.exists(os.path.join(root, COMPLETE)):
            raise ValueError(f"{root} is not a finished prepared folder (no {COMPLETE} marker): run, or rerun to "
                             "finish, python -m alexnet_cuda.prepare SRC " + root)
        try:
            with open(os.path.join(root, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            with open(os.path.join(root, "classes.json"), encoding="utf-8") as f:
                self.classes = list(json.load(f))
        except (OSError, ValueError) as e:
            raise ValueError(f"{root}: cannot read its metadata ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            ver = meta.get("version") if isinstance(meta, dict) else None
            raise ValueError(f"{root}: unknown format {fmt!r} version {ver!r}")
        self.meta = meta
        try:
            self._load(root, meta)
        except (KeyError, TypeError, AttributeError, IndexError) as e:  # a damaged or crafted meta.json
            raise ValueError(f"{root}: malformed meta.json ({type(e).__name__}: {e})"[:300]) from None

    def _load(self, root, meta):
        from .prepare import MAX_SIZE

        size = meta["size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE:
            raise ValueError(f"{root}: meta.json size must be an integer in 1..{MAX_SIZE}, got {size!r}"[:200])
        self.size = size
        self.mean = np.ascontiguousarray(np.load(_inside(root, meta["mean"])), dtype=np.float32)
        if self.mean.shape != (3, self.size, self.size):
            raise ValueError(f"{root}: mean image has shape {self.mean.shape}, expected (3, {self.size}, {self.size})")
        if not np.isfinite(self.mean).all():
            raise ValueError(f"{root}: mean image holds non-finite values")
        pca = meta["pca"]
        self.pca_eigenvalues = np.asarray(pca["eigenvalues"], np.float64)
        self.pca_eigenvectors = np.asarray(pca["eigenvectors"], np.float64)  # column i is p_i
        self.pca_std = np.asarray(pca["std"], np.float64)
        if self.pca_eigenvalues.shape != (3,) or self.pca_eigenvectors.shape != (3, 3) or self.pca_std.shape != (3,) \
                or not all(np.isfinite(a).all() for a in (self.pca_eigenvalues, self.pca_eigenvectors, self.pca_std)):
            raise ValueError(f"{root}: meta.json pca must hold 3 finite eigenvalues, a 3x3 eigenvector matrix "
                             "and 3 standard deviations")
        self.splits = {name: Split(root, shards, self.size) for name, shards in meta["shards"].items()}
        for name, split in self.splits.items():
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(self.classes)):
                raise ValueError(f"{root}: the {name} labels must be in 0..{len(self.classes) - 1} (one per class in "
                                 f"classes.json), found {int(split.labels.min())}..{int(split.labels.max())}")

    @property
    def num_classes(self):
        return len(self.classes)

    def split(self, name):
        if name not in self.splits or len(self.splits[name]) == 0:
            raise ValueError(f"{self.root} has no {name!r} images")
        return self.splits[name]

    def has_split(self, name):
        return name in self.splits and len(self.splits[name]) > 0

    def lighting_magnitudes(self, lighting="std"):
        """lambda_i of the lighting formula: 'std' (sqrt of the eigenvalue; default) or 'eigenvalue'."""
        if lighting == "std":
            return self.pca_std.copy()
        if lighting == "eigenvalue":
            return self.pca_eigenvalues.copy()
        raise ValueError(f"lighting must be 'std' or 'eigenvalue', got {lighting!r}")

    def summary(self):
        """What evaluate/predict need from the data, stored in checkpoints."""
        return {"root": self.root, "size": self.size, "classes": len(self.classes),
                "counts": {k: len(v) for k, v in self.splits.items()},
                "pca_eigenvalues": self.pca_eigenvalues.tolist(), "pca_eigenvectors": self.pca_eigenvectors.tolist(),
                "pca_std": self.pca_std.tolist()}


def _open_file_budget():
    """How many shard files may be memory-mapped at once. Each mapping holds a file descriptor, and
    ImageNet has ~1,300 shards: raise the soft limit toward the hard one where allowed."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < want:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            except (ValueError, OSError):
                pass
        return max(16, (65536 if soft == resource.RLIM_INFINITY else soft) // 2)
    except ImportError:  # not POSIX
        return 256


def _inside(root, name):
    """A file named by meta.json: a plain name in the prepared folder (no path may lead out of it)."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise ValueError(f"{root}: meta.json names the file {name!r}; expected a plain file name in the folder"[:200])
    return os.path.join(root, name)


class Split:
    """The images of one split as memory-mapped shards; images(indices) gathers uint8 (n, S, S, 3).
    Shards are mapped on first use and kept mapped (least recently used ones are closed beyond the
    process's file-descriptor budget)."""

    def __init__(self, root, shards, size):
        import collections

        self.size = size
        self._paths, starts, labels = [], [], []
        total = 0
        for sh in shards:
            n = sh["count"]
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{root}: meta.json shard count must be an integer >= 0, got {n!r}"[:200])
            if n == 0:
                continue
            lab = np.load(_inside(root, sh["labels"]))
            if lab.dtype.kind not in "iu":
                raise ValueError(f"{root}: {sh['labels']} holds {lab.dtype} labels, expected integers")
            if lab.size and (int(lab.min()) < 0 or int(lab.max()) > 2 ** 31 - 1):  # before the int32 cast wraps them
                raise ValueError(f"{root}: {sh['labels']} holds labels outside 0..{2 ** 31 - 1}")
            if lab.shape != (n,):
                raise ValueError(f"{root}: {sh['labels']} has shape {lab.shape}, expected ({n},)")
            self._paths.append((_inside(root, sh["images"]), n))
            starts.append(total)
            labels.append(lab.astype(np.int32))
            total += n
        self._starts = np.asarray(starts, np.int64)
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        self._open = collections.OrderedDict()
        self._max_open = _open_file_budget()
        self._lock = threading.Lock()
        if self._paths:
            self._shard(0)  # fail early on a missing or malformed file

    def __len__(self):
        return self.labels.shape[0]

    def _shard(self, k):
        arr = self._open.get(k)
        if arr is not None:
            self._open.move_to_end(k)
            return arr
        path, n = self._paths[k]
        arr = np.load(path, mmap_mode="r")
        if arr.shape != (n, self.size, self.size, 3) or arr.dtype != np.uint8:
            raise ValueError(f"shard {path} has shape {arr.shape} {arr.dtype}; expected "
                             f"({n}, {self.size}, {self.size}, 3) uint8")
        self._open[k] = arr
        while len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arr

    def images(self, indices, out=None):
        """uint8 (n, S, S, 3) of the images at `indices`, in a new array or written into `out` (a C-contiguous
        uint8 array of that shape, e.g. a Net staging slot's images: no copy beyond the gather itself)."""
        indices = np.asarray(indices, np.int64)
        shape = (len(indices), self.size, self.size, 3)
        direct = out is not None
        if out is None:
            out = np.empty(shape, np.uint8)
        else:
            _check_out("images", "out", out, shape, np.uint8)
        if len(indices) == 0:
            return out
        if indices.min() < 0 or indices.max() >= len(self):
            raise IndexError(f"image index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        with self._lock:
            for s in np.unique(shard):
                where = np.nonzero(shard == s)[0]
                local = indices[where] - self._starts[s]
                order = np.argsort(local, kind="stable")  # read each shard front to back
                src = self._shard(int(s))
                if direct:  # image by image from the mapping into `out`: no temporary batch in between
                    for i, j in zip(where[order].tolist(), local[order].tolist()):
                        out[i] = src[j]
                else:
                    out[where[order]] = src[local[order]]
        return out


def _check_out(op, arg, a, shape, dtype):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: argument '{arg}' must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype or a.shape != tuple(shape):
        raise ValueError(f"{op}: argument '{arg}' is {a.dtype} {a.shape}; expected {np.dtype(dtype)} {tuple(shape)}")
    if not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"{op}: argument '{arg}' must be a writable C-contiguous array")


# ---- the pixel work -------------------------------------------------------------------------------------

class Augmenter:
    """Calls ax.ops.augment_batch on the CPU with a cached mean image."""

    def __init__(self, mean, crop):
        import alexnet_cuda as ax

        self._ax = ax
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        _, self.H, self.W = self.mean.shape
        if not 1 <= crop <= min(self.H, self.W):
            raise ValueError(f"crop {crop} does not fit the stored {self.H}x{self.W} images")
        self.crop = int(crop)
        self._mean_t = ax.from_numpy(self.mean, "cpu")

    def __call__(self, images, offsets, flips, light=None):
        """images uint8 (N,H,W,3), offsets (N,2) (y0,x0), flips (N,), light (N,3) -> float32 (N,3,crop,crop)."""
        ax = self._ax
        n = images.shape[0]
        if light is None:
            light = np.zeros((n, 3), np.float32)
        return ax.ops.augment_batch(
            ax.from_numpy(np.ascontiguousarray(images, dtype=np.uint8), "cpu"),
            ax.from_numpy(np.ascontiguousarray(offsets, dtype=np.int32), "cpu"),
            ax.from_numpy(np.ascontiguousarray(flips, dtype=np.uint8), "cpu"),
            ax.from_numpy(np.ascontiguousarray(light, dtype=np.float32), "cpu"),
            self._mean_t, self.crop).numpy()

    def center(self, images):
        n = images.shape[0]
        off = np.tile(np.array([[(self.H - self.crop) // 2, (self.W - self.crop) // 2]], np.int32), (n, 1))
        return self(images, off, np.zeros(n, np.uint8))

    def ten_crops(self, images):
        """Yields the 10 views (N,3,crop,crop) in TEN_CROPS order, one at a time (memory: one batch)."""
        n = images.shape[0]
        offsets, flips = ten_crop_params(self.H, self.W, self.crop)
        for k in range(10):
            yield self(images, np.tile(offsets[k:k + 1], (n, 1)), np.full(n, flips[k], np.uint8))


TEN_CROPS = ("top-left", "top-right", "bottom-left", "bottom-right", "center",
             "top-left mirrored", "top-right mirrored", "bottom-left mirrored", "bottom-right mirrored",
             "center mirrored")


def ten_crop_params(H, W, crop):
    """The paper's test views: offsets int32 (10, 2) as (y0, x0) and flips uint8 (10,), in TEN_CROPS order
    (four corners, center, then the same five mirrored)."""
    c = crop
    five = [(0, 0), (0, W - c), (H - c, 0), (H - c, W - c), ((H - c) // 2, (W - c) // 2)]
    offsets = np.array(five + five, np.int32)
    flips = np.array([0] * 5 + [1] * 5, np.uint8)
    return offsets, flips


def average_ten_crops(probs):
    """Average softmax outputs over the 10 views: probs (10, N, C) (or a list of ten (N, C)) -> (N, C)."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 3 or probs.shape[0] != 10:
        raise ValueError(f"average_ten_crops: expected (10, N, C) probabilities, got {probs.shape}")
    return probs.mean(axis=0)


def topk_hits(probs, labels, k):
    """How many rows have their label among the k largest entries (ties broken toward lower class index)."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return int((order == np.asarray(labels)[:, None]).any(axis=1).sum())


def lighting_shift(alphas, eigenvectors, magnitudes):
    """Per-image RGB shift sum_i p_i * alpha_i * lambda_i: alphas (N,3) -> float32 (N,3)."""
    return ((np.asarray(alphas, np.float64) * np.asarray(magnitudes, np.float64)) @
            np.asarray(eigenvectors, np.float64).T).astype(np.float32)


# ---- background prefetching ------------------------------------------------------------------------------

_DONE = object()


class _Failure:
    def __init__(self, exc):
        self.exc = exc


def prefetch(make_iterable, depth=3):
    """Iterate make_iterable() in a background thread, at most `depth` items ahead. Closing the generator
    (break, an exception, garbage collection) stops the thread and waits for it; an exception in the
    thread is raised here."""
    if depth <= 0:
        yield from make_iterable()
        return
    q = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker():
        try:
            for item in make_iterable():
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(_Failure(e))

    thread = threading.Thread(target=worker, name="alexnet_cuda-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass
        thread.join()


def prefetch_map(fn, items, depth=3, workers=2):
    """Yield fn(item) for each item, in order, computed by `workers` threads at most `depth` items ahead
    (the pixel op releases the GIL, so batches are built in parallel with each other and with the
    training step). Closing the generator cancels what is queued and waits for the threads."""
    items = list(items)
    if depth <= 0 or workers <= 0:
        for item in items:
            yield fn(item)
        return
    import collections
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alexnet_cuda-loader")
    pending = collections.deque()
    nxt = 0
    try:
        while nxt < len(items) and len(pending) < depth:
            pending.append(pool.submit(fn, items[nxt]))
            nxt += 1
        while pending:
            result = pending.popleft().result()
            if nxt < len(items):
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


# ---- loaders -----------------------------------------------------------------------------------------------

class RawBatch(collections.namedtuple("RawBatch", "images offsets flips light")):
    """A training batch before augmentation: images uint8 (B,S,S,3), offsets int32 (B,2) as (y0, x0), flips
    uint8 (B,), light float32 (B,3); Augmenter(images, offsets, flips, light) is the float32 batch."""
    __slots__ = ()


class TrainLoader:
    """The paper's training batches: random crop x crop crops, horizontal flips, PCA lighting, mean
    subtraction. Batches are whole (the last partial batch of an epoch is dropped); the order and every
    random draw are keyed by (seed, epoch[, batch])."""

    def __init__(self, data, batch_size, crop, seed=0, pca_std=0.1, flip=True, lighting="std", split="train",
                 prefetch_depth=3, threads=2, rank=0, ranks=1):
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < ranks:
            raise ValueError(f"rank must be in 0..{ranks - 1}, got {rank}")
        if batch_size % ranks:
            raise ValueError(f"batch size {batch_size} is not divisible by the {ranks} ranks (the batch size is the "
                             "global batch, split evenly across the ranks)")
        # Data parallelism: rank r of `ranks` takes its slice of every global batch (see raw_batch).
        self.rank, self.ranks = int(rank), int(ranks)
        self.local_batch = batch_size // ranks
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not pca_std >= 0:
            raise ValueError(f"pca_std must be >= 0, got {pca_std}")
        self.data, self.split = data, data.split(split)
        self.batch_size, self.seed, self.pca_std, self.flip = int(batch_size), int(seed), float(pca_std), bool(flip)
        self.augment = Augmenter(data.mean, crop)
        self.crop = self.augment.crop
        self.eigenvectors = data.pca_eigenvectors
        self.magnitudes = data.lighting_magnitudes(lighting)
        self.prefetch_depth, self.threads = prefetch_depth, threads
        if len(self.split) < self.batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the {split} set ({len(self.split)} images)")

    @property
    def batches_per_epoch(self):
        return len(self.split) // self.batch_size

    def order(self, epoch):
        return np.random.default_rng([self.seed, ORDER_STREAM, int(epoch)]).permutation(len(self.split))

    def batch_params(self, epoch, batch, n):
        """offsets int32 (n,2), flips uint8 (n,), alphas float64 (n,3) for batch `batch` of epoch `epoch`."""
        rng = np.random.default_rng([self.seed, AUGMENT_STREAM, int(epoch), int(batch)])
        S, c = self.augment.H, self.crop
        offsets = np.stack([rng.integers(0, S - c + 1, n), rng.integers(0, self.augment.W - c + 1, n)], 1)
        flips = rng.integers(0, 2, n) if self.flip else np.zeros(n, np.int64)
        if not self.flip:
            rng.integers(0, 2, n)  # keep the alpha draws the same with and without flips
        alphas = rng.normal(0.0, 1.0, (n, 3)) * self.pca_std
        return offsets.astype(np.int32), flips.astype(np.uint8), alphas

    def raw_batch(self, epoch, batch, order=None, out=None):
        """(RawBatch, labels int32 (B,)) of batch `batch` of epoch `epoch`: the stored uint8 images and the
        parameters batch() augments them with, for Net.train_step_u8 (the augmentation on the device).
        With ranks > 1, this rank's slice [rank*B/ranks, (rank+1)*B/ranks) of that global batch, with the
        augmentation drawn for the whole global batch: the ranks together see exactly one process's batch.

        out: where to write the batch instead of new arrays: anything with the attributes images (B, S, S, 3)
        uint8, offsets (B, 2) int32, flips (B,) uint8, light (B, 3) float32 and labels (B,) int32, each a
        C-contiguous array (B: local_batch) — a Net.staging_slot, whose parts are the net's page-locked
        staging buffers, so the gather from the shards is the batch's only host copy. The arrays returned
        are then those of `out`."""
        if order is None:
            order = self.order(epoch)
        idx = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        offsets, flips, alphas = self.batch_params(epoch, batch, len(idx))
        if self.ranks > 1:
            mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
            idx, offsets, flips, alphas = idx[mine], offsets[mine], flips[mine], alphas[mine]
        light = lighting_shift(alphas, self.eigenvectors, self.magnitudes)
        if out is None:
            return RawBatch(self.split.images(idx), offsets, flips, light), self.split.labels[idx].astype(np.int32)
        n, S = len(idx), self.split.size
        parts = {}
        for name, shape, dtype in (("images", (n, S, S, 3), np.uint8), ("offsets", (n, 2), np.int32),
                                   ("flips", (n,), np.uint8), ("light", (n, 3), np.float32),
                                   ("labels", (n,), np.int32)):
            if not hasattr(out, name):
                raise TypeError(f"raw_batch: argument 'out' has no '{name}' (a Net staging slot, or an object with "
                                "images, offsets, flips, light and labels arrays)")
            parts[name] = getattr(out, name)
            _check_out("raw_batch", f"out.{name}", parts[name], shape, dtype)
        self.split.images(idx, out=parts["images"])
        parts["offsets"][...] = offsets
        parts["flips"][...] = flips
        parts["light"][...] = light
        parts["labels"][...] = self.split.labels[idx]
        return (RawBatch(parts["images"], parts["offsets"], parts["flips"], parts["light"]), parts["labels"])

    def batch(self, epoch, batch, order=None):
        """(images float32 (B,3,crop,crop), labels int32 (B,)) of batch `batch` of epoch `epoch`."""
        raw, y = self.raw_batch(epoch, batch, order)
        return self.augment(raw.images, raw.offsets, raw.flips, raw.light), y

    def epoch(self, epoch, start=0, raw=False):
        """Yields (batch index, images, labels) for batches start.. of `epoch`, built ahead in threads;
        with raw=True the images are a RawBatch (uint8 images and their augmentation parameters)."""
        order = self.order(epoch)
        build = self.raw_batch if raw else self.batch

        def make(b):
            x, y = build(epoch, b, order)
            return b, x, y

        return prefetch_map(make, range(start, self.batches_per_epoch), self.prefetch_depth, self.threads)


class EvalLoader:
    """Sequential batches of a split (every image once, the last batch may be short).
    mode 'center': (images float32 (B,3,crop,crop), labels); mode 'raw': (uint8 (B,S,S,3), labels) for
    ten-crop evaluation with Augmenter.ten_crops."""

    def __init__(self, data, batch_size, crop, split="val", mode="center", limit=None, prefetch_depth=2,
                 rank=0, ranks=1):
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < ranks:
            raise ValueError(f"rank must be in 0..{ranks - 1}, got {rank}")
        self.rank, self.ranks = int(rank), int(ranks)  # rank r evaluates batches r, r + ranks, ...
        if mode not in ("center", "raw"):
            raise ValueError(f"mode must be 'center' or 'raw', got {mode!r}")
        self.split = data.split(split)
        self.batch_size, self.mode = int(batch_size), mode
        self.augment = Augmenter(data.mean, crop)
        self.n = len(self.split) if limit is None else min(int(limit), len(self.split))
        self.prefetch_depth = prefetch_depth

    def __len__(self):
        return len(range(self.rank, -(-self.n // self.batch_size), self.ranks))

    def __iter__(self):
        def gen():
            for start in range(self.rank * self.batch_size, self.n, self.batch_size * self.ranks):
                idx = np.arange(start, min(self.n, start + self.batch_size))
                imgs = self.split.images(idx)
                x = self.augment.center(imgs) if self.mode == "center" else imgs
                yield x, self.split.labels[idx].astype(np.int32)

        return prefetch(gen, self.prefetch_depth)
