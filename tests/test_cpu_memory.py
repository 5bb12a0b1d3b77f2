"""The CPU caching allocator (csrc/tensor.cpp): a steady-state training step asks the system for no memory, the
cache changes no result, recycled blocks are poisoned like fresh ones, and blocks a step stops using go back."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import alexnet_cuda as ax

pytestmark = pytest.mark.skipif(not ax.cpu_allocator_stats()["caching"],
                                reason="ALEXNET_NO_CPU_MEMORY_CACHING is set: the cache is off in this process")


def small_config(**kw):
    return ax.tiny_config(**{"input_size": 32, **kw})


def batch(rng, cfg, n):
    s = cfg["input_size"]
    return (rng.standard_normal((n, 3, s, s)).astype(np.float32) * 30,
            rng.integers(0, cfg["num_classes"], n).astype(np.int32))


@pytest.fixture(autouse=True)
def empty_cache():
    """Each test counts from an empty cache, not from blocks an earlier test left."""
    ax.cpu_empty_cache()
    yield


def system_allocs():
    return ax.cpu_allocator_stats()["system_allocs"]


def test_steady_state_train_step_allocates_nothing(rng):
    """Both towers in turn on one CPU worker: the order of allocations repeats exactly from step to step."""
    cfg = small_config()
    net = ax.Net(cfg, devices="cpu", seed=int(rng.integers(0, 2**31)))
    x, y = batch(rng, cfg, 8)
    for _ in range(3):  # the first step allocates; the second finds the last step's loss and input still alive
        net.train_step(x, y, 0.01)
    before = system_allocs()
    losses = [net.train_step(x, y, 0.01)["loss"] for _ in range(2)]
    assert system_allocs() == before, "a steady-state step allocated from the system"
    assert all(np.isfinite(losses))


def test_two_worker_steps_stop_allocating(rng):
    """One worker per tower: the towers' allocations interleave differently each step, so a size may need one
    more block than any step so far needed (kept from then on); those stragglers are few and die out."""
    cfg = small_config()
    net = ax.Net(cfg, devices=("cpu", "cpu"), seed=int(rng.integers(0, 2**31)))
    x, y = batch(rng, cfg, 8)
    first = system_allocs()
    net.train_step(x, y, 0.01)
    first = system_allocs() - first
    for _ in range(2):
        net.train_step(x, y, 0.01)
    before = system_allocs()
    for _ in range(12):
        net.train_step(x, y, 0.01)
    assert system_allocs() - before <= first // 10, (system_allocs() - before, first)


def test_steady_state_u8_step_allocates_nothing(rng):
    cfg = small_config()
    net = ax.Net(cfg, devices="cpu", seed=1)
    net.set_input_mean(rng.uniform(0, 255, (3, 40, 40)).astype(np.float32))
    n = 8

    def raw():
        return (rng.integers(0, 256, (n, 40, 40, 3)).astype(np.uint8),
                rng.integers(0, 9, (n, 2)).astype(np.int32), rng.integers(0, 2, n).astype(np.uint8),
                rng.standard_normal((n, 3)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32))

    batches = [raw() for _ in range(5)]
    for b in batches[:3]:
        net.train_step_u8(*b, lr=0.01)
    before = system_allocs()
    for b in batches[3:]:
        net.train_step_u8(*b, lr=0.01)
    assert system_allocs() == before


TRAIN_SCRIPT = """
import json, sys
import numpy as np
import alexnet_cuda as ax
cfg = ax.tiny_config(input_size=32)
rng = np.random.default_rng(int(sys.argv[1]))
net = ax.Net(cfg, devices=("cpu", "cpu"), seed=3)
out = {"caching": ax.cpu_allocator_stats()["caching"], "loss": []}
for n in (8, 8, 4, 8):  # a change of batch size moves tensors between blocks of other sizes
    x = (rng.standard_normal((n, 3, 32, 32)) * 30).astype(np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    out["loss"].append(net.train_step(x, y, 0.01)["loss"])
out["logits"] = net.forward(x).tobytes().hex()
out["state"] = {k: v.tobytes().hex() for k, v in net.state_dict().items()}
print(json.dumps(out))
"""


def test_results_identical_with_and_without_caching(rng):
    seed = str(int(rng.integers(0, 2**31)))
    runs = {}
    for off in ("0", "1"):
        env = {**os.environ, "ALEXNET_NO_CPU_MEMORY_CACHING": off}
        r = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, seed], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        runs[off] = json.loads(r.stdout)
    assert runs["0"]["caching"] is True and runs["1"]["caching"] is False
    assert runs["0"]["loss"] == runs["1"]["loss"]
    assert runs["0"]["logits"] == runs["1"]["logits"]
    assert runs["0"]["state"] == runs["1"]["state"]


def test_recycled_blocks_are_poisoned_and_outputs_written_in_full(rng):
    """A block freed with data in it comes back filled with NaN bytes while poisoning is on (as the tests run),
    and an op's output on a recycled block is its full result: nothing of the previous tensor shows."""
    x = rng.standard_normal((64, 1000)).astype(np.float32)
    t = ax.from_numpy(x)
    stale = ax.ops.relu_forward(t)
    del stale  # its block, holding data, goes to the free list
    y = ax.ops.relu_forward(ax.from_numpy(-np.abs(x)))  # the same size: takes that block
    assert np.array_equal(y.numpy(), np.zeros_like(x))
    ax.set_poison_allocations(True)
    fresh = ax.ops.slice_channels(ax.from_numpy(np.concatenate([x, x], 1)), 0, 1000)
    assert np.array_equal(fresh.numpy(), x)


def test_trim_returns_blocks_two_steps_unused(rng):
    cfg = small_config()
    net = ax.Net(cfg, devices=("cpu", "cpu"), seed=2)
    for n in (16, 16, 16):
        net.train_step(*batch(rng, cfg, n), 0.01)
    cached_16 = ax.cpu_allocator_stats()["bytes_cached"]
    assert cached_16 > 0
    for n in (2, 2, 2):  # the batch-16 activations and temporaries are no longer used
        net.train_step(*batch(rng, cfg, n), 0.01)
    s = ax.cpu_allocator_stats()
    assert s["bytes_cached"] < cached_16 / 2, s
    before = system_allocs()
    net.train_step(*batch(rng, cfg, 2), 0.01)
    assert system_allocs() == before  # what the batch-2 steps use stayed
    ax.cpu_empty_cache()
    assert ax.cpu_allocator_stats()["bytes_cached"] == 0
