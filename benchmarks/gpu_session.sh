#!/usr/bin/env bash
# What a session with a GPU runs, in one place: build, the whole test suite with no CUDA test skipped,
# compute-sanitizer over the CUDA op tests, the benchmarks and the step trace.
#
#   OUT=/path/for/logs bash benchmarks/gpu_session.sh [build] [test] [sanitize] [bench] [trace]   (default: all)
#
# Logs go to $OUT (default ./gpu-session); benchmark results to benchmarks/results/ and, packed, to
# $OUT/results.tgz. Each stage prints one summary line at the end; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-session}"
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test sanitize bench trace)
export PYTHONUNBUFFERED=1
status=0
summary=()
note() { summary+=("$1"); echo "== $1"; }

for stage in "${stages[@]}"; do
  case "$stage" in
    build)
      if ALEXNET_CUDA=ON python -m pip install --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
         && python -c "import alexnet_cuda as ax, sys; print(ax.cuda_device_properties(0)); sys.exit(not ax.cuda_available())" \
              >>"$OUT/build.log" 2>&1; then
        note "build: ok ($(tail -1 "$OUT/build.log"))"
      else
        note "build: FAILED (see build.log)"; status=1; break
      fi ;;
    test)
      python -m pytest -q -rs >"$OUT/pytest.log" 2>&1; rc=$?
      line=$(tail -1 "$OUT/pytest.log")
      # On a GPU machine no CUDA test may skip: list the skipped cuda-marked tests, if any.
      python -m pytest -q -rs -m cuda >"$OUT/pytest_cuda.log" 2>&1; rc_cuda=$?
      cuda_line=$(tail -1 "$OUT/pytest_cuda.log")
      if [ $rc -ne 0 ] || [ $rc_cuda -ne 0 ] || grep -q "skipped" <<<"$cuda_line"; then status=1; fi
      note "test: all: $line | cuda-marked: $cuda_line" ;;
    sanitize)
      if command -v compute-sanitizer >/dev/null; then
        compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
          python -m pytest -q -x -m cuda tests/test_ops.py tests/test_op_errors.py >"$OUT/memcheck.log" 2>&1; rc=$?
        [ $rc -ne 0 ] && status=1
        note "memcheck (rc $rc): $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1) | $(grep -E 'passed|failed' "$OUT/memcheck.log" | tail -1)"
      else
        note "memcheck: compute-sanitizer not found"; status=1
      fi ;;
    bench)
      python benchmarks/run_all.py >"$OUT/bench.log" 2>&1 || status=1
      note "bench: $(tail -3 "$OUT/bench.log" | tr '\n' ' ')" ;;
    trace)
      python benchmarks/trace_step.py >"$OUT/trace.log" 2>&1 || status=1
      note "trace: $(head -1 "$OUT/trace.log")" ;;
    *) echo "unknown stage $stage (build test sanitize bench trace)"; exit 2 ;;
  esac
done
tar czf "$OUT/results.tgz" benchmarks/results 2>/dev/null
printf '%s\n' "${summary[@]}"
exit $status
