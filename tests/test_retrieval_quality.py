"""Real pretrained features on real images: the same emoji drawn by Google
and by Twitter must find each other; a random network must not."""

import csv
from pathlib import Path

import numpy as np
import pytest

from search_utils import models
from search_utils.indexing import embed_images
from search_utils.search import distances, top_n

EMOJI = Path(__file__).parent / "data" / "emoji"
# Measured on this set (60 emoji, chi-squared): pretrained 50/60 = 0.83,
# random weights (seed 0) 14/60 = 0.23. The bounds sit a little inside.
PRETRAINED_AT_LEAST = 0.75
RANDOM_AT_MOST = 0.45


def vendor_rows(vendor):
    with open(EMOJI / "labels.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["vendor"] == vendor]


def rank1_rate(extractor, metric="chi2") -> float:
    """Share of Google emoji whose nearest Twitter emoji is the same one."""
    google, twitter = vendor_rows("google"), vendor_rows("twitter")
    embed = lambda rows: embed_images([str(EMOJI / r["path"]) for r in rows], extractor).features  # noqa: E731
    queries, gallery = embed(google), embed(twitter)
    labels = [r["label"] for r in twitter]
    found = [labels[top_n(distances(gallery, q, metric), 1)[0]] == r["label"] for q, r in zip(queries, google)]
    return float(np.mean(found))


@pytest.fixture(scope="module")
def spec():
    return models.get_model_spec("efficientnet_lite0")


def test_test_set_is_paired():
    google, twitter = vendor_rows("google"), vendor_rows("twitter")
    assert len(google) == len(twitter) >= 50
    assert sorted(r["label"] for r in google) == sorted(r["label"] for r in twitter)


def test_pretrained_efficientnet_finds_the_same_emoji_across_vendors(spec):
    extractor = models.load_extractor(spec)  # packaged weights, no network
    assert extractor.weights == models.PACKAGED
    assert rank1_rate(extractor) >= PRETRAINED_AT_LEAST


def test_random_weights_do_markedly_worse(spec):
    import keras

    keras.utils.set_random_seed(0)
    random_net = models.FeatureExtractor(spec, spec.build(None), "random")
    assert rank1_rate(random_net) <= RANDOM_AT_MOST


def test_whitened_mode_beats_the_posts_distance_on_real_emoji(tmp_path):
    """The best search mode, end to end: index the emoji with the offline
    model, score chi2 and whitened with evaluate.py, cross-vendor."""
    import json

    from conftest import run_command

    indexed = run_command("create_imagenet_features.py", "--dataset", EMOJI, "--output", tmp_path / "f.csv",
                          "--model", "efficientnet_lite0", "-q", cwd=tmp_path)
    assert indexed.returncode == 0, indexed.stderr
    assert (tmp_path / "f.csv.whitening.npz").exists()  # learned at index time

    def score(mode):
        result = run_command("evaluate.py", tmp_path / "f.csv", "--labels", EMOJI / "labels.csv",
                             "--group", "vendor", "--metric", mode, "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    chi2, whitened = score("chi2"), score("whitened")
    # Measured: chi2 P@1 0.80, mAP 0.869; whitened P@1 0.90, mAP 0.941.
    assert chi2["queries"] == whitened["queries"] == 120
    assert whitened["P@1"] >= chi2["P@1"] + 0.05
    assert whitened["mAP"] >= 0.92
