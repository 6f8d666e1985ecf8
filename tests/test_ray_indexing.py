"""Indexing on a Ray cluster (`--ray ADDRESS`): the same features as on one
machine, the same skipped files, and the same resilience.

Everything is real: a two-node cluster of `ray start` processes on loopback
in a private network namespace (tests/ray_cluster.py, needs root as CI
has), the real command in a subprocess, EfficientNet-Lite0 with its
pip-packaged weights, and a folder of 400 distinct pictures plus unreadable
files. Signals and the node kill wait for an observable state (a batch
committed in the indexing state, an actor running on the node) with
hundreds of images still to embed, so they always land mid-run.

Addresses that are wrong (malformed, a Ray Client address, something that
listens but isn't Ray) need no cluster: they are refused before Ray starts,
against fake listeners on loopback.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, draw_picture, make_dataset, offline_env
from ray_cluster import RayCluster
from search_utils import catalog, ray_indexing
from search_utils.store import load_features

INDEX = str(REPO / "create_imagenet_features.py")
PICTURES = 400  # distinct images: minutes of work left when a signal lands, on 2 cores
GOOD = PICTURES + 7  # make_dataset's 7 readable files
BAD = 3  # and its unreadable ones
BATCH = ["--batch-size", "4"]
DEADLINE = 300.0  # for any wait on a loaded machine


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """`images/` (make_dataset's good and bad files, and PICTURES small
    pictures) in a folder the commands run from."""
    root = tmp_path_factory.mktemp("ray")
    make_dataset(root / "images")
    for seed in range(PICTURES):
        draw_picture(1000 + seed, size=(64, 64)).save(root / "images" / f"p{seed:03}.png")
    return root


@pytest.fixture(scope="module")
def reference(folder) -> tuple[Path, str]:
    """The single-machine run: its features file and its stderr."""
    result = index(folder, "single.csv")
    assert result.returncode == 0, result.stderr
    return folder / "single.csv", result.stderr


@pytest.fixture(scope="module")
def cluster(folder):
    with RayCluster(offline_env(folder)) as running:
        yield running


def index(folder: Path, output: str, *extra, cluster: RayCluster | None = None) -> subprocess.CompletedProcess:
    """The command, on one machine or (with `cluster`) inside its network."""
    command = [sys.executable, INDEX, "--dataset", "images", "--output", output,
               "--model", "efficientnet_lite0", *BATCH, "-q", *extra]
    if cluster is None:
        return subprocess.run(command, cwd=folder, env=offline_env(folder), capture_output=True, text=True,
                              timeout=600)
    return cluster.run(command, cwd=folder)


def start_on(cluster: RayCluster, folder: Path, output: str) -> subprocess.Popen:
    return cluster.popen([sys.executable, INDEX, "--dataset", "images", "--output", output,
                          "--model", "efficientnet_lite0", *BATCH, "-q", "--ray", cluster.address], cwd=folder)


def wait_until(condition, what: str, run: subprocess.Popen) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if run.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {run.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def skipped(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("skipping "))


def assert_same_features(output: Path, reference: Path) -> None:
    ours, single = load_features(str(output)), load_features(str(reference))
    assert ours.paths == single.paths
    np.testing.assert_allclose(ours.features, single.features, rtol=1e-5, atol=1e-5)


def embedded(stderr: str) -> int:
    return int(re.search(r"embedded (\d+) in", stderr).group(1))


# -------------------------------------------------------------------------


def test_a_cluster_gives_the_single_machine_features_and_skips(folder, reference, cluster):
    single, single_stderr = reference
    result = index(folder, "cluster.csv", "--ray", cluster.address, cluster=cluster)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "note: embedding on the Ray cluster at 127.0.0.1:6379: 2 actors on 2 nodes" in result.stderr
    assert skipped(result.stderr) == skipped(single_stderr) and len(skipped(result.stderr)) == BAD
    assert f"indexed {GOOD} images" in result.stderr
    assert_same_features(folder / "cluster.csv", single)


def test_an_unreachable_cluster_is_one_line_and_exit_2(folder, cluster):
    result = index(folder, "nowhere.csv", "--ray", "127.0.0.1:6390", cluster=cluster)  # nothing listens there
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "create_imagenet_features.py: error: cannot reach the Ray cluster at 127.0.0.1:6390: connection refused"]
    assert not list(folder.glob("nowhere.csv*"))


def test_ctrl_c_stops_a_cluster_run_that_resumes(folder, reference, cluster):
    run = start_on(cluster, folder, "stopped.csv")
    try:
        wait_until(lambda: catalog.count_checkpointed(str(folder / "stopped.csv")) >= 1, "a checkpoint", run)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=DEADLINE)
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"create_imagenet_features.py: error: interrupted: (\d+) of (\d+) images embedded "
                         r"and checkpointed; run the same command again to resume", last)
    assert match and int(match.group(2)) == GOOD + BAD, stderr
    kept = catalog.count_checkpointed(str(folder / "stopped.csv"))
    assert 1 <= kept < GOOD - 100  # stopped mid-run
    again = index(folder, "stopped.csv", "--ray", cluster.address, cluster=cluster)
    assert again.returncode == 0, again.stderr
    assert "resuming an unfinished run" in again.stderr
    assert embedded(again.stderr) == GOOD - kept  # only the rest
    assert_same_features(folder / "stopped.csv", reference[0])


def test_a_worker_node_killed_mid_run_costs_only_its_batches(folder, reference):
    """A cluster of its own: this one loses a node."""
    with RayCluster(offline_env(folder)) as lossy:
        worker = lossy.nodes[1]
        run = start_on(lossy, folder, "lossy.csv")
        try:
            output = str(folder / "lossy.csv")
            wait_until(lambda: catalog.count_checkpointed(output) >= 1 and worker.has_process("MapWorker"),
                       "a checkpoint and an actor on the worker node", run)
            worker.kill()
            at_kill = catalog.count_checkpointed(output)
            _, stderr = run.communicate(timeout=600)
        finally:
            run.kill()
        assert at_kill < GOOD - 100  # the kill landed mid-run
        assert run.returncode == 0, stderr
        assert "Traceback" not in stderr
    assert_same_features(folder / "lossy.csv", reference[0])


def test_sigterm_stops_a_cluster_run_as_ctrl_c_does(folder, cluster):
    """ray.init sets its own SIGTERM handler (exit status 15, Ray's log
    lines): the command's is put back, so `kill` is the usual one line and
    exit status 130, the batches done kept."""
    run = start_on(cluster, folder, "terminated.csv")
    try:
        wait_until(lambda: catalog.count_checkpointed(str(folder / "terminated.csv")) >= 1, "a checkpoint", run)
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=DEADLINE)
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.fullmatch(r"create_imagenet_features.py: error: interrupted: \d+ of \d+ images embedded "
                        r"and checkpointed; run the same command again to resume",
                        stderr.strip().splitlines()[-1]), stderr
    assert catalog.count_checkpointed(str(folder / "terminated.csv")) >= 1


# ------------------------------------------------- addresses refused before Ray starts (no cluster)


@pytest.fixture
def small(tmp_path) -> Path:
    """Two pictures to embed: the embedder (and so the connection) is needed."""
    (tmp_path / "images").mkdir()
    for seed in range(2):
        draw_picture(seed).save(tmp_path / "images" / f"p{seed}.png")
    return tmp_path


@contextlib.contextmanager
def fake_listener(answer: bytes | None):
    """A loopback port where something listens that is not Ray: it never
    answers (`answer` None), or it reads a little, answers `answer` and
    hangs up (as PostgreSQL does to a stranger). Yields the port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            if answer is None:
                held.append(connection)
                continue
            with connection:
                connection.settimeout(5)
                with contextlib.suppress(OSError):
                    connection.recv(1024)
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


def index_small(folder: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = env or offline_env(folder)
    if env is None:
        environment.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, INDEX, "--dataset", "images", "--output", "out.csv",
                           "--model", "efficientnet_lite0", "-q", *extra], cwd=folder, env=environment,
                          capture_output=True, text=True, timeout=300)  # without the probe: hangs for ever


@pytest.mark.parametrize("answer, says", [
    (None, "something listens there but gave no answer within 5 s: not a Ray cluster's head"),
    (b"EFATAL invalid length of startup packet\0",
     "something listens there but does not answer as a Ray cluster's head does"),
])
def test_something_that_is_not_ray_is_one_line_and_exit_2(small, answer, says):
    with fake_listener(answer) as port:
        result = index_small(small, "--ray", f"127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, f"cannot connect to the Ray cluster at 127.0.0.1:{port}: {says}")
    assert not list(small.glob("out.csv*"))


def test_auto_probes_the_address_ray_address_names(small):
    with fake_listener(None) as port:
        env = offline_env(small)
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        result = index_small(small, "--ray", "auto", env=env)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, f"the Ray cluster at 127.0.0.1:{port}", "gave no answer")


@pytest.mark.parametrize("address, says", [
    ("ray://127.0.0.1:10001", "argument --ray: Ray Client addresses (ray://) are not supported; give host:port"),
    ("127.0.0.1:99999", "argument --ray: not an address: '127.0.0.1:99999'"),
    ("garbage", "argument --ray: not an address: 'garbage'"),
    ("", "argument --ray: empty"),
])
def test_a_malformed_address_is_refused_even_with_nothing_to_embed(tmp_path, address, says):
    (tmp_path / "images").mkdir()  # nothing to embed: the cluster would never be asked
    result = index_small(tmp_path, "--ray", address)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, says)


class FakeRay:
    """What _connect asks of Ray, recorded; init replaces the SIGTERM
    handler as ray.init does (or exits as its handler would)."""

    def __init__(self, exit_code: int | None = None):
        self.calls, self.exit_code = [], exit_code

    def init(self, **options):
        self.calls.append(options)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
        if self.exit_code is not None:
            raise SystemExit(self.exit_code)


def test_a_bare_ray_starts_a_local_cluster_whatever_ray_address_says(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "fatal")
    ray = FakeRay()
    ray_indexing._connect(ray, ray_indexing.LOCAL)
    assert ray.calls[0]["address"] == "local"  # ray.init: "local" starts a new cluster, ignoring RAY_ADDRESS


def test_ray_init_leaves_the_commands_sigterm_handling_in_place(monkeypatch):
    monkeypatch.setenv("RAY_BACKEND_LOG_LEVEL", "fatal")

    def ours(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        ray_indexing._connect(FakeRay(), ray_indexing.LOCAL)
        assert signal.getsignal(signal.SIGTERM) is ours
        with pytest.raises(KeyboardInterrupt):  # SIGTERM while Ray was starting: an interrupt, not exit status 15
            ray_indexing._connect(FakeRay(exit_code=signal.SIGTERM), ray_indexing.LOCAL)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)
