#!/usr/bin/env python
"""Approximate search (search_utils/ann.py) against exact chi-squared, at scale.

Builds a synthetic collection (default 1,000,000 x 2048), an ANN index over
it, and reports build time, index size, recall@10 against the exact
chi-squared ranking, and milliseconds per query (one query at a time, as the
search command does it, re-ranking included); then the exact numba scan and
the post's per-row Python loop on the same data. The last line compares the
post's approach with the ANN search.

    python bench/bench_ann.py                      # 1M x 2048: 15 minutes the first time, 3 after
    python bench/bench_ann.py --rows 100000 --dim 1280
    python bench/bench_ann.py --threshold-sizes 10000,30000,100000,300000   # + the threshold table

The synthetic features (8.2 GB at 1M x 2048), the exact top 10 of each
query and the index are cached in bench/data/ann/. Peak memory: about 10 GB,
nearly all of it the memory-mapped features once the exact scan has read
them (page cache, shared).

Result on this machine (2 cores, load average 1.5), the numbers also quoted
in search_utils/ann.py:

    index: IVF2048-PQ over 256-d sqrt-PCA, 256 lists probed; build 74 s; 334 MB on disk
    ANN, 300 candidates re-ranked: recall@10 0.9885 over 200 queries; 3.98 ms/query median
    exact numba scan: 713.1 ms/query; post loop (extrapolated from 300 rows): 282.7 s/query
    ANN chi2 search at 1,000,000 rows: 3.98 ms/query; post loop 282.7 s: 71,048x; exact numba scan 713 ms: 179x

The synthetic features imitate pooled ReLU features of a real backbone
(calibrated against 7,570 EfficientNet-Lite0 features of emoji images): a
low-rank latent signal with a power-law spectrum (512 latent dims), images in
clusters of ~20 (lognormal sizes, cluster-specific spread), per-dimension
offset and scale, a ReLU (about 55% zeros), and a per-image brightness-like
scale (L1 norms vary by ~18%). See `synthetic_features`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from search_utils import ann, search  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, "bench", "data", "ann")
CHUNK = 20_000  # rows generated at a time (fixed: the data don't depend on it)


class SyntheticModel:
    """The generative model behind the synthetic features (see module doc)."""

    LATENT = 512
    SPECTRUM_POWER = 0.5   # latent variance of dimension k ~ (k + 1)^-power
    SPREAD = 0.5           # within-cluster spread, relative to the centres' spread
    NOISE = 0.35           # isotropic noise per feature, relative to the signal
    PER_CLUSTER = 20       # images per cluster, on average
    SCALE_SD = 0.15        # per-image log-scale

    def __init__(self, rows: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        lam = (1.0 + np.arange(self.LATENT)) ** -self.SPECTRUM_POWER
        self.sd = np.sqrt(lam / lam.sum()).astype(np.float32)
        self.basis = rng.standard_normal((self.LATENT, dim), dtype=np.float32)
        clusters = max(1, rows // self.PER_CLUSTER)
        self.centres = rng.standard_normal((clusters, self.LATENT), dtype=np.float32) * self.sd
        self.spread = (self.SPREAD * np.exp(rng.normal(0, 0.5, clusters))).astype(np.float32)
        sizes = np.exp(rng.normal(0, 1.0, clusters))
        self.cluster_p = sizes / sizes.sum()
        self.offset = rng.normal(-0.15, 0.8, dim).astype(np.float32)
        self.scale = np.exp(rng.normal(-1.0, 0.5, dim)).astype(np.float32)
        self.seed = seed

    def sample(self, rows: int, stream: int) -> np.ndarray:
        """`rows` images drawn from the model, reproducibly for each `stream`."""
        rng = np.random.default_rng([self.seed, stream])
        labels = rng.choice(len(self.centres), rows, p=self.cluster_p)
        z = self.centres[labels] + self.spread[labels, None] * self.sd * rng.standard_normal(
            (rows, self.LATENT), dtype=np.float32)
        u = (z @ self.basis) / np.float32(np.sqrt(1 + self.SPREAD ** 2))
        u += self.NOISE * rng.standard_normal(u.shape, dtype=np.float32)
        u += self.offset
        np.maximum(u, 0, out=u)
        u *= self.scale
        u *= np.exp(self.SCALE_SD * rng.standard_normal((rows, 1))).astype(np.float32)
        return u


def synthetic_features(rows: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features (rows, dim) float32, memory-mapped from the cache; queries
    (queries, dim)): held-out images from the same clusters, not in the
    collection, like an outside query image."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"synthetic-{rows}x{dim}-seed{seed}.npy")
    model = SyntheticModel(rows, dim, seed)
    if not os.path.exists(path):
        tmp = path + ".tmp.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
        started = time.perf_counter()
        for chunk, start in enumerate(range(0, rows, CHUNK)):
            stop = min(rows, start + CHUNK)
            out[start:stop] = model.sample(stop - start, chunk)
            _progress(f"generating {rows:,} x {dim}", stop, rows, started)
        out.flush()
        del out
        os.replace(tmp, path)
    features = np.load(path, mmap_mode="r")
    return features, model.sample(queries, stream=10 ** 9)


def _progress(what: str, done: int, total: int, started: float) -> None:
    end = "\n" if done == total else "\r"
    print(f"{what}: {done:,}/{total:,} ({time.perf_counter() - started:.0f} s)", end=end, file=sys.stderr)


EPS = 1e-10


def post_chi2(hist_a, hist_b, eps=EPS):
    """The post's distance, one pair of rows at a time."""
    return 0.5 * np.sum([((a - b) ** 2) / (a + b + eps) for (a, b) in zip(hist_a, hist_b)])


class RowNames:
    """Paths for the synthetic rows: row i is called "i" (no list of a million strings)."""

    def __init__(self, rows: int):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, row: int) -> str:
        return str(int(row))


def exact_top10(features: np.ndarray, queries: np.ndarray, cache: str) -> np.ndarray:
    """Row ids of each query's exact chi2 top 10 (the ground truth), cached."""
    if os.path.exists(cache):
        return np.load(cache)
    started = time.perf_counter()
    truth = np.empty((len(queries), 10), dtype=np.int64)
    for i, query in enumerate(queries):
        truth[i] = search.top_n(search.distances(features, query, "chi2"), 10)
        _progress("exact chi2 top 10 (ground truth)", i + 1, len(queries), started)
    np.save(cache, truth)
    return truth


def load_or_build(features: np.ndarray, features_path: str) -> tuple[ann.AnnIndex, bool]:
    """The index of the cached synthetic file: loaded if fresh, else built and saved."""
    index = ann.fresh_index(features_path, features,
                            note=lambda message: print(message.split(";")[0] + "; rebuilding it", file=sys.stderr))
    if index is not None:
        return index, True
    started = time.perf_counter()
    index = ann.build_index(features, ann.fingerprint(features_path, features), threshold=0,
                            on_progress=lambda done: _progress("building the ANN index", done, len(features), started))
    index.save(ann.index_path(features_path))
    return index, False


def time_ann(index, features, queries, truth, candidates: int, probes: int | None = None) -> tuple[list[float], float]:
    """Per-query seconds (one query at a time, re-ranking included) and recall@10."""
    names = RowNames(len(features))
    seconds, found = [], 0
    for query, expected in zip(queries, truth):
        started = time.perf_counter()
        hits = ann.nearest(index, features, names, query, 10, candidates=candidates, probes=probes)
        seconds.append(time.perf_counter() - started)
        found += len({int(h.path) for h in hits} & set(expected.tolist()))
    return seconds, found / truth.size


def time_exact(features: np.ndarray, queries: np.ndarray) -> list[float]:
    seconds = []
    for query in queries:
        started = time.perf_counter()
        search.top_n(search.distances(features, query, "chi2"), 10)
        seconds.append(time.perf_counter() - started)
    return seconds


def time_post(features: np.ndarray, query: np.ndarray, post_rows: int) -> float:
    """The post's loop over `post_rows` rows, extrapolated to every row (s)."""
    subset = [row.tolist() for row in features[:post_rows]]
    query_list = query.tolist()
    started = time.perf_counter()
    [post_chi2(row, query_list) for row in subset]
    return (time.perf_counter() - started) * len(features) / post_rows


def threshold_study(features: np.ndarray, queries: np.ndarray, sizes: list[int]) -> None:
    """Exact scan against ANN query time on the first `size` rows, for
    choosing ann.DEFAULT_THRESHOLD (indexes for these prefixes aren't cached)."""
    print("rows       build s   exact ms/query   ANN ms/query")
    for size in sizes:
        prefix = features[:size]
        started = time.perf_counter()
        index = ann.build_index(prefix, {})
        build = time.perf_counter() - started
        exact = np.median(time_exact(prefix, queries[:10]))
        approx, _ = time_ann(index, prefix, queries, np.zeros((len(queries), 10), np.int64), ann.DEFAULT_CANDIDATES)
        print(f"{size:>9,}  {build:>7.1f}   {exact * 1000:>14.2f}   {np.median(approx) * 1000:>12.2f}", flush=True)


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=200, help="held-out queries for recall and timing")
    parser.add_argument("--exact-queries", type=int, default=10, help="queries timed with the exact scan")
    parser.add_argument("--post-rows", type=int, default=300, help="rows timed for the post's loop")
    parser.add_argument("--sweep", default="100,200,300:128,300:512",
                        help="other candidates[:probed lists] settings to report (comma-separated)")
    parser.add_argument("--threshold-sizes", default="",
                        help="also time exact scan and ANN on these prefix sizes, e.g. 10000,30000,100000")
    args = parser.parse_args(argv)

    features, queries = synthetic_features(args.rows, args.dim, args.queries)
    features_path = os.path.join(CACHE, f"synthetic-{args.rows}x{args.dim}-seed0.npy")
    truth = exact_top10(features, queries, features_path + f".truth{args.queries}.npy")
    index, cached = load_or_build(features, features_path)
    build = index.params["build_seconds"]
    index_mb = os.path.getsize(ann.index_path(features_path)) / 1e6
    started = time.perf_counter()
    index = ann.AnnIndex.load(ann.index_path(features_path))  # what each search command does once
    load_seconds = time.perf_counter() - started

    exact_seconds = time_exact(features, queries[: args.exact_queries])  # first: it reads every row into the cache
    time_ann(index, features, queries[:5], truth[:5], ann.DEFAULT_CANDIDATES)  # warm up numba
    ann_seconds, recall = time_ann(index, features, queries, truth, ann.DEFAULT_CANDIDATES)
    post_seconds = time_post(features, queries[0], args.post_rows)
    ann_ms, exact_ms = np.median(ann_seconds) * 1000, np.median(exact_seconds) * 1000

    print(f"{args.rows:,} x {args.dim} float32 ({features.nbytes / 1e9:.1f} GB, memory-mapped, page cache warm), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"index: {index.describe()}, {index.params['probes']} lists probed; build {build:.0f} s"
          f"{' (cached from an earlier run)' if cached else ''}; {index_mb:.0f} MB on disk "
          f"({index_mb * 1e6 / features.nbytes:.3f}x the features); loading it: {load_seconds:.1f} s")
    print(f"ANN, {ann.DEFAULT_CANDIDATES} candidates re-ranked: recall@10 {recall:.4f} over {len(queries)} queries; "
          f"{ann_ms:.2f} ms/query median, {np.percentile(ann_seconds, 95) * 1000:.2f} ms p95, "
          f"{np.mean(ann_seconds) * 1000:.2f} ms mean")
    for setting in filter(None, args.sweep.split(",")):
        candidates, _, probes = setting.partition(":")
        seconds, swept = time_ann(index, features, queries, truth, int(candidates), int(probes) if probes else None)
        print(f"  {candidates} candidates, {probes or index.params['probes']} of {index.params['lists']} lists "
              f"probed: recall@10 {swept:.4f}, {np.median(seconds) * 1000:.2f} ms/query median")
    print(f"exact numba scan: {exact_ms:.1f} ms/query median of {len(exact_seconds)}")
    print(f"post loop (extrapolated from {args.post_rows} rows): {post_seconds:.1f} s/query")
    print(f"peak RSS {peak_rss_gb():.1f} GB (the memory-mapped features count once touched)")
    if args.threshold_sizes:
        threshold_study(features, queries[:50], [int(s) for s in args.threshold_sizes.split(",")])
    print(f"ANN chi2 search at {args.rows:,} rows: {ann_ms:.2f} ms/query; post loop {post_seconds:.1f} s: "
          f"{post_seconds * 1000 / ann_ms:,.0f}x; exact numba scan {exact_ms:.0f} ms: {exact_ms / ann_ms:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
