"""File-system failures, made for real, through the real commands.

Every OSError the file system can raise while a command reads the dataset,
the query, the features file and its metadata, or writes the lock, the
indexing state or the results picture must reach the user as one line,
`<prog>: error: ...`, naming the file and the reason, with a non-zero exit
and no traceback. Permissions are real: the commands run without root's
file-permission override (conftest.permission_runner), so chmod bites;
where that can't be arranged the permission tests skip and say why.

Each test asserts the whole message it expects: a regression to a poorer
line (Python's "[Errno 13] ..." text, "not found" for a permission
problem, a blocked read) fails.

Also here: which files indexing lists (hidden ones left out, symlinked
folders followed once), through the real command; and the backstop in
cli.run that turns any OSError that escapes into one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, draw_picture, offline_env, permission_runner
from search_utils import catalog, cli
from search_utils.store import FeatureStore, load_features, metadata_path, save_features

INDEX = "create_imagenet_features.py"
SEARCH = "imagenet_search.py"
MODEL = "efficientnet_lite0"  # weights from pip: no download

needs_real_permissions = pytest.mark.skipif(permission_runner()[1] is not None,
                                            reason=permission_runner()[1] or "")


def run(script: str, *args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """conftest.run_as_user with a timeout of our choosing: a command that
    blocks (on a FIFO, say) fails its test instead of hanging the suite."""
    preexec, _ = permission_runner()
    return subprocess.run(
        [sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=offline_env(cwd),
        capture_output=True, encoding="utf-8", errors="surrogateescape", timeout=timeout, preexec_fn=preexec,
    )


def the_line(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """assert_one_line_error, then the line itself (for further checks)."""
    assert_one_line_error(result, *fragments)
    return result.stderr.strip()


def says_permission_denied(line: str) -> bool:
    return "permission denied" in line.lower()


@pytest.fixture
def reopen():
    """chmod given paths back when the test ends, so pytest can delete them."""
    closed: list[tuple[Path, int]] = []
    yield lambda path, mode=0o755: closed.append((path, mode))
    for path, mode in reversed(closed):
        if path.exists() or path.is_symlink():
            path.chmod(mode)


def close(path: Path, reopen, mode: int = 0) -> None:
    reopen(path, 0o755 if path.is_dir() else 0o644)
    path.chmod(mode)


# ---------------------------------------------------------------- a searchable folder, no model needed


@pytest.fixture
def searchable(tmp_path) -> Path:
    """work/imgs/{0,1,2}.png and work/f.csv, a real features file (with
    metadata) holding them, written without a model: a query that is in it
    reuses its row, so searching never builds the model."""
    (tmp_path / "imgs").mkdir()
    paths = []
    for i in range(3):
        draw_picture(i).save(tmp_path / "imgs" / f"{i}.png")
        paths.append(f"imgs/{i}.png")
    features = np.random.default_rng(3).random((3, 1280)).astype(np.float32)
    save_features(str(tmp_path / "f.csv"),
                  FeatureStore(paths, features, {"model": MODEL, "weights": "packaged", "base_dir": str(tmp_path)}))
    return tmp_path


def search(work: Path, query: str = "imgs/0.png", features: str = "f.csv", *extra, timeout: float = 600):
    return run(SEARCH, "--query", query, "--featuresPath", features, "--no-plot", *extra, cwd=work, timeout=timeout)


def test_the_searchable_folder_works(searchable):
    result = search(searchable, "imgs/1.png", "f.csv", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["distance"] == 0.0
    assert "embedded" not in result.stderr  # its row was reused: no model built


# ---------------------------------------------------------------- the dataset


@needs_real_permissions
def test_a_dataset_folder_that_cant_be_listed(searchable, reopen):
    close(searchable / "imgs", reopen)
    result = run(INDEX, "--dataset", "imgs", "--output", "out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    line = the_line(result, "cannot list dataset folder imgs", "permission denied")
    assert "Traceback" not in line and not (searchable / "out.csv").exists()


@needs_real_permissions
def test_a_dataset_folder_behind_a_closed_folder_is_not_called_missing(searchable, reopen):
    (searchable / "closed").mkdir()
    (searchable / "imgs").rename(searchable / "closed" / "imgs")
    close(searchable / "closed", reopen)
    result = run(INDEX, "--dataset", "closed/imgs", "--output", "out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    the_line(result, "closed/imgs", "permission denied on a folder of its path")


@needs_real_permissions
def test_a_dataset_folder_that_can_be_listed_but_not_entered(searchable, reopen):
    """r-- without x: the names can be read, no file can be opened. Each
    file is skipped with the reason, then the run fails: nothing readable."""
    close(searchable / "imgs", reopen, 0o444)
    result = run(INDEX, "--dataset", "imgs", "--output", "out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert sorted(lines[:-1]) == [f"skipping imgs/{i}.png: permission denied (on a folder of its path)"
                                  for i in range(3)]
    assert "none of the 3 image files in imgs could be read" in lines[-1]
    assert not (searchable / "out.csv").exists()


def test_a_dataset_that_is_a_file(searchable):
    result = run(INDEX, "--dataset", "f.csv", "--output", "out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    the_line(result, "dataset is not a folder: f.csv")


# ---------------------------------------------------------------- the query


def _fifo(path: Path) -> None:
    os.mkfifo(path)


QUERY_FAULTS = [
    # (name, how to make it from the work folder, what the line says)
    ("a folder", lambda w: (w / "q.png").mkdir(), "q.png: is a folder, not an image file"),
    ("a FIFO", lambda w: _fifo(w / "q.png"), "q.png: not a regular file (a FIFO, socket or device)"),
    ("a broken symlink", lambda w: (w / "q.png").symlink_to("gone.png"), "q.png: broken symbolic link"),
    ("a symlink loop", lambda w: (w / "q.png").symlink_to("q.png"), "q.png: symbolic link loop"),
    ("missing", lambda w: None, "q.png: file not found"),
    ("a path through a file", lambda w: None, "f.csv/q.png: file not found (a part of its path is a file"),
    ("a name too long", lambda w: None, ": could not be read (file name too long)"),
]


@pytest.mark.parametrize("name, make, message", QUERY_FAULTS, ids=[fault[0] for fault in QUERY_FAULTS])
def test_a_query_that_is_not_a_readable_file(searchable, name, make, message):
    make(searchable)
    query = {"a path through a file": "f.csv/q.png", "a name too long": "q" * 300 + ".png"}.get(name, "q.png")
    result = search(searchable, query, timeout=120)  # a FIFO opened for reading would block
    assert result.returncode == 1 and result.stdout == ""
    the_line(result, message)


@needs_real_permissions
def test_an_unreadable_query(searchable, reopen):
    draw_picture(9).save(searchable / "q.png")
    close(searchable / "q.png", reopen)
    result = search(searchable, "q.png")
    assert result.returncode == 1
    the_line(result, "q.png: permission denied")


@needs_real_permissions
def test_a_query_behind_a_closed_folder(searchable, reopen):
    (searchable / "closed").mkdir()
    draw_picture(9).save(searchable / "closed" / "q.png")
    close(searchable / "closed", reopen)
    result = search(searchable, "closed/q.png")
    assert result.returncode == 1
    the_line(result, "closed/q.png: permission denied (on a folder of its path)")


# ---------------------------------------------------------------- the features file and its metadata


@needs_real_permissions
def test_an_unreadable_features_file(searchable, reopen):
    close(searchable / "f.csv", reopen)
    result = search(searchable)
    assert result.returncode == 1
    line = the_line(result, "f.csv")
    assert says_permission_denied(line) and "Errno" not in line, line


def test_a_features_file_that_is_a_folder(tmp_path):
    (tmp_path / "f.csv").mkdir()
    draw_picture(1).save(tmp_path / "q.png")
    result = search(tmp_path, "q.png")
    assert result.returncode == 1
    the_line(result, "f.csv", "is a folder")


def test_a_features_file_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "f.csv")
    draw_picture(1).save(tmp_path / "q.png")
    result = search(tmp_path, "q.png", timeout=60)  # opening it would block for ever
    assert result.returncode == 1
    the_line(result, "f.csv", "not a regular file")


@needs_real_permissions
def test_a_features_file_behind_a_closed_folder(searchable, reopen):
    (searchable / "closed").mkdir()
    for name in ("f.csv", os.path.basename(metadata_path("f.csv"))):
        (searchable / name).rename(searchable / "closed" / name)
    close(searchable / "closed", reopen)
    result = search(searchable, "imgs/0.png", "closed/f.csv")
    assert result.returncode == 1
    line = the_line(result, "closed/f.csv")
    assert says_permission_denied(line) and "not found" not in line, line


@needs_real_permissions
def test_an_unreadable_metadata_file(searchable, reopen):
    meta = Path(metadata_path(str(searchable / "f.csv")))
    close(meta, reopen)
    result = search(searchable)
    assert result.returncode == 1
    line = the_line(result, meta.name)
    assert says_permission_denied(line) and "Errno" not in line, line


SIDECAR_FIFOS = {
    # name: (the command and its arguments, the line it must say; None: it goes on as if the file were absent)
    "f.csv.meta.json": ((SEARCH, "--query", "imgs/0.png", "--featuresPath", "f.csv", "--no-plot"),
                        "cannot read metadata file f.csv.meta.json: not a regular file (a FIFO, socket or device)"),
    "f.csv.whitening.npz": (("evaluate.py", "f.csv", "--metric", "whitened"),
                            "cannot read whitening file f.csv.whitening.npz: not a regular file (a FIFO, socket or "
                            "device)"),
    "f.csv.meta.json.next": (("convert_features.py", "f.csv", "out.h5"), None),  # a publish that never happened
    "f.csv.whitening.npz.next": (("evaluate.py", "f.csv", "--metric", "whitened"), None),
}


@pytest.mark.parametrize("name", list(SIDECAR_FIFOS))
def test_a_fifo_named_like_a_sidecar_never_blocks_a_reader(searchable, name):
    """Every file beside a features file is checked to be a regular file
    before it is opened: opening a FIFO would block for ever."""
    (command, *args), says = SIDECAR_FIFOS[name]
    if (searchable / name).exists():
        (searchable / name).unlink()
    os.mkfifo(searchable / name)
    result = run(command, *args, cwd=searchable, timeout=120)
    if says is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode == 1
        the_line(result, says)


# ---------------------------------------------------------------- the results picture


@needs_real_permissions
@pytest.mark.parametrize("target", ["--save into a read-only folder", "the default picture, read-only folder"])
def test_a_picture_that_cant_be_written(searchable, reopen, target):
    (searchable / "ro").mkdir()
    if target.startswith("--save"):
        args, cwd, named = ["--save", "ro/results.png"], searchable, "ro/results.png"
    else:  # headless: the picture goes to search_results.png in the working folder
        for name in ("f.csv", os.path.basename(metadata_path("f.csv"))):
            (searchable / name).rename(searchable / "ro" / name)
        args, cwd, named = [], searchable / "ro", "search_results.png"
    close(searchable / "ro", reopen, 0o555)
    result = run(SEARCH, "--query", str(searchable / "imgs" / "0.png"), "--featuresPath", "f.csv", *args, cwd=cwd)
    assert result.returncode != 0
    line = the_line(result, named)
    assert says_permission_denied(line) or "not writable" in line, line


def test_a_picture_into_a_missing_folder(searchable):
    result = run(SEARCH, "--query", "imgs/0.png", "--featuresPath", "f.csv", "--save", "nowhere/results.png",
                 cwd=searchable)
    assert result.returncode != 0
    line = the_line(result, "nowhere")
    assert any(words in line.lower() for words in ("no such", "not exist", "not found", "missing")), line


# ---------------------------------------------------------------- the lock, the state, the weights


@needs_real_permissions
def test_a_lock_file_that_cant_be_opened(searchable, reopen):
    lock = searchable / "out.csv.lock"
    lock.write_text("")
    close(lock, reopen)
    result = run(INDEX, "--dataset", "imgs", "--output", "out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    line = the_line(result, "out.csv.lock")
    assert says_permission_denied(line), line
    assert not (searchable / "out.csv").exists()


@needs_real_permissions
def test_an_output_folder_that_is_read_only(searchable, reopen):
    (searchable / "ro").mkdir()
    close(searchable / "ro", reopen, 0o555)
    result = run(INDEX, "--dataset", "imgs", "--output", "ro/out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    line = the_line(result, "ro/out.csv")
    assert says_permission_denied(line) or "not writable" in line, line


@needs_real_permissions
def test_a_read_only_output_folder_with_a_lock_file_left_in_it(searchable, reopen):
    """The lock file opens (it is writable), so unless the folder is checked
    first, the run gets as far as the indexing state, which can't be created
    there; then the lock can't be deleted either. The line must name the
    real failure (the folder, or the state), not the lock."""
    (searchable / "ro").mkdir()
    (searchable / "ro" / "out.csv.lock").write_text("")
    close(searchable / "ro", reopen, 0o555)
    result = run(INDEX, "--dataset", "imgs", "--output", "ro/out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    line = the_line(result, "ro/out.csv")
    assert says_permission_denied(line), line
    assert not line.rstrip().endswith("out.csv.lock: Permission denied"), line  # the real failure, not the lock


@needs_real_permissions
def test_an_indexing_state_that_cant_be_opened(searchable, reopen):
    state = catalog.state_path(str(searchable / "out.csv"))
    catalog.IndexState.open(state).close()  # a real, empty state file
    close(Path(state), reopen)
    result = run(INDEX, "--dataset", "imgs", "--output", "out.csv", "--model", MODEL, cwd=searchable)
    assert result.returncode == 1
    line = the_line(result, "out.csv.state.sqlite")
    assert says_permission_denied(line) and "delete" not in line, line


@needs_real_permissions
def test_an_unreadable_weights_file(searchable, reopen):
    weights = searchable / "weights.h5"
    weights.write_bytes(b"not read anyway")
    close(weights, reopen)
    result = run(INDEX, "--dataset", "imgs", "--output", "out.csv", "--model", MODEL, "--weights", "weights.h5",
                 cwd=searchable)
    assert result.returncode == 2
    line = the_line(result, "weights.h5")
    assert says_permission_denied(line), line


# ---------------------------------------------------------------- which files are indexed


def test_indexing_leaves_hidden_files_out_and_follows_symlinked_folders_once(tmp_path):
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    (photos / "trip" / ".thumbnails").mkdir(parents=True)
    (elsewhere / "holiday").mkdir(parents=True)
    draw_picture(1).save(photos / "a.jpg")
    draw_picture(2).save(photos / "trip" / "b.jpg")
    draw_picture(2, size=(64, 48)).save(photos / "trip" / ".thumbnails" / "b.jpg")  # a cache: left out
    (photos / "._a.jpg").write_bytes(b"\0\5\26\7 macOS AppleDouble, not an image")  # left out, not 'skipped'
    draw_picture(3).save(elsewhere / "holiday" / "c.jpg")
    (photos / "holiday").symlink_to(elsewhere / "holiday")  # followed
    (photos / "holiday_again").symlink_to(elsewhere / "holiday")  # the same folder: listed once
    (photos / "trip" / "up").symlink_to("..")  # a loop: adds nothing
    result = run(INDEX, "--dataset", "photos", "--output", "f.csv", "--model", MODEL, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("indexed 3 images"), result.stderr  # no skip, no note
    assert "(0 skipped)" in lines[0]
    assert sorted(load_features(str(tmp_path / "f.csv")).paths) == [
        "photos/a.jpg", "photos/holiday/c.jpg", "photos/trip/b.jpg"]


# ---------------------------------------------------------------- cli.run's backstop, in process


@pytest.fixture
def run_in_process(capsys):
    """cli.run(main) here; the SIGTERM handler it installs is put back."""
    previous = signal.getsignal(signal.SIGTERM)

    def call(error: BaseException) -> tuple[int, str]:
        def main(argv):
            raise error

        code = cli.run(main, [])
        return code, capsys.readouterr().err

    yield call
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(
    "error, message",
    [
        (PermissionError(13, "Permission denied", "out/f.csv.lock"), "out/f.csv.lock: Permission denied"),
        (FileNotFoundError(2, "No such file or directory", "new\nline.png"), "new\\nline.png: No such file"),
        (OSError(5, "Input/output error", os.fsdecode(b"caf\xe9.png")), "caf\\xe9.png: Input/output error"),
        (OSError(18, "Invalid cross-device link", "a.tmp", None, "b.csv"), "a.tmp -> b.csv: Invalid cross-device link"),
        (OSError(28, "No space left on device"), "error: No space left on device"),
        (OSError("Unable to open file\n(truncated superblock)"), "error: Unable to open file (truncated superblock)"),
    ],
)
def test_any_os_error_that_escapes_is_one_line(run_in_process, error, message):
    code, err = run_in_process(error)
    assert code == 1
    assert len(err.splitlines()) == 1 and err.endswith("\n") and "Traceback" not in err
    assert ": error: " in err and message in err


def test_a_broken_pipe_is_still_a_quiet_exit(run_in_process):
    assert run_in_process(BrokenPipeError(32, "Broken pipe")) == (0, "")


def test_ctrl_c_is_still_an_interruption(run_in_process):
    code, err = run_in_process(KeyboardInterrupt())
    assert code == cli.EXIT_INTERRUPTED and "interrupted" in err


def test_a_bug_keeps_its_traceback(run_in_process):
    with pytest.raises(ZeroDivisionError):
        run_in_process(ZeroDivisionError("a real bug"))
