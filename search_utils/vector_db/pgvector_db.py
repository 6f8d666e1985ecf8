"""A features file's rows in PostgreSQL + pgvector, kept in step by `sync`,
and the candidate index search asks (docs/VECTOR_DB.md).

Schema (created by the indexer if missing; searching only reads):

    search_collections   one row per collection: its items table, the model
                         and dimension it was made from, the sqrt-PCA
                         projection (mean and components, float32 bytes),
                         the index method, the row count, and the
                         fingerprint of the features file it was synced from
    search_items_<hash>  one table per collection: path (primary key), the
                         blake2b-16 digest of the row's float32 features,
                         embedding vector(reduced) with an HNSW index

A collection is named after the features file's absolute path
(`collection_name`), so any number of features files can share a database
(a base name alone made two folders' `features.csv` overwrite each other's
rows); a features file moved elsewhere starts a new collection.

A search uses the database only while it holds the very version of the
features file being searched (`source_fingerprint`, checked when the
candidates are made and again in each query's own statement); otherwise it
scans the features file exactly and says why, so a database that wasn't
updated never costs a result.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .. import ann
from . import PERCENT_ENCODING_HINT, DatabaseError, redacted, scrubbed

CONNECT_TIMEOUT = 5  # seconds: a down server is one line soon, not a hang
SEARCH_TIMEOUT = 10  # seconds a search's statement may run or wait for a lock (a sync may hold one for minutes)
BLOCK_ROWS = 8192  # store rows read, hashed and projected at a time (64 MB at 2048-d)
DELETE_BATCH = 10_000
SCHEMA_LOCK = 0x5EA2C4  # advisory lock: two first-time connections don't race creating tables
FINGERPRINT_ROWS = 1024  # rows hashed into a fingerprint of a file that records no hash of itself
# HNSW, measured against IVFFlat on the synthetic rows (docs/VECTOR_DB.md): m and
# ef_construction as pgvector's defaults; ef_search >= the candidates asked for
# (pgvector 0.6 returns at most ef_search rows).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
MIN_EF_SEARCH = 40
MAX_EF_SEARCH = 1000  # pgvector's limit: asked for more candidates, the search scans every row
BUILD_MEMORY_CAP = 4 << 30  # maintenance_work_mem asked for while building the index
UPDATE_HINT = "to update it, run create_imagenet_features.py again with --db"

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
    updated_at timestamptz NOT NULL DEFAULT now(),
    source_fingerprint text
)"""
# added to a table made before fingerprints were recorded (its collections then count as out of date)
FINGERPRINT_COLUMN = "ALTER TABLE search_collections ADD COLUMN IF NOT EXISTS source_fingerprint text"


def collection_name(features_path: str) -> str:
    """The collection a features file syncs to: its absolute path (symlinks
    resolved), the same from whichever folder indexing or search runs; as
    `stored_path` writes it (a file name need not be UTF-8)."""
    return stored_path(os.path.realpath(os.fspath(features_path)))


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


def source_fingerprint(features_path: str, store) -> str:
    """Which version of the features file `store` is, as the database records it.

    A CSV written by the indexer records the SHA-256 of its bytes (paths and
    values) in its metadata (store/generation.py): that, exactly. Any other
    file (HDF5, a CSV without metadata): its paths, shape, size and
    modification time (every write of a features file replaces it, so its
    time changes) and a digest of evenly spaced rows, as ann.fingerprint."""
    sha = store.metadata.get("features_sha256")
    if isinstance(sha, str) and sha:
        return f"sha256:{sha}"
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{len(store)}x{store.dim}\0".encode())
    for path in store.paths:
        digest.update(stored_path(path).encode("utf-8") + b"\0")
    try:
        info = os.stat(features_path)
        digest.update(f"{info.st_size}:{info.st_mtime_ns}\0".encode())
    except OSError:
        digest.update(b"no file\0")
    if len(store):
        sampled = np.unique(np.linspace(0, len(store) - 1, min(len(store), FINGERPRINT_ROWS)).astype(np.int64))
        digest.update(np.ascontiguousarray(store.features[sampled], dtype=np.float32).tobytes())
    return f"file:{digest.hexdigest()}"


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
    fingerprint: str | None  # of the features file it was synced from (None: synced by an older version)

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
    """One connection to the database server (autocommit; `sync` is one
    transaction). Every statement outside a sync gives up after
    SEARCH_TIMEOUT seconds (running, or waiting for a lock)."""

    def __init__(self, uri: str, connection):
        self.uri = uri
        self.name = redacted(uri)
        self.connection = connection
        self.lock = threading.Lock()  # the service searches from several threads; one connection
        self._vector_on = None  # the connection the vector type was registered on

    @classmethod
    def connect(cls, uri: str, writing: bool = False) -> "VectorDatabase":
        database = cls(uri, _connect(uri))
        try:
            with database.errors("set up the session"):
                database._configure()
            if writing:
                with database.lock, database.errors("set up the tables"):
                    database._ensure_schema()
        except BaseException:
            database.close()
            raise
        return database

    def close(self) -> None:
        self.connection.close()

    def errors(self, doing: str):
        return _translated(self, doing)

    def check(self) -> None:
        """Raise DatabaseError (one line) unless the server answers now; a
        broken connection is reopened first. For a service's health check."""
        with self.lock, self.errors("reach the server"):
            if self.connection.closed:
                self.reconnect()
            self.connection.execute("SELECT 1")

    def _configure(self) -> None:
        timeout = f"{int(SEARCH_TIMEOUT * 1000)}ms"
        self.connection.execute("SELECT set_config('statement_timeout', %s, false), "
                                "set_config('lock_timeout', %s, false)", (timeout, timeout))

    def _no_timeouts(self) -> None:
        """In a sync's transaction: it may wait for another sync, and build an index for minutes."""
        self.connection.execute("SELECT set_config('statement_timeout', '0', true), "
                                "set_config('lock_timeout', '0', true)")

    def _ensure_schema(self) -> None:
        """The vector extension and search_collections (DDL: the indexer's
        side only; searching never writes)."""
        with self.connection.transaction():
            self._no_timeouts()
            self.connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            if self.connection.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone() is None:
                self.connection.execute("CREATE EXTENSION IF NOT EXISTS vector")
            if not self._table_exists("search_collections"):
                self.connection.execute(SCHEMA)
            elif not self._has_column("search_collections", "source_fingerprint"):
                self.connection.execute(FINGERPRINT_COLUMN)
        self._register_vector()

    def _register_vector(self) -> None:
        if self._vector_on is not self.connection:
            _register_vector(self.connection)
            self._vector_on = self.connection

    def reconnect(self) -> None:
        """A new connection after the old one broke (e.g. the server restarted)."""
        self.connection.close()
        self.connection = _connect(self.uri)
        self._configure()

    # ------------------------------------------------------------------ sync

    def sync(self, features_path: str, store, rebuild: bool = False,
             note: Callable[[str], None] | None = None) -> SyncReport:
        """Bring the collection of `features_path` in step with `store` (its
        FeatureStore) in one transaction: delete paths the store no longer has,
        write new and changed rows, leave the rest, and record which version
        of the file this is (`source_fingerprint`). The projection is learned
        on the first sync, on `rebuild`, or when the model or dimension
        changed; then every row is written again."""
        started = time.perf_counter()
        name = collection_name(features_path)
        fingerprint = source_fingerprint(features_path, store)
        note = note or _stderr
        with self.lock, self.errors(f"sync collection {name}"):
            self._ensure_schema()
            with self.connection.transaction():
                self._no_timeouts()
                self._lock_collection(name, note)
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
                if relearn or report.written or report.removed or existing.fingerprint != fingerprint:
                    self.connection.execute("UPDATE search_collections SET row_count = %s, source_fingerprint = %s, "
                                            "updated_at = now() WHERE name = %s", (report.rows, fingerprint, name))
        report.seconds = time.perf_counter() - started
        return report

    def _lock_collection(self, name: str, note: Callable[[str], None]) -> None:
        """One sync of a collection at a time (advisory, to the end of the transaction)."""
        key = "SELECT pg_{}advisory_xact_lock(hashtext(%s))"
        if not self.connection.execute(key.format("try_"), (name,)).fetchone()[0]:
            note(f"database {self.name}: waiting for another sync of collection {name} to finish")
            self.connection.execute(key.format(""), (name,))

    def collection(self, name: str) -> Collection | None:
        """The collection's row, or None (never synced; no tables at all).
        Only reads: a read-only role will do."""
        if not self._table_exists("search_collections"):
            return None
        fingerprint = "source_fingerprint" if self._has_column("search_collections", "source_fingerprint") \
            else "NULL::text"
        row = self.connection.execute(
            "SELECT items_table, model, feature_dim, reduced_dim, projection_mean, projection_components, "
            f"index_method, row_count, {fingerprint} FROM search_collections WHERE name = %s", (name,)).fetchone()
        if row is None:
            return None
        table, model, dim, reduced, mean, components, method, rows, source = row
        projection = ann.Projection(np.frombuffer(mean, "<f4").astype(np.float32),
                                    np.frombuffer(components, "<f4").reshape(dim, reduced).astype(np.float32))
        return Collection(name, table, model, dim, projection, method, rows, source)

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

    def _has_column(self, table: str, column: str) -> bool:
        return self.connection.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = %s "
            "AND attnum > 0 AND NOT attisdropped)", (table, column)).fetchone()[0]

    def _count(self, table: str) -> int:
        return self.connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    # ---------------------------------------------------------------- search

    def backend(self) -> "DatabaseBackend":
        return DatabaseBackend(self)


class DatabaseBackend:
    """searcher.SearchBackend: candidates from the database, while it holds
    the version of the features file searched."""

    def __init__(self, database: VectorDatabase):
        self.database = database

    def describe(self) -> str:
        return f"database {self.database.name}"

    def health(self) -> str | None:
        """None if the database answers now, else why not (one line, no password)."""
        try:
            self.database.check()
        except DatabaseError as error:
            return str(error)
        return None

    def candidates_for(self, features_path: str, store, note: Callable[[str], None]) -> "DatabaseCandidates | None":
        name = collection_name(features_path)
        with self.database.lock, self.database.errors(f"read collection {name}"):
            found = self.database.collection(name)
        where = f"database {self.database.name}"
        why_not = None
        if found is None or found.rows == 0:
            why_not = f"has no rows for collection {name} (index with --db first)"
        elif found.feature_dim != store.dim or _made_differently(found, store):
            why_not = (f"holds collection {name} made from other features ({found.model}, {found.feature_dim} "
                       "values) than the features file (re-index with --db)")
        else:
            fingerprint = source_fingerprint(features_path, store)
            if found.fingerprint != fingerprint:
                why_not = (f"is out of date for {name}: it holds another version of the features file "
                           f"(not synced when the file was last written; {UPDATE_HINT})")
        if why_not:
            note(f"note: {where} {why_not}; searching exactly")
            return None
        with self.database.lock, self.database.errors(f"read collection {name}"):
            self.database._register_vector()
        return DatabaseCandidates(self.database, found, store, fingerprint, note)


class DatabaseCandidates:
    """ann.nearest's candidate index: the nearest stored vectors, as row ids
    of the store. Each query's statement checks that the database still
    holds the store's version (`fingerprint`): if a sync of another version
    committed since, or the database proposes fewer rows than the results
    may need, the candidates come from an exact chi2 scan of the store
    instead (said once), so stale candidates never cost a result."""

    def __init__(self, database: VectorDatabase, collection: Collection, store, fingerprint: str,
                 note: Callable[[str], None] | None = None):
        self.database = database
        self.collection = collection
        self.store = store
        self.fingerprint = fingerprint
        self.note = note or _stderr
        # the first row of a repeated path, as sync keeps it
        self.row_of = {stored_path(path): row for row, path in reversed(list(enumerate(store.paths)))}
        self._ef_search = None
        self._connection = None
        self._noted = False

    def describe(self) -> str:
        return self.collection.describe()

    def search(self, query: np.ndarray, k: int = ann.DEFAULT_CANDIDATES, probes: int | None = None) -> np.ndarray:
        """Row ids of the about `k` nearest rows, nearest first. `probes`: the
        HNSW candidate list size (ef_search; default: k)."""
        k = max(1, int(k))
        if k > MAX_EF_SEARCH:  # more than pgvector's HNSW returns
            return self._scanned(query, k)
        vector = self.collection.projection(np.asarray(query, dtype=np.float32).reshape(1, -1))[0]
        ef_search = min(MAX_EF_SEARCH, max(MIN_EF_SEARCH, k, probes or 0))
        with self.database.lock, self.database.errors("search"):
            paths = self._nearest_paths(vector, k, ef_search)
        rows = [self.row_of.get(path) for path in paths]
        found = np.asarray([row for row in rows if row is not None], dtype=np.int64)
        if not paths:
            return self._scanned(query, k, f"no longer holds the version of {self.collection.name} searched "
                                           f"(another was synced since)")
        # ann.nearest asks for at least 4 candidates per result: fewer than k / 4 could cost results
        # (a few short of k is usual: the HNSW scan skips rows deleted by a sync until they are vacuumed)
        needed = min(max(1, k // 4), self.collection.rows)
        if len(found) < needed:
            return self._scanned(query, k, f"proposed {len(found)} candidates from {self.collection.name}, "
                                           f"fewer than the {needed} results may need")
        return found

    def _scanned(self, query: np.ndarray, k: int, why: str | None = None) -> np.ndarray:
        """The exact chi2 top `k` of the store: what the database should have proposed."""
        from ..search import distances, top_n

        if why and not self._noted:
            self._noted = True
            self.note(f"note: database {self.database.name} {why}; searching exactly")
        return np.sort(top_n(distances(self.store.features, query, "chi2"), k)).astype(np.int64)

    def _nearest_paths(self, vector: np.ndarray, k: int, ef_search: int) -> list[str]:
        """The `k` nearest stored paths, or none if the collection no longer
        records this version (checked in the same statement: one snapshot)."""
        connection = self.database.connection
        if connection is not self._connection:
            self.database._register_vector()
        if ef_search != self._ef_search or connection is not self._connection:
            connection.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search),))
            self._ef_search, self._connection = ef_search, connection
        cursor = connection.execute(
            f"SELECT path FROM {self.collection.table} WHERE EXISTS (SELECT 1 FROM search_collections "
            "WHERE name = %s AND source_fingerprint = %s) ORDER BY embedding <-> %b LIMIT %s",
            (self.collection.name, self.fingerprint, vector, k), prepare=True)
        return [path for (path,) in cursor]


def _made_differently(collection: Collection, store) -> bool:
    """The store's features come from another model or dimension than the collection's projection."""
    model = store.metadata.get("model")
    return collection.feature_dim != store.dim or (model is not None and collection.model not in (None, model))


def _block_digests(store) -> Iterator[tuple[int, list[bytes]]]:
    for start in range(0, len(store), BLOCK_ROWS):
        yield start, row_digests(store.features[start:start + BLOCK_ROWS])


# ------------------------------------------------------------- connecting

def _connect(uri: str):
    import psycopg

    name = redacted(uri)
    if not uri.startswith(("postgresql://", "postgres://")):
        raise DatabaseError(f"--db {name}: not a PostgreSQL URI (postgresql://user:password@host:port/database)")
    _check_readable(uri, name)
    try:
        return psycopg.connect(uri, connect_timeout=CONNECT_TIMEOUT, autocommit=True,
                               application_name="search_utils")
    except psycopg.Error as error:
        raise DatabaseError(_connect_failure(name, _one_line(error, uri))) from None
    except Exception as error:  # e.g. a malformed URI: psycopg's parser raises its own kinds
        raise DatabaseError(f"database {name}: {_one_line(error, uri)}") from None


def _check_readable(uri: str, name: str) -> None:
    """Refuse a URI that libpq would read otherwise than it is written: a
    password holding an unencoded @ or / makes libpq take part of it for the
    host, port or database (and quote it back in its errors)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parameters = conninfo_to_dict(uri)
    except Exception as error:
        raise DatabaseError(f"--db {name}: not a URI libpq can read ({_one_line(error, uri)}); "
                            f"{PERCENT_ENCODING_HINT}") from None
    misread = any("@" in str(parameters.get(key) or "") for key in ("host", "hostaddr", "port", "dbname"))
    ports = str(parameters.get("port") or "")
    if misread or (ports and not all(port.strip().isdigit() for port in ports.split(",") if port.strip())):
        raise DatabaseError(f"--db {name}: the URI can't be read as written; {PERCENT_ENCODING_HINT}")


def _connect_failure(name: str, reason: str) -> str:
    """What a failed connection means, in the user's words."""
    missing = re.search(r'database "([^"]*)" does not exist', reason)
    if missing:
        return f"database {name}: the server has no database \"{missing[1]}\" ({reason})"
    if re.search(r"password authentication failed|no pg_hba\.conf entry|role \"[^\"]*\" does not exist|"
                 r"no password supplied|authentication failed", reason):
        return f"database {name}: login refused: {reason}"
    return f"database {name} unreachable: {reason}"


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
        if isinstance(error, (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)):
            reason = (f"no answer within {SEARCH_TIMEOUT:g} s (another session holds a lock on it, e.g. a sync "
                      "with --rebuild, or the server is overloaded); try again later, or search without --db")
        else:
            reason = _one_line(error, self.database.uri)
        message = f"database {self.database.name}: could not {self.doing}: {reason}"
        if isinstance(error, psycopg.OperationalError) and self.database.connection.closed:
            try:
                self.database.reconnect()
            except DatabaseError:
                pass
        raise DatabaseError(message) from None


def _one_line(error: BaseException, uri: str) -> str:
    """The error's first line with every piece of the URI's secrets masked;
    if that can't be done safely, the error's kind only."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    shown = scrubbed(text, uri, _parsed_secrets(uri))
    if shown is None:
        return f"{type(error).__name__} (the server's message is not shown: it quotes part of the password)"
    return shown


def _parsed_secrets(uri: str) -> list[str]:
    """The secrets as libpq reads them (it may split the URI elsewhere than it looks)."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parameters = conninfo_to_dict(uri)
    except Exception:
        return []
    return [str(parameters[key]) for key in ("password", "sslpassword") if parameters.get(key)]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
