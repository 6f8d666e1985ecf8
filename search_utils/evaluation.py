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

from .errors import LabelsError, printable_path
from .metrics import mean_metrics, ranking_metrics
from .search import absolute_path, distances
from .store.atomic import NotRegularFileError, open_regular
from .store.feature_store import excerpt

QUERY_BLOCK = 256  # queries per matrix product for dot-product spaces


@dataclass
class Labels:
    """Per features-file row: label (None = unlabelled) and group."""

    labels: list[str | None]
    groups: list[str | None]

    @property
    def labelled(self) -> int:
        return sum(label is not None for label in self.labels)


class LabelRecord(dict):
    """One record of a labels file (its fields, text), and where it is in
    the file, for messages (`line 3`, `record 2`)."""

    where: str = "a record"


def read_label_records(path: str) -> list[LabelRecord]:
    """Records from a JSON list of objects or a CSV with a header (UTF-8,
    with or without the byte-order mark Excel writes), each with a
    non-empty text `path` and `label` (a JSON number is taken as text).

    Raises:
        LabelsError: unreadable file, or a record that is not what it
            should be: the message names the file and the line or record.
    """
    shown = printable_path(path)
    try:
        with open_regular(path, "r", newline="", encoding="utf-8-sig") as handle:
            if path.lower().endswith(".json"):
                records = _json_records(shown, json.load(handle))
            else:
                records = _csv_records(shown, handle)
    except NotRegularFileError:
        raise LabelsError(f"labels file {shown} is not a regular file (a FIFO, socket or device)") from None
    except OSError as error:
        raise LabelsError(f"cannot read labels file {shown}: {error.strerror or error}") from None
    except ValueError as error:
        raise LabelsError(f"cannot read labels file {shown}: {' '.join(str(error).split())}") from None
    if not records:
        raise LabelsError(f"labels file {shown} holds no records (a header, then a row per image: path,label)")
    for record in records:
        for key in ("path", "label"):
            if key not in record:
                raise LabelsError(f"labels file {shown}: {record.where} has no {key!r}: every record needs "
                                  f"'path' and 'label'")
            if record[key] is None or record[key] == "":
                raise LabelsError(f"labels file {shown}: {record.where} has an empty {key}")
    return records


def _csv_records(shown: str, handle) -> list[LabelRecord]:
    reader = csv.reader(handle, strict=True)
    records: list[LabelRecord] = []
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            return []
        for row in reader:
            if not row:
                continue  # a blank line
            where = f"line {reader.line_num}"
            if len(row) != len(header):
                fields = "1 field" if len(row) == 1 else f"{len(row)} fields"
                raise LabelsError(f"labels file {shown}: {where} has {fields}, the header {len(header)} "
                                  f"({excerpt(','.join(header))})")
            record = LabelRecord(zip(header, row))
            record.where = where
            records.append(record)
    except csv.Error as error:
        raise LabelsError(f"labels file {shown}: line {reader.line_num} is badly quoted ({error}; a quote "
                          f"never closed?)") from None
    return records


def _json_records(shown: str, data) -> list[LabelRecord]:
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LabelsError(f"labels file {shown} must hold a list of records (JSON objects)")
    records = []
    for number, fields in enumerate(data, start=1):
        record = LabelRecord()
        record.where = f"record {number}"
        for key, value in fields.items():
            if value is not None and not isinstance(value, str):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise LabelsError(f"labels file {shown}: record {number} has {key!r} "
                                      f"{excerpt(json.dumps(value))}, not a text")
                value = str(value)
            record[key] = value
        records.append(record)
    return records


def labels_from_records(paths: list[str], records: list[dict], labels_path: str,
                        group_key: str | None = None, base_dir: str | None = None) -> Labels:
    """Match records to feature rows by resolved absolute path.

    Record paths are relative to the labels file's folder (or absolute);
    feature paths relative to `base_dir` (where they were indexed). Two
    records of the same image must agree.

    Raises:
        LabelsError: a record without `group_key`, or two records giving
            one image different labels or groups.
    """
    shown = printable_path(labels_path)
    folder = os.path.dirname(os.path.abspath(labels_path))
    by_path: dict[str, tuple[str, str | None, dict]] = {}
    for record in records:
        where = getattr(record, "where", "a record")
        if group_key is not None and (group_key not in record or record[group_key] in (None, "")):
            raise LabelsError(f"labels file {shown}: {where} has no field {group_key!r}")
        key = os.path.realpath(absolute_path(str(record["path"]), folder))
        entry = (str(record["label"]), None if group_key is None else str(record[group_key]), record)
        earlier = by_path.setdefault(key, entry)
        if earlier[:2] != entry[:2]:
            field, index = ("label", 0) if earlier[0] != entry[0] else (group_key, 1)
            first = getattr(earlier[2], "where", "a record")
            raise LabelsError(f"labels file {shown}: {where} gives {excerpt(str(record['path']))} the {field} "
                              f"{excerpt(entry[index])!r}, {first} gave it {excerpt(earlier[index])!r}; keep one")
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
