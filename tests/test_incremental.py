"""Incremental indexing: re-runs embed only what changed, byte-identical
files are embedded once, models never mix, and a run killed at any moment
(Ctrl-C, kill -9) keeps the previous features file intact and resumes.

In-process runs share one EfficientNet-Lite0 (real, pip-packaged weights)
through a patched `load_extractor` that also counts model builds; the
interruption tests run the real command in a subprocess, held at a known
batch by tests/gated_indexer.py while they signal or kill it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import create_imagenet_features
from conftest import (
    assert_one_line_error, counts, draw_picture, embedded, index, make_dataset, offline_env, run_command,
)
from gated_indexer import GatedRun
from search_utils import catalog, indexing, models
from search_utils.changes import Entry, classify
from search_utils.engine import ModelChoice, model_identity
from search_utils.errors import FeaturesFileError, ImageReadError, ModelMismatchError
from search_utils.store import load_features

INDEX = "create_imagenet_features.py"
LITE = ["--model", "efficientnet_lite0"]
HOUR_AGO = time.time() - 3600


@pytest.fixture
def decoded(monkeypatch) -> list[str]:
    """Every image file decoded for embedding, in order."""
    paths: list[str] = []
    real = indexing.load_images

    def recording(batch, **options):
        paths.extend(batch)
        return real(batch, **options)

    monkeypatch.setattr(indexing, "load_images", recording)
    return paths


def pictures(folder: Path, seeds, old: bool = True) -> None:
    """Distinct small pictures `<seed>.png`; `old`: dated an hour ago, so the
    stat cache trusts them (a just-written file is re-read to be safe)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        draw_picture(seed, size=(64, 64)).save(folder / f"{seed}.png")
    if old:
        make_old(folder)


def make_old(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            os.utime(path, (HOUR_AGO, HOUR_AGO))


def snapshot(output: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of a CSV features file and its sidecars."""
    files = [output, Path(f"{output}.meta.json"), Path(f"{output}.whitening.npz")]
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in files if p.exists()}


def assert_same_features(output: Path, reference: Path) -> None:
    """Same rows in the same order, same values. Batches differ between an
    incremental and a clean run; TensorFlow on CPU gives bit-identical
    features here, but the tolerance allows a kernel that rounds by batch."""
    ours, clean = load_features(str(output)), load_features(str(reference))
    assert ours.paths == clean.paths
    np.testing.assert_allclose(ours.features, clean.features, rtol=1e-5, atol=1e-6)


def clean_run(capsys, dataset: str, name: str = "clean.csv") -> Path:
    index(capsys, "--dataset", dataset, "--output", name, *LITE)
    return Path(name)


# -- what changed ----------------------------------------------------------


def test_classify_names_each_kind_of_change():
    before = {"same": "h1", "edited": "h2", "moved": "h3", "gone": "h4", "copied": "h5", "locked": None}
    now = [Entry("d/same", "same", "h1"), Entry("d/edited", "edited", "h9"), Entry("d/sub/moved", "sub/moved", "h3"),
           Entry("d/copied", "copied", "h5"), Entry("d/copy2", "copy2", "h5"), Entry("d/locked", "locked", None),
           Entry("d/fresh", "fresh", "h7")]
    changes = classify(now, before)
    assert changes.unchanged == ["same", "copied", "locked"]
    assert changes.changed == ["edited"]
    assert changes.renamed == [("moved", "sub/moved")]
    assert changes.new == ["copy2", "fresh"]  # a copy of a file that is still there is new
    assert changes.removed == ["gone"]
    assert changes.counts() == "2 new, 1 changed, 1 renamed, 1 removed, 3 unchanged"


def test_second_run_reads_and_embeds_nothing_and_builds_no_model(work, capsys, builds, monkeypatch):
    make_dataset(work / "images")
    make_old(work / "images")
    first = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert counts(first) == (10, 0, 0, 0, 0, 3) and embedded(first) == 7 and builds == ["efficientnet_lite0"]
    before = snapshot(work / "f.csv")
    assert set(before) == {"f.csv", "f.csv.meta.json", "f.csv.whitening.npz"}

    def no_reading(path):
        raise AssertionError(f"{path} was read although its size and mtime are unchanged")

    monkeypatch.setattr("search_utils.changes.content_hash", no_reading)
    second = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert counts(second) == (0, 0, 0, 0, 10, 3)
    assert "nothing to embed, f.csv left as it was" in second
    assert builds == ["efficientnet_lite0"]  # not built again
    assert snapshot(work / "f.csv") == before  # not even rewritten


def test_new_changed_renamed_removed_and_touched_files(work, capsys, builds, decoded):
    pictures(work / "images", range(8))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    decoded.clear()
    draw_picture(100, size=(64, 64)).save(work / "images/new.png")
    draw_picture(101, size=(64, 64)).save(work / "images/1.png")  # same name, other content
    (work / "images/2.png").unlink()
    (work / "images/sub").mkdir()
    (work / "images/3.png").rename(work / "images/sub/moved.png")
    os.utime(work / "images/4.png")  # touched: new mtime, same bytes

    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert counts(stderr) == (1, 1, 1, 1, 5, 0)
    assert sorted(decoded) == ["images/1.png", "images/new.png"]  # only what changed was embedded
    assert embedded(stderr) == 2
    assert_same_features(work / "f.csv", clean_run(capsys, "images"))
    assert catalog.count_checkpointed("f.csv") == 8  # the removed file's features are dropped


def test_byte_identical_files_are_embedded_once(work, capsys, builds, decoded):
    pictures(work / "images", [1, 2])
    (work / "images/copies").mkdir()
    shutil.copy(work / "images/1.png", work / "images/copies/1 again.png")
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert counts(stderr) == (3, 0, 0, 0, 0, 0) and embedded(stderr) == 2 and len(decoded) == 2
    store = load_features("f.csv")
    assert store.paths == ["images/1.png", "images/2.png", "images/copies/1 again.png"]
    assert np.array_equal(store.features[0], store.features[2])

    shutil.copy(work / "images/2.png", work / "images/copies/2 again.png")
    builds.clear()
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert counts(stderr) == (1, 0, 0, 0, 3, 0) and builds == []  # known content: no model needed
    store = load_features("f.csv")
    assert store.paths[-1] == "images/copies/2 again.png"
    assert np.array_equal(store.features[1], store.features[-1])


def test_unreadable_files_are_reported_but_not_retried(work, capsys, builds, decoded):
    files = make_dataset(work / "images")
    make_old(work / "images")
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    decoded.clear()
    pictures(work / "images", [50], old=False)
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert decoded == ["images/50.png"]
    for bad in files["bad"]:
        assert re.search(rf"skipping images/{bad}: .*not retried", stderr), stderr
    assert counts(stderr) == (1, 0, 0, 0, 10, 3)
    assert len(load_features("f.csv")) == 8


def test_hdf5_output_is_updated_in_place_of_a_rewrite(work, capsys, builds):
    pictures(work / "images", range(4))
    index(capsys, "--dataset", "images", "--output", "f.h5", *LITE)
    before = (work / "f.h5").read_bytes()
    stderr = index(capsys, "--dataset", "images", "--output", "f.h5", *LITE)
    assert counts(stderr) == (0, 0, 0, 0, 4, 0) and (work / "f.h5").read_bytes() == before
    pictures(work / "images", [9])
    stderr = index(capsys, "--dataset", "images", "--output", "f.h5", *LITE)
    assert counts(stderr) == (1, 0, 0, 0, 4, 0) and embedded(stderr) == 1
    assert_same_features(work / "f.h5", clean_run(capsys, "images"))


def test_a_model_that_cannot_load_changes_nothing(work, capsys, builds):
    """As `make demo` does offline: ResNet50 (its download fails), then the
    pip-packaged model, on the same output, twice."""
    pictures(work / "images", range(3))
    first = run_command(INDEX, "--dataset", "images", "--output", "f.csv", cwd=work)
    assert first.returncode == 2 and catalog.count_checkpointed("f.csv") == 0
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)  # a state without features: no refusal
    before = snapshot(work / "f.csv")
    again = run_command(INDEX, "--dataset", "images", "--output", "f.csv", "--rebuild", cwd=work)
    assert again.returncode == 2, again.stderr
    builds.clear()
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert builds == [] and counts(stderr) == (0, 0, 0, 0, 3, 0)  # --rebuild kept the state: its model never loaded
    assert snapshot(work / "f.csv") == before


# -- the features file and its state ---------------------------------------


def test_a_features_file_without_state_is_indexed_again(work, capsys, builds):
    pictures(work / "images", range(3))
    (work / "f.csv").write_text("images/0.png,1.0\n")  # as the post's script or an older run left it
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    notes = [line for line in stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no indexing state" in notes[0] and "embedding all 3 images" in notes[0]
    assert counts(stderr) == (3, 0, 0, 0, 0, 0) and embedded(stderr) == 3
    assert_same_features(work / "f.csv", clean_run(capsys, "images"))


def test_a_damaged_state_is_one_line_and_rebuild_replaces_it(work, capsys, builds):
    pictures(work / "images", range(2))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    Path(catalog.state_path("f.csv")).write_bytes(b"not a database" * 100)
    with pytest.raises(catalog.StateFileError, match="can't be used .*pass --rebuild"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "-q"])
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE, "--rebuild")
    assert counts(stderr) == (2, 0, 0, 0, 0, 0) and catalog.count_checkpointed("f.csv") == 2


def test_a_deleted_features_file_is_written_again_without_the_model(work, capsys, builds):
    pictures(work / "images", range(3))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    saved = load_features("f.csv")
    (work / "f.csv").unlink()
    builds.clear()
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert builds == [] and "not as the last run left it" in stderr
    assert counts(stderr) == (0, 0, 0, 0, 3, 0)
    again = load_features("f.csv")
    assert again.paths == saved.paths and np.array_equal(again.features, saved.features)


def test_leftovers_of_a_killed_write_are_cleaned_up(work, capsys, builds):
    pictures(work / "images", range(2))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    for name in (".f.csv.k1l2m3n4.tmp", ".f.csv.meta.json.x9y8z7w6.tmp"):  # as atomic writes name them
        (work / name).write_text("half written")  # by a writer killed -9: nobody holds their lock
    for name in (".g.csv.abcdefgh.tmp", ".f.csv.my-notes.tmp"):  # another file's; not a temporary name
        (work / name).write_text("someone else's")
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert sorted(p.name for p in work.iterdir() if p.name.endswith(".tmp")) == [
        ".f.csv.my-notes.tmp", ".g.csv.abcdefgh.tmp"]


def test_another_model_is_refused_with_one_line(work, capsys, builds, random_weights_file):
    pictures(work / "images", range(2))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    before = snapshot(work / "f.csv")
    refused = run_command(INDEX, "--dataset", "images", "--output", "f.csv", "--weights", random_weights_file, cwd=work)
    assert_one_line_error(refused, "efficientnet_lite0", "resnet50", "--rebuild", "mix")
    assert snapshot(work / "f.csv") == before
    catalog.remove_state("f.csv")  # a file from before incremental indexing: its metadata says
    with pytest.raises(ModelMismatchError, match="made with efficientnet_lite0, this run would make resnet50"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv",
                                       "--weights", str(random_weights_file), "-q"])
    assert builds == ["efficientnet_lite0"] and snapshot(work / "f.csv") == before


def test_other_settings_of_the_same_model_are_refused(work, capsys, builds, random_weights_file, tmp_path):
    pictures(work / "images", range(2))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    with pytest.raises(ModelMismatchError, match=r"efficientnet_lite0 \(resize bilinear\).*\(resize bicubic\)"):
        create_imagenet_features.main(["--dataset", "images", "--output", "f.csv", *LITE, "--resize", "bicubic"])
    other = tmp_path / "other.weights.h5"
    other.write_bytes(random_weights_file.read_bytes() + b"\0")
    moved = tmp_path / "moved.weights.h5"
    shutil.copy(random_weights_file, moved)
    spec = models.get_model_spec("resnet50")
    same = model_identity(ModelChoice(spec, str(random_weights_file)))
    assert model_identity(ModelChoice(spec, str(moved)))["weights"] == same["weights"]  # by content, not path
    assert model_identity(ModelChoice(spec, str(other)))["weights"] != same["weights"]


def test_rebuild_starts_from_scratch_with_any_model(work, capsys, builds, decoded, random_weights_file):
    pictures(work / "images", range(3))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    decoded.clear()
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE, "--rebuild")
    assert counts(stderr) == (3, 0, 0, 0, 0, 0) and len(decoded) == 3
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", "--weights", random_weights_file, "--rebuild")
    assert counts(stderr) == (3, 0, 0, 0, 0, 0)
    store = load_features("f.csv")
    assert store.metadata["model"] == "resnet50" and store.dim == 2048


@pytest.mark.parametrize("output, fragment", [
    ("missing/f.csv", "folder"), ("folder.csv", "it is a folder"), ("f.txt", "extension '.txt'"),
])
def test_an_unwritable_output_is_refused_before_any_work(work, builds, output, fragment):
    pictures(work / "images", range(1))
    (work / "folder.csv").mkdir()
    with pytest.raises(FeaturesFileError, match=fragment):
        create_imagenet_features.main(["--dataset", "images", "--output", output, *LITE, "-q"])
    assert builds == [] and not list(work.glob("**/*.lock")) and not list(work.glob("**/*.sqlite"))


# -- interruptions ---------------------------------------------------------
# The run is held (tests/gated_indexer.py) after exactly two batches of 4 were
# embedded and checkpointed, with 46 images still to embed: each signal lands
# mid-run, however loaded the machine.

HELD = "batch-2"
KEPT = 2 * 4


@pytest.fixture
def half_done(work, capsys, builds) -> tuple[Path, dict]:
    """`images/` of 6 indexed pictures, then 54 more: a run with work to do."""
    pictures(work / "images", range(6))
    index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    pictures(work / "images", range(6, 60))
    return work, snapshot(work / "f.csv")


def held_indexing(work: Path) -> GatedRun:
    """The command on `images/`, held at HELD once it gets there."""
    return GatedRun(work / "gate", ["--dataset", "images", "--output", "f.csv", *LITE, "--batch-size", "4", "-q"],
                    cwd=work, env=offline_env(work), hold=[HELD])


def assert_resumes(capsys, work: Path) -> None:
    """The same command again embeds only the rest, and gives a clean run's features."""
    stderr = index(capsys, "--dataset", "images", "--output", "f.csv", *LITE)
    assert f"resuming an unfinished run: {KEPT} images were embedded already" in stderr
    assert counts(stderr) == (54, 0, 0, 0, 6, 0) and embedded(stderr) == 54 - KEPT
    assert_same_features(work / "f.csv", clean_run(capsys, "images"))


def test_kill_9_part_way_keeps_the_file_and_resumes(half_done, capsys):
    work, before = half_done
    with held_indexing(work) as run:
        run.wait_for(HELD)
        assert catalog.count_checkpointed("f.csv") == 6 + KEPT
        run.send(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL, run.stderr
    assert catalog.count_checkpointed("f.csv") == 6 + KEPT  # the committed batches, no more, no less
    assert snapshot(work / "f.csv") == before  # the last complete features file, untouched
    assert_resumes(capsys, work)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_with_a_summary_and_resumes(half_done, capsys, signum):
    """Ctrl-C, and `kill` (SIGTERM), stop as cleanly: one line, exit 130."""
    work, before = half_done
    with held_indexing(work) as run:
        run.wait_for(HELD)
        run.send(signum)
        assert run.wait() == 130, run.stderr
        stderr = run.stderr
    assert stderr.splitlines() == [(f"{INDEX}: error: interrupted: {KEPT} of 54 images embedded and checkpointed; "
                                    f"run the same command again to resume")], stderr
    assert catalog.count_checkpointed("f.csv") == 6 + KEPT
    assert snapshot(work / "f.csv") == before
    assert not list(work.glob(".f.csv*.tmp")) and not (work / "f.csv.lock").exists()
    assert_resumes(capsys, work)


def test_a_subfolder_that_cant_be_listed_keeps_its_rows(work, builds, capsys, monkeypatch):
    """A subfolder that can't be listed this time (permissions, an unmounted
    share) is reported, and the images recorded under it keep their rows
    instead of counting as removed; once it is back, nothing is re-embedded."""
    pictures(work / "ds", [1, 2])
    pictures(work / "ds" / "sub", [3, 4])
    for name in ("notes.png", "readme.jpg"):  # not images: recorded as unreadable, with no row to keep
        (work / "ds" / "sub" / name).write_text("not an image\n")
    make_old(work / "ds")
    index(capsys, "--dataset", "ds", "--output", "f.csv", *LITE)
    before = load_features("f.csv")
    real_listing = create_imagenet_features.list_dataset

    def sub_unlistable(dataset, on_error=None, include_hidden=False):
        on_error(ImageReadError(os.path.join(dataset, "sub"), "folder can't be listed (Permission denied)"))
        return [p for p in real_listing(dataset, include_hidden=include_hidden) if os.sep + "sub" + os.sep not in p]

    monkeypatch.setattr(create_imagenet_features, "list_dataset", sub_unlistable)
    err = index(capsys, "--dataset", "ds", "--output", "f.csv", *LITE)
    assert "ds/sub: folder can't be listed" in err
    assert "kept the 2 images recorded under folders that can't be listed now" in err
    assert "notes.png" not in err and "readme.jpg" not in err  # not listed now: not reported either
    assert counts(err)[3] == 0  # nothing removed
    kept = load_features("f.csv")
    assert kept.paths == before.paths
    assert np.array_equal(kept.features, before.features)

    monkeypatch.setattr(create_imagenet_features, "list_dataset", real_listing)
    err = index(capsys, "--dataset", "ds", "--output", "f.csv", *LITE)
    assert counts(err) == (0, 0, 0, 0, 6, 2) and embedded(err) == 0


def test_hidden_folders_are_skipped_unless_asked(work, capsys, builds):
    pictures(work / "ds", [1, 2])
    pictures(work / "ds" / ".thumbnails", [3])  # a viewer's cache: copies of the real pictures
    err = index(capsys, "--dataset", "ds", "--output", "f.csv", *LITE)
    assert counts(err)[0] == 2 and len(load_features("f.csv")) == 2
    err = index(capsys, "--dataset", "ds", "--output", "f.csv", *LITE, "--include-hidden")
    assert counts(err)[0] == 1
    assert os.path.join("ds", ".thumbnails", "3.png") in load_features("f.csv").paths
