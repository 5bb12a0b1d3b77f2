"""The Python front of the C++ two-tower AlexNet (csrc/net.cpp): config handling, device specs, state
dicts for checkpoints, and the step timeline as a Chrome trace.

Three ways to feed a training step: train_step (float32 images augmented by the host), train_step_u8 (the
stored uint8 images with their crop, flip and lighting parameters, augmented on the towers' devices; the
arrays are copied into the net's staging ring), and the zero-copy form of the latter: staging_slot hands
out a slot of the ring whose parts are NumPy views of the net's own (page-locked, on CUDA) buffers, the
loader writes the batch straight into them (data.TrainLoader.raw_batch(..., out=slot)), and
train_step_staged uploads from there; its `prefetch` callback fills the next slot while the devices compute
the step. last_step_stats()["input"] says how much of a traced step the input path left exposed."""
import json
import numbers
from collections.abc import Mapping

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
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or not 0 <= int(seed) < 2 ** 64:
            raise ValueError(f"Net: argument 'seed' must be an integer in 0..{2 ** 64 - 1}, got {seed!r}"[:200])
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

    def set_input_mean(self, mean):
        """The mean image float32 (3, H, W) that train_step_u8 subtracts (a prepared folder's data.mean)."""
        self._net.set_input_mean(mean)

    def train_step_u8(self, images, offsets, flips, light, labels, lr, prefetch=None):
        """train_step on a batch augmented on the towers' devices: images uint8 (N, H, W, 3), offsets int32
        (N, 2) as (y0, x0) of each input_size crop, flips uint8 (N,) of 0/1, light float32 (N, 3) (the PCA
        lighting shift), as data.TrainLoader.raw_batch gives them; the mean image comes from set_input_mean.
        The same step, bit for bit, as train_step on ops.augment_batch's CPU output for these arguments.
        Staged in reused host buffers (pinned on CUDA) and uploaded on a stream of its own. `prefetch`, the
        next batch as a tuple (images, offsets, flips, light, labels), is staged and uploaded while this step
        runs: take the step on it with train_step_prefetched."""
        return self._net.train_step_u8(images, offsets, flips, light, self._labels(labels, "train_step_u8"),
                                       float(lr), self._prefetch(prefetch))

    def train_step_prefetched(self, lr, prefetch=None):
        """train_step_u8 on the batch the previous step prefetched (ValueError if it prefetched none)."""
        return self._net.train_step_prefetched(float(lr), self._prefetch(prefetch))

    def _prefetch(self, prefetch):
        if prefetch is None:
            return None
        if not isinstance(prefetch, (tuple, list)) or len(prefetch) != 5:
            raise TypeError("train_step_u8: argument 'prefetch' must be None or a tuple (images, offsets, flips, "
                            f"light, labels), got {type(prefetch).__name__}")
        *batch, labels = prefetch
        return (*batch, self._labels(labels, "train_step_u8"))

    def staging_slot(self, n, height, width):
        """A slot of the net's staging ring for a batch of n uint8 (height, width, 3) images. Its parts are
        writable NumPy views of the slot's memory (page-locked on CUDA): slot.images uint8 (n, height, width,
        3), slot.offsets int32 (n, 2), slot.flips uint8 (n,), slot.light float32 (n, 3), slot.labels int32
        (n,), as train_step_u8 takes them. Fill them in place (data.TrainLoader.raw_batch(..., out=slot))
        and step on the slot with train_step_staged: the upload reads the slot itself, no host copy. The ring
        never hands out a slot a step reads, the prefetched one, or one an upload may still read; a new
        hand-out of a slot voids the earlier one (train_step_staged then refuses the old handle)."""
        return self._net.staging_slot(n, height, width)

    def train_step_staged(self, slot, lr, prefetch=None):
        """train_step_u8 on a filled staging slot (None: the slot the previous step prefetched), the same
        bits. `prefetch`: None, a filled slot, or a callable taking no arguments that fills one and returns it
        (or None); it is called once the whole step is issued, while the devices compute it, so the host
        staging and the upload of the next batch overlap this step; the next call then passes slot=None.
        A slot is checked before it is used (this net's, not used yet, the shape the net takes now, every
        value in range: ValueError). An exception from `prefetch` is raised after the step completed and
        was counted. Returns dict(loss, top1, top5, n)."""
        return self._net.train_step_staged(slot, float(lr), prefetch)

    def forward(self, images, probs=False):
        """Inference (no dropout): logits, or softmax probabilities, as (N, num_classes) float32."""
        return self._net.forward(self._images(images, "forward"), bool(probs))

    def features(self, images, layer="fc7"):
        """Inference (no dropout): the output of the named layer ("conv1".."conv5" after their ReLU, LRN and
        pooling, "fc6"/"fc7" after ReLU, "fc8" the logits), both towers' parts concatenated in tower order:
        (N, C, H, W) or (N, F) float32. fc7 is the 4096-d space of the paper's Figure 4."""
        return self._net.features(self._images(images, "features"), str(layer))

    def evaluate(self, images, labels):
        """Inference loss and top-1/top-5 hits: dict(loss, top1, top5, n)."""
        return self._net.evaluate(self._images(images, "evaluate"), self._labels(labels, "evaluate"))

    # --- data-parallel training (alexnet_cuda.distributed) ------------------------------------------
    def set_data_parallel(self, defer_sgd=True, mean_over=0, sample_base=0, grad_ready=None):
        """With defer_sgd, train_step/train_step_u8/train_step_prefetched run forward and backward only and
        leave the gradients in grads() (the step count unchanged); apply_sgd(lr) then updates and counts the
        step. mean_over: the loss gradient is averaged over this many samples (0: the batch's; the global
        batch across ranks). sample_base: the global index of this batch's first sample, which keys its
        dropout masks (so a slice of a global batch draws the masks one process would). grad_ready(layer,
        tower, dw, db, stream): called as each layer's gradients are made (CPU: from the tower's worker thread,
        with the GIL taken, stream 0; CUDA: when issued, with the device's upload stream, which waits for the
        gradients and which the step waits for: work issued there overlaps the rest of the backward pass). dw,
        db are Tensors (Tensor.host_view, Tensor.data_ptr). The defaults restore the plain step."""
        self._net.set_data_parallel(bool(defer_sgd), mean_over, sample_base, grad_ready)

    def apply_sgd(self, lr):
        """The SGD update (momentum, weight decay) from the gradients of the last deferred step; counts it."""
        self._net.apply_sgd(float(lr))

    def grads(self):
        """[(name, Tensor)] of the last deferred step's gradients, on their devices, named as state_dict()."""
        return self._net.grads()

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

    def state_shapes(self):
        """{state_dict key: shape} for every parameter and momentum the config implies (no copies made)."""
        shapes = {}
        for L in self.layers():
            w = (L["out_c"], L["in_c"], L["kernel"], L["kernel"]) if L["kind"] == "conv" else (L["out_c"], L["in_c"])
            for t in range(self.config["towers"]):
                shapes[f"{L['name']}.t{t}.weight"] = w
                shapes[f"{L['name']}.t{t}.bias"] = (L["out_c"],)
        shapes.update({"momentum/" + k: v for k, v in list(shapes.items())})
        return shapes

    def parameter_shapes(self):
        """{parameter key: shape} (weights and biases only, no momentum)."""
        return {k: v for k, v in self.state_shapes().items() if not k.startswith("momentum/")}

    def weights(self):
        """The parameters only ('conv1.t0.weight', ...): no momentum, no step or seed (what save_weights writes)."""
        return {k: v for k, v in self._net.state() if not k.startswith("momentum/")}

    def load_weights(self, weights):
        """Load parameters only (a weights-only file, an exported or fine-tuning source): every parameter key
        exactly once, checked as in load_state_dict; the momentum buffers are set to zero, as at the start of
        a run. The step and seed are left as they are."""
        if not isinstance(weights, Mapping):
            raise TypeError(f"load_weights: argument 'weights' must be a dict, got {type(weights).__name__}")
        shapes = self.parameter_shapes()
        _check_keys("load_weights", weights, shapes,
                    " (momentum is not loaded by load_weights: use load_state_dict)", ("momentum/", "meta/"))
        checked = {}
        for k, shape in shapes.items():
            checked[k] = _float32_param(k, weights[k], shape, "load_weights")
            checked["momentum/" + k] = np.zeros(shape, np.float32)
        self._net.load_state(checked)

    def load_state_dict(self, state):
        """Load a state_dict (as state_dict() gives). Every entry is checked here before anything reaches
        C++: the keys are exactly the net's, each parameter is a floating-point array of the shape the config
        implies with finite values that fit float32 (float64 beyond float32's range is refused, never turned
        into inf; str, bytes, object, structured and complex arrays are refused); 'meta/step' and 'meta/seed'
        are non-negative integer scalars. ValueError/TypeError name the entry."""
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: argument 'state' must be a dict, got {type(state).__name__}")
        state = dict(state)
        step = state.pop("meta/step", None)
        seed = state.pop("meta/seed", None)
        step = None if step is None else _int_scalar("meta/step", step, 2 ** 63 - 1)
        seed = None if seed is None else _int_scalar("meta/seed", seed, 2 ** 64 - 1)
        shapes = self.state_shapes()
        _check_keys("load_state_dict", state, shapes)
        checked = {k: _float32_param(k, state[k], shapes[k]) for k in shapes}
        self._net.load_state(checked)
        if step is not None:
            self.step = step
        if seed is not None:
            self._net.seed = seed

    # --- scheduler introspection -------------------------------------------------------------------
    def set_cuda_graph(self, mode):
        """'auto', 'on' or 'off' (the default): run training steps as one captured CUDA graph. After two eager
        steps with the same batch shape, the next train_step / train_step_u8 / train_step_prefetched is captured
        as a CUDA graph (every kernel, copy and event wait of the step, both towers) and later steps with that
        shape replay it: the same kernels in the same order, so the same bits as eager steps, without the
        per-launch host cost. 'auto' does so where the placement allows it (every tower on one CUDA device, on
        one shared stream or a stream each), 'on' raises ValueError where it does not (the CPU, towers on two
        devices). Steps stay eager while tracing, with distributed hooks set, or if a capture fails
        (graph_stats()['last_failure'] says why); a new batch shape or mean image re-captures."""
        if not isinstance(mode, str):
            raise TypeError(f"set_cuda_graph: argument 'mode' must be 'auto', 'on' or 'off', got {type(mode).__name__}")
        self._net.set_cuda_graph(mode)

    @property
    def cuda_graph(self):
        """The CUDA graph mode set by set_cuda_graph: 'auto', 'on' or 'off'."""
        return self._net.cuda_graph

    def cuda_graph_supported(self):
        """(True, '') if this placement can run steps as CUDA graphs, else (False, why not)."""
        return tuple(self._net.cuda_graph_supported())

    def graph_stats(self):
        """CUDA graph counters: captures, replays (steps run as a graph), failures, last_step_graph, last_failure."""
        return self._net.graph_stats()

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
        s["input"] = input_overlap(s["timeline"])
        return s

    def write_trace(self, path):
        """The last step's timeline as Chrome-trace JSON (open it in Perfetto or chrome://tracing)."""
        s = self.last_step_stats()
        if not s["timeline"]:
            raise ValueError("write_trace: the last step has no timeline; call set_tracing(True) before the step")
        write_chrome_trace(s["timeline"], path, self.executors())
        return s


_KINDS = {"U": "str", "S": "bytes", "O": "object", "V": "structured/void", "c": "complex", "b": "bool",
          "M": "datetime", "m": "timedelta", "i": "integer", "u": "unsigned integer", "f": "floating point"}


def _dtype_name(dtype):
    kind = "structured/void" if dtype.fields is not None or dtype.subdtype is not None else _KINDS.get(dtype.kind, dtype.kind)
    return f"{dtype} ({kind})"


def _check_keys(op, given, shapes, hint="", hint_prefixes=()):
    """The keys of `given` are exactly those of `shapes` (strings), else one error naming the first offender;
    `hint` is appended when the first unexpected key starts with one of `hint_prefixes`."""
    for k in given:
        if not isinstance(k, str):
            raise TypeError(f"{op}: keys must be strings, got {k!r}"[:200])
    extra = sorted(set(given) - set(shapes))
    if extra:
        why = hint if hint_prefixes and extra[0].startswith(hint_prefixes) else ""
        raise ValueError(f"{op}: unexpected entry '{extra[0]}'{why}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = [k for k in shapes if k not in given]
    if missing:
        raise ValueError(f"{op}: missing '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _float32_param(key, value, shape, op="load_state_dict"):
    a = value if isinstance(value, np.ndarray) else np.asarray(value)
    if a.dtype.kind != "f" or a.dtype.fields is not None or a.dtype.subdtype is not None:
        raise TypeError(f"{op}: '{key}' has dtype {_dtype_name(a.dtype)}; expected floating point")
    if a.shape != tuple(shape):
        raise ValueError(f"{op}: '{key}' has shape {a.shape}, the net has {tuple(shape)}")
    from .checkpoint import finite_float32

    return finite_float32(a, f"{op}: '{key}'")


def _int_scalar(key, value, hi):
    if isinstance(value, np.ndarray):
        if value.shape != () or value.dtype.kind not in "iu":
            raise TypeError(f"load_state_dict: '{key}' must be an integer scalar, got dtype "
                            f"{_dtype_name(value.dtype)} and shape {value.shape}")
        value = value.item()
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"load_state_dict: '{key}' must be an integer, got {value!r}"[:200])
    if not 0 <= int(value) <= hi:
        raise ValueError(f"load_state_dict: '{key}' must be in 0..{hi}, got {int(value)}")
    return int(value)


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


def _length(intervals):
    return sum(b - a for a, b in _merged(intervals))


def _minus(intervals, cover):
    """The parts of `intervals` (merged) outside the merged intervals `cover`."""
    out = []
    cover = _merged(cover)
    for a, b in _merged(intervals):
        x = a
        for c, d in cover:
            if d <= x or c >= b:
                continue
            if c > x:
                out.append([x, c])
            x = max(x, d)
            if x >= b:
                break
        if x < b:
            out.append([x, b])
    return out


INPUT_KINDS = {"stage": ("input.stage",), "upload": ("input.upload",), "augment": ("input.augment", "input.share")}


def input_overlap(timeline):
    """How much of a step the input path costs. Per kind (stage: the host filling the next batch's staging
    slot, from train_step_staged's prefetch callback; upload: the host-to-device copies on the upload
    streams; augment: augment_batch on the towers' devices), the time it was busy (busy_us) and the part of
    it during which no tower computed anything else (exposed_us: time the input path adds to the step unless
    it is hidden behind the towers' compute). compute: every op of a tower (tower >= 0) except the input
    path's own. exposed_total_us is the union over the kinds. The host's entries are timed from the step's
    start on the host clock, the devices' from their first event: aligned to within the launch latency."""
    compute = [(e["start_us"], e["end_us"]) for e in timeline
               if e["tower"] >= 0 and not e["op"].startswith("input.")]
    busy, exposed, every = {}, {}, []
    for kind, ops in INPUT_KINDS.items():
        iv = [(e["start_us"], e["end_us"]) for e in timeline if e["op"] in ops]
        every += iv
        busy[kind] = _length(iv)
        exposed[kind] = _length(_minus(iv, compute))
    return {"busy_us": busy, "exposed_us": exposed, "busy_total_us": _length(every),
            "exposed_total_us": _length(_minus(every, compute))}


def write_chrome_trace(timeline, path, executor_names=None):
    events = []
    for e in timeline:
        events.append({
            "name": e["op"], "ph": "X", "ts": e["start_us"], "dur": max(e["end_us"] - e["start_us"], 0.0),
            "pid": e["device"],
            "tid": (f"tower {e['tower']}" if e["tower"] >= 0 else "host staging" if e["device"] == "host"
                    else "input upload"),
            "args": {"tower": e["tower"]},
        })
    meta = {"executors": list(executor_names or [])}
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms", "otherData": meta}, f)
