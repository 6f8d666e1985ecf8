"""The post's CSV format: no header, one row per image, the image path then
the feature values. Proper CSV quoting lets any path (commas, quotes,
newlines) survive the round trip; non-UTF-8 bytes in names survive as
surrogates. Metadata and whitening live in files beside it, published with
it as one generation (generation.py)."""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import warnings
from typing import IO

import numpy as np
import pandas as pd

from ..errors import FeaturesFileError, printable_path
from . import generation
from .atomic import atomic_file, open_regular, write_errors
from .feature_store import ENCODING_ERRORS, FeatureStore, excerpt
from .metadata import full_metadata

BLOCK_BYTES = 8 << 20  # feature values converted to text at a time (~32x that as text)


def save_csv(path: str, store: FeatureStore, features: np.ndarray) -> None:
    """Write `store` (with `features` as float32) as a new generation of
    `path` and its sidecars."""
    digest = hashlib.new(generation.HASH_NAME)
    metadata = full_metadata(store.metadata, *features.shape)

    def put_in_place(tmp: str) -> None:
        metadata.update(generation=generation.new_generation_id(), features_sha256=digest.hexdigest())
        generation.publish(path, tmp, metadata, store.whitening_arrays)

    with atomic_file(path, put_in_place=put_in_place) as tmp:
        with write_errors(path), open(tmp, "w", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as handle:
            _write_rows(generation.hashing_writer(handle, digest), store.paths, features)


def _write_rows(write, paths: list[str], features: np.ndarray) -> None:
    # Converted to text a block at a time: the whole (n, dim) array as
    # strings would take 128 bytes per value. Only the path can need
    # quoting; the csv module quotes it, and the numbers are joined directly
    # (twice as fast as 2,049 fields a row).
    block = max(1, BLOCK_BYTES // max(1, features.shape[1] * 4))
    for start in range(0, len(features), block):
        text = features[start:start + block].astype(str)  # shortest repr that round-trips float32
        for image_path, row in zip(paths[start:start + block], text):
            write(csv_field(image_path) + "," + ",".join(row) + "\n")


def csv_field(value: str) -> str:
    """`value` as the csv module writes one field (quoted only if needed)."""
    if not value:
        return ""  # alone on a row the csv module would write '""'
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([value])
    return buffer.getvalue()[:-1]


def load_csv(path: str) -> FeatureStore:
    """Rows, metadata and whitening of one consistent generation."""
    taken = generation.read(path, lambda handle: read_rows(path, handle))
    return FeatureStore(taken.paths, taken.features, taken.metadata, taken.whitening, taken.metadata_file)


def read_rows(path: str, handle: IO[bytes]) -> tuple[list[str], np.ndarray]:
    """Paths and float32 features of the CSV open as `handle`.

    Raises:
        FeaturesFileError: empty, not a features file at all (its first
            row is not a path and numbers), malformed, non-numeric,
            non-finite or a row without a path; the message names the row.
    """
    from .formats import FIRST_ROW_BYTES, first_row_problem

    shown = printable_path(path)
    start = handle.tell()
    problem = first_row_problem(handle.read(FIRST_ROW_BYTES))
    if problem:
        raise FeaturesFileError(f"{shown} is not a features file ({problem})")
    handle.seek(start)
    try:
        frame = pd.read_csv(
            handle, header=None, dtype={0: object}, keep_default_na=False,  # object: Python strings, which
            # keep undecodable bytes as surrogates (with pyarrow installed, str is an Arrow string that can't)
            na_values=[""], encoding="utf-8", encoding_errors=ENCODING_ERRORS,
        )
    except pd.errors.EmptyDataError:
        raise FeaturesFileError(f"features file is empty: {shown}") from None
    except pd.errors.ParserError as error:
        problem = _row_problem(path) or _first_line(error)
        raise FeaturesFileError(f"malformed features file {shown}: {problem}") from None
    except (OSError, UnicodeError) as error:
        raise FeaturesFileError(f"cannot read features file {shown}: {error}") from None
    if frame.shape[1] < 2:
        raise FeaturesFileError(f"malformed features file {shown}: no feature values after the path")
    values = frame.iloc[:, 1:]
    underscored = _underscored(values)
    if underscored:
        raise FeaturesFileError(f"malformed features file {shown}: {underscored}")
    try:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # 1e39 -> inf, refused below by name
            features = values.to_numpy(dtype=np.float32)
    except (ValueError, TypeError):
        raise FeaturesFileError(f"malformed features file {shown}: {_non_numeric(values)}") from None
    if not np.isfinite(features).all():
        # pandas pads short rows with NaN: a truncated or hand-edited line;
        # or a value is empty, "nan" or "inf", or too large for float32.
        problem = _row_problem(path) or _non_finite(values, features)
        raise FeaturesFileError(f"malformed features file {shown}: {problem}")
    paths = frame.iloc[:, 0]
    empty = paths.isna().to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0]) + 1
        raise FeaturesFileError(f"malformed features file {shown}: row {row} has no image path (empty first field)")
    return paths.tolist(), features


def _underscored(values: pd.DataFrame) -> str | None:
    """The first value written with an underscore (`1_0`), which Python's
    float() would read as 10 but no features file holds; None if none.
    Only columns pandas could not read as numbers itself hold text."""
    for column in values.columns:
        if pd.api.types.is_numeric_dtype(values[column]):
            continue
        texts = values[column].astype(str)
        bad = texts.str.contains("_", regex=False).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            return f"row {row + 1}, column {column + 1} is not a number: {excerpt(repr(texts.iloc[row]))}"
    return None


def _row_problem(path: str) -> str | None:
    """The first row whose number of values differs from most rows', or that
    is cut off inside quotes; None if every row has the same length.

    Read again with the csv module, only once pandas has failed (so the cost
    doesn't matter): pandas measures every line against the first one, so
    an edited first row would be reported as row 2 being wrong."""
    rows: list[tuple[int, str]] = []  # (number of values, image path), blank lines skipped as pandas does
    try:
        with open_regular(path, "r", encoding="utf-8", errors=ENCODING_ERRORS, newline="") as handle:
            for fields in csv.reader(handle, strict=True):
                if fields:
                    rows.append((len(fields) - 1, fields[0]))
    except csv.Error as error:
        return f"row {len(rows) + 1} is cut off or badly quoted ({error}; truncated?)"
    except OSError:
        return None
    if not rows:
        return None
    expected = collections.Counter(count for count, _ in rows).most_common(1)[0][0]  # ties: the first row's
    for number, (count, image_path) in enumerate(rows, start=1):
        if count != expected:
            return (f"row {number} ({excerpt(image_path)}) has {count} values, "
                    f"expected {expected} (truncated or edited?)")
    return None


def _non_finite(values: pd.DataFrame, features: np.ndarray) -> str:
    row, column = (int(i) for i in np.argwhere(~np.isfinite(features))[0])
    text = values.iat[row, column]
    if isinstance(text, float) and np.isnan(text):
        shown = "empty"
    elif np.isfinite(_as_float(text)):
        shown = f"{excerpt(str(text))}, too large for float32"
    else:
        shown = f"not a finite number ({excerpt(str(text))})"
    return f"row {row + 1}, column {column + 2} is {shown}"


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _non_numeric(values: pd.DataFrame) -> str:
    for column in values.columns:
        converted = pd.to_numeric(values[column], errors="coerce")
        bad = converted.isna() & values[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            return f"row {row + 1}, column {column + 1} is not a number: {excerpt(repr(values[column].iloc[row]))}"
    return "non-numeric feature values"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
