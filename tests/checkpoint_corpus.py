"""Crafted checkpoints for the hostile-input tests, made at test time from a genuine checkpoint (no committed
binaries). build_corpus(good, folder) writes one file per case and returns [(case, path, expected text of
the one-line error)]. Each case changes one thing, so the expected error names exactly that problem."""
import copy
import io
import json
import os
import zipfile

import numpy as np

META = "__meta__.npy"


def read_members(path):
    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def write_members(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def npy(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=True)
    return buf.getvalue()


def array_of(data):
    return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)


def meta_of(members):
    return json.loads(array_of(members[META]).tobytes().decode("utf-8"))


def with_meta(members, meta):
    out = dict(members)
    out[META] = npy(np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8))
    return out


def member_data_offset(path, name):
    """Byte offset in the file of member `name`'s stored data (after its local header)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    n, m = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
    return info.header_offset + 30 + n + m, info.compress_size


def build_corpus(good, folder):
    """The crafted files; `good` is a genuine checkpoint of a tiny net (float32 parameters)."""
    os.makedirs(folder, exist_ok=True)
    base = read_members(good)
    meta = meta_of(base)
    weight = "net/conv1.t0.weight.npy"
    bias = "net/conv1.t0.bias.npy"
    w = array_of(base[weight])
    nb = array_of(base[bias]).shape[0]
    cases = []

    def add(case, members, expect):
        cases.append((case, write_members(os.path.join(folder, case + ".npz"), members), expect))

    def arr(case, name, value, expect):
        add(case, {**base, name: npy(value)}, expect)

    def meta_case(case, change, expect):
        m = copy.deepcopy(meta)
        change(m)
        add(case, with_meta(base, m), expect)

    arr("str_array", bias, np.array(["x"] * nb), "(str)")
    arr("bytes_array", bias, np.array([b"x"] * nb), "(bytes)")
    arr("structured_array", bias, np.zeros(nb, [("a", "<f4"), ("b", "<i4")]), "structured")
    arr("subarray_field", bias, np.zeros(nb, [("a", "<f4", (2,))]), "structured")
    arr("object_pickle", bias, np.array([object()] * nb, dtype=object), "object (pickle)")
    arr("complex_array", bias, np.zeros(nb, np.complex64), "(complex)")
    arr("bool_array", bias, np.zeros(nb, bool), "(bool)")
    arr("int_weight", weight, np.zeros(w.shape, np.int32), "(integer)")
    arr("float64_1e300", weight, np.full(w.shape, 1e300), "beyond float32's range")
    arr("nan_weight", weight, np.where(np.arange(w.size).reshape(w.shape) == 3, np.nan, w), "non-finite")
    arr("inf_bias", bias, np.full(nb, np.inf, np.float32), "non-finite")
    arr("wrong_shape", weight, np.zeros(w.shape[:-1] + (w.shape[-1] + 1,), np.float32), "has shape")
    arr("wrong_ndim", weight, np.zeros((2, 2, 2), np.float32), "dimension")
    arr("step_array_str", "net/meta/step.npy", np.array("12"), "(str)")
    arr("step_array_mismatch", "net/meta/step.npy", np.array(meta["step"] + 1, np.int64), "net/meta/step")
    arr("seed_array_negative", "net/meta/seed.npy", np.array(-1, np.int64), "net/meta/seed")
    arr("mean_wrong_shape", "extra/mean.npy", np.zeros((3, 5, 5), np.float32), "extra/mean")
    add("missing_parameter", {k: v for k, v in base.items() if k != weight}, "missing 'conv1.t0.weight'")
    add("unexpected_parameter", {**base, "net/conv9.t0.weight.npy": base[weight]}, "unexpected entry")
    add("unexpected_member", {**base, "evil.txt": b"hello"}, "unexpected member")
    add("missing_mean", {k: v for k, v in base.items() if k != "extra/mean.npy"}, "no mean image")
    add("no_metadata", {k: v for k, v in base.items() if k != META}, "not an alexnet_cuda checkpoint")
    add("meta_not_json", {**base, META: npy(np.frombuffer(b"{not json", np.uint8))}, "not valid JSON")
    add("meta_not_utf8", {**base, META: npy(np.frombuffer(b"\xff\xfe\x00", np.uint8))}, "not valid JSON")
    add("meta_as_float", {**base, META: npy(np.zeros(4, np.float32))}, "__meta__")
    for key in ("config", "train", "state"):
        meta_case(f"meta_missing_{key}", lambda m, k=key: m.pop(k), f"is missing '{key}'")
    meta_case("meta_step_string", lambda m: m.update(step="12"), "'step' must be an integer")
    meta_case("meta_step_negative", lambda m: (m.update(step=-1), m["state"].update(step=-1)), "'step' must be an integer")
    meta_case("meta_state_step_string", lambda m: m["state"].update(step="7"), "'state.step'")
    meta_case("meta_seed_negative", lambda m: m["train"].update(seed=-1), "'train.seed'")
    meta_case("meta_seed_65_bits", lambda m: m["train"].update(seed=2 ** 64), "'train.seed'")
    meta_case("meta_init_std_nan", lambda m: m["config"].update(init_std=float("nan")), "init_std")
    meta_case("meta_conv1_int", lambda m: m["config"].update(conv1=5), "conv1")
    meta_case("meta_config_unknown_key", lambda m: m["config"].update(bogus=1), "unknown key")
    meta_case("meta_unknown_key", lambda m: m.update(bogus=1), "unknown key(s) 'bogus'")
    meta_case("meta_train_unknown_key", lambda m: m["train"].update(bogus=1), "'train' has unknown key")
    meta_case("meta_classes_one_short", lambda m: m["classes"].pop(), "'classes' names")
    meta_case("meta_lr_nan", lambda m: m["state"].update(lr=float("nan")), "'state.lr'")
    meta_case("meta_demo_injection", lambda m: m["data"].update(demo={"base": "/etc", "seed": 0}), "'data.demo'")
    meta_case("meta_crop_too_big", lambda m: m.update(crop=10 ** 6), "'crop'")
    meta_case("meta_is_list", lambda m: (m.clear(), m.update(format="alexnet_cuda-checkpoint", version=1)),
              "is missing 'config'")

    blob = open(good, "rb").read()
    start, length = member_data_offset(good, weight)
    flipped = bytearray(blob)
    flipped[start + length // 2] ^= 0x10  # one bit of one parameter
    path = os.path.join(folder, "flipped_data_byte.npz")
    open(path, "wb").write(bytes(flipped))
    cases.append(("flipped_data_byte", path, "CRC"))
    path = os.path.join(folder, "truncated.npz")
    open(path, "wb").write(blob[: len(blob) // 2])
    cases.append(("truncated", path, "not a readable checkpoint"))
    path = os.path.join(folder, "zero_length.npz")
    open(path, "wb").close()
    cases.append(("zero_length", path, "not a readable checkpoint"))
    path = os.path.join(folder, "not_a_zip.npz")
    open(path, "w").write("this is not a checkpoint\n")
    cases.append(("not_a_zip", path, "not a readable checkpoint"))
    path = os.path.join(folder, "plain_npy.npz")
    np.save(open(path, "wb"), np.zeros(3, np.float32))
    cases.append(("plain_npy", path, "not a readable checkpoint"))
    path = os.path.join(folder, "fifo.npz")
    os.mkfifo(path)
    cases.append(("fifo", path, "is a FIFO"))
    return cases
