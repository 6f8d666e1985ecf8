"""The binary format: one self-contained HDF5 file (through h5py) that needs
no text parsing and no sidecar, so one rename publishes all of it:

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

- `write_hdf5` writes `features` contiguous (no chunks, no compression):
  loading with mmap=True then returns a read-only numpy.memmap at the
  dataset's offset in the file: no read at all until the search touches
  the rows (opening: ~1 ms; a full read_direct: ~0.17 s).
- HDF5 can only resize chunked datasets, and a chunked dataset can't be
  mapped as one array. Read whole with read_direct, uncompressed chunks of
  0.5 to 32 MB read as fast as a contiguous dataset (0.15 to 0.25 s). So the
  first append rewrites the file with resizable datasets in chunks of about
  4 MB (512 rows of 2048 float32; fewer for small files, re-chunked as they
  grow), and later appends just extend them. mmap=True on such a file
  falls back to that full read; saving it again (e.g.
  `convert_features.py f.h5 f.h5`) makes it contiguous again.

HDF5 is not journalled: a process killed while HDF5 updates a file in place
can leave it unreadable. So an append never touches the file: it works on a
copy (a reflink, which costs nothing until written, on filesystems that
have them: btrfs, XFS, ...; elsewhere a kernel copy, ~0.4 s for 800 MB)
that is then fsync'ed and renamed. An append drops a stored whitening (it
no longer covers every row; search learns it again when needed, and says
so). Deleting from an HDF5 file does not shrink it, so a file holding a
whitening is rewritten, not copied.

HDF5 can't take a failed write either (a full disk): h5py then printed
tracebacks while closing the file and the process could die of a
segmentation fault. So HDF5 writes through a file object of ours
(`hdf5_writer`) that never reports a failure to it: HDF5 finishes, the
writer raises the failure, and the temporary file is removed. This costs
nothing measurable: saving 50,000 x 2048 float32 (400 MB, fsync'ed) took
0.3 to 1.4 s either way (the disk's noise), with the same peak memory; a
failure keeps only HDF5's small metadata writes after it in memory.

Reading refuses, as the CSV reader does, an empty image path and NaN or
infinity (also a float64 value too large for float32): features read whole
are checked at load, naming the first bad row and its path; memory-mapped
ones are checked where a search reads them (search.ValueCheck), so that
loading stays free. A stored whitening holding NaN or infinity is dropped
as damaged (learned again when needed).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ..errors import FeaturesFileError, printable_path
from .atomic import atomic_file, open_regular, write_errors
from .feature_store import ENCODING_ERRORS, FeatureStore, whitening_fits
from .generation import NEXT_SUFFIX, whitening_path
from .metadata import HDF5_MISMATCH, check_shape, full_metadata, metadata_path

HDF5_EXTENSIONS = (".h5", ".hdf5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_FORMAT = "search_utils features"
HDF5_FORMAT_VERSION = 1
# File format of HDF5 1.10 (2016) or later: checksummed metadata, and a
# chunk index made for datasets that grow along one dimension.
HDF5_LIBVER = "v110"
FLOAT16_MAX = float(np.finfo(np.float16).max)
CHUNK_BYTES = 4 << 20  # features chunk of an appendable file
RECHUNK_FACTOR = 8  # re-chunk when chunks are this much smaller than ideal
PATHS_CHUNK = 4096  # paths per chunk (16-byte references)
BLOCK_BYTES = 64 << 20  # rows read, converted or written at a time



def h5py_module():
    import h5py  # only when an HDF5 file is used: importing the package stays cheap

    return h5py


@contextlib.contextmanager
def hdf5_errors(path: str, doing: str = "unreadable HDF5 features file") -> Iterator[None]:
    """h5py's errors about a damaged or foreign file, as one-line
    FeaturesFileErrors."""
    try:
        yield
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        raise FeaturesFileError(f"{doing} {printable_path(path)}: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def open_hdf5(path: str, mode: str = "r"):
    return h5py_module().File(path, mode, locking=False, **({"libver": HDF5_LIBVER} if mode == "w" else {}))


class _GuardedFile:
    """The file h5py writes (through its file-object driver), which never
    tells HDF5 that a write failed.

    HDF5 can't take a failed write (a full disk): h5py then prints
    tracebacks while it closes, and the process can crash (a segmentation
    fault). So the first failure is kept in `error` and from then on
    writes go nowhere: HDF5 finishes its file as if all went well, and the
    writer raises `error` once HDF5 has let go (hdf5_writer). Writes of
    metadata after the failure (small ones) are kept in memory, in case
    HDF5 reads them back; large ones (rows of data, which the writers here
    never read back) are dropped, so a failure costs no memory to speak of.
    """

    _KEPT = 4 << 20  # bytes: larger writes after a failure are data, dropped

    def __init__(self, path: str, mode: str):
        self._file = open(path, mode, buffering=0)
        self._fd = self._file.fileno()
        self._pos = 0
        self._size = os.fstat(self._fd).st_size
        self.error: OSError | None = None
        self._kept: list[tuple[int, bytes]] = []  # (offset, bytes) written after the failure

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = offset + {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        start, wanted, got = self._pos, len(view), 0
        with contextlib.suppress(OSError):
            while got < wanted:
                read = os.preadv(self._fd, [view[got:]], start + got)
                if read <= 0:
                    break
                got += read
        view[got:] = bytes(wanted - got)
        for offset, data in self._kept:
            low, high = max(offset, start), min(offset + len(data), start + wanted)
            if low < high:
                view[low - start:high - start] = data[low - offset:high - offset]
        self._pos += wanted
        return max(0, min(wanted, self._size - start))

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(0, self._size - self._pos) if size is None or size < 0 else size)
        return bytes(buffer[:self.readinto(buffer)])

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self._fd, view[done:], self._pos + done)
            except OSError as error:
                self.error = error
        if self.error is not None and len(view) <= self._KEPT:
            self._kept.append((self._pos, bytes(view)))
        self._pos += len(view)
        self._size = max(self._size, self._pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as error:
                self.error = error
        self._size = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def hdf5_writer(tmp: str, mode: str) -> Iterator:
    """h5py.File `tmp` ("w": new, "r+": to change), written so that HDF5
    never sees a failed write (_GuardedFile); the write's OSError (a full
    disk) is raised once HDF5 has closed the file."""
    guarded = _GuardedFile(tmp, "w+b" if mode == "w" else "r+b")
    try:
        with h5py_module().File(guarded, mode, locking=False,
                                **({"libver": HDF5_LIBVER} if mode == "w" else {})) as f:
            yield f
    except Exception:
        if guarded.error is not None:
            raise guarded.error from None  # what went wrong first
        raise
    finally:
        guarded.close()
    if guarded.error is not None:
        raise guarded.error


@dataclass
class Layout:
    """What an HDF5 features file holds, checked: ours, consistent."""

    metadata: dict
    rows: int
    dim: int
    dtype: np.dtype
    chunk_rows: int | None  # None: contiguous (or not resizable along rows)
    has_whitening: bool


def inspect(path: str, f) -> Layout:
    """Check that the open file `f` is a features file and consistent;
    raise FeaturesFileError (one line) otherwise."""
    shown = printable_path(path)
    h5py = h5py_module()
    if _text(f.attrs.get("format")) != HDF5_FORMAT:
        raise FeaturesFileError(
            f"{shown} is an HDF5 file but not a features file (no {HDF5_FORMAT!r} format mark; model weights?)"
        )
    version = f.attrs.get("format_version")
    if not isinstance(version, (int, np.integer)) or version > HDF5_FORMAT_VERSION:
        raise FeaturesFileError(
            f"{shown} has features format version {version}, this tool reads up to "
            f"{HDF5_FORMAT_VERSION}: upgrade search_utils"
        )
    try:
        metadata = json.loads(_text(f.attrs.get("metadata", "{}")))
    except (ValueError, TypeError) as error:
        raise FeaturesFileError(f"malformed features file {shown}: unreadable metadata: {_one_line(error)}") from None
    if not isinstance(metadata, dict):
        raise FeaturesFileError(f"malformed features file {shown}: its metadata is not a JSON object")
    features, paths = f.get("features"), f.get("paths")
    if not isinstance(features, h5py.Dataset) or not isinstance(paths, h5py.Dataset):
        raise FeaturesFileError(f"malformed features file {shown}: no 'features' or no 'paths' dataset")
    if features.ndim != 2 or features.dtype.kind != "f":
        raise FeaturesFileError(
            f"malformed features file {shown}: 'features' is {features.dtype} of shape {features.shape}, "
            f"expected floats of shape (rows, values)"
        )
    info = h5py.check_string_dtype(paths.dtype)
    if paths.ndim != 1 or info is None or info.length is not None:
        raise FeaturesFileError(f"malformed features file {shown}: 'paths' is not a list of variable-length strings")
    rows, dim = features.shape
    if len(paths) != rows:
        raise FeaturesFileError(f"malformed features file {shown}: {len(paths)} paths but {rows} rows of features")
    if dim == 0 and rows:
        raise FeaturesFileError(f"malformed features file {shown}: its rows hold no feature values (0 per image)")
    check_shape(path, metadata, rows, dim, HDF5_MISMATCH)
    resizable = (features.chunks is not None and features.chunks[1] == dim
                 and features.maxshape[0] is None and paths.maxshape[0] is None)
    return Layout(metadata, rows, dim, features.dtype, features.chunks[0] if resizable else None,
                   "whitening" in f)


def _text(value) -> str | None:
    return value.decode("utf-8", ENCODING_ERRORS) if isinstance(value, bytes) else value


def load_hdf5(path: str, mmap: bool) -> FeatureStore:
    # HDF5 and the memory map read one open file: if `path` is replaced
    # meanwhile, both still see the same generation.
    with hdf5_errors(path), open_regular(path) as handle:
        with open_hdf5(_same_file(path, handle)) as f:
            layout = inspect(path, f)
            if layout.rows == 0:
                raise FeaturesFileError(f"features file is empty: {printable_path(path)}")
            paths = _decode_paths(f["paths"][()])
            check_paths(path, paths)
            features = _read_matrix(handle, f["features"], mmap)
            if not isinstance(features, np.memmap):  # read whole: checked now; a map where it is read (search.py)
                check_finite(path, paths, features, f["features"])
            whitening = _read_hdf5_whitening(handle, f, features, mmap)
    return FeatureStore(paths, features, layout.metadata, whitening)


def check_paths(path: str, paths: list[str]) -> None:
    """Refuse an empty image path, as the CSV reader does."""
    shown = printable_path(path)
    if all(paths):
        return
    for row, image_path in enumerate(paths, start=1):
        if not image_path:
            raise FeaturesFileError(f"malformed features file {shown}: row {row} has no image path (an empty string)")


def check_finite(path: str, paths: list[str], features: np.ndarray, dset=None) -> None:
    """Refuse NaN and infinity in features read whole, as the CSV reader
    does, naming the first such row and its path. `dset`: the dataset they
    were read from, to tell a value too large for float32 (a float64 file)
    from a stored infinity.

    Reads the rows a block at a time (60 to 80 ms for 100,000 x 1280 float32,
    500 MB, on 2 cores; the read itself takes about 0.35 s)."""
    block = _block_rows(features.shape[1] * features.itemsize) // 64 or 1  # ~1 MB: cache-sized
    for start in range(0, len(features), block):
        part = features[start:start + block]
        finite = np.isfinite(part)
        if finite.all():
            continue
        row, column = (int(i) for i in np.argwhere(~finite)[0])
        row += start
        value = features[row, column]
        stored = value if dset is None or dset.dtype == features.dtype else dset[row, column]
        shown = (f"is {stored:g}, too large for float32" if np.isfinite(stored)
                 else f"is not a finite number ({value})")
        raise FeaturesFileError(f"malformed features file {printable_path(path)}: row {row + 1} "
                                f"({printable_path(paths[row])}), value {column + 1} of {features.shape[1]} {shown}")


def _same_file(path: str, handle) -> str:
    """A name that opens the very file `handle` has open (Linux), else `path`."""
    name = f"/proc/self/fd/{handle.fileno()}"
    return name if os.path.exists(name) else path


def _decode_paths(raw: np.ndarray) -> list[str]:
    return [p.decode("utf-8", ENCODING_ERRORS) if isinstance(p, bytes) else str(p) for p in raw]


def encode_paths(paths: Iterable[str]) -> np.ndarray:
    paths = list(paths)
    encoded = np.empty(len(paths), dtype=object)
    for i, image_path in enumerate(paths):
        data = str(image_path).encode("utf-8", ENCODING_ERRORS)
        if b"\0" in data:
            raise ValueError(f"path {image_path!r} holds a NUL character, which no file name can")
        encoded[i] = data
    return encoded


def _read_matrix(handle, dset, mmap: bool) -> np.ndarray:
    """All of `dset` as float32: mapped (from the open file `handle`) if
    asked and possible, else read."""
    if mmap:
        mapped = _memmap(handle, dset)
        if mapped is not None:
            return mapped
    out = np.empty(dset.shape, dtype=np.float32)
    read_rows(dset, 0, out)
    return out


def read_rows(dset, start: int, out: np.ndarray) -> None:
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
        with np.errstate(over="ignore", invalid="ignore"):  # too large for float32: inf, then refused by name
            out[begin:begin + len(part)] = part


def _memmap(handle, dset) -> np.memmap | None:
    """A read-only memmap of `dset` if it is stored as one float32 array
    (contiguous layout), else None."""
    h5py = h5py_module()
    if dset.dtype != np.dtype(np.float32) or dset.size == 0:
        return None
    if dset.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS:
        return None
    offset = dset.id.get_offset()
    if offset is None or offset + dset.nbytes > os.fstat(handle.fileno()).st_size:
        return None
    mapped = np.memmap(handle, dtype=np.float32, mode="r", offset=offset, shape=dset.shape)
    # The same values as HDF5 reads (e.g. no user block shifting offsets)?
    ends = 0, dset.shape[0] - 1
    if not all(np.array_equal(mapped[i], dset[i], equal_nan=True) for i in ends):
        return None
    return mapped


def _read_hdf5_whitening(handle, f, features: np.ndarray, mmap: bool) -> dict[str, np.ndarray] | None:
    group = f.get("whitening")
    if not isinstance(group, h5py_module().Group):
        return None
    try:
        arrays = {key: group[key][()] for key in ("mean", "projection")}
        vectors = group["vectors"]
        arrays["vectors"] = _read_matrix(handle, vectors, mmap) if vectors.dtype.kind == "f" else vectors[()]
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        return None  # learned again when needed, as for a damaged .whitening.npz
    if not whitening_fits(arrays, features):
        return None
    # NaN or infinity: damaged too. Mapped vectors are checked where searched (modes.search_space).
    read = [value for value in arrays.values() if not isinstance(value, np.memmap)]
    if not all(value.dtype.kind == "f" and np.isfinite(value).all() for value in read):
        return None
    return arrays


def check_float16(features: np.ndarray) -> None:
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
                            dtype=h5py_module().string_dtype("utf-8"))
    if len(encoded):
        dset[:] = encoded


def _chunk_rows(total: int, row_bytes: int) -> int:
    """Rows per chunk of an appendable file: about CHUNK_BYTES, but not much
    more than the file holds (a chunk is allocated whole)."""
    ideal = max(1, CHUNK_BYTES // max(1, row_bytes))
    return min(ideal, 1 << max(0, total - 1).bit_length())


def write_hdf5(path: str, store: FeatureStore, features: np.ndarray, storage: np.dtype) -> None:
    if storage == np.float16:
        check_float16(features)
    encoded = encode_paths(store.paths)
    metadata = full_metadata(store.metadata, *features.shape)
    with atomic_file(path) as tmp:
        with write_errors(path), hdf5_writer(tmp, "w") as f:
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
        for name in (sidecar, sidecar + NEXT_SUFFIX):
            try:
                os.unlink(name)
            except OSError as error:
                if error.errno not in (errno.ENOENT, errno.ENAMETOOLONG):  # too long a name: there is none
                    raise


def check_append_dim(path: str, dim: int, features: np.ndarray) -> None:
    if features.shape[1] != dim:
        raise FeaturesFileError(
            f"{printable_path(path)} has {dim} values per image, the rows to append have {features.shape[1]}: "
            f"made with another model?"
        )


def _extend_copy(path: str, layout: Layout, encoded: np.ndarray, features: np.ndarray, metadata: dict) -> None:
    """Append to a copy of an appendable file, then put the copy in its place."""
    total = layout.rows + len(features)
    with atomic_file(path, copy_of=path) as tmp:
        with write_errors(path), hdf5_writer(tmp, "r+") as f:
            f["paths"].resize((total,))
            if len(encoded):
                f["paths"][layout.rows:] = encoded
            f["features"].resize((total, layout.dim))
            _write_rows(f["features"], layout.rows, features)
            _set_metadata(f, metadata)


def _rewrite_appendable(path: str, layout: Layout, encoded: np.ndarray, features: np.ndarray,
                        metadata: dict, chunk_rows: int) -> None:
    """Write the file again with resizable (chunked) datasets, old rows then
    new ones, without the whitening."""
    total = layout.rows + len(features)
    with atomic_file(path) as tmp:  # the permissions of `path`, which it replaces
        with open_hdf5(path) as src, write_errors(path), hdf5_writer(tmp, "w") as f:
            _write_header(f, metadata)
            _create_paths(f, np.concatenate([src["paths"][()], encoded]), total)
            dset = f.create_dataset("features", shape=(total, layout.dim), maxshape=(None, layout.dim),
                                    chunks=(chunk_rows, layout.dim), dtype=layout.dtype)
            old = src["features"]
            block = _block_rows(layout.dim * layout.dtype.itemsize)
            for start in range(0, layout.rows, block):
                _write_rows(dset, start, old[start:start + block])  # same type: no conversion
            _write_rows(dset, layout.rows, features)




def append_hdf5(path: str, paths: list[str], features: np.ndarray) -> None:
    """The HDF5 side of store.append_features: extend a copy, or rewrite."""
    with hdf5_errors(path):
        with open_hdf5(path) as f:
            layout = inspect(path, f)
    check_append_dim(path, layout.dim, features)
    if layout.dtype == np.float16:
        check_float16(features)
    encoded = encode_paths(paths)
    total = layout.rows + len(features)
    metadata = {**layout.metadata, "count": total, "feature_dim": layout.dim}
    ideal = _chunk_rows(total, layout.dim * layout.dtype.itemsize)
    with hdf5_errors(path, "cannot append to"):
        if layout.chunk_rows is not None and not layout.has_whitening and layout.chunk_rows * RECHUNK_FACTOR >= ideal:
            _extend_copy(path, layout, encoded, features, metadata)
        else:
            _rewrite_appendable(path, layout, encoded, features, metadata, ideal)


def iter_hdf5_chunks(path: str, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """The HDF5 side of store.iter_feature_chunks: `rows` at a time."""
    with hdf5_errors(path):
        with open_hdf5(path) as f:
            layout = inspect(path, f)
            dset = f["features"]
            for start in range(0, layout.rows, rows):
                out = np.empty((min(rows, layout.rows - start), layout.dim), dtype=np.float32)
                read_rows(dset, start, out)
                yield start, out
