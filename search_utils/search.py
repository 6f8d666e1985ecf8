"""Distances from one query to every stored feature vector, and the top N;
and the check that the vectors hold values a distance can use.

Pure functions over arrays; the per-row arithmetic lives in kernels.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import numpy.typing as npt

from . import kernels
from .errors import FeaturesFileError, printable_path

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
    # 1 - cos(angle). A zero vector has no angle: it is at distance 1 from
    # every other vector, and at 0 from another zero vector (itself).
    dot_norm = kernels.dot_and_norm_rows(rows, query)
    row_norms = np.sqrt(dot_norm[:, 1])
    norms = row_norms * np.linalg.norm(query.astype(np.float64))
    safe = np.where(norms > 0, norms, 1.0)
    both_zero = (row_norms == 0) & (not np.any(query))
    # Rounding can put an image's own copy a hair below 0 (-4e-9): never shown as a negative distance.
    return np.where(norms > 0, np.maximum(1.0 - dot_norm[:, 0] / safe, 0.0), np.where(both_zero, 0.0, 1.0))


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
    row: int = -1  # the hit's row in the features file
    copy_rows: tuple[int, ...] = ()  # the rows of `copies`


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
        return [hit_of(rank, dist, [i], paths) for rank, i in enumerate(top_n(dist, n), start=1)]
    groups = duplicate_groups(features, dist, n)
    return [hit_of(rank, dist, group, paths) for rank, group in enumerate(groups, start=1)]


def hit_of(rank: int, dist: Distances, group: Sequence[int], paths: Sequence[str],
           rows: Sequence[int] | None = None) -> SearchHit:
    """The hit for `group` ([position, *positions of its copies] in `dist`);
    `rows` maps positions to the file's rows (default: the same)."""
    file_rows = [int(rows[i] if rows is not None else i) for i in group]
    return SearchHit(rank, float(dist[group[0]]), paths[file_rows[0]], tuple(paths[r] for r in file_rows[1:]),
                     file_rows[0], tuple(file_rows[1:]))


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
    # Whitened copies differ by rounding (~1e-8) near distance 0: the slack admits them; the features decide.
    near = np.abs(dist - dist[row]) <= 1e-4 * abs(dist[row]) + 1e-6
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


# -- values a search can use ---------------------------------------------------
#
# A features file can hold values no image model produces: NaN or infinity
# (random bytes written over an HDF5 file's data), values so large that the
# kernels' float32 arithmetic overflows, or, for chi2, negative values (the
# backbones' features are ReLU outputs, average-pooled: never negative; chi2
# divides by a + b, so a negative value gives negative or huge "distances"
# that rank first). Readers refuse NaN and infinity when they read a file
# whole; a memory map is read only where the search reads it, so the search
# checks what it reads (ValueCheck), and says which row of which file.

VALUE_LIMIT = 1e18  # |value| above this overflows float32 squares (3.4e38) in the kernels
NON_NEGATIVE_METRICS = frozenset({"chi2"})
CHECK_BLOCK_BYTES = 1 << 20  # rows checked at a time: two reductions, the second from cache


class FeatureValuesError(FeaturesFileError):
    """Stored (or query) features hold values a distance can't use: NaN,
    infinity, too large, or negative for chi2."""


def first_bad_row(rows: np.ndarray, non_negative: bool = False) -> int | None:
    """Index of the first row of `rows` (n, dim) holding a value that is not
    finite, beyond +-VALUE_LIMIT, or (with `non_negative`) below 0 (-0.0 is
    fine); None if there is none.

    Reads `rows` once, a block at a time (a memory map too: measured 50 to
    75 ms for 100,000 x 1280 float32 in the page cache, about as long as the
    chi2 scan itself): a block's min and max tell whether it is clean (NaN
    makes both NaN), and only a block that isn't is looked at value by value.
    """
    rows = np.asarray(rows)
    if rows.ndim == 1:
        rows = rows[np.newaxis]
    low = 0.0 if non_negative else -VALUE_LIMIT
    block = max(1, CHECK_BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    for start in range(0, len(rows), block):
        part = rows[start:start + block]
        if part.size == 0 or (part.min() >= low and part.max() <= VALUE_LIMIT):  # False for NaN
            continue
        usable = (part >= low) & (part <= VALUE_LIMIT)
        return start + int(np.flatnonzero(~usable.all(axis=1))[0])
    return None


NOT_FINITE, TOO_LARGE, NEGATIVE = "not finite", "too large", "negative"


def value_problem(row: np.ndarray, non_negative: bool = False) -> tuple[str, str] | None:
    """The first unusable value of one row: (NOT_FINITE, TOO_LARGE or
    NEGATIVE, what is wrong in words: "value 8 of 1280 is not a finite
    number (nan)"); None if there is none. Not finite beats too large beats
    negative."""
    row = np.asarray(row).ravel()
    tests = [
        (NOT_FINITE, ~np.isfinite(row), lambda v: f"is not a finite number ({v})"),
        (TOO_LARGE, np.abs(row) > VALUE_LIMIT,
         lambda v: f"is {v:g}, too large (beyond +-{VALUE_LIMIT:g} distances overflow; no image model gives that)"),
    ]
    if non_negative:
        tests.append((NEGATIVE, row < 0, lambda v: f"is negative ({v:g})"))
    with np.errstate(invalid="ignore"):
        for kind, bad, says in tests:
            if bad.any():
                column = int(np.flatnonzero(bad)[0])
                return kind, f"value {column + 1} of {len(row)} {says(row[column])}"
    return None


NEGATIVE_ADVICE = ("chi2 needs non-negative features (as ReLU and average-pooled model features are); "
                   "use --metric cosine or euclidean")


@dataclass(frozen=True)
class ValueCheck:
    """The values a search with `metric` can use in the features file
    `source` (named in messages, with the row and its path): finite, within
    +-VALUE_LIMIT, and for chi2 not negative."""

    source: str
    paths: Sequence[str]
    metric: str

    @property
    def non_negative(self) -> bool:
        return self.metric in NON_NEGATIVE_METRICS

    def rows(self, rows: np.ndarray, row_ids: Sequence[int] | None = None) -> None:
        """Check `rows`: the file's rows `row_ids` (default: all, in order).

        Raises:
            FeatureValuesError: at the first row holding an unusable value,
                naming the file, the row and its path.
        """
        rows = np.asarray(rows)
        rows = rows[np.newaxis] if rows.ndim == 1 else rows
        bad = first_bad_row(rows, self.non_negative)
        if bad is None:
            return
        number = int(bad if row_ids is None else row_ids[bad])
        where = f"{printable_path(self.source)}: row {number + 1} ({printable_path(str(self.paths[number]))})"
        kind, problem = value_problem(rows[bad], self.non_negative)
        if kind == NEGATIVE:
            raise FeatureValuesError(f"features file {where}, {problem}: {NEGATIVE_ADVICE}")
        raise FeatureValuesError(f"malformed features file {where}, {problem}")

    def query(self, query: np.ndarray) -> np.ndarray:
        """`query` as a float32 vector, checked like a row (it may be a
        stored row, reused).

        Raises:
            FeatureValuesError: it holds an unusable value.
        """
        query = np.asarray(query, dtype=np.float32).ravel()
        found = value_problem(query, self.non_negative)
        if found is not None:
            kind, problem = found
            advice = f": {NEGATIVE_ADVICE}" if kind == NEGATIVE else ""
            raise FeatureValuesError(f"the query's features (searching {printable_path(self.source)}), "
                                     f"{problem}{advice}")
        return query

    def reading(self, features: np.ndarray) -> CheckedRows:
        """`features` as a reader of some rows sees them, each read checked
        (see CheckedRows)."""
        return CheckedRows(features, self)


class CheckedRows:
    """`features[rows]` checked by a ValueCheck before it is returned: for a
    search that reads only some rows of a memory map (the ANN path reads its
    few hundred candidates), those are the rows checked."""

    def __init__(self, features: np.ndarray, check: ValueCheck):
        self.features, self.check = features, check

    def __len__(self) -> int:
        return len(self.features)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.features.shape

    def __getitem__(self, rows):
        part = np.asarray(self.features[rows], dtype=np.float32)
        if isinstance(rows, slice):
            ids = range(*rows.indices(len(self.features)))
        else:
            ids = np.atleast_1d(np.asarray(rows))
        self.check.rows(part, ids)
        return part
