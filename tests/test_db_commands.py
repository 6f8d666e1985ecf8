"""The commands with --db, end to end: the real create_imagenet_features.py,
imagenet_search.py and search service against a real PostgreSQL + pgvector
server on loopback (tests/db_server.py), over real icons embedded by the
real efficientnet_lite0."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import assert_one_line_error, run_command
from db_server import closed_port, db_server_fixture  # noqa: F401  (the fixture `db_server`)
from served import ICONS, index_icons

QUERY = "icons/firefox.png"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, db_server):
    """60 icons indexed with --db; the command's stderr."""
    folder = tmp_path_factory.mktemp("db_commands")
    features = index_icons(folder)
    result = index(folder, db_server.uri)
    assert result.returncode == 0, result.stderr
    return folder, features, result.stderr


def index(folder: Path, uri: str, *extra: str):
    return run_command("create_imagenet_features.py", "--dataset", "icons", "--output", "features.csv",
                       "--model", "efficientnet_lite0", "-q", "--db", uri, *extra, cwd=folder)


def search(folder: Path, query: str, *extra: str, stderr: list | None = None) -> list[dict]:
    result = run_command("imagenet_search.py", "--query", query, "--featuresPath", "features.csv",
                         "--json", "--no-plot", "-n", "10", *extra, cwd=folder)
    assert result.returncode == 0, result.stderr
    if stderr is not None:
        stderr.append(result.stderr)
    return json.loads(result.stdout)["results"]


def ranked(results: list[dict]) -> list[tuple[str, float]]:
    return [(r["path"], r["distance"]) for r in results]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of `folder`: its bytes and modification time."""
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in folder.iterdir() if path.is_file()}


def test_search_with_db_gives_the_exact_results(indexed, db_server):
    folder, _, stderr = indexed
    assert "60 added" in stderr, stderr
    assert db_server.password not in stderr
    icon = sorted((folder / "icons").iterdir())[7]
    exact = search(folder, f"icons/{icon.name}", "--exact")
    through_db = search(folder, f"icons/{icon.name}", "--db", db_server.uri)
    assert [(r["path"], r["distance"]) for r in through_db] == [(r["path"], r["distance"]) for r in exact]


def test_an_outside_query_through_the_db_is_the_exact_search(indexed, db_server):
    folder, _, _ = indexed
    outside = str(Path(__file__).resolve().parent.parent / "search.jpg")
    exact = search(folder, outside, "--exact")
    through_db = search(folder, outside, "--db", db_server.uri)
    assert [r["path"] for r in through_db] == [r["path"] for r in exact]
    assert [r["distance"] for r in through_db] == pytest.approx([r["distance"] for r in exact], rel=1e-6)


def test_a_rerun_sends_only_the_difference_and_removed_images_never_come_back(tmp_path, db_server):
    index_icons(tmp_path, count=40)
    first = index(tmp_path, db_server.uri)
    assert first.returncode == 0 and "40 added" in first.stderr, first.stderr
    unchanged = index(tmp_path, db_server.uri)
    assert "0 added, 0 updated, 0 removed" in unchanged.stderr, unchanged.stderr

    icons = sorted((tmp_path / "icons").iterdir())
    removed = icons[:5]
    kept_copy = tmp_path / "removed_query.png"
    shutil.copy(removed[0], kept_copy)  # the removed picture as an outside query
    for icon in removed:
        icon.unlink()
    shutil.copy(Path(__file__).resolve().parent.parent / "icons" / "librecad.png", tmp_path / "icons" / "librecad.png")
    rerun = index(tmp_path, db_server.uri)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 added, 0 updated, 5 removed" in rerun.stderr, rerun.stderr

    hits = search(tmp_path, str(kept_copy), "--db", db_server.uri, "-n", "35")
    shown = {Path(hit["path"]).name for hit in hits}
    assert not shown & {icon.name for icon in removed}
    assert "librecad.png" in shown
    assert len(hits) == 35 and len(shown) == 35


def test_a_database_that_is_down_is_one_line_and_changes_nothing(indexed, tmp_path):
    folder, features, _ = indexed
    before = snapshot(folder)
    down = f"postgresql://search:s3cret-word@127.0.0.1:{closed_port()}/search"
    result = index(folder, down)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "s3cret-word" not in result.stderr and "127.0.0.1" in lines[0]
    assert snapshot(folder) == before

    searched = run_command("imagenet_search.py", "--query", QUERY, "--featuresPath", str(features), "--no-plot",
                           "--db", down, cwd=folder)
    assert searched.returncode == 2 and len(searched.stderr.strip().splitlines()) == 1, searched.stderr
    assert "s3cret-word" not in searched.stderr


def test_the_service_takes_its_candidates_from_the_database(indexed, db_server):
    from fastapi.testclient import TestClient

    from search_utils import vector_db
    from search_utils.service import ServiceConfig, create_app

    folder, features, _ = indexed
    database = vector_db.open_database(db_server.uri)
    cwd = os.getcwd()
    os.chdir(folder)  # paths as the CLI shows them
    try:
        app = create_app(ServiceConfig(str(features), load_model=False, backend=database.backend()))
        with TestClient(app) as client:
            stats = client.get("/api/stats").json()
            assert "pgvector" in stats["candidates"]
            answer = client.get("/api/search", params={"id": 7, "n": 10}).json()
    finally:
        os.chdir(cwd)
        database.close()
    exact = search(folder, answer["query"], "--exact")
    assert [(r["path"], r["distance"]) for r in answer["results"]] == [(r["path"], r["distance"]) for r in exact]


def test_a_database_not_updated_is_out_of_date_and_the_search_exact(tmp_path, db_server):
    """Re-indexing without --db leaves the database holding an older
    version: a search with --db says so in one note and scans exactly (the
    query image itself first, new and changed images found), until the
    indexer syncs it again; the service alike."""
    index_icons(tmp_path, count=30)
    assert index(tmp_path, db_server.uri).returncode == 0
    for icon in ICONS[30:40]:
        shutil.copy(icon, tmp_path / "icons" / icon.name)
    without_db = run_command("create_imagenet_features.py", "--dataset", "icons", "--output", "features.csv",
                             "--model", "efficientnet_lite0", "-q", cwd=tmp_path)
    assert without_db.returncode == 0 and "10 new" in without_db.stderr, without_db.stderr

    for query in (f"icons/{ICONS[0].name}", f"icons/{ICONS[35].name}"):
        notes = []
        assert ranked(search(tmp_path, query, "--db", db_server.uri, stderr=notes)) == \
            ranked(search(tmp_path, query, "--exact"))
        out_of_date = [line for line in notes[0].splitlines() if "out of date" in line]
        assert len(out_of_date) == 1 and "searching exactly" in out_of_date[0], notes[0]
        assert "again with --db" in out_of_date[0] and db_server.password not in notes[0]

    synced = index(tmp_path, db_server.uri)
    assert "10 added, 0 updated, 0 removed" in synced.stderr, synced.stderr
    notes = []
    search(tmp_path, f"icons/{ICONS[0].name}", "--db", db_server.uri, stderr=notes)
    assert "out of date" not in notes[0] and "pgvector" in notes[0], notes[0]

    changed = f"icons/{ICONS[3].name}"
    shutil.copy(ICONS[200], tmp_path / changed)  # the same name, another picture
    without_db = run_command("create_imagenet_features.py", "--dataset", "icons", "--output", "features.csv",
                             "--model", "efficientnet_lite0", "-q", cwd=tmp_path)
    assert "1 changed" in without_db.stderr, without_db.stderr
    notes = []
    through_db = search(tmp_path, changed, "--db", db_server.uri, stderr=notes)
    assert ranked(through_db) == ranked(search(tmp_path, changed, "--exact"))
    assert through_db[0]["path"].endswith(ICONS[3].name) and through_db[0]["distance"] == 0
    assert "out of date" in notes[0]

    from fastapi.testclient import TestClient

    from search_utils import vector_db
    from search_utils.service import ServiceConfig, create_app

    database = vector_db.open_database(db_server.uri)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # paths as the CLI shows them
    try:
        app = create_app(ServiceConfig(str(tmp_path / "features.csv"), load_model=False,
                                       backend=database.backend()))
        with TestClient(app) as client:
            answer = client.get("/api/search", params={"id": 0, "n": 10}).json()
    finally:
        os.chdir(cwd)
        database.close()
    assert ranked(answer["results"]) == ranked(search(tmp_path, answer["query"], "--exact"))


@pytest.mark.parametrize("command", ["create_imagenet_features.py", "imagenet_search.py"])
def test_an_empty_or_broken_db_uri_is_one_line(tmp_path, command):
    options = (["--dataset", "icons", "--output", "features.csv"] if command.startswith("create")
               else ["--query", "q.png", "--featuresPath", "features.csv", "--no-plot"])
    empty = run_command(command, *options, "--db", "", cwd=tmp_path)
    assert empty.returncode == 2
    assert_one_line_error(empty, "--db", "empty")
    newline = run_command(command, *options, "--db", "mysql://me:Sec\nret-9@db/x", cwd=tmp_path)
    assert newline.returncode == 2
    assert_one_line_error(newline, "not a PostgreSQL URI")
    assert "Sec" not in newline.stderr and "ret-9" not in newline.stderr
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("credentials", ["search:pa/ss4XYZ@", "search:pa#ss4XYZ@", "search:pa?ss4XYZ@",
                                         "search:pa@ss4XYZ@", "search@"])
def test_a_password_with_special_characters_never_shows(indexed, db_server, credentials):
    folder, features, _ = indexed
    port = urlsplit(db_server.uri).port
    uri = f"postgresql://{credentials}127.0.0.1:{port}/postgres"
    if credentials == "search@":
        uri += "?sslpassword=pass4XYZ"
    result = run_command("imagenet_search.py", "--query", QUERY, "--featuresPath", str(features), "--no-plot",
                         "--db", uri, cwd=folder)
    assert result.returncode == 2
    assert_one_line_error(result, "127.0.0.1")
    assert "4XYZ" not in result.stderr + result.stdout, result.stderr
