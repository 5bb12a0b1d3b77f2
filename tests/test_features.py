"""Layer activations through alexnet_cuda.features (Net.features: the net's own C++ forward pass, no dropout),
for the paper's net and each ablation preset, and the Figure 3 filter image."""
import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import reference as R
from alexnet_cuda.config import PRESETS, preset_overrides, tiny_config
from alexnet_cuda.features import FeatureExtractor, filter_image

BASE = tiny_config(channels=(16, 32, 32, 32, 16), fc=(32, 32))


def _net(rng, cfg):
    net = ax.Net(cfg, devices="cpu", seed=int(rng.integers(1 << 30)))
    x = (rng.standard_normal((4, 3, 32, 32)) * 30).astype(np.float32)
    net.train_step(x, rng.integers(0, cfg["num_classes"], 4), lr=0.02)  # off the initial weights
    return net


@pytest.mark.parametrize("preset", [None, *sorted(PRESETS)])
def test_fc8_activations_are_the_nets_logits(rng, preset):
    cfg = BASE if preset is None else ax.alexnet_config(**{**BASE, **preset_overrides(preset, BASE)})
    net = _net(rng, cfg)
    x = (rng.standard_normal((3, 3, 32, 32)) * 30).astype(np.float32)
    out = FeatureExtractor(net)(x, ("fc7", "fc8"))
    logits = net.forward(x)
    np.testing.assert_allclose(out["fc8"], logits, rtol=1e-5, atol=1e-5 * np.abs(logits).max())
    # fc7's activations are exactly what fc8 reads: fc8 applied to them (both towers' halves) gives the logits.
    w = net.weights()
    T = cfg["towers"]
    W8 = np.concatenate([w[f"fc8.t{t}.weight"] for t in range(T)], 0).astype(np.float64)
    b8 = np.concatenate([w[f"fc8.t{t}.bias"] for t in range(T)], 0).astype(np.float64)
    again = out["fc7"].astype(np.float64) @ W8.T + b8
    assert out["fc7"].shape == (3, cfg["fc"][1]) and (out["fc7"] >= 0).all()
    assert np.linalg.norm(again - logits) / np.linalg.norm(again) < 1e-5


def test_conv1_activations_against_the_reference(rng):
    net = _net(rng, BASE)
    x = (rng.standard_normal((2, 3, 32, 32)) * 30).astype(np.float32)
    got = FeatureExtractor(net)(x, "conv1")["conv1"]
    w, c, parts = net.weights(), BASE, []
    for t in range(2):
        z = R.conv2d_forward(x.astype(np.float64), w[f"conv1.t{t}.weight"], w[f"conv1.t{t}.bias"],
                             c["conv1"]["stride"], c["conv1"]["padding"], 1)
        a = R.lrn_forward(R.relu_forward(z), c["lrn_size"], c["lrn_k"], c["lrn_alpha"], c["lrn_beta"])[0]
        parts.append(R.maxpool_forward(a, 3, 2, 0)[0])
    ref = np.concatenate(parts, 1)
    assert got.shape == ref.shape == (2, 16, 15, 15)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def test_unknown_layer_and_bad_images_are_one_line_errors(rng):
    ext = FeatureExtractor(ax.Net(BASE, devices="cpu"))
    with pytest.raises(ValueError, match="unknown layer 'pool9'"):
        ext(np.zeros((1, 3, 32, 32), np.float32), ("pool9",))
    with pytest.raises(ValueError, match=r"float32 \(N, 3, 32, 32\)"):
        ext(np.zeros((1, 3, 31, 32), np.float32))


def test_filter_image_shows_each_filter_scaled_on_its_own(rng):
    w = rng.standard_normal((96, 3, 11, 11))
    img = filter_image(w, towers=2, scale=2, per_row=16, gap=2)
    tile = 22
    # tower 0 has rows of 16 filters; filter 17 is the second in its second row.
    y, x = 2 + 1 * (tile + 2), 2 + 1 * (tile + 2)
    f = w[17].transpose(1, 2, 0)
    expect = np.rint(255 * (f - f.min()) / (f.max() - f.min()))
    np.testing.assert_array_equal(img[y:y + tile:2, x:x + tile:2], expect.astype(np.uint8))
    # tower 1's first filter starts after tower 0's 3 rows and the wider gap between the towers.
    y1 = 3 * (tile + 2) + 6 + 2
    f = w[48].transpose(1, 2, 0)
    np.testing.assert_array_equal(img[y1:y1 + tile:2, 2:2 + tile:2],
                                  np.rint(255 * (f - f.min()) / (f.max() - f.min())).astype(np.uint8))
    assert img.shape == (2 * 3 * (tile + 2) + 6 + 2, 16 * (tile + 2) + 2, 3)
