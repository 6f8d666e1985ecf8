#!/usr/bin/env python
"""Exact search speed: one query against every stored row, chi-squared.

Three ways, same data, same run:
  post     the post's Python loop, `0.5 * np.sum([((a - b) ** 2) / (a + b + eps)
           for (a, b) in zip(histA, histB)])` per row (timed on a subset of
           rows and extrapolated linearly: the full run would take minutes);
  numpy    vectorised numpy with (n, dim) temporaries;
  ours     search.distances: the fused numba kernel (kernels.py).

    python bench/bench_search.py [--rows 200000] [--dim 2048]

Also measures this machine's memory read ceiling (a parallel row sum)
and reports the extra memory our kernel allocates (tracemalloc) against the
feature bytes. Last line: our speed-up over the post's loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from search_utils.search import distances  # noqa: E402

EPS = 1e-10


def post_chi2(hist_a, hist_b, eps=EPS):
    return 0.5 * np.sum([((a - b) ** 2) / (a + b + eps) for (a, b) in zip(hist_a, hist_b)])


def synthetic(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Non-negative, ReLU-like features (many zeros), float32."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 20000):
        block = rng.normal(0.0, 1.0, (min(20000, rows - start), dim)).astype(np.float32)
        out[start : start + len(block)] = np.maximum(block, 0)
    return out


@njit(parallel=True, fastmath=True)
def _row_sums(rows):  # the least work a scan can do: read each value once
    n, d = rows.shape
    out = np.empty(n)
    for i in prange(n):
        total = 0.0
        for j in range(d):
            total += rows[i, j]
        out[i] = total
    return out


def best_of(runs: int, call) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--post-rows", type=int, default=300, help="rows timed for the post's loop")
    args = parser.parse_args(argv)

    features = synthetic(args.rows, args.dim)
    query = features[7].copy()
    gigabytes = features.nbytes / 1e9

    post_subset = [row.tolist() for row in features[: args.post_rows]]
    query_list = query.tolist()
    post_seconds = best_of(1, lambda: [post_chi2(row, query_list) for row in post_subset]) * args.rows / args.post_rows

    def numpy_chi2():
        diff = features - query
        return 0.5 * np.sum(diff * diff / (features + query + EPS), axis=1)

    numpy_seconds = best_of(3, numpy_chi2)
    distances(features[:10], query, "chi2")  # compile once
    ours_seconds = best_of(5, lambda: distances(features, query, "chi2"))

    _row_sums(features[:10])
    ceiling_seconds = best_of(5, lambda: _row_sums(features))

    tracemalloc.start()
    distances(features, query, "chi2")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    agree = np.allclose(distances(features[:50], query, "chi2"), [post_chi2(r, query_list) for r in post_subset[:50]],
                        rtol=1e-6)
    print(f"{args.rows} x {args.dim} float32 ({gigabytes:.2f} GB), {os.cpu_count()} CPUs; results agree: {agree}")
    print(f"post loop (extrapolated from {args.post_rows} rows): {post_seconds:.1f} s/query, "
          f"{gigabytes / post_seconds:.3f} GB/s")
    print(f"numpy with temporaries: {numpy_seconds * 1000:.0f} ms/query, {gigabytes / numpy_seconds:.1f} GB/s")
    print(f"ours (fused kernel): {ours_seconds * 1000:.1f} ms/query, {gigabytes / ours_seconds:.1f} GB/s; "
          f"extra memory {peak / 1e6:.1f} MB = {peak / features.nbytes:.4f}x the features")
    print(f"memory read ceiling (a parallel row sum, nothing else): {ceiling_seconds * 1000:.1f} ms/query, "
          f"{gigabytes / ceiling_seconds:.1f} GB/s; ours reaches {100 * ceiling_seconds / ours_seconds:.0f}% of it")
    print(f"exact chi2 over {args.rows} rows: ours {ours_seconds * 1000:.1f} ms vs post loop {post_seconds:.1f} s: "
          f"{post_seconds / ours_seconds:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
