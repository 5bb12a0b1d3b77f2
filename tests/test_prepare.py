"""prepare: shards, labels, exact mean and PCA against NumPy, corrupt files and empty classes, resuming,
refusing to overwrite, flat validation folders with a label file."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from alexnet_cuda import prepare as prep
from alexnet_cuda.synthetic import make_synthetic

CLASSES4 = ("disk", "hstripes", "ring", "triangle")


def _tree(root, train=5, val=2, classes=CLASSES4, seed=0):
    make_synthetic(str(root), seed=seed, train_per_class=train, val_per_class=val, classes=classes)
    return str(root)


def _read_split(dst, split):
    meta = json.load(open(os.path.join(dst, "meta.json")))
    imgs = [np.load(os.path.join(dst, s["images"])) for s in meta["shards"][split]]
    labs = [np.load(os.path.join(dst, s["labels"])) for s in meta["shards"][split]]
    return np.concatenate(imgs), np.concatenate(labs)


def _run(argv, capsys):
    rc = prep.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_shards_labels_mean_and_pca_against_numpy(tmp_path, capsys):
    src = _tree(tmp_path / "src", train=5, val=2)
    dst = str(tmp_path / "dst")
    rc, out, err = _run([src, dst, "--size", "12", "--shard-size", "7", "--workers", "0"], capsys)
    assert rc == 0, err
    assert "20 train, 8 val images, 4 classes" in out and "skipped 0" in out
    assert json.load(open(os.path.join(dst, "classes.json"))) == list(CLASSES4)
    meta = json.load(open(os.path.join(dst, "meta.json")))
    assert [s["count"] for s in meta["shards"]["train"]] == [7, 7, 6]
    assert os.path.exists(os.path.join(dst, prep.COMPLETE))

    x, y = _read_split(dst, "train")
    assert x.shape == (20, 12, 12, 3) and x.dtype == np.uint8 and y.dtype == np.int32
    # Every stored image is its source file, preprocessed, in sorted order with its folder's label.
    files = [(os.path.join(src, "train", c, f), i) for i, c in enumerate(CLASSES4)
             for f in sorted(os.listdir(os.path.join(src, "train", c)))]
    for k, (path, label) in enumerate(files):
        np.testing.assert_array_equal(x[k], prep.load_image(path, 12))
        assert y[k] == label
    xv, yv = _read_split(dst, "val")
    assert xv.shape == (8, 12, 12, 3) and yv.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]

    # Mean image (3, S, S) in 0..255 units.
    mean = np.load(os.path.join(dst, "mean.npy"))
    ref_mean = x.astype(np.float64).mean(0).transpose(2, 0, 1)
    assert mean.dtype == np.float32 and mean.shape == (3, 12, 12)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=0)

    # PCA of the 3x3 covariance of all training pixels.
    pix = x.reshape(-1, 3).astype(np.float64)
    cov = np.cov(pix.T, bias=True)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    pca = meta["pca"]
    got_vals, got_vecs = np.array(pca["eigenvalues"]), np.array(pca["eigenvectors"])
    assert np.all(np.diff(got_vals) <= 0)
    np.testing.assert_allclose(got_vals, evals, rtol=1e-9)
    np.testing.assert_allclose(np.array(pca["std"]), np.sqrt(evals), rtol=1e-9)
    np.testing.assert_allclose(np.array(pca["covariance"]), cov, rtol=1e-9)
    for i in range(3):  # same axis up to sign; our sign makes the components sum >= 0
        assert abs(abs(got_vecs[:, i] @ evecs[:, i]) - 1) < 1e-9
        assert got_vecs[:, i].sum() >= 0
    np.testing.assert_allclose(got_vecs @ np.diag(got_vals) @ got_vecs.T, cov, rtol=1e-9)


def test_load_image_rescales_shorter_side_and_crops_center(tmp_path, rng):
    arr = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # h=20, w=40
    path = str(tmp_path / "wide.png")
    Image.fromarray(arr).save(path)
    got = prep.load_image(path, 10)
    ref = np.asarray(Image.fromarray(arr).resize((20, 10), Image.BILINEAR))[:, 5:15]
    np.testing.assert_array_equal(got, ref)
    tall = rng.integers(0, 256, (33, 11, 3), dtype=np.uint8)
    Image.fromarray(tall).save(path)
    got = prep.load_image(path, 11)  # already the right width: no resampling, central 11 rows
    np.testing.assert_array_equal(got, tall[11:22])
    gray = str(tmp_path / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 50), dtype=np.uint8), "L").save(gray)
    assert prep.load_image(gray, 16).shape == (16, 16, 3)


def test_corrupt_files_and_empty_class_are_reported_not_fatal(tmp_path, capsys):
    src = _tree(tmp_path / "src", train=3, val=1)
    train = os.path.join(src, "train")
    os.makedirs(os.path.join(train, "empty_class"))  # sorts between hstripes and ring
    with open(os.path.join(train, "disk", "garbage.jpg"), "wb") as f:
        f.write(os.urandom(300))
    good = open(os.path.join(train, "ring", "ring_00000.jpg"), "rb").read()
    with open(os.path.join(train, "ring", "truncated.jpg"), "wb") as f:
        f.write(good[: len(good) // 2])
    with open(os.path.join(train, "triangle", "notes.txt"), "w") as f:
        f.write("not an image")
    with open(os.path.join(train, "triangle", ".DS_Store"), "wb") as f:
        f.write(b"\0\1")
    dst = str(tmp_path / "dst")
    rc, out, err = _run([src, dst, "--size", "10", "--workers", "0", "--no-progress"], capsys)
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    assert "skipped 3 unreadable file(s)" in out and "1 empty class folder(s) kept: empty_class" in out
    classes = json.load(open(os.path.join(dst, "classes.json")))
    assert classes == ["disk", "empty_class", "hstripes", "ring", "triangle"]
    report = json.load(open(os.path.join(dst, "report.json")))
    skipped = sorted(s["path"] for s in report["skipped"])
    assert skipped == sorted(os.path.join("train", *p) for p in
                             (("disk", "garbage.jpg"), ("ring", "truncated.jpg"), ("triangle", "notes.txt")))
    assert all(s["error"] for s in report["skipped"])
    assert report["empty_classes"] == ["empty_class"]
    assert [i["path"] for i in report["ignored"]] == [os.path.join("train", "triangle", ".DS_Store")]
    x, y = _read_split(dst, "train")
    assert len(x) == 12 and sorted(set(y.tolist())) == [0, 2, 3, 4]  # labels stay aligned past the empty class
    assert (y == 3).sum() == 3  # the truncated ring was dropped, the three good ones kept


def test_resume_after_interruption_keeps_finished_shards(tmp_path, capsys, monkeypatch):
    src = _tree(tmp_path / "src", train=4, val=2)
    ref = str(tmp_path / "ref")
    assert prep.prepare(src, ref, size=10, shard_size=5, workers=0, progress=False)["counts"]["train"] == 16

    dst = str(tmp_path / "dst")
    real = prep.process_shard
    calls = []

    def interrupt_on_third(task, tick=None):
        calls.append((task[2], task[3]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task, tick)

    monkeypatch.setattr(prep, "process_shard", interrupt_on_third)
    rc, out, err = _run([src, dst, "--size", "10", "--shard-size", "5", "--workers", "0"], capsys)
    assert rc == 130 and "rerun the same command" in err and "Traceback" not in err
    assert not os.path.exists(os.path.join(dst, prep.COMPLETE))
    assert os.path.exists(os.path.join(dst, "train_00001_stats.npz"))
    # A rerun with other settings is refused rather than mixing two preparations.
    rc, out, err = _run([src, dst, "--size", "11", "--shard-size", "5", "--workers", "0"], capsys)
    assert rc == 1 and "other settings" in err and len(err.strip().splitlines()) == 1

    calls.clear()
    monkeypatch.setattr(prep, "process_shard", lambda task, tick=None: (calls.append((task[2], task[3])), real(task, tick))[1])
    rc, out, err = _run([src, dst, "--size", "10", "--shard-size", "5", "--workers", "0"], capsys)
    assert rc == 0, err
    assert calls == [("train", 2), ("train", 3), ("val", 0), ("val", 1)]  # shards 0 and 1 were kept
    for split in ("train", "val"):
        for a, b in zip(_read_split(dst, split), _read_split(ref, split)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.load(os.path.join(dst, "mean.npy")), np.load(os.path.join(ref, "mean.npy")))
    assert json.load(open(os.path.join(dst, "meta.json")))["pca"] == json.load(open(os.path.join(ref, "meta.json")))["pca"]


def test_finished_output_is_not_overwritten_without_force(tmp_path, capsys):
    src = _tree(tmp_path / "src", train=2, val=0, classes=("disk", "ring"))
    dst = str(tmp_path / "dst")
    assert _run([src, dst, "--size", "8", "--workers", "0"], capsys)[0] == 0
    before = os.path.getmtime(os.path.join(dst, "meta.json"))
    rc, out, err = _run([src, dst, "--size", "8", "--workers", "0"], capsys)
    assert rc == 1 and err.strip().splitlines() == [f"alexnet_cuda.prepare: error: {os.path.abspath(dst)} already "
                                                    "holds a finished preparation; use --force to overwrite it"]
    assert os.path.getmtime(os.path.join(dst, "meta.json")) == before
    rc, out, err = _run([src, dst, "--size", "9", "--workers", "0", "--force"], capsys)
    assert rc == 0 and json.load(open(os.path.join(dst, "meta.json")))["size"] == 9
    assert not os.path.exists(os.path.join(dst, "val_00000.npy"))


def test_worker_processes_give_the_same_output(tmp_path):
    src = _tree(tmp_path / "src", train=4, val=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    prep.prepare(src, a, size=10, shard_size=3, workers=0, progress=False)
    prep.prepare(src, b, size=10, shard_size=3, workers=2, progress=False)
    for split in ("train", "val"):
        for u, v in zip(_read_split(a, split), _read_split(b, split)):
            np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(np.load(os.path.join(a, "mean.npy")), np.load(os.path.join(b, "mean.npy")))


def _flat_val(tmp_path):
    src = _tree(tmp_path / "src", train=2, val=0, classes=("disk", "ring", "triangle"))
    val = os.path.join(src, "val")
    os.makedirs(val)
    true = [2, 0, 1, 1]
    for i, c in enumerate(true):
        Image.fromarray(np.full((14, 14, 3), 60 * (c + 1), np.uint8)).save(os.path.join(val, f"v_{i:03d}.JPEG"))
    return src, true


def test_flat_validation_folder_with_label_file(tmp_path, capsys):
    src, true = _flat_val(tmp_path)
    labels = tmp_path / "gt.txt"
    labels.write_text("".join(f"{c + 1}\n" for c in true))  # 1-based into the sorted class list
    dst = str(tmp_path / "dst")
    rc, out, err = _run([src, dst, "--size", "8", "--workers", "0", "--val-labels", str(labels)], capsys)
    assert rc == 0, err
    assert _read_split(dst, "val")[1].tolist() == true

    names = tmp_path / "names.txt"  # class names work too
    names.write_text("triangle\ndisk\nring\nring\n")
    order = tmp_path / "order.txt"  # integers into another class order (the ILSVRC devkit's ids)
    order.write_text("ring extra words\ntriangle\ndisk\n")
    ids = tmp_path / "ids.txt"
    ids.write_text("2\n3\n1\n1\n")
    for extra in (["--val-labels", str(names)], ["--val-labels", str(ids), "--val-label-order", str(order)]):
        d = str(tmp_path / ("d" + str(len(extra))))
        rc, out, err = _run([src, d, "--size", "8", "--workers", "0", *extra], capsys)
        assert rc == 0, err
        assert _read_split(d, "val")[1].tolist() == true

    bad = tmp_path / "bad.txt"
    bad.write_text("1\n2\n")
    rc, out, err = _run([src, str(tmp_path / "e"), "--size", "8", "--val-labels", str(bad)], capsys)
    assert rc == 1 and "has 2 labels but the validation folder has 4 files" in err
    bad.write_text("1\n2\n9\n1\n")
    rc, out, err = _run([src, str(tmp_path / "f"), "--size", "8", "--val-labels", str(bad)], capsys)
    assert rc == 1 and "label 9 is outside 1..3" in err
    rc, out, err = _run([src, str(tmp_path / "g"), "--size", "8"], capsys)
    assert rc == 1 and "--val-labels" in err


@pytest.mark.parametrize("case", ["missing_src", "no_train", "size0", "inside_src", "not_empty"])
def test_bad_arguments_one_line(tmp_path, capsys, case):
    src = str(tmp_path / "src")
    os.makedirs(os.path.join(src, "other"))
    argv = {"missing_src": [str(tmp_path / "nope"), str(tmp_path / "d")],
            "no_train": [src, str(tmp_path / "d")],
            "size0": [src, str(tmp_path / "d"), "--size", "0"],
            "inside_src": [src, os.path.join(src, "out")],
            "not_empty": [src, os.path.join(src, "..")]}[case]
    if case in ("inside_src", "not_empty"):
        _tree(src, train=1, val=0, classes=("disk",))
    try:
        rc = prep.main(argv)
    except SystemExit as e:  # argparse-level errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc not in (0, None)
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err


def test_ilsvrc_integer_labels_without_their_order_are_refused(tmp_path, capsys):
    """wnid class folders + integer ground truth + no --val-label-order: the labels would be read in sorted
    order (wrong for ILSVRC-2012), so prepare refuses and names --val-label-order; with it, or with wnid
    labels, the same tree prepares."""
    wnids = ("n01440764", "n01443537", "n01484850")
    src = _tree(tmp_path / "src", train=2, val=0, classes=("disk", "ring", "triangle"))
    for old, new in zip(("disk", "ring", "triangle"), wnids):
        os.rename(os.path.join(src, "train", old), os.path.join(src, "train", new))
    val = os.path.join(src, "val")
    os.makedirs(val)
    true = [2, 0, 1]
    for i, c in enumerate(true):
        Image.fromarray(np.full((14, 14, 3), 60 * (c + 1), np.uint8)).save(os.path.join(val, f"v_{i:03d}.JPEG"))
    ids = tmp_path / "gt.txt"
    ids.write_text("".join(f"{c + 1}\n" for c in true))
    rc, out, err = _run([src, str(tmp_path / "a"), "--size", "8", "--workers", "0", "--val-labels", str(ids)], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "--val-label-order FILE" in err and "ILSVRC2012_ID" in err
    assert not os.path.exists(tmp_path / "a" / "COMPLETE")
    order = tmp_path / "order.txt"
    order.write_text("".join(w + "\n" for w in wnids))
    rc, out, err = _run([src, str(tmp_path / "b"), "--size", "8", "--workers", "0", "--val-labels", str(ids),
                         "--val-label-order", str(order)], capsys)
    assert rc == 0, err
    assert _read_split(str(tmp_path / "b"), "val")[1].tolist() == true
    names = tmp_path / "names.txt"
    names.write_text("".join(wnids[c] + "\n" for c in true))
    rc, out, err = _run([src, str(tmp_path / "c"), "--size", "8", "--workers", "0", "--val-labels", str(names)], capsys)
    assert rc == 0, err
    assert _read_split(str(tmp_path / "c"), "val")[1].tolist() == true
