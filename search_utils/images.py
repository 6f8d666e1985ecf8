"""Finding image files in a folder and opening one image robustly.

Knows nothing about models: `load_image` returns an RGB uint8 array of the
requested size, or raises ImageReadError saying precisely why it can't.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
import warnings
from typing import Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from .errors import DatasetError, ImageReadError, printable_path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
WHITE = (255, 255, 255)

# Images with more pixels than this (16.8 megapixels, e.g. 4096x4096) are
# decoded smaller than full size; smaller ones exactly as the post decodes
# them. A reduced image keeps at least REDUCED_MARGIN times the model
# input on its shorter side, so the final resize still has detail to pick.
LARGE_IMAGE_PIXELS = 4096 * 4096
REDUCED_MARGIN = 4
# Modes whose values can be box-averaged by Image.reduce; the others
# (palette indices, 1-bit, 16-bit) are subsampled instead.
REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F"})
BOMB_REASON = "too many pixels (over Pillow's decompression-bomb limit); skipped without decoding"
JPEG_BOMB_REASON = ("too many pixels (over Pillow's decompression-bomb limit) for a JPEG that can't be decoded "
                    "reduced (progressive, or one scan per colour); skipped without decoding")
REDUCED_BOMB_REASON = ("too many pixels (over Pillow's decompression-bomb limit even decoded reduced); "
                       "skipped without decoding")
# A Huffman-coded JPEG spends at least 2 bits on each 8x8 block (its DC
# difference and end-of-block codes): 256 pixels per byte at most, reached
# by a flat grey picture. A header claiming far more than its file can hold
# is damaged or forged (631 bytes claiming 65500x65500 would still decode
# to 260 MB at 1/8 scale), and libjpeg would invent the missing pixels.
MAX_JPEG_PIXELS_PER_BYTE = 1024

# Same names and filters as keras.utils.load_img(interpolation=...).
RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

RGBImage = npt.NDArray[np.uint8]  # (height, width, 3)


def is_image_name(name: str) -> bool:
    """True if the file name has one of the image extensions (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def find_images(
    folder: str,
    on_error: Callable[[ImageReadError], None] | None = None,
    include_hidden: bool = False,
) -> list[str]:
    """List image files under `folder`, recursively, in a deterministic order.

    Paths are `folder` joined with each file's path inside it, as the post
    wrote them.

    Hidden files and folders (names starting with a dot: `.thumbnails/`,
    `.git/`, macOS's `._photo.jpg` companions) are left out unless
    `include_hidden`: they hold caches, copies and metadata, not the
    user's pictures. `folder` itself is listed even if its name is hidden.

    Symlinked folders are followed, wherever they lead, and every real
    folder is listed once: by `folder`'s own subfolders first, then through
    the links in the order found. A link back up the tree (a loop), or to a
    folder listed already, adds nothing. Symlinked files are listed like
    files; a broken or looping one fails later with a clear reason.

    Args:
        on_error: called once for each subfolder that can't be listed (e.g.
            no permission), whose images are therefore missing from the list.
        include_hidden: list hidden files and walk hidden folders too.

    Raises:
        DatasetError: `folder` does not exist, is not a folder, or can't be
            listed.
    """
    walk = _Walk(folder, on_error, include_hidden)
    walk.run()
    return [os.path.join(folder, rel) for rel in sorted(walk.found, key=_sort_key)]


def _folder_identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


class _Walk:
    """One listing of a dataset: the real folders first, then the symlinked
    folders found on the way (breadth first), each real folder once."""

    def __init__(self, folder: str, on_error: Callable[[ImageReadError], None] | None, include_hidden: bool):
        self.folder = folder
        self.on_error = on_error
        self.include_hidden = include_hidden
        self.found: list[str] = []  # paths inside `folder`
        self.seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked
        self.links: collections.deque[str] = collections.deque()  # symlinked folders, to follow

    def run(self) -> None:
        self.seen.add(_folder_identity(_dataset_folder(self.folder)))
        self._walk_tree("")
        while self.links:
            rel = self.links.popleft()
            try:
                identity = _folder_identity(os.stat(self._path(rel)))
            except OSError as error:  # gone since it was seen, or its target can't be reached
                self._cannot_list(rel, error)
                continue
            if identity not in self.seen:  # a loop back up, or a folder listed already: nothing to add
                self.seen.add(identity)
                self._walk_tree(rel)

    def _path(self, rel: str) -> str:
        return os.path.join(self.folder, rel) if rel else self.folder

    def _walk_tree(self, top: str) -> None:
        """`top` and its real subfolders; symlinked subfolders are queued."""
        stack = [top]
        while stack:
            rel = stack.pop()
            for entry in self._entries(rel):
                if entry.name.startswith(".") and not self.include_hidden:
                    continue
                child = os.path.join(rel, entry.name) if rel else entry.name
                kind = _entry_kind(entry)
                if kind == "folder":
                    identity = _entry_identity(entry)
                    if identity is None or identity not in self.seen:  # a bind mount can loop too
                        if identity is not None:
                            self.seen.add(identity)
                        stack.append(child)
                elif kind == "linked folder":
                    self.links.append(child)
                elif is_image_name(entry.name):
                    self.found.append(child)

    def _entries(self, rel: str) -> list[os.DirEntry]:
        try:
            with os.scandir(self._path(rel)) as entries:
                return sorted(entries, key=lambda entry: entry.name)
        except OSError as error:
            if not rel:
                reason = _os_reason(error)
                raise DatasetError(f"cannot list dataset folder {printable_path(self.folder)}: {reason}") from None
            self._cannot_list(rel, error)
            return []

    def _cannot_list(self, rel: str, error: OSError) -> None:
        if self.on_error is not None:
            self.on_error(ImageReadError(self._path(rel),
                                         f"folder can't be listed ({_os_reason(error)}); its images are not indexed"))


def _entry_kind(entry: os.DirEntry) -> str:
    """"folder", "linked folder" or "other" (a file, a link to one, a broken link...)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return "folder"
        if entry.is_symlink() and entry.is_dir():
            return "linked folder"
    except OSError:  # can't tell (e.g. its target is behind a closed folder): judged when read
        pass
    return "other"


def _entry_identity(entry: os.DirEntry) -> tuple[int, int] | None:
    try:
        return _folder_identity(entry.stat(follow_symlinks=False))
    except OSError:
        return None  # listing it will say what is wrong


def _dataset_folder(folder: str) -> os.stat_result:
    """os.stat of the folder to index.

    Raises:
        DatasetError: it doesn't exist, isn't a folder, or can't be reached.
    """
    shown = printable_path(folder)
    try:
        info = os.stat(folder)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise DatasetError(f"dataset folder not found: {shown}") from None
        if error.errno == errno.ENOTDIR:
            raise DatasetError(f"dataset folder not found: {shown} (a part of its path is a file)") from None
        if error.errno == errno.EACCES:
            raise DatasetError(
                f"cannot reach dataset folder {shown}: permission denied on a folder of its path") from None
        if error.errno == errno.ELOOP:
            raise DatasetError(f"cannot reach dataset folder {shown}: symbolic link loop") from None
        raise DatasetError(f"cannot reach dataset folder {shown}: {_os_reason(error)}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DatasetError(f"dataset is not a folder: {shown}")
    return info


def _os_reason(error: OSError) -> str:
    """The operating system's reason, without the file name it repeats:
    "permission denied", "input/output error"."""
    if error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return " ".join(str(error).split()) or type(error).__name__


def _sort_key(rel_path: str) -> tuple[str, ...]:
    # Compare folder by folder so "a/b.png" and "a.png" order the same way
    # on every platform.
    return tuple(rel_path.split(os.sep))


def load_image(
    path: str,
    size: tuple[int, int] = (224, 224),
    interpolation: str = "nearest",
    background: tuple[int, int, int] | None = WHITE,
) -> RGBImage:
    """Open one image as an RGB uint8 array of shape (size[0], size[1], 3).

    For an opaque image of up to LARGE_IMAGE_PIXELS this gives exactly what
    `keras.utils.img_to_array(keras.utils.load_img(path, target_size=size))`
    gives. On top of that: EXIF orientation is applied, transparency is
    composited on `background` (instead of exposing whatever colour hides
    under transparent pixels), animations use their first frame, 16-bit
    images are scaled to 8 bits, and larger images are decoded reduced
    (see `reduce_large`) so one huge photo can't take gigabytes.

    Raises:
        ImageReadError: the file is missing, empty, unreadable, not a
            regular file, not an image, truncated or corrupt, or larger
            than Pillow's decompression-bomb limit (refused from its header,
            before any pixel is decoded).
    """
    rgb = _read_rgb(path, size, background)
    height, width = size
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), RESAMPLING[interpolation])
    return np.asarray(rgb, dtype=np.uint8)


def load_preview(path: str, max_side: int, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """An RGB picture of `path` at most `max_side` pixels a side, for showing
    results: decoded as safely as `load_image` (same refusals and reasons).

    Raises:
        ImageReadError: as `load_image`.
    """
    rgb = _read_rgb(path, (max_side, max_side), background)
    rgb.thumbnail((max_side, max_side))
    return rgb


def _read_rgb(path: str, size: tuple[int, int], background: tuple[int, int, int] | None) -> Image.Image:
    """The first frame of `path`, decoded (reduced if very large, for a
    target of `size`) and converted to RGB; the file is closed again."""
    _check_readable_file(path)
    with _decoding(path):
        with _open_image(path, size) as img:
            img.seek(0)
            return to_rgb(reduce_large(img, size), background)  # a loaded copy (exif_transpose copies)


def _open_image(path: str, size: tuple[int, int]) -> Image.Image:
    """Image.open(path), judged against Pillow's decompression-bomb limit by
    the pixels that will really be decoded.

    Pillow measures an image by its header, full size. A JPEG that libjpeg
    can decode reduced (see `_jpeg_decodes_reduced_in_rows`) is instead
    measured at the reduced size it will be decoded at (for a target of
    `size`, see `reduce_large`): a 100-megapixel camera photo is decoded at
    1/8 scale, under 2 megapixels, and must not be refused as a bomb. Any
    other image over the limit (PNG, progressive JPEG, ...) is refused from
    its header, as before.
    """
    try:
        img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        with open(path, "rb") as handle:
            if handle.read(3) != b"\xff\xd8\xff":  # not a JPEG
                raise
            handle.seek(0)
            decodes_reduced = _jpeg_decodes_reduced_in_rows(handle)
    else:
        if isinstance(img, JpegImagePlugin.JpegImageFile):
            _refuse_impossible_jpeg(img, path)
        return img
    if not decodes_reduced:
        raise ImageReadError(path, JPEG_BOMB_REASON)
    img = JpegImagePlugin.JpegImageFile(path)  # what Image.open would give, minus its full-size refusal
    try:
        _refuse_impossible_jpeg(img, path)
        _draft_jpeg(img, size)
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            raise ImageReadError(path, REDUCED_BOMB_REASON)
    except BaseException:
        img.close()
        raise
    return img


def _refuse_impossible_jpeg(img: JpegImagePlugin.JpegImageFile, path: str) -> None:
    """Refuse (closing it) a JPEG whose header claims more pixels than its
    file could hold (MAX_JPEG_PIXELS_PER_BYTE)."""
    size = os.fstat(img.fp.fileno()).st_size
    if img.width * img.height > size * MAX_JPEG_PIXELS_PER_BYTE:
        img.close()
        raise ImageReadError(path, f"damaged JPEG: its header claims {img.width}x{img.height} pixels, "
                                   f"far more than its {size} bytes can hold; skipped without decoding")


# Start-of-frame markers of sequential DCT JPEGs with Huffman coding
# (baseline and extended): the JPEGs cameras write.
_SEQUENTIAL_JPEG_FRAMES = frozenset({0xC0, 0xC1})
# Markers that stand alone, without a length: TEM, RST0-7, SOI.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})


def _jpeg_decodes_reduced_in_rows(handle) -> bool:
    """Whether libjpeg decodes this JPEG at a reduced scale holding only a
    few rows of it at a time: a sequential JPEG whose first scan holds
    every colour component (one interleaved scan).

    Any other JPEG makes libjpeg keep the coefficients of the whole
    full-size image in memory, whatever the scale it outputs (about 2 bytes
    per pixel and component): progressive ones, lossless ones, and
    sequential ones stored one component per scan. Those, hierarchical ones
    and anything this reader can't follow answer False.

    Reads the markers from the start of `handle` up to the first scan.
    """
    if handle.read(2) != b"\xff\xd8":
        return False
    frame = components = None
    while True:
        byte = handle.read(1)
        if byte != b"\xff":
            return False  # not at a marker: damaged, or not for this reader
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes
            marker = handle.read(1)
        if not marker or marker == b"\xd9":  # end of data, or EOI before any scan
            return False
        code = marker[0]
        if code in _STANDALONE_MARKERS:
            continue
        if code == 0xDE:  # DHP: a hierarchical JPEG, which libjpeg doesn't decode reduced (nor at all)
            return False
        length_bytes = handle.read(2)
        if len(length_bytes) < 2:
            return False
        length = int.from_bytes(length_bytes, "big") - 2
        if length < 0:
            return False
        if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):  # a start of frame (not DHT, JPG, DAC)
            payload = handle.read(length)
            if len(payload) < 6 or frame is not None:
                return False
            frame, components = code, payload[5]
        elif code == 0xDA:  # start of the first scan: its number of components
            scan = handle.read(1)
            return frame in _SEQUENTIAL_JPEG_FRAMES and len(scan) == 1 and scan[0] == components
        else:
            handle.seek(length, os.SEEK_CUR)


@contextlib.contextmanager
def _decoding(path: str) -> Iterator[None]:
    """Every way decoding an untrusted file can fail, as one ImageReadError.

    Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError,
    struct.error, zlib.error, MemoryError and more on damaged files; one bad
    file must cost one skipped image, never the whole indexing run. A
    decompression-bomb warning (between Pillow's limit and twice it) is
    turned into a refusal, so it is never printed as a multi-line warning.
    """
    try:
        # catch_warnings is not thread-safe, but the only filter it adds
        # escalates this one Pillow warning; a race can at worst leave that
        # in place, which this module treats as a refusal anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, BOMB_REASON) from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file Pillow can read") from None
    except Exception as error:  # noqa: BLE001 -- see the docstring
        raise ImageReadError(path, _describe(error)) from None


def reduce_large(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`img`, or a smaller version of it if it has over LARGE_IMAGE_PIXELS
    (a JPEG not yet loaded is reduced in place).

    JPEG (and MPO) is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself
    (`draft`): the full-size pixels are never allocated. Other formats
    can't decode reduced, so they are decoded once (their size is bounded
    by the decompression-bomb limit) and reduced at once, before the colour
    and alpha conversions that would each copy the full image. Either way the
    shorter side keeps at least REDUCED_MARGIN times the model input.
    """
    if img.width * img.height <= LARGE_IMAGE_PIXELS:
        return img
    if isinstance(img, JpegImagePlugin.JpegImageFile):  # JPEG, and MPO (many cameras' JPEGs)
        _draft_jpeg(img, size)
    factor = min(img.size) // (REDUCED_MARGIN * max(size))
    if factor < 2:
        return img
    if img.mode in REDUCIBLE_MODES:
        return img.reduce(factor)
    return img.resize((img.width // factor, img.height // factor), Image.Resampling.NEAREST)


def _draft_jpeg(img: Image.Image, size: tuple[int, int]) -> None:
    """Have libjpeg decode the JPEG `img` (not loaded yet) at 1/2, 1/4 or 1/8
    scale, as small as keeps REDUCED_MARGIN times `size` on its shorter side
    (no change if even 1/2 would be too small). `img.size` becomes the size
    that will be decoded. A second call changes nothing."""
    factor = min(img.size) // (REDUCED_MARGIN * max(size))
    if factor >= 2:
        img.draft(None, (img.width // factor, img.height // factor))


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Orient by EXIF, composite transparency on `background`, return RGB.

    `background=None` drops the alpha channel as the post's recipe does,
    exposing whatever colour hides under transparent pixels."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _to_8bit(img)
    if has_transparency(img) and background is not None:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def has_transparency(img: Image.Image) -> bool:
    """True for alpha channels and palette/colour-key transparency."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16-bit values instead of scaling them,
    # which turns most 16-bit images white.
    values = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if values.max(initial=0) > 255 else 255.0
    scaled = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _check_readable_file(path: str) -> None:
    """Refuse, with the reason, what Pillow should never be handed: missing
    files, broken or looping links, folders, empty files, and anything that
    is not a regular file (a FIFO would block the run forever, a device
    could be endless)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise ImageReadError(path, _stat_failure(path, error)) from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageReadError(path, "is a folder, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageReadError(path, "not a regular file (a FIFO, socket or device)")
    if info.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _stat_failure(path: str, error: OSError) -> str:
    if error.errno == errno.ELOOP:
        return "symbolic link loop"
    if error.errno == errno.ENOENT:
        return "broken symbolic link" if os.path.islink(path) else "file not found"
    if error.errno == errno.EACCES:
        return "permission denied (on a folder of its path)"
    if error.errno == errno.ENOTDIR:
        return "file not found (a part of its path is a file, not a folder)"
    return f"could not be read ({_os_reason(error)})"


def _describe(error: BaseException) -> str:
    """A short reason for a decoding failure."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, MemoryError):
        return "not enough memory to decode it"
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return f"could not be read ({_os_reason(error)})"  # the disk or the system, not the image data
    text = " ".join(str(error).split()) or type(error).__name__
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return f"truncated or corrupt image data ({text})"
    return f"unreadable image ({text})"


def load_images(
    paths: Iterable[str], **options
) -> tuple[list[str], list[RGBImage], list[ImageReadError]]:
    """Load several images; return (good paths, arrays, errors for the rest)."""
    good, arrays, errors = [], [], []
    for path in paths:
        try:
            arrays.append(load_image(path, **options))
            good.append(path)
        except ImageReadError as error:
            errors.append(error)
    return good, arrays, errors
