"""The loader: crops, flips, PCA lighting and mean subtraction against NumPy; seeded, resumable order
and draws; the ten crops' positions; prefetching."""
import os
import threading

import numpy as np
import pytest

from alexnet_cuda import data as D
from alexnet_cuda.prepare import prepare
from alexnet_cuda.synthetic import make_synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic(str(root / "src"), seed=3, train_per_class=6, val_per_class=3,
                   classes=("checker", "disk", "dots", "ring", "vstripes"))
    prepare(str(root / "src"), str(root / "dst"), size=20, shard_size=8, workers=0, progress=False)
    return D.PreparedData(str(root / "dst"))


def _expected(images, offsets, flips, light, mean, crop):
    """NumPy float64 reference of the augmentation: out[n,c,y,x] = img[n,y0+y,xs,c] - mean[c,y0+y,xs] + light[n,c]."""
    out = np.empty((len(images), 3, crop, crop))
    for n in range(len(images)):
        y0, x0 = offsets[n]
        xs = x0 + (crop - 1 - np.arange(crop) if flips[n] else np.arange(crop))
        ys = y0 + np.arange(crop)
        patch = images[n][ys][:, xs].astype(np.float64).transpose(2, 0, 1)
        out[n] = patch - mean.astype(np.float64)[:, ys][:, :, xs] + np.asarray(light[n], np.float64)[:, None, None]
    return out


def _rel(a, b):
    return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


def test_train_batch_matches_numpy(prepared):
    loader = D.TrainLoader(prepared, batch_size=7, crop=16, seed=5, pca_std=0.1, prefetch_depth=0)
    order = loader.order(2)
    x, y = loader.batch(2, 1)
    idx = order[7:14]
    offsets, flips, alphas = loader.batch_params(2, 1, 7)
    imgs = prepared.split("train").images(idx)
    # The paper's lighting, written out: sum_i p_i * alpha_i * lambda_i, lambda_i = sqrt(eigenvalue_i).
    p, lam = prepared.pca_eigenvectors, np.sqrt(prepared.pca_eigenvalues)
    light = np.array([sum(p[:, i] * alphas[n, i] * lam[i] for i in range(3)) for n in range(7)])
    ref = _expected(imgs, offsets, flips, light, prepared.mean, 16)
    assert x.dtype == np.float32 and x.shape == (7, 3, 16, 16) and np.isfinite(x).all()
    assert _rel(x, ref) < 1e-5
    np.testing.assert_array_equal(y, prepared.split("train").labels[idx])
    assert y.dtype == np.int32
    assert np.abs(light).max() > 0.1  # the lighting is really applied (and so really tested)


def test_augmenter_flips_and_offsets_against_numpy(prepared, rng):
    imgs = rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (3, 20, 20)).astype(np.float32)
    aug = D.Augmenter(mean, 13)
    offsets = rng.integers(0, 8, (5, 2)).astype(np.int32)
    flips = np.array([0, 1, 1, 0, 1], np.uint8)
    light = rng.normal(0, 5, (5, 3)).astype(np.float32)
    got = aug(imgs, offsets, flips, light)
    assert _rel(got, _expected(imgs, offsets, flips, light, mean, 13)) < 1e-5
    # A flipped view is the mirror of the unflipped one when the mean is mirror-symmetric within it.
    sym = np.zeros_like(mean)
    a = D.Augmenter(sym, 13)
    plain = a(imgs, offsets, np.zeros(5, np.uint8))
    mirrored = a(imgs, offsets, np.ones(5, np.uint8))
    np.testing.assert_array_equal(mirrored, plain[..., ::-1])


def test_draws_are_seeded_and_resumable(prepared):
    a = D.TrainLoader(prepared, batch_size=4, crop=16, seed=11, prefetch_depth=2)
    b = D.TrainLoader(prepared, batch_size=4, crop=16, seed=11, prefetch_depth=0)
    c = D.TrainLoader(prepared, batch_size=4, crop=16, seed=12, prefetch_depth=0)
    n = len(a.split)
    assert a.batches_per_epoch == n // 4
    assert sorted(a.order(0).tolist()) == list(range(n))
    assert not np.array_equal(a.order(0), a.order(1))
    assert np.array_equal(a.order(3), b.order(3)) and not np.array_equal(a.order(3), c.order(3))
    full = list(a.epoch(1))
    assert [bb for bb, _, _ in full] == list(range(a.batches_per_epoch))
    tail = list(b.epoch(1, start=3))  # resuming at batch 3 gives exactly the rest of the epoch
    assert len(tail) == len(full) - 3
    for (b1, x1, y1), (b2, x2, y2) in zip(full[3:], tail):
        assert b1 == b2
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x_other, _ = c.batch(1, 3)
    assert not np.array_equal(x_other, full[3][1])


def test_draw_distributions(prepared):
    loader = D.TrainLoader(prepared, batch_size=4, crop=16, seed=0, pca_std=0.1, prefetch_depth=0)
    offs, flips, alphas = [], [], []
    for b in range(300):
        o, f, al = loader.batch_params(0, b, 4)
        offs.append(o), flips.append(f), alphas.append(al)
    offs, flips, alphas = np.concatenate(offs), np.concatenate(flips), np.concatenate(alphas)
    assert offs.min() == 0 and offs.max() == 20 - 16  # every offset that fits, no more
    assert set(np.unique(offs[:, 0])) == set(range(5)) and set(np.unique(offs[:, 1])) == set(range(5))
    assert 0.4 < flips.mean() < 0.6
    assert abs(alphas.std() - 0.1) < 0.01 and abs(alphas.mean()) < 0.01
    none = D.TrainLoader(prepared, batch_size=4, crop=16, seed=0, pca_std=0.0, flip=False, prefetch_depth=0)
    o2, f2, a2 = none.batch_params(0, 7, 4)
    np.testing.assert_array_equal(o2, loader.batch_params(0, 7, 4)[0])
    assert not f2.any() and not a2.any()


def test_ten_crop_positions(rng):
    H, W, c = 9, 12, 5
    offsets, flips = D.ten_crop_params(H, W, c)
    assert offsets.tolist() == [[0, 0], [0, 7], [4, 0], [4, 7], [2, 3]] * 2
    assert flips.tolist() == [0] * 5 + [1] * 5
    # Images whose pixels encode their position: each view starts where it should.
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([yy, xx, (yy * W + xx) % 256], -1).astype(np.uint8)[None].repeat(2, 0)
    aug = D.Augmenter(np.zeros((3, H, W), np.float32), c)
    views = list(aug.ten_crops(img))
    assert len(views) == 10
    for k, (y0, x0) in enumerate(offsets):
        v = views[k][1]
        if flips[k]:
            assert (v[0, 0, 0], v[1, 0, c - 1]) == (y0, x0)  # mirrored: the left edge is at the right
            np.testing.assert_array_equal(v, views[k - 5][1][..., ::-1])
        else:
            assert (v[0, 0, 0], v[1, 0, 0]) == (y0, x0)
            np.testing.assert_array_equal(v, img[1, y0:y0 + c, x0:x0 + c].transpose(2, 0, 1).astype(np.float32))
    np.testing.assert_array_equal(aug.center(img), views[4])


def test_average_ten_crops_and_topk(rng):
    probs = rng.random((10, 6, 4))
    np.testing.assert_allclose(D.average_ten_crops(list(probs)), probs.sum(0) / 10, rtol=1e-12)
    with pytest.raises(ValueError):
        D.average_ten_crops(probs[:9])
    p = np.array([[0.1, 0.5, 0.2, 0.2], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.3, 0.2]])
    assert D.topk_hits(p, np.array([1, 2, 3]), 1) == 1
    assert D.topk_hits(p, np.array([1, 2, 3]), 2) == 1
    assert D.topk_hits(p, np.array([1, 1, 3]), 5) == 3


def test_eval_loader_covers_every_image_once(prepared):
    ev = D.EvalLoader(prepared, batch_size=4, crop=16, split="val", mode="center")
    val = prepared.split("val")
    xs, ys = zip(*list(ev))
    assert [len(y) for y in ys] == [4, 4, 4, 3] and len(ev) == 4
    x = np.concatenate(xs)
    imgs = val.images(np.arange(len(val)))
    ref = _expected(imgs, np.full((15, 2), 2), np.zeros(15, np.uint8), np.zeros((15, 3)), prepared.mean, 16)
    assert _rel(x, ref) < 1e-5
    np.testing.assert_array_equal(np.concatenate(ys), val.labels)


def test_split_gathers_across_shards(prepared):
    tr = prepared.split("train")
    idx = np.array([29, 0, 8, 7, 15, 16, 3])
    allx = np.concatenate([np.load(p) for p, _ in tr._paths])
    np.testing.assert_array_equal(tr.images(idx), allx[idx])
    tr._max_open = 1  # with one mapping at a time (shards closed and reopened) the gather is the same
    tr._open.clear()
    np.testing.assert_array_equal(tr.images(idx), allx[idx])
    assert len(tr._open) == 1
    tr._max_open = 1000
    with pytest.raises(IndexError):
        tr.images([30])


def test_prefetch_order_errors_and_clean_stop():
    assert list(D.prefetch(lambda: iter(range(50)), depth=3)) == list(range(50))

    def boom():
        yield 1
        raise RuntimeError("producer failed")

    it = D.prefetch(boom, depth=2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed"):
        next(it)
    before = threading.active_count()
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = D.prefetch(endless, depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    it.close()  # stops and joins the thread
    assert threading.active_count() == before
    assert len(produced) <= 5 + 2 + 2  # bounded: a few ahead, no more


def test_prefetch_map_keeps_order_and_stops_cleanly():
    import time

    def slow_square(i):
        time.sleep(0.002 * ((7 * i) % 5))  # finishes out of order
        return i * i

    assert list(D.prefetch_map(slow_square, range(40), depth=4, workers=3)) == [i * i for i in range(40)]
    assert list(D.prefetch_map(slow_square, range(5), depth=0)) == [i * i for i in range(5)]
    before = threading.active_count()
    started = []

    def record(i):
        started.append(i)
        return i

    it = D.prefetch_map(record, range(1000), depth=3, workers=2)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    it.close()
    assert threading.active_count() == before
    assert len(started) <= 4 + 3  # bounded look-ahead; the rest was never built

    def fails(i):
        if i == 2:
            raise RuntimeError("bad batch")
        return i

    with pytest.raises(RuntimeError, match="bad batch"):
        list(D.prefetch_map(fails, range(5), depth=2, workers=2))


def test_loader_threads_do_not_change_batches(prepared):
    a = D.TrainLoader(prepared, batch_size=4, crop=16, seed=2, prefetch_depth=0)
    b = D.TrainLoader(prepared, batch_size=4, crop=16, seed=2, prefetch_depth=5, threads=3)
    for (b1, x1, y1), (b2, x2, y2) in zip(a.epoch(4), b.epoch(4)):
        assert b1 == b2
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_loader_argument_errors(prepared):
    with pytest.raises(ValueError, match="larger than the train set"):
        D.TrainLoader(prepared, batch_size=1000, crop=16)
    with pytest.raises(ValueError, match="crop 21"):
        D.TrainLoader(prepared, batch_size=4, crop=21)
    with pytest.raises(ValueError, match="no 'test' images"):
        prepared.split("test")
    with pytest.raises(ValueError, match="not a finished prepared folder"):
        D.PreparedData(prepared.root + "/..")


def test_crafted_prepared_folder_is_refused(prepared, tmp_path):
    """A prepared folder is input too: labels out of range (also ones that an int32 cast would wrap into
    range), file names leading out of the folder, and a malformed meta.json give one ValueError each."""
    import json
    import shutil

    root = str(tmp_path / "p")
    shutil.copytree(prepared.root, root)
    meta = json.load(open(os.path.join(root, "meta.json")))
    labels = os.path.join(root, meta["shards"]["train"][0]["labels"])
    good = np.load(labels)
    for bad, expect in ((good.astype(np.int64) + 2 ** 32, "outside 0..2147483647"),
                        (np.full_like(good, prepared.num_classes), "labels must be in 0.."),
                        (good.astype(np.float32), "expected integers")):
        np.save(labels, bad)
        with pytest.raises(ValueError, match=expect):
            D.PreparedData(root)
    np.save(labels, good)
    D.PreparedData(root)
    for change, expect in ((lambda m: m.update(mean="../../etc/passwd"), "plain file name"),
                           (lambda m: m.pop("pca"), "malformed meta.json"),
                           (lambda m: m.update(size="36"), "size must be an integer")):
        m = json.loads(json.dumps(meta))
        change(m)
        json.dump(m, open(os.path.join(root, "meta.json"), "w"))
        with pytest.raises(ValueError, match=expect):
            D.PreparedData(root)


def test_raw_batches_are_what_batch_augments(prepared):
    # The uint8 path hands the stored images and the draws; augmenting them gives batch() bit for bit.
    loader = D.TrainLoader(prepared, batch_size=5, crop=16, seed=9, pca_std=0.1, prefetch_depth=2, threads=2)
    order = loader.order(1)
    raw, y = loader.raw_batch(1, 2)
    x, y2 = loader.batch(1, 2)
    idx = order[10:15]
    offsets, flips, _ = loader.batch_params(1, 2, 5)
    assert isinstance(raw, D.RawBatch)
    assert raw.images.dtype == np.uint8 and raw.images.shape == (5, 20, 20, 3)
    np.testing.assert_array_equal(raw.images, prepared.split("train").images(idx))
    np.testing.assert_array_equal(raw.offsets, offsets)
    np.testing.assert_array_equal(raw.flips, flips)
    assert raw.offsets.dtype == np.int32 and raw.flips.dtype == np.uint8 and raw.light.dtype == np.float32
    assert raw.light.shape == (5, 3) and np.abs(raw.light).max() > 0.1
    np.testing.assert_array_equal(loader.augment(*raw), x)
    np.testing.assert_array_equal(y, y2)
    for (b1, r1, y1), (b2, x2, y3) in zip(loader.epoch(1, start=1, raw=True), loader.epoch(1, start=1)):
        assert b1 == b2
        np.testing.assert_array_equal(loader.augment(*r1), x2)
        np.testing.assert_array_equal(y1, y3)


class _Out:
    """Arrays to fill, as a Net staging slot holds them, poisoned so an unwritten element shows."""

    def __init__(self, rng, n, S):
        self.images = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
        self.offsets = rng.integers(-9, 9, (n, 2)).astype(np.int32)
        self.flips = np.full(n, 7, np.uint8)
        self.light = np.full((n, 3), np.nan, np.float32)
        self.labels = np.full(n, -1, np.int32)


@pytest.mark.parametrize("ranks", [1, 2])
def test_raw_batch_into_given_arrays_equals_raw_batch(prepared, rng, ranks):
    # The zero-copy path: the loader writes into the arrays it is given (a Net staging slot's pinned views)
    # exactly what raw_batch returns in new arrays, across shard boundaries and for a rank's slice.
    loader = D.TrainLoader(prepared, batch_size=6, crop=16, seed=4, pca_std=0.1, prefetch_depth=0,
                           rank=ranks - 1, ranks=ranks)
    order = loader.order(3)
    for b in range(loader.batches_per_epoch):
        raw, y = loader.raw_batch(3, b, order)
        out = _Out(rng, loader.local_batch, 20)
        keep = {k: getattr(out, k) for k in ("images", "offsets", "flips", "light", "labels")}
        raw2, y2 = loader.raw_batch(3, b, order, out=out)
        for k, got in zip(("images", "offsets", "flips", "light"), raw2):
            assert got is keep[k]  # written in place, handed back
            np.testing.assert_array_equal(got, getattr(raw, k))
        assert y2 is keep["labels"]
        np.testing.assert_array_equal(y2, y)
    idx = rng.permutation(len(loader.split))[:5]
    target = rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    assert loader.split.images(idx, out=target) is target
    np.testing.assert_array_equal(target, loader.split.images(idx))


def test_raw_batch_out_errors(prepared, rng):
    loader = D.TrainLoader(prepared, batch_size=4, crop=16, seed=4, prefetch_depth=0)
    out = _Out(rng, 4, 20)
    for name, bad, exc, match in [
        ("images", np.zeros((4, 20, 20, 3), np.float32), ValueError, r"'out.images' is float32 \(4, 20, 20, 3\); "
                                                                     r"expected uint8 \(4, 20, 20, 3\)"),
        ("offsets", np.zeros((3, 2), np.int32), ValueError, r"'out.offsets' is int32 \(3, 2\)"),
        ("light", np.zeros((4, 2), np.float32), ValueError, r"'out.light' is float32 \(4, 2\)"),
        ("labels", [0, 0, 0, 0], TypeError, "'out.labels' must be a numpy.ndarray"),
        ("flips", np.zeros((8,), np.uint8)[::2], ValueError, "'out.flips' must be a writable C-contiguous"),
    ]:
        o = _Out(rng, 4, 20)
        setattr(o, name, bad)
        with pytest.raises(exc, match="raw_batch: argument " + match):
            loader.raw_batch(0, 0, out=o)
    ro = _Out(rng, 4, 20)
    ro.light.flags.writeable = False
    with pytest.raises(ValueError, match="'out.light' must be a writable"):
        loader.raw_batch(0, 0, out=ro)
    del out.labels
    with pytest.raises(TypeError, match="raw_batch: argument 'out' has no 'labels'"):
        loader.raw_batch(0, 0, out=out)
    with pytest.raises(ValueError, match=r"images: argument 'out' is uint8 \(2, 20, 20, 3\); expected uint8 \(3,"):
        loader.split.images([0, 1, 2], out=np.zeros((2, 20, 20, 3), np.uint8))
