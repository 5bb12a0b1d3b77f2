"""Packaging: the sdist carries what the build needs, a stale CMake cache from an earlier isolated build does not
break the next build, the CUDA architecture list covers the GPUs it claims to, one version everywhere, and the
entry points answer. (.ci/run also builds a wheel from the sdist and installs twice in one checkout.)"""
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import alexnet_cuda as ax

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    spec = importlib.util.spec_from_file_location("alexnet_cuda_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() itself runs only as __main__
    return mod


# (architecture list, compute capability, has code for it), by CUDA's compatibility rules: SASS runs on its major
# version at an equal or higher minor, PTX on any equal or newer GPU, arch-specific (90a) code on that chip only.
ARCH_CASES = [
    ("90", 90, True), ("90", 100, True), ("90", 86, False),
    ("90-real", 90, True), ("90-real", 100, False), ("80-real", 86, True), ("86-real", 80, False),
    ("90a-real", 90, True), ("90a", 100, False), ("75-virtual", 120, True), ("75-virtual", 70, False),
    ("75,80-real,90-real", 121, True), ("80-real;90-real", 75, False), ("80-real;90-real", 89, True),
    ("native", 61, True), ("", 90, False),
]


@pytest.mark.parametrize("archs,cc,expect", ARCH_CASES)
def test_architecture_list_coverage_follows_cudas_rules(archs, cc, expect):
    assert ax._C._arch_list_covers(archs, cc) is expect


def test_default_build_runs_on_every_gpu_from_turing_on():
    built = ax._C._cuda_archs_built()
    if not built:
        pytest.skip("built without CUDA")
    if os.environ.get("ALEXNET_CUDA_ARCHS") or os.environ.get("CUDAARCHS"):
        pytest.skip("an architecture list was chosen for this build")
    # T4, A100, Orin, A10/RTX 30, L4/RTX 40, H100/H200, B200, GB300, Thor, RTX 50, DGX Spark
    for cc in (75, 80, 87, 86, 89, 90, 100, 103, 110, 120, 121):
        assert ax._C._arch_list_covers(built, cc), f"default build {built} has no code for sm_{cc}"
    assert not ax._C._arch_list_covers(built, 61)  # Pascal: CUDA 13 cannot target it
    sass = [a for a in built.split(",") if not a.endswith("-virtual")]
    for cc in (80, 86, 89, 90, 100, 120):  # the common ones run machine code, not JIT-compiled PTX
        assert any(a.split("-")[0] == str(cc) for a in sass), f"no SASS for sm_{cc} in {built}"


def test_stale_cmake_cache_is_dropped_and_a_live_one_kept(tmp_path):
    setup = _setup_module()
    stale, live = tmp_path / "stale", tmp_path / "live"
    for d, tool in ((stale, "/nonexistent/pip-build-env-0/bin/ninja"), (live, sys.executable)):
        (d / "CMakeFiles").mkdir(parents=True)
        (d / "CMakeCache.txt").write_text(f"CMAKE_MAKE_PROGRAM:FILEPATH={tool}\nCMAKE_COMMAND:INTERNAL={sys.executable}\n")
        setup.drop_stale_cmake_cache(d)
    assert not (stale / "CMakeCache.txt").exists() and not (stale / "CMakeFiles").exists()
    assert (live / "CMakeCache.txt").exists() and (live / "CMakeFiles").exists()


def test_sdist_holds_everything_the_build_needs(tmp_path):
    pytest.importorskip("setuptools")
    p = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (sdist,) = tmp_path.glob("alexnet_cuda-*.tar.gz")
    assert sdist.name == f"alexnet_cuda-{ax.__version__}.tar.gz"
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files", "CMakeLists.txt", "csrc", "cuda", "docs", "LICENSE", "pyproject.toml"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout: cannot list the tracked sources")
    missing = sorted(set(tracked) - names)
    assert not missing, f"sdist lacks {missing}"
    assert not any(n.endswith(".so") or n.startswith("build/") for n in names)


def test_one_version_and_the_entry_points():
    from alexnet_cuda import __main__ as entry
    assert ax.__version__ == _setup_module().VERSION
    p = subprocess.run([sys.executable, "-m", "alexnet_cuda", "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"alexnet_cuda {ax.__version__}"
    p = subprocess.run([sys.executable, "-m", "alexnet_cuda", "nonsense"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown command 'nonsense'" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "alexnet_cuda", "evaluate", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "checkpoint" in p.stdout.lower()
    assert set(entry.COMMANDS) == {"train", "prepare", "evaluate", "predict"}
