import json
import os

import numpy as np
import pytest

from search_utils import store as St
from search_utils.store import csv_format
from search_utils.errors import FeaturesFileError

# Every kind of file name a features file must carry unchanged (CSV and HDF5).
AWKWARD_PATHS = [
    "icons/plain.png",
    "icons/with space.png",
    "icons/comma,in,name.png",
    'icons/"quoted".png',
    "icons/new\nline.png",
    "icons/crlf\r\nline.png",
    "icons/tab\there.png",
    "icons/ünïcødé 图像 🙂.png",
    os.fsdecode(b"icons/latin1-\xe9.png"),  # not valid UTF-8 on disk
    " leading and trailing ",
]


def sample_store(n=len(AWKWARD_PATHS), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.gamma(0.7, 1.3, size=(n, dim)).astype(np.float32)
    feats[0, :3] = [0.0, 1e-30, 123456.789]
    return St.FeatureStore(AWKWARD_PATHS[:n], feats, {"model": "resnet50", "weights": "imagenet"})


def test_csv_round_trip_keeps_awkward_paths_and_exact_floats(tmp_path):
    path = tmp_path / "features.csv"
    original = sample_store()
    St.save_features(str(path), original)
    loaded = St.load_features(str(path))
    assert loaded.paths == original.paths
    assert loaded.features.dtype == np.float32
    assert np.array_equal(loaded.features, original.features)
    assert loaded.metadata["count"] == len(original) and loaded.metadata["feature_dim"] == 16
    assert loaded.metadata["model"] == "resnet50"


def test_csv_is_the_posts_format(tmp_path):
    path = tmp_path / "features.csv"
    St.save_features(str(path), sample_store(n=2, dim=3))
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # no header
    first = lines[0].split(",")
    assert first[0] == "icons/plain.png" and len(first) == 4
    assert [float(v) for v in first[1:]] == pytest.approx([0.0, 1e-30, 123456.789], rel=1e-6)
    assert lines[1].startswith('"icons/with space.png"') or lines[1].startswith("icons/with space.png")


def test_reads_a_file_written_like_the_posts_script(tmp_path):
    # The post: output.write("%s,%s\n" % (imagePath, ",".join(features))), no metadata.
    path = tmp_path / "post.csv"
    rows = np.random.default_rng(1).random((3, 5))
    with open(path, "w") as out:
        for i, row in enumerate(rows):
            out.write("%s,%s\n" % (f"icons/{i}.png", ",".join(str(v) for v in row)))
    loaded = St.load_features(str(path))
    assert loaded.metadata == {}
    assert loaded.paths == ["icons/0.png", "icons/1.png", "icons/2.png"]
    np.testing.assert_allclose(loaded.features, rows, rtol=1e-6)


def test_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "features.csv"
    St.save_features(str(path), sample_store())
    before = path.read_bytes(), (tmp_path / "features.csv.meta.json").read_bytes()

    rows = []
    real_field = csv_format.csv_field

    def exploding_field(value):
        rows.append(value)
        if len(rows) == 3:
            raise KeyboardInterrupt  # like Ctrl-C half-way through
        return real_field(value)

    monkeypatch.setattr(csv_format, "csv_field", exploding_field)
    with pytest.raises(KeyboardInterrupt):
        St.save_features(str(path), sample_store(seed=5))
    after = path.read_bytes(), (tmp_path / "features.csv.meta.json").read_bytes()
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["features.csv", "features.csv.meta.json"]  # no temp left


def write_text(tmp_path, text, name="features.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("a.png,1,2,3\nb.png,1,2,3,4\n", r"row 2 \(b.png\) has 4 values, expected 3"),
        ("a.png,1,2,3\nb.png,1,2\n", r"row 2 \(b.png\) has 2 values, expected 3"),
        ("a.png,1,2,3\nb.png,1,oops,3\n", "row 2, column 3 is not a number"),
        ("just-a-path.png\n", "no feature values"),
    ],
)
def test_malformed_files_get_a_clear_error(tmp_path, text, message):
    with pytest.raises(FeaturesFileError, match=message):
        St.load_features(write_text(tmp_path, text))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FeaturesFileError, match="not found"):
        St.load_features(str(tmp_path / "nope.csv"))
    with pytest.raises(FeaturesFileError, match="is a folder"):
        St.load_features(str(tmp_path))


def test_metadata_that_does_not_match_the_file_is_refused(tmp_path):
    path = tmp_path / "features.csv"
    St.save_features(str(path), sample_store())
    with open(path, "a") as out:  # someone appends a row by hand
        out.write("extra.png," + ",".join(["1.0"] * 16) + "\n")
    with pytest.raises(FeaturesFileError, match="rows but its metadata says"):
        St.load_features(str(path))
    meta = json.loads((tmp_path / "features.csv.meta.json").read_text())
    meta.update(count=len(AWKWARD_PATHS) + 1, feature_dim=99)
    (tmp_path / "features.csv.meta.json").write_text(json.dumps(meta))
    with pytest.raises(FeaturesFileError, match="16 values per image but its metadata says 99"):
        St.load_features(str(path))


def test_written_files_get_normal_permissions_and_keep_changed_ones(tmp_path):
    """Atomic writes go through a private temporary file: the result must
    still be readable by others as a plain file would be (umask), and a
    file's own permissions survive its replacement."""
    old_umask = os.umask(0o022)
    try:
        path = tmp_path / "features.csv"
        St.save_features(str(path), sample_store())
        assert path.stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "features.csv.meta.json").stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        St.save_features(str(path), sample_store(seed=5))
        assert path.stat().st_mode & 0o777 == 0o640
        h5 = tmp_path / "features.h5"
        St.save_features(str(h5), sample_store())
        assert h5.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old_umask)
