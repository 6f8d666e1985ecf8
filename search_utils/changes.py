"""What changed in a dataset since its last complete indexing run.

A file whose size and modification time are what the state recorded keeps
its recorded content hash without being read; any other file is hashed. So
a file touched but not modified is recognised as unchanged, and a run over
an unchanged folder reads no image at all. Files are then compared with the
last run's catalogue by path and content hash:

    new        a path the last run didn't have
    changed    a path the last run had, with other content now
    renamed    a new path with the content of a path that has disappeared
               (moved or renamed: its stored features are reused)
    removed    a path the last run had that is gone
    unchanged  the same path with the same content

A file modified less than RACY_NS before it was recorded might have changed
again within the same timestamp tick: it is hashed again next time rather
than trusted (the "racy" check git does too).
"""

from __future__ import annotations

import os
import stat
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from .catalog import FileRecord, IndexState, content_hash
from .errors import ImageReadError
from .images import load_image

RACY_NS = 2_000_000_000  # coarser than any filesystem's timestamps (FAT: 2 s)
SAVE_EVERY = 512  # hashes per stat-cache commit while scanning


@dataclass(frozen=True)
class Entry:
    """One listed image file."""

    path: str  # as listed: the --dataset argument joined with `rel`
    rel: str  # path inside the dataset: the key in the state
    hash: str | None  # None: it couldn't even be opened (see `error`)
    error: ImageReadError | None = None


@dataclass
class Changes:
    """Paths inside the dataset, by what happened to them since the last run."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old, new)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.new or self.changed or self.renamed or self.removed)

    def counts(self) -> str:
        return (f"{len(self.new)} new, {len(self.changed)} changed, {len(self.renamed)} renamed, "
                f"{len(self.removed)} removed, {len(self.unchanged)} unchanged")


def scan(dataset: str, paths: Sequence[str], state: IndexState) -> list[Entry]:
    """The content hash of every file of `paths` (listed under `dataset`),
    reading only the files the stat cache can't vouch for; new hashes are
    saved in the state as it goes, so an interrupted scan isn't redone."""
    cache = state.stat_cache()
    entries: list[Entry] = []
    fresh: list[tuple[str, FileRecord]] = []
    prefix = os.path.join(dataset, "")
    for path in paths:
        rel = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, dataset)
        entry, record = _examine(path, rel, cache.get(rel))
        entries.append(entry)
        if record is not None:
            fresh.append((rel, record))
            if len(fresh) >= SAVE_EVERY:
                state.remember_files(fresh)
                fresh.clear()
    state.remember_files(fresh)
    return entries


def _examine(path: str, rel: str, known: FileRecord | None) -> tuple[Entry, FileRecord | None]:
    """(the entry, a new stat-cache record if the file had to be hashed)."""
    seen_ns = time.time_ns()
    try:
        info = os.stat(path)
    except OSError as error:
        return Entry(path, rel, None, _unreadable(path, error)), None
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO to hash it would block
        return Entry(path, rel, None, _unreadable(path, None)), None
    if _trusted(known, info):
        return Entry(path, rel, known.hash), None
    try:
        digest = content_hash(path)
    except OSError as error:
        return Entry(path, rel, None, _unreadable(path, error)), None
    return Entry(path, rel, digest), FileRecord(info.st_size, info.st_mtime_ns, seen_ns, digest)


def _trusted(known: FileRecord | None, info: os.stat_result) -> bool:
    return (known is not None and known.size == info.st_size and known.mtime_ns == info.st_mtime_ns
            and info.st_mtime_ns < known.seen_ns - RACY_NS)


def _unreadable(path: str, error: OSError | None) -> ImageReadError:
    """The reason the image loader gives for a file that can't be opened
    (or isn't a regular file), so it reads like every other skipped file."""
    try:
        load_image(path, size=(1, 1))
    except ImageReadError as refusal:
        return refusal
    reason = "not a regular file" if error is None else (error.strerror or str(error))
    return ImageReadError(path, f"could not be read ({reason})")  # readable again: a race


def classify(entries: Sequence[Entry], catalogue: dict[str, str | None]) -> Changes:
    """Compare the listed files with the last run's catalogue (see the
    module docstring). A file that can't be opened counts by its path."""
    changes = Changes()
    current = {entry.rel: entry.hash for entry in entries}
    gone: dict[str | None, list[str]] = defaultdict(list)
    for rel, digest in catalogue.items():
        if rel not in current:
            gone[digest].append(rel)
    for entry in entries:
        if entry.rel not in catalogue:
            if entry.hash is not None and gone.get(entry.hash):
                changes.renamed.append((gone[entry.hash].pop(0), entry.rel))
            else:
                changes.new.append(entry.rel)
        elif catalogue[entry.rel] == entry.hash:
            changes.unchanged.append(entry.rel)
        else:
            changes.changed.append(entry.rel)
    changes.removed = sorted(rel for rels in gone.values() for rel in rels)
    return changes
