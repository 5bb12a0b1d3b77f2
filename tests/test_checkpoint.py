"""Checkpoints: exact round trip, atomic writes (an interrupted write leaves the previous checkpoint
loadable and nothing that passes for a checkpoint), damaged files skipped, pruning."""
import os

import numpy as np
import pytest

from alexnet_cuda import checkpoint as ck
from alexnet_cuda.config import tiny_config


def _state(rng, step):
    return {"conv1.t0.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "momentum/conv1.t0.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "meta/step": np.array(step, np.int64)}


SIZE = 5


def _meta(step):
    """Metadata as train.py writes it (every required key; load_checkpoint checks them all)."""
    cfg = tiny_config(num_classes=2, input_size=4, channels=(2, 2, 2, 2, 2), fc=(2, 2))
    return {"step": step, "state": {"epoch": 1, "batch": 2, "step": step, "lr": 0.01, "reductions": 0, "best": None,
                                    "bad_epochs": 0, "history": [{"val_loss": 1.25}],
                                    "acc": {"loss_sum": 0.0, "top1": 0, "top5": 0, "n": 0, "seconds": 0.0}},
            "classes": ["a", "b"], "config": cfg, "train": {"seed": 3, "batch_size": 4, "lr": 0.01},
            "data": {"root": "/nowhere", "size": SIZE, "pca_eigenvalues": [3.0, 2.0, 1.0],
                     "pca_eigenvectors": np.eye(3).tolist(), "pca_std": [1.7, 1.4, 1.0], "demo": None},
            "crop": 4, "devices": "cpu"}


def _mean(rng):
    return rng.uniform(0, 255, (3, SIZE, SIZE)).astype(np.float32)


def test_round_trip_is_exact(tmp_path, rng):
    st = _state(rng, 7)
    mean = _mean(rng)
    path = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(7)), st, _meta(7), {"mean": mean})
    meta, net, extra = ck.load_checkpoint(path)
    assert set(net) == set(st)
    for k in st:
        assert net[k].dtype == st[k].dtype
        np.testing.assert_array_equal(net[k], st[k])
    np.testing.assert_array_equal(extra["mean"], mean)
    assert meta["state"] == _meta(7)["state"] and meta["config"] == _meta(7)["config"]
    assert meta["format"] == ck.FORMAT and meta["path"] == os.path.abspath(path)
    assert ck.load_checkpoint(str(tmp_path))[0]["step"] == 7  # a folder means its newest checkpoint


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, rng, monkeypatch):
    good = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(1)), _state(rng, 1), _meta(1), {"mean": _mean(rng)})
    real_savez = np.savez

    def half_then_fail(f, **arrays):
        import io

        buf = io.BytesIO()
        real_savez(buf, **arrays)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the bytes reach the disk ...
        raise OSError("disk full (simulated)")  # ... then the write dies

    monkeypatch.setattr(ck.np, "savez", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(2)), _state(rng, 2), _meta(2), {"mean": _mean(rng)})
    monkeypatch.setattr(ck.np, "savez", real_savez)
    assert sorted(os.listdir(tmp_path)) == [ck.checkpoint_name(1)]  # no partial file, no temporary left
    assert ck.latest_checkpoint(str(tmp_path)) == good
    assert ck.load_checkpoint(good)[0]["step"] == 1

    # Same, overwriting a checkpoint of the same name: the old one survives whole.
    monkeypatch.setattr(ck.np, "savez", half_then_fail)
    with pytest.raises(OSError):
        ck.save_checkpoint(good, _state(rng, 1), _meta(99), {"mean": _mean(rng)})
    monkeypatch.setattr(ck.np, "savez", real_savez)
    assert ck.load_checkpoint(good)[0]["step"] == 1


def test_killed_writer_and_damaged_files_are_never_taken_for_checkpoints(tmp_path, rng):
    one = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(10)), _state(rng, 10), _meta(10), {"mean": _mean(rng)})
    two = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(20)), _state(rng, 20), _meta(20), {"mean": _mean(rng)})
    blob = open(two, "rb").read()
    # A process killed mid-write leaves its temporary file: it never matches a checkpoint name.
    with open(tmp_path / ".ckpt-abc123.tmp", "wb") as f:
        f.write(blob[:1000])
    assert ck.list_checkpoints(str(tmp_path)) == [one, two]
    # A checkpoint-named file that is damaged (truncated) is skipped in favour of the older whole one.
    with open(tmp_path / ck.checkpoint_name(30), "wb") as f:
        f.write(blob[: len(blob) - 100])
    warnings = []
    assert ck.latest_checkpoint(str(tmp_path), warn=warnings.append) == two
    assert len(warnings) == 2 and ck.checkpoint_name(30) in warnings[0] and "not a readable checkpoint" in warnings[0]
    assert warnings[1] == f"using the newest good checkpoint {two} instead"
    with pytest.raises(ck.CheckpointError, match="not a readable checkpoint"):
        ck.load_checkpoint(str(tmp_path / ck.checkpoint_name(30)))
    with open(tmp_path / "other.npz", "wb") as f:
        np.savez(f, x=np.zeros(3))
    with pytest.raises(ck.CheckpointError, match="not an alexnet_cuda checkpoint"):
        ck.load_checkpoint(str(tmp_path / "other.npz"))
    ck.remove_stale_temporaries(str(tmp_path))
    assert not os.path.exists(tmp_path / ".ckpt-abc123.tmp")


def test_prune_keeps_the_newest(tmp_path, rng):
    for s in (5, 15, 10, 20):
        ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(s)), _state(rng, s), _meta(s), {"mean": _mean(rng)})
    ck.prune_checkpoints(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == [ck.checkpoint_name(15),
                                                                               ck.checkpoint_name(20)]
