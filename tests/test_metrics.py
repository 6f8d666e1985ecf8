"""The metrics on rankings small enough to work out by hand."""

import numpy as np
import pytest

from search_utils.metrics import average_precision, mean_metrics, precision_at_1, ranking_metrics, recall_at

T, F = True, False


def test_precision_at_1():
    assert precision_at_1(np.array([T, F])) == 1.0
    assert precision_at_1(np.array([F, T])) == 0.0
    assert precision_at_1(np.array([], bool)) == 0.0


def test_average_precision_by_hand():
    # Hits at ranks 1, 3, 6 of 3 relevant: (1/1 + 2/3 + 3/6) / 3 = 0.7222...
    assert average_precision(np.array([T, F, T, F, F, T])) == pytest.approx((1 + 2 / 3 + 0.5) / 3)
    # One relevant item at rank 4: 1/4.
    assert average_precision(np.array([F, F, F, T])) == pytest.approx(0.25)
    assert average_precision(np.array([T, T, F])) == 1.0
    assert average_precision(np.array([F, F])) == 0.0


def test_recall_at_k_by_hand():
    ranking = np.array([F, T, F, F, F, F, T, F, F, F, F, T])  # 3 relevant at ranks 2, 7, 12
    assert recall_at(ranking, 1) == 0.0
    assert recall_at(ranking, 5) == pytest.approx(1 / 3)
    assert recall_at(ranking, 10) == pytest.approx(2 / 3)
    assert recall_at(ranking, 100) == 1.0


def test_ranking_metrics_and_mean():
    a = ranking_metrics(np.array([T, F, F, F, F, F, F, F, F, F, F, T]))  # ranks 1 and 12
    b = ranking_metrics(np.array([F, T]))
    assert a == pytest.approx({"P@1": 1.0, "mAP": (1 + 2 / 12) / 2, "R@5": 0.5, "R@10": 0.5})
    assert b == pytest.approx({"P@1": 0.0, "mAP": 0.5, "R@5": 1.0, "R@10": 1.0})
    summary = mean_metrics([a, b])
    assert summary["queries"] == 2
    assert summary["P@1"] == 0.5 and summary["R@5"] == 0.75
    assert summary["mAP"] == pytest.approx(((1 + 2 / 12) / 2 + 0.5) / 2)
