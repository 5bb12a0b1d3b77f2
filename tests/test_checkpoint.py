"""Checkpoints: exact round trip, atomic writes (an interrupted write leaves the previous checkpoint
loadable and nothing that passes for a checkpoint), damaged files skipped, pruning."""
import os

import numpy as np
import pytest

from alexnet_cuda import checkpoint as ck


def _state(rng, step):
    return {"conv1.t0.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "momentum/conv1.t0.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
            "meta/step": np.array(step, np.int64)}


def _meta(step):
    return {"step": step, "state": {"epoch": 1, "batch": 2, "lr": 0.01, "history": [{"val_loss": 1.25}]},
            "classes": ["a", "b"], "config": {"channels": (1, 2)}}


def test_round_trip_is_exact(tmp_path, rng):
    st = _state(rng, 7)
    mean = rng.uniform(0, 255, (3, 5, 5)).astype(np.float32)
    path = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(7)), st, _meta(7), {"mean": mean})
    meta, net, extra = ck.load_checkpoint(path)
    assert set(net) == set(st)
    for k in st:
        assert net[k].dtype == st[k].dtype
        np.testing.assert_array_equal(net[k], st[k])
    np.testing.assert_array_equal(extra["mean"], mean)
    assert meta["state"] == _meta(7)["state"] and meta["config"] == {"channels": [1, 2]}
    assert meta["format"] == ck.FORMAT and meta["path"] == os.path.abspath(path)
    assert ck.load_checkpoint(str(tmp_path))[0]["step"] == 7  # a folder means its newest checkpoint


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, rng, monkeypatch):
    good = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(1)), _state(rng, 1), _meta(1))
    real_savez = np.savez

    def half_then_fail(f, **arrays):
        import io

        buf = io.BytesIO()
        real_savez(buf, **arrays)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half the bytes reach the disk ...
        raise OSError("disk full (simulated)")  # ... then the write dies

    monkeypatch.setattr(ck.np, "savez", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(2)), _state(rng, 2), _meta(2))
    monkeypatch.setattr(ck.np, "savez", real_savez)
    assert sorted(os.listdir(tmp_path)) == [ck.checkpoint_name(1)]  # no partial file, no temporary left
    assert ck.latest_checkpoint(str(tmp_path)) == good
    assert ck.load_checkpoint(good)[0]["step"] == 1

    # Same, overwriting a checkpoint of the same name: the old one survives whole.
    monkeypatch.setattr(ck.np, "savez", half_then_fail)
    with pytest.raises(OSError):
        ck.save_checkpoint(good, _state(rng, 1), _meta(99))
    monkeypatch.setattr(ck.np, "savez", real_savez)
    assert ck.load_checkpoint(good)[0]["step"] == 1


def test_killed_writer_and_damaged_files_are_never_taken_for_checkpoints(tmp_path, rng):
    one = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(10)), _state(rng, 10), _meta(10))
    two = ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(20)), _state(rng, 20), _meta(20))
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
    assert len(warnings) == 1 and ck.checkpoint_name(30) in warnings[0]
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
        ck.save_checkpoint(str(tmp_path / ck.checkpoint_name(s)), _state(rng, s), _meta(s))
    ck.prune_checkpoints(str(tmp_path), keep=2)
    assert [os.path.basename(p) for p in ck.list_checkpoints(str(tmp_path))] == [ck.checkpoint_name(15),
                                                                               ck.checkpoint_name(20)]
