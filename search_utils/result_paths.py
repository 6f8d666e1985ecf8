"""Result paths a user can open from the folder they search in.

Indexing stores paths as given, relative to where it ran (the metadata's
`base_dir`); from another folder those don't open. `usable_hits` names
each result so it opens from the current folder, and changes nothing where
the stored spelling already works.
"""

from __future__ import annotations

import dataclasses
import os


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


def _resolvable(base_dir: str | None) -> bool:
    """No base_dir (no metadata: the post's script): nothing to resolve against."""
    return bool(base_dir) and os.path.isabs(base_dir)


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
