"""The vector database backend (search_utils/vector_db) against a real
PostgreSQL + pgvector server: sync, candidates re-ranked with exact chi2,
incremental re-sync, a database out of date with the features file,
passwords kept out of messages, a down server, a locked collection, a
read-only role, and the local server's own command."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

import numpy as np
import psycopg
import pytest

from conftest import REPO
from db_server import (closed_port, db_server_fixture, new_folder_name, process_alive,  # noqa: F401  (the fixture
                       running_database)  # `db_server`)
from search_utils import ann, search
from search_utils.store import FeatureStore, load_features
from search_utils.vector_db import DatabaseError, local_server, open_database, redacted, scrubbed
from search_utils.vector_db import pgvector_db
from search_utils.vector_db.pgvector_db import collection_name

CANDIDATES = 20  # few, so that the projection and the index are what is tested


@pytest.fixture(scope="module")
def icons_file(tmp_path_factory) -> str:
    """A features file of the 300 demo icons (efficientnet_lite0)."""
    from served import index_icons

    return str(index_icons(tmp_path_factory.mktemp("icons"), count=300))


@pytest.fixture(scope="module")
def icons(icons_file) -> FeatureStore:
    """Real efficientnet_lite0 features of the 300 demo icons."""
    return load_features(icons_file)


@pytest.fixture
def database(db_server):
    opened = open_database(db_server.uri)
    yield opened
    opened.close()


def part(store: FeatureStore, rows) -> FeatureStore:
    """Some rows of `store`, as a store of their own (without the keys that
    describe the one file `store` was read from: its hash and generation)."""
    rows = list(rows)
    metadata = {k: v for k, v in store.metadata.items() if k not in ("generation", "features_sha256")}
    return FeatureStore([store.paths[i] for i in rows], np.ascontiguousarray(store.features[rows]), metadata)


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


def test_a_database_synced_from_another_version_is_not_used(database, icons):
    """A features file that changed since the database was synced (rows
    removed, one changed, the file replaced): a one-line note, and the
    exact scan (None), never candidates from another version."""
    assert database.sync("stale.csv", icons).rows == 300
    for current in (part(icons, range(0, 300, 2)), part(icons, range(300))):
        current.features[0] *= 1.5  # the second: same paths, one image changed
        notes = []
        assert database.backend().candidates_for("stale.csv", current, notes.append) is None
        assert len(notes) == 1 and "out of date" in notes[0] and "searching exactly" in notes[0], notes
        assert "again with --db" in notes[0] and "\n" not in notes[0]
        report = database.sync("stale.csv", current)  # re-synced: in step again, used
        assert database.backend().candidates_for("stale.csv", current, pytest.fail) is not None
        assert report.rows == len(current)


def test_a_sync_committed_after_the_candidates_were_made_costs_no_result(database, icons):
    """A searcher that loaded one version while the database moves on to
    another (a service between two reloads): each query's statement checks
    the version, and the candidates then come from an exact scan of the
    version searched; said once."""
    old = part(icons, range(300))
    database.sync("moving.csv", old)
    notes = []
    candidates = database.backend().candidates_for("moving.csv", old, notes.append)
    assert candidates is not None and notes == []
    newer = part(icons, range(0, 300, 3))
    newer.features[:] = newer.features[::-1]  # every row changed
    database.sync("moving.csv", newer)
    for row in range(0, 40, 7):
        query = icons.features[row]
        hits = ann.nearest(candidates, old.features, old.paths, query, 10, candidates=CANDIDATES)
        assert [hit.path for hit in hits] == exact_top(old, query), row
        assert hits[0].path == old.paths[row] and hits[0].distance == 0
    assert len(notes) == 1 and "no longer holds the version" in notes[0] and "searching exactly" in notes[0]


def test_more_candidates_than_the_index_returns_are_an_exact_scan(database):
    """pgvector's HNSW returns at most MAX_EF_SEARCH rows: asked for more,
    the candidates are the exact top k (never fewer than asked)."""
    rows = pgvector_db.MAX_EF_SEARCH + 100
    features = np.random.default_rng(5).random((rows, 32), dtype=np.float32)
    store = FeatureStore([f"/many/{i}.png" for i in range(rows)], features, {"model": "synthetic"})
    database.sync("many.csv", store)
    candidates = database.backend().candidates_for("many.csv", store, pytest.fail)
    wanted = pgvector_db.MAX_EF_SEARCH + 1
    found = candidates.search(features[3], wanted)
    exact = search.top_n(search.distances(features, features[3], "chi2"), wanted)
    assert len(found) == wanted and set(found.tolist()) == set(exact.tolist())


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
    ("postgresql://me:pa/ss4XYZ@db:5432/x", "postgresql://me:***@db:5432/x"),
    ("postgresql://me:pa#ss4XYZ@db:5432/x", "postgresql://me:***@db:5432/x"),
    ("postgresql://me:pa?ss4XYZ@db:5432/x", "postgresql://me:***@db:5432/x"),
    ("postgresql://me:pa@ss4XYZ@db:5432/x", "postgresql://me:***@db:5432/x"),
    ("postgresql://me@db/x?sslpassword=pass4XYZ", "postgresql://me@db/x?sslpassword=***"),
    ("postgresql://me@db/x?pass%77ord=pass4XYZ&a=b", "postgresql://me@db/x?pass%77ord=***&a=b"),
    ("postgresql://me:pa\nss4XYZ@db/x\ny", "postgresql://me:***@db/x\\ny"),  # one line
])
def test_redacted(uri, shown):
    assert redacted(uri) == shown


def test_driver_messages_are_scrubbed_of_every_piece_of_the_password():
    """libpq misreads an unencoded @ and quotes the rest back as the host:
    no piece of the password survives the scrubbing."""
    uri = "postgresql://search:pa@ss4XYZ@127.0.0.1:5432/postgres"
    message = "connection failed: could not translate host name \"ss4XYZ@127.0.0.1\" to address"
    assert "ss4XYZ" not in scrubbed(message, uri) and "127.0.0.1" in scrubbed(message, uri)
    assert scrubbed("FATAL: password authentication failed for user", "postgresql://u:pw@h/d")  # no word "pw"
    assert scrubbed("no such host pw.example", "postgresql://u:pw@h/d") is None  # too short to mask: withheld


@pytest.mark.parametrize("password", ["pa/ss4XYZ", "pa#ss4XYZ", "pa?ss4XYZ", "pa@ss4XYZ", "pa@ss@4XYZ"])
def test_passwords_with_special_characters_never_show(db_server, password):
    """Unencoded special characters in the password: refused (they can't be
    read as written) or refused by the server, in one line that holds no
    piece of the password."""
    port = urlsplit(db_server.uri).port
    with pytest.raises(DatabaseError) as refused:
        open_database(f"postgresql://search:{password}@127.0.0.1:{port}/postgres")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "postgresql://search:***@127.0.0.1" in message
    assert not any(piece in message for piece in ("ss4XYZ", "4XYZ", password)), message
    if "@" in password or "/" in password:
        assert "percent-encode" in message and "%40" in message


def test_ssl_password_and_a_missing_database_are_said_plainly(db_server):
    port = urlsplit(db_server.uri).port
    with pytest.raises(DatabaseError) as refused:
        open_database(f"postgresql://search@127.0.0.1:{port}/postgres?sslpassword=pass4XYZ")
    assert "pass4XYZ" not in str(refused.value) and "sslpassword=***" in str(refused.value)
    missing = db_server.uri.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(DatabaseError) as refused:
        open_database(missing)
    assert 'no database "no_such_db"' in str(refused.value) and "unreachable" not in str(refused.value)
    assert db_server.password not in str(refused.value)


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


def test_a_features_file_name_that_is_not_utf8_names_its_collection(database, icons):
    """The collection is named after the file's path, which need not be
    UTF-8 (Python holds such bytes as surrogates): escaped as stored paths are."""
    store = part(icons, range(30))
    name = os.path.join(tempfile.gettempdir(), "caf\udcff features.csv")
    report = database.sync(name, store)
    assert report.added == 30 and "caf\\xff features.csv" in str(report)
    candidates = database.backend().candidates_for(name, store, pytest.fail)
    assert store.paths[candidates.search(store.features[4], 5)[0]] == store.paths[4]
    notes = []
    assert database.backend().candidates_for(name + "\udcfe", store, notes.append) is None
    assert "\\xfe" in notes[0] and "no rows for collection" in notes[0]


def test_a_locked_collection_is_one_line_and_the_connection_stays_usable(db_server, icons, monkeypatch):
    """A search waits at most SEARCH_TIMEOUT for a lock another session holds
    (a sync with --rebuild drops and recreates the items table in its
    transaction): then one line, exit status 2; the same connection (the
    service shares one) searches again once the lock is gone."""
    monkeypatch.setattr(pgvector_db, "SEARCH_TIMEOUT", 1)
    store = part(icons, range(60))
    database = open_database(db_server.uri)
    holder = psycopg.connect(db_server.uri, autocommit=False)
    try:
        database.sync("locked.csv", store)
        candidates = database.backend().candidates_for("locked.csv", store, pytest.fail)
        table = candidates.collection.table
        for locked in (table, "search_collections"):
            holder.execute(f"LOCK TABLE {locked} IN ACCESS EXCLUSIVE MODE")
            outcome = {}

            def search_now():
                try:
                    if locked == table:
                        candidates.search(store.features[0], 10)
                    else:
                        database.backend().candidates_for("locked.csv", store, pytest.fail)
                except DatabaseError as error:
                    outcome["error"] = error

            searching = threading.Thread(target=search_now, daemon=True)
            searching.start()
            searching.join(timeout=120)  # without a timeout: waits as long as the lock is held
            holder.rollback()
            assert not searching.is_alive(), f"the search waited on the lock on {locked}"
            error = outcome.get("error")
            assert error is not None and error.exit_code == 2
            assert len(str(error).splitlines()) == 1 and "no answer within 1 s" in str(error)
            assert db_server.password not in str(error)
            rows = candidates.search(store.features[0], 10)  # the same connection, usable again
            assert store.paths[rows[0]] == store.paths[0]
    finally:
        holder.close()
        database.close()


def test_a_read_only_role_can_search(db_server, icons):
    """Searching only reads: a role that may not create anything finds its
    candidates, and a collection never synced is the exact scan; only
    writing (the indexer) needs to create the tables, and is told so in
    one line."""
    admin = psycopg.connect(db_server.uri, autocommit=True)
    reader = f"{urlsplit(db_server.uri).scheme}://reader:Reader-Pass-77@{urlsplit(db_server.uri).netloc.split('@')[1]}"
    store = part(icons, range(40))
    try:
        admin.execute("DROP DATABASE IF EXISTS bare")
        admin.execute("CREATE DATABASE bare")  # no extension, no tables
        admin.execute("DROP ROLE IF EXISTS reader")
        admin.execute("CREATE ROLE reader LOGIN PASSWORD 'Reader-Pass-77'")
        writer = open_database(db_server.uri)
        writer.sync("readable.csv", store)
        writer.close()
        admin.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
        database = open_database(reader + "/postgres")
        try:
            candidates = database.backend().candidates_for("readable.csv", store, pytest.fail)
            assert store.paths[candidates.search(store.features[9], 5)[0]] == store.paths[9]
            notes = []
            assert database.backend().candidates_for("never.csv", store, notes.append) is None
            assert "no rows for collection" in notes[0]
        finally:
            database.close()
        bare = open_database(reader + "/bare")
        try:
            notes = []
            assert bare.backend().candidates_for("readable.csv", store, notes.append) is None
            assert "no rows for collection" in notes[0]
        finally:
            bare.close()
        with pytest.raises(DatabaseError) as refused:
            open_database(reader + "/bare", writing=True)
        assert "could not set up the tables" in str(refused.value) and len(str(refused.value).splitlines()) == 1
        assert "Reader-Pass-77" not in str(refused.value)
    finally:
        admin.execute("DROP DATABASE IF EXISTS bare")
        admin.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM reader")
        admin.execute("DROP ROLE IF EXISTS reader")
        admin.close()


def test_health_follows_the_server(icons_file):
    """The backend says whether its server answers, and reconnects once it is
    back; the service's /api/health says it too ("degraded" while down)."""
    from fastapi.testclient import TestClient

    from search_utils.service import ServiceConfig, create_app

    with running_database() as server:
        backend = open_database(server.uri).backend()
        app = create_app(ServiceConfig(icons_file, load_model=False, backend=backend), log=lambda line: None)
        with TestClient(app) as client:
            assert backend.health() is None
            assert client.get("/api/health").json() | {"model": None} == {
                "status": "ok", "model": None, "database": "ok"}
            local_server.stop(server.data_dir)
            down = backend.health()
            assert down and len(down.splitlines()) == 1 and server.password not in down
            served = client.get("/api/health").json()
            assert served["status"] == "degraded" and server.password not in served["database"]
            local_server.start(server.data_dir)
            backend.health()  # the first call after the restart may find the old connection broken
            assert backend.health() is None
            assert client.get("/api/health").json()["status"] == "ok"
        backend.database.close()


# ----------------------------------------------------------- the local server

def local_server_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search_utils.vector_db.local_server", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("port", ["70000", "-1", "0", "http"])
def test_a_port_out_of_range_is_refused_before_anything_is_made(port):
    folder = new_folder_name()
    result = local_server_command("start", folder, "--port", port)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "1-65535" in result.stderr, result.stderr
    assert not os.path.exists(folder)


def test_a_port_in_use_is_said_and_the_folder_made_for_it_removed():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        folder = new_folder_name()
        result = local_server_command("start", folder, "--port", str(port))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"local_server.py: error: port {port} on 127.0.0.1 is in use: choose another with --port, "
        "or leave --port out for a free one"], result.stderr
    assert not os.path.exists(folder)


def test_a_recorded_port_out_of_range_is_ignored():
    """An older version recorded whatever --port said: the next start picks a free port."""
    with running_database() as server:
        local_server.stop(server.data_dir)
        settings = os.path.join(server.data_dir, "pgdata", local_server.SETTINGS_FILE)
        with open(settings) as handle:
            text = handle.read()
        with open(settings, "w") as handle:
            handle.write("".join("port = 70000\n" if line.startswith("port") else line
                                 for line in text.splitlines(keepends=True)))
        uri = local_server.start(server.data_dir)
        assert urlsplit(uri).port != 70000
        server.uri = uri


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the server then runs as another user")
def test_as_root_an_existing_folder_keeps_its_owner_and_an_unreachable_one_is_refused():
    parent = tempfile.mkdtemp(prefix="search-pg-parent-")  # root's, mode 700: the server's user can't enter
    try:
        unreachable = os.path.join(parent, "db")
        with pytest.raises(local_server.LocalServerError, match="can't reach"):
            local_server.start(unreachable)
        assert os.listdir(parent) == []  # nothing made
        os.chmod(parent, 0o755)
        os.mkdir(unreachable, 0o755)
        before = os.stat(unreachable)
        try:
            uri = local_server.start(unreachable)
            open_database(uri).close()
        finally:
            local_server.stop(unreachable)
        after = os.stat(unreachable)
        assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (0, 0, 0o755)
        assert before.st_uid == 0
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_a_folder_name_with_quotes_and_spaces_works_and_its_stop_hint_is_quoted():
    folder = new_folder_name('search "pg" dir ')
    try:
        result = local_server_command("start", folder)
        assert result.returncode == 0, result.stderr
        assert f"stop {shlex.quote(folder)})" in result.stderr
        open_database(result.stdout.strip().splitlines()[-1]).close()
    finally:
        local_server.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)
