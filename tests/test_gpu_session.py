"""benchmarks/gpu_session.sh's verdicts, checked without a GPU: a stand-in interpreter and compute-sanitizer play
the GPU machine's answers (tests pass, tests skip, the sanitizer refuses the device or reports errors, a step
hangs), and the script must say PASS only when every cuda-marked test ran and memcheck saw no error."""
import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

# Plays python3 on the GPU machine: pip and the probes succeed; pytest prints $FAKE_PYTEST_LINE (after sleeping
# $FAKE_PYTEST_SLEEP); the benchmark scripts print a "wrote" line. Every call is logged with the environment the
# GPU check must set.
FAKE_PY = r"""#!/usr/bin/env bash
echo "caching=${ALEXNET_NO_CUDA_MEMORY_CACHING:-} require=${ALEXNET_REQUIRE_CUDA:-} args=$*" >>"$FAKE_LOG"
case "$*" in
  *"-m pip"*) echo "Successfully installed alexnet-cuda"; exit 0 ;;
  *"-m pytest"*) sleep "${FAKE_PYTEST_SLEEP:-0}"; echo "$FAKE_PYTEST_LINE"; exit "${FAKE_PYTEST_RC:-0}" ;;
  *run_all.py*|*trace_step.py*|*bench_train_step.py*) echo "wrote $3/fake.json"; exit 0 ;;
  *"-c"*) echo "cuda_available: True NVIDIA H200"; exit 0 ;;
esac
exit 3
"""

FAKE_SANITIZER = r"""#!/usr/bin/env bash
if [ -n "${FAKE_SAN_REFUSE:-}" ]; then
  echo "========= Error: Device not supported. Please refer to the Supported Devices section"
  echo "RuntimeError: alloc: CUDA error: unknown error (error 999)"; exit 1
fi
while [[ "${1:-}" == --* ]]; do case $1 in --tool|--error-exitcode|--print-limit) shift 2 ;; *) shift ;; esac; done
errors=0; case "$*" in *"-m pytest"*) errors=${FAKE_SAN_ERRORS:-0} ;; esac  # the probe stays clean
"$@"; rc=$?
echo "========= ERROR SUMMARY: $errors errors"
[ "$errors" = 0 ] || exit 99
exit $rc
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def gpu_machine(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = _exe(bin_dir / "fakepython3", FAKE_PY)
    _exe(bin_dir / "compute-sanitizer", FAKE_SANITIZER)

    def run(stage, **env):
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        full = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(py), OUT=str(out),
                    FAKE_LOG=str(out / "calls.log"), FAKE_PYTEST_LINE="89 passed in 12.34s")
        full.update({k: str(v) for k, v in env.items()})
        out.mkdir()
        p = subprocess.run(["bash", str(SCRIPT), stage], env=full, capture_output=True, text=True, timeout=120)
        summary = (out / "summary.txt").read_text().splitlines()
        return p.returncode, summary, (out / "calls.log").read_text(), out

    return run


def test_verify_passes_only_with_every_test_run_and_a_clean_memcheck(gpu_machine):
    rc, summary, calls, out = gpu_machine("verify")
    assert rc == 0, summary
    assert summary[-1].startswith("verify: PASS")
    assert any(s.startswith("memcheck: ok") and "0 errors" in s for s in summary)
    memcheck_calls = [c for c in calls.splitlines() if "tests/test_ops.py" in c]
    assert memcheck_calls and all(c.startswith("caching=1 require=1") for c in memcheck_calls)
    for log in ("build.log", "cuda_tests.log", "sanitizer_probe.log", "memcheck.log"):
        assert (out / log).is_file(), log


def test_skipped_cuda_tests_fail_the_stage(gpu_machine):
    rc, summary, _, _ = gpu_machine("verify", FAKE_PYTEST_LINE="85 passed, 4 skipped in 3.00s")
    assert rc != 0
    assert summary[-1].startswith("verify: FAIL")
    assert any(s.startswith("cuda tests: FAIL") for s in summary)


def test_a_refused_device_is_named_and_is_not_a_pass(gpu_machine):
    rc, summary, calls, _ = gpu_machine("verify", FAKE_SAN_REFUSE=1)
    assert rc != 0
    assert summary[-1].startswith("verify: SANITIZER-REFUSED")
    assert any("Device not supported" in s for s in summary)
    assert "tests/test_ops.py" not in calls  # memcheck itself never ran


def test_memcheck_errors_fail_the_stage(gpu_machine):
    rc, summary, _, _ = gpu_machine("verify", FAKE_SAN_ERRORS=3)
    assert rc != 0
    assert any(s.startswith("memcheck: FAIL") and "3 errors" in s for s in summary)


def test_a_hung_step_is_cut_at_the_stage_budget_and_its_log_kept(gpu_machine):
    rc, summary, _, out = gpu_machine("verify", FAKE_PYTEST_SLEEP=60, STAGE_BUDGET_S=8)
    assert rc != 0
    assert any(s.startswith("cuda tests: FAIL (rc 124") for s in summary)
    assert "TIMED OUT" in (out / "cuda_tests.log").read_text()
    assert summary[-1].startswith("verify: FAIL")


def test_bench_writes_results_under_out_and_skips_compile_without_time(gpu_machine):
    rc, summary, calls, out = gpu_machine("bench", STAGE_BUDGET_S=60)
    assert rc == 0, summary
    assert summary[-1].startswith("bench: PASS")
    assert f"--out {out}/results" in calls
    assert any(s.startswith("torch.compile step: skipped") for s in summary)
    assert "-m pip" not in calls  # the probe found a usable build: no rebuild


def test_the_script_names_its_stages():
    p = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 2 and "verify|bench" in p.stderr


def test_require_cuda_turns_a_missing_device_into_an_error():
    import sys

    import alexnet_cuda as ax
    if ax.cuda_available():
        pytest.skip("a GPU is present: there is no missing device to report")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_op_errors.py")],
                       env=dict(os.environ, ALEXNET_REQUIRE_CUDA="1"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout[-2000:]
    assert "ALEXNET_REQUIRE_CUDA is set but CUDA is unavailable" in p.stdout + p.stderr
