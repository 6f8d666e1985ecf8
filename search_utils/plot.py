"""The results picture: the query, then the top N images in a grid, each
labelled with its distance, as in the post.

Builds a plain matplotlib Figure (no pyplot state), so saving works on any
machine; `show_figure` is the only place that opens a window. Where the
picture is to be written is checked before the search does its work
(`check_picture_name`, `picture_file`), and it is written atomically.
"""

from __future__ import annotations

import errno
import io
import math
import os
import sys
import tempfile
from typing import Sequence

from .errors import ImageReadError, PictureError, printable_path
from .images import load_preview
from .search import SearchHit

COLUMNS = 6
CELL_INCHES = (2.5, 2.8)  # width, height of one image and its label
DPI = 100
THUMBNAIL = 256
DEFAULT_FORMAT = "png"  # a picture name without an extension gets ".png"
# With the query, 10 rows of 6. Each cell costs a decode and a draw: 2,000
# results took two minutes and made a 1500 x 93520 pixel picture.
MOST_RESULTS_SHOWN = 59


def grid_shape(n_results: int, columns: int = COLUMNS) -> tuple[int, int]:
    """(rows, columns) of the grid holding the query and `n_results` images."""
    cells = n_results + 1
    cols = min(columns, cells)
    return math.ceil(cells / cols), cols


def figure_size_pixels(n_results: int, columns: int = COLUMNS) -> tuple[int, int]:
    """(width, height) in pixels of the saved picture."""
    rows, cols = grid_shape(n_results, columns)
    return round(cols * CELL_INCHES[0] * DPI), round(rows * CELL_INCHES[1] * DPI)


def results_figure(query_path: str, hits: Sequence[SearchHit], columns: int = COLUMNS):
    """A Figure with the query first, then one cell per hit (`dist: X.XX`)."""
    from matplotlib.figure import Figure

    rows, cols = grid_shape(len(hits), columns)
    figure = Figure(figsize=(cols * CELL_INCHES[0], rows * CELL_INCHES[1]), dpi=DPI)
    cells = [(query_path, "query")] + [(h.path, _label(h)) for h in hits]
    for index in range(rows * cols):
        axes = figure.add_subplot(rows, cols, index + 1)
        axes.axis("off")
        if index < len(cells):
            path, title = cells[index]
            _draw(axes, path, title)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92, wspace=0.1, hspace=0.25)
    return figure


def _label(hit: SearchHit) -> str:
    noun = "copy" if len(hit.copies) == 1 else "copies"
    copies = f" (+{len(hit.copies)} {noun})" if hit.copies else ""
    return f"dist: {hit.distance:.2f}{copies}"


def _draw(axes, path: str, title: str) -> None:
    try:
        axes.imshow(_thumbnail(path))
    except ImageReadError as error:
        axes.text(0.5, 0.5, f"cannot show:\n{error.reason}", ha="center", va="center", wrap=True)
    axes.set_title(f"{title}\n{_short(printable_path(os.path.basename(path)))}", fontsize=9)


def _thumbnail(path: str):
    # The same safe decoding as indexing: a file that turned into a bomb or
    # a FIFO since it was indexed is a "cannot show" cell, not a crash.
    return load_preview(path, THUMBNAIL)


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def check_picture_name(name: str) -> str:
    """The format a picture called `name` would be written in (its
    extension, else png), judged from the name alone.

    Raises:
        PictureError: an empty name, a name ending in a slash, or a format
            matplotlib can't write on this machine.
    """
    shown = printable_path(name)
    if not name:
        raise PictureError("the picture's file name is empty")
    if name.endswith(("/", os.sep)) or os.path.basename(name) in (".", ".."):
        raise PictureError(f"{shown} names a folder, not a file")
    picture_format = _format_of(name)
    _check_writable_format(picture_format, shown)
    return picture_format


def _format_of(name: str) -> str:
    return os.path.splitext(name)[1].strip(".").lower() or DEFAULT_FORMAT


def _check_writable_format(picture_format: str, shown: str) -> None:
    """matplotlib's list of formats names some that need more than it has
    (pgf runs TeX): a tiny picture written to memory tells for sure."""
    from matplotlib.figure import Figure

    probe = Figure(figsize=(0.2, 0.2))
    formats = probe.canvas.get_supported_filetypes()
    if picture_format not in formats:
        raise PictureError(f"{shown}: matplotlib cannot write .{picture_format} pictures "
                           f"(it can write: {', '.join(sorted(formats))})")
    probe.text(0, 0, "x")  # text is what needs TeX in pgf
    try:
        probe.savefig(io.BytesIO(), format=picture_format)
    except Exception as error:  # noqa: BLE001 - whatever the format's writer lacks here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PictureError(f"{shown}: cannot write .{picture_format} pictures here: {reason}") from None


def picture_file(name: str) -> str:
    """The file a picture asked for as `name` is written to: `name`, with
    ".png" appended if it has no extension. Checked writable now, so that a
    search doesn't do its work only to fail at the end.

    Raises:
        PictureError: `name` is a folder, or not a regular file, or
            read-only, or too long, or its folder is missing, not a
            folder, or not writable.
    """
    if os.path.isdir(name):
        example = printable_path(os.path.join(name, "search_results.png"))
        raise PictureError(f"{printable_path(name)} is a folder; name a file in it, e.g. {example}")
    file = _with_extension(name)
    target = os.path.realpath(file)
    shown = printable_path(file)
    if os.path.isdir(target):
        raise PictureError(f"cannot write the picture {shown}: it is a folder")
    if os.path.exists(target) and not os.path.isfile(target):
        raise PictureError(f"cannot write the picture {shown}: it exists and is not a regular file")
    if os.path.isfile(target) and not os.access(target, os.W_OK):
        raise PictureError(f"cannot write the picture {shown}: the file is read-only")
    _check_folder_writable(target, shown, _folder_shown(file))
    return file


def _with_extension(name: str) -> str:
    if os.path.splitext(name)[1].strip("."):
        return name
    return name + DEFAULT_FORMAT if name.endswith(".") else f"{name}.{DEFAULT_FORMAT}"


def _folder_shown(file: str) -> str:
    """The folder of `file` as the user would recognise it."""
    if os.path.islink(file):  # written through: the folder of the file it points to
        return printable_path(os.path.dirname(os.path.realpath(file)))
    return printable_path(os.path.dirname(file) or ".")


def _check_folder_writable(target: str, shown: str, folder_shown: str) -> None:
    """Create and remove the temporary file the save will write first (same
    folder, same kind of name): it needs exactly the rights, and the name
    length, that the real save needs."""
    try:
        fd, probe = tempfile.mkstemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.",
                                     suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except FileNotFoundError:
        raise PictureError(f"cannot write the picture {shown}: folder {folder_shown} does not exist") from None
    except NotADirectoryError:
        raise PictureError(f"cannot write the picture {shown}: {folder_shown} is a file, not a folder") from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise PictureError(f"cannot write the picture {shown}: its name is too long for the file system "
                               "(counting the temporary name it is first written under)") from None
        where = "the current folder" if folder_shown == "." else f"folder {folder_shown}"
        raise PictureError(f"cannot write the picture {shown} in {where}: "
                           f"{(error.strerror or str(error)).lower()}") from None


def save_figure(figure, file: str) -> None:
    """Write the picture to `file` (a name from `picture_file`), atomically:
    a temporary file beside it, renamed over it once complete, so an earlier
    picture is never left half-written. A symlink is written through.

    Raises:
        PictureError: the file system refused (full disk, file too large, ...).
    """
    from .store import atomic_write

    try:
        with atomic_write(os.path.realpath(file), binary=True) as handle:
            figure.savefig(handle, format=_format_of(file), dpi=DPI)
    except OSError as error:
        raise PictureError(f"cannot write the picture {printable_path(file)}: "
                           f"{(error.strerror or str(error)).lower()}; an earlier file there is as it was") from None


def display_available() -> bool:
    """Whether a window can be opened: a desktop session, not a headless box.

    $DISPLAY alone is not enough: when it names a display that can't be
    opened (or MPLBACKEND asks for a file-only backend), matplotlib falls
    back to a backend whose `show` only warns, and the picture would be lost.
    """
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    import matplotlib
    from matplotlib.backends import BackendFilter, backend_registry

    return matplotlib.get_backend().lower() not in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)


def show_figure(figure) -> None:
    """Open the picture in a window and wait until it is closed."""
    import matplotlib.pyplot as plt

    window = plt.figure(figsize=figure.get_size_inches(), dpi=DPI)
    window.figimage(_figure_pixels(figure), resize=False)
    plt.show()


def _figure_pixels(figure):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())
