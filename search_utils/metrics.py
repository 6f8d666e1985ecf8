"""Retrieval quality metrics: pure functions over rankings.

A ranking is given as `relevant`, a boolean array in rank order (nearest
first) saying which retrieved items share the query's label; the query itself
is never in it, and it holds every candidate, so `relevant.sum()` is the
number of relevant items.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

METRIC_NAMES = ("P@1", "mAP", "R@5", "R@10")


def precision_at_1(relevant: np.ndarray) -> float:
    """1 if the nearest item is relevant, else 0."""
    return float(bool(len(relevant)) and relevant[0])


def average_precision(relevant: np.ndarray) -> float:
    """Mean, over the relevant items, of the precision at each one's rank."""
    relevant = np.asarray(relevant, dtype=bool)
    total = relevant.sum()
    if total == 0:
        return 0.0
    ranks = np.flatnonzero(relevant) + 1  # 1-based ranks of the hits
    hits_so_far = np.arange(1, total + 1)
    return float(np.mean(hits_so_far / ranks))


def recall_at(relevant: np.ndarray, k: int) -> float:
    """Share of all relevant items found in the top `k`."""
    relevant = np.asarray(relevant, dtype=bool)
    total = relevant.sum()
    return float(relevant[:k].sum() / total) if total else 0.0


def ranking_metrics(relevant: np.ndarray) -> dict[str, float]:
    """All of METRIC_NAMES for one query's ranking."""
    return {
        "P@1": precision_at_1(relevant),
        "mAP": average_precision(relevant),
        "R@5": recall_at(relevant, 5),
        "R@10": recall_at(relevant, 10),
    }


def mean_metrics(per_query: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Average each metric over queries; adds "queries", their count."""
    rows = list(per_query)
    summary = {name: float(np.mean([r[name] for r in rows])) if rows else 0.0 for name in METRIC_NAMES}
    summary["queries"] = len(rows)
    return summary
