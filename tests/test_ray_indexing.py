"""Indexing on a Ray cluster (`--ray ADDRESS`): the same features as on one
machine, the same skipped files, and the same resilience.

Everything is real: a two-node cluster of `ray start` processes on loopback
in a private network namespace (tests/ray_cluster.py, needs root as CI
has), the real command in a subprocess, EfficientNet-Lite0 with its
pip-packaged weights, and a folder of 400 distinct pictures plus unreadable
files. Signals and the node kill wait for an observable state (a batch
committed in the indexing state, an actor running on the node) with
hundreds of images still to embed, so they always land mid-run.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, draw_picture, make_dataset, offline_env
from ray_cluster import RayCluster
from search_utils import catalog
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
