"""One indexing run per output file at a time.

A second run on the same output refuses at once with a clear message
instead of interleaving its writes. The lock is an OS advisory lock on
`<output>.lock`, so it is released even if the holder is killed -9.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from .errors import SearchUtilsError

LOCK_SUFFIX = ".lock"


class OutputLockedError(SearchUtilsError):
    """Another process is writing the same features file."""


@contextlib.contextmanager
def exclusive_output(path: str) -> Iterator[None]:
    """Hold the lock of features file `path` for the duration.

    Raises:
        OutputLockedError: another process holds it.
    """
    lock_path = path + LOCK_SUFFIX
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputLockedError(
                f"{path} is being written by {holder}; wait for that run to finish (or stop it) and try again"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            os.unlink(lock_path)  # still held: nobody can take the old file now
    finally:
        handle.close()
