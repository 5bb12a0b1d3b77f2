"""The CPU backend's GEMM paths (csrc/cpu/gemm.cpp): each micro-kernel the CPU supports, forced through
`_C._cpu_set_isa`, and 1, 2 and 3 threads (`_C._cpu_set_threads`), on shapes whose M, N and K are not multiples
of any tile (partial strips and panels, several K blocks of 256, output panels that straddle two images, strided
and grouped convolutions). Each result is checked against the float64 reference, and the bits must not depend
on the thread count, nor differ between the AVX-512 and AVX2 kernels (gemm_kernel.h: one fused multiply-add
chain per K block on both). The portable kernel is checked against the reference only: on x86-64 it rounds
products separately. LRN and max-pool forward, which split planes or images between threads, are checked the same
way.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import reference as ref

C = ax._C
ops = ax.ops
TOL = 1e-4  # DESIGN.md: reductions and convolutions
ISAS = [i for i in ("avx512", "avx2", "generic") if C._cpu_isa_supported(i)]

# N, C, H, W, K, R, S, stride, padding, groups: small, so the whole sweep stays quick.
CONVS = [
    (3, 5, 9, 11, 14, 3, 3, 1, 1, 1),      # P*Q = 99: 32-wide panels straddle images; M = 14 (a partial strip)
    (2, 6, 13, 13, 26, 3, 3, 1, 1, 2),     # 13x13 planes, two groups
    (2, 3, 19, 17, 5, 11, 11, 4, 2, 1),    # conv1-like: stride 4, 16 grad-input phases
    (2, 4, 8, 9, 3, 2, 3, (2, 3), (0, 1), 1),  # rectangular stride: phases with no taps on one axis
    (1, 40, 6, 6, 7, 3, 3, 1, 1, 1),       # K = 360 for forward: two K blocks
    (2, 3, 35, 37, 5, 5, 5, 2, 1, 1),      # strided forward through the stride-phase split (P*Q >= 64)
    (2, 4, 30, 40, 6, 3, 4, (2, 3), (1, 0), 2),  # the same with a rectangular stride and groups
    (4, 16, 13, 13, 40, 3, 3, 1, 1, 1),    # big enough (> 2^21 multiply-adds a pass) to be split between threads
]
# M, N, K; the last two are big enough to be split between threads (gemm.cpp: a thread per 2^20 multiply-adds)
GEMMS = [(37, 53, 300), (1, 1, 1), (13, 70, 513), (100, 33, 17), (5, 2, 260), (150, 170, 300), (29, 400, 270)]


def _cases(rng):
    """Every op on fresh inputs: (name, run, reference) triples; run() calls our op and returns the array."""
    def np_(t):
        return t.numpy()

    cases = []
    f64 = np.float64
    for M, N, K in GEMMS:
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((K, N), dtype=np.float32)
        bt = np.ascontiguousarray(b.T)
        c = rng.standard_normal((M, N), dtype=np.float32)
        at, btt, bt_t, ct = (ax.from_numpy(v, "cpu") for v in (a, b, bt, c))
        # linear_backward_input: a @ b (no transposes); linear_forward: a @ bt.T; linear_backward_weight: c.T @ a
        cases.append((f"gemm nn {M}x{N}x{K}", lambda at=at, btt=btt: np_(ops.linear_backward_input(at, btt)),
                      ref.linear_backward_input(a.astype(f64), b.astype(f64))))
        cases.append((f"gemm nt {M}x{N}x{K}", lambda at=at, bt_t=bt_t: np_(ops.linear_forward(at, bt_t)),
                      ref.linear_forward(a.astype(f64), bt.astype(f64))))
        cases.append((f"gemm tn {M}x{N}x{K}", lambda at=at, ct=ct: np_(ops.linear_backward_weight(at, ct)),
                      ref.linear_backward_weight(a.astype(f64), c.astype(f64))))
    for case in CONVS:
        N, Ci, H, W, K, R, S, stride, pad, g = case
        x = rng.standard_normal((N, Ci, H, W), dtype=np.float32)
        w = rng.standard_normal((K, Ci // g, R, S), dtype=np.float32) * np.float32(0.1)
        b = rng.standard_normal((K,), dtype=np.float32)
        x64, w64 = x.astype(f64), w.astype(f64)
        y_ref = ref.conv2d_forward(x64, w64, b.astype(f64), stride, pad, g)
        dy = rng.standard_normal(y_ref.shape, dtype=np.float32)
        xt, wt, bt_, dyt = (ax.from_numpy(v, "cpu") for v in (x, w, b, dy))
        kw = dict(stride=stride, padding=pad, groups=g)
        cases.append((f"conv fwd {case}", lambda xt=xt, wt=wt, bt_=bt_, kw=kw: np_(ops.conv2d_forward(xt, wt, bt_, **kw)),
                      y_ref))
        cases.append((f"conv dgrad {case}",
                      lambda dyt=dyt, wt=wt, hw=(H, W), kw=kw: np_(ops.conv2d_backward_input(dyt, wt, hw, **kw)),
                      ref.conv2d_backward_input(dy.astype(f64), w64, (H, W), stride, pad, g)))
        cases.append((f"conv wgrad {case}",
                      lambda xt=xt, dyt=dyt, rs=(R, S), kw=kw: np_(ops.conv2d_backward_weight(xt, dyt, rs, **kw)),
                      ref.conv2d_backward_weight(x64, dy.astype(f64), (R, S), stride, pad, g)))
        cases.append((f"conv bgrad {case}", lambda dyt=dyt: np_(ops.conv2d_backward_bias(dyt)),
                      ref.conv2d_backward_bias(dy.astype(f64))))
    # LRN and max-pool split planes or images over the pool (lrn.cpp, pool.cpp): 120 planes of 27x27 are several
    # chunks for each of them.
    x = rng.standard_normal((3, 40, 27, 27), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    lrn = (5, 2.0, 1e-2, 0.75)
    xt, dyt = ax.from_numpy(x, "cpu"), ax.from_numpy(dy, "cpu")
    y_ref, scale_ref = ref.lrn_forward(x, *lrn)
    pool_ref, arg_ref = ref.maxpool_forward(y_ref, 3, 2, 1)

    def lrn_bwd():
        y, scale = ops.lrn_forward(xt, *lrn)
        return np_(ops.lrn_backward(dyt, xt, y, scale, *lrn))

    cases += [("lrn forward y", lambda: np_(ops.lrn_forward(xt, *lrn)[0]), y_ref),
              ("lrn forward scale", lambda: np_(ops.lrn_forward(xt, *lrn)[1]), scale_ref),
              ("lrn backward", lrn_bwd, ref.lrn_backward(dy, x, y_ref, scale_ref, *lrn)),
              ("maxpool forward", lambda: np_(ops.maxpool_forward(xt, 3, 2, 1)[0]), ref.maxpool_forward(x, 3, 2, 1)[0]),
              ("lrn+maxpool pool_y", lambda: np_(ops.lrn_maxpool_forward(xt, *lrn, 3, 2, 1)[2]), pool_ref),
              ("lrn+maxpool argmax", lambda: np_(ops.lrn_maxpool_forward(xt, *lrn, 3, 2, 1)[3]).astype(f64), arg_ref)]
    return cases


@pytest.fixture
def restore_cpu_settings():
    yield
    C._cpu_set_isa("auto")
    C._cpu_set_threads(0)


def test_every_isa_and_thread_count_matches_the_reference_and_itself(rng, restore_cpu_settings):
    cases = _cases(rng)
    bits = {}
    for isa in ISAS:
        C._cpu_set_isa(isa)
        assert C._cpu_isa() == isa
        for threads in (1, 2, 3):
            C._cpu_set_threads(threads)
            assert C._cpu_threads() == threads
            results = [(name, run(), want) for name, run, want in cases]
            for name, got, want in results:
                assert got.shape == want.shape, f"{isa}/{threads} {name}: shape"
                assert np.all(np.isfinite(got)), f"{isa}/{threads} {name}: non-finite (unwritten?) output"
                err = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert err < TOL, f"{isa}/{threads} {name}: relative error {err:.2e}"
            bits[isa, threads] = results
        for threads in (2, 3):
            for (name, a, _), (_, b, _) in zip(bits[isa, 1], bits[isa, threads]):
                assert np.array_equal(a, b), f"{isa}: {name} differs between 1 and {threads} threads"
    if "avx512" in ISAS and "avx2" in ISAS:
        for (name, a, _), (_, b, _) in zip(bits["avx512", 1], bits["avx2", 1]):
            assert np.array_equal(a, b), f"{name}: AVX-512 and AVX2 kernels give different bits"


def test_set_isa_rejects_unknown_names(restore_cpu_settings):
    with pytest.raises(ValueError, match="set_cpu_isa.*'isa'.*'sse9'"):
        C._cpu_set_isa("sse9")
    C._cpu_set_isa("generic")  # always supported
    assert C._cpu_isa() == "generic"
    C._cpu_set_isa("auto")
    assert C._cpu_isa() in ISAS


def test_environment_picks_isa_and_threads():
    want = "avx2" if "avx2" in ISAS else "generic"
    probe = "import alexnet_cuda as ax; print(ax._C._cpu_isa(), ax._C._cpu_threads())"
    env = dict(os.environ, ALEXNET_CPU_ISA=want, ALEXNET_CPU_THREADS="3")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [want, "3"]
    # An unbound MPI job with as many ranks on the node as CPUs: one thread each.
    cpus = len(os.sched_getaffinity(0))
    if cpus == os.cpu_count():
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_CPU")}
        env["OMPI_COMM_WORLD_LOCAL_SIZE"] = str(cpus)
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
        assert out.split()[1] == "1"


def test_two_cpu_towers_split_the_thread_budget_and_match_one_tower(rng, restore_cpu_settings):
    """cpu,cpu with a budget of 3 threads (2 + 1) against cpu with 1: the same training bits."""
    from test_net import assert_trains_identically, small_config

    cfg = small_config()
    seed = int(rng.integers(1 << 31))
    C._cpu_set_threads(3)
    a = ax.Net(cfg, devices=("cpu", "cpu"), seed=seed)
    C._cpu_set_threads(1)
    b = ax.Net(cfg, devices="cpu", seed=seed)
    assert_trains_identically(a, b, seed, cfg)


def test_bench_cpu_gemm_runs(capsys, restore_cpu_settings):
    """benchmarks/bench_cpu_gemm.py at toy sizes (its timings are not checked: no timing assertions)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_cpu_gemm

    assert bench_cpu_gemm.main(["--gemm", "40", "--reps", "1", "--batch", "1", "--threads", "2", "--isa", "avx2"
                                if "avx2" in ISAS else "generic"]) == 0
    out = capsys.readouterr().out
    assert "gemm 40^3" in out and out.count("GFLOP/s") == 25  # the GEMM, 3 passes of 3 fc layers and of 5 convs
    assert bench_cpu_gemm.main(["--isa", "sse9", "--reps", "1"]) == 2
    assert "sse9" in capsys.readouterr().err
