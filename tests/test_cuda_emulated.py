"""The CUDA kernels of cuda/*.cu, run on a CPU fiber emulator: their logic is checked on every CI run.

This is EMULATION, not a GPU test (tests/cuda_emu/README.md). g++ compiles the kernels with their
`<<<>>>` launches rewritten into calls of a scheduler that runs each block's threads as fibers, with
__syncthreads and warp shuffles as real barriers. It proves indexing, bounds (AddressSanitizer build),
barrier placement, the no-atomics determinism and the bit-exact contracts against the CPU backend; it
proves nothing about real-GPU behaviour, the memory model, nvcc's code generation or speed.

Runs (all in parallel, after building both variants into build/cuda_emu/, cached by a hash of the sources):
  plain build, forward thread order     every group                      (test_emulated_group)
  plain build, reverse and shuffled     every group but gridstride       (test_result_independent_of_thread_order)
  ASan+UBSan build, forward             every group but gridstride       (test_emulated_group_sanitized)
The `net` group runs the real scheduler (CudaExecutor: streams, events) and Net on the emulated devices
(one, and two without peer access) against the CPU workers, with the runtime's happens-before race check
on (test_scheduler_cuda_path); a mutated csrc/tensor.cpp shows that check catches an unordered host-staged
cross-device copy (test_two_device_race_check_catches_unordered_staged_copy). The `graph` group runs the
emulated stream capture (CUDA graphs: illegal calls during a capture, a race inside a replay) and Net's graph
path against its eager steps, bit for bit, on one device with two streams and with one shared stream.
Each run must exit 0, report exactly the expected number of checks and none failing; together the plain runs
must reach every `<<<>>>` launch statement in cuda/ (test_every_launch_site_is_exercised). The rewriter is
unit-tested too, including that it refuses what it cannot handle. The input seed is fresh per session
(ALEXNET_EMU_SEED=<n> repeats one); ALEXNET_EMU_SANITIZE=0 leaves the sanitizer runs out. Only a missing
g++ or ucontext.h skips this module.
"""
import concurrent.futures
import importlib.util
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cuda_emu_build", ROOT / "tests" / "cuda_emu" / "build.py")
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

# Checks each group of tests/cuda_emu/driver.cpp runs: a run that reports any other number fails, so the
# test cannot pass by running nothing. Update together with the driver.
EXPECTED_CHECKS = {
    "zero": 6,
    "elementwise": 175,
    "plumbing": 42,
    "lrn": 50,
    "pool": 41,
    "softmax": 86,
    "augment": 6,
    "conv": 124,
    "conv_alexnet": 45,
    "conv_bigtile": 33,
    "conv_pair": 257,
    "linear": 122,
    "linear_bigtile": 12,
    "gridstride": 15,
    "net": 114,
    "graph": 18,
}
GROUPS = list(EXPECTED_CHECKS)
# gridstride launches ~140 M emulated threads over 16 M-element buffers: plain build, one order only.
ORDER_GROUPS = [g for g in GROUPS if g != "gridstride"]
SANITIZE_GROUPS = [g for g in GROUPS if g != "gridstride"]
ORDERS = ["reverse", "shuffle"]

SEED = int(os.environ.get("ALEXNET_EMU_SEED") or random.SystemRandom().randrange(1, 2**31))
SANITIZE = os.environ.get("ALEXNET_EMU_SANITIZE", "1") != "0"
RUN_TIMEOUT_S = 600

CHECK_RE = re.compile(r"^(ok  |FAIL) \[crc ([0-9a-f]{16})\] (.+?): (.*)$")
SUMMARY_RE = re.compile(r"^SUMMARY group=(\w+) checks=(\d+) failures=(\d+) launches=(\d+)")
SITE_RE = re.compile(r"^LAUNCH_SITE (.+:\d+ .+) launches=\d+$")


def toolchain_problem():
    cxx = emu_build.compiler()
    if shutil.which(cxx) is None:
        return f"{cxx} (g++) not found: the CPU emulation of the CUDA kernels needs a C++ compiler"
    probe = "#include <ucontext.h>\n#include <sys/mman.h>\nint main() { ucontext_t c; return getcontext(&c); }\n"
    r = subprocess.run([cxx, "-x", "c++", "-fsyntax-only", "-"], input=probe, capture_output=True, text=True)
    if r.returncode != 0:
        return f"ucontext.h / sys/mman.h unavailable to {cxx}: {r.stderr.strip()[:300]}"
    return None


class Run:
    def __init__(self, variant, order, group, cmd):
        self.variant, self.order, self.group, self.cmd = variant, order, group, cmd
        self.rc, self.stdout, self.stderr, self.seconds, self.error = None, "", "", 0.0, None

    def describe(self):
        return f"{self.variant} build, {self.order} order, group {self.group} (reproduce: {' '.join(self.cmd)})"


def execute(run):
    t0 = time.monotonic()
    try:
        # Host tensors of the sanitizer builds get their own exact allocations too (no CPU block cache), so
        # AddressSanitizer sees a host buffer read after free or past its end as it did before the cache.
        env = dict(os.environ, ALEXNET_NO_CPU_MEMORY_CACHING="1") if run.variant == "sanitize" else None
        p = subprocess.run(run.cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
        run.rc, run.stdout, run.stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        run.error = f"timed out after {RUN_TIMEOUT_S} s (a kernel loops forever?)"
        run.stdout = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    run.seconds = time.monotonic() - t0
    return run


@pytest.fixture(scope="module")
def emu_runs(tmp_path_factory):
    problem = toolchain_problem()
    if problem:
        pytest.skip(problem)
    out_root = ROOT / "build" / "cuda_emu"
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError:
        out_root = tmp_path_factory.mktemp("cuda_emu")
    cores = os.cpu_count() or 2
    variants = ["plain"] + (["sanitize"] if SANITIZE else [])
    built = emu_build.build_all(variants, out_root=out_root, jobs=cores)
    exes = {v: r for v, r in built.items() if not isinstance(r, Exception)}
    build_errors = {v: str(r) for v, r in built.items() if isinstance(r, Exception)}

    plan = [("plain", "forward", g) for g in GROUPS]
    plan += [("plain", o, g) for o in ORDERS for g in ORDER_GROUPS]
    if SANITIZE:
        plan += [("sanitize", "forward", g) for g in SANITIZE_GROUPS]
    runs = {}
    for variant, order, group in plan:
        exe = exes.get(variant)
        cmd = [str(exe), "--order", order, "--seed", str(SEED), group] if exe else []
        runs[(variant, order, group)] = Run(variant, order, group, cmd)
    # Longest first (sanitizer runs, the AlexNet and grid-stride groups) so the workers finish together.
    heavy = ("conv_alexnet", "gridstride", "linear", "linear_bigtile", "conv_bigtile")
    todo = sorted((r for r in runs.values() if r.cmd),
                  key=lambda r: (r.variant != "sanitize", r.group not in heavy))
    with concurrent.futures.ThreadPoolExecutor(max(1, min(cores, 4))) as pool:
        list(pool.map(execute, todo))
    return runs, build_errors, exes


def parse(run):
    checks, summaries = [], []
    for line in run.stdout.splitlines():
        m = CHECK_RE.match(line)
        if m:
            checks.append((m.group(1).strip(), m.group(2), m.group(3), m.group(4)))
        m = SUMMARY_RE.match(line)
        if m:
            summaries.append((m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))))
    return checks, summaries


def check_run(emu_runs, variant, order, group):
    """Asserts that one driver run passed in full; returns its checks [(status, crc, name, detail)]."""
    runs, build_errors, _ = emu_runs
    if variant in build_errors:
        pytest.fail(f"building the emulated CUDA backend ({variant}) failed:\n{build_errors[variant]}")
    run = runs[(variant, order, group)]
    what = run.describe()
    tail = "\n".join(run.stderr.splitlines()[-40:])
    assert run.error is None, f"{what}: {run.error}\n{run.stdout[-3000:]}"
    checks, summaries = parse(run)
    failed = [f"{name}: {detail}" for status, _, name, detail in checks if status != "ok"]
    assert run.rc == 0, (f"{what}: exit status {run.rc}\nfailed checks:\n" + "\n".join(failed[:30]) +
                         f"\nstderr:\n{tail}")
    assert not failed, f"{what}: failed checks:\n" + "\n".join(failed[:30])
    assert "runtime error:" not in run.stderr and "Sanitizer" not in run.stderr, f"{what}: sanitizer report:\n{tail}"
    assert len(summaries) == 1 and summaries[0][0] == group, f"{what}: no summary line for the group"
    _, n_checks, n_failures, launches = summaries[0]
    assert n_failures == 0
    assert n_checks == len(checks) == EXPECTED_CHECKS[group], (
        f"{what}: ran {len(checks)} checks (summary says {n_checks}), expected {EXPECTED_CHECKS[group]}")
    assert launches > 0, f"{what}: no kernel was launched on the emulated device"
    return checks


@pytest.mark.parametrize("group", GROUPS)
def test_emulated_group(emu_runs, group):
    check_run(emu_runs, "plain", "forward", group)


def test_every_launch_site_is_exercised(emu_runs):
    # Every `<<<>>>` in cuda/ (the list build.py wrote while rewriting them) ran at least once in the plain
    # runs: a new kernel or a new launch path needs a driver check that reaches it.
    runs, build_errors, exes = emu_runs
    if "plain" in build_errors:
        pytest.fail(build_errors["plain"])
    expected = set((exes["plain"].parent / "gen" / "launch_sites.txt").read_text().splitlines())
    assert expected, "no launch sites recorded"
    ran = set()
    for group in GROUPS:
        ran |= {m.group(1) for m in map(SITE_RE.match, runs[("plain", "forward", group)].stdout.splitlines()) if m}
    missing = sorted(expected - ran)
    assert not missing, "launch sites no emulated check reaches:\n" + "\n".join(missing)


def test_scheduler_cuda_path(emu_runs):
    # The net group runs csrc/scheduler.cpp's CudaExecutor and csrc/net.cpp on emulated streams. Beyond
    # passing in full, it must have exercised what it is there for: the race check proved it can fail, the
    # two-stream run waited on events between the towers and showed no unordered cross-stream access, and
    # so did the run with a tower on each of two devices without peer access.
    checks = check_run(emu_runs, "plain", "forward", "net")
    names = {name for _, _, name, _ in checks}
    for needed in ("race check, stream b reads stream a's output with no event",
                   "net cuda:0 two streams no unordered cross-stream access",
                   "net two-stream run synchronizes the towers with events",
                   "net two streams == shared stream, losses and every parameter and momentum",
                   "net cross-tower bytes on exactly the paper's edges",
                   "race check, a legacy default stream is ordered after the blocking streams of its own device only",
                   "net cuda:0,cuda:1 == cuda:0 two streams, losses and every parameter and momentum",
                   "net cuda:0,cuda:1 no unordered cross-stream access",
                   "net two-device run has a stream per device, cross-device event waits, no peer access and no event leak"):
        assert needed in names, f"net group no longer checks {needed!r}"


STAGED_WAIT = 'cuda_check(cudaStreamWaitEvent(ss, ready, 0), "copy");'


def test_two_device_race_check_catches_unordered_staged_copy(emu_runs, tmp_path):
    # Mutation check: without the event wait in Tensor::copy_from's host-staged branch (the code before the
    # fix), the device-to-host leg runs on the source device's legacy stream unordered after the producing
    # tower's non-blocking stream. The serialized run still computes the right numbers, so exactly the
    # two-device runs' race checks (float32 and uint8 input) may fail. Only tensor.cpp is recompiled (a few seconds).
    runs, build_errors, exes = emu_runs
    if "plain" in build_errors:
        pytest.fail(build_errors["plain"])
    src = (ROOT / "csrc" / "tensor.cpp").read_text()
    assert src.count(STAGED_WAIT) == 1, f"csrc/tensor.cpp no longer holds {STAGED_WAIT!r}: update this mutation"
    mutated = tmp_path / "tensor.cpp"
    mutated.write_text(src.replace(STAGED_WAIT, "/* mutation: no wait for the producer */"))
    try:
        exe = emu_build.relink_tensor(exes["plain"], mutated, tmp_path / "build")
    except emu_build.BuildError as e:
        pytest.fail(f"building the mutated driver failed: {e}")
    cmd = [str(exe), "--seed", str(SEED), "net"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    run = Run("plain (tensor.cpp mutated)", "forward", "net", cmd)
    run.stdout = p.stdout
    checks, _ = parse(run)
    failed = [(name, detail) for status, _, name, detail in checks if status != "ok"]
    assert p.returncode == 1 and len(checks) == EXPECTED_CHECKS["net"], (
        f"mutated run: exit {p.returncode}, {len(checks)} checks\n{p.stderr[-2000:]}")
    assert [name for name, _ in failed] == [
        "net cuda:0,cuda:1 no unordered cross-stream access",
        "net uint8 path cuda:0,cuda:1 no unordered cross-stream access",
        # the zero-copy path's check on two devices (bits and race reports together)
        "net staged path cuda:0,cuda:1, prefetching == train_step_u8, losses and every parameter and momentum"], (
        f"without the staged copy's event wait, expected only the two-device race checks to fail, got {failed}")
    detail = failed[0][1]
    m = re.match(r"(\d+) race reports, first: read-after-write race .* cudaMemcpyAsync on the legacy default "
                 r"stream of cuda:\d", detail)
    assert m and int(m.group(1)) > 0, f"unexpected race report: {detail}"


def test_uncached_allocations_for_memcheck(emu_runs):
    """ALEXNET_NO_CUDA_MEMORY_CACHING=1 (what the GPU check's memcheck step sets) gives every tensor its own
    cudaMalloc and cudaFree: the net must still compute the same bits, race-free, and the only checks that notice
    are the ones that count cudaMalloc calls in steady state; the op groups pass as they are (ASan build, where a
    freed block read later is an error)."""
    runs, build_errors, exes = emu_runs
    for variant, groups in (("plain", ["net"]), ("sanitize" if SANITIZE else "plain", ["conv", "linear", "pool"])):
        if variant in build_errors:
            pytest.fail(build_errors[variant])
        cmd = [str(exes[variant]), "--seed", str(SEED), *groups]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                           env=dict(os.environ, ALEXNET_NO_CUDA_MEMORY_CACHING="1"))
        run = Run(f"{variant} (caching off)", "forward", "+".join(groups), cmd)
        run.stdout = p.stdout
        checks, _ = parse(run)
        assert len(checks) == sum(EXPECTED_CHECKS[g] for g in groups), f"{run.describe()}\n{p.stderr[-2000:]}"
        failed = sorted(name for status, _, name, _ in checks if status != "ok")
        if groups == ["net"]:
            assert p.returncode == 1 and failed and all(
                n.endswith("steady-state steps allocate no device memory") or
                n.endswith("steady-state steps make no allocation, no pageable copy and one wait (the loss)")
                for n in failed), f"with caching off only the malloc-count checks may fail: {failed}"
        else:
            assert p.returncode == 0 and not failed, f"{run.describe()}: {failed}\n{p.stderr[-2000:]}"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("group", ORDER_GROUPS)
def test_result_independent_of_thread_order(emu_runs, group, order):
    # Threads between two barriers, and blocks, run in reverse / shuffled order: a missing barrier or a
    # race between blocks shows up as a failed check or as an output that differs bit for bit.
    checks = check_run(emu_runs, "plain", order, group)
    forward = check_run(emu_runs, "plain", "forward", group)
    differ = [f"{a[2]}: {a[1]} ({order}) != {b[1]} (forward)" for a, b in zip(checks, forward) if a[:3] != b[:3]]
    assert not differ, f"outputs depend on the thread/block order (group {group}, seed {SEED}):\n" + "\n".join(differ)


@pytest.mark.parametrize("group", SANITIZE_GROUPS)
def test_emulated_group_sanitized(emu_runs, group):
    if not SANITIZE:
        pytest.skip("sanitizer runs disabled by ALEXNET_EMU_SANITIZE=0")
    check_run(emu_runs, "sanitize", "forward", group)


# ---- the source rewriting itself (no compiler needed) ------------------------------------------------------

def test_rewriter_rewrites_launches_and_shared_arrays():
    src = (
        "// a comment with k<<<1, 2>>>(x) stays as it is\n"
        "template <int A, class B> __global__ void k2(int n) {\n"
        "    __shared__ __align__(16) float tile[2][8][68];\n"
        "    __shared__ int count;\n"
        "}\n"
        "void launch(int n, cudaStream_t s) {\n"
        "    k2<3, float><<<dim3(4, 5),\n"
        "                   256, 0, s>>>(n);\n"
        "    ns::plain<<<grid_1d(n), kThreads1d>>>(n, \"<<<not a launch>>>\");\n"
        "}\n"
    )
    out, sites, shared = emu_build.rewrite_cuda_source(src, "sample.cu")
    assert sites == [(8, "k2<3, float>"), (9, "ns::plain")] and shared == 2
    assert out.count("\n") == src.count("\n")
    assert '::emu::Cfg(dim3(4, 5),\n                   256, 0, s).at("k2<3, float>", __FILE__, __LINE__)' in out
    assert ".run([](auto... emu_a) { k2<3, float>(emu_a...); }, n);" in out
    assert '::emu::Cfg(grid_1d(n), kThreads1d).at("ns::plain", __FILE__, __LINE__)' in out
    assert '"<<<not a launch>>>"' in out and "// a comment with k<<<1, 2>>>(x)" in out
    assert "::emu::shared_block_init(&tile, sizeof(tile), emu_seen_tile);" in out
    assert "::emu::shared_block_init(&count, sizeof(count), emu_seen_count);" in out


@pytest.mark.parametrize("src, message", [
    ("void f() { k<A<int>><<<1, 32>>>(x); }", "does not understand"),
    ("__global__ void k() { extern __shared__ float dyn[]; }", "dynamic"),
    ("__global__ void k() { __shared__ float a[4], b[4]; }", "several names"),
])
def test_rewriter_fails_loudly(src, message):
    with pytest.raises(emu_build.BuildError, match=message):
        emu_build.rewrite_cuda_source(src, "bad.cu")


def test_allocator_patch_fails_loudly():
    text = (ROOT / "csrc" / "tensor.cpp").read_text()
    patched = emu_build.patch_tensor_source(text)
    assert "return bytes == 0 ? 1 : bytes;" in patched and patched.count("\n") == text.count("\n")
    with pytest.raises(emu_build.BuildError, match="round_block"):
        emu_build.patch_tensor_source(text.replace(emu_build.EXACT_ALLOC_ANCHOR, "size_t round_up(size_t b) {"))
