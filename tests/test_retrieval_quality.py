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
