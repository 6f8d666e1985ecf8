#!/usr/bin/env python
"""Which choices make search results better? Measure each on the cross-vendor
emoji benchmark (tools/build_emoji_benchmark.py) and print a Markdown table.

Every variant is scored like `evaluate.py --group vendor`: each emoji image
queries the images of the other vendors; the same emoji is relevant.

    python bench/quality_study.py --model efficientnet_lite0 > docs/quality_efficientnet_lite0.md
    python bench/quality_study.py --model resnet50 --weights resnet50_..._notop.h5

Features of each preprocessing variant are cached in bench/data/quality/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from search_utils import models  # noqa: E402
from search_utils.evaluation import Labels, evaluate, labels_from_records, read_label_records  # noqa: E402
from search_utils.images import WHITE, load_image  # noqa: E402
from search_utils.transforms import Whitening, l1_normalise, l2_normalise, signed_sqrt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench", "data", "emoji")
CACHE = os.path.join(REPO, "bench", "data", "quality")

# Preprocessing variants: (name, alpha background or None = dropped, resize, flip-average)
PREPROCESSING = [
    ("post: alpha dropped, nearest", None, "nearest", False),
    ("alpha on white, nearest", WHITE, "nearest", False),
    ("alpha on white, bilinear", WHITE, "bilinear", False),
    ("alpha on white, area", WHITE, "box", False),
    ("alpha on black, bilinear", (0, 0, 0), "bilinear", False),
    ("alpha on grey, bilinear", (128, 128, 128), "bilinear", False),
    ("alpha on white, bilinear, flip-averaged", WHITE, "bilinear", True),
]
GEM_P = 3.0
# The preprocessing each model's registry entry uses (for the size table).
DEFAULT_PREPROCESSING = {
    "efficientnet_lite0": "alpha on white, bilinear",
    "resnet50": "alpha on white, nearest",
    "efficientnetv2_b0": "alpha on white, bilinear",
}


def feature_map_model(spec, weights):
    import keras

    extractor = models.load_extractor(spec, weights)
    model = extractor.model
    return keras.Model(model.input, model.get_layer("avg_pool").input)


def embed_variant(map_model, spec, paths, background, resize, flip, batch=32):
    """(avg-pooled, GeM-pooled) features of every path under one preprocessing."""
    import tensorflow as tf

    call = tf.function(lambda x: map_model(x, training=False))
    size = spec.input_size

    def load(chunk):
        return np.stack([load_image(p, size=size, interpolation=resize, background=background) for p in chunk])

    avg, gem = [], []
    chunks = [paths[i : i + batch] for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(load, chunks[0])
        for index in range(len(chunks)):
            images = pending.result()
            if index + 1 < len(chunks):
                pending = pool.submit(load, chunks[index + 1])
            maps = np.asarray(call(spec.preprocess(images)))  # (n, h, w, c)
            if flip:
                maps = (maps + np.asarray(call(spec.preprocess(images[:, :, ::-1])))) / 2
            avg.append(maps.mean(axis=(1, 2)))
            gem.append(np.power(np.power(np.maximum(maps, 0), GEM_P).mean(axis=(1, 2)), 1 / GEM_P))
    return np.concatenate(avg).astype(np.float32), np.concatenate(gem).astype(np.float32)


def cached_features(name, compute):
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, name + ".npz")
    if os.path.exists(path):
        data = np.load(path)
        return data["avg"], data["gem"]
    start = time.perf_counter()
    avg, gem = compute()
    np.savez(path, avg=avg, gem=gem)
    print(f"  embedded {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return avg, gem


def score(vectors, labels, metric):
    result = evaluate(vectors, labels, metric=metric)
    return result["P@1"], result["mAP"]


def whitened(prepare, dims=None, shrinkage=0.0):
    """Transform: `prepare`, then PCA whitening learned on the same vectors."""
    def apply(x):
        prepared = prepare(x)
        return Whitening.fit(prepared, dims, shrinkage).apply(prepared)
    return apply


def sqrt_l2(x):
    return l2_normalise(signed_sqrt(x))


def hellinger(x):
    return np.sqrt(l1_normalise(np.maximum(x, 0)))


RAW = (lambda x: x, "chi2")
# Post-processing: name -> (transform(features) -> vectors, distance)
POSTPROCESSING = {
    "raw, chi2 (the post)": RAW,
    "raw, cosine": (lambda x: x, "cosine"),
    "raw, euclidean": (lambda x: x, "euclidean"),
    "L1, chi2": (l1_normalise, "chi2"),
    "L1, euclidean": (l1_normalise, "euclidean"),
    "L2, chi2": (l2_normalise, "chi2"),
    "L2, euclidean (ranks as cosine)": (l2_normalise, "euclidean"),
    "signed sqrt + L2, chi2": (sqrt_l2, "chi2"),
    "signed sqrt + L2, cosine": (sqrt_l2, "cosine"),
    "Hellinger (sqrt of L1), euclidean": (hellinger, "euclidean"),
    "L2 + whitening, cosine": (whitened(l2_normalise), "cosine"),
    "L2 + whitening (shrinkage 0.3), cosine": (whitened(l2_normalise, shrinkage=0.3), "cosine"),
    "signed sqrt + L2 + whitening, cosine": (whitened(sqrt_l2), "cosine"),
    "signed sqrt + L2 + whitening 256 dims, cosine": (whitened(sqrt_l2, dims=256), "cosine"),
    "signed sqrt + L2 + whitening (shrinkage 0.1), cosine": (whitened(sqrt_l2, shrinkage=0.1), "cosine"),
    "signed sqrt + L2 + whitening (shrinkage 0.3), cosine": (whitened(sqrt_l2, shrinkage=0.3), "cosine"),
    "signed sqrt + L2 + whitening (shrinkage 1.0), cosine": (whitened(sqrt_l2, shrinkage=1.0), "cosine"),
}
# What the combined rows and the collection-size table try.
COMBINED = ["raw, chi2 (the post)", "signed sqrt + L2, cosine",
            "signed sqrt + L2 + whitening, cosine", "signed sqrt + L2 + whitening (shrinkage 0.3), cosine"]
SIZES = [30, 75, 250]  # emoji per subset (x about 4 images each)


def table(title, rows):
    lines = [f"### {title}", "", "| preprocessing | pooling | features, distance | P@1 | mAP |", "|---|---|---|---|---|"]
    lines += [f"| {pre} | {pool} | {post} | {p1:.3f} | {m_ap:.3f} |" for pre, pool, post, p1, m_ap in rows]
    return "\n".join(lines) + "\n"


def subset_rows(records, seed=0):
    """Row indices of random subsets holding SIZES[i] emoji each."""
    labels = sorted({r["label"] for r in records})
    rng = np.random.default_rng(seed)
    for count in SIZES:
        chosen = set(rng.choice(labels, count, replace=False))
        yield [i for i, r in enumerate(records) if r["label"] in chosen]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0", choices=sorted(models.MODELS))
    parser.add_argument("--weights", help="weights file (default: the model's own)")
    parser.add_argument("--labels", default=os.path.join(BENCH, "labels.csv"))
    args = parser.parse_args(argv)
    if not os.path.exists(args.labels):
        parser.exit(1, f"quality_study.py: error: no benchmark at {args.labels}; run tools/build_emoji_benchmark.py\n")

    spec = models.get_model_spec(args.model)
    records = read_label_records(args.labels)
    folder = os.path.dirname(os.path.abspath(args.labels))
    paths = [os.path.join(folder, r["path"]) for r in records]
    labels = labels_from_records(paths, records, args.labels, group_key="vendor")
    map_model = feature_map_model(spec, args.weights)

    features = {}
    for name, background, resize, flip in PREPROCESSING:
        key = f"{args.model}-" + name.replace(" ", "_").replace(",", "").replace(":", "")
        avg, gem = cached_features(key, lambda: embed_variant(map_model, spec, paths, background, resize, flip))
        features[(name, "avg")] = avg
        features[(name, "GeM")] = gem

    def measure(pre, pool, post, rows=None):
        transform, metric = POSTPROCESSING[post]
        vectors = features[(pre, pool)] if rows is None else features[(pre, pool)][rows]
        subset = labels if rows is None else Labels([labels.labels[i] for i in rows], [labels.groups[i] for i in rows])
        start = time.perf_counter()
        p1, m_ap = score(transform(vectors), subset, metric)
        print(f"  {pre} | {pool} | {post} | {len(vectors)}: P@1 {p1:.3f} mAP {m_ap:.3f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        return pre, pool, post, p1, m_ap

    post_pre = PREPROCESSING[0][0]
    alone = [measure(post_pre, "avg", "raw, chi2 (the post)")]
    alone += [measure(name, "avg", "raw, chi2 (the post)") for name, *_ in PREPROCESSING[1:]]
    alone.append(measure(post_pre, "GeM", "raw, chi2 (the post)"))
    alone += [measure(post_pre, "avg", post) for post in list(POSTPROCESSING)[1:]]
    combined = [measure(name, pool, post) for name, *_ in PREPROCESSING[1:] for pool in ("avg", "GeM")
                for post in COMBINED[1:]]
    best_pre = DEFAULT_PREPROCESSING[args.model]
    sizes = []
    for rows in subset_rows(records):
        sizes += [measure(best_pre, "avg", post, rows) + (len(rows),) for post in COMBINED]

    print(f"## {args.model}: {len(paths)} images, {labels.labelled} labelled, cross-vendor\n")
    print(table("Each change alone (baseline: the post's pipeline, first row)", alone))
    print(table("Combined", combined))
    print(f"### Smaller collections ({best_pre}, avg pooling; whitening learned on each subset)\n")
    print("| images | features, distance | P@1 | mAP |\n|---|---|---|---|")
    for _, _, post, p1, m_ap, count in sizes:
        print(f"| {count} | {post} | {p1:.3f} | {m_ap:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
