"""A features file loaded for searching: the store, the model that made it,
its ANN index and each mode's search space, each made once and reused by
every query. The search command asks once; the service keeps a Searcher for
as long as the files it was read from stay the same (`signature`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from . import ann
from .catalog import content_hash, state_files, state_path
from .changes import RACY_NS
from .engine import store_model
from .errors import FeaturesFileError, ImageReadError, ModelMismatchError, UnknownModelError, printable_path
from .images import load_image
from .locking import lock_path
from .modes import SearchSpace, search_space
from .result_paths import path_base, usable_from_here, usable_hits
from .search import SearchHit, ValueCheck, absolute_path, find_row, nearest
from .store import NEXT_SUFFIX, files_signature, load_features, metadata_path, whitening_path

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
        try:
            self.model = store_model(self.store, model)
        except (ModelMismatchError, UnknownModelError, FeaturesFileError) as error:
            raise type(error)(naming_the_file(str(error), features_path)) from None
        self._note = note or _stderr
        self.paths_base = path_base(self.store.metadata.get("base_dir"), features_path, self.store.paths)
        self._untold = [self.paths_base.note] if self.paths_base.note else []  # said with the first search
        self._spaces: dict[str, SearchSpace] = {}
        self._index: CandidateIndex | None | bool = False  # False: not looked for yet
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.store)

    @property
    def base_dir(self) -> str | None:
        """The folder relative stored paths start from (result_paths.path_base;
        None: the current folder)."""
        return self.paths_base.folder

    def stored_query(self, image_path: str) -> StoredQuery:
        """Whether the query's stored features can stand for it: its row if
        it is indexed (the same file, however spelled) and, as far as the
        indexing state beside the features file tells, unchanged since it
        was indexed. The query must exist (the caller checks).

        A file whose size or mtime differ from what the state recorded is
        hashed: the same content keeps its row (a touched file); other
        content is an outside query now, with a note saying so.
        """
        row = self.row_of(image_path)
        if row is None:
            return StoredQuery(None)
        if _changed_since_indexed(self.features_path, self.store.metadata.get("dataset"), self.store.paths[row],
                                  image_path):
            return StoredQuery(None, f"note: {printable_path(image_path)} changed since it was indexed in "
                                     f"{printable_path(self.features_path)}: embedding it as it is now")
        return StoredQuery(row)

    def row_of(self, image_path: str) -> int | None:
        """The row of `image_path` if it is indexed (the same file, however spelled)."""
        return find_row(self.store.paths, image_path, self.base_dir)

    def indexed_at(self, path: str) -> str | None:
        """The stored path of the indexed image that `path` is (however
        spelled, through a symbolic link, or a hard link to it), or None."""
        row = self.row_of(path)
        if row is not None:
            return self.store.paths[row]
        try:
            info = os.stat(path)
        except OSError:
            return None
        if info.st_nlink < 2:  # no other name: only its own path could be indexed
            return None
        for stored in self.store.paths:  # a hard link by another name: told by device and inode
            with contextlib.suppress(OSError, ValueError):
                other = os.stat(absolute_path(stored, self.base_dir))
                if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
                    return stored
        return None

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
        with self._lock:
            untold, self._untold = self._untold, []
        for message in untold:
            self._note(message)
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


@dataclass(frozen=True)
class StoredQuery:
    row: int | None  # the row whose features stand for the query; None: embed it
    note: str | None = None  # why an indexed query is embedded after all


def check_query_file(path: str) -> None:
    """Refuse a query that is missing, not a regular file or empty, with
    the reason the image reader gives (`file not found`, ...), before
    anything is read: also a query whose stored features could be reused.

    Raises:
        ImageReadError: the reason.
    """
    try:
        info = os.stat(path)
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode) or info.st_size == 0:
        load_image(path, size=(1, 1))  # raises, with the reason, before decoding anything


def read_query(path: str, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """The query image as the model takes it (images.load_image).

    Raises:
        ImageReadError: as load_image, worded for a query: an image over the
            decompression-bomb limit is "refused", not "skipped", without
            decoding.
    """
    try:
        return load_image(path, size=size, interpolation=interpolation)
    except ImageReadError as error:
        skipped = "skipped without decoding"
        if not error.reason.endswith(skipped):
            raise
        raise ImageReadError(error.path, error.reason[:-len(skipped)] + "refused without decoding") from None


def features_files(features_path: str) -> list[tuple[str, str]]:
    """(file, what it is) for the features file and every file written
    beside it (metadata, whitening, ANN index, indexing state and SQLite's
    journals, lock; the `.next` sidecars of a publish), under the name given
    and, if that is a link, beside the file it points to."""
    files: list[tuple[str, str]] = []
    for name in dict.fromkeys((features_path, os.path.realpath(features_path))):
        shown = printable_path(name)
        files.append((name, f"the features file {shown}"))
        for sidecar, what in ((metadata_path(name), "metadata file"), (whitening_path(name), "whitening file"),
                              (ann.index_path(name), "ANN index"), (lock_path(name), "lock file")):
            files.append((sidecar, f"the {what} of {shown}"))
            files.append((sidecar + NEXT_SUFFIX, f"the {what} of {shown} being published"))
        files += [(state, f"the indexing state of {shown}") for state in state_files(name)]
        files.append((state_path(name) + "-journal", f"the indexing state of {shown}"))
    return files


def features_file_at(path: str, features_path: str) -> str | None:
    """What `path` is among the features file's own files (features_files,
    and the temporary files written beside them: `.NAME.XXXX.tmp`), told by
    real path or, for a file that exists, by device and inode; None if
    none."""
    real = os.path.realpath(path)
    folder, name = os.path.split(real)
    for file, what in features_files(features_path):
        if _same_file(path, real, file):
            return what
        file_folder, file_name = os.path.split(os.path.realpath(file))
        if folder == file_folder and name.startswith(f".{file_name}.") and name.endswith(".tmp"):
            return f"a temporary file of {what}"
    return None


def _same_file(path: str, real: str, other: str) -> bool:
    if real == os.path.realpath(other):
        return True
    try:
        return os.path.samefile(path, other)
    except OSError:  # either is missing
        return False


def naming_the_file(message: str, features_path: str) -> str:
    """A message about "the features file" (engine.store_model's) naming it."""
    shown = printable_path(features_path)
    for said, named in (("features file ", f"features file {shown} "),
                        ("the features file's metadata", f"the metadata of {shown}")):
        if message.startswith(said):
            return named + message[len(said):]
    return f"{shown}: {message}"


def _changed_since_indexed(features_path: str, dataset, stored: str, image_path: str) -> bool:
    """Whether the indexed file `stored` (here as `image_path`) holds other
    content than the indexing run that wrote the features file embedded, by
    the indexing state (catalog) beside it. False when the state can't tell
    (none, unreadable, or the file not in it)."""
    if not isinstance(dataset, str) or not dataset:
        return False
    prefix = os.path.join(dataset, "")
    rel = stored[len(prefix):] if stored.startswith(prefix) else os.path.relpath(stored, dataset)
    recorded = _state_record(state_path(features_path), rel)
    if recorded is None:
        return False
    size, mtime_ns, seen_ns, cached_hash, indexed_hash = recorded
    try:
        info = os.stat(image_path)
        if (cached_hash == indexed_hash and (size, mtime_ns) == (info.st_size, info.st_mtime_ns)
                and info.st_mtime_ns < seen_ns - RACY_NS):
            return False  # as when it was last hashed, and not within a racy tick of it
        return content_hash(image_path) != indexed_hash
    except OSError:  # can't be read: embedding it says why
        return True


def _state_record(state: str, rel: str) -> tuple | None:
    """(size, mtime_ns, seen_ns, hash when last hashed, hash of the last
    complete run) of dataset file `rel` in indexing state `state`, read-only;
    None if there is no state, or it doesn't list `rel`, or can't be read.

    Read as immutable when SQLite's journal isn't there (no run writing):
    a read-only connection would leave -wal and -shm files beside the
    user's files."""
    if not os.path.isfile(state):
        return None
    live = os.path.exists(state + "-wal")
    uri = f"file:{urllib.parse.quote(os.fsencode(os.path.abspath(state)))}?mode=ro{'' if live else '&immutable=1'}"
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            row = db.execute("SELECT f.size, f.mtime_ns, f.seen_ns, f.hash, c.hash FROM catalogue AS c "
                             "LEFT JOIN files AS f ON f.path = c.path WHERE c.path = ?",
                             (rel.encode("utf-8", "surrogateescape"),)).fetchone()
    except (sqlite3.Error, UnicodeError):
        return None
    if row is None or row[4] is None:
        return None
    return row


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
