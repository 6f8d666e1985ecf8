"""The in-memory form of a features file: paths, features, metadata and the
optional whitening, in whatever format they were stored."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import printable_path

FORMAT_VERSION = 1  # of the metadata written beside (CSV) or inside (HDF5) a features file
# Non-UTF-8 bytes in file names survive as surrogates (os.fsdecode) and must
# survive the trip through the file too.
ENCODING_ERRORS = "surrogateescape"
WHITENING_KEYS = ("mean", "projection", "vectors")


@dataclass
class FeatureStore:
    """Features in memory: row i of `features` belongs to `paths[i]`.

    `metadata` is {} for a file without metadata (e.g. written by the
    post's original script); `metadata_file` names the metadata file read
    beside a CSV, if there was one (it may hold {}). `whitening_arrays` holds a whitening learned
    at index time ("mean", "projection", and "vectors": the whitened rows),
    or None.
    """

    paths: list[str]
    features: np.ndarray  # (n, dim) float32, maybe a read-only memmap
    metadata: dict = field(default_factory=dict)
    whitening_arrays: dict[str, np.ndarray] | None = None
    metadata_file: str | None = None  # the file the metadata was read from, if a separate one (CSV)

    @property
    def whitening(self):
        from ..transforms import Whitening

        return None if self.whitening_arrays is None else Whitening.from_arrays(self.whitening_arrays)

    @property
    def whitened_vectors(self) -> np.ndarray | None:
        return None if self.whitening_arrays is None else self.whitening_arrays["vectors"]

    @property
    def generation(self) -> str | None:
        """The id of the write that produced this file (None: older files)."""
        return self.metadata.get("generation")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def whitening_fits(arrays: dict[str, np.ndarray], features: np.ndarray) -> bool:
    """Whether stored whitening arrays have the shapes `features` call for."""
    return (arrays["mean"].shape == (features.shape[1],)
            and arrays["projection"].ndim == 2
            and arrays["projection"].shape[0] == features.shape[1]
            and arrays["vectors"].shape == (len(features), arrays["projection"].shape[1]))


EXCERPT_CHARS = 60  # of a row or value quoted in a message: a binary file's "row" can be kilobytes long


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` as a message may quote it: on one line (printable_path) and
    at most `limit` characters."""
    shown = printable_path(str(text))
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"
