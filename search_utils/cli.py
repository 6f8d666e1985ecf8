"""Command-line plumbing shared by the commands: one-line errors, exit codes.

The library raises SearchUtilsError subclasses; only this layer turns them
into a message on stderr and an exit status.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, Sequence

from .errors import SearchUtilsError

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


def _interrupt(signum, frame):
    raise KeyboardInterrupt
