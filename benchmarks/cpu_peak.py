"""One core's FP32 FMA peak on this machine, measured (the ceiling bench_cpu_gemm.py's GFLOP/s are read against).

Compiles benchmarks/cpu_fma_peak.c with the system C compiler (cc, or $CC) and runs it: 16 independent FMA chains
per instruction set (AVX-512, AVX2), best of 5 runs, GFLOP/s per core. A nominal peak (cores x clock x FMA units)
can be far from what a virtual machine's core delivers; this is what it delivers.

    python benchmarks/cpu_peak.py [--out results.json]
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure() -> dict:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("cpu_peak: no C compiler found (set CC)")
    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"cpu_peak: x86-64 only (this is {platform.machine()})")
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "peak")
        # -O3 -funroll-loops keeps the 16 accumulators in registers (at -O2 GCC spills them, halving the figure).
        subprocess.run([cc, "-O3", "-funroll-loops", "-o", exe, os.path.join(HERE, "cpu_fma_peak.c")], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    peaks = {isa: float(g) for isa, g in (line.split() for line in out.splitlines() if line.strip())}
    return {"cpu": cpu_model(), "gflops_per_core": peaks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the figures as JSON here")
    args = p.parse_args(argv)
    try:
        r = measure()
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(str(e), file=sys.stderr)
        return 1
    for isa, g in r["gflops_per_core"].items():
        print(f"{r['cpu']}: {isa} FMA peak {g:.1f} GFLOP/s per core")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
