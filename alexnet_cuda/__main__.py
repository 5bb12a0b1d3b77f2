"""`python -m alexnet_cuda COMMAND ...`: one entry point for the four tools (also installed as the console
scripts alexnet-train, alexnet-prepare, alexnet-evaluate and alexnet-predict)."""
import importlib
import sys

from ._version import __version__

COMMANDS = {
    "train": "train AlexNet (with no --data: the built-in demo)",
    "prepare": "turn an ImageFolder-shaped tree into the prepared shards train reads",
    "evaluate": "top-1/top-5 error of a checkpoint on a prepared set",
    "predict": "classify image files with a checkpoint",
}


def usage() -> str:
    lines = ["usage: python -m alexnet_cuda {" + ",".join(COMMANDS) + "} [options]   (COMMAND --help for each)",
             "       python -m alexnet_cuda --version", "", "commands:"]
    lines += [f"  {name:9s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"alexnet_cuda {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"alexnet_cuda: error: unknown command {argv[0]!r} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    return importlib.import_module(f"alexnet_cuda.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
