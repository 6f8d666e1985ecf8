"""Command-line plumbing shared by the commands: one-line errors, exit codes.

The library raises SearchUtilsError subclasses; only this layer turns them
into a message on stderr and an exit status. A file-system failure (OSError)
that no layer below put into words still reaches the user as one line naming
the file and the operating system's reason; any other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Callable, Iterator, Sequence

from .errors import SearchUtilsError, printable_path

EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (plus where to find help)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def error_line(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`, mapping user errors and Ctrl-C to messages and codes."""
    prog = os.path.basename(sys.argv[0])
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
    try:
        return main(argv)
    except SearchUtilsError as error:
        error_line(prog, str(error))
        return error.exit_code
    except KeyboardInterrupt:
        error_line(prog, "interrupted; nothing was written, earlier files are as they were")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except OSError as error:  # the backstop: a file that couldn't be read or written, said in one line
        error_line(prog, os_error_message(error))
        return 1


@contextlib.contextmanager
def interrupts_while_starting() -> Iterator[None]:
    """Around a command's imports (a second or two: numpy, pandas...): Ctrl-C
    or `kill` there ends as it does later, one line and exit status 130,
    instead of a traceback through the imports or a silent death by SIGTERM.
    The SIGTERM handling before it is put back afterwards (`run` sets its own)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    except KeyboardInterrupt:
        error_line(os.path.basename(sys.argv[0]), "interrupted while starting; nothing was written")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def os_error_message(error: OSError) -> str:
    """`<file>: <reason>` for an OSError: the file(s) it names, shown on one
    line, then the operating system's reason (`Permission denied`)."""
    reason = error.strerror or " ".join(str(error).split()) or type(error).__name__
    names = [_shown(name) for name in (error.filename, error.filename2) if name is not None]
    return f"{' -> '.join(names)}: {reason}" if names else reason


def _shown(name) -> str:
    if isinstance(name, (str, bytes, os.PathLike)):
        return printable_path(os.fsdecode(name))
    return str(name)  # a file descriptor


def _interrupt(signum, frame):
    raise KeyboardInterrupt
