"""The files an indexing run writes, and what a run that can't finish leaves:

- every file the run would write (the features file, its sidecars, the
  lock, the indexing state) is checked before the model loads: one line
  naming the file and why, and every earlier file as it was;
- a run that fails before its first checkpoint, where there was no state
  before, leaves nothing behind (a state holding features is never deleted);
- an interrupt while the model loads is one line, no TensorFlow logging;
- a --rebuild killed at any point is finished by the next run;
- a full disk during a commit keeps the checkpoints and says so.

Runs that must not load a model ask for resnet50, whose ImageNet weights
can't be downloaded here (conftest.offline_env): a run that loaded it would
end with that download error (exit 2) instead of the one asserted. Runs
signalled or killed mid-run go through tests/gated_indexer.py, which holds
them at a point the test waits for (never a sleep guess). A full disk is
stood in for by RLIMIT_FSIZE: the kernel refuses writes past the limit
(EFBIG) as a full disk refuses them (ENOSPC), and SQLite reports both as
failed writes.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import create_imagenet_features
from conftest import (
    REPO, assert_one_line_error, counts, draw_picture, embedded, index, offline_env, permission_runner, run_as_user,
    run_command,
)
from gated_indexer import GatedRun
from search_utils import catalog
from search_utils.errors import DatasetError
from search_utils.statedb import DamagedStateError, StateAccessError, StateWriteError, state_error
from search_utils.store import load_features

INDEX = "create_imagenet_features.py"
LITE = ["--model", "efficientnet_lite0"]
HOUR_AGO = time.time() - 3600
# Inside model loading, after TensorFlow started: EfficientNet-Lite0's weights being read into the built model.
LOADING = "search_utils.efficientnet_lite:load_torch_weights"
LOADING_POINT = "load_torch_weights-1"


# -- helpers -----------------------------------------------------------------


def pictures(folder: Path, seeds) -> None:
    """Distinct small pictures `<seed>.png`, dated an hour ago (so the stat
    cache trusts them)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        path = folder / f"{seed}.png"
        draw_picture(seed, size=(64, 64)).save(path)
        os.utime(path, (HOUR_AGO, HOUR_AGO))


def files_in(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `folder` but the test's own (the gate folder, the
    subprocesses' Keras config in keras_home): bytes, mtime, permissions."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] in ("gate", "keras_home") or path.is_dir():
            continue
        info = path.stat()
        content = path.read_bytes() if path.is_file() else None  # reading a FIFO would block
        found[str(rel)] = (content, info.st_mtime_ns, info.st_mode)
    return found


def features_files(work: Path, output: str = "f.csv") -> dict[str, tuple[bytes, int, int]]:
    """The features file and its sidecars, as files_in shows them."""
    names = {output, f"{output}.meta.json", f"{output}.whitening.npz"}
    return {name: value for name, value in files_in(work).items() if name in names}


def assert_same_features(output: Path, reference: Path) -> None:
    ours, clean = load_features(str(output)), load_features(str(reference))
    assert ours.paths == clean.paths
    np.testing.assert_allclose(ours.features, clean.features, rtol=1e-5, atol=1e-6)


def clean_run(capsys, dataset: str = "images") -> Path:
    index(capsys, "--dataset", dataset, "--output", "clean.csv", *LITE)
    return Path("clean.csv")


def run_with_file_size_limit(limit: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    """The command with writes past `limit` bytes of any file refused by the
    kernel (RLIMIT_FSIZE; Python ignores the SIGXFSZ that comes with it)."""
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(REPO / INDEX), *map(str, args)], cwd=cwd, env=offline_env(cwd),
                          capture_output=True, text=True, timeout=600, preexec_fn=limited)


def a_state_with_features(output: Path, count: int = 3) -> None:
    """A real indexing state holding `count` checkpointed features."""
    with catalog.IndexState.open(catalog.state_path(str(output))) as state:
        state.add_contents({f"h{i}": np.full(1280, i, np.float32) for i in range(count)}, {})


# -- 1. an output that can't be written: one line, before the model -----------


def _folder_in_the_way(work: Path, name: str) -> None:
    (work / name).mkdir()


UNWRITABLE = {
    "missing folder": ("missing/f.csv", lambda w: None,
                       ["features file missing/f.csv", "folder missing does not exist"]),
    "a file where the folder should be": ("afile/sub/f.csv", lambda w: (w / "afile").write_text("a file\n"),
                                          ["features file afile/sub/f.csv", "afile is a file, not a folder"]),
    "a folder named like the output": ("f.csv", lambda w: _folder_in_the_way(w, "f.csv"),
                                       ["features file f.csv", "it is a folder"]),
    "a folder named like the metadata": ("f.csv", lambda w: _folder_in_the_way(w, "f.csv.meta.json"),
                                         ["f.csv.meta.json", "it is a folder"]),
    "a folder named like the lock": ("f.csv", lambda w: _folder_in_the_way(w, "f.csv.lock"),
                                     ["lock file f.csv.lock", "it is a folder"]),
    "a folder named like the state": ("f.csv", lambda w: _folder_in_the_way(w, "f.csv.state.sqlite"),
                                      ["indexing state f.csv.state.sqlite", "it is a folder"]),
    "a folder named like the state's journal": ("f.csv", lambda w: _folder_in_the_way(w, "f.csv.state.sqlite-wal"),
                                                ["indexing state f.csv.state.sqlite-wal", "it is a folder"]),
}


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_an_output_that_cant_be_written_is_one_line_before_the_model_loads(work, case):
    output, arrange, fragments = UNWRITABLE[case]
    pictures(work / "images", range(2))
    (work / "earlier.csv").write_text("an earlier file\n")
    arrange(work)
    before = files_in(work)
    result = run_as_user(INDEX, "--dataset", "images", "--output", output, cwd=work)  # resnet50: would fail offline
    assert_one_line_error(result, *fragments)
    assert result.returncode == 1, result.stderr
    assert files_in(work) == before  # nothing made (no lock, no state), nothing changed


def _read_only_folder(work: Path) -> str:
    out = work / "out"
    out.mkdir()
    (out / "f.csv").write_text("images/0.png,1.0\n")  # as an earlier run left them
    a_state_with_features(out / "f.csv")
    out.chmod(0o555)
    return "out/f.csv"


def _read_only_state(work: Path) -> str:
    a_state_with_features(work / "f.csv")
    Path(catalog.state_path("f.csv")).chmod(0o444)
    return "f.csv"


def _read_only_lock(work: Path) -> str:
    (work / "f.csv.lock").write_text("process 1")  # left by a run killed -9, then made read-only
    (work / "f.csv.lock").chmod(0o444)
    return "f.csv"


PERMISSIONS = {
    "read-only folder": (_read_only_folder, ["features file out/f.csv", "can't create files in folder out",
                                             "Permission denied"]),
    "read-only state": (_read_only_state, ["indexing state f.csv.state.sqlite", "Permission denied"]),
    "read-only lock": (_read_only_lock, ["lock file f.csv.lock", "Permission denied"]),
}


@pytest.mark.parametrize("case", list(PERMISSIONS))
def test_a_file_without_write_permission_is_one_line_before_the_model_loads(work, case):
    """Real permissions: as root the run drops CAP_DAC_OVERRIDE first
    (conftest.run_as_user), so chmod stops it as it stops any user."""
    why_not = permission_runner()[1]
    if why_not:
        pytest.skip(why_not)
    arrange, fragments = PERMISSIONS[case]
    pictures(work / "images", range(2))
    output = arrange(work)
    before = files_in(work)
    try:
        result = run_as_user(INDEX, "--dataset", "images", "--output", output, cwd=work)
    finally:
        if (work / "out").exists():
            (work / "out").chmod(0o755)  # for the clean-up
    assert_one_line_error(result, *fragments)
    assert result.returncode == 1, result.stderr
    assert files_in(work) == before


@pytest.mark.parametrize("limit, fragments", [
    (4, ["cannot write lock file f.csv.lock", "File too large"]),  # "process N" doesn't fit
    (200, ["indexing state f.csv.state.sqlite could not be written", "free some space and run again"]),
], ids=["lock", "state"])
def test_a_full_disk_while_creating_the_lock_or_state_is_one_line_and_leaves_nothing(work, limit, fragments):
    pictures(work / "images", range(2))
    (work / "earlier.csv").write_text("an earlier file\n")
    before = files_in(work)
    result = run_with_file_size_limit(limit, "--dataset", "images", "--output", "f.csv", cwd=work)  # resnet50
    assert_one_line_error(result, *fragments)
    assert result.returncode == 1 and "--rebuild" not in result.stderr, result.stderr
    assert files_in(work) == before  # no lock file, no state, no journal left


# -- 2. a run that fails before its first checkpoint writes nothing -----------


def test_a_run_whose_model_cant_load_writes_nothing(work):
    pictures(work / "images", range(2))
    before = files_in(work)
    result = run_command(INDEX, "--dataset", "images", "--output", "f.csv", cwd=work)  # resnet50, offline
    assert_one_line_error(result, "could not download the ImageNet weights of resnet50")
    assert result.returncode == 2
    assert files_in(work) == before  # no state, no lock


def test_a_run_that_reads_no_image_writes_nothing(work, builds):
    (work / "images").mkdir()
    (work / "images/empty.png").write_bytes(b"")
    (work / "images/notes.jpg").write_text("not an image\n")
    before = files_in(work)
    with pytest.raises(DatasetError, match="none of the 2 image files .* could be read; nothing written"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "-q"])
    assert files_in(work) == before


def test_a_failed_run_keeps_a_state_that_holds_features(work, capsys, builds):
    pictures(work / "images", range(3))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    written = features_files(work)
    for path in (work / "images").iterdir():
        path.write_bytes(b"no longer an image")
    with pytest.raises(DatasetError, match="none of the 3"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "-q"])
    assert catalog.count_checkpointed("f.csv") == 3
    assert features_files(work) == written


# -- 3. an interrupt while the model loads is one line --------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupt_while_the_model_loads_is_one_line(work, signum):
    """Held inside model loading, TensorFlow started (its C++ start-up lines
    are written by then), the run is interrupted: one line, nothing left."""
    pictures(work / "images", range(3))
    before = files_in(work)
    with GatedRun(work / "gate", ["--dataset", "images", "--output", "f.csv", *LITE, "-q"], cwd=work,
                  env=offline_env(work), gate_before=[LOADING], hold=[LOADING_POINT]) as run:
        run.wait_for(LOADING_POINT)
        run.send(signum)
        assert run.wait() == 130, run.stderr
        stderr = run.stderr
    assert stderr.splitlines() == [(f"{INDEX}: error: interrupted before any image was embedded: nothing was "
                                    f"written; run the same command again")], stderr
    assert files_in(work) == before


# -- 4. a killed --rebuild is finished by the next run ----------------------------


def rebuild_run(work: Path, *options, hold: str, gate_before=()) -> GatedRun:
    """The run's temporary files go to work/tmp."""
    (work / "tmp").mkdir(exist_ok=True)
    env = offline_env(work) | {"TMPDIR": str(work / "tmp")}
    return GatedRun(work / "gate", ["--dataset", "images", "--output", "f.csv", *LITE, "--rebuild",
                                    "--batch-size", "4", "-q", *options],
                    cwd=work, env=env, hold=[hold], gate_before=gate_before)


def test_a_rebuild_killed_while_its_model_loads_is_finished_by_the_next_run(work, capsys, builds):
    pictures(work / "images", range(6))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    features_file = features_files(work)
    with rebuild_run(work, hold=LOADING_POINT, gate_before=[LOADING]) as run:
        run.wait_for(LOADING_POINT)  # the rebuild is asked for, nothing forgotten yet
        run.send(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
    assert features_files(work) == features_file
    assert catalog.count_checkpointed("f.csv") == 6  # nothing forgotten before the model was there

    builds.clear()
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)  # no --rebuild
    assert "an earlier --rebuild of f.csv was stopped before it began: finishing it" in stderr
    assert counts(stderr) == (6, 0, 0, 0, 0, 0) and embedded(stderr) == 6 and builds == ["efficientnet_lite0"]
    assert_same_features(work / "f.csv", clean_run(capsys))
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert "nothing to embed" in stderr and "rebuild" not in stderr  # done: the mark is gone


def test_a_rebuild_killed_part_way_resumes_on_the_next_run(work, capsys, builds):
    """Also: the killed run leaves nothing in its temporary folder (autograph
    would leave the source it generated for the model call, removed only at
    a normal exit)."""
    pictures(work / "images", range(12))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    features_file = features_files(work)
    with rebuild_run(work, hold="batch-1") as run:
        run.wait_for("batch-1")  # the state was reset, one batch of 4 embedded again and checkpointed
        run.send(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
    assert catalog.count_checkpointed("f.csv") == 4
    assert features_files(work) == features_file
    assert not list((work / "tmp").iterdir())

    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert "resuming an unfinished --rebuild: 4 images were embedded already" in stderr
    assert counts(stderr) == (12, 0, 0, 0, 0, 0) and embedded(stderr) == 8
    assert_same_features(work / "f.csv", clean_run(capsys))


def test_an_interrupted_rebuild_resumes_when_the_same_command_runs_again(work, capsys, builds):
    """"run the same command again to resume" holds for --rebuild too: the
    rebuild under way goes on, it doesn't start over."""
    pictures(work / "images", range(12))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    with rebuild_run(work, hold="batch-1") as run:
        run.wait_for("batch-1")
        run.send(signal.SIGINT)
        assert run.wait() == 130, run.stderr
        stderr = run.stderr
    assert stderr.splitlines() == [(f"{INDEX}: error: interrupted: 4 of 12 images embedded and checkpointed; "
                                    f"run the same command again to resume")], stderr

    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE, "--rebuild")
    assert "resuming an unfinished --rebuild: 4 images were embedded already" in stderr
    assert embedded(stderr) == 8
    assert_same_features(work / "f.csv", clean_run(capsys))


def test_an_unfinished_rebuild_to_another_model_is_not_mixed_with_the_old_one(work, capsys, builds,
                                                                             random_weights_file):
    pictures(work / "images", range(8))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    args = ["--dataset", "images", "--output", "f.csv", "--weights", random_weights_file, "--rebuild",
            "--batch-size", "4", "-q"]  # resnet50, random weights
    with GatedRun(work / "gate", args, cwd=work, env=offline_env(work), hold=["batch-1"]) as run:
        run.wait_for("batch-1")
        run.send(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
    assert catalog.count_checkpointed("f.csv") == 4  # resnet50's first batch
    before = features_files(work)
    refused = run_command(INDEX, "--dataset", "images", "--output", "f.csv", *LITE, cwd=work)
    assert_one_line_error(refused, "unfinished --rebuild with resnet50", "run that command again",
                          "--rebuild to start again with efficientnet_lite0")
    assert features_files(work) == before and catalog.count_checkpointed("f.csv") == 4


# -- 5. a full disk during a commit keeps the checkpoints ----------------------------


def test_a_full_disk_during_a_commit_keeps_the_checkpoints_and_says_so(work, capsys, builds):
    pictures(work / "images", range(6))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    features_file = features_files(work)
    pictures(work / "images", range(6, 40))
    room = os.path.getsize(catalog.state_path("f.csv")) + 100_000  # a few batches' worth of journal
    result = run_with_file_size_limit(room, "--dataset", "images", "--output", "f.csv", *LITE,
                                      "--batch-size", "4", "-q", cwd=work)
    kept = catalog.count_checkpointed("f.csv")
    assert 6 < kept < 40, (kept, result.stderr)  # some of this run's batches were committed
    assert_one_line_error(result, "indexing state f.csv.state.sqlite could not be written",
                          f"free some space and run again: the {kept} checkpointed images are kept")
    assert "--rebuild" not in result.stderr and "delete" not in result.stderr
    assert features_files(work) == features_file

    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)  # space again
    assert f"resuming an unfinished run: {kept - 6} images were embedded already" in stderr
    assert embedded(stderr) == 40 - kept
    assert_same_features(work / "f.csv", clean_run(capsys))


def _sqlite_error(connection: sqlite3.Connection, sql: str, parameters=()) -> sqlite3.Error:
    with pytest.raises(sqlite3.Error) as caught:
        connection.execute(sql, parameters)
    return caught.value


def test_each_state_error_says_what_to_do(tmp_path):
    """SQLite's own errors, produced for real, and the advice each gets."""
    output = tmp_path / "f.csv"
    a_state_with_features(output, 3)
    path = catalog.state_path(str(output))
    with sqlite3.connect(path) as db:  # a database that may not grow: SQLITE_FULL
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        full = _sqlite_error(db, "INSERT INTO contents VALUES ('big', ?, NULL)", (b"\0" * 100_000,))
    assert full.sqlite_errorname == "SQLITE_FULL"
    error = state_error(path, full)
    assert isinstance(error, StateWriteError)
    assert str(error).endswith("free some space and run again: the 3 checkpointed images are kept")

    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        read_only = _sqlite_error(db, "DELETE FROM contents")
    error = state_error(path, read_only)
    assert isinstance(error, StateAccessError) and "permissions" in str(error) and "--rebuild" not in str(error)

    garbage = tmp_path / "g.sqlite"
    garbage.write_bytes(b"not a database" * 100)
    with sqlite3.connect(garbage) as db:
        damaged = _sqlite_error(db, "SELECT * FROM contents")
    error = state_error(str(garbage), damaged)
    assert isinstance(error, DamagedStateError) and "pass --rebuild" in str(error)


# -- 6. the state's parts ------------------------------------------------------------


def test_a_rebuild_is_recorded_until_its_run_is_published(tmp_path):
    output = str(tmp_path / "f.csv")
    with catalog.IndexState.open(catalog.state_path(output)) as state:
        state.set_identity({"model": "m"})
        state.add_contents({"a": np.ones(4, np.float32)}, {"b": "unreadable"})
        state.remember_files([("x.png", catalog.FileRecord(1, 2, 3, "a"))])
        state.publish({"x.png": "a"}, {"files": []})
        assert state.rebuild is None

        assert state.request_rebuild() is None
        assert state.rebuild == catalog.REBUILD_REQUESTED and state.holds_features()  # nothing forgotten yet
        state.reset()
        assert state.rebuild == catalog.REBUILD_STARTED
        assert (state.identity, state.written, state.catalogue(), state.known_contents(), state.stat_cache()) == (
            None, None, {}, {}, {})
        state.add_contents({"a": np.ones(4, np.float32)}, {})
        state.publish({"x.png": "a"}, {"files": []})
        assert state.rebuild is None
    with catalog.IndexState.open(catalog.state_path(output)) as state:  # all of it committed
        assert state.catalogue() == {"x.png": "a"} and state.rebuild is None


def test_only_a_state_without_features_is_discarded(tmp_path):
    with_features, empty, damaged = (str(tmp_path / name) for name in ("a.csv", "b.csv", "c.csv"))
    a_state_with_features(Path(with_features), 1)
    catalog.IndexState.open(catalog.state_path(empty)).close()
    Path(catalog.state_path(damaged)).write_bytes(b"not a database" * 100)
    assert not catalog.discard_if_empty(with_features) and catalog.count_checkpointed(with_features) == 1
    assert catalog.discard_if_empty(empty) and not catalog.state_exists(empty)
    assert not catalog.discard_if_empty(damaged) and catalog.state_exists(damaged)  # can't tell: kept


# -- 7. files in the way that are not this tool's, or not files ---------------------


def run_refused(work: Path, *args) -> subprocess.CompletedProcess:
    """The command as a user runs it (resnet50: a run that got as far as
    the model would end with its download error instead); a run that
    blocks fails the test instead of hanging the suite."""
    return subprocess.run([sys.executable, str(REPO / INDEX), "--dataset", "images", *map(str, args)], cwd=work,
                          env=offline_env(work), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name, fragment", [
    ("f.csv.meta.json.next", "cannot write f.csv.meta.json.next: not a regular file (a FIFO, socket or device)"),
    ("f.csv.state.sqlite-journal", "cannot write indexing state f.csv.state.sqlite-journal: not a regular file"),
    ("f.csv.whitening.npz", "cannot write f.csv.whitening.npz: not a regular file"),
    ("f.csv.lock", "cannot write lock file f.csv.lock: not a regular file"),
])
def test_a_fifo_named_like_a_file_of_the_run_is_refused_without_blocking(work, name, fragment):
    """Opening a FIFO blocks until someone writes into it: the run (or
    SQLite, deaf to SIGTERM) would hang for ever. It is refused first."""
    pictures(work / "images", range(2))
    os.mkfifo(work / name)
    before = files_in(work)
    result = run_refused(work, "--output", "f.csv")
    assert_one_line_error(result, fragment)
    assert result.returncode == 1
    assert files_in(work) == before and stat_is_fifo(work / name)


def stat_is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


@pytest.mark.parametrize("output, arrange, why, options", [
    ("labels.csv", lambda p: p.write_text("path,label\nimages/0.png,cat\n"),
     "its first row (path,label) is not an image path followed by numbers", []),
    ("notes.h5", lambda p: p.write_text("my notes\n"), "its first row (my notes) has no feature values after the path",
     ["--rebuild"]),
    ("picture.csv", lambda p: draw_picture(3, size=(64, 48)).save(p, format="PNG"),
     "binary data, neither the CSV nor the HDF5 format", []),
], ids=["labels", "text-named-h5-with-rebuild", "picture"])
def test_an_existing_file_that_is_not_a_features_file_is_never_replaced(work, output, arrange, why, options):
    pictures(work / "images", range(2))
    arrange(work / output)
    before = files_in(work)
    result = run_refused(work, "--output", output, *options)
    assert_one_line_error(result, f"cannot write features file {output}: it exists and is not a features file "
                                  f"({why}); only a features file is replaced")
    assert files_in(work) == before  # no lock, no state: the user's file is as it was


def test_a_name_too_long_for_the_files_beside_it_is_refused_before_the_model_loads(work, capsys, builds):
    """The state's journal adds 21 bytes to the output's name: with them the
    name must fit the file system's limit (255). Temporary files are named
    to fit, so a name as long as that allows is written in full."""
    pictures(work / "images", range(3))  # 3: a whitening is stored too
    longest = "c" * 230 + ".csv"  # 234 bytes: + ".state.sqlite-journal" = 255
    too_long = "c" * 236 + ".csv"
    before = files_in(work)
    result = run_refused(work, "--output", too_long)
    assert_one_line_error(result, "its name is too long: the indexing state's journal, named like it with "
                                  "'.state.sqlite-journal' added, would be 261 bytes, over the 255 the file system "
                                  "allows; use a name of at most 234 bytes")
    assert files_in(work) == before
    index(capsys, "--dataset", "images", "--output", longest, *LITE)
    assert len(load_features(longest)) == 3 and load_features(longest).whitening_arrays is not None
    assert not [p for p in work.iterdir() if p.name.endswith((".tmp", ".next"))]


def test_another_programs_database_at_the_state_is_never_changed(work, builds):
    pictures(work / "images", range(2))
    path = Path(catalog.state_path("f.csv"))
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (text)")
        db.execute("INSERT INTO notes VALUES ('mine')")
    db.close()
    before = files_in(work)
    for options in ([], ["--rebuild"]):
        with pytest.raises(catalog.ForeignStateError,
                           match=r"f.csv.state.sqlite is not an indexing state of this tool \(an SQLite database "
                                 r"with the tables notes\): it is left as it is, even by --rebuild"):
            create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "-q", *options])
        assert files_in(work) == before and builds == []


def test_an_empty_state_is_no_state_and_the_features_file_keeps_its_model(work, builds):
    """A 0-byte state records nothing: the features file's own metadata
    decides, as when there is no state at all."""
    from search_utils.errors import ModelMismatchError
    from search_utils.store import FeatureStore, save_features

    pictures(work / "images", range(2))
    save_features("f.csv", FeatureStore(["images/0.png"], np.ones((1, 1280), np.float32),
                                        {"model": "efficientnetv2_b0"}))
    Path(catalog.state_path("f.csv")).write_bytes(b"")
    before = files_in(work)
    with pytest.raises(ModelMismatchError, match="made with efficientnetv2_b0, this run would make "
                                                 "efficientnet_lite0 ones"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "-q"])
    assert files_in(work) == before and builds == []


def _garble_meta(output: str) -> None:
    with sqlite3.connect(catalog.state_path(output)) as db:
        db.execute("UPDATE meta SET value = '{garbage'")
    db.close()


def _bad_value(value: float):
    def damage(output: str) -> None:
        with sqlite3.connect(catalog.state_path(output)) as db:
            digest, blob = db.execute("SELECT hash, features FROM contents WHERE features IS NOT NULL "
                                      "ORDER BY hash LIMIT 1").fetchone()
            vector = np.frombuffer(blob, "<f4").copy()
            vector[6] = value
            db.execute("UPDATE contents SET features = ? WHERE hash = ?", (vector.tobytes(), digest))
        db.close()
        os.unlink(output)  # written again from the state: its rows are read
    return damage


@pytest.mark.parametrize("damage, says", [
    (_garble_meta, r"is damaged \(its record of schema is not valid JSON\)"),
    (_bad_value(np.nan), r"value 7 of 1280 stored for images/\d.png is nan, not a finite number"),
    (_bad_value(1e30), r"value 7 of 1280 stored for images/\d.png is 1e\+30, beyond any model's values"),
], ids=["meta-not-json", "nan", "1e30"])
def test_damaged_content_in_the_state_is_one_line_and_rebuild_starts_afresh(work, capsys, builds, damage, says):
    """Features read back from the state are checked as a features file's
    are, before anything is written; --rebuild gets past any of it."""
    pictures(work / "images", range(3))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    damage("f.csv")
    before = features_files(work)
    with pytest.raises(DamagedStateError, match=says + r".*run again with --rebuild"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "-q"])
    assert features_files(work) == before
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE, "--rebuild")
    assert counts(stderr) == (3, 0, 0, 0, 0, 0)
    assert_same_features(work / "f.csv", clean_run(capsys))


def test_a_full_disk_while_writing_the_ann_index_names_it_and_says_the_features_are_written(work, capsys, builds):
    pictures(work / "images", range(16))  # the fewest rows an index is built for
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    features_file = features_files(work)
    room = max(path.stat().st_size for path in work.iterdir() if path.is_file()) + 100_000  # not the index's 1 MB
    result = run_with_file_size_limit(room, "--dataset", "images", "--output", "f.csv", *LITE, "-q",
                                      "--ann-threshold", "1", cwd=work)  # nothing to embed: no model
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"{INDEX}: error: the features file f.csv is written, but its approximate-search index f.csv.ann could "
        f"not be (File too large): searches scan every row until it is; free some space and run the same "
        f"command again")
    assert features_files(work) == features_file
    assert not [p.name for p in work.iterdir() if p.name.endswith((".ann", ".tmp"))]


def test_file_names_in_messages_are_shown_on_one_line(work, capsys, builds):
    from search_utils.errors import FeaturesFileError
    from search_utils.locking import OutputLockedError, exclusive_output

    pictures(work / "images", range(1))
    (work / "re").mkdir()
    stderr = index(capsys, "--dataset", "images", "--output", "re/x\ny.csv", *LITE)
    assert stderr.strip().splitlines()[-1].startswith("indexed 1 images with efficientnet_lite0 into re/x\\ny.csv: ")
    for output, says in (("a\nb.txt", r"features file a\\nb.txt has extension '.txt'"),
                         (os.fsdecode(b"caf\xe9.txt"), r"features file caf\\xe9.txt has extension"),
                         ("no\ndir/a.csv", r"features file no\\ndir/a.csv: folder no\\ndir does not exist")):
        with pytest.raises(FeaturesFileError, match=says):
            create_imagenet_features.main(["--dataset", "images", "--output", output, *LITE, "-q"])
    with exclusive_output("re/x\ny.csv"):
        with pytest.raises(OutputLockedError, match=r"^re/x\\ny.csv is being written by process \d+;"):
            create_imagenet_features.main(["--dataset", "images", "--output", "re/x\ny.csv", *LITE, "-q"])


@pytest.mark.parametrize("make, says", [
    (lambda w: (w / "weights").mkdir(), "weights file weights is a folder, not a weights file"),
    (lambda w: os.mkfifo(w / "weights"), "weights file weights is not a regular file (a FIFO, socket or device)"),
    (lambda w: None, "weights file not found: weights"),
], ids=["folder", "fifo", "missing"])
def test_a_weights_file_that_is_not_a_file_says_what_it_is(work, builds, make, says):
    from search_utils.errors import WeightsUnavailableError

    pictures(work / "images", range(1))
    make(work)
    with pytest.raises(WeightsUnavailableError, match=re.escape(says)):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", "--weights", "weights", "-q"])
    assert builds == []
