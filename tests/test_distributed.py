"""Data-parallel training (alexnet_cuda.distributed) on the CPU backend.

In-process: the deferred step equals the plain one bit for bit, two half batches (each with its sample_base)
summed equal one whole batch, the loader's rank slices make up one process's batches, the launcher variables.
Under `mpirun -n 2 --oversubscribe` (skipped, saying why, without mpirun or mpi4py; CI installs both): 2 ranks x
batch 16 against 1 rank x batch 32, a run stopped, or killed (a rank, or mpirun itself), and resumed against an
uninterrupted one, a killed or a hung rank ending the job with an error. NCCL: a missing libnccl.so.2 is a clear
error, the host side of the gradient all-reduce runs against a fake libnccl, and a one-rank NCCL all-reduce runs
where there is a GPU (cuda mark).

The tolerance of 2 x 16 against 1 x 32. Both compute the same function of the same images, augmentation and
dropout masks (the ranks' masks are keyed by the global sample index); what differs is only the order of the
float32 sums over the batch: one rank sums 32 per-sample terms of each gradient in its GEMM's order, two
ranks sum 16 each and MPI adds the two partial sums. A float32 sum of m terms is off by at most about
m * 2^-24 of the sum of their magnitudes (~2e-6 for m = 32) and typically sqrt(m) * 2^-24 (~3e-7), so each
step's gradients agree to ~1e-6 relative; over a few steps the updates (lr * momentum-averaged gradients)
inherit that. We compare the parameters' change from their initial values, ||d_2x16 - d_1x32|| / ||d_1x32||,
against 1e-4 (DESIGN.md's bound for float32 reductions; measured 5e-6 after 4 steps) and the per-step
losses against 1e-5.
"""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import alexnet_cuda as ax
from alexnet_cuda import checkpoint as ck
from alexnet_cuda import distributed
from alexnet_cuda.config import tiny_config
from alexnet_cuda.data import PreparedData, TrainLoader
from alexnet_cuda.prepare import prepare
from alexnet_cuda.synthetic import make_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun")
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(
    not (MPIRUN and HAVE_MPI4PY),
    reason="needs mpirun and mpi4py (apt-get install openmpi-bin libopenmpi-dev; pip install '.[mpi]')")
SMALL = ["--net", "tiny", "--crop", "32", "--log-every", "1", "--no-progress", "--devices", "cpu",
         "--set", "channels=(16,32,32,32,16)", "--set", "fc=(32,32)"]
CFG = dict(tiny_config(), channels=(16, 32, 32, 32, 16), fc=(32, 32))
# The runs that are stopped or killed and resumed: 10 epochs of 6 steps (100 images, batch 16), so the kill at
# step 4-5 lands well before the end even though the poll that triggers it lags the run by a few steps.
EPOCHS = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    make_synthetic(str(root / "src"), seed=2, train_per_class=10, val_per_class=3)
    prepare(str(root / "src"), str(root / "data"), size=36, shard_size=64, workers=0, progress=False)
    return str(root / "data")


# ---- in one process ------------------------------------------------------------------------------------

def _batch(rng, n):
    return rng.standard_normal((n, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, n)


def test_deferred_step_equals_the_plain_step_bit_for_bit(rng):
    a = ax.Net(CFG, devices=("cpu", "cpu"), seed=5)
    b = ax.Net(CFG, devices=("cpu", "cpu"), seed=5)
    b.set_data_parallel(True)
    for step in range(3):
        x, y = _batch(rng, 6)
        ra, rb = a.train_step(x, y, 0.02), b.train_step(x, y, 0.02)
        assert b.step == step  # counted by apply_sgd
        b.apply_sgd(0.02)
        assert ra == rb
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ValueError, match="apply_sgd: no gradients"):
        b.apply_sgd(0.02)  # each deferred step once


def test_two_half_batches_summed_equal_the_whole_batch(rng):
    """What two ranks do, in one process: each half with its sample_base and the whole batch's mean_over,
    the gradients summed, one update — against one step on the whole batch (dropout on)."""
    x, y = _batch(rng, 8)
    whole = ax.Net(CFG, devices="cpu", seed=7)
    halves = [ax.Net(CFG, devices="cpu", seed=7) for _ in range(2)]
    seen = []
    for r, net in enumerate(halves):
        net.set_data_parallel(True, mean_over=8, sample_base=4 * r,
                              grad_ready=lambda layer, tower, dw, db, stream: seen.append((layer, tower)))
    for _ in range(2):
        whole.train_step(x, y, 0.05)
        for r, net in enumerate(halves):
            net.train_step(x[4 * r:4 * r + 4], y[4 * r:4 * r + 4], 0.05)
        g0, g1 = halves[0].grads(), halves[1].grads()
        for (k0, t0), (k1, t1) in zip(g0, g1):
            total = t0.host_view() + t1.host_view()
            t0.host_view()[...] = total
            t1.host_view()[...] = total
        for net in halves:
            net.apply_sgd(0.05)
    layers, towers = len(whole.layers()), CFG["towers"]
    # Backward order, every layer and tower (one executor runs the towers in turn: a fixed order).
    assert seen[:layers * towers] == [(l, t) for l in range(layers - 1, -1, -1) for t in range(towers)]
    sw, s0, s1 = whole.state_dict(), halves[0].state_dict(), halves[1].state_dict()
    for k in sw:
        if k.startswith("meta/"):
            continue
        assert np.array_equal(s0[k], s1[k]), k
        assert np.linalg.norm(s0[k] - sw[k]) <= 1e-5 * np.linalg.norm(sw[k]), k
    # Without the sample_base shift the second half would draw the first half's dropout masks: the test sees it.
    other = ax.Net(CFG, devices="cpu", seed=7)
    other.set_data_parallel(True, mean_over=8, sample_base=0)
    ref = ax.Net(CFG, devices="cpu", seed=7)
    ref.set_data_parallel(True, mean_over=8, sample_base=4)
    other.train_step(x[4:], y[4:], 0.05)
    ref.train_step(x[4:], y[4:], 0.05)
    assert not np.array_equal(dict(other.grads())["fc7.t0.weight"].host_view(),
                              dict(ref.grads())["fc7.t0.weight"].host_view())


def test_loader_rank_slices_make_up_the_global_batch(dataset):
    data = PreparedData(dataset)
    one = TrainLoader(data, 8, 32, seed=3)
    parts = [TrainLoader(data, 8, 32, seed=3, rank=r, ranks=2) for r in range(2)]
    for b in (0, 3):
        raw, y = one.raw_batch(1, b)
        got = [p.raw_batch(1, b) for p in parts]
        for field in range(4):
            assert np.array_equal(np.concatenate([g[0][field] for g in got]), raw[field])
        assert np.array_equal(np.concatenate([g[1] for g in got]), y)
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        TrainLoader(data, 8, 32, rank=0, ranks=3)


def test_launcher_variables_and_device_sharding():
    assert distributed.launched_size({}) == 1
    assert distributed.launched_size({"OMPI_COMM_WORLD_SIZE": "4"}) == 4
    assert distributed.launched_size({"SLURM_NTASKS": "8"}) == 1  # an sbatch script, not an srun step
    assert distributed.launched_size({"SLURM_STEP_NUM_TASKS": "8"}) == 8
    d = distributed.Dist()
    d.local_rank, d.local_size = 3, 4
    assert distributed.shard_devices(["cuda:0"], d, 8) == ["cuda:3"]
    assert distributed.shard_devices(["cuda:0", "cuda:1"], d, 8) == ["cuda:6", "cuda:7"]
    assert distributed.shard_devices(["cuda:0"], d, 1) == ["cuda:0"]  # each rank sees only its own GPU
    assert distributed.shard_devices(["cpu", "cpu"], d, 0) == ["cpu", "cpu"]


def test_one_process_never_imports_mpi():
    code = ("import sys, os; [os.environ.pop(k, None) for k in list(os.environ) if k.startswith(('OMPI_', 'PMI', "
            "'SLURM'))]; from alexnet_cuda import distributed; d = distributed.init(); "
            "print(d.size, 'mpi4py' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "False"]


def test_missing_nccl_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ALEXNET_NCCL_LIBRARY", str(tmp_path / "libnccl.so.2"))
    monkeypatch.setattr(distributed.Nccl, "_loaded", None)
    with pytest.raises(distributed.NcclUnavailable, match=r"libnccl\.so\.2 could not be loaded: tried .*"
                                                          r"libnccl\.so\.2.*pip install nvidia-nccl-cu13"):
        distributed.Nccl.load()


class _FakeNcclLib:
    """Stands in for libnccl.so.2 (no GPU here): records the calls; ncclCommGetAsyncError reports `async_error`."""

    def __init__(self, async_error=0):
        self.calls, self.async_error = [], async_error
        for name in ("ncclGetErrorString", "ncclGetUniqueId", "ncclCommInitRank", "ncclAllReduce", "ncclGetVersion",
                     "ncclCommGetAsyncError", "ncclCommAbort", "ncclGroupStart", "ncclGroupEnd", "ncclCommDestroy"):
            setattr(self, name, self._fn(name))

    def _fn(self, name):
        lib = self

        class Fn:
            def __call__(self, *args):
                lib.calls.append((name, args))
                if name == "ncclGetErrorString":
                    return b"unhandled system error"
                if name == "ncclCommGetAsyncError":
                    args[1]._obj.value = lib.async_error
                return 0

        return Fn()


class _FakeTensor:
    def __init__(self, ptr, numel, device):
        self.data_ptr, self.numel, self.device = ptr, numel, device


class _FakeNet:
    def grads(self):
        return [("conv1.t0.weight", _FakeTensor(4096, 100, "cuda:0")),
                ("conv1.t0.bias", _FakeTensor(8192, 4, "cuda:1"))]


@pytest.mark.parametrize("case", ["ok", "hang", "async_error"])
def test_nccl_gradient_allreduce_calls_waits_and_fails_cleanly(monkeypatch, case):
    """The NCCL path's host logic without a GPU: one group of in-place float32 sums, one per gradient on its
    device's communicator; the wait ends on completion, or with CommError and the communicators aborted when
    it outlasts the timeout or NCCL reports an asynchronous error."""
    lib = _FakeNcclLib(async_error=3 if case == "async_error" else 0)
    nccl = distributed.Nccl(lib, "fake")
    never = __import__("threading").Event()
    monkeypatch.setattr(ax._C, "synchronize", (lambda d: never.wait(30)) if case != "ok" else (lambda d: None))
    comms = {"cuda:0": "comm0", "cuda:1": "comm1"}
    try:
        if case == "ok":
            nccl.allreduce_grads(_FakeNet(), comms, timeout=30, rank=2)
        else:
            with pytest.raises(distributed.CommError, match="did not finish within 0.3 s" if case == "hang"
                               else "asynchronous error.*unhandled system error"):
                nccl.allreduce_grads(_FakeNet(), comms, timeout=0.3, rank=2)
    finally:
        never.set()
    names = [c[0] for c in lib.calls]
    sums = [c[1] for c in lib.calls if c[0] == "ncclAllReduce"]
    assert names[0] == "ncclGroupStart" and names[3] == "ncclGroupEnd"
    assert [(a[0].value, a[1].value, a[2].value, a[3], a[4], a[5]) for a in sums] == [
        (4096, 4096, 100, 7, 0, "comm0"), (8192, 8192, 4, 7, 0, "comm1")]  # in place, ncclFloat32, ncclSum
    aborted = [c[1][0] for c in lib.calls if c[0] == "ncclCommAbort"]
    assert aborted == ([] if case == "ok" else ["comm0", "comm1"])


@pytest.mark.cuda
def test_one_rank_nccl_allreduce(rng):
    """The ctypes binding end to end on one GPU: a communicator of one rank, an in-place sum (the identity
    for one rank) on a device tensor, and ncclGetVersion."""
    nccl = distributed.Nccl.load()
    assert nccl.version() >= 21000
    comm = ax._C._with_device("cuda:0", lambda: nccl.comm_init_rank(1, nccl.unique_id(), 0))
    host = rng.standard_normal((3, 1000)).astype(np.float32)
    t = ax.from_numpy(host, "cuda:0")
    nccl.allreduce([(t.data_ptr, t.numel, comm)])
    ax._C.synchronize("cuda:0")
    np.testing.assert_array_equal(t.numpy(), host)


@pytest.mark.cuda
@pytest.mark.parametrize("devices", ["cuda:0", "cuda:0,cuda:0"])
@pytest.mark.parametrize("bucket_bytes", [distributed.BUCKET_BYTES, 0])
def test_one_rank_nccl_training_equals_the_plain_step(rng, devices, bucket_bytes):
    """The CUDA path of GradientAllReduce on one GPU as a world of one rank: NCCL's sums issued from the
    backward pass on the upload stream (or, bucket_bytes 0, after it) leave the gradients as they are, so
    three steps equal three plain steps bit for bit; two towers on one GPU share its communicator."""
    import types

    one = types.SimpleNamespace(rank=0, size=1, distributed=True, is_root=True, thread_level_ok=True, timeout=120.0,
                                bcast=lambda obj, what="": obj)
    plain = ax.Net(CFG, devices=devices, seed=11)
    dp = ax.Net(CFG, devices=devices, seed=11)
    sync = distributed.GradientAllReduce(one, dp, 8, bucket_bytes=bucket_bytes)
    for _ in range(3):
        x, y = _batch(rng, 8)
        rp = plain.train_step(x, y, 0.02)
        sync.start()
        rd = dp.train_step(x, y, 0.02)
        sync.finish()
        dp.apply_sgd(0.02)
        assert rp == rd
    a, b = plain.state_dict(), dp.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)


# ---- under mpirun ----------------------------------------------------------------------------------------

def _env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    env["ALEXNET_BUCKET_BYTES"] = "3000"  # many buckets, some of one array and some packed
    env.update(extra)
    return env


def _mpirun(n, args, env=None):
    cmd = [MPIRUN, "-n", str(n), "--oversubscribe", sys.executable, "-m", "alexnet_cuda.train", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or _env(),
                            cwd=ROOT)


def _run(n, args, timeout=180, env=None):
    p = _mpirun(n, args, env)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _params(run_or_ckpt):
    net_state = ck.load_checkpoint(run_or_ckpt)[1] if os.path.isfile(run_or_ckpt) else ck.load_latest(run_or_ckpt)[2]
    return {k: v for k, v in net_state.items() if not k.startswith("meta/")}


def _steps(run):
    rows = open(os.path.join(run, "steps.csv")).read().splitlines()[1:]
    return [(int(r.split(",")[0]), float(r.split(",")[3])) for r in rows]


@needs_mpi
def test_two_ranks_of_16_match_one_rank_of_32(dataset, tmp_path):
    args = ["--data", dataset, "--batch-size", "32", "--max-steps", "4", *SMALL]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    rc, out, err = _run(1, [*args, "--out", one])
    assert rc == 0, err
    rc, out, err = _run(2, [*args, "--out", two])
    assert rc == 0, err
    assert "2 ranks, 16 images each per step" in out and out.count("run folder") == 1  # rank 0 alone prints
    init = ax.Net(CFG, devices="cpu", seed=0).state_dict()
    a, b = _params(one), _params(two)
    assert set(a) == set(b)
    for k in a:
        if k.startswith("momentum/"):
            continue
        da, db = a[k] - init[k], b[k] - init[k]
        assert np.linalg.norm(da) > 0, k
        assert np.linalg.norm(db - da) <= 1e-4 * np.linalg.norm(da), k
    sa, sb = _steps(one), _steps(two)
    assert [s for s, _ in sa] == [s for s, _ in sb] == [1, 2, 3, 4]
    for (_, la), (_, lb) in zip(sa, sb):
        assert abs(la - lb) <= 1e-5 * abs(la)


@needs_mpi
def test_overlapped_buckets_equal_one_allreduce_after_backward(dataset, tmp_path):
    """Buckets reduced during backward (some one array in place, some packed) against one flat all-reduce
    after it: with two ranks each element is the same a + b either way, so the runs agree bit for bit."""
    args = ["--data", dataset, "--batch-size", "16", "--max-steps", "5", *SMALL]
    rc, _, err = _run(2, [*args, "--out", str(tmp_path / "buckets")])
    assert rc == 0, err
    rc, _, err = _run(2, [*args, "--out", str(tmp_path / "flat")], env=_env(ALEXNET_BUCKET_BYTES="0"))
    assert rc == 0, err
    a, b = _params(str(tmp_path / "buckets")), _params(str(tmp_path / "flat"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _steps(str(tmp_path / "buckets")) == _steps(str(tmp_path / "flat"))


@pytest.fixture(scope="module")
def uninterrupted_2(dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp2") / "A")
    rc, _, err = _run(2, ["--data", dataset, "--batch-size", "16", "--epochs", str(EPOCHS), "--out", out, *SMALL])
    assert rc == 0, err
    return out


@needs_mpi
def test_stop_and_resume_equals_uninterrupted(dataset, uninterrupted_2, tmp_path):
    out = str(tmp_path / "B")
    base = ["--data", dataset, "--batch-size", "16", "--epochs", str(EPOCHS), "--out", out, *SMALL]
    rc, stdout, err = _run(2, [*base, "--max-steps", "8"])  # mid-epoch: checkpoint, then stop
    assert rc == 0, err
    assert "stopped at step 8" in stdout
    rc, _, err = _run(2, ["--resume", "auto", "--out", out, "--data", dataset, "--no-progress"])
    assert rc == 0, err
    a, b = _params(uninterrupted_2), _params(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert _steps(out) == _steps(uninterrupted_2)


def _rank_pid(popen, rank, deadline):
    """The pid of the given rank under this mpirun: a descendant (OpenMPI starts ranks as its children, MPICH's
    hydra under a proxy) whose environment names that rank."""
    names = (f"OMPI_COMM_WORLD_RANK={rank}".encode(), f"PMI_RANK={rank}".encode())
    while time.monotonic() < deadline:
        parent = {}
        for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
            pid, ppid = map(int, line.split())
            parent[pid] = ppid
        for pid in parent:
            p = pid
            while p in parent and p != popen.pid and p > 1:
                p = parent[p]
            if p != popen.pid or pid == popen.pid:
                continue
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if any(n in env for n in names) and b"alexnet_cuda.train" in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} did not start")


def _wait_for_step(run, step, deadline):
    path = os.path.join(run, "steps.csv")
    while time.monotonic() < deadline:
        if os.path.exists(path) and any(s >= step for s, _ in _steps(run)):
            return
        time.sleep(0.02)
    raise AssertionError(f"step {step} never came")


@needs_mpi
def test_killed_rank_ends_the_job_and_the_run_resumes_exactly(dataset, uninterrupted_2, tmp_path):
    out = str(tmp_path / "C")
    p = _mpirun(2, ["--data", dataset, "--batch-size", "16", "--epochs", "400", "--out", out, "--checkpoint-every", "1",
                    "--comm-timeout", "30", *SMALL])
    deadline = time.monotonic() + 120
    victim = _rank_pid(p, 1, deadline)
    _wait_for_step(out, 5, deadline)
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=90)  # no hang: the launcher or the timeout ends rank 0
    assert p.returncode != 0
    assert time.monotonic() - t0 < 90
    assert "rank 0" in err or "exited on signal 9" in err, err
    # The checkpoints written before the kill are whole; the run continues from the newest, on the schedule of
    # the uninterrupted run's epochs, and ends where it ended.
    rc, _, err = _run(2, ["--resume", "auto", "--out", out, "--data", dataset, "--epochs", str(EPOCHS),
                          "--no-progress"])
    assert rc == 0, err
    a, b = _params(uninterrupted_2), _params(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by its parent) is gone too.
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@needs_mpi
def test_killed_mpirun_leaves_no_rank_behind_and_the_run_resumes_exactly(dataset, uninterrupted_2, tmp_path):
    out = str(tmp_path / "E")
    p = _mpirun(2, ["--data", dataset, "--batch-size", "16", "--epochs", "400", "--out", out, "--checkpoint-every", "1",
                    "--comm-timeout", "30", *SMALL])
    deadline = time.monotonic() + 120
    ranks = [_rank_pid(p, r, deadline) for r in (0, 1)]
    _wait_for_step(out, 4, deadline)
    p.kill()  # SIGKILL to mpirun itself
    p.communicate(timeout=60)
    t0 = time.monotonic()
    while not all(_gone(pid) for pid in ranks):
        assert time.monotonic() - t0 < 60, "ranks outlived their mpirun"
        time.sleep(0.2)
    rc, _, err = _run(2, ["--resume", "auto", "--out", out, "--data", dataset, "--epochs", str(EPOCHS),
                          "--no-progress"])
    assert rc == 0, err
    a, b = _params(uninterrupted_2), _params(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@needs_mpi
def test_hung_rank_times_out_with_an_error(dataset, tmp_path):
    out = str(tmp_path / "D")
    p = _mpirun(2, ["--data", dataset, "--batch-size", "16", "--epochs", "400", "--out", out, "--comm-timeout", "3",
                    *SMALL])
    deadline = time.monotonic() + 120
    victim = _rank_pid(p, 1, deadline)
    _wait_for_step(out, 2, deadline)
    os.kill(victim, signal.SIGSTOP)  # alive but silent: only the timeout can notice
    try:
        _, err = p.communicate(timeout=90)
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert p.returncode != 0
    assert "rank 0" in err and "no answer from the other ranks within 3 s" in err, err
    assert "MPI_Abort" in err


def test_scaling_note_counts_the_papers_parameters():
    """benchmarks/scaling.py (docs/SCALING.md's tables) against the paper's merged layer shapes (README)."""
    shapes = [(96, 3, 11, 11), (256, 48, 5, 5), (384, 256, 3, 3), (384, 192, 3, 3), (256, 192, 3, 3),
              (4096, 9216), (4096, 4096), (1000, 4096)]
    total = sum(int(np.prod(s)) + s[0] for s in shapes)
    fc = sum(int(np.prod(s)) + s[0] for s in shapes[5:])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scaling.py")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"Parameters: {total:,} ({4 * total / 1e6:.1f} MB" in r.stdout
    assert f"fc6-fc8 hold {fc:,}" in r.stdout
    # The 8-GPU row: a ring sends 2 * 7/8 of the gradients per GPU.
    assert f"| 8 | NVLink | {2 * 7 / 8 * 4 * total / 1e6:.0f} |" in r.stdout
