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


def search_space(store: FeatureStore, mode_name: str, warn: Callable[[str], None] | None = None) -> SearchSpace:
    """The space `mode_name` searches in, for this store.

    A store indexed before whitening existed (or by the post's script) has
    none stored: it is learned now, once, and `warn` is told.
    """
    mode = MODES[mode_name]
    if not mode.whitened:
        return SearchSpace(store.features, lambda q: np.asarray(q, np.float32), mode.metric)
    whitening = store.whitening
    if whitening is None:
        whitening = learn_whitening(store.features)
        (warn or _stderr)(f"note: no whitening stored with these features; learned it from {len(store)} images "
                          "(re-index to store it)")
    vectors = store.whitened_vectors
    if vectors is None or len(vectors) != len(store):
        vectors = whitening.apply(whitening_input(store.features))

    def to_space(query: np.ndarray) -> np.ndarray:
        return whitening.apply(whitening_input(np.asarray(query)[np.newaxis]))[0]

    return SearchSpace(vectors, to_space, mode.metric)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
