"""evaluate.py end to end on features files the tests write (no model needed)."""

import json
import os

import numpy as np
import pytest

from conftest import assert_one_line_error, run_command
from search_utils.store import FeatureStore, save_features

EVALUATE = "evaluate.py"

# Four images: two cats, two dogs, each drawn by two vendors. Features put
# cat/a next to dog/b, so the cross-vendor answers are known by hand.
ROWS = {
    "imgs/cat/a.png": [1.0, 0.0, 0.0],
    "imgs/cat/b.png": [0.6, 0.0, 0.5],
    "imgs/dog/a.png": [0.3, 1.0, 0.0],
    "imgs/dog/b.png": [0.9, 0.1, 0.0],
}


@pytest.fixture
def features(tmp_path):
    paths = list(ROWS)
    save_features(str(tmp_path / "f.csv"), FeatureStore(paths, np.array(list(ROWS.values()), np.float32),
                                                       {"model": "resnet50", "base_dir": str(tmp_path)}))
    # feature_dim 3 is not resnet50's: evaluation doesn't need the model.
    return tmp_path


def write_labels(folder, name="labels.csv"):
    folder.mkdir(exist_ok=True)
    rows = ["path,label,vendor"] + [
        f"../imgs/{p.split('/')[1]}/{p.split('/')[2]},{p.split('/')[1]},{p.split('/')[2][0]}" for p in ROWS]
    (folder / name).write_text("\n".join(rows) + "\n")
    return folder / name


def run_json(cwd, *args):
    result = run_command(EVALUATE, *args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_folder_names_are_the_labels(features):
    got = run_json(features, "f.csv", "--metric", "euclidean")
    # Euclidean neighbours, nearest first, relevant in capitals:
    # cat/a: dog/b .14, CAT/B .64, dog/a 1.22 -> AP 1/2;  cat/b: dog/b .59, CAT/A .64 -> 1/2
    # dog/a: DOG/B 1.08 first -> 1;  dog/b: cat/a .14, cat/b .59, DOG/A 1.08 -> 1/3
    assert set(got) == {"P@1", "mAP", "R@5", "R@10", "queries"}
    assert got["queries"] == 4
    assert got["P@1"] == pytest.approx(0.25)
    assert got["mAP"] == pytest.approx((0.5 + 0.5 + 1 + 1 / 3) / 4)
    assert got["R@5"] == 1.0


def test_labels_file_relative_to_itself_with_groups(features):
    labels = write_labels(features / "meta")
    got = run_json(features, "f.csv", "--labels", labels, "--group", "vendor", "--metric", "euclidean")
    # Only the other vendor (file a vs b) is ranked:
    # cat/a: dog/b, CAT/B -> 1/2;  cat/b: CAT/A first -> 1;  dog/a: DOG/B first -> 1;  dog/b: cat/a, DOG/A -> 1/2
    assert got == {"P@1": 0.5, "mAP": 0.75, "R@5": 1.0, "R@10": 1.0, "queries": 4}


def test_json_labels_and_table_output(features):
    records = [{"path": str(features / p), "label": p.split("/")[1]} for p in ROWS]
    (features / "labels.json").write_text(json.dumps(records))
    result = run_command(EVALUATE, "f.csv", "--labels", "labels.json", "--metric", "euclidean", cwd=features)
    assert result.returncode == 0, result.stderr
    table = dict(line.split() for line in result.stdout.splitlines()[1:])
    assert float(table["P@1"]) == pytest.approx(0.25) and table["queries"] == "4"
    assert "scored 4 queries" in result.stderr


@pytest.mark.parametrize("mode", ["chi2", "cosine", "euclidean", "whitened"])
def test_every_search_mode_can_be_scored(features, mode):
    assert run_json(features, "f.csv", "--metric", mode)["queries"] == 4


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["f.csv", "--labels", "missing.csv"], "cannot read labels file missing.csv: No such file or directory"),
        (["f.csv", "--labels", "fifo.csv"], "labels file fifo.csv is not a regular file"),
        (["f.csv", "--labels", "other.csv"], "has a label"),
        (["f.csv", "--group", "vendor"], "--group needs --labels"),
        (["nope.csv"], "features file not found"),
        (["f.csv", "--metric", "hamming"], "invalid choice"),
    ],
)
def test_errors_are_one_line(features, args, fragment):
    (features / "other.csv").write_text("path,label\nelsewhere.png,x\n")
    if not (features / "fifo.csv").exists():
        os.mkfifo(features / "fifo.csv")  # opening it would block for ever
    assert_one_line_error(run_command(EVALUATE, *args, cwd=features), fragment)


def test_a_labels_file_saved_by_excel_with_a_byte_order_mark_is_read(features):
    labels = write_labels(features / "meta")
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())  # Excel's "CSV UTF-8"
    got = run_json(features, "f.csv", "--labels", labels, "--group", "vendor", "--metric", "euclidean")
    assert got == {"P@1": 0.5, "mAP": 0.75, "R@5": 1.0, "R@10": 1.0, "queries": 4}


@pytest.mark.parametrize("name, text, fragment", [
    ("dup.csv", "path,label\nimgs/cat/a.png,cat\nimgs/cat/b.png,cat\nimgs/cat/a.png,dog\n",
     "labels file dup.csv: line 4 gives imgs/cat/a.png the label 'dog', line 2 gave it 'cat'; keep one"),
    ("empty.csv", "path,label\nimgs/cat/a.png,cat\nimgs/cat/b.png,\n",
     "labels file empty.csv: line 3 has an empty label"),
    ("quote.csv", 'path,label\n"imgs/cat/a.png,cat\nimgs/cat/b.png,cat\n',
     "labels file quote.csv: line 3 is badly quoted"),
    ("few.csv", "path,label\nimgs/cat/a.png\n", "labels file few.csv: line 2 has 1 field, the header 2 (path,label)"),
    ("list.json", json.dumps([{"path": ["imgs/cat/a.png"], "label": "cat"}]),
     "labels file list.json: record 1 has 'path' [\"imgs/cat/a.png\"], not a text"),
    ("null.json", json.dumps([{"path": "imgs/cat/a.png", "label": None}]),
     "labels file null.json: record 1 has an empty label"),
])
def test_a_labels_file_that_is_wrong_names_the_line_or_record(features, name, text, fragment):
    (features / name).write_text(text)
    assert_one_line_error(run_command(EVALUATE, "f.csv", "--labels", name, cwd=features), fragment)


def test_a_base_dir_that_is_not_a_folder_name_is_noted_not_a_crash(features):
    meta = features / "f.csv.meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_dir": -1}))
    write_labels(features, "labels.csv")  # in the current folder: relative paths resolve from here too
    (features / "labels.csv").write_text((features / "labels.csv").read_text().replace("../", ""))
    result = run_command(EVALUATE, "f.csv", "--labels", "labels.csv", "--json", "--metric", "euclidean", cwd=features)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queries"] == 4
    assert result.stderr.splitlines()[0] == ("note: the metadata of f.csv records base_dir -1, not a folder's absolute "
                                             "path: its relative image paths are taken from the current folder")


def test_file_names_in_errors_are_shown_on_one_line(features):
    assert_one_line_error(run_command(EVALUATE, "no\nfile.csv", cwd=features), "features file not found: no\\nfile.csv")
