"""The benchmarks' smoke mode (CPU backend, tiny shapes): every script runs in-process, validates every op against
the float64 reference and reports it; a broken benchmark or op fails here. No timing is asserted."""
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import alexnet_cuda as ax

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_conv  # noqa: E402
import bench_elementwise  # noqa: E402
import bench_gemm  # noqa: E402
import bench_loader  # noqa: E402
import bench_lrn_pool  # noqa: E402
import bench_softmax  # noqa: E402
import bench_train_step  # noqa: E402
import harness  # noqa: E402
import run_all  # noqa: E402

# Rows each family yields on the tiny config: conv 5 layers x 4 passes; fc 3 x 4; ReLU at 5 distinct shapes x 2
# + dropout x 2 + SGD; LRN 2 x 2 + pooling 3 x 2; softmax-xent fwd/bwd + softmax.
FAMILY_ROWS = [(bench_conv, 20), (bench_gemm, 12), (bench_elementwise, 13), (bench_lrn_pool, 12), (bench_softmax, 3)]


def assert_validated(rows):
    for r in rows:
        where = f"{r['op']} {r['pass_']} {r['shape']}"
        assert r["status"] == "ok", f"{where}: {r['status']}"
        assert r["validated"] is True, where
        assert r["rel_err"] is not None and math.isfinite(r["rel_err"]) and r["rel_err"] <= r["tol"], where
        assert r["our_ms"] is not None, where  # the timing path ran (smoke times are not claims)


def results_listing():
    d = harness.RESULTS_DIR
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.mark.parametrize("module,expected", FAMILY_ROWS, ids=[m.__name__ for m, _ in FAMILY_ROWS])
def test_kernel_family_smoke_validates_every_op(module, expected, tmp_path):
    doc = module.main(["--smoke", "--no-torch", "--out", str(tmp_path)])
    assert doc["mode"] == "smoke" and doc["device"]["device"] == "cpu"
    assert len(doc["rows"]) == expected
    assert_validated(doc["rows"])
    written = json.loads(Path(doc["written"]["json"]).read_text())
    assert len(written["rows"]) == expected and written["commit"]
    md = Path(doc["written"]["md"]).read_text()
    assert "| op | pass | shape | our ms | PyTorch ms |" in md
    assert "png" not in doc["written"]  # no timing claims, so no chart


def test_run_all_smoke_writes_nothing_and_validates_everything():
    before = results_listing()
    doc = run_all.main(["--smoke", "--no-torch"])
    assert results_listing() == before
    assert doc["written"] == {}
    rows = doc["rows"]
    kernel_rows = [r for r in rows if r["family"] not in ("loader", "train_step")]
    assert len(kernel_rows) == sum(n for _, n in FAMILY_ROWS)
    assert_validated(kernel_rows)
    assert_validated([r for r in rows if r["op"] == "augment_batch"])
    step = [r for r in rows if r["family"] == "train_step"]
    assert len(step) == 1
    if hasattr(ax, "Net"):
        assert_validated(step)
    loader = [r for r in rows if r["op"].startswith("TrainLoader")]
    assert len(loader) == 2
    if importlib.util.find_spec("alexnet_cuda.data") is not None:
        assert_validated(loader)


def test_loader_smoke(tmp_path):
    doc = bench_loader.main(["--smoke", "--no-torch", "--out", str(tmp_path)])
    rows = {r["op"]: r for r in doc["rows"]}
    assert_validated([rows["augment_batch"]])
    if importlib.util.find_spec("alexnet_cuda.data") is None:
        assert all("loader unavailable" in rows[k]["status"] for k in ("TrainLoader.epoch", "TrainLoader.batch"))
        pytest.skip("alexnet_cuda.data is not on this branch: the loader rows say 'loader unavailable'")
    assert_validated([rows["TrainLoader.epoch"], rows["TrainLoader.batch"]])
    assert rows["TrainLoader.batch"]["images_per_s"] > 0


def test_train_step_smoke():
    if not hasattr(ax, "Net"):
        pytest.skip("alexnet_cuda.Net is not on this branch")
    doc = bench_train_step.main(["--smoke", "--no-torch"])
    assert len(doc["rows"]) == 1
    assert_validated(doc["rows"])
    r = doc["rows"][0]
    assert math.isfinite(r["last_loss"]) and r["images_per_s"] > 0


def test_torch_comparison_paths_smoke():
    """Where torch is installed (not required): its side of the comparison runs and agrees with the reference,
    LRN with alpha*n, and the PyTorch AlexNet's logits and one training step with ours."""
    pytest.importorskip("torch")
    doc = bench_lrn_pool.main(["--smoke", "--only", "lrn1 (size"])  # the LRN rows, not the fused one (no torch side)
    assert len(doc["rows"]) == 2
    for r in doc["rows"]:
        assert r["torch_status"] == "ok" and r["torch_rel_err"] <= r["tol"] and r["torch_ms"] is not None
    if hasattr(ax, "Net"):
        r = bench_train_step.main(["--smoke"])["rows"][0]
        assert r["status"] == "ok" and r["torch_status"] == "ok"
        assert r["torch_rel_err"] <= bench_train_step.TOL_FORWARD
        assert r["update_rel_err"] <= bench_train_step.TOL_UPDATE


def test_script_runs_as_a_program():
    p = subprocess.run([sys.executable, str(BENCH / "bench_softmax.py"), "--smoke", "--no-torch"], capture_output=True,
                       text=True, timeout=120, cwd=BENCH.parent)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("ok") >= 3 and "FAILED" not in p.stdout


# ---- the harness refuses to time what it cannot validate --------------------------------------------------


def smoke_context():
    return harness.make_context(harness.arg_parser("t").parse_args(["--smoke", "--no-torch"]))


def relu_case(rng, corrupt):
    x = rng.standard_normal((4, 8), dtype=np.float32)

    def validate(ctx, st):
        ours = corrupt(ax.ops.relu_forward(st["xt"]).numpy())
        return {"y": ours}, {"y": ctx.ref.relu_forward(x.astype(np.float64))}

    return harness.Case("test", "relu", "forward", "4x8", setup=lambda ctx: {"xt": ctx.dev(x)}, validate=validate,
                        run=lambda st: ax.ops.relu_forward(st["xt"]), tol=harness.TOL_ELEMENTWISE, bytes=8 * x.size)


@pytest.mark.parametrize("corrupt,expect", [
    (lambda y: y * 1.001, "FAILED validation"),
    (lambda y: np.where(np.arange(y.size).reshape(y.shape) == 5, np.nan, y), "FAILED validation"),
    (lambda y: y[:2], "error"),
], ids=["off-by-0.1%", "one-nan", "wrong-shape"])
def test_failing_op_gets_no_time(rng, corrupt, expect):
    ctx = smoke_context()
    row = harness.run_case(ctx, relu_case(rng, corrupt))
    assert row["status"].startswith(expect), row["status"]
    assert row["our_ms"] is None and row["validated"] is False


def test_passing_op_is_timed(rng):
    row = harness.run_case(smoke_context(), relu_case(rng, lambda y: y))
    assert row["status"] == "ok" and row["validated"] and row["rel_err"] == 0.0 and row["our_ms"] is not None


def test_compare_integers_exactly_and_rejects_nan():
    ok = harness.compare({"a": np.array([1, 2, 3], np.int32)}, {"a": np.array([1, 2, 3])}, 1e-5)
    bad = harness.compare({"a": np.array([1, 2, 4], np.int32)}, {"a": np.array([1, 2, 3])}, 1e-5)
    nan = harness.compare({"x": np.array([np.nan, 1.0])}, {"x": np.array([0.0, 1.0])}, 1e-5)
    assert ok["ok"] and not bad["ok"] and bad["mismatches"] == 1 and not nan["ok"]


def test_paper_shapes_and_flop_counts():
    """The counts behind every GFLOP/s figure: ALEXNET.md's 724 M multiply-adds and 60.97 M parameters."""
    cfg = ax.alexnet_config()
    s = harness.layer_shapes(cfg, 128)
    assert [L["P"] for L in s["convs"]] == [55, 27, 13, 13, 13]
    assert [p["out"] for p in s["pools"]] == [27, 13, 6]
    assert [(f["I"], f["O"]) for f in s["fcs"]] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    assert [L["groups"] for L in s["convs"]] == [1, 2, 1, 2, 2]
    macs = harness.step_flops_per_image(cfg)["forward"] / 2
    assert abs(macs / 1e6 - 724.3) < 0.5
    params = sum(int(np.prod(shape)) for _, shape in harness.parameter_shapes(cfg))
    assert abs(params / 1e6 - 60.97) < 0.01


def test_trace_step_smoke(tmp_path):
    import trace_step

    summary = trace_step.main(["--smoke", "--out", str(tmp_path)])
    assert summary["ops_traced"] > 50
    assert 0.0 <= summary["overlap"] <= 1.0
    assert set(summary["edge_bytes"]) == {"conv2->conv3", "conv5->fc6", "fc6->fc7", "fc7->fc8", "fc8->loss"}
    traces = list(tmp_path.glob("*_trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    # The staged input path: the host filling the next slot has a row of its own (the CPU uploads nothing).
    assert {e["tid"] for e in events} == {"tower 0", "tower 1", "host staging"}
    assert summary["input"] == "staged" and len(summary["steps"]) == 3
    for s in summary["steps"]:
        assert s["input_busy_ms"]["stage"] > 0 and s["input_busy_ms"]["augment"] > 0
        for kind in ("stage", "upload", "augment"):
            assert 0 <= s["input_exposed_ms"][kind] <= s["input_busy_ms"][kind] + 1e-9
    assert summary["input_exposed_ms_worst"] == max(s["input_exposed_total_ms"] for s in summary["steps"])
    float_summary = trace_step.main(["--smoke", "--input", "float", "--steps", "1"])
    assert float_summary["input_busy_ms"] == {"stage": 0, "upload": 0, "augment": 0}


def test_bench_cpu_smoke_against_torch(tmp_path):
    """bench_cpu in smoke mode: every op and the training step run on both sides, every comparable output agrees
    with PyTorch's, and the results name the CPU and the commit."""
    pytest.importorskip("torch")
    import bench_cpu

    out = tmp_path / "cpu.json"
    doc = bench_cpu.main(["--smoke", "--out", str(out)])
    rows = doc["rows"]
    families = {r["family"] for r in rows}
    assert families == {"conv", "fc", "relu", "lrn", "pool", "dropout", "softmax", "sgd", "train_step"}
    for r in rows:
        where = f"{r['op']} {r['pass_']}"
        assert r["status"] == "ok", where
        assert r["our_ms"] > 0 and r["torch_ms"] > 0 and r["ratio"] > 0, where
        if r["family"] not in ("dropout", "sgd"):  # other random numbers, another momentum formula
            assert r["check_ok"] is True and r["check_rel_err"] <= bench_cpu.TOL, where
    written = json.loads(out.read_text())
    assert written["machine"]["cpu_model"] and written["commit"] and written["torch_status"] == "ok"
    assert "ratio" in out.with_suffix(".txt").read_text()


def test_bench_cpu_without_torch_says_so_and_times_ours(monkeypatch, capsys):
    import bench_cpu

    before = results_listing()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as where it is missing
    doc = bench_cpu.main(["--smoke", "--no-ops"])
    assert bench_cpu.NO_TORCH in capsys.readouterr().out
    assert doc["torch_status"] == bench_cpu.NO_TORCH and doc["written"] == {}
    (step,) = doc["rows"]
    assert step["status"] == "ok" and step["our_ms"] > 0 and "torch_ms" not in step and "ratio" not in step
    assert results_listing() == before


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None,
                    reason="cpu_peak measures x86-64 FMA throughput with the system C compiler")
def test_cpu_peak_measures_each_supported_isa():
    """benchmarks/cpu_peak.py compiles its probe and reports a positive GFLOP/s for every FMA ISA the CPU has."""
    import cpu_peak  # benchmarks/ is on sys.path (above)

    r = cpu_peak.measure()
    flags = open("/proc/cpuinfo").read()
    want = {isa for isa, flag in (("avx512", " avx512f"), ("avx2", " avx2")) if flag in flags}
    assert set(r["gflops_per_core"]) == want
    assert all(g > 1.0 for g in r["gflops_per_core"].values())
