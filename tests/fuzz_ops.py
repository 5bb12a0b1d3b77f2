"""Fuzzer for alexnet_cuda.ops on the CPU backend: hostile and random arguments, each call in a child process.

Every call must either raise ValueError/TypeError (or MemoryError) whose message names the op, or return a
result that agrees with alexnet_cuda.reference within DESIGN.md's tolerances (1e-5 relative error for
elementwise ops, 1e-4 for reductions and convolutions, integer outputs exact). A crash (the child dies on a
signal), a hang (no answer within the per-call timeout), any other exception, a message that does not name
the op, or a disagreeing result is a finding, reported with the call that caused it.

Calls are generated from a seed: each starts as a small valid call of a random op (consistent shapes), and
most are then mutated: an int argument becomes an int32-edge value (0, 1, -1, 2^30, 2^31-1, 2^31, 2^32+1,
2^63-1, 2^64, negative), a float becomes NaN/inf/negative/huge, a tensor gets another shape (zero-size
dimensions next to 2^31-sized ones included), dtype or contents (labels, offsets, masks, argmax at the
edges), or is replaced by something that is not a tensor. Calls run in batches per child process (a child
that dies is replaced and resumes after the offending call).

    python tests/fuzz_ops.py --calls 10000 --seed 1          # the long run; prints the figures
    python tests/fuzz_ops.py --calls 200 --seed 7 --show     # and prints every finding's call

tests/test_fuzz_ops.py runs a bounded number of calls in CI.
"""
import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

import numpy as np

INT_EDGES = [0, 1, -1, 2**30, 2**31 - 1, 2**31, 2**32 + 1, 2**63 - 1, 2**64, -(2**31), -(2**31) - 1, -(2**63), -7]
INT32_EDGES = [0, 1, -1, 2**30, 2**31 - 1, -(2**31), 2**16, -7]  # what fits in an int32 tensor element
FLOAT_EDGES = ["nan", "inf", "-inf", -1.0, 0.0, 1e300, -1e-30, 2.0**31, 1.0]
DIM_EDGES = [0, 1, 2, 3, 5, 2**31, 2**31 - 1, 2**32 + 1]
NOT_TENSORS = [None, 3, 2.5, "x", [1.0], {"np": [3]}]

ELEMENTWISE, REDUCTION = 1e-5, 1e-4
TOL = {
    "conv2d_forward": REDUCTION, "conv2d_backward_input": REDUCTION, "conv2d_backward_weight": REDUCTION,
    "conv2d_backward_bias": REDUCTION, "linear_forward": REDUCTION, "linear_backward_input": REDUCTION,
    "linear_backward_weight": REDUCTION, "linear_backward_bias": REDUCTION, "lrn_forward": REDUCTION,
    "lrn_backward": REDUCTION, "lrn_maxpool_forward": REDUCTION, "softmax_cross_entropy_forward": REDUCTION,
    "softmax_cross_entropy_backward": REDUCTION, "softmax_forward": REDUCTION, "maxpool_backward": ELEMENTWISE,
}
# Above this many elements (inputs and outputs) or multiply-adds a result is not checked against the
# float64 reference (it would take too long); it is still required not to crash.
CHECK_ELEMENTS, CHECK_WORK = 200_000, 20_000_000


# ---- call generation (parent) ----------------------------------------------------------------------------

def T(shape, dtype="f32", fill="randn", **extra):
    """A tensor argument: built in the child from this description (fill 'randn', 'int:lo:hi', 'mask', ...)."""
    return dict(T=[int(d) for d in shape], dtype=dtype, fill=fill, **extra)


def D(kind, index, **params):
    """A tensor the child derives by running an op on valid arguments first (e.g. the argmax of a max-pool)."""
    return dict(D=kind, index=index, **params)


def _valid_call(rng, op):
    """A small valid call of `op`: (args, kwargs, meta). meta['compare'] says whether the result can be
    compared with the reference (lrn_backward's y and scale must come from lrn_forward, for instance)."""
    r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
    if op.startswith("conv2d"):
        G = r(1, 2)
        Cg, Kg, R, S, sh, sw, ph, pw = r(1, 3), r(1, 3), r(1, 4), r(1, 4), r(1, 3), r(1, 3), r(0, 2), r(0, 2)
        N = r(1, 3)
        H, W = r(max(1, R - 2 * ph), R + 5), r(max(1, S - 2 * pw), S + 5)
        P, Q = (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1
        C, K = G * Cg, G * Kg
        common = dict(stride=[sh, sw], padding=[ph, pw], groups=G)
        if op == "conv2d_forward":
            return [T((N, C, H, W)), T((K, Cg, R, S)), T((K,)) if rng.random() < 0.7 else None], common, {}
        if op == "conv2d_backward_input":
            return [T((N, K, P, Q)), T((K, Cg, R, S)), [H, W]], common, {}
        if op == "conv2d_backward_weight":
            return [T((N, C, H, W)), T((N, K, P, Q)), [R, S]], common, {}
        return [T((N, K, P, Q))], {}, {}
    if op.startswith("linear"):
        N, I, O = r(1, 5), r(1, 7), r(1, 7)
        if op == "linear_forward":
            return [T((N, I)), T((O, I)), T((O,)) if rng.random() < 0.7 else None], {}, {}
        if op == "linear_backward_input":
            return [T((N, O)), T((O, I))], {}, {}
        if op == "linear_backward_weight":
            return [T((N, I)), T((N, O))], {}, {}
        return [T((N, O))], {}, {}
    shape4 = (r(1, 3), r(1, 7), r(1, 5), r(1, 5))
    if op == "relu_forward":
        return [T(shape4)], {}, {}
    if op == "relu_backward":
        return [T(shape4), T(shape4)], {}, {}
    if op == "lrn_maxpool_forward":
        wh, ww, sh, sw = r(1, 4), r(1, 4), r(1, 3), r(1, 3)
        ph, pw = r(0, wh - 1), r(0, ww - 1)
        H, W = r(max(1, wh - 2 * ph), wh + 5), r(max(1, ww - 2 * pw), ww + 5)
        params = dict(size=2 * r(0, 3) + 1, k=float(rng.uniform(0.5, 3)), alpha=float(rng.uniform(0, 1e-2)),
                      beta=float(rng.uniform(0.25, 1.0)), window=[wh, ww], stride=[sh, sw], padding=[ph, pw])
        return [T((r(1, 3), r(1, 7), H, W))], params, {}
    if op.startswith("lrn"):
        params = dict(size=2 * r(0, 3) + 1, k=float(rng.uniform(0.5, 3)), alpha=float(rng.uniform(0, 1e-2)),
                      beta=float(rng.uniform(0.25, 1.0)))
        if op == "lrn_forward":
            return [T(shape4)], params, {}
        x = T(shape4, seed=int(rng.integers(2**31)))
        fwd = dict(x=x, **params)
        return [T(shape4), x, D("lrn", 0, **fwd), D("lrn", 1, **fwd)], params, {}
    if op.startswith("maxpool"):
        wh, ww, sh, sw = r(1, 4), r(1, 4), r(1, 3), r(1, 3)
        ph, pw = r(0, wh - 1), r(0, ww - 1)
        N, C = r(1, 3), r(1, 4)
        H, W = r(max(1, wh - 2 * ph), wh + 5), r(max(1, ww - 2 * pw), ww + 5)
        params = dict(window=[wh, ww], stride=[sh, sw], padding=[ph, pw])
        if op == "maxpool_forward":
            return [T((N, C, H, W))], params, {}
        P, Q = (H + 2 * ph - wh) // sh + 1, (W + 2 * pw - ww) // sw + 1
        am = D("maxpool", 1, x=T((N, C, H, W), seed=int(rng.integers(2**31))), **params)
        return [T((N, C, P, Q)), am, [H, W]], params, {}
    if op == "dropout_forward":
        return [T(shape4)], dict(p=float(rng.uniform(0, 0.95)), seed=int(rng.integers(2**63)),
                                 offset=int(rng.integers(2**40))), {}
    if op == "dropout_backward":
        return [T(shape4), T(shape4, "u8", "mask")], dict(p=float(rng.uniform(0, 0.95))), {}
    if op.startswith("softmax"):
        N, C = r(1, 6), r(1, 9)
        labels = T((N,), "i32", f"int:0:{C - 1}")
        if op == "softmax_cross_entropy_forward":
            return [T((N, C)), labels], {}, {}
        if op == "softmax_cross_entropy_backward":
            return [T((N, C), fill="probs"), labels, float(rng.uniform(0.01, 2))], {}, {}
        return [T((N, C))], {}, {}
    if op == "sgd_update":
        s = shape4[: r(1, 4)]
        return [T(s), T(s), T(s), float(rng.uniform(0, 0.1))], dict(momentum=float(rng.uniform(0, 0.99)),
                                                                    weight_decay=float(rng.uniform(0, 1e-3))), {}
    if op == "sgd_update_multi":
        params = []
        for _ in range(r(0, 3)):
            s = shape4[: r(1, 4)]
            params.append([T(s), T(s), T(s), float(rng.uniform(0, 1e-3))])
        return [params, float(rng.uniform(0, 0.1))], dict(momentum=float(rng.uniform(0, 0.99))), {}
    if op == "concat_channels":
        rest = (r(1, 4), r(1, 4)) if rng.random() < 0.5 else ()
        N = r(1, 3)
        return [[T((N, r(1, 4)) + rest) for _ in range(r(1, 3))]], {}, {}
    if op == "split_sum_channels":
        parts = r(1, 3)
        rest = (r(1, 4), r(1, 4)) if rng.random() < 0.5 else ()
        shape = (r(1, 3), parts * r(1, 3)) + rest
        return [[T(shape) for _ in range(r(1, 3))], parts], {}, {}
    if op == "slice_channels":
        C = r(1, 6)
        c0 = r(0, C - 1)
        shape = (r(1, 3), C) + ((r(1, 4), r(1, 4)) if rng.random() < 0.5 else ())
        return [T(shape), c0, r(c0 + 1, C)], {}, {}
    if op == "add":
        return [T(shape4), T(shape4)], {}, {}
    if op == "augment_batch":
        N, H, W = r(1, 3), r(1, 9), r(1, 9)
        crop = r(1, min(H, W))
        return [T((N, H, W, 3), "u8", "int:0:255"), T((N, 2), "i32", f"offsets:{H - crop}:{W - crop}"),
                T((N,), "u8", "int:0:1"), T((N, 3)), T((3, H, W), fill="uniform:0:255"), crop], {}, {}
    raise KeyError(op)


def _mutate_tensor(rng, t):
    choice = rng.integers(6)
    if choice == 0 and "T" in t:  # another shape: small dims, edge dims next to a zero
        nd = int(rng.integers(0, 6))
        dims = [int(rng.integers(0, 6)) for _ in range(nd)]
        if nd and rng.random() < 0.5:
            dims[int(rng.integers(nd))] = 0
            dims[int(rng.integers(nd))] = int(rng.choice(DIM_EDGES))
        return dict(t, T=dims)
    if choice == 1 and "T" in t and t["T"]:  # one dimension off by a little
        dims = list(t["T"])
        i = int(rng.integers(len(dims)))
        dims[i] = max(0, dims[i] + int(rng.choice([-1, 1, 2])))
        return dict(t, T=dims)
    if choice == 2:  # another dtype
        return dict(T=t.get("T", [2, 3]), dtype=str(rng.choice(["f32", "u8", "i32"])), fill="int:0:3")
    if choice == 3 and "T" in t:  # edge contents
        if t["dtype"] == "i32":
            return dict(t, fill="edges")
        if t["dtype"] == "u8":
            return dict(t, fill="int:0:255")
        return dict(t, fill=str(rng.choice(["nonfinite", "huge", "zeros"])))
    if choice == 4:
        return dict(N=int(rng.integers(len(NOT_TENSORS))))
    return dict(t, T=[]) if "T" in t else t  # a 0-d tensor


def _mutate_scalar(rng, v):
    if isinstance(v, bool) or v is None:
        return int(rng.choice(INT_EDGES))
    if isinstance(v, int):
        return int(rng.choice(INT_EDGES)) if rng.random() < 0.8 else int(rng.integers(-3, 12))
    if isinstance(v, float):
        e = rng.choice(np.array(FLOAT_EDGES, dtype=object))
        return e if isinstance(e, str) else float(e)
    if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
        i = int(rng.integers(2))
        out = list(v)
        out[i] = int(rng.choice(INT_EDGES))
        if rng.random() < 0.3:
            out[1 - i] = int(rng.choice(INT_EDGES))
        return out
    return v


def _odd_value(rng):
    return [None, "3", True, 2.5, [1, 2, 3], (), 1j][int(rng.integers(7))]


def generate(seed, n_calls, ops):
    """n_calls call descriptions (JSON-able dicts), reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    calls = []
    for i in range(n_calls):
        op = str(rng.choice(ops))
        args, kwargs, meta = _valid_call(rng, op)
        n_mut = int(rng.choice([0, 1, 1, 1, 2, 3]))
        for _ in range(n_mut):
            slots = [("a", j) for j in range(len(args))] + [("k", k) for k in kwargs]
            if not slots:
                break
            kind, key = slots[int(rng.integers(len(slots)))]
            container = args if kind == "a" else kwargs
            v = container[key]
            if rng.random() < 0.08:
                odd = _odd_value(rng)
                container[key] = dict(V="j") if isinstance(odd, complex) else dict(V=odd)
            elif isinstance(v, dict) and ("T" in v or "D" in v):
                container[key] = _mutate_tensor(rng, v)
            elif isinstance(v, list) and v and isinstance(v[0], dict):  # concat's list of tensors
                j = int(rng.integers(len(v)))
                v[j] = _mutate_tensor(rng, v[j])
            else:
                container[key] = _mutate_scalar(rng, v)
            if op == "lrn_backward" and key != 0:
                meta["compare"] = False  # y and scale no longer come from lrn_forward(x) with these settings
        calls.append(dict(id=i, op=op, args=args, kwargs=kwargs, meta=meta, seed=int(rng.integers(2**31))))
    return calls


# ---- the child: builds each call, runs it, checks it, answers one JSON line per call ---------------------

def _child_main():
    import resource

    # A valid call asking for more memory than this gets MemoryError (an answer) instead of the OOM killer.
    limit = int(os.environ.get("AX_FUZZ_MEM_LIMIT", str(6 << 30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import alexnet_cuda as ax
    from alexnet_cuda import reference as ref

    ax.set_poison_allocations(True)
    out = sys.stdout
    for line in sys.stdin:
        call = json.loads(line)
        out.write(json.dumps(dict(start=call["id"])) + "\n")
        out.flush()
        out.write(json.dumps(_run_one(ax, ref, call)) + "\n")
        out.flush()


def _fill(rng, shape, dtype, fill):
    npdt = dict(f32=np.float32, u8=np.uint8, i32=np.int32)[dtype]
    n = int(np.prod(shape, dtype=object)) if shape else 1
    if n == 0:
        return np.zeros(shape, npdt)
    kind, *p = fill.split(":")
    if kind == "randn":
        a = rng.standard_normal(shape)
    elif kind == "uniform":
        a = rng.uniform(float(p[0]), float(p[1]), shape)
    elif kind == "int":
        a = rng.integers(int(p[0]), int(p[1]) + 1, shape)
    elif kind == "mask":
        a = rng.random(shape) < 0.6
    elif kind == "probs":
        z = rng.standard_normal(shape)
        a = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True) if len(shape) == 2 else z
    elif kind == "offsets":  # (N, 2) rows inside [0, hi]
        a = np.stack([rng.integers(0, int(p[0]) + 1, shape[0]), rng.integers(0, int(p[1]) + 1, shape[0])], 1) \
            if len(shape) == 2 and shape[1] == 2 else rng.integers(0, 3, shape)
    elif kind == "edges":
        a = rng.choice(np.array(INT32_EDGES), shape)
    elif kind == "nonfinite":
        a = rng.standard_normal(shape)
        a.flat[int(rng.integers(a.size))] = rng.choice([np.nan, np.inf, -np.inf])
    elif kind == "huge":  # large, yet squares and sums stay finite in float32 (beyond that float32 overflow is
        a = rng.standard_normal(shape) * 1e15  # the contract, not a wrong result)
    elif kind == "zeros":
        a = np.zeros(shape)
    else:
        raise ValueError(fill)
    return np.asarray(np.asarray(a).astype(npdt))  # an ndarray even for a 0-d shape


class _Skip(Exception):
    pass


def _build(ax, ref, v, rng, cache):
    """(object for the op, numpy value for the reference)."""
    if isinstance(v, list):
        if v and isinstance(v[0], (dict, list)):  # tensors (concat), or sgd_update_multi's (w, dw, v, wd) lists
            pairs = [_build(ax, ref, x, rng, cache) for x in v]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        return v, v
    if not isinstance(v, dict):
        if isinstance(v, str) and v in ("nan", "inf", "-inf"):
            return float(v), float(v)
        return v, v
    if "V" in v:
        o = 1j if v["V"] == "j" else v["V"]
        return o, o
    if "N" in v:
        o = NOT_TENSORS[v["N"]]
        if isinstance(o, dict):
            o = np.zeros(o["np"], np.float32)
        return o, o
    if "T" in v:
        r = np.random.default_rng(v.get("seed", int(rng.integers(2**31))))
        try:
            a = _fill(r, tuple(v["T"]), v["dtype"], v["fill"])
        except (ValueError, MemoryError, OverflowError) as e:  # numpy cannot make it: the call is not made
            raise _Skip(f"numpy: {e}")
        return ax.from_numpy(a, v.get("device", "cpu")), a
    if "D" in v:
        key = json.dumps(v, sort_keys=True)
        if key not in cache:
            x, xa = _build(ax, ref, v["x"], rng, cache)
            kw = {k: val for k, val in v.items() if k not in ("D", "index", "x")}
            fn = ax.ops.lrn_forward if v["D"] == "lrn" else ax.ops.maxpool_forward
            outs = fn(x, **kw)
            cache[key] = outs
        t = cache[key][v["index"]]
        return t, t.numpy()
    raise ValueError(v)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _f32(v):
    """Float arguments reach the op as float32: give the reference the same rounded values."""
    if isinstance(v, float):
        return float(np.float32(v))
    return v


def _work(op, ref_args):
    shapes = [np.shape(a) for a in ref_args if isinstance(a, np.ndarray)]
    total = sum(int(np.prod(s)) for s in shapes)
    return total, total * max([s[-1] * s[-2] if len(s) >= 2 else 1 for s in shapes] or [1])


def _run_one(ax, ref, call):
    op = call["op"]
    rng = np.random.default_rng(call["seed"])
    t0 = time.perf_counter()
    res = dict(id=call["id"], op=op)
    try:
        if op.startswith("__"):  # harness self-tests: a crash, a hang, a wrong answer
            if op == "__segfault__":
                import ctypes
                ctypes.string_at(0)
            if op == "__hang__":
                time.sleep(3600)
        cache = {}
        built = [_build(ax, ref, a, rng, cache) for a in call["args"]]
        kbuilt = {k: _build(ax, ref, v, rng, cache) for k, v in call["kwargs"].items()}
    except _Skip as e:
        return dict(res, outcome="skipped", detail=str(e))
    except Exception as e:  # noqa: BLE001  a fault of the fuzzer itself, reported as such
        return dict(res, outcome="harness_error", detail=f"{type(e).__name__}: {str(e)[:300]}")
    args = [b[0] for b in built]
    kwargs = {k: b[0] for k, b in kbuilt.items()}
    try:
        fn = getattr(ax.ops, op) if not op.startswith("__") else ax.ops.relu_forward
        out = fn(*args, **kwargs)
    except (ValueError, TypeError, MemoryError) as e:
        msg = str(e)
        named = op in msg.split(":")[0] or msg.startswith(op)
        kind = "memory" if isinstance(e, MemoryError) else "rejected"
        if "\n" in msg.strip() or not named:
            return dict(res, outcome="bad_error", detail=f"{type(e).__name__}: {msg[:300]}")
        return dict(res, outcome=kind, detail=f"{type(e).__name__}: {msg[:160]}")
    except Exception as e:  # noqa: BLE001  anything else is a finding
        return dict(res, outcome="bad_error", detail=f"{type(e).__name__}: {str(e)[:300]}")
    res["seconds"] = time.perf_counter() - t0
    if not call["meta"].get("compare", True):
        return dict(res, outcome="unchecked", detail="inputs not from the forward pass")
    ref_args = [_f32(b[1]) for b in built]
    ref_kwargs = {k: _f32(b[1]) for k, b in kbuilt.items()}
    x_ref = ref_args[0 if op in ("lrn_forward", "lrn_maxpool_forward") else 1] if op.startswith("lrn") else None
    if isinstance(x_ref, np.ndarray) and x_ref.ndim == 4 and isinstance(ref_kwargs.get("size"), int):
        # A window wider than 2C+1 covers every channel either way; the reference pads by size, so narrow it.
        ref_kwargs["size"] = min(ref_kwargs["size"], 2 * x_ref.shape[1] + 1)
    if op == "sgd_update":
        got = (args[0].numpy(), args[2].numpy())
    elif op == "sgd_update_multi":
        got = tuple(t.numpy() for p in args[0] for t in (p[0], p[2]))
    else:
        got = tuple(t.numpy() for t in _as_tuple(out))
    n_el, work = _work(op, [a for a in ref_args if isinstance(a, np.ndarray)] + list(got))
    if n_el > CHECK_ELEMENTS or work > CHECK_WORK:
        return dict(res, outcome="unchecked", detail="too large for the reference")
    try:
        with np.errstate(all="ignore"):
            fn_ref = getattr(ref, op if not op.startswith("__") else "relu_forward")
            want = _as_tuple(fn_ref(*ref_args, **ref_kwargs))
    except Exception as e:  # noqa: BLE001
        return dict(res, outcome="ref_failed", detail=f"{type(e).__name__}: {str(e)[:200]}")
    if op == "__wrong__":
        got = tuple(g + 1 for g in got)
    tol = TOL.get(op, ELEMENTWISE)
    for i, (g, w) in enumerate(zip(got, want)):
        w = np.asarray(w)
        if g.shape != w.shape:
            return dict(res, outcome="wrong", detail=f"output {i}: shape {g.shape}, reference {w.shape}")
        if w.dtype.kind in "iub":
            if not np.array_equal(g.astype(np.int64), w.astype(np.int64)):
                return dict(res, outcome="wrong", detail=f"output {i}: integer output differs")
            continue
        if not np.all(np.isfinite(w)) or (w.size and np.max(np.abs(w)) > 1e37):
            return dict(res, outcome="unchecked", detail="reference outside float32's finite range")
        g64 = g.astype(np.float64)
        if not np.all(np.isfinite(g64)):
            return dict(res, outcome="wrong", detail=f"output {i}: NaN or inf where the reference is finite")
        err = np.linalg.norm(g64 - w)
        if err > tol * np.linalg.norm(w) + 1e-35 * np.sqrt(w.size):
            return dict(res, outcome="wrong", detail=f"output {i}: relative error {err / (np.linalg.norm(w) or 1):.3g}"
                                                     f" > {tol}")
    return dict(res, outcome="ok")


# ---- the parent: batches, timeouts, restarts ---------------------------------------------------------------

FINDINGS = ("crash", "hang", "wrong", "bad_error", "ref_failed", "harness_error")


def run_calls(calls, batch=250, call_timeout=20.0, env=None, on_result=None):
    """Runs the calls in child processes; returns one result dict per call (outcome in ok, unchecked,
    rejected, memory, skipped, ref_failed, crash, hang, wrong, bad_error)."""
    results = {}
    pending = list(calls)
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONHASHSEED"] = "0"
    while pending:
        chunk, pending = pending[:batch], pending[batch:]
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env)
        lines = queue.Queue()

        def reader(stream=proc.stdout, q=lines):
            for ln in stream:
                q.put(ln)
            q.put(None)

        def err_reader(stream=proc.stderr, acc=[]):  # noqa: B006  drained so the child never blocks on it
            for ln in stream:
                acc.append(ln)

        threading.Thread(target=reader, daemon=True).start()
        err_acc = []
        threading.Thread(target=err_reader, args=(proc.stderr, err_acc), daemon=True).start()

        def feed(p=proc, c=chunk):
            try:
                for call in c:
                    p.stdin.write(json.dumps(call) + "\n")
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass

        threading.Thread(target=feed, daemon=True).start()
        current, done_ids = None, set()
        failure = None
        while True:
            try:
                ln = lines.get(timeout=call_timeout if current is not None else call_timeout + 60)
            except queue.Empty:
                failure = "hang"
                break
            if ln is None:
                break
            msg = json.loads(ln)
            if "start" in msg:
                current = msg["start"]
                continue
            results[msg["id"]] = msg
            done_ids.add(msg["id"])
            current = None
            if on_result:
                on_result(msg)
        if failure == "hang":
            proc.kill()
        rc = proc.wait()
        if current is not None and current not in results:
            outcome = failure or "crash"
            call = next(c for c in chunk if c["id"] == current)
            detail = f"child exit status {rc}" if outcome == "crash" else f"no answer in {call_timeout} s"
            tail = "".join(err_acc)[-300:].strip()
            results[current] = dict(id=current, op=call["op"], outcome=outcome,
                                    detail=detail + (f"; stderr: {tail}" if tail else ""))
            done_ids.add(current)
            if on_result:
                on_result(results[current])
        elif rc != 0 and len(done_ids) < len(chunk):
            raise RuntimeError(f"fuzz child failed outside a call (exit {rc}): {''.join(err_acc)[-2000:]}")
        # Whatever this child did not reach goes to the next one.
        pending = [c for c in chunk if c["id"] not in done_ids] + pending
    return [results[c["id"]] for c in calls]


def all_ops():
    import alexnet_cuda as ax

    return sorted(n for n in dir(ax.ops) if not n.startswith("_"))


def summarize(results, seconds):
    counts = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return dict(calls=len(results), seconds=round(seconds, 1), outcomes=counts,
                findings=[r for r in results if r["outcome"] in FINDINGS])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=250, help="calls per child process")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds one call may take before it is a hang")
    ap.add_argument("--ops", default="", help="comma-separated op names (default: every op in alexnet_cuda.ops)")
    ap.add_argument("--show", action="store_true", help="print each finding's full call")
    ap.add_argument("--json", help="write the summary and findings here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child_main()
        return 0
    ops = a.ops.split(",") if a.ops else all_ops()
    calls = generate(a.seed, a.calls, ops)
    t0 = time.time()
    results = run_calls(calls, batch=a.batch, call_timeout=a.timeout)
    s = summarize(results, time.time() - t0)
    by_id = {c["id"]: c for c in calls}
    print(f"calls {s['calls']}  seconds {s['seconds']}  seed {a.seed}")
    print("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())))
    for f in FINDINGS:
        print(f"{f}: {s['outcomes'].get(f, 0)}")
    for r in s["findings"]:
        print(f"FINDING {r['outcome']} call {r['id']} {r['op']}: {r.get('detail', '')}")
        if a.show:
            print("   ", json.dumps(by_id[r["id"]]))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(s, seed=a.seed, calls_list=[by_id[r["id"]] for r in s["findings"]]), fh, indent=1)
    return 1 if s["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
