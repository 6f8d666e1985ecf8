"""Distances from one query to every stored feature vector, and the top N.

Pure functions over arrays; the per-row arithmetic lives in kernels.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import numpy.typing as npt

from . import kernels

CHI2_EPS = 1e-10  # the post's eps

Distances = npt.NDArray[np.float64]  # (n,)


def chi2_distance(a: np.ndarray, b: np.ndarray, eps: float = CHI2_EPS) -> float:
    """The post's chi-squared distance between two vectors, one pair at a time:
    0.5 * sum((a - b)^2 / (a + b + eps))."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(0.5 * np.sum((a - b) ** 2 / (a + b + eps)))


def _chi2(rows: np.ndarray, query: np.ndarray) -> Distances:
    return kernels.chi2_rows(rows, query)


def _euclidean(rows: np.ndarray, query: np.ndarray) -> Distances:
    return np.sqrt(kernels.squared_euclidean_rows(rows, query))


def _cosine(rows: np.ndarray, query: np.ndarray) -> Distances:
    # 1 - cos(angle); a zero vector is at distance 1 from everything.
    dot_norm = kernels.dot_and_norm_rows(rows, query)
    norms = np.sqrt(dot_norm[:, 1]) * np.linalg.norm(query.astype(np.float64))
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, 1.0 - dot_norm[:, 0] / safe, 1.0)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], Distances]] = {
    "chi2": _chi2,
    "cosine": _cosine,
    "euclidean": _euclidean,
}
DEFAULT_METRIC = "chi2"


def distances(features: np.ndarray, query: np.ndarray, metric: str = DEFAULT_METRIC) -> Distances:
    """Distance from `query` (dim,) to every row of `features` (n, dim).

    One fused pass over the rows (see kernels.py): float32 arithmetic,
    float64 sums, memory of O(n) beyond the features themselves.

    Raises:
        ValueError: unknown metric or mismatched dimensions.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    query = np.asarray(query, dtype=np.float32).ravel()
    if features.ndim != 2 or features.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} values, features have shape {features.shape}")
    return METRICS[metric](kernels.as_rows(features), query)


def top_n(dist: Distances, n: int) -> npt.NDArray[np.intp]:
    """Indices of the `n` smallest distances, nearest first; ties keep file order."""
    n = max(0, min(n, len(dist)))
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    if n < len(dist):
        kth = dist[np.argpartition(dist, n - 1)[:n]].max()
        candidates = np.flatnonzero(dist <= kth)  # every tie at the boundary
    else:
        candidates = np.arange(len(dist))
    order = np.lexsort((candidates, dist[candidates]))
    return candidates[order][:n]


@dataclass(frozen=True)
class SearchHit:
    rank: int
    distance: float
    path: str
    copies: tuple[str, ...] = ()  # other paths holding the same image


# Two rows are copies of one image when their features agree to this
# relative L1 difference: identical pixels give identical features.
DUPLICATE_TOLERANCE = 1e-5


def nearest(
    features: np.ndarray,
    paths: Sequence[str],
    query: np.ndarray,
    n: int = 5,
    metric: str = DEFAULT_METRIC,
    collapse: bool = False,
) -> list[SearchHit]:
    """The `n` stored images nearest to `query`, nearest first.

    With `collapse`, copies of one image (identical features) make one hit
    that lists the other paths in `copies`.
    """
    dist = distances(features, query, metric)
    if not collapse:
        return [SearchHit(rank, float(dist[i]), paths[i]) for rank, i in enumerate(top_n(dist, n), start=1)]
    groups = duplicate_groups(features, dist, n)
    return [
        SearchHit(rank, float(dist[group[0]]), paths[group[0]], tuple(paths[j] for j in group[1:]))
        for rank, group in enumerate(groups, start=1)
    ]


def duplicate_groups(features: np.ndarray, dist: Distances, n: int) -> list[list[int]]:
    """The `n` nearest distinct images, each as [row, *rows of its copies].

    Copies have (nearly) the same distance to any query, so only rows whose
    distance is within a hair of a hit's are compared with it.
    """
    groups: list[list[int]] = []
    taken = np.zeros(len(dist), dtype=bool)
    window = min(len(dist), 4 * n + 16)
    seen = 0
    while len(groups) < n and seen < len(dist):
        order = top_n(dist, window)
        for row in order[seen:]:
            if not taken[row]:
                group = _copies_of(features, dist, row, taken)
                taken[group] = True
                groups.append(group)
                if len(groups) == n:
                    break
        seen, window = len(order), min(len(dist), window * 2)
    return groups


def _copies_of(features: np.ndarray, dist: Distances, row: int, taken: np.ndarray) -> list[int]:
    near = np.abs(dist - dist[row]) <= 1e-4 * abs(dist[row]) + 1e-9
    candidates = np.flatnonzero(near & ~taken)
    reference = features[row].astype(np.float64)
    scale = np.abs(reference).sum() or 1.0
    same = [j for j in candidates
            if j == row or np.abs(features[j] - reference).sum() <= DUPLICATE_TOLERANCE * scale]
    return [row] + sorted(j for j in same if j != row)


def absolute_path(path: str, base_dir: str | None = None) -> str:
    """`path` made absolute and normalised (no filesystem access). Relative
    paths are taken relative to `base_dir` (where they were written) or the
    working folder."""
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normcase(os.path.abspath(path))


def find_row(paths: Sequence[str], query_path: str, base_dir: str | None = None) -> int | None:
    """Row of `query_path` among stored `paths`: the same file, however spelled.

    Only rows whose file name is the query's (or its symlink target's) can
    be the same file: a plain string test picks them (50 ms over a million
    paths, where normalising every path would take seconds). Among those,
    normalised absolute paths are compared first (no disk access), then
    symlinks are resolved.
    """
    wanted = absolute_path(query_path)
    real = os.path.realpath(query_path)
    names = {os.path.basename(query_path), os.path.basename(real)}
    if os.path.normcase("A") == "A":  # case-sensitive names: filter by the name's text
        suffixes = tuple(names)
        candidates = [row for row, stored in enumerate(paths) if stored.endswith(suffixes)]
    else:
        candidates = range(len(paths))
    for row in candidates:
        if absolute_path(paths[row], base_dir) == wanted:
            return row
    for row in candidates:
        stored = paths[row]
        if os.path.basename(stored) in names and os.path.realpath(absolute_path(stored, base_dir)) == real:
            return row
    return None
