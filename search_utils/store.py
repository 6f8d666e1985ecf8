"""Reading and writing features files, with the metadata that says how they
were made.

One API over two formats: `save_features`, `load_features`,
`append_features`, `iter_feature_chunks`. Saving picks the format from the
extension (any case): `.csv`, or `.h5`/`.hdf5`; anything else is refused.
Loading goes by content: a file that starts with the HDF5 signature is read
as HDF5 whatever its name, anything else as CSV.

CSV (`.csv`) is exactly the post's format: no header, one row per image, the
image path then the feature values. Proper CSV quoting lets any path (commas,
quotes, newlines) survive the round trip. Beside `features.csv` lives
`features.csv.meta.json` (see `metadata_path`): model, weights, preprocessing,
dimension, count, tool version; and, if a whitening was learned at index
time, `features.csv.whitening.npz`.

HDF5 (`.h5`, `.hdf5`, through h5py) is one self-contained binary file that
needs no text parsing and no sidecar:

    /                        attributes: format = "search_utils features",
                             format_version = 1, metadata = the JSON object
                             CSV keeps in .meta.json
    /paths                   (n,) variable-length UTF-8 strings; their bytes are
                             path.encode("utf-8", "surrogateescape"), as in the
                             CSV, so non-UTF-8 file names round-trip too
    /features                (n, dim) float32, or float16 if asked for at save
                             time (always float32 in memory)
    /whitening/mean, /whitening/projection, /whitening/vectors   if stored

Layout, measured on 100,000 x 2048 float32 (800 MB, page cache warm; see
bench/bench_store.py for the numbers on your machine):

- `save_features` writes `features` contiguous (no chunks, no compression):
  `load_features(path, mmap=True)` then returns a read-only numpy.memmap at
  the dataset's offset in the file: no read at all until the search touches
  the rows (opening: ~1 ms; a full read_direct: ~0.17 s).
- HDF5 can only resize chunked datasets, and a chunked dataset can't be
  mapped as one array. Read whole with read_direct, uncompressed chunks of
  0.5 to 32 MB read as fast as a contiguous dataset (0.15 to 0.25 s). So the
  first append rewrites the file with resizable datasets in chunks of about
  4 MB (512 rows of 2048 float32; fewer for small files, re-chunked as they
  grow), and later appends just extend them. `mmap=True` on such a file
  falls back to that full read; saving it again (e.g.
  `convert_features.py f.h5 f.h5`) makes it contiguous again.

Atomic writes: every file is written to a temporary file beside its target,
fsync'ed and renamed over it (then the folder is fsync'ed), so an
interrupted run leaves the previous file as it was. HDF5 is not journalled:
a process killed while HDF5 updates a file in place can leave it unreadable.
So an append never touches the file: it works on a copy (a reflink, which
costs nothing until written, on filesystems that have them: btrfs, XFS, ...;
elsewhere a kernel copy, ~0.4 s for 800 MB) that is then fsync'ed and
renamed. On ext4 an append therefore costs a copy of the file; on reflink
filesystems, only the new rows. Readers, and memory maps, of the previous
file are undisturbed. Appends from several processes at once are not
merged: one writer at a time.

An append drops a stored whitening (it no longer covers every row; search
learns it again when needed, and says so). Deleting from an HDF5 file does
not shrink it, so a file holding a whitening is rewritten, not copied.

Knows nothing about models or distances.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

import numpy as np
import pandas as pd

from .errors import FeaturesFileError, printable_path

METADATA_SUFFIX = ".meta.json"
WHITENING_SUFFIX = ".whitening.npz"
FORMAT_VERSION = 1
# Non-UTF-8 bytes in file names survive as surrogates (os.fsdecode) and must
# survive the trip through the text file too.
ENCODING_ERRORS = "surrogateescape"

CSV_EXTENSIONS = (".csv",)
HDF5_EXTENSIONS = (".h5", ".hdf5")
SUPPORTED_EXTENSIONS = CSV_EXTENSIONS + HDF5_EXTENSIONS
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_FORMAT = "search_utils features"
HDF5_FORMAT_VERSION = 1
# File format of HDF5 1.10 (2016) or later: checksummed metadata, and a
# chunk index made for datasets that grow along one dimension.
HDF5_LIBVER = "v110"
WHITENING_KEYS = ("mean", "projection", "vectors")
STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
FLOAT16_MAX = float(np.finfo(np.float16).max)

CHUNK_BYTES = 4 << 20  # features chunk of an appendable file
RECHUNK_FACTOR = 8  # re-chunk when chunks are this much smaller than ideal
PATHS_CHUNK = 4096  # paths per chunk (16-byte references)
BLOCK_BYTES = 64 << 20  # rows read, converted or written at a time
DEFAULT_CHUNK_ROWS = 65536  # iter_feature_chunks
_FICLONE = 0x40049409  # Linux ioctl: make a file share another's blocks


@dataclass
class FeatureStore:
    """Features in memory: row i of `features` belongs to `paths[i]`.

    `metadata` is {} for a file without metadata (e.g. written by the
    post's original script). `whitening_arrays` holds a whitening learned
    at index time ("mean", "projection", and "vectors": the whitened rows),
    or None.
    """

    paths: list[str]
    features: np.ndarray  # (n, dim) float32, maybe a read-only memmap
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
    """The metadata file that belongs to `features_path` (CSV)."""
    return os.fspath(features_path) + METADATA_SUFFIX


def whitening_path(features_path: str) -> str:
    """The learned-whitening file that belongs to `features_path` (CSV)."""
    return os.fspath(features_path) + WHITENING_SUFFIX


def output_format(path: str) -> str:
    """"csv" or "hdf5": the format `save_features` writes to `path`, from its
    extension (any case).

    Raises:
        FeaturesFileError: any other extension.
    """
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension in CSV_EXTENSIONS:
        return "csv"
    if extension in HDF5_EXTENSIONS:
        return "hdf5"
    shown = f"extension {extension!r}" if extension else "no extension"
    raise FeaturesFileError(
        f"features file {path} has {shown}: use {', '.join(SUPPORTED_EXTENSIONS)} "
        f"(.csv is the post's text format, .h5/.hdf5 the binary one)"
    )


def file_format(path: str) -> str:
    """"hdf5" or "csv": how `load_features` reads the existing file `path`,
    from its first bytes (the HDF5 signature), whatever its name.

    Raises:
        FeaturesFileError: unreadable, or named .h5/.hdf5 but binary and
            without the signature (damaged).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError as error:
        raise FeaturesFileError(f"cannot read features file {path}: {error}") from None
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    # A text file named .h5 may be a CSV written before HDF5 support (any
    # name was CSV then); binary bytes without the signature are a damaged file.
    if os.path.splitext(path)[1].lower() in HDF5_EXTENSIONS and b"\0" in head:
        raise FeaturesFileError(f"{path} is not an HDF5 file (no HDF5 signature at its start; damaged?)")
    return "csv"


@contextlib.contextmanager
def atomic_write(path: str, newline: str | None = None, binary: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success, flush it
    to disk and rename it over `path`. On any error `path` is untouched."""
    text = {} if binary else {"encoding": "utf-8", "errors": ENCODING_ERRORS, "newline": newline}
    with _atomic_file(path) as tmp:
        with open(tmp, "wb" if binary else "w", **text) as handle:
            yield handle


@contextlib.contextmanager
def _atomic_file(path: str, copy_of: str | None = None) -> Iterator[str]:
    """A temporary file name beside `path` (empty, or a copy of `copy_of`
    with its permissions) to write by name, e.g. with h5py; on success it is
    fsync'ed and renamed over `path`. On any error `path` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode(path))  # mkstemp's 0600 would hide the file from others
        if copy_of is not None:
            _copy_file(copy_of, tmp)
            shutil.copymode(copy_of, tmp)
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _file_mode(path: str) -> int:
    """The permissions `path` has now, or a new file's (0666 less the umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _copy_file(source: str, target: str) -> None:
    """Give `target` the bytes of `source`: a reflink where the filesystem
    can (blocks shared until written), else a kernel copy."""
    if sys.platform.startswith("linux"):
        try:
            import fcntl

            with open(source, "rb") as src, open(target, "r+b") as dst:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
        except OSError:
            pass  # ext4, tmpfs, ...: not supported
    shutil.copyfile(source, target)


def _fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (best effort: not every platform
    can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files that writes of `path` (and its sidecars)
    left behind when their process was killed (kill -9: no cleanup runs).
    Only call while no one writes `path` (e.g. holding its indexing lock)."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def save_features(path: str, store: FeatureStore, dtype="float32") -> None:
    """Write `store` to `path`: CSV (as in the post, metadata and whitening in
    files beside it) or HDF5 (one file), as the extension says.

    Args:
        dtype: how HDF5 stores the features: "float32" (exact, and
            memory-mappable) or "float16" (half the size, ~3 significant
            digits; loaded as float32). CSV always holds the exact float32
            values.

    For CSV the features file is replaced first, then the metadata; the
    metadata records the row count, so a reader can tell if it was
    interrupted between the two.

    Raises:
        FeaturesFileError: an extension other than .csv, .h5, .hdf5.
        ValueError: paths and features don't match, float16 for CSV, or
            values too large for float16.
    """
    path = os.fspath(path)
    kind = output_format(path)
    storage = _storage_dtype(dtype)
    features = np.asarray(store.features, dtype=np.float32)
    if features.ndim != 2 or len(features) != len(store.paths):
        raise ValueError(f"{len(store.paths)} paths but features of shape {features.shape}")
    if kind == "hdf5":
        _write_hdf5(path, store, features, storage)
        return
    if storage != np.float32:
        raise ValueError(f"{path}: float16 storage is for HDF5 files (.h5, .hdf5); CSV holds the float32 values")
    _save_csv(path, store, features)


def _save_csv(path: str, store: FeatureStore, features: np.ndarray) -> None:
    # Converted to text a block at a time: the whole (n, dim) array as
    # strings would take 128 bytes per value.
    # Only the path can need quoting; the csv module quotes it, and the
    # numbers are joined directly (twice as fast as 2,049 fields a row).
    block = _block_rows(features.shape[1] * 4)
    with atomic_write(path, newline="") as handle:
        for start in range(0, len(features), block):
            text = features[start:start + block].astype(str)  # shortest repr that round-trips float32
            for image_path, row in zip(store.paths[start:start + block], text):
                handle.write(_csv_field(image_path) + "," + ",".join(row) + "\n")
    if store.whitening_arrays is not None:
        with atomic_write(whitening_path(path), binary=True) as handle:
            np.savez(handle, **store.whitening_arrays)
    elif os.path.exists(whitening_path(path)):
        os.unlink(whitening_path(path))  # it belonged to the file just replaced
    with atomic_write(metadata_path(path)) as handle:
        json.dump(_full_metadata(store.metadata, features), handle, indent=2, sort_keys=True)
        handle.write("\n")


def _csv_field(value: str) -> str:
    """`value` as the csv module writes one field (quoted only if needed)."""
    if not value:
        return ""  # alone on a row the csv module would write '""'
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow([value])
    return buffer.getvalue()[:-1]


def _full_metadata(metadata: dict, features: np.ndarray) -> dict:
    return {**metadata, "count": int(features.shape[0]), "feature_dim": int(features.shape[1])}


def _storage_dtype(dtype) -> np.dtype:
    try:
        storage = np.dtype(dtype)
    except TypeError:
        storage = None
    if storage not in STORAGE_DTYPES:
        raise ValueError(f"features are stored as float32 or float16, not {dtype!r}")
    return storage


def load_features(path: str, mmap: bool = False) -> FeatureStore:
    """Read a features file (CSV or HDF5, told apart by content) and its
    metadata (if any).

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
    _check_exists(path)
    if file_format(path) == "hdf5":
        return _load_hdf5(path, mmap)
    paths, features = _read_csv(path)
    metadata = read_metadata(path)
    _check_metadata(path, metadata, features)
    return FeatureStore(paths, features, metadata, _read_whitening(path, features))


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FeaturesFileError(f"features file not found: {path}")
    if os.path.isdir(path):
        raise FeaturesFileError(f"features file is a folder: {path}")


def _read_whitening(path: str, features: np.ndarray) -> dict[str, np.ndarray] | None:
    """The stored whitening, or None if absent or not for these features
    (then it is learned again when needed)."""
    try:
        with np.load(whitening_path(path)) as data:
            arrays = {key: data[key] for key in WHITENING_KEYS}
    except (OSError, KeyError, ValueError):
        return None
    return arrays if _whitening_fits(arrays, features) else None


def _whitening_fits(arrays: dict[str, np.ndarray], features: np.ndarray) -> bool:
    return (arrays["mean"].shape == (features.shape[1],)
            and arrays["projection"].ndim == 2
            and arrays["projection"].shape[0] == features.shape[1]
            and arrays["vectors"].shape == (len(features), arrays["projection"].shape[1]))


def read_metadata(features_path: str) -> dict:
    """The metadata beside `features_path` (CSV), or {} if there is none."""
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
        raise FeaturesFileError(f"malformed features file {path}: {_row_problem(path) or _first_line(error)}") from None
    except (OSError, UnicodeError) as error:
        raise FeaturesFileError(f"cannot read features file {path}: {error}") from None
    if frame.shape[1] < 2:
        raise FeaturesFileError(f"malformed features file {path}: no feature values after the path")
    values = frame.iloc[:, 1:]
    try:
        features = values.to_numpy(dtype=np.float32)
    except (ValueError, TypeError):
        raise FeaturesFileError(f"malformed features file {path}: {_non_numeric(values)}") from None
    if not np.isfinite(features).all():
        # pandas pads short rows with NaN: a truncated or hand-edited line;
        # or a value is empty, "nan" or "inf".
        problem = _row_problem(path) or _non_finite(values, features)
        raise FeaturesFileError(f"malformed features file {path}: {problem}")
    return frame.iloc[:, 0].tolist(), features


def _row_problem(path: str) -> str | None:
    """The first row whose number of values differs from most rows', or that
    is cut off inside quotes; None if every row has the same length.

    Read again with the csv module, only once pandas has failed (so the cost
    doesn't matter): pandas measures every line against the first one, so
    an edited first row would be reported as row 2 being wrong."""
    rows: list[tuple[int, str]] = []  # (number of values, image path), blank lines skipped as pandas does
    try:
        with open(path, encoding="utf-8", errors=ENCODING_ERRORS, newline="") as handle:
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
            return (f"row {number} ({printable_path(image_path)}) has {count} values, "
                    f"expected {expected} (truncated or edited?)")
    return None


def _non_finite(values: pd.DataFrame, features: np.ndarray) -> str:
    row, column = (int(i) for i in np.argwhere(~np.isfinite(features))[0])
    text = values.iat[row, column]
    shown = "empty" if isinstance(text, float) and np.isnan(text) else f"not a finite number ({text})"
    return f"row {row + 1}, column {column + 2} is {shown}"


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


_CSV_MISMATCH = "the two files don't belong together"
_HDF5_MISMATCH = "the file contradicts itself"


def _check_metadata(path: str, metadata: dict, features: np.ndarray) -> None:
    _check_shape(path, metadata, *features.shape, _CSV_MISMATCH)


def _check_shape(path: str, metadata: dict, rows: int, dim: int, mismatch: str) -> None:
    if not metadata:
        return
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


# ---------------------------------------------------------------- HDF5


def _h5py():
    import h5py  # only when an HDF5 file is used: importing the package stays cheap

    return h5py


@contextlib.contextmanager
def _hdf5_errors(path: str, doing: str = "unreadable HDF5 features file") -> Iterator[None]:
    """h5py's errors about a damaged or foreign file, as one-line
    FeaturesFileErrors."""
    try:
        yield
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        raise FeaturesFileError(f"{doing} {path}: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _open_hdf5(path: str, mode: str = "r"):
    return _h5py().File(path, mode, locking=False, **({"libver": HDF5_LIBVER} if mode == "w" else {}))


@dataclass
class _Layout:
    """What an HDF5 features file holds, checked: ours, consistent."""

    metadata: dict
    rows: int
    dim: int
    dtype: np.dtype
    chunk_rows: int | None  # None: contiguous (or not resizable along rows)
    has_whitening: bool


def _inspect(path: str, f) -> _Layout:
    """Check that the open file `f` is a features file and consistent;
    raise FeaturesFileError (one line) otherwise."""
    h5py = _h5py()
    if _text(f.attrs.get("format")) != HDF5_FORMAT:
        raise FeaturesFileError(
            f"{path} is an HDF5 file but not a features file (no {HDF5_FORMAT!r} format mark; model weights?)"
        )
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or version > HDF5_FORMAT_VERSION:
        raise FeaturesFileError(
            f"{path} has features format version {version}, this tool reads up to "
            f"{HDF5_FORMAT_VERSION}: upgrade search_utils"
        )
    try:
        metadata = json.loads(_text(f.attrs.get("metadata", "{}")))
    except (ValueError, TypeError) as error:
        raise FeaturesFileError(f"malformed features file {path}: unreadable metadata: {_one_line(error)}") from None
    if not isinstance(metadata, dict):
        raise FeaturesFileError(f"malformed features file {path}: its metadata is not a JSON object")
    features, paths = f.get("features"), f.get("paths")
    if not isinstance(features, h5py.Dataset) or not isinstance(paths, h5py.Dataset):
        raise FeaturesFileError(f"malformed features file {path}: no 'features' or no 'paths' dataset")
    if features.ndim != 2 or features.dtype.kind != "f":
        raise FeaturesFileError(
            f"malformed features file {path}: 'features' is {features.dtype} of shape {features.shape}, "
            f"expected floats of shape (rows, values)"
        )
    info = h5py.check_string_dtype(paths.dtype)
    if paths.ndim != 1 or info is None or info.length is not None:
        raise FeaturesFileError(f"malformed features file {path}: 'paths' is not a list of variable-length strings")
    rows, dim = features.shape
    if len(paths) != rows:
        raise FeaturesFileError(f"malformed features file {path}: {len(paths)} paths but {rows} rows of features")
    _check_shape(path, metadata, rows, dim, _HDF5_MISMATCH)
    resizable = (features.chunks is not None and features.chunks[1] == dim
                 and features.maxshape[0] is None and paths.maxshape[0] is None)
    return _Layout(metadata, rows, dim, features.dtype, features.chunks[0] if resizable else None,
                   "whitening" in f)


def _text(value) -> str | None:
    return value.decode("utf-8", ENCODING_ERRORS) if isinstance(value, bytes) else value


def _load_hdf5(path: str, mmap: bool) -> FeatureStore:
    with _hdf5_errors(path):
        with _open_hdf5(path) as f:
            layout = _inspect(path, f)
            if layout.rows == 0:
                raise FeaturesFileError(f"features file is empty: {path}")
            paths = _decode_paths(f["paths"][()])
            features = _read_matrix(path, f["features"], mmap)
            whitening = _read_hdf5_whitening(path, f, features, mmap)
    return FeatureStore(paths, features, layout.metadata, whitening)


def _decode_paths(raw: np.ndarray) -> list[str]:
    return [p.decode("utf-8", ENCODING_ERRORS) if isinstance(p, bytes) else str(p) for p in raw]


def _encode_paths(paths: Iterable[str]) -> np.ndarray:
    paths = list(paths)
    encoded = np.empty(len(paths), dtype=object)
    for i, image_path in enumerate(paths):
        data = str(image_path).encode("utf-8", ENCODING_ERRORS)
        if b"\0" in data:
            raise ValueError(f"path {image_path!r} holds a NUL character, which no file name can")
        encoded[i] = data
    return encoded


def _read_matrix(path: str, dset, mmap: bool) -> np.ndarray:
    """All of `dset` as float32: mapped if asked and possible, else read."""
    if mmap:
        mapped = _memmap(path, dset)
        if mapped is not None:
            return mapped
    out = np.empty(dset.shape, dtype=np.float32)
    _read_rows(dset, 0, out)
    return out


def _read_rows(dset, start: int, out: np.ndarray) -> None:
    """dset[start:start + len(out)] -> out (float32). float32 is read
    straight into `out`; anything else a block at a time in its own type,
    then converted by numpy (HDF5's own float16 conversion is ~50x slower)."""
    if not out.size:
        return
    if dset.dtype == out.dtype:
        dset.read_direct(out, source_sel=np.s_[start:start + len(out)])
        return
    block = _block_rows(out.shape[1] * dset.dtype.itemsize)
    buffer = np.empty((min(block, len(out)), out.shape[1]), dtype=dset.dtype)
    for begin in range(0, len(out), block):
        part = buffer[:min(block, len(out) - begin)]
        dset.read_direct(part, source_sel=np.s_[start + begin:start + begin + len(part)])
        out[begin:begin + len(part)] = part


def _memmap(path: str, dset) -> np.memmap | None:
    """A read-only memmap of `dset` if it is stored as one float32 array
    (contiguous layout), else None."""
    h5py = _h5py()
    if dset.dtype != np.dtype(np.float32) or dset.size == 0:
        return None
    if dset.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
        return None
    offset = dset.id.get_offset()
    if offset is None or offset + dset.nbytes > os.path.getsize(path):
        return None
    mapped = np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=dset.shape)
    # The same values as HDF5 reads (e.g. no user block shifting offsets)?
    ends = 0, dset.shape[0] - 1
    if not all(np.array_equal(mapped[i], dset[i], equal_nan=True) for i in ends):
        return None
    return mapped


def _read_hdf5_whitening(path: str, f, features: np.ndarray, mmap: bool) -> dict[str, np.ndarray] | None:
    group = f.get("whitening")
    if not isinstance(group, _h5py().Group):
        return None
    try:
        arrays = {key: group[key][()] for key in ("mean", "projection")}
        vectors = group["vectors"]
        arrays["vectors"] = _read_matrix(path, vectors, mmap) if vectors.dtype.kind == "f" else vectors[()]
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        return None  # learned again when needed, as for a damaged .whitening.npz
    return arrays if _whitening_fits(arrays, features) else None


def _check_float16(features: np.ndarray) -> None:
    if features.size:
        largest = float(np.nanmax(np.abs(features)))
        if largest > FLOAT16_MAX:
            raise ValueError(f"feature values up to {largest:g} don't fit float16 (at most {FLOAT16_MAX:g}); "
                             f"store them as float32")


def _block_rows(row_bytes: int) -> int:
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def _write_rows(dset, start: int, rows: np.ndarray) -> None:
    """rows -> dset[start:start + len(rows)], a block at a time, converted to
    the dataset's type."""
    block = _block_rows(dset.shape[1] * dset.dtype.itemsize)
    for begin in range(0, len(rows), block):
        part = np.ascontiguousarray(rows[begin:begin + block], dtype=dset.dtype)
        dset.write_direct(part, dest_sel=np.s_[start + begin:start + begin + len(part)])


def _write_header(f, metadata: dict) -> None:
    f.attrs["format"] = HDF5_FORMAT
    f.attrs["format_version"] = HDF5_FORMAT_VERSION
    _set_metadata(f, metadata)


def _set_metadata(f, metadata: dict) -> None:
    f.attrs["metadata"] = json.dumps(metadata, sort_keys=True)


def _create_paths(f, encoded: np.ndarray, total: int) -> None:
    chunk = min(PATHS_CHUNK, max(64, total))
    dset = f.create_dataset("paths", shape=(len(encoded),), maxshape=(None,), chunks=(chunk,),
                            dtype=_h5py().string_dtype("utf-8"))
    if len(encoded):
        dset[:] = encoded


def _chunk_rows(total: int, row_bytes: int) -> int:
    """Rows per chunk of an appendable file: about CHUNK_BYTES, but not much
    more than the file holds (a chunk is allocated whole)."""
    ideal = max(1, CHUNK_BYTES // max(1, row_bytes))
    return min(ideal, 1 << max(0, total - 1).bit_length())


def _write_hdf5(path: str, store: FeatureStore, features: np.ndarray, storage: np.dtype) -> None:
    if storage == np.float16:
        _check_float16(features)
    encoded = _encode_paths(store.paths)
    metadata = _full_metadata(store.metadata, features)
    with _atomic_file(path) as tmp:
        with _open_hdf5(tmp, "w") as f:
            _write_header(f, metadata)
            _create_paths(f, encoded, len(encoded))
            # Contiguous: memory-mappable (see the module docstring).
            _write_rows(f.create_dataset("features", shape=features.shape, dtype=storage), 0, features)
            if store.whitening_arrays is not None:
                group = f.create_group("whitening")
                for key, value in store.whitening_arrays.items():
                    group.create_dataset(key, data=np.asarray(value))
    # Sidecars of a CSV this file replaced (any name was CSV before HDF5).
    for sidecar in (metadata_path(path), whitening_path(path)):
        if os.path.exists(sidecar):
            os.unlink(sidecar)


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
    _check_exists(path)
    if file_format(path) == "csv":
        store = load_features(path)
        _check_append_dim(path, store.dim, features)
        # As CSV whatever the name (a text file named .h5 stays text).
        _save_csv(path, FeatureStore(store.paths + paths, None, store.metadata),
                  np.concatenate([store.features, features]))
        return
    with _hdf5_errors(path):
        with _open_hdf5(path) as f:
            layout = _inspect(path, f)
    _check_append_dim(path, layout.dim, features)
    if layout.dtype == np.float16:
        _check_float16(features)
    encoded = _encode_paths(paths)
    total = layout.rows + len(features)
    metadata = {**layout.metadata, "count": total, "feature_dim": layout.dim}
    ideal = _chunk_rows(total, layout.dim * layout.dtype.itemsize)
    with _hdf5_errors(path, "cannot append to"):
        if layout.chunk_rows is not None and not layout.has_whitening and layout.chunk_rows * RECHUNK_FACTOR >= ideal:
            _extend_copy(path, layout, encoded, features, metadata)
        else:
            _rewrite_appendable(path, layout, encoded, features, metadata, ideal)


def _check_append_dim(path: str, dim: int, features: np.ndarray) -> None:
    if features.shape[1] != dim:
        raise FeaturesFileError(
            f"{path} has {dim} values per image, the rows to append have {features.shape[1]}: "
            f"made with another model?"
        )


def _extend_copy(path: str, layout: _Layout, encoded: np.ndarray, features: np.ndarray, metadata: dict) -> None:
    """Append to a copy of an appendable file, then put the copy in its place."""
    total = layout.rows + len(features)
    with _atomic_file(path, copy_of=path) as tmp:
        with _open_hdf5(tmp, "r+") as f:
            f["paths"].resize((total,))
            if len(encoded):
                f["paths"][layout.rows:] = encoded
            f["features"].resize((total, layout.dim))
            _write_rows(f["features"], layout.rows, features)
            _set_metadata(f, metadata)


def _rewrite_appendable(path: str, layout: _Layout, encoded: np.ndarray, features: np.ndarray,
                        metadata: dict, chunk_rows: int) -> None:
    """Write the file again with resizable (chunked) datasets, old rows then
    new ones, without the whitening."""
    total = layout.rows + len(features)
    with _atomic_file(path, copy_of=None) as tmp:
        with _open_hdf5(path) as src, _open_hdf5(tmp, "w") as f:
            _write_header(f, metadata)
            _create_paths(f, np.concatenate([src["paths"][()], encoded]), total)
            dset = f.create_dataset("features", shape=(total, layout.dim), maxshape=(None, layout.dim),
                                    chunks=(chunk_rows, layout.dim), dtype=layout.dtype)
            old = src["features"]
            block = _block_rows(layout.dim * layout.dtype.itemsize)
            for start in range(0, layout.rows, block):
                _write_rows(dset, start, old[start:start + block])  # same type: no conversion
            _write_rows(dset, layout.rows, features)
        shutil.copymode(path, tmp)


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
    _check_exists(path)
    if file_format(path) == "csv":
        features = load_features(path).features
        for start in range(0, len(features), rows):
            yield start, features[start:start + rows]
        return
    with _hdf5_errors(path):
        with _open_hdf5(path) as f:
            layout = _inspect(path, f)
            dset = f["features"]
            for start in range(0, layout.rows, rows):
                out = np.empty((min(rows, layout.rows - start), layout.dim), dtype=np.float32)
                _read_rows(dset, start, out)
                yield start, out
