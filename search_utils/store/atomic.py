"""Writing files so that an interrupted or failed write never leaves a
half-written file: write a temporary file beside the target, flush it to
disk, rename it over the target, flush the folder.

Readers, and memory maps, of the previous file are undisturbed: a rename
replaces the name, not the bytes an open file holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
from typing import IO, Callable, Iterator

from ..errors import SearchUtilsError, printable_path
from .feature_store import ENCODING_ERRORS

_FICLONE = 0x40049409  # Linux ioctl: make a file share another's blocks
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class FileWriteError(SearchUtilsError):
    """A file can't be written (full disk, permissions, I/O error); the
    previous file is as it was."""


@contextlib.contextmanager
def write_errors(path: str) -> Iterator[None]:
    """OSErrors while writing `path`, as one line that says nothing was lost."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise FileWriteError(
            f"cannot write {printable_path(path)}: {reason}; the earlier file (if any) is as it was"
        ) from None


@contextlib.contextmanager
def atomic_write(path: str, newline: str | None = None, binary: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success, flush it
    to disk and rename it over `path`. On any error `path` is untouched."""
    text = {} if binary else {"encoding": "utf-8", "errors": ENCODING_ERRORS, "newline": newline}
    with atomic_file(path) as tmp:
        with open(tmp, "wb" if binary else "w", **text) as handle:
            yield handle


@contextlib.contextmanager
def atomic_file(path: str, copy_of: str | None = None,
                put_in_place: Callable[[str], None] | None = None) -> Iterator[str]:
    """A temporary file name beside `path` (empty, or a copy of `copy_of`
    with its permissions) to write by name, e.g. with h5py; on success it is
    fsync'ed and renamed over `path`, or handed to `put_in_place(tmp)`
    (which publishes it with its sidecars, see generation.py). On any error
    `path` is untouched and the temporary file removed.

    Raises:
        FileWriteError: the file system refused (full disk, permissions).
    """
    folder = os.path.dirname(os.path.abspath(path))
    with write_errors(path):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
    try:
        with write_errors(path):
            os.chmod(tmp, file_mode(path))  # mkstemp's 0600 would hide the file from others
            if copy_of is not None:
                copy_file(copy_of, tmp)
                shutil.copymode(copy_of, tmp)
        yield tmp
        with write_errors(path):
            fsync_file(tmp)
            if put_in_place is None:
                os.replace(tmp, path)
            else:
                put_in_place(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode(path: str) -> int:
    """The permissions `path` has now, or a new file's (0666 less the umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def copy_file(source: str, target: str) -> None:
    """Give `target` the bytes of `source`: a reflink where the filesystem
    can (blocks shared until written), else a kernel copy."""
    if sys.platform.startswith("linux"):
        try:
            import fcntl

            with open(source, "rb") as src, open(target, "r+b") as dst:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
            return
        except OSError:
            pass  # ext4, tmpfs, ...: not supported
    shutil.copyfile(source, target)


def fsync_folder(folder: str) -> None:
    """Make a rename in `folder` durable (best effort: not every platform
    can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (a few renames), so a
    stop request can't land between two steps that belong together. Only
    kill -9 can; readers and the next writer handle that (generation.py).

    Python-level handlers, not a signal mask: a mask holds only the calling
    thread, and the kernel hands the signal to another (e.g. a BLAS) thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
                for signum in _STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught[:1]:  # now, as it would have been handled
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files that writes of `path` (and its sidecars)
    left behind when their process was killed (kill -9: no cleanup runs).
    Only call while no one writes `path` (e.g. holding its indexing lock)."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
