"""The command-line tools end to end on the CPU with tiny sizes: train (resume equals an uninterrupted run
bit for bit, Ctrl-C, a non-finite loss), evaluate, predict, the built-in demo, and bad arguments."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import checkpoint as ck
from alexnet_cuda import evaluate, predict, train
from alexnet_cuda.prepare import prepare
from alexnet_cuda.synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--net", "tiny", "--crop", "32", "--batch-size", "8", "--log-every", "1", "--no-progress",
         "--set", "channels=(16,32,32,32,16)", "--set", "fc=(32,32)"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_synthetic(str(root / "src"), seed=1, train_per_class=6, val_per_class=2)
    prepare(str(root / "src"), str(root / "data"), size=36, shard_size=32, workers=0, progress=False)
    return str(root / "data"), str(root / "src")


def _train(argv, capsys=None):
    try:
        rc = train.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr() if capsys else ("", "")
    return rc, out, err


def _losses(run):
    return open(os.path.join(run, "steps.csv")).read()


def _epochs(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [{k: r[k] for k in ("epoch", "step", "lr", "train_loss", "train_top1_err", "val_loss", "val_top1_err",
                               "val_top5_err")} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runA") / "A")
    rc = train.main(["--data", dataset[0], "--out", out, "--epochs", "2", "--devices", "cpu", *SMALL])
    assert rc == 0
    return out


def test_uninterrupted_run_files(uninterrupted):
    files = set(os.listdir(uninterrupted))
    assert {"metrics.jsonl", "metrics.csv", "steps.csv", "args.json", "checkpoints"} <= files
    assert sorted(os.listdir(os.path.join(uninterrupted, "checkpoints"))) == [ck.checkpoint_name(s) for s in (7, 14)]
    if _has_matplotlib():
        assert "metrics.png" in files
    rows = _epochs(uninterrupted)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [7, 14]  # 60 images / 8
    assert all(np.isfinite(r["val_loss"]) for r in rows)
    csv_lines = open(os.path.join(uninterrupted, "metrics.csv")).read().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss") and len(csv_lines) == 3
    assert len(_losses(uninterrupted).splitlines()) == 1 + 14


def test_resume_equals_uninterrupted_bit_for_bit(dataset, uninterrupted, tmp_path, capsys):
    out = str(tmp_path / "B")
    common = ["--data", dataset[0], "--out", out, "--epochs", "2", "--devices", "cpu", *SMALL]
    assert _train([*common, "--max-steps", "4"], capsys)[0] == 0
    rc, o, e = _train(["--resume", "auto", "--out", out, "--max-steps", "9", "--no-progress"], capsys)
    assert rc == 0 and "resuming" in e and "stopped at step 9" in o  # crossed the epoch boundary at 7
    rc, o, e = _train(["--resume", out, "--no-progress"], capsys)  # --max-steps is not carried over
    assert rc == 0 and "final val top-1 error" in o
    assert _losses(out) == _losses(uninterrupted)
    assert _epochs(out) == _epochs(uninterrupted)
    a = ck.load_checkpoint(os.path.join(uninterrupted, "checkpoints", ck.checkpoint_name(14)))[1]
    b = ck.load_checkpoint(os.path.join(out, "checkpoints", ck.checkpoint_name(14)))[1]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert len(ck.list_checkpoints(out)) <= 3


def test_keyboard_interrupt_writes_checkpoint_and_resume_is_exact(dataset, uninterrupted, tmp_path, capsys,
                                                                   monkeypatch):
    out = str(tmp_path / "C")
    real = ax.Net.train_step

    def interrupted_at_step_5(self, images, labels, lr):
        if self.step == 5:
            raise KeyboardInterrupt
        return real(self, images, labels, lr)

    monkeypatch.setattr(ax.Net, "train_step", interrupted_at_step_5)
    rc, o, e = _train(["--data", dataset[0], "--out", out, "--epochs", "2", "--devices", "cpu", *SMALL], capsys)
    assert rc == 130 and "Traceback" not in e
    path = os.path.join(out, "checkpoints", ck.checkpoint_name(5))
    assert f"resume with: python -m alexnet_cuda.train --resume {path}" in e
    monkeypatch.setattr(ax.Net, "train_step", real)
    rc, o, e = _train(["--resume", path, "--no-progress"], capsys)
    assert rc == 0
    assert _losses(out) == _losses(uninterrupted)
    assert _epochs(out) == _epochs(uninterrupted)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "D")
    real = ax.Net.train_step

    def blows_up_at_step_6(self, images, labels, lr):
        r = real(self, images, labels, lr)
        if self.step == 6:
            r = dict(r, loss=float("nan"))
        return r

    monkeypatch.setattr(ax.Net, "train_step", blows_up_at_step_6)
    rc, o, e = _train(["--data", dataset[0], "--out", out, "--epochs", "2", "--devices", "cpu",
                       "--checkpoint-every", "2", "--keep", "5", *SMALL], capsys)
    assert rc == 3
    lines = e.strip().splitlines()
    assert len(lines) == 1 and "loss became nan" in lines[0] and "step 6" in lines[0]
    good = os.path.join(out, "checkpoints", ck.checkpoint_name(4))
    assert good in lines[0]
    assert [os.path.basename(p) for p in ck.list_checkpoints(out)] == [ck.checkpoint_name(s) for s in (2, 4)]
    assert ck.load_checkpoint(good)[0]["state"]["step"] == 4


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(module, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", f"alexnet_cuda.{module}", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout, cwd=ROOT)


def test_train_evaluate_predict_end_to_end(dataset, tmp_path):
    data, src = dataset
    run = str(tmp_path / "E")
    r = _cli("train", "--data", data, "--out", run, "--devices", "cpu,cpu", "--max-steps", "2", *SMALL[:-4])
    assert r.returncode == 0, r.stderr
    assert "stopped at step 2 (--max-steps)" in r.stdout and "devices cpu,cpu" in r.stdout

    r = _cli("evaluate", run, "--devices", "cpu", "--batch-size", "7")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "val: 20 images, crop 32 of 36" in lines[0]
    assert lines[1].startswith("center crop: top-1 error ") and "top-5 error" in lines[1]
    assert lines[2].startswith("10 crops:    top-1 error ")

    images = [os.path.join(src, "val", "disk", "disk_00000.jpg"), os.path.join(src, "val", "ring", "ring_00001.jpg")]
    r = _cli("predict", run, *images, "--devices", "cpu")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == images[0] + ":" and lines[6] == images[1] + ":" and len(lines) == 12
    probs = [float(line.split("%")[0]) for line in lines[1:6]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
    assert all(line.split()[-1] in json.load(open(os.path.join(data, "classes.json"))) for line in lines[1:6])

    r = _cli("predict", run, images[0], str(tmp_path / "missing.jpg"), "--devices", "cpu", "--top", "2")
    assert r.returncode == 1 and len(r.stdout.strip().splitlines()) == 3
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "cannot read" in r.stderr


def test_evaluate_and_predict_match_the_net(dataset, uninterrupted, capsys):
    """evaluate's center-crop numbers equal the training run's validation numbers for the same checkpoint."""
    rc = evaluate.main([uninterrupted, "--devices", "cpu", "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    last = _epochs(uninterrupted)[-1]
    assert f"top-1 error {100 * last['val_top1_err']:.2f}%, top-5 error {100 * last['val_top5_err']:.2f}%" in out
    assert f"(loss {last['val_loss']:.4f})" in out


def test_real_ctrl_c(dataset, tmp_path):
    run = str(tmp_path / "F")
    p = subprocess.Popen([sys.executable, "-m", "alexnet_cuda.train", "--data", dataset[0], "--out", run,
                          "--epochs", "50", "--devices", "cpu", *SMALL], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    steps = os.path.join(run, "steps.csv")
    deadline = time.time() + 60
    while time.time() < deadline and not (os.path.exists(steps) and len(open(steps).readlines()) >= 4):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "resume with: python -m alexnet_cuda.train --resume" in err
    path = err.split("--resume ")[-1].strip()
    meta = ck.load_checkpoint(path)[0]
    assert meta["state"]["step"] == meta["step"] >= 3


def test_builtin_demo_path(tmp_path):
    env = _env()
    env["ALEXNET_CUDA_CACHE"] = str(tmp_path / "cache")
    r = _cli("train", "--out", str(tmp_path / "demo"), "--max-steps", "2", "--devices", "cpu", env=env)
    assert r.returncode == 0, r.stderr
    assert "built-in demo" in r.stderr and "stopped at step 2" in r.stdout
    assert "3000 training images" in r.stdout and "10 classes; crop 32 of 40" in r.stdout
    meta = ck.load_checkpoint(str(tmp_path / "demo"))[0]
    assert meta["config"]["input_size"] == 32 and meta["config"]["num_classes"] == 10


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


BAD_TRAIN = {
    "missing data": (["--data", "/nonexistent/folder"], "does not exist"),
    "unknown device": (["--devices", "gpu0"], "unknown device 'gpu0'"),
    "three devices": (["--devices", "cpu,cpu,cpu"], "one device or one per tower"),
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "lr 0": (["--lr", "0"], "--lr"),
    "negative lr": (["--lr=-0.1"], "--lr"),
    "nan lr": (["--lr", "nan"], "--lr"),
    "epochs 0": (["--epochs", "0"], "--epochs"),
    "bad momentum": (["--momentum", "1.5"], "--momentum"),
    "unknown flag": (["--bogus"], "unrecognized arguments"),
    "crop too big": (["--crop", "40"], "crop 40"),
    "unknown net key": (["--set", "bogus=1"], "unknown key 'bogus'"),
    "batch larger than data": (["--batch-size", "500"], "larger than the train set"),
    "missing resume": (["--resume", "/nonexistent/ckpt.npz"], "no such checkpoint"),
    "cuda graph on the cpu": (["--devices", "cpu", "--batch-size", "8", "--cuda-graph", "on"],
                              "--cuda-graph on: devices cpu cannot run a step as a CUDA graph: the towers are on the CPU"),
    "unknown cuda graph mode": (["--cuda-graph", "always"], "--cuda-graph"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_train_bad_arguments_give_one_line(dataset, tmp_path, capsys, case):
    extra, expect = BAD_TRAIN[case]
    argv = ["--out", str(tmp_path / "run"), "--no-progress", *extra]
    if case not in ("missing data", "missing resume"):
        argv = ["--data", dataset[0], "--net", "tiny", "--crop", "32", *argv] if case != "crop too big" else \
            ["--data", dataset[0], "--net", "tiny", *argv]
    rc, out, err = _train(argv, capsys)
    assert rc not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("alexnet_cuda.train: error: ") and expect in lines[0]
    assert not ck.list_checkpoints(str(tmp_path / "run"))


def test_cuda_device_without_cuda_is_one_line(dataset, tmp_path, capsys):
    if ax.cuda_available():
        pytest.skip("this machine has CUDA")
    rc, out, err = _train(["--data", dataset[0], "--devices", "cuda:0", "--out", str(tmp_path / "r")], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "CUDA is not available" in err


def test_resume_refuses_incompatible_changes(uninterrupted, capsys):
    rc, out, err = _train(["--resume", uninterrupted, "--batch-size", "16", "--no-progress"], capsys)
    assert rc == 1 and "--batch-size cannot change on --resume" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("tool,argv,expect", [
    ("evaluate", ["/nonexistent.npz"], "does not exist"),
    ("evaluate", ["{data}/meta.json"], "not a readable checkpoint"),
    ("evaluate", ["{run}", "--devices", "tpu"], "unknown device"),
    ("evaluate", ["{run}", "--batch-size", "0"], "--batch-size"),
    ("evaluate", ["{run}", "--split", "test"], "no 'test' images"),
    ("predict", ["/nonexistent.npz", "x.jpg"], "does not exist"),
    ("predict", ["{run}"], "the following arguments are required: IMAGE"),
])
def test_evaluate_predict_bad_arguments(dataset, uninterrupted, capsys, tool, argv, expect):
    argv = [a.format(data=dataset[0], run=uninterrupted) for a in argv]
    mod = {"evaluate": evaluate, "predict": predict}[tool]
    try:
        rc = mod.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    assert rc not in (0, None)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"alexnet_cuda.{tool}: error: " in lines[0] and expect in lines[0], err


def test_bad_arguments_at_the_process_boundary(tmp_path):
    env = _env()
    env["ALEXNET_CUDA_CACHE"] = str(tmp_path / "cache")
    for module, args in (("train", ["--devices", "nope"]), ("train", ["--batch-size", "0"]),
                         ("prepare", [str(tmp_path / "missing"), str(tmp_path / "out")]),
                         ("evaluate", [str(tmp_path / "missing.npz")])):
        r = _cli(module, *args, env=env)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(env["ALEXNET_CUDA_CACHE"])  # arguments are checked before any data is made


# ---- issue 12: steps.csv units, the best checkpoint, trace, presets, fine-tuning, features, ensembles -----

def test_steps_csv_uses_metrics_csv_units(uninterrupted):
    """1-based epochs and errors as fractions, as metrics.csv: with --log-every 1 the image-weighted mean of an
    epoch's step errors is that epoch's training error in metrics.csv."""
    lines = _losses(uninterrupted).splitlines()
    assert lines[0] == "step,epoch,batch,loss,top1_err,top5_err,n,lr"
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert [int(r["epoch"]) for r in rows] == [1] * 7 + [2] * 7
    assert [int(r["batch"]) for r in rows] == list(range(1, 8)) * 2
    for e, rec in zip((1, 2), _epochs(uninterrupted)):
        mine = [r for r in rows if int(r["epoch"]) == e]
        n = sum(int(r["n"]) for r in mine)
        assert all(0 <= float(r["top1_err"]) <= float(r["top5_err"]) * 0 + 1 for r in mine)
        err = sum(float(r["top1_err"]) * int(r["n"]) for r in mine) / n
        assert abs(err - rec["train_top1_err"]) < 1e-9


def test_keep_never_deletes_the_best_checkpoint(tmp_path):
    from types import SimpleNamespace

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for s in (10, 20, 30, 40, 50):
        (folder / ck.checkpoint_name(s)).write_bytes(b"x")
    ck.prune_checkpoints(str(folder), 2, protect=(ck.checkpoint_name(20),))
    assert sorted(os.listdir(folder)) == [ck.checkpoint_name(s) for s in (20, 40, 50)]
    hist = [{"step": 10, "val_top1_err": 0.5}, {"step": 20, "val_top1_err": 0.3}, {"step": 30, "val_top1_err": 0.3},
            {"step": 40, "val_top1_err": 0.4}]
    assert train.Run.best_step(SimpleNamespace(state={"history": hist})) == 20
    hist = [{"step": 10, "train_top1_err": 0.2, "val_top1_err": None}, {"step": 20, "train_top1_err": 0.1}]
    assert train.Run.best_step(SimpleNamespace(state={"history": hist})) == 20


def test_keep_one_keeps_the_best_epoch_in_a_run(dataset, tmp_path, capsys, monkeypatch):
    """The validation error is made to be best at epoch 1; with --keep 1 its checkpoint survives epoch 3."""
    out = str(tmp_path / "K")
    real = evaluate.evaluate_center
    calls = []

    def scripted(net, loader, bar=None, interrupted=None):
        r = real(net, loader, bar, interrupted)
        calls.append(1)
        return {**r, "top1_err": 0.1 if len(calls) == 1 else 0.9}

    monkeypatch.setattr(evaluate, "evaluate_center", scripted)
    rc, o, e = _train(["--data", dataset[0], "--out", out, "--epochs", "3", "--keep", "1", "--devices", "cpu",
                       *SMALL], capsys)
    assert rc == 0, e
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [ck.checkpoint_name(7), ck.checkpoint_name(21)]


def test_train_trace_and_preset(dataset, tmp_path, capsys):
    out, trace = str(tmp_path / "T"), str(tmp_path / "step.json")
    rc, o, e = _train(["--data", dataset[0], "--out", out, "--devices", "cpu", "--max-steps", "2",
                       "--preset", "one-tower", "--trace", trace, *SMALL], capsys)
    assert rc == 0, e
    assert f"to {trace}" in e
    events = json.load(open(trace))["traceEvents"]
    assert {"conv1.fprop", "sgd"} <= {ev["name"] for ev in events} and all(ev["dur"] >= 0 for ev in events)
    meta = ck.load_checkpoint(out)[0]
    assert meta["config"]["towers"] == 1 and list(meta["config"]["channels"]) == [8, 16, 16, 16, 16]
    assert meta["train"]["preset"] == "one-tower"
    rc, o, e = _train(["--resume", out, "--preset", "no-lrn", "--no-progress"], capsys)
    assert rc == 1 and "--preset cannot change on --resume" in e


def _dataset4(tmp_path):
    from alexnet_cuda.synthetic import CLASSES

    make_synthetic(str(tmp_path / "src4"), seed=2, train_per_class=4, val_per_class=1, classes=CLASSES[:4])
    prepare(str(tmp_path / "src4"), str(tmp_path / "data4"), size=36, shard_size=32, workers=0, progress=False)
    return str(tmp_path / "data4")


def test_finetune_with_another_class_count(dataset, uninterrupted, tmp_path, capsys):
    """From a checkpoint of the 10-class run to 4 classes: conv1..fc7 start as the source's, fc8 as a fresh net's
    paper init (the run's seed); the lr is so small that one step leaves every weight as it was. From the same
    source through a safetensors export, and onto the same classes (fc8 kept)."""
    data4 = _dataset4(tmp_path)
    src = os.path.join(uninterrupted, "checkpoints", ck.checkpoint_name(14))
    src_w = ck.load_checkpoint(src)[1]
    st = str(tmp_path / "src.safetensors")
    from alexnet_cuda import weights as W

    W.export_weights(src, st)
    for i, source in enumerate((src, st)):
        out = str(tmp_path / f"F{i}")
        rc, o, e = _train(["--finetune", source, "--data", data4, "--out", out, "--devices", "cpu", "--max-steps",
                           "1", "--lr", "1e-30", "--batch-size", "8", "--no-progress", "--seed", "5"], capsys)
        assert rc == 0, e
        assert "fc8 re-initialised for 4 classes" in e
        meta, state, _ = ck.load_checkpoint(out)
        assert meta["config"]["num_classes"] == 4 and meta["train"]["finetune"] == source
        for k, v in state.items():
            if k.startswith(("conv", "fc6", "fc7")):
                np.testing.assert_array_equal(v, src_w[k])
        fresh = ax.Net(meta["config"], devices="cpu", seed=5).weights()
        for k in ("fc8.t0.weight", "fc8.t1.bias"):  # zero biases move by lr * gradient ~ 1e-31
            np.testing.assert_allclose(state[k], fresh[k], rtol=1e-6, atol=1e-20)
    out = str(tmp_path / "same")
    rc, o, e = _train(["--finetune", src, "--data", dataset[0], "--out", out, "--devices", "cpu", "--max-steps", "1",
                       "--lr", "1e-30", "--batch-size", "8", "--no-progress"], capsys)
    assert rc == 0 and "same classes, fc8 kept" in e
    np.testing.assert_array_equal(ck.load_checkpoint(out)[1]["fc8.t0.weight"], src_w["fc8.t0.weight"])
    rc, o, e = _train(["--finetune", src, "--data", data4, "--out", str(tmp_path / "bad"), "--devices", "cpu",
                       "--set", "fc=(64,64)", "--batch-size", "8", "--no-progress"], capsys)
    assert rc == 1 and "'fc6.t0.weight' has shape" in e and len(e.strip().splitlines()) == 1


def test_features_cli_filters_and_retrieval(dataset, uninterrupted, tmp_path):
    from PIL import Image

    from alexnet_cuda.data import Augmenter
    from alexnet_cuda.features import FeatureExtractor
    from alexnet_cuda.prepare import load_image

    data, src = dataset
    feats, png = str(tmp_path / "f.npz"), str(tmp_path / "filters.png")
    r = _cli("features", uninterrupted, os.path.join(src, "val"), "--out", feats, "--layer", "fc7", "--filters", png,
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    z = np.load(feats)
    assert z["features"].shape == (20, 32) and len(z["paths"]) == 20
    net, meta, extra = evaluate.net_from_checkpoint(uninterrupted, "cpu")
    x = Augmenter(extra["mean"], 32).center(load_image(str(z["paths"][3]), 36)[None])
    np.testing.assert_allclose(z["features"][3], FeatureExtractor(net)(x)["fc7"][0], rtol=1e-6, atol=1e-6)
    assert Image.open(png).size[0] > 0
    js = str(tmp_path / "nn.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "retrieval.py"), uninterrupted, "--queries",
                        "3", "--neighbours", "4", "--out", str(tmp_path / "nn.png"), "--json", js, "--devices", "cpu"],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.load(open(js))
    assert len(doc) == 3 and all(len(q["neighbours"]) == 4 for q in doc)
    for q in doc:
        d = [n["distance"] for n in q["neighbours"]]
        assert d == sorted(d)
    assert Image.open(str(tmp_path / "nn.png")).size == (4 + 5 * (36 + 4) + 8, 4 + 3 * (36 + 4))


def test_predict_folders_and_json(dataset, uninterrupted, tmp_path, capsys):
    data, src = dataset
    out = str(tmp_path / "p.json")
    rc = predict.main([uninterrupted, os.path.join(src, "val", "disk"), os.path.join(src, "val", "ring"),
                       "--json", out, "--device", "cpu", "--top", "3"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.load(open(out))
    assert [r["path"] for r in doc["results"]] == sorted(
        os.path.join(src, "val", c, f) for c in ("disk", "ring") for f in os.listdir(os.path.join(src, "val", c)))
    assert doc["errors"] == [] and all(len(r["top"]) == 3 for r in doc["results"])
    first = doc["results"][0]
    for t in first["top"]:
        assert f"{100 * t['prob']:6.2f}%  {t['class']}" in printed
    probs = [t["prob"] for t in first["top"]]
    assert probs == sorted(probs, reverse=True)


def test_evaluate_ensemble_averages_softmax(dataset, uninterrupted, capsys):
    from alexnet_cuda.data import EvalLoader, topk_hits

    a, b = (os.path.join(uninterrupted, "checkpoints", ck.checkpoint_name(s)) for s in (7, 14))
    rc = evaluate.main([a, b, "--device", "cpu", "--no-progress", "--no-ten-crop"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    nets = [evaluate.net_from_checkpoint(p, "cpu") for p in (a, b)]
    data = evaluate.open_data(nets[0][1])
    data.mean = nets[0][2]["mean"]
    probs, labels = [], []
    for x, y in EvalLoader(data, 16, 32):
        probs.append(np.mean([np.asarray(n.forward(x, probs=True), np.float64) for n, _, _ in nets], 0))
        labels.append(y)
    p, y = np.concatenate(probs), np.concatenate(labels)
    e1, e5 = 1 - topk_hits(p, y, 1) / len(y), 1 - topk_hits(p, y, 5) / len(y)
    last = out.strip().splitlines()[-1]
    assert last.startswith("ensemble (2 nets, softmax averaged)")
    assert f"top-1 error {100 * e1:.2f}%, top-5 error {100 * e5:.2f}%" in last
    assert len(out.strip().splitlines()) == 4


@pytest.mark.parametrize("tool", ["train", "evaluate", "predict", "prepare", "features", "weights"])
def test_every_tool_answers_version(tool):
    from alexnet_cuda import __version__

    r = _cli(tool, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"alexnet_cuda {__version__}", r.stderr


def test_device_side_augmentation_equals_the_loaders_bit_for_bit(dataset, uninterrupted, tmp_path, capsys,
                                                                  monkeypatch):
    # train.py takes the zero-copy uint8 path (the loader writing into the net's staging slots,
    # Net.train_step_staged) on CUDA; forced here on the CPU backend, the run must equal the loader-augmented
    # one exactly, checkpoints included (so runs resume across the paths).
    calls = []
    real_staged = ax.Net.train_step_staged

    def spy_staged(self, slot, lr, prefetch=None):
        calls.append(("given" if isinstance(slot, ax._C.StagingSlot) else slot, callable(prefetch)))
        return real_staged(self, slot, lr, prefetch=prefetch)

    monkeypatch.setattr(train, "device_side_augment", lambda devices: True)
    monkeypatch.setattr(ax.Net, "train_step_staged", spy_staged)
    out = str(tmp_path / "U")
    rc, o, e = _train(["--data", dataset[0], "--out", out, "--epochs", "2", "--devices", "cpu", *SMALL], capsys)
    assert rc == 0, e
    # Per epoch of 7 batches: the first given, each prefetching the next, the last prefetching none.
    epoch = [("given", True)] + [(None, True)] * 5 + [(None, False)]
    assert calls == epoch * 2
    assert _losses(out) == _losses(uninterrupted)
    a = ck.load_checkpoint(os.path.join(uninterrupted, "checkpoints", ck.checkpoint_name(14)))[1]
    b = ck.load_checkpoint(os.path.join(out, "checkpoints", ck.checkpoint_name(14)))[1]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Stopped mid-epoch with a batch prefetched, then resumed: the same run again.
    out2 = str(tmp_path / "V")
    assert _train(["--data", dataset[0], "--out", out2, "--epochs", "2", "--devices", "cpu", *SMALL,
                   "--max-steps", "3"], capsys)[0] == 0
    assert _train(["--resume", out2, "--no-progress"], capsys)[0] == 0
    assert _losses(out2) == _losses(uninterrupted)
