import warnings

import numpy as np
import pytest

from search_utils import modes, store as St, transforms as T


def test_normalisations():
    x = np.array([[3.0, -4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(T.l1_normalise(x), [[3 / 7, -4 / 7], [0, 0]])
    np.testing.assert_allclose(T.l2_normalise(x), [[0.6, -0.8], [0, 0]])
    np.testing.assert_allclose(T.signed_sqrt(x), [[np.sqrt(3), -2.0], [0, 0]])
    assert x[0, 0] == 3.0  # inputs untouched


def test_whitening_decorrelates_and_equalises_variance():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6)) * np.array([10, 5, 1, 1, 0.5, 0.1])
    data = rng.normal(size=(5000, 6)) @ mixing + 3.0
    w = T.Whitening.fit(data)
    projected = (data - w.mean) @ w.projection
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(6), atol=1e-3)
    assert T.Whitening.fit(data, dims=2).dims == 2
    restored = T.Whitening.from_arrays(w.to_arrays())
    np.testing.assert_allclose(restored.apply(data[:3]), w.apply(data[:3]), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(w.apply(data[:3]), axis=1), 1.0, rtol=1e-5)


def test_whitening_is_stored_beside_the_features_and_reused(tmp_path):
    from search_utils.engine import whitening_arrays

    feats = np.random.default_rng(1).gamma(0.5, 1, (40, 12)).astype(np.float32)
    path = str(tmp_path / "f.csv")
    St.save_features(path, St.FeatureStore([f"{i}.png" for i in range(40)], feats, {}, whitening_arrays(feats)))
    loaded = St.load_features(path)
    assert loaded.whitened_vectors.shape[0] == 40
    notes = []
    space = modes.search_space(loaded, "whitened", warn=notes.append)
    assert not notes  # nothing learned again
    np.testing.assert_allclose(space.to_space(feats[7]), space.vectors[7], rtol=1e-5, atol=1e-6)
    # Without the stored file it is learned on the spot, and said so.
    (tmp_path / "f.csv.whitening.npz").unlink()
    relearned = modes.search_space(St.load_features(path), "whitened", warn=notes.append)
    assert notes and "learned it from 40 images" in notes[0]
    np.testing.assert_allclose(relearned.vectors, space.vectors, rtol=1e-4, atol=1e-5)


def test_stale_whitening_is_ignored(tmp_path):
    from search_utils.engine import whitening_arrays

    feats = np.random.default_rng(2).random((10, 4)).astype(np.float32)
    path = str(tmp_path / "f.csv")
    St.save_features(path, St.FeatureStore([f"{i}" for i in range(10)], feats, {}, whitening_arrays(feats)))
    St.save_features(str(tmp_path / "g.csv"), St.FeatureStore(["a", "b"], feats[:2], {}))
    (tmp_path / "g.csv.whitening.npz").write_bytes((tmp_path / "f.csv.whitening.npz").read_bytes())
    assert St.load_features(str(tmp_path / "g.csv")).whitening_arrays is None  # 10 rows, not 2


@pytest.mark.parametrize("name", list(modes.MODES))
def test_every_mode_ranks_an_exact_copy_first(name):
    feats = np.random.default_rng(4).gamma(0.5, 1, (30, 8)).astype(np.float32)
    store = St.FeatureStore([str(i) for i in range(30)], feats, {})
    space = modes.search_space(store, name, warn=lambda m: None)
    from search_utils.search import nearest

    assert nearest(space.vectors, store.paths, space.to_space(feats[11]), 1, space.metric)[0].path == "11"


def test_identical_vectors_give_a_whitening_that_learned_nothing_without_warnings():
    row = np.random.default_rng(5).gamma(0.5, 1, 12).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy's "Mean of empty slice" would fail here
        w = T.Whitening.fit(np.stack([row, row, row]))
    assert not w.learned and w.dims == 0
    assert T.Whitening.fit(np.stack([row, row * 2, row])).learned  # two distinct vectors: one direction


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_whitened_mode_without_a_learnable_whitening_compares_normalised_features(rows):
    """One image, or copies of one: nothing to whiten. The mode falls back
    to the signed square root and L2 norm, by cosine (each image at 0 from
    itself), with one note, and no warning. Three copies are what indexing
    stores a whitening for: its stored, empty whitening says the same."""
    from search_utils.engine import whitening_arrays
    from search_utils.search import nearest

    feats = np.repeat(np.random.default_rng(6).gamma(0.5, 1, (1, 16)).astype(np.float32), rows, axis=0)
    store = St.FeatureStore([str(i) for i in range(rows)], feats, {}, whitening_arrays(feats))
    assert (store.whitening_arrays is not None) == (rows >= 3)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        space = modes.search_space(store, "whitened", warn=notes.append)
        hits = nearest(space.vectors, store.paths, space.to_space(feats[0]), rows, space.metric)
    assert [h.distance for h in hits] == pytest.approx([0.0] * rows, abs=1e-6)
    what = "one image" if rows == 1 else f"{rows} images whose features are all the same"
    assert notes == [f"note: no whitening can be learned from {what}: comparing the signed-square-root, "
                     f"L2-normalised features by cosine, without whitening"]


@pytest.mark.parametrize("change, says", [
    (lambda a: a.update(mean=np.full(a["mean"].shape, "x")), "its arrays don't hold floating-point numbers"),
    (lambda a: a.update(projection=a["projection"].astype(np.complex64)),
     "its arrays don't hold floating-point numbers"),
    (lambda a: a.update(vectors=a["vectors"][:, :1]), "its arrays don't fit these features"),
    (lambda a: a.pop("vectors"), "arrays are missing"),
])
def test_a_stored_whitening_of_the_wrong_type_or_shape_is_damaged_and_learned_again(change, says):
    from search_utils.engine import whitening_arrays

    feats = np.random.default_rng(7).gamma(0.5, 1, (10, 6)).astype(np.float32)
    arrays = whitening_arrays(feats)
    change(arrays)
    store = St.FeatureStore([str(i) for i in range(10)], feats, {}, arrays)
    notes = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complex array cast to float would warn
        space = modes.search_space(store, "whitened", warn=notes.append, source="f.csv")
    assert notes == [f"note: the whitening stored with f.csv is damaged ({says}); learned it from 10 images "
                     f"(re-index to store it)"]
    np.testing.assert_allclose(space.to_space(feats[3]), space.vectors[3], rtol=1e-5, atol=1e-6)
