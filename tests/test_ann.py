"""Approximate chi2 search (search_utils/ann.py): recall against the exact
scan, exact distances for what it returns, the index file (round trip,
staleness, atomic writes), and the search command's use of it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import run_command
from search_utils import ann, search
from search_utils.store import FeatureStore, load_features, save_features


def clustered_features(rows: int, dim: int, seed: int = 0, clusters: int = 200, latent: int = 32) -> np.ndarray:
    """Non-negative, ReLU-like features in clusters, low-rank plus noise like
    a backbone's, with a per-row scale (which chi2 sees and an L1-normalised
    map would not). The clusters are the same for every `seed`."""
    shared = np.random.default_rng(99)
    basis = shared.normal(0.0, 1.0, (latent, dim)) * 3 / np.sqrt(latent)
    spectrum = (1.0 + np.arange(latent)) ** -0.5
    centres = shared.normal(0.0, 1.0, (clusters, latent)) * spectrum
    rng = np.random.default_rng(seed)
    z = centres[rng.integers(0, clusters, rows)] + 0.5 * rng.normal(0.0, 1.0, (rows, latent)) * spectrum
    x = z @ basis + 0.5 * rng.normal(0.0, 1.0, (rows, dim))
    x = np.maximum(x - 0.3, 0) * np.exp(rng.normal(0.0, 0.15, (rows, 1)))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def collection():
    features = clustered_features(4000, 128)
    queries = clustered_features(60, 128, seed=1)  # outside the collection
    fp = {"rows": len(features), "dim": 128}
    return features, queries, ann.build_index(features, fp, reduced=32, threshold=10)


def test_recall_at_10_against_exact_chi2(collection):
    features, queries, index = collection
    paths = [f"img{i}.png" for i in range(len(features))]
    found = []
    for query in queries:
        exact = {hit.path for hit in search.nearest(features, paths, query, 10, "chi2")}
        approx = {hit.path for hit in ann.nearest(index, features, paths, query, 10, candidates=50)}
        found.append(len(exact & approx) / 10)
    assert np.mean(found) >= 0.95


def test_returned_distances_are_exact_chi2(collection):
    features, queries, index = collection
    assert len(index.search(queries[0], 100)) == 100
    paths = [f"img{i}.png" for i in range(len(features))]
    exact = search.distances(features, queries[0], "chi2")
    hits = ann.nearest(index, features, paths, queries[0], 10, candidates=100)
    assert [h.rank for h in hits] == list(range(1, 11))
    for hit in hits:
        row = paths.index(hit.path)
        assert hit.distance == pytest.approx(exact[row], rel=1e-9)
        assert hit.distance == pytest.approx(search.chi2_distance(features[row], queries[0]), rel=1e-5)
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)


def test_copies_are_collapsed_among_candidates():
    features = clustered_features(1000, 64)
    features[500] = features[7]  # the same image stored twice
    paths = [f"img{i}.png" for i in range(len(features))]
    index = ann.build_index(features, {}, reduced=32)
    hits = ann.nearest(index, features, paths, features[7], 3, collapse=True)
    assert hits[0].path == "img7.png" and hits[0].copies == ("img500.png",) and hits[0].distance == 0
    assert (hits[0].row, hits[0].copy_rows) == (7, (500,))  # rows of the file, not of the candidates
    assert hits == search.nearest(features, paths, features[7], 3, "chi2", collapse=True)


def test_save_load_round_trip(collection, tmp_path):
    features, queries, index = collection
    path = tmp_path / "f.h5.ann"
    index.save(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5.ann"]  # no temporary file left
    loaded = ann.AnnIndex.load(str(path))
    assert loaded.fingerprint == index.fingerprint and loaded.params == index.params
    np.testing.assert_array_equal(loaded.projection.components, index.projection.components)
    for query in queries[:10]:
        np.testing.assert_array_equal(loaded.search(query, 50), index.search(query, 50))


def test_unreadable_index_is_a_one_line_error_and_never_used(collection, tmp_path):
    features_path = tmp_path / "f.h5"
    store = write_store(features_path, clustered_features(50, 16))
    path = tmp_path / "f.h5.ann"
    path.write_bytes(b"not an index")
    with pytest.raises(ann.AnnIndexError, match="is not a search_utils ANN index"):
        ann.AnnIndex.load(str(path))
    notes = []
    assert ann.fresh_index(str(features_path), store.features, note=notes.append) is None
    assert len(notes) == 1 and "not a search_utils ANN index" in notes[0] and "searching exactly" in notes[0]

    collection[2].save(str(path))
    damaged = bytearray(path.read_bytes())
    damaged[:64] = bytes(64)  # FAISS's part damaged, header intact
    path.write_bytes(bytes(damaged))
    assert ann.read_header(str(path))["params"] == collection[2].params
    with pytest.raises(ann.AnnIndexError, match="unreadable ANN index"):
        ann.AnnIndex.load(str(path))


def rewrite_header(path, change) -> None:
    """Edit the JSON header of an index file in place, as a hand or a bad
    disk would: `change(header)` edits the dict; the trailer is kept right."""
    data = path.read_bytes()
    header_bytes, array_bytes, magic = ann._TRAILER.unpack(data[-ann._TRAILER.size:])
    start = len(data) - ann._TRAILER.size - array_bytes - header_bytes
    header = json.loads(data[start:start + header_bytes])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(data[:start] + text + data[start + header_bytes:-ann._TRAILER.size]
                     + ann._TRAILER.pack(len(text), array_bytes, magic))


@pytest.mark.parametrize("change", [
    lambda h: h.pop("fingerprint"),
    lambda h: h.update(reduced="x"),
    lambda h: h.update(dim=None),
    lambda h: h.update(params=[]),
    lambda h: h["params"].pop("probes"),
    lambda h: h.update(fingerprint="stale"),
], ids=["no fingerprint", "reduced not a number", "dim null", "params not an object", "no probes",
        "fingerprint not an object"])
def test_a_malformed_header_is_a_damaged_index_never_used(tmp_path, change):
    features_path = tmp_path / "f.h5"
    store = write_store(features_path, clustered_features(64, 16))
    index = ann.build_index(store.features, ann.fingerprint(str(features_path), store.features), reduced=8)
    path = tmp_path / "f.h5.ann"
    index.save(str(path))
    assert ann.fresh_index(str(features_path), store.features) is not None  # as built: used
    rewrite_header(path, change)
    notes = []
    assert ann.fresh_index(str(features_path), store.features, note=notes.append) is None
    assert len(notes) == 1 and notes[0].startswith(f"note: damaged ANN index {path}: its header "), notes
    assert notes[0].endswith("; searching exactly")


def test_an_index_whose_parts_dont_fit_the_features_is_damaged(tmp_path):
    """A header edited to carry the right fingerprint over an index built
    for other rows: refused, not searched (its row ids would not exist)."""
    features_path = tmp_path / "f.h5"
    store = write_store(features_path, clustered_features(64, 16))
    other = ann.build_index(clustered_features(32, 16, seed=4), {}, reduced=8)
    path = tmp_path / "f.h5.ann"
    other.save(str(path))
    rewrite_header(path, lambda h: h.update(fingerprint=ann.fingerprint(str(features_path), store.features)))
    notes = []
    assert ann.fresh_index(str(features_path), store.features, note=notes.append) is None
    assert notes == [f"note: damaged ANN index {path}: its parts don't fit each other or the 64 x 16 features; "
                     f"searching exactly"]


def test_the_search_command_scans_exactly_past_a_malformed_header(tmp_path, indexed_collection):
    features_path = tmp_path / "features.h5"
    shutil.copy2(indexed_collection, features_path)
    shutil.copy2(str(indexed_collection) + ".ann", str(features_path) + ".ann")
    rewrite_header(tmp_path / "features.h5.ann", lambda h: h.pop("fingerprint"))
    result, log = search_json(tmp_path, features_path)
    assert f"note: damaged ANN index {features_path}.ann: its header has no fingerprint" in log
    assert "approximate" not in log
    assert result["results"][0]["path"] == "img/00042.png" and result["results"][0]["distance"] == 0


def write_store(path, features: np.ndarray, model: str = "efficientnet_lite0") -> FeatureStore:
    store = FeatureStore([f"img/{i:05d}.png" for i in range(len(features))], features, {"model": model})
    save_features(str(path), store)
    return load_features(str(path), mmap=True)


def test_ensure_index_builds_detects_stale_and_removes(tmp_path):
    features_path = tmp_path / "f.h5"
    features = clustered_features(600, 64)
    store = write_store(features_path, features)
    notes = []
    assert ann.ensure_index(str(features_path), store, threshold=100, note=notes.append) == str(features_path) + ".ann"
    assert len(notes) == 2 and "built the ANN index" in notes[1]
    assert ann.fresh_index(str(features_path), store.features) is not None
    assert ann.ensure_index(str(features_path), store, threshold=100, note=notes.append)
    assert len(notes) == 2  # fresh: not rebuilt

    changed = features.copy()
    changed[0, 5] += 1.0  # same shape, one value edited
    store = write_store(features_path, changed)
    notes.clear()
    assert ann.fresh_index(str(features_path), store.features, note=notes.append) is None
    assert len(notes) == 1 and "stale" in notes[0] and "searching exactly" in notes[0]

    os.utime(features_path, ns=(0, ann.AnnIndex.load(str(features_path) + ".ann").fingerprint["mtime_ns"]))
    assert ann.fresh_index(str(features_path), store.features, note=notes.append) is None  # the rows tell

    store = write_store(features_path, changed[:50])
    assert ann.ensure_index(str(features_path), store, threshold=100) is None
    assert not os.path.exists(str(features_path) + ".ann")  # below the threshold: no index left behind
    store = write_store(features_path, changed[:5])
    assert ann.ensure_index(str(features_path), store, threshold=1) is None  # too few rows for the codes


def test_fingerprint_follows_rows_and_file(tmp_path):
    features_path = tmp_path / "f.h5"
    store = write_store(features_path, clustered_features(100, 16))
    first = ann.fingerprint(str(features_path), store.features)
    assert first["rows"] == 100 and first["dim"] == 16
    assert ann.fingerprint(str(features_path), store.features) == first
    store = write_store(features_path, clustered_features(100, 16, seed=3))
    assert ann.fingerprint(str(features_path), store.features)["rows_sha256"] != first["rows_sha256"]


@pytest.fixture(scope="module")
def indexed_collection(tmp_path_factory):
    """A 1280-wide features file (efficientnet_lite0's) with a copy in it,
    and its ANN index built with a threshold low enough for it."""
    features = clustered_features(2000, 1280, seed=5)
    features[1500] = features[42]
    features_path = tmp_path_factory.mktemp("indexed") / "features.h5"
    write_store(features_path, features)
    assert ann.main([str(features_path), "--threshold", "100"]) == 0
    return features_path


def search_json(tmp_path, features_path, *extra):
    query = tmp_path / "img" / "00042.png"  # the indexed path, relative to here: it must exist
    query.parent.mkdir(exist_ok=True)
    query.write_bytes(b"an image file")  # its stored features are reused: never decoded
    result = run_command("imagenet_search.py", "--query", "img/00042.png", "--featuresPath", features_path,
                         "--no-plot", "--json", "-n", "5", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_search_command_uses_the_index_and_agrees_with_exact(tmp_path, indexed_collection):
    approx, approx_log = search_json(tmp_path, indexed_collection)
    exact, exact_log = search_json(tmp_path, indexed_collection, "--exact")
    assert "approximate search (IVF" in approx_log and "candidates re-ranked" in approx_log
    assert "approximate" not in exact_log and "exact search" in exact_log
    top = approx["results"][0]
    assert top == exact["results"][0]
    assert top["path"] == "img/00042.png" and top["copies"] == ["img/01500.png"] and top["distance"] == 0
    assert [r["path"] for r in approx["results"]] == [r["path"] for r in exact["results"]]


def test_search_command_falls_back_on_a_stale_index(tmp_path, indexed_collection):
    features_path = tmp_path / "features.h5"
    shutil.copy2(indexed_collection, features_path)
    shutil.copy2(str(indexed_collection) + ".ann", str(features_path) + ".ann")
    _, log = search_json(tmp_path, features_path)
    assert "approximate search" in log  # copied with its mtime: still fresh
    features = np.array(load_features(str(features_path)).features)
    features[7] += 0.5
    write_store(features_path, features)  # rewritten: the index is now stale
    result, log = search_json(tmp_path, features_path)
    assert "stale" in log and "approximate" not in log
    assert result["results"][0]["path"] == "img/00042.png"


def test_other_metrics_stay_exact(tmp_path, indexed_collection):
    _, log = search_json(tmp_path, indexed_collection, "--metric", "cosine")
    assert "approximate" not in log


def test_indexing_command_keeps_the_index_beside_the_features(tmp_path):
    """create_imagenet_features.py builds the index once the collection
    reaches --ann-threshold, leaves a fresh one alone, and removes it when
    the collection shrinks below; the search then takes the index."""
    from conftest import draw_picture

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(24):
        draw_picture(100 + i).save(folder / f"p{i:02d}.png")
    output = tmp_path / "f.h5"
    index = tmp_path / "f.h5.ann"

    def index_folder(threshold):
        result = run_command("create_imagenet_features.py", "--dataset", folder, "--output", output,
                             "--model", "efficientnet_lite0", "--ann-threshold", threshold, "-q", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "built the ANN index" in index_folder(20)
    assert index.exists()
    built = index.stat().st_mtime_ns
    assert "ANN" not in index_folder(20)  # nothing changed: the fresh index is kept
    assert index.stat().st_mtime_ns == built
    result = run_command("imagenet_search.py", "--query", folder / "p03.png", "--featuresPath", output,
                         "--no-plot", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "approximate search" in result.stderr
    assert json.loads(result.stdout)["results"][0]["path"].endswith("p03.png")
    for i in range(10):
        (folder / f"p{i:02d}.png").unlink()
    index_folder(20)
    assert not index.exists()  # 14 rows: below the threshold, the exact scan it is
