import numpy as np
import pytest

from search_utils import search as S


def per_row(features, query, formula):
    return np.array([formula(row, query) for row in features])


def euclid(a, b):
    return float(np.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))))


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def post_chi2(a, b, eps=1e-10):
    # The post's own formula, one Python float at a time.
    return 0.5 * sum(((float(x) - float(y)) ** 2) / (float(x) + float(y) + eps) for x, y in zip(a, b))


@pytest.fixture
def features():
    rng = np.random.default_rng(7)
    feats = rng.gamma(0.6, 1.0, size=(2085, 64)).astype(np.float32)
    feats[feats < 0.3] = 0.0  # ReLU features have many exact zeros
    return feats


def test_chi2_vectorised_equals_post_formula(features):
    query = features[5]
    got = S.distances(features, query, "chi2")
    rows = [0, 5, 17, 1000, 2047, len(features) - 1]
    expected = np.array([post_chi2(features[r], query) for r in rows])
    np.testing.assert_allclose(got[rows], expected, rtol=1e-6)
    assert got[5] == 0.0


def test_chi2_single_pair_helper_matches_post():
    a = np.array([0.0, 1.0, 2.0, 0.0], np.float32)
    b = np.array([0.0, 3.0, 0.0, 0.5], np.float32)
    # 0.5 * (0 + 4/4 + 4/2 + 0.25/0.5) = 1.75
    assert S.chi2_distance(a, b) == pytest.approx(1.75, rel=1e-9)


@pytest.mark.parametrize("metric, formula", [("euclidean", euclid), ("cosine", cosine)])
def test_other_metrics_equal_per_row_formula(features, metric, formula):
    query = features[3]
    got = S.distances(features[:300], query, metric)
    # float32 products: near-zero distances are exact to ~1e-9 absolute.
    np.testing.assert_allclose(got, per_row(features[:300], query, formula), rtol=1e-6, atol=1e-7)


def test_cosine_of_zero_vector_is_one():
    feats = np.array([[0, 0], [1, 0]], np.float32)
    np.testing.assert_allclose(S.distances(feats, np.array([1.0, 0.0]), "cosine"), [1.0, 0.0])


def test_cosine_of_a_zero_vector_to_itself_is_zero():
    """A zero vector is as near as can be to another zero vector (itself),
    and as far as can be from any other vector."""
    feats = np.array([[0, 0, 0], [1, 0, 2], [0, 0, 0]], np.float32)
    np.testing.assert_array_equal(S.distances(feats, np.zeros(3, np.float32), "cosine"), [0.0, 1.0, 0.0])
    hits = S.nearest(feats, ["zero", "other", "zero again"], np.zeros(3), n=3, metric="cosine")
    assert [(h.path, h.distance) for h in hits] == [("zero", 0.0), ("zero again", 0.0), ("other", 1.0)]


def test_distances_refuse_unknown_metric_and_wrong_dimension(features):
    with pytest.raises(ValueError, match="unknown metric"):
        S.distances(features, features[0], "manhattan")
    with pytest.raises(ValueError, match="values"):
        S.distances(features, features[0][:10], "chi2")


def test_top_n_nearest_first_and_ties_in_file_order():
    dist = np.array([3.0, 1.0, 2.0, 1.0, 0.5, 1.0])
    assert S.top_n(dist, 3).tolist() == [4, 1, 3]
    assert S.top_n(dist, 4).tolist() == [4, 1, 3, 5]
    assert S.top_n(dist, 100).tolist() == [4, 1, 3, 5, 2, 0]
    assert S.top_n(dist, 0).tolist() == []


def test_search_returns_ranked_hits(features):
    paths = [f"img{i}.png" for i in range(len(features))]
    hits = S.nearest(features, paths, features[42], n=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].path == "img42.png" and hits[0].distance == 0.0
    assert hits[1].distance <= hits[2].distance


def test_find_row_matches_the_same_file_however_spelled(tmp_path, monkeypatch):
    (tmp_path / "icons").mkdir()
    target = tmp_path / "icons" / "a.png"
    target.write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(target)
    stored = ["icons/b.png", "icons/a.png"]
    monkeypatch.chdir(tmp_path)
    assert S.find_row(stored, "icons/a.png") == 1
    assert S.find_row(stored, "./icons/../icons/a.png") == 1
    assert S.find_row(stored, str(target)) == 1
    assert S.find_row(stored, "link.png") == 1  # a symlink to a stored file
    assert S.find_row(stored, "icons/c.png") is None
    # Relative paths are resolved where they were written, not where we are.
    monkeypatch.chdir(tmp_path / "icons")
    assert S.find_row(stored, "a.png", base_dir=str(tmp_path)) == 1
    assert S.find_row(stored, "a.png") is None  # would be icons/icons/a.png


def test_copies_collapse_into_one_hit():
    rng = np.random.default_rng(3)
    feats = rng.random((8, 16)).astype(np.float32)
    feats[5] = feats[1]  # byte-identical copy
    feats[6] = feats[1] * (1 + 1e-7)  # same image, decoded with a rounding difference
    feats[7] = feats[1] * 1.02  # a similar but different image
    paths = [f"p{i}" for i in range(8)]
    query = feats[1] * 0.999
    hits = S.nearest(feats, paths, query, n=3, collapse=True)
    assert hits[0].path == "p1" and hits[0].copies == ("p5", "p6")
    assert all(paths[h.row] == h.path and [paths[r] for r in h.copy_rows] == list(h.copies) for h in hits)
    assert "p7" in [h.path for h in hits] and len({h.path for h in hits}) == 3
    assert [h.rank for h in hits] == [1, 2, 3]
    flat = S.nearest(feats, paths, query, n=3)
    assert [h.path for h in flat][:3] == ["p1", "p5", "p6"] and all(h.copies == () for h in flat)
    assert [h.row for h in flat] == [1, 5, 6]


def test_collapse_reaches_past_many_copies():
    feats = np.vstack([np.ones((50, 4), np.float32), np.arange(4, dtype=np.float32)[None] + 2])
    paths = [f"copy{i}" for i in range(50)] + ["other"]
    hits = S.nearest(feats, paths, np.ones(4, np.float32), n=2, collapse=True)
    assert [h.path for h in hits] == ["copy0", "other"]
    assert len(hits[0].copies) == 49
