"""Finding image files in a folder and opening one image robustly.

Knows nothing about models: `load_image` returns an RGB uint8 array of the
requested size, or raises ImageReadError saying precisely why it can't.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import warnings
from typing import Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

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


def find_images(folder: str, on_error: Callable[[ImageReadError], None] | None = None) -> list[str]:
    """List image files under `folder`, recursively, in a deterministic order.

    Paths are `folder` joined with each file's path inside it, as the post
    wrote them. Symlinked folders are not followed (so a link loop can't
    make the walk endless); symlinked files are listed, and a broken or
    looping one fails later with a clear reason.

    Args:
        on_error: called once for each subfolder that can't be listed (e.g.
            no permission), whose images are therefore missing from the list.

    Raises:
        DatasetError: `folder` does not exist, is not a folder, or can't be
            listed.
    """
    if not os.path.exists(folder):
        raise DatasetError(f"dataset folder not found: {printable_path(folder)}")
    if not os.path.isdir(folder):
        raise DatasetError(f"dataset is not a folder: {printable_path(folder)}")
    relative = []
    for root, _dirs, files in os.walk(folder, onerror=_walk_error_handler(folder, on_error)):
        rel_root = os.path.relpath(root, folder)
        for name in files:
            if is_image_name(name):
                relative.append(os.path.normpath(os.path.join(rel_root, name)))
    return [os.path.join(folder, rel) for rel in sorted(relative, key=_sort_key)]


def _walk_error_handler(
    folder: str, on_error: Callable[[ImageReadError], None] | None
) -> Callable[[OSError], None]:
    """os.walk drops folders it can't list without a word; say so instead."""

    def handle(error: OSError) -> None:
        failed = error.filename if isinstance(error.filename, str) else folder
        if os.path.normpath(failed) == os.path.normpath(folder):
            raise DatasetError(f"cannot list dataset folder {printable_path(folder)}: {error.strerror or error}")
        if on_error is not None:
            reason = (error.strerror or type(error).__name__).lower()
            on_error(ImageReadError(failed, f"folder can't be listed ({reason}); its images are not indexed"))

    return handle


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
        with Image.open(path) as img:
            img.seek(0)
            return to_rgb(reduce_large(img, size), background)  # a loaded copy (exif_transpose copies)


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

    JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (`draft`):
    the full-size pixels are never allocated. Other formats can't decode
    reduced, so they are decoded once (their size is bounded by the
    decompression-bomb limit) and reduced at once, before the colour and
    alpha conversions that would each copy the full image. Either way the
    shorter side keeps at least REDUCED_MARGIN times the model input.
    """
    if img.width * img.height <= LARGE_IMAGE_PIXELS:
        return img
    keep = REDUCED_MARGIN * max(size)
    if img.format == "JPEG":
        factor = min(img.size) // keep
        if factor >= 2:
            img.draft(None, (img.width // factor, img.height // factor))
    factor = min(img.size) // keep
    if factor < 2:
        return img
    if img.mode in REDUCIBLE_MODES:
        return img.reduce(factor)
    return img.resize((img.width // factor, img.height // factor), Image.Resampling.NEAREST)


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
    return _describe(error)


def _describe(error: BaseException) -> str:
    """A short reason for a decoding failure."""
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, MemoryError):
        return "not enough memory to decode it"
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
