"""The indexing state of one features file: what has been embedded already,
so a re-run embeds only what changed and a killed run resumes.

`<output>.state.sqlite` (SQLite, WAL journal), beside the features file:

    meta       schema version; the model identity (one features file never
               mixes models); a record of the features file last written
               from this state, to tell whether it still is as written
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

Callers hold the output's lock (locking.exclusive_output): one writer.
Knows nothing about models or images: the identity is an opaque JSON object.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .errors import SearchUtilsError

STATE_SUFFIX = ".state.sqlite"
SCHEMA_VERSION = 1
HASH_NAME = "sha256"  # the fastest hashlib digest here (SHA extensions)
HASH_CHUNK = 1 << 20
_SQL_VARIABLES = 500  # parameters per IN (...) query, well under SQLite's limit
_PATH_ERRORS = "surrogateescape"  # non-UTF-8 file names round-trip, as in the CSV

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contents (hash TEXT PRIMARY KEY, features BLOB, error TEXT);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    seen_ns INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS catalogue (path BLOB PRIMARY KEY, hash TEXT)
"""


class StateFileError(SearchUtilsError):
    """The indexing state beside a features file is unreadable or foreign."""


@dataclass(frozen=True)
class FileRecord:
    """How a file looked when it was last hashed."""

    size: int
    mtime_ns: int
    seen_ns: int  # when it was stat'ed: a file modified right then is checked again
    hash: str


def state_path(output: str) -> str:
    """The state file that belongs to features file `output`."""
    return os.fspath(output) + STATE_SUFFIX


def state_exists(output: str) -> bool:
    return os.path.exists(state_path(output))


def remove_state(output: str) -> None:
    """Delete the state of `output` (and SQLite's journal files), if any."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path(output) + suffix)


def content_hash(path: str) -> str:
    """Hex digest of the file's bytes, read in chunks (any file size).

    Raises:
        OSError: the file can't be opened or read.
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, HASH_NAME).hexdigest()


def _key(path: str) -> bytes:
    return path.encode("utf-8", _PATH_ERRORS)


def _path(key: bytes) -> str:
    return bytes(key).decode("utf-8", _PATH_ERRORS)


class IndexState:
    """One open state file. Use as a context manager, or call `close`."""

    def __init__(self, path: str, connection: sqlite3.Connection):
        self.path = path
        self._db = connection

    @classmethod
    def open(cls, path: str) -> "IndexState":
        """Open the state file `path`, creating it if needed.

        Raises:
            StateFileError: not a state file, damaged, or from a newer version.
        """
        with _state_errors(path):
            db = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
            try:
                state = cls(path, db)
                state._prepare()
            except BaseException:
                db.close()
                raise
        return state

    def _prepare(self) -> None:
        # WAL: a commit is one append to the journal, readers never block,
        # and a process killed mid-transaction leaves the previous commit.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss too
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                self._db.execute(statement)
            version = self._get("schema")
            if version is None:
                self._set("schema", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise StateFileError(
                    f"indexing state {self.path} has schema version {version}, this tool reads "
                    f"{SCHEMA_VERSION}: pass --rebuild to start it again"
                )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "IndexState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """All or nothing, even if the process dies in the middle."""
        with _state_errors(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _get(self, key: str):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _set(self, key: str, value) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    # -- the model and the written features file --------------------------

    @property
    def identity(self) -> dict | None:
        """The model identity recorded by `set_identity`, or None."""
        with _state_errors(self.path):
            return self._get("identity")

    def set_identity(self, identity: dict) -> None:
        with self._transaction():
            self._set("identity", identity)

    @property
    def written(self) -> dict | None:
        """What `publish` recorded about the features file it went with."""
        with _state_errors(self.path):
            return self._get("written")

    # -- the stat cache ----------------------------------------------------

    def stat_cache(self) -> dict[str, FileRecord]:
        with _state_errors(self.path):
            rows = self._db.execute("SELECT path, size, mtime_ns, seen_ns, hash FROM files")
            return {_path(key): FileRecord(*rest) for key, *rest in rows}

    def remember_files(self, records: Iterable[tuple[str, FileRecord]]) -> None:
        """Save freshly computed hashes, so a resumed run needn't read them again."""
        rows = [(_key(p), r.size, r.mtime_ns, r.seen_ns, r.hash) for p, r in records]
        if rows:
            with self._transaction():
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)

    # -- contents ----------------------------------------------------------

    def known_contents(self) -> dict[str, str | None]:
        """Every content hash in the state -> None if embedded, else why it
        couldn't be read."""
        with _state_errors(self.path):
            return dict(self._db.execute("SELECT hash, error FROM contents"))

    def add_contents(self, features: dict[str, np.ndarray], errors: dict[str, str]) -> None:
        """Checkpoint one batch: its features and its unreadable files, in
        one transaction."""
        rows = [(h, np.asarray(v, "<f4").tobytes(), None) for h, v in features.items()]
        rows += [(h, None, reason) for h, reason in errors.items()]
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO contents VALUES (?, ?, ?)", rows)

    def holds_features(self) -> bool:
        """Whether any features were embedded into this state."""
        with _state_errors(self.path):
            return self._db.execute("SELECT 1 FROM contents WHERE features IS NOT NULL LIMIT 1").fetchone() is not None

    def count_contents(self, hashes: Iterable[str]) -> int:
        """How many of `hashes` the state holds (embedded or unreadable)."""
        hashes = list(hashes)
        found = 0
        with _state_errors(self.path):
            for start in range(0, len(hashes), _SQL_VARIABLES):
                chunk = hashes[start:start + _SQL_VARIABLES]
                marks = ",".join("?" * len(chunk))
                found += self._db.execute(f"SELECT count(*) FROM contents WHERE hash IN ({marks})", chunk).fetchone()[0]
        return found

    def read_features(self, hashes: list[str], dim: int) -> np.ndarray:
        """Rows of features, one per entry of `hashes` (repeats allowed).

        Raises:
            StateFileError: a hash has no features, or their length is not `dim`.
        """
        rows: dict[str, list[int]] = {}
        for index, digest in enumerate(hashes):
            rows.setdefault(digest, []).append(index)
        out = np.empty((len(hashes), dim), np.float32)
        filled = 0
        with _state_errors(self.path):
            for digest, blob in self._db.execute("SELECT hash, features FROM contents WHERE features IS NOT NULL"):
                if digest in rows:
                    vector = np.frombuffer(blob, "<f4")
                    if vector.size != dim:
                        raise StateFileError(
                            f"indexing state {self.path} holds {vector.size} values per image, not {dim}: "
                            f"pass --rebuild to start it again"
                        )
                    out[rows[digest]] = vector
                    filled += len(rows[digest])
        if filled != len(hashes):
            raise StateFileError(f"indexing state {self.path} lacks features it listed: pass --rebuild")
        return out

    # -- the last complete run ---------------------------------------------

    def catalogue(self) -> dict[str, str | None]:
        """Path inside the dataset -> content hash (None: unreadable), as of
        the last complete run."""
        with _state_errors(self.path):
            return {_path(key): digest for key, digest in self._db.execute("SELECT path, hash FROM catalogue")}

    def publish(self, catalogue: dict[str, str | None], written: dict) -> None:
        """Record a complete run, once its features file is in place: the new
        catalogue and what was written; forget files and contents no longer
        in the dataset. One transaction: a kill before it commits leaves the
        previous run's record, and the next run simply writes the same file."""
        with self._transaction():
            self._db.execute("DELETE FROM catalogue")
            self._db.executemany("INSERT INTO catalogue VALUES (?, ?)", ((_key(p), h) for p, h in catalogue.items()))
            self._db.execute("DELETE FROM files WHERE path NOT IN (SELECT path FROM catalogue)")
            self._db.execute(
                "DELETE FROM contents WHERE hash NOT IN (SELECT hash FROM catalogue WHERE hash IS NOT NULL)"
            )
            self._set("written", written)


@contextlib.contextmanager
def _state_errors(path: str) -> Iterator[None]:
    """SQLite's errors (damaged or foreign file, full disk) as one line."""
    try:
        yield
    except sqlite3.Error as error:
        raise StateFileError(
            f"indexing state {path} can't be used ({error}); delete it or pass --rebuild to start again"
        ) from None


def count_checkpointed(output: str) -> int:
    """Images whose features the state of `output` holds; 0 without a state.
    Safe while a run writes it (WAL readers don't block the writer)."""
    path = state_path(output)
    if not os.path.exists(path):
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            return db.execute("SELECT count(*) FROM contents WHERE features IS NOT NULL").fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0
