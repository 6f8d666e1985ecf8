"""Exceptions the library raises for problems the user can fix.

Each carries a one-line message meant to be shown as is; the command-line
layer prints it and exits with `exit_code`, without a traceback.
"""


class SearchUtilsError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""

    exit_code = 1


class ImageReadError(SearchUtilsError):
    """An image file could not be opened or decoded."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
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
