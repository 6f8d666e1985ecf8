"""The metadata that says how a features file was made (model, weights,
preprocessing, dimension, count, tool version): beside a CSV file as
`<features>.meta.json`, inside an HDF5 file as an attribute."""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import FeaturesFileError, printable_path
from .atomic import open_regular
from .feature_store import FORMAT_VERSION

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
    shown = printable_path(meta_file)
    try:
        with open_regular(meta_file, "r", encoding="utf-8") as handle:  # a FIFO would block for ever
            metadata = json.load(handle)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise FeaturesFileError(f"metadata file {shown} is a folder") from None
    except OSError as error:
        raise FeaturesFileError(f"cannot read metadata file {shown}: {error.strerror or error}") from None
    except ValueError as error:
        raise FeaturesFileError(f"unreadable metadata file {shown}: {' '.join(str(error).split())}") from None
    if not isinstance(metadata, dict):
        raise FeaturesFileError(f"metadata file {shown} does not hold a JSON object")
    return metadata


def full_metadata(metadata: dict, rows: int, dim: int) -> dict:
    """`metadata` with the shape it describes, so a reader can check it."""
    return {**metadata, "count": int(rows), "feature_dim": int(dim)}


def check_shape(path: str, metadata: dict, rows: int, dim: int, mismatch: str) -> None:
    """Refuse features whose metadata is from a newer version of the format,
    or whose shape contradicts their metadata."""
    if not metadata:
        return
    shown = printable_path(path)
    # "1280" (a string, hand-edited) would otherwise read as "has 1280
    # values per image but its metadata says 1280".
    for key, says in (("feature_dim", "values per image"), ("count", "rows"),
                      ("format_version", "the format's version")):
        value = metadata.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise FeaturesFileError(f"malformed features file {shown}: its metadata's {key} ({says}) is "
                                    f"{_shown_value(value)}, not a whole number")
    version = metadata.get("format_version")
    if version is not None and version > FORMAT_VERSION:
        raise FeaturesFileError(f"{shown} has features format version {version}, this tool reads up to "
                                f"{FORMAT_VERSION}: upgrade search_utils")
    expected_dim = metadata.get("feature_dim")
    if expected_dim is not None and expected_dim != dim:
        raise FeaturesFileError(
            f"{shown} has {dim} values per image but its metadata "
            f"says {expected_dim}: {mismatch}"
        )
    expected_count = metadata.get("count")
    if expected_count is not None and expected_count != rows:
        raise FeaturesFileError(
            f"{shown} has {rows} rows but its metadata says {expected_count}: "
            f"{mismatch} (re-run the indexing)"
        )


def _shown_value(value) -> str:
    text = json.dumps(value)
    return printable_path(text if len(text) <= 40 else text[:39] + "…")
