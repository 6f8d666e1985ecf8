"""Feature values no distance can use, and the other ways a features file
can hold numbers or names the commands must refuse in one line: NaN and
infinity (also random bytes over an HDF5 file's data, memory-mapped or read
whole, on the exact and the approximate path), negative values for chi2,
values too large for float32 arithmetic, rows of zeros, no values at all,
empty paths, and what convert_features.py may write.

Real files, real commands in subprocesses. The features are written
directly (no model): metadata naming efficientnet_lite0 with its 1280
values, and queries that are indexed paths, whose stored rows are reused.
"""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest

from conftest import assert_one_line_error, draw_picture, permission_runner, run_as_user, run_command
from search_utils import ann, modes
from search_utils import search as S
from search_utils import store as St
from search_utils.engine import store_model, whitening_arrays
from search_utils.errors import FeaturesFileError, ModelMismatchError, SearchUtilsError

SEARCH, EVALUATE, CONVERT = "imagenet_search.py", "evaluate.py", "convert_features.py"
MODEL = {"model": "efficientnet_lite0", "feature_dim": 1280}
DIM = 1280
METRICS = ("chi2", "cosine", "euclidean", "whitened")


def image_paths(n):
    """Two folders (labels for evaluate.py), names that say their row."""
    return [f"imgs/{'cat' if i % 2 else 'dog'}/row{i + 1}.jpg" for i in range(n)]


def features(n=8, seed=0):
    return np.random.default_rng(seed).gamma(0.5, 0.6, size=(n, DIM)).astype(np.float32)


def write(path, feats, metadata=MODEL, whitened=False, paths=None):
    paths = image_paths(len(feats)) if paths is None else paths
    St.save_features(str(path), St.FeatureStore(paths, feats, dict(metadata),
                                                 whitening_arrays(feats) if whitened else None))
    return path


def search(cwd, features_file, *args, query=None):
    query = query or image_paths(1)[0]
    if not (cwd / query).exists():  # search takes a query that exists (its stored row is reused)
        (cwd / query).parent.mkdir(parents=True, exist_ok=True)
        draw_picture(1, size=(32, 32)).save(cwd / query, format="PNG")
    return run_command(SEARCH, "--query", query, "--featuresPath", features_file, "--no-plot", *args, cwd=cwd)


def overwrite_values(path, row, values, dtype=np.float32):
    """Write raw `values` over row `row` of a contiguous HDF5 features
    dataset, in place, as a disk fault or another program would: not
    through HDF5."""
    with h5py.File(path, "r") as f:
        dset = f["features"]
        offset = dset.id.get_offset() + row * dset.shape[1] * dset.dtype.itemsize
    raw = np.asarray(values, dtype=dtype).tobytes()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(raw)


def distances_of(result):
    assert result.returncode == 0, result.stderr
    return [hit["distance"] for hit in json.loads(result.stdout)["results"]]


# ------------------------------------------------ NaN and infinity in HDF5


def test_memory_mapped_file_loads_lazily_and_bad_rows_stay_unread(tmp_path):
    # What the search tests below rely on: the file is memory-mapped, and
    # loading it does not read (or check) the rows.
    path = write(tmp_path / "f.h5", features())
    overwrite_values(path, 3, [np.nan] * 4)
    loaded = St.load_features(str(path), mmap=True)
    assert isinstance(loaded.features, np.memmap)
    with pytest.raises(FeaturesFileError, match=r"row 4 \(imgs/cat/row4.jpg\), value 1 of 1280 is not a finite"):
        St.load_features(str(path))  # read whole: checked at once


@pytest.mark.parametrize("metric", METRICS)
def test_nan_in_memory_mapped_hdf5_is_refused_by_every_mode(tmp_path, metric):
    path = write(tmp_path / "f.h5", features())
    values = features(1, seed=5)[0]
    values[7] = np.nan
    overwrite_values(path, 3, values)
    result = search(tmp_path, "f.h5", "--metric", metric)
    assert_one_line_error(result, "malformed features file f.h5", "row 4 (imgs/cat/row4.jpg)",
                          "value 8 of 1280 is not a finite number (nan)")


@pytest.mark.parametrize("value, metric", [(np.inf, "chi2"), (-np.inf, "euclidean"), (np.inf, "cosine")])
def test_infinity_in_memory_mapped_hdf5_is_refused(tmp_path, value, metric):
    path = write(tmp_path / "f.h5", features())
    overwrite_values(path, 6, np.full(DIM, value))
    result = search(tmp_path, "f.h5", "--metric", metric, "--exact")
    assert_one_line_error(result, "f.h5", "row 7 (imgs/dog/row7.jpg)",
                          f"value 1 of 1280 is not a finite number ({value})")


@pytest.mark.parametrize("metric", ["chi2", "cosine"])
def test_random_bytes_over_the_data_are_refused(tmp_path, metric):
    path = write(tmp_path / "f.h5", features())
    garbage = np.random.default_rng(7).integers(0, 256, size=DIM * 4, dtype=np.uint8)
    overwrite_values(path, 5, garbage, dtype=np.uint8)
    result = search(tmp_path, "f.h5", "--metric", metric)
    # Random float32 bit patterns: NaN, infinities, huge and negative values.
    assert_one_line_error(result, "malformed features file f.h5", "row 6 (imgs/cat/row6.jpg), value")


def test_nan_in_an_hdf5_file_read_whole_is_refused_at_load_by_every_command(tmp_path):
    # After an append the features are chunked: not mappable, read whole.
    path = write(tmp_path / "f.h5", features())
    St.append_features(str(path), ["imgs/dog/new.jpg"], features(1, seed=3))
    with h5py.File(path, "r+") as f:
        assert f["features"].chunks is not None
        f["features"][2, 10] = np.inf
    expected = ("malformed features file f.h5",
                "row 3 (imgs/dog/row3.jpg), value 11 of 1280 is not a finite number (inf)")
    assert_one_line_error(search(tmp_path, "f.h5"), *expected)
    assert_one_line_error(run_command(EVALUATE, "f.h5", "--metric", "cosine", cwd=tmp_path), *expected)
    assert_one_line_error(run_command(CONVERT, "f.h5", "out.csv", cwd=tmp_path), *expected)
    assert not (tmp_path / "out.csv").exists()


def test_float64_values_too_large_for_float32_are_named(tmp_path):
    path = write(tmp_path / "f.h5", features(4))
    wide = features(4).astype(np.float64)
    wide[1, 2] = 1e39  # a float64 file (written by another tool): becomes inf in float32
    with h5py.File(path, "r+") as f:
        del f["features"]
        f.create_dataset("features", data=wide)
    assert_one_line_error(search(tmp_path, "f.h5"), "f.h5", "row 2 (imgs/cat/row2.jpg), value 3 of 1280 is 1e+39, "
                          "too large for float32")


@pytest.mark.parametrize("dtype", ["int32", "uint8", "bool"])
def test_features_dataset_of_integers_is_refused(tmp_path, dtype):
    path = write(tmp_path / "f.h5", features(4))
    with h5py.File(path, "r+") as f:
        del f["features"]
        f.create_dataset("features", data=np.ones((4, DIM), dtype=dtype))
    assert_one_line_error(search(tmp_path, "f.h5"), "malformed features file f.h5", f"'features' is {dtype}")


def test_nan_in_a_stored_whitening_is_learned_again(tmp_path):
    feats = features(12)
    path = write(tmp_path / "f.h5", feats, whitened=True)
    with h5py.File(path, "r") as f:
        whitened = f["whitening/vectors"][()]
    bad = whitened.copy()
    bad[4, 0] = np.nan
    with h5py.File(path, "r+") as f:
        f["whitening/vectors"][...] = bad
    assert St.load_features(str(path)).whitening_arrays is None  # read whole: dropped as damaged
    mapped = St.load_features(str(path), mmap=True)
    assert isinstance(mapped.whitened_vectors, np.memmap)  # mapped: checked where searched
    notes = []
    space = modes.search_space(mapped, "whitened", warn=notes.append, source="f.h5")
    assert np.isfinite(space.vectors).all()
    assert len(notes) == 1 and "holds values that are not finite numbers" in notes[0]
    result = search(tmp_path, "f.h5", "--metric", "whitened", "--json")
    assert all(math.isfinite(d) for d in distances_of(result))
    assert "not finite numbers (damaged?); learned it from 12 images" in result.stderr


# ------------------------------------------------ the approximate (ANN) path


def ann_file(tmp_path, feats):
    """A features file with a fresh ANN index beside it, so chi2 searches go
    through the index (its candidates are every row of these small files)."""
    path = write(tmp_path / "f.h5", feats)
    store = St.load_features(str(path), mmap=True)
    assert ann.ensure_index(str(path), store, threshold=16, note=lambda message: None) == str(path) + ".ann"
    return path


def test_ann_path_checks_the_candidate_rows_it_reads(tmp_path):
    rows = 4 * ann.DIGEST_ROWS
    feats = features(rows)
    path = ann_file(tmp_path, feats)
    assert "approximate search" in search(tmp_path, "f.h5").stderr  # the index is used
    # A row the fingerprint doesn't sample, its bytes replaced, the mtime
    # kept: the index still counts as fresh, and reads it as a candidate.
    sampled = set(np.unique(np.linspace(0, rows - 1, ann.DIGEST_ROWS).astype(int)))
    row = next(r for r in range(rows // 2, rows) if r not in sampled)
    stat = os.stat(path)
    bad = feats[row].copy()
    bad[3] = np.nan
    overwrite_values(path, row, bad)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    store = St.load_features(str(path), mmap=True)
    index = ann.fresh_index(str(path), store.features)
    if index is None:
        pytest.skip("every row is in the index's fingerprint here: can't keep it fresh over a changed row")
    check = S.ValueCheck("f.h5", store.paths, "chi2")
    with pytest.raises(S.FeatureValuesError, match=rf"row {row + 1} \(imgs/.*/row{row + 1}.jpg\), value 4 of 1280"):
        ann.nearest(index, check.reading(store.features), store.paths, check.query(feats[0]), 5)
    assert_one_line_error(search(tmp_path, "f.h5"), "malformed features file f.h5", f"row {row + 1} (",
                          "value 4 of 1280 is not a finite number (nan)")


def test_ann_path_refuses_negative_candidates_and_a_negative_query(tmp_path):
    feats = features(40)
    feats[9, 100] = -2.5  # the ANN index builds (its sqrt map clips negatives); chi2 must not
    ann_file(tmp_path, feats)
    candidate = search(tmp_path, "f.h5")
    assert_one_line_error(candidate, "features file f.h5", "row 10 (imgs/cat/row10.jpg), value 101 of 1280 is "
                          "negative (-2.5)", "--metric cosine or euclidean")
    query = search(tmp_path, "f.h5", query="imgs/cat/row10.jpg")
    assert_one_line_error(query, "the query's features (searching f.h5), value 101 of 1280 is negative (-2.5)",
                          "--metric cosine or euclidean")
    fine = search(tmp_path, "f.h5", "--metric", "cosine", "--json")
    assert all(math.isfinite(d) and d >= -1e-6 for d in distances_of(fine))


# ------------------------------------------------ negative values


@pytest.mark.parametrize("name", ["f.csv", "f.h5"])
def test_negative_values_are_refused_for_chi2_and_accepted_by_the_other_modes(tmp_path, name):
    feats = features(6)
    feats[2, 5] = -3.0
    write(tmp_path / name, feats)
    refused = search(tmp_path, name)
    assert_one_line_error(refused, f"features file {name}",
                          "row 3 (imgs/dog/row3.jpg), value 6 of 1280 is negative (-3)",
                          "chi2 needs non-negative features", "use --metric cosine or euclidean")
    assert refused.stdout == ""
    for metric in ("cosine", "euclidean", "whitened"):
        result = search(tmp_path, name, "--metric", metric, "--json", "-n", "6")
        assert all(math.isfinite(d) and d >= -1e-6 for d in distances_of(result)), metric


def test_evaluate_refuses_negative_values_for_chi2_like_search(tmp_path):
    feats = features(8)
    feats[4, 0] = -0.5
    write(tmp_path / "f.csv", feats)
    assert_one_line_error(run_command(EVALUATE, "f.csv", cwd=tmp_path), "features file f.csv",
                          "row 5 (imgs/dog/row5.jpg), value 1 of 1280 is negative (-0.5)",
                          "--metric cosine or euclidean")
    result = run_command(EVALUATE, "f.csv", "--metric", "cosine", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["queries"] == 8


def test_negative_zero_is_not_negative():
    feats = features(3)
    feats[1, :10] = -0.0
    S.ValueCheck("f.csv", image_paths(3), "chi2").rows(feats)
    assert S.ValueCheck("f.csv", image_paths(3), "chi2").query(feats[1]).shape == (DIM,)


def test_the_check_finds_the_first_bad_row_past_many_clean_blocks(monkeypatch):
    monkeypatch.setattr(S, "CHECK_BLOCK_BYTES", 64 * 4 * 5)  # 5 rows a block
    feats = np.random.default_rng(1).random((3000, 64), dtype=np.float32)
    feats[2777, 9] = -1e-30
    feats[2899, 1] = np.nan
    assert S.first_bad_row(feats) == 2899
    assert S.first_bad_row(feats, non_negative=True) == 2777
    assert S.first_bad_row(feats[:2777], non_negative=True) is None
    check = S.ValueCheck("f.h5", [f"p{i}" for i in range(3000)], "chi2")
    checked = check.reading(feats)
    assert checked[10:20].shape == (10, 64)
    with pytest.raises(S.FeatureValuesError, match=r"row 2778 \(p2777\), value 10 of 64 is negative"):
        checked[np.array([5, 2777, 2899])]
    with pytest.raises(S.FeatureValuesError, match=r"row 2900 \(p2899\), value 2 of 64 is not a finite"):
        checked[2850:2950:7]  # a strided slice: row 2900 is in it, the negative row isn't


# ------------------------------------------------ zeros, huge values, no values


@pytest.mark.parametrize("metric", METRICS)
def test_a_row_of_zeros_gives_finite_distances(tmp_path, metric):
    feats = features(6)
    feats[0] = 0.0  # chi2: 0 / (0 + 0 + eps) term by term; cosine: a zero vector
    write(tmp_path / "f.h5", feats)
    as_query = search(tmp_path, "f.h5", "--metric", metric, "--json", "-n", "6")
    distances = distances_of(as_query)
    assert len(distances) == 6 and all(math.isfinite(d) for d in distances)


def test_values_too_large_for_float32_arithmetic_are_refused_before_they_overflow(tmp_path):
    feats = features(5)
    feats[3, 1] = 3e38  # a finite float32: both readers take it, but its square overflows
    write(tmp_path / "f.csv", feats)
    for metric in ("chi2", "euclidean"):
        assert_one_line_error(search(tmp_path, "f.csv", "--metric", metric), "malformed features file f.csv",
                              "row 4 (imgs/cat/row4.jpg), value 2 of 1280 is 3e+38, too large")


def test_values_up_to_the_limit_give_finite_distances_in_every_metric():
    rows = np.zeros((3, DIM), np.float32)
    rows[0] = S.VALUE_LIMIT
    rows[1, ::2] = S.VALUE_LIMIT
    query = np.full(DIM, 0.5, np.float32)
    for metric in S.METRICS:
        assert np.isfinite(S.distances(rows, query, metric)).all(), metric
    signed = rows.copy()
    signed[2] = -S.VALUE_LIMIT
    for metric in ("cosine", "euclidean"):
        assert np.isfinite(S.distances(signed, -query * 2e18, metric)).all(), metric


def test_hdf5_with_no_values_per_row_is_refused(tmp_path):
    write(tmp_path / "f.h5", np.zeros((3, 0), np.float32), metadata={"model": "efficientnet_lite0"})
    expected = ("malformed features file f.h5", "no feature values (0 per image)")
    assert_one_line_error(search(tmp_path, "f.h5"), *expected)
    # Converting it would have written a CSV of paths alone, which the CSV reader refuses.
    assert_one_line_error(run_command(CONVERT, "f.h5", "out.csv", cwd=tmp_path), *expected)
    assert not (tmp_path / "out.csv").exists()


def test_hdf5_metadata_with_a_dimension_that_is_not_a_number_is_named(tmp_path):
    path = write(tmp_path / "f.h5", features(3))
    with h5py.File(path, "r+") as f:
        metadata = json.loads(f.attrs["metadata"])
        f.attrs["metadata"] = json.dumps({**metadata, "feature_dim": "1280"})
    assert_one_line_error(search(tmp_path, "f.h5"), "malformed features file f.h5",
                          "its metadata's feature_dim (values per image) is \"1280\", not a whole number")


def test_csv_metadata_with_a_count_that_is_not_a_number_is_named(tmp_path):
    write(tmp_path / "f.csv", features(3))
    meta = tmp_path / "f.csv.meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "count": "3"}))
    assert_one_line_error(search(tmp_path, "f.csv"), "malformed features file f.csv",
                          "its metadata's count (rows) is \"3\", not a whole number")


# ------------------------------------------------ empty paths


def test_empty_path_in_csv_is_refused_by_every_command(tmp_path):
    (tmp_path / "f.csv").write_text("imgs/a.jpg,1,2\n,3,4\nimgs/b.jpg,5,6\n")
    expected = ("malformed features file f.csv", "row 2 has no image path")
    assert_one_line_error(run_command(SEARCH, "-q", "imgs/a.jpg", "-f", "f.csv", "--no-plot", cwd=tmp_path), *expected)
    assert_one_line_error(run_command(EVALUATE, "f.csv", cwd=tmp_path), *expected)
    assert_one_line_error(run_command(CONVERT, "f.csv", "f.h5", cwd=tmp_path), *expected)
    assert not (tmp_path / "f.h5").exists()


def test_empty_path_in_hdf5_is_refused_by_every_command(tmp_path):
    paths = image_paths(4)
    paths[2] = ""
    write(tmp_path / "f.h5", features(4), paths=paths)
    expected = ("malformed features file f.h5", "row 3 has no image path (an empty string)")
    assert_one_line_error(search(tmp_path, "f.h5"), *expected)
    assert_one_line_error(run_command(EVALUATE, "f.h5", cwd=tmp_path), *expected)
    assert_one_line_error(run_command(CONVERT, "f.h5", "f.csv", cwd=tmp_path), *expected)
    assert not (tmp_path / "f.csv").exists()


# ------------------------------------------------ what convert writes


def test_everything_convert_writes_the_other_reader_takes_back(tmp_path):
    feats = features(5)
    feats[0, :6] = [0.0, -0.0, 1e-45, -2.0, 3e38, np.float32(1) / 3]  # subnormal, negative, huge: all finite
    write(tmp_path / "a.csv", feats)
    for source, target, extra in (("a.csv", "b.h5", ()), ("b.h5", "c.csv", ()), ("c.csv", "d.h5", ())):
        result = run_command(CONVERT, source, target, *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        back = St.load_features(str(tmp_path / target))
        assert np.array_equal(back.features, feats) and back.paths == image_paths(5)
    small = features(5)
    write(tmp_path / "small.csv", small)
    result = run_command(CONVERT, "small.csv", "half.h5", "--float16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_command(CONVERT, "half.h5", "half.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert np.allclose(St.load_features(str(tmp_path / "half.csv")).features, small, rtol=1e-3, atol=1e-4)


def test_convert_refuses_values_float16_cannot_hold(tmp_path):
    feats = features(4)
    feats[2, 0] = 70000.0
    write(tmp_path / "f.csv", feats)
    result = run_command(CONVERT, "f.csv", "f.h5", "--float16", cwd=tmp_path)
    assert_one_line_error(result, "f.csv holds values up to 70000 (first in row 3, imgs/dog/row3.jpg)",
                          "beyond float16's 65504", "convert without --float16")
    assert not (tmp_path / "f.h5").exists()


def test_convert_refuses_a_nul_in_a_path_for_hdf5(tmp_path):
    (tmp_path / "f.csv").write_bytes(b"imgs/a.jpg,1,2\nimgs/b\x00c.jpg,3,4\n")
    result = run_command(CONVERT, "f.csv", "f.h5", cwd=tmp_path)
    assert_one_line_error(result, "malformed features file f.csv", "row 2 (imgs/b\\x00c.jpg) has a NUL character")
    assert not (tmp_path / "f.h5").exists()


def untouched(path):
    return path.read_bytes(), os.stat(path).st_mtime_ns


@pytest.mark.parametrize("output, says", [
    ("missing/out.h5", "folder {tmp}/missing does not exist"),
    ("folder.h5", "cannot write folder.h5: it is a folder"),
    ("f.csv/out.h5", "folder {tmp}/f.csv is a file, not a folder"),
])
def test_convert_checks_where_it_writes_before_reading(tmp_path, output, says):
    write(tmp_path / "f.csv", features(3))
    (tmp_path / "folder.h5").mkdir()
    bad = write(tmp_path / "bad.h5", features(3))
    overwrite_values(bad, 0, [np.nan])  # the input is never read: its fault is not what is reported
    before = untouched(tmp_path / "bad.h5")
    result = run_command(CONVERT, "bad.h5", output, cwd=tmp_path)
    assert_one_line_error(result, says.format(tmp=tmp_path))
    assert untouched(tmp_path / "bad.h5") == before
    assert sorted(os.listdir(tmp_path)) == ["bad.h5", "f.csv", "f.csv.meta.json", "folder.h5"]
    assert os.listdir(tmp_path / "folder.h5") == []


def test_convert_into_a_read_only_folder(tmp_path):
    if permission_runner()[1] is not None:
        pytest.skip(permission_runner()[1])
    write(tmp_path / "f.h5", features(3))
    locked = tmp_path / "locked"
    locked.mkdir()
    before = untouched(tmp_path / "f.h5")
    locked.chmod(0o555)
    try:
        result = run_as_user(CONVERT, "f.h5", "locked/out.csv", cwd=tmp_path)
        listing = os.listdir(locked)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result, "cannot write locked/out.csv", "Permission denied")
    assert listing == []
    assert untouched(tmp_path / "f.h5") == before


# ------------------------------------------------ metadata that names no model


@pytest.mark.parametrize("metadata, says", [
    ({"feature_dim": DIM}, "its metadata names no model"),
    ({"model": None, "feature_dim": DIM}, "its metadata names no model"),
])
def test_metadata_without_a_model_is_not_called_missing(tmp_path, metadata, says):
    write(tmp_path / "f.csv", features(3), metadata=metadata)
    assert (tmp_path / "f.csv.meta.json").exists()
    result = search(tmp_path, "f.csv")
    assert_one_line_error(result, f"the post's resnet50 ({says}) gives 2048")
    assert "no metadata file" not in result.stderr


def test_no_metadata_file_is_still_called_that(tmp_path):
    (tmp_path / "f.csv").write_text("".join(f"{p},1,2,3\n" for p in image_paths(3)))
    assert_one_line_error(search(tmp_path, "f.csv"), "the post's resnet50 (no metadata file) gives 2048")


def test_store_model_with_odd_metadata():
    store = St.FeatureStore(image_paths(2), np.ones((2, 2048), np.float32),
                            {"model": None, "preprocessing": None, "weights": 5, "precision": "fp64"})
    model = store_model(store)
    assert (model.spec.name, model.assumed, model.weights, model.precision) == ("resnet50", True, None, "float32")
    with pytest.raises(ModelMismatchError, match=r"its metadata names no model"):
        store_model(St.FeatureStore(image_paths(2), np.ones((2, 3), np.float32), {"model": None}))
    for model_name, says in ((42, "names model 42, which is not a model name"),
                             (["resnet50"], "which is not a model name"),
                             ("nosuch", "metadata names unknown model 'nosuch'")):
        with pytest.raises(SearchUtilsError, match=says):
            store_model(St.FeatureStore(image_paths(2), np.ones((2, 3), np.float32), {"model": model_name}))


def test_convert_does_not_copy_a_whitening_holding_nan(tmp_path):
    feats = features(8)
    arrays = whitening_arrays(feats)
    arrays["mean"][3] = np.nan
    St.save_features(str(tmp_path / "f.csv"), St.FeatureStore(image_paths(8), feats, dict(MODEL), arrays))
    assert St.load_features(str(tmp_path / "f.csv")).whitening_arrays is not None  # the CSV side keeps it
    result = run_command(CONVERT, "f.csv", "f.h5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "holds values that are not finite numbers (damaged?); not copied" in result.stderr
    converted = St.load_features(str(tmp_path / "f.h5"))
    assert converted.whitening_arrays is None and np.array_equal(converted.features, feats)
    searched = search(tmp_path, "f.csv", "--metric", "whitened", "--json")
    assert all(math.isfinite(d) for d in distances_of(searched))
    assert "learned it from 8 images" in searched.stderr
