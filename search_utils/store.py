"""Reading and writing features files, with the metadata that says how they
were made.

The CSV format is exactly the post's: no header, one row per image, the
image path then the feature values. Proper CSV quoting lets any path (commas,
quotes, newlines) survive the round trip. Beside `features.csv` lives
`features.csv.meta.json` (see `metadata_path`): model, weights, preprocessing,
dimension, count, tool version. Both are written atomically, so an
interrupted run never leaves a truncated file and the previous one stays.

Knows nothing about models or distances.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import IO, Iterator

import numpy as np
import pandas as pd

from .errors import FeaturesFileError

METADATA_SUFFIX = ".meta.json"
WHITENING_SUFFIX = ".whitening.npz"
FORMAT_VERSION = 1
# Non-UTF-8 bytes in file names survive as surrogates (os.fsdecode) and must
# survive the trip through the text file too.
ENCODING_ERRORS = "surrogateescape"


@dataclass
class FeatureStore:
    """Features in memory: row i of `features` belongs to `paths[i]`.

    `metadata` is {} for a file without metadata (e.g. written by the
    post's original script). `whitening_arrays` holds a whitening learned
    at index time ("mean", "projection", and "vectors": the whitened rows),
    or None.
    """

    paths: list[str]
    features: np.ndarray  # (n, dim) float32
    metadata: dict = field(default_factory=dict)
    whitening_arrays: dict[str, np.ndarray] | None = None

    @property
    def whitening(self):
        from .transforms import Whitening

        return None if self.whitening_arrays is None else Whitening.from_arrays(self.whitening_arrays)

    @property
    def whitened_vectors(self) -> np.ndarray | None:
        return None if self.whitening_arrays is None else self.whitening_arrays["vectors"]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def metadata_path(features_path: str) -> str:
    """The metadata file that belongs to `features_path`."""
    return features_path + METADATA_SUFFIX


def whitening_path(features_path: str) -> str:
    """The learned-whitening file that belongs to `features_path`."""
    return features_path + WHITENING_SUFFIX


@contextlib.contextmanager
def atomic_write(path: str, newline: str | None = None, binary: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success, flush it
    to disk and rename it over `path`. On any error `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    text = {} if binary else {"encoding": "utf-8", "errors": ENCODING_ERRORS, "newline": newline}
    try:
        with os.fdopen(fd, "wb" if binary else "w", **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_features(path: str, store: FeatureStore) -> None:
    """Write `store` to `path` (CSV as in the post) and its metadata beside it.

    The features file is replaced first, then the metadata; the metadata
    records the row count, so a reader can tell if it was interrupted between
    the two.
    """
    features = np.asarray(store.features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(store.paths):
        raise ValueError(f"{len(store.paths)} paths but features of shape {features.shape}")
    text = features.astype(str)  # shortest repr that round-trips float32
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for image_path, row in zip(store.paths, text):
            writer.writerow([image_path, *row])
    if store.whitening_arrays is not None:
        with atomic_write(whitening_path(path), binary=True) as handle:
            np.savez(handle, **store.whitening_arrays)
    elif os.path.exists(whitening_path(path)):
        os.unlink(whitening_path(path))  # it belonged to the file just replaced
    metadata = {**store.metadata, "count": len(store.paths), "feature_dim": int(features.shape[1])}
    with atomic_write(metadata_path(path)) as handle:
        json.dump(metadata, handle, indent=2, sort_keys=True)
        handle.write("\n")


def load_features(path: str) -> FeatureStore:
    """Read a features file and its metadata (if any).

    Raises:
        FeaturesFileError: missing, empty or malformed file, or metadata that
            contradicts the file; the message says which and where.
    """
    if not os.path.exists(path):
        raise FeaturesFileError(f"features file not found: {path}")
    if os.path.isdir(path):
        raise FeaturesFileError(f"features file is a folder: {path}")
    paths, features = _read_csv(path)
    metadata = read_metadata(path)
    _check_metadata(path, metadata, features)
    return FeatureStore(paths, features, metadata, _read_whitening(path, features))


def _read_whitening(path: str, features: np.ndarray) -> dict[str, np.ndarray] | None:
    """The stored whitening, or None if absent or not for these features
    (then it is learned again when needed)."""
    try:
        with np.load(whitening_path(path)) as data:
            arrays = {key: data[key] for key in ("mean", "projection", "vectors")}
    except (OSError, KeyError, ValueError):
        return None
    fits = (arrays["mean"].shape == (features.shape[1],)
            and arrays["projection"].shape[0] == features.shape[1]
            and arrays["vectors"].shape == (len(features), arrays["projection"].shape[1]))
    return arrays if fits else None


def read_metadata(features_path: str) -> dict:
    """The metadata beside `features_path`, or {} if there is none."""
    meta_file = metadata_path(features_path)
    if not os.path.exists(meta_file):
        return {}
    try:
        with open(meta_file, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as error:
        raise FeaturesFileError(f"unreadable metadata file {meta_file}: {error}") from None
    if not isinstance(metadata, dict):
        raise FeaturesFileError(f"metadata file {meta_file} does not hold a JSON object")
    return metadata


def _read_csv(path: str) -> tuple[list[str], np.ndarray]:
    try:
        frame = pd.read_csv(
            path, header=None, dtype={0: str}, keep_default_na=False,
            na_values=[""], encoding="utf-8", encoding_errors=ENCODING_ERRORS,
        )
    except pd.errors.EmptyDataError:
        raise FeaturesFileError(f"features file is empty: {path}") from None
    except pd.errors.ParserError as error:
        raise FeaturesFileError(f"malformed features file {path}: {_first_line(error)}") from None
    except (OSError, UnicodeError) as error:
        raise FeaturesFileError(f"cannot read features file {path}: {error}") from None
    if frame.shape[1] < 2:
        raise FeaturesFileError(f"malformed features file {path}: no feature values after the path")
    values = frame.iloc[:, 1:]
    try:
        features = values.to_numpy(dtype=np.float32)
    except (ValueError, TypeError):
        raise FeaturesFileError(f"malformed features file {path}: {_non_numeric(values)}") from None
    _check_complete_rows(path, features)
    return frame.iloc[:, 0].tolist(), features


def _check_complete_rows(path: str, features: np.ndarray) -> None:
    # pandas pads short rows with NaN: a truncated or hand-edited line.
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        row = int(bad[0])
        count = int(np.isfinite(features[row]).sum())
        raise FeaturesFileError(
            f"malformed features file {path}: row {row + 1} has {count} valid values, "
            f"expected {features.shape[1]} (truncated or edited?)"
        )


def _non_numeric(values: pd.DataFrame) -> str:
    for column in values.columns:
        converted = pd.to_numeric(values[column], errors="coerce")
        bad = converted.isna() & values[column].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            return f"row {row + 1}, column {column + 1} is not a number: {values[column].iloc[row]!r}"
    return "non-numeric feature values"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def _check_metadata(path: str, metadata: dict, features: np.ndarray) -> None:
    if not metadata:
        return
    expected_dim = metadata.get("feature_dim")
    if expected_dim is not None and expected_dim != features.shape[1]:
        raise FeaturesFileError(
            f"{path} has {features.shape[1]} values per image but its metadata "
            f"says {expected_dim}: the two files don't belong together"
        )
    expected_count = metadata.get("count")
    if expected_count is not None and expected_count != len(features):
        raise FeaturesFileError(
            f"{path} has {len(features)} rows but its metadata says {expected_count}: "
            f"the two files don't belong together (re-run the indexing)"
        )
