"""Exceptions the library raises for problems the user can fix.

Each carries a one-line message meant to be shown as is; the command-line
layer prints it and exits with `exit_code`, without a traceback.
"""


class SearchUtilsError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 1


def printable_path(path: str) -> str:
    """`path` as it can be shown on one line of a terminal.

    File names may hold newlines, tabs and other control characters, and
    bytes that are not UTF-8 (kept by Python as surrogates, which would make
    printing fail): those are shown as escapes (`\\n`, `\\t`, `\\xe9`
    for an undecodable byte). Everything else is left as it is.
    """
    if path.isprintable():
        return path
    return "".join(char if char.isprintable() else _escape(char) for char in path)


def _escape(char: str) -> str:
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class ImageReadError(SearchUtilsError):
    """An image file could not be opened or decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{printable_path(path)}: {reason}")
        self.path = path
        self.reason = reason


class DatasetError(SearchUtilsError):
    """The folder to index does not exist or holds no images."""


class FeaturesFileError(SearchUtilsError):
    """A features file is missing, empty, malformed or inconsistent."""


class ModelMismatchError(SearchUtilsError):
    """Features and model (or metadata) disagree, e.g. on the dimension."""


class UnknownModelError(SearchUtilsError):
    """A model name that is not in the registry."""


class WeightsUnavailableError(SearchUtilsError):
    """Pretrained weights can't be downloaded or read."""

    exit_code = 2


class LabelsError(SearchUtilsError):
    """A labels file for evaluation is unreadable or matches nothing."""


class RuntimeUnavailableError(SearchUtilsError):
    """The inference runtime asked for can't be used here."""

    exit_code = 2


class PictureError(SearchUtilsError):
    """The results picture can't be written where asked (or where it would
    go by default): a missing or read-only folder, a folder's name, a format
    matplotlib can't write."""
