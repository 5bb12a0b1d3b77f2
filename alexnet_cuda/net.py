"""The Python front of the C++ two-tower AlexNet (csrc/net.cpp): config handling, device specs, state
dicts for checkpoints, and the step timeline as a Chrome trace."""
import json

import numpy as np

from . import _C
from .config import alexnet_config


def parse_devices(spec, towers):
    """A device spec as the scheduler takes it: a tuple/list with one device per tower, a comma-separated
    string ("cuda:0,cuda:1"), a single device ("cpu", "cuda:0": one device running every tower in turn),
    or "auto" (two GPUs if present, else both towers on one GPU, else two CPU workers).
    Returns (devices per tower, shared single executor?)."""
    if spec is None or spec == "auto":
        n = _C.cuda_device_count() if _C.cuda_available() else 0
        if n >= towers:
            return [f"cuda:{i}" for i in range(towers)], False
        if n >= 1:
            return ["cuda:0"] * towers, False
        return ["cpu"] * towers, False
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if len(parts) == 1:
            return parts * towers, True
        spec = parts
    devices = list(spec)
    if not devices or not all(isinstance(d, str) for d in devices):
        raise ValueError(f"Net: argument 'devices' must name one device per tower, got {spec!r}")
    if len(devices) != towers:
        raise ValueError(f"Net: argument 'devices' names {len(devices)} device(s) for {towers} tower(s)")
    return devices, False


class Net:
    """The 2012 AlexNet, split in towers placed on devices; one call per training step.

    >>> net = Net(tiny_config(), devices=("cpu", "cpu"), seed=0)
    >>> stats = net.train_step(images, labels, lr=0.01)   # {'loss', 'top1', 'top5', 'n'}
    """

    def __init__(self, config=None, devices="auto", seed=0):
        if config is None:
            config = alexnet_config()
        elif not isinstance(config, dict):
            raise TypeError("Net: argument 'config' must be a dict (see alexnet_cuda.alexnet_config)")
        self.config = alexnet_config(**config)
        towers = self.config["towers"]
        if not isinstance(towers, int) or towers < 1:
            raise ValueError(f"Net: config 'towers' must be a positive int, got {towers!r}")
        self.devices, self.shared = parse_devices(devices, towers)
        cfg = dict(self.config)
        cfg["channels"] = list(cfg["channels"])
        cfg["fc"] = list(cfg["fc"])
        cfg["drop_layers"] = list(cfg["drop_layers"])
        self._net = _C.Net(cfg, self.devices, self.shared, int(seed))

    # --- steps -------------------------------------------------------------------------------------
    def _images(self, images, op):
        a = np.asarray(images)
        if a.dtype != np.float32:
            raise TypeError(f"{op}: argument 'images' must be float32, got {a.dtype}")
        return np.ascontiguousarray(a)

    def _labels(self, labels, op):
        a = np.asarray(labels)
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{op}: argument 'labels' must hold integers, got {a.dtype}")
        # Passed in its own integer dtype: the core checks the range [0, classes) before narrowing to int32,
        # so 2**32 + 1 is an error rather than class 1.
        return a

    def train_step(self, images, labels, lr):
        """Forward (dropout on), backward and the SGD update. Returns dict(loss, top1, top5, n)."""
        return self._net.train_step(self._images(images, "train_step"), self._labels(labels, "train_step"), float(lr))

    def forward(self, images, probs=False):
        """Inference (no dropout): logits, or softmax probabilities, as (N, num_classes) float32."""
        return self._net.forward(self._images(images, "forward"), bool(probs))

    def evaluate(self, images, labels):
        """Inference loss and top-1/top-5 hits: dict(loss, top1, top5, n)."""
        return self._net.evaluate(self._images(images, "evaluate"), self._labels(labels, "evaluate"))

    # --- state -------------------------------------------------------------------------------------
    @property
    def step(self):
        return self._net.step

    @step.setter
    def step(self, value):
        self._net.step = int(value)

    @property
    def seed(self):
        """The run's seed: it made the initial weights and keys every dropout mask."""
        return self._net.seed

    def layers(self):
        """The layer table the scheduler runs: one dict per layer (tower-local sizes)."""
        return self._net.layers()

    def dropout_key(self, step, layer, tower):
        """(seed, offset) of the dropout mask of layer index `layer` in `tower` at `step`."""
        return self._net.dropout_key(int(step), int(layer), int(tower))

    def executors(self):
        return self._net.executors()

    def state_dict(self):
        """Every parameter ('conv1.t0.weight', ...), its momentum ('momentum/...'), 'meta/step' and
        'meta/seed' (which keys the dropout masks, so a loaded state continues the same run)."""
        d = dict(self._net.state())
        d["meta/step"] = np.array(self.step, dtype=np.int64)
        d["meta/seed"] = np.array(self.seed, dtype=np.uint64)
        return d

    def load_state_dict(self, state):
        state = dict(state)
        step = state.pop("meta/step", None)
        seed = state.pop("meta/seed", None)
        self._net.load_state(state)
        if step is not None:
            self.step = int(np.asarray(step))
        if seed is not None:
            self._net.seed = int(np.asarray(seed))

    # --- scheduler introspection -------------------------------------------------------------------
    def set_tracing(self, on):
        """Time every op of each step (CUDA events on GPUs) for last_step_stats()/write_trace()."""
        self._net.trace = bool(on)

    def last_step_stats(self):
        """Bytes moved on each cross-tower edge, the op timeline and the towers' overlap, for the last step."""
        s = self._net.last_step_stats()
        s["timeline"] = [
            {"op": op, "tower": tower, "device": dev, "start_us": a, "end_us": b}
            for (op, tower, dev, a, b) in s["timeline"]
        ]
        s["overlap"] = tower_overlap(s["timeline"])
        return s

    def write_trace(self, path):
        """The last step's timeline as Chrome-trace JSON (open it in Perfetto or chrome://tracing)."""
        s = self.last_step_stats()
        if not s["timeline"]:
            raise ValueError("write_trace: the last step has no timeline; call set_tracing(True) before the step")
        write_chrome_trace(s["timeline"], path, self.executors())
        return s


def _merged(intervals):
    """The disjoint intervals covering the same time, in order."""
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def tower_overlap(timeline):
    """busy time per tower, their union, and overlap = (time in which two or more towers were busy) /
    min(busy): 1.0 when the shorter tower ran entirely while another was busy, 0.0 when they ran strictly
    in turn. The overlapped time is swept directly, not taken as a difference of sums, so towers that
    only take turns give exactly 0."""
    towers = sorted({e["tower"] for e in timeline if e["tower"] >= 0})
    per_tower = {t: _merged([(e["start_us"], e["end_us"]) for e in timeline if e["tower"] == t]) for t in towers}
    busy = {t: sum(b - a for a, b in iv) for t, iv in per_tower.items()}
    union = sum(b - a for a, b in _merged([iv for ivs in per_tower.values() for iv in ivs]))
    # Sweep the towers' interval ends; at equal times an end comes before a start (touching is no overlap).
    edges = sorted((x, d) for ivs in per_tower.values() for a, b in ivs for x, d in ((a, 1), (b, -1)))
    both, active, last = 0.0, 0, None
    for x, d in edges:
        if active >= 2:
            both += x - last
        active += d
        last = x
    shortest = min(busy.values()) if busy else 0.0
    overlap = min(both / shortest, 1.0) if shortest > 0 and len(busy) > 1 else 0.0
    return {"busy_us": busy, "union_us": union, "overlap": overlap}


def write_chrome_trace(timeline, path, executor_names=None):
    events = []
    for e in timeline:
        events.append({
            "name": e["op"], "ph": "X", "ts": e["start_us"], "dur": max(e["end_us"] - e["start_us"], 0.0),
            "pid": e["device"], "tid": f"tower {e['tower']}", "args": {"tower": e["tower"]},
        })
    meta = {"executors": list(executor_names or [])}
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}, f)
