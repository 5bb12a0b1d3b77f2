"""A performance model of one AlexNet training step (FP32, batch 128) on an H100/H200 that runs without a GPU.

    python benchmarks/model.py                 # compile (or read the cache), predict, write results
    python benchmarks/model.py --no-write      # print only
    python benchmarks/model.py --gpu h100      # H100 SXM copy bandwidth instead of H200's
    python benchmarks/model.py --no-sass       # ptxas only (what happens without cuobjdump)
    python benchmarks/model.py --results DIR   # where to look for GPU runs to compare with (default results/)

What it reads. Every cuda/*.cu is compiled for sm_90 with the flags CMakeLists.txt uses (-O3
--expt-relaxed-constexpr -I csrc -I cuda -DALEXNET_WITH_CUDA=1) to a cubin, with `-Xptxas -v`; the report gives
each kernel's registers, spill stores/loads, stack and static shared memory. cuobjdump (pip wheel
nvidia-cuda-cuobjdump) disassembles the cubin; a loop is a backward branch, and a GEMM kernel's main loop is the
innermost loop holding the most FFMA: its FFMA share = FFMA / all instructions of that loop body (static count,
one pass through the body; the k-loop is one basic-block chain apart from the `more` guards), printed as written
and as issued: the branch only threads 0..15 take (the next tile's gather-table entries: `@P BRA` over it, P =
threadIdx.x > 15) runs in one warp of the block, so a warp issues it 1/warps of the time on average (issued share =
FFMA / (instructions - that branch + that branch / warps per block)). One instruction issues per clock per
scheduler, whichever warp it comes from, so the issued share is what caps the fraction of peak, and what the
GEMM formula below uses. Outputs are cached
under build/model/<hash of sources, flags and nvcc version>/. Without the SASS tools the model runs on ptxas
alone: the FFMA share is then taken as 1 and every GEMM time is a lower bound (the output says so).

Which kernel runs. Each pass of the step is mapped to the kernel and tile its launcher in cuda/*.cu picks for that
shape (every thread owns an 8x8 micro-tile, 6x8 in the 48-row tile; 16-deep k-steps). Forward and grad-input take the
channel-inner loaders (conv.cu tap_major: the reduction walked tap by tap, one bounds check per tile and copy run)
when the window is at most 15 x 15 (the tap mask) and Cg (forward) or Kg (grad-input) is a multiple of 16, as in
conv2..conv5, each after a launch that copies the weights into that order (weight_order, padded to the row tile); forward and grad-input
convolutions conv_tile (128x128 tiles of 256 threads when M > 64, N > 64 and tile_cost, the busiest SM's rounds as
below, is no higher than for 64x128 tiles of 128 threads; else 48x128 where it costs less than 64x128, as for
M = 48), the other GEMMs split_tile (128x128 without split-K when M > 64, N > 64 and the tiles alone give >= 264
blocks; else 48x128 for a conv grad-weight whose M fits 48-row tiles better, 128x128 when M is a multiple of 128,
64x128 for other conv grad-weights and 64x64 for other linear GEMMs) and choose_split_k (tiles that fill under
half of one round of the GPU, 132 x blocks/SM, with Kr > 256 are cut into slices of >= 128 so that at most one
round runs, plus a split_reduce launch that adds the slices of every tower, with 8 warps per element where the output
is too small to give each SM's threads one; the conv bias gradient's slices ride in the conv grad-weight's). The net
is the paper's two towers, both on one GPU in turn (one executor): each tower runs its own ops at its own shapes
(conv1 3->48, conv2 48->128, conv3 256->192 reading both towers, conv4 192->192, conv5 192->128, fc6 9216->2048,
fc7 4096->2048, fc8 4096->500), so the step is the sum over both towers of every pass below. Every conv and fc GEMM
pass runs as one launch for both towers (Net::pair_towers, ops::conv2d_*_pair and ops::linear_*_pair: tower 1's
blocks follow tower 0's in blockIdx.z; a pair keeps one tower's tile and split-K), shown once with "pair" after the
tile; conv1's forward and grad-weight, whose towers both read the images, instead stack both towers' 48 rows on one
gathered B (conv.cu TowerStack: 96x128 tiles of 256 threads, the grad-weight with one tower's split-K), "stack";
the cross-tower plumbing reads the other tower's tensors in place: one concat per gathered input, one split-and-sum
per gathered input's gradient, the loss over the fc8 halves (no copies on one device).

Occupancy (as cuda_occupancy.h computes it for sm_90): registers are allocated per warp in units of 256 and
checked per SM sub-partition (4 x 16 K registers: warps/partition = floor(16384 / (ceil(32 r / 256) * 256))); shared
memory per block = static + 1 KB reserved, rounded up to 128 B, out of 228 KB; at most 2048 threads and 32 blocks
per SM.

The GEMM formula. With B blocks, b = blocks/SM from occupancy, w = padded FLOPs of one block (2 BM BN k-slice,
k rounded up to the 16-deep k-step; tile fill = useful / padded FLOPs), R = 66.9 TFLOP/s / 132 per SM and s = the
main loop's FFMA share, the busiest SM runs n = ceil(B / 132) blocks in rounds of up to b at once, and

    t_compute = sum over rounds of  k * w / (R * s * eta(k)),   eta(k) = min(1, warps per block x k / 16)

i.e. one FFMA issues per clock per scheduler, so the share caps the fraction of peak; latency is hidden once 16
warps (two 256-thread blocks, 4 per scheduler) are resident, and a round with fewer warps issues proportionally
less (a lone block in a tail round costs as much as two). For 128x128 tiles (b = 2) this is exactly the usual wave
quantisation factor ceil(waves) / waves with waves = B / (2 * 132); 64x64 tiles (64 threads, b = 8) lose in
proportion to the warps missing from a partial last round. Altogether t_compute = FLOPs / (peak x s x tile fill x
wave efficiency). A GEMM pass takes
max(t_compute, its operand and result bytes / bandwidth) + launch gap.

Memory-bound kernels: t = bytes / (BW x parallelism) + launch gap, where bytes are the fewest the op must move
(as benchmarks/README.md counts them) and parallelism = min(1, resident active threads / (132 x 1024)): a kernel
needs about half the GPU's thread slots busy to keep HBM saturated (the conv bias gradient, one 256-thread block per
channel, gets 48 blocks for conv1). BW is the measured copy ceiling of a committed GPU result in
benchmarks/results/ (copy_GBps of a run on an H100/H200) when one exists, else the named constant below. Launch
gap: consecutive kernels on one stream start about LAUNCH_GAP_US apart even when queued ahead.

Measured beside predicted, when benchmarks/results/ (or --results) holds GPU runs of the commit read (the
-dirty mark ignored): every conv/fc row of bench_conv/bench_gemm (predicted at the benchmarks' merged shapes,
groups = towers), the memory-bound rows of bench_elementwise/bench_lrn_pool/bench_softmax/bench_loader (their
bytes and launch grids), the train_step row, and each scheduler op of a traced step (trace_step.py's
*_trace_summary.json and its Chrome trace, both towers summed) with the step's GPU-busy and wall time.

Not modelled (so the prediction is optimistic there): the instruction cost of LRN (a powf per element, and one
division per element backward) and pooling windows, which can exceed their memory time; L2 hits (bytes are HBM bytes); the
latency of local-memory spills beyond their instruction slots; host time and the input path (the uint8
upload and augment_batch of Net.train_step_u8, overlapped with the previous step) which the issue counts separately; overlap of the two towers (one executor runs them in turn).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]

# ---- the machine ------------------------------------------------------------------------------------------
SMS = 132                     # H100 SXM5 and H200: 132 SMs
PEAK_FP32 = 66.9e12           # FLOP/s: 132 SMs x 128 FP32 lanes x 2 x 1.98 GHz boost (NVIDIA's H100 SXM figure)
SM_RATE = PEAK_FP32 / SMS
# Copy bandwidth (bytes read + written per second) when no committed GPU run has measured it. H200: 4.8 TB/s HBM3e,
# of which a device-to-device copy reaches about 4.0 TB/s (~83%, the fraction STREAM-class copies get on H100);
# H100 SXM: 3.35 TB/s HBM3 -> about 3.0 TB/s measured-class copy.
COPY_BW = {"h200": 4.0e12, "h100": 3.0e12}
LAUNCH_GAP_US = 2.0           # kernel-to-kernel gap on one stream (launch + ramp-up/drain), per launch
WARPS_HIDE = 16               # resident warps per SM at which the GEMM main loop issues at full rate
HALF_THREADS = SMS * 1024     # resident threads at which a streaming kernel saturates HBM

# ---- the launchers' constants (cuda/common.cuh) -------------------------------------------------------------
TARGET_BLOCKS = 264
BK = 16
GEMM_THREADS = 256              # threads of the 128x128 tile; every tile gives each thread an 8x8 micro-tile


def gemm_threads(bm: int, bn: Optional[int] = None) -> int:
    """Threads per block of a bm x bn GEMM kernel (GemmCfg::kThreads: one per 8x8 micro-tile, 6x8 when bm = 48 or
    96)."""
    return (bm // (6 if bm in (48, 96) else 8)) * ((bm if bn is None else bn) // 8)


def gemm_min_blocks(bm: int, bn: int) -> int:
    """GemmCfg::kMinBlocks: blocks per SM the register budget is set for (16 warps)."""
    return 512 // gemm_threads(bm, bn)
THREADS_1D = 256
MAX_BLOCKS_1D = 65536

# ---- sm_90 occupancy limits ---------------------------------------------------------------------------------
REGS_PER_SM = 65536
SUBPARTITIONS = 4
REG_UNIT = 256                # registers allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED = 1024          # per block, reserved by the driver
SMEM_UNIT = 128               # shared-memory allocation granularity
SMEM_PER_BLOCK_OPTIN = 227 * 1024
MAX_THREADS_SM = 2048
MAX_BLOCKS_SM = 32

NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-I", "csrc", "-I", "cuda", "-DALEXNET_WITH_CUDA=1"]


class ModelError(Exception):
    """A failure the CLI reports in one line."""


# =============================================================================================================
# Occupancy


def blocks_per_sm(threads: int, regs: int, smem: int) -> int:
    """Resident blocks per SM on sm_90, as cuda_occupancy.h computes them for a default launch (regs per thread,
    static + dynamic shared memory per block in bytes). 0 when the block cannot launch at all."""
    if threads < 1 or threads > 1024:
        raise ValueError(f"blocks_per_sm: argument 'threads' must be in [1, 1024], got {threads}")
    if regs < 0 or regs > 255:
        raise ValueError(f"blocks_per_sm: argument 'regs' must be in [0, 255], got {regs}")
    if smem < 0:
        raise ValueError(f"blocks_per_sm: argument 'smem' must be >= 0, got {smem}")
    warps = -(-threads // 32)
    lim = min(MAX_BLOCKS_SM, MAX_THREADS_SM // (warps * 32))
    if regs > 0:
        per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
        # The launch check rounds the block's warps up to whole sub-partitions; warps then fit per sub-partition.
        if per_warp * -(-warps // SUBPARTITIONS) * SUBPARTITIONS > REGS_PER_SM:
            return 0
        warps_per_part = (REGS_PER_SM // SUBPARTITIONS) // per_warp
        lim = min(lim, (warps_per_part * SUBPARTITIONS) // warps)
    alloc = -(-(smem + SMEM_RESERVED) // SMEM_UNIT) * SMEM_UNIT
    if smem > SMEM_PER_BLOCK_OPTIN:
        return 0
    lim = min(lim, SMEM_PER_SM // alloc)
    return lim


# =============================================================================================================
# ptxas and SASS


@dataclasses.dataclass
class KernelInfo:
    name: str                  # mangled
    file: str
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    # main loop (from SASS); None without the SASS tools
    loop_ffma: Optional[int] = None
    loop_instr: Optional[int] = None
    loop_local: Optional[int] = None   # LDL/STL in the main loop (spill traffic per iteration)
    loop_first16: int = 0              # of loop_instr, those only threads 0..15 run (one warp: the gather table)

    @property
    def ffma_share(self) -> Optional[float]:
        """FFMA / the loop body's instructions, as written (every instruction counted for every warp)."""
        if self.loop_ffma is None or not self.loop_instr:
            return None
        return self.loop_ffma / self.loop_instr

    def issued_share(self, threads: int) -> Optional[float]:
        """FFMA / the instructions a warp issues per pass on average, in a block of `threads`: the branch that only
        threads 0..15 take (the next tile's gather-table entries) is issued by one warp of threads / 32. One
        instruction issues per clock per scheduler whichever warp it belongs to, so this is the share that caps the
        fraction of peak."""
        if self.loop_ffma is None or not self.loop_instr:
            return None
        warps = max(1, threads // 32)
        return self.loop_ffma / (self.loop_instr - self.loop_first16 + self.loop_first16 / warps)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str, file: str = "") -> Dict[str, KernelInfo]:
    """Per entry function: registers, spills, stack and static shared memory from `ptxas -v` output."""
    out: Dict[str, KernelInfo] = {}
    cur: Optional[KernelInfo] = None
    for line in text.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), KernelInfo(m.group(1), file))
            continue
        m = _PTXAS_PROPS.search(line)
        if m:
            cur = out.setdefault(m.group(1), KernelInfo(m.group(1), file))
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
        m = _PTXAS_USED.search(line)
        if m:
            cur.regs = int(m.group(1))
            s = _PTXAS_SMEM.search(line)
            cur.smem = int(s.group(1)) if s else 0
    return out


_SASS_FUNC = re.compile(r"^\s*Function : (\S+)", re.M)
_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_SASS_BRA = re.compile(r"\bBRA\s+(?:\S+\s+)?`?\(?(0x[0-9a-f]+)")


def _opcode(text: str) -> str:
    t = re.sub(r"^@!?U?P[T0-9]+\s+", "", text.strip())
    return t.split()[0].split(".")[0] if t else ""


_SASS_TID = re.compile(r"^S2R\s+(R\d+),\s*SR_TID\.X")
_SASS_FIRST16 = re.compile(r"^ISETP\.(?:GT\.(?:U32\.)?AND\s+(P\d),\s*PT,\s*(R\d+)(?:\.reuse)?,\s*0xf|"
                           r"GE\.(?:U32\.)?AND\s+(P\d),\s*PT,\s*(R\d+)(?:\.reuse)?,\s*0x10),\s*PT")


def first16_spans(instrs: List[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """Address ranges [lo, hi) that only threads 0..15 run: a forward `@P BRA` over them where P = (tid > 15), tid
    the register an `S2R R, SR_TID.X` last wrote before the compare (the GEMM loop's `t < BK` gather-table branch)."""
    spans = []
    tid_reg: Dict[str, bool] = {}  # register -> holds threadIdx.x
    pred_tid: Dict[str, bool] = {}
    for i, (addr, text) in enumerate(instrs):
        t = re.sub(r"^@!?U?P[T0-9]+\s+", "", text.strip())
        m = _SASS_TID.match(t)
        if m:
            tid_reg[m.group(1)] = True
            continue
        m = _SASS_FIRST16.match(t)
        if m:
            pr, reg = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            pred_tid[pr] = tid_reg.get(reg, False)
            continue
        b = re.match(r"^@(P\d)\s+BRA\s+(?:\S+\s+)?`?\(?(0x[0-9a-f]+)", text.strip())
        if b and pred_tid.get(b.group(1)) and int(b.group(2), 16) > addr:
            spans.append((addr + 16, int(b.group(2), 16)))
            continue
        ops = t.split()
        if len(ops) > 1:  # an instruction writing a register or predicate ends what it held
            dst = ops[1].rstrip(",")
            tid_reg.pop(dst, None)
            pred_tid.pop(dst, None)
    return spans


def sass_loops(instrs: List[Tuple[int, str]]) -> List[dict]:
    """Loops of one function's SASS (address, text) list: each backward branch closes the body [target, branch].
    Returns the innermost ones (containing no other loop) with their FFMA, instruction and LDL/STL counts, and how
    many of the instructions only threads 0..15 run (first16_spans)."""
    spans = []
    for addr, text in instrs:
        m = _SASS_BRA.search(text)
        if m:
            tgt = int(m.group(1), 16)
            if tgt < addr:
                spans.append((tgt, addr))
    inner = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in spans)]
    guarded = first16_spans(instrs)
    loops = []
    for lo, hi in inner:
        body = [(a, _opcode(t)) for a, t in instrs if lo <= a <= hi]
        body = [(a, o) for a, o in body if o and o != "NOP"]
        ops = [o for _, o in body]
        first16 = sum(1 for a, _ in body if any(g0 <= a < g1 for g0, g1 in guarded))
        loops.append(dict(start=lo, end=hi, instr=len(ops), ffma=sum(o == "FFMA" for o in ops),
                          local=sum(o in ("LDL", "STL") for o in ops), first16=first16))
    return loops


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str]]]:
    """cuobjdump -sass output -> {mangled function name: [(address, instruction text)]}."""
    funcs: Dict[str, List[Tuple[int, str]]] = {}
    heads = list(_SASS_FUNC.finditer(text))
    for i, h in enumerate(heads):
        body = text[h.end(): heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        funcs[h.group(1)] = [(int(m.group(1), 16), m.group(2).strip()) for m in _SASS_INSTR.finditer(body)]
    return funcs


def main_loop(instrs: List[Tuple[int, str]]) -> Optional[dict]:
    """The innermost loop with the most FFMA (ties: the longer body); None for a loop-free function."""
    loops = sass_loops(instrs)
    if not loops:
        return None
    return max(loops, key=lambda l: (l["ffma"], l["instr"]))


# =============================================================================================================
# Compilation (cached)


def find_tool(name: str) -> Optional[str]:
    """A CUDA binary tool: $NAME (upper case), PATH, or the bin/ of an installed nvidia-cuda-* pip wheel."""
    env = os.environ.get(name.upper())
    if env and Path(env).is_file():
        return env
    p = shutil.which(name)
    if p:
        return p
    for base in sys.path:
        nv = Path(base) / "nvidia"
        if nv.is_dir():
            for cand in sorted(nv.glob(f"*/bin/{name}")) + sorted(nv.glob(f"bin/{name}")):
                if cand.is_file() and os.access(cand, os.X_OK):
                    return str(cand)
    return None


def sass_tool() -> Optional[Tuple[str, Dict[str, str]]]:
    """(cuobjdump, environment to run it in) or None. cuobjdump -sass hands the disassembly to nvdisasm, which it
    finds on PATH only: the pip wheels put the two in separate folders, so nvdisasm's goes first on PATH."""
    cuobjdump, nvdisasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if not (cuobjdump and nvdisasm):
        return None
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(nvdisasm).parent), os.environ.get("PATH", "")]))
    return cuobjdump, env


def _write(path: Path, text: str) -> None:
    """Whole or not at all: an interrupted run must not leave a truncated report in the cache."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _run(cmd: List[str], cwd: Path, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def source_hash(repo: Path, nvcc_version: str) -> str:
    h = hashlib.sha256()
    h.update(nvcc_version.encode())
    h.update(" ".join(NVCC_FLAGS).encode())
    for p in sorted(list((repo / "cuda").glob("*")) + list((repo / "csrc").glob("*.h"))):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def compile_kernels(repo: Path = REPO, cache: Optional[Path] = None, log=print,
                    sass: bool = True) -> Tuple[Dict[str, KernelInfo], List[str]]:
    """Compile (or read from the cache) every cuda/*.cu; returns {mangled name: KernelInfo} and notes."""
    notes: List[str] = []
    nvcc = find_tool("nvcc")
    cache = cache or repo / "build" / "model"
    sources = sorted((repo / "cuda").glob("*.cu"))
    if not sources:
        raise ModelError(f"model: no cuda/*.cu under {repo}")
    if nvcc:
        ver = _run([nvcc, "--version"], repo).stdout.strip().splitlines()[-1]
        out = cache / source_hash(repo, ver)
    else:
        # No compiler: read a cache built from these very sources by any nvcc (the hash covers the version, so
        # look for a directory whose recorded source hash matches).
        want = source_hash(repo, "")
        out = None
        for d in sorted(cache.glob("*")) if cache.is_dir() else []:
            if (d / "sources.hash").is_file() and (d / "sources.hash").read_text().strip() == want:
                out = d
        if out is None:
            raise ModelError("model: nvcc is not on PATH and build/model/ holds no compiled output of these sources")
        notes.append(f"nvcc absent: read the compiled kernels cached in {out.relative_to(repo)}")
        ver = (out / "nvcc.version").read_text().strip()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sources.hash").write_text(source_hash(repo, "") + "\n")
    (out / "nvcc.version").write_text(ver + "\n")
    tool = sass_tool() if sass else None
    cuobjdump, sass_env = tool if tool else (None, None)
    if not cuobjdump:
        notes.append("SASS tools absent (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm): ptxas only; FFMA "
                     "share taken as 1, so every GEMM time is a LOWER BOUND")
    kernels: Dict[str, KernelInfo] = {}
    for src in sources:
        cubin, rep, sass = out / f"{src.stem}.cubin", out / f"{src.stem}.ptxas.txt", out / f"{src.stem}.sass"
        if not (cubin.is_file() and rep.is_file()):
            if not nvcc:
                raise ModelError(f"model: {cubin} missing from the cache and nvcc is absent")
            log(f"compiling {src.relative_to(repo)} for sm_90 ...")
            r = _run([nvcc, "-cubin", "-arch=sm_90", *NVCC_FLAGS, "-Xptxas", "-v",
                      str(src.relative_to(repo)), "-o", str(cubin)], repo)
            if r.returncode != 0:
                raise ModelError(f"model: nvcc failed on {src.name}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            _write(rep, r.stderr + r.stdout)
        info = parse_ptxas(rep.read_text(), src.name)
        if cuobjdump:
            if not sass.is_file():
                r = _run([cuobjdump, "-sass", str(cubin)], repo, sass_env)
                if r.returncode != 0:
                    raise ModelError(f"model: cuobjdump failed on {cubin.name}: {r.stderr.strip()[:200]}")
                _write(sass, r.stdout)
            for fname, instrs in parse_sass(sass.read_text()).items():
                if fname in info:
                    ml = main_loop(instrs)
                    if ml:
                        info[fname].loop_ffma, info[fname].loop_instr = ml["ffma"], ml["instr"]
                        info[fname].loop_local = ml["local"]
                        info[fname].loop_first16 = ml["first16"]
        for k, v in info.items():
            kernels[f"{src.name}:{k}"] = v
    notes.append(f"kernels: {ver}, sm_90, cache {out.relative_to(repo) if out.is_relative_to(repo) else out}")
    return kernels, notes


# Readable names of the kernels the passes use: (file, substring of the mangled name).
GEMM_OPS = {
    "conv_fwd": ("conv.cu", "7ConvFwdILb1E"),           # windows of <= 15 x 15: the tap-mask loaders
    "conv_fwd_nomask": ("conv.cu", "7ConvFwdILb0E"),    # larger windows
    "conv_dgrad": ("conv.cu", "12ConvBwdInputILb1ELb1E"),  # stride 1, <= 15 x 15, as every layer with this pass
    "conv_fwd_tap": ("conv.cu", "7ConvTapILb0E"),       # channel-inner: <= 15 x 15, Cg % 16 == 0 (conv2..conv5)
    "conv_dgrad_tap": ("conv.cu", "7ConvTapILb1E"),     # channel-inner: stride 1, <= 15 x 15, Kg % 16 == 0
    "conv_wgrad": ("conv.cu", "13ConvBwdWeightILb1E"),       # windows of <= 15 x 15: the tap-mask loaders
    "conv_wgrad_nomask": ("conv.cu", "13ConvBwdWeightILb0E"),  # larger windows or outputs
    "linear_fwd": ("gemm.cu", "StridedGemmILb1ELb1ELb0E"),
    # 16-byte copies of the mn-contiguous operands, which the launcher takes at AlexNet's aligned shapes
    "linear_dgrad": ("gemm.cu", "StridedGemmILb1ELb0ELb1E"),
    "linear_wgrad": ("gemm.cu", "StridedGemmILb0ELb0ELb1E"),
    # their 4-byte fallbacks (a misaligned operand, a k stride or m / n extent not a multiple of 4): listed only
    "linear_dgrad_4b": ("gemm.cu", "StridedGemmILb1ELb0ELb0E"),
    "linear_wgrad_4b": ("gemm.cu", "StridedGemmILb0ELb0ELb0E"),
}
# The tiles each GEMM kernel is instantiated with (the launchers in cuda/conv.cu, cuda/gemm.cu).
GEMM_TILES = {
    "conv_fwd": ((128, 128), (64, 128), (48, 128)),
    "conv_fwd_nomask": ((128, 128), (64, 128), (48, 128)),
    "conv_dgrad": ((128, 128), (64, 128), (48, 128)),
    "conv_fwd_tap": ((128, 128), (64, 128), (48, 128)),
    "conv_dgrad_tap": ((128, 128), (64, 128), (48, 128)),
    "conv_wgrad": ((128, 128), (64, 128), (48, 128)),
    "conv_wgrad_nomask": ((128, 128), (64, 128), (48, 128)),
    "linear_fwd": ((128, 128), (64, 64)),
    "linear_dgrad": ((128, 128), (64, 64)),
    "linear_wgrad": ((128, 128), (64, 64)),
    "linear_dgrad_4b": ((128, 128), (64, 64)),
    "linear_wgrad_4b": ((128, 128), (64, 64)),
}
# Both towers' rows stacked on one gathered B (conv.cu TowerStack, GemmStack): the tap-mask forward and grad-weight
# when both towers read the same x and each has 48 rows (conv1, whose towers both read the images).
STACK_TILE = (96, 128)
STACK_OPS = ("conv_fwd", "conv_wgrad")
KERNELS = {
    "splitk_reduce": ("gemm.cu", "split_reduce_kernel"),
    "conv_bias_grad": ("conv.cu", "conv2d_backward_bias_kernel"),
    "weight_order": ("conv.cu", "conv_weight_order_kernel"),
    "linear_bias_grad": ("gemm.cu", "linear_backward_bias_kernel"),
    "relu_fwd": ("relu.cu", "relu_forward_kernel"),
    "relu_bwd": ("relu.cu", "relu_backward_kernel"),
    "lrn_fwd": ("lrn.cu", "lrn_forward_kernel"),
    "lrn_bwd": ("lrn.cu", "lrn_backward_tiled_kernel"),
    "lrn_pool_fwd": ("lrn.cu", "lrn_maxpool_forward_kernel"),
    "pool_fwd": ("pool.cu", "maxpool_forward_kernel"),
    "pool_bwd": ("pool.cu", "maxpool_backward_kernel"),
    "dropout_fwd": ("dropout.cu", "dropout_forward_kernel"),
    "dropout_bwd": ("dropout.cu", "dropout_backward_kernel"),
    "softmax_xent_fwd": ("softmax.cu", "softmax_rows_kernelILi1024ELb1E"),   # C > 512 (AlexNet's 1000)
    "softmax_xent_fwd_512": ("softmax.cu", "softmax_rows_kernelILi512ELb1E"),
    "softmax_xent_fwd_256": ("softmax.cu", "softmax_rows_kernelILi256ELb1E"),
    "softmax_xent_bwd": ("softmax.cu", "softmax_xent_backward_kernel"),
    "sgd": ("sgd.cu", "sgd_update_multi_kernel"),
    "insert": ("tensor_ops.cu", "channel_copy_kernelI6float4Lb1E"),
    "extract": ("tensor_ops.cu", "channel_copy_kernelI6float4Lb0E"),
    "concat": ("tensor_ops.cu", "concat_parts_kernelI6float4E"),
    "split_sum": ("tensor_ops.cu", "split_sum_kernelI6float4E"),
    "add": ("tensor_ops.cu", "add_kernel"),
    "augment": ("augment.cu", "augment_batch_kernel"),
}


def find_kernel(kernels: Dict[str, KernelInfo], file: str, *subs: str, pair: Optional[bool] = None) -> KernelInfo:
    """The one kernel of `file` whose mangled name holds every `subs`; pair True/False: a TowerPair or not."""
    hits = [v for k, v in kernels.items() if k.startswith(file + ":") and all(s in k for s in subs)
            and (pair is None or ("9TowerPair" in k) == pair)]
    if len(hits) != 1:
        raise ModelError(f"model: expected one kernel in {file} matching {subs}, found {len(hits)} "
                         "(did a kernel's name change? update GEMM_OPS/KERNELS in benchmarks/model.py)")
    return hits[0]


def gemm_kernel(kernels, op: str, tile: int, tile_n: Optional[int] = None, pair: bool = False,
                stacked: bool = False) -> KernelInfo:
    """The GEMM kernel of `op` on the tile: both towers' launch (TowerPair) when pair, both towers' rows on one B
    (TowerStack) when stacked, else one op's."""
    file, sub = GEMM_OPS[op]
    tile_sub = f"GemmCfgILi{tile}ELi{tile if tile_n is None else tile_n}E"
    if stacked:
        return find_kernel(kernels, file, tile_sub, "10TowerStack", sub, pair=False)
    return find_kernel(kernels, file, tile_sub, sub, pair=pair)


# =============================================================================================================
# The launchers' choices (cuda/common.cuh, conv.cu, gemm.cu), in Python


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_tiles(M: int, N: int, t: int, tn: Optional[int] = None) -> int:
    return cdiv(M, t) * cdiv(N, t if tn is None else tn)


def use_big_tiles(M: int, N: int, Z: int) -> bool:
    return M > 64 and N > 64 and gemm_tiles(M, N, 128) * Z >= TARGET_BLOCKS


def narrow_fits(M: int) -> bool:
    """narrow_fits: 48-row tiles pad M less than 64-row ones."""
    return cdiv(M, 48) * 48 < cdiv(M, 64) * 64


def loop_cost(bm: int, bn: int) -> int:
    """GemmCfg::kLoopCost: main-loop instructions per 100 FFMA the launchers assume for the tile."""
    return 116 if bm == 128 else (123 if bm == 48 else (118 if bn == 128 else 121))


def tile_cost(M: int, N: int, Z: int, bm: int, bn: int) -> int:
    """tile_cost<Cfg> (common.cuh): rounds of the busiest SM, a round of too few warps costing as a full one,
    times the block's FFMA at loop_cost issue slots per 100."""
    per_sm = cdiv(gemm_tiles(M, N, bm, bn) * Z, SMS)
    b = gemm_min_blocks(bm, bn)
    slow = 16 // (gemm_threads(bm, bn) // 32)
    rest = per_sm % b
    return (per_sm // b * b + (max(rest, slow) if rest else 0)) * bm * bn * loop_cost(bm, bn)


def conv_tile(M: int, N: int, Z: int) -> Tuple[int, int]:
    """conv_tile: the cheapest of 128x128 (M > 64, N > 64 only), 64x128 and 48x128 by tile_cost, a tie going to
    the larger tile. Returns (BM, BN)."""
    big = tile_cost(M, N, Z, 128, 128) if M > 64 and N > 64 else math.inf
    wide, narrow = tile_cost(M, N, Z, 64, 128), tile_cost(M, N, Z, 48, 128)
    if big <= wide and big <= narrow:
        return 128, 128
    return (64, 128) if wide <= narrow else (48, 128)


def split_tile(M: int, N: int, Z: int, narrow_ok: bool, other: Tuple[int, int]) -> Tuple[int, int]:
    """split_tile: 128x128 without split-K when the tiles fill the GPU; else 48x128 where it fits M better
    (k-contiguous A only), 128x128 for M a multiple of 128, `other` otherwise."""
    if use_big_tiles(M, N, Z):
        return 128, 128
    if narrow_ok and narrow_fits(M):
        return 48, 128
    if M % 128 == 0:
        return 128, 128
    return other


def choose_split_k(blocks: int, Kr: int, bm: int = 64, bn: int = 64) -> Tuple[int, int]:
    """(slices, chunk) as choose_split_k<Cfg> returns them for the bm x bn tile."""
    target = SMS * gemm_min_blocks(bm, bn)
    splits = 1
    if blocks < target // 2 and Kr > 256:
        want = target // blocks
        splits = max(1, min(want, Kr // 128, 256))
    c = cdiv(cdiv(Kr, splits), BK) * BK
    c = max(c, BK)
    return (cdiv(Kr, c) if Kr > 0 else 1), c


@dataclasses.dataclass
class GemmLaunch:
    op: str
    M: int
    N: int
    K: int
    Z: int            # groups (slices of the problem, each M x N x K)
    tile: int         # BM
    splits: int
    chunk: int
    tile_n: int = 0   # BN (0: square)
    towers: int = 1   # 2: both towers' problems in one launch (a TowerPair, or stacked)
    stacked: bool = False  # the towers' rows stacked on one B (TowerStack): one M = 2 x M problem, tile 96 x 128

    @property
    def bn(self) -> int:
        return self.tile_n or self.tile

    @property
    def blocks(self) -> int:
        if self.stacked:
            return gemm_tiles(2 * self.M, self.N, self.tile, self.bn) * self.Z * self.splits
        return gemm_tiles(self.M, self.N, self.tile, self.bn) * self.Z * self.splits * self.towers


TAP_STEP, TAP_TILES = 16, 256  # conv.cu kTapStep, kTapTiles
CONV_TILE_OPS = ("conv_fwd", "conv_fwd_nomask", "conv_dgrad", "conv_fwd_tap", "conv_dgrad_tap")


MASK_SIDE = 15  # conv.cu kMaskSide: the tap-mask loaders take windows of up to 15 x 15


def tap_major(k: int, J: int) -> bool:
    """conv.cu tap_major: the channel-inner loaders for windows the tap mask fits, J (Cg forward, Kg grad-input) a
    multiple of the 16-deep k-step, and R*S*J within the lookup table."""
    return k <= MASK_SIDE and J % TAP_STEP == 0 and k * k * J <= TAP_TILES * TAP_STEP


def fwd_op(k: int, cg: int) -> str:
    """The forward's loaders (conv.cu conv_fwd): channel-inner, else the tap mask (<= 15 x 15), else (r, s) checks."""
    return "conv_fwd_tap" if tap_major(k, cg) else ("conv_fwd" if k <= MASK_SIDE else "conv_fwd_nomask")


def dgrad_op(k: int, kg: int) -> str:
    """The grad-input's loaders at stride 1 (every layer with this pass; conv.cu conv_dgrad)."""
    return "conv_dgrad_tap" if tap_major(k, kg) else "conv_dgrad"


def wgrad_op(k: int, out_hw: int) -> str:
    """conv_wgrad: the tap-mask loaders for windows of <= 15 x 15 and outputs of <= 64 rows and columns."""
    return "conv_wgrad" if k <= MASK_SIDE and out_hw <= 64 else "conv_wgrad_nomask"


def stacks(op: str, M: int, N: int, Z: int, towers: int, shared_b: bool) -> bool:
    """conv.cu launch_stacked (the ops' kStacks): two towers that read the same x (shared_b), 48 rows each, the
    tap-mask forward, or the tap-mask grad-weight where one tower's tile would be 48x128."""
    if towers != 2 or not shared_b or op not in STACK_OPS or 2 * M != STACK_TILE[0]:
        return False
    return op == "conv_fwd" or split_tile(M, N, Z, True, (64, 128)) == (48, 128)


def plan_gemm(op: str, M: int, N: int, K: int, Z: int = 1, towers: int = 1, shared_b: bool = False) -> GemmLaunch:
    """The tile and split-K the launcher picks. Forward/grad-input convolutions never split K; a pair of towers
    (towers = 2) picks their tile for all its blocks, a grad-weight pair keeps one tower's tile and split-K. Towers
    that read the same B (shared_b) stack where stacks() says: one 96x128 tile over both towers' rows, the grad-weight
    with one tower's split-K on its 48x128 tile."""
    if stacks(op, M, N, Z, towers, shared_b):
        splits, chunk = (1, K) if op == "conv_fwd" else choose_split_k(gemm_tiles(M, N, 48, 128) * Z, K, 48, 128)
        return GemmLaunch(op, M, N, K, Z, STACK_TILE[0], splits, chunk, STACK_TILE[1], towers, stacked=True)
    if op in CONV_TILE_OPS:
        bm, bn = conv_tile(M, N, Z * towers)
        return GemmLaunch(op, M, N, K, Z, bm, 1, K, bn, towers)
    if op in ("conv_wgrad", "conv_wgrad_nomask"):
        bm, bn = split_tile(M, N, Z, True, (64, 128))
    else:
        bm, bn = split_tile(M, N, Z, False, (64, 64))
    splits, chunk = choose_split_k(gemm_tiles(M, N, bm, bn) * Z, K, bm, bn)
    return GemmLaunch(op, M, N, K, Z, bm, splits, chunk, bn, towers)


# =============================================================================================================
# Prediction


@dataclasses.dataclass
class Pass:
    layer: str
    pass_: str
    kernel: str
    launches: int = 1
    tile: str = ""
    grid: int = 0
    bps: int = 0           # blocks per SM
    waves: float = 0.0
    ffma_share: Optional[float] = None
    spills: str = ""
    flops: float = 0.0
    bytes: float = 0.0
    fill: Optional[float] = None
    wave_eff: Optional[float] = None
    bound: str = ""
    ms: float = 0.0
    in_step: bool = True
    count: int = 1         # how many times the step runs it (both towers)
    op: str = ""           # the scheduler op it runs in (the name a traced step records, csrc/net.cpp)


class Model:
    def __init__(self, kernels: Dict[str, KernelInfo], bw: float, sass: bool):
        self.k = kernels
        self.bw = bw
        self.sass = sass

    def gemm(self, layer: str, pass_: str, op: str, M: int, N: int, K: int, Z: int = 1,
             bytes_: float = 0.0, towers: int = 1, extra: Optional[List[Tuple[int, int]]] = None,
             extra_name: str = "", shared_b: bool = False) -> List[Pass]:
        """One launch of an M x N x K GEMM (x Z groups) for `towers` towers at once; bytes_ are one tower's. With
        split-K, one split_reduce launch adds every tower's slices, and the `extra` reductions (n, splits) the
        launcher folds into it (the conv bias gradient's slices, `extra_name` in the pass's name); without split-K
        those have a launch of their own."""
        g = plan_gemm(op, M, N, K, Z, towers, shared_b)
        bytes_ = bytes_ * towers
        info = gemm_kernel(self.k, op, g.tile, g.bn, pair=towers > 1 and not g.stacked, stacked=g.stacked)
        threads = gemm_threads(g.tile, g.bn)
        bps = blocks_per_sm(threads, info.regs, info.smem)
        share = info.issued_share(threads) if (self.sass and info.ffma_share) else 1.0
        B = g.blocks
        rows = towers * M if g.stacked else M  # the stacked problem's rows: every tower's, in one tile
        tiles_mn = cdiv(rows, g.tile) * g.tile * cdiv(N, g.bn) * g.bn
        kpad = sum(cdiv(min(g.chunk, K - s * g.chunk), BK) * BK for s in range(g.splits))
        padded = 2.0 * tiles_mn * kpad * Z * (1 if g.stacked else towers)
        useful = 2.0 * M * N * K * Z * towers
        w = padded / B
        n = cdiv(B, SMS)
        t = 0.0
        left = n
        while left > 0:
            k = min(left, bps)
            eta = min(1.0, k * (threads // 32) / WARPS_HIDE)
            t += k * w / (SM_RATE * share * eta)
            left -= k
        t_mem = bytes_ / self.bw
        bound = "FFMA issue" if t >= t_mem else "memory"
        ms = (max(t, t_mem) + LAUNCH_GAP_US * 1e-6) * 1e3
        spill = f"{info.spill_stores}/{info.spill_loads}"
        if info.loop_local:
            spill += f" ({info.loop_local} in loop)"
        p = Pass(layer, pass_, op, 1, f"{g.tile}x{g.bn}" + (f" splitK{g.splits}" if g.splits > 1 else "") + (" stack" if g.stacked else (" pair" if towers > 1 else "")),
                 B, bps, B / (bps * SMS), info.issued_share(threads) if self.sass else None, spill, useful, bytes_,
                 useful / padded, (padded / SMS) / (t * SM_RATE * share) if t > 0 else None, bound, ms)
        out = [p]
        segs = ([(M * N * Z, g.splits)] * towers if g.splits > 1 else []) + list(extra or [])
        if segs:
            if g.splits > 1:
                out.append(self.split_reduce(layer, pass_ + " reduce", segs, extra_name if extra else ""))
            else:
                out.append(self.split_reduce(layer, "grad-bias: sum slices", segs))
        return out

    def weight_order(self, layer: str, pass_: str, op: str, M: int, N: int, K: int, Z: int = 1,
                     towers: int = 1) -> List[Pass]:
        """The channel-inner ops' weight copy (conv.cu conv_weight_order_kernel, one launch for every tower): the
        weights (M x K per group) read, written padded to the GEMM's row tiles; nothing for the other ops."""
        if not op.endswith("_tap"):
            return []
        bm = plan_gemm(op, M, N, K, Z, towers).tile
        mpad = cdiv(M, bm) * bm
        out_n = Z * mpad * K
        return [self.stream(layer, pass_, "weight_order", towers * 4.0 * (Z * M * K + out_n), grid_1d(out_n) * towers)]

    def split_reduce(self, layer: str, pass_: str, segs: List[Tuple[int, int]], also: str = "") -> Pass:
        """One split_reduce launch (common.cuh) over segments (n, splits): bytes (splits + 1) n floats each, and
        each segment's blocks (256 elements, or 32 with lanes)."""
        bytes_ = sum((sp + 1) * n * 4.0 for n, sp in segs)
        grid = sum(cdiv(n, THREADS_1D // reduce_lanes(n, sp)) for n, sp in segs)
        return self.stream(layer, pass_ + (f" + {also}" if also else ""), "splitk_reduce", bytes_, grid)

    def stream(self, layer: str, pass_: str, kernel: str, bytes_: float, grid: int, threads: int = THREADS_1D,
               active: Optional[int] = None, launches: int = 1) -> Pass:
        """A memory-bound kernel: `bytes_` at the copy bandwidth, derated when too few threads are resident."""
        info = find_kernel(self.k, *KERNELS[kernel])
        bps = blocks_per_sm(threads, info.regs, info.smem)
        resident_blocks = min(grid, bps * SMS)
        act = threads if active is None else active
        par = min(1.0, resident_blocks * act / HALF_THREADS)
        t = bytes_ / (self.bw * par) + launches * LAUNCH_GAP_US * 1e-6
        return Pass(layer, pass_, kernel, launches, "", grid, bps, grid / (bps * SMS), None,
                    f"{info.spill_stores}/{info.spill_loads}", 0.0, bytes_, None, None,
                    f"memory ({par:.0%} par.)" if par < 1 else "memory", t * 1e3)

    def copy(self, layer: str, pass_: str, bytes_: float) -> Pass:
        """A device-to-device cudaMemcpy of bytes_ (read + write)."""
        return Pass(layer, pass_, "memcpy D2D", 1, "", 0, 0, 0.0, None, "", 0.0, 2 * bytes_, None, None, "memory",
                    (2 * bytes_ / self.bw + LAUNCH_GAP_US * 1e-6) * 1e3)


def plane_grid(planes: int, inner: int, threads: int = THREADS_1D) -> Tuple[int, int]:
    """(blocks, active threads per block) of plane_grid (common.cuh)."""
    gy = max(1, min(planes, 65535))
    gx = cdiv(inner, threads)
    cap = cdiv(MAX_BLOCKS_1D, gy)
    gx = max(1, min(gx, cap))
    return gx * gy, min(threads, cdiv(inner, gx))


def grid_1d(n: int) -> int:
    return max(1, min(cdiv(n, THREADS_1D), MAX_BLOCKS_1D))


REDUCE_LANES, REDUCE_SMALL = 8, 65536  # common.cuh kReduceLanes, kReduceSmall


def softmax_threads(C: int) -> int:
    """Threads of softmax_rows_kernel's one block per row (softmax.cu softmax_threads)."""
    return 256 if C <= 256 else (512 if C <= 512 else 1024)


def softmax_fwd_pass(m: "Model", layer: str, pass_: str, N: int, C: int, bytes_: float) -> "Pass":
    """softmax_rows_kernel: N blocks of softmax_threads(C), min(threads, C) of them with a class."""
    t = softmax_threads(C)
    kernel = "softmax_xent_fwd" if t == 1024 else f"softmax_xent_fwd_{t}"
    return m.stream(layer, pass_, kernel, bytes_, N, threads=t, active=min(t, C))


def reduce_lanes(n: int, splits: int) -> int:
    """Lanes (warps) per output element of split_reduce (common.cuh split_reduce_lanes)."""
    return REDUCE_LANES if n < REDUCE_SMALL and splits >= REDUCE_LANES else 1


BIAS_TARGET_BLOCKS = 1056  # conv.cu kBiasTargetBlocks
LRN_PIX, LRN_CHUNK = 32, 64  # lrn.cu kLrnPix, kLrnChunk (lrn_backward_tiled_kernel)
SGD_MAX_SEGS = 40          # sgd.cu kSgdMaxSegs


def conv_bias_splits(K: int, per_channel: int) -> int:
    """Slices per channel of the conv bias gradient (conv.cu conv_bias_splits)."""
    want = cdiv(BIAS_TARGET_BLOCKS, K)
    most = cdiv(per_channel, THREADS_1D * 4)
    return max(1, min(want, most, 65535))


def conv_bias_passes(m: "Model", layer: str, N: int, K: int, PQ: int, towers: int = 1,
                     reduce: bool = True) -> Tuple[List["Pass"], List[Tuple[int, int]]]:
    """The conv bias gradient of `towers` towers: one launch of K x splits x towers blocks over dy, then (splits > 1)
    the slices added by split_reduce: its own launch when `reduce` (conv2d_backward_bias), else returned as segments
    (n, splits) for the weight gradient's reduce launch (conv2d_backward_weight_bias_pair)."""
    s = conv_bias_splits(K, N * PQ)
    out = [m.stream(layer, "grad-bias" + (" (both towers)" if towers > 1 else ""), "conv_bias_grad",
                    towers * (N * K * PQ * 4.0 + K * s * 4.0), K * s * towers)]
    segs = [(K, s)] * towers if s > 1 else []
    if segs and reduce:
        out.append(m.split_reduce(layer, "grad-bias: sum slices", segs))
        segs = []
    return out, segs


def sgd_multi_pass(m: "Model", layer: str, sizes: List[int], pass_: str = "sgd (all parameters)") -> "Pass":
    """sgd_update_multi over tensors of `sizes` elements: 20 B each, every tensor its own grid_1d of float4s, up
    to SGD_MAX_SEGS tensors per launch."""
    blocks = sum(grid_1d(cdiv(n, 4)) for n in sizes)
    return m.stream(layer, pass_, "sgd", 20.0 * sum(sizes), blocks, launches=cdiv(len(sizes), SGD_MAX_SEGS))


def tower_layers(cfg: dict) -> List[dict]:
    """The per-tower layer table of csrc/net.cpp (Net::build_layers) for `cfg` (alexnet_cuda.config keys)."""
    T = cfg["towers"]
    pool_w = 3 if cfg["overlap_pool"] else 2
    c1 = cfg["conv1"]
    rows = [(c1["kernel"], c1["padding"], c1["stride"], False, True, True), (5, 2, 1, False, True, True),
            (3, 1, 1, True, False, False), (3, 1, 1, False, False, False), (3, 1, 1, False, False, True)]
    out, hw, c_own = [], cfg["input_size"], cfg["in_channels"]
    for i, (k, pad, stride, cross, lrn, pool) in enumerate(rows):
        name = f"conv{i + 1}"
        if name in cfg.get("drop_layers", ()):
            raise ModelError("model: drop_layers ablations are not modelled")
        cross = cross and T > 1
        in_c = c_own * T if cross else c_own
        out_c = cfg["channels"][i] // T
        o = (hw + 2 * pad - k) // stride + 1
        po = (o - pool_w) // 2 + 1 if pool else o
        out.append(dict(name=name, conv=True, cross=cross, in_c=in_c, out_c=out_c, k=k, pad=pad, stride=stride,
                        in_hw=hw, out_hw=o, pooled_hw=po, lrn=lrn and cfg["lrn"], pool=pool, relu=True,
                        dropout=False))
        hw, c_own = po, out_c
    feats = c_own * hw * hw
    for i, o in enumerate([cfg["fc"][0] // T, cfg["fc"][1] // T, cfg["num_classes"] // T]):
        out.append(dict(name=f"fc{6 + i}", conv=False, cross=T > 1, in_c=feats * T, out_c=o, relu=i < 2,
                        dropout=i < 2 and cfg["dropout"] > 0, lrn=False, pool=False))
        feats = o
    return out


def step_passes(m: Model, cfg: dict, N: int) -> List[Pass]:
    """Every pass of one training step (one tower's; `count` = towers), in issue order."""
    T = cfg["towers"]
    L = tower_layers(cfg)
    P: List[Pass] = []
    f = 4.0

    def add(ps, count=T):
        for p in ps if isinstance(ps, list) else [ps]:
            p.count = count
            P.append(p)

    def out_elems(l):
        return N * l["out_c"] * (l["pooled_hw"] ** 2 if l["conv"] else 1)

    for i, l in enumerate(L):
        name = l["name"]
        if l["cross"]:
            # One device and stream: no copies (the other tower's output is read in place), one concat of every
            # tower's part in one launch, which both towers use (Net::issue_forward under pair_towers).
            part = out_elems(L[i - 1])
            inner = L[i - 1]["pooled_hw"] ** 2 if L[i - 1]["conv"] else 1
            g, a = plane_grid(N, cdiv(L[i - 1]["out_c"] * inner, 4))
            add(m.stream(name, "gather: concat", "concat", T * 2 * part * f, g * T, active=a), 1)
        if l["conv"]:
            PQ, HW = l["out_hw"] ** 2, l["in_hw"] ** 2
            Kr = l["in_c"] * l["k"] ** 2
            x_b, y_b, w_b = N * l["in_c"] * HW * f, N * l["out_c"] * PQ * f, l["out_c"] * Kr * f
            fwd = fwd_op(l["k"], l["in_c"])
            add(m.weight_order(name, "forward: weight order", fwd, l["out_c"], N * PQ, Kr, 1, towers=T), 1)
            # The first layer's towers both read the images (one tensor: Net's input.share): they may stack.
            add(m.gemm(name, "forward", fwd, l["out_c"], N * PQ, Kr, 1, x_b + y_b + w_b, towers=T, shared_b=i == 0), 1)
            z = N * l["out_c"] * PQ
        else:
            x_b, y_b, w_b = N * l["in_c"] * f, N * l["out_c"] * f, l["out_c"] * l["in_c"] * f
            add(m.gemm(name, "forward", "linear_fwd", N, l["out_c"], l["in_c"], 1, x_b + y_b + w_b, towers=T), 1)
            z = N * l["out_c"]
        # the ReLU runs in the forward GEMM's epilogue (conv2d_forward / linear_forward relu=True): no pass
        if l["lrn"] and l["pool"]:  # lrn_maxpool_forward: x in; y, scale, pool_y, argmax out; a block per plane
            po = N * l["out_c"] * l["pooled_hw"] ** 2
            planes = N * l["out_c"]
            add(m.stream(name, "lrn + pool forward", "lrn_pool_fwd", 12 * z + 8 * po, min(planes, MAX_BLOCKS_1D),
                         active=min(THREADS_1D, PQ)))
        elif l["lrn"]:
            g, a = plane_grid(N * l["out_c"], PQ)
            add(m.stream(name, "lrn forward", "lrn_fwd", 12 * z, g, active=a))
        if l["pool"] and not l["lrn"]:  # a thread per output of all planes
            po = N * l["out_c"] * l["pooled_hw"] ** 2
            add(m.stream(name, "pool forward", "pool_fwd", 4 * z + 8 * po, grid_1d(po)))
        if l["dropout"]:
            add(m.stream(name, "dropout forward", "dropout_fwd", 9 * z, grid_1d(z)))

    # The loss reads the towers' fc8 parts in place and writes each tower's slice of dlogits (no concat, slice or
    # copy on one device).
    classes = cfg["num_classes"]
    lg = N * classes
    add(softmax_fwd_pass(m, "loss", "softmax-xent forward", N, classes, 2 * lg * f), 1)
    g, a = plane_grid(N, classes // T)
    add(m.stream("loss", "softmax-xent backward", "softmax_xent_bwd", 2 * lg * f, g * T, active=a), 1)

    sgd_sizes: List[int] = []
    def relu_at(i):
        """Where layer i's ReLU backward runs (csrc/net.cpp): in the op next to it, else the dgrad above, else alone."""
        l = L[i]
        if not l["relu"]:
            return None
        if l["lrn"]:
            return "lrn"
        if l["pool"]:
            return "pool"
        if l["dropout"]:
            return "dropout"
        up = L[i + 1] if i + 1 < len(L) else None
        if l["conv"] and up is not None and up["conv"] and not up["cross"]:
            return "dgrad"
        return "alone"

    for i in range(len(L) - 1, -1, -1):
        l = L[i]
        name = l["name"]
        z = N * l["out_c"] * (l["out_hw"] ** 2 if l["conv"] else 1)
        ra = relu_at(i)
        if l["dropout"]:  # + the ReLU's output when it is folded in
            add(m.stream(name, "dropout backward" + (" + relu" if ra == "dropout" else ""), "dropout_bwd",
                         9 * z + (4 * z if ra == "dropout" else 0), grid_1d(z)))
        if l["pool"]:
            po = N * l["out_c"] * l["pooled_hw"] ** 2
            g, a = plane_grid(N * l["out_c"], l["out_hw"] ** 2)
            add(m.stream(name, "pool backward" + (" + relu" if ra == "pool" else ""), "pool_bwd",
                         8 * po + 4 * z + (4 * z if ra == "pool" else 0), g, active=a))
        if l["lrn"]:  # the ReLU's mask is x > 0, and x is read anyway; blocks of 32 pixels x 64 channels (+ halo)
            tiles = N * cdiv(l["out_hw"] ** 2, LRN_PIX) * cdiv(l["out_c"], LRN_CHUNK)
            add(m.stream(name, "lrn backward" + (" + relu" if ra == "lrn" else ""), "lrn_bwd", 20 * z,
                         min(tiles, MAX_BLOCKS_1D)))
        if ra == "alone":
            add(m.stream(name, "relu backward", "relu_bwd", 12 * z, grid_1d(cdiv(z, 4))))
        if l["conv"]:
            PQ, HW = l["out_hw"] ** 2, l["in_hw"] ** 2
            Kr = l["in_c"] * l["k"] ** 2
            x_b, y_b, w_b = N * l["in_c"] * HW * f, z * f, l["out_c"] * Kr * f
            # conv2d_backward_weight_bias_pair: the bias's first pass (both towers), the weight gradient, and one
            # reduce launch for both towers' weight slices and bias slices.
            bias, bsegs = conv_bias_passes(m, name, N, l["out_c"], PQ, towers=T, reduce=False)
            add(bias, 1)
            add(m.gemm(name, "grad-weight", wgrad_op(l["k"], l["out_hw"]), l["out_c"], Kr, N * PQ, 1, x_b + y_b + w_b,
                       towers=T, extra=bsegs, extra_name="bias slices", shared_b=i == 0), 1)
            if i > 0:  # + the layer below's ReLU output when its backward runs in this epilogue
                below_relu = relu_at(i - 1) == "dgrad"
                dop, Kd = dgrad_op(l["k"], l["out_c"]), l["out_c"] * l["k"] ** 2
                add(m.weight_order(name, "grad-input: weight order", dop, l["in_c"], N * HW, Kd, 1, towers=T), 1)
                add(m.gemm(name, "grad-input" + (" + relu" if below_relu else ""), dop, l["in_c"], N * HW, Kd, 1,
                           x_b + y_b + w_b + (x_b if below_relu else 0), towers=T), 1)
            nw = l["out_c"] * Kr
        else:
            x_b, y_b, w_b = N * l["in_c"] * f, z * f, l["out_c"] * l["in_c"] * f
            # ops::linear_*_pair: one launch per pass (and per split-K reduce) for both towers
            add(m.gemm(name, "grad-weight", "linear_wgrad", l["out_c"], l["in_c"], N, 1, x_b + y_b + w_b, towers=T), 1)
            add(m.stream(name, "grad-bias", "linear_bias_grad", T * z * f, T * cdiv(l["out_c"], 8), threads=1024), 1)
            add(m.gemm(name, "grad-input", "linear_dgrad", N, l["in_c"], l["out_c"], 1, x_b + y_b + w_b, towers=T), 1)
            nw = l["out_c"] * l["in_c"]
        sgd_sizes += [nw, l["out_c"]] * T
        if i > 0 and l["cross"]:
            # split_sum_channels: every tower's slice of every tower's d_in, summed, in one launch (no copies).
            prev = L[i - 1]
            inner = prev["pooled_hw"] ** 2 if prev["conv"] else 1
            part = N * prev["out_c"] * inner
            g, a = plane_grid(N, cdiv(prev["out_c"] * inner, 4))
            add(m.stream(name, "d_in: slice + sum", "split_sum", (T * T + T) * part * f, g * T, active=a), 1)
    # One sgd_update_multi over both towers' parameters (the towers share the one modelled GPU).
    add(sgd_multi_pass(m, "update", sgd_sizes), 1)
    return P


_SCHED_OPS = [  # pass name prefix -> scheduler op (csrc/net.cpp); {l} the layer, {p} the one before it
    ("gather: copy", "copy {p}->{l}"), ("gather: concat", "{l}.gather"), ("forward", "{l}.fprop"),
    ("lrn + pool forward", "{l}.lrn_pool"), ("lrn forward", "{l}.lrn"), ("pool forward", "{l}.pool"),
    ("dropout forward", "{l}.dropout"), ("dropout backward", "{l}.bprop_epilogue"),
    ("pool backward", "{l}.bprop_epilogue"), ("lrn backward", "{l}.bprop_epilogue"),
    ("relu backward", "{l}.bprop_epilogue"), ("grad-weight", "{l}.wgrad"), ("grad-bias", "{l}.wgrad"),
    ("grad-input", "{l}.dgrad"), ("sgd", "sgd"), ("d_in: slice + sum", "{l}.d_in.sum"),
    ("softmax-xent forward", "softmax_xent.fprop"), ("softmax-xent backward", "softmax_xent.bprop"),
]


def name_sched_ops(passes: List[Pass], cfg: dict) -> None:
    names = [l["name"] for l in tower_layers(cfg)]
    prev = {n: (names[i - 1] if i else "input") for i, n in enumerate(names)}
    for p in passes:
        for prefix, fmt in _SCHED_OPS:
            if p.pass_.startswith(prefix):
                p.op = fmt.format(l=p.layer, p=prev.get(p.layer, ""))
                break


def trace_comparison(results: Path, commit: str, passes: List[Pass], step_ms: float) -> List[dict]:
    """Per scheduler op of a traced step (benchmarks/trace_step.py: <gpu>_<date>_trace_summary.json with the
    commit, beside its Chrome trace): measured ms summed over both towers vs the passes predicted in it."""
    rows: List[dict] = []
    for sp in sorted(results.glob("*_trace_summary.json")) if results.is_dir() else []:
        try:
            summ = json.loads(sp.read_text())
            if str(summ.get("commit", "")).replace("-dirty", "") != commit.replace("-dirty", ""):
                continue
            if str(summ.get("device", "cpu")).lower() == "cpu" or summ.get("config") != "paper":
                continue
            trace = json.loads(sp.with_name(sp.name.replace("_trace_summary.json", "_trace.json")).read_text())
        except (OSError, ValueError):
            continue
        meas: Dict[str, float] = {}
        for e in trace.get("traceEvents", []):
            meas[e["name"]] = meas.get(e["name"], 0.0) + float(e.get("dur", 0.0)) / 1e3
        pred: Dict[str, float] = {}
        for p in passes:
            if p.in_step and p.op:
                pred[p.op] = pred.get(p.op, 0.0) + p.ms * p.count
        src = str(sp.relative_to(REPO) if sp.resolve().is_relative_to(REPO) else sp)
        for op, ms in pred.items():
            if op in meas and meas[op] > 0:
                rows.append(dict(op=op, pass_="traced op", predicted_ms=ms, measured_ms=meas[op],
                                 error=(ms - meas[op]) / meas[op], source=src))
        for key, label in (("union_busy_ms", "traced GPU busy"), ("step_wall_ms", "traced step wall")):
            if summ.get(key):
                rows.append(dict(op="step", pass_=label, predicted_ms=step_ms, measured_ms=summ[key],
                                 error=(step_ms - summ[key]) / summ[key], source=src))
    return rows


def host_passes(m: Model, cfg: dict, N: int) -> List[Pass]:
    """Work outside the GPU step today (listed, not summed): the loader's augmentation as the CUDA kernel would do it."""
    S, crop = 256, cfg["input_size"]
    g, a = plane_grid(N * 3, crop * crop)
    p = m.stream("input", "augment_batch (GPU kernel; Net.train_step_u8 runs it per device, overlapped with the upload)", "augment",
                 N * S * S * 3 + N * 3 * crop * crop * 8.0, g, active=a)
    p.in_step = False
    return [p]


# =============================================================================================================
# Measured results (benchmarks/results/*.json of a GPU run)


def git_commit(repo: Path = REPO) -> str:
    try:
        head = _run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
        dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], repo).stdout.strip()
        return head + ("-dirty" if dirty else "") if head else "unknown"
    except Exception:
        return "unknown (not a git checkout)"


def gpu_results(results: Path) -> List[dict]:
    """Benchmark documents from GPU runs (not this model's own output)."""
    docs = []
    for p in sorted(results.glob("*.json")) if results.is_dir() else []:
        if p.name.startswith("model_"):
            continue
        try:
            d = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and "rows" in d and d.get("mode") == "full":
            dev = str((d.get("device") or {}).get("name", ""))
            if "cpu" not in dev.lower():
                d["_path"] = str(p.relative_to(REPO) if p.resolve().is_relative_to(REPO) else p)
                docs.append(d)
    return docs


def measured_bandwidth(docs: List[dict], gpu: str) -> Tuple[float, str]:
    """The copy ceiling a committed H100/H200 run measured, else the named constant."""
    for d in sorted(docs, key=lambda d: d.get("created", ""), reverse=True):
        name = str(d.get("device", {}).get("name", ""))
        bw = (d.get("ceilings") or {}).get("copy_GBps")
        if bw and gpu.upper() in name.upper():
            return bw * 1e9, f"measured copy ceiling {bw:.0f} GB/s ({name}, {d['_path']})"
    return COPY_BW[gpu], (f"constant COPY_BW['{gpu}'] = {COPY_BW[gpu] / 1e12:.1f} TB/s (no committed {gpu.upper()} "
                          "run holds a measured copy ceiling)")


def bench_predictions(m: Model, cfg: dict, N: int) -> Dict[Tuple[str, str], float]:
    """Predicted ms of the benchmark cases (bench_conv/bench_gemm: the merged single-GPU shapes, groups=towers)."""
    T = cfg["towers"]
    out: Dict[Tuple[str, str], float] = {}
    L = tower_layers(cfg)
    for l in L:
        if l["conv"]:
            # conv1 (every tower reads the whole image) and conv3 (reads both towers) merge into one ungrouped
            # conv; conv2/4/5 into groups=towers, each group a tower's own shapes.
            grp = 1 if l["cross"] or l["name"] == "conv1" else T
            Cg, Kg, Kt = l["in_c"], (l["out_c"] * T if grp == 1 else l["out_c"]), l["out_c"] * T
            PQ, HW, R2 = l["out_hw"] ** 2, l["in_hw"] ** 2, l["k"] ** 2
            fop, dop = fwd_op(l["k"], Cg), dgrad_op(l["k"], Kg)
            fw = (m.weight_order(l["name"], "forward: weight order", fop, Kg, N * PQ, Cg * R2, grp) +
                  m.gemm(l["name"], "forward", fop, Kg, N * PQ, Cg * R2, grp))
            dg = (m.weight_order(l["name"], "grad-input: weight order", dop, Cg, N * HW, Kg * R2, grp) +
                  m.gemm(l["name"], "grad-input", dop, Cg, N * HW, Kg * R2, grp))
            wg = m.gemm(l["name"], "grad-weight", wgrad_op(l["k"], l["out_hw"]), Kg, Cg * R2, N * PQ, grp)
            bb = conv_bias_passes(m, l["name"], N, Kt, PQ)[0]
            for ps, pname in ((fw, "forward"), (dg, "grad-input"), (wg, "grad-weight"), (bb, "grad-bias")):
                out[(l["name"], pname)] = sum(p.ms for p in ps)
        else:
            O = l["out_c"] * T
            I = l["in_c"]
            fw = m.gemm(l["name"], "forward", "linear_fwd", N, O, I)
            dg = m.gemm(l["name"], "grad-input", "linear_dgrad", N, I, O)
            wg = m.gemm(l["name"], "grad-weight", "linear_wgrad", O, I, N)
            bb = m.stream(l["name"], "grad-bias", "linear_bias_grad", N * O * 4.0, cdiv(O, 8), threads=1024)
            for ps, pname in ((fw, "forward"), (dg, "grad-input"), (wg, "grad-weight"), ([bb], "grad-bias")):
                out[(l["name"], pname)] = sum(p.ms for p in ps)
    return out


def _dims(shape: str) -> List[int]:
    m = re.search(r"\d+(?:x\d+)+", shape)
    return [int(v) for v in m.group(0).split("x")] if m else []


def bench_memory_prediction(m: "Model", row: dict) -> Optional[float]:
    """Predicted ms of a memory-bound benchmark row (bench_elementwise, bench_lrn_pool, bench_softmax,
    bench_loader) from its byte count and the grid its launcher makes for the row's shape; None if unknown."""
    fam, op, pas, by = row.get("family"), str(row.get("op", "")), row.get("pass_"), row.get("bytes")
    d = _dims(str(row.get("shape", "")))
    if not by or not d:
        return None
    n = math.prod(d)
    if fam == "elementwise" and op.startswith("relu"):
        k = "relu_fwd" if pas == "forward" else "relu_bwd"
        return m.stream("", "", k, by, grid_1d(cdiv(n, 4))).ms
    if fam == "elementwise" and op.startswith("dropout"):
        return m.stream("", "", "dropout_fwd" if pas == "forward" else "dropout_bwd", by, grid_1d(n)).ms
    if fam == "elementwise" and op.startswith("sgd"):
        # one sgd_update_multi: each tensor's own float4 grid, about a block per 1024 parameters plus one per tensor
        tensors = int(str(row["shape"]).split()[0])
        return m.stream("", "", "sgd", by, cdiv(int(by // 20), 4 * THREADS_1D) + tensors,
                        launches=cdiv(tensors, SGD_MAX_SEGS)).ms
    if fam == "lrn_pool" and op.startswith("lrn+maxpool") and len(d) == 4:
        return m.stream("", "", "lrn_pool_fwd", by, min(d[0] * d[1], MAX_BLOCKS_1D),
                        active=min(THREADS_1D, d[2] * d[3])).ms
    if fam == "lrn_pool" and op.startswith("lrn") and len(d) == 4:
        if pas == "forward":
            g, a = plane_grid(d[0] * d[1], d[2] * d[3])
            return m.stream("", "", "lrn_fwd", by, g, active=a).ms
        return m.stream("", "", "lrn_bwd", by, min(d[0] * cdiv(d[2] * d[3], LRN_PIX) * cdiv(d[1], LRN_CHUNK),
                                                   MAX_BLOCKS_1D)).ms
    mp = re.match(r"maxpool (\d+)/(\d+)", op)
    if fam == "lrn_pool" and mp and len(d) == 4:
        w, st = int(mp.group(1)), int(mp.group(2))
        if pas == "forward":  # shape: the input; a thread per output
            g, a = grid_1d(d[0] * d[1] * ((d[2] - w) // st + 1) ** 2), THREADS_1D
        else:                 # shape: the output; the grid covers the input
            g, a = plane_grid(d[0] * d[1], ((d[2] - 1) * st + w) ** 2)
        return m.stream("", "", "pool_fwd" if pas == "forward" else "pool_bwd", by, g, active=a).ms
    if fam == "softmax" and len(d) == 2:
        if pas == "forward":
            return softmax_fwd_pass(m, "", "", d[0], d[1], by).ms
        g, a = plane_grid(d[0], d[1])
        return m.stream("", "", "softmax_xent_bwd", by, g, active=a).ms
    if fam == "loader" and op == "augment_batch":
        out = _dims(str(row["shape"]).split("->")[-1])
        if len(out) == 4:
            g, a = plane_grid(out[0] * out[1], out[2] * out[3])
            return m.stream("", "", "augment", by, g, active=a).ms
    return None


def comparison(docs: List[dict], commit: str, bench: Dict[Tuple[str, str], float], step_ms: float,
               m: Optional["Model"] = None) -> List[dict]:
    rows = []
    for d in docs:
        if str(d.get("commit", "")).replace("-dirty", "") != commit.replace("-dirty", ""):
            continue
        for r in d["rows"]:
            if r.get("our_ms") is None:
                continue
            if r.get("family") in ("conv", "gemm"):
                pred = bench.get((r["op"], r["pass_"]))
            elif r.get("family") == "train_step" and r.get("pass_") == "vs PyTorch eager":
                pred = step_ms
            else:
                pred = bench_memory_prediction(m, r) if m is not None else None
            if pred is not None:
                rows.append(dict(op=r["op"], pass_=r["pass_"], predicted_ms=pred, measured_ms=r["our_ms"],
                                 error=(pred - r["our_ms"]) / r["our_ms"], source=d["_path"]))
    return rows


# =============================================================================================================
# Report


def _f(v, spec, none="-"):
    return none if v is None else format(v, spec)


def render(passes: List[Pass], host: List[Pass], kernels_used: List[Tuple[str, KernelInfo]], meta: dict,
           cmp_rows: List[dict]) -> str:
    lines = [f"Performance model of one training step: {meta['config']} net, batch {meta['batch']}, FP32, "
             f"{meta['gpu_label']}", f"commit read: {meta['commit']}",
             f"peak FP32 {PEAK_FP32 / 1e12:.1f} TFLOP/s on {SMS} SMs; bandwidth: {meta['bw_label']}; "
             f"launch gap {LAUNCH_GAP_US} us per kernel"]
    lines += [f"note: {n}" for n in meta["notes"]]
    lines.append("")
    lines.append("Kernels (ptxas: registers, spill stores/loads in bytes, stack, static smem; SASS main loop: FFMA share of "
                 "its instructions as written, and of those a warp issues on average, the gather-table branch of "
                 "threads 0..15 issued by one warp)")
    hdr = f"{'kernel':<22} {'tile':>7} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} {'blk/SM':>6} " \
          f"{'loop FFMA':>9} {'loop instr':>10} {'FFMA share':>10} {'issued':>7} {'LDL/STL':>7}"
    lines += [hdr, "-" * len(hdr)]
    for label, k in kernels_used:
        name, _, tile = label.partition("@")
        thr = gemm_threads(*(int(v) for v in tile.split("x"))) if tile else GEMM_THREADS
        lines.append(f"{name:<22} {tile:>7} {k.regs:>4} {f'{k.spill_stores}/{k.spill_loads}':>11} {k.stack:>5} "
                     f"{k.smem:>6} {blocks_per_sm(thr, k.regs, k.smem):>6} {_f(k.loop_ffma, 'd'):>9} "
                     f"{_f(k.loop_instr, 'd'):>10} {_f(k.ffma_share, '.1%'):>10} "
                     f"{_f(k.issued_share(thr), '.1%'):>7} {_f(k.loop_local, 'd'):>7}")
    lines.append("")
    lines.append("Passes (one launch: one tower's, or both towers' where the tile says pair; x = times per step; ms = all of them)")
    hdr = f"{'layer':<6} {'pass':<34} {'kernel':<17} {'tile':<15} {'grid':>6} {'b/SM':>4} {'waves':>6} " \
          f"{'FFMA':>6} {'fill':>5} {'wave':>5} {'spills':<16} {'bound':<18} {'x':>2} {'ms':>8}"
    lines += [hdr, "-" * len(hdr)]
    for p in passes:
        grid, bps, waves = (f"{p.grid}", f"{p.bps}", f"{p.waves:.2f}") if p.grid else ("-", "-", "-")
        lines.append(f"{p.layer:<6} {p.pass_[:34]:<34} {p.kernel:<17} {p.tile:<15} {grid:>6} {bps:>4} "
                     f"{waves:>6} {_f(p.ffma_share, '.0%'):>6} {_f(p.fill, '.0%'):>5} "
                     f"{_f(p.wave_eff, '.0%'):>5} {p.spills:<16} {p.bound[:18]:<18} {p.count:>2} "
                     f"{p.ms * p.count:>8.3f}")
    lines.append("")
    lines.append("Per layer (ms per step, both towers)")
    order, tot = [], {}
    for p in passes:
        if p.layer not in tot:
            order.append(p.layer)
            tot[p.layer] = {"gemm": 0.0, "other": 0.0}
        tot[p.layer]["gemm" if p.flops else "other"] += p.ms * p.count
    lines.append(f"{'layer':<6} {'GEMM':>8} {'other':>8} {'total':>8}")
    for n in order:
        t = tot[n]
        lines.append(f"{n:<6} {t['gemm']:>8.3f} {t['other']:>8.3f} {t['gemm'] + t['other']:>8.3f}")
    g = sum(t["gemm"] for t in tot.values())
    o = sum(t["other"] for t in tot.values())
    lines.append(f"{'all':<6} {g:>8.3f} {o:>8.3f} {g + o:>8.3f}")
    flops = sum(p.flops * p.count for p in passes)
    lines.append(f"GEMM FLOPs per step {flops / 1e12:.3f} TFLOP: floor at peak {flops / PEAK_FP32 * 1e3:.2f} ms; "
                 f"GEMM passes predicted at {flops / (g * 1e-3) / 1e12:.1f} TFLOP/s "
                 f"({flops / (g * 1e-3) / PEAK_FP32:.0%} of peak)")
    lines.append(f"kernel launches per step: {sum(p.launches * p.count for p in passes)}")
    lines.append("")
    lines.append("Outside the GPU step (not summed)")
    for p in host:
        lines.append(f"{p.layer:<6} {p.pass_:<60} {p.ms:>8.3f} ms")
    lines.append("")
    if cmp_rows:
        lines.append("Measured (GPU run of the same commit) vs predicted")
        lines.append(f"{'op':<34} {'pass':<18} {'predicted ms':>12} {'measured ms':>12} {'error':>8}")
        for r in cmp_rows:
            lines.append(f"{r['op'][:34]:<34} {r['pass_']:<18} {r['predicted_ms']:>12.3f} {r['measured_ms']:>12.3f} "
                         f"{r['error']:>+8.0%}")
        lines.append("error = (predicted - measured) / measured. Benchmark rows: conv/fc at the benchmarks' merged "
                     "shapes (groups = towers), not the per-tower passes above; train_step is timed by the host clock, "
                     "so it includes the host path the model leaves out. Traced ops: a step of trace_step.py, both "
                     "towers summed.")
    else:
        lines.append("Measured: no GPU run of this commit under benchmarks/results/ (nothing to compare)")
    lines.append("")
    lines.append(f"predicted step: {meta['step_ms']:.2f} ms (FP32, batch 128, H100/H200)")
    return "\n".join(lines) + "\n"


def run_model(args) -> Tuple[str, dict]:
    sys.path.insert(0, str(REPO))
    try:
        from alexnet_cuda.config import alexnet_config  # noqa: E402  (pure Python, no extension needed)
        cfg = alexnet_config()
    except Exception:  # the package's __init__ may need the built extension; the paper's table is fixed anyway
        cfg = dict(input_size=224, in_channels=3, num_classes=1000, towers=2,
                   conv1=dict(kernel=11, stride=4, padding=2), channels=(96, 256, 384, 384, 256), fc=(4096, 4096),
                   lrn=True, overlap_pool=True, dropout=0.5, drop_layers=())
    kernels, notes = compile_kernels(REPO, log=lambda s: print(s, file=sys.stderr), sass=not args.no_sass)
    sass = any(k.loop_ffma is not None for k in kernels.values())
    docs = gpu_results(Path(args.results))
    bw, bw_label = measured_bandwidth(docs, args.gpu)
    m = Model(kernels, bw, sass)
    N = args.batch
    passes = step_passes(m, cfg, N)
    host = host_passes(m, cfg, N)
    name_sched_ops(passes, cfg)
    step_ms = sum(p.ms * p.count for p in passes if p.in_step)
    commit = git_commit()
    bench = bench_predictions(m, cfg, N)
    cmp_rows = comparison(docs, commit, bench, step_ms, m) + trace_comparison(Path(args.results), commit, passes,
                                                                             step_ms)
    used = []
    for op in GEMM_OPS:
        for pair in (False, True):
            for bm, bn in GEMM_TILES[op]:
                used.append((f"{op}{' pair' if pair else ''}@{bm}x{bn}", gemm_kernel(kernels, op, bm, bn, pair)))
        if op in STACK_OPS:
            used.append((f"{op} stack@{STACK_TILE[0]}x{STACK_TILE[1]}", gemm_kernel(kernels, op, *STACK_TILE,
                                                                                   stacked=True)))
    meta = dict(config="paper", batch=N, gpu_label={"h200": "H200 (H100 SXM compute)", "h100": "H100 SXM"}[args.gpu],
                commit=commit, bw_label=bw_label, notes=notes, step_ms=step_ms)
    text = render(passes, host, used, meta, cmp_rows)
    doc = dict(schema=1, script="model", created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               commit=commit, gpu=args.gpu, batch=N, config="paper", sass=sass,
               constants=dict(sms=SMS, peak_fp32=PEAK_FP32, bandwidth=bw, bandwidth_label=bw_label,
                              launch_gap_us=LAUNCH_GAP_US, warps_hide=WARPS_HIDE, half_threads=HALF_THREADS),
               notes=notes, kernels={lbl: dataclasses.asdict(k) | {"ffma_share": k.ffma_share, "issued_share":
                                                                   k.issued_share(gemm_threads(*(int(v) for v in lbl.partition("@")[2].split("x"))))}
                                     for lbl, k in used},
               passes=[dataclasses.asdict(p) for p in passes], outside_step=[dataclasses.asdict(p) for p in host],
               bench_cases_ms={f"{op} {pass_}": ms for (op, pass_), ms in bench.items()},
               comparison=cmp_rows, predicted_step_ms=step_ms)
    return text, doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", choices=sorted(COPY_BW), default="h200", help="whose copy bandwidth (default h200)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-write", action="store_true", help="print only; write nothing under benchmarks/results/")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where to write the results")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"),
                    help="where to look for GPU runs (measured copy ceiling, per-pass times to compare)")
    ap.add_argument("--no-sass", action="store_true", help="ptxas only, as when cuobjdump is absent")
    args = ap.parse_args(argv)
    if args.batch < 1:
        print("model: --batch must be >= 1", file=sys.stderr)
        return 2
    try:
        text, doc = run_model(args)
    except (ModelError, OSError, subprocess.SubprocessError) as e:
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, file=sys.stderr)
        return 1
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"model_{doc['created'][:10]}_{doc['commit'][:7]}{'-dirty' if doc['commit'].endswith('-dirty') else ''}"
        (out / f"{stem}.txt").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / stem}.txt and .json", file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
