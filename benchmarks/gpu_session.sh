#!/usr/bin/env bash
# The GPU check, in two stages that each end within 5 minutes on an H200 (budgets: benchmarks/README.md):
#
#   OUT=/path bash benchmarks/gpu_session.sh verify   # build (CUDA required), the cuda-marked tests,
#                                                     #   compute-sanitizer memcheck over the CUDA op tests
#   OUT=/path bash benchmarks/gpu_session.sh bench    # every kernel and the training step vs PyTorch eager,
#                                                     #   the two-tower step trace (tower overlap, and the ms of
#                                                     #   each step the input path leaves exposed: issue 11's
#                                                     #   "under 1 ms"), the step as a CUDA graph,
#                                                     #   torch.compile if time is left
#
# Run each stage as its own command (a device call allows 10 minutes; a stage stops itself at STAGE_BUDGET_S,
# default 290 s). Every step runs under its own `timeout`, writes its log under $OUT as soon as it ends, and
# appends one line to $OUT/summary.txt; benchmark results go straight to $OUT/results/. So a stage killed from
# outside still leaves every finished step's log and results. The stage's last line is its verdict:
# PASS, FAIL, or (verify only) SANITIZER-REFUSED when compute-sanitizer cannot use the device (seen on some
# lent machines: "Device not supported", then error 999), which is not a pass. Exit status: 0 only on PASS.
#
# PYTHON (default python3) is the interpreter: the H200 machines have no `python`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-session}"
mkdir -p "$OUT/results"
PY="${PYTHON:-python3}"
BUDGET="${STAGE_BUDGET_S:-290}"
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

say() { echo "$1" | tee -a "$SUMMARY"; }
remaining() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step NAME CAP_S CMD...: runs CMD under timeout min(CAP_S, what is left of the stage), output to $OUT/NAME.log.
# Sets RC (124/137: timed out) and SECS.
step() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 5 ]; then RC=124; SECS=0; echo "(no time left for $name)" >"$OUT/$name.log"; return; fi
  local s; s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" >"$OUT/$name.log" 2>&1; RC=$?
  SECS=$(( $(date +%s) - s ))
  [ $RC -eq 124 ] || [ $RC -eq 137 ] && echo "TIMED OUT after ${t}s" >>"$OUT/$name.log"
}
pytest_line() { grep -E "^[0-9]+ (passed|failed)|(passed|failed|error|skipped).* in [0-9.]+s" "$1" | tail -1; }

PROBE='import alexnet_cuda as ax, sys
ok = ax.cuda_available()
print("cuda_available:", ok, ax.cuda_device_properties(0)["name"] if ok else ax.cuda_unavailable_reason())
sys.exit(0 if ok else 1)'

build() {
  # Only this GPU's architecture (nvidia-smi's compute capability, "9.0" -> 90) unless ALEXNET_CUDA_ARCHS says
  # otherwise: the default build compiles seven, minutes of a device budget that has no use for the other six.
  local archs="${ALEXNET_CUDA_ARCHS:-}"
  if [ -z "$archs" ] && command -v nvidia-smi >/dev/null; then
    archs=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  fi
  step build 180 env ALEXNET_CUDA=ON ALEXNET_CUDA_ARCHS="$archs" "$PY" -m pip install --no-build-isolation -e .
  if [ $RC -ne 0 ]; then say "build: FAILED (rc $RC, ${SECS}s, see build.log)"; return 1; fi
  local secs=$SECS
  step build_probe 30 "$PY" -c "$PROBE"
  if [ $RC -ne 0 ]; then say "build: FAILED: built but CUDA unusable: $(head -1 "$OUT/build_probe.log")"; return 1; fi
  say "build: ok (${secs}s, CUDA backend on)"
}

verify() {
  local verdict=PASS
  build || { say "verify: FAIL (build)"; return 1; }

  # Every cuda-marked test, none allowed to skip (ALEXNET_REQUIRE_CUDA turns "no device" into an error).
  step cuda_tests 150 env ALEXNET_REQUIRE_CUDA=1 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider
  local line; line=$(pytest_line "$OUT/cuda_tests.log")
  if [ $RC -ne 0 ] || ! grep -q passed <<<"$line" || grep -q skipped <<<"$line"; then
    say "cuda tests: FAIL (rc $RC, ${SECS}s): ${line:-no summary}"; verdict=FAIL
  else
    say "cuda tests: ok (${SECS}s): $line"
  fi

  # The sanitizer must first show it can see the device; a refusal is named, never counted as a pass.
  if ! command -v compute-sanitizer >/dev/null; then
    say "memcheck: FAIL: compute-sanitizer not on PATH"; say "verify: FAIL"; return 1
  fi
  step sanitizer_probe 60 compute-sanitizer --tool memcheck --error-exitcode 99 "$PY" -c \
    'import numpy as np, alexnet_cuda as ax
assert ax.cuda_available(), ax.cuda_unavailable_reason()
y = ax.ops.relu_forward(ax.from_numpy(np.arange(-4, 4, dtype=np.float32), "cuda:0"))
assert float(y.numpy().sum()) == 6.0
print("sanitizer probe: device visible, relu_forward ran")'
  if grep -qiE "device not supported|error 999|unknown error" "$OUT/sanitizer_probe.log"; then
    say "memcheck: SANITIZER-REFUSED: compute-sanitizer cannot use this device: $(grep -iE -m1 'not supported|999|unknown error' "$OUT/sanitizer_probe.log")"
    [ $verdict = PASS ] && verdict=SANITIZER-REFUSED
  elif [ $RC -ne 0 ]; then
    say "memcheck: FAIL: probe under compute-sanitizer failed (rc $RC, see sanitizer_probe.log)"; verdict=FAIL
  else
    # Caching off: every tensor is its own exact-size cudaMalloc, so an overrun hits memcheck's boundary.
    step memcheck 240 env ALEXNET_NO_CUDA_MEMORY_CACHING=1 ALEXNET_REQUIRE_CUDA=1 \
      compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
      "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_ops.py tests/test_op_errors.py
    line=$(pytest_line "$OUT/memcheck.log")
    local errs; errs=$(grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -1)
    if [ $RC -ne 0 ] || ! grep -q "ERROR SUMMARY: 0 errors" <<<"$errs" || ! grep -q passed <<<"$line" \
       || grep -q skipped <<<"$line"; then
      say "memcheck: FAIL (rc $RC, ${SECS}s): ${errs:-no error summary} | ${line:-no pytest summary}"; verdict=FAIL
    else
      say "memcheck: ok (${SECS}s, caching off): $errs | $line"
    fi
  fi
  say "verify: $verdict ($(( $(date +%s) - T0 ))s)"
  [ $verdict = PASS ]
}

bench() {
  local verdict=PASS
  # A warm machine keeps the build of a verify call; build only when the extension cannot run CUDA.
  if "$PY" -c "$PROBE" >"$OUT/bench_probe.log" 2>&1; then say "build: reused ($(head -1 "$OUT/bench_probe.log"))"
  else build || { say "bench: FAIL (build)"; return 1; }; fi

  step bench_all 210 "$PY" benchmarks/run_all.py --no-compile --out "$OUT/results"
  if [ $RC -ne 0 ]; then verdict=FAIL; fi
  say "kernels + training step vs eager: $([ $RC -eq 0 ] && echo ok || echo "FAIL (rc $RC)") (${SECS}s): $(grep -E 'wrote|written|failed' "$OUT/bench_all.log" | tail -2 | tr '\n' ' ')"

  # Three traced steps on the training loop's input path (staging slots, prefetch callback, upload stream);
  # the first line names the worst step's exposed input time, the summary JSON keeps every step's figures.
  step trace 60 "$PY" benchmarks/trace_step.py --steps 3 --out "$OUT/results"
  if [ $RC -ne 0 ]; then verdict=FAIL; fi
  say "trace: $([ $RC -eq 0 ] && echo ok || echo "FAIL (rc $RC)") (${SECS}s): $(head -1 "$OUT/trace.log")"

  # Our step replayed as one CUDA graph (--cuda-graph on: two eager warm-up steps, the capture, then replays),
  # beside bench_all's eager step: what the graph saves in launches and host time, measured.
  step bench_graph 90 "$PY" benchmarks/bench_train_step.py --cuda-graph on --no-compile --out "$OUT/results/graph" --no-plot
  if [ $RC -ne 0 ]; then verdict=FAIL; fi
  say "graph step: $([ $RC -eq 0 ] && echo ok || echo "FAIL (rc $RC)") (${SECS}s): $(grep -E 'wrote|written' "$OUT/bench_graph.log" | tail -1)"

  # torch.compile compiles for a minute or more: only with the time that is left, and never a failure.
  if [ "$(remaining)" -ge 100 ]; then
    step bench_compile 300 "$PY" benchmarks/bench_train_step.py --out "$OUT/results/compile" --no-plot
    say "torch.compile step: $([ $RC -eq 0 ] && echo ok || echo "not finished (rc $RC)") (${SECS}s)"
  else
    say "torch.compile step: skipped ($(remaining)s left of the stage's ${BUDGET}s)"
  fi
  say "bench: $verdict ($(( $(date +%s) - T0 ))s)"
  [ $verdict = PASS ]
}

case "${1:-}" in
  verify) verify ;;
  bench) bench ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_session.sh verify|bench   (run each as its own command)" >&2; exit 2 ;;
esac
