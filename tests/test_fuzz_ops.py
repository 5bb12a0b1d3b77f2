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
