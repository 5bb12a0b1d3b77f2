"""Shared command-line plumbing: an argument parser whose errors are one line, a main() wrapper that turns
ValueError/TypeError/OSError (the library's errors for bad input) into one line on stderr and a non-zero exit (never a traceback), and device parsing.

Set ALEXNET_CUDA_TRACEBACK=1 to get the full traceback instead (for debugging the tools themselves)."""
import argparse
import os
import re
import sys

EXIT_ERROR = 1  # bad arguments, unreadable data, an invalid checkpoint
EXIT_USAGE = 2  # argparse-level errors (unknown flag, a value that does not parse)
EXIT_NONFINITE = 3  # training stopped on a non-finite loss
EXIT_INTERRUPTED = 130  # Ctrl-C (after writing what can be resumed)


class CliError(Exception):
    """An error meant for the user: printed as one line, exit status `code`."""

    def __init__(self, message, code=EXIT_ERROR):
        super().__init__(message)
        self.code = code


class OneLineParser(argparse.ArgumentParser):
    """argparse prints a usage block before its error; here the error is one line naming the tool."""

    def error(self, message):
        name = self.prog[len("python -m "):] if self.prog.startswith("python -m ") else self.prog
        self.exit(EXIT_USAGE, f"{name}: error: {message} (see --help)\n")


def run_main(prog, fn, argv=None):
    """Run fn(argv) -> exit status; user errors become one line on stderr and a non-zero status."""
    debug = os.environ.get("ALEXNET_CUDA_TRACEBACK", "") not in ("", "0")
    try:
        return int(fn(argv) or 0)
    except CliError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except (ValueError, TypeError, OSError) as e:
        if debug:
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"{prog}: error: {' '.join(msg.split())}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# ---- argument types (argparse turns their ValueError/ArgumentTypeError into a one-line error) -----------

def positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def nonneg_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


MAX_SEED = 2 ** 64 - 1  # the net keys its dropout masks with a uint64 seed


def seed_int(text):
    v = int(text)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED} (64 bits), got {text}")
    return v


def positive_float(text):
    v = float(text)
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def nonneg_float(text):
    v = float(text)
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def unit_interval(text):
    """[0, 1)"""
    v = float(text)
    if not (0 <= v < 1):
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


_DEVICE_RE = re.compile(r"^(cpu|cuda:\d+)$")


def parse_devices(spec, towers=2):
    """'cpu' | 'cuda:0' | 'cuda:0,cuda:1' | 'cpu,cpu' -> the Net's devices argument (a string for one
    device running every tower, else a tuple with one device per tower). ValueError names what is wrong."""
    if spec is None:
        return default_devices(towers)
    parts = [p.strip() for p in str(spec).split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"--devices: empty device name in {spec!r} (use cpu, cuda:N, or one per tower "
                         "separated by commas)")
    for p in parts:
        if not _DEVICE_RE.match(p):
            raise ValueError(f"--devices: unknown device {p!r} (use cpu or cuda:N, e.g. cuda:0,cuda:1)")
    if len(parts) not in (1, towers):
        raise ValueError(f"--devices: give one device or one per tower ({towers}), got {len(parts)}: {spec!r}")
    if any(p.startswith("cuda") for p in parts):
        import alexnet_cuda as ax
        if not ax.cuda_available():
            raise ValueError(f"--devices {spec}: CUDA is not available ({ax.cuda_unavailable_reason()})")
        count = ax.cuda_device_count()
        for p in parts:
            if p.startswith("cuda") and int(p.split(":")[1]) >= count:
                raise ValueError(f"--devices: {p} does not exist (this machine has {count} CUDA device(s))")
    return parts[0] if len(parts) == 1 else tuple(parts)


def default_devices(towers=2):
    """As the Net's "auto": one GPU per tower if there are enough, else every tower on GPU 0 (own streams),
    else one CPU worker per tower."""
    import alexnet_cuda as ax
    if ax.cuda_available():
        n = ax.cuda_device_count()
        if n >= towers:
            return tuple(f"cuda:{i}" for i in range(towers))
        return ("cuda:0",) * towers
    return ("cpu",) * towers


def devices_str(devices):
    return devices if isinstance(devices, str) else ",".join(devices)
