"""Every default in one place, from docs/ALEXNET.md (the paper). Override any of them from Python or
the command line; nothing else in the package hard-codes these numbers."""
import copy
import math
import numbers

# The network (Krizhevsky et al. 2012, section 3 and figure 2). Totals are split evenly over the towers.
NET_DEFAULTS = {
    "input_size": 224,
    "in_channels": 3,
    "num_classes": 1000,
    "towers": 2,
    "conv1": {"kernel": 11, "stride": 4, "padding": 2},  # choice: pad 2 so that 224 gives 55
    "channels": (96, 256, 384, 384, 256),  # conv1..conv5
    "fc": (4096, 4096),  # fc6, fc7
    "lrn": True,
    "lrn_size": 5,
    "lrn_k": 2.0,
    "lrn_alpha": 1e-4,  # multiplies the plain sum of squares
    "lrn_beta": 0.75,
    "overlap_pool": True,  # 3/2 windows; False gives the 2/2 ablation
    "dropout": 0.5,
    "drop_layers": (),  # any of "conv2", "conv3", "conv4": the paper's ablations
    "momentum": 0.9,
    "weight_decay": 0.0005,
    # The paper's rule names the weights; Krizhevsky's cuda-convnet decays no bias. Set it to weight_decay to
    # decay biases too (what this project did before the option existed).
    "bias_weight_decay": 0.0,
    "init_std": 0.01,
}

# The training schedule (section 5).
TRAIN_DEFAULTS = {
    "batch_size": 128,
    "lr": 0.01,
    "lr_factor": 0.1,  # divide by 10 ...
    "lr_reductions": 3,  # ... at most three times, when validation error stops improving
    "epochs": 90,
    "crop": 224,
    "image_size": 256,
    "pca_std": 0.1,  # alpha_i ~ N(0, 0.1) per image per use
}

DROPPABLE = ("conv2", "conv3", "conv4")

# Sizes are int32 in the C++ net; this bound keeps every single size well inside it (products of sizes are
# checked there).
MAX_SIZE = 2 ** 31 - 1


def _int(key, v, lo=1):
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or not lo <= v <= MAX_SIZE:  # bool: not a size
        raise ValueError(f"alexnet_config: {key} must be an integer in {lo}..{MAX_SIZE}, got {v!r}")
    return int(v)


def _num(key, v, lo=None, hi=None, lo_open=False, hi_open=False):
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"alexnet_config: {key} must be a finite number, got {v!r}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi)):
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" \
              f"{')' if hi_open or hi is None else ']'}"
        raise ValueError(f"alexnet_config: {key} must be in {rng}, got {v!r}")
    return float(v)


def _bool(key, v):
    if type(v) is not bool:
        raise ValueError(f"alexnet_config: {key} must be True or False, got {v!r}")
    return v


def _sizes(key, v, n):
    if not isinstance(v, (list, tuple)) or len(v) != n:
        raise ValueError(f"alexnet_config: {key} must be a list of {n} positive integers, got {v!r}")
    return tuple(_int(f"{key}[{i}]", x) for i, x in enumerate(v))


def validate_config(cfg):
    """Configs also arrive from the command line (--set) and from checkpoint files, and nothing unchecked may
    reach the C++ net: every value's type and range is checked here (ValueError naming the key).

    Check a full config dict (every key present, nothing else); returns it normalised (tuples, floats)."""
    if "bias_weight_decay" not in cfg and "weight_decay" in cfg:
        # A config saved before the key existed: its run decayed biases like weights; resume it that way.
        cfg = dict(cfg, bias_weight_decay=cfg["weight_decay"])
    unknown = set(cfg) - set(NET_DEFAULTS)
    missing = set(NET_DEFAULTS) - set(cfg)
    if unknown or missing:
        raise ValueError(f"alexnet_config: unknown key(s) {sorted(unknown)}" if unknown else
                         f"alexnet_config: missing key(s) {sorted(missing)}")
    out = dict(cfg)
    for key in ("input_size", "in_channels", "num_classes", "towers", "lrn_size"):
        out[key] = _int(key, cfg[key])
    c1 = cfg["conv1"]
    if not isinstance(c1, dict) or set(c1) != set(NET_DEFAULTS["conv1"]):
        raise ValueError(f"alexnet_config: conv1 must be a dict with keys kernel, stride, padding, got {c1!r}")
    out["conv1"] = {"kernel": _int("conv1.kernel", c1["kernel"]), "stride": _int("conv1.stride", c1["stride"]),
                    "padding": _int("conv1.padding", c1["padding"], lo=0)}
    out["channels"] = _sizes("channels", cfg["channels"], 5)
    out["fc"] = _sizes("fc", cfg["fc"], 2)
    out["lrn"] = _bool("lrn", cfg["lrn"])
    out["overlap_pool"] = _bool("overlap_pool", cfg["overlap_pool"])
    out["lrn_k"] = _num("lrn_k", cfg["lrn_k"])
    out["lrn_alpha"] = _num("lrn_alpha", cfg["lrn_alpha"])
    out["lrn_beta"] = _num("lrn_beta", cfg["lrn_beta"])
    out["dropout"] = _num("dropout", cfg["dropout"], 0.0, 1.0, hi_open=True)
    out["momentum"] = _num("momentum", cfg["momentum"], 0.0, 1.0, hi_open=True)
    out["weight_decay"] = _num("weight_decay", cfg["weight_decay"], 0.0)
    out["bias_weight_decay"] = _num("bias_weight_decay", cfg["bias_weight_decay"], 0.0)
    out["init_std"] = _num("init_std", cfg["init_std"], 0.0, lo_open=True)
    drop = cfg["drop_layers"]
    if not isinstance(drop, (list, tuple)) or any(d not in DROPPABLE for d in drop):
        raise ValueError(f"alexnet_config: drop_layers must be a list of names from {DROPPABLE}, got {drop!r}")
    out["drop_layers"] = tuple(drop)
    return out


def alexnet_config(**overrides):
    """The paper's network config as a dict, with `overrides` applied (unknown keys and values of the wrong
    type or range raise ValueError naming the key)."""
    cfg = copy.deepcopy(NET_DEFAULTS)
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"alexnet_config: unknown key {key!r} (known: {', '.join(sorted(cfg))})")
        if key == "conv1":
            if not isinstance(value, dict):
                raise ValueError(f"alexnet_config: conv1 must be a dict with keys kernel, stride, padding, got {value!r}")
            unknown = set(value) - set(cfg["conv1"])
            if unknown:
                raise ValueError(f"alexnet_config: unknown conv1 key(s) {sorted(map(str, unknown))}")
            cfg["conv1"] = {**cfg["conv1"], **value}
        else:
            cfg[key] = value
    return validate_config(cfg)


def tiny_config(**overrides):
    """A small AlexNet-shaped net (same layers, towers, LRN, overlapping pooling, dropout) for 32x32
    inputs: what CI trains on the CPU and the built-in demo uses."""
    base = {
        "input_size": 32,
        "num_classes": 10,
        "conv1": {"kernel": 5, "stride": 1, "padding": 2},
        "channels": (32, 64, 96, 96, 64),
        "fc": (256, 256),
        # The paper's std 0.01 suits its widths (fan-in 1,200-9,216); at these widths the signal dies out
        # on the way up and the net sits at chance, so the small net starts wider.
        "init_std": 0.03,
    }
    base.update(overrides)
    return alexnet_config(**base)
