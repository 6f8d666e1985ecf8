"""A features file's rows in PostgreSQL + pgvector, kept in step by `sync`,
and the candidate index search asks (docs/VECTOR_DB.md).

Schema (created if missing):

    search_collections   one row per collection: its items table, the model
                         and dimension it was made from, the sqrt-PCA
                         projection (mean and components, float32 bytes),
                         the index method, the row count
    search_items_<hash>  one table per collection: path (primary key), the
                         blake2b-16 digest of the row's float32 features,
                         embedding vector(reduced) with an HNSW index

A collection is named after the features file's absolute path
(`collection_name`), so any number of features files can share a database
(a base name alone made two folders' `features.csv` overwrite each other's
rows); a features file moved elsewhere starts a new collection.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .. import ann
from . import DatabaseError, redacted

CONNECT_TIMEOUT = 5  # seconds: a down server is one line soon, not a hang
BLOCK_ROWS = 8192  # store rows read, hashed and projected at a time (64 MB at 2048-d)
DELETE_BATCH = 10_000
SCHEMA_LOCK = 0x5EA2C4  # advisory lock: two first-time connections don't race creating tables
# HNSW, measured against IVFFlat on the synthetic rows (docs/VECTOR_DB.md): m and
# ef_construction as pgvector's defaults; ef_search >= the candidates asked for
# (pgvector 0.6 returns at most ef_search rows).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
MIN_EF_SEARCH = 40
MAX_EF_SEARCH = 1000  # pgvector's limit
BUILD_MEMORY_CAP = 4 << 30  # maintenance_work_mem asked for while building the index

SCHEMA = """
CREATE TABLE IF NOT EXISTS search_collections (
    name text PRIMARY KEY,
    items_table text NOT NULL UNIQUE,
    model text,
    feature_dim integer NOT NULL,
    reduced_dim integer NOT NULL,
    projection_mean bytea NOT NULL,
    projection_components bytea NOT NULL,
    index_method text NOT NULL,
    row_count bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)"""


def collection_name(features_path: str) -> str:
    """The collection a features file syncs to: its absolute path (symlinks
    resolved), the same from whichever folder indexing or search runs."""
    return os.path.realpath(os.fspath(features_path))


def stored_path(path: str) -> str:
    """`path` as the text PostgreSQL keeps: the bytes of a file name that is
    not UTF-8 (held by Python as surrogates, which no text column accepts) as
    \\xNN, and backslashes doubled, so that no two paths get the same text."""
    if "\\" not in path and path.isprintable():  # the usual case, unchanged
        return path
    return path.replace("\\", "\\\\").encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def items_table(name: str) -> str:
    """A safe, stable table name for collection `name` (any characters)."""
    return "search_items_" + hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()


def row_digests(rows: np.ndarray) -> list[bytes]:
    """blake2b-16 of each row's float32 bytes: equal digests, equal features."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


@dataclass
class Collection:
    """A collection's row of search_collections."""

    name: str
    table: str
    model: str | None
    feature_dim: int
    projection: ann.Projection
    index_method: str
    rows: int

    def describe(self) -> str:
        return f"pgvector {self.index_method.upper()} over {self.projection.components.shape[1]}-d sqrt-PCA"


@dataclass
class SyncReport:
    database: str  # redacted
    collection: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    rows: int = 0
    relearned: bool = False  # a new projection: every row was written
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return self.rows if self.relearned else self.added + self.updated

    def __str__(self) -> str:
        rewrite = f"; new projection, all {self.rows:,} rows written" if self.relearned else ""
        return (f"database {self.database}: collection {self.collection}, {self.added:,} added, "
                f"{self.updated:,} updated, {self.removed:,} removed ({self.rows:,} rows{rewrite})")


class VectorDatabase:
    """One connection to the database server (autocommit; `sync` is one transaction)."""

    def __init__(self, uri: str, connection):
        self.uri = uri
        self.name = redacted(uri)
        self.connection = connection
        self.lock = threading.Lock()  # the service searches from several threads; one connection

    @classmethod
    def connect(cls, uri: str) -> "VectorDatabase":
        database = cls(uri, _connect(uri))
        with database.errors("set up the tables"):
            database._create_schema()
        return database

    def close(self) -> None:
        self.connection.close()

    def errors(self, doing: str):
        return _translated(self, doing)

    def _create_schema(self) -> None:
        with self.connection.transaction():
            self.connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            if self.connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
                self.connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            self.connection.execute(SCHEMA)
        _register_vector(self.connection)

    def reconnect(self) -> None:
        """A new connection after the old one broke (e.g. the server restarted)."""
        self.connection.close()
        self.connection = _connect(self.uri)
        _register_vector(self.connection)

    # ------------------------------------------------------------------ sync

    def sync(self, features_path: str, store, rebuild: bool = False,
             note: Callable[[str], None] | None = None) -> SyncReport:
        """Bring the collection of `features_path` in step with `store` (its
        FeatureStore) in one transaction: delete paths the store no longer has,
        write new and changed rows, leave the rest. The projection is learned
        on the first sync, on `rebuild`, or when the model or dimension
        changed; then every row is written again."""
        started = time.perf_counter()
        name = collection_name(features_path)
        note = note or _stderr
        with self.errors(f"sync collection {name}"), self.lock, self.connection.transaction():
            self.connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))  # one sync at a time
            existing = self.collection(name)
            relearn = rebuild or existing is None or _made_differently(existing, store)
            report = SyncReport(self.name, name, relearned=relearn)
            if len(store) == 0:  # nothing to learn a projection from: no collection
                report.relearned = False
                report.removed = self._drop(name, existing)
                return report
            if relearn:
                self._rewrite(name, existing, store, report, note)
            else:
                self._apply_difference(existing, store, report)
            report.rows = self._count(items_table(name))
            if relearn or report.written or report.removed:
                self.connection.execute("UPDATE search_collections SET row_count = %s, updated_at = now() "
                                        "WHERE name = %s", (report.rows, name))
        report.seconds = time.perf_counter() - started
        return report

    def collection(self, name: str) -> Collection | None:
        row = self.connection.execute(
            "SELECT items_table, model, feature_dim, reduced_dim, projection_mean, projection_components, "
            "index_method, row_count FROM search_collections WHERE name = %s", (name,)).fetchone()
        if row is None:
            return None
        table, model, dim, reduced, mean, components, method, rows = row
        projection = ann.Projection(np.frombuffer(mean, "<f4").astype(np.float32),
                                    np.frombuffer(components, "<f4").reshape(dim, reduced).astype(np.float32))
        return Collection(name, table, model, dim, projection, method, rows)

    def _apply_difference(self, existing: Collection, store, report: SyncReport) -> None:
        stored = self._digests(existing.table)
        to_write, changed = self._compare(store, stored, report)
        stale = list(stored) + changed  # paths the store no longer has, and old versions of changed rows
        report.removed = len(stored)
        for start in range(0, len(stale), DELETE_BATCH):
            self.connection.execute(f"DELETE FROM {existing.table} WHERE path = ANY(%s)",
                                    (stale[start:start + DELETE_BATCH],))
        self._copy_rows(existing.table, store, to_write, existing.projection)

    def _compare(self, store, stored: dict[str, bytes], report: SyncReport,
                 everything: bool = False) -> tuple[list[int], list[str]]:
        """(rows of `store` to write: new and changed, or with `everything`
        all; paths of the changed ones). Counts into `report`; leaves in
        `stored` only the paths the store doesn't have."""
        to_write, changed, seen = [], [], set()
        for start, digests in _block_digests(store):
            for offset, digest in enumerate(digests):
                row = start + offset
                path = stored_path(store.paths[row])
                if path in seen:  # a path twice: its first row counts
                    continue
                seen.add(path)
                old = stored.pop(path, None)
                if old == digest:
                    report.unchanged += 1
                    if everything:
                        to_write.append(row)
                    continue
                to_write.append(row)
                if old is None:
                    report.added += 1
                else:
                    report.updated += 1
                    changed.append(path)
        return to_write, changed

    def _rewrite(self, name: str, existing: Collection | None, store, report: SyncReport,
                 note: Callable[[str], None]) -> None:
        """A new projection learned from `store`, a new items table with every
        row, its index built once the rows are in (faster than row by row)."""
        table = items_table(name)
        stored = self._digests(table) if existing is not None and self._table_exists(table) else {}
        rows, _ = self._compare(store, stored, report, everything=True)
        report.removed = len(stored)
        note(f"database {self.name}: learning the sqrt-PCA projection of {name} from {len(store):,} rows")
        projection = ann.Projection.learn(store.features)
        reduced = projection.components.shape[1]
        self.connection.execute(f"DROP TABLE IF EXISTS {table}")
        self.connection.execute(f"CREATE TABLE {table} (path text PRIMARY KEY, digest bytea NOT NULL, "
                                f"embedding vector({reduced}) NOT NULL)")
        self._copy_rows(table, store, rows, projection, note)
        self._build_index(table, len(rows), reduced, note)
        self.connection.execute(
            "INSERT INTO search_collections (name, items_table, model, feature_dim, reduced_dim, projection_mean, "
            "projection_components, index_method, row_count) VALUES (%s, %s, %s, %s, %s, %s, %s, 'hnsw', %s) "
            "ON CONFLICT (name) DO UPDATE SET items_table = excluded.items_table, model = excluded.model, "
            "feature_dim = excluded.feature_dim, reduced_dim = excluded.reduced_dim, "
            "projection_mean = excluded.projection_mean, projection_components = excluded.projection_components, "
            "index_method = excluded.index_method, row_count = excluded.row_count, updated_at = now()",
            (name, table, store.metadata.get("model"), store.dim, reduced,
             np.ascontiguousarray(projection.mean, "<f4").tobytes(),
             np.ascontiguousarray(projection.components, "<f4").tobytes(), len(rows)))

    def _build_index(self, table: str, rows: int, reduced: int, note: Callable[[str], None]) -> None:
        # the graph is built in memory if it fits: about the vectors plus 2 m links of 8 bytes per row
        needed = min(BUILD_MEMORY_CAP, max(64 << 20, int(rows * (reduced * 4 + HNSW_M * 2 * 8 + 200) * 1.2)))
        self.connection.execute("SELECT set_config('maintenance_work_mem', %s, true)", (f"{needed // 1024}kB",))
        if rows >= 100_000:
            note(f"database {self.name}: building the HNSW index over {rows:,} rows "
                 "(about 10 minutes per million rows on 2 cores)")
        self.connection.execute(f"CREATE INDEX ON {table} USING hnsw (embedding vector_l2_ops) "
                                f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})")

    def _copy_rows(self, table: str, store, rows: list[int], projection: ann.Projection,
                   note: Callable[[str], None] | None = None) -> None:
        """COPY the given store rows (path, digest, projected vector) in binary, a block at a time."""
        if not rows:
            return
        wanted = np.asarray(rows, dtype=np.int64)
        with self.connection.cursor() as cursor, \
                cursor.copy(f"COPY {table} (path, digest, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["text", "bytea", "vector"])
            for start in range(0, len(wanted), BLOCK_ROWS):
                block = wanted[start:start + BLOCK_ROWS]
                # sorted ids: a memory map reads only these rows
                features = np.asarray(store.features[block], dtype=np.float32)
                for row, digest, vector in zip(block, row_digests(features), projection(features)):
                    copy.write_row((stored_path(store.paths[row]), digest, vector))

    def _digests(self, table: str) -> dict[str, bytes]:
        """path -> digest of every stored row (a server-side cursor: no million-row result at once)."""
        with self.connection.cursor(name="search_digests") as cursor:
            cursor.itersize = 50_000
            cursor.execute(f"SELECT path, digest FROM {table}")
            return {path: bytes(digest) for path, digest in cursor}

    def _drop(self, name: str, existing: Collection | None) -> int:
        """Remove a collection; returns how many rows it had."""
        if existing is None:
            return 0
        rows = self._count(existing.table) if self._table_exists(existing.table) else 0
        self.connection.execute(f"DROP TABLE IF EXISTS {existing.table}")
        self.connection.execute("DELETE FROM search_collections WHERE name = %s", (name,))
        return rows

    def _table_exists(self, table: str) -> bool:
        return self.connection.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]

    def _count(self, table: str) -> int:
        return self.connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    # ---------------------------------------------------------------- search

    def backend(self) -> "DatabaseBackend":
        return DatabaseBackend(self)


class DatabaseBackend:
    """searcher.SearchBackend: candidates from the database."""

    def __init__(self, database: VectorDatabase):
        self.database = database

    def candidates_for(self, features_path: str, store, note: Callable[[str], None]) -> "DatabaseCandidates | None":
        name = collection_name(features_path)
        with self.database.errors(f"read collection {name}"), self.database.lock:
            found = self.database.collection(name)
        where = f"database {self.database.name}"
        why_not = None
        if found is None or found.rows == 0:
            why_not = f"has no rows for collection {name} (index with --db first)"
        elif found.feature_dim != store.dim or _made_differently(found, store):
            why_not = (f"holds collection {name} made from other features ({found.model}, {found.feature_dim} "
                       "values) than the features file (re-index with --db)")
        if why_not:
            note(f"note: {where} {why_not}; searching exactly")
            return None
        return DatabaseCandidates(self.database, found, store.paths)


class DatabaseCandidates:
    """ann.nearest's candidate index: the nearest stored vectors, as row ids
    of the store (paths it doesn't have are dropped: a stale database
    never brings back a removed image)."""

    def __init__(self, database: VectorDatabase, collection: Collection, paths: list[str]):
        self.database = database
        self.collection = collection
        # the first row of a repeated path, as sync keeps it
        self.row_of = {stored_path(path): row for row, path in reversed(list(enumerate(paths)))}
        self._ef_search = None

    def describe(self) -> str:
        return self.collection.describe()

    def search(self, query: np.ndarray, k: int = ann.DEFAULT_CANDIDATES, probes: int | None = None) -> np.ndarray:
        """Row ids of the about `k` nearest rows, nearest first. `probes`: the
        HNSW candidate list size (ef_search; default: k)."""
        k = max(1, min(int(k), MAX_EF_SEARCH))
        vector = self.collection.projection(np.asarray(query, dtype=np.float32).reshape(1, -1))[0]
        ef_search = min(MAX_EF_SEARCH, max(MIN_EF_SEARCH, k, probes or 0))
        with self.database.errors("search"), self.database.lock:
            paths = self._nearest_paths(vector, k, ef_search)
        rows = [self.row_of.get(path) for path in paths]
        return np.asarray([row for row in rows if row is not None], dtype=np.int64)

    def _nearest_paths(self, vector: np.ndarray, k: int, ef_search: int) -> list[str]:
        connection = self.database.connection
        if ef_search != self._ef_search or connection is not getattr(self, "_connection", None):
            connection.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search),))
            self._ef_search, self._connection = ef_search, connection
        cursor = connection.execute(f"SELECT path FROM {self.collection.table} ORDER BY embedding <-> %b LIMIT %s",
                                    (vector, k), prepare=True)
        return [path for (path,) in cursor]


def _made_differently(collection: Collection, store) -> bool:
    """The store's features come from another model or dimension than the collection's projection."""
    model = store.metadata.get("model")
    return collection.feature_dim != store.dim or (model is not None and collection.model not in (None, model))


def _block_digests(store) -> Iterator[tuple[int, list[bytes]]]:
    for start in range(0, len(store), BLOCK_ROWS):
        yield start, row_digests(store.features[start:start + BLOCK_ROWS])


def _connect(uri: str):
    import psycopg

    name = redacted(uri)
    if not uri.startswith(("postgresql://", "postgres://")):
        raise DatabaseError(f"--db {name}: not a PostgreSQL URI (postgresql://user:password@host:port/database)")
    try:
        return psycopg.connect(uri, connect_timeout=CONNECT_TIMEOUT, autocommit=True,
                               application_name="search_utils")
    except psycopg.Error as error:
        raise DatabaseError(f"database {name} unreachable: {_one_line(error, uri)}") from None
    except Exception as error:  # e.g. a malformed URI: psycopg's parser raises its own kinds
        raise DatabaseError(f"database {name}: {_one_line(error, uri)}") from None


def _register_vector(connection) -> None:
    from pgvector.psycopg import register_vector

    register_vector(connection)


class _translated:
    """Context manager: psycopg errors become one-line DatabaseErrors naming
    the database (redacted); a broken connection is reopened for next time."""

    def __init__(self, database: VectorDatabase, doing: str):
        self.database, self.doing = database, doing

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        import psycopg

        if error is None or not isinstance(error, psycopg.Error):
            return False
        message = f"database {self.database.name}: could not {self.doing}: {_one_line(error, self.database.uri)}"
        if isinstance(error, psycopg.OperationalError) and self.database.connection.closed:
            try:
                self.database.reconnect()
            except DatabaseError:
                pass
        raise DatabaseError(message) from None


def _one_line(error: BaseException, uri: str) -> str:
    """The error's first line, the URI's password (if it shows at all) masked."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for secret in _secrets(uri):
        text = text.replace(secret, "***")
    return redacted(text)


def _secrets(uri: str) -> Iterable[str]:
    from urllib.parse import unquote, urlsplit

    try:
        password = urlsplit(uri).password
    except ValueError:
        return []
    return [value for value in {password, unquote(password or "")} if value]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
