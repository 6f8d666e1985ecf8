"""Search modes: which vectors are compared, and with which distance.

`--metric` in both imagenet_search.py and evaluate.py takes a mode name.
The plain modes compare the stored features directly; "whitened" compares
them after a transform learned from the collection when it was indexed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import SearchUtilsError, printable_path
from .search import ValueCheck, first_bad_row
from .store import WHITENING_KEYS, FeatureStore, file_format, whitening_path
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

    A store with no usable whitening stored (indexed before whitening
    existed, by the post's script, with fewer than 3 images, or whose
    whitening is missing, damaged or from another generation) has it
    learned now, once, and `warn` is told which of those it was. Where none
    can be learned (one image, or images whose features are all the same)
    the mode compares the signed-square-root, L2-normalised features by
    cosine, without whitening, and `warn` is told so.

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
    named = source or getattr(store.features, "filename", None)
    check = ValueCheck(named or "(features in memory)", store.paths, mode.metric)
    if not mode.whitened:
        check.rows(store.features)
        return SearchSpace(store.features, check.query, mode.metric)
    whitening, vectors, damage = stored_whitening(store, named)
    note = None
    if whitening is None:
        check.rows(store.features)  # read now, to learn the whitening
        whitening = learn_whitening(store.features) if len(store) >= 2 else _NO_WHITENING
        why = damage or missing_whitening(named, store)
        if whitening.learned:
            again = " (re-index to store it)" if len(store) >= MIN_STORED_WHITENING_ROWS else ""
            note = f"note: {why}; learned it from {len(store)} images{again}"
        elif len(store) < MIN_STORED_WHITENING_ROWS:  # none is stored for so few: no more to say
            note = f"note: {_unlearnable(len(store))}"
        else:
            note = f"note: {why}; {_unlearnable(len(store))}"
        vectors = None
    elif not whitening.learned:  # stored by indexing from images that are all the same
        check.rows(store.features)
        note = f"note: {_unlearnable(len(store))}"
    if note is not None:
        (warn or _stderr)(note)
    if not whitening.learned:  # nothing to whiten: the mode's normalised features, compared as they are
        def plain(query: np.ndarray) -> np.ndarray:
            return whitening_input(check.query(query)[np.newaxis])[0]

        return SearchSpace(whitening_input(store.features), plain, mode.metric)
    if vectors is None:
        vectors = whitening.apply(whitening_input(store.features))

    def to_space(query: np.ndarray) -> np.ndarray:
        return whitening.apply(whitening_input(check.query(query)[np.newaxis]))[0]

    return SearchSpace(vectors, to_space, mode.metric)


# Indexing stores no whitening for fewer images (engine.whitening_arrays).
MIN_STORED_WHITENING_ROWS = 3


def _unlearnable(rows: int) -> str:
    what = "one image" if rows == 1 else f"{rows} images whose features are all the same"
    return (f"no whitening can be learned from {what}: comparing the signed-square-root, L2-normalised "
            f"features by cosine, without whitening")


_NO_WHITENING = Whitening(np.zeros(0, np.float32), np.zeros((0, 0), np.float32))  # learned is False


def stored_whitening(store: FeatureStore, source: str | None = None
                     ) -> tuple[Whitening | None, np.ndarray | None, str | None]:
    """(whitening, whitened rows, None) when the store holds a usable
    whitening; (None, None, why) when it holds a damaged one (arrays of the
    wrong type or shape, or values that are not finite numbers); (None,
    None, None) when it holds none. Never raises: the store's readers pass
    on whatever arrays the file holds."""
    arrays = store.whitening_arrays
    if arrays is None:
        return None, None, None
    stored = f"the whitening stored with {printable_path(source) if source else 'these features'}"
    damaged = f"{stored} is damaged"
    try:
        mean, projection, vectors = (arrays[key] for key in ("mean", "projection", "vectors"))
    except (KeyError, TypeError, ValueError):
        return None, None, f"{damaged} (arrays are missing)"
    if not all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in (mean, projection, vectors)):
        return None, None, f"{damaged} (its arrays don't hold floating-point numbers)"
    dim = store.dim
    if (mean.shape != (dim,) or projection.ndim != 2 or projection.shape[0] != dim
            or vectors.shape != (len(store), projection.shape[1])):
        return None, None, f"{damaged} (its arrays don't fit these features)"
    whitening = Whitening(np.asarray(mean, np.float32), np.asarray(projection, np.float32))
    if not _finite_whitening(whitening, vectors):
        return None, None, f"{stored} holds values that are not finite numbers (damaged?)"
    return whitening, vectors, None


def missing_whitening(source: str | None, store: FeatureStore) -> str:
    """Why a features file holds no whitening the search can use, as far as
    its files tell: indexing stores none below 3 images; a CSV's
    `.whitening.npz` may be missing, damaged or from another generation;
    an HDF5 file may hold none or a damaged one. Never raises."""
    stored = "no whitening stored with these features"
    if not source or not os.path.isfile(source):
        return stored
    try:
        if file_format(source) == "hdf5":
            return _missing_in_hdf5(source, stored)
    except SearchUtilsError:
        return stored
    file = whitening_path(source)
    shown, features = printable_path(file), printable_path(source)
    if not os.path.lexists(file):
        if len(store) < MIN_STORED_WHITENING_ROWS:
            return f"{stored} (indexing stores none for fewer than {MIN_STORED_WHITENING_ROWS} images)"
        return f"{stored} ({shown} is missing)"
    generation, complete = _whitening_file_generation(file)
    if not complete:
        return f"the whitening file {shown} is damaged (unreadable or incomplete)"
    recorded = store.metadata.get("generation")
    if recorded is None:  # the CSV's bytes match no recorded generation (edited, or older)
        return f"the whitening file {shown} does not belong to {features} as it is now (edited since indexing?)"
    if generation != recorded:
        return f"the whitening file {shown} is from another generation of {features} (stale)"
    return f"the whitening file {shown} is damaged (its arrays don't fit {features})"


def _whitening_file_generation(file: str) -> tuple[str | None, bool]:
    """(generation id or None, whether it holds every array) of a CSV's
    whitening file; (None, False) if it can't be read."""
    try:
        with np.load(file) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                return None, False
            names = set(data.files)
            generation = str(data["generation"]) if "generation" in names else None
            return generation, all(key in names for key in WHITENING_KEYS)
    except Exception:  # noqa: BLE001 - a damaged file can fail in any of numpy's and zipfile's ways
        return None, False


def _missing_in_hdf5(source: str, stored: str) -> str:
    try:
        import h5py

        with h5py.File(source, "r") as f:
            present = "whitening" in f
    except Exception:  # noqa: BLE001 - unreadable now: say no more than we know
        return stored
    if present:
        return f"the whitening stored in {printable_path(source)} is damaged"
    return stored


def _finite_whitening(whitening: Whitening, vectors: np.ndarray | None) -> bool:
    """Whether a stored whitening (and its whitened rows) holds only usable values."""
    return (np.isfinite(whitening.mean).all() and np.isfinite(whitening.projection).all()
            and (vectors is None or first_bad_row(vectors) is None))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
