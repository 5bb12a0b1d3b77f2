"""Train AlexNet: python -m alexnet_cuda.train [--data DST] [--devices cuda:0,cuda:1] [...]

With no --data it trains the tiny AlexNet (config.tiny_config, init_std 0.03) on a small built-in image set
(alexnet_cuda.synthetic: 10 classes, 3000 train / 500 val images, generated once into a cache folder,
prepared at 40x40, crop 32) for 8 epochs of batch 32 at lr 0.005 and prints the final validation errors:
the first command of the README (~18% top-1 error, chance 90%; its time is stated in the README).

Defaults are the paper's (config.TRAIN_DEFAULTS / NET_DEFAULTS): batch 128, lr 0.01 divided by 10 when
the validation top-1 error has not improved for --patience epochs (at most three times), momentum 0.9,
weight decay 0.0005, 90 epochs; every one can be changed by a flag, network keys with --set KEY=VALUE.

The run folder (--out, default runs/<timestamp>) receives checkpoints/ckpt_<step>.npz (atomic, the
last --keep kept, and always the best: the epoch with the lowest validation top-1 error), metrics.jsonl and
metrics.csv (one row per epoch), metrics.png (loss, top-1/top-5 error and the learning rate, redrawn every
epoch when matplotlib is importable), steps.csv (one row every --log-every steps) and args.json. Both CSVs
count epochs from 1 and give errors as fractions (steps.csv: step, epoch, batch (from 1 within the epoch),
loss, top1_err, top5_err, n, lr).

--preset NAME trains one of the paper's ablations (config.PRESETS; docs/ALEXNET.md has their expected
effects). --finetune SRC starts a new run from SRC's weights (see README "Weights, fine-tuning"): SRC's
network and crop, the data's class count, fc8 re-initialised unless SRC names exactly the data's classes,
momentum zero. --trace PATH writes the Chrome trace of the first step the command runs. --cuda-graph
{auto,on,off} (default auto) runs the steady-state steps as one captured CUDA graph where every tower is on one GPU
(Net.set_cuda_graph: the same numbers as eager steps; the traced step and distributed runs stay eager). --resume [PATH|auto] continues a run exactly where it stopped: on the same backend
its losses equal an uninterrupted run's bit for bit. Every checkpoint is fully checked when loaded (CRC of
every byte, dtypes, shapes, values, metadata); --resume auto and a run folder as --resume take the newest
checkpoint that passes, saying on stderr which damaged ones were skipped. Ctrl-C writes a checkpoint and
says how to resume; a non-finite loss stops the run without saving the bad state.

Data-parallel across processes: started by mpirun/mpiexec or srun (e.g. mpirun -n 8 python -m
alexnet_cuda.train ...), each rank trains on its slice of every global batch and the gradients are summed
across the ranks (alexnet_cuda.distributed). --batch-size is the global batch (divisible by the ranks), so
the learning rate and every other setting mean what they mean in one process, and a run may resume on another
number of ranks. Only rank 0 prints, writes metrics and checkpoints; every rank resumes from the checkpoint
rank 0 reads. A rank that fails ends the job (MPI_Abort); a rank that waits longer than --comm-timeout seconds
on the others stops with an error. SIGUSR1 (mpirun and srun forward it to every rank) stops the run after the
current step with a checkpoint, as Ctrl-C does in one process.

A new run refuses an --out folder that is not empty (continue it with --resume auto --out RUN, or pass
--overwrite to replace the previous run's files there: its checkpoints, metrics, steps.csv, args.json;
other files are left alone). A run that fails while setting up leaves no folder behind.
"""
import argparse
import ast
import csv
import io
import json
import math
import os
import re
import signal
import sys
import threading
import time

from . import config as axconfig
from . import distributed
from .checkpoint import (SUBDIR, CheckpointError, atomic_write, checkpoint_dir, checkpoint_name, list_checkpoints,
                         load_checkpoint, load_latest, prune_checkpoints, remove_stale_temporaries, save_checkpoint)
from .cli import (EXIT_INTERRUPTED, EXIT_NONFINITE, CliError, OneLineParser, add_devices_argument, devices_str, nonneg_float,
                  nonneg_int, parse_devices, positive_float, positive_int, run_main, seed_int, unit_interval)
from .progress import progress_bar

# Training-loop settings that are not the paper's numbers (those are in config.TRAIN_DEFAULTS).
LOOP_DEFAULTS = {
    "patience": 2,  # epochs without a better validation top-1 error before the lr is divided
    "seed": 0,
    "lighting": "std",  # lambda_i of the PCA lighting: sqrt(eigenvalue) (see data.py)
    "flip": True,
    "keep": 3,  # checkpoints kept
    "checkpoint_every": 0,  # steps between mid-epoch checkpoints (0: only at the end of each epoch)
    "log_every": 10,  # steps between rows of steps.csv
    "max_steps": 0,  # stop after this many steps in all (0: no limit)
    "prefetch": 3,  # batches prepared ahead in background threads
    "loader_threads": max(1, min(6, (os.cpu_count() or 2) // 2)),  # threads building them (~900 img/s each
    # at 224 from 256 on one core of this machine; the augment op releases the GIL)
    "net": "alexnet",
    "preset": None,  # one of config.PRESETS: the paper's ablations
    "finetune": None,  # the weights source a fine-tuning run started from
}

# The built-in demo: the tiny AlexNet (config.tiny_config, whose init std is 0.03) on the generated
# 10-class set (size 40, crop 32). The paper's lr 0.01 leaves this small net at chance for many epochs;
# a smaller lr gets it well above chance in a few CPU minutes.
DEMO_DEFAULTS = {"net": "tiny", "crop": 32, "image_size": 40, "epochs": 8, "batch_size": 32, "lr": 0.005,
                 "patience": 2}
DEMO_DATA = {"seed": 0, "size": 40, "train_per_class": 300, "val_per_class": 50}

# What a resumed run may change (the rest would break exact continuation and is refused).
# --max-steps is a limit of the invocation that gives it: it is not carried over.
RESUME_MUTABLE = {"epochs", "lr", "patience", "lr_reductions", "lr_factor", "keep", "checkpoint_every",
                  "log_every", "max_steps", "prefetch", "loader_threads"}

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_top1_err", "train_top5_err", "val_loss",
                 "val_top1_err", "val_top5_err", "epoch_seconds", "images_per_s", "time"]


class NonFiniteLoss(Exception):
    pass


def build_parser():
    p = OneLineParser(prog="python -m alexnet_cuda.train", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    d = axconfig.TRAIN_DEFAULTS
    n = axconfig.NET_DEFAULTS
    p.add_argument("--data", help="prepared folder (python -m alexnet_cuda.prepare); omitted: the built-in demo")
    p.add_argument("--out", help="run folder (default runs/<timestamp>); a new run refuses one that is not empty")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out, deleting the "
                   "previous run's checkpoints, metrics, steps.csv and args.json there (other files are kept)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="PATH|auto",
                   help="continue from a checkpoint file, a run folder's newest checkpoint, or (auto) the newest "
                        "in --out (a fresh start if it has none) or in the newest run under runs/")
    add_devices_argument(p)
    p.add_argument("--net", choices=("alexnet", "tiny"), help="network: the paper's (default) or the tiny "
                   "32x32 one (the demo's)")
    p.add_argument("--preset", choices=tuple(axconfig.PRESETS), help="one of the paper's ablations, applied to "
                   "--net: " + "; ".join(f"{k}: {v[0]}" for k, v in axconfig.PRESETS.items())
                   + " (docs/ALEXNET.md has each one's expected effect)")
    p.add_argument("--finetune", metavar="SRC", help="start from the weights of SRC (a checkpoint, run folder, "
                   "weights .npz or .safetensors) on --data, with fresh momentum and schedule; the network is "
                   "SRC's (its config, crop) with the data's number of classes; fc8 is re-initialised (the "
                   "paper's init) unless SRC names exactly the data's classes")
    p.add_argument("--trace", metavar="PATH", help="write the Chrome trace (Perfetto) of the first step this "
                   "command runs to PATH")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run steady-state steps as one captured CUDA graph (the same numbers, less host work per "
                   "step): auto (default) where the placement allows it (every tower on one GPU), on (an error "
                   "where it does not), off")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="network config override, e.g. --set dropout=0.3 --set 'drop_layers=(\"conv3\",)'")
    p.add_argument("--batch-size", type=positive_int, help=f"images per step (default {d['batch_size']})")
    p.add_argument("--lr", type=positive_float, help=f"learning rate (default {d['lr']})")
    p.add_argument("--momentum", type=unit_interval, help=f"(default {n['momentum']})")
    p.add_argument("--weight-decay", type=nonneg_float, help=f"(default {n['weight_decay']})")
    p.add_argument("--epochs", type=positive_int, help=f"(default {d['epochs']})")
    p.add_argument("--lr-factor", type=_factor, help=f"lr multiplier on a plateau (default {d['lr_factor']})")
    p.add_argument("--lr-reductions", type=nonneg_int, help=f"at most this many (default {d['lr_reductions']})")
    p.add_argument("--patience", type=positive_int, help="epochs without a better validation top-1 error "
                   f"before the lr is reduced (default {LOOP_DEFAULTS['patience']})")
    p.add_argument("--crop", type=positive_int, help=f"training crop = network input size (default {d['crop']})")
    p.add_argument("--pca-std", type=nonneg_float, help=f"std of the lighting alphas; 0: none (default {d['pca_std']})")
    p.add_argument("--lighting", choices=("std", "eigenvalue"), help="lambda_i in the lighting formula: "
                   "sqrt of the eigenvalue (default) or the eigenvalue itself")
    p.add_argument("--no-flip", dest="flip", action="store_const", const=False, help="no horizontal flips")
    p.add_argument("--seed", type=seed_int, help="data order, augmentation, init and dropout, 0..2^64-1 "
                   "(default 0)")
    p.add_argument("--keep", type=positive_int, help="checkpoints kept (default 3)")
    p.add_argument("--checkpoint-every", type=nonneg_int, help="steps between checkpoints within an epoch "
                   "(default 0: at the end of each epoch only)")
    p.add_argument("--log-every", type=positive_int, help="steps between rows of steps.csv (default 10)")
    p.add_argument("--max-steps", type=nonneg_int, help="stop (with a checkpoint) after this many steps in all")
    p.add_argument("--prefetch", type=nonneg_int, help="batches prepared ahead (default 3; 0: none; on CUDA the "
                   "next batch is written into the net's staging slot while each step computes instead)")
    p.add_argument("--loader-threads", type=nonneg_int, help="threads preparing them (default: half the CPUs, "
                   "at most 6)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--comm-timeout", type=positive_float, default=distributed.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="with several ranks (mpirun, srun): how long a rank waits on the others before it stops "
                        f"with an error (default {distributed.DEFAULT_TIMEOUT:g})")
    return p


def _factor(text):
    v = float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return v


def _parse_sets(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, text = item.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = text  # a bare word: the config check says what it should have been
        out[key.strip()] = value
    return out


_TRAIN_KEYS = ("batch_size", "lr", "epochs", "lr_factor", "lr_reductions", "patience", "crop", "pca_std",
               "lighting", "flip", "seed", "keep", "checkpoint_every", "log_every", "max_steps", "prefetch",
               "loader_threads", "net", "preset", "finetune")


def _explicit(args):
    """Training settings given on the command line (None = not given)."""
    return {k: getattr(args, k) for k in _TRAIN_KEYS if getattr(args, k, None) is not None}


def _net_overrides(args):
    o = _parse_sets(args.set)
    if args.momentum is not None:
        o["momentum"] = args.momentum
    if args.weight_decay is not None:
        o["weight_decay"] = args.weight_decay
    return o


# ---- run folder files ---------------------------------------------------------------------------------

def _write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_metrics(out, history):
    """metrics.jsonl and metrics.csv from the whole history (rewritten, so a resumed run's files hold
    exactly its history)."""
    _write_text(os.path.join(out, "metrics.jsonl"), "".join(json.dumps(h) + "\n" for h in history))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if h.get(k) is None else h.get(k)) for k in METRIC_FIELDS})
    _write_text(os.path.join(out, "metrics.csv"), buf.getvalue())


_plot_notice = []


def plot_metrics(out, history, log):
    """metrics.png: loss, top-1/top-5 error (train and validation) and the learning rate, per epoch. Every
    curve has its own colour and a legend entry (train dashed, validation solid)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - no matplotlib (or a broken one): no plot, said once
        if not _plot_notice:
            _plot_notice.append(1)
            log("matplotlib is not importable: no metrics.png (pip install matplotlib)")
        return
    ep = [h["epoch"] for h in history]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
    a1.plot(ep, [h["train_loss"] for h in history], "o--", color="C0", label="train")
    if any(h.get("val_loss") is not None for h in history):
        a1.plot(ep, [h.get("val_loss") for h in history], "o-", color="C1", label="validation")
    a1.set_xlabel("epoch"), a1.set_ylabel("loss"), a1.set_title("cross-entropy loss"), a1.legend()
    colours = {("train", "top1"): "C0", ("train", "top5"): "C2", ("val", "top1"): "C1", ("val", "top5"): "C3"}
    for (split, k), color in colours.items():
        vals = [h.get(f"{split}_{k}_err") for h in history]
        if any(v is not None for v in vals):
            a2.plot(ep, [None if v is None else 100 * v for v in vals], "--" if split == "train" else "-",
                    color=color, marker="o",
                    label=f"{'train' if split == 'train' else 'validation'} {k.replace('top', 'top-')}")
    a2.set_xlabel("epoch"), a2.set_ylabel("error (%)"), a2.set_title("top-1 / top-5 error"), a2.legend()
    a3.step(ep, [h["lr"] for h in history], "o-", where="post", color="C4", label="learning rate")
    a3.set_yscale("log")
    a3.set_xlabel("epoch"), a3.set_ylabel("learning rate"), a3.set_title("learning rate (during the epoch)")
    a3.legend()
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(os.path.join(out, "metrics.png"), lambda f: f.write(buf.getvalue()))


class StepLog:
    """steps.csv, in metrics.csv's units: step (steps done), epoch (1-based, as in metrics.csv), batch
    (1-based within the epoch), loss (exact repr), top1_err and top5_err (fractions of the batch, as
    metrics.csv's errors), n (images in the batch), lr."""

    HEADER = "step,epoch,batch,loss,top1_err,top5_err,n,lr\n"

    def __init__(self, path, keep_upto=None):
        self.path = path
        rows = []
        if keep_upto is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f.readlines()[1:]:
                    try:
                        if int(line.split(",", 1)[0]) <= keep_upto:
                            rows.append(line if line.endswith("\n") else line + "\n")
                    except ValueError:
                        continue
        _write_text(path, self.HEADER + "".join(rows))
        self.f = open(path, "a", encoding="utf-8")

    def write(self, step, epoch, batch, r, lr):
        """epoch, batch: 0-based indices (written 1-based)."""
        n = int(r["n"])
        e1, e5 = 1 - int(r["top1"]) / n, 1 - int(r["top5"]) / n
        self.f.write(f"{step},{epoch + 1},{batch + 1},{float(r['loss'])!r},{e1!r},{e5!r},{n},{lr!r}\n")
        self.f.flush()

    def close(self):
        self.f.close()


# ---- setup ------------------------------------------------------------------------------------------------

def _new_run_dir(args):
    if args.out:
        return args.out
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out, i = base, 1
    while os.path.exists(out):
        i += 1
        out = f"{base}-{i}"
    return out


def _find_resume(args, log):
    """-> (path, meta, net_state, extra) of the checkpoint to continue from, fully checked, or None for a
    fresh start (--resume auto with an --out that has no checkpoint). A folder means its newest checkpoint
    that loads: damaged newer ones are skipped, and log() says so."""
    spec = args.resume
    if spec == "auto":
        if args.out:
            found = load_latest(args.out, warn=log)
            if found is None:
                if list_checkpoints(args.out):
                    raise ValueError(f"--resume auto: no checkpoint in {args.out} loads (all damaged, see above); "
                                     "give a checkpoint path or another --out")
                log(f"--resume auto: no checkpoint in {args.out} yet, starting a new run there")
            return found
        runs = []
        if os.path.isdir("runs"):
            for name in os.listdir("runs"):
                cks = list_checkpoints(os.path.join("runs", name))
                if cks:
                    runs.append((os.path.getmtime(cks[-1]), os.path.join("runs", name)))
        for _, folder in sorted(runs, reverse=True):
            found = load_latest(folder, warn=log)
            if found:
                return found
        raise ValueError("--resume auto: no loadable checkpoint found under runs/ (give --out RUN or a checkpoint path)")
    if os.path.isdir(spec):
        found = load_latest(spec, warn=log)
        if found is None:
            raise ValueError(f"--resume {spec}: no loadable checkpoint in that folder")
        return found
    if not os.path.lexists(spec):
        raise ValueError(f"--resume {spec}: no such checkpoint")
    return (spec, *load_checkpoint(spec))


RUN_FILES = ("metrics.jsonl", "metrics.csv", "metrics.png", "steps.csv", "args.json")


def _check_out(out, args):
    """A new run's folder: absent, empty, or (asked for with --overwrite / --resume auto) a previous run's."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not (args.overwrite or args.resume):
        raise ValueError(f"run folder {out} is not empty: continue it with --resume auto --out {out}, choose another "
                         "--out, or pass --overwrite to replace its run files")


def _clear_previous_run(out, log):
    """--overwrite: remove the files a previous run wrote in `out` (never anything else)."""
    removed = 0
    ck = checkpoint_dir(out)
    names = [os.path.join(ck, n) for n in (os.listdir(ck) if os.path.isdir(ck) else [])
             if re.match(r"^(abandoned_)?ckpt_\d{9,}\.npz$|^\.ckpt-.*\.tmp$", n)]
    names += [os.path.join(out, n) for n in RUN_FILES]
    for path in names:
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log(f"--overwrite: removed {removed} file(s) of the previous run in {out}")


def _make_dirs(path):
    """os.makedirs, returning the folders it created (deepest last) so a failed setup can remove them."""
    created = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        created.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    os.makedirs(path, exist_ok=True)
    return created[::-1]


def _remove_empty(folders):
    for d in reversed(folders):
        try:
            os.rmdir(d)  # only ever succeeds on an empty folder
        except OSError:
            pass


def _with_preset(cfg, preset):
    """The network config with --preset applied last (to --net and --set), checked."""
    cfg = axconfig.alexnet_config(**cfg)
    return axconfig.alexnet_config(**{**cfg, **axconfig.preset_overrides(preset, cfg)}) if preset else cfg


def _validate(t):
    if t["batch_size"] < 1:
        raise ValueError(f"batch size must be positive, got {t['batch_size']}")
    if not (t["lr"] > 0 and math.isfinite(t["lr"])):
        raise ValueError(f"lr must be positive, got {t['lr']}")
    if not 0 < t["lr_factor"] < 1:
        raise ValueError(f"lr factor must be in (0, 1), got {t['lr_factor']}")
    for k in ("epochs", "patience", "keep", "log_every"):
        if t[k] < 1:
            raise ValueError(f"{k.replace('_', ' ')} must be positive, got {t[k]}")
    for k in ("lr_reductions", "checkpoint_every", "max_steps", "prefetch", "loader_threads", "seed"):
        if t[k] < 0:
            raise ValueError(f"{k.replace('_', ' ')} must be >= 0, got {t[k]}")
    if not t["pca_std"] >= 0:
        raise ValueError(f"pca std must be >= 0, got {t['pca_std']}")


class Run:
    """Everything one training run needs; run() drives it."""

    def __init__(self, args, log, say, dist=None):
        from .data import EvalLoader, PreparedData, TrainLoader
        from .evaluate import build_net, net_config, open_data

        # With several ranks, rank 0 decides what touches the file system (which checkpoint, which folder, the
        # demo data) and broadcasts it; the others only read and compute, and say nothing.
        self.dist = dist = dist or distributed.Dist()
        if not dist.is_root:
            log = say = _quiet
        self.log, self.say = log, say
        self.progress = not args.no_progress and dist.is_root
        explicit = _explicit(args)
        net_over = _net_overrides(args)
        found = dist.on_root(lambda: _find_resume(args, log) if args.resume else None, "reading the checkpoint")
        resume = found[0] if found else None
        if resume:
            meta, net_state, extra = found[1:]
            t = {**LOOP_DEFAULTS, **meta["train"]}
            t["max_steps"] = 0
            for k, v in explicit.items():
                if k in RESUME_MUTABLE:
                    t[k] = v
                elif v != t.get(k):
                    raise ValueError(f"--{k.replace('_', '-')} cannot change on --resume (the checkpoint has "
                                     f"{t.get(k)!r}); start a new run instead")
            if net_over:
                raise ValueError("network settings (--set, --momentum, --weight-decay) cannot change on --resume")
            _validate(t)
            self.data = open_data(meta, args.data, log)
            self._use_checkpoint_statistics(meta, extra)
            cfg = net_config(meta["config"])
            devices = parse_devices(args.devices or meta.get("devices"), cfg["towers"])
            folder = os.path.dirname(os.path.abspath(resume))
            self.out = args.out or (os.path.dirname(folder) if os.path.basename(folder) == SUBDIR else folder)
            self.state = meta["state"]
            if "lr" in explicit:
                self.state["lr"] = explicit["lr"]
            self.demo = meta["data"].get("demo")
        else:
            self.demo = None if args.data else dict(DEMO_DATA)
            t = {**axconfig.TRAIN_DEFAULTS, **LOOP_DEFAULTS, **({} if args.data else DEMO_DEFAULTS), **explicit}
            _validate(t)
            base = axconfig.tiny_config() if t["net"] == "tiny" else axconfig.alexnet_config()
            finetune = None
            if t["finetune"]:
                from .weights import load_finetune_source

                finetune = load_finetune_source(t["finetune"], base, warn=log)
                if finetune[1] is not None:
                    base = finetune[1]  # the source's network; the data sets the class count below
                    if "crop" not in explicit:
                        t["crop"] = base["input_size"]
            cfg = _with_preset({**base, "input_size": t["crop"], **net_over}, t["preset"])  # checked before the data
            devices = parse_devices(args.devices, cfg["towers"])

            def new_out():
                out = _new_run_dir(args)
                if list_checkpoints(out) and not args.overwrite:
                    raise ValueError(f"run folder {out} already has checkpoints: continue it with --resume auto "
                                     f"--out {out}, choose another --out, or pass --overwrite")
                _check_out(out, args)
                return out

            self.out = dist.on_root(new_out, "choosing the run folder")
            if args.data:
                self.data = PreparedData(args.data)
            else:
                from .synthetic import ensure_demo_data

                log("no --data: training the tiny AlexNet on the built-in demo image set")
                self.data = PreparedData(dist.on_root(
                    lambda: ensure_demo_data(**self.demo, log=log, progress=self.progress), "making the demo data"))
            cfg = _with_preset({**base, "num_classes": self.data.num_classes, "input_size": t["crop"], **net_over},
                               t["preset"])
            if cfg["num_classes"] != self.data.num_classes:
                raise ValueError(f"num_classes {cfg['num_classes']} does not match the data's {self.data.num_classes}")
            if cfg["input_size"] != t["crop"]:
                raise ValueError(f"the network's input_size {cfg['input_size']} must equal --crop {t['crop']}")
            self.state = {"epoch": 0, "batch": 0, "step": 0, "lr": t["lr"], "reductions": 0, "best": None,
                          "bad_epochs": 0, "history": [], "acc": _new_acc()}
        if t["crop"] > self.data.size:
            raise ValueError(f"crop {t['crop']} is larger than the stored {self.data.size}x{self.data.size} images")
        if dist.distributed and any(str(d).startswith("cuda") for d in devices):
            from . import _C

            devices = distributed.shard_devices(devices, dist, _C.cuda_device_count())
        self.t, self.cfg, self.devices = t, cfg, devices
        self.ckpt_dir = checkpoint_dir(self.out)
        self.loader = TrainLoader(self.data, t["batch_size"], t["crop"], seed=t["seed"], pca_std=t["pca_std"],
                                  flip=t["flip"], lighting=t["lighting"], prefetch_depth=t["prefetch"],
                                  threads=t["loader_threads"], rank=dist.rank, ranks=dist.size)
        self.val_loader = (EvalLoader(self.data, t["batch_size"], t["crop"], split="val", mode="center",
                                      rank=dist.rank, ranks=dist.size)
                           if self.data.has_split("val") else None)
        if self.val_loader is None:
            log("the data has no validation split: the lr schedule follows the training top-1 error")
        self.net = build_net(cfg, devices, t["seed"])
        # Several ranks: forward and backward here, the gradients summed over the ranks, then the update.
        self.sync = distributed.GradientAllReduce(dist, self.net, t["batch_size"]) if dist.distributed else None
        # A run-time choice, not a setting of the run: graph steps give the eager steps' numbers bit for bit.
        ok, why = self.net.cuda_graph_supported()
        if args.cuda_graph == "on" and not ok:
            raise CliError(f"--cuda-graph on: devices {devices_str(devices)} cannot run a step as a CUDA graph: {why} "
                           "(--cuda-graph auto runs them eagerly)")
        self.net.set_cuda_graph(args.cuda_graph)
        # On CUDA the loader writes the stored uint8 images with their augmentation parameters straight into
        # the net's page-locked staging slots and the towers' devices augment them (Net.train_step_staged: a
        # third of the bytes to upload, no CPU pixel work, no host copy but the gather); on the CPU the loader
        # augments. Both give the same numbers.
        self.raw_input = device_side_augment(self.net.devices)
        if self.raw_input:
            self.net.set_input_mean(self.data.mean)
        self.last_checkpoint = None
        self.trace_path = args.trace if dist.is_root else None
        if not resume and t["finetune"]:
            self._start_from(t["finetune"], *finetune)
        if resume:
            try:
                self.net.load_state_dict(net_state)
            except (ValueError, TypeError) as e:
                raise CheckpointError(f"{resume}: {e}") from None
            if int(self.net.step) != int(self.state["step"]):
                raise ValueError(f"{resume}: the net is at step {self.net.step} but the run state at "
                                 f"{self.state['step']}")
            self.last_checkpoint = os.path.abspath(resume)
        if not dist.is_root:
            self.steplog = _NoStepLog()
            dist.barrier("waiting for rank 0 to set up the run folder")
            return
        # Nothing is written before this point, so a setup that fails above leaves the file system as it was;
        # folders made from here on are removed again if the setup still fails while they are empty.
        created = _make_dirs(self.ckpt_dir)
        try:
            if resume:
                self._abandon_newer(resume)
                log(f"resuming {resume}: epoch {self.state['epoch'] + 1}, batch {self.state['batch']}, "
                    f"step {self.state['step']}, lr {self.state['lr']:g}")
            elif args.overwrite:
                _clear_previous_run(self.out, log)
            remove_stale_temporaries(self.ckpt_dir)
            self.steplog = StepLog(os.path.join(self.out, "steps.csv"),
                                   keep_upto=self.state["step"] if resume else None)
            write_metrics(self.out, self.state["history"])
            _write_text(os.path.join(self.out, "args.json"),
                        json.dumps({"train": t, "config": _jsonable(cfg), "devices": devices_str(devices),
                                    "data": self.data.root}, indent=1))
        except BaseException:
            if getattr(self, "steplog", None) is not None:
                self.steplog.close()
            _remove_empty(created)
            raise
        dist.barrier("waiting for rank 0 to set up the run folder")

    def _start_from(self, path, weights, src_cfg, classes):
        """--finetune: every parameter from the source, shapes checked against this net; fc8 keeps the new
        net's paper initialisation (N(0, init_std^2) weights, zero biases, from --seed) unless the source names
        exactly the data's classes. The momentum starts at zero."""
        new = self.net.weights()
        reinit = classes is None or list(classes) != list(self.data.classes)
        extra = sorted(set(weights) - set(new))
        if extra:
            raise ValueError(f"--finetune {path}: the source has '{extra[0]}', which this net lacks (give the "
                             "source's --net/--set/--preset)")
        for k in new:
            if reinit and k.startswith("fc8."):
                continue
            if k not in weights:
                raise ValueError(f"--finetune {path}: the source has no '{k}' (give the source's --net/--set/--preset)")
            if weights[k].shape != new[k].shape:
                raise ValueError(f"--finetune {path}: '{k}' has shape {weights[k].shape} in the source, this net "
                                 f"needs {new[k].shape} (give the source's --net/--set/--preset/--crop)")
            new[k] = weights[k]
        self.net.load_weights(new)
        self.log(f"fine-tuning from {path}: " + (
            f"fc8 re-initialised for {self.data.num_classes} classes (N(0, {self.cfg['init_std']:g}^2) weights, zero "
            "biases)" if reinit else "same classes, fc8 kept") + "; momentum zero")

    def _use_checkpoint_statistics(self, meta, extra):
        """Continue with the mean image and PCA the run started with, even if the data folder was prepared
        again since (same classes and size, checked by open_data)."""
        import numpy as np

        d = meta["data"]
        mean = np.ascontiguousarray(extra["mean"], np.float32)
        if not np.array_equal(mean, self.data.mean) or d["pca_eigenvalues"] != self.data.pca_eigenvalues.tolist():
            self.log(f"note: {self.data.root} has another mean image or PCA than the checkpoint; continuing with "
                     "the checkpoint's")
        self.data.mean = mean
        self.data.pca_eigenvalues = np.asarray(d["pca_eigenvalues"], np.float64)
        self.data.pca_eigenvectors = np.asarray(d["pca_eigenvectors"], np.float64)
        self.data.pca_std = np.asarray(d["pca_std"], np.float64)

    def _abandon_newer(self, resume):
        """Resuming from an older checkpoint: newer ones in the run folder belong to the abandoned
        continuation; rename them so they are never picked up by --resume auto or pruned in its place."""
        here = os.path.abspath(resume)
        paths = [os.path.abspath(p) for p in list_checkpoints(self.ckpt_dir)]
        if here in paths:
            for p in paths[paths.index(here) + 1:]:
                os.replace(p, os.path.join(os.path.dirname(p), "abandoned_" + os.path.basename(p)))
                self.log(f"renamed the newer checkpoint {p} (from the abandoned continuation) to abandoned_*")

    # ---- checkpoints ----

    def meta(self):
        data = self.data.summary()
        data["demo"] = self.demo
        return {"config": _jsonable(self.cfg), "train": self.t, "devices": devices_str(self.devices),
                "classes": self.data.classes, "data": data, "crop": self.t["crop"], "step": int(self.net.step),
                "state": self.state, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def save(self):
        """Writes a checkpoint (rank 0; with several ranks every rank calls this, and they first check that
        they hold the same parameters)."""
        state = self.net.state_dict()
        if self.dist.distributed:
            self._check_ranks_agree(state)

        def write():
            path = os.path.join(self.ckpt_dir, checkpoint_name(self.net.step))
            save_checkpoint(path, state, self.meta(), {"mean": self.data.mean})
            best = self.best_step()
            prune_checkpoints(self.ckpt_dir, self.t["keep"], protect=() if best is None else (checkpoint_name(best),))
            return path

        path = self.dist.on_root(write, "writing the checkpoint")
        self.last_checkpoint = os.path.abspath(path)
        return path

    def _check_ranks_agree(self, state):
        """Every rank must hold rank 0's parameters bit for bit (the same sums, the same updates): a
        checksum of the state, compared at each checkpoint."""
        import zlib

        digest = 0
        for k in sorted(state):
            digest = zlib.crc32(state[k].tobytes(), zlib.crc32(k.encode(), digest))
        root = self.dist.bcast(digest, "comparing the ranks' parameters")
        differ = self.dist.allreduce_sum([float(digest != root)], "comparing the ranks' parameters")[0]
        if differ:
            self.dist.agreed_exit = True
            raise distributed.CommError(f"{int(differ)} rank(s) hold parameters that differ from rank 0's at step "
                                        f"{int(self.net.step)}: the gradient all-reduce is not deterministic here")

    def best_step(self):
        """The step of the end-of-epoch checkpoint with the lowest top-1 error the schedule follows
        (validation, else training); the first such epoch, as the schedule counts improvements."""
        h = self.state["history"]
        key = "val_top1_err" if any(r.get("val_top1_err") is not None for r in h) else "train_top1_err"
        scored = [(r[key], i) for i, r in enumerate(h) if r.get(key) is not None]
        return h[min(scored)[1]]["step"] if scored else None

    # ---- the loop ----

    def run(self):
        t, st = self.t, self.state
        # With several ranks, SIGUSR1 (which mpirun and srun forward to every rank) asks for the same stop.
        interrupted = _SigintFlag((signal.SIGINT, signal.SIGUSR1) if self.dist.distributed else (signal.SIGINT,),
                                  quiet=not self.dist.is_root)
        bpe = self.loader.batches_per_epoch
        if t["max_steps"] and st["step"] >= t["max_steps"]:
            self.say(f"already at step {st['step']} (--max-steps {t['max_steps']}); nothing to do")
            self.steplog.close()
            return 0
        if st["epoch"] >= t["epochs"]:
            self.say(f"this run has already finished its {t['epochs']} epochs (raise --epochs to go on)")
            self.steplog.close()
            self._final_report()
            return 0
        try:
            with interrupted:
                while st["epoch"] < t["epochs"]:
                    e = st["epoch"]
                    if st["batch"] < bpe and self._train_epoch(e, bpe, interrupted) == "max_steps":
                        return 0
                    self._end_epoch(e, interrupted)
        except KeyboardInterrupt:
            return self._on_interrupt()
        except NonFiniteLoss as err:
            self.dist.agreed_exit = True  # the loss is the global batch's: every rank stops here
            if self.dist.is_root:
                self.say_err(str(err))
            return EXIT_NONFINITE
        finally:
            self.steplog.close()
        self._final_report()
        return 0

    def say_err(self, msg):
        print(f"alexnet_cuda.train: error: {msg}", file=sys.stderr)

    def _train_epoch(self, e, bpe, interrupted):
        t, st, net = self.t, self.state, self.net
        acc = st["acc"]
        bar = progress_bar(bpe, desc=f"epoch {e + 1}/{t['epochs']}", unit="batch", initial=st["batch"],
                           disable=not self.progress)
        t0, n0 = time.monotonic(), acc["n"]
        if self.raw_input:
            # Zero-copy: the loader writes each batch into one of the net's page-locked staging slots, the next
            # one from the step's prefetch callback while the devices compute the step.
            feed = _StagedFeed(self.loader, net, e)
            it = ((b, None, None) for b in range(st["batch"], bpe))
        else:
            it = self.loader.epoch(e, st["batch"])
        t_prev = t0
        try:
            for (b, x, y), following in _with_next(it):
                if self.trace_path:
                    net.set_tracing(True)
                if self.sync is not None:
                    self.sync.start()  # the gradients are summed across the ranks as backward makes them
                try:
                    if self.raw_input:
                        r = feed.step(b, st["lr"], last=following is None)
                    else:
                        r = net.train_step(x, y, st["lr"])
                except BaseException:
                    if self.sync is not None:
                        self.sync.cancel()
                    raise
                stop = interrupted()
                if self.sync is not None:
                    self.sync.finish()
                    net.apply_sgd(st["lr"])
                    r, stop = self._reduce_step(r, stop)
                if self.trace_path:
                    net.set_tracing(False)
                    net.write_trace(self.trace_path)
                    self.log(f"wrote the Chrome trace of step {int(net.step)} to {self.trace_path} (open it in "
                             "Perfetto or chrome://tracing)")
                    self.trace_path = None
                loss = float(r["loss"])
                if not math.isfinite(loss):
                    where = f"epoch {e + 1}, batch {b} (step {int(net.step)})"
                    keep = (f"the last good checkpoint {self.last_checkpoint} is intact; continue from it with "
                            f"--resume {self.last_checkpoint} and, e.g., a lower --lr" if self.last_checkpoint
                            else "no checkpoint was written in this run")
                    raise NonFiniteLoss(f"the loss became {loss} at {where}; stopped without saving this state: {keep}")
                k = int(r["n"])
                acc["loss_sum"] += loss * k
                acc["top1"] += int(r["top1"])
                acc["top5"] += int(r["top5"])
                acc["n"] += k
                now = time.monotonic()
                acc["seconds"] += now - t_prev  # wall time, waiting for data included
                t_prev = now
                st["batch"] = b + 1
                st["step"] = int(net.step)
                if st["step"] % t["log_every"] == 0:
                    self.steplog.write(st["step"], e, b, r, st["lr"])
                bar.update(1)
                elapsed = time.monotonic() - t0
                if elapsed > 0:
                    bar.set_postfix_str(f"loss {acc['loss_sum'] / acc['n']:.4f} lr {st['lr']:g} "
                                        f"{(acc['n'] - n0) / elapsed:.0f} img/s", refresh=False)
                if stop:
                    self.dist.agreed_exit = True  # every rank stops after this step (the flag was reduced)
                    raise KeyboardInterrupt
                if t["max_steps"] and st["step"] >= t["max_steps"]:
                    bar.close()
                    path = self.save()
                    self.say(f"stopped at step {st['step']} (--max-steps); checkpoint {path}")
                    self._print_last()
                    return "max_steps"
                if t["checkpoint_every"] and st["step"] % t["checkpoint_every"] == 0 and st["batch"] < bpe:
                    self.save()
        finally:
            it.close()
            bar.close()
        return None

    def _reduce_step(self, r, stop):
        """The global batch's statistics from every rank's, and whether any rank was asked to stop."""
        v = self.dist.allreduce_sum([float(r["loss"]) * int(r["n"]), r["top1"], r["top5"], r["n"], float(stop)])
        n = int(v[3])
        return {"loss": v[0] / n, "top1": int(v[1]), "top5": int(v[2]), "n": n}, v[4] > 0

    def _validate(self, bar, interrupted):
        if not self.dist.distributed:
            from .evaluate import evaluate_center

            return evaluate_center(self.net, self.val_loader, bar, interrupted)
        # Each rank evaluates its share of the batches; the sums are reduced. No interrupt here: the ranks
        # must stop at the same place, and the next step's reduction carries the flag.
        sums = [0.0, 0, 0, 0]
        for x, y in self.val_loader:
            r = self.net.evaluate(x, y)
            sums = [sums[0] + float(r["loss"]) * int(r["n"]), sums[1] + r["top1"], sums[2] + r["top5"],
                    sums[3] + r["n"]]
            bar.update(1)
        loss, top1, top5, n = self.dist.allreduce_sum(sums, "reducing the validation metrics")
        if n == 0:
            raise ValueError("no images to evaluate")
        return {"loss": loss / n, "top1_err": 1 - top1 / n, "top5_err": 1 - top5 / n, "n": int(n)}

    def _end_epoch(self, e, interrupted):
        t, st = self.t, self.state
        val = None
        if self.val_loader is not None:
            bar = progress_bar(len(self.val_loader), desc="validate", unit="batch", disable=not self.progress)
            try:
                val = self._validate(bar, interrupted)
            finally:
                bar.close()
        acc = st["acc"]
        n = max(1, acc["n"])
        rec = {"epoch": e + 1, "step": int(self.net.step), "lr": st["lr"], "train_loss": acc["loss_sum"] / n,
               "train_top1_err": 1 - acc["top1"] / n, "train_top5_err": 1 - acc["top5"] / n,
               "val_loss": val["loss"] if val else None, "val_top1_err": val["top1_err"] if val else None,
               "val_top5_err": val["top5_err"] if val else None, "epoch_seconds": round(acc["seconds"], 3),
               "images_per_s": round(acc["n"] / acc["seconds"], 1) if acc["seconds"] > 0 else None,
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # The schedule (plateau of the validation top-1 error; the training error if there is no val split).
        err = rec["val_top1_err"] if val else rec["train_top1_err"]
        note = ""
        best, bad, reductions, lr = st["best"], st["bad_epochs"], st["reductions"], st["lr"]
        if best is None or err < best:
            best, bad = err, 0
        else:
            bad += 1
            if bad >= t["patience"] and reductions < t["lr_reductions"]:
                lr, reductions, bad = lr * t["lr_factor"], reductions + 1, 0
                note = f"; no improvement for {t['patience']} epoch(s): lr -> {lr:g}"
        # Commit the epoch in one go (an interrupt before this line repeats the validation on resume).
        st.update(history=st["history"] + [rec], best=best, bad_epochs=bad, reductions=reductions, lr=lr,
                  epoch=e + 1, batch=0, acc=_new_acc())
        self.say(_epoch_line(rec, t["epochs"]) + note)
        if self.dist.is_root:
            write_metrics(self.out, st["history"])
            plot_metrics(self.out, st["history"], self.log)
        self.save()

    def _on_interrupt(self):
        st = self.state
        if int(self.net.step) != int(st["step"]):
            where = f"the last checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
            self.say_err(f"interrupted in the middle of a step; nothing saved ({where})")
            return EXIT_INTERRUPTED
        try:
            path = self.save()
        except BaseException as e:  # noqa: BLE001 - a second Ctrl-C or a full disk: say so, keep the old one
            self.say_err(f"interrupted; writing the checkpoint failed ({type(e).__name__}: {e}); "
                         f"the last checkpoint is {self.last_checkpoint}")
            return EXIT_INTERRUPTED
        launcher = f"mpirun -n {self.dist.size} " if self.dist.distributed else ""
        if self.dist.is_root:
            print(f"\ninterrupted at epoch {st['epoch'] + 1}, batch {st['batch']} (step {st['step']}); checkpoint "
                  f"{path}\nresume with: {launcher}python -m alexnet_cuda.train --resume {path}", file=sys.stderr)
        return EXIT_INTERRUPTED

    def _print_last(self):
        h = self.state["history"]
        if h and h[-1].get("val_top1_err") is not None:
            r = h[-1]
            self.say(f"val after epoch {r['epoch']}: top-1 error {100 * r['val_top1_err']:.2f}%, "
                     f"top-5 error {100 * r['val_top5_err']:.2f}%")

    def _final_report(self):
        h = self.state["history"]
        if not h:
            return
        r = h[-1]
        chance1 = 1 - 1 / self.data.num_classes
        chance5 = max(0.0, 1 - min(5, self.data.num_classes) / self.data.num_classes)
        parts = [f"finished {r['epoch']} epochs ({r['step']} steps) in {self.out}"]
        if r.get("val_top1_err") is not None:
            parts.append(f"final val top-1 error {100 * r['val_top1_err']:.2f}%, top-5 error "
                         f"{100 * r['val_top5_err']:.2f}% (center crop; chance {100 * chance1:.0f}% / "
                         f"{100 * chance5:.0f}%)")
        else:
            parts.append(f"final train top-1 error {100 * r['train_top1_err']:.2f}%")
        parts.append(f"checkpoint {self.last_checkpoint}")
        self.say("; ".join(parts))


def _quiet(message):
    """log/say of ranks other than 0."""


class _NoStepLog:
    """steps.csv of ranks other than 0."""

    def write(self, *args):
        pass

    def close(self):
        pass


def _with_next(items):
    """Yields (item, the item after it or None)."""
    it = iter(items)
    cur = next(it, _END)
    while cur is not _END:
        nxt = next(it, _END)
        yield cur, (None if nxt is _END else nxt)
        cur = nxt


_END = object()


class _StagedFeed:
    """The training batches of one epoch on the zero-copy path: batch b is written by the loader straight
    into a staging slot of the net (TrainLoader.raw_batch(..., out=slot): the gather from the shards is its
    only host copy, into page-locked memory the upload reads), and each step fills and uploads the next
    batch from its prefetch callback, while the devices compute the step."""

    def __init__(self, loader, net, epoch):
        self.loader, self.net, self.epoch = loader, net, epoch
        self.order = loader.order(epoch)
        self.staged = None  # the batch index the net holds prefetched

    def fill(self, b):
        S = self.loader.split.size
        slot = self.net.staging_slot(self.loader.local_batch, S, S)
        self.loader.raw_batch(self.epoch, b, self.order, out=slot)
        return slot

    def step(self, b, lr, last):
        slot = None if self.staged == b else self.fill(b)
        self.staged = None
        nxt = None if last else (lambda: self.fill(b + 1))
        r = self.net.train_step_staged(slot, lr, prefetch=nxt)
        self.staged = None if last else b + 1
        return r


def device_side_augment(devices):
    """Whether the towers augment the training batches (Net.train_step_staged on the loader's uint8 images,
    written into the net's staging slots): on CUDA devices, where it spares the host the pixel work and the
    upload two thirds of its bytes (256x256 uint8 images instead of 224x224 float32 crops)."""
    return any(str(d).startswith("cuda") for d in devices)


def _new_acc():
    return {"loss_sum": 0.0, "top1": 0, "top5": 0, "n": 0, "seconds": 0.0}


def _epoch_line(r, epochs):
    s = (f"epoch {r['epoch']}/{epochs}: train loss {r['train_loss']:.4f}, top-1 err {100 * r['train_top1_err']:.2f}%"
         f", top-5 err {100 * r['train_top5_err']:.2f}%")
    if r.get("val_loss") is not None:
        s += (f" | val loss {r['val_loss']:.4f}, top-1 err {100 * r['val_top1_err']:.2f}%, top-5 err "
              f"{100 * r['val_top5_err']:.2f}%")
    s += f" | lr {r['lr']:g}"
    if r.get("images_per_s"):
        s += f", {r['images_per_s']:.0f} img/s"
    return s


def _jsonable(cfg):
    return json.loads(json.dumps(cfg))


class _SigintFlag:
    """Within the block, the first Ctrl-C only raises a flag (the loop checks it between steps, so a
    checkpoint is always of a whole step); a second one interrupts at once."""

    def __init__(self, signals=(signal.SIGINT,), quiet=False):
        self.hit = False
        self._signals, self._quiet = signals, quiet
        self._old = {}

    def __call__(self):
        return self.hit

    def _handler(self, signum, frame):
        if self.hit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.hit and not self._quiet:
            if signum == signal.SIGINT:
                print("\nCtrl-C: stopping after this step to write a checkpoint (press again to stop at once)",
                      file=sys.stderr, flush=True)
            else:
                print(f"\n{signal.Signals(signum).name}: every rank stops after this step; rank 0 writes a "
                      "checkpoint", file=sys.stderr, flush=True)
        self.hit = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
        return False


def main(argv=None):
    return run_main("alexnet_cuda.train", _main, argv)


def _main(argv):
    args = build_parser().parse_args(argv)
    try:
        dist = distributed.init(args.comm_timeout)
    except RuntimeError as e:
        raise CliError(str(e)) from None
    if not dist.distributed:
        return _train(args, dist)
    # Several ranks: errors are reported by the rank that has them (named in the message); one that only
    # this rank has would leave the others waiting, so it ends the whole job with MPI_Abort.
    prog = f"alexnet_cuda.train (rank {dist.rank} of {dist.size})"
    try:
        code = run_main(prog, lambda _: _train(args, dist), None)
    except BaseException as e:  # noqa: BLE001 - not a user error (a CommError, a bug): one line, then abort
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {type(e).__name__}: {msg}", file=sys.stderr, flush=True)
        code = 1
    if code and not dist.agreed_exit:
        print(f"{prog}: ending every rank (MPI_Abort, exit status {code})", file=sys.stderr, flush=True)
        dist.abort(code)
    return code


def _train(args, dist):
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        run = Run(args, log, say, dist)
    except KeyboardInterrupt:
        raise CliError("interrupted during setup; nothing to resume yet", code=EXIT_INTERRUPTED) from None
    ranks = (f"; {dist.size} ranks, {run.loader.local_batch} images each per step" if dist.distributed else "")
    run.say(f"run folder {run.out}; devices {devices_str(run.devices)}{ranks}; {len(run.loader.split)} training "
            f"images, {run.loader.batches_per_epoch} batches of {run.t['batch_size']} per epoch; "
            f"{run.data.num_classes} classes; crop {run.t['crop']} of {run.data.size}")
    return run.run()


if __name__ == "__main__":
    sys.exit(main())
