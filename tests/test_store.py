import json
import os
import re

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


def sample_store(n=len(AWKWARD_PATHS), dim=16, seed=0, whitened=False):
    rng = np.random.default_rng(seed)
    feats = rng.gamma(0.7, 1.3, size=(n, dim)).astype(np.float32)
    feats[0, :3] = [0.0, 1e-30, 123456.789]
    whitening = None
    if whitened:
        from search_utils.engine import whitening_arrays

        whitening = whitening_arrays(feats)
    return St.FeatureStore(AWKWARD_PATHS[:n], feats, {"model": "resnet50", "weights": "imagenet"}, whitening)


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


# ---------------------------------------------------------------- what the store refuses to read, and how it writes


def test_binary_files_are_not_features_files_and_rows_are_never_quoted_at_length(tmp_path):
    """An image, the indexing state, the whitening file, random bytes: one
    short line, not a "row" of binary quoted for hundreds of characters."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "picture.png")
    St.save_features(str(tmp_path / "f.csv"), sample_store())
    (tmp_path / "state.sqlite").write_bytes(b"SQLite format 3\0" + bytes(range(256)) * 8)
    np.savez(tmp_path / "w.npz", mean=np.ones(3))
    for name in ("picture.png", "state.sqlite", "w.npz"):
        with pytest.raises(FeaturesFileError) as error:
            St.load_features(str(tmp_path / name))
        assert str(error.value) == (f"{tmp_path / name} is not a features file (binary data, neither the CSV "
                                    f"nor the HDF5 format)")
    (tmp_path / "text.csv").write_text("x" * 5000 + "\n" + "y,1\n")  # no NUL: read as text
    with pytest.raises(FeaturesFileError, match="not a features file") as error:
        St.load_features(str(tmp_path / "text.csv"))
    assert len(str(error.value)) < len(str(tmp_path)) + 200
    with pytest.raises(FeaturesFileError, match=r"first row \(\{\) has no feature values"):
        St.load_features(str(tmp_path / "f.csv.meta.json"))


def test_csv_values_python_reads_but_no_features_file_holds(tmp_path):
    """`1_0` is 10 to Python's float(): refused. A value too large for
    float32 is named, with no warning printed before the error."""
    import warnings

    with pytest.raises(FeaturesFileError, match=r"row 2, column 3 is not a number: '1_0'"):
        St.load_features(write_text(tmp_path, "a.png,1,2\nb.png,3,1_0\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would become this test's failure
        with pytest.raises(FeaturesFileError, match=r"row 2, column 2 is 1e\+39, too large for float32"):
            St.load_features(write_text(tmp_path, "a.png,1,2\nb.png,1e39,2\n"))
    spaced = St.load_features(write_text(tmp_path, "a.png,1,2\nb.png, 1.5 ,+2\n"))  # harmless: read as numbers
    assert spaced.features[1].tolist() == [1.5, 2.0]


@pytest.mark.parametrize("version, says", [
    (99, "has features format version 99, this tool reads up to 1: upgrade search_utils"),
    ("1", "its metadata's format_version (the format's version) is \"1\", not a whole number"),
])
def test_csv_metadata_from_a_newer_format_is_refused_as_hdf5_is(tmp_path, version, says):
    path = write_text(tmp_path, "a.png,1,2\n")
    (tmp_path / "features.csv.meta.json").write_text(json.dumps({"format_version": version}))
    with pytest.raises(FeaturesFileError, match=re.escape(says)):
        St.load_features(path)


def test_a_metadata_file_holding_no_model_says_so(tmp_path):
    from search_utils.engine import store_model
    from search_utils.errors import ModelMismatchError

    path = write_text(tmp_path, "a.png,1,2\n")
    (tmp_path / "features.csv.meta.json").write_text("{}")
    with pytest.raises(ModelMismatchError, match=r"the post's resnet50 \(metadata file .*features.csv.meta.json "
                                                 r"holds no model\) gives 2048"):
        store_model(St.load_features(path))
    os.unlink(tmp_path / "features.csv.meta.json")
    with pytest.raises(ModelMismatchError, match=r"\(no metadata file\)"):
        store_model(St.load_features(path))


def test_temporary_names_fit_any_name_the_file_system_takes(tmp_path):
    """The temporary file is named after the target, cut to fit: an HDF5
    file named with 255 bytes is written (its temporary would have been
    269), and a CSV file as long as its sidecars' names allow (236 bytes:
    `.whitening.npz.next` makes 255; its temporary would have been 283)."""
    for length, suffix in ((236, ".csv"), (255, ".h5")):
        path = tmp_path / ("n" * (length - len(suffix)) + suffix)
        St.save_features(str(path), sample_store(whitened=True))
        assert St.load_features(str(path)).paths == AWKWARD_PATHS
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_only_temporaries_whose_writer_is_gone_are_removed(tmp_path):
    """A writer holds a lock on its temporary file: cleaning up while it
    writes leaves that file alone; one nobody holds (its writer was killed)
    is removed, as is nothing else."""
    path = tmp_path / "features.h5"
    dead = tmp_path / ".features.h5.abcd1234.tmp"  # as a writer killed -9 left it
    dead.write_bytes(b"half written")
    others = [tmp_path / ".features.h5.notes.tmp", tmp_path / ".other.h5.abcd1234.tmp"]  # not one of ours
    for other in others:
        other.write_bytes(b"keep me")
    with St.atomic_write(str(path), binary=True) as handle:
        assert not dead.exists()  # removed as the write began
        handle.write(b"x")
        (live,) = [p for p in tmp_path.iterdir() if p.name.startswith(".features.h5.") and p not in others]
        St.remove_stale_temporaries(str(path))  # as another process would, meanwhile
        assert live.exists()
    assert path.read_bytes() == b"x" and not live.exists()
    assert all(other.read_bytes() == b"keep me" for other in others)
