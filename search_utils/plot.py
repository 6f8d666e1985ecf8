"""The results picture: the query, then the top N images in a grid, each
labelled with its distance, as in the post.

Builds a plain matplotlib Figure (no pyplot state), so saving works on any
machine; `show_figure` is the only place that opens a window. Where the
picture is to be written is checked before the search does its work
(`check_picture_name`, `picture_file`), and it is written atomically.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import socket
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
# The picture is written under a short temporary name beside it first (21
# bytes), so any name the file system takes (255 bytes) can be written.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".picture-", ".tmp"


def _matplotlib():
    """matplotlib, imported with an MPLBACKEND it can use: one that names no
    backend would make `import matplotlib` itself fail (a traceback); it is
    ignored, with a note, and the picture saved as without it."""
    if "matplotlib" not in sys.modules and os.environ.get("MPLBACKEND"):
        value = os.environ.pop("MPLBACKEND")
        import matplotlib

        try:
            matplotlib.rcParams["backend"] = value  # what matplotlib does with the variable, checked
        except (ValueError, KeyError):
            print(f"note: MPLBACKEND={printable_path(value)} names no matplotlib backend; ignored it",
                  file=sys.stderr)
        else:
            os.environ["MPLBACKEND"] = value
    import matplotlib

    return matplotlib


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
    _matplotlib()
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
    _matplotlib()
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


def check_not_a_folder(name: str) -> None:
    """Refuse a picture name that is an existing folder, or names one once
    ".png" is appended (a usage error, like a name ending in a slash).

    Raises:
        PictureError: naming the folder.
    """
    if os.path.isdir(name):
        example = printable_path(os.path.join(name, "search_results.png"))
        raise PictureError(f"{printable_path(name)} is a folder; name a file in it, e.g. {example}")
    file = _with_extension(name)
    if file != name and os.path.isdir(file):
        raise PictureError(f"{printable_path(file)} (.png appended: the name has no extension) is a folder; "
                           f"name a file")


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
    folder, same kind of name): it needs exactly the rights that the real
    save needs; then ask the file system whether it takes the picture's
    own name (a name too long for it is refused by a lookup)."""
    try:
        fd, probe = tempfile.mkstemp(dir=os.path.dirname(target), prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX)
        os.close(fd)
        os.unlink(probe)
        with contextlib.suppress(FileNotFoundError):
            os.lstat(target)
    except FileNotFoundError:
        raise PictureError(f"cannot write the picture {shown}: folder {folder_shown} does not exist") from None
    except NotADirectoryError:
        raise PictureError(f"cannot write the picture {shown}: {folder_shown} is a file, not a folder") from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            size = len(os.fsencode(os.path.basename(target)))
            raise PictureError(f"cannot write the picture {shown}: its name is too long for the file system "
                               f"({size} bytes)") from None
        where = "the current folder" if folder_shown == "." else f"folder {folder_shown}"
        raise PictureError(f"cannot write the picture {shown} in {where}: "
                           f"{(error.strerror or str(error)).lower()}") from None


def save_figure(figure, file: str) -> None:
    """Write the picture to `file` (a name from `picture_file`), atomically:
    a temporary file beside it (a short name: TEMPORARY_PREFIX), flushed to
    disk and renamed over it once complete, so an earlier picture is never
    left half-written; it keeps the earlier file's permissions. A symlink is
    written through.

    Raises:
        PictureError: the file system refused (full disk, file too large, ...).
    """
    from .store.atomic import file_mode, fsync_folder

    target = os.path.realpath(file)
    folder = os.path.dirname(target)
    temporary = None
    try:
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX)
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format=_format_of(file), dpi=DPI)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, file_mode(target))  # mkstemp's 0600 would hide the picture from others
        os.replace(temporary, target)
        temporary = None
    except OSError as error:
        raise PictureError(f"cannot write the picture {printable_path(file)}: "
                           f"{(error.strerror or str(error)).lower()}; an earlier file there is as it was") from None
    finally:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
    fsync_folder(folder)


def display_available() -> bool:
    """Whether a window can be opened: a desktop session, not a headless box.

    $DISPLAY or $WAYLAND_DISPLAY alone is not enough: when it names a
    display that can't be opened, matplotlib falls back to a backend whose
    `show` only warns (even for an MPLBACKEND=TkAgg asked for), and the
    picture would be lost. So on Linux the display is tried first (X: opened
    and closed again, whatever Xlib says meanwhile kept off stderr; Wayland:
    its socket connected to, as libwayland would, without its error line
    when XDG_RUNTIME_DIR is unset); then the backend matplotlib would use
    must be an interactive one that loads.
    """
    if sys.platform.startswith("linux") and not (_wayland_display_usable() or _x_display_usable()):
        return False
    _matplotlib()
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.backends import BackendFilter, backend_registry

    backend = matplotlib.get_backend()  # resolves an automatic choice: the first interactive one that loads
    if backend.lower() in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE):
        return False
    try:
        plt.switch_backend(backend)  # one asked for by name may not load (no tkinter, no Qt)
    except ImportError:
        return False
    return True


def _wayland_display_usable() -> bool:
    name = os.environ.get("WAYLAND_DISPLAY")
    if not name:
        return False
    if not os.path.isabs(name):
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if not runtime or not os.path.isabs(runtime):
            return False
        name = os.path.join(runtime, name)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(name)
    except OSError:
        return False
    return True


def _x_display_usable() -> bool:
    if not os.environ.get("DISPLAY"):
        return False
    _matplotlib()
    try:
        from matplotlib import _c_internal_utils

        check = _c_internal_utils.xdisplay_is_valid
    except (ImportError, AttributeError):  # another matplotlib: let its own fallback decide, as before
        return True
    with _stderr_silenced():
        return bool(check())


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 sent to /dev/null for the block: C libraries
    (Xlib: "No protocol specified") write there directly."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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
