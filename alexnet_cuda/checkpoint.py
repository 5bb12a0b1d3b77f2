"""Checkpoints: one .npz file per checkpoint holding the net's state_dict (parameters, momentum, step),
the data metadata evaluate/predict need (mean image, PCA, classes, sizes) and a JSON document with the
config, the training arguments and the exact position/schedule state of the run.

Writes are atomic: the file is written under a temporary hidden name in the same folder, flushed and
fsync'ed, renamed over its final name with os.replace, and the folder is fsync'ed. A file under a
checkpoint name (ckpt_<step>.npz) is therefore always whole; temporary files never match that name and
are removed by the next save. Loading is pickle-free (np.load(allow_pickle=False))."""
import json
import os
import re
import tempfile

import numpy as np

FORMAT = "alexnet_cuda-checkpoint"
VERSION = 1
SUBDIR = "checkpoints"  # runs/<run>/checkpoints/ckpt_<step>.npz
_NAME = re.compile(r"^ckpt_(\d{9,})\.npz$")
_TMP_PREFIX = ".ckpt-"
_META_KEY = "__meta__"


class CheckpointError(ValueError):
    """Not a (whole, readable) checkpoint."""


def checkpoint_name(step):
    return f"ckpt_{int(step):09d}.npz"


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(fileobj) into a temporary file beside `path`, fsync, os.replace, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def save_checkpoint(path, net_state, meta, arrays=None):
    """net_state: net.state_dict(); meta: JSON-able dict; arrays: extra named arrays (e.g. data/mean)."""
    payload = {}
    for k, v in net_state.items():
        payload["net/" + k] = np.asarray(v)
    for k, v in (arrays or {}).items():
        payload["extra/" + k] = np.asarray(v)
    doc = dict(_jsonable(meta), format=FORMAT, version=VERSION)
    payload[_META_KEY] = np.frombuffer(json.dumps(doc, allow_nan=True).encode("utf-8"), np.uint8)
    atomic_write(path, lambda f: np.savez(f, **payload))
    return path


def load_checkpoint(path):
    """-> (meta dict, net_state dict, extra arrays dict). CheckpointError if it is not a whole checkpoint."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path}")
        path = found
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if _META_KEY not in z.files:
                raise CheckpointError(f"{path} is not an alexnet_cuda checkpoint")
            meta = json.loads(z[_META_KEY].tobytes().decode("utf-8"))
            net_state, extra = {}, {}
            for k in z.files:
                if k.startswith("net/"):
                    net_state[k[4:]] = z[k]
                elif k.startswith("extra/"):
                    extra[k[6:]] = z[k]
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - zip/npy/JSON damage of any kind: not a usable checkpoint
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an alexnet_cuda checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')}, this code reads {VERSION}")
    meta["path"] = os.path.abspath(path)
    return meta, net_state, extra


def checkpoint_dir(run):
    """Where a run folder keeps its checkpoints."""
    return os.path.join(run, SUBDIR)


def list_checkpoints(folder):
    """Checkpoint files (by name: ckpt_<step>.npz), oldest step first, in `folder` or, for a run folder,
    in its checkpoints/ subfolder."""
    if os.path.isdir(os.path.join(folder, SUBDIR)):
        folder = os.path.join(folder, SUBDIR)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := _NAME.match(n))]
    return [os.path.join(folder, n) for _, n in sorted(found)]


def is_valid_checkpoint(path):
    """Whole and ours: the zip's central directory (written last) opens and the metadata parses. Cheap:
    the arrays are not read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if _META_KEY not in z.files or not any(k.startswith("net/") for k in z.files):
                return False
            meta = json.loads(z[_META_KEY].tobytes().decode("utf-8"))
        return meta.get("format") == FORMAT and meta.get("version") == VERSION
    except Exception:  # noqa: BLE001 - any damage means: not a checkpoint
        return False


def latest_checkpoint(folder, warn=None):
    """The newest checkpoint in `folder` that loads; damaged newer ones are skipped (with a warning)."""
    for path in reversed(list_checkpoints(folder)):
        if is_valid_checkpoint(path):
            return path
        if warn:
            warn(f"skipping damaged checkpoint {path}")
    return None


def remove_stale_temporaries(folder):
    """Temporary files of writes that never finished (a killed process)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for n in names:
        if n.startswith(_TMP_PREFIX) and n.endswith(".tmp"):
            try:
                os.remove(os.path.join(folder, n))
            except OSError:
                pass


def prune_checkpoints(folder, keep):
    """Keep the newest `keep` checkpoints (by step), delete the rest."""
    paths = list_checkpoints(folder)
    for p in paths[:max(0, len(paths) - keep)]:
        try:
            os.remove(p)
        except OSError:
            pass
