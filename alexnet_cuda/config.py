"""Every default in one place, from docs/ALEXNET.md (the paper). Override any of them from Python or
the command line; nothing else in the package hard-codes these numbers."""
import copy

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


def alexnet_config(**overrides):
    """The paper's network config as a dict, with `overrides` applied (unknown keys raise ValueError)."""
    cfg = copy.deepcopy(NET_DEFAULTS)
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"alexnet_config: unknown key {key!r} (known: {', '.join(sorted(cfg))})")
        if key == "conv1":
            unknown = set(value) - set(cfg["conv1"])
            if unknown:
                raise ValueError(f"alexnet_config: unknown conv1 key(s) {sorted(unknown)}")
            cfg["conv1"] = {**cfg["conv1"], **value}
        else:
            cfg[key] = value
    cfg["channels"] = tuple(int(c) for c in cfg["channels"])
    cfg["fc"] = tuple(int(c) for c in cfg["fc"])
    cfg["drop_layers"] = tuple(cfg["drop_layers"])
    return cfg


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
