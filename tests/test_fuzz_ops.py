"""The op fuzzer (tests/fuzz_ops.py) in CI: a bounded, seeded run over every op on the CPU backend, each call
in a child process, failing on any crash, hang, disagreement with the reference or badly formed error.
Set AX_FUZZ_SEED / AX_FUZZ_CALLS to replay or widen a run; `python tests/fuzz_ops.py --calls 10000` is the
long one."""
import json
import os

import numpy as np
import pytest

import fuzz_ops

SEED = int(os.environ.get("AX_FUZZ_SEED", "20261128"))
CALLS = int(os.environ.get("AX_FUZZ_CALLS", "3000"))


def _describe(findings, calls):
    by_id = {c["id"]: c for c in calls}
    return "\n".join(f"{f['outcome']} {f['op']}: {f.get('detail', '')}\n    call: {json.dumps(by_id[f['id']])}"
                     for f in findings[:20])


def test_fuzzed_op_calls_never_crash_hang_or_disagree_with_the_reference():
    ops = fuzz_ops.all_ops()
    calls = fuzz_ops.generate(SEED, CALLS, ops)
    results = fuzz_ops.run_calls(calls)
    s = fuzz_ops.summarize(results, 0.0)
    print(f"seed {SEED}: {s['outcomes']}")
    assert not s["findings"], f"seed {SEED}:\n" + _describe(s["findings"], calls)
    # The run must exercise both sides of every op: calls that return a checked result and calls rejected.
    for op in ops:
        outcomes = {r["outcome"] for r in results if r["op"] == op}
        assert {"ok", "rejected"} <= outcomes, (op, outcomes)


def test_every_op_is_covered_by_the_generator():
    rng = np.random.default_rng(0)
    for op in fuzz_ops.all_ops():
        args, kwargs, _ = fuzz_ops._valid_call(rng, op)  # raises KeyError for an op the fuzzer does not know
        assert args


def test_harness_reports_a_crash_a_hang_and_a_wrong_result_and_carries_on():
    """The harness itself can fail: a child that segfaults, one that never answers, and an answer off by one
    are each reported against their call, and the calls after them still run in a fresh child."""
    x = fuzz_ops.T((2, 3))
    calls = [dict(id=i, op=op, args=[x], kwargs={}, meta={}, seed=i)
             for i, op in enumerate(["relu_forward", "__segfault__", "relu_forward", "__hang__", "__wrong__",
                                     "relu_forward"])]
    results = fuzz_ops.run_calls(calls, batch=10, call_timeout=3.0)
    assert [r["outcome"] for r in results] == ["ok", "crash", "ok", "hang", "wrong", "ok"], results
    assert "exit status -11" in results[1]["detail"]


@pytest.mark.parametrize("call,outcome,pattern", [
    # The reproducers as fuzzer calls: each is answered with a one-line error naming op and argument.
    (dict(op="conv2d_backward_input", args=[fuzz_ops.T((1, 1, 1, 1)), fuzz_ops.T((1, 1, 1, 1)), [2**30, 2**30]],
          kwargs={}), "rejected", r"ValueError: conv2d_backward_input: argument 'input_hw'"),
    (dict(op="maxpool_backward", args=[fuzz_ops.T((1, 1, 1, 1)), fuzz_ops.T((1, 1, 1, 1), "i32", "int:0:0"),
                                      [2**30, 2**30]], kwargs=dict(window=1, stride=1, padding=0)),
     "rejected", r"ValueError: maxpool_backward: argument 'input_hw'"),
    (dict(op="conv2d_forward", args=[fuzz_ops.T((1, 4, 3, 7)), fuzz_ops.T((4, 2, 2, 4)), fuzz_ops.T((4,))],
          kwargs=dict(stride=[1, 3], padding=[0, 2**31 - 1], groups=2)),
     "rejected", r"ValueError: conv2d_forward: argument 'padding'"),
    (dict(op="conv2d_forward", args=[fuzz_ops.T((1, 2, 3, 7)), fuzz_ops.T((4, 2, 2, 4))],
          kwargs=dict(stride=[2**31 - 1, 2**31 - 1], padding=1)), "ok", ""),
    (dict(op="dropout_backward", args=[fuzz_ops.T((2, 4)), fuzz_ops.T((2, 4), "u8", "int:0:255")],
          kwargs=dict(p=0.3)), "rejected", r"ValueError: dropout_backward: argument 'mask'"),
])
def test_known_bad_calls(call, outcome, pattern):
    import re

    r = fuzz_ops.run_calls([dict(call, id=0, meta={}, seed=1)])[0]
    assert r["outcome"] == outcome, r
    assert re.match(pattern, r.get("detail", "")), r


_ARRAY_CHILD = r"""
import json, sys
import numpy as np, alexnet_cuda as ax
rng = np.random.default_rng(int(sys.argv[1]))
dtypes = ["<f4", ">f4", "<f8", "<f2", "u1", "i1", "<i4", ">i4", "<i8", "<u8", "?", "<c8", "<c16", "U3", "S3", "O",
          "V4", [("a", "<f4")], [("a", "<f4"), ("b", "u1")], "<M8[s]", "<m8[s]", ("<f4", (2,))]
net = ax.Net(ax.tiny_config(), devices="cpu", seed=0)
base = net.state_dict()
key = "conv1.t0.bias"
out = []
for i in range(int(sys.argv[2])):
    dt = dtypes[int(rng.integers(len(dtypes)))]
    shape = [tuple(int(d) for d in rng.integers(0, 4, int(rng.integers(0, 4)))), base[key].shape][int(rng.integers(2))]
    a = np.zeros(shape, dtype=dt)
    if a.dtype.kind in "fiu" and a.size:
        a[...] = rng.integers(-3, 4, a.shape)
    if rng.random() < 0.3 and a.ndim >= 1 and a.shape[-1] > 1:
        a = a[..., ::2]  # not contiguous
    try:
        t = ax.from_numpy(a)
        ok = t.numpy().dtype == a.dtype and np.array_equal(t.numpy(), a)
        out.append(["from_numpy", str(a.dtype), "ok" if ok else "WRONG"])
    except (TypeError, ValueError) as e:
        out.append(["from_numpy", str(a.dtype), "rejected" if str(e).startswith("from_numpy: argument") else "BAD " + str(e)])
    sd = dict(base)
    sd[key] = a
    try:
        net.load_state_dict(sd)
        got = net.state_dict()[key]
        ok = a.shape == got.shape and np.array_equal(got, a.astype(np.float32))
        out.append(["load_state_dict", str(a.dtype), "ok" if ok else "WRONG"])
    except (TypeError, ValueError) as e:
        good = str(e).startswith("load_state_dict: ") and key in str(e)
        out.append(["load_state_dict", str(a.dtype), "rejected" if good else "BAD " + str(e)])
print(json.dumps(out))
"""


def test_arrays_of_every_dtype_are_converted_exactly_or_refused():
    """from_numpy and load_state_dict given arrays of every NumPy dtype kind (strings, bytes, objects,
    structured, complex, datetime, other byte order, non-contiguous, zero-size): each is refused with a
    named error or converted exactly, in a child process (these used to crash the interpreter)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _ARRAY_CHILD, str(SEED), "300"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"exit status {p.returncode}: {p.stderr[-2000:]}"
    results = json.loads(p.stdout)
    bad = [r for r in results if r[2] not in ("ok", "rejected")]
    assert not bad, bad[:10]
    # Both answers occur for both entry points, and a valid float32 state entry always loads.
    assert {("from_numpy", "ok"), ("from_numpy", "rejected"), ("load_state_dict", "ok"),
            ("load_state_dict", "rejected")} <= {(r[0], r[2]) for r in results}
    assert all(r[2] == "rejected" for r in results if r[1] in ("<U3", "|S3", "object", "complex64"))
