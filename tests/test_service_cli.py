"""The real server (search_server.py) in a subprocess, on a free loopback
port: the same results as imagenet_search.py, following a re-indexing run
while it answers, its start-up errors, and stopping on SIGINT/SIGTERM.
Nothing listens beyond 127.0.0.1 / ::1; every HTTP client ignores proxies.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REPO, assert_one_line_error, offline_env, permission_runner, run_command
from PIL import Image
from served import ICONS, Server, running_server

COUNT = 40
ADDED = 3  # icons added by the re-indexing run
PATIENCE = 60  # seconds a bounded wait may take (never a timing assertion)
N = 50  # every row: each distance is compared, and copies show up wherever they rank
READ_TIMEOUT = 5  # seconds: the `strict` server's --read-timeout
IN_PROGRESS = 64  # the service's default max_requests: also how many uploads may be arriving at once
STALLED_UPLOAD = (b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")  # then nothing more
COPY = "icons/copy-of-first.png"  # a byte-identical copy of the first icon: results have copies
QUERY_INDEXED = f"icons/{ICONS[0].name}"
QUERY_OUTSIDE = "search.jpg"  # copied next to the collection, not in it
QUERY_INDEXED_BYTES = "first-icon.png"  # the first icon's bytes, beside the collection: the command embeds
# them as the service embeds an upload (for an indexed path it reuses the stored row instead, as the
# service's search by id does). The command builds the model for each upload case (seconds each): two
# cases between them cover both modes and both ways with copies; by id (no model) runs all four.
UPLOADS = [(QUERY_OUTSIDE, "chi2", False), (QUERY_INDEXED_BYTES, "whitened", True)]
BY_ID = [(QUERY_INDEXED, metric, keep) for metric in ("chi2", "whitened") for keep in (False, True)]
CASES = UPLOADS + BY_ID


def index(folder: Path) -> subprocess.CompletedProcess:
    return run_command("create_imagenet_features.py", "--dataset", "icons", "--output", "features.csv",
                       "--model", "efficientnet_lite0", "-q", cwd=folder)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """As served.index_icons, plus a byte-identical copy of the first icon
    (so results have copies) and the query search.jpg beside the folder."""
    folder = tmp_path_factory.mktemp("service_cli")
    (folder / "icons").mkdir()
    for icon in ICONS[:COUNT]:
        shutil.copy(icon, folder / "icons" / icon.name)
    shutil.copy(ICONS[0], folder / COPY)
    shutil.copy(REPO / "search.jpg", folder / QUERY_OUTSIDE)
    shutil.copy(ICONS[0], folder / QUERY_INDEXED_BYTES)
    result = index(folder)
    assert result.returncode == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def server(collection):
    """The real server over the collection; its model builds (in its own
    process) while the command's runs go on; tests that upload wait for it."""
    with running_server(collection / "features.csv", cwd=collection) as server:
        yield server
    assert server.process.returncode == 0, "".join(server.stderr)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=PATIENCE) as client:
        yield client


@pytest.fixture(scope="module")
def cli_answers(collection) -> dict:
    """imagenet_search.py --json --no-plot for every case, run from the
    collection's folder (four at a time: each is its own process)."""

    def search(case):
        query, metric, keep = case
        result = run_command("imagenet_search.py", "--query", query, "--featuresPath", "features.csv", "--json",
                             "--no-plot", "-n", N, "--metric", metric, *(["--keep-duplicates"] if keep else []),
                             cwd=collection)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    with ThreadPoolExecutor(4) as pool:
        return dict(zip(CASES, pool.map(search, CASES)))


def assert_same_results(cli: dict, service: dict, metric: str) -> None:
    assert service["metric"] == cli["metric"] == metric
    assert len(service["results"]) == len(cli["results"]) > 0
    for theirs, ours in zip(cli["results"], service["results"]):
        assert (ours["rank"], ours["path"], ours["copies"]) == (theirs["rank"], theirs["path"], theirs["copies"])
        assert ours["distance"] == pytest.approx(theirs["distance"], rel=1e-9, abs=1e-12), (ours, theirs)


def assert_copies(hits: list[dict], keep: bool) -> None:
    """The first icon and its copy: two results if kept, else one result naming both."""
    pair = {QUERY_INDEXED, COPY}
    if keep:
        assert pair <= {hit["path"] for hit in hits} and not any(hit["copies"] for hit in hits)
    else:
        named = [{hit["path"], *hit["copies"]} & pair for hit in hits]
        assert [names for names in named if names] == [pair]


def row_of(http, path: str) -> int:
    rows = {item["path"]: item["id"] for item in http.get("/api/sample", params={"n": 100}).json()}
    return rows[path]


# -- (a) the same results as the command -----------------------------------------


@pytest.mark.parametrize("query, metric, keep", UPLOADS)
def test_an_upload_finds_what_the_command_finds(collection, server, http, cli_answers, query, metric, keep):
    server.wait_for_model()
    params = {"n": N, "metric": metric, "keep_duplicates": str(keep).lower()}
    content = (collection / query).read_bytes()
    response = http.post("/api/search", params=params, files={"image": (os.path.basename(query), content)})
    assert response.status_code == 200, response.text
    assert response.json()["query"] == os.path.basename(query)
    assert_same_results(cli_answers[(query, metric, keep)], response.json(), metric)
    hits = response.json()["results"]
    assert_copies(hits, keep)
    if query == QUERY_INDEXED_BYTES:
        assert {hits[0]["path"], *hits[0]["copies"]} & {QUERY_INDEXED, COPY}


@pytest.mark.parametrize("metric", ["chi2", "whitened"])
@pytest.mark.parametrize("keep", [False, True])
def test_a_search_by_id_finds_what_the_command_finds(http, cli_answers, metric, keep):
    row = row_of(http, QUERY_INDEXED)
    response = http.get("/api/search", params={"id": row, "n": N, "metric": metric,
                                               "keep_duplicates": str(keep).lower()})
    assert response.status_code == 200, response.text
    assert response.json()["query_id"] == row
    assert_same_results(cli_answers[(QUERY_INDEXED, metric, keep)], response.json(), metric)
    if keep or metric == "chi2":  # whitened folded: see the test below
        assert_copies(response.json()["results"], keep)


def test_a_search_by_id_folds_the_querys_copies_in_every_mode(http):
    row = row_of(http, QUERY_INDEXED)
    for metric in ("chi2", "cosine", "euclidean", "whitened"):
        response = http.get("/api/search", params={"id": row, "n": 5, "metric": metric})
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert {hits[0]["path"], *hits[0]["copies"]} == {QUERY_INDEXED, COPY}, (metric, hits[:2])


def test_the_real_server_sends_the_security_headers_and_no_cors(server, http):
    for response in (http.get("/"), http.get("/api/stats"), http.get("/api/images/9999"),
                     http.get("/static/app.js", headers={"Origin": "http://elsewhere.example"})):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert "access-control-allow-origin" not in response.headers
    assert not any("warning: listening" in line for line in server.stderr)  # 127.0.0.1: no warning


@pytest.mark.parametrize("target", ["/static/../search_server.py", "/static/../../search_server.py",
                                    "/static/../service.py", "/api/images/../../../../etc/passwd",
                                    "/static/%2e%2e/%2e%2e/search_server.py", "/static/..%2f..%2fsearch_server.py"])
def test_raw_traversal_requests_are_404(server, target):
    """Sent byte for byte (an HTTP client would tidy the dots away)."""
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=PATIENCE) as connection:
        connection.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 404 Not Found", reply[:300]
    assert b"x-content-type-options: nosniff" in head.lower()
    answer = json.loads(body)
    assert answer["status"] == 404 and answer["error"].startswith("no such page or API route")
    for secret in (b"root:", b"def main", b"import "):
        assert secret not in body


# -- (b) it follows the index ----------------------------------------------------


def test_it_follows_a_reindexing_run_and_answers_throughout(collection, server, http):
    server.wait_for_model()  # lines logged while the model builds are lost (see test_the_log_says_...)
    before = http.get("/api/stats").json()
    statuses: list = []
    stop = threading.Event()

    def search_in_a_loop():
        with httpx.Client(base_url=server.url, trust_env=False, timeout=PATIENCE) as client:
            while not stop.is_set():
                try:
                    statuses.append(client.get("/api/search", params={"id": 0, "n": 5}).status_code)
                except httpx.HTTPError as error:
                    statuses.append(repr(error))
                stop.wait(0.01)  # pacing, not synchronisation

    added = ICONS[COUNT:COUNT + ADDED]
    for icon in added:
        shutil.copy(icon, collection / "icons" / icon.name)
    searcher = threading.Thread(target=search_in_a_loop, daemon=True)
    searcher.start()
    try:
        result = index(collection)
        assert result.returncode == 0, result.stderr
        assert f"{ADDED} new" in result.stderr
        deadline = time.monotonic() + PATIENCE
        while (stats := http.get("/api/stats").json())["count"] == before["count"]:
            assert time.monotonic() < deadline, "the server never loaded the new generation"
            time.sleep(0.1)
        during = len(statuses)
        while len(statuses) < during + 3:  # a few more searches on the new generation
            assert time.monotonic() < deadline and searcher.is_alive()
            time.sleep(0.05)
    finally:
        stop.set()
        searcher.join(PATIENCE)
    assert stats["count"] == before["count"] + ADDED
    assert stats["generation"] != before["generation"]
    assert len(statuses) > 0 and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert any("loaded the new generation" in line for line in server.stderr), "".join(server.stderr)

    new = added[1]
    response = http.post("/api/search", files={"image": (new.name, new.read_bytes())})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["path"] == f"icons/{new.name}"
    row = row_of(http, f"icons/{new.name}")
    assert http.get(f"/api/images/{row}").content == new.read_bytes()


# -- (c) listening beyond loopback warns ----------------------------------------------


def test_only_loopback_addresses_count_as_loopback():
    import search_server

    for host in ("127.0.0.1", "127.0.0.2", "127.255.255.254", "::1", "localhost"):
        assert search_server.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "2001:db8::1", "example.com", ""):
        assert not search_server.is_loopback(host), host


def quiet_uvicorn_logging(monkeypatch) -> None:
    """uvicorn.Config sets up logging (logging.config.dictConfig), which
    closes every existing handler; in a pytest process that has imported
    TensorFlow (test_service_api builds the model in process) one is absl's,
    which then closes the stream it was made with: pytest's own capture.
    Not what these tests are about: skipped in process."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)


@pytest.fixture
def serve_nothing(monkeypatch):
    """search_server.main in process, with uvicorn's run replaced by a stub
    that records what it would serve (the app, and the address of each
    socket it was given) and returns (as after Ctrl-C). The app's lifespan
    never runs, so it made no upload folder; main closes the sockets."""
    import uvicorn

    served: list = []

    def run(self, sockets=None):
        served.append((self.config.app, [sock.getsockname()[0] for sock in sockets]))

    monkeypatch.setattr(uvicorn.Server, "run", run)
    quiet_uvicorn_logging(monkeypatch)
    yield served


def test_a_host_beyond_loopback_warns(collection, monkeypatch, capsys, serve_nothing):
    """The honest simplest route: no non-loopback address may be bound here,
    so `listen` is made to bind 127.0.0.1 whatever it is asked; main still
    judges the host it was given (0.0.0.0) and must warn about it."""
    import search_server

    real_listen, asked = search_server.listen, []

    def loopback_listen(host, port):
        asked.append(host)
        return real_listen("127.0.0.1", 0)

    monkeypatch.setattr(search_server, "listen", loopback_listen)
    monkeypatch.chdir(collection)
    assert search_server.main(["--featuresPath", "features.csv", "--host", "0.0.0.0", "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert asked == ["0.0.0.0"]
    [(_, sockets)] = serve_nothing
    assert sockets == ["127.0.0.1"]
    warnings = [line for line in err.splitlines() if line.startswith("warning: listening on 0.0.0.0")]
    assert len(warnings) == 1 and "anyone who can reach this machine" in warnings[0], err
    assert err.rstrip().endswith("stopped")


def test_loopback_hosts_do_not_warn(collection, monkeypatch, capsys, serve_nothing):
    import search_server

    monkeypatch.chdir(collection)
    for host, shown in (("127.0.0.1", "127.0.0.1"), ("::1", "[::1]")):
        assert search_server.main(["--featuresPath", "features.csv", "--host", host, "--port", "0"]) == 0
        err = capsys.readouterr().err
        assert "warning" not in err, err
        serving = rf"^serving \d+ images from features.csv on http://{re.escape(shown)}:\d+/"
        assert re.search(serving, err, re.MULTILINE), err
    assert [sockets[0] for _, sockets in serve_nothing] == ["127.0.0.1", "::1"]


# -- a model that can't be built ------------------------------------------------------


@pytest.fixture(scope="module")
def unweighted(collection):
    """The real server told to embed uploads with a weights file that isn't there."""
    with running_server(collection / "features.csv", "--weights", "missing.weights.h5", cwd=collection) as server:
        yield server


def test_a_model_that_cannot_be_built_is_503_for_uploads_only(collection, unweighted):
    with httpx.Client(base_url=unweighted.url, trust_env=False, timeout=PATIENCE) as client:
        health = client.get("/api/health").json()
        assert health["model"].startswith("unavailable") and "missing.weights.h5" in health["model"]
        upload = client.post("/api/search", files={"image": ("q.jpg", (collection / QUERY_OUTSIDE).read_bytes())})
        assert upload.status_code == 503 and "the model can't be loaded" in upload.json()["error"]
        assert client.get("/api/search", params={"id": 0}).status_code == 200


def test_the_log_says_whether_uploads_can_be_embedded(server, unweighted):
    server.wait_for_model()
    assert unweighted.get_json("api/health")["model"].startswith("unavailable")
    assert any(line.startswith("model efficientnet_lite0 ready") for line in server.stderr), server.stderr
    assert any(line.startswith("warning: uploaded queries can't be embedded: weights file not found")
               for line in unweighted.stderr), unweighted.stderr


# -- (d) start-up errors --------------------------------------------------------------


def test_a_port_in_use_is_one_line(collection):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_command("search_server.py", "--featuresPath", "features.csv", "--port", port, cwd=collection)
    assert_one_line_error(result, f"port {port}", "already in use", "--port")


@pytest.mark.parametrize("option, value", [
    ("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"), ("--max-upload-mb", "1e-9"), ("--max-upload-mb", "0"),
    ("--max-upload-mb", "1e6"), ("--wait-seconds", "nan"), ("--wait-seconds", "inf"), ("--wait-seconds", "1e10"),
    ("--wait-seconds", "-1"), ("--read-timeout", "nan"), ("--read-timeout", "0"), ("--read-timeout", "1e10")])
def test_numbers_that_are_not_finite_positive_and_sane_are_one_line(capsys, option, value):
    import search_server

    with pytest.raises(SystemExit) as exited:
        search_server.parse_args(["--featuresPath", "features.csv", option, value])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"argument {option}: must be a number from" in lines[0], lines
    assert repr(value) in lines[0]


@pytest.mark.parametrize("option, value", [("--wait-seconds", "1e10"), ("--max-upload-mb", "nan")])
def test_the_command_refuses_them_leaving_no_upload_folder(collection, tmp_path, option, value):
    env = {**offline_env(collection), "TMPDIR": str(tmp_path)}
    result = run_command("search_server.py", "--featuresPath", "features.csv", "--port", 0, option, value,
                         cwd=collection, env=env)
    assert_one_line_error(result, option, "must be a number from")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_features_file_is_one_line(collection):
    result = run_command("search_server.py", "--featuresPath", "missing.csv", "--port", 0, cwd=collection)
    assert_one_line_error(result, "missing.csv")


# -- (e) slow clients, unreadable files ------------------------------------------------


@pytest.fixture(scope="module")
def strict(collection):
    """The real server with a short --read-timeout, obeying file permissions
    even as root where that can be arranged (see conftest.permission_runner)."""
    preexec, _ = permission_runner()
    with running_server(collection / "features.csv", "--read-timeout", str(READ_TIMEOUT), cwd=collection,
                        preexec_fn=preexec) as server:
        yield server


def connect(server: Server, sent: bytes = b"") -> socket.socket:
    connection = socket.create_connection(server.address, timeout=PATIENCE)
    connection.sendall(sent)
    return connection


def until_closed(connection: socket.socket) -> bytes:
    """All the server sends until it closes the connection (a socket timeout
    if it never does)."""
    reply = b""
    while chunk := connection.recv(65536):
        reply += chunk
    return reply


def test_stalled_uploads_block_no_cheap_route_and_are_cut_off(strict):
    """Uploads that stop after their first line of form: they may fill the
    uploads arriving (the two beyond get 503 at once), never the cheap
    routes, and after --read-timeout each is answered 408 and closed."""
    stalled = [connect(strict, STALLED_UPLOAD) for _ in range(IN_PROGRESS + 2)]
    try:
        deadline = time.monotonic() + PATIENCE
        while (stats := strict.get_json("api/stats"))["uploads_arriving"] < IN_PROGRESS:  # answered meanwhile
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert stats["requests_in_progress"] == 1  # this one: the stalled uploads are not in progress
        assert strict.get_json("api/health")["status"] == "ok"
        replies = [until_closed(connection) for connection in stalled]
    finally:
        for connection in stalled:
            connection.close()
    statuses = Counter(reply.split(b"\r\n", 1)[0].decode() for reply in replies)
    assert statuses == {"HTTP/1.1 408 Request Timeout": IN_PROGRESS, "HTTP/1.1 503 Service Unavailable": 2}
    for reply in replies:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"x-content-type-options: nosniff" in head.lower()
        answer = json.loads(body)
        assert set(answer) == {"error", "status"} and str(answer["status"]).encode() in head.split(b"\r\n")[0]
    assert any(f"longer than {READ_TIMEOUT} s" in json.loads(r.partition(b"\r\n\r\n")[2])["error"] for r in replies)
    assert strict.get_json("api/stats")["uploads_arriving"] == 0


def test_connections_that_send_nothing_or_trickle_their_headers_are_closed(strict):
    idle = connect(strict)
    trickling = connect(strict)
    try:
        for byte in b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
            if select.select([trickling], [], [], 0.5)[0]:  # pacing: a byte each half second until it closes
                break
            trickling.sendall(bytes([byte]))
        else:
            pytest.fail("the server waited for the whole trickled request")
        assert until_closed(trickling) == b""
        assert until_closed(idle) == b""
    finally:
        idle.close(), trickling.close()


def test_an_indexed_file_that_cannot_be_read_is_404(collection, strict):
    preexec, why_not = permission_runner()
    if preexec is None and why_not:
        pytest.skip(why_not)
    name = ICONS[5].name
    path = collection / "icons" / name
    with httpx.Client(base_url=strict.url, trust_env=False, timeout=PATIENCE) as client:
        rows = {item["path"]: item["id"] for item in client.get("/api/sample", params={"n": 100}).json()}
        row = rows[f"icons/{name}"]
        path.chmod(0)
        try:
            answers = [client.get(f"/api/images/{row}"), client.get(f"/api/thumbnails/{row}")]
        finally:
            path.chmod(0o644)
    for response, says in zip(answers, ("can't be read", "permission denied")):
        assert response.status_code == 404, response.text
        assert says in response.json()["error"] and f"icons/{name}" in response.json()["error"]
        assert str(collection) not in response.json()["error"]


# -- (f) stopping ---------------------------------------------------------------------


def stderr_to_the_end(server: Server) -> str:
    """Everything the server wrote on stderr, once it closed it."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        try:
            if server.lines.get(timeout=1) == "":
                return "".join(server.stderr)
        except queue.Empty:
            continue
    raise AssertionError("the server's stderr never closed")


def assert_stopped_cleanly(server: Server) -> None:
    assert server.process.wait(PATIENCE) == 0
    err = stderr_to_the_end(server)
    assert err.splitlines()[-1] == "stopped", err
    assert "Traceback" not in err and "interrupted" not in err
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    with pytest.raises(OSError):  # nothing listens there any more
        socket.create_connection((host, int(port)), timeout=5).close()


def test_sigterm_stops_it_cleanly(collection):
    with running_server(collection / "features.csv", cwd=collection) as server:
        server.wait_for_model()
        server.process.send_signal(signal.SIGTERM)
        assert_stopped_cleanly(server)


def test_an_interrupt_just_after_the_serving_line_still_stops_cleanly(collection, monkeypatch, capsys):
    """In process, deterministically: the interrupt (what SIGINT and, through
    cli.run, SIGTERM raise) arrives as uvicorn's Server is being made."""
    import uvicorn

    import search_server

    def interrupted(self, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(uvicorn.Server, "__init__", interrupted)
    quiet_uvicorn_logging(monkeypatch)
    monkeypatch.chdir(collection)
    from search_utils import service

    made, listening = [], []
    real_create, real_listen = service.create_app, search_server.listen

    def create_app(config, log=None):
        made.append(real_create(config, log))
        return made[-1]

    def listen(host, port):
        listening.append(real_listen(host, port))
        return listening[-1]

    monkeypatch.setattr(service, "create_app", create_app)
    monkeypatch.setattr(search_server, "listen", listen)
    try:
        try:
            code = search_server.main(["--featuresPath", "features.csv", "--port", "0"])
        except KeyboardInterrupt:  # must not reach pytest, which would stop the whole run
            pytest.fail("the interrupt escaped search_server.main")
        assert code == 0
    finally:
        for sock in listening:
            sock.close()
    assert made and not hasattr(made[0].state, "uploads")  # never served: no upload folder made
    assert listening[0].fileno() == -1  # main closed its socket
    assert capsys.readouterr().err.splitlines()[-1] == "stopped"


def test_a_stop_while_the_model_loads_never_says_it_is_ready(collection, tmp_path):
    """SIGINT once the app's start-up has begun (its upload folder is made,
    then the model loads for seconds): the load can't be cut short, but the
    log must not say the model is ready after the stop was asked."""
    env = {**offline_env(collection), "TMPDIR": str(tmp_path)}
    server = Server(collection / "features.csv", cwd=collection, env=env)
    try:
        deadline = time.monotonic() + PATIENCE
        while not list(tmp_path.glob("search-server-uploads-*")):
            assert time.monotonic() < deadline and server.process.poll() is None, "".join(server.stderr)
            time.sleep(0.01)
        server.process.send_signal(signal.SIGINT)
        assert_stopped_cleanly(server)
    finally:
        server.stop()
    assert not any("ready" in line for line in server.stderr), server.stderr
    assert list(tmp_path.iterdir()) == []


def noisy_uploads() -> dict[str, bytes]:
    """Uploads that made libraries print: a 633-byte JPEG whose header claims
    144 megapixels (Pillow's DecompressionBombWarning), a TIFF whose tag
    claims more data than the file holds (Pillow's UserWarning)."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, "JPEG")
    jpeg = bytearray(out.getvalue())
    frame = jpeg.index(b"\xff\xc0")
    jpeg[frame + 5: frame + 9] = struct.pack(">HH", 12000, 12000)
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, "TIFF")
    tiff = bytearray(out.getvalue())
    entries = struct.unpack("<I", tiff[4:8])[0] + 2
    for entry in range(entries, entries + 12 * struct.unpack("<H", tiff[entries - 2: entries])[0], 12):
        if struct.unpack("<H", tiff[entry: entry + 2])[0] == 258:  # BitsPerSample: its values lie at an offset
            tiff[entry + 8: entry + 12] = struct.pack("<I", 100_000)
    return {"claims-144mp.jpg": bytes(jpeg), "tags.tif": bytes(tiff)}


def test_sigint_stops_the_warm_server_in_one_line_whatever_clients_sent(server):
    """Last: stops the module's server (warm, after every test above), after
    uploads that made libraries print and with an upload stalled (it holds
    the graceful stop until that gives up): the log says "stopped", nothing more."""
    server.wait_for_model()
    with httpx.Client(base_url=server.url, trust_env=False, timeout=PATIENCE) as client:
        for name, content in noisy_uploads().items():
            response = client.post("/api/search", files={"image": (name, content)})
            assert 400 <= response.status_code < 500, response.text
        body = b'--WXYZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\nabc\r\n--WXYZ--\r\n'
        wrong = client.post("/api/search", content=body, headers={"content-type": "multipart/form-data; boundary=WXYX"})
        assert wrong.status_code == 400, wrong.text
    stalled = connect(server, STALLED_UPLOAD)
    try:
        server.get_json("api/health")  # the stalled request is in
        before = len(server.stderr)
        server.process.send_signal(signal.SIGINT)
        assert_stopped_cleanly(server)
    finally:
        stalled.close()
    assert server.stderr[before:] == ["stopped\n"], server.stderr[before:]
    for noise in ("Warning", "warn(", "Expected boundary", "ERROR", "Traceback"):
        assert noise not in "".join(server.stderr), server.stderr


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(collection):
    """A request still in flight (an upload whose body never ends) holds the
    graceful shutdown open after the first SIGINT: uvicorn closes its port
    then waits for it (observable: new connections are refused), and the
    second SIGINT lands in that wait, where uvicorn quits at once."""
    with running_server(collection / "features.csv", cwd=collection) as server:
        server.wait_for_model()
        host, port = server.url.removeprefix("http://").rstrip("/").split(":")
        stalled = socket.create_connection((host, int(port)), timeout=PATIENCE)
        stalled.sendall(b"POST /api/search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
                        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
        server.get_json("api/health")  # the stalled request is in (the server answers around it)
        try:
            server.process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + PATIENCE
            while True:  # until the port is closed: shutting down, held by the stalled upload
                try:
                    socket.create_connection((host, int(port)), timeout=5).close()
                except OSError:
                    break
                assert time.monotonic() < deadline, "the first SIGINT did not start the shutdown"
            assert server.process.poll() is None  # still waiting for the stalled upload
            server.process.send_signal(signal.SIGINT)
            assert_stopped_cleanly(server)
        finally:
            stalled.close()
