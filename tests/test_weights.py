"""Weights in and out (alexnet_cuda.weights, Net.load_weights): weights-only files, the PyTorch-style
safetensors export/import and its layout (read back by hand and run as a grouped-convolution network on the
float64 reference ops), a round trip through torch where it is importable, and crafted bad files."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import reference as R
from alexnet_cuda import weights as W
from alexnet_cuda.checkpoint import CheckpointError
from alexnet_cuda.config import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_config(channels=(16, 32, 32, 32, 16), fc=(32, 32), dropout=0.0)


def _trained(rng, cfg=CFG, seed=3):
    net = ax.Net(cfg, devices="cpu", seed=seed)
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32) * 20
    net.train_step(x, rng.integers(0, cfg["num_classes"], 4), lr=0.01)  # momentum no longer zero
    return net


def _images(rng, n=3):
    return (rng.standard_normal((n, 3, 32, 32)) * 30).astype(np.float32)


def test_weights_only_file_round_trip_zeroes_momentum(tmp_path, rng):
    a = _trained(rng)
    assert any(np.abs(v).max() > 0 for k, v in a.state_dict().items() if k.startswith("momentum/"))
    path = str(tmp_path / "w.npz")
    W.save_weights(path, a.weights(), a.config, classes=[f"c{i}" for i in range(10)])
    weights, cfg, classes = W.load_weights_file(path)
    assert cfg == a.config and classes == [f"c{i}" for i in range(10)]
    assert set(weights) == set(a.parameter_shapes())
    b = ax.Net(cfg, devices="cpu", seed=99)
    b.step = 7
    b.load_weights(weights)
    for k, v in a.weights().items():
        np.testing.assert_array_equal(b.weights()[k], v)
    sd = b.state_dict()
    assert all(not np.any(v) for k, v in sd.items() if k.startswith("momentum/"))
    assert b.step == 7  # load_weights leaves the step and seed alone
    x = _images(rng)
    np.testing.assert_array_equal(b.forward(x), a.forward(x))
    with pytest.raises(ValueError, match="missing 'momentum/conv1.t0.weight'"):
        ax.Net(cfg, devices="cpu").load_state_dict(weights)  # a full state still needs its momentum


def test_load_weights_checks_every_entry(rng):
    net = ax.Net(CFG, devices="cpu")
    good = net.weights()
    cases = [
        ({**good, "momentum/conv1.t0.weight": good["conv1.t0.weight"]}, ValueError, "momentum is not loaded"),
        ({k: v for k, v in good.items() if k != "fc7.t1.bias"}, ValueError, "missing 'fc7.t1.bias'"),
        ({**good, "fc6.t0.bias": np.zeros(3, np.float32)}, ValueError, "'fc6.t0.bias' has shape"),
        ({**good, "conv2.t0.bias": np.full(16, np.nan, np.float32)}, ValueError, "non-finite"),
        ({**good, "conv2.t0.bias": np.zeros(16, np.int32)}, TypeError, "expected floating point"),
        ({**good, "fc8.t0.bias": np.full(5, 1e300)}, ValueError, "beyond float32"),
    ]
    for bad, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            net.load_weights(bad)
    np.testing.assert_array_equal(net.weights()["conv2.t0.bias"], good["conv2.t0.bias"])


def _parse_by_hand(path):
    """The safetensors layout read without alexnet_cuda: 8-byte LE length, JSON header, raw LE float32."""
    blob = open(path, "rb").read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = header.pop("__metadata__")
    out = {}
    for name, e in header.items():
        assert e["dtype"] == "F32"
        b, f = e["data_offsets"]
        out[name] = np.frombuffer(data[b:f], "<f4").reshape(e["shape"])
    return out, meta


def test_safetensors_export_layout_and_import(tmp_path, rng):
    net = _trained(rng)
    path = str(tmp_path / "w.safetensors")
    W.save_weights(str(tmp_path / "w.npz"), net.weights(), net.config)
    W.export_weights(str(tmp_path / "w.npz"), path)
    tensors, meta = _parse_by_hand(path)
    names = {f"{m}.{k}" for m in ("features.0", "features.4", "features.8", "features.10", "features.12",
                                   "classifier.0", "classifier.3", "classifier.6") for k in ("weight", "bias")}
    assert set(tensors) == names
    w = net.weights()
    for ours, theirs in W.TORCH_NAMES.items():
        for kind in ("weight", "bias"):
            np.testing.assert_array_equal(tensors[f"{theirs}.{kind}"],
                                          np.concatenate([w[f"{ours}.t0.{kind}"], w[f"{ours}.t1.{kind}"]], 0))
    assert tensors["features.4.weight"].shape == (32, 8, 5, 5)  # grouped: 16 conv1 channels over 2 groups
    assert tensors["features.8.weight"].shape == (32, 32, 3, 3)  # conv3 reads both towers
    assert json.loads(meta[W.SAFETENSORS_META])["config"]["channels"] == [16, 32, 32, 32, 16]
    back, cfg, _ = W.load_weights_for(path)
    fresh = ax.Net(cfg, devices="cpu", seed=5)
    fresh.load_weights(back)
    for k, v in w.items():
        np.testing.assert_array_equal(fresh.weights()[k], v)


def _grouped_forward(cfg, t, x):
    """The PyTorch-style network (module docstring of alexnet_cuda.weights) on the float64 reference ops."""
    T = cfg["towers"]
    g = lambda name: (t[f"{name}.weight"].astype(np.float64), t[f"{name}.bias"].astype(np.float64))  # noqa: E731

    def lrn(a):  # each group normalised on its own
        parts = np.split(a, T, axis=1)
        return np.concatenate([R.lrn_forward(p, cfg["lrn_size"], cfg["lrn_k"], cfg["lrn_alpha"],
                                             cfg["lrn_beta"])[0] for p in parts], 1)

    pool = lambda a: R.maxpool_forward(a, 3, 2, 0)[0]  # noqa: E731
    c1 = cfg["conv1"]
    h = pool(lrn(R.relu_forward(R.conv2d_forward(x.astype(np.float64), *g("features.0"), c1["stride"],
                                                 c1["padding"], 1))))
    h = pool(lrn(R.relu_forward(R.conv2d_forward(h, *g("features.4"), 1, 2, T))))
    h = R.relu_forward(R.conv2d_forward(h, *g("features.8"), 1, 1, 1))
    h = R.relu_forward(R.conv2d_forward(h, *g("features.10"), 1, 1, T))
    h = pool(R.relu_forward(R.conv2d_forward(h, *g("features.12"), 1, 1, T))).reshape(len(x), -1)
    h = R.relu_forward(R.linear_forward(h, *g("classifier.0")))
    h = R.relu_forward(R.linear_forward(h, *g("classifier.3")))
    return R.linear_forward(h, *g("classifier.6"))


def test_pytorch_layout_is_the_same_network(tmp_path, rng):
    net = _trained(rng)
    path = str(tmp_path / "w.safetensors")
    W.write_safetensors(path, W.to_torch_state_dict(net.config, net.weights()))
    tensors, meta = W.read_safetensors(path)
    x = _images(rng)
    ref = _grouped_forward(net.config, tensors, x)
    ours = net.forward(x)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4


def test_round_trip_through_torch(tmp_path, rng):
    torch = pytest.importorskip("torch", reason="torch is not importable here; the format and layout are checked "
                                "without it by the other tests in this file")
    net = _trained(rng)
    sd = {k: torch.from_numpy(v.copy()) for k, v in W.to_torch_state_dict(net.config, net.weights()).items()}
    nn = torch.nn
    T = net.config["towers"]
    ch, c1 = net.config["channels"], net.config["conv1"]

    class GroupLRN(nn.Module):
        def __init__(self):
            super().__init__()
            self.lrn = nn.LocalResponseNorm(5, 1e-4 * 5, 0.75, 2.0)

        def forward(self, x):
            n, c, h, w = x.shape
            return self.lrn(x.reshape(n * T, c // T, h, w)).reshape(n, c, h, w)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, ch[0], c1["kernel"], c1["stride"], c1["padding"]), nn.ReLU(), GroupLRN(),
                nn.MaxPool2d(3, 2), nn.Conv2d(ch[0], ch[1], 5, 1, 2, groups=T), nn.ReLU(), GroupLRN(),
                nn.MaxPool2d(3, 2), nn.Conv2d(ch[1], ch[2], 3, 1, 1), nn.ReLU(),
                nn.Conv2d(ch[2], ch[3], 3, 1, 1, groups=T), nn.ReLU(), nn.Conv2d(ch[3], ch[4], 3, 1, 1, groups=T),
                nn.ReLU(), nn.MaxPool2d(3, 2))
            fc = net.config["fc"]
            self.classifier = nn.Sequential(nn.Linear(sd["classifier.0.weight"].shape[1], fc[0]), nn.ReLU(),
                                            nn.Dropout(), nn.Linear(fc[0], fc[1]), nn.ReLU(), nn.Dropout(),
                                            nn.Linear(fc[1], net.config["num_classes"]))

        def forward(self, x):
            return self.classifier(self.features(x).flatten(1))

    m = Model().eval()
    m.load_state_dict(sd)  # strict: the names and shapes are exactly PyTorch's
    x = _images(rng)
    with torch.no_grad():
        theirs = m(torch.from_numpy(x)).numpy()
    ours = net.forward(x)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(ours) < 1e-4
    path = str(tmp_path / "t.safetensors")
    W.write_safetensors(path, {k: v.detach().numpy() for k, v in m.state_dict().items()})
    back, _, _ = W.load_finetune_source(path, net.config)
    for k, v in net.weights().items():
        np.testing.assert_array_equal(back[k], v)


# ---- hostile safetensors ------------------------------------------------------------------------------------

def _file(tmp_path, header, data=b"", raw_len=None, pad=True):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(text) if raw_len is None else raw_len) + text + data)
    return str(path)


def _f32(*vals):
    return np.array(vals, "<f4").tobytes()


BAD = {
    "short": (lambda t: str(_write(t, b"\x01\x02")), "shorter than its 8-byte header length"),
    "huge_header": (lambda t: _file(t, {}, raw_len=2 ** 40), "over the limit"),
    "header_past_end": (lambda t: _file(t, {}, raw_len=4096), "runs past the end of the file"),
    "not_json": (lambda t: _file(t, b"{nope"), "not valid JSON"),
    "not_object": (lambda t: _file(t, [1, 2]), "must be a JSON object"),
    "duplicate": (lambda t: _file(t, b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                     b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', _f32(1)), "duplicate key"),
    "f16": (lambda t: _file(t, {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, _f32(1)), "only F32"),
    "bad_shape": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, _f32(1)),
                  "invalid shape"),
    "extra_field": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}},
                                    _f32(1)), "exactly dtype, shape and data_offsets"),
    "out_of_bounds": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, _f32(1)),
                      "outside the data area"),
    "size_mismatch": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, _f32(1, 2)),
                      "needs 12 bytes"),
    "overlap": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, _f32(1, 2, 3)),
                "overlaps"),
    "gap": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, _f32(1, 2)),
            "belong to no tensor"),
    "trailing": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, _f32(1, 2)),
                 "after the last tensor"),
    "nan": (lambda t: _file(t, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, _f32(1, np.nan)),
            "non-finite"),
    "bad_metadata": (lambda t: _file(t, {"__metadata__": {"k": 3}}), "map strings to strings"),
}


def _write(tmp_path, blob):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    return p


@pytest.mark.parametrize("case", sorted(BAD))
def test_crafted_safetensors_are_refused_with_one_line(tmp_path, case):
    make, msg = BAD[case]
    path = make(tmp_path)
    with pytest.raises(CheckpointError, match=msg) as e:
        W.read_safetensors(path)
    assert "\n" not in str(e.value) and path in str(e.value)


def test_crafted_tensors_that_do_not_fit_the_net_are_refused(tmp_path, rng):
    net = _trained(rng)
    t = W.to_torch_state_dict(net.config, net.weights())
    cases = {"unknown": ({**t, "features.1.weight": np.ones(2, np.float32)}, "unexpected tensor 'features.1.weight'"),
             "missing": ({k: v for k, v in t.items() if k != "features.8.bias"}, "missing parameter 'conv3.t0.bias'"),
             "shape": ({**t, "features.0.weight": np.ones((16, 3, 3, 3), np.float32)}, "has shape"),
             "odd": ({**t, "classifier.6.bias": np.ones(3, np.float32)}, "must divide into 2 towers")}
    for name, (tensors, msg) in cases.items():
        path = str(tmp_path / f"{name}.safetensors")
        W.write_safetensors(path, tensors)
        with pytest.raises(CheckpointError, match=msg):
            W.load_finetune_source(path, net.config)


def test_crafted_weights_npz_are_refused(tmp_path, rng):
    net = _trained(rng)
    good = net.weights()
    path = str(tmp_path / "w.npz")
    W.save_weights(path, {**good, "conv1.t0.bias": np.ones(3, np.float32)}, net.config)
    with pytest.raises(CheckpointError, match="'conv1.t0.bias' has shape"):
        W.load_weights_file(path)
    W.save_weights(path, good, {**net.config, "towers": 0})
    with pytest.raises(CheckpointError, match="towers"):
        W.load_weights_file(path)
    payload = {"net/" + k: v for k, v in good.items()}
    payload["net/momentum/conv1.t0.weight"] = good["conv1.t0.weight"]
    payload["__meta__"] = np.frombuffer(json.dumps({"format": W.WEIGHTS_FORMAT, "version": 1,
                                                    "config": json.loads(json.dumps(net.config))}).encode(), np.uint8)
    np.savez(path, **payload)
    with pytest.raises(CheckpointError, match="holds no 'momentum/conv1.t0.weight'"):
        W.load_weights_file(path)


def test_weights_cli(tmp_path, rng):
    net = _trained(rng)
    src = str(tmp_path / "w.npz")
    W.save_weights(src, net.weights(), net.config)
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = str(tmp_path / "x.safetensors")
    r = subprocess.run([sys.executable, "-m", "alexnet_cuda.weights", "export", src, out], capture_output=True,
                       text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "alexnet_cuda.weights", "show", out], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 0 and "features.0.weight\t16x3x5x5" in r.stdout
    bad = BAD["overlap"][0](tmp_path)
    r = subprocess.run([sys.executable, "-m", "alexnet_cuda.weights", "show", bad], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "overlaps" in r.stderr
