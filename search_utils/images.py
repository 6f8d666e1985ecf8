"""Finding image files in a folder and opening one image robustly.

Knows nothing about models: `load_image` returns an RGB uint8 array of the
requested size, or raises ImageReadError saying precisely why it can't.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatasetError, ImageReadError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)
WHITE = (255, 255, 255)

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


def find_images(folder: str) -> list[str]:
    """List image files under `folder`, recursively, in a deterministic order.

    Paths are `folder` joined with each file's path inside it, as the post
    wrote them. Symlinked folders are not followed (no loops); symlinked
    files are listed, and a broken one fails later with a clear reason.

    Raises:
        DatasetError: `folder` does not exist or is not a folder.
    """
    if not os.path.exists(folder):
        raise DatasetError(f"dataset folder not found: {folder}")
    if not os.path.isdir(folder):
        raise DatasetError(f"dataset is not a folder: {folder}")
    relative = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel_root = os.path.relpath(root, folder)
        for name in files:
            if is_image_name(name):
                relative.append(os.path.normpath(os.path.join(rel_root, name)))
    return [os.path.join(folder, rel) for rel in sorted(relative, key=_sort_key)]


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

    For an opaque image this gives exactly what
    `keras.utils.img_to_array(keras.utils.load_img(path, target_size=size))`
    gives. On top of that: EXIF orientation is applied, transparency is
    composited on `background` (instead of exposing whatever colour hides
    under transparent pixels), animations use their first frame and 16-bit
    images are scaled to 8 bits.

    Raises:
        ImageReadError: the file is missing, empty, unreadable, not an image,
            truncated, or larger than Pillow's decompression-bomb limit.
    """
    _check_readable_file(path)
    try:
        with warnings.catch_warnings():
            # Past Pillow's pixel limit is a refusal, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.seek(0)
                rgb = to_rgb(img, background)
                height, width = size
                if rgb.size != (width, height):
                    rgb = rgb.resize((width, height), RESAMPLING[interpolation])
                return np.asarray(rgb, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageReadError(path, "too many pixels (over Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image file Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(path, _describe(error)) from None


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
    if os.path.islink(path) and not os.path.exists(path):
        raise ImageReadError(path, "broken symbolic link")
    if not os.path.exists(path):
        raise ImageReadError(path, "file not found")
    if os.path.isdir(path):
        raise ImageReadError(path, "is a folder, not an image file")
    if not os.access(path, os.R_OK):
        raise ImageReadError(path, "permission denied")
    if os.path.getsize(path) == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if "truncated" in text.lower() or isinstance(error, EOFError):
        return f"truncated or corrupt image data ({text})"
    if isinstance(error, PermissionError):
        return "permission denied"
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
