"""The vector database backend (search_utils/vector_db) against a real
PostgreSQL + pgvector server: sync, candidates re-ranked with exact chi2,
incremental re-sync, stale rows, passwords kept out of messages, a down server."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from db_server import closed_port, db_server_fixture, process_alive, running_database  # noqa: F401  (the fixture `db_server`)
from search_utils import ann, search
from search_utils.store import FeatureStore, load_features
from search_utils.vector_db import DatabaseError, local_server, open_database, redacted
from search_utils.vector_db.pgvector_db import collection_name



CANDIDATES = 20  # few, so that the projection and the index are what is tested


@pytest.fixture(scope="module")
def icons(tmp_path_factory) -> FeatureStore:
    """Real efficientnet_lite0 features of the 300 demo icons."""
    from served import index_icons

    return load_features(str(index_icons(tmp_path_factory.mktemp("icons"), count=300)))


@pytest.fixture
def database(db_server):
    opened = open_database(db_server.uri)
    yield opened
    opened.close()


def part(store: FeatureStore, rows) -> FeatureStore:
    rows = list(rows)
    return FeatureStore([store.paths[i] for i in rows], np.ascontiguousarray(store.features[rows]),
                        dict(store.metadata))


def exact_top(store: FeatureStore, query: np.ndarray, n: int = 10) -> list[str]:
    return [store.paths[i] for i in search.top_n(search.distances(store.features, query, "chi2"), n)]


def row_versions(database, features_path: str) -> dict[str, str]:
    """path -> xmin (the transaction that wrote the row): shows what a sync rewrote."""
    table = database.collection(collection_name(features_path)).table
    return dict(database.connection.execute(f"SELECT path, xmin::text FROM {table}").fetchall())


def test_candidates_reranked_find_the_exact_chi2_top10(database, icons):
    """250 icons in the database, the other 50 as outside queries: 20
    candidates re-ranked hold the exact top 10, with exact distances."""
    indexed, queries = part(icons, range(250)), icons.features[250:]
    report = database.sync("recall.csv", indexed)
    assert (report.added, report.updated, report.removed, report.rows, report.relearned) == (250, 0, 0, 250, True)
    candidates = database.backend().candidates_for("recall.csv", indexed, note=pytest.fail)
    assert "pgvector HNSW over" in candidates.describe()
    found = 0
    for query in queries:
        hits = ann.nearest(candidates, indexed.features, indexed.paths, query, 10, candidates=CANDIDATES)
        found += len({hit.path for hit in hits} & set(exact_top(indexed, query)))
        exact = search.distances(indexed.features, query, "chi2")
        for hit in hits:
            assert hit.distance == pytest.approx(exact[indexed.paths.index(hit.path)], rel=1e-5)
    assert found / (10 * len(queries)) >= 0.95
    # the candidates themselves, not only the re-rank: the nearest proposed first
    rows = candidates.search(queries[0], CANDIDATES)
    assert len(rows) == CANDIDATES and len(set(rows.tolist())) == CANDIDATES
    assert indexed.paths[rows[0]] in exact_top(indexed, queries[0], 3)


def test_resync_sends_only_the_difference_and_removed_images_never_come_back(database, icons):
    first = part(icons, range(200))
    assert database.sync("incremental.csv", first).added == 200
    before = row_versions(database, "incremental.csv")

    second = part(icons, [*range(180), *range(200, 230)])  # 20 removed, 30 new
    changed = second.paths.index(icons.paths[5])
    second.features[changed] *= 1.5
    report = database.sync("incremental.csv", second)
    assert (report.added, report.updated, report.removed, report.unchanged) == (30, 1, 20, 179)
    assert (report.rows, report.relearned) == (210, False)
    assert "30 added, 1 updated, 20 removed (210 rows)" in str(report)
    after = row_versions(database, "incremental.csv")
    removed = set(icons.paths[180:200])
    assert removed.isdisjoint(after)
    rewritten = {path for path in after if after[path] != before.get(path)}
    assert rewritten == set(icons.paths[200:230]) | {icons.paths[5]}  # nothing else was written

    unchanged = database.sync("incremental.csv", second)
    assert (unchanged.added, unchanged.updated, unchanged.removed, unchanged.unchanged) == (0, 0, 0, 210)
    assert row_versions(database, "incremental.csv") == after

    candidates = database.backend().candidates_for("incremental.csv", second, note=pytest.fail)
    for row in range(180, 200):  # a removed image's own features as the query
        proposed = {second.paths[i] for i in candidates.search(icons.features[row], 50)}
        assert proposed and removed.isdisjoint(proposed)


def test_paths_the_store_does_not_have_are_never_returned(database, icons):
    """A stale database (synced before rows were removed) still only
    proposes rows of the store searched."""
    assert database.sync("stale.csv", icons).rows == 300
    current = part(icons, range(0, 300, 2))  # every odd row gone from the features file, not yet from the db
    candidates = database.backend().candidates_for("stale.csv", current, note=pytest.fail)
    for row in range(1, 60, 2):
        rows = candidates.search(icons.features[row], 40)
        assert len(rows) > 0 and rows.max() < len(current)
        assert icons.paths[row] not in {current.paths[i] for i in rows}


def test_rebuild_or_other_model_learns_a_new_projection(database, icons):
    store = part(icons, range(100))
    database.sync("model.csv", store)
    assert database.sync("model.csv", store, rebuild=True).relearned
    other = part(icons, range(100))
    other.metadata["model"] = "resnet50"
    notes = []
    assert database.backend().candidates_for("model.csv", other, notes.append) is None
    assert "made from other features" in notes[0] and "searching exactly" in notes[0]
    report = database.sync("model.csv", other)
    assert report.relearned and report.unchanged == 100 and report.rows == 100
    assert database.collection(collection_name("model.csv")).model == "resnet50"


def test_missing_collection_means_exact_search(database, icons):
    notes = []
    assert database.backend().candidates_for("never-synced.csv", icons, notes.append) is None
    assert len(notes) == 1 and "never-synced.csv" in notes[0] and "searching exactly" in notes[0]


def test_password_never_appears_in_messages(db_server, icons, capsys):
    password = db_server.password
    assert password and password not in redacted(db_server.uri) and "***" in redacted(db_server.uri)
    wrong = db_server.uri.replace(password, "Wrong-Secret-42")
    with pytest.raises(DatabaseError) as refused:
        open_database(wrong)
    assert "Wrong-Secret-42" not in str(refused.value) and "***" in str(refused.value)
    assert len(str(refused.value).splitlines()) == 1

    notes = []
    database = open_database(db_server.uri)
    try:
        report = database.sync("secret.csv", part(icons, range(50)), note=notes.append)
        candidates = database.backend().candidates_for("secret.csv", part(icons, range(50)), notes.append)
        database.connection.execute(f"DROP TABLE {candidates.collection.table}")  # breaks the search underneath
        with pytest.raises(DatabaseError) as broken:
            candidates.search(icons.features[0], 10)
    finally:
        database.close()
    shown = [str(report), str(broken.value), *notes, *capsys.readouterr()]
    assert all(password not in text for text in shown)
    assert len(str(broken.value).splitlines()) == 1 and "***" in str(broken.value)


@pytest.mark.parametrize("uri, shown", [
    ("postgresql://me:s3cret@db:5432/x", "postgresql://me:***@db:5432/x"),
    ("postgresql://me@db/x?password=s3cret&sslmode=require", "postgresql://me@db/x?password=***&sslmode=require"),
    ("host=db password='s3 cret' user=me", "host=db password=*** user=me"),
    ("postgresql://me:p@ss@db/x", "postgresql://me:***@db/x"),
    ("postgresql://db:5432/x", "postgresql://db:5432/x"),
])
def test_redacted(uri, shown):
    assert redacted(uri) == shown


def test_nothing_listening_is_one_line(tmp_path):
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(DatabaseError) as down:
        open_database(f"postgresql://search:Pw-123@127.0.0.1:{port}/postgres")
    assert time.monotonic() - started < 10
    message = str(down.value)
    assert len(message.splitlines()) == 1 and "unreachable" in message and "Pw-123" not in message
    assert down.value.exit_code == 2
    with pytest.raises(DatabaseError, match="not a PostgreSQL URI"):
        open_database("http://user:Pw-123@127.0.0.1/")


def test_stopped_server_local_server_lifecycle():
    """start is idempotent (same URI); after stop, connecting is one line;
    no server process is left (running_database checks on exit)."""
    with running_database() as server:
        assert local_server.start(server.data_dir) == server.uri
        pid = server.postmaster_pid()
        open_database(server.uri).close()
        assert local_server.stop(server.data_dir) and not local_server.stop(server.data_dir)
        assert not process_alive(pid)
        with pytest.raises(DatabaseError) as down:
            open_database(server.uri)
        assert len(str(down.value).splitlines()) == 1 and server.password not in str(down.value)
        assert local_server.start(server.data_dir) == server.uri  # restarts on the port it had


def test_local_server_command_prints_the_uri_last():
    with running_database() as server:
        result = subprocess.run([sys.executable, "-m", "search_utils.vector_db.local_server", "start", server.data_dir],
                                cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == server.uri


def test_importing_the_package_does_not_import_psycopg():
    code = "import sys, search_utils.vector_db; assert 'psycopg' not in sys.modules, 'psycopg imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_one_row_then_no_rows(database, icons):
    assert database.sync("tiny.csv", part(icons, [7])).rows == 1
    rows = database.backend().candidates_for("tiny.csv", part(icons, [7]), pytest.fail).search(icons.features[3], 5)
    assert rows.tolist() == [0]
    emptied = database.sync("tiny.csv", part(icons, []))
    assert (emptied.removed, emptied.rows) == (1, 0) and database.collection(collection_name("tiny.csv")) is None
    notes = []
    assert database.backend().candidates_for("tiny.csv", part(icons, []), notes.append) is None and notes


def test_file_names_that_are_not_utf8_or_hold_backslashes_sync_and_come_back(database, icons):
    """A text column refuses surrogates (a non-UTF-8 file name as Python holds
    it): such names, and names whose escapes could collide, keep their rows."""
    store = part(icons, range(40))
    odd = ["caf\udce9.png", "caf\\xe9.png", "back\\slash.png", "new\nline.png"]
    store.paths[:4] = odd
    assert database.sync("odd_names.csv", store).added == 40
    assert database.sync("odd_names.csv", store).unchanged == 40  # found again by the same names
    candidates = database.backend().candidates_for("odd_names.csv", store, note=pytest.fail)
    for row, name in enumerate(odd):
        proposed = [store.paths[i] for i in candidates.search(store.features[row], 5)]
        assert proposed[0] == name
