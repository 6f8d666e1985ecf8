"""Distances from one query to every stored feature vector, and the top N.

Pure functions over arrays. Rows are processed in chunks so memory stays at
the size of the features plus O(N), whatever the collection size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import numpy.typing as npt

CHI2_EPS = 1e-10  # the post's eps
CHUNK_ROWS = 2048  # rows per chunk: a few MB of float64 temporaries

Distances = npt.NDArray[np.float64]  # (n,)


def chi2_distance(a: np.ndarray, b: np.ndarray, eps: float = CHI2_EPS) -> float:
    """The post's chi-squared distance between two vectors, one pair at a time:
    0.5 * sum((a - b)^2 / (a + b + eps))."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(0.5 * np.sum((a - b) ** 2 / (a + b + eps)))


def _chi2_chunk(rows: np.ndarray, query: np.ndarray) -> Distances:
    diff = rows - query
    return 0.5 * np.sum(diff * diff / (rows + query + CHI2_EPS), axis=1)


def _euclidean_chunk(rows: np.ndarray, query: np.ndarray) -> Distances:
    diff = rows - query
    return np.sqrt(np.sum(diff * diff, axis=1))


def _cosine_chunk(rows: np.ndarray, query: np.ndarray) -> Distances:
    # 1 - cos(angle); a zero vector is at distance 1 from everything.
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(query)
    dots = rows @ query
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, 1.0 - dots / safe, 1.0)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], Distances]] = {
    "chi2": _chi2_chunk,
    "cosine": _cosine_chunk,
    "euclidean": _euclidean_chunk,
}
DEFAULT_METRIC = "chi2"


def distances(features: np.ndarray, query: np.ndarray, metric: str = DEFAULT_METRIC) -> Distances:
    """Distance from `query` (dim,) to every row of `features` (n, dim).

    Computed in float64, CHUNK_ROWS rows at a time, never holding more
    than one chunk of temporaries.

    Raises:
        ValueError: unknown metric or mismatched dimensions.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    query = np.asarray(query, dtype=np.float64).ravel()
    if features.ndim != 2 or features.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} values, features have shape {features.shape}")
    kernel = METRICS[metric]
    out = np.empty(len(features), dtype=np.float64)
    for start in range(0, len(features), CHUNK_ROWS):
        chunk = np.asarray(features[start : start + CHUNK_ROWS], dtype=np.float64)
        out[start : start + len(chunk)] = kernel(chunk, query)
    return out


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


def nearest(
    features: np.ndarray,
    paths: Sequence[str],
    query: np.ndarray,
    n: int = 5,
    metric: str = DEFAULT_METRIC,
) -> list[SearchHit]:
    """The `n` stored images nearest to `query`, nearest first."""
    dist = distances(features, query, metric)
    return [
        SearchHit(rank, float(dist[i]), paths[i])
        for rank, i in enumerate(top_n(dist, n), start=1)
    ]


def absolute_path(path: str, base_dir: str | None = None) -> str:
    """`path` made absolute and normalised (no filesystem access). Relative
    paths are taken relative to `base_dir` (where they were written) or the
    working folder."""
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return os.path.normcase(os.path.abspath(path))


def find_row(paths: Sequence[str], query_path: str, base_dir: str | None = None) -> int | None:
    """Row of `query_path` among stored `paths`: the same file, however spelled.

    Compares normalised absolute paths first (no disk access, fast on
    millions of rows), then resolves symlinks, but only for rows with the
    same file name as the query or its target.
    """
    wanted = absolute_path(query_path)
    for row, stored in enumerate(paths):
        if absolute_path(stored, base_dir) == wanted:
            return row
    real = os.path.realpath(query_path)
    names = {os.path.basename(query_path), os.path.basename(real)}
    for row, stored in enumerate(paths):
        if os.path.basename(stored) in names:
            stored_abs = absolute_path(stored, base_dir)
            if os.path.realpath(stored_abs) == real:
                return row
    return None
