"""Result paths a user can open from the folder they search in.

Indexing stores paths as given, relative to where it ran (the metadata's
`base_dir`); from another folder those don't open. `usable_hits` names
each result so it opens from the current folder, and changes nothing where
the stored spelling already works.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import printable_path


def usable_hits(hits: list, base_dir: str | None) -> list:
    """The hits with paths that open from the current folder (see usable_path)."""
    if not _resolvable(base_dir):
        return hits
    cwd = os.getcwd()

    def usable(path):
        return usable_path(path, base_dir, cwd)

    return [dataclasses.replace(hit, path=usable(hit.path), copies=tuple(map(usable, hit.copies)))
            for hit in hits]


def usable_from_here(stored: str, base_dir: str | None) -> str:
    """One stored path as it opens from the current folder (see usable_path)."""
    return usable_path(stored, base_dir, os.getcwd()) if _resolvable(base_dir) else stored


def _resolvable(base_dir) -> bool:
    """No base_dir (no metadata: the post's script), or one that is not an
    absolute path (hand-edited metadata): nothing to resolve against."""
    return isinstance(base_dir, str) and bool(base_dir) and os.path.isabs(base_dir)


PATHS_SAMPLED = 16  # stored paths looked for beside a moved features file


@dataclass(frozen=True)
class PathBase:
    """Where a features file's relative image paths start from, and what to
    say about it (None: nothing worth saying)."""

    folder: str | None  # None: the current folder (no usable base_dir recorded)
    note: str | None = None


def path_base(recorded, features_path: str, paths: Sequence[str]) -> PathBase:
    """Where the relative paths of `paths` (stored in `features_path`,
    whose metadata records `recorded` as base_dir) start from.

    - Nothing recorded (no metadata: the post's script): the current folder.
    - Something that is not an absolute path (hand-edited): the current
      folder, with a note.
    - A folder that exists: that folder.
    - A folder that no longer exists (the collection was moved or copied
      with its index): the features file's own folder if most of a sample
      of the relative paths are there (index and images moved together),
      with a note; else the recorded folder, with a note that the stored
      paths can't be found from here.
    """
    shown = printable_path(features_path)
    if recorded is None:
        return PathBase(None)
    if not _resolvable(recorded):
        value = json.dumps(recorded)
        value = value if len(value) <= 40 else value[:39] + "…"
        return PathBase(None, f"note: the metadata of {shown} records base_dir {printable_path(value)}, not a folder's "
                              f"absolute path: its relative image paths are taken from the current folder")
    if os.path.isdir(recorded):
        return PathBase(recorded)
    relative = [path for path in paths if not os.path.isabs(path)]
    if not relative:
        return PathBase(recorded)
    sample = [relative[i] for i in sorted({int(k) for k in
                                           np.linspace(0, len(relative) - 1, min(len(relative), PATHS_SAMPLED))})]
    gone = f"{shown} was indexed in {printable_path(recorded)}, which no longer exists"
    for folder in dict.fromkeys(os.path.dirname(p) for p in (os.path.abspath(features_path),
                                                               os.path.realpath(features_path))):
        found = sum(os.path.exists(os.path.join(folder, path)) for path in sample)
        if 2 * found > len(sample):
            return PathBase(folder, f"note: {gone}; its image paths are taken from its own folder "
                                    f"{printable_path(folder)}, where they are")
    return PathBase(recorded, f"note: {gone}, and its images are not beside it either: results show the paths "
                              f"as stored, which may not open from here")


def usable_path(stored: str, base_dir: str, cwd: str) -> str:
    """A stored path as a user can open it from `cwd`.

    Relative paths are stored relative to where indexing ran (`base_dir`).
    If, from `cwd`, the stored spelling names the indexed file, or the
    indexed file is gone, it is kept as it is; otherwise the indexed file is
    named relative to `cwd` if it is inside it, else absolutely.
    """
    if os.path.isabs(stored):
        return stored
    indexed = os.path.normpath(os.path.join(base_dir, stored))
    if not os.path.lexists(indexed) or same_file(os.path.join(cwd, stored), indexed):
        return stored
    if os.path.commonpath([cwd, indexed]) == cwd:
        return os.path.relpath(indexed, cwd)
    return indexed


def same_file(first: str, second: str) -> bool:
    if os.path.normpath(first) == os.path.normpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False
