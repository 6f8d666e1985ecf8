"""The results picture: the query, then the top N images in a grid, each
labelled with its distance, as in the post.

Builds a plain matplotlib Figure (no pyplot state), so saving works on any
machine; `show_figure` is the only place that opens a window.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

from .errors import ImageReadError, printable_path
from .images import load_preview
from .search import SearchHit

COLUMNS = 6
CELL_INCHES = (2.5, 2.8)  # width, height of one image and its label
DPI = 100
THUMBNAIL = 256


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
    copies = f" (+{len(hit.copies)} copies)" if hit.copies else ""
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


def save_figure(figure, path: str) -> None:
    """Write the picture to `path` (format from the extension)."""
    figure.savefig(path, dpi=DPI)


def display_available() -> bool:
    """Whether a window can be opened: a desktop session, not a headless box."""
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


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
