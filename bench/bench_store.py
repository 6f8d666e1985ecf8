#!/usr/bin/env python
"""How long a search waits for its features: load N x 2048 float32 synthetic
features (and their paths) from the binary HDF5 format (memory-mapped, read
whole, float16, after appends) and from the post's CSV, each the way
search_utils.store reads it. Also the time to write and append, and the file
sizes.

    python bench/bench_store.py                 # 100,000 rows: a few minutes, ~3.5 GB in bench/data/store/
    python bench/bench_store.py --rows 10000

The last line sums it up, e.g. `load 100000x2048: hdf5 0.31 s, csv 95.2 s,
ratio 307x` (HDF5 read whole, no memory map). The files are read right after
being written, so from the page cache: these are the format's costs, not the
disk's. HDF5 times are the best of --repeat runs; CSV is read once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from search_utils import store as St  # noqa: E402
from search_utils.search import distances  # noqa: E402

DATA = os.path.join(REPO, "bench", "data", "store")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="images (default: 100000)")
    parser.add_argument("--dim", type=int, default=2048, help="values per image (default: 2048, ResNet50's)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each HDF5 load; the best counts (default: 3)")
    parser.add_argument("--keep", action="store_true", help=f"keep the files in {DATA}")
    args = parser.parse_args(argv)
    if args.rows < 2 or args.dim < 1 or args.repeat < 1:
        parser.error("--rows must be at least 2, --dim and --repeat at least 1")
    return args


def synthetic(rows: int, dim: int) -> St.FeatureStore:
    """Non-negative, sparse-ish values like pooled ReLU features, and
    ImageNet-like paths (a few awkward ones)."""
    rng = np.random.default_rng(0)
    features = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 10_000):
        block = rng.gamma(0.6, 0.8, size=(min(10_000, rows - start), dim)).astype(np.float32)
        block[block < 0.05] = 0.0
        features[start:start + len(block)] = block
    paths = [f"imagenet/n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(rows)]
    paths[1] = "imagenet/odd, \"quoted\"\nname.JPEG"
    paths[2] = os.fsdecode(b"imagenet/latin1-\xe9.JPEG")
    return St.FeatureStore(paths, features, {"model": "resnet50", "feature_dim": dim})


def timed(function, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def line(label: str, seconds: float, note: str = "") -> None:
    print(f"  {label:<54}{seconds:8.3f} s   {note}".rstrip(), flush=True)


def size(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:,.1f} MB"


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, dim = args.rows, args.dim
    os.makedirs(DATA, exist_ok=True)
    files = {name: os.path.join(DATA, name) for name in ("f32.h5", "f16.h5", "appended.h5", "post.csv")}
    print(f"{rows} x {dim} float32 synthetic features, files in {os.path.relpath(DATA, REPO)}/", flush=True)
    store = synthetic(rows, dim)

    # Compile the search kernel for in-memory and read-only mapped arrays first.
    small = os.path.join(DATA, "warmup.h5")
    St.save_features(small, St.FeatureStore(["a", "b"], store.features[:2], {}))
    distances(St.load_features(small, mmap=True).features, store.features[0])
    distances(store.features[:2], store.features[0])
    os.unlink(small)

    print("\nwrite (atomic: temporary file, fsync, rename)")
    seconds, _ = timed(lambda: St.save_features(files["f32.h5"], store))
    line("hdf5 float32", seconds, size(files["f32.h5"]))
    seconds, _ = timed(lambda: St.save_features(files["f16.h5"], store, dtype="float16"))
    line("hdf5 float16", seconds, size(files["f16.h5"]))
    half = rows // 2
    St.save_features(files["appended.h5"], St.FeatureStore(store.paths[:half], store.features[:half], store.metadata))
    seconds, _ = timed(lambda: St.append_features(files["appended.h5"], store.paths[half:-1000],
                                                  store.features[half:-1000]))
    line(f"hdf5 append {rows - half - 1000} rows to {half} (rewritten, chunked)", seconds)
    seconds, _ = timed(lambda: St.append_features(files["appended.h5"], store.paths[-1000:], store.features[-1000:]))
    line(f"hdf5 append 1000 rows to {rows - 1000} (copied, extended)", seconds, size(files["appended.h5"]))
    seconds, _ = timed(lambda: St.save_features(files["post.csv"], store))
    line("csv (the post's format)", seconds, size(files["post.csv"]))

    print(f"\nload for a search (best of {args.repeat}; CSV once)")
    mmap_s, mapped = timed(lambda: St.load_features(files["f32.h5"], mmap=True), args.repeat)
    assert isinstance(mapped.features, np.memmap)
    line("hdf5 float32, memory-mapped", mmap_s)
    hdf5_s, full = timed(lambda: St.load_features(files["f32.h5"]), args.repeat)
    line("hdf5 float32, read whole", hdf5_s)
    seconds, appended = timed(lambda: St.load_features(files["appended.h5"], mmap=True), args.repeat)
    line("hdf5 appended (chunked; mmap falls back to a read)", seconds)
    seconds, half_precision = timed(lambda: St.load_features(files["f16.h5"]), args.repeat)
    line("hdf5 float16, read whole as float32", seconds)
    seconds, chunked_rows = timed(lambda: sum(len(c) for _, c in St.iter_feature_chunks(files["f32.h5"])),
                                  args.repeat)
    line("hdf5 iter_feature_chunks (65536 rows at a time)", seconds)
    csv_s, from_csv = timed(lambda: St.load_features(files["post.csv"]))
    line("csv, parsed by pandas as store.py does", csv_s)

    for loaded in (mapped, full, appended, from_csv):
        assert loaded.paths == store.paths and np.array_equal(loaded.features, store.features)
    assert chunked_rows == rows
    assert np.allclose(half_precision.features, store.features, rtol=2.0 ** -11, atol=2.0 ** -24)

    query = store.features[rows // 3]
    print("\none chi2 search over every row (the memory map reads its pages here)")
    fresh = St.load_features(files["f32.h5"], mmap=True)
    seconds, _ = timed(lambda: distances(fresh.features, query))
    line("memory-mapped, first search", seconds, f"(+ {mmap_s:.3f} s to load)")
    seconds, _ = timed(lambda: distances(full.features, query), args.repeat)
    line("in memory", seconds, f"(+ {hdf5_s:.3f} s to load)")

    print("\nsizes")
    for name in ("post.csv", "f32.h5", "f16.h5", "appended.h5"):
        print(f"  {name:<54}{size(files[name]):>12}")
    if not args.keep:
        for path in [*files.values(), St.metadata_path(files["post.csv"])]:
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(DATA)
    print(f"load {rows}x{dim}: hdf5 {hdf5_s:.2f} s, csv {csv_s:.1f} s, ratio {csv_s / hdf5_s:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
