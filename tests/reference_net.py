"""A float64 NumPy two-tower AlexNet built from alexnet_cuda.reference ops: the oracle for the C++ Net.

It reads the layer table and parameters of a live Net and recomputes one training step the obvious
way (each tower's layers in turn, gathering the towers' outputs where a layer is cross-tower), so the
scheduler's issue order, copies and gradient sums are checked against plain arithmetic.
"""
import numpy as np

from alexnet_cuda import reference as R


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _relu_margin(z):
    """How far the ReLU inputs stay from the kink at 0, relative to the layer's scale. An exact 0 (a
    bias-free unit whose whole receptive field was clipped to 0) is exact in both precisions alike."""
    a = np.abs(z[z != 0])
    return float(a.min() / max(a.max(), 1e-300)) if a.size else 1.0


def _pool_margin(x, window, stride, exact_ties_ok=False):
    """The smallest gap between a window's maximum and its runner-up, relative to the layer's scale: a
    float32 net and this float64 one pick different arg-maxes only where the gap is at rounding level."""
    win = np.lib.stride_tricks.sliding_window_view(x, (window, window), axis=(2, 3))[:, :, ::stride, ::stride]
    top2 = np.sort(win.reshape(*win.shape[:4], -1), axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    # A window whose maximum is an exact 0 (all ReLU-clipped) ties in both precisions alike.
    gap = gap[top2[..., 1] != 0]
    if exact_ties_ok:
        # Pooling an overlapping pool's output: neighbouring windows share their maximum, so exact copies tie
        # in both precisions alike and the first-index rule picks the same one.
        gap = gap[gap != 0]
    return float(gap.min() / max(np.abs(x).max(), 1e-300)) if gap.size else 1.0


def step(net, images, labels, with_dropout=True):
    """Forward + backward of `net` at its current step. Returns dict(loss, logits, grads{name: dW}, rank,
    margin): `margin` is how far the draw stays from the ReLU and max-pool kinks, where gradients jump and
    float32 and float64 may legitimately disagree; tests redraw inputs that come within rounding of one."""
    cfg = net.config
    T = cfg["towers"]
    layers = net.layers()
    params = {k: v.astype(np.float64) for k, v in net.state_dict().items() if not k.startswith(("momentum", "meta"))}
    pool = 3 if cfg["overlap_pool"] else 2
    lrn_args = dict(size=cfg["lrn_size"], k=cfg["lrn_k"], alpha=cfg["lrn_alpha"], beta=cfg["lrn_beta"])
    x_img = images.astype(np.float64)
    outs = [x_img] * T
    caches = []
    margin = 1.0
    for li, L in enumerate(layers):
        per_tower = []
        for t in range(T):
            c = {}
            if li == 0:
                x = x_img
            elif L["cross"]:
                x = R.concat_channels([o if L["kind"] == "conv" else _flat(o) for o in outs])
            else:
                x = outs[t] if L["kind"] == "conv" else _flat(outs[t])
            w, b = params[f"{L['name']}.t{t}.weight"], params[f"{L['name']}.t{t}.bias"]
            c["in"] = x
            z = R.conv2d_forward(x, w, b, L["stride"], L["pad"]) if L["kind"] == "conv" else R.linear_forward(x, w, b)
            if L["relu"]:
                margin = min(margin, _relu_margin(z))
            a = R.relu_forward(z) if L["relu"] else z
            c["a"] = a
            cur = a
            if L["lrn"]:
                cur, c["scale"] = R.lrn_forward(a, **lrn_args)
                c["lrn_y"] = cur
            if L["pool"]:
                margin = min(margin, _pool_margin(cur, pool, 2))
                c["pool_in_hw"] = cur.shape[2:]
                cur, c["argmax"] = R.maxpool_forward(cur, pool, 2, 0)
            if L["pool_extra"]:  # the pooling of a removed layer above, kept
                margin = min(margin, _pool_margin(cur, pool, 2, exact_ties_ok=True))
                c["pool2_in_hw"] = cur.shape[2:]
                cur, c["argmax2"] = R.maxpool_forward(cur, pool, 2, 0)
            if L["dropout"] and with_dropout:
                seed, offset = net.dropout_key(net.step, li, t)
                cur, c["mask"] = R.dropout_forward(cur, cfg["dropout"], seed, offset)
            c["out"] = cur
            per_tower.append(c)
        outs = [c["out"] for c in per_tower]
        caches.append(per_tower)

    logits = R.concat_channels(outs)
    loss, probs, rank = R.softmax_cross_entropy_forward(logits, labels)
    n = images.shape[0]
    dlogits = R.softmax_cross_entropy_backward(probs, labels, 1.0 / n)
    per = cfg["num_classes"] // T
    d_outs = [dlogits[:, t * per:(t + 1) * per] for t in range(T)]
    grads = {}
    for li in range(len(layers) - 1, -1, -1):
        L = layers[li]
        d_ins = []
        for t in range(T):
            c = caches[li][t]
            g = d_outs[t].reshape(c["out"].shape)
            if "mask" in c:
                g = R.dropout_backward(g, c["mask"], cfg["dropout"])
            if L["pool_extra"]:
                g = R.maxpool_backward(g, c["argmax2"], c["pool2_in_hw"], pool, 2, 0)
            if L["pool"]:
                g = R.maxpool_backward(g, c["argmax"], c["pool_in_hw"], pool, 2, 0)
            if L["lrn"]:
                g = R.lrn_backward(g, c["a"], c["lrn_y"], c["scale"], **lrn_args)
            if L["relu"]:
                g = R.relu_backward(g, c["a"])
            name = f"{L['name']}.t{t}"
            w = params[name + ".weight"]
            if L["kind"] == "conv":
                grads[name + ".weight"] = R.conv2d_backward_weight(c["in"], g, L["kernel"], L["stride"], L["pad"])
                grads[name + ".bias"] = R.conv2d_backward_bias(g)
                d_ins.append(R.conv2d_backward_input(g, w, c["in"].shape[2:], L["stride"], L["pad"]))
            else:
                grads[name + ".weight"] = R.linear_backward_weight(c["in"], g)
                grads[name + ".bias"] = R.linear_backward_bias(g)
                d_ins.append(R.linear_backward_input(g, w))
        if li == 0:
            break
        prev_shape = caches[li - 1][0]["out"].shape
        if L["cross"]:
            width = L["in_c"] // T
            d_outs = [sum(R.slice_channels(d_ins[u], t * width, (t + 1) * width) for u in range(T)).reshape(prev_shape)
                      for t in range(T)]
        else:
            d_outs = [d.reshape(prev_shape) for d in d_ins]
    features = {L["name"]: (R.concat_channels([c["out"] for c in caches[li]]) if T > 1 else caches[li][0]["out"])
                for li, L in enumerate(layers)}
    return {"loss": float(loss.mean()), "logits": logits, "grads": grads, "rank": rank, "margin": margin,
            "features": features}
