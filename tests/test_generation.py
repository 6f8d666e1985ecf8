"""A features file and its sidecars (metadata, whitening) are one
generation: a reader never pairs one write's rows with another's metadata
or whitening, whether the writer is stopped at any step of its publish
(kill -9, SIGTERM) or replaces the files while readers read them.

The writer runs in a real subprocess (tests/generation_writer.py) that
stops itself at the k-th rename or delete of the publish, for every k.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, draw_picture, offline_env, run_command
from search_utils import store as St

WRITER = REPO / "tests" / "generation_writer.py"
GENERATIONS = {"A": 10, "B": 9}  # rows of each generation (B: one image removed, as in the report)


def expected(name: str) -> St.FeatureStore:
    """The store the writer script saves as generation `name` (same recipe)."""
    sys.path.insert(0, str(WRITER.parent))
    from generation_writer import make_store

    return make_store(name)


def assert_one_generation(path: Path) -> str:
    """`path` loads as exactly generation A or B, all of it; returns which."""
    loaded = St.load_features(str(path))
    name = "A" if len(loaded) == GENERATIONS["A"] else "B"
    want = expected(name)
    assert loaded.paths == want.paths
    assert np.array_equal(loaded.features, want.features)
    assert loaded.metadata["count"] == len(want.paths) and loaded.metadata["label"] == name
    assert loaded.whitening_arrays is not None, "the whitening of this generation was lost"
    for key in St.WHITENING_KEYS:
        assert np.array_equal(loaded.whitening_arrays[key], want.whitening_arrays[key]), key
    return name


def run_writer(folder: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WRITER), str(folder / "f.csv"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=offline_env(folder))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".next", ".tmp")))


@pytest.fixture(scope="module")
def publish_steps(tmp_path_factory) -> int:
    """How many renames and deletes one publish of B over A takes."""
    folder = tmp_path_factory.mktemp("count")
    assert run_writer(folder, "write", "A").returncode == 0
    result = run_writer(folder, "write", "B", "--count")
    assert result.returncode == 0, result.stderr
    steps = int(result.stdout)
    assert steps >= 4  # CSV, whitening, metadata, and the sidecars' own atomic writes
    return steps


@pytest.fixture
def generation_a(tmp_path) -> Path:
    assert run_writer(tmp_path, "write", "A").returncode == 0
    assert assert_one_generation(tmp_path / "f.csv") == "A"
    return tmp_path


def test_kill_9_at_every_step_of_the_publish_leaves_one_whole_generation(tmp_path, publish_steps):
    seen = []
    pristine = tmp_path / "pristine"
    assert run_writer(pristine.parent, "write", "A").returncode == 0
    shutil.copytree(pristine.parent, pristine, ignore=shutil.ignore_patterns("pristine"))
    for step in range(publish_steps + 1):
        folder = tmp_path / f"step{step}"
        shutil.copytree(pristine, folder)
        result = run_writer(folder, "write", "B", "--stop-at", step, "--signal", "KILL")
        if step < publish_steps:
            assert result.returncode == -signal.SIGKILL, (step, result.stderr)
        before_recovery = assert_one_generation(folder / "f.csv")
        St.recover_interrupted_write(str(folder / "f.csv"))  # what the next indexing run does first
        assert assert_one_generation(folder / "f.csv") == before_recovery, step  # never goes back
        assert leftovers(folder) == [], step
        seen.append(before_recovery)
    # The commit point splits the steps: A before it, B from it on.
    assert seen[0] == "A" and seen[-1] == "B" and seen == sorted(seen), seen


def test_sigterm_at_every_step_finishes_or_abandons_the_publish_cleanly(generation_a, publish_steps):
    pristine = generation_a.parent / "pristine_term"
    shutil.copytree(generation_a, pristine)
    for step in range(publish_steps):
        folder = generation_a.parent / f"term{step}"
        shutil.copytree(pristine, folder)
        result = run_writer(folder, "write", "B", "--stop-at", step, "--signal", "TERM")
        assert result.returncode == 130, (step, result.stderr)  # stopped by the signal, as cli.run does
        assert assert_one_generation(folder / "f.csv") in ("A", "B")
        assert leftovers(folder) == [], (step, leftovers(folder))  # a stop that can clean up does


def test_a_full_disk_while_publishing_is_one_line_and_keeps_the_old_generation(generation_a):
    """Writes past RLIMIT_FSIZE fail (EFBIG) as on a full disk (ENOSPC)."""
    result = run_writer(generation_a, "write", "B", "--limit", 1000)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "f.csv: File too large; the earlier file (if any) is as it was" in lines[0], lines[0]
    assert assert_one_generation(generation_a / "f.csv") == "A"
    assert leftovers(generation_a) == []


def test_readers_never_see_a_mixed_generation_while_it_is_replaced(generation_a):
    """A writer alternates A and B as fast as it can; every read in the
    meantime is one whole generation, and both are seen many times."""
    stop = generation_a / "stop"
    writer = subprocess.Popen([sys.executable, str(WRITER), str(generation_a / "f.csv"), "alternate", str(stop)],
                              stderr=subprocess.PIPE, text=True, env=offline_env(generation_a))
    seen = {"A": 0, "B": 0}
    switches, last = 0, "A"
    deadline = time.monotonic() + 240
    try:
        while switches < 40 or min(seen.values()) < 20:
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, seen
            name = assert_one_generation(generation_a / "f.csv")
            seen[name] += 1
            switches += name != last
            last = name
    finally:
        stop.touch()
        writer.wait(60)
    assert writer.returncode == 0, writer.stderr.read()


def test_hdf5_readers_and_the_memory_map_stay_on_one_file(tmp_path):
    """The memory map is taken from the file HDF5 opened, even if the name is
    replaced in between: the rows are those of the file whose paths were read."""
    path = tmp_path / "f.h5"
    first, second = expected("A"), expected("B")
    St.save_features(str(path), first)
    loaded = St.load_features(str(path), mmap=True)
    St.save_features(str(path), St.FeatureStore(second.paths, second.features * 2, second.metadata))
    assert isinstance(loaded.features, np.memmap)
    assert loaded.paths == first.paths and np.array_equal(loaded.features, first.features)
    assert np.array_equal(St.load_features(str(path), mmap=True).features, second.features * 2)


def test_a_hand_edited_csv_keeps_working_without_its_stale_whitening(generation_a):
    """A CSV edited by hand matches no recorded generation: it still loads if
    its shape fits the metadata, but the whitening (of other rows) is dropped."""
    path = generation_a / "f.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[1] + lines[0] + "".join(lines[2:]))  # two rows swapped
    loaded = St.load_features(str(path))
    assert loaded.paths[:2] == expected("A").paths[1::-1]
    assert loaded.whitening_arrays is None and "generation" not in loaded.metadata


def test_searches_succeed_while_reindexing_replaces_the_file(tmp_path):
    """The report's case with the real commands: searches by a stored image
    run while indexing runs remove and restore an image (each run rewrites
    the features file); every search succeeds."""
    images = tmp_path / "images"
    images.mkdir()
    for seed in range(12):
        draw_picture(seed, size=(64, 64)).save(images / f"{seed}.png")
    lite = ["--model", "efficientnet_lite0", "-q"]
    assert run_command("create_imagenet_features.py", "--dataset", "images", "--output", "f.csv", *lite,
                       cwd=tmp_path).returncode == 0
    script = ("import os, subprocess, sys\n"
              "for i in range(int(sys.argv[1])):\n"
              "    os.replace('images/11.png', 'spare.png') if i % 2 == 0 else "
              "os.replace('spare.png', 'images/11.png')\n"
              "    subprocess.run([sys.executable, sys.argv[2], '--dataset', 'images', '--output', 'f.csv',"
              " '--model', 'efficientnet_lite0', '-q'], check=True)\n")
    indexer = subprocess.Popen([sys.executable, "-c", script, "2", str(REPO / "create_imagenet_features.py")],
                               cwd=tmp_path, env=offline_env(tmp_path), stderr=subprocess.PIPE, text=True)
    counts = set()
    searches = 0
    try:
        while indexer.poll() is None or searches < 3:
            result = run_command("imagenet_search.py", "--query", "images/0.png", "--featuresPath", "f.csv",
                                 "--json", "--no-plot", "-n", "20", cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            counts.add(len(json.loads(result.stdout)["results"]))
            searches += 1
    finally:
        indexer.wait(600)
    assert indexer.returncode == 0, indexer.stderr.read()
    assert searches >= 3 and counts <= {11, 12}, (searches, counts)


HELD_CONVERT = """
import signal, sys
sys.path.insert(0, sys.argv[1])
sys.argv = ["convert_features.py", "f.csv", "out.h5"]
import convert_features
from search_utils import cli
from search_utils.store import hdf5_format

real = hdf5_format._write_rows

def held(*args):
    real(*args)
    open("held", "w").close()  # the temporary file exists, part-written
    signal.pause()

hdf5_format._write_rows = held
sys.exit(cli.run(convert_features.main))
"""


def test_a_temporary_file_left_by_a_killed_convert_is_removed_by_the_next_write(tmp_path):
    """kill -9 leaves a write's temporary file (nothing can clean up);
    the next write of the same file, by any command, removes it: nobody
    holds its lock any more."""
    St.save_features(str(tmp_path / "f.csv"), expected("A"))
    St.save_features(str(tmp_path / "out.h5"), expected("B"))
    before = (tmp_path / "out.h5").read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", HELD_CONVERT, str(REPO)], cwd=tmp_path,
                              env=offline_env(tmp_path), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
        while not (tmp_path / "held").exists():
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        writer.kill()
        writer.wait(60)
    (left,) = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left.startswith(".out.h5.") and (tmp_path / "out.h5").read_bytes() == before
    result = run_command("convert_features.py", "f.csv", "out.h5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert St.load_features(str(tmp_path / "out.h5")).paths == expected("A").paths
