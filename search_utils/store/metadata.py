"""The metadata that says how a features file was made (model, weights,
preprocessing, dimension, count, tool version): beside a CSV file as
`<features>.meta.json`, inside an HDF5 file as an attribute."""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import FeaturesFileError

METADATA_SUFFIX = ".meta.json"
CSV_MISMATCH = "the two files don't belong together"
HDF5_MISMATCH = "the file contradicts itself"


def metadata_path(features_path: str) -> str:
    """The metadata file that belongs to `features_path` (CSV)."""
    return os.fspath(features_path) + METADATA_SUFFIX


def read_metadata(features_path: str) -> dict:
    """The metadata beside `features_path` (CSV), or {} if there is none."""
    return read_metadata_file(metadata_path(features_path)) or {}


def read_metadata_file(meta_file: str) -> dict | None:
    """The JSON object in `meta_file`, or None if there is no such file.

    Raises:
        FeaturesFileError: unreadable, or not a JSON object.
    """
    try:
        with open(meta_file, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise FeaturesFileError(f"metadata file {meta_file} is a folder") from None
    except OSError as error:
        raise FeaturesFileError(f"cannot read metadata file {meta_file}: {error.strerror or error}") from None
    except ValueError as error:
        raise FeaturesFileError(f"unreadable metadata file {meta_file}: {error}") from None
    if not isinstance(metadata, dict):
        raise FeaturesFileError(f"metadata file {meta_file} does not hold a JSON object")
    return metadata


def full_metadata(metadata: dict, rows: int, dim: int) -> dict:
    """`metadata` with the shape it describes, so a reader can check it."""
    return {**metadata, "count": int(rows), "feature_dim": int(dim)}


def check_shape(path: str, metadata: dict, rows: int, dim: int, mismatch: str) -> None:
    """Refuse features whose shape contradicts their metadata."""
    if not metadata:
        return
    # "1280" (a string, hand-edited) would otherwise read as "has 1280
    # values per image but its metadata says 1280".
    for key, says in (("feature_dim", "values per image"), ("count", "rows")):
        value = metadata.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise FeaturesFileError(f"malformed features file {path}: its metadata's {key} ({says}) is "
                                    f"{json.dumps(value)}, not a whole number")
    expected_dim = metadata.get("feature_dim")
    if expected_dim is not None and expected_dim != dim:
        raise FeaturesFileError(
            f"{path} has {dim} values per image but its metadata "
            f"says {expected_dim}: {mismatch}"
        )
    expected_count = metadata.get("count")
    if expected_count is not None and expected_count != rows:
        raise FeaturesFileError(
            f"{path} has {rows} rows but its metadata says {expected_count}: "
            f"{mismatch} (re-run the indexing)"
        )
