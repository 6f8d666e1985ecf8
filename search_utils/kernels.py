"""Distance kernels: one query against every row, in one fused pass.

Each kernel reads every row once, works in float32 and sums in float64, and
writes one distance per row: no (n, dim) temporaries, parallel over rows.
Compiled by numba on first use (cached on disk when the package folder is
writable).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

CHI2_EPS = np.float32(1e-10)  # the post's eps


@njit(parallel=True, fastmath=True, cache=True)
def chi2_rows(rows, query):  # rows (n, d) float32, query (d,) float32 -> (n,) float64
    n, d = rows.shape
    out = np.empty(n, dtype=np.float64)
    for i in prange(n):
        row = rows[i]
        total = 0.0
        for j in range(d):
            diff = row[j] - query[j]
            total += np.float64(diff * diff / (row[j] + query[j] + CHI2_EPS))
        out[i] = 0.5 * total
    return out


@njit(parallel=True, fastmath=True, cache=True)
def squared_euclidean_rows(rows, query):
    n, d = rows.shape
    out = np.empty(n, dtype=np.float64)
    for i in prange(n):
        row = rows[i]
        total = 0.0
        for j in range(d):
            diff = row[j] - query[j]
            total += np.float64(diff * diff)
        out[i] = total
    return out


@njit(parallel=True, fastmath=True, cache=True)
def dot_and_norm_rows(rows, query):  # -> (n, 2): row . query, |row|^2
    n, d = rows.shape
    out = np.empty((n, 2), dtype=np.float64)
    for i in prange(n):
        row = rows[i]
        dot = 0.0
        norm = 0.0
        for j in range(d):
            dot += np.float64(row[j] * query[j])
            norm += np.float64(row[j] * row[j])
        out[i, 0] = dot
        out[i, 1] = norm
    return out


def as_rows(features) -> np.ndarray:
    """float32, C-contiguous view (no copy when it already is one)."""
    return np.ascontiguousarray(features, dtype=np.float32)
