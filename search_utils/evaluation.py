"""Scoring a features file against labels: every labelled image queries all
the others, and images with the same label are the relevant ones.

With a group key (a vendor, a theme), only images of another group are
ranked for a query: "find the same thing drawn differently".
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import LabelsError
from .metrics import mean_metrics, ranking_metrics
from .search import absolute_path, distances

QUERY_BLOCK = 256  # queries per matrix product for dot-product spaces


@dataclass
class Labels:
    """Per features-file row: label (None = unlabelled) and group."""

    labels: list[str | None]
    groups: list[str | None]

    @property
    def labelled(self) -> int:
        return sum(label is not None for label in self.labels)


def read_label_records(path: str) -> list[dict]:
    """Records from a JSON list of objects or a CSV with a header.

    Raises:
        LabelsError: unreadable file, or records without path and label.
    """
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read for ever
        raise LabelsError(f"labels file {path} is not a regular file")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            if path.lower().endswith(".json"):
                records = json.load(handle)
            else:
                records = list(csv.DictReader(handle))
    except OSError as error:
        raise LabelsError(f"cannot read labels file {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise LabelsError(f"cannot read labels file {path}: {error}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise LabelsError(f"labels file {path} must hold a list of records")
    missing = [r for r in records if "path" not in r or "label" not in r]
    if missing or not records:
        raise LabelsError(f"labels file {path}: every record needs 'path' and 'label'")
    return records


def labels_from_records(paths: list[str], records: list[dict], labels_path: str,
                        group_key: str | None = None, base_dir: str | None = None) -> Labels:
    """Match records to feature rows by resolved absolute path.

    Record paths are relative to the labels file's folder (or absolute);
    feature paths relative to `base_dir` (where they were indexed).
    """
    folder = os.path.dirname(os.path.abspath(labels_path))
    by_path = {}
    for record in records:
        if group_key is not None and group_key not in record:
            raise LabelsError(f"labels file {labels_path}: a record has no field {group_key!r}")
        key = os.path.realpath(absolute_path(str(record["path"]), folder))
        by_path[key] = (str(record["label"]), None if group_key is None else str(record[group_key]))
    matched = [by_path.get(os.path.realpath(absolute_path(p, base_dir)), (None, None)) for p in paths]
    return Labels([m[0] for m in matched], [m[1] for m in matched])


def labels_from_folders(paths: list[str]) -> Labels:
    """Each image's label is the name of the folder it is in."""
    return Labels([os.path.basename(os.path.dirname(p)) or None for p in paths], [None] * len(paths))


def evaluate(vectors: np.ndarray, labels: Labels,
             distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
             metric: str = "chi2") -> dict[str, float]:
    """Mean P@1, mAP, R@5, R@10 over every labelled row as a query.

    Args:
        vectors: (n, dim) search-space vectors, one per features-file row.
        distance: `distance(vectors, query) -> (n,)`; default: `metric` via
            search.distances. Unlabelled rows take part as distractors.
    """
    label_ids, group_ids = _encode(labels.labels), _encode(labels.groups)
    queries = np.flatnonzero(label_ids >= 0)
    if distance is None and metric in ("cosine", "euclidean"):
        blocks = _matrix_blocks(vectors, queries, metric)
    else:
        if distance is None:
            distance = lambda rows, query: distances(rows, query, metric)  # noqa: E731
        blocks = ([(row, distance(vectors, vectors[row]))] for row in queries)
    per_query = []
    for block in blocks:
        for query_row, dist in block:
            ranking = _ranking(dist, query_row, group_ids)
            relevant = label_ids[ranking] == label_ids[query_row]
            if relevant.any():
                per_query.append(ranking_metrics(relevant))
    return mean_metrics(per_query)


def _matrix_blocks(vectors, queries, metric):
    """Yield [(query_row, distances)] per block of queries: one matrix
    product each, the same ranking as the search kernels, much faster."""
    v = np.asarray(vectors, dtype=np.float64)
    squared = np.einsum("ij,ij->i", v, v)
    norms = np.sqrt(squared)
    for start in range(0, len(queries), QUERY_BLOCK):
        rows = queries[start : start + QUERY_BLOCK]
        dots = v[rows] @ v.T  # (block, n)
        if metric == "cosine":
            denom = np.outer(norms[rows], norms)
            dist = 1.0 - dots / np.where(denom > 0, denom, 1.0)
        else:
            dist = np.sqrt(np.maximum(squared[rows, None] + squared[None, :] - 2 * dots, 0))
        yield list(zip(rows, dist))


def _ranking(dist: np.ndarray, query_row: int, group_ids: np.ndarray) -> np.ndarray:
    """Rows in rank order, without the query and (with groups) its group."""
    keep = np.ones(len(dist), dtype=bool)
    keep[query_row] = False
    if group_ids[query_row] >= 0:
        keep &= group_ids != group_ids[query_row]
    candidates = np.flatnonzero(keep)
    return candidates[np.lexsort((candidates, dist[candidates]))]


def _encode(values: list[str | None]) -> np.ndarray:
    """Strings to small ints; None to -1."""
    codes: dict[str, int] = {}
    return np.array([-1 if v is None else codes.setdefault(v, len(codes)) for v in values], dtype=np.int64)
