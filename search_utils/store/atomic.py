"""Writing files so that an interrupted or failed write never leaves a
half-written file: write a temporary file beside the target, flush it to
disk, rename it over the target, flush the folder.

Readers, and memory maps, of the previous file are undisturbed: a rename
replaces the name, not the bytes an open file holds.

Temporary files are named `.<target's name>.<8 random characters>.tmp`,
the target's name cut short if needed so that the temporary name fits
the file system's limit (NAME_MAX) whatever the target's length. While
it writes, the writer holds an OS lock (flock) on its temporary file:
a temporary file nobody holds a lock on was left by a process that died
(kill -9, a power cut), and any later write of the same target removes
it (`remove_stale_temporaries`), whichever command it is.

Also here: `open_regular`, the one way the store opens a file that may
be anything (a features file, a sidecar): a FIFO, socket or device is
refused without blocking on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from typing import IO, Callable, Iterator

from ..errors import SearchUtilsError, printable_path
from .feature_store import ENCODING_ERRORS

_FICLONE = 0x40049409  # Linux ioctl: make a file share another's blocks
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
TEMPORARY_SUFFIX = ".tmp"
_RANDOM_PART = re.compile(r"(?:.*\.)?[a-z0-9_]{8}\.tmp\Z", re.DOTALL)  # tempfile's 8 characters, then .tmp
_NAME_MAX = 255  # if the file system won't say
NOT_REGULAR = "not a regular file (a FIFO, socket or device)"


class FileWriteError(SearchUtilsError):
    """A file can't be written (full disk, permissions, I/O error); the
    previous file is as it was. `reason`: the operating system's words."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class NotRegularFileError(OSError):
    """A name that is a FIFO, socket or device where a file was expected:
    opening it for reading would block, or read something endless."""

    def __init__(self, path: str):
        super().__init__(None, NOT_REGULAR, path)


def open_regular(path: str, mode: str = "rb", **options) -> IO:
    """`open(path, mode, **options)` for reading, without ever blocking on
    a FIFO (opened non-blocking, checked, then made blocking).

    Raises:
        NotRegularFileError: a FIFO, socket or device.
        IsADirectoryError, FileNotFoundError, PermissionError...: as open().
    """
    if any(flag in mode for flag in "wax+"):
        raise ValueError(f"open_regular reads; mode {mode!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ENXIO:  # a socket, or a device without its driver
            raise NotRegularFileError(path) from None
        raise
    try:
        kind = os.fstat(fd).st_mode
        if stat.S_ISDIR(kind):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(kind):
            raise NotRegularFileError(path)
        os.set_blocking(fd, True)
        return open(fd, mode, **options)
    except BaseException:
        os.close(fd)
        raise


def regular_file_problem(path: str) -> str | None:
    """Why `path` can't be used as a regular file (a folder, a FIFO, socket
    or device), or None: a regular file, or nothing there. Never opens it."""
    try:
        kind = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISDIR(kind):
        return "it is a folder"
    if not stat.S_ISREG(kind):
        return NOT_REGULAR
    return None


@contextlib.contextmanager
def write_errors(path: str) -> Iterator[None]:
    """OSErrors while writing `path`, as one line that says nothing was lost."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or str(error)
        raise FileWriteError(
            f"cannot write {printable_path(path)}: {reason}; the earlier file (if any) is as it was", reason
        ) from None


@contextlib.contextmanager
def atomic_write(path: str, newline: str | None = None, binary: bool = False) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success, flush it
    to disk and rename it over `path`. On any error `path` is untouched.

    Raises:
        FileWriteError: the file system refused (full disk, permissions),
            also while the caller wrote.
    """
    text = {} if binary else {"encoding": "utf-8", "errors": ENCODING_ERRORS, "newline": newline}
    with atomic_file(path) as tmp:
        with write_errors(path), open(tmp, "wb" if binary else "w", **text) as handle:
            yield handle


@contextlib.contextmanager
def atomic_file(path: str, copy_of: str | None = None,
                put_in_place: Callable[[str], None] | None = None) -> Iterator[str]:
    """A temporary file name beside `path` (empty, or a copy of `copy_of`)
    to write by name, e.g. with h5py; on success it is fsync'ed, given the
    permissions of the file it replaces (of `copy_of`, or a new file's),
    and renamed over `path`, or handed to `put_in_place(tmp)` (which
    publishes it with its sidecars, see generation.py). On any error
    `path` is untouched and the temporary file removed.

    The permissions are set last, just before the rename: a read-only
    (0444) file is replaced as its folder allows, and stays read-only.
    Temporary files of `path` that dead writers left are removed first.

    Raises:
        FileWriteError: the file system refused (full disk, permissions).
    """
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(path)
    with write_errors(path):
        lock, tmp = _locked_temporary(path, folder)
    try:
        try:
            if copy_of is not None:
                with write_errors(path):
                    copy_file(copy_of, tmp)
            yield tmp
            with write_errors(path):
                fsync_file(tmp)
                # Now, not at creation: a 0444 mode would stop this process from writing its own file.
                os.chmod(tmp, file_mode(path if copy_of is None else copy_of))
                if put_in_place is None:
                    os.replace(tmp, path)
                else:
                    put_in_place(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        os.close(lock)  # the lock goes with it: the file is in place, or gone
    fsync_folder(folder)


def temporary_prefix(path: str) -> str:
    """How the names of `path`'s temporary files start: a dot and the
    target's name, cut (bytes) so that the prefix, the random part and
    `.tmp` fit the folder's limit on names."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.fsencode(os.path.basename(path))
    room = name_max(folder) - len(b"..") - 8 - len(TEMPORARY_SUFFIX)
    return "." + os.fsdecode(name[:max(1, room)]) + "."


def name_length_problem(path: str, suffixes: dict[str, str]) -> str | None:
    """Why the file system can't hold the names of `path` and of the files
    named `path` + each of `suffixes` (suffix -> what that file is), or
    None. The limit is in bytes (NAME_MAX, usually 255), for the folder's
    file system. The folder must exist."""
    limit = name_max(os.path.dirname(os.path.abspath(path)))
    own = len(os.fsencode(os.path.basename(path)))
    longest, suffix = max([(0, "")] + [(len(os.fsencode(suffix)), suffix) for suffix in suffixes])
    if own + longest <= limit:
        return None
    if own > limit:
        return f"its name is {own} bytes long, over the {limit} the file system allows"
    return (f"its name is too long: {suffixes[suffix]}, named like it with {suffix!r} added, would be "
            f"{own + longest} bytes, over the {limit} the file system allows; use a name of at most "
            f"{limit - longest} bytes")


def name_max(folder: str) -> int:
    """The longest file name (in bytes) the file system of `folder` takes."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return _NAME_MAX


def _locked_temporary(path: str, folder: str) -> tuple[int, str]:
    """(a descriptor holding the lock, the name) of a new temporary file
    for `path`. A cleaner can take a file in the instant between its
    creation and its lock, and remove it: then another is made."""
    prefix = temporary_prefix(path)
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=TEMPORARY_SUFFIX)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd, tmp
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)  # removed by a cleaner before it was locked


def is_temporary_of(name: str, path: str) -> bool:
    """Whether the file `name` (in `path`'s folder) is named like a
    temporary file of `path` or of one of its sidecars."""
    prefix = temporary_prefix(path)
    return name.startswith(prefix) and bool(_RANDOM_PART.match(name, len(prefix)))


def remove_stale_temporaries(path: str) -> None:
    """Delete the temporary files that writes of `path` (and its sidecars)
    left behind when their process was killed (kill -9: no cleanup runs).
    A temporary file whose writer is alive holds its lock: it is left alone,
    so this is safe at any time, from any process."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if is_temporary_of(name, path):
            _remove_if_abandoned(os.path.join(folder, name))


def _remove_if_abandoned(name: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return  # gone already, or not ours to read
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # its writer is alive
        with contextlib.suppress(OSError):
            if os.lstat(name).st_ino == info.st_ino:
                os.unlink(name)
    finally:
        os.close(fd)


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
