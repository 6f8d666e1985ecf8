"""The two commands end to end, in a subprocess, as a user runs them."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import AWKWARD_NAME, assert_one_line_error, draw_picture, make_dataset, offline_env, run_command
from search_utils.plot import figure_size_pixels
from search_utils.store import load_features

INDEX = "create_imagenet_features.py"
SEARCH = "imagenet_search.py"


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, random_weights_file):
    """A working folder with `images/` indexed once into features.csv."""
    work = tmp_path_factory.mktemp("work")
    files = make_dataset(work / "images")
    weights = work / "resnet50.weights.h5"
    shutil.copy(random_weights_file, weights)
    result = run_command(INDEX, "--dataset", "images", "--output", "features.csv",
                         "--weights", weights, cwd=work)
    return work, files, result


def test_indexing_writes_the_posts_csv_and_reports_skips(indexed, random_resnet50):
    work, files, result = indexed
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # results go to the file, diagnostics to stderr
    for bad in files["bad"]:
        assert f"skipping images/{bad}:" in result.stderr
    assert "indexed 7 images with resnet50 into features.csv: 10 new, 0 changed, 0 renamed, 0 removed, " \
           "0 unchanged (3 skipped); embedded 7 in" in result.stderr
    assert "7/10" not in result.stderr and "10/10" in result.stderr  # progress bar reached the end
    store = load_features(str(work / "features.csv"))
    assert sorted(store.paths) == sorted(os.path.join("images", g) for g in files["good"])
    assert store.paths == sorted(store.paths, key=lambda p: p.split(os.sep))
    assert store.features.shape == (7, 2048)
    from test_images import keras_recipe

    row = store.paths.index("images/photo1.jpg")
    post = random_resnet50.predict(keras_recipe(str(work / "images/photo1.jpg")), verbose=0)[0]
    np.testing.assert_allclose(store.features[row], post, rtol=1e-4, atol=1e-5)


def test_metadata_says_how_the_features_were_made(indexed):
    work, _, _ = indexed
    meta = json.loads((work / "features.csv.meta.json").read_text())
    assert meta["model"] == "resnet50" and meta["feature_dim"] == 2048 and meta["count"] == 7
    assert meta["weights"] == str(work / "resnet50.weights.h5")
    assert meta["preprocessing"]["resize"] == "nearest"
    assert meta["preprocessing"]["alpha"] == "composited on white"
    assert "preprocess_input" in meta["preprocessing"]["pixels"]
    assert meta["tool_version"] and meta["base_dir"] == str(work)


def test_stored_query_reuses_features_without_the_model(indexed):
    work, _, _ = indexed
    hidden = work / "resnet50.weights.h5.away"
    os.rename(work / "resnet50.weights.h5", hidden)  # a model build would now fail
    try:
        result = run_command(SEARCH, "--query", work / "images" / "photo2.jpg",
                             "--featuresPath", "features.csv", cwd=work)
    finally:
        os.rename(hidden, work / "resnet50.weights.h5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "distance", "path"] and len(lines) == 6
    assert lines[1].split() == ["1", "0.0000", "images/photo2.jpg"]
    assert "embedded" not in result.stderr
    picture = work / "search_results.png"  # no display: saved, not shown
    assert Image.open(picture).size == figure_size_pixels(5)


def test_outside_query_is_embedded_with_the_recorded_model(indexed, tmp_path):
    work, _, _ = indexed
    query = tmp_path / "copy of photo3.jpg"
    shutil.copy(work / "images" / "photo3.jpg", query)
    result = run_command(SEARCH, "--query", query, "--featuresPath", work / "features.csv",
                         "--json", "-n", "3", "--metric", "cosine", "--save", tmp_path / "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["metric"] == "cosine" and [r["rank"] for r in answer["results"]] == [1, 2, 3]
    # Searched from another folder: the path printed opens from there.
    assert answer["results"][0]["path"] == str(work / "images" / "photo3.jpg")
    assert answer["results"][0]["distance"] < 1e-5  # same pixels, same model, same 2048 values
    assert "embedded the query with resnet50" in result.stderr
    assert Image.open(tmp_path / "out.png").size == figure_size_pixels(3)


def test_awkward_file_names_survive_to_the_results(indexed):
    work, _, _ = indexed
    result = run_command(SEARCH, "--query", f"images/{AWKWARD_NAME}", "--featuresPath", "features.csv",
                         "--json", "--no-plot", cwd=work)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["path"] == f"images/{AWKWARD_NAME}"


@pytest.mark.parametrize(
    "model, wanted",
    [("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
     ("efficientnetv2_b0", "efficientnetv2-b0_notop.h5")],  # any Keras application entry
)
def test_failed_download_names_the_file_the_cache_and_the_option(dataset, tmp_path, model, wanted):
    root, _ = dataset
    result = run_command(INDEX, "--dataset", root, "--output", tmp_path / "f.csv", "--model", model, cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, f"weights of {model}", wanted, str(tmp_path / "keras_home" / "models"), "--weights")
    assert not (tmp_path / "f.csv").exists()


def test_no_readable_image_fails_and_keeps_the_earlier_file(indexed, tmp_path):
    work, _, _ = indexed
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("text")
    (bad / "b.png").write_bytes(b"")
    output = tmp_path / "features.csv"
    shutil.copy(work / "features.csv", output)
    before = output.read_bytes()
    result = run_command(INDEX, "--dataset", bad, "--output", output, "--weights", work / "resnet50.weights.h5", cwd=tmp_path)
    assert result.returncode == 1
    assert "none of the 2 image files" in result.stderr and "Traceback" not in result.stderr
    assert output.read_bytes() == before


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing", "dataset folder not found"),
        (lambda d: _touch(d / "file.jpg"), "dataset is not a folder"),
        (lambda d: _text_only_folder(d), "no image files"),
    ],
)
def test_bad_dataset_argument(tmp_path, make, fragment):
    result = run_command(INDEX, "--dataset", make(tmp_path), "--output", "f.csv", cwd=tmp_path)
    assert_one_line_error(result, fragment)


def _touch(path):
    path.write_bytes(b"x")
    return path


def _text_only_folder(root):
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("x")
    return root / "docs"


@pytest.fixture
def small_features(tmp_path):
    """A features file (no model needed) and a query image."""
    draw_picture(1).save(tmp_path / "q.png")
    (tmp_path / "notes.png").write_text("not an image")
    rows = np.random.default_rng(0).random((3, 2048)).astype(str)
    (tmp_path / "f.csv").write_text("".join(f"x{i}.png," + ",".join(r) + "\n" for i, r in enumerate(rows)))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "short.csv").write_text("a.png,1,2,3\nb.png,1,2\n")
    (tmp_path / "dim100.csv").write_text("a.png," + ",".join(["1"] * 100) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--query", "nope.png", "--featuresPath", "f.csv"], ["nope.png", "file not found"]),
        (["--query", "notes.png", "--featuresPath", "f.csv"], ["notes.png", "not an image"]),
        (["--query", "q.png", "--featuresPath", "missing.csv"], ["features file not found"]),
        (["--query", "q.png", "--featuresPath", "empty.csv"], ["features file is empty"]),
        (["--query", "q.png", "--featuresPath", "short.csv"], ["row 2 (b.png) has 2 values, expected 3"]),
        (["--query", "q.png", "--featuresPath", "dim100.csv"], ["100 values per image", "2048"]),
        (["--query", "q.png", "--featuresPath", "f.csv", "--metric", "l7"], ["invalid choice: 'l7'"]),
        (["--query", "q.png", "--featuresPath", "f.csv", "--model", "efficientnetv2_b0"], ["not efficientnetv2_b0"]),
        (["--query", "q.png", "--featuresPath", "f.csv", "-n", "0"], ["at least 1"]),
        (["--featuresPath", "f.csv"], ["--query"]),
    ],
)
def test_search_errors_are_one_line(small_features, args, fragments):
    result = run_command(SEARCH, *args, cwd=small_features)
    assert_one_line_error(result, *fragments)
    assert result.stdout == ""


def test_offline_model_end_to_end(tmp_path, dataset):
    """efficientnet_lite0 indexes and searches with no network and no --weights."""
    root, files = dataset
    result = run_command(INDEX, "--dataset", root, "--output", tmp_path / "lite.csv",
                         "--model", "efficientnet_lite0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "lite.csv.meta.json").read_text())
    assert (meta["model"], meta["feature_dim"], meta["weights"]) == ("efficientnet_lite0", 1280, "packaged")
    outside = tmp_path / "query.png"
    shutil.copy(root / "sub" / "icon.png", outside)
    result = run_command(SEARCH, "--query", outside, "--featuresPath", tmp_path / "lite.csv",
                         "--json", "--no-plot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)["results"][0]
    assert top["path"].endswith("sub/icon.png") and top["distance"] < 1e-4
    assert "embedded the query with efficientnet_lite0" in result.stderr
    refused = run_command(SEARCH, "--query", outside, "--featuresPath", tmp_path / "lite.csv",
                          "--model", "resnet50", cwd=tmp_path)
    assert_one_line_error(refused, "made with efficientnet_lite0, not resnet50")


def test_copies_of_one_image_collapse_into_one_result(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    picture = draw_picture(5)
    picture.save(folder / "a.png")
    shutil.copy(folder / "a.png", folder / "b copy.png")
    picture.save(folder / "c resaved.png", compress_level=1)  # same pixels, other bytes
    assert (folder / "c resaved.png").read_bytes() != (folder / "a.png").read_bytes()
    for i in range(3):
        draw_picture(20 + i).save(folder / f"other{i}.png")
    indexed = run_command(INDEX, "--dataset", "imgs", "--output", "f.csv", "--model", "efficientnet_lite0", cwd=tmp_path)
    assert indexed.returncode == 0, indexed.stderr

    result = run_command(SEARCH, "--query", "imgs/a.png", "--featuresPath", "f.csv", "-n", "3", "--json", "--no-plot",
                         cwd=tmp_path)
    hits = json.loads(result.stdout)["results"]
    assert hits[0]["path"] == "imgs/a.png"
    assert hits[0]["copies"] == ["imgs/b copy.png", "imgs/c resaved.png"]
    assert [h["path"].startswith("imgs/other") for h in hits[1:]] == [True, True]

    table = run_command(SEARCH, "--query", "imgs/a.png", "--featuresPath", "f.csv", "-n", "3", "--no-plot", cwd=tmp_path)
    assert "(+2 copies: imgs/b copy.png, imgs/c resaved.png)" in table.stdout.splitlines()[1]

    every = run_command(SEARCH, "--query", "imgs/a.png", "--featuresPath", "f.csv", "-n", "3", "--json", "--no-plot",
                        "--keep-duplicates", cwd=tmp_path)
    paths = [h["path"] for h in json.loads(every.stdout)["results"]]
    assert paths == ["imgs/a.png", "imgs/b copy.png", "imgs/c resaved.png"]


def test_a_second_run_on_the_same_output_is_refused(tmp_path, dataset):
    from search_utils.locking import exclusive_output

    root, _ = dataset
    output = tmp_path / "f.csv"
    with exclusive_output(str(output)):
        result = run_command(INDEX, "--dataset", root, "--output", output, "--model", "efficientnet_lite0",
                             cwd=tmp_path)
    assert_one_line_error(result, f"{output} is being written by process", "try again")
    assert not output.exists()
    assert not (tmp_path / "f.csv.lock").exists()  # released and cleaned up


def test_sigterm_stops_cleanly_and_keeps_the_earlier_file(tmp_path):
    """`kill` part-way, progress bar on: one error line, exit 130, and the
    earlier features file as it was. The run is held after exactly two
    batches of 2 (tests/gated_indexer.py), so the signal lands mid-run."""
    import signal

    from gated_indexer import GatedRun

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        draw_picture(i, size=(64, 64)).save(folder / f"{i:03d}.png")  # distinct: copies are embedded once
    output = tmp_path / "f.csv"
    output.write_text("earlier,1.0\n")
    args = ["--dataset", folder, "--output", output, "--model", "efficientnet_lite0", "--batch-size", "2"]
    with GatedRun(tmp_path / "gate", args, cwd=tmp_path, env=offline_env(tmp_path), hold=["batch-2"]) as run:
        run.wait_for("batch-2")
        run.send(signal.SIGTERM)
        assert run.wait() == 130, run.stderr
        stderr = run.stderr
    assert "Traceback" not in stderr
    assert "4/12" in stderr and "6/12" not in stderr  # the bar showed the two batches done, no more
    assert stderr.splitlines()[-1] == (f"{INDEX}: error: interrupted: 4 of 12 images embedded and checkpointed; "
                                       f"run the same command again to resume"), stderr
    assert output.read_text() == "earlier,1.0\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".f.csv")) == []  # no temp left
    assert not (tmp_path / "f.csv.lock").exists()


# Put on PYTHONPATH, Python imports it at start-up: it holds the first import
# of numpy (each command's first heavy import) until the test says go.
IMPORT_GATE = '''
import importlib.abc, os, sys, time

class HoldNumpy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            sys.meta_path.remove(self)
            open(os.path.join(os.environ["GATE_DIR"], "importing"), "w").close()
            while not os.path.exists(os.path.join(os.environ["GATE_DIR"], "go")):
                time.sleep(0.01)
        return None

sys.meta_path.insert(0, HoldNumpy())
'''


@pytest.mark.parametrize("script", [INDEX, SEARCH, "evaluate.py", "convert_features.py", "search_server.py"])
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupt_while_a_command_imports_is_one_line(tmp_path, script, signum):
    """Ctrl-C or `kill` in the first second or two, while the command imports
    numpy and the rest: one line and 130, like an interrupt later on (it was
    a traceback through the imports, or a silent death by SIGTERM)."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "sitecustomize.py").write_text(IMPORT_GATE)
    env = offline_env(tmp_path)
    env.update(PYTHONPATH=f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}", GATE_DIR=str(tmp_path))
    run = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), script),
                            "--help"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "importing").exists():
            assert run.poll() is None, run.stderr.read()
            assert time.monotonic() < deadline, "the command never imported numpy"
            time.sleep(0.01)
        run.send_signal(getattr(signal, signum))
        stdout, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 130, stderr
    assert stderr.splitlines() == [f"{script}: error: interrupted while starting; nothing was written"]
    assert stdout == ""
