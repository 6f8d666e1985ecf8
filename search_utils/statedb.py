"""The SQLite file under an indexing state (see catalog): one connection, the
schema, all-or-nothing transactions, a small key/value table (`meta`), and
SQLite's errors turned into one line that says what to do about them.

What to do depends on the error, and the advice must never throw work away
that would resume by itself:

    disk full, I/O error     StateWriteError: free some space and run again;
                             every checkpoint committed so far is kept
    no permission, read-only StateAccessError: fix the permissions
    in use                   StateAccessError: another process holds it
    damaged, newer           DamagedStateError: only `--rebuild` (or deleting
                             it) gets past it; the features file is unharmed
    another program's        ForeignStateError: an SQLite database without this
                             tool's tables is never changed, not even by
                             `--rebuild`: move it away or use another name

Knows the tables (catalog gives them their meaning), nothing about models.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from typing import Iterator

from .errors import SearchUtilsError, printable_path

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contents (hash TEXT PRIMARY KEY, features BLOB, error TEXT);
CREATE TABLE IF NOT EXISTS files (
    path BLOB PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    seen_ns INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS catalogue (path BLOB PRIMARY KEY, hash TEXT)
"""

# SQLite's primary result codes (the low byte of an extended code).
_NO_SPACE = {13, 10}  # SQLITE_FULL; SQLITE_IOERR (a write the OS refused: no space, quota, file size limit)
_DAMAGED = {11, 26, 24}  # SQLITE_CORRUPT, SQLITE_NOTADB, SQLITE_FORMAT
_NO_ACCESS = {3, 8, 14, 23}  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_AUTH
_IN_USE = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_TABLES = ("meta", "contents", "files", "catalogue")
# What the `meta` table may hold, and what each value must be.
_REBUILD_MARKS = (None, "requested", "started")


class StateFileError(SearchUtilsError):
    """The indexing state beside a features file can't be used."""


class DamagedStateError(StateFileError):
    """The state is damaged, not an indexing state, or from a newer version:
    only starting it again (`--rebuild`) gets past it."""


class ForeignStateError(StateFileError):
    """The state's name holds another program's SQLite database: it is
    left as it is, even by --rebuild."""


class StateWriteError(StateFileError):
    """A commit failed for lack of space or an I/O error. Every batch
    committed before is kept: the same run resumes once there is space."""


class StateAccessError(StateFileError):
    """The state can't be opened or written (permissions, a read-only
    file system) or another process holds it."""


def state_error(path: str, error: sqlite3.Error) -> StateFileError:
    """The one-line error for SQLite's `error` on state file `path`."""
    code = getattr(error, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    shown, reason = printable_path(path), " ".join(str(error).split())
    if primary in _NO_SPACE:
        kept = count_features(path)
        keeps = f": the {kept} checkpointed images are kept" if kept else ""
        return StateWriteError(f"indexing state {shown} could not be written ({reason}; is the disk full?): "
                               f"free some space and run again{keeps}")
    if primary in _NO_ACCESS:
        return StateAccessError(f"cannot write indexing state {shown} ({reason}): check the permissions "
                                f"of it and of its folder, then run again")
    if primary in _IN_USE:
        return StateAccessError(f"indexing state {shown} is in use by another process ({reason}): "
                                f"wait for it to finish and run again")
    if primary in _DAMAGED:
        return DamagedStateError(f"indexing state {shown} can't be used ({reason}): it is damaged or not an "
                                 f"indexing state; pass --rebuild to start it again (the features file is kept "
                                 f"until the new one is complete)")
    return StateFileError(f"indexing state {shown} can't be used ({reason})")


@contextlib.contextmanager
def state_errors(path: str) -> Iterator[None]:
    """SQLite's errors inside the block as StateFileError (see state_error)."""
    try:
        yield
    except sqlite3.Error as error:
        raise state_error(path, error) from None


def count_features(path: str, strict: bool = False) -> int | None:
    """Contents with features in state file `path`: 0 if there is no such
    file or table; if it can't be read (damaged), 0, or None when `strict`.
    A read-only connection: safe while a run writes (WAL readers don't block
    the writer), and possible on a full disk."""
    if not os.path.exists(path):
        return 0
    if not os.path.isfile(path):  # a FIFO would block SQLite
        return None if strict else 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{_uri_path(path)}?mode=ro", uri=True)) as db:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "contents" not in tables:  # an empty file or database (0); another program's (can't tell)
                return None if strict and tables else 0
            return db.execute("SELECT count(*) FROM contents WHERE features IS NOT NULL").fetchone()[0]
    except sqlite3.Error:
        return None if strict else 0


def _uri_path(path: str) -> str:
    """`path` as the path of a file: URI (?, # and % would end or escape it)."""
    import urllib.parse

    return urllib.parse.quote(os.path.abspath(path))


class StateDatabase:
    """One open state file: SQL, transactions, and the `meta` table.

    Transactions nest: an inner `transaction()` joins the outer one, so a
    caller can make several tables' changes one commit."""

    def __init__(self, path: str, connection: sqlite3.Connection):
        self.path = path
        self._db = connection
        self._depth = 0

    @classmethod
    def open(cls, path: str) -> "StateDatabase":
        """Open state file `path`, creating it if needed.

        A file this call creates and can't finish (a full disk) is removed
        again, journals included.

        Raises:
            StateFileError: see state_error; DamagedStateError for a file
                from a newer version.
        """
        for name in (path, path + "-wal", path + "-shm", path + "-journal"):
            if os.path.lexists(name) and not os.path.isfile(name):  # SQLite would block on a FIFO
                raise StateAccessError(f"cannot use indexing state {printable_path(path)}: "
                                       f"{printable_path(name)} is not a regular file (a FIFO, socket, device "
                                       f"or folder); move it away")
        new = not os.path.exists(path)
        try:
            with state_errors(path):
                connection = sqlite3.connect(path, isolation_level=None)  # transactions are explicit
                try:
                    database = cls(path, connection)
                    database._prepare()
                except BaseException:
                    connection.close()
                    raise
        except BaseException:
            if new:
                for leftover in (path, path + "-wal", path + "-shm", path + "-journal"):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
            raise
        return database

    def _prepare(self) -> None:
        self._refuse_foreign()  # before anything could change it
        # WAL: a commit is one append to the journal, readers never block,
        # and a process killed mid-transaction leaves the previous commit.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss too
        with self.transaction():
            for statement in _SCHEMA.split(";"):
                self._db.execute(statement)
            version = self.get("schema")
            if version is None:
                self.set("schema", SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise DamagedStateError(
                    f"indexing state {printable_path(self.path)} has schema version {version}, this tool reads "
                    f"{SCHEMA_VERSION}: pass --rebuild to start it again"
                )
            self._check_meta()

    def _refuse_foreign(self) -> None:
        """Refuse a database that holds tables but not this tool's: another
        program's, which must not be changed. An empty one is a new state."""
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables or set(_TABLES) <= tables:
            return
        ours = "meta" in tables and self._db.execute(
            "SELECT 1 FROM meta WHERE key = 'schema'").fetchone() is not None
        if not ours:
            listed = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
            raise ForeignStateError(
                f"{printable_path(self.path)} is not an indexing state of this tool (an SQLite database with "
                f"the tables {listed}): it is left as it is, even by --rebuild; move it away or use another "
                f"output name"
            )

    def _check_meta(self) -> None:
        """Refuse, as damaged, a `meta` table whose values aren't what this
        tool writes there (edited by hand, or by another program)."""
        expected = {
            "identity": lambda v: v is None or isinstance(v, dict),
            "rebuild": lambda v: v in _REBUILD_MARKS,
            "written": lambda v: v is None or (isinstance(v, dict) and isinstance(v.get("files"), list)),
        }
        for key, check in expected.items():
            if not check(self.get(key)):
                raise self.damaged(f"its record of {key} is not what this tool writes")

    def damaged(self, why: str) -> DamagedStateError:
        """The error for a state whose content is damaged: `why`, and what to do."""
        return DamagedStateError(f"indexing state {printable_path(self.path)} is damaged ({why}); run again with "
                                 f"--rebuild to start it afresh (the features file is kept until the new one "
                                 f"is complete)")

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing, even if the process dies in the middle."""
        if self._depth:
            yield  # part of the enclosing transaction
            return
        with state_errors(self.path):
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()  # a failed COMMIT may have rolled back already
                raise
            finally:
                self._depth = 0

    def _rollback(self) -> None:
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the error that brought us here is the one to report
                self._db.execute("ROLLBACK")

    def errors(self) -> contextlib.AbstractContextManager:
        """SQLite's errors inside the block as StateFileError: for reading
        rows as they come (execute's cursor reads lazily)."""
        return state_errors(self.path)

    def execute(self, sql: str, parameters=()) -> sqlite3.Cursor:
        with state_errors(self.path):
            return self._db.execute(sql, parameters)

    def executemany(self, sql: str, rows) -> None:
        with state_errors(self.path):
            self._db.executemany(sql, rows)

    def get(self, key: str):
        """A value of the `meta` table, or None.

        Raises:
            DamagedStateError: the value is not JSON (edited by hand).
        """
        row = self.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except (TypeError, ValueError):
            raise self.damaged(f"its record of {key} is not valid JSON") from None

    def set(self, key: str, value) -> None:
        """Set (value None: delete) a value of the `meta` table."""
        if value is None:
            self.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))
