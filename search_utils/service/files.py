"""The files a request touches: an uploaded query (to a temporary file of
the service's own name, judged from its bytes, then removed) and the
indexed images served by row id (never by a path from the request)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import uuid
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

from .. import images
from ..errors import ImageReadError, printable_path
from ..searcher import Searcher
from .config import ServiceError, size_text

UPLOAD_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # what uploads may be; never EPS, PSD, ...
MEDIA_TYPES = {"JPEG": "image/jpeg", "MPO": "image/jpeg",  # MPO: a camera's JPEG with extra frames (JPEG opens it)
               "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp", "TIFF": "image/tiff"}
MAX_SERVED_BYTES = 64 * 1024 * 1024  # an indexed image larger than this is shown by its thumbnail only
THUMBNAIL_SIDE = 256
THUMBNAIL_CACHE = 2048  # thumbnails kept in memory (about 15 kB each)
BOMB_REASONS = (images.BOMB_REASON, images.JPEG_BOMB_REASON, images.REDUCED_BOMB_REASON)


def read_upload(upload: UploadFile, folder: str, limit: int, size: tuple[int, int], resize: str) -> np.ndarray:
    """The uploaded query as the model's input array. Its bytes go to a file
    of our own name in `folder` (the client's name never reaches the file
    system), are judged as an image from the bytes (one of UPLOAD_FORMATS,
    whatever the client says it is), then decoded as safely as indexing
    decodes (size limits, decompression bombs); the file is removed."""
    path = os.path.join(folder, f"upload-{uuid.uuid4().hex}")
    try:
        with open(path, "xb") as out:
            copied = _copy_limited(upload.file, out, limit)
        if copied == 0:
            raise ServiceError(400, "the uploaded file is empty")
        _check_format(path)
        try:
            return images.load_image(path, size=size, interpolation=resize)
        except ImageReadError as error:
            raise _refusal(error.reason, bomb=error.reason in BOMB_REASONS) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _check_format(path: str) -> None:
    """415 unless the file opens as one of UPLOAD_FORMATS; 422 (or 413 for a
    bomb) if it starts as one but its header can't be read."""
    try:
        with Image.open(path, formats=UPLOAD_FORMATS):
            pass
    except UnidentifiedImageError:
        raise ServiceError(415, f"not an image this service accepts ({', '.join(UPLOAD_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        pass  # judged by load_image, where a JPEG that decodes reduced is allowed
    except Exception as error:  # noqa: BLE001 - decoders raise OSError, ValueError, SyntaxError, struct.error, ...
        raise _refusal(" ".join(str(error).split()) or type(error).__name__) from None


def _refusal(reason: str, bomb: bool = False) -> ServiceError:
    if "MAX_TEXT_" in reason:  # a PNG text or colour-profile chunk inflating past Pillow's limit
        return ServiceError(413, f"uploaded image: a decompression bomb ({reason})")
    if bomb:
        return ServiceError(413, f"uploaded image: {reason}")
    return ServiceError(422, f"broken image: {reason}")


def _copy_limited(source, target, limit: int) -> int:
    copied = 0
    while chunk := source.read(1 << 20):
        copied += len(chunk)
        if copied > limit:
            raise ServiceError(413, f"upload too large: the limit is {size_text(limit)}")
        target.write(chunk)
    return copied


def check_row(searcher: Searcher, row: int) -> None:
    """404 unless `row` is a row id of the loaded index."""
    if not 0 <= row < len(searcher):
        raise ServiceError(404, f"no image with id {row}: ids go from 0 to {len(searcher) - 1}")


class IndexedFile(NamedTuple):
    path: str  # as it opens from here, symlinks resolved: never named in an answer
    row: int
    shown: str  # the path stored in the features file, printable: what answers name


def indexed_file(searcher: Searcher, row: int) -> IndexedFile:
    """The file of indexed row `row`, as it opens from here.

    Only rows of the index are served: the path comes from the features
    file, never from the request, and must still lead (symlinks resolved)
    into the folder that was indexed.
    """
    check_row(searcher, row)
    stored = searcher.store.paths[row]
    base_dir = searcher.base_dir if searcher.base_dir and os.path.isabs(searcher.base_dir) else os.getcwd()
    dataset = searcher.store.metadata.get("dataset")
    root = os.path.realpath(os.path.join(base_dir, dataset)) if isinstance(dataset, str) and dataset else None
    real = os.path.realpath(os.path.join(base_dir, stored))
    if root is not None and os.path.commonpath([root, real]) != root:
        raise ServiceError(404, f"image {row} now leads outside the indexed folder; not served")
    file = IndexedFile(real, row, printable_path(stored))
    if not os.path.isfile(real):
        raise _unreadable(file, FileNotFoundError())
    return file


def image_bytes(file: IndexedFile) -> tuple[bytes, str]:
    """(bytes, media type) of an indexed image, its type judged from the
    bytes: only the formats uploads may have (UPLOAD_FORMATS) go out as they
    are. 404 for anything that makes it unservable since it was indexed (it
    may go or change between the check and the read)."""
    try:
        with open(file.path, "rb") as handle:
            media_type = _served_type(handle, file)
            if os.fstat(handle.fileno()).st_size > MAX_SERVED_BYTES:
                raise ServiceError(404, f"image {file.row} is larger than {size_text(MAX_SERVED_BYTES)}; "
                                        "see its thumbnail")
            handle.seek(0)
            return handle.read(), media_type
    except OSError as error:
        raise _unreadable(file, error) from None


def _served_type(handle, file: IndexedFile) -> str:
    try:
        with Image.open(handle, formats=UPLOAD_FORMATS) as picture:
            return MEDIA_TYPES[picture.format]
    except Exception:  # noqa: BLE001 - not an accepted format any more, or damaged: any decoder error
        raise ServiceError(404, f"image {file.row} ({file.shown}) can't be served as it is; "
                                "see its thumbnail") from None


def _unreadable(file: IndexedFile, error: OSError) -> ServiceError:
    if isinstance(error, FileNotFoundError):
        return ServiceError(404, f"image {file.row} ({file.shown}) is no longer there")
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    return ServiceError(404, f"image {file.row} ({file.shown}) can't be read ({reason})")


class Thumbnails:
    """JPEG thumbnails of indexed images, made once: cached by the file's
    identity (path, inode, modification time, size), so a changed file gets
    a new one."""

    def __init__(self, capacity: int = THUMBNAIL_CACHE):
        self._cache: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, file: IndexedFile) -> tuple[bytes, str]:
        """(JPEG bytes, ETag)."""
        try:
            info = os.stat(file.path)
        except OSError as error:  # gone since indexed_file looked
            raise _unreadable(file, error) from None
        key = (file.path, info.st_ino, info.st_mtime_ns, info.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            picture = images.load_preview(file.path, THUMBNAIL_SIDE)
        except ImageReadError as error:
            raise ServiceError(404, f"cannot show image {file.row} ({file.shown}): {error.reason}") from None
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=85)
        made = (out.getvalue(), '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"')
        with self._lock:
            self._cache[key] = made
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return made


def etag_matches(header: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (a list, weak or not, or *)."""
    if not header:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag in tags
