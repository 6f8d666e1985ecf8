#!/usr/bin/env python
"""Indexing throughput: this project's pipeline vs the post's loop, same
images, same run.

The post's loop: for each image, `load_img` + `img_to_array` +
`preprocess_input` + one `model.predict`. Ours: `engine.update_index`, what create_imagenet_features.py runs
(hash, decode in a background thread, batched compiled calls, checkpoints,
whitening, CSV write).
ResNet50 runs with random weights unless --weights is given: the arithmetic,
hence the speed, is the same as with the ImageNet weights.

    python bench/bench_indexing.py [--dataset icons] [--post-images 60]

Last line: our float32 speed-ups over the post's loop (TensorFlow, OpenVINO).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from search_utils import models  # noqa: E402
from search_utils.engine import ModelChoice, list_dataset, update_index  # noqa: E402
from search_utils.search import distances, top_n  # noqa: E402
from search_utils.store import load_features  # noqa: E402


def post_loop_speed(model, paths) -> float:
    """Images/s of the post's one-predict-per-image loop."""
    from keras.applications.resnet50 import preprocess_input
    from keras.utils import img_to_array, load_img

    model.predict(np.zeros((1, 224, 224, 3), np.float32), verbose=0)  # warm up, as ours is
    start = time.perf_counter()
    for path in paths:
        x = preprocess_input(np.expand_dims(img_to_array(load_img(path, target_size=(224, 224))), axis=0))
        model.predict(x, verbose=0)
    return len(paths) / (time.perf_counter() - start)


def our_speed(extractor, dataset, paths, batch_size) -> tuple[float, np.ndarray]:
    """Images/s of what create_imagenet_features.py runs, end to end (hash,
    decode, model, checkpoint, whitening, CSV write), from an empty output,
    and the features in file order."""
    extractor.embed(np.zeros((1, *extractor.spec.input_size, 3), np.uint8))  # trace once, as the post warms up
    choice = ModelChoice(extractor.spec, None, extractor.precision)
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "f.csv")
        start = time.perf_counter()
        update_index(dataset, output, choice, lambda: extractor, paths, batch_size)
        seconds = time.perf_counter() - start
        features = load_features(output).features
    return len(paths) / seconds, features


def top10_changed(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of top-10 results (each image querying all) that differ."""
    changed = 0
    for row in range(len(reference)):
        a = set(top_n(distances(reference, reference[row], "chi2"), 11).tolist()) - {row}
        b = set(top_n(distances(other, other[row], "chi2"), 11).tolist()) - {row}
        changed += len(a - b)
    return changed / (10 * len(reference))


def relative_difference(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.abs(reference - other).sum() / np.abs(reference).sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--dataset", default="icons")
    parser.add_argument("--post-images", type=int, default=60, help="images timed for the post's (slow) loop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", help="ResNet50 weights file (default: random weights, same speed)")
    args = parser.parse_args(argv)
    import keras

    paths = list_dataset(args.dataset)
    spec = models.get_model_spec("resnet50")
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            weights = os.path.join(tmp, "random.weights.h5")
            spec.build(None).save_weights(weights)
        extractor32 = models.load_extractor(spec, weights, "float32")
        post = post_loop_speed(extractor32.model, paths[: args.post_images])
        ours32, feats32 = our_speed(extractor32, args.dataset, paths, args.batch_size)
        print(f"{len(paths)} images of {args.dataset}, resnet50, batch {args.batch_size}, {os.cpu_count()} CPUs")
        print(f"post loop (predict per image, {args.post_images} images): {post:.1f} images/s")
        print(f"ours, float32: {ours32:.1f} images/s ({ours32 / post:.2f}x)")
        # Measured even where the command falls back to float32 (no AMX), to show why it does.
        extractor16 = models.load_extractor(spec, weights, "bf16")
        ours16, feats16 = our_speed(extractor16, args.dataset, paths, args.batch_size)
        used = "used" if models.bf16_supported() else "not used by the command here: no AMX"
        print(f"ours, bf16 ({used}): {ours16:.1f} images/s ({ours16 / post:.2f}x); features differ by "
              f"{100 * relative_difference(feats32, feats16):.2f}% (L1, relative); "
              f"top-10 results changed: {100 * top10_changed(feats32, feats16):.1f}%")
        extractor_ov = models.load_extractor(spec, weights, "float32", runtime="openvino")
        ours_ov, feats_ov = our_speed(extractor_ov, args.dataset, paths, args.batch_size)
        print(f"ours, openvino float32: {ours_ov:.1f} images/s ({ours_ov / post:.2f}x); features differ by "
              f"{100 * relative_difference(feats32, feats_ov):.5f}% (L1, relative); "
              f"top-10 results changed: {100 * top10_changed(feats32, feats_ov):.1f}%")
        lite = models.get_model_spec("efficientnet_lite0")
        lite32 = models.load_extractor(lite, None, "float32")
        speed_lite, lite_feats32 = our_speed(lite32, args.dataset, paths, args.batch_size)
        print(f"ours, efficientnet_lite0 float32: {speed_lite:.1f} images/s")
        print(f"resnet50 float32 indexing vs the post's loop ({post:.1f} images/s): tensorflow {ours32:.1f} "
              f"images/s {ours32 / post:.2f}x, openvino {ours_ov:.1f} images/s {ours_ov / post:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
