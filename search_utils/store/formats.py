"""One API over the two formats: `save_features`, `load_features`,
`append_features`, `iter_feature_chunks`.

Saving picks the format from the extension (any case): `.csv`
(csv_format.py, the post's), or `.h5`/`.hdf5` (hdf5_format.py); anything
else is refused. Loading goes by content: a file that starts with the HDF5
signature is read as HDF5 whatever its name, anything else as CSV.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from typing import Iterable, Iterator

import numpy as np

from ..errors import FeaturesFileError, printable_path
from . import csv_format, hdf5_format
from .atomic import NOT_REGULAR, open_regular
from .feature_store import ENCODING_ERRORS, FeatureStore, excerpt

CSV_EXTENSIONS = (".csv",)
SUPPORTED_EXTENSIONS = CSV_EXTENSIONS + hdf5_format.HDF5_EXTENSIONS
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
DEFAULT_CHUNK_ROWS = 65536  # iter_feature_chunks
PER_FILE_KEYS = ("generation", "features_sha256")  # describe one written file, never copied to another


def output_format(path: str) -> str:
    """"csv" or "hdf5": the format `save_features` writes to `path`, from its
    extension (any case).

    Raises:
        FeaturesFileError: any other extension.
    """
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in CSV_EXTENSIONS:
        return "csv"
    if extension in hdf5_format.HDF5_EXTENSIONS:
        return "hdf5"
    shown = f"extension '{printable_path(extension)}'" if extension else "no extension"
    raise FeaturesFileError(
        f"features file {printable_path(path)} has {shown}: use {', '.join(SUPPORTED_EXTENSIONS)} "
        f"(.csv is the post's text format, .h5/.hdf5 the binary one)"
    )


def file_format(path: str) -> str:
    """"hdf5" or "csv": how `load_features` reads the existing file `path`,
    from its first bytes (the HDF5 signature), whatever its name.

    Raises:
        FeaturesFileError: unreadable, not a regular file, or binary
            without the HDF5 signature (not a features file: an image, a
            database, a damaged HDF5 file...).
    """
    path = os.fspath(path)
    try:
        with open_regular(path) as handle:
            head = handle.read(HEAD_BYTES)
    except OSError as error:
        raise FeaturesFileError(f"cannot read features file {printable_path(path)}: "
                                f"{error.strerror or error}") from None
    if head.startswith(hdf5_format.HDF5_SIGNATURE):
        return "hdf5"
    # A text file named .h5 may be a CSV written before HDF5 support (any
    # name was CSV then); binary bytes without the signature are no features file.
    if is_binary(head):
        damaged = ("; no HDF5 signature at its start: a damaged HDF5 file?"
                   if os.path.splitext(path)[1].lower() in hdf5_format.HDF5_EXTENSIONS else "")
        raise FeaturesFileError(f"{printable_path(path)} is not a features file (binary data, neither the CSV "
                                f"nor the HDF5 format{damaged})")
    return "csv"


HEAD_BYTES = 4096  # read to tell the formats apart


def is_binary(head: bytes) -> bool:
    """Whether the first bytes of a file, `head`, are binary data rather
    than text: NUL bytes, in bytes that are not UTF-8 or in numbers no text
    holds (a CSV row may hold a stray NUL in a path; an image, a database
    or a zip file hold many, and bytes that are no UTF-8)."""
    nuls = head.count(b"\0")
    if not nuls:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # not just a character cut at the end of `head`
            return True
    return nuls > max(8, len(head) // 100)
FIRST_ROW_BYTES = 1 << 20  # read to judge a CSV's first row


def first_row_problem(head: bytes) -> str | None:
    """Why the start of a CSV file, `head`, can't be a features file's (its
    first row is not an image path then numbers), or None. A row longer
    than `head`, or one cut off in quotes, is left to the full parse."""
    text = head.decode("utf-8", ENCODING_ERRORS)
    complete = len(head) < FIRST_ROW_BYTES
    try:
        for fields in csv.reader(io.StringIO(text if complete else text[:text.rfind("\n") + 1])):
            if not fields:
                continue
            if len(fields) < 2:
                return f"its first row ({excerpt(fields[0])}) has no feature values after the path"
            if not any(_is_number(value) for value in fields[1:]):
                return f"its first row ({excerpt(','.join(fields))}) is not an image path followed by numbers"
            return None
    except csv.Error:
        return None
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text


def features_file_problem(path: str) -> str | None:
    """Why the existing file `path` is not a features file that indexing
    may replace (or None: it is one, it is empty, or there is none), read
    no further than needed: a folder, FIFO or device; binary without the
    HDF5 signature; HDF5 without the features mark; text whose first row
    is not an image path followed by numbers."""
    path = os.fspath(path)
    try:
        with open_regular(path) as handle:
            head = handle.read(FIRST_ROW_BYTES)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return "it is a folder"
    except OSError as error:
        return f"it can't be read ({error.strerror or error})"
    if not head:
        return None
    if head.startswith(hdf5_format.HDF5_SIGNATURE):
        try:
            with hdf5_format.hdf5_errors(path), hdf5_format.open_hdf5(path) as f:
                hdf5_format.inspect(path, f)
        except FeaturesFileError:
            return "an HDF5 file, but not a features file this tool can read"
        return None
    if is_binary(head[:HEAD_BYTES]):
        return "binary data, neither the CSV nor the HDF5 format"
    return first_row_problem(head)


def save_features(path: str, store: FeatureStore, dtype="float32") -> None:
    """Write `store` to `path`: CSV (as in the post, metadata and whitening in
    files beside it, published together) or HDF5 (one file), as the
    extension says. Atomic: a reader sees the old files or the new ones.

    Args:
        dtype: how HDF5 stores the features: "float32" (exact, and
            memory-mappable) or "float16" (half the size, ~3 significant
            digits; loaded as float32). CSV always holds the exact float32
            values.

    Raises:
        FeaturesFileError: an extension other than .csv, .h5, .hdf5.
        FileWriteError: the file system refused (full disk, permissions).
        ValueError: paths and features don't match, float16 for CSV, or
            values too large for float16.
    """
    path = os.fspath(path)
    kind = output_format(path)
    storage = _storage_dtype(dtype)
    features = np.asarray(store.features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(store.paths):
        raise ValueError(f"{len(store.paths)} paths but features of shape {features.shape}")
    metadata = {k: v for k, v in store.metadata.items() if k not in PER_FILE_KEYS}
    store = FeatureStore(store.paths, features, metadata, store.whitening_arrays)
    if kind == "hdf5":
        hdf5_format.write_hdf5(path, store, features, storage)
        return
    if storage != np.float32:
        raise ValueError(f"{printable_path(path)}: float16 storage is for HDF5 files (.h5, .hdf5); "
                         f"CSV holds the float32 values")
    csv_format.save_csv(path, store, features)


def _storage_dtype(dtype) -> np.dtype:
    try:
        storage = np.dtype(dtype)
    except TypeError:
        storage = None
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"features are stored as float32 or float16, not {dtype!r}")
    return storage


def load_features(path: str, mmap: bool = False) -> FeatureStore:
    """Read a features file (CSV or HDF5, told apart by content) with the
    metadata and whitening of the same write.

    Args:
        mmap: for an HDF5 file with contiguous float32 features (as
            `save_features` writes them), return them (and the whitened
            vectors) as read-only numpy.memmap: nothing is read until used.
            Otherwise, and for CSV, the features are read whole.

    Raises:
        FeaturesFileError: missing, empty or malformed file, or metadata that
            contradicts the file; the message says which and where.
    """
    path = os.fspath(path)
    check_exists(path)
    if file_format(path) == "hdf5":
        return hdf5_format.load_hdf5(path, mmap)
    try:
        return csv_format.load_csv(path)
    except OSError as error:  # e.g. replaced by a folder, or permissions changed, while reading
        raise FeaturesFileError(f"cannot read features file {printable_path(path)}: "
                                f"{error.strerror or error}") from None


def check_exists(path: str) -> None:
    """Refuse a features file that is missing, can't be reached, or is not a
    regular file (a FIFO would block the reader for ever).

    Raises:
        FeaturesFileError: one line saying which.
    """
    shown = printable_path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FeaturesFileError(f"features file not found: {shown}") from None
    except NotADirectoryError:
        raise FeaturesFileError(f"features file not found: {shown} (a part of its path is a file, "
                                f"not a folder)") from None
    except OSError as error:
        raise FeaturesFileError(f"cannot read features file {shown}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise FeaturesFileError(f"features file is a folder: {shown}")
    if not stat.S_ISREG(mode):
        raise FeaturesFileError(f"features file {shown} is {NOT_REGULAR}")


def append_features(path: str, paths: Iterable[str], features: np.ndarray) -> None:
    """Add rows to the existing features file `path`, atomically: the file is
    either as before or has all the new rows, its metadata count updated.

    A stored whitening is dropped (it doesn't cover the new rows; search
    learns it again when needed). HDF5 keeps its storage type (float16
    stays float16). CSV is read, extended and rewritten.

    Raises:
        FeaturesFileError: `path` is missing or malformed, or its rows have
            another number of values than `features`.
        ValueError: `paths` and `features` don't match.
    """
    path = os.fspath(path)
    paths = [str(p) for p in paths]
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(paths):
        raise ValueError(f"{len(paths)} paths but features of shape {features.shape}")
    check_exists(path)
    if file_format(path) == "hdf5":
        hdf5_format.append_hdf5(path, paths, features)
        return
    store = load_features(path)
    hdf5_format.check_append_dim(path, store.dim, features)
    # As CSV whatever the name (a text file named .h5 stays text); a new
    # generation: save_csv records its own id and hash over the old ones.
    csv_format.save_csv(path, FeatureStore(store.paths + paths, None, store.metadata),
                        np.concatenate([store.features, features]))


def iter_feature_chunks(path: str, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """(start, float32 array of up to `rows` rows) over a features file, in
    order, reading only that much at a time from HDF5. A CSV file can't be
    read in part and is parsed whole first.

    Raises:
        FeaturesFileError: as `load_features`.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    path = os.fspath(path)
    check_exists(path)
    if file_format(path) == "hdf5":
        yield from hdf5_format.iter_hdf5_chunks(path, rows)
        return
    features = load_features(path).features
    for start in range(0, len(features), rows):
        yield start, features[start:start + rows]
