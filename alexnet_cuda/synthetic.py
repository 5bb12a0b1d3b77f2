"""A small built-in image classification set: ten classes of procedurally drawn pictures (shapes, stripes,
checkerboards, gradients, dots) with random colors, positions, sizes, rotations and pixel noise, written
as JPEG files in an ImageFolder tree. It is what `python -m alexnet_cuda.train` trains on when no --data
is given: learnable by the tiny AlexNet in a few CPU minutes, but not trivially (color carries no class
information, shapes are rotated and scaled, every image is noisy and JPEG-compressed)."""
import json
import math
import os
import re
import shutil
import socket
import tempfile

import numpy as np

CLASSES = ("checker", "cross", "disk", "dots", "gradient", "hstripes", "ring", "square", "triangle", "vstripes")
VERSION = 1


def _colors(rng):
    """Foreground and background colors that differ enough to be seen through the noise."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(fg - bg).sum() >= 150:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _polygon(cx, cy, r, sides, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * i / sides), cy + r * math.sin(angle + 2 * math.pi * i / sides))
            for i in range(sides)]


def draw(cls, rng):
    """One picture of class `cls` (a name from CLASSES): uint8 (H, W, 3), H and W in 44..60."""
    from PIL import Image, ImageDraw

    w, h = (int(v) for v in rng.integers(44, 61, 2))
    fg, bg = _colors(rng)
    s = min(w, h)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * s
    cy = h / 2 + rng.uniform(-0.12, 0.12) * s
    r = rng.uniform(0.22, 0.34) * s
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if cls in ("hstripes", "vstripes", "checker", "gradient"):
        period = rng.uniform(5, 10)
        phase = rng.uniform(0, period)
        tilt = rng.uniform(-0.2, 0.2)  # radians: stripes are roughly, not exactly, axis-aligned
        if cls == "hstripes":
            t = (yy * math.cos(tilt) + xx * math.sin(tilt) + phase) / period
            mask = (np.floor(t * 2) % 2).astype(bool)
        elif cls == "vstripes":
            t = (xx * math.cos(tilt) - yy * math.sin(tilt) + phase) / period
            mask = (np.floor(t * 2) % 2).astype(bool)
        elif cls == "checker":
            a = (xx + phase) / period
            b = (yy + rng.uniform(0, period)) / period
            mask = ((np.floor(a) + np.floor(b)) % 2).astype(bool)
        if cls == "gradient":
            d = np.array([math.cos(angle), math.sin(angle)])
            t = (xx - w / 2) * d[0] + (yy - h / 2) * d[1]
            t = (t - t.min()) / max(1e-9, t.max() - t.min())
            img = np.asarray(bg, np.float64) * (1 - t[..., None]) + np.asarray(fg, np.float64) * t[..., None]
        else:
            img = np.where(mask[..., None], np.asarray(fg, np.float64), np.asarray(bg, np.float64))
    else:
        im = Image.new("RGB", (w, h), bg)
        d = ImageDraw.Draw(im)
        if cls == "disk":
            e = r * rng.uniform(0.8, 1.0)
            d.ellipse([cx - r, cy - e, cx + r, cy + e], fill=fg)
        elif cls == "ring":
            e = r * rng.uniform(0.8, 1.0)
            d.ellipse([cx - r, cy - e, cx + r, cy + e], outline=fg, width=max(2, int(r * rng.uniform(0.25, 0.4))))
        elif cls == "square":
            d.polygon(_polygon(cx, cy, r * 1.2, 4, angle), fill=fg)
        elif cls == "triangle":
            d.polygon(_polygon(cx, cy, r * 1.3, 3, angle), fill=fg)
        elif cls == "cross":
            arm, half = r * 1.2, max(1.5, r * rng.uniform(0.25, 0.4))
            ca, sa = math.cos(angle / 4 - math.pi / 8), math.sin(angle / 4 - math.pi / 8)  # +-22.5 degrees
            for ux, uy in ((ca, sa), (-sa, ca)):
                vx, vy = -uy, ux
                d.polygon([(cx + ux * arm + vx * half, cy + uy * arm + vy * half),
                           (cx + ux * arm - vx * half, cy + uy * arm - vy * half),
                           (cx - ux * arm - vx * half, cy - uy * arm - vy * half),
                           (cx - ux * arm + vx * half, cy - uy * arm + vy * half)], fill=fg)
        elif cls == "dots":
            for _ in range(int(rng.integers(8, 16))):
                x, y = rng.uniform(0, w), rng.uniform(0, h)
                rr = rng.uniform(1.2, 2.6)
                d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fg)
        else:
            raise ValueError(f"unknown synthetic class {cls!r}")
        img = np.asarray(im, np.float64)
    img = img + rng.normal(0, rng.uniform(6, 18), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_synthetic(root, seed=0, train_per_class=300, val_per_class=50, classes=CLASSES):
    """Write root/train/<class>/*.jpg and root/val/<class>/*.jpg (deterministic in `seed`); `classes`: a
    subset of CLASSES (tests use small trees)."""
    from PIL import Image

    for split, count in (("train", train_per_class), ("val", val_per_class)):
        if count == 0:
            continue
        for cls in classes:
            ci = CLASSES.index(cls)
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, 0 if split == "train" else 1, ci, i])
                img = draw(cls, rng)
                Image.fromarray(img).save(os.path.join(folder, f"{cls}_{i:05d}.jpg"), quality=int(rng.integers(80, 96)))
    return root


def cache_dir():
    """Where the demo data lives: $ALEXNET_CUDA_CACHE, else $XDG_CACHE_HOME/alexnet_cuda, else ~/.cache/..."""
    env = os.environ.get("ALEXNET_CUDA_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "alexnet_cuda")


_TMP = re.compile(r"^\.synthetic-.*?\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[^-]+$")


def _tmp_prefix(tag):
    """Temporary folders carry the host and pid of their maker: a later run can tell an abandoned one
    (its maker is gone) from one another live process is still filling."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
    return f".{tag}.tmp-{host}-{os.getpid()}-"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale_temporaries(base, log=None):
    """Remove the temporary folders that killed runs left in the cache: only ours by name, only made on
    this host, only when their maker's pid is gone. Returns how many were removed."""
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    host = _tmp_prefix("x").split("-")[1]
    removed = 0
    for name in names:
        m = _TMP.match(name)
        path = os.path.join(base, name)
        if not m or m.group("host") != host or _pid_alive(int(m.group("pid"))):
            continue
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed += 1
    if removed and log:
        log(f"removed {removed} temporary folder(s) left in {base} by interrupted runs")
    return removed


def ensure_demo_data(base=None, seed=0, size=40, train_per_class=300, val_per_class=50, log=print, progress=True):
    """Generate (once) and prepare (once) the demo set under `base` (default cache_dir()); returns the
    prepared folder. Each stage is built in a temporary folder and renamed into place, so a finished
    folder is always whole and concurrent runs never see a half-written one. Temporary folders of runs
    that were killed (their pid gone) are removed on the next call."""
    from .prepare import COMPLETE, prepare

    base = base or cache_dir()
    os.makedirs(base, exist_ok=True)
    remove_stale_temporaries(base, log)
    tag = f"synthetic-v{VERSION}-s{seed}-{train_per_class}x{val_per_class}"
    images = os.path.join(base, tag)
    prepared = os.path.join(base, f"{tag}-prepared{size}")
    if os.path.exists(os.path.join(prepared, COMPLETE)):
        return prepared
    if not os.path.exists(os.path.join(images, "DONE")):
        log(f"generating the built-in demo images ({len(CLASSES)} classes, {train_per_class} train + "
            f"{val_per_class} val per class) in {images}")
        tmp = tempfile.mkdtemp(prefix=_tmp_prefix(tag), dir=base)
        try:
            make_synthetic(tmp, seed, train_per_class, val_per_class)
            with open(os.path.join(tmp, "DONE"), "w") as f:
                json.dump({"version": VERSION, "seed": seed, "classes": CLASSES}, f)
            _rename_into_place(tmp, images, "DONE")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(f"{tag}-prepared{size}"), dir=base)
    try:
        prepare(images, tmp, size=size, shard_size=1024, workers=min(2, os.cpu_count() or 1), force=True,
                progress=progress, log=log)
        _rename_into_place(tmp, prepared, COMPLETE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return prepared


def _rename_into_place(tmp, final, marker):
    try:
        os.rename(tmp, final)
    except OSError:
        if os.path.exists(os.path.join(final, marker)):  # another run finished first: theirs is as good
            return
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
