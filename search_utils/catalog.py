"""The indexing state of one features file: what has been embedded already,
so a re-run embeds only what changed and a killed run resumes.

`<output>.state.sqlite` (SQLite, WAL journal), beside the features file:

    meta       schema version; the model identity (one features file never
               mixes models); a record of the features file last written
               from this state, to tell whether it still is as written; a
               rebuild in progress, if any
    contents   content hash -> features, or why the file couldn't be read:
               byte-identical files share one row, so are embedded once, and
               a renamed file finds its features under its unchanged content
    files      path inside the dataset -> size, mtime_ns, when it was seen,
               content hash: a stat cache, so unchanged files are not read
    catalogue  path inside the dataset -> content hash, for every file of
               the last complete run (NULL: it could not even be read): the
               base that new, changed, renamed and removed are counted from

Why a database and not more files: each batch of features is committed in
one transaction, so a run killed at any moment (Ctrl-C, SIGTERM, kill -9)
loses at most the batch in flight and the next run finds the rest, and a
crash can never leave the state half written. The features file itself is
only ever replaced whole (store.save_features, atomically) at the end of a
complete run, from this state.

One class per job: statedb.StateDatabase holds the connection, schema and
transactions; `RunRecord`, `StatCache`, `Contents` and `LastRun` each own
their part of the tables; `IndexState` opens the file, gives access to the
parts, and makes the changes that span several of them (publish, reset)
one transaction.

A rebuild is recorded before it forgets anything: `request_rebuild` marks
the state (the engine then builds the model, and puts the old mark back if
it can't), `reset` forgets everything in one commit and marks the rebuild
started, and `publish` of the complete run clears the mark. A rebuild
killed at any point is so finished by the next run, not silently dropped.

Callers hold the output's lock (locking.exclusive_output): one writer.
Knows nothing about models or images: the identity is an opaque JSON object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .errors import printable_path
from .statedb import (
    SCHEMA_VERSION, DamagedStateError, ForeignStateError, StateAccessError, StateDatabase, StateFileError,
    StateWriteError, count_features,
)

STATE_SUFFIX = ".state.sqlite"
JOURNAL_SUFFIXES = ("-wal", "-shm", "-journal")  # SQLite's files beside the state (-journal: while it is made)
FEATURE_LIMIT = 1e18  # |value| beyond this is no model's (search.VALUE_LIMIT: distances would overflow)
HASH_NAME = "sha256"  # the fastest hashlib digest here (SHA extensions)
HASH_CHUNK = 1 << 20
_SQL_VARIABLES = 500  # parameters per IN (...) query, well under SQLite's limit
_PATH_ERRORS = "surrogateescape"  # non-UTF-8 file names round-trip, as in the CSV

# The rebuild mark (see the module docstring).
REBUILD_REQUESTED = "requested"  # asked for; the old checkpoints are not forgotten yet
REBUILD_STARTED = "started"  # everything forgotten; embedding again, not yet complete


@dataclass(frozen=True)
class FileRecord:
    """How a file looked when it was last hashed."""

    size: int
    mtime_ns: int
    seen_ns: int  # when it was stat'ed: a file modified right then is checked again
    hash: str


# -- the state's files -------------------------------------------------------


def state_path(output: str) -> str:
    """The state file that belongs to features file `output`."""
    return os.fspath(output) + STATE_SUFFIX


def state_files(output: str) -> list[str]:
    """The state file of `output` and SQLite's journal files beside it."""
    path = state_path(output)
    return [path] + [path + suffix for suffix in JOURNAL_SUFFIXES]


def state_exists(output: str) -> bool:
    return os.path.exists(state_path(output))


def state_is_empty(output: str) -> bool:
    """Whether `output` has no state to speak of: none, or an empty (0-byte)
    file, which records nothing (not even a model)."""
    try:
        info = os.stat(state_path(output))
    except OSError:
        return not os.path.lexists(state_path(output))
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def remove_state(output: str) -> None:
    """Delete the state of `output` (and SQLite's journal files), if any."""
    for path in state_files(output):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def count_checkpointed(output: str) -> int:
    """Images whose features the state of `output` holds; 0 without a state.
    Safe while a run writes it (WAL readers don't block the writer)."""
    return count_features(state_path(output))


def discard_if_empty(output: str) -> bool:
    """Delete the state of `output` if it holds no features, for a run that
    created it and failed before its first checkpoint: such a run leaves
    nothing behind. A state with features, or one that can't be read to
    tell, is kept. Returns whether it was deleted."""
    if not state_exists(output) or count_features(state_path(output), strict=True) != 0:
        return False
    remove_state(output)
    return True


def content_hash(path: str) -> str:
    """Hex digest of the file's bytes, read in chunks (any file size).

    Raises:
        OSError: the file can't be opened or read.
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, HASH_NAME).hexdigest()


def _key(path: str) -> bytes:
    return path.encode("utf-8", _PATH_ERRORS)


def _path(key: bytes | str) -> str:
    return key if isinstance(key, str) else bytes(key).decode("utf-8", _PATH_ERRORS)


# -- the parts ---------------------------------------------------------------


class RunRecord:
    """`meta`: the model identity, and a rebuild in progress."""

    def __init__(self, db: StateDatabase):
        self._db = db

    @property
    def identity(self) -> dict | None:
        return self._db.get("identity")

    def set_identity(self, identity: dict | None) -> None:
        with self._db.transaction():
            self._db.set("identity", identity)

    @property
    def rebuild(self) -> str | None:
        """REBUILD_REQUESTED, REBUILD_STARTED or None."""
        return self._db.get("rebuild")

    def set_rebuild(self, mark: str | None) -> None:
        with self._db.transaction():
            self._db.set("rebuild", mark)


class StatCache:
    """`files`: each file's size, mtime and content hash when last hashed."""

    def __init__(self, db: StateDatabase):
        self._db = db

    def records(self) -> dict[str, FileRecord]:
        with self._db.errors():
            rows = self._db.execute("SELECT path, size, mtime_ns, seen_ns, hash FROM files")
            return {_path(key): FileRecord(*rest) for key, *rest in rows}

    def remember(self, records: Iterable[tuple[str, FileRecord]]) -> None:
        rows = [(_key(p), r.size, r.mtime_ns, r.seen_ns, r.hash) for p, r in records]
        if rows:
            with self._db.transaction():
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)

    def keep_catalogued(self) -> None:
        """Forget files the catalogue doesn't list (inside a transaction)."""
        self._db.execute("DELETE FROM files WHERE path NOT IN (SELECT path FROM catalogue)")

    def clear(self) -> None:
        self._db.execute("DELETE FROM files")


class Contents:
    """`contents`: features (or why the file couldn't be read) by content hash."""

    def __init__(self, db: StateDatabase):
        self._db = db

    def known(self) -> dict[str, str | None]:
        with self._db.errors():
            return dict(self._db.execute("SELECT hash, error FROM contents"))

    def add(self, features: dict[str, np.ndarray], errors: dict[str, str]) -> None:
        """One batch, in one transaction."""
        rows = [(h, np.asarray(v, "<f4").tobytes(), None) for h, v in features.items()]
        rows += [(h, None, reason) for h, reason in errors.items()]
        with self._db.transaction():
            self._db.executemany("INSERT OR REPLACE INTO contents VALUES (?, ?, ?)", rows)

    def holds_features(self) -> bool:
        return self._db.execute("SELECT 1 FROM contents WHERE features IS NOT NULL LIMIT 1").fetchone() is not None

    def count(self, hashes: Iterable[str]) -> int:
        hashes = list(hashes)
        found = 0
        for start in range(0, len(hashes), _SQL_VARIABLES):
            chunk = hashes[start:start + _SQL_VARIABLES]
            marks = ",".join("?" * len(chunk))
            found += self._db.execute(f"SELECT count(*) FROM contents WHERE hash IN ({marks})", chunk).fetchone()[0]
        return found

    def read(self, hashes: list[str], dim: int, names: list[str] | None = None) -> np.ndarray:
        """Rows of features for `hashes`, checked as a features file's are
        (the right length, finite, within +-FEATURE_LIMIT); `names` (one
        per hash, e.g. image paths) say which image a damaged row is for."""
        rows: dict[str, list[int]] = {}
        for index, digest in enumerate(hashes):
            rows.setdefault(digest, []).append(index)
        out = np.empty((len(hashes), dim), np.float32)
        filled = 0
        with self._db.errors():
            for digest, blob in self._db.execute("SELECT hash, features FROM contents WHERE features IS NOT NULL"):
                if digest in rows:
                    if not isinstance(blob, bytes) or len(blob) != 4 * dim:
                        size = len(blob) // 4 if isinstance(blob, bytes) else "no"
                        raise self._db.damaged(f"it holds {size} values per image, not {dim}")
                    out[rows[digest]] = np.frombuffer(blob, "<f4")
                    filled += len(rows[digest])
        if filled != len(hashes):
            raise self._db.damaged("it lacks features it listed")
        self._check_values(out, names or hashes)
        return out

    def _check_values(self, features: np.ndarray, names: list[str]) -> None:
        usable = np.isfinite(features) & (np.abs(features) <= FEATURE_LIMIT)
        if usable.all():
            return
        row, column = (int(i) for i in np.argwhere(~usable)[0])
        value = features[row, column]
        what = f"{value:g}, beyond any model's values" if np.isfinite(value) else f"{value}, not a finite number"
        raise self._db.damaged(f"value {column + 1} of {features.shape[1]} stored for {printable_path(names[row])} "
                               f"is {what}")

    def keep_catalogued(self) -> None:
        """Forget contents the catalogue doesn't use (inside a transaction)."""
        self._db.execute("DELETE FROM contents WHERE hash NOT IN (SELECT hash FROM catalogue WHERE hash IS NOT NULL)")

    def clear(self) -> None:
        self._db.execute("DELETE FROM contents")


class LastRun:
    """`catalogue` and the `written` record: the last complete run."""

    def __init__(self, db: StateDatabase):
        self._db = db

    def catalogue(self) -> dict[str, str | None]:
        with self._db.errors():
            return {_path(key): digest for key, digest in self._db.execute("SELECT path, hash FROM catalogue")}

    @property
    def written(self) -> dict | None:
        return self._db.get("written")

    def replace(self, catalogue: dict[str, str | None], written: dict | None) -> None:
        """Make `catalogue` and `written` the record (inside a transaction)."""
        self._db.execute("DELETE FROM catalogue")
        self._db.executemany("INSERT INTO catalogue VALUES (?, ?)", ((_key(p), h) for p, h in catalogue.items()))
        self._db.set("written", written)


# -- the whole ---------------------------------------------------------------


class IndexState:
    """One open state file. Use as a context manager, or call `close`.

    The parts are `record`, `files`, `contents` and `last_run`; the methods
    below are the interface the engine and the change scanner use."""

    def __init__(self, db: StateDatabase):
        self._db = db
        self.record = RunRecord(db)
        self.files = StatCache(db)
        self.contents = Contents(db)
        self.last_run = LastRun(db)

    @classmethod
    def open(cls, path: str) -> "IndexState":
        """Open the state file `path`, creating it if needed.

        Raises:
            StateFileError: can't be opened or created (statedb.state_error
                says why); DamagedStateError: not a state file, damaged, or
                from a newer version.
        """
        return cls(StateDatabase.open(path))

    @property
    def path(self) -> str:
        return self._db.path

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IndexState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the model and the rebuild mark ------------------------------------

    @property
    def identity(self) -> dict | None:
        """The model identity recorded by `set_identity`, or None."""
        return self.record.identity

    def set_identity(self, identity: dict) -> None:
        self.record.set_identity(identity)

    @property
    def rebuild(self) -> str | None:
        """REBUILD_REQUESTED, REBUILD_STARTED, or None: no rebuild going on."""
        return self.record.rebuild

    def request_rebuild(self) -> str | None:
        """Mark a rebuild as asked for, before anything is forgotten; returns
        the mark it replaced, for `set_rebuild` to put back if the rebuild
        can't go ahead after all (its model can't be built)."""
        previous = self.record.rebuild
        self.record.set_rebuild(REBUILD_REQUESTED)
        return previous

    def set_rebuild(self, mark: str | None) -> None:
        self.record.set_rebuild(mark)

    def reset(self) -> None:
        """Forget everything (model, stat cache, contents, last run) and mark
        the rebuild started, in one commit."""
        with self._db.transaction():
            self.files.clear()
            self.contents.clear()
            self.last_run.replace({}, None)
            self.record.set_identity(None)
            self.record.set_rebuild(REBUILD_STARTED)

    # -- the stat cache ----------------------------------------------------

    def stat_cache(self) -> dict[str, FileRecord]:
        return self.files.records()

    def remember_files(self, records: Iterable[tuple[str, FileRecord]]) -> None:
        """Save freshly computed hashes, so a resumed run needn't read them again."""
        self.files.remember(records)

    # -- contents ----------------------------------------------------------

    def known_contents(self) -> dict[str, str | None]:
        """Every content hash in the state -> None if embedded, else why it
        couldn't be read."""
        return self.contents.known()

    def add_contents(self, features: dict[str, np.ndarray], errors: dict[str, str]) -> None:
        """Checkpoint one batch: its features and its unreadable files, in
        one transaction."""
        self.contents.add(features, errors)

    def holds_features(self) -> bool:
        """Whether any features were embedded into this state."""
        return self.contents.holds_features()

    def count_contents(self, hashes: Iterable[str]) -> int:
        """How many of `hashes` the state holds (embedded or unreadable)."""
        return self.contents.count(hashes)

    def read_features(self, hashes: list[str], dim: int, names: list[str] | None = None) -> np.ndarray:
        """Rows of features, one per entry of `hashes` (repeats allowed),
        checked as a features file's are; `names` (e.g. the image paths)
        name a damaged row in the message.

        Raises:
            DamagedStateError: a hash has no features, their length is not
                `dim`, or a value is not finite or beyond FEATURE_LIMIT.
        """
        return self.contents.read(hashes, dim, names)

    # -- the last complete run ---------------------------------------------

    def catalogue(self) -> dict[str, str | None]:
        """Path inside the dataset -> content hash (None: unreadable), as of
        the last complete run."""
        return self.last_run.catalogue()

    @property
    def written(self) -> dict | None:
        """What `publish` recorded about the features file it went with."""
        return self.last_run.written

    def publish(self, catalogue: dict[str, str | None], written: dict) -> None:
        """Record a complete run, once its features file is in place: the new
        catalogue and what was written; forget files and contents no longer
        in the dataset; a rebuild is done. One transaction: a kill before it
        commits leaves the previous run's record, and the next run simply
        writes the same file."""
        with self._db.transaction():
            self.last_run.replace(catalogue, written)
            self.files.keep_catalogued()
            self.contents.keep_catalogued()
            self.record.set_rebuild(None)


__all__ = [
    "HASH_NAME", "REBUILD_REQUESTED", "REBUILD_STARTED", "SCHEMA_VERSION", "STATE_SUFFIX",
    "Contents", "DamagedStateError", "FileRecord", "ForeignStateError", "IndexState", "LastRun", "RunRecord",
    "StatCache", "StateAccessError", "StateFileError", "StateWriteError",
    "content_hash", "count_checkpointed", "discard_if_empty", "remove_state", "state_exists", "state_files",
    "state_is_empty", "state_path",
]
