"""Search modes: which vectors are compared, and with which distance.

`--metric` in both imagenet_search.py and evaluate.py takes a mode name.
The plain modes compare the stored features directly; "whitened" compares
them after a transform learned from the collection when it was indexed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .search import ValueCheck, first_bad_row
from .store import FeatureStore
from .transforms import Whitening, l2_normalise, signed_sqrt


@dataclass(frozen=True)
class SearchMode:
    name: str
    metric: str  # distance in the mode's space (search.METRICS)
    whitened: bool
    description: str


MODES: dict[str, SearchMode] = {
    mode.name: mode
    for mode in (
        SearchMode("chi2", "chi2", False, "the post's chi-squared distance on the raw features"),
        SearchMode("cosine", "cosine", False, "cosine distance on the raw features"),
        SearchMode("euclidean", "euclidean", False, "Euclidean distance on the raw features"),
        SearchMode("whitened", "cosine", True,
                   "signed square root, L2, PCA whitening learned from the collection (shrunk), cosine"),
    )
}
DEFAULT_MODE = "chi2"


def whitening_input(features: np.ndarray) -> np.ndarray:
    """What the whitening is learned on and applied to: power-normalised,
    L2-normalised features."""
    return l2_normalise(signed_sqrt(features))


# Added to every eigenvalue, as a fraction of their mean: without it,
# whitening learned from a few hundred images blows up noise directions and
# ruins results (docs/QUALITY.md, "Smaller collections").
WHITENING_SHRINKAGE = 0.3


def learn_whitening(features: np.ndarray) -> Whitening:
    """The whitening stored at index time (no labels needed)."""
    return Whitening.fit(whitening_input(features), shrinkage=WHITENING_SHRINKAGE)


@dataclass
class SearchSpace:
    """Gallery vectors in a mode's space, and how to bring a query there."""

    vectors: np.ndarray
    to_space: Callable[[np.ndarray], np.ndarray]
    metric: str


def search_space(store: FeatureStore, mode_name: str, warn: Callable[[str], None] | None = None,
                 source: str | None = None) -> SearchSpace:
    """The space `mode_name` searches in, for this store.

    A store indexed before whitening existed (or by the post's script) has
    none stored: it is learned now, once, and `warn` is told. So it is when
    the stored whitening holds values that are not finite numbers (damaged).

    Every vector the search will scan is checked here (one read: a memory
    map is read where the scan reads it anyway), and so is each query
    brought into the space: values that are not finite or too large, and
    for chi2 negative values, are refused (search.ValueCheck).

    Args:
        source: the features file, as messages name it (default: the
            memory-mapped file's name, if any).

    Raises:
        FeatureValuesError: a row holds a value the mode can't use; the
            message names `source`, the row and its path.
    """
    mode = MODES[mode_name]
    check = ValueCheck(source or getattr(store.features, "filename", None) or "(features in memory)",
                       store.paths, mode.metric)
    if not mode.whitened:
        check.rows(store.features)
        return SearchSpace(store.features, check.query, mode.metric)
    whitening, vectors = store.whitening, store.whitened_vectors
    damaged = whitening is not None and not _finite_whitening(whitening, vectors)
    if damaged:
        whitening = vectors = None
    if whitening is None or vectors is None or len(vectors) != len(store):
        check.rows(store.features)  # read now, to learn the whitening or apply it
    if whitening is None:
        whitening = learn_whitening(store.features)
        stored = ("the whitening stored with these features holds values that are not finite numbers (damaged?)"
                  if damaged else "no whitening stored with these features")
        (warn or _stderr)(f"note: {stored}; learned it from {len(store)} images (re-index to store it)")
    if vectors is None or len(vectors) != len(store):
        vectors = whitening.apply(whitening_input(store.features))

    def to_space(query: np.ndarray) -> np.ndarray:
        return whitening.apply(whitening_input(check.query(query)[np.newaxis]))[0]

    return SearchSpace(vectors, to_space, mode.metric)


def _finite_whitening(whitening: Whitening, vectors: np.ndarray | None) -> bool:
    """Whether a stored whitening (and its whitened rows) holds only usable values."""
    return (np.isfinite(whitening.mean).all() and np.isfinite(whitening.projection).all()
            and (vectors is None or first_bad_row(vectors) is None))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
