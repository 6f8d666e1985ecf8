"""The binary (HDF5) features format, and the one store API over CSV and HDF5."""

import json
import os

import h5py
import numpy as np
import pytest

from conftest import assert_one_line_error, draw_picture, run_command
from search_utils import modes
from search_utils import store as St
from search_utils.store import atomic, hdf5_format
from search_utils.engine import whitening_arrays
from search_utils.errors import FeaturesFileError
from test_store import AWKWARD_PATHS

CONVERT = "convert_features.py"


def sample_store(n=len(AWKWARD_PATHS), dim=16, seed=0, whitened=False, metadata=None):
    rng = np.random.default_rng(seed)
    feats = rng.gamma(0.7, 1.3, size=(n, dim)).astype(np.float32)
    feats[0, :4] = [0.0, 1e-30, 123.456789, np.float32(1) / 3][:dim]
    paths = [AWKWARD_PATHS[i] if i < len(AWKWARD_PATHS) else f"extra/{i}.png" for i in range(n)]
    return St.FeatureStore(paths, feats, dict(metadata or {"model": "resnet50", "weights": "imagenet"}),
                           whitening_arrays(feats) if whitened else None)


def hdf5_layout(path):
    with h5py.File(path, "r") as f:
        return f["features"].chunks, f["features"].dtype, "whitening" in f


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["features.h5", "features.hdf5", "FEATURES.H5", "Features.Hdf5"])
def test_hdf5_round_trip_keeps_awkward_paths_and_exact_floats(tmp_path, name):
    path = tmp_path / name
    original = sample_store()
    St.save_features(str(path), original)
    assert path.read_bytes().startswith(St.HDF5_SIGNATURE)
    assert os.listdir(tmp_path) == [name]  # one file: no sidecar, no temporary left
    loaded = St.load_features(str(path))
    assert loaded.paths == original.paths
    assert loaded.features.dtype == np.float32
    assert np.array_equal(loaded.features, original.features)
    assert loaded.metadata == {**original.metadata, "count": len(original), "feature_dim": 16}
    assert loaded.whitening_arrays is None


def test_paths_are_stored_as_utf8_strings(tmp_path):
    path = tmp_path / "f.h5"
    St.save_features(str(path), sample_store())
    with h5py.File(path, "r") as f:
        info = h5py.check_string_dtype(f["paths"].dtype)
        assert (info.encoding, info.length) == ("utf-8", None)
        raw = list(f["paths"][()])
        assert raw[7] == "icons/ünïcødé 图像 🙂.png".encode("utf-8")
        assert raw[8] == b"icons/latin1-\xe9.png"  # the file name's own bytes
        assert json.loads(f.attrs["metadata"])["count"] == len(AWKWARD_PATHS)


def test_metadata_and_whitening_round_trip_in_the_one_file(tmp_path):
    path = tmp_path / "f.h5"
    original = sample_store(n=40, whitened=True, metadata={"model": "resnet50", "nested": {"a": [1, 2.5, None]}})
    St.save_features(str(path), original)
    assert os.listdir(tmp_path) == ["f.h5"]
    loaded = St.load_features(str(path))
    assert loaded.metadata["nested"] == {"a": [1, 2.5, None]} and loaded.metadata["count"] == 40
    assert set(loaded.whitening_arrays) == {"mean", "projection", "vectors"}
    for key, value in original.whitening_arrays.items():
        assert np.array_equal(loaded.whitening_arrays[key], value), key
    notes = []
    space = modes.search_space(loaded, "whitened", warn=notes.append)
    assert not notes  # the stored whitening is used, not learned again
    assert np.array_equal(space.vectors, original.whitening_arrays["vectors"])


def test_float16_storage_is_smaller_and_loads_as_float32(tmp_path):
    original = sample_store(n=64, dim=256)
    St.save_features(str(tmp_path / "f32.h5"), original)
    St.save_features(str(tmp_path / "f16.h5"), original, dtype="float16")
    assert hdf5_layout(tmp_path / "f16.h5")[1] == np.float16
    assert os.path.getsize(tmp_path / "f16.h5") < 0.6 * os.path.getsize(tmp_path / "f32.h5")
    for mmap in (False, True):
        loaded = St.load_features(str(tmp_path / "f16.h5"), mmap=mmap)
        assert type(loaded.features) is np.ndarray and loaded.features.dtype == np.float32
        # float16: 11 significant bits; 1e-30 is below its smallest subnormal (6e-8).
        np.testing.assert_allclose(loaded.features, original.features, rtol=2.0 ** -11, atol=2.0 ** -24)
        assert loaded.paths == original.paths


def test_float16_refuses_what_it_cannot_hold_and_csv_has_no_float16(tmp_path):
    store = sample_store()
    store.features[1, 1] = 1e6
    with pytest.raises(ValueError, match="don't fit float16"):
        St.save_features(str(tmp_path / "f.h5"), store, dtype="float16")
    with pytest.raises(ValueError, match="float16 storage is for HDF5"):
        St.save_features(str(tmp_path / "f.csv"), sample_store(), dtype="float16")
    with pytest.raises(ValueError, match="float32 or float16"):
        St.save_features(str(tmp_path / "f.h5"), sample_store(), dtype="int8")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- mmap and chunks


def test_mmap_load_maps_the_file_read_only(tmp_path):
    path = str(tmp_path / "f.h5")
    original = sample_store(n=40, whitened=True)
    St.save_features(path, original)
    mapped = St.load_features(path, mmap=True)
    assert isinstance(mapped.features, np.memmap) and mapped.features.dtype == np.float32
    assert not mapped.features.flags.writeable
    assert np.array_equal(mapped.features, original.features)
    assert isinstance(mapped.whitening_arrays["vectors"], np.memmap)
    assert np.array_equal(mapped.whitening_arrays["vectors"], original.whitening_arrays["vectors"])
    assert mapped.paths == original.paths and mapped.metadata == St.load_features(path).metadata
    from search_utils.search import nearest

    hits = nearest(mapped.features, mapped.paths, original.features[5], 3)
    assert hits[0].path == original.paths[5] and hits[0].distance == 0.0


def test_mmap_of_csv_just_reads_it(tmp_path):
    path = str(tmp_path / "f.csv")
    St.save_features(path, sample_store())
    loaded = St.load_features(path, mmap=True)
    assert type(loaded.features) is np.ndarray
    assert np.array_equal(loaded.features, sample_store().features)


@pytest.mark.parametrize("name", ["f.h5", "f.csv"])
def test_chunked_iteration_covers_every_row_in_order(tmp_path, name):
    path = str(tmp_path / name)
    original = sample_store(n=23)
    St.save_features(path, original)
    chunks = list(St.iter_feature_chunks(path, rows=5))
    assert [start for start, _ in chunks] == [0, 5, 10, 15, 20]
    assert [len(rows) for _, rows in chunks] == [5, 5, 5, 5, 3]
    assert all(rows.dtype == np.float32 for _, rows in chunks)
    assert np.array_equal(np.concatenate([rows for _, rows in chunks]), original.features)
    whole = list(St.iter_feature_chunks(path))
    assert len(whole) == 1 and np.array_equal(whole[0][1], original.features)
    with pytest.raises(ValueError, match="at least 1"):
        next(St.iter_feature_chunks(path, rows=0))


def test_chunked_iteration_of_float16_yields_float32(tmp_path):
    path = str(tmp_path / "f.h5")
    St.save_features(path, sample_store(n=10), dtype="float16")
    chunks = list(St.iter_feature_chunks(path, rows=4))
    assert [s for s, _ in chunks] == [0, 4, 8] and all(c.dtype == np.float32 for _, c in chunks)
    assert np.array_equal(np.concatenate([c for _, c in chunks]), St.load_features(path).features)


# ---------------------------------------------------------------- append


def test_append_twice_then_load_is_the_concatenation(tmp_path):
    path = str(tmp_path / "f.h5")
    first = sample_store(n=12, whitened=True)
    second, third = sample_store(n=5, seed=1), sample_store(n=300, seed=2)
    St.save_features(path, first)
    assert hdf5_layout(path) == (None, np.float32, True)  # contiguous: mappable
    St.append_features(path, [f"new/{p}" for p in second.paths], second.features)
    St.append_features(path, [f"more/{p}" for p in third.paths], third.features)
    loaded = St.load_features(path)
    assert loaded.paths == (first.paths + [f"new/{p}" for p in second.paths]
                            + [f"more/{p}" for p in third.paths])
    assert np.array_equal(loaded.features, np.concatenate([first.features, second.features, third.features]))
    assert loaded.metadata == {**first.metadata, "count": 317, "feature_dim": 16}
    # The whitening covered 12 rows: dropped, and learned again when needed, with a note.
    assert loaded.whitening_arrays is None
    notes = []
    modes.search_space(loaded, "whitened", warn=notes.append)
    assert notes and "learned it from 317 images" in notes[0]
    chunks, _, has_whitening = hdf5_layout(path)
    assert chunks is not None and not has_whitening  # resizable now
    mapped = St.load_features(path, mmap=True)  # chunked: read instead of mapped
    assert type(mapped.features) is np.ndarray and np.array_equal(mapped.features, loaded.features)
    # Saving it again makes it contiguous (mappable) again.
    St.save_features(path, loaded)
    assert hdf5_layout(path)[0] is None
    assert isinstance(St.load_features(path, mmap=True).features, np.memmap)
    assert os.listdir(tmp_path) == ["f.h5"]


def test_appending_to_an_appendable_file_extends_it_in_a_copy(tmp_path, monkeypatch):
    path = str(tmp_path / "f.h5")
    St.save_features(path, sample_store(n=100))
    St.append_features(path, ["a.png"], np.ones((1, 16), np.float32))
    os.chmod(path, 0o644)
    copied = []
    real_copy = atomic.copy_file
    monkeypatch.setattr(atomic, "copy_file", lambda src, dst: (copied.append(src), real_copy(src, dst)))
    St.append_features(path, ["b.png", "c.png"], np.full((2, 16), 2, np.float32))
    assert copied == [path]  # not rewritten: the file was copied and extended
    assert os.stat(path).st_mode & 0o777 == 0o644  # the file's permissions are kept
    loaded = St.load_features(path)
    assert loaded.paths[-3:] == ["a.png", "b.png", "c.png"] and loaded.metadata["count"] == 103
    assert np.array_equal(loaded.features[-2:], np.full((2, 16), 2, np.float32))


def test_append_keeps_float16_and_nothing_appended_is_a_no_op(tmp_path):
    path = str(tmp_path / "f.h5")
    St.save_features(path, sample_store(n=8), dtype="float16")
    St.append_features(path, ["x.png"], np.full((1, 16), 0.5, np.float32))
    St.append_features(path, [], np.empty((0, 16), np.float32))
    assert hdf5_layout(path)[1] == np.float16
    loaded = St.load_features(path)
    assert len(loaded) == 9 and loaded.paths[-1] == "x.png" and np.all(loaded.features[-1] == 0.5)


def test_append_to_csv_rewrites_it_in_the_posts_format(tmp_path):
    path = str(tmp_path / "f.csv")
    St.save_features(path, sample_store(n=20, whitened=True))
    St.append_features(path, ["late.png"], np.ones((1, 16), np.float32))
    loaded = St.load_features(path)
    assert len(loaded) == 21 and loaded.paths[-1] == "late.png" and loaded.metadata["count"] == 21
    assert loaded.whitening_arrays is None and not os.path.exists(St.whitening_path(path))
    assert (tmp_path / "f.csv").read_bytes().endswith(b"\nlate.png," + b",".join([b"1.0"] * 16) + b"\n")


def test_append_refuses_rows_that_do_not_fit(tmp_path):
    path = str(tmp_path / "f.h5")
    St.save_features(path, sample_store())
    before = (tmp_path / "f.h5").read_bytes()
    with pytest.raises(FeaturesFileError, match="has 16 values per image, the rows to append have 8"):
        St.append_features(path, ["x.png"], np.ones((1, 8), np.float32))
    with pytest.raises(ValueError, match="2 paths but features of shape"):
        St.append_features(path, ["x.png", "y.png"], np.ones((1, 16), np.float32))
    with pytest.raises(FeaturesFileError, match="not found"):
        St.append_features(str(tmp_path / "missing.h5"), ["x.png"], np.ones((1, 16), np.float32))
    assert (tmp_path / "f.h5").read_bytes() == before


def _explode_after_writing(monkeypatch):
    """Make the next rows written to a dataset be written, then Ctrl-C."""
    real = hdf5_format._write_rows

    def write_then_interrupt(dset, start, rows):
        real(dset, start, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(hdf5_format, "_write_rows", write_then_interrupt)


@pytest.mark.parametrize("appended_before", [False, True], ids=["contiguous-rewrite", "chunked-copy"])
def test_interrupted_append_leaves_the_previous_file_intact(tmp_path, monkeypatch, appended_before):
    path = str(tmp_path / "f.h5")
    St.save_features(path, sample_store(n=30, whitened=True))
    if appended_before:
        St.append_features(path, ["first.png"], np.ones((1, 16), np.float32))
    before = (tmp_path / "f.h5").read_bytes()
    expected = St.load_features(path)
    _explode_after_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        St.append_features(path, ["x.png", "y.png"], np.ones((2, 16), np.float32))
    assert (tmp_path / "f.h5").read_bytes() == before
    assert os.listdir(tmp_path) == ["f.h5"]  # no temporary left behind
    loaded = St.load_features(path)
    assert loaded.paths == expected.paths and np.array_equal(loaded.features, expected.features)
    assert loaded.metadata["count"] == len(expected)


def test_interrupted_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "f.h5")
    St.save_features(path, sample_store())
    before = (tmp_path / "f.h5").read_bytes()
    _explode_after_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        St.save_features(path, sample_store(seed=5))
    assert (tmp_path / "f.h5").read_bytes() == before
    assert os.listdir(tmp_path) == ["f.h5"]


# ---------------------------------------------------------------- formats: dispatch and sniffing


@pytest.mark.parametrize("name", ["f.txt", "f.npy", "features", "f.csv.bak"])
def test_unknown_extension_on_save_is_refused(tmp_path, name):
    with pytest.raises(FeaturesFileError, match=r"use \.csv, \.h5, \.hdf5") as error:
        St.save_features(str(tmp_path / name), sample_store())
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path) == []


def test_upper_case_csv_is_csv(tmp_path):
    St.save_features(str(tmp_path / "F.CSV"), sample_store(n=2, dim=3))
    assert (tmp_path / "F.CSV").read_text().startswith("icons/plain.png,0.0,1e-30,123.45679\n")
    assert (tmp_path / "F.CSV.meta.json").exists()


@pytest.mark.parametrize("name", ["features.bin", "features.csv", "features"])
def test_hdf5_content_loads_whatever_the_name(tmp_path, name):
    St.save_features(str(tmp_path / "f.h5"), sample_store())
    os.rename(tmp_path / "f.h5", tmp_path / name)
    assert St.file_format(str(tmp_path / name)) == "hdf5"
    loaded = St.load_features(str(tmp_path / name))
    assert loaded.paths == AWKWARD_PATHS and np.array_equal(loaded.features, sample_store().features)


def test_csv_text_named_h5_still_loads_as_csv(tmp_path):
    # Before HDF5 support any name was written as CSV, e.g. --output features.h5.
    St.save_features(str(tmp_path / "f.csv"), sample_store(n=20, whitened=True))
    for suffix in ("", ".meta.json", ".whitening.npz"):
        os.rename(tmp_path / f"f.csv{suffix}", tmp_path / f"old.h5{suffix}")
    path = str(tmp_path / "old.h5")
    assert St.file_format(path) == "csv"
    loaded = St.load_features(path)
    assert loaded.metadata["count"] == 20 and loaded.whitening_arrays is not None
    St.append_features(path, ["x.png"], np.ones((1, 16), np.float32))  # stays text
    assert St.file_format(path) == "csv" and len(St.load_features(path)) == 21
    # Saving HDF5 over it removes the CSV's sidecars, which no longer belong to it.
    St.save_features(path, loaded)
    assert St.file_format(path) == "hdf5" and sorted(os.listdir(tmp_path)) == ["old.h5"]


# ---------------------------------------------------------------- bad files


def one_line_error(path, **kwargs):
    with pytest.raises(FeaturesFileError) as error:
        St.load_features(str(path), **kwargs)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_hdf5_is_a_one_line_error(tmp_path):
    path = tmp_path / "f.h5"
    St.save_features(str(path), sample_store(n=200, dim=64))
    data = path.read_bytes()
    for keep in (len(data) // 2, 600, 9):
        path.write_bytes(data[:keep])
        message = one_line_error(path)
        assert "unreadable HDF5 features file" in message
        with pytest.raises(FeaturesFileError, match="unreadable HDF5"):
            list(St.iter_feature_chunks(str(path)))
        with pytest.raises(FeaturesFileError, match="unreadable HDF5"):
            St.append_features(str(path), ["x"], np.ones((1, 64), np.float32))
        assert path.read_bytes() == data[:keep]


def test_corrupt_hdf5_is_a_one_line_error(tmp_path):
    path = tmp_path / "f.h5"
    St.save_features(str(path), sample_store())
    data = bytearray(path.read_bytes())
    data[8:400] = bytes(392)  # the superblock and what follows, zeroed
    path.write_bytes(bytes(data))
    assert "unreadable HDF5 features file" in one_line_error(path)
    path.write_bytes(St.HDF5_SIGNATURE + os.urandom(3000))
    assert "unreadable HDF5 features file" in one_line_error(path)


def test_binary_without_signature_and_empty_files(tmp_path):
    (tmp_path / "f.h5").write_bytes(b"\x00\x01garbage" * 100)
    assert "is not a features file (binary data, neither the CSV nor the HDF5 format; no HDF5 signature" in (
        one_line_error(tmp_path / "f.h5"))
    (tmp_path / "empty.h5").write_bytes(b"")
    assert "features file is empty" in one_line_error(tmp_path / "empty.h5")
    St.save_features(str(tmp_path / "none.h5"), St.FeatureStore([], np.empty((0, 4), np.float32), {}))
    assert "features file is empty" in one_line_error(tmp_path / "none.h5")


def test_an_hdf5_file_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("dense/kernel", data=np.ones((4, 4), np.float32))
    assert "is an HDF5 file but not a features file" in one_line_error(path)


def _edit(path, action):
    with h5py.File(path, "r+") as f:
        action(f)


@pytest.mark.parametrize(
    "action, fragment",
    [
        (lambda f: f.attrs.__setitem__("format_version", 99), "format version 99"),
        (lambda f: f.attrs.__setitem__("metadata", "{not json"), "unreadable metadata"),
        (lambda f: f.attrs.__setitem__("metadata", "[1, 2]"), "metadata is not a JSON object"),
        (lambda f: f.__delitem__("paths"), "no 'features' or no 'paths' dataset"),
        (lambda f: f["paths"].resize((5,)), "5 paths but 10 rows of features"),
        (lambda f: f.attrs.__setitem__("metadata", json.dumps({"count": 12, "feature_dim": 16})),
         "has 10 rows but its metadata says 12: the file contradicts itself"),
        (lambda f: f.attrs.__setitem__("metadata", json.dumps({"count": 10, "feature_dim": 99})),
         "has 16 values per image but its metadata says 99"),
        (lambda f: (f.__delitem__("features"), f.create_dataset("features", data=np.ones((10, 16), np.int32))),
         "'features' is int32"),
    ],
)
def test_inconsistent_hdf5_files_are_refused(tmp_path, action, fragment):
    path = tmp_path / "f.h5"
    St.save_features(str(path), sample_store())
    _edit(path, action)
    assert fragment in one_line_error(path)


# ---------------------------------------------------------------- the commands


def test_convert_csv_to_hdf5_and_back_is_byte_identical(tmp_path):
    original = sample_store(n=50, dim=32, whitened=True)
    St.save_features(str(tmp_path / "orig.csv"), original)
    (tmp_path / "dir").mkdir()
    result = run_command(CONVERT, "orig.csv", "dir/f.h5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "converted 50 images x 32 values (with whitening): orig.csv (csv," in result.stderr
    assert "-> dir/f.h5 (hdf5, float32," in result.stderr
    assert sorted(os.listdir(tmp_path / "dir")) == ["f.h5"]
    result = run_command(CONVERT, "dir/f.h5", "back.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back.csv").read_bytes() == (tmp_path / "orig.csv").read_bytes()
    back_meta, orig_meta = (json.loads((tmp_path / f"{name}.csv.meta.json").read_text()) for name in ("back", "orig"))
    assert back_meta.pop("generation") != orig_meta.pop("generation")  # a new write, with the same content:
    assert back_meta == orig_meta  # the same hash of the same bytes, the same description
    with np.load(tmp_path / "back.csv.whitening.npz") as back, np.load(tmp_path / "orig.csv.whitening.npz") as orig:
        arrays = [k for k in orig if k != "generation"]
        assert sorted(back) == sorted(orig) and all(np.array_equal(back[k], orig[k]) for k in arrays)


def test_convert_to_float16_and_onto_itself(tmp_path):
    St.save_features(str(tmp_path / "f.csv"), sample_store(n=30, dim=64))
    result = run_command(CONVERT, "f.csv", "half.HDF5", "--float16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(hdf5, float16," in result.stderr and hdf5_layout(tmp_path / "half.HDF5")[1] == np.float16
    St.append_features(str(tmp_path / "half.HDF5"), ["x.png"], np.ones((1, 64), np.float32))
    assert hdf5_layout(tmp_path / "half.HDF5")[0] is not None
    result = run_command(CONVERT, "half.HDF5", "half.HDF5", cwd=tmp_path)  # compact, back to float32
    assert result.returncode == 0, result.stderr
    assert hdf5_layout(tmp_path / "half.HDF5")[:2] == (None, np.float32)
    assert len(St.load_features(str(tmp_path / "half.HDF5"), mmap=True)) == 31


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (["f.csv", "out.txt"], 1, ["out.txt", "use .csv, .h5, .hdf5"]),
        (["f.csv", "out.csv", "--float16"], 2, ["--float16 needs an HDF5 output"]),
        (["missing.h5", "out.csv"], 1, ["features file not found: missing.h5"]),
        (["bad.h5", "out.csv"], 1, ["unreadable HDF5 features file bad.h5"]),
        (["weights.h5", "out.csv"], 1, ["not a features file"]),
        (["f.csv"], 2, ["required: output"]),
    ],
)
def test_convert_errors_are_one_line(tmp_path, args, code, fragments):
    St.save_features(str(tmp_path / "f.csv"), sample_store())
    St.save_features(str(tmp_path / "good.h5"), sample_store())
    (tmp_path / "bad.h5").write_bytes((tmp_path / "good.h5").read_bytes()[:1000])
    with h5py.File(tmp_path / "weights.h5", "w") as f:
        f["w"] = np.ones(3)
    result = run_command(CONVERT, *args, cwd=tmp_path)
    assert result.returncode == code
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.txt").exists()


@pytest.fixture
def hdf5_features(tmp_path):
    """A resnet50-sized HDF5 features file (no model needed) with labelled paths."""
    rng = np.random.default_rng(3)
    centres = rng.gamma(0.5, 1.0, (2, 2048))
    paths = [f"imgs/{label}/{i}.png" for label in ("cat", "dog") for i in range(4)]
    feats = np.concatenate([c + 0.05 * rng.random((4, 2048)) for c in centres]).astype(np.float32)
    store = St.FeatureStore(paths, feats, {"model": "resnet50", "base_dir": str(tmp_path)}, whitening_arrays(feats))
    St.save_features(str(tmp_path / "x.h5"), store)
    for seed, path in enumerate(paths):  # search takes a query that exists (its stored row is reused)
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        draw_picture(seed, size=(32, 32)).save(tmp_path / path)
    return tmp_path, store


def test_search_and_evaluate_read_hdf5(hdf5_features):
    work, store = hdf5_features
    result = run_command("imagenet_search.py", "--query", "imgs/dog/2.png", "--featuresPath", "x.h5",
                         "--json", "--no-plot", "-n", "4", cwd=work)
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)["results"]
    assert hits[0]["path"] == "imgs/dog/2.png" and hits[0]["distance"] == 0.0
    assert {h["path"].split("/")[1] for h in hits} == {"dog"}
    result = run_command("evaluate.py", "x.h5", "--json", "--metric", "whitened", cwd=work)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queries"] == 8 and json.loads(result.stdout)["P@1"] == 1.0
    assert "note:" not in result.stderr  # the stored whitening was used


def test_search_with_a_damaged_hdf5_file_is_one_line(hdf5_features):
    work, _ = hdf5_features
    (work / "cut.h5").write_bytes((work / "x.h5").read_bytes()[:5000])
    result = run_command("imagenet_search.py", "--query", "imgs/dog/2.png", "--featuresPath", "cut.h5", cwd=work)
    assert_one_line_error(result, "unreadable HDF5 features file cut.h5")


def test_indexing_into_hdf5_then_searching(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        draw_picture(30 + i).save(images / f"p{i}.png")
    result = run_command("create_imagenet_features.py", "--dataset", "imgs", "--output", "f.h5",
                         "--model", "efficientnet_lite0", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # One file holds features, paths and metadata: no .meta.json, no temporary left
    # (beside it only the indexing state, see test_incremental.py).
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("f.") or n.endswith(".tmp")) == [
        "f.h5", "f.h5.state.sqlite"]
    store = St.load_features(str(tmp_path / "f.h5"))
    assert store.metadata["model"] == "efficientnet_lite0" and store.features.shape == (4, 1280)
    assert store.whitening_arrays is not None
    result = run_command("imagenet_search.py", "--query", "imgs/p2.png", "--featuresPath", "f.h5",
                         "--json", "--no-plot", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["path"] == "imgs/p2.png"
    assert "embedded" not in result.stderr


# ---------------------------------------------------------------- writes the file system refuses


def converted_with_file_size_limit(tmp_path, limit, *args):
    """convert_features.py with writes past `limit` bytes of any file
    refused by the kernel (RLIMIT_FSIZE: EFBIG, as a full disk's ENOSPC)."""
    import resource
    import subprocess
    import sys

    from conftest import REPO, offline_env

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, str(REPO / CONVERT), *args], cwd=tmp_path, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=600, preexec_fn=limited)


@pytest.mark.parametrize("whitened", [False, True])
def test_a_full_disk_while_writing_hdf5_is_one_line_and_keeps_the_earlier_file(tmp_path, whitened):
    """HDF5 itself can't take a failed write (h5py printed tracebacks while
    closing, or the process died of a segmentation fault): it never sees
    one, and the write's own error is the one line."""
    St.save_features(str(tmp_path / "f.csv"), sample_store(n=400, dim=256, whitened=whitened))
    St.save_features(str(tmp_path / "out.h5"), sample_store(n=3))  # the earlier file
    before = (tmp_path / "out.h5").read_bytes()
    result = converted_with_file_size_limit(tmp_path, 60_000, "f.csv", "out.h5")  # the new one is ~420 KB
    assert_one_line_error(result, "cannot write out.h5: File too large; the earlier file (if any) is as it was")
    assert result.returncode == 1
    assert (tmp_path / "out.h5").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_output_is_replaced_and_stays_read_only(tmp_path):
    """Renaming over a 0444 file needs only the folder's permission: the
    write goes ahead, without root's override, and the mode is kept."""
    from conftest import permission_runner, run_as_user

    if permission_runner()[1] is not None:
        pytest.skip(permission_runner()[1])
    St.save_features(str(tmp_path / "f.csv"), sample_store(whitened=True))
    for name in ("out.h5", "out.csv"):
        St.save_features(str(tmp_path / name), sample_store(n=3))
        (tmp_path / name).chmod(0o444)
        result = run_as_user(CONVERT, "f.csv", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o444
        assert St.load_features(str(tmp_path / name)).paths == AWKWARD_PATHS
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".next"))]
