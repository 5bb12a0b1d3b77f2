"""The data path alone: images/s of the training loader (alexnet_cuda.data.TrainLoader: shard reads, random crops,
flips, PCA lighting, mean subtraction) over prepared shards, and the augment_batch op (the pixel work) on the
benchmark device.

Shards: --data names a prepared folder (python -m alexnet_cuda.prepare); without it a synthetic one is written to a
temporary folder with NumPy in the prepared format (uint8 NHWC shards, labels, mean image, RGB PCA, meta.json), or,
should the loader reject that, through the prepare tool from generated image files. The loader is imported lazily:
where alexnet_cuda.data is missing the loader rows say "loader unavailable" and the op row still runs.

Validation: one loader batch is recomputed from its documented parts (the epoch order, batch_params, the shard
images, lighting_shift) with alexnet_cuda.reference.augment_batch, and must match (rel 1e-5, labels exact); the
augment_batch op is checked against the reference on the first, middle and last images of its batch.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import harness as H
from harness import ax, f64


# ---------------------------------------------------------------------------------------------------
# Synthetic prepared folder


def write_prepared(root: str, n_images: int, size: int, classes: int, shard_size: int, seed: int = 0) -> str:
    """A prepared folder in alexnet_cuda.prepare's format, written directly with NumPy (random pixels)."""
    try:
        from alexnet_cuda.prepare import COMPLETE, FORMAT, VERSION
    except ImportError:
        COMPLETE, FORMAT, VERSION = "COMPLETE", "alexnet_cuda-prepared", 1
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    shards, total, s64, ss64 = [], 0, np.zeros((3, size, size)), np.zeros((3, 3))
    for k in range(-(-n_images // shard_size)):
        n = min(shard_size, n_images - total)
        imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        labels = rng.integers(0, classes, n).astype(np.int32)
        img_name, lab_name = f"train_{k:05d}.npy", f"train_{k:05d}_labels.npy"
        np.save(os.path.join(root, img_name), imgs)
        np.save(os.path.join(root, lab_name), labels)
        shards.append({"images": img_name, "labels": lab_name, "count": n})
        s64 += imgs.sum(0, dtype=np.float64).transpose(2, 0, 1)
        px = imgs.reshape(-1, 3)[::max(1, n * size * size // (1 << 18))].astype(np.float64)  # a pixel sample
        ss64 += px.T @ px / len(px) * n  # the PCA needs no exactness here: weight the sample by its shard
        total += n
    mean = (s64 / total).astype(np.float32)
    mu = s64.reshape(3, -1).sum(1) / (total * size * size)
    cov = ss64 / total - np.outer(mu, mu)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    evecs *= np.where(evecs.sum(0) >= 0, 1.0, -1.0)
    np.save(os.path.join(root, "mean.npy"), mean)
    meta = {"format": FORMAT, "version": VERSION, "size": size, "layout": "NHWC uint8 RGB", "num_classes": classes,
            "counts": {"train": total}, "shards": {"train": shards}, "mean": "mean.npy",
            "pca": {"eigenvalues": evals.tolist(), "eigenvectors": evecs.tolist(), "std": np.sqrt(evals).tolist()},
            "source": "benchmarks/bench_loader.py synthetic (random pixels)"}
    with open(os.path.join(root, "classes.json"), "w") as f:
        json.dump([f"class{i:04d}" for i in range(classes)], f)
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    open(os.path.join(root, COMPLETE), "w").close()
    return root


def prepare_from_images(root: str, n_images: int, size: int, classes: int, shard_size: int, seed: int = 0) -> str:
    """The same through the prepare tool, from generated PNG files (slower; the fallback)."""
    from PIL import Image

    from alexnet_cuda import prepare as P

    rng = np.random.default_rng(seed)
    src = os.path.join(root, "src")
    for i in range(n_images):
        d = os.path.join(src, "train", f"class{i % classes:04d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(d, f"{i:06d}.png"))
    dst = os.path.join(root, "prepared")
    P.prepare(src, dst, size=size, shard_size=shard_size, progress=False, log=lambda *a, **k: None)
    return dst


def open_data(D, root_tmp: str, args_data, n_images, size, classes, shard_size, seed, notes):
    if args_data:
        return D.PreparedData(args_data), f"prepared folder {args_data}"
    what = f"{n_images} images {size}x{size}"
    try:
        root = write_prepared(os.path.join(root_tmp, "np"), n_images, size, classes, shard_size, seed)
        return D.PreparedData(root), f"synthetic shards written with NumPy ({what})"
    except Exception as e:
        notes.append(f"NumPy-written shards rejected by the loader ({H._error_text(e)}); using the prepare tool")
    root = prepare_from_images(os.path.join(root_tmp, "pp"), n_images, size, classes, shard_size, seed)
    return D.PreparedData(root), f"synthetic images through alexnet_cuda.prepare ({what})"


# ---------------------------------------------------------------------------------------------------
# The augment_batch op (a kernel like the others)


def augment_case(ctx: H.Context, size: int, crop: int):
    ops = ax.ops
    N = ctx.batch

    def setup(ctx):
        rng = ctx.rng(1000)
        st = dict(images=rng.integers(0, 256, (N, size, size, 3), dtype=np.uint8),
                  offsets=rng.integers(0, size - crop + 1, (N, 2)).astype(np.int32),
                  flips=rng.integers(0, 2, N).astype(np.uint8), light=H.randn(rng, (N, 3), 10.0),
                  mean=(rng.random((3, size, size), dtype=np.float32) * 255).astype(np.float32), picks=ctx.picks(N))
        for k in ("images", "offsets", "flips", "light", "mean"):
            st[k + "t"] = ctx.dev(st[k])
        return st

    def run(st):
        return ops.augment_batch(st["imagest"], st["offsetst"], st["flipst"], st["lightt"], st["meant"], crop)

    def validate(ctx, st):
        pk = st["picks"]
        ref = ctx.ref.augment_batch(st["images"][pk], st["offsets"][pk], st["flips"][pk], f64(st["light"][pk]),
                                    f64(st["mean"]), crop)
        return {"out": run(st).numpy()[pk]}, {"out": ref}

    # reads the crop windows (uint8) and the mean's window, writes float32
    nbytes = N * crop * crop * 3 * (1 + 4) + 3 * crop * crop * 4
    return H.Case("loader", "augment_batch", "forward", f"{N}x{size}x{size}x3 -> {N}x3x{crop}x{crop}", setup=setup,
                  validate=validate, run=run, tol=H.TOL_ELEMENTWISE, bytes=nbytes,
                  note="no PyTorch equivalent op: not compared")


# ---------------------------------------------------------------------------------------------------
# The loader


def validate_loader_batch(ctx, D, loader) -> dict:
    """Recompute batch 0 of epoch 0 from its documented parts with the reference augment_batch."""
    x, y = loader.batch(0, 0)
    idx = loader.order(0)[:loader.batch_size]
    offsets, flips, alphas = loader.batch_params(0, 0, len(idx))
    light = D.lighting_shift(alphas, loader.eigenvectors, loader.magnitudes)
    ref = ctx.ref.augment_batch(loader.split.images(idx), offsets, flips, f64(light), f64(loader.data.mean),
                                loader.crop)
    return H.compare({"images": x, "labels": y}, {"images": ref, "labels": loader.split.labels[idx]}, H.TOL_ELEMENTWISE)


def loader_rows(ctx: H.Context, args, log=print):
    N = ctx.batch
    smoke = ctx.smoke
    size, crop = (40, 32) if ctx.config_name == "tiny" else (256, 224)
    n_batches = args.batches or (3 if smoke else 16)
    n_images = N * (n_batches + 1)
    shape = f"batch {N}, {size}x{size} -> crop {crop}"
    r_epoch = H.new_row("loader", "TrainLoader.epoch", "prefetch thread", shape, tol=H.TOL_ELEMENTWISE)
    r_batch = H.new_row("loader", "TrainLoader.batch", "synchronous", shape, tol=H.TOL_ELEMENTWISE)
    rows = [r_epoch, r_batch]
    try:
        from alexnet_cuda import data as D

        D.TrainLoader, D.PreparedData  # noqa: B018 - the two names the benchmark drives
    except Exception as e:
        for r in rows:
            r["status"] = f"loader unavailable: {H._error_text(e)}"
        return rows
    if ctx.ref is None:
        for r in rows:
            r["status"] = f"not validated: reference unavailable ({ctx.ref_error}); no time reported"
        return rows
    tmp = tempfile.mkdtemp(prefix="alexnet_bench_loader_")
    try:
        data, source = open_data(D, tmp, args.data, n_images, size, 1000 if not smoke else 10, max(N * 4, 64),
                                 ctx.seed, ctx.notes)
        crop = min(crop, data.size)
        loader = D.TrainLoader(data, N, crop, seed=ctx.seed)
        ctx.notes.append(f"loader data: {source}")
        check = validate_loader_batch(ctx, D, loader)
        for r in rows:
            r.update(rel_err=check["rel_err"], validated=check["ok"], check="batch 0 recomputed with the reference")
        log(f"  validation: loader batch vs reference recomputation: {check['detail']}")
        if not check["ok"]:
            for r in rows:
                r["status"] = f"FAILED validation ({check['detail']}): no time reported"
            return rows
        nb = min(n_batches, loader.batches_per_epoch)
        # synchronous batches: median per batch
        times = []
        for b in range(nb):
            t0 = time.perf_counter()
            loader.batch(1, b)
            times.append((time.perf_counter() - t0) * 1e3)
        r_batch.update(status="ok", our_ms=statistics.median(times[1:] or times))
        # the prefetching epoch iterator: total wall time over the epoch, after its first batch
        t_first, count = None, 0
        it = loader.epoch(2)
        for _b, _x, _y in it:
            if t_first is None:
                t_first = time.perf_counter()
            else:
                count += 1
        total = time.perf_counter() - t_first if t_first else 0.0
        if count:
            r_epoch.update(status="ok", our_ms=total / count * 1e3)
        else:
            r_epoch["status"] = "error: the epoch held a single batch"
        for r in rows:
            if r["our_ms"]:
                r["images_per_s"] = N / r["our_ms"] * 1e3
                if ctx.timing_claims:
                    log(f"  {r['op']} ({r['pass_']}): {r['our_ms']:.2f} ms/batch, {r['images_per_s']:.0f} images/s")
    except Exception as e:
        for r in rows:
            if r["status"] != "ok":
                r["status"] = f"error: {H._error_text(e)}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def markdown_section(doc: dict) -> str:
    rows = [r for r in doc["rows"] if r["family"] == "loader" and r.get("images_per_s")]
    if not rows or doc["mode"] == "smoke":
        return ""
    out = ["### Data loader (CPU side)", "", "| loader | shape | ms/batch | images/s |", "|---|---|---|---|"]
    out += [f"| {r['op']} ({r['pass_']}) | {r['shape']} | {r['our_ms']:.2f} | {r['images_per_s']:.0f} |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    p = H.arg_parser("Data loader and augment_batch")
    p.add_argument("--data", default=None, help="a prepared folder to read (default: synthetic shards in a temp dir)")
    p.add_argument("--batches", type=int, default=None, help="batches per timed epoch (default 16; 3 in smoke)")
    args = p.parse_args(argv)
    ctx = H.make_context(args)
    print(f"Data loader: device {ctx.device} ({ctx.device_info.get('name')}), batch {ctx.batch}")
    size, crop = (40, 32) if ctx.config_name == "tiny" else (256, 224)
    rows = H.run_cases(ctx, [augment_case(ctx, size, crop)]) + loader_rows(ctx, args)
    doc = H.document(ctx, "loader", rows)
    section = markdown_section(doc)
    if section:
        doc["markdown_sections"] = [section]
    doc["written"] = H.write_results(doc, H.default_out(args), "loader", "Data loader", plot=not args.no_plot)
    return doc


if __name__ == "__main__":
    main()
