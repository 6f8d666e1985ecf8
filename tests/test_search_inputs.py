"""What imagenet_search.py does with the inputs a hostile audit tried: a
picture name that is one of the user's files, collections whose whitening
can't be learned, hand-edited metadata, a broken environment (MPLBACKEND,
an unreachable display), a query that changed or vanished since it was
indexed, a collection moved with its index, and odd option values.

One small collection is indexed once for the module with the real command
(efficientnet_lite0, offline); other features files are written directly
(no model). Queries are indexed images unless a test says otherwise, so
no model loads. The real command runs in a subprocess where the process
matters (stderr, the environment, the exit code); variants of one check
run in process (`in_process`), which is the same `main`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import zlib

import numpy as np
import pytest
from conftest import assert_one_line_error, draw_picture, offline_env, run_command
from PIL import Image

from search_utils import cli, plot
from search_utils import store as St
from search_utils.engine import whitening_arrays
from search_utils.result_paths import path_base
from search_utils.searcher import features_file_at, naming_the_file

INDEX, SEARCH = "create_imagenet_features.py", "imagenet_search.py"
MODEL = {"model": "efficientnet_lite0", "feature_dim": 1280, "weights": "packaged"}
NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """`imgs/` (five pictures) indexed from this folder into f.csv: the
    metadata (base_dir: this folder), the whitening and the indexing state
    beside it."""
    work = tmp_path_factory.mktemp("work")
    (work / "imgs").mkdir()
    for seed, name in enumerate(NAMES):
        draw_picture(70 + seed).save(work / "imgs" / name)
    result = run_command(INDEX, "--dataset", "imgs", "--output", "f.csv", "--model", "efficientnet_lite0", "-q",
                         cwd=work)
    assert result.returncode == 0, result.stderr
    assert (work / "f.csv.state.sqlite").exists() and (work / "f.csv.whitening.npz").exists()
    return work


def search(cwd, *args, query="imgs/a.png", features="f.csv", env=None):
    return run_command(SEARCH, "--query", query, "--featuresPath", features, *args, cwd=cwd, env=env)


@pytest.fixture
def in_process(monkeypatch, capsys):
    """imagenet_search's main run in this process, as cli.run runs it:
    (exit code, stdout, stderr). No display, whatever this machine has."""
    import imagenet_search

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    previous = signal.getsignal(signal.SIGTERM)  # cli.run installs its own

    def run(cwd, *args):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = cli.run(imagenet_search.main, [str(arg) for arg in args])
        except SystemExit as stop:  # usage errors
            code = stop.code
        finally:
            signal.signal(signal.SIGTERM, previous)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def distances(result) -> list[float]:
    assert result.returncode == 0, result.stderr
    return [hit["distance"] for hit in json.loads(result.stdout)["results"]]


def write_features(folder, feats, names=None, whitened=False, metadata=None):
    """f.csv in `folder`, written directly (no model), with real image files
    under `folder` for its rows (a query must exist)."""
    names = names or [f"imgs/{i}.png" for i in range(len(feats))]
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        draw_picture(200 + i, size=(32, 32)).save(folder / name)
    meta = {**MODEL, "base_dir": str(folder), **(metadata or {})}
    St.save_features(str(folder / "f.csv"), St.FeatureStore(names, np.asarray(feats, np.float32), meta,
                                                            whitening_arrays(feats) if whitened else None))
    return folder / "f.csv"


# ------------------------------------------------ 1. the picture never replaces the user's files


def test_save_over_a_features_file_named_like_a_picture_is_refused(work, tmp_path):
    """The audit's case: a features file called feat.png, --save feat.png."""
    shutil.copy(work / "f.csv", tmp_path / "feat.png")
    shutil.copy(work / "f.csv.meta.json", tmp_path / "feat.png.meta.json")
    before = (tmp_path / "feat.png").read_bytes()
    result = search(tmp_path, "--save", "feat.png", query=work / "imgs" / "a.png", features="feat.png")
    assert_one_line_error(result, "cannot save the picture to feat.png: it is the features file feat.png")
    assert result.returncode == 1 and result.stdout == ""  # refused before the search
    assert (tmp_path / "feat.png").read_bytes() == before


@pytest.mark.parametrize("link, target, says", [
    ("out.png", "f.csv", "it is the features file {work}/f.csv"),
    ("search_results.png", "f.csv", "it is the features file {work}/f.csv; there is no display to show it"),
    ("meta.png", "f.csv.meta.json", "it is the metadata file of {work}/f.csv"),
    ("state.png", "f.csv.state.sqlite", "it is the indexing state of {work}/f.csv"),
    ("white.png", "f.csv.whitening.npz", "it is the whitening file of {work}/f.csv"),
])
def test_a_picture_linked_to_the_features_files_is_refused(work, tmp_path, link, target, says):
    (tmp_path / link).symlink_to(work / target)
    before = (work / target).read_bytes()
    save = [] if link == "search_results.png" else ["--save", link]  # the default picture on a headless box
    result = search(tmp_path, *save, query=work / "imgs" / "a.png", features=work / "f.csv")
    assert_one_line_error(result, f"cannot save the picture to {link}: " + says.format(work=work))
    assert result.stdout == "" and (work / target).read_bytes() == before


def test_the_features_files_and_their_temporaries_are_recognised(work, tmp_path):
    features = str(work / "f.csv")
    for name in ("f.csv", "f.csv.meta.json", "f.csv.meta.json.next", "f.csv.whitening.npz.next", "f.csv.ann",
                 "f.csv.state.sqlite-wal", "f.csv.state.sqlite-shm", "f.csv.lock", ".f.csv.3xk_q9.tmp",
                 ".f.csv.meta.json.a1b2c3.tmp"):
        assert features_file_at(str(work / name), features), name
    os.link(work / "f.csv", tmp_path / "hard.png")  # another name for the same bytes
    assert features_file_at(str(tmp_path / "hard.png"), features) == f"the features file {features}"
    for name in ("f.csv.png", "g.csv", ".f.csv.tmp.png", "f.csv.meta.json.png"):
        assert features_file_at(str(work / name), features) is None, name


def test_save_over_an_indexed_image_is_refused(work, tmp_path):
    before = (work / "imgs" / "b.png").read_bytes()
    result = search(work, "--save", "imgs/b.png")
    assert_one_line_error(result, "cannot save the picture to imgs/b.png: it is an indexed image of f.csv "
                                  "(imgs/b.png)")
    assert result.stdout == "" and (work / "imgs" / "b.png").read_bytes() == before


@pytest.mark.parametrize("how", ["symlink", "hard link", "spelled otherwise"])
def test_save_over_an_indexed_image_under_another_name_is_refused(work, tmp_path, in_process, how):
    picture = tmp_path / "picture.png"
    if how == "symlink":
        picture.symlink_to(work / "imgs" / "c.png")
    elif how == "hard link":
        os.link(work / "imgs" / "c.png", picture)
    else:
        picture = work / "imgs" / ".." / "imgs" / "c.png"
    before = (work / "imgs" / "c.png").read_bytes()
    code, out, err = in_process(work, "--query", "imgs/a.png", "--featuresPath", "f.csv", "--save", picture)
    assert code == 1 and out == ""
    one_error_line(err, "it is an indexed image of f.csv (imgs/c.png)")
    assert (work / "imgs" / "c.png").read_bytes() == before


# ------------------------------------------------ 2. whitening that can't be learned, zero vectors


def test_whitened_search_of_a_one_image_collection(tmp_path):
    write_features(tmp_path, np.random.default_rng(1).gamma(0.5, 1, (1, 1280)))
    result = search(tmp_path, "--metric", "whitened", "--json", query="imgs/0.png")
    assert distances(result) == [pytest.approx(0.0, abs=1e-6)]  # float32 rounding, not 1.0
    assert "Warning" not in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0] == ("note: no whitening can be learned from one image: comparing the "
                                             "signed-square-root, L2-normalised features by cosine, without whitening")


def test_whitened_search_of_identical_images_is_clean(tmp_path):
    """Two copies of one picture: no whitening stored (too few), none can be
    learned (nothing varies), no NumPy warning, each found at distance 0."""
    row = np.random.default_rng(2).gamma(0.5, 1, 1280)
    write_features(tmp_path, [row, row])
    result = search(tmp_path, "--metric", "whitened", "--json", "--keep-duplicates", query="imgs/0.png")
    assert distances(result) == [pytest.approx(0.0, abs=1e-6)] * 2
    assert "Warning" not in result.stderr and "re-index" not in result.stderr, result.stderr
    assert "no whitening can be learned from 2 images whose features are all the same" in result.stderr


@pytest.mark.parametrize("metric", ["cosine", "whitened"])
def test_a_zero_vector_is_at_distance_0_from_itself(tmp_path, metric):
    write_features(tmp_path, np.zeros((3, 1280)), whitened=True)
    result = search(tmp_path, "--metric", metric, "--json", "--keep-duplicates", "-n", "3", query="imgs/1.png")
    assert distances(result) == [0.0, 0.0, 0.0]
    assert "Warning" not in result.stderr, result.stderr


# ------------------------------------------------ 3. hand-edited and damaged files


@pytest.mark.parametrize("base_dir", [5, ["x"], "relative/folder"])
def test_a_base_dir_that_is_not_a_folder_path_is_ignored_with_a_note(work, tmp_path, base_dir):
    shutil.copy(work / "f.csv", tmp_path / "f.csv")
    meta = json.loads((work / "f.csv.meta.json").read_text())
    (tmp_path / "f.csv.meta.json").write_text(json.dumps({**meta, "base_dir": base_dir}))
    shutil.copytree(work / "imgs", tmp_path / "imgs")  # relative paths: from the current folder, then
    result = search(tmp_path, "--json", "--no-plot")
    assert distances(result)[0] == 0.0
    assert json.loads(result.stdout)["results"][0]["path"] == "imgs/a.png"
    assert f"note: the metadata of f.csv records base_dir {json.dumps(base_dir)}, not a folder's absolute path: " \
           f"its relative image paths are taken from the current folder" in result.stderr.splitlines()


def test_a_whitening_of_strings_counts_as_damaged(work, tmp_path):
    """The right generation id, arrays of the wrong type: learned again."""
    for name in ("f.csv", "f.csv.meta.json"):
        shutil.copy(work / name, tmp_path / name)
    with np.load(work / "f.csv.whitening.npz") as stored:
        arrays = {key: stored[key] for key in stored.files}
    np.savez(tmp_path / "f.csv.whitening.npz", generation=arrays["generation"],
             **{key: np.full(arrays[key].shape, "x") for key in St.WHITENING_KEYS})
    result = search(tmp_path, "--metric", "whitened", "--json", query=work / "imgs" / "a.png")
    assert distances(result)[0] == 0.0
    assert "note: the whitening stored with f.csv is damaged (its arrays don't hold floating-point numbers); " \
           "learned it from 5 images (re-index to store it)" in result.stderr.splitlines()


def test_why_no_whitening_is_used_is_told(work, tmp_path):
    """Missing, unreadable, or another generation's: each said as it is."""
    from search_utils import modes

    for name in ("f.csv", "f.csv.meta.json"):
        shutil.copy(work / name, tmp_path / name)
    features = str(tmp_path / "f.csv")

    def note():
        notes = []
        modes.search_space(St.load_features(features), "whitened", warn=notes.append, source=features)
        assert len(notes) == 1, notes
        return notes[0]

    assert note().startswith(f"note: no whitening stored with these features ({features}.whitening.npz is "
                             f"missing); learned it from 5 images")
    (tmp_path / "f.csv.whitening.npz").write_bytes(b"PK\x03\x04 not a zip file")
    assert note().startswith(f"note: the whitening file {features}.whitening.npz is damaged (unreadable")
    with np.load(work / "f.csv.whitening.npz") as stored:
        arrays = {key: stored[key] for key in stored.files}
    np.savez(tmp_path / "f.csv.whitening.npz", **{**arrays, "generation": np.array("another")})
    assert note().startswith(f"note: the whitening file {features}.whitening.npz is from another generation of "
                             f"{features} (stale)")


def test_an_unknown_mplbackend_is_ignored_and_the_picture_saved(work, tmp_path):
    env = offline_env(tmp_path)
    env["MPLBACKEND"] = "bogus"
    result = search(tmp_path, "-n", "1", query=work / "imgs" / "a.png", features=work / "f.csv", env=env)
    assert result.returncode == 0, result.stderr
    assert "note: MPLBACKEND=bogus names no matplotlib backend; ignored it" in result.stderr.splitlines()
    assert result.stderr.splitlines()[-1] == "saved the results picture to search_results.png"
    assert Image.open(tmp_path / "search_results.png").size == plot.figure_size_pixels(1)


# ------------------------------------------------ 4. a display that isn't there


@pytest.mark.parametrize("variables", [
    {"DISPLAY": ":4242", "MPLBACKEND": "TkAgg"},
    {"DISPLAY": ":4242", "MPLBACKEND": "QtAgg"},
    {"WAYLAND_DISPLAY": "wayland-0"},  # XDG_RUNTIME_DIR unset: libwayland would print an error line
])
def test_a_display_that_cant_be_used_saves_the_picture_without_warnings(work, tmp_path, variables):
    env = offline_env(tmp_path)
    env.pop("XDG_RUNTIME_DIR", None)
    env.update(variables)
    result = search(tmp_path, "-n", "1", query=work / "imgs" / "a.png", features=work / "f.csv", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"reused the query's stored features: it is indexed in {work}/f.csv",
                                          "saved the results picture to search_results.png"]
    assert Image.open(tmp_path / "search_results.png").size == plot.figure_size_pixels(1)


def test_a_wayland_socket_is_tried_before_it_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-7")
    assert not plot._wayland_display_usable()  # no socket there
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(tmp_path / "wayland-7"))
        server.listen(1)
        assert plot._wayland_display_usable()
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert not plot._wayland_display_usable()  # a relative name needs XDG_RUNTIME_DIR


# ------------------------------------------------ 5. a query that changed or vanished since indexing


def test_an_indexed_query_that_changed_is_embedded_as_it_is_now(work):
    query = work / "imgs" / "a.png"
    original = query.read_bytes()
    try:
        shutil.copy(work / "imgs" / "b.png", query)  # other pixels under the indexed name
        changed = search(work, "--json", "--no-plot", "-n", "2")
    finally:
        query.write_bytes(original)  # the same content again, with a new mtime
    assert changed.returncode == 0, changed.stderr
    hits = json.loads(changed.stdout)["results"]
    assert hits[0]["path"] == "imgs/b.png" and hits[0]["distance"] < 1e-4  # what the file holds now
    assert changed.stderr.splitlines()[:2] == [
        "note: imgs/a.png changed since it was indexed in f.csv: embedding it as it is now",
        "embedded the query with efficientnet_lite0"]
    touched = search(work, "--json", "--no-plot", "-n", "1")  # same bytes, new mtime: hashed, and reused
    assert json.loads(touched.stdout)["results"][0] == {"rank": 1, "distance": 0.0, "path": "imgs/a.png",
                                                         "copies": []}
    assert touched.stderr.splitlines() == ["reused the query's stored features: it is indexed in f.csv"]
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("f.csv.state")) == ["f.csv.state.sqlite"]


def test_an_indexed_query_that_is_gone_is_not_found(work, tmp_path):
    away = tmp_path / "a.png"
    os.rename(work / "imgs" / "a.png", away)
    try:
        result = search(work, "--no-plot")
    finally:
        os.rename(away, work / "imgs" / "a.png")
    assert_one_line_error(result, "imgs/a.png: file not found")
    assert result.stdout == ""


# ------------------------------------------------ 6. a collection moved with its index


def moved_copy(work, target, with_images=True):
    target.mkdir()
    for name in ("f.csv", "f.csv.whitening.npz"):
        shutil.copy(work / name, target / name)
    meta = json.loads((work / "f.csv.meta.json").read_text())
    gone = target.parent / "the folder it was indexed in"
    (target / "f.csv.meta.json").write_text(json.dumps({**meta, "base_dir": str(gone)}))
    if with_images:
        shutil.copytree(work / "imgs", target / "imgs")
    return gone


def test_a_moved_collection_is_found_beside_its_index(work, tmp_path):
    moved = tmp_path / "moved"
    gone = moved_copy(work, moved)
    (tmp_path / "elsewhere").mkdir()
    result = run_command(SEARCH, "--query", moved / "imgs" / "a.png", "--featuresPath", moved / "f.csv",
                         "--json", "--no-plot", "-n", "3", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    paths = [hit["path"] for hit in json.loads(result.stdout)["results"]]
    assert paths[0] == str(moved / "imgs" / "a.png") and all(os.path.isfile(p) for p in paths)
    assert result.stderr.splitlines() == [
        f"note: {moved}/f.csv was indexed in {gone}, which no longer exists; its image paths are taken from its "
        f"own folder {moved}, where they are",
        f"reused the query's stored features: it is indexed in {moved}/f.csv"]  # recognised: no model


def test_stored_paths_that_cant_be_found_from_here_are_said_so(work, tmp_path):
    gone = moved_copy(work, tmp_path / "moved", with_images=False)
    store = St.load_features(str(tmp_path / "moved" / "f.csv"))
    base = path_base(store.metadata["base_dir"], str(tmp_path / "moved" / "f.csv"), store.paths)
    assert base.folder == str(gone)
    assert base.note == (f"note: {tmp_path}/moved/f.csv was indexed in {gone}, which no longer exists, and its "
                         f"images are not beside it either: results show the paths as stored, which may not "
                         f"open from here")
    assert path_base(str(work), "f.csv", store.paths).note is None  # an existing folder: nothing to say
    assert path_base(None, "f.csv", store.paths).folder is None  # no metadata: the current folder


# ------------------------------------------------ 7. messages that name what they are about


def test_a_model_mismatch_names_the_features_file(work):
    result = search(work, "--model", "resnet50")
    assert_one_line_error(result, "features file f.csv was made with efficientnet_lite0, not resnet50")
    assert naming_the_file("features file has 1280 values per image but resnet50 gives 2048", "x.csv") == \
        "features file x.csv has 1280 values per image but resnet50 gives 2048"
    assert naming_the_file("the features file's metadata names unknown model 'a'", "x.csv") == \
        "the metadata of x.csv names unknown model 'a'"


def test_a_deleted_working_folder_is_named(work, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess_in_deleted_folder(gone, "--query", work / "imgs" / "a.png", "--featuresPath",
                                          work / "f.csv", "--no-plot")
    assert_one_line_error(result, "the current folder no longer exists")


def subprocess_in_deleted_folder(folder, *args):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run([sys.executable, str(REPO / SEARCH), *map(str, args)], cwd=folder,
                          env=offline_env(folder.parent), capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: os.rmdir(folder))  # runs after the child changed into it


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (the decoder never
    gets as far as its data): a decompression bomb as far as the header
    tells."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_a_query_over_the_bomb_limit_is_refused_not_skipped(work, tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(30000, 30000))
    result = search(tmp_path, query="bomb.png", features=work / "f.csv")
    line = one_error_line(result.stderr, "bomb.png: too many pixels", "refused without decoding")
    assert "skipped" not in line and result.returncode == 1


# ------------------------------------------------ 8. option values


@pytest.mark.parametrize("weights, says", [
    ("", "argument --weights: empty"),
    ("/nonexistent.h5", "argument --weights: /nonexistent.h5: file not found"),
])
def test_weights_that_cant_be_a_file_are_a_usage_error(work, weights, says):
    result = search(work, "--no-plot", "--weights", weights)
    assert_one_line_error(result, says)
    assert result.returncode == 2 and result.stdout == ""


# ------------------------------------------------ 9. long picture names


def test_a_picture_name_of_255_bytes_is_written(work, tmp_path, in_process):
    name = "r" * 251 + ".png"
    code, _, err = in_process(work, "--query", "imgs/a.png", "--featuresPath", "f.csv", "-n", "1",
                              "--save", tmp_path / name)
    assert code == 0, err
    assert Image.open(tmp_path / name).format == "PNG"
    assert os.listdir(tmp_path) == [name]  # no temporary file left
