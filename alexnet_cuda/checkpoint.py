"""Checkpoints: one .npz file per checkpoint holding the net's state_dict (parameters, momentum, step),
the data metadata evaluate/predict need (mean image, PCA, classes, sizes) and a JSON document with the
config, the training arguments and the exact position/schedule state of the run.

Writes are atomic: the file is written under a temporary hidden name in the same folder, flushed and
fsync'ed, renamed over its final name with os.replace, and the folder is fsync'ed. A file under a
checkpoint name (ckpt_<step>.npz) is therefore always whole; temporary files never match that name and
are removed by the next save. Files get the permissions the umask allows (0644 under umask 022), as
open() would give them.

Loading treats the file as hostile (a checkpoint may be downloaded): no pickle, and every member is read
by this module, not np.load. Each array's header is checked before its data is read (dtype kind: floating
point for parameters, momentum and the mean image, integer for the step and seed; str, bytes, object,
structured, void and complex arrays are refused), every member is read to its end so the zip's CRC-32 is
verified (one flipped byte anywhere in the data is caught at load), values must be finite and fit float32,
the mean image's shape must match the data size, and the JSON metadata is checked key by key (required
keys, types, ranges, no unknown keys; the network config through config.alexnet_config). Any problem is a
CheckpointError (a ValueError) of one line naming the file and the key. The parameter shapes the config
implies are checked by Net.load_state_dict before anything reaches C++."""
import json
import math
import numbers
import os
import re
import stat
import tempfile
import zipfile

import numpy as np

FORMAT = "alexnet_cuda-checkpoint"
VERSION = 1
SUBDIR = "checkpoints"  # runs/<run>/checkpoints/ckpt_<step>.npz
_NAME = re.compile(r"^ckpt_(\d{9,})\.npz$")
_TMP_PREFIX = ".ckpt-"
_META_KEY = "__meta__"
# A checkpoint of the paper's net is ~0.5 GB; refusing members that declare more than this in all keeps a
# crafted (compressed) file from claiming the machine's memory.
MAX_CHECKPOINT_BYTES = 16 * 2 ** 30
MAX_META_BYTES = 64 * 2 ** 20


class CheckpointError(ValueError):
    """Not a (whole, readable, valid) checkpoint."""


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


def current_umask():
    """The process umask, read without changing it where /proc says it (os.umask() sets it, and another
    thread creating a file in that instant would get the temporary value)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path, write):
    """write(fileobj) into a temporary file beside `path`, fsync, os.replace, fsync the folder. The file gets
    0o666 & ~umask, as open() would give (mkstemp alone makes it 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


def open_regular_file(path, what="file"):
    """Open `path` for binary reading only if it is a regular file: a FIFO, device or socket is refused
    without blocking (the open is non-blocking, the type checked on the open descriptor)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ValueError(f"{what} {path} is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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


# ---- reading: every byte checked ------------------------------------------------------------------------

_KIND_NAMES = {"U": "str", "S": "bytes", "O": "object (pickle)", "V": "structured/void", "c": "complex",
               "M": "datetime", "m": "timedelta", "b": "bool", "f": "floating point", "i": "integer",
               "u": "unsigned integer"}
EXTRA_KEYS = ("mean",)
_INT_STATE = ("meta/step", "meta/seed")


def _expected_kinds(key):
    """(allowed dtype kinds, description) for an array name."""
    if key == _META_KEY:
        return "u", "uint8 (JSON text)"
    if key in ("net/" + k for k in _INT_STATE):
        return "iu", "an integer"
    return "f", "floating point"


def _describe(dtype):
    if dtype.fields is not None or dtype.subdtype is not None:
        return f"{dtype} (structured/void)"
    return f"{dtype} ({_KIND_NAMES.get(dtype.kind, dtype.kind)})"


def _read_member(path, zf, info, key):
    """One .npy member: header checked first, data read to the member's end (which verifies its CRC-32)."""
    fmt = np.lib.format
    with zf.open(info) as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, SyntaxError, TypeError, EOFError) as e:
            raise CheckpointError(f"{path}: array '{key}' has a malformed .npy header "
                                  f"({' '.join(str(e).split())[:120]})") from None
        kinds, what = _expected_kinds(key)
        if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
            raise CheckpointError(f"{path}: array '{key}' has dtype {_describe(dtype)}; expected {what}")
        if key == _META_KEY and dtype.itemsize != 1:
            raise CheckpointError(f"{path}: array '{key}' has dtype {dtype}; expected {what}")
        if len(shape) > 8 or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: array '{key}' has an invalid shape {shape}")
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if f.tell() + nbytes != info.file_size:
            raise CheckpointError(f"{path}: array '{key}' of shape {shape} and dtype {dtype} needs {nbytes} bytes "
                                  f"but its member holds {info.file_size - f.tell()}")
        buf = bytearray(nbytes)
        view, pos = memoryview(buf), 0
        while pos < nbytes:
            chunk = f.read(min(1 << 24, nbytes - pos))
            if not chunk:
                raise CheckpointError(f"{path}: array '{key}' is truncated")
            view[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if f.read(1):  # also the read that reaches the end, where zipfile compares the CRC-32
            raise CheckpointError(f"{path}: array '{key}' has trailing bytes")
    arr = np.frombuffer(buf, dtype=dtype)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def _as_float32(path, key, arr):
    """Finite values that fit float32 -> native float32 C-contiguous; anything else a CheckpointError."""
    if not np.isfinite(arr).all():
        bad = np.count_nonzero(~np.isfinite(arr))
        raise CheckpointError(f"{path}: array '{key}' holds {bad} non-finite value(s) (NaN or inf)")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise CheckpointError(f"{path}: array '{key}' holds values beyond float32's range (largest magnitude "
                              f"{float(np.abs(arr).max()):g})")
    return out


def _read_zip(path):
    """-> {key: array} for every member, each checked as above."""
    try:
        f = open_regular_file(path, "checkpoint")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    with f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointError(f"{path} is not a readable checkpoint (not a zip archive: "
                                  f"{' '.join(str(e).split()) or type(e).__name__})") from None
        with zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise CheckpointError(f"{path} is not a readable checkpoint (duplicate members)")
            total = sum(i.file_size for i in infos)
            if total > MAX_CHECKPOINT_BYTES:
                raise CheckpointError(f"{path} declares {total} bytes of arrays, more than the "
                                      f"{MAX_CHECKPOINT_BYTES} a checkpoint may hold")
            if _META_KEY + ".npy" not in names:
                raise CheckpointError(f"{path} is not an alexnet_cuda checkpoint (no metadata)")
            out = {}
            for info in infos:
                name = info.filename
                key = name[:-4] if name.endswith(".npy") else None
                if key is None or not (key == _META_KEY or (key.startswith("net/") and len(key) > 4)
                                       or key[6:] in EXTRA_KEYS and key.startswith("extra/")):
                    raise CheckpointError(f"{path}: unexpected member {name!r}")
                if key == _META_KEY and info.file_size > MAX_META_BYTES:
                    raise CheckpointError(f"{path}: metadata larger than {MAX_META_BYTES} bytes")
                try:
                    out[key] = _read_member(path, zf, info, key)
                except CheckpointError:
                    raise
                except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
                    raise CheckpointError(f"{path}: array '{key}' is damaged ({' '.join(str(e).split()) or type(e).__name__})") from None
            return out


def load_checkpoint(path, warn=None):
    """-> (meta dict, net_state dict, extra arrays dict), all checked (see the module docstring).
    A folder means its newest checkpoint that loads; damaged newer ones are skipped (warn(message) says so).
    CheckpointError if it is not a whole, valid checkpoint."""
    if os.path.isdir(path):
        found = load_latest(path, warn)
        if found is None:
            raise CheckpointError(f"no loadable checkpoint in {path}")
        return found[1:]
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    arrays = _read_zip(path)
    raw = arrays.pop(_META_KEY)
    if raw.ndim != 1:
        raise CheckpointError(f"{path}: metadata is not a 1-D byte array")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an alexnet_cuda checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}, this code reads {VERSION}")
    validate_meta(path, meta)
    net_state, extra = {}, {}
    for key, arr in arrays.items():
        if key.startswith("net/"):
            net_state[key[4:]] = arr
        else:
            extra[key[6:]] = arr
    _validate_arrays(path, meta, net_state, extra)
    meta["path"] = os.path.abspath(path)
    return meta, net_state, extra


def _validate_arrays(path, meta, net_state, extra):
    if not any(k not in _INT_STATE for k in net_state):
        raise CheckpointError(f"{path}: holds no network parameters")
    for k in list(net_state):
        a = net_state[k]
        if k in _INT_STATE:
            if a.shape != ():
                raise CheckpointError(f"{path}: array 'net/{k}' must be a scalar, has shape {a.shape}")
            v = int(a)
            hi = 2 ** 63 - 1 if k == "meta/step" else 2 ** 64 - 1
            if not 0 <= v <= hi:
                raise CheckpointError(f"{path}: array 'net/{k}' must be in 0..{hi}, got {v}")
            if k == "meta/step" and v != meta["step"]:
                raise CheckpointError(f"{path}: array 'net/meta/step' is {v} but the metadata says step {meta['step']}")
            net_state[k] = np.array(v, np.int64 if k == "meta/step" else np.uint64)
        else:
            if a.ndim not in (1, 2, 4):
                raise CheckpointError(f"{path}: array 'net/{k}' has {a.ndim} dimension(s); parameters have 1, 2 or 4")
            net_state[k] = _as_float32(path, "net/" + k, a)
    if "mean" not in extra:
        raise CheckpointError(f"{path}: holds no mean image ('extra/mean')")
    size = meta["data"]["size"]
    if extra["mean"].shape != (3, size, size):
        raise CheckpointError(f"{path}: array 'extra/mean' has shape {extra['mean'].shape}, expected "
                              f"(3, {size}, {size}) for the data size {size}")
    extra["mean"] = _as_float32(path, "extra/mean", extra["mean"])


# ---- metadata -------------------------------------------------------------------------------------------

_META_REQUIRED = ("format", "version", "config", "train", "state", "step", "classes", "data", "crop")
_META_OPTIONAL = ("devices", "created")
_DATA_KEYS = {"root", "size", "classes", "counts", "pca_eigenvalues", "pca_eigenvectors", "pca_std", "demo"}
_STATE_KEYS = {"epoch", "batch", "step", "lr", "reductions", "best", "bad_epochs", "history", "acc"}
_ACC_KEYS = {"loss_sum", "top1", "top5", "n", "seconds"}
_DEMO_KEYS = {"seed", "size", "train_per_class", "val_per_class"}


class _Bad(Exception):
    pass


def _short(v):
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _int(where, v, lo=0, hi=2 ** 63 - 1):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _Bad(f"'{where}' must be an integer in {lo}..{hi}, got {_short(v)}")
    return v


def _num(where, v, lo=None, hi=None, lo_open=False):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or \
            (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = "" if lo is None and hi is None else f" {'>' if lo_open else '>='} {lo}" if hi is None else \
            f" in [{lo}, {hi}]"
        raise _Bad(f"'{where}' must be a finite number{rng}, got {_short(v)}")
    return v


def _str(where, v):
    if not isinstance(v, str):
        raise _Bad(f"'{where}' must be a string, got {_short(v)}")
    return v


def _dict(where, v, allowed, required=()):
    """where: the key path ('' for the metadata document itself)."""
    name = f"'{where}' " if where else ""
    if not isinstance(v, dict):
        raise _Bad(f"{name}must be an object, got {_short(v)}")
    unknown = sorted(set(map(str, v)) - set(allowed))
    if unknown:
        raise _Bad(f"{name}has unknown key(s) {', '.join(map(repr, unknown[:5]))}")
    missing = [k for k in required if k not in v]
    if missing:
        raise _Bad(f"{name}is missing {', '.join(map(repr, missing))}")
    return v


def _floats(where, v, shape):
    a = v
    for n in shape:
        if not isinstance(a, list) or len(a) != n:
            raise _Bad(f"'{where}' must be a {'x'.join(map(str, shape))} list of finite numbers, got {_short(v)}")
        a = a[0] if a else None
    flat = v if len(shape) == 1 else [x for row in v for x in (row if isinstance(row, list) else [row])]
    if len(flat) != math.prod(shape):
        raise _Bad(f"'{where}' must be a {'x'.join(map(str, shape))} list of finite numbers, got {_short(v)}")
    for x in flat:
        _num(where, x)


def _train_checks():
    from .config import TRAIN_DEFAULTS
    from .train import LOOP_DEFAULTS

    pos, nonneg = (lambda w, v: _int(w, v, 1)), (lambda w, v: _int(w, v, 0))
    checks = {"batch_size": pos, "epochs": pos, "patience": pos, "keep": pos, "log_every": pos, "crop": pos,
              "image_size": pos, "lr_reductions": nonneg, "checkpoint_every": nonneg, "max_steps": nonneg,
              "prefetch": nonneg, "loader_threads": nonneg,
              "seed": lambda w, v: _int(w, v, 0, 2 ** 64 - 1),
              "lr": lambda w, v: _num(w, v, 0, lo_open=True),
              "lr_factor": lambda w, v: _num(w, v, 0, 1, lo_open=True),
              "pca_std": lambda w, v: _num(w, v, 0),
              "lighting": lambda w, v: _choice(w, v, ("std", "eigenvalue")),
              "net": lambda w, v: _choice(w, v, ("alexnet", "tiny")),
              "flip": _boolean}
    assert set(checks) == set(TRAIN_DEFAULTS) | set(LOOP_DEFAULTS), "checkpoint: train keys out of date"
    return checks


def _choice(where, v, options):
    if v not in options or not isinstance(v, str):
        raise _Bad(f"'{where}' must be one of {', '.join(options)}, got {_short(v)}")
    return v


def _boolean(where, v):
    if not isinstance(v, bool):
        raise _Bad(f"'{where}' must be true or false, got {_short(v)}")
    return v


def validate_meta(path, meta):
    """Check a checkpoint's JSON metadata key by key (CheckpointError naming the file and the key);
    meta["config"] is replaced by the full checked config dict."""
    from .config import alexnet_config

    try:
        _dict("", meta, _META_REQUIRED + _META_OPTIONAL, _META_REQUIRED)
        cfg = meta["config"]
        if not isinstance(cfg, dict):
            raise _Bad(f"'config' must be an object, got {_short(cfg)}")
        try:
            cfg = alexnet_config(**cfg)
        except (ValueError, TypeError) as e:
            raise _Bad(f"'config': {e}") from None
        checks = _train_checks()
        train = _dict("train", meta["train"], checks, ("seed",))
        for k, v in train.items():
            checks[k](f"train.{k}", v)
        step = _int("step", meta["step"])
        st = _dict("state", meta["state"], _STATE_KEYS, sorted(_STATE_KEYS))
        for k in ("epoch", "batch", "step", "reductions", "bad_epochs"):
            _int(f"state.{k}", st[k])
        if st["step"] != step:
            raise _Bad(f"'state.step' is {st['step']} but 'step' is {step}")
        _num("state.lr", st["lr"], 0, lo_open=True)
        if st["best"] is not None:
            _num("state.best", st["best"], 0, 1)
        if not isinstance(st["history"], list) or not all(isinstance(h, dict) for h in st["history"]):
            raise _Bad(f"'state.history' must be a list of objects, got {_short(st['history'])}")
        for i, h in enumerate(st["history"]):
            for k, v in h.items():
                if not (v is None or isinstance(v, (str, int, float))):
                    raise _Bad(f"'state.history[{i}].{k}' must be a number, string or null, got {_short(v)}")
        acc = _dict("state.acc", st["acc"], _ACC_KEYS, sorted(_ACC_KEYS))
        for k in ("top1", "top5", "n"):
            _int(f"state.acc.{k}", acc[k])
        _num("state.acc.loss_sum", acc["loss_sum"], 0)
        _num("state.acc.seconds", acc["seconds"], 0)
        classes = meta["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise _Bad(f"'classes' must be a list of names, got {_short(classes)}")
        if len(classes) != cfg["num_classes"]:
            raise _Bad(f"'classes' names {len(classes)} classes but the network has {cfg['num_classes']} outputs")
        if len(set(classes)) != len(classes):
            raise _Bad("'classes' names a class twice")
        data = _dict("data", meta["data"], _DATA_KEYS, ("root", "size", "pca_eigenvalues", "pca_eigenvectors",
                                                         "pca_std"))
        _str("data.root", data["root"])
        size = _int("data.size", data["size"], 1, 2 ** 31 - 1)
        _floats("data.pca_eigenvalues", data["pca_eigenvalues"], (3,))
        _floats("data.pca_eigenvectors", data["pca_eigenvectors"], (3, 3))
        _floats("data.pca_std", data["pca_std"], (3,))
        if data.get("demo") is not None:
            demo = _dict("data.demo", data["demo"], _DEMO_KEYS, sorted(_DEMO_KEYS))
            _int("data.demo.seed", demo["seed"], 0, 2 ** 64 - 1)
            _int("data.demo.size", demo["size"], 1, 4096)
            _int("data.demo.train_per_class", demo["train_per_class"], 1, 10 ** 6)
            _int("data.demo.val_per_class", demo["val_per_class"], 0, 10 ** 6)
        crop = _int("crop", meta["crop"], 1, size)
        if crop != cfg["input_size"]:
            raise _Bad(f"'crop' is {crop} but the network's input_size is {cfg['input_size']}")
        if "devices" in meta:
            _str("devices", meta["devices"])
        if "created" in meta:
            _str("created", meta["created"])
    except _Bad as e:
        raise CheckpointError(f"{path}: metadata {e}") from None
    meta["config"] = cfg


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


def load_latest(folder, warn=None):
    """The newest checkpoint in `folder` (or its checkpoints/ subfolder) that loads whole and valid, as
    (path, meta, net_state, extra); None if there is none. Each damaged newer one is skipped and reported
    through warn(message), and so is the fallback taken."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        try:
            meta, net_state, extra = load_checkpoint(path)
        except CheckpointError as e:
            skipped.append(path)
            if warn:
                warn(f"skipping a damaged checkpoint: {e}")
            continue
        if skipped and warn:
            warn(f"using the newest good checkpoint {path} instead")
        return path, meta, net_state, extra
    return None


def latest_checkpoint(folder, warn=None):
    """The path of the newest checkpoint in `folder` that loads (fully checked); damaged newer ones are
    skipped (with a warning)."""
    found = load_latest(folder, warn)
    return found[0] if found else None


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
