"""A features file loaded for searching: the store, the model that made it,
its ANN index and each mode's search space, each made once and reused by
every query. The search command asks once; the service keeps a Searcher for
as long as the files it was read from stay the same (`signature`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from . import ann
from .engine import store_model
from .modes import SearchSpace, search_space
from .result_paths import usable_from_here, usable_hits
from .search import SearchHit, ValueCheck, find_row, nearest
from .store import files_signature, load_features, metadata_path, whitening_path

# numba's default threading layer aborts the process when two threads run
# parallel kernels at once, and one query already uses every core: searches
# in one process take turns.
_COMPUTE = threading.Lock()


@dataclass(frozen=True)
class Found:
    hits: list[SearchHit]  # paths as they open from the current folder
    method: str | None  # how the rows were searched, when worth saying (large collections)


class CandidateIndex(Protocol):
    """Proposes rows near a query; they are re-ranked with exact chi2."""

    def search(self, query: np.ndarray, k: int, probes: int | None = None) -> np.ndarray:
        """Row ids of the store, about the `k` nearest first."""

    def describe(self) -> str:
        """What searched, for the method line."""


class SearchBackend(Protocol):
    """Where chi2 candidates come from for one generation of a features file."""

    def candidates_for(self, features_path: str, store, note: Callable[[str], None]) -> CandidateIndex | None:
        """The candidate index, or None: scan every row (and `note` why, if worth saying)."""


class EmbeddedBackend:
    """The default: the FAISS index beside the features file when there is a
    fresh one (large collections, see ann.py), else the exact scan."""

    def candidates_for(self, features_path: str, store, note: Callable[[str], None]) -> CandidateIndex | None:
        return ann.fresh_index(features_path, store.features, note)


EMBEDDED = EmbeddedBackend()


def signature(features_path: str) -> tuple:
    """What the files of one features generation are now: a re-indexing run
    that publishes a new generation changes it."""
    return files_signature(features_path, metadata_path(features_path), whitening_path(features_path),
                           ann.index_path(features_path))


class Searcher:
    """One generation of a features file, ready to search many times.

    Raises (on construction): what load_features and store_model raise.
    """

    def __init__(self, features_path: str, model: str | None = None,
                 note: Callable[[str], None] | None = None, backend: SearchBackend = EMBEDDED):
        self.features_path = features_path
        self.backend = backend
        self.signature = signature(features_path)  # before reading: a change while reading shows next time
        self.store = load_features(features_path, mmap=True)  # HDF5: rows are read when used
        self.model = store_model(self.store, model)
        self._note = note or _stderr
        self._spaces: dict[str, SearchSpace] = {}
        self._index: CandidateIndex | None | bool = False  # False: not looked for yet
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store)

    @property
    def base_dir(self) -> str | None:
        return self.store.metadata.get("base_dir")

    def row_of(self, image_path: str) -> int | None:
        """The row of `image_path` if it is indexed (the same file, however spelled)."""
        return find_row(self.store.paths, image_path, self.base_dir)

    def shown_path(self, row: int) -> str:
        """The path of `row` as results show it: it opens from the current folder."""
        return usable_from_here(self.store.paths[row], self.base_dir)

    def is_current(self) -> bool:
        return signature(self.features_path) == self.signature

    def search(self, query: np.ndarray, mode: str, n: int, exact: bool = False,
               collapse: bool = True) -> Found:
        """The `n` rows nearest to the query's features in `mode` (modes.MODES).

        chi2 takes candidates from the backend when it has them (the
        embedded one: a fresh ANN index beside the features, for large
        collections; a vector database) unless `exact`, and re-ranks them
        with exact chi2; every other case scans every row. Values no
        distance can use are refused in one line naming the row
        (search.ValueCheck): the candidate path checks the query and the
        rows it reads, the scan every row once per mode.

        Raises:
            FeatureValuesError: a value the mode can't use.
        """
        index = self.candidate_index() if mode == "chi2" and not exact else None
        with _COMPUTE:
            if index is not None:
                hits, method = self._approximate(index, query, n, collapse)
            else:
                hits, method = self._exact(query, mode, n, exact, collapse)
        return Found(usable_hits(hits, self.base_dir), method)

    def candidate_index(self) -> CandidateIndex | None:
        with self._lock:
            if self._index is False:
                self._index = self.backend.candidates_for(self.features_path, self.store, self._note)
            return self._index

    def space(self, mode: str) -> SearchSpace:
        """The mode's search space: made (and every row checked) on first use."""
        with self._lock:
            if mode not in self._spaces:
                self._spaces[mode] = search_space(self.store, mode, self._note, source=self.features_path)
            return self._spaces[mode]

    def _approximate(self, index: CandidateIndex, query: np.ndarray, n: int, collapse: bool):
        candidates = max(ann.DEFAULT_CANDIDATES, 4 * n)
        values = ValueCheck(self.features_path, self.store.paths, "chi2")
        hits = ann.nearest(index, values.reading(self.store.features), self.store.paths, values.query(query),
                           n, candidates=candidates, collapse=collapse)
        return hits, (f"approximate search ({index.describe()}, {candidates} candidates re-ranked "
                      "with exact chi2; --exact scans every row)")

    def _exact(self, query: np.ndarray, mode: str, n: int, exact: bool, collapse: bool):
        space = self.space(mode)
        hits = nearest(space.vectors, self.store.paths, space.to_space(query), n, space.metric, collapse=collapse)
        large = exact or len(self.store) >= ann.DEFAULT_THRESHOLD
        return hits, (f"exact search ({len(self.store):,} rows)" if large else None)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
