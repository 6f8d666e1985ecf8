"""One indexing run per output file at a time, and whether this process can
write that output's files at all.

A second run on the same output refuses at once with a clear message
instead of interleaving its writes. The lock is an OS advisory lock on
`<output>.lock`, so it is released even if the holder is killed -9.

`create_problem` and `rewrite_problem` say, before any work, why a file
can't be written, by trying as the run will (a probe file created and
deleted, a file opened for writing and closed untouched), so permissions,
ACLs, read-only mounts and root without CAP_DAC_OVERRIDE all count as they
really are.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from typing import Iterator

from .errors import SearchUtilsError, printable_path
from .store.atomic import TEMPORARY_SUFFIX, temporary_prefix

LOCK_SUFFIX = ".lock"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class OutputLockedError(SearchUtilsError):
    """Another process is writing the same features file."""


class LockFileError(SearchUtilsError):
    """The lock file can't be created or written."""


def lock_path(output: str) -> str:
    """The lock file of features file `output`."""
    return os.fspath(output) + LOCK_SUFFIX


@contextlib.contextmanager
def exclusive_output(path: str) -> Iterator[None]:
    """Hold the lock of features file `path` for the duration. A lock file
    this process couldn't finish writing is removed again.

    Raises:
        OutputLockedError: another process holds it.
        LockFileError: the lock file can't be created or written.
    """
    lock = lock_path(path)
    try:
        handle = open(lock, "a+")
    except OSError as error:
        raise LockFileError(f"cannot create lock file {printable_path(lock)}: {_reason(error)}") from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputLockedError(
                f"{printable_path(path)} is being written by {printable_path(holder[:80])}; wait for that run "
                f"to finish (or stop it) and try again"
            ) from None
        try:  # held: the file is ours to write, and to remove
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()}")
            handle.flush()
        except OSError as error:
            _unlink(lock)
            raise LockFileError(f"cannot write lock file {printable_path(lock)}: {_reason(error)}") from None
        try:
            yield
        finally:
            _unlink(lock)  # still held: nobody can take the old file now
    finally:
        with contextlib.suppress(OSError):  # closing flushes: nothing is left to write
            handle.close()


def _unlink(path: str) -> None:
    # A folder made read-only during the run leaves the lock file: harmless,
    # as the OS lock died with its holder.
    with contextlib.suppress(OSError):
        os.unlink(path)


def create_problem(path: str) -> str | None:
    """Why this process can't create (or replace by renaming over it) the
    file `path`, or None: its folder is missing or is a file, `path` is a
    folder, or files can't be made in the folder (tried: a probe file is
    created and deleted). A full disk often still lets an empty file be
    made: that shows when the file is written."""
    if os.path.isdir(path):
        return "it is a folder"
    folder = os.path.dirname(path) or os.curdir
    if not os.path.isdir(folder):
        blocker = _first_existing(folder)
        if blocker is not None and not os.path.isdir(blocker):
            return f"{printable_path(blocker)} is a file, not a folder"
        return f"folder {printable_path(folder)} does not exist"
    try:  # named as the run's temporary files are: short enough for any name, and cleaned up if left
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temporary_prefix(path), suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        return f"can't create files in folder {printable_path(folder)}: {_reason(error)}"
    os.close(fd)
    os.unlink(probe)
    return None


def rewrite_problem(path: str) -> str | None:
    """Why this process can't write the existing file `path` in place (it
    is a folder, or opening it for writing fails), or None; None too if
    there is no such file. The file is opened and closed, not changed."""
    if os.path.isdir(path):
        return "it is a folder"
    if not os.path.lexists(path):
        return None
    try:
        with open(path, "r+b"):
            pass
    except OSError as error:
        return _reason(error)
    return None


def _first_existing(folder: str) -> str | None:
    """The deepest existing path on the way to `folder`, as spelled in it."""
    path = folder
    while path and not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path or None


def _reason(error: OSError) -> str:
    reason = error.strerror or str(error)
    return f"{reason} (is the disk full?)" if error.errno in _NO_SPACE else reason
