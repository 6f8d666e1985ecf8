#!/usr/bin/env python
"""Candidates from PostgreSQL + pgvector (search_utils/vector_db) against the
embedded FAISS index (search_utils/ann.py), on bench_ann's synthetic rows.

Both propose candidates that are re-ranked with exact chi2 from the features
(ann.nearest); reported per backend: build time, size on disk, recall@10
against the exact chi2 top 10, ms per query (one at a time, median and p95,
re-ranking and, for the database, the round trip to the server included).
The last line is the ratio. `--ivfflat` also measures a pgvector IVFFlat
index over a copy of the same table (the alternative to HNSW).

    python bench/bench_db.py                      # 1,000,000 x 2048 (cached in bench/data/ann/)
    python bench/bench_db.py --rows 200000 --ivfflat

The database server is started with search_utils.vector_db.local_server in
bench/data/db/ (kept, with the collection, for the next run; stopped at the
end unless --keep-server).

Results on this machine (2 cores; other jobs ran meanwhile: load average
3.4 at 200k, 5-8 during the 1M queries, so milliseconds are inflated;
recall is not):

    200,000 x 2048 (--ivfflat), sync with HNSW build 113 s:
    pgvector HNSW m=16, ef_search 300      build 113 s   515 MB  recall@10 0.9625   14.14 ms/query median, 26.50 p95
    pgvector HNSW m=16, ef_search 500      build 113 s   515 MB  recall@10 0.9690   18.24 ms/query median, 30.68 p95
    pgvector IVFFlat200, 10 probed         build   6 s   469 MB  recall@10 0.8835   32.01 ms/query median, 43.92 p95
    pgvector IVFFlat200, 20 probed         build   6 s   469 MB  recall@10 0.9650   60.98 ms/query median, 89.90 p95
    pgvector IVFFlat200, 40 probed         build   6 s   469 MB  recall@10 0.9955  111.96 ms/query median, 156.70 p95
    embedded FAISS IVF1024-PQ              build  22 s    70 MB  recall@10 0.9815    2.49 ms/query median,  3.93 p95
    pgvector 14.14 ms/query, embedded FAISS 2.49 ms/query: the database takes 5.7x as long

    1,000,000 x 2048, first sync (digest, projection, COPY, HNSW build) 514 s:
    pgvector HNSW m=16, ef_search 300      build 514 s  2575 MB  recall@10 0.8555   83.57 ms/query median, 155.00 p95
    pgvector HNSW m=16, ef_search 1000     build 514 s  2575 MB  recall@10 0.9035  164.83 ms/query median, 246.75 p95
    embedded FAISS IVF2048-PQ              build 129 s   334 MB  recall@10 0.9880    6.71 ms/query median,  67.84 p95
    pgvector 83.57 ms/query, embedded FAISS 6.71 ms/query: the database takes 12.5x as long
    (recall@10 0.8555 against 0.9880)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_ann import CACHE, REPO, exact_top10, load_or_build, synthetic_features  # noqa: E402
from bench_ann import time_ann as timed_queries  # noqa: E402
from search_utils import ann  # noqa: E402
from search_utils.store import FeatureStore  # noqa: E402
from search_utils.vector_db import local_server, open_database  # noqa: E402

SERVER_DIR = os.path.join(REPO, "bench", "data", "db")


def line(name: str, build: float, megabytes: float, seconds: list[float], recall: float) -> str:
    return (f"{name:<38} build {build:>6.0f} s  {megabytes:>6.0f} MB  recall@10 {recall:.4f}  "
            f"{np.median(seconds) * 1000:6.2f} ms/query median, {np.percentile(seconds, 95) * 1000:6.2f} p95")


def table_megabytes(database, table: str) -> float:
    return database.connection.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0] / 1e6


def synced_database(uri: str, features_path: str, features: np.ndarray):
    """The database with the synthetic collection in it (synced: built the first time)."""
    database = open_database(uri)
    store = FeatureStore([str(i) for i in range(len(features))], features, {"model": "synthetic"})
    report = database.sync(features_path, store, note=lambda message: print(message, file=sys.stderr))
    print(f"sync: {report} in {report.seconds:.0f} s", file=sys.stderr)
    return database, store, report


class IvfFlatCandidates:
    """The IVFFlat alternative over a copy of the collection's table."""

    def __init__(self, database, collection, paths_to_rows: dict, table: str):
        self.database, self.collection, self.row_of, self.table = database, collection, paths_to_rows, table

    def describe(self) -> str:
        return "pgvector IVFFlat"

    def search(self, query, k, probes=None):
        vector = self.collection.projection(np.asarray(query, np.float32).reshape(1, -1))[0]
        paths = self.database.connection.execute(
            f"SELECT path FROM {self.table} ORDER BY embedding <-> %b LIMIT %s", (vector, k), prepare=True)
        return np.asarray([self.row_of[path] for (path,) in paths], dtype=np.int64)


def ivfflat_study(database, hnsw_candidates, features, queries, truth) -> None:
    connection = database.connection
    collection = hnsw_candidates.collection
    table = "bench_ivfflat_copy"
    rows = collection.rows
    lists = max(1, rows // 1000) if rows <= 1_000_000 else int(np.sqrt(rows))  # pgvector's advice
    connection.execute(f"DROP TABLE IF EXISTS {table}")
    connection.execute(f"CREATE TABLE {table} AS SELECT path, embedding FROM {collection.table}")
    connection.execute("SET maintenance_work_mem = '1GB'")
    started = time.perf_counter()
    connection.execute(f"CREATE INDEX ON {table} USING ivfflat (embedding vector_l2_ops) WITH (lists = {lists})")
    build = time.perf_counter() - started
    size = table_megabytes(database, table)
    index = IvfFlatCandidates(database, collection, hnsw_candidates.row_of, table)
    for probes in (10, 20, 40, 80):
        connection.execute("SELECT set_config('ivfflat.probes', %s, false)", (str(probes),))
        seconds, recall = timed_queries(index, features, queries, truth, ann.DEFAULT_CANDIDATES)
        print(line(f"pgvector IVFFlat{lists}, {probes} probed", build, size, seconds, recall), flush=True)
    connection.execute(f"DROP TABLE {table}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ef-search", default="300,500", help="HNSW ef_search values to report (the first: default)")
    parser.add_argument("--ivfflat", action="store_true", help="also measure an IVFFlat index")
    parser.add_argument("--no-faiss", action="store_true", help="skip the embedded FAISS index")
    parser.add_argument("--keep-server", action="store_true", help="leave the database server running")
    args = parser.parse_args(argv)

    features, queries = synthetic_features(args.rows, args.dim, args.queries)
    features_path = os.path.join(CACHE, f"synthetic-{args.rows}x{args.dim}-seed0.npy")
    truth = exact_top10(features, queries, features_path + f".truth{args.queries}.npy")
    uri = local_server.start(SERVER_DIR)
    try:
        database, store, report = synced_database(uri, features_path, features)
        backend = database.backend().candidates_for(features_path, store, print)
        pg_mb = table_megabytes(database, backend.collection.table)
        build = report.seconds if report.relearned else float("nan")
        timed_queries(backend, features, queries[:5], truth[:5], ann.DEFAULT_CANDIDATES)  # warm up numba, the cache
        print(f"{args.rows:,} x {args.dim}, {len(queries)} held-out queries, {ann.DEFAULT_CANDIDATES} candidates "
              f"re-ranked with exact chi2; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        results = {}
        for ef in [int(v) for v in args.ef_search.split(",")]:
            seconds, recall = timed_queries(backend, features, queries, truth, ann.DEFAULT_CANDIDATES, probes=ef)
            results.setdefault("pg", (seconds, recall))
            print(line(f"pgvector HNSW m={16}, ef_search {ef}", build, pg_mb, seconds, recall), flush=True)
        if args.ivfflat:
            ivfflat_study(database, backend, features, queries, truth)
        if not args.no_faiss:
            index, _ = load_or_build(features, features_path)
            index = ann.AnnIndex.load(ann.index_path(features_path))
            timed_queries(index, features, queries[:5], truth[:5], ann.DEFAULT_CANDIDATES)
            seconds, recall = timed_queries(index, features, queries, truth, ann.DEFAULT_CANDIDATES)
            results["faiss"] = (seconds, recall)
            print(line(f"embedded FAISS {index.describe()}", index.params["build_seconds"],
                       os.path.getsize(ann.index_path(features_path)) / 1e6, seconds, recall))
            pg_ms, faiss_ms = (np.median(results[k][0]) * 1000 for k in ("pg", "faiss"))
            print(f"pgvector {pg_ms:.2f} ms/query, embedded FAISS {faiss_ms:.2f} ms/query: the database takes "
                  f"{pg_ms / faiss_ms:.1f}x as long (recall@10 {results['pg'][1]:.4f} against "
                  f"{results['faiss'][1]:.4f})")
        database.close()
    finally:
        if not args.keep_server:
            local_server.stop(SERVER_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
