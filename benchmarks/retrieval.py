"""The paper's Figure 4 (right): validation images and the training images nearest to them in fc7 space.

    python benchmarks/retrieval.py CKPT [--data DST] [--queries 5] [--neighbours 6] [--out retrieval.png]

fc7 activations (Net.features: the net's own forward pass, no dropout) of the central crop of
every training image (or the first --limit) and of --queries validation images spread evenly over the split; for each query the
--neighbours training images with the smallest Euclidean distance between the fc7 vectors. Writes a PNG (one
row per query: the query, then its neighbours nearest first) and, with --json, the indices, labels and
distances; prints how many neighbours share the query's class (chance is 1 / number of classes)."""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alexnet_cuda.evaluate import net_from_checkpoint, open_data  # noqa: E402
from alexnet_cuda.features import FeatureExtractor, write_png  # noqa: E402


def fc7(ext, split, augment, idx, batch):
    out = []
    for s in range(0, len(idx), batch):
        out.append(ext(augment.center(split.images(idx[s:s + batch])), ("fc7",))["fc7"])
    return np.concatenate(out, 0).astype(np.float64)


def nearest(query, base, k):
    """Indices (rows) and distances of the k nearest rows of `base` to each row of `query` (Euclidean)."""
    d2 = (query ** 2).sum(1)[:, None] - 2 * query @ base.T + (base ** 2).sum(1)[None, :]
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return order, np.sqrt(np.maximum(np.take_along_axis(d2, order, 1), 0))


def grid(rows, gap=4):
    """rows: lists of uint8 (S, S, 3) images -> one uint8 image, a row per list."""
    S = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    img = np.full((len(rows) * (S + gap) + gap, cols * (S + gap) + 3 * gap, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, a in enumerate(r):
            x = gap + j * (S + gap) + (2 * gap if j else 0)  # a wider gap after the query
            img[gap + i * (S + gap):gap + i * (S + gap) + S, x:x + S] = a
    return img


def main(argv=None):
    from alexnet_cuda.data import Augmenter

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("--data", help="prepared folder (default: the checkpoint's)")
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--neighbours", type=int, default=6)
    p.add_argument("--limit", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--devices", help="cpu or cuda:N (default: the best this machine has)")
    p.add_argument("--device", dest="devices", help=argparse.SUPPRESS)
    p.add_argument("--out", default="retrieval.png")
    p.add_argument("--json", help="also write the neighbours as JSON")
    a = p.parse_args(argv)
    try:
        net, meta, extra = net_from_checkpoint(a.checkpoint, a.devices)
        data = open_data(meta, a.data)
    except (ValueError, OSError) as e:
        print(f"retrieval: error: {e}", file=sys.stderr)
        return 1
    train, val = data.split("train"), data.split("val") if data.has_split("val") else None
    if val is None:
        val = train
    augment = Augmenter(extra["mean"], int(meta["crop"]))
    ext = FeatureExtractor(net)
    n_train = len(train) if not a.limit else min(a.limit, len(train))
    # spread over the split (prepared splits are in class order), so the queries show several classes
    q_idx = np.unique(np.linspace(0, len(val) - 1, max(1, min(a.queries, len(val)))).round().astype(int))
    base = fc7(ext, train, augment, np.arange(n_train), a.batch_size)
    query = fc7(ext, val, augment, q_idx, a.batch_size)
    order, dist = nearest(query, base, min(a.neighbours, n_train))
    same = float(np.mean(train.labels[order] == val.labels[q_idx][:, None]))
    rows = [[val.images(np.array([q]))[0]] + [train.images(np.array([j]))[0] for j in order[i]]
            for i, q in enumerate(q_idx)]
    write_png(a.out, grid(rows))
    if a.json:
        doc = [{"query": int(q), "label": data.classes[int(val.labels[q])],
                "neighbours": [{"train_index": int(j), "label": data.classes[int(train.labels[j])],
                                "distance": float(d)} for j, d in zip(order[i], dist[i])]}
               for i, q in enumerate(q_idx)]
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"wrote {a.out}: {len(q_idx)} queries x {order.shape[1]} neighbours among {n_train} training images; "
          f"{100 * same:.0f}% of the neighbours share the query's class (chance {100 / data.num_classes:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
