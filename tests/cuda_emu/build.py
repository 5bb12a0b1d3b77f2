#!/usr/bin/env python3
"""Builds the CPU-emulated CUDA backend and its check driver (tests/cuda_emu/README.md).

1. generate: copies cuda/*.cu (as .cpp) and cuda/*.cuh into a build dir with every `kernel<<<cfg>>>(args)`
   rewritten into a call of the fiber emulator, and every `__shared__` array declaration followed by a
   statement that poisons the array (0xFF bytes) when a block first reaches it. `#line` keeps compiler
   and sanitizer messages pointing at the original files and lines.
2. patches a copy of csrc/tensor.cpp so device blocks are allocated at their exact size (the caching
   allocator rounds sizes up, which would hide overruns from AddressSanitizer).
3. compiles those with csrc/ops.cpp, csrc/scheduler.cpp, csrc/net.cpp, csrc/cpu/*.cpp, emu.cpp, runtime.cpp and
   driver.cpp with g++ and links `driver` (no pybind11: csrc/bindings.cpp is not built).

Every rewrite checks that it found what it expects and stops with a clear message otherwise, so a change
in the sources can never make the build silently test something else.

    python tests/cuda_emu/build.py [--sanitize] [--out DIR] [--cuda-dir DIR] [--csrc-dir DIR] [--jobs N]

prints the driver's path (cached under build/cuda_emu/ by a hash of every input). relink_tensor() builds a
variant of a finished plain build with another csrc/tensor.cpp in seconds (the staged-copy mutation test).
"""
import argparse
import concurrent.futures
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class BuildError(RuntimeError):
    pass


# ---- source rewriting -----------------------------------------------------------------------------------

def code_mask(text):
    """`text` with comments and the insides of string/char literals blanked out (same length, newlines
    kept), so the rewrites below only ever match real code."""
    out = list(text)
    n = len(text)

    def blank(a, b):
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    i = 0
    while i < n:
        c, nxt = text[i], text[i + 1:i + 2]
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif c == "/" and nxt == "*":
            j = text.find("*/", i + 2)
            if j < 0:
                raise BuildError("unterminated /* comment")
            blank(i, j + 2)
            i = j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        else:
            i += 1
    return "".join(out)


# kernel name (optionally qualified, optionally with one level of template arguments), <<<config>>>, '('
LAUNCH_RE = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
SHARED_RE = re.compile(r"\b__shared__\b([^;{}]*);")


def rewrite_cuda_source(text, name):
    """Returns (rewritten text, [(line, kernel) of each launch], number of __shared__ arrays) for one file."""
    masked = code_mask(text)
    if re.search(r"\bextern\s+__shared__\b", masked):
        raise BuildError(f"{name}: dynamic (extern) __shared__ memory is not emulated; extend tests/cuda_emu")
    edits = []  # (start, end, replacement), non-overlapping
    sites = []  # (line, kernel) of every launch
    for m in LAUNCH_RE.finditer(masked):
        kernel = text[m.start(1):m.end(1)]
        config = text[m.start(2):m.end(2)]  # verbatim, newlines included: line numbers stay put
        # __LINE__ below sits on the config's last line
        sites.append((text.count("\n", 0, m.start(2)) + 1 + config.count("\n"), kernel))
        repl = (f'::emu::Cfg({config}).at("{kernel}", __FILE__, __LINE__)'
                f".run([](auto... emu_a) {{ {kernel}(emu_a...); }}, ")
        edits.append((m.start(), m.end(), repl))
    shared = 0
    for m in SHARED_RE.finditer(masked):
        decl = masked[m.start(1):m.end(1)]
        if "," in re.sub(r"\[[^\]]*\]|\([^)]*\)|<[^<>]*>", "", decl):
            raise BuildError(f"{name}: one __shared__ declaration with several names is not supported: "
                             f"{text[m.start():m.end()].strip()!r}")
        dm = re.search(r"(\w+)\s*((?:\[[^\]]*\]\s*)*)$", decl.strip())
        if not dm or "=" in decl:
            raise BuildError(f"{name}: cannot parse the __shared__ declaration {text[m.start():m.end()].strip()!r}")
        var = dm.group(1)
        repl = (text[m.start():m.end()] + f" static uint64_t emu_seen_{var}; "
                f"::emu::shared_block_init(&{var}, sizeof({var}), emu_seen_{var});")
        edits.append((m.start(), m.end(), repl))
        shared += 1
    edits.sort()
    for (s0, e0, _), (s1, _, _) in zip(edits, edits[1:]):
        if s1 < e0:
            raise BuildError(f"{name}: overlapping rewrites at offset {s1}")
    out, pos = [], 0
    for s, e, r in edits:
        out.append(text[pos:s])
        out.append(r)
        pos = e
    out.append(text[pos:])
    result = "".join(out)
    left = [i + 1 for i, line in enumerate(code_mask(result).splitlines()) if "<<<" in line or ">>>" in line]
    if left:
        raise BuildError(f"{name}: kernel launch(es) the rewriter does not understand at line(s) {left}; "
                         "extend LAUNCH_RE in tests/cuda_emu/build.py")
    if result.count("\n") != text.count("\n"):
        raise BuildError(f"{name}: rewriting changed the line count")
    return result, sites, shared


EXACT_ALLOC_ANCHOR = "size_t round_block(size_t bytes) {"


def patch_tensor_source(text):
    """csrc/tensor.cpp with round_block() returning the exact size (at least 1 byte)."""
    masked = code_mask(text)
    hits = [m.start() for m in re.finditer(re.escape(EXACT_ALLOC_ANCHOR), masked)]
    if len(hits) != 1:
        raise BuildError(
            f"csrc/tensor.cpp: expected exactly one {EXACT_ALLOC_ANCHOR!r} (the caching allocator's size "
            f"rounding, patched to exact sizes for AddressSanitizer), found {len(hits)}; update "
            "patch_tensor_source() in tests/cuda_emu/build.py")
    at = hits[0] + len(EXACT_ALLOC_ANCHOR)
    return text[:at] + " return bytes == 0 ? 1 : bytes;  /* emu: exact-size blocks */" + text[at:]


def generate(cuda_dir, csrc_dir, gen_dir):
    """Writes the rewritten sources to gen_dir; returns the list of translation units to compile there."""
    cuda_dir, gen_dir = Path(cuda_dir), Path(gen_dir)
    gen_dir.mkdir(parents=True, exist_ok=True)
    units, sites = [], []
    files = sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.cuh"))
    if not any(f.suffix == ".cu" for f in files):
        raise BuildError(f"no .cu files in {cuda_dir}")
    for f in files:
        text, file_sites, _ = rewrite_cuda_source(f.read_text(), f.name)
        sites += [f"{f}:{line} {kernel}" for line, kernel in file_sites]
        out = gen_dir / (f.stem + ".cu.cpp" if f.suffix == ".cu" else f.name)
        out.write_text(f'#line 1 "{f}"\n{text}')
        if f.suffix == ".cu":
            units.append(out)
    if not sites:
        raise BuildError(f"no kernel launches found in {cuda_dir}")
    (gen_dir / "launch_sites.txt").write_text("".join(s + "\n" for s in sites))  # what the driver must reach
    tensor_src = Path(csrc_dir) / "tensor.cpp"
    tensor = gen_dir / "tensor_exact_alloc.cpp"
    tensor.write_text(f'#line 1 "{tensor_src}"\n' + patch_tensor_source(tensor_src.read_text()))
    return units, tensor


# csrc/ sources linked as they are (tensor.cpp is patched above; bindings.cpp, the pybind11 module, is left
# out): the ops front end and the scheduler + Net, whose CUDA branch runs on the emulated runtime.
HOST_SOURCES = ["ops.cpp", "scheduler.cpp", "net.cpp"]


# ---- compiling ------------------------------------------------------------------------------------------

def have_fma():
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(r"^flags\s*:.*\bfma\b", flags, re.M) is not None


def compiler():
    return os.environ.get("CXX_EMU", "g++")


def flags(sanitize):
    """(flags for host sources, flags for the generated CUDA sources)."""
    common = ["-std=c++17", "-O2", "-pthread", "-DALEXNET_WITH_CUDA=1", "-Wall", "-Wno-unused-function",
              "-Wno-unknown-pragmas", "-I" + str(HERE / "include")]
    if sanitize:
        common += ["-g1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
                   "-fno-sanitize-recover=undefined"]
    # Host code as the real build compiles it (x86-64 baseline: no FMA to contract into).
    host = common + ["-ffp-contract=off"]
    # Device code: nvcc contracts a*b+c into FMAs by default; approximate that where the CPU has FMA, so
    # a "bit-exact" kernel that forgets its __f*_rn intrinsics differs from the CPU backend here too.
    # -fno-strict-aliasing: the kernels read float arrays as float4, which nvcc allows and g++ may exploit.
    device = common + ["-ffp-contract=fast", "-fno-strict-aliasing", "-D__CUDA_ARCH__=900"]
    device += ["-mfma"] if have_fma() else []
    return host, device


def source_set(cuda_dir, csrc_dir):
    cuda_dir, csrc_dir = Path(cuda_dir), Path(csrc_dir)
    inputs = sorted(cuda_dir.glob("*.cu")) + sorted(cuda_dir.glob("*.cuh"))
    inputs += sorted(csrc_dir.glob("*.h")) + sorted((csrc_dir / "cpu").glob("*"))
    inputs += [csrc_dir / "tensor.cpp"] + [csrc_dir / f for f in HOST_SOURCES]
    inputs += sorted(p for p in HERE.rglob("*") if p.is_file() and p.suffix in (".py", ".cpp", ".h"))
    return inputs


def cache_key(cuda_dir, csrc_dir, sanitize):
    h = hashlib.sha256()
    for p in source_set(cuda_dir, csrc_dir):
        h.update(str(p.name).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr(flags(sanitize)).encode())
    try:
        h.update(subprocess.run([compiler(), "--version"], capture_output=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"cannot run {compiler()}: {e}")
    return h.hexdigest()[:16]


def prepare(out_dir, cuda_dir, csrc_dir, sanitize):
    """Generates the sources in out_dir; returns (compile commands, link command, driver path)."""
    out_dir = Path(out_dir)
    gen, obj = out_dir / "gen", out_dir / "obj"
    obj.mkdir(parents=True, exist_ok=True)
    cuda_units, tensor = generate(cuda_dir, csrc_dir, gen)
    host_flags, device_flags = flags(sanitize)
    inc = ["-I" + str(gen), "-I" + str(csrc_dir)]
    host_units = [HERE / "emu.cpp", HERE / "runtime.cpp", HERE / "driver.cpp", tensor]
    host_units += [Path(csrc_dir) / f for f in HOST_SOURCES]
    host_units += sorted((Path(csrc_dir) / "cpu").glob("*.cpp"))
    compiles, objs = [], []
    for src, fl in [(u, host_flags) for u in host_units] + [(u, device_flags) for u in cuda_units]:
        o = obj / f"{src.parent.name}_{src.name}.o"
        compiles.append(([compiler(), *fl, *inc, "-c", str(src), "-o", str(o)], src))
        objs.append(str(o))
    exe = out_dir / "driver"
    return compiles, [compiler(), *host_flags, *objs, "-o", str(exe)], exe


def build_all(variants, out_root=None, cuda_dir=None, csrc_dir=None, jobs=None):
    """Builds (or finds in the cache) the driver of each variant ("plain", "sanitize"), compiling all of
    them in one pool of `jobs` processes. Returns {variant: driver path or BuildError}."""
    cuda_dir = Path(cuda_dir or REPO / "cuda").resolve()
    csrc_dir = Path(csrc_dir or REPO / "csrc").resolve()
    out_root = Path(out_root or REPO / "build" / "cuda_emu")
    results, pending, tmps = {}, {}, []
    try:
        for variant in variants:
            sanitize = {"plain": False, "sanitize": True}[variant]
            try:
                final = out_root / f"{variant}-{cache_key(cuda_dir, csrc_dir, sanitize)}"
                if (final / "driver").is_file():
                    results[variant] = final / "driver"
                    continue
                out_root.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=out_root))
                tmps.append(tmp)
                pending[variant] = (final, tmp, *prepare(tmp, cuda_dir, csrc_dir, sanitize))
            except BuildError as e:
                results[variant] = e
        tasks = [(v, cmd, src) for v, (_, _, compiles, _, _) in pending.items() for cmd, src in compiles]
        tasks.sort(key=lambda t: -t[2].stat().st_size)  # heaviest (the GEMM instantiations) first

        def cc(task):
            variant, cmd, src = task
            r = subprocess.run(cmd, capture_output=True, text=True)
            return variant, (None if r.returncode == 0 else f"compiling {src} failed:\n{r.stderr[-6000:]}")

        failed = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 2)) as pool:
            for variant, err in pool.map(cc, tasks):
                if err and variant not in failed:
                    failed[variant] = err
        for variant, (final, tmp, _, link, exe) in pending.items():
            if variant in failed:
                results[variant] = BuildError(failed[variant])
                continue
            r = subprocess.run(link, capture_output=True, text=True)
            if r.returncode != 0:
                results[variant] = BuildError(f"linking failed:\n{r.stderr[-6000:]}")
                continue
            try:
                tmp.rename(final)  # atomic: a concurrent build of the same key simply loses the race
            except OSError:
                if not (final / "driver").is_file():
                    raise
            results[variant] = final / "driver"
            for old in out_root.glob(f"{variant}-*"):  # older builds of this variant
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    finally:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def relink_tensor(base_driver, tensor_src, out_dir):
    """A driver like the finished plain build `base_driver` but with csrc/tensor.cpp taken from `tensor_src`
    (a mutation check of the host copy path): only that unit is compiled (patched as in generate()) and
    linked with the base build's other objects, a few seconds instead of a full build. Everything else,
    including the headers tensor.cpp includes, is what the base build used. Returns the driver's path."""
    base = Path(base_driver).resolve().parent
    if not base.name.startswith("plain-") or not (base / "obj" / "gen_tensor_exact_alloc.cpp.o").is_file():
        raise BuildError(f"{base}: not a finished plain build (relink_tensor needs its obj/ and gen/)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensor_src = Path(tensor_src).resolve()
    unit = out_dir / "tensor_exact_alloc.cpp"
    unit.write_text(f'#line 1 "{tensor_src}"\n' + patch_tensor_source(tensor_src.read_text()))
    obj = out_dir / "tensor_exact_alloc.o"
    host_flags, _ = flags(False)
    cmd = [compiler(), *host_flags, "-I" + str(base / "gen"), "-I" + str(REPO / "csrc"), "-c", str(unit), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"compiling {tensor_src} failed:\n{r.stderr[-6000:]}")
    others = sorted(str(o) for o in (base / "obj").glob("*.o") if o.name != "gen_tensor_exact_alloc.cpp.o")
    exe = out_dir / "driver"
    r = subprocess.run([compiler(), *host_flags, *others, str(obj), "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"linking failed:\n{r.stderr[-6000:]}")
    return exe


def build(sanitize=False, out_root=None, cuda_dir=None, csrc_dir=None, jobs=None):
    """Builds (or finds in the cache) one driver; returns its path or raises BuildError."""
    variant = "sanitize" if sanitize else "plain"
    r = build_all([variant], out_root, cuda_dir, csrc_dir, jobs)[variant]
    if isinstance(r, BuildError):
        raise r
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UndefinedBehaviorSanitizer build")
    ap.add_argument("--out", help="cache root (default: build/cuda_emu in the repository)")
    ap.add_argument("--cuda-dir", help="CUDA sources to emulate (default: cuda/), e.g. a mutated copy")
    ap.add_argument("--csrc-dir", help="host sources to build (default: csrc/), e.g. a mutated copy")
    ap.add_argument("--jobs", type=int, help="parallel compiles (default: all cores)")
    a = ap.parse_args()
    try:
        print(build(a.sanitize, a.out, a.cuda_dir, a.csrc_dir, a.jobs))
    except BuildError as e:
        sys.exit(f"build.py: {e}")


if __name__ == "__main__":
    main()
