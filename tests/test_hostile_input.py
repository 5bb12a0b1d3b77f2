"""Hostile input to the Python side (issue 10): a corpus of crafted checkpoints through every CLI that reads
checkpoints (each run in a process of its own: non-zero exit, one line naming the file and the problem, no
traceback, no signal), checkpoint integrity and --resume auto's fallback, the training CLI's bad arguments
and run-folder safety, and prepare on hostile trees (symlink loops and escapes, FIFOs, a dead worker,
extreme aspect ratios, decompression bombs, oversized settings), the demo cache's temporary folders."""
import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import alexnet_cuda as ax
from alexnet_cuda import checkpoint as ck
from alexnet_cuda import predict, prepare as prep, synthetic, train
from alexnet_cuda.config import alexnet_config, tiny_config

from checkpoint_corpus import build_corpus, member_data_offset, read_members

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = ["--net", "tiny", "--crop", "32", "--batch-size", "4", "--no-progress", "--devices", "cpu",
       "--set", "channels=(8,16,16,16,8)", "--set", "fc=(16,16)"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ALEXNET_CUDA_TRACEBACK", None)
    return env


def _cli(module, *args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", f"alexnet_cuda.{module}", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


def _one_line_error(r, tool, *needles):
    """'' if r is a clean one-line failure of `tool` mentioning every needle, else what is wrong."""
    if r.returncode < 0:
        return f"killed by signal {-r.returncode}"
    if r.returncode == 0:
        return "exit status 0"
    lines = r.stderr.strip().splitlines()
    if "Traceback" in r.stderr or len(lines) != 1:
        return f"not one line: {r.stderr[-600:]!r}"
    if not lines[0].startswith(f"alexnet_cuda.{tool}: error: "):
        return f"unexpected line {lines[0]!r}"
    missing = [n for n in needles if n not in lines[0]]
    return f"{lines[0]!r} lacks {missing}" if missing else ""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A genuine tiny run: prepared data, a run folder with checkpoints at steps 2 and 4, and one image."""
    root = tmp_path_factory.mktemp("hostile")
    src, data, out = str(root / "src"), str(root / "data"), str(root / "run")
    synthetic.make_synthetic(src, seed=3, train_per_class=4, val_per_class=1, classes=("disk", "ring"))
    prep.prepare(src, data, size=36, shard_size=64, workers=0, progress=False)
    assert train.main(["--data", data, "--out", out, "--max-steps", "4", "--checkpoint-every", "2", *NET]) == 0
    cks = ck.list_checkpoints(out)
    assert [os.path.basename(p) for p in cks] == [ck.checkpoint_name(2), ck.checkpoint_name(4)]
    return {"root": root, "data": data, "out": out, "ckpts": cks,
            "image": os.path.join(src, "val", "disk", "disk_00000.jpg")}


@pytest.fixture(scope="module")
def corpus(run):
    return build_corpus(run["ckpts"][-1], str(run["root"] / "corpus"))


def test_genuine_checkpoint_loads_and_runs_through_the_clis(run):
    meta, state, extra = ck.load_checkpoint(run["ckpts"][-1])
    assert meta["step"] == 4 and state["conv1.t0.weight"].dtype == np.float32 and extra["mean"].shape == (3, 36, 36)
    r = _cli("predict", run["ckpts"][-1], run["image"], "--devices", "cpu", "--top", "2")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == run["image"] + ":", r.stderr


def test_crafted_checkpoints_fail_cleanly_in_the_library(run, corpus):
    """Every crafted file is refused by load_checkpoint or, for what only the net's config decides (shapes,
    missing or extra parameters), by Net.load_state_dict, before anything reaches C++."""
    good_meta = ck.load_checkpoint(run["ckpts"][-1])[0]
    net = ax.Net(good_meta["config"], devices="cpu", seed=0)
    before = net.state_dict()
    for case, path, expect in corpus:
        try:
            meta, state, extra = ck.load_checkpoint(path)
        except ck.CheckpointError as e:
            msg = str(e)
            assert path in msg and expect in msg and "\n" not in msg, (case, msg)
            continue
        with pytest.raises((ValueError, TypeError), match="load_state_dict") as info:
            net.load_state_dict(state)
        assert expect in str(info.value), (case, str(info.value))
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # a refused state changes nothing


class _Result:
    def __init__(self, d):
        self.returncode, self.stdout, self.stderr = d["returncode"], d["stdout"], d["stderr"]


def _forked(jobs, tmp_path):
    """Each job (tool, argv) in a process of its own, forked from one driver that imported the tools once."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps([{"tool": t, "argv": a, "timeout": 60} for t, a in jobs]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_forker.py"), str(spec)], capture_output=True,
                       text=True, env=_env(), timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return [_Result(d) for d in json.loads(r.stdout)]


REAL_PROCESS_CASES = ("structured_array", "flipped_data_byte", "meta_step_string")


def test_crafted_checkpoint_corpus_through_every_cli(run, corpus, tmp_path):
    jobs, checks = [], []
    for case, path, expect in corpus:
        for tool, argv in (("evaluate", [path, "--devices", "cpu", "--no-progress"]),
                           ("predict", [path, run["image"], "--devices", "cpu"]),
                           ("train", ["--resume", path, "--devices", "cpu", "--no-progress"])):
            jobs.append((tool, argv))
            checks.append((case, tool, path, expect))
    before = sorted(os.listdir(os.path.dirname(corpus[0][1])))
    results = _forked(jobs, tmp_path)
    # A few through the real entry point too (python -m, a fresh interpreter each).
    for i, (case, tool, path, expect) in enumerate(list(checks)):
        if case in REAL_PROCESS_CASES:
            results.append(_cli(tool, *jobs[i][1], timeout=60))
            checks.append((case, tool + " (python -m)", path, expect))
    problems = []
    for (case, tool, path, expect), r in zip(checks, results):
        problem = _one_line_error(r, tool.split()[0], path, expect)
        if problem:
            problems.append(f"{case} / {tool}: {problem}")
    exits = sorted({r.returncode for r in results})
    print(f"crafted-checkpoint corpus: {len(corpus)} files x 3 CLIs = {len(jobs)} forked runs + "
          f"{len(results) - len(jobs)} python -m runs; exit statuses {exits}; {len(problems)} problems")
    assert not problems, "\n".join(problems)
    assert len(corpus) >= 40 and exits == [1]
    assert sorted(os.listdir(os.path.dirname(corpus[0][1]))) == before  # train --resume wrote nothing there


def test_every_flipped_data_byte_is_caught_at_load(run, tmp_path):
    good = run["ckpts"][-1]
    blob = open(good, "rb").read()
    regions = [member_data_offset(good, name) for name in read_members(good)]
    rnd = random.Random(12345)
    for i in range(40):
        start, length = rnd.choice(regions)
        pos = start + rnd.randrange(length)
        damaged = bytearray(blob)
        damaged[pos] ^= 1 << rnd.randrange(8)
        path = str(tmp_path / f"flip{i}.npz")
        open(path, "wb").write(bytes(damaged))
        with pytest.raises(ck.CheckpointError) as info:
            ck.load_checkpoint(path)
        assert path in str(info.value)


def test_resume_auto_falls_back_to_the_newest_good_checkpoint(run, tmp_path):
    out = str(tmp_path / "r")
    r = _cli("train", "--data", run["data"], "--out", out, "--max-steps", "4", "--checkpoint-every", "2", *NET)
    assert r.returncode == 0, r.stderr
    newest = ck.list_checkpoints(out)[-1]
    start, length = member_data_offset(newest, "net/fc6.t0.weight.npy")
    blob = bytearray(open(newest, "rb").read())
    blob[start + length - 7] ^= 0x40
    open(newest, "wb").write(bytes(blob))
    r = _cli("train", "--resume", "auto", "--out", out, "--max-steps", "6", "--no-progress", "--devices", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"skipping a damaged checkpoint: {newest}" in r.stderr and "CRC" in r.stderr
    older = os.path.join(out, "checkpoints", ck.checkpoint_name(2))
    assert f"using the newest good checkpoint {older} instead" in r.stderr
    assert "resuming " + older in r.stderr and "stopped at step 6" in r.stdout
    # The damaged one is put aside (never picked up again); the continuation is whole.
    assert os.path.exists(os.path.join(out, "checkpoints", "abandoned_" + ck.checkpoint_name(4)))
    assert ck.load_checkpoint(out)[0]["step"] == 6
    # Steps 3..6 of the continuation equal an uninterrupted run's.
    ref = str(tmp_path / "ref")
    assert _cli("train", "--data", run["data"], "--out", ref, "--max-steps", "6", *NET).returncode == 0
    assert open(os.path.join(out, "steps.csv")).read() == open(os.path.join(ref, "steps.csv")).read()


def test_train_bad_arguments_one_line(run, tmp_path):
    out = str(tmp_path / "o")
    cases = [(["--seed", str(2 ** 64)], "--seed"), (["--seed", "-1"], "--seed"),
             (["--set", "init_std=nan"], "init_std must be a finite number"),
             (["--set", "conv1=5"], "conv1 must be a dict"), (["--set", "lrn=1"], "lrn must be True or False"),
             (["--set", "channels=(8,16)"], "channels must be a list of 5"),
             (["--set", "dropout=1.5"], "dropout must be in"), (["--set", f"fc=(16,{2 ** 40})"], "fc[1]")]
    for argv, expect in cases:
        r = _cli("train", "--data", run["data"], "--out", out, *NET, *argv)
        assert not _one_line_error(r, "train", expect), (argv, _one_line_error(r, "train", expect))
        assert not os.path.exists(out)
    assert ax.Net(tiny_config(), devices="cpu", seed=2 ** 64 - 1).seed == 2 ** 64 - 1
    with pytest.raises(ValueError, match="seed"):
        ax.Net(tiny_config(), devices="cpu", seed=2 ** 64)


def test_config_checks_every_value():
    for bad, expect in [({"init_std": float("nan")}, "init_std"), ({"init_std": 0}, "init_std"),
                        ({"conv1": 5}, "conv1"), ({"conv1": {"kernel": "5"}}, "conv1.kernel"),
                        ({"towers": True}, "towers"), ({"num_classes": 2 ** 31}, "num_classes"),
                        ({"momentum": 1.0}, "momentum"), ({"drop_layers": ("fc6",)}, "drop_layers"),
                        ({"lrn_beta": "x"}, "lrn_beta"), ({"weight_decay": -1}, "weight_decay")]:
        with pytest.raises(ValueError, match=expect):
            alexnet_config(**bad)
    assert alexnet_config(channels=[np.int64(96), 256, 384, 384, 256])["channels"][0] == 96


def test_run_folder_safety_and_permissions(run, tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    r = _cli("train", "--data", run["data"], "--out", out, "--max-steps", "2", *NET)
    assert not _one_line_error(r, "train", "is not empty", "--overwrite")
    old = os.umask(0o022)
    try:
        r = _cli("train", "--data", run["data"], "--out", out, "--max-steps", "2", "--overwrite", *NET)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(out, "notes.txt")).read() == "mine"  # not a run file: kept
    files = [os.path.join(out, n) for n in ("metrics.jsonl", "metrics.csv", "steps.csv", "args.json")]
    files += ck.list_checkpoints(out)
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    # --overwrite removes the previous run's checkpoints, so --resume auto cannot pick up a stale one.
    r = _cli("train", "--data", run["data"], "--out", out, "--max-steps", "1", "--overwrite", *NET)
    assert r.returncode == 0 and [os.path.basename(p) for p in ck.list_checkpoints(out)] == [ck.checkpoint_name(1)]
    # A run that fails during setup leaves no folder (nor the parents it would have made).
    parent = str(tmp_path / "deep")
    r = _cli("train", "--data", run["data"], "--out", os.path.join(parent, "a", "b"), *NET[:-4],
             "--batch-size", "500", "--no-progress", "--devices", "cpu")
    assert not _one_line_error(r, "train", "larger than the train set")
    assert not os.path.exists(parent)


def test_umask_is_respected_by_the_atomic_writer(tmp_path):
    old = os.umask(0o027)
    try:
        ck.atomic_write(str(tmp_path / "a"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o640


def test_predict_refuses_a_fifo_without_blocking(run, tmp_path):
    fifo = str(tmp_path / "img.jpg")
    os.mkfifo(fifo)
    r = _cli("predict", run["ckpts"][-1], fifo, run["image"], "--devices", "cpu", timeout=60)
    assert r.returncode == 1 and "is a FIFO" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout.splitlines()[0] == run["image"] + ":"  # the other image is still classified


# ---- prepare ----------------------------------------------------------------------------------------------

def _src(root, per_class=2):
    return synthetic.make_synthetic(str(root), seed=5, train_per_class=per_class, val_per_class=0,
                                    classes=("disk", "ring"))


def _prepare(*argv, timeout=120):
    return _cli("prepare", *argv, "--no-progress", timeout=timeout)


def test_prepare_symlink_loops_end_and_escapes_are_refused(tmp_path):
    src = _src(tmp_path / "src")
    disk = os.path.join(src, "train", "disk")
    os.symlink(disk, os.path.join(disk, "self1"))  # two links to itself: a loop that used to never end
    os.symlink(".", os.path.join(disk, "self2"))
    os.symlink(os.path.join(src, "train"), os.path.join(disk, "up"))
    secret = tmp_path / "outside.txt"
    secret.write_text("root:x:0:0\n")
    os.symlink(str(secret), os.path.join(disk, "passwd.jpg"))
    os.mkfifo(os.path.join(disk, "pipe.jpg"))
    dst = str(tmp_path / "dst")
    r = _prepare(src, dst, "--size", "8", "--workers", "0", timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ignored 1 symlink(s) leading out of the source tree (--follow-external-symlinks" in r.stdout
    report = json.load(open(os.path.join(dst, "report.json")))
    reasons = {i["path"]: i["reason"] for i in report["ignored"]}
    assert reasons[os.path.join("train", "disk", "passwd.jpg")].startswith("symlink leaving the source tree")
    assert reasons[os.path.join("train", "disk", "pipe.jpg")] == "not a regular file"
    assert all(reasons[os.path.join("train", "disk", n)].startswith("folder already visited")
               for n in ("self1", "self2"))
    # train/ was reached again through 'up': every image is counted once, under its own class.
    assert report["skipped_count"] == 0 and report["counts"] == {"train": 4}

    # With the flag the outside file is read (and, not being an image, reported as unreadable).
    r = _prepare(src, str(tmp_path / "dst2"), "--size", "8", "--workers", "0", "--follow-external-symlinks")
    assert r.returncode == 0 and "skipped 1 unreadable" in r.stdout, r.stdout + r.stderr


def test_prepare_class_folder_linking_outside_needs_the_flag(tmp_path):
    src = _src(tmp_path / "src")
    other = _src(tmp_path / "elsewhere")
    os.symlink(os.path.join(other, "train", "ring"), os.path.join(src, "train", "zlinked"))
    r = _prepare(src, str(tmp_path / "d"), "--size", "8", "--workers", "0")
    assert not _one_line_error(r, "prepare", "zlinked", "outside the source tree", "--follow-external-symlinks")
    r = _prepare(src, str(tmp_path / "d2"), "--size", "8", "--workers", "0", "--follow-external-symlinks")
    assert r.returncode == 0 and "6 train images, 3 classes" in r.stdout, r.stderr


def test_prepare_size_limits(tmp_path):
    src = _src(tmp_path / "src", 1)
    r = _prepare(src, str(tmp_path / "d"), "--size", "100000")
    assert not _one_line_error(r, "prepare", "--size 100000", f"limit of {prep.MAX_SIZE}")
    r = _prepare(src, str(tmp_path / "d"), "--size", "2048", "--shard-size", "1024")
    assert not _one_line_error(r, "prepare", "--shard-size", "85 or less")
    assert not os.path.exists(tmp_path / "d")


def test_extreme_aspect_ratio_is_resampled_in_bounded_memory(tmp_path, rng):
    path = str(tmp_path / "thin.png")
    Image.fromarray(rng.integers(0, 256, (8000, 1, 3), dtype=np.uint8)).save(path)  # 1 wide, 8000 tall
    # In a child whose address space is capped at 1 GiB (the old full resize needed 1.5 GB for this one).
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30)); "
            "from alexnet_cuda.prepare import load_image; a = load_image(sys.argv[1], 256); "
            "print(a.shape, a.dtype)")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "(256, 256, 3) uint8", r.stderr[-800:]
    # The bounded path agrees with the full resize-and-crop within one level (at a size where both fit).
    got = prep.load_image(path, 24)
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((24, 8000 * 24), Image.BILINEAR))
    top = (8000 * 24 - 24) // 2
    ref = full[top:top + 24]
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # An ordinary image takes the exact path: bit-identical to resize-then-crop.
    wide = rng.integers(0, 256, (30, 70, 3), dtype=np.uint8)
    Image.fromarray(wide).save(path)
    ref = np.asarray(Image.fromarray(wide).resize((37, 16), Image.BILINEAR))[:, 10:26]
    np.testing.assert_array_equal(prep.load_image(path, 16), ref)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "bomb.png")
    Image.new("1", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 25_000)  # 40,000 pixels: between 1x and 2x the limit
    with pytest.raises(Image.DecompressionBombWarning):
        prep.load_image(path, 16)


def _killer(task, tick=None):
    """Stands in for process_shard in forked workers: the worker holding shard 1 dies as the OOM killer
    would kill it."""
    if task[3] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_process_shard(task, tick)


_real_process_shard = prep.process_shard
_killer.__module__, _killer.__qualname__, _killer.__name__ = prep.__name__, "process_shard", "process_shard"


def test_dead_worker_is_reported_not_waited_for(tmp_path, monkeypatch):
    import multiprocessing as mp

    if mp.get_start_method() != "fork":
        pytest.skip("needs fork-started workers to inherit the patched shard function")
    src = _src(tmp_path / "src", 3)
    monkeypatch.setattr(prep, "process_shard", _killer)
    t0 = time.monotonic()
    with pytest.raises(prep.CliError, match="decoding worker process died"):
        prep.prepare(src, str(tmp_path / "d"), size=8, shard_size=2, workers=2, progress=False)
    assert time.monotonic() - t0 < 60
    monkeypatch.setattr(prep, "process_shard", _real_process_shard)
    r = _prepare(src, str(tmp_path / "d"), "--size", "8", "--shard-size", "2", "--workers", "2")
    assert r.returncode == 0 and "6 train images" in r.stdout, r.stderr  # rerunning finishes the job


def test_killed_demo_generation_leaves_no_temporaries(tmp_path):
    base = str(tmp_path / "cache")
    code = ("import sys; from alexnet_cuda.synthetic import ensure_demo_data; "
            "ensure_demo_data(sys.argv[1], train_per_class=400, val_per_class=0, log=lambda m: None, progress=False)")
    p = subprocess.Popen([sys.executable, "-c", code, base], env=_env())
    deadline = time.time() + 60
    tmp = []
    while time.time() < deadline and not tmp:
        time.sleep(0.05)
        tmp = [n for n in os.listdir(base) if n.startswith(".")] if os.path.isdir(base) else []
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert tmp and os.path.isdir(os.path.join(base, tmp[0]))  # what a kill used to leave for good
    live = os.path.join(base, synthetic._tmp_prefix("synthetic-v1-s9-1x1") + "live")
    os.makedirs(live)  # a folder this (live) process is filling: never touched
    notes = []
    assert synthetic.remove_stale_temporaries(base, notes.append) == 1
    assert sorted(n for n in os.listdir(base) if n.startswith(".")) == [os.path.basename(live)]
    assert "removed 1 temporary folder(s)" in notes[0]
