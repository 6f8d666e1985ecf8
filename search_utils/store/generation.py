"""One consistent generation of a CSV features file and its sidecars.

A CSV features file is the post's format, so it can't hold its own
metadata: `<f>.csv.meta.json` and `<f>.csv.whitening.npz` live beside it.
A writer replaces the three; a reader must never pair one write's features
with another's metadata or whitening, even if the writer is killed -9
between two renames. How:

- Every write is a generation with an id. The metadata records the id and
  the SHA-256 of the CSV's bytes; the whitening file records the id.
- Publishing: the new sidecars are first written complete under
  `<name>.next`; then one rename puts the CSV in place (the commit point);
  then the `.next` files are renamed over the old sidecars. Ctrl-C and
  SIGTERM are held during those renames.
- Reading: hash the CSV as it is read and take the metadata (`.meta.json`
  or `.meta.json.next`) that records that hash, and the whitening (`.npz`
  or `.npz.next`) of that metadata's generation. Before the commit point
  the old files match each other; after it the new CSV matches the
  `.next` files until they are renamed. A reader that raced a publish (it
  read the CSV before a rename, a sidecar after) finds no match and reads
  again.
- A writer killed after the commit point leaves `.next` files that match
  the CSV: readers use them, and the next writer finishes the renames
  (`finish_interrupted_publish`). A writer killed before it leaves `.next`
  files that match nothing: ignored, then removed.

A CSV edited by hand (or written by the post's script) matches no recorded
hash: its metadata is then only checked against its shape, as before
generations existed, and a stored whitening is not trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import zipfile
from dataclasses import dataclass
from typing import IO, Callable

import numpy as np

from ..errors import FeaturesFileError, printable_path
from .atomic import (
    NOT_REGULAR, atomic_write, fsync_folder, open_regular, regular_file_problem, signals_held, write_errors,
)
from .feature_store import WHITENING_KEYS, whitening_fits
from .metadata import CSV_MISMATCH, check_shape, metadata_path, read_metadata_file

WHITENING_SUFFIX = ".whitening.npz"
NEXT_SUFFIX = ".next"  # a sidecar of a generation being published
HASH_NAME = "sha256"
READ_ATTEMPTS = 5  # a reader that raced a publish reads again, up to this often
RETRY_PAUSE = 0.02  # seconds, growing with each attempt
_NPZ_ERRORS = (OSError, KeyError, ValueError, TypeError, AttributeError, EOFError,
               zipfile.BadZipFile)  # a missing or damaged .npz (or not an .npz at all)


def whitening_path(features_path: str) -> str:
    """The learned-whitening file that belongs to `features_path` (CSV)."""
    return os.fspath(features_path) + WHITENING_SUFFIX


def new_generation_id() -> str:
    return uuid.uuid4().hex


def hashing_writer(handle: IO[str], digest) -> Callable[[str], None]:
    """`handle.write`, also feeding the UTF-8 bytes written into `digest`
    (the CSV is written with newline="" and surrogateescape, as here)."""
    def write(text: str) -> None:
        handle.write(text)
        digest.update(text.encode("utf-8", "surrogateescape"))
    return write


def publish(path: str, tmp: str, metadata: dict, whitening: dict[str, np.ndarray] | None) -> None:
    """Put the finished CSV `tmp` in place at `path` with its metadata (which
    records its generation and hash) and whitening, as described above."""
    generation = metadata["generation"]
    meta_next = metadata_path(path) + NEXT_SUFFIX
    white_next = whitening_path(path) + NEXT_SUFFIX
    try:
        if whitening is not None:
            with atomic_write(white_next, binary=True) as handle:
                np.savez(handle, generation=np.array(generation), **whitening)
        with atomic_write(meta_next) as handle:
            json.dump(metadata, handle, indent=2, sort_keys=True)
            handle.write("\n")
    except BaseException:  # stopped or failed before the commit point: the old generation stays
        _remove(meta_next, white_next)
        raise
    with signals_held(), write_errors(path):
        os.replace(tmp, path)  # the commit point
        _move_sidecars(path, has_whitening=whitening is not None)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def _move_sidecars(path: str, has_whitening: bool) -> None:
    white, meta = whitening_path(path), metadata_path(path)
    if has_whitening:
        os.replace(white + NEXT_SUFFIX, white)
    else:
        _remove(white, white + NEXT_SUFFIX)
    os.replace(meta + NEXT_SUFFIX, meta)


def _remove(*names: str) -> None:
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def finish_interrupted_publish(path: str) -> None:
    """For a writer holding the output's lock: complete a publish whose
    process was killed after its commit point, or drop the `.next` files of
    one killed before it."""
    meta_next = metadata_path(path) + NEXT_SUFFIX
    white_next = whitening_path(path) + NEXT_SUFFIX
    pending = _read_quietly(meta_next)
    if pending is None:  # killed before the metadata, so before the commit point
        with write_errors(path):
            _remove(white_next)
        return
    try:
        with open_regular(path) as handle:
            committed = pending.get("features_sha256") == hashlib.file_digest(handle, HASH_NAME).hexdigest()
    except OSError:
        committed = False
    with signals_held(), write_errors(path):
        if committed:
            generation = pending.get("generation")
            if _whitening_generation(whitening_path(path)) == generation:  # already moved
                _remove(white_next)
                os.replace(meta_next, metadata_path(path))
            else:
                _move_sidecars(path, has_whitening=_whitening_generation(white_next) == generation)
        else:
            _remove(meta_next, white_next)


@dataclass
class Generation:
    """What a reader took: the CSV's rows and the sidecars that belong to them."""

    paths: list[str]
    features: np.ndarray
    metadata: dict
    whitening: dict[str, np.ndarray] | None
    metadata_file: str | None = None  # the metadata file read, if there was one


def read(path: str, read_rows: Callable[[IO[bytes]], tuple[list[str], np.ndarray]]) -> Generation:
    """Read CSV `path` with `read_rows(binary handle)` and pair it with the
    metadata and whitening of the same generation (see the module doc).

    Raises:
        FeaturesFileError: unreadable files, or metadata that contradicts
            the rows (a file edited by hand).
    """
    white = whitening_path(path)
    if regular_file_problem(white) == NOT_REGULAR:  # every reader of it would block
        raise FeaturesFileError(f"cannot read whitening file {printable_path(white)}: {NOT_REGULAR}; move it "
                                f"away (search learns the whitening again when it is missing)")
    for attempt in range(READ_ATTEMPTS):
        before = _names_signature(path)
        paths, features, found = _read_pairing(path, read_rows)
        settled = _names_signature(path) == before
        # A rewrite of the same bytes matches an older generation's metadata too (the same hash):
        # its whitening is then another id's. So a match without its whitening counts only if
        # nothing moved while reading.
        if found is not None and (found.whitening is not None or settled):
            return found
        if settled:
            break  # nothing moved while reading: no generation records these bytes (edited, or older)
        time.sleep(RETRY_PAUSE * (attempt + 1))  # raced a publish: read again
    return found if found is not None else _unverified(path, paths, features)


def _read_pairing(path: str, read_rows) -> tuple[list[str], np.ndarray, Generation | None]:
    """The CSV's rows, and them with the sidecars that record their bytes
    (None if none do).

    Sidecars before the CSV, and whitening files held open: whatever
    generation the CSV turns out to be, its sidecars were in place when
    they were taken (a writer publishes one at a time). `.next` first: if
    it is renamed in between, the final name has it.
    """
    meta = metadata_path(path)
    candidates = [(m, name) for m, name in ((_read_quietly(meta + NEXT_SUFFIX), meta + NEXT_SUFFIX),
                                            (read_metadata_file(meta), meta)) if m is not None]
    with contextlib.ExitStack() as stack:
        whitenings = [stack.enter_context(f) for f in _open_existing(
            whitening_path(path) + NEXT_SUFFIX, whitening_path(path))]
        paths, features, digest = _read_hashed(path, read_rows)
        for metadata, name in candidates:
            if metadata.get("features_sha256") == digest:
                check_shape(path, metadata, *features.shape, CSV_MISMATCH)
                return paths, features, Generation(paths, features, metadata,
                                                   _whitening_of(whitenings, metadata, features), name)
    return paths, features, None


def _open_existing(*names: str) -> list[IO[bytes]]:
    """The files of `names` that are there and can be read (a FIFO counts
    as absent: reading it would block)."""
    handles = []
    for name in names:
        with contextlib.suppress(OSError):
            handles.append(open_regular(name))
    return handles


def _names_signature(path: str) -> tuple:
    """Which files the names of a generation point at now: a publish changes it."""
    meta, white = metadata_path(path), whitening_path(path)
    return files_signature(path, meta, meta + NEXT_SUFFIX, white, white + NEXT_SUFFIX)


def files_signature(*names: str) -> tuple:
    """What each name points at now (inode, modification time, size; None:
    nothing): a file replaced by a rename, or rewritten, changes it."""
    signature = []
    for name in names:
        try:
            info = os.stat(name)
            signature.append((info.st_ino, info.st_mtime_ns, info.st_size))
        except OSError:
            signature.append(None)
    return tuple(signature)


def _read_hashed(path: str, read_rows) -> tuple[list[str], np.ndarray, str]:
    """Rows of the CSV and the hash of exactly the bytes they came from."""
    with open_regular(path) as handle:
        digest = hashlib.file_digest(handle, HASH_NAME).hexdigest()
        handle.seek(0)
        paths, features = read_rows(handle)
    return paths, features, digest


def _unverified(path: str, paths: list[str], features: np.ndarray) -> Generation:
    """A CSV whose bytes no metadata records: older, or edited by hand. Its
    metadata only has to fit its shape; its whitening only if it predates
    generations (an edited file's whitening may describe other rows)."""
    read = read_metadata_file(metadata_path(path))
    metadata = read or {}
    check_shape(path, metadata, *features.shape, CSV_MISMATCH)
    whitening = None
    if "generation" not in metadata:
        arrays = _load_whitening(whitening_path(path))[1]
        whitening = arrays if arrays is not None and whitening_fits(arrays, features) else None
    metadata = {k: v for k, v in metadata.items() if k not in ("generation", "features_sha256")}
    return Generation(paths, features, metadata, whitening, None if read is None else metadata_path(path))


def _whitening_of(handles: list[IO[bytes]], metadata: dict, features: np.ndarray) -> dict[str, np.ndarray] | None:
    """The stored whitening of `metadata`'s generation among the open files
    `handles`, or None (then search learns it again when needed)."""
    for handle in handles:
        generation, arrays = _load_whitening(handle)
        if generation == metadata.get("generation") and arrays is not None and whitening_fits(arrays, features):
            return arrays
    return None


def _load_whitening(source) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """(generation or None, arrays or None) of a whitening file (a name or an
    open file); (None, None) if it is missing or damaged, or not a regular
    file (a FIFO would block)."""
    try:
        if isinstance(source, str):
            with open_regular(source) as handle:
                return _load_whitening(handle)
        with np.load(source) as data:
            generation = str(data["generation"]) if "generation" in data else None
            return generation, {key: data[key] for key in WHITENING_KEYS}
    except _NPZ_ERRORS:
        return None, None


def _whitening_generation(name: str) -> str | None:
    try:
        with open_regular(name) as handle, np.load(handle) as data:
            return str(data["generation"]) if "generation" in data else None
    except _NPZ_ERRORS:
        return None


def _read_quietly(meta_file: str) -> dict | None:
    """A `.next` metadata file, or None if absent or unreadable (a publish
    that was killed while writing it)."""
    try:
        return read_metadata_file(meta_file)
    except FeaturesFileError:
        return None
